"""Fused block-scaled linear kernels (codegen/triton/linear.py) against torch's fp16/bf16 matmul.

On a GPU: M in {1, 16, 256, 4096} x (N, K) in {(4096, 4096), (11008, 4096), (4096, 11008)},
weight-only nf4 / int4 / mxfp4 and mxint8 weights with mxint8 activations (W8A8), an fp16
model; baselines torch.matmul in fp16 and bf16, and bitsandbytes' NF4 matmul_4bit when it can be
imported; from M = 16 on, the weight-only formats also as decode (the generated dequantise
kernel) then torch.matmul, the large-M alternative whose speed decides the GPU dispatch. Timed with CUDA events around single calls (the L2 cache flushed before each), the
median of --repeats. Reported: time, TFLOP/s (2MNK / t), GB/s (activations + stored weight bytes
+ output, over t), that as a % of the GPU's HBM bandwidth (known GPUs, or --hbm-gbs), and the
largest error against the reference as a fraction of the documented float32 bound.

``--smoke`` runs tiny shapes on the CPU through Triton's interpreter (float32 model, float32
torch baseline, wall-clock timing): it checks that the benchmark runs end to end and that every
kernel is within its bound; its times say nothing about GPU speed.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

SHAPES_MNK = [(m, n, k) for m in (1, 16, 256, 4096)
              for n, k in ((4096, 4096), (11008, 4096), (4096, 11008))]
SMOKE_MNK = [(1, 48, 96), (20, 48, 96)]
KERNELS = [("nf4", None), ("int4", None), ("mxfp4", None), ("mxint8", "mxint8")]
# From this M on, the weight-only formats are also timed as the alternative issue 11 names for
# large M: decode the weight (the generated dequantise kernel) into a workspace, then torch's
# matmul (cuBLAS); whichever is faster on a GPU decides the dispatch there.
DEQUANT_MATMUL_MIN_M = 16
HBM_GBS = [("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0),
           ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIe", 1935.0), ("A100", 1555.0),
           ("L40S", 864.0), ("RTX 4090", 1008.0)]


def hbm_peak(name: str) -> float | None:
    for key, gbs in HBM_GBS:
        if key in name:
            return gbs
    return None


def timer(device: str, repeats: int):
    import torch
    if device == "cuda":
        flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")

        def run(fn):
            for _ in range(3):  # warm-up: compiles and autotunes
                fn()
            times = []
            for _ in range(repeats):
                flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return statistics.median(times)
        return run

    def run_cpu(fn):
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)
    return run_cpu


def bound_fraction(y, xq, w_nk) -> float:
    """max |y - F.linear(xq, W)| / (2 gamma(K + 2) (|xq| |W|^T)): <= 1 is within the bound."""
    import torch.nn.functional as F
    from qcompile.codegen.triton.linear import gamma
    ref = F.linear(xq.float(), w_nk.float()).double()
    s = xq.double().abs() @ w_nk.double().abs().T
    bound = 2 * gamma(w_nk.shape[1] + 2) * s
    err = (y.double() - ref).abs()
    return float((err / bound.clamp(min=1e-300)).max())


def measure(m, n, k, device, dtype, run, peak, use_bnb=True) -> list[dict]:
    import torch

    import qcompile
    from qcompile.codegen.triton.linear import linear
    g = torch.Generator(device="cpu").manual_seed(m * 7 + n + k)
    x = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(n, k, generator=g) * 0.02).to(device=device, dtype=dtype)
    flops = 2.0 * m * n * k
    elt = x.element_size()
    rows = []

    def row(name, seconds, weight_bytes, frac=None):
        moved = m * k * elt + weight_bytes + m * n * elt
        gbs = moved / seconds / 1e9
        rows.append({"M": m, "N": n, "K": k, "kernel": name, "us": seconds * 1e6,
                     "tflops": flops / seconds / 1e12, "gbs": gbs,
                     "hbm": 100 * gbs / peak if peak else None, "bound": frac})

    for base in ([torch.float16, torch.bfloat16] if device == "cuda" else [torch.float32]):
        xb, wb = x.to(base), w.to(base)
        row(f"torch matmul {str(base)[6:]}", run(lambda: torch.matmul(xb, wb.T)),
            wb.numel() * wb.element_size())
    for wfmt, act in KERNELS:
        q = qcompile.quantize(w, wfmt, axis=1)
        y = linear(x, q, act)
        xq = qcompile.fake_quantize(x, act, axis=-1) if act else x
        frac = bound_fraction(y, xq, qcompile.dequantize(q))
        label = f"qcompile {wfmt}" + (f" x {act} (W8A8)" if act else " (weight-only)")
        row(label, run(lambda: linear(x, q, act)), q.nbytes, frac)
        if act is None and m >= DEQUANT_MATMUL_MIN_M:
            def decode_then_matmul(q=q):
                return torch.matmul(x, qcompile.dequantize(q, impl="triton").T)
            frac = bound_fraction(decode_then_matmul(), x, qcompile.dequantize(q))
            row(f"qcompile {wfmt} decoded + torch matmul", run(decode_then_matmul), q.nbytes, frac)
    if use_bnb and device == "cuda":
        try:
            import bitsandbytes as bnb
            from bitsandbytes.functional import quantize_4bit
            packed, state = quantize_4bit(w, blocksize=64, quant_type="nf4")
            nbytes = packed.numel() * packed.element_size() + state.absmax.numel() * 4
            row("bitsandbytes nf4", run(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state)),
                nbytes)
        except Exception as err:  # not installed, or no kernel for this GPU
            print(f"bitsandbytes skipped: {type(err).__name__}: {err}")
            use_bnb = False
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| M | N | K | kernel | time (us) | TFLOP/s | GB/s | % of HBM | max err / bound |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hbm = f"{r['hbm']:.1f}" if r["hbm"] is not None else "n/a"
        bound = f"{r['bound']:.3f}" if r["bound"] is not None else "-"
        lines.append(f"| {r['M']} | {r['N']} | {r['K']} | {r['kernel']} | {r['us']:.1f} | "
                     f"{r['tflops']:.3f} | {r['gbs']:.1f} | {hbm} | {bound} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(prog="python -m benchmarks kernels", description=__doc__)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU through the Triton interpreter")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (median)")
    parser.add_argument("--hbm-gbs", type=float, default=None,
                        help="peak HBM bandwidth in GB/s (default: known GPUs by name)")
    parser.add_argument("--out", type=Path, default=Path("results/kernels.md"))
    parser.add_argument("--static", type=Path, default=None, metavar="DIR",
                        help="no GPU needed: compile every generated GPU kernel for sm_90 and "
                        "write its PTX, registers, spills and shared memory to DIR")
    args = parser.parse_args(argv)
    if args.static is not None:
        from .kernel_static import main as static_main
        return static_main(args.static)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("benchmarks kernels: no GPU; run with --smoke (Triton's interpreter)")
    repeats = args.repeats or (3 if args.smoke else 25)
    shapes = SMOKE_MNK if args.smoke else SHAPES_MNK
    dtype = torch.float32 if device == "cpu" else torch.float16
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "CPU"
    peak = args.hbm_gbs or (hbm_peak(name) if device == "cuda" else None)
    run = timer(device, repeats)
    rows = []
    for m, n, k in shapes:
        rows += measure(m, n, k, device, dtype, run, peak)
        print(f"M={m} N={n} K={k} done", flush=True)
    import triton
    how = ("CUDA events, L2 flushed" if device == "cuda" else
           "Triton interpreter, wall clock; smoke run, not a speed measurement")
    header = (f"Device: {name} ({how}), "
              f"HBM peak {f'{peak:.0f} GB/s' if peak else 'unknown'}; {str(dtype)[6:]} model; "
              f"torch {torch.__version__}, triton {triton.__version__}; median of {repeats}.")
    report = f"{header}\n\n{table(rows)}\n"
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"written to {args.out}")
    return report
