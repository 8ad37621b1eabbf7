"""Pass 3: quantise the real weights once, ahead of time.

The backend receives the real parameters in ``example_inputs``; a weight is found as the
placeholder (or get_attr) feeding the op. Packed QTensors are cached on the parameter object's
identity, its in-place version counter, the format key and the K axis, so recompiles (new
sequence lengths, dynamic shapes) reuse them instead of quantising again.
"""
from __future__ import annotations

import weakref

import torch
from torch import fx

from qcompile import api
from qcompile.qtensor import QTensor

from .plan import planned

# (id(param), fmt key, axis) -> (weakref to param, param._version, QTensor)
_CACHE: dict[tuple, tuple] = {}
STATS = {"quantised": 0, "reused": 0}


def clear_cache():
    _CACHE.clear()


def _drop(key):
    _CACHE.pop(key, None)


def _is_real(t) -> bool:
    return (isinstance(t, torch.Tensor) and not isinstance(t, torch._subclasses.FakeTensor)
            and t.device.type != "meta")


def quantise_cached(w: torch.Tensor, fmt, axis: int) -> QTensor:
    key = (id(w), fmt.key, axis)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is w and hit[1] == w._version:
        STATS["reused"] += 1
        return hit[2]
    with torch.no_grad():
        q = api.quantize(w.detach(), fmt, axis=axis)
    STATS["quantised"] += 1
    try:
        ref = weakref.ref(w, lambda _, key=key: _drop(key))
    except TypeError:
        return q
    _CACHE[key] = (ref, w._version, q)
    return q


def resolve_weight(gm: fx.GraphModule, node, example_inputs) -> torch.Tensor | None:
    """The real tensor behind a weight node, or None when it is not a graph input/attribute."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "placeholder":
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        i = phs.index(node)
        t = example_inputs[i] if i < len(example_inputs) else None
    elif node.op == "get_attr":
        t = gm
        for part in node.target.split("."):
            t = getattr(t, part, None)
    else:
        return None
    return t if _is_real(t) else None


def quantize_weights(gm: fx.GraphModule, example_inputs) -> fx.GraphModule:
    """Set ``node.meta["qcompile_qtensor"]`` on every planned linear site whose spec has a
    weight format. A weight that is not a real graph input is left unquantised (the site's
    weight format is dropped)."""
    for node, site, spec in planned(gm):
        node.meta.pop("qcompile_qtensor", None)
        if site.kind != "linear" or spec.weight is None:
            continue
        w = resolve_weight(gm, site.weight, example_inputs)
        if w is None or w.dim() != 2:
            node.meta["qcompile_skip_weight"] = True
            continue
        node.meta["qcompile_qtensor"] = quantise_cached(w, spec.weight, site.weight_axis)
    return gm
