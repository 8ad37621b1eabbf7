"""One emitter per block-scale kind: on the decode side, the lines turning the stored scale
`sc` into the float32 multiplier the decoded elements are multiplied by (the reference's
``scale.multiplier``); on the encode side, the lines computing from the block's `amax` (and `bad`)
the scale as stored (`stored`) and the float32 factor `qmul` that puts x on the element's grid;
the kernel operands both read (one per whole-tensor side tensor of the scale, named after it) and
the launch-side steps. The registry (emit.py) maps ``scale.kind`` to these objects.

The only float operations are those the reference does itself (correctly rounded divisions via
div_rn, NVFP4's scale product); exponents are read from bit patterns.
"""
from __future__ import annotations

import torch

from qcompile.formats.scales import E4M3

from ..constants import carry_threshold, max_value_split
from ..errors import NoKernel
from .elements import float_decode_lines, float_encode_lines
from .lines import F32_NAN, div_line, exponent_lines, plus, qmul_lines


def side_operand(name: str) -> str:
    """The kernel operand of whole-tensor side tensor ``name`` (the same in every kernel)."""
    return f"{name}_ptr"


class ScaleEmitter:
    """Defaults: the operands are the scale's whole-tensor side tensors, passed as stored."""
    kind = ""
    name = ""  # the decode, in words (the decode depends on the kind only, not on the rule)

    def multiplier_lines(self, fmt, sc: str, out: str) -> list[str]:
        """Lines turning a stored block scale `sc` (int32 code, or float32 absmax) into the
        float32 multiplier `out`."""
        raise NoKernel(f"no multiplier for scale {fmt.scale!r}")

    def encode_lines(self, fmt) -> list[str]:
        """Lines reading `amax` (float32 per block, |x| max), `bad` (per block), and for some
        kinds the tile's `xbits` / `valid`; defining `stored` (the scale as saved) and `qmul`
        (float32 per block)."""
        raise NoKernel(f"no generated block scale for {fmt.scale!r}")

    def operands(self, fmt) -> list[str]:
        return [side_operand(name) for name in fmt.scale.whole_tensor_side()]

    def tensors(self, fmt, side: dict) -> list[torch.Tensor]:
        return [side[name].to(dtype).contiguous()
                for name, (dtype, _) in fmt.scale.whole_tensor_side().items()]

    def encode_side(self, fmt, blocks: torch.Tensor) -> dict:
        """Whole-tensor side data computed before the launch from the blocks."""
        return {}

    def finish(self, fmt, scales: torch.Tensor, block: int) -> torch.Tensor:
        """The stored scales after the launch (as the reference leaves them)."""
        return scales


class Pow2Emitter(ScaleEmitter):
    kind = "pow2"
    name = "E8M0 power-of-two"

    def multiplier_lines(self, fmt, sc, out):
        return ["# E8M0: 255 is NaN, 0 is the float32 subnormal 2^-127, else 2^(code - 127)",
                f"{out}_bits = tl.where({sc} == 255, {F32_NAN}, tl.where({sc} == 0, {1 << 22}, {sc} << 23))",
                f"{out} = {out}_bits.to(tl.float32, bitcast=True)"]

    def encode_lines(self, fmt):
        el, rule = fmt.element, fmt.scale.rule
        lines = [f"# E8M0 scale 2^e, rule {rule}: e from floor(log2 amax) read off the bit pattern",
                 "safe = tl.where(amax > 0, amax, 1.0)",
                 *exponent_lines("safe", "am")]
        if rule == "floor":
            lines.append(f"e = am_top{plus(-el.emax)}  # floor(log2 amax) - emax")
        elif rule == "ceil":
            lines.append(f"e = am_top + tl.where(am_mant != 0, 1, 0){plus(-el.emax)}  # ceil(log2 amax) - emax")
        elif rule == "rceil":
            mv = float(el.max_value)
            mv_top, mv_mant = max_value_split(el)
            lines += [f"# smallest e with max_value * 2^e >= amax, max_value = {mv!r} = 1.m * 2^{mv_top}:",
                      f"# e = top - {mv_top}, plus 1 iff amax's mantissa exceeds max_value's ({mv_mant:#x})",
                      f"e = am_top{plus(-mv_top)} + tl.where(am_mant > {mv_mant:#x}, 1, 0)"]
        else:  # even
            t = carry_threshold(el)
            lines += [f"# floor after rounding amax to the {el.describe()} grid in its top binade: the",
                      f"# binade moves up iff amax's mantissa rounds up to 2 there (mantissa >= {t:#x})",
                      f"e = am_top{plus(-el.emax)} + tl.where(am_mant >= {t:#x}, 1, 0)"]
        lines += ["e = tl.minimum(tl.maximum(tl.where(amax > 0, e, -127), -127), 127)",
                  "stored = tl.where(bad, 255, e + 127).to(tl.uint8)",
                  "# qmul = 2^-e from bits (2^-127 is the float32 subnormal 0x00400000)",
                  "qmul = tl.where(e == 127, 0x00400000, (127 - e) << 23).to(tl.float32, bitcast=True)"]
        return lines


class AbsmaxEmitter(ScaleEmitter):
    kind = "absmax"
    name = "float32 absmax"

    def multiplier_lines(self, fmt, sc, out):
        mv = float(fmt.element.max_value)
        if mv == 1.0:  # x / 1 is x exactly (NaN and infinities included)
            return [f"{out} = {sc}  # float32 absmax / max_value (1.0)"]
        return [f"# float32 absmax / max_value ({mv!r}), correctly rounded as the reference",
                f"{out} = tl.math.div_rn({sc}, tl.full({sc}.shape, {mv!r}, tl.float32))"]

    def encode_lines(self, fmt):
        mv = float(fmt.element.max_value)
        nan = f"tl.full(amax.shape, {F32_NAN}, tl.int32).to(tl.float32, bitcast=True)"
        if fmt.scale.signed:
            lines = ["# signed absmax: the element of largest magnitude with its sign, the positive one",
                     "# on a tie (docs/formats.md; so +0 beats -0). Max and min run on int32 keys that",
                     "# order floats totally (-0 < +0); lanes past the block get keys no finite x has",
                     "key = tl.where(xbits >= 0, xbits, xbits ^ 0x7FFFFFFF)",
                     "hi_k = tl.max(tl.where(valid, key, -2147483647), axis=1)",
                     "lo_k = tl.min(tl.where(valid, key, 2147483647), axis=1)",
                     "hi = tl.where(hi_k >= 0, hi_k, hi_k ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)",
                     "lo = tl.where(lo_k >= 0, lo_k, lo_k ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)",
                     "s = tl.where(hi >= -lo, hi, lo)"]
        else:
            lines = ["s = amax  # float32 absmax"]
        return lines + [f"stored = tl.where(bad, {nan}, s)",
                        f"# elements see x * fp32({mv!r} / s), correctly rounded",
                        div_line("qdiv", mv, "stored"),
                        *qmul_lines("stored")]

    def finish(self, fmt, scales, block):
        if block < (fmt.block_size or 0) and fmt.scale.signed:
            # block_size clamped to the row: as in the reference, the zero padding of the
            # unclamped block wins an all-zero row's tie (s = +0)
            return torch.where(scales == 0, 0.0, scales)
        return scales


class NVFP4Emitter(ScaleEmitter):
    kind = "nvfp4"
    name = "E4M3 x float32 tensor (NVFP4)"
    TENSOR_SCALE = side_operand("tensor_scale")

    def multiplier_lines(self, fmt, sc, out):
        return (["# NVFP4: E4M3 block scale times the float32 tensor scale"]
                + float_decode_lines(E4M3, sc, "bs")
                + [f"{out} = bs * tl.load({self.TENSOR_SCALE})"])

    def encode_lines(self, fmt):
        mv = float(fmt.element.max_value)
        return ["# NVFP4, level 2 (level 1, the float32 tensor scale ts, was computed before the launch):",
                f"# bs = e4m3(amax / {mv!r} / ts), round half to even, saturating; 0 where ts == 0",
                f"ts = tl.broadcast_to(tl.load({self.TENSOR_SCALE}), amax.shape)",
                div_line("per_el", "amax", f"tl.full(amax.shape, {mv!r}, tl.float32)"),
                "target = tl.where(ts > 0, tl.math.div_rn(per_el, ts), 0.0)",
                *float_encode_lines(E4M3, "target", "bcode"),
                "bcode = tl.where(bad, 0x7F, bcode)  # 0x7F is E4M3's NaN",
                "stored = bcode.to(tl.uint8)",
                "# the block's multiplier: elements see x * fp32(1 / fp32(bs * ts))",
                *float_decode_lines(E4M3, "bcode", "bs"),
                "s = bs * ts",
                div_line("qdiv", 1.0, "s"),
                *qmul_lines("s")]

    def encode_side(self, fmt, blocks):
        return {"tensor_scale": fmt.scale.tensor_scale(blocks).reshape(1)}
