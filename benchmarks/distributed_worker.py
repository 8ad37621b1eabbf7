"""One rank of the distributed benchmark (benchmarks/distributed.py), launched by
``python -m torch.distributed.run --standalone --nproc-per-node N -m benchmarks.distributed_worker
FOLDER OUT.json LOGITS.pt --decode D --repeats R --prompt P [--kinds eager compiled]``.

Every rank loads FOLDER with ``BlockQuantConfig(POLICY)`` (with a tp_plan when N > 1: each rank
packs its own shard), measures what it holds, the peak resident memory while loading and its
decode steps; rank 0 gathers the rows (one per rank) into OUT.json and saves its logits of the
prompt to LOGITS.pt, with the prompt."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

import qcompile
from qcompile import LayerSpec, Policy

#: every linear layer nf4, lm_head kept in full precision: tensor parallelism shards SmolLM2's
#: lm_head with its tied embedding, and a quantised embedding table cannot be split
POLICY = Policy({"lm_head": None}, default=LayerSpec(weight="nf4"))
KINDS = ("eager", "compiled")


def status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (VmRSS, VmHWM), or None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Start VmHWM (peak resident memory) again from the current RSS: writing 5 to
    /proc/self/clear_refs does that on Linux. False where it cannot (the peak then covers the
    process's whole life)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """VmHWM, or ru_maxrss (KiB on Linux) where /proc has no status."""
    kib = status_kib("VmHWM")
    if kib is None:
        import resource
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return 1024 * kib


def plan(config, ranks: int) -> str:
    """Set ``config``'s tp_plan for ``ranks`` and describe it: the model's own ("auto") where
    its attention heads split evenly over the ranks; otherwise the plan without its attention
    rules, the attention replicated (transformers cannot split SmolLM2-135M's 9 query heads
    over 2 ranks). One rank: no plan (the reference model)."""
    if ranks == 1:
        return "none (one process)"
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    if heads is None or (heads % ranks == 0 and kv % ranks == 0):
        return "auto (the model's own)"
    rules = dict(config.base_model_tp_plan or {})
    config.base_model_tp_plan = {k: v for k, v in rules.items() if ".self_attn." not in k}
    return (f"auto without attention: {heads} query / {kv} key-value heads do not split over "
            f"{ranks} ranks, so attention is replicated")


def model_class(config):
    """The checkpoint's model class, imported before loading is measured (importing a
    transformers model module adds ~200 MB of resident memory of its own)."""
    import transformers
    names = getattr(config, "architectures", None) or []
    found = getattr(transformers, names[0], None) if names else None
    return found if found is not None else transformers.AutoModelForCausalLM


def load(cls, folder: str, config, ranks: int):
    """(model, seconds): loaded with BlockQuantConfig(POLICY), under the tp_plan when
    ``ranks`` > 1."""
    kwargs = {"config": config, "quantization_config": qcompile.BlockQuantConfig(POLICY)}
    if ranks > 1:
        kwargs["tp_plan"] = "auto"
    start = time.perf_counter()
    model = cls.from_pretrained(folder, **kwargs).eval()
    return model, time.perf_counter() - start


def packed_bytes(model) -> tuple[int, int]:
    """(bytes of this rank's packed linear layers' buffers, how many of them hold a shard)."""
    from qcompile.swap import QuantLinear
    from qcompile.tensor_parallel import SHARDED_ATTR
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    held = sum(b.numel() * b.element_size() for m in layers for b in m.buffers())
    return held, sum(bool(getattr(m, SHARDED_ATTR, False)) for m in layers)


@torch.no_grad()
def decode(fn, prompt: torch.Tensor, steps: int) -> tuple[list[float], list[int]]:
    """Prefill ``prompt`` with a KV cache, then ``steps`` greedy steps: (seconds per step,
    the tokens chosen)."""
    out = fn(input_ids=prompt, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    seconds, tokens = [], [nxt.item()]
    for _ in range(steps):
        start = time.perf_counter()
        out = fn(input_ids=nxt, past_key_values=past, use_cache=True)
        seconds.append(time.perf_counter() - start)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        tokens.append(nxt.item())
    return seconds, tokens


def timed_decode(fn, prompt, steps: int, repeats: int) -> dict:
    """A warm-up round (compiles a compiled ``fn``), then the median step over ``repeats``
    rounds."""
    start = time.perf_counter()
    decode(fn, prompt, steps)
    warm_s = time.perf_counter() - start
    seconds, tokens = [], []
    for _ in range(repeats):
        s, tokens = decode(fn, prompt, steps)
        seconds += s
    return {"decode_ms": 1e3 * statistics.median(seconds), "warmup_s": warm_s, "tokens": tokens}


def measure(args, ranks: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """This rank's row, its logits of the prompt, and the prompt."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(args.folder)
    described, cls = plan(config, ranks), model_class(config)
    reset = reset_peak()
    before = 1024 * (status_kib("VmRSS") or 0)
    model, load_s = load(cls, args.folder, config, ranks)
    peak = peak_rss_bytes()
    held, sharded = packed_bytes(model)
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=gen)
    with torch.no_grad():
        logits = model(prompt).logits.float()
    row = {"ranks": ranks, "rank": dist.get_rank() if ranks > 1 else 0, "plan": described,
           "load_s": load_s, "rss_before": before, "peak_rss": peak, "peak_reset": reset,
           "packed_bytes": held, "sharded_layers": sharded,
           "resident_bytes": qcompile.resident_weight_bytes(model),
           "threads": torch.get_num_threads()}
    for kind in args.kinds:
        fn = model if kind == "eager" else qcompile.compile(model, POLICY, lowering="eager")
        row[kind] = timed_decode(fn, prompt, args.decode, args.repeats)
    return row, logits, prompt


def main(argv=None):
    ap = argparse.ArgumentParser(prog="benchmarks.distributed_worker", description=__doc__)
    ap.add_argument("folder")
    ap.add_argument("out", type=Path)
    ap.add_argument("logits", type=Path)
    ap.add_argument("--decode", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    args = ap.parse_args(argv)
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    row, logits, prompt = measure(args, ranks)
    rows = [row]
    if ranks > 1:  # transformers set the process group up while loading under the plan
        rows = [None] * ranks
        dist.all_gather_object(rows, row)
    if row["rank"] == 0:
        torch.save({"prompt": prompt, "logits": logits}, args.logits)
        args.out.write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
