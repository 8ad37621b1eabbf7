"""What a compiled decode step spends outside the operators: ``python -m benchmarks framework``.

SmolLM2-135M (the packaged model) compiled in place with ``qcompile.compile(model, nf4 on every
linear and the embedding, lowering="inductor")`` decodes greedily with the KV cache; after a
warm-up (which compiles), ``steps`` steps run under ``torch.profiler``, each inside a
``record_function`` of its own. Per step, from the main thread's event tree:

* wall: the step event's duration;
* operators: the summed durations of the top-level operator events (``aten::*``,
  ``qcompile_cpu::*``, ``qcompile::*``, and Inductor's own C++ kernels, which record an event
  because the graphs are compiled with ``cpp.enable_kernel_profile``), not nested in another;
* framework = wall - operators, split by the framework event that holds the time: Dynamo's
  guard evaluation ("TorchDynamo Cache Lookup"), Inductor's wrapper (inside "## Call
  CompiledFxGraph ##", the generated code that calls the kernels), the rest of the compiled
  region (AOTDispatcher's and blockquant's wrappers around it: "Torch-Compiled Region") and
  other (Python outside the graphs).

The profiler adds its own cost per event, so the profiled wall time is also shown beside the
same steps timed without it. Times are medians over the steps, in milliseconds.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

STEP = "blockquant decode step"
OPERATOR_PREFIXES = ("aten::", "qcompile_cpu::", "qcompile::", "prims::", "quantized::")
INDUCTOR_KERNEL = "cpp_fused"  # Inductor's kernels: "graph_<id>_cpp_fused_..." when profiled
#: framework parts: (name in the table, how a profiler event that holds such time starts)
PARTS = (("guards", "TorchDynamo Cache Lookup"),
         ("inductor wrapper", "## Call CompiledFxGraph"),
         ("compiled region", "Torch-Compiled Region"))
FIELDS = ("wall", "operators", "framework", *(p for p, _ in PARTS), "other")


def is_operator(name: str) -> bool:
    return name.startswith(OPERATOR_PREFIXES) or INDUCTOR_KERNEL in name


def _part(name: str, inherited: str) -> str:
    return next((p for p, prefix in PARTS if name.startswith(prefix)), inherited)


def _duration(event) -> float:
    return event.time_range.end - event.time_range.start


def split_step(step) -> dict:
    """Microseconds of one step event: wall, operators, framework and its parts. Every
    microsecond of the step lands in exactly one part: an operator's whole span in
    ``operators``; the rest of an event's span (less its children) in the part of the nearest
    framework event around it ("other" when none)."""
    times = dict.fromkeys(FIELDS, 0.0)

    def walk(event, part):
        if is_operator(event.name):
            times["operators"] += _duration(event)
            return
        part = _part(event.name, part)
        times[part] += _duration(event) - sum(_duration(c) for c in event.cpu_children)
        for child in event.cpu_children:
            walk(child, part)

    walk(step, "other")
    times["wall"] = _duration(step)
    times["framework"] = times["wall"] - times["operators"]
    return times


def step_events(prof) -> list:
    """The step events, in order."""
    return sorted((e for e in prof.events() if e.name == STEP), key=lambda e: e.time_range.start)


@torch.no_grad()
def decode_steps(model, prompt: torch.Tensor, steps: int, profiled: bool):
    """Prefill ``prompt`` then ``steps`` greedy steps; returns (profiler or None, [seconds per
    step by perf_counter])."""
    out = model(input_ids=prompt, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    seconds = []
    prof = profile(activities=[ProfilerActivity.CPU]) if profiled else None
    with prof if prof is not None else contextlib.nullcontext():
        for _ in range(steps):
            start = time.perf_counter()
            with record_function(STEP):
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            seconds.append(time.perf_counter() - start)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return prof, seconds


def kernel_events():
    """Graphs compiled inside this context give each Inductor C++ kernel a profiler event, so
    the kernels' time counts as operators' work, not the wrapper's (no cost unprofiled)."""
    from torch._inductor import config as inductor_config
    return inductor_config.patch({"cpp.enable_kernel_profile": True})


def measure(model, prompt: torch.Tensor, steps: int = 8, repeats: int = 3) -> dict:
    """Profile ``steps`` decode steps of ``model`` (already compiled, or eager), ``repeats``
    times, after one warm-up round that compiles. Returns per-field medians in ms over all
    profiled steps (``steps_ms``: each step's split), and ``unprofiled_ms``: the median step
    timed without the profiler, rounds interleaved with the profiled ones."""
    with kernel_events():
        decode_steps(model, prompt, max(steps, 2), profiled=False)  # compiles (both graphs)
    split, plain = [], []
    for _ in range(repeats):
        prof, _ = decode_steps(model, prompt, steps, profiled=True)
        events = step_events(prof)
        if len(events) != steps:
            raise RuntimeError(f"framework: the profile holds {len(events)} step events, "
                               f"expected {steps}")
        split += [{k: v / 1e3 for k, v in split_step(e).items()} for e in events]
        plain += [1e3 * s for s in decode_steps(model, prompt, steps, profiled=False)[1]]
    row = {k: statistics.median(s[k] for s in split) for k in FIELDS}
    row["framework"] = row["wall"] - row["operators"]  # medians of a difference may not add up
    row.update(unprofiled_ms=statistics.median(plain), steps=len(split), steps_ms=split)
    return row


def table(row: dict, label: str = "") -> str:
    """The row as a short text table (ms per decode step)."""
    head = f"framework time per decode step{' of ' + label if label else ''} " \
           f"(medians of {row['steps']} profiled steps, ms)"
    lines = [head, f"  {'wall (profiled)':<22}{row['wall']:9.2f}",
             f"  {'wall (not profiled)':<22}{row['unprofiled_ms']:9.2f}",
             f"  {'operators':<22}{row['operators']:9.2f}",
             f"  {'framework':<22}{row['framework']:9.2f}  = wall - operators, of which:"]
    lines += [f"    {p:<20}{row[p]:9.2f}" for p in (*(p for p, _ in PARTS), "other")]
    return "\n".join(lines)


def compiled_smollm2(fmt: str = "nf4", **options):
    """The packaged SmolLM2-135M, compiled in place with ``fmt`` on every linear layer and
    the embedding (the speed section's blockquant row)."""
    import qcompile

    from .data import load_causal_lm
    from .policies import every_linear
    model, tok = load_causal_lm()
    policy = every_linear(fmt)
    qcompile.quantize_model_(model, policy)
    return qcompile.compile(model, policy, lowering="inductor", **options), tok


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks framework", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="profiled decode steps per round")
    ap.add_argument("--repeats", type=int, default=3, help="profiled rounds (default 3)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens before decoding")
    ap.add_argument("--fmt", default="nf4", help="the weight format (default nf4)")
    ap.add_argument("--cpp-wrapper", action="store_true",
                    help="compile with Inductor's C++ wrapper (option cpp_wrapper=True)")
    args = ap.parse_args(argv)
    options = {"cpp_wrapper": True} if args.cpp_wrapper else {}
    model, _ = compiled_smollm2(args.fmt, **options)
    prompt = torch.arange(1, args.prompt + 1)[None, :]
    row = measure(model, prompt, args.steps, args.repeats)
    wrapper = ", C++ wrapper" if args.cpp_wrapper else ""
    print(table(row, f"SmolLM2-135M, blockquant {args.fmt} (inductor{wrapper})"), flush=True)
    return row


if __name__ == "__main__":
    main()
