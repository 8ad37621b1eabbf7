"""One decoding step of a Qwen3-MoE sparse block, its experts' grouped matmuls as one operator
call each against one call per active expert, interleaved in one process (issue 23):

    .venv/bin/python -m benchmarks.moe_grouped [--experts 64] [--rounds 15] [--steps 20]
                                               [--threads 1] [--fmt nf4] [--impl grouped_mm]
                                               [--hidden 2048] [--width 768]

The block: transformers' ``Qwen3MoeSparseMoeBlock`` at benchmarks/moe.py's shapes (hidden 2048,
8 active of ``--experts``, expert width 768; ``--hidden`` / ``--width`` shrink it to where the
calls' overhead, not the kernels, is the time), seeded random weights, its expert tensors packed
by ``qcompile.quantize_model_`` (``--fmt``) on the CPU kernels. "per expert" runs the grouped
matmul as before issue 23's operator: one ``ops.expert_linear`` (one Python-to-operator call and
the per-expert plan and choice) per active expert; "grouped" runs ``ops.experts_linear`` as it
is. Each round times ``--steps`` one-token forwards of each, alternating which goes first;
reported: the median ms per step over rounds and the median per-round ratio grouped / per
expert (on a shared machine: ratios and medians, not single times).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import qcompile
from qcompile import LayerSpec, Policy, ops

from .moe import moe_config


def per_expert(x, packed, groups):
    """The grouped matmul as it ran before the grouped operator: one packed linear per group."""
    out = x.new_zeros((x.shape[0], packed.out_features))
    for e, rows in groups:
        out[rows] = ops.expert_linear(x[rows], packed, e)
    return out


def build_block(experts: int, fmt: str, impl: str, hidden: int, width: int) -> torch.nn.Module:
    from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3
    config = moe_config(experts=experts, layers=1, hidden_size=hidden,
                        moe_intermediate_size=width)
    config._experts_implementation = impl
    torch.manual_seed(0)
    block = qwen3.Qwen3MoeSparseMoeBlock(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    qcompile.quantize_model_(block, Policy({"experts.*": LayerSpec(weight=fmt)}, default=None))
    for m in block.modules():
        if getattr(m, "quantised_experts", False):
            m.impl = "cpu"
    return block


def time_steps(block, x, steps: int) -> float:
    """ms per one-token forward, over ``steps`` forwards."""
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(steps):
            block(x)
        return (time.perf_counter() - start) * 1e3 / steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fmt", default="nf4")
    ap.add_argument("--impl", default="grouped_mm", choices=["grouped_mm", "batched_mm"])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--width", type=int, default=768)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    block = build_block(args.experts, args.fmt, args.impl, args.hidden, args.width)
    x = torch.randn(1, 1, block.experts.gate_up_proj.shape[2])
    grouped = ops.experts_linear
    ways = {"per expert": per_expert, "grouped": grouped}
    with torch.no_grad():  # the two give the same bits
        ops.experts_linear = per_expert
        want = block(x)
        ops.experts_linear = grouped
        assert torch.equal(block(x), want), "the grouped call changed the result"
    times = {name: [] for name in ways}
    for r in range(args.rounds):
        order = list(ways) if r % 2 == 0 else list(reversed(ways))
        for name in order:
            ops.experts_linear = ways[name]
            times[name].append(time_steps(block, x, args.steps))
    ops.experts_linear = grouped
    ratio = statistics.median(g / p for g, p in zip(times["grouped"], times["per expert"]))
    print(f"Qwen3-MoE block, hidden {args.hidden}, {args.experts} experts (8 active) of width "
          f"{args.width}, {args.fmt}, {args.impl}, "
          f"{args.threads} thread(s), {args.rounds} rounds of {args.steps} steps")
    for name, t in times.items():
        print(f"  {name:10s} median {statistics.median(t):8.3f} ms/step")
    print(f"  median per-round ratio grouped / per expert: {ratio:.3f}")


if __name__ == "__main__":
    main()
