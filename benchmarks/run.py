"""Compiled vs eager: which number format for which layer?

    python -m benchmarks run [--model FOLDER] [--tokens N] [--out results/DIR]
                             [--policies NAME ...] [--quick]

Three measurements, one results folder (report.md, results.json, PNG plots):

1. perplexity of a causal LM (default: the packaged SmolLM2-135M) on the Wikipedia text from
   gensim's test data, for full precision and every sweep policy (weight-only formats on all
   linears except lm_head, plus four weight+activation policies), with qcompile.explain's
   effective bits per weight;
2. weight error (MSE, SQNR) and sentence-embedding cosine similarity of every weight-only format
   on all-MiniLM-L6-v2 (real float32 weights);
3. speed and memory: eager fp32, eager fake-quantised, torch.compile (Inductor) fp32 and the
   blockquant backend for a W8 and a 4-bit weight-only policy; prefill, decode with a KV cache,
   compile time, resident weight bytes; beside them the peers when installed (llama.cpp on the
   packaged GGUF, torchao's CPU int4 / int8 weight-only: benchmarks/peers.py), and the CPU GEMV
   kernels against a streaming read of the same bytes (benchmarks/gemv.py; section "gemv"
   runs that alone). With the Inductor speed lowering (the default) also the 4-bit policy as
   two ahead-of-time packages (qcompile.export_decoder, exported once into .cache/packages/),
   loaded and timed in a fresh process (benchmarks/package.py; --no-package skips it).

Section "moe", run only when named (--sections moe; it quantises a model of 0.6-1.2 billion
weights per policy and dtype): a 2-layer model with Qwen3-30B-A3B's MoE layer shapes and random
weights, eager / torch.compile / blockquant nf4 and W4A8 in fp32 and bf16 (benchmarks/moe.py).

Section "distributed", run only when named (also ``python -m benchmarks distributed``): the
causal LM (--distributed-model, default SmolLM2-135M) every linear nf4 except lm_head, loaded
with BlockQuantConfig on 1 and on 2 ranks (torchrun, gloo): packed bytes per rank, peak memory
while loading, decode time, logits against one process (benchmarks/distributed.py).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from . import distributed, embeddings, gemv, moe, package, peers, perplexity, report, speed

SECTIONS = ("ppl", "weights", "speed", "gemv", "moe", "distributed")  # "speed" runs "gemv" too
#: what a run without --sections measures: "moe" takes hours on 2 cores until the packed
#: experts have kernels (docs/benchmarks.md), and "distributed" measures tensor parallelism's
#: correctness and memory, not the single-process speed the others compare, so both run only
#: when named
DEFAULT_SECTIONS = ("ppl", "weights", "speed", "gemv")
LM_SECTIONS = {"ppl", "weights", "speed", "gemv"}  # those that load the causal LM and the text
#: --quick: a few policies and formats, a small token budget, eager lowering everywhere.
QUICK_POLICIES = ["mxint8", "bfp6", "nf4", "bof4s", "bof4s_opq", "bfp6 W6A6"]
QUICK_FORMATS = ["mxint8", "bfp6", "nf4", "bof4s", "bof4s_opq", "mxfp4"]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None,
                    help="a Hugging Face causal-LM folder (default: the packaged SmolLM2-135M)")
    ap.add_argument("--tokens", type=int, default=None,
                    help="perplexity token budget: the first N tokens of the text, in "
                         "non-overlapping windows (default 2048; --quick 1024)")
    ap.add_argument("--window", type=int, default=512, help="perplexity window length (tokens)")
    ap.add_argument("--batch", type=int, default=None,
                    help="windows per forward call; must divide the number of windows "
                         "(default 2; --quick 1)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default results/<timestamp>)")
    ap.add_argument("--policies", nargs="+", default=None, metavar="NAME",
                    help="perplexity policies: sweep labels (int8, nf4, 'bfp6 W6A6', ...) or "
                         "any format key (weight-only), 'WA:<fmt>' for weights+activations; "
                         "full precision always runs (default: the whole sweep)")
    ap.add_argument("--quick", action="store_true",
                    help="a few-minute run: 6 policies, 1024 tokens, 64 sentences, eager lowering")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(DEFAULT_SECTIONS),
                    help=f"what to measure (default: {' '.join(DEFAULT_SECTIONS)}; moe and "
                         "distributed run only when named)")
    ap.add_argument("--lowering", choices=("eager", "inductor"), default="eager",
                    help="blockquant lowering for the perplexity sweep (default eager: Inductor "
                         "compiles each policy's graph for minutes on 2 cores, and the eager "
                         "lowering gives the same numbers up to float32 reordering)")
    ap.add_argument("--speed-lowering", choices=("eager", "inductor"), default=None,
                    help="lowering of the compiled speed configurations (default inductor; "
                         "--quick eager)")
    ap.add_argument("--text", type=Path, default=None,
                    help="a UTF-8 text file (default: the Wikipedia text from gensim)")
    ap.add_argument("--encoder", type=Path, default=None,
                    help="sentence-encoder folder for the weight section (default: the packaged "
                         "all-MiniLM-L6-v2)")
    ap.add_argument("--sentences", type=int, default=None,
                    help="sentences for the embedding cosine (default 256; --quick 64)")
    ap.add_argument("--formats", nargs="+", default=None,
                    help="formats of the weight section (default: the weight-only sweep + bfp4)")
    ap.add_argument("--prefill", type=int, default=512,
                    help="prompt tokens of the timed prefill (default 512)")
    ap.add_argument("--decode-prompt", type=int, default=128,
                    help="prompt tokens before the timed decode steps (default 128)")
    ap.add_argument("--decode", type=int, default=None,
                    help="decode steps per speed run (default 16; --quick 2)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed speed runs, median reported (default 5; --quick 1)")
    ap.add_argument("--w8", default="mxint8", help="the W8 format of the speed runs")
    ap.add_argument("--w4", default="nf4", help="the 4-bit format of the speed runs")
    ap.add_argument("--speed-dtypes", nargs="*", choices=list(speed.DTYPES), default=None,
                    help="model dtypes whose eager and 4-bit rows the speed section adds "
                         "(default: bf16 fp16; --quick none)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-peers", action="store_true",
                    help="skip llama.cpp and torchao beside the speed rows")
    ap.add_argument("--no-package", action="store_true",
                    help="skip the speed section's package row (the 4-bit policy exported "
                         "ahead of time, loaded in a fresh process: an export takes minutes, "
                         "once; runs with the Inductor speed lowering only)")
    ap.add_argument("--moe-experts", type=int, default=None,
                    help=f"experts per layer of the moe section's model (default "
                         f"{moe.EXPERTS}, Qwen3-30B-A3B has 128; --quick {moe.QUICK_EXPERTS})")
    ap.add_argument("--moe-dtypes", nargs="+", choices=list(moe.DTYPES), default=None,
                    help="model dtypes of the moe section (default: fp32 bf16); eager fp32, "
                         "the baseline, always runs")
    ap.add_argument("--distributed-model", type=Path, default=None, metavar="FOLDER",
                    help="causal-LM folder of the distributed section (default: the packaged "
                         "SmolLM2-135M)")
    ap.add_argument("--distributed-kinds", nargs="+", choices=distributed.KINDS,
                    default=list(distributed.KINDS),
                    help="what the distributed section decodes with: the model as loaded "
                         "(eager) and/or qcompile.compile(lowering='eager') (default: both)")
    ap.add_argument("--gemv-shapes", nargs="+", type=_shape, default=gemv.SHAPES, metavar="NxK",
                    help="weight shapes of the GEMV section (default 4096x4096 11008x4096)")
    return ap


def _shape(text: str) -> tuple[int, int]:
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape NxK, e.g. 4096x4096") from None
    if n < 1 or k < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: both sizes must be positive")
    return n, k


def settle(args, ap) -> argparse.Namespace:
    """Fill the defaults that depend on --quick and validate everything that can be checked
    before loading a model; errors go through the parser (exit status 2, a clear message)."""
    q = args.quick
    args.tokens = args.tokens if args.tokens is not None else (1024 if q else 2048)
    args.batch = args.batch if args.batch is not None else (1 if q else 2)
    args.sentences = args.sentences if args.sentences is not None else (64 if q else 256)
    args.decode = args.decode if args.decode is not None else (2 if q else 16)
    args.repeats = args.repeats if args.repeats is not None else (1 if q else 5)
    args.speed_lowering = args.speed_lowering or ("eager" if q else "inductor")
    args.moe_experts = args.moe_experts or (moe.QUICK_EXPERTS if q else moe.EXPERTS)
    args.moe_dtypes = args.moe_dtypes or list(moe.DTYPES)
    if args.speed_dtypes is None:
        args.speed_dtypes = [] if q else list(speed.DTYPES)
    active = moe.SHAPE["num_experts_per_tok"]
    if args.moe_experts < active:
        ap.error(f"--moe-experts must be at least {active} (the experts active per token), "
                 f"got {args.moe_experts}")
    if args.policies is None and q:
        args.policies = QUICK_POLICIES
    if args.formats is None:
        args.formats = QUICK_FORMATS if q else perplexity.WEIGHT_ONLY + ["bfp4"]
    for name, v, low in (("--tokens", args.tokens, 2), ("--window", args.window, 2),
                         ("--sentences", args.sentences, 1), ("--batch", args.batch, 1),
                         ("--prefill", args.prefill, 1), ("--decode-prompt", args.decode_prompt, 1),
                         ("--decode", args.decode, 1), ("--repeats", args.repeats, 1)):
        if v < low:
            ap.error(f"{name} must be at least {low}, got {v}")
    if args.tokens < args.window:
        ap.error(f"--tokens {args.tokens} is smaller than one --window of {args.window}")
    if (args.tokens // args.window) % args.batch:
        ap.error(f"--batch {args.batch} does not divide the {args.tokens // args.window} windows "
                 f"of --tokens {args.tokens} / --window {args.window} (each batch shape compiles "
                 "its own graph)")
    if args.model is not None and not (args.model / "config.json").is_file():
        ap.error(f"--model {args.model}: not a Hugging Face model folder (no config.json)"
                 if args.model.is_dir() else f"--model {args.model}: no such folder")
    folder = args.distributed_model
    if folder is not None and not (folder / "config.json").is_file():
        ap.error(f"--distributed-model {folder}: not a Hugging Face model folder (no config.json)"
                 if folder.is_dir() else f"--distributed-model {folder}: no such folder")
    if args.encoder is not None and not (args.encoder / "config.json").is_file():
        ap.error(f"--encoder {args.encoder}: not a Hugging Face model folder (no config.json)")
    if args.text is not None and not args.text.is_file():
        ap.error(f"--text {args.text}: no such file")
    from qcompile import formats
    for f in args.formats + [args.w8, args.w4]:
        try:
            formats.get(f)
        except (ValueError, TypeError) as e:
            ap.error(f"unknown format {f!r}: {e}")
    try:
        args.sweep = perplexity.sweep_policies(args.policies)
    except ValueError as e:
        ap.error(str(e))
    if args.out is None:
        args.out = Path("results") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return args


def machine() -> dict:
    import transformers

    import qcompile
    return {"platform": platform.platform(), "machine": platform.machine(),
            "processor": _cpu_name(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "qcompile": qcompile.__version__}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def estimate(model, windows, args) -> float:
    """Rough seconds for the whole run, from one timed forward of a window and the time to
    quantise one linear weight: printed so the user knows what they started."""
    from .perplexity import perplexity as ppl
    ppl(model, windows[:1])  # warm
    t_win = ppl(model, windows[:1])["seconds"][0]
    lins = [m.weight for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    total = sum(w.numel() for w in lins)
    big = max(lins, key=lambda w: w.numel()) if lins else None
    t_q = 0.0
    if big is not None:
        import qcompile
        start = time.perf_counter()
        qcompile.fake_quantize(big.detach(), "nf4", axis=1)
        t_q = (time.perf_counter() - start) * total / big.numel()
    est = 0.0
    calls = len(windows) // args.batch
    if "ppl" in args.sections:
        # per quantised policy: Dynamo (~15 s), quantise + a dequantise per call (reference ops,
        # ~t_q each), the forward passes; activation formats roughly double the forward
        n_act = sum(1 for p in args.sweep.values() if p is not None and p.default.act is not None)
        n_w = len(args.sweep) - 1 - n_act
        est += len(windows) * t_win * (1 + 1.2 * n_w + 2.5 * n_act)
        est += (n_w + n_act) * (15 + t_q * (2 + calls))
    if "weights" in args.sections:
        est += len(args.formats) * (3 + 0.2 * t_q)
    if "speed" in args.sections:
        runs = args.repeats + 1
        fwd = t_win * args.prefill / args.window + args.decode * 0.05
        rows = 4 + 2 * len(args.speed_dtypes)  # W4A8 and a 4-bit row per extra dtype compile
        est += rows * runs * fwd + 2 * runs * (args.decode + 1) * (t_q + 0.05) + 2 * t_q
        est += (4 + len(args.speed_dtypes)) * (180 if args.speed_lowering == "inductor" else 30)
        if not args.no_peers:  # llama.cpp: seconds; torchao: two Inductor compiles, and its
            # int4 CPU kernel on float32 activations prefills ~50x slower than eager fp32
            est += 10 + 2 * 180 + runs * fwd * (50 + 1)
        if package_runs(args):  # an export (two AOTInductor compiles; reused afterwards)
            est += 15 * 60
    if "speed" in args.sections or "gemv" in args.sections:
        est += 8 * sum(n * k for n, k in args.gemv_shapes) / 4096**2
    return est


def main(argv=None) -> Path:
    ap = parser()
    args = settle(ap.parse_args(argv), ap)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    started = dt.datetime.now().isoformat(timespec="seconds")
    command = "python -m benchmarks run " + shlex.join(sys.argv[2:] if argv is None else argv)
    settings = {"command": command.strip(), "model": moe.TITLE, "packaged_model": False,
                "speed_lowering": args.speed_lowering, "prefill": args.prefill,
                "speed_dtypes": getattr(args, "speed_dtypes", []),
                "decode_prompt": args.decode_prompt, "decode": args.decode,
                "repeats": args.repeats, "estimate_s": 0.0}
    results = {"started": started, "machine": machine(), "settings": settings}
    if LM_SECTIONS & set(args.sections):
        lm_sections(args, ap, results)
    if "moe" in args.sections:
        config = moe.moe_config(args.moe_experts)
        settings["moe"] = {**moe.describe(config), "dtypes": args.moe_dtypes}
        print(f"moe: {moe.TITLE}, {args.moe_experts} experts, {' '.join(args.moe_dtypes)}",
              flush=True)
        report.save_json(results, args.out)

        def keep(rows):  # each row saved as it comes: the section runs for a long time
            results["moe"] = rows
            report.save_json(results, args.out)

        results["moe"] = moe.measure(config, args.moe_dtypes, args.prefill, args.decode_prompt,
                                     args.decode, args.repeats, args.speed_lowering,
                                     on_row=keep)
    if "distributed" in args.sections:
        distributed_section(args, results)
    results["total_s"] = time.perf_counter() - t0
    path = report.write(results, args.out)
    print(path.read_text())
    est = settings["estimate_s"]
    print(f"written to {path} (estimated {est / 60:.0f} min, took "
          f"{results['total_s'] / 60:.1f} min)" if est else
          f"written to {path} (took {results['total_s'] / 60:.1f} min)")
    return path


def distributed_section(args, results: dict) -> None:
    """Tensor parallelism on 1 and 2 ranks (benchmarks/distributed.py), into ``results``; the
    workers' logs, rows and logits stay in <out>/distributed/."""
    from .data import smollm2_folder
    folder = args.distributed_model or smollm2_folder()
    name = str(args.distributed_model) if args.distributed_model else "SmolLM2-135M-Instruct"
    settings = results["settings"]
    settings["distributed"] = {"model": name, "prompt": args.decode_prompt,
                               "kinds": args.distributed_kinds,
                               "policy": "every linear layer nf4, lm_head full precision"}
    if not LM_SECTIONS & set(args.sections):
        settings["model"] = name
    report.save_json(results, args.out)
    results["distributed"] = distributed.measure(
        folder, args.out / "distributed", args.decode, args.repeats, args.decode_prompt,
        args.distributed_kinds)


def package_runs(args) -> bool:
    """The package row sits beside the Inductor rows: the eager speed lowering (--quick, the
    tests) skips it, as it would spend minutes on an AOTInductor export."""
    return not args.no_package and args.speed_lowering == "inductor"


def lm_sections(args, ap, results: dict) -> None:
    """The sections on the causal LM and the text (ppl, weights, speed, gemv), into
    ``results``."""
    from .data import load_causal_lm, tokens_of, wiki_text

    text = args.text.read_text(encoding="utf-8") if args.text else wiki_text()
    model, tok = load_causal_lm(args.model)
    model_name = str(args.model) if args.model else "SmolLM2-135M-Instruct (packaged GGUF, Q4_1)"
    ids = tokens_of(tok, text, max(args.tokens, args.prefill, args.decode_prompt))
    try:
        windows = perplexity.token_windows(ids, args.window, args.tokens)
    except ValueError as e:
        ap.error(str(e))
    for flag, need in (("--prefill", args.prefill), ("--decode-prompt", args.decode_prompt)):
        if ids.numel() < need:
            ap.error(f"the text has {ids.numel()} tokens, fewer than {flag} {need}")
    est = estimate(model, windows, args)
    sweep = (f"{len(args.sweep)} perplexity policies on {len(windows)} windows of {args.window} "
             f"tokens; " if "ppl" in args.sections else "")
    print(f"model {model_name}; {sweep}sections {', '.join(args.sections)}; "
          f"estimated run time {est / 60:.0f} min on this machine", flush=True)
    results["settings"].update({
        "model": model_name, "packaged_model": args.model is None,
        "text": str(args.text) if args.text else
        "206 English Wikipedia pages from gensim's test data (CC BY-SA 3.0)",
        "window": args.window, "windows": len(windows), "batch": args.batch,
        "lowering": args.lowering, "w8": args.w8, "w4": args.w4,
        "encoder": str(args.encoder) if args.encoder else None, "estimate_s": est})
    if "ppl" in args.sections:
        results["perplexity"] = perplexity.sweep(model, windows, args.sweep, args.lowering,
                                                 args.batch)
        report.save_json(results, args.out)
    if "weights" in args.sections:
        results["embeddings"] = embeddings.fidelity(args.formats, text, args.sentences,
                                                    args.encoder)
        report.save_json(results, args.out)
    if "speed" in args.sections:
        results["speed"] = speed.measure(model, ids[None, :args.prefill], args.decode,
                                         args.repeats, args.w8, args.w4, args.speed_lowering,
                                         ids[None, :args.decode_prompt], args.speed_dtypes)
    if "speed" in args.sections and not package_runs(args):
        results["settings"]["package_skipped"] = ("--no-package" if args.no_package else
                                                  "--speed-lowering eager")
    elif "speed" in args.sections:
        results["package"] = [package.measure(model, ids[None, :args.prefill],
                                              ids[None, :args.decode_prompt], args.decode,
                                              args.repeats, args.w4)]
    if "speed" in args.sections and not args.no_peers:
        # the same prompts as the speed rows, so the peers sit beside them
        gguf = peers.packaged_gguf() if args.model is None else None
        results["peers"] = peers.measure(model, ids[None, :args.prefill],
                                         ids[None, :args.decode_prompt], args.decode,
                                         args.repeats, gguf)
    if "speed" in args.sections or "gemv" in args.sections:
        report.save_json(results, args.out)
        results["gemv"] = gemv.measure(args.w8, args.w4, args.gemv_shapes)
