"""The registry of Triton emitters: ``element.kind`` -> element emitter (elements.py),
``scale.kind`` -> scale emitter (scales.py). The generators (dequant.py, quant.py, linear.py)
and their launchers ask here for lines, operands and launch tensors; nothing else in
codegen/triton tests a kind. A new element kind is its format description, one emitter
registered below, and its oracle.

Operands come in one order in every kernel: the element's, then the scale's.
"""
from __future__ import annotations

import torch

from ..errors import NoKernel
from .elements import CodebookEmitter, ElementEmitter, FloatEmitter, IntEmitter, LogEmitter
from .scales import AbsmaxEmitter, NVFP4Emitter, Pow2Emitter, ScaleEmitter

ELEMENTS: dict[str, ElementEmitter] = {e.kind: e for e in (
    IntEmitter(), FloatEmitter(), LogEmitter(), CodebookEmitter())}
SCALES: dict[str, ScaleEmitter] = {s.kind: s for s in (
    Pow2Emitter(), AbsmaxEmitter(), NVFP4Emitter())}


def _emitter(registry: dict, kind: str, what: str, detail: str = ""):
    found = registry.get(kind)
    if found is None:
        raise NoKernel(f"no Triton emitter for {what} kind {kind!r}{detail}; emitters exist "
                       f"for {', '.join(registry)}")
    return found


def element(el) -> ElementEmitter:
    return _emitter(ELEMENTS, el.kind, "element", f" ({el.describe()})")


def scale(sc) -> ScaleEmitter:
    return _emitter(SCALES, sc.kind, "scale")


def encodable(fmt) -> bool:
    """Whether a quantise kernel can be generated for ``fmt``: both kinds have emitters, and a
    signed absmax scale only with an element whose encode was checked on what it makes (its
    multiplier is -Inf for a negative subnormal block maximum)."""
    el = ELEMENTS.get(fmt.element.kind)
    if el is None or fmt.scale.kind not in SCALES:
        return False
    return el.checked_with_signed_absmax or not getattr(fmt.scale, "signed", False)


def decode_operands(fmt) -> list[str]:
    return element(fmt.element).decode_operands(fmt.element) + scale(fmt.scale).operands(fmt)


def encode_operands(fmt) -> list[str]:
    return element(fmt.element).encode_operands(fmt.element) + scale(fmt.scale).operands(fmt)


def reads_no_operands(fmt) -> bool:
    """Its encode and decode need no tensor beyond the codes and scales: what a kernel
    prologue (which has no parameters for them) can do."""
    return encodable(fmt) and not decode_operands(fmt) and not encode_operands(fmt)


def decode_tensors(fmt, side: dict, device) -> list[torch.Tensor]:
    """The tensors for ``decode_operands(fmt)``, from the tensor's side data."""
    return (element(fmt.element).decode_tensors(fmt.element, side, device)
            + scale(fmt.scale).tensors(fmt, side))


def encode_tensors(fmt, side: dict, device) -> list[torch.Tensor]:
    """The tensors for ``encode_operands(fmt)``, from the side data ``encode_side`` made."""
    return (element(fmt.element).encode_tensors(fmt.element, side, device)
            + scale(fmt.scale).tensors(fmt, side))


def encode_side(fmt, b) -> dict:
    """Whole-tensor side data the encode needs before any block (NVFP4's tensor scale, a
    quantile table), from the reference's blocked tensor ``b``, in the order QTensor keeps it."""
    side = scale(fmt.scale).encode_side(fmt, b.values)
    return {**side, **element(fmt.element).encode_side(fmt.element, b, fmt)}


# ---- lines ------------------------------------------------------------------------------

def decode_lines(el, code: str, out: str, mask: str = "in_range") -> list[str]:
    """float32 `out` from the int32 code `code`."""
    return element(el).decode_lines(el, code, out, mask)


def encode_lines(el, src: str, dst: str) -> list[str]:
    """int32 code `dst` of float32 `src` (x * qmul)."""
    return element(el).encode_lines(el, src, dst)


def multiplier_lines(fmt, sc: str, out: str) -> list[str]:
    """float32 multiplier `out` of the stored scale `sc` (int32 code, or float32)."""
    return scale(fmt.scale).multiplier_lines(fmt, sc, out)


def scale_load_line(fmt, at: str, mask: str, out: str = "sc") -> str:
    """Load the stored scale at `at` into `out`: float32 as it is, a byte code as int32."""
    if fmt.scale.stored_dtype == torch.float32:
        return f"{out} = tl.load({at}, mask={mask}, other=0.0)"
    return f"{out} = tl.load({at}, mask={mask}, other=0).to(tl.int32)"


def scale_decode_lines(fmt, mask: str = "in_range") -> list[str]:
    """Load the stored scale at `sidx` into `sc`, then its multiplier `mult`."""
    return [scale_load_line(fmt, "scales_ptr + sidx", mask)] + multiplier_lines(fmt, "sc", "mult")


def scale_encode_lines(fmt) -> list[str]:
    """`stored` and `qmul` per block from `amax` and `bad` (scales.ScaleEmitter.encode_lines);
    the quantise kernel and the linear's activation prologue use the same names."""
    return scale(fmt.scale).encode_lines(fmt)


def stored_as_int_line(fmt, src: str, dst: str) -> str:
    """`dst` = the stored scale `src` as the multiplier lines read it (a byte code as int32)."""
    if fmt.scale.stored_dtype == torch.float32:
        return f"{dst} = {src}"
    return f"{dst} = {src}.to(tl.int32)"


def scale_name(fmt) -> str:
    return scale(fmt.scale).name
