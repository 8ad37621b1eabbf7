"""Constants the kernels need, derived once from a format's reference description.

Every kernel target reads these (the Triton text writes them as literals, the C++ argument
builders pass them in), so a rule of the format is worked out in one place, from the
reference's own functions (``element.carries``, ``element.decode``, ``scale.multiplier``).
"""
from __future__ import annotations

import functools
import struct

import torch


def f32_bits(v: float) -> int:
    """The float32 bit pattern of ``v`` as an unsigned int."""
    return struct.unpack("<I", struct.pack("<f", v))[0]


@functools.lru_cache(maxsize=None)
def carry_threshold(el) -> int:
    """The smallest 23-bit mantissa field t with el.carries(1.t): a top-binade value m in [1, 2)
    rounds up to 2 on the element's grid iff its float32 mantissa bits are >= t (2^23: never).
    Found by bisection over the element's own reference rule, which is monotone in m."""
    lo, hi = 0, 1 << 23
    while lo < hi:
        mid = (lo + hi) // 2
        m = torch.tensor([(127 << 23) | mid], dtype=torch.int32).view(torch.float32)
        if bool(el.carries(m)[0]):
            hi = mid
        else:
            lo = mid + 1
    return lo


def max_value_split(el) -> tuple[int, int]:
    """(top, mantissa field) of the element's float32 max_value = 1.mantissa * 2^top: the
    power-of-two scale's rceil rule compares a block maximum's mantissa with it."""
    bits = f32_bits(float(el.max_value))
    return (bits >> 23) - 127, bits & 0x7FFFFF


def element_values(el, side=None) -> torch.Tensor:
    """float32 values of all 2^bits codes, by the reference decode (a data-dependent codebook
    from the tensor's side data)."""
    codes = torch.arange(2**el.bits)
    if "codebook" in el.whole_tensor_side():
        return el.decode(codes, side["codebook"]).to(torch.float32)
    return el.decode(codes).to(torch.float32)


def exact_int_step(values: torch.Tensor) -> float | None:
    """``step`` where code c (read as a signed byte) decodes to int8(c) * step exactly, step a
    power of two (8-bit int elements: int8, mxint8, bfp8), else None: a kernel may then decode
    by an integer conversion and one exact product instead of a table."""
    if values.numel() != 256:
        return None
    signed = torch.arange(256).to(torch.uint8).view(torch.int8).to(torch.float32)
    step = values[1].item()
    if not (step > 0 and torch.frexp(torch.tensor(step))[0].item() == 0.5):
        return None
    same = torch.equal((signed * step).view(torch.int32), values.view(torch.int32))
    return step if same else None


def multiplier_table(fmt, side) -> torch.Tensor | None:
    """float32 multipliers of all 256 byte scale codes (E8M0, NVFP4's E4M3 times the tensor
    scale), by the reference; None for float32 scales (their multiplier is a division)."""
    if fmt.scale.stored_dtype != torch.uint8:
        return None
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    return fmt.scale.multiplier(every, fmt.element, side).to(torch.float32)
