"""One emitter per element kind: the Triton lines that decode an int32 code into its float32
value, the lines that encode a float32 value already on the element's grid (x * qmul) into its
int32 code, and the extra kernel operands each side reads with the tensors the launcher passes
for them. The registry (emit.py) maps ``element.kind`` to these objects.

Every decode is exact: values are built from float32 bit patterns with integer ops. Every encode
rounds on integers (truncate, then look at the exact remainder, or compare mantissa bit fields),
never with rint, so the interpreter and a GPU agree with qcompile.formats.reference.
"""
from __future__ import annotations

import torch

from qcompile.formats import reference
from qcompile.formats.elements import CodebookElement

from ..constants import carry_threshold, element_values
from ..errors import NoKernel
from .lines import F32_INF, F32_NAN, plus, round_half_even

TABLE = "table_ptr"  # float32 values of every code (a codebook decoded by a gather)
THRESHOLDS = "thr_ptr"  # float32 midpoints between neighbouring codebook values (its encode)


class ElementEmitter:
    """Defaults: no operand on either side, no whole-tensor side data to compute."""
    kind = ""
    checked_with_signed_absmax = False  # encode checked on the NaN values a -Inf multiplier makes

    def decode_lines(self, el, code: str, out: str, mask: str = "in_range") -> list[str]:
        """Lines computing float32 `out` from the int32 `code` (`mask`: the lanes loaded)."""
        raise NoKernel(f"no Triton decoder for element {el.describe()}")

    def encode_lines(self, el, src: str, dst: str) -> list[str]:
        """Lines computing the int32 code `dst` of float32 `src` (x * qmul: on the element's
        grid); they may read the tile's `xbits` and per-block `bad` as well."""
        raise NoKernel(f"no Triton encoder for element {el.describe()}")

    def decode_operands(self, el) -> list[str]:
        return []

    def encode_operands(self, el) -> list[str]:
        return []

    def decode_tensors(self, el, side: dict, device) -> list[torch.Tensor]:
        return []

    def encode_tensors(self, el, side: dict, device) -> list[torch.Tensor]:
        return []

    def encode_side(self, el, b, fmt) -> dict:
        """Whole-tensor side data computed before the launch from the blocked tensor ``b``."""
        return {}


def int_code_lines(el, code: str, out: str) -> list[str]:
    """Lines computing the signed int32 `out` of an integer element's unsigned `code`."""
    sh = 32 - el.bits
    return [f"# {el.describe()}: two's complement, sign-extended by shifts",
            f"{out} = ({code} << {sh}) >> {sh}"]


class IntEmitter(ElementEmitter):
    kind = "int"

    def decode_lines(self, el, code, out, mask="in_range"):
        return int_code_lines(el, code, f"{out}_int") + [
            f"{out} = {out}_int.to(tl.float32) * {float(2.0 ** -el.frac_bits)!r}  # exact"]

    def encode_lines(self, el, src, dst):
        qmax, f = el.qmax, el.frac_bits
        return ([f"# {el.describe()}: round half to even, clamp to +-{qmax}, two's complement",
                 f"v = {src} * {float(2.0 ** f)!r}  # exact: times 2^{f}",
                 "# v is NaN only where a multiplier overflowed (0 * Inf); torch's int cast turns NaN",
                 "# into 0x80000000, whose low bits code 0",
                 "is_nan = v != v",
                 f"v = tl.where(is_nan, 0.0, tl.minimum(tl.maximum(v, {-float(qmax) - 1.0!r}), "
                 f"{float(qmax) + 1.0!r}))"]
                + round_half_even("v", "q")
                + [f"q = tl.minimum(tl.maximum(q, {-qmax}), {qmax})",
                   f"{dst} = tl.where(is_nan, 0, q & {2 ** el.bits - 1})"])


def float_decode_lines(el, code: str, out: str) -> list[str]:
    """A minifloat code to its float32 value (also NVFP4's E4M3 block scale)."""
    b, m = el.bits, el.man_bits
    emin = el.emin
    if not (-126 <= emin and el.emax <= 127):
        raise NoKernel(f"{el.describe()}: exponent range leaves float32 normals")
    lines = [
        f"# {el.describe()}: sign | {el.exp_bits}-bit exponent (bias {el.bias}) | {m}-bit mantissa",
        f"{out}_mag = {code} & {2 ** (b - 1) - 1}",
        f"{out}_exp = {out}_mag >> {m}",
        f"{out}_man = {out}_mag & {2 ** m - 1}",
        f"# normal: float32 exponent field exp - bias + 127, mantissa bits moved to the top",
        f"{out}_nbits = (({out}_exp + {127 - el.bias}) << 23) | ({out}_man << {23 - m})",
        f"# subnormal: man * 2^({emin - m}) = (1.man * 2^{emin}) - 2^{emin}, an exact subtraction",
        f"{out}_sub = ((({emin + 127}) << 23) | ({out}_man << {23 - m})).to(tl.float32, bitcast=True)"
        f" - {float(2.0 ** emin)!r}",
        f"{out}_bits = tl.where({out}_exp == 0, {out}_sub.to(tl.int32, bitcast=True), {out}_nbits)",
    ]
    if el.specials == "ieee":
        top = 2 ** el.exp_bits - 1
        lines.append(f"# top exponent: Inf (mantissa 0) or NaN")
        lines.append(f"{out}_bits = tl.where({out}_exp == {top}, "
                     f"tl.where({out}_man == 0, {F32_INF}, {F32_NAN}), {out}_bits)")
    elif el.specials == "fn":
        lines.append(f"# all-ones magnitude is NaN")
        lines.append(f"{out}_bits = tl.where({out}_mag == {2 ** (b - 1) - 1}, {F32_NAN}, {out}_bits)")
    lines.append(f"{out}_bits = {out}_bits | (({code} >> {b - 1}) << 31)  # sign")
    lines.append(f"{out} = {out}_bits.to(tl.float32, bitcast=True)")
    return lines


def float_encode_lines(el, src: str, dst: str) -> list[str]:
    """A float32 value to the minifloat code (also NVFP4's E4M3 block scale): saturating,
    round half to even."""
    m, emin, b, p = el.man_bits, el.emin, el.bits, dst
    return [f"# {el.describe()}: saturate at {float(el.max_value)!r}; binade e (zero and subnormals "
            f"share emin {emin}), then {m} mantissa bits rounded half to even",
            f"{p}_sign = (({src}.to(tl.int32, bitcast=True) >> 31) & 1) << {b - 1}",
            f"{p}_a = tl.minimum(tl.abs({src}), {float(el.max_value)!r})",
            f"{p}_e = tl.maximum((({p}_a.to(tl.int32, bitcast=True) >> 23) & 255) - 127, {emin})",
            f"# a * 2^({m} - e) is exact and lies in [0, 2^{m + 1}); ties go to the even code (for",
            "# a mantissa-free element: the even exponent field, as bit-level RNE does)",
            f"{p}_scaled = {p}_a * ((({m} - {p}_e) + 127) << 23).to(tl.float32, bitcast=True)",
            f"{p}_low = {p}_scaled.to(tl.int32)  # floor: scaled >= 0",
            f"{p}_rest = {p}_scaled - {p}_low.to(tl.float32)",
            f"{p}_mag = (({p}_e{plus(-emin)}) << {m}) + {p}_low  # low holds the leading bit",
            f"{p}_up = ({p}_rest > 0.5) | (({p}_rest == 0.5) & (({p}_mag & 1) == 1))",
            f"{dst} = {p}_sign | ({p}_mag + tl.where({p}_up, 1, 0))"]


class FloatEmitter(ElementEmitter):
    kind = "float"

    def decode_lines(self, el, code, out, mask="in_range"):
        return float_decode_lines(el, code, out)

    def encode_lines(self, el, src, dst):
        return float_encode_lines(el, src, dst)


class LogEmitter(ElementEmitter):
    kind = "log"

    def decode_lines(self, el, code, out, mask="in_range"):
        top = el.top
        return [f"# {el.describe()}: magnitude 0 is zero, else 2^(mag - {top})",
                f"{out}_mag = {code} & {top}",
                f"{out}_bits = tl.where({out}_mag == 0, 0, ({out}_mag + {127 - top}) << 23)",
                f"{out}_bits = {out}_bits | (({code} >> {el.bits - 1}) << 31)  # sign",
                f"{out} = {out}_bits.to(tl.float32, bitcast=True)"]

    def encode_lines(self, el, src, dst):
        t, kmin, b = carry_threshold(el), el.kmin, el.bits
        assert kmin >= -126, "the exponent below is exact for normal |n| only; subnormals clamp to kmin"
        return [f"# {el.describe()}: nearest power of two 2^k in the log domain, k in [{kmin}, 0];",
                f"# k = floor(log2 |n|) + 1 iff the mantissa is >= sqrt(2) (mantissa bits >= {t:#x})",
                f"lsign = (({src}.to(tl.int32, bitcast=True) >> 31) & 1) << {b - 1}",
                f"labs = {src}.to(tl.int32, bitcast=True) & 0x7FFFFFFF",
                f"k = ((labs >> 23) & 255) - 127 + tl.where((labs & 0x7FFFFF) >= {t:#x}, 1, 0)",
                f"# (a subnormal |n| gets k <= -126 here, clamped to {kmin} as its true k would be)",
                f"mag = tl.minimum(tl.maximum(k, {kmin}), 0) + {1 - kmin}  # code 1 is 2^{kmin}",
                "# only an exact zero encodes to zero: n that underflowed from a nonzero x (x * 2^-e",
                "# below 2^-149) keeps the smallest magnitude, with n's sign (that of x)",
                "nonzero = (labs != 0) | (((xbits & 0x7FFFFFFF) != 0) & ~bad[:, None])",
                f"{dst} = lsign | tl.where(nonzero, mag, 0)"]


class CodebookEmitter(ElementEmitter):
    """A fixed table of at most 16 values decodes in registers (a select tree); others gather
    from the table, a kernel operand. The encode searches the midpoint thresholds, an operand."""
    kind = "codebook"
    checked_with_signed_absmax = True

    @staticmethod
    def in_registers(el) -> bool:
        return not el.data_dependent and el.bits <= 4

    def decode_lines(self, el, code, out, mask="in_range"):
        if self.in_registers(el):
            return _select_tree_lines(el, code, out)
        return [f"# {el.describe()}: table lookup (the table is a kernel argument)",
                f"{out} = tl.load({TABLE} + {code}, mask={mask}, other=0.0)"]

    def encode_lines(self, el, src, dst):
        lines = [f"# {el.describe()}: the code is the number of the {2 ** el.bits - 1} ascending float32",
                 "# midpoint thresholds strictly below n (ties to the lower code), found by a branch-free",
                 f"# binary search in {el.bits} steps; NaN counts as above all, as torch.searchsorted",
                 f"nan_n = {src} != {src}",
                 f"{dst} = tl.zeros({src}.shape, tl.int32)"]
        for step in (1 << i for i in reversed(range(el.bits))):
            lines += [f"thr = tl.load({THRESHOLDS} + {dst} + {step - 1})",
                      f"{dst} = tl.where((thr < {src}) | nan_n, {dst} + {step}, {dst})"]
        return lines

    def decode_operands(self, el):
        return [] if self.in_registers(el) else [TABLE]

    def encode_operands(self, el):
        return [THRESHOLDS]

    @staticmethod
    def _table(el, side, device) -> torch.Tensor:
        table = side["codebook"] if el.data_dependent else el.table_tensor(device)
        return table.to(device=device, dtype=torch.float32).contiguous()

    def decode_tensors(self, el, side, device):
        return [] if self.in_registers(el) else [self._table(el, side, device)]

    def encode_tensors(self, el, side, device):
        return [CodebookElement.thresholds(self._table(el, side, device)).contiguous()]

    def encode_side(self, el, b, fmt):
        if not el.data_dependent:
            return {}
        # quantile: the table from the tensor's block-normalised values
        _, qmul, _ = fmt.scale.compute(b.values, el, b.bad)
        return {"codebook": reference.quantile_table(b, reference.normalised(b, qmul), el.bits)}


def _select_tree_lines(el, code: str, out: str) -> list[str]:
    """A fixed codebook of at most 16 values decoded in registers: a tree of selects on the
    code's bits, lowest bit first, over the float32 table values written as constants (no
    gather from memory per element)."""
    level = [repr(float(v)) for v in element_values(el).tolist()]
    lines = [f"# {el.describe()}: the table's float32 values, selected by the code's bits"]
    for bit in range(el.bits):
        names = [f"{out}_{bit}_{i}" for i in range(len(level) // 2)]
        if len(names) == 1:
            names = [out]
        lines += [f"{name} = tl.where(({code} & {1 << bit}) != 0, {hi}, {lo})"
                  for name, lo, hi in zip(names, level[0::2], level[1::2])]
        level = names
    return lines
