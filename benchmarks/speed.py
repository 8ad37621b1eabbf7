"""Speed and memory of one causal LM, compiled and eager side by side, in one process.

Configurations (each on its own copy of the model):

* eager fp32: the model as loaded;
* eager fake-quant <fmt>: weights replaced by ``qcompile.fake_quantize`` of themselves (the
  reference definition; float32 weights, so float32 speed and memory);
  every linear layer (lm_head too) gets <fmt>;
* torch.compile fp32: ``torch.compile(model)`` (Inductor);
* blockquant <fmt>: ``qcompile.quantize_model_`` (packed weights only) then
  ``qcompile.compile(model, policy, lowering=...)`` (in place, as the README does it).

Per configuration: a warm-up generation (which compiles: the prefill graph, the first decode
step and the dynamic-shape decode graph), then ``repeats`` timed generations of a
``prefill``-token prompt followed by ``decode`` greedy steps with the KV cache
(``past_key_values``). Reported: median prefill latency, median per-token decode latency and its
tokens/s, compile time (warm-up wall time minus what the same work takes warm) and the bytes of
parameters and buffers the model holds.
"""
from __future__ import annotations

import copy
import json
import statistics
import time

import torch
from tqdm import tqdm

import qcompile
from qcompile import LayerSpec, Policy



@torch.no_grad()
def generate_timed(fn, prompt: torch.Tensor, decode: int) -> tuple[float, list[float]]:
    """Prefill ``prompt`` [1, P] with a KV cache, then ``decode`` greedy steps one token at a
    time; returns (prefill seconds, [seconds per decode step])."""
    start = time.perf_counter()
    out = fn(input_ids=prompt, use_cache=True)
    prefill = time.perf_counter() - start
    past, nxt, steps = out.past_key_values, out.logits[:, -1:].argmax(-1), []
    for _ in range(decode):
        start = time.perf_counter()
        out = fn(input_ids=nxt, past_key_values=past, use_cache=True)
        steps.append(time.perf_counter() - start)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return prefill, steps


def every_linear(fmt: str) -> Policy:
    """``fmt`` on the weights of every linear layer, lm_head included (a tied lm_head gets its
    own packed copy; the embedding keeps its float32 table): the setting the speed goals name."""
    return Policy({}, default=LayerSpec(weight=fmt))


def configurations(model, w8: str, w4: str, lowering: str = "inductor"):
    """(label, kind, builder) triples; a builder returns (callable, model it runs)."""
    def eager():
        return model, model

    def fake(fmt):
        def build():
            m = qcompile.fake_quantize_model_(copy.deepcopy(model), every_linear(fmt))
            return m, m
        return build

    def compiled_fp32():
        backend = "inductor" if lowering == "inductor" else "eager"
        return torch.compile(model, backend=backend), model

    def blockquant(fmt):
        def build():
            policy = every_linear(fmt)
            m = qcompile.quantize_model_(copy.deepcopy(model), policy)
            return qcompile.compile(m, policy, lowering=lowering), m
        return build

    tag = "Inductor" if lowering == "inductor" else "Dynamo, eager lowering"
    return [("eager fp32", "eager", eager),
            (f"eager fake-quant {w8}", "eager", fake(w8)),
            (f"eager fake-quant {w4}", "eager", fake(w4)),
            (f"torch.compile fp32 ({tag})", "compiled", compiled_fp32),
            (f"blockquant {w8} ({lowering})", "compiled", blockquant(w8)),
            (f"blockquant {w4} ({lowering})", "compiled", blockquant(w4))]


def quantised_layer_bytes(model) -> tuple[int, int]:
    """(bytes the QuantLinear layers hold, float32 bytes of the weights they replaced)."""
    from qcompile.layers import QuantLinear
    held = fp32 = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            held += sum(b.untyped_storage().nbytes() for b in m.buffers())
            n = 1
            for s in json.loads(m.meta)["shape"]:
                n *= s
            fp32 += 4 * n
    return held, fp32


def measure(model, prompt: torch.Tensor, decode: int = 4, repeats: int = 3,
            w8: str = "mxint8", w4: str = "nf4", lowering: str = "inductor") -> list[dict]:
    fp32_bytes = qcompile.resident_weight_bytes(model)
    rows = []
    configs = configurations(model, w8, w4, lowering)
    for label, kind, build in tqdm(configs, desc="speed", unit="config"):
        torch._dynamo.reset()
        try:
            rows.append(_one(label, kind, build, prompt, decode, repeats, fp32_bytes))
        except Exception as e:  # one failing configuration must not lose the others
            rows.append({"label": label, "kind": kind, "error": f"{type(e).__name__}: {e}"})
            tqdm.write(f"  {label:<40} FAILED: {rows[-1]['error'][:300]}")
    torch._dynamo.reset()
    return rows


def _one(label, kind, build, prompt, decode, repeats, fp32_bytes) -> dict:
    """Build one configuration, warm it up (compiling), time it."""
    start = time.perf_counter()
    fn, held = build()
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    generate_timed(fn, prompt, decode)  # warm-up; compiles the compiled configurations
    warm_s = time.perf_counter() - start
    prefills, steps = [], []
    for _ in tqdm(range(repeats), desc=label, leave=False, unit="run"):
        p, s = generate_timed(fn, prompt, decode)
        prefills.append(p)
        steps += s
    prefill_s, step_s = statistics.median(prefills), statistics.median(steps)
    qheld, qfp32 = quantised_layer_bytes(held)
    row = {"label": label, "kind": kind, "prefill_s": prefill_s,
           "prefill_tok_s": prompt.shape[1] / prefill_s,
           "decode_ms": 1e3 * step_s, "decode_tok_s": 1 / step_s,
           "compile_s": max(warm_s - prefill_s - decode * step_s, 0.0)
           if kind == "compiled" else 0.0,
           "build_s": build_s, "resident_bytes": qcompile.resident_weight_bytes(held),
           "fp32_bytes": fp32_bytes, "quantised_layer_bytes": qheld,
           "quantised_layer_fp32_bytes": qfp32}
    tqdm.write(f"  {label:<40} prefill {prefill_s:7.3f} s  decode {1e3 * step_s:8.1f} ms/token"
               f"  compile {row['compile_s']:6.1f} s")
    return row
