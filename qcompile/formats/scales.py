"""Block scale types: what is stored per block and how it turns into multipliers.

``compute`` sees blocks [..., nblocks, block] (float32) and returns the stored scales, the
float32 multiplier that maps a block onto the element grid, and tensor-level side data.
``multiplier`` turns stored scales back into the float32 factor applied to decoded elements.
A block holding NaN or Inf gets a NaN scale, so the whole block dequantises to NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .bits import E8M0_BIAS, E8M0_NAN, F32_MAX, div, floor_log2, is_pow2, pow2
from .elements import FloatElement

POW2_RULES = ("floor", "ceil", "rceil", "even")


@dataclass(frozen=True)
class Pow2Scale:
    """Shared power-of-two scale 2**e stored as E8M0 (e + 127 in a byte; 255 = NaN).

    Rules for e, given the block's absolute maximum amax and the element's emax:
    floor: floor(log2 amax) - emax (OCP MX spec); ceil: ceil(log2 amax) - emax;
    rceil: smallest e with max_value * 2**e >= amax; even: like floor, after rounding amax to the
    element's own grid in its top binade (so a max that would round up moves to the next binade).
    e is clamped to [-127, 127]; an all-zero block gets e = -127.
    """

    rule: str = "floor"
    kind = "pow2"
    bits = 8
    stored_dtype = torch.uint8  # the E8M0 code

    def whole_tensor_side(self) -> dict:
        return {}

    def __post_init__(self):
        if self.rule not in POW2_RULES:
            raise ValueError(f"unknown scale rule {self.rule!r}; choose one of {', '.join(POW2_RULES)}")

    def compute(self, blocks, element, bad):
        amax = blocks.abs().amax(-1)
        safe = torch.where(amax > 0, amax, 1.0)
        top = floor_log2(safe)
        if self.rule == "floor":
            e = top - element.emax
        elif self.rule == "ceil":
            e = top + (~is_pow2(safe)).to(torch.int32) - element.emax
        elif self.rule == "rceil":
            e = top - floor_log2(torch.tensor(element.max_value))
            e = e + (element.max_value * pow2(e) < safe).to(torch.int32)
        else:  # even
            e = top - element.emax + element.carries(safe * pow2(-top)).to(torch.int32)
        e = torch.where(amax > 0, e, -E8M0_BIAS).clamp(-E8M0_BIAS, E8M0_BIAS)
        codes = torch.where(bad, E8M0_NAN, e + E8M0_BIAS).to(torch.uint8)
        return codes, pow2(-e), {}

    def multiplier(self, scales, element, side):
        codes = scales.to(torch.int32)
        return torch.where(codes == E8M0_NAN, math.nan, pow2(codes - E8M0_BIAS))

    def describe(self) -> str:
        return f"E8M0 power of two ({self.rule})"


@dataclass(frozen=True)
class AbsmaxScale:
    """float32 absmax per block (signed: the element of largest magnitude with its sign, the
    positive one on a tie). Elements see x * fp32(max_value / s); decoded elements are multiplied
    by fp32(s / max_value) (both divisions correctly rounded). An all-zero block has s = 0 and
    encodes every element as zero. Where fp32(max_value / s) overflows (|s| < max_value / FLT_MAX:
    below 3.7e-37 for int8, subnormal s for max_value <= 1) the multiplier is clamped to FLT_MAX,
    so such a block is squashed towards zero instead of rounded to nearest: finite, sign kept,
    absolute error below |s|. A known limit, far below any trained weight or activation."""

    signed: bool = False
    kind = "absmax"
    bits = 32
    stored_dtype = torch.float32  # s itself

    def whole_tensor_side(self) -> dict:
        return {}

    def compute(self, blocks, element, bad):
        if self.signed:
            hi, lo = blocks.amax(-1), blocks.amin(-1)
            s = torch.where(hi >= -lo, hi, lo)
            # a zero block: +0 if it holds a +0 (the positive one wins the tie), else -0
            plus_zero = ((blocks == 0) & ~torch.signbit(blocks)).any(-1)
            s = torch.where(s == 0, torch.where(plus_zero, 0.0, -0.0), s)
        else:
            s = blocks.abs().amax(-1)
        s = torch.where(bad, math.nan, s)
        # A tiny s overflows the multiplier: clamp it (see the class docstring).
        qmul = torch.where(s == 0, 0.0, div(element.max_value, s).clamp(-F32_MAX, F32_MAX))
        return s, qmul, {}

    def multiplier(self, scales, element, side):
        return div(scales, element.max_value)

    def describe(self) -> str:
        return "float32 signed absmax" if self.signed else "float32 absmax"


E4M3 = FloatElement(4, 3, specials="fn")
NVFP4_TENSOR_DIVISOR = 448.0 * 6.0  # E4M3 max * E2M1 max


@dataclass(frozen=True)
class NVFP4Scale:
    """Two levels: a float32 tensor scale ts = amax(finite part of tensor) / (448 * 6), and per
    block an E4M3 scale bs = e4m3(amax_block / 6 / ts) (round half even, saturating). Elements
    see x * fp32(1 / (bs * ts)); a zero block scale encodes the block as zero."""

    kind = "nvfp4"
    bits = 8
    stored_dtype = torch.uint8  # the E4M3 code

    def whole_tensor_side(self) -> dict:
        """Side tensors describing the whole tensor: name -> (dtype, shape)."""
        return {"tensor_scale": (torch.float32, [1])}

    @staticmethod
    def tensor_scale(blocks) -> torch.Tensor:
        """ts = amax(finite part of the tensor) / (448 * 6), float32 0-d."""
        finite = torch.where(torch.isfinite(blocks), blocks.abs(), 0.0)
        amax = finite.amax() if finite.numel() else torch.zeros((), device=blocks.device)
        return div(amax, NVFP4_TENSOR_DIVISOR)

    def compute(self, blocks, element, bad, tensor_scale=None):
        """``tensor_scale``: the whole tensor's, where ``blocks`` are only part of it (a
        tensor-parallel shard); else computed from ``blocks``."""
        finite = torch.where(torch.isfinite(blocks), blocks.abs(), 0.0)
        ts = self.tensor_scale(blocks) if tensor_scale is None else tensor_scale
        amax = finite.amax(-1) if finite.numel() else finite.sum(-1)
        target = torch.where(ts > 0, div(div(amax, element.max_value), ts), 0.0)
        codes = E4M3.encode(target)
        codes = torch.where(bad, 0x7F, codes).to(torch.uint8)  # 0x7F is E4M3's NaN
        s = E4M3.decode(codes) * ts
        qmul = torch.where(s == 0, 0.0, div(1.0, s).clamp(max=F32_MAX))
        return codes, qmul, {"tensor_scale": ts.reshape(1).to(torch.float32)}

    def multiplier(self, scales, element, side):
        return E4M3.decode(scales) * side["tensor_scale"]

    def describe(self) -> str:
        return "E4M3 per block x float32 per tensor"


Scale = Pow2Scale | AbsmaxScale | NVFP4Scale
