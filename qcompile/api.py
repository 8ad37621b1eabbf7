"""Public quantise / dequantise entry points: validate first, then dispatch on ``impl``, the
kernels that run (config.IMPLS: "reference" or the generated "triton" kernels; the backend's
``kernels`` option and the ops take these and more, config.KERNELS).

Autograd: ``fake_quantize`` is a straight-through estimator (forward: exactly the quantised
values; backward: the incoming gradient unchanged), the same for every format. ``quantize``
quantises the detached values: a QTensor carries no gradient.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from . import codegen, config, formats
from .codegen.select import NoKernel, quant_supported, triton_launchable
from .formats import Format, reference
from .formats.qtensor import QTensor

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_impl(impl):
    if impl not in config.IMPLS:
        raise ValueError(f"unknown impl {impl!r}; choose one of {', '.join(config.IMPLS)}")


def _check_input(x, fmt, axis) -> tuple[Format, int]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in DTYPES:
        raise TypeError(f"cannot quantise a {x.dtype} tensor; supported dtypes: float32, "
                        "float16, bfloat16")
    fmt = formats.get(fmt)
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    ndim = max(x.dim(), 1)
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a {x.dim()}-d tensor "
                         f"(valid: {-ndim}..{ndim - 1})")
    return fmt, axis % ndim


def _check_proxy_score(x, fmt: Format, axis: int, score):
    """A proxy format needs one score per position along ``axis``; other formats take none."""
    if fmt.proxy is None:
        if score is not None:
            raise ValueError(f"proxy_score given, but format {fmt.key} keeps no proxy columns "
                             "(add a proxy option, e.g. int3[proxy=0.02])")
        return None
    k = x.shape[axis] if x.dim() else 1
    if not isinstance(score, torch.Tensor):
        raise ValueError(
            f"format {fmt.key} keeps the proxy columns with the highest scores: pass "
            f"proxy_score=, a float tensor of {k} scores (one per position along axis {axis}; "
            "qcompile.proxy.input_scores derives them from the previous layer's weights, "
            "and quantize_model_ and the backend do so for every layer)")
    if tuple(score.shape) != (k,) or not score.dtype.is_floating_point:
        raise ValueError(f"proxy_score must be a float tensor of shape ({k},) (one score per "
                         f"position along axis {axis}), got {score.dtype} "
                         f"{tuple(score.shape)}")
    return score.detach().to(device=x.device)


def _check_triton_can_run(t: torch.Tensor, what: str):
    """impl="triton" runs generated Triton kernels: CUDA tensors, or CPU ones in Triton's
    interpreter. Checked before any work (before triton is even imported)."""
    if triton_launchable(t.is_cuda):
        return
    raise RuntimeError(
        f"qcompile.{what}(impl='triton'): the generated Triton kernels need CUDA tensors, or "
        f"Triton's CPU interpreter (set TRITON_INTERPRET=1 in the environment before triton is "
        f"imported); this tensor is on {t.device} and TRITON_INTERPRET is not on. Use "
        "impl='reference' (the definition of each format, on any device)")


def quantize(x: torch.Tensor, fmt, *, axis: int = -1, impl: str = "reference",
             proxy_score: torch.Tensor | None = None) -> QTensor:
    """Quantise ``x`` in blocks along ``axis`` to ``fmt`` (a preset name, key or Format).
    ``x`` may require grad: its detached values are quantised (a QTensor has no gradient).
    ``proxy_score``: for a format with the proxy option, one score per position along ``axis``
    (the highest-scoring positions are kept in bfloat16)."""
    fmt, axis = _check_input(x, fmt, axis)
    _check_impl(impl)
    score = _check_proxy_score(x, fmt, axis, proxy_score)
    x = x.detach()
    if score is not None and impl == "triton":
        raise NoKernel(f"quantize(impl='triton') has no generated kernel for the "
                       f"proxy columns of {fmt.key}; use impl='reference' (weights "
                       "are quantised once, ahead of time)")
    if impl == "triton":
        _check_triton_can_run(x, "quantize")
        if not quant_supported(fmt):
            raise NoKernel(
                f"quantize(impl='triton') has no generated kernel for {fmt.key} (every preset "
                "has one; a signed absmax scale on a non-codebook element does not); "
                "use impl='reference'")
        run = codegen.quantize
    else:
        def run(t, f, a):
            return reference.quantize(t, f, a, score)
    if x.dim() == 0:
        q = run(x.reshape(1), fmt, 0)
        q.shape = x.shape
        return q
    return run(x, fmt, axis)


def give_back_freed_memory():
    """Return the memory freed since the last call to the system (glibc's malloc_trim): glibc
    keeps freed blocks in its heap once its mmap threshold has adapted upwards, so quantising
    piece by piece, or tensor by tensor while loading, would otherwise grow the process by
    every piece's temporaries (a 113 MB embedding: 183 MB above the float tensor, 46 MB with
    it). A no-op where the C library is not glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


# side data made row by row (OPQ outliers, proxy values) or the same for every row (proxy index)
ROW_SIDE = {"outlier_index", "outlier_value", "proxy_index", "proxy_value"}
CHUNK_ELEMENTS = 1 << 20  # 4 MiB of float32 per piece


def quantize_weight(w: torch.Tensor, fmt, axis: int,
                    proxy_score: torch.Tensor | None = None) -> QTensor:
    """``quantize(w, fmt, axis=axis, proxy_score=...)`` of a 2-D weight, bit for bit, made a
    few rows (rows along the other axis) at a time: the reference's temporaries take about 8
    times the float tensor, so a large embedding quantised whole would need far more memory
    than the layer. Formats whose side data describe the whole tensor (NVFP4's tensor scale, a
    quantile codebook) are quantised whole."""
    fmt, axis = _check_input(w, fmt, axis)
    score = _check_proxy_score(w, fmt, axis, proxy_score)
    w = w.detach()
    lead = 1 - axis
    step = max(1, CHUNK_ELEMENTS // max(1, w.shape[axis]))
    if w.dim() != 2 or w.shape[lead] <= step or w.numel() >= 2**31 \
            or fmt.whole_tensor_side:
        # (from 2**31 elements on outlier_index is int64)
        return quantize(w, fmt, axis=axis, proxy_score=score)
    parts = []
    for piece in w.split(step, dim=lead):
        parts.append(reference.quantize(piece, fmt, axis, score))
        give_back_freed_memory()  # the piece's temporaries: else the heap grows piece by piece
    if any(set(p.side) - ROW_SIDE for p in parts):
        return quantize(w, fmt, axis=axis, proxy_score=score)
    first = parts[0]
    side = {}
    if "outlier_index" in first.side:  # flat positions in the padded layout: shift each piece
        row = first.scales.shape[-1] * first.block
        offsets = [0]
        for p in parts[:-1]:
            offsets.append(offsets[-1] + p.scales.shape[0] * row)
        side["outlier_index"] = torch.cat([p.side["outlier_index"] + o for p, o in
                                           zip(parts, offsets)])
        side["outlier_value"] = torch.cat([p.side["outlier_value"] for p in parts])
    if "proxy_index" in first.side:  # the same columns in every piece
        side = {"proxy_index": first.side["proxy_index"],
                "proxy_value": torch.cat([p.side["proxy_value"] for p in parts]), **side}
    return QTensor(first.fmt, torch.cat([p.codes for p in parts]),
                   torch.cat([p.scales for p in parts]), w.shape, w.dtype, axis, first.block,
                   side)


def dequantize(q: QTensor, *, impl: str = "reference") -> torch.Tensor:
    """The values a QTensor stands for, in its original shape and dtype."""
    if not isinstance(q, QTensor):
        raise TypeError(f"dequantize expects a QTensor, got {type(q).__name__}")
    _check_impl(impl)
    if impl == "triton":
        _check_triton_can_run(q.codes, "dequantize")
        run = codegen.dequantize
    else:
        run = reference.dequantize
    if len(q.shape) == 0:
        flat = QTensor(q.fmt, q.codes, q.scales, torch.Size([1]), q.dtype, 0, q.block, q.side)
        return run(flat).reshape(())
    return run(q)


def fake_quantize(x: torch.Tensor, fmt, *, axis: int = -1, impl: str = "reference",
                  proxy_score: torch.Tensor | None = None) -> torch.Tensor:
    """dequantize(quantize(x)): x rounded to the format, in x's dtype.

    Differentiable as a straight-through estimator, for every format: when ``x`` requires grad
    (and grad mode is on) the result is exactly the same values, and backward passes the
    incoming gradient to ``x`` unchanged (d fake_quantize(x) / dx taken as the identity)."""
    fmt, axis = _check_input(x, fmt, axis)
    _check_impl(impl)
    if impl == "triton":
        _check_triton_can_run(x, "fake_quantize")
    _check_proxy_score(x, fmt, axis, proxy_score)
    if torch.is_grad_enabled() and x.requires_grad:
        return _StraightThrough.apply(x, fmt, axis, impl, proxy_score)
    return fake_quantize_values(x, fmt, axis=axis, impl=impl, proxy_score=proxy_score)


def fake_quantize_values(x: torch.Tensor, fmt, *, axis: int = -1, impl: str = "reference",
                         proxy_score: torch.Tensor | None = None) -> torch.Tensor:
    """fake_quantize without autograd: the values of dequantize(quantize(x)) (what the ops and
    the straight-through estimator compute)."""
    return dequantize(quantize(x, fmt, axis=axis, impl=impl, proxy_score=proxy_score),
                      impl=impl)


class _StraightThrough(torch.autograd.Function):
    """Forward: fake_quantize_values(x); backward: the gradient unchanged (same shape, dtype)."""

    @staticmethod
    def forward(ctx, x, fmt, axis, impl, proxy_score):
        return fake_quantize_values(x, fmt, axis=axis, impl=impl, proxy_score=proxy_score)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None
