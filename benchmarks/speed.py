"""Speed and memory of one causal LM, compiled and eager side by side, in one process.

Configurations (each on its own copy of the model):

* eager fp32: the model as loaded;
* eager fake-quant <fmt>: weights replaced by ``qcompile.fake_quantize`` of themselves (the
  reference definition; float32 weights, so float32 speed and memory);
  every linear layer (lm_head too) and the embedding get <fmt>;
* torch.compile fp32: ``torch.compile(model)`` (Inductor);
* blockquant <fmt>: ``qcompile.quantize_model_`` (packed weights only) then
  ``qcompile.compile(model, policy, lowering=...)`` (in place, as the README does it);
* blockquant W8A8 <fmt>: the same with <fmt> on the linear layers' activations too;
* blockquant W4A8 int4: ``int4`` weights with ``int8`` activations (the integer path, the kind of
  computation of llama.cpp's Q4_0 x Q8_0);
* per extra model dtype (``dtypes``: bf16, fp16): "<dtype>: eager" (the model cast to that dtype,
  as ``from_pretrained(dtype=...)`` loads it) and "<dtype>: blockquant <fmt>" (the same, with the
  4-bit policy): the targets compare these with each other and with the float32 rows.

Per configuration: a warm-up (which compiles: the prefill graphs, the first decode step and
the dynamic-shape decode graph), then ``repeats`` timed rounds of: the prefill of a long prompt
(512 tokens by default), and a short prompt (128 tokens) followed by ``decode`` greedy steps
with the KV cache (``past_key_values``). Reported: median prefill latency, median per-token
decode latency and its tokens/s, compile time (warm-up wall time minus what the same work takes
warm) and the bytes of parameters and buffers the model holds. The blockquant <fmt> row's decode
steps are profiled too (benchmarks/framework.py): wall, operators, framework time and its parts.
"""
from __future__ import annotations

import copy
import json
import statistics
import time

import torch
from tqdm import tqdm

import qcompile

from . import framework
from .policies import every_linear


@torch.no_grad()
def generate_timed(fn, prompt: torch.Tensor, decode: int,
                   after_prefill=None) -> tuple[float, list[float]]:
    """Prefill ``prompt`` [1, P] with a KV cache, then ``decode`` greedy steps one token at a
    time; returns (prefill seconds, [seconds per decode step]). ``after_prefill``: called, untimed,
    between the prefill and the first step (to count what the decode steps alone do)."""
    start = time.perf_counter()
    out = fn(input_ids=prompt, use_cache=True)
    prefill = time.perf_counter() - start
    if after_prefill is not None:
        after_prefill()
    past, nxt, steps = out.past_key_values, out.logits[:, -1:].argmax(-1), []
    for _ in range(decode):
        start = time.perf_counter()
        out = fn(input_ids=nxt, past_key_values=past, use_cache=True)
        steps.append(time.perf_counter() - start)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return prefill, steps


#: the extra model dtypes of the speed rows: name -> torch dtype
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: the W4A8 row's formats: int4 weights, int8 activations (the integer path)
W4A8 = ("int4", "int8")


def configurations(model, w8: str, w4: str, lowering: str = "inductor", dtypes=()):
    """(label, kind, builder) triples; a builder returns (callable, model it runs).
    ``dtypes``: names of DTYPES whose eager and 4-bit rows follow the float32 ones."""
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

    def blockquant(fmt, act=None, dtype=torch.float32):
        def build():
            policy = every_linear(fmt, act)
            m = qcompile.quantize_model_(copy.deepcopy(model).to(dtype), policy)
            return qcompile.compile(m, policy, lowering=lowering), m
        return build

    def eager_in(dtype):
        def build():
            m = copy.deepcopy(model).to(dtype)
            return m, m
        return build

    tag = "Inductor" if lowering == "inductor" else "Dynamo, eager lowering"
    return [("eager fp32", "eager", eager),
            (f"eager fake-quant {w8}", "eager", fake(w8)),
            (f"eager fake-quant {w4}", "eager", fake(w4)),
            (f"torch.compile fp32 ({tag})", "compiled", compiled_fp32),
            (f"blockquant {w8} ({lowering})", "compiled", blockquant(w8)),
            (f"blockquant {w4} ({lowering})", "compiled", blockquant(w4)),
            # int x int: the integer path (exact block dot products, activations quantised in C++)
            (f"blockquant W8A8 {w8} ({lowering})", "compiled", blockquant(w8, w8)),
            (f"blockquant W4A8 {W4A8[0]} ({lowering})", "compiled", blockquant(*W4A8)),
            *[row for name in dtypes for row in (
                (f"{name}: eager", "eager", eager_in(DTYPES[name])),
                (f"{name}: blockquant {w4} ({lowering})", "compiled",
                 blockquant(w4, dtype=DTYPES[name])))]]


def quantised_layer_bytes(model) -> tuple[int, int]:
    """(bytes the QuantLinear / QuantEmbedding layers hold, float32 bytes of the weights they
    replaced), a packed tensor that two layers share (a tied embedding / lm_head) counted once."""
    from qcompile.swap import QuantEmbedding, QuantLinear
    held = fp32 = 0
    seen = set()
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)) and id(m.codes) not in seen:
            seen.add(id(m.codes))
            held += sum(b.untyped_storage().nbytes() for b in m.buffers())
            n = 1
            for s in json.loads(m.meta)["shape"]:
                n *= s
            fp32 += 4 * n
    return held, fp32


def measure(model, prompt: torch.Tensor, decode: int = 4, repeats: int = 3,
            w8: str = "mxint8", w4: str = "nf4", lowering: str = "inductor",
            decode_prompt: torch.Tensor | None = None, dtypes=()) -> list[dict]:
    """Rows for every configuration: ``prompt`` [1, P] times the prefill, ``decode_prompt``
    (default: ``prompt``) starts the timed decoding; ``dtypes``: the extra model dtypes."""
    fp32_bytes = qcompile.resident_weight_bytes(model)
    decode_prompt = prompt if decode_prompt is None else decode_prompt
    rows = []
    configs = configurations(model, w8, w4, lowering, dtypes)
    for label, kind, build in tqdm(configs, desc="speed", unit="config"):
        torch._dynamo.reset()
        try:
            rows.append(_one(label, kind, build, (prompt, decode_prompt), decode, repeats,
                             fp32_bytes, profile=label == f"blockquant {w4} ({lowering})"))
        except Exception as e:  # one failing configuration must not lose the others
            rows.append({"label": label, "kind": kind, "error": f"{type(e).__name__}: {e}"})
            tqdm.write(f"  {label:<40} FAILED: {rows[-1]['error'][:300]}")
    torch._dynamo.reset()
    return rows


def timed_rounds(fn, prompts, decode: int, repeats: int, desc: str):
    """``repeats`` rounds of (prefill of prompts[0], decoding after prompts[1]):
    (prefill seconds, seconds per decode step), each list over all rounds."""
    prompt, decode_prompt = prompts
    prefills, steps = [], []
    for _ in tqdm(range(repeats), desc=desc, leave=False, unit="run"):
        prefills.append(generate_timed(fn, prompt, 0)[0])
        steps += generate_timed(fn, decode_prompt, decode)[1]
    return prefills, steps


def _one(label, kind, build, prompts, decode, repeats, fp32_bytes, profile=False) -> dict:
    """Build one configuration, warm it up (compiling), time it; ``profile``: its decode steps
    profiled too (benchmarks/framework.py), the table printed."""
    prompt = prompts[0]
    start = time.perf_counter()
    fn, held = build()
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    with framework.kernel_events():  # Inductor's kernels seen by the profile, if one is made
        timed_rounds(fn, prompts, decode, 1, "warm-up")  # compiles the compiled configurations
    warm_s = time.perf_counter() - start
    prefills, steps = timed_rounds(fn, prompts, decode, repeats, label)
    prefill_s, step_s = statistics.median(prefills), statistics.median(steps)
    qheld, qfp32 = quantised_layer_bytes(held)
    row = {"label": label, "kind": kind, "prefill_s": prefill_s,
           "prefill_tok_s": prompt.shape[1] / prefill_s,
           "decode_ms": 1e3 * step_s, "decode_tok_s": 1 / step_s,
           # the short prompt's prefill estimated from the long one's, by length
           "compile_s": max(warm_s - prefill_s * (1 + prompts[1].shape[1] / prompt.shape[1])
                            - decode * step_s, 0.0)
           if kind == "compiled" else 0.0,
           "build_s": build_s, "resident_bytes": qcompile.resident_weight_bytes(held),
           "fp32_bytes": fp32_bytes, "quantised_layer_bytes": qheld,
           "quantised_layer_fp32_bytes": qfp32}
    tqdm.write(f"  {label:<40} prefill {prefill_s:7.3f} s  decode {1e3 * step_s:8.1f} ms/token"
               f"  compile {row['compile_s']:6.1f} s")
    if profile:
        try:
            row["framework"] = framework.measure(fn, prompts[1], decode, repeats)
        except Exception as e:  # a failing profile must not lose the row's timings
            row["framework"] = {"error": f"{type(e).__name__}: {e}"}
            tqdm.write(f"  {label}: framework profile FAILED: {row['framework']['error']}")
        else:
            del row["framework"]["steps_ms"]
            tqdm.write(framework.table(row["framework"], label))
    return row
