"""Weight error of every format on the float32 linear weights of all-MiniLM-L6-v2.

Each weight [N, K] is quantised in blocks along K (its reduction axis, as in a matmul).
Reported per format: MSE, SQNR in dB (signal power / error power over all weights), effective
bits per weight actually stored (codes + scales + side data, padding included) and the median
wall time to quantise all weights with the reference implementation.
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

import qcompile
from qcompile import formats

from .models import minilm_linear_weights


def measure(weights: dict[str, torch.Tensor], fmt: str, repeats: int) -> dict:
    err = signal = 0.0
    stored_bits = count = 0
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        qs = {k: qcompile.quantize(w, fmt, axis=-1) for k, w in weights.items()}
        times.append(time.perf_counter() - start)
    for k, w in weights.items():
        d = qcompile.dequantize(qs[k]).double() - w.double()
        err += d.square().sum().item()
        signal += w.double().square().sum().item()
        stored_bits += 8 * qs[k].nbytes
        count += w.numel()
    return {"format": fmt, "mse": err / count,
            "sqnr_db": 10 * math.log10(signal / err) if err else math.inf,
            "bits": stored_bits / count, "nominal_bits": formats.get(fmt).effective_bits(),
            "seconds": statistics.median(times)}


def table(rows: list[dict]) -> str:
    lines = ["| format | MSE | SQNR (dB) | bits/weight stored | nominal bits | quantise time (s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['format']}` | {r['mse']:.3e} | {r['sqnr_db']:.2f} | {r['bits']:.3f} | "
                     f"{r['nominal_bits']:.3f} | {r['seconds']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks weights", description=__doc__)
    parser.add_argument("--formats", nargs="*", default=formats.names(),
                        help="format names or keys (default: every preset)")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (median)")
    parser.add_argument("--out", type=Path, default=Path("results/weights.md"))
    args = parser.parse_args(argv)
    for f in args.formats:
        formats.get(f)  # fail on a bad name before loading anything
    weights = minilm_linear_weights()
    n = sum(w.numel() for w in weights.values())
    print(f"all-MiniLM-L6-v2: {len(weights)} linear weights, {n:,} parameters (float32)")
    rows = [measure(weights, f, args.repeats) for f in tqdm(args.formats, desc="formats")]
    rows.sort(key=lambda r: r["bits"])
    header = (f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}, Python {platform.python_version()}")
    report = f"{header}\n\n{table(rows)}\n"
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"written to {args.out}")
