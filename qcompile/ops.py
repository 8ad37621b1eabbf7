"""The qcompile ops that compiled graphs call, registered with ``torch.library``.

* ``qcompile::dequantize(codes, scales, side, meta, impl)`` -> the weight a packed QTensor
  stands for. ``meta`` is a JSON string (format key, shape, dtype, axis, block, side names): a
  QTensor travels through the graph as its tensors plus this string.
* ``qcompile::fake_quantize_act(x, fmt, axis, impl)`` -> dequantize(quantize(x)) with blocks
  along ``axis``, computed at run time (dynamic activation quantisation).
* ``qcompile::linear(x, codes, scales, side, meta, act_fmt, bias, impl)`` -> the fused form:
  fake-quantise x (if ``act_fmt``), dequantise the weight, then the same matmul the original
  graph did: ``F.linear(x, W, bias)`` for an [N, K] weight (axis 1), ``addmm(bias, x, W)`` for
  a GPT-2 Conv1D [K, N] weight (axis 0).

Each op has a fake (meta) implementation so Dynamo, AOTAutograd and Inductor can trace it. The
bodies dispatch on ``impl``: "reference" runs qcompile's reference implementation (the
definition of each format); "triton" runs the generated kernels of qcompile.codegen (dequantise,
quantise, the fused linear of codegen/linear.py); "auto" is "triton" for CUDA tensors and
"reference" otherwise. Where no kernel can be generated, compiled or launched for a format, the
op warns once (per op and format) and computes the reference result instead: never a wrong one.
"""
from __future__ import annotations

import json
import os
import warnings

import torch
import torch.nn.functional as F

from . import api, formats
from .qtensor import QTensor

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def qtensor_meta(q: QTensor) -> str:
    """The non-tensor part of a QTensor, as the string the ops take."""
    return json.dumps({"fmt": q.fmt.key, "shape": list(q.shape), "dtype": str(q.dtype)[6:],
                       "axis": q.axis, "block": q.block, "side": list(q.side)})


def qtensor_from(codes, scales, side, meta: str) -> QTensor:
    m = json.loads(meta)
    return QTensor(formats.get(m["fmt"]), codes, scales, torch.Size(m["shape"]),
                   _DTYPES[m["dtype"]], m["axis"], m["block"], dict(zip(m["side"], side)))


IMPLS = ("reference", "triton", "auto")
_warned: set = set()


def _resolve(impl: str, t: torch.Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"qcompile ops: unknown impl {impl!r}; choose one of {', '.join(IMPLS)}")
    if impl == "auto":
        return "triton" if t.is_cuda else "reference"
    return impl


def _launchable(t: torch.Tensor):
    """Generated kernels run on CUDA tensors, or on CPU ones in Triton's interpreter."""
    if not (t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"):
        raise NotImplementedError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")


def _fallback(op: str, key: str, err: BaseException):
    """Warn once per (op, format) that the reference runs instead of a generated kernel."""
    if (op, key) not in _warned:
        _warned.add((op, key))
        warnings.warn(f"qcompile::{op}: no generated Triton kernel for {key} "
                      f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                      "using the reference implementation", stacklevel=3)


@torch.library.custom_op("qcompile::dequantize", mutates_args=())
def dequantize(codes: torch.Tensor, scales: torch.Tensor, side: list[torch.Tensor], meta: str,
               impl: str = "reference") -> torch.Tensor:
    q = qtensor_from(codes, scales, side, meta)
    if _resolve(impl, codes) == "triton":
        try:
            _launchable(codes)
            return api.dequantize(q, impl="triton")
        except Exception as err:  # no kernel for it here: the reference, never a wrong result
            _fallback("dequantize", q.fmt.key, err)
    return api.dequantize(q)


@dequantize.register_fake
def _(codes, scales, side, meta, impl="reference"):
    m = json.loads(meta)
    return codes.new_empty(m["shape"], dtype=_DTYPES[m["dtype"]])


@torch.library.custom_op("qcompile::fake_quantize_act", mutates_args=())
def fake_quantize_act(x: torch.Tensor, fmt: str, axis: int = -1,
                      impl: str = "reference") -> torch.Tensor:
    if x.numel() == 0:
        return x.clone()
    if _resolve(impl, x) == "triton":
        try:
            from qcompile import codegen
            _launchable(x)
            if not codegen.supported(formats.get(fmt)):
                raise NotImplementedError("no generated quantise kernel")
            return api.fake_quantize(x, fmt, axis=axis, impl="triton")
        except Exception as err:
            _fallback("fake_quantize_act", formats.get(fmt).key, err)
    return api.fake_quantize(x, fmt, axis=axis)


@fake_quantize_act.register_fake
def _(x, fmt, axis=-1, impl="reference"):
    return torch.empty_like(x)


def _matmul(x, w, bias, weight_axis: int):
    if weight_axis == 0:  # [K, N]: GPT-2 Conv1D, the original op was addmm(bias, x, W)
        return torch.mm(x, w) if bias is None else torch.addmm(bias, x, w)
    return F.linear(x, w, bias)


@torch.library.custom_op("qcompile::linear", mutates_args=())
def linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, side: list[torch.Tensor],
           meta: str, act_fmt: str, bias: torch.Tensor | None,
           impl: str = "reference") -> torch.Tensor:
    q = qtensor_from(codes, scales, side, meta)
    if _resolve(impl, x) == "triton":
        try:
            from qcompile.codegen.linear import linear as fused
            return fused(x, q, act_fmt or None, bias)
        except Exception as err:
            _fallback("linear", q.fmt.key + (f" x {act_fmt}" if act_fmt else ""), err)
    w = api.dequantize(q)
    if act_fmt and x.numel():
        x = api.fake_quantize(x, act_fmt, axis=-1)
    return _matmul(x, w, bias, q.axis)


@linear.register_fake
def _(x, codes, scales, side, meta, act_fmt, bias, impl="reference"):
    m = json.loads(meta)
    shape = m["shape"]
    n = shape[1] if m["axis"] == 0 else shape[0]
    if m["axis"] == 0:
        return x.new_empty((x.shape[0], n))
    return x.new_empty((*x.shape[:-1], n))
