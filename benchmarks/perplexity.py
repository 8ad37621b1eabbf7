"""Perplexity of a causal LM on fixed-length, non-overlapping token windows.

Each window of ``window`` tokens is scored on its own (no context carried across windows): the
model predicts tokens 2..window from the ones before them, so a window contributes
``window - 1`` predictions. Perplexity = exp(sum of negative log-likelihoods / predictions).
The token budget is the number of text tokens read (``windows * window``), always the first
ones of the text, so every policy is scored on exactly the same tokens.
"""
from __future__ import annotations

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


def weight_only(fmt: str) -> Policy:
    """``fmt`` on the weights of every linear layer except lm_head; activations full precision."""
    return Policy({"lm_head": None}, default=LayerSpec(weight=fmt))


def weight_act(fmt: str) -> Policy:
    return Policy({"lm_head": None}, default=LayerSpec(weight=fmt, act=fmt))


def sweep_policies(names: list[str] | None = None) -> dict[str, Policy | None]:
    """Label -> policy, full precision (None) first. ``names`` picks a subset by label or format
    key ("fp32", "nf4", "bfp6 W6A6", "W6A6:bfp6" ...); an unknown name raises ValueError."""
    every: dict[str, Policy | None] = {"fp32": None}
    every.update({f: weight_only(f) for f in WEIGHT_ONLY})
    every.update({label: weight_act(f) for label, f in WEIGHT_ACT.items()})
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
def perplexity(model, windows: torch.Tensor, desc: str = "perplexity", leave=False) -> dict:
    """exp(mean NLL) of ``model`` (anything returning ``.logits``) over ``windows`` [n, L],
    one window per forward call; also the wall time per window."""
    nll, count, times = 0.0, 0, []
    for w in tqdm(windows, desc=desc, leave=leave, unit="win"):
        start = time.perf_counter()
        logits = model(input_ids=w[None], use_cache=False).logits
        times.append(time.perf_counter() - start)
        nll += F.cross_entropy(logits[0, :-1].float(), w[1:], reduction="sum").item()
        count += w.numel() - 1
    return {"ppl": math.exp(nll / count), "nll": nll / count, "predictions": count,
            "seconds": times}


def quantised_bits(explanation) -> tuple[float, int]:
    """Average effective bits per weight over the ops an ``qcompile.explain`` table gives a weight
    format (full-precision ops such as lm_head are left out), and their weight count."""
    rows = [r for r in explanation.rows if r.weight_fmt != "-"]
    n = sum(r.numel for r in rows)
    return (sum(r.numel * r.bits for r in rows) / n if n else 32.0), n


def sweep(model, windows: torch.Tensor, policies: dict[str, Policy | None],
          lowering: str = "eager") -> list[dict]:
    """Perplexity of each policy. Full precision runs the eager model; every quantised policy
    runs ``torch.compile(model, backend="blockquant", options={"policy", "lowering"})`` with
    static shapes (all windows have one length, so each policy compiles one graph). Compile
    time is the first call's wall time minus the median of the later ones."""
    rows = []
    bar = tqdm(policies.items(), desc="perplexity sweep", unit="policy")
    for label, policy in bar:
        bar.set_postfix_str(label)
        torch._dynamo.reset()
        if policy is None:
            r = perplexity(model, windows, desc=label)
            bits, compile_s = 32.0, 0.0
        else:
            fast = torch.compile(model, backend="blockquant", dynamic=False,
                                 options={"policy": policy, "lowering": lowering})
            r = perplexity(fast, windows, desc=label)
            bits, _ = quantised_bits(qcompile.explain(fast))
            later = sorted(r["seconds"][1:]) or r["seconds"]
            compile_s = r["seconds"][0] - later[len(later) // 2]
            del fast
        rows.append({"label": label, "ppl": r["ppl"], "nll": r["nll"], "bits": bits,
                     "predictions": r["predictions"], "compile_s": max(compile_s, 0.0),
                     "act": bool(policy is not None and policy.default.act is not None),
                     "sec_per_window": sorted(r["seconds"])[len(r["seconds"]) // 2]})
        tqdm.write(f"  {label:<22} ppl {r['ppl']:9.3f}  bits/weight {bits:6.3f}")
    torch._dynamo.reset()
    return rows
