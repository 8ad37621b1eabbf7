"""Small builders of generated Triton lines that any emitter or kernel may use (no format
knowledge here): integer rounding, exponents read off bit patterns, correctly rounded divisions,
reading packed codes."""
from __future__ import annotations

import math

from qcompile.formats.bits import F32_MAX

from ..constants import f32_bits

F32_NAN = f32_bits(math.nan)  # 0x7FC00000, the float32 NaN torch writes for math.nan
F32_INF = f32_bits(math.inf)


def plus(c: int) -> str:
    """' + c' / ' - |c|' / '' for an integer constant added in generated source."""
    return f" + {c}" if c > 0 else (f" - {-c}" if c < 0 else "")


def round_half_even(src: str, dst: str) -> list[str]:
    """dst (int32) = round half to even of finite float32 src with |src| < 2^31."""
    return [f"{dst}_t = {src}.to(tl.int32)  # truncates toward zero",
            f"{dst}_r = {src} - {dst}_t.to(tl.float32)  # exact remainder in (-1, 1)",
            f"{dst}_up = (tl.abs({dst}_r) > 0.5) | ((tl.abs({dst}_r) == 0.5) & (({dst}_t & 1) == 1))",
            f"{dst} = tl.where({dst}_up, tl.where({dst}_r > 0, {dst}_t + 1, {dst}_t - 1), {dst}_t)"]


def exponent_lines(src: str, p: str) -> list[str]:
    """From float32 src > 0 (subnormals included): int32 `{p}_top` = floor(log2 src) and
    `{p}_mant`, its 23 mantissa bits after normalisation (so src = 1.mant * 2^top exactly)."""
    return [f"{p}_bits = {src}.to(tl.int32, bitcast=True)",
            f"{p}_tiny = ({p}_bits >> 23) == 0  # subnormal: scale by 2^64 (exact) to normalise",
            f"{p}_bits = tl.where({p}_tiny, ({src} * 18446744073709551616.0).to(tl.int32, bitcast=True), "
            f"{p}_bits)",
            f"{p}_top = (({p}_bits >> 23) & 255) - 127 - tl.where({p}_tiny, 64, 0)",
            f"{p}_mant = {p}_bits & 0x7FFFFF"]


def div_line(dst: str, num, den: str) -> str:
    """Correctly rounded float32 num / den (num a Python float or a tensor name, den a tensor)."""
    if isinstance(num, float):
        num = f"tl.full({den}.shape, {num!r}, tl.float32)"
    return f"{dst} = tl.math.div_rn({num}, {den})"


def qmul_lines(s: str) -> list[str]:
    """qmul = fp32(max_value / s) (computed as `qdiv`) as the reference, 0 for s == 0; an
    overflow (tiny |s|) is clamped to +-the largest float32."""
    return [f"qmul = tl.where({s} == 0, 0.0, "
            f"tl.minimum(tl.maximum(qdiv, {-F32_MAX!r}), {F32_MAX!r}))"]


def unpack_lines(bits: int, idx: str = "cols", row: str = "row_codes", mask: str = "in_range") -> list[str]:
    """Lines loading the int32 `code` of element `idx` from the packed row at pointer `row`."""
    if bits == 8:
        return [f"code = tl.load({row} + {idx}, mask={mask}, other=0).to(tl.int32)"]
    bmask = 2 ** bits - 1
    if 8 % bits == 0:  # a code never crosses a byte boundary
        return [f"# {bits}-bit codes, big-endian within each byte",
                f"byte = tl.load({row} + ({idx} * {bits}) // 8, mask={mask}, other=0).to(tl.int32)",
                f"code = (byte >> (8 - {bits} - ({idx} * {bits}) % 8)) & {bmask}"]
    return [f"# {bits}-bit codes in a big-endian bit stream: read the two bytes a code may span",
            f"bit = {idx} * {bits}",
            "first = bit // 8",
            f"spans = {mask} & ((bit % 8) + {bits} > 8)",
            f"hi = tl.load({row} + first, mask={mask}, other=0).to(tl.int32)",
            f"lo = tl.load({row} + first + 1, mask=spans, other=0).to(tl.int32)",
            f"code = (((hi << 8) | lo) >> (16 - {bits} - bit % 8)) & {bmask}"]


def indent(lines: list[str], by: str = "    ") -> list[str]:
    return [by + line for line in lines]


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
