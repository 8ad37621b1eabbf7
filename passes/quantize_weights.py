"""Pass 3: quantise the real weights once, ahead of time.

The backend receives the real parameters in ``example_inputs``; a weight is found as the
placeholder (or get_attr) feeding the op. Packed QTensors are cached on the parameter object's
identity, its state (version counter, storage), the format key and the K axis, so recompiles
(new sequence lengths, dynamic shapes) reuse them instead of quantising again, and a weight
that changed (``load_state_dict``) is quantised anew. A proxy format's column scores come from
the layers feeding the weight (qcompile.proxy), in the model the frame's names come from; they
are part of the cache check and computed again whenever the weight is packed again.
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch
from torch import fx

from qcompile import api, config
from qcompile.formats.qtensor import QTensor
from qcompile.proxy import input_scores

from .find import op_record, real_input
from .graph import graph_record, placeholders
from .plan import planned

# (id(param), fmt key, axis) -> (weakref to param, weight_state(param), proxy score, QTensor)
_CACHE: dict[tuple, tuple] = {}
STATS = {"quantised": 0, "reused": 0}


def _drop(key):
    _CACHE.pop(key, None)


def weight_state(w: torch.Tensor) -> tuple:
    """What changes when a weight's values may have changed: in-place writes (load_state_dict,
    copy_, optimiser steps) bump the version counter; ``p.data = t`` swaps the storage."""
    return (w._version, w.data_ptr(), w.dtype, tuple(w.shape))


def quantise_cached(w: torch.Tensor, fmt, axis: int, score=None) -> QTensor:
    key = (id(w), fmt.key, axis)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is w and hit[1] == weight_state(w) and (
            score is None or torch.equal(hit[2], score)):
        STATS["reused"] += 1
        return hit[3]
    with torch.no_grad():
        q = api.quantize_weight(w, fmt, axis, score)
    STATS["quantised"] += 1
    try:
        ref = weakref.ref(w, lambda _, key=key: _drop(key))
    except TypeError:
        return q
    _CACHE[key] = (ref, weight_state(w), score, q)
    return q


def proxy_score(root: weakref.ref, fqn: str, weights=None) -> torch.Tensor:
    """The proxy column scores of layer ``fqn`` of the model ``root`` refers to (``weights``:
    the running instance's tensors by parameter name, where that is not the model itself)."""
    model = root()
    if model is None:
        raise ValueError(f"blockquant: layer {fqn!r} has a proxy format, whose column scores "
                         "come from the layers feeding it, but the model compiled could not be "
                         "found to read them from; give it a format without the proxy option")
    return input_scores(model, [fqn], weights)[fqn]


@dataclass
class PackedWeight:
    """A weight quantised ahead of time, and what it was quantised from: the compiled graph
    checks before each call that the weight did not change since (``changed``)."""
    input_index: int  # position of the full-precision weight among the graph's inputs
    source: weakref.ref
    state: tuple
    fmt: object
    axis: int
    q: QTensor
    score: object = None  # a proxy format: the function giving its column scores

    def changed(self, t) -> bool:
        return self.source() is not t or self.state != weight_state(t)

    def requantise(self, t: torch.Tensor) -> None:
        score = self.score() if self.score is not None else None
        self.q = quantise_cached(t, self.fmt, self.axis, score)
        self.source, self.state = weakref.ref(t), weight_state(t)


def quantize_weights(gm: fx.GraphModule, example_inputs, names=None) -> fx.GraphModule:
    """Set the ``qtensor`` of the record (passes.find.Op) of every planned linear or embedding
    site whose
    spec has a weight format (a tied embedding / lm_head pair given one format gets one packed
    tensor: the cache key is the parameter, the format and the axis), and list them in
    the graph record's ``packed`` (PackedWeight). A weight computed in the graph (a
    parametrization such as weight_norm, a hook) cannot be quantised ahead of time: rewrite
    quantises it on every call instead, said once per layer. ``names``: the frame's module names
    (passes.names), whose model gives proxy formats their column scores."""
    root = weakref.ref(names.root) if names is not None and names.root is not None \
        else (lambda: None)
    index = {n: i for i, n in enumerate(placeholders(gm))}
    packed: dict[int, PackedWeight] = {}
    for node, site, spec in planned(gm):
        op = op_record(node)
        op.qtensor, op.note = None, ""
        if site.kind == "matmul" or spec.weight is None:
            continue
        w = real_input(gm, site.weight, example_inputs)
        if w is None or w.dim() != 2:
            op.note = "quantised on every call (computed weight)"
            config.warn(f"blockquant: layer {site.fqn!r}: its weight is computed in the graph "
                        "(a parametrization such as weight_norm, or a hook), not read from a "
                        "parameter, so it is quantised on every call instead of once ahead of "
                        "time", once=("computed weight", site.fqn))
            continue
        score = None
        if spec.weight.proxy is not None:
            score = functools.partial(proxy_score, root, site.fqn, names.weights)
        q = quantise_cached(w, spec.weight, site.weight_axis, score() if score else None)
        op.qtensor = q
        if id(q) not in packed and site.weight in index:
            packed[id(q)] = PackedWeight(index[site.weight], weakref.ref(w), weight_state(w),
                                         spec.weight, site.weight_axis, q, score)
    graph_record(gm).packed = list(packed.values())
    return gm
