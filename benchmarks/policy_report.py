"""The backend on a real model: SmolLM2-135M compiled with a mixed policy.

    python -m benchmarks policy [--lowering inductor|eager] [--model FOLDER]

Reports the explain totals, compile time (first compiled call minus a warm eager call), the
number of graphs Dynamo built, resident weight bytes (after ``quantize_model_``) against
float32, and the largest logit difference against the eager fake-quantised model, on a prompt
of real text at two sequence lengths (the second recompiles with dynamic shapes).
"""
from __future__ import annotations

import argparse
import copy
import platform
import time

import torch

import qcompile
from qcompile import LayerSpec, Policy

from .data import load_causal_lm, wiki_text

# The mixed example policy (the design card's), defined once: the tests compile their models
# with it too. The attention rule names Llama's q/k/v projections and GPT-2's fused c_attn.
MIXED = Policy({"lm_head": None,
                "*.mlp.*": LayerSpec(weight="bof4s_opq"),
                r"re:.*(self_attn\.[qkv]_proj|attn\.c_attn)": LayerSpec(weight="mxint8",
                                                                       act="mxint8")},
               default=LayerSpec(weight="nf4"))


def _graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def report(model_dir=None, lowering="inductor", lengths=(64, 96)) -> dict:
    model, tok = load_causal_lm(model_dir)
    ids = tok(wiki_text()[:20000], return_tensors="pt").input_ids
    prompts = [ids[:, :n] for n in lengths]
    fp32_bytes = qcompile.resident_weight_bytes(model)

    ref = qcompile.fake_quantize_model_(copy.deepcopy(model), MIXED)
    with torch.no_grad():
        ref(prompts[0])  # warm
        start = time.perf_counter()
        want = [ref(p).logits for p in prompts]
        eager_s = (time.perf_counter() - start) / len(prompts)

    explanation = qcompile.explain(model, MIXED, prompts[0])
    qcompile.quantize_model_(model, MIXED)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = qcompile.compile(model, MIXED, lowering=lowering)
    got, first_s = [], []
    with torch.no_grad():
        for p in prompts:
            start = time.perf_counter()
            got.append(compiled(p).logits)
            first_s.append(time.perf_counter() - start)
    diff = max((g - w).abs().max().item() for g, w in zip(got, want))
    scale = max(w.abs().max().item() for w in want)
    return {"explain": explanation, "lowering": lowering, "lengths": lengths,
            "compile_s": [f - eager_s for f in first_s], "graphs": _graphs(),
            "resident_bytes": qcompile.resident_weight_bytes(model), "fp32_bytes": fp32_bytes,
            "max_logit_diff": diff, "max_logit": scale}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks policy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lowering", choices=("inductor", "eager"), default="inductor")
    ap.add_argument("--model", default=None, help="a Hugging Face causal-LM folder "
                    "(default: the packaged SmolLM2-135M)")
    args = ap.parse_args(argv)
    r = report(args.model, args.lowering)
    e = r["explain"]
    print(f"machine: {platform.machine()} {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; lowering {r['lowering']}")
    print(f"explain: {len(e.rows)} ops, {e.total_weights} weights, {e.avg_bits:.3f} bits/weight, "
          f"{e.density_vs_fp32:.2f}x denser than float32")
    print(f"compile time: " + ", ".join(f"{s:.1f} s (seq {n})"
                                         for s, n in zip(r["compile_s"], r["lengths"])))
    print(f"graphs: {r['graphs']}")
    print(f"resident weight bytes: {r['resident_bytes']} vs float32 {r['fp32_bytes']} "
          f"({r['resident_bytes'] / r['fp32_bytes']:.3f}x; tied embedding/lm_head kept)")
    print(f"largest |logit difference| vs eager fake-quantised: {r['max_logit_diff']:.3e} "
          f"(largest |logit| {r['max_logit']:.1f})")
