"""Perplexity of a causal LM on fixed-length, non-overlapping token windows.

Each window of ``window`` tokens is scored on its own (no context carried across windows): the
model predicts tokens 2..window from the ones before them, so a window contributes
``window - 1`` predictions. Perplexity = exp(sum of negative log-likelihoods / predictions).
The token budget is the number of text tokens read (``windows * window``), always the first
ones of the text, so every policy is scored on exactly the same tokens.
"""
from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import qcompile
from qcompile import LayerSpec, Policy

#: Weight-only formats of the sweep, from 8 down to 3 bits (keys accepted by qcompile.formats).
WEIGHT_ONLY = ["int8", "mxint8", "mxfp8_e4m3", "bfp8",
               "mxfp6_e3m2", "mxfp6_e2m3", "bfp6",
               "int4", "int4[block_size=128]", "fp4_e2m1", "mxfp4", "nvfp4",
               "nf4", "af4", "bof4", "bof4s", "bof4s_opq",
               "int3"]
#: Weight + activation formats (the same format for both operands): name -> format.
WEIGHT_ACT = {"bfp6 W6A6": "bfp6", "mxint8 W8A8": "mxint8", "mxfp4 W4A4": "mxfp4",
              "bfp4 W4A4": "bfp4"}
#: Weight and activation formats that differ: name -> (weight format, activation format).
MIXED = {"int4 W4A8": ("int4", "int8")}
#: Rows whose model is cast to another dtype first (as from_pretrained(dtype=...) loads it):
#: name -> (weight format, dtype); the speed section's bf16 row has the same policy.
IN_DTYPE = {"nf4 (bf16 model)": ("nf4", torch.bfloat16)}


def weight_only(fmt: str) -> Policy:
    """``fmt`` on the weights of every linear layer except lm_head; activations full precision."""
    return Policy({"lm_head": None}, default=LayerSpec(weight=fmt))


def weight_act(fmt: str, act: str | None = None) -> Policy:
    """``fmt`` on the weights and ``act`` (default: ``fmt``) on the inputs of every linear
    layer except lm_head."""
    return Policy({"lm_head": None}, default=LayerSpec(weight=fmt, act=act or fmt))


def sweep_policies(names: list[str] | None = None) -> dict[str, Policy | None]:
    """Label -> policy, full precision (None) first. ``names`` picks a subset by label or format
    key ("fp32", "nf4", "bfp6 W6A6", "W6A6:bfp6" ...); an unknown name raises ValueError."""
    every: dict[str, Policy | None] = {"fp32": None}
    every.update({f: weight_only(f) for f in WEIGHT_ONLY})
    every.update({label: weight_act(f) for label, f in WEIGHT_ACT.items()})
    every.update({label: weight_act(w, a) for label, (w, a) in MIXED.items()})
    every.update({label: weight_only(f) for label, (f, _) in IN_DTYPE.items()})
    if not names:
        return every
    chosen: dict[str, Policy | None] = {"fp32": None}
    for name in names:
        if name in every:
            chosen[name] = every[name]
        elif name.startswith("WA:"):  # any format on weights and activations
            chosen[f"{name[3:]} W+A"] = weight_act(name[3:])
        else:  # any other format key: weight-only
            try:
                chosen[name] = weight_only(name)
            except ValueError as e:
                raise ValueError(f"--policies: {name!r} is neither a sweep label "
                                 f"({', '.join(every)}) nor a format: {e}") from None
    return chosen


def token_windows(ids: torch.Tensor, window: int, budget: int) -> torch.Tensor:
    """[n, window] non-overlapping windows from the start of ``ids`` (1-d or [1, T]), n =
    budget // window. Raises ValueError when the text has fewer tokens than the budget."""
    ids = ids.reshape(-1)
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    n = budget // window
    if n < 1:
        raise ValueError(f"token budget {budget} is smaller than one window of {window}")
    if ids.numel() < n * window:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than the budget "
                         f"{n * window} ({n} windows of {window})")
    return ids[: n * window].view(n, window)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int = 1, desc: str = "perplexity",
               leave=False) -> dict:
    """exp(mean NLL) of ``model`` (anything returning ``.logits``) over ``windows`` [n, L],
    ``batch`` windows per forward call (the last call may hold fewer); also the wall time of
    each call."""
    nll, count, times = 0.0, 0, []
    chunks = windows.split(batch)
    for chunk in tqdm(chunks, desc=desc, leave=leave, unit="call"):
        start = time.perf_counter()
        logits = model(input_ids=chunk, use_cache=False).logits
        times.append(time.perf_counter() - start)
        nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                               chunk[:, 1:].reshape(-1), reduction="sum").item()
        count += chunk[:, 1:].numel()
    return {"ppl": math.exp(nll / count), "nll": nll / count, "predictions": count,
            "seconds": times}


def later_median(seconds: list[float]) -> float:
    """Median time of the calls after the first (the first compiles); the only one if alone."""
    later = sorted(seconds[1:]) or seconds
    return later[len(later) // 2]


def quantised_bits(explanation) -> tuple[float, int]:
    """Average effective bits per weight over the ops an ``qcompile.explain`` table gives a weight
    format (full-precision ops such as lm_head are left out), and their weight count."""
    rows = [r for r in explanation.rows if r.weight_fmt != "-"]
    n = sum(r.numel for r in rows)
    return (sum(r.numel * r.bits for r in rows) / n if n else 32.0), n


def sweep(model, windows: torch.Tensor, policies: dict[str, Policy | None],
          lowering: str = "eager", batch: int = 1) -> list[dict]:
    """Perplexity of each policy. Full precision runs the eager model; every quantised policy
    runs ``qcompile.compile(model, policy, lowering=...)`` (in place) with
    static shapes on ``batch`` windows per call (equal batches: one graph per policy; the
    reference ops dequantise the weights once per call, so batching amortises that). Compile
    time is the first call's wall time (Dynamo, the passes, quantising the weights, lowering)
    minus the median of the later ones."""
    rows = []
    bar = tqdm(policies.items(), desc="perplexity sweep", unit="policy")
    for label, policy in bar:
        bar.set_postfix_str(label)
        torch._dynamo.reset()
        try:
            rows.append(_score(model, windows, label, policy, lowering, batch))
        except Exception as e:  # one failing policy must not lose the others
            rows.append({"label": label, "error": f"{type(e).__name__}: {e}"})
            tqdm.write(f"  {label:<22} FAILED: {rows[-1]['error'][:300]}")
            continue
        tqdm.write(f"  {label:<22} ppl {rows[-1]['ppl']:9.3f}  bits/weight "
                   f"{rows[-1]['bits']:6.3f}")
    torch._dynamo.reset()
    return rows


def _score(model, windows, label, policy, lowering, batch) -> dict:
    if policy is None:
        r = perplexity(model, windows, batch, desc=label)
        bits, compile_s = 32.0, 0.0
    else:
        # a copy per policy: explain(compiled) then sees only this policy's graphs, and
        # the packed weights (cached on the parameters) go with the copy
        dtype = IN_DTYPE.get(label, (None, torch.float32))[1]
        fast = qcompile.compile(copy.deepcopy(model).to(dtype), policy, lowering=lowering,
                                dynamic=False)
        r = perplexity(fast, windows, batch, desc=label)
        bits, _ = quantised_bits(qcompile.explain(fast))
        compile_s = r["seconds"][0] - later_median(r["seconds"])
        del fast
    return {"label": label, "ppl": r["ppl"], "nll": r["nll"], "bits": bits,
            "predictions": r["predictions"], "compile_s": max(compile_s, 0.0),
            "act": bool(policy is not None and policy.default.act is not None),
            "sec_per_window": later_median(r["seconds"]) / min(batch, len(windows))}
