"""Independent oracles for every qcompile number format (test helpers, no tests here).

Nothing in this file calls qcompile's element encode/decode, scale computation or packing.
Each format's value set is built from its definition (OCP MX v1.0, the reference README, the
docstrings of qcompile that state the rules) in exact rational arithmetic (fractions.Fraction);
the float32 roundings that are part of a format's definition (absmax multipliers, NVFP4's two
scales, bitsandbytes' normalisation) are modelled with numpy.float32, an independent IEEE-754
implementation. ``fake_quantize`` here returns what qcompile.fake_quantize must return.

Where a format's formula is undefined (an absmax block so small that fp32(max / absmax)
overflows to infinity) the oracle asks for the nearest representable value of the block, and
accepts either neighbour on an exact tie; ``Expected.alt`` carries that second value.
"""
from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

F32 = np.float32
HALF = Fraction(1, 2)
E8M0_BIAS = 127
NVFP4_DIVISOR = Fraction(448 * 6)


# ----------------------------------------------------------------------------------------------
# exact arithmetic helpers


def frac(v) -> Fraction:
    """The exact value of a finite float (Python, numpy float32/float16/float64)."""
    return Fraction(float(v))


def pow2(k: int) -> Fraction:
    return Fraction(2) ** k


def floor_log2(r: Fraction) -> int:
    """floor(log2 r) for a rational r > 0, exactly (integer bit lengths, no floating point)."""
    if r <= 0:
        raise ValueError("floor_log2 needs r > 0")
    n, d = r.numerator, r.denominator
    k = n.bit_length() - d.bit_length()
    if (n < d << k) if k >= 0 else (n << -k < d):
        k -= 1
    return k


def ceil_log2(r: Fraction) -> int:
    k = floor_log2(r)
    return k if r == pow2(k) else k + 1


def round_half_even(r: Fraction) -> int:
    """Nearest integer to r; an exact .5 goes to the even neighbour."""
    fl = r.numerator // r.denominator
    rest = r - fl
    if rest > HALF or (rest == HALF and fl % 2):
        return fl + 1
    return fl


def round_binary(r: Fraction, man_bits: int, emin: int, emax: int):
    """r rounded half-to-even to a binary float (man_bits fraction bits, normals from 2**emin,
    subnormals below, largest binade 2**emax); +-math.inf past the IEEE overflow threshold."""
    if r == 0:
        return Fraction(0)
    a = abs(r)
    e = max(floor_log2(a), emin)
    quantum = pow2(e - man_bits)
    v = round_half_even(a / quantum) * quantum
    if v >= pow2(emax + 1):
        return math.copysign(math.inf, r)
    return v if r > 0 else -v


def to_f32(r) -> np.float32:
    """Exact rational (or +-inf) -> the float32 nearest to it, ties to even (one rounding)."""
    if isinstance(r, float) and math.isinf(r):
        return F32(r)
    v = round_binary(Fraction(r), 23, -126, 127)
    return F32(v) if isinstance(v, float) else F32(float(v))


def to_bf16_value(r) -> Fraction:
    """r rounded to bfloat16 (8 significant bits, float32's exponent range), as a Fraction."""
    v = round_binary(Fraction(r), 7, -126, 127)
    if isinstance(v, float):
        raise OverflowError("bfloat16 overflow")
    return v


def f32_mul(a, b) -> np.float32:
    with np.errstate(all="ignore"):
        return F32(a) * F32(b)


def f32_div(a, b) -> np.float32:
    with np.errstate(all="ignore"):
        return F32(a) / F32(b)


def f32_ulp_steps(x: np.float32, steps: int) -> np.float32:
    """x moved by `steps` float32 ulps (positive: towards +inf)."""
    x = F32(x)
    direction = F32(np.inf) if steps > 0 else F32(-np.inf)
    for _ in range(abs(steps)):
        x = np.nextafter(x, direction, dtype=np.float32)
    return x


# ----------------------------------------------------------------------------------------------
# element grids (each: max_value, emax, nearest(r), carries(m), values())


class Minifloat:
    """Sign + exp_bits + man_bits with IEEE-style subnormals; specials 'none' | 'fn' | 'ieee'.

    The table of every code is enumerated from the bit fields; ``mags`` lists the finite
    non-negative values with their magnitude codes in ascending order.
    """

    def __init__(self, exp_bits: int, man_bits: int, specials: str = "none", bias=None):
        self.exp_bits, self.man_bits, self.specials = exp_bits, man_bits, specials
        self.bias = 2 ** (exp_bits - 1) - 1 if bias is None else bias
        self.bits = 1 + exp_bits + man_bits
        self.table = {}  # code -> Fraction | 'nan' | +-math.inf
        top_field = 2**exp_bits - 1
        for code in range(2**self.bits):
            sign = code >> (self.bits - 1)
            field = (code >> man_bits) & top_field
            man = code & (2**man_bits - 1)
            if specials == "ieee" and field == top_field:
                value = math.inf if man == 0 else "nan"
            elif specials == "fn" and field == top_field and man == 2**man_bits - 1:
                value = "nan"
            elif field == 0:
                value = Fraction(man, 2**man_bits) * pow2(1 - self.bias)
            else:
                value = (1 + Fraction(man, 2**man_bits)) * pow2(field - self.bias)
            if sign and value != "nan":
                value = -value
            self.table[code] = value
        self.mags = sorted((v, c) for c, v in self.table.items()
                           if c >> (self.bits - 1) == 0 and isinstance(v, Fraction))
        self.mag_values = [v for v, _ in self.mags]
        self.max_value = self.mag_values[-1]
        self.emax = floor_log2(self.max_value)

    def values(self):
        return sorted({s * v for v in self.mag_values for s in (1, -1)})

    def nearest(self, r: Fraction) -> Fraction:
        """Round to nearest, ties to the even magnitude code, saturating at +-max normal."""
        a = abs(r)
        if a >= self.max_value:
            v = self.max_value
        else:
            i = bisect.bisect_right(self.mag_values, a) - 1  # mags[i] <= a < mags[i + 1]
            (lo, lo_code), (hi, hi_code) = self.mags[i], self.mags[i + 1]
            if a - lo < hi - a:
                v = lo
            elif a - lo > hi - a:
                v = hi
            else:
                v = lo if lo_code % 2 == 0 else hi
        return -v if r < 0 else v

    def carries(self, m: Fraction) -> bool:
        """Does m in [1, 2) round up to 2 at this element's mantissa width (half even)?"""
        return round_half_even(m * 2**self.man_bits) >= 2 ** (self.man_bits + 1)

    def __repr__(self):
        return f"Minifloat(E{self.exp_bits}M{self.man_bits},{self.specials})"


class IntGrid:
    """Symmetric integers k / 2**frac_bits, |k| <= qmax; round half even, saturate at qmax.
    (Absmax-scaled ints never use emax.)"""

    def __init__(self, qmax: int, frac_bits: int = 0, emax: int = 0):
        self.qmax, self.frac_bits = qmax, frac_bits
        self.max_value = Fraction(qmax, 2**frac_bits)
        # exponent the shared scale is offset by: 0 for MXINT8 (OCP table) and for BFP, whose
        # README rule is e = ceil(log2 amax) with no offset although its max is just below 1
        self.emax = emax

    def values(self):
        return [Fraction(k, 2**self.frac_bits) for k in range(-self.qmax, self.qmax + 1)]

    def nearest(self, r: Fraction) -> Fraction:
        k = round_half_even(r * 2**self.frac_bits)
        return Fraction(max(-self.qmax, min(self.qmax, k)), 2**self.frac_bits)

    def carries(self, m: Fraction) -> bool:
        step = self.frac_bits + self.emax
        return round_half_even(m * 2**step) >= 2 ** (step + 1)

    def __repr__(self):
        return f"IntGrid({self.qmax}/2^{self.frac_bits})"


class LogGrid:
    """Sign + (bits-1)-bit exponent: 0 or +-2**k, k in [1 - (2**(bits-1) - 1), 0]. Rounding in
    the log domain (up iff the mantissa exceeds sqrt 2); only an exact zero gives zero."""

    def __init__(self, bits: int):
        self.bits = bits
        self.kmin = 1 - (2 ** (bits - 1) - 1)
        self.max_value = Fraction(1)
        self.emax = 0

    def values(self):
        mags = [pow2(k) for k in range(self.kmin, 1)]
        return sorted([Fraction(0)] + mags + [-m for m in mags])

    def nearest(self, r: Fraction) -> Fraction:
        if r == 0:
            return Fraction(0)
        a = abs(r)
        k = floor_log2(a)
        m = a / pow2(k)
        k += m * m > 2  # m > sqrt(2), exactly
        v = pow2(max(self.kmin, min(0, k)))
        return -v if r < 0 else v

    def carries(self, m: Fraction) -> bool:
        return m * m > 2


class Codebook:
    """A table of float32 values. Encode: code = number of thresholds strictly below n, the
    thresholds being given (nf4: the published ones) or the float32 roundings of the exact
    midpoints of neighbouring table values (the rule qcompile's docstring states)."""

    def __init__(self, name: str, values, thresholds=None):
        self.name = name
        self.values_f32 = [F32(v) for v in values]
        self.table = [frac(v) for v in self.values_f32]
        if thresholds is None:
            thresholds = [to_f32((a + b) / 2) for a, b in zip(self.table, self.table[1:])]
        self.thresholds = [frac(F32(t)) for t in thresholds]
        self.max_value = Fraction(1)

    def code(self, n: Fraction) -> int:
        return bisect.bisect_left(self.thresholds, n)  # how many thresholds are < n

    def nearest_exact(self, n: Fraction) -> int:
        """The code of the table value nearest to n in exact arithmetic, ties to the lower code."""
        best = 0
        for i, v in enumerate(self.table):
            if abs(n - v) < abs(n - self.table[best]):
                best = i
        return best

    def values(self):
        return list(self.table)


# ----------------------------------------------------------------------------------------------
# codebook data

# Published tables as numbers: tests/data/published_codebooks.json, the tests' own copy of
# ../shared/reference/codebooks.json (so no ../shared is needed; test_formats_codebooks checks the
# copy against that file's digest recorded with it, and the file where present). Read as data,
# never through qcompile.
PUBLISHED_JSON = Path(__file__).resolve().parent / "data" / "published_codebooks.json"
PUBLISHED_DECIMALS = {k: v for k, v in json.loads(PUBLISHED_JSON.read_text(),
                                                  parse_float=str).items()
                      if not k.startswith("_")}  # numbers kept as the decimal text printed


def published_decimals(table: str):
    """A published table's values as the decimal strings printed in the copy."""
    return tuple(PUBLISHED_DECIMALS[table]["values"])


def published_f32(table: str):
    """A published table's values, each decimal rounded once (exactly) to the nearest float32."""
    return tuple(float(to_f32(Fraction(d))) for d in published_decimals(table))


# bitsandbytes / QLoRA NF4 (functional.get_4bit_type('nf4')), values and the thresholds its
# CUDA encoder dQuantizeNF4 compares against. The thresholds are the float64 midpoints of
# neighbouring values, printed to 16 digits: they are read as float64 (the exact midpoints), and
# the Codebook rounds them to float32. (Rounding the printed decimals straight to float32 instead
# gives the other neighbour at thresholds 0, 8, 12 and 14, whose midpoints are float32 ties.)
NF4_VALUES = published_f32("nf4")
NF4_THRESHOLDS = tuple(float(t) for t in PUBLISHED_DECIMALS["nf4"]["thresholds"])
# AF4 (Yoshida, arXiv:2306.06965), block size 64.
AF4_VALUES = published_f32("af4")
# The 4-bit dynamic exponent type as listed in the reference README (Dettmers & Zettlemoyer).
DYNEXP4_DECIMALS = ("0", "0.0055", "0.0325", "0.0775", "0.2125", "0.4375", "0.6625", "0.8875",
                    "1.0")

SHIPPED_JSON = Path(__file__).resolve().parents[1] / "qcompile" / "data" / "codebooks.json"


def shipped_values(table: str):
    """A BOF4 table as shipped (data, read straight from the JSON file)."""
    return json.loads(SHIPPED_JSON.read_text())[table]["values"]


def dynexp_values(bits: int):
    """Signed dynamic-exponent map with bits - 1 exponent levels, from its description: level i
    cuts [0.1, 1] into 2**i equal parts and scales their midpoints by 10**(i - (bits-1) + 1);
    plus 0 and 1. Exact rationals, one rounding to float32."""
    levels = bits - 1
    vals = {Fraction(0), Fraction(1)}
    for i in range(levels):
        parts = 2**i
        for j in range(parts):
            mid = Fraction(1, 10) + Fraction(9, 10) * Fraction(2 * j + 1, 2 * parts)
            v = mid * Fraction(10) ** (i - levels + 1)
            vals |= {v, -v}
    return sorted(to_f32(v) for v in vals)


# ----------------------------------------------------------------------------------------------
# the formats


@dataclass(frozen=True)
class Spec:
    kind: str  # pow2 | absmax | codebook | nvfp4 | quantile | opq
    element: object
    block: int | None
    rule: str | None = None  # pow2 scale rule
    signed: bool = False  # codebook: signed absmax
    opq_q: float | None = None


def _cb(name, values, thresholds=None):
    return Codebook(name, values, thresholds)


def _specs():
    e4m3 = Minifloat(4, 3, "fn")
    return {
        "mxfp8_e4m3": Spec("pow2", e4m3, 32, "floor"),
        "mxfp8_e5m2": Spec("pow2", Minifloat(5, 2, "ieee"), 32, "floor"),
        "mxfp6_e3m2": Spec("pow2", Minifloat(3, 2), 32, "floor"),
        "mxfp6_e2m3": Spec("pow2", Minifloat(2, 3), 32, "floor"),
        "mxfp4": Spec("pow2", Minifloat(2, 1), 32, "floor"),
        "mxint8": Spec("pow2", IntGrid(127, 6), 32, "floor"),
        "nvfp4": Spec("nvfp4", Minifloat(2, 1), 16),
        "bfp8": Spec("pow2", IntGrid(127, 7), 16, "ceil"),
        "bfp6": Spec("pow2", IntGrid(31, 5), 16, "ceil"),
        "bfp4": Spec("pow2", IntGrid(7, 3), 16, "ceil"),
        "bm8": Spec("pow2", Minifloat(4, 3, "none"), 16, "floor"),
        "bl8": Spec("pow2", LogGrid(8), 16, "even"),
        "int8": Spec("absmax", IntGrid(127), 64),
        "int4": Spec("absmax", IntGrid(7), 64),
        "int3": Spec("absmax", IntGrid(3), 64),
        "fp4_e2m1": Spec("absmax", Minifloat(2, 1), 64),
        "fp4_e3m0": Spec("absmax", Minifloat(3, 0), 64),
        "fp3_e2m0": Spec("absmax", Minifloat(2, 0), 64),
        "dynexp4": Spec("codebook", _cb("dynexp4", dynexp_values(4)), 64),
        "dynexp8": Spec("codebook", _cb("dynexp8", dynexp_values(8)), 64),
        "quantile4": Spec("quantile", None, 64),
        "nf4": Spec("codebook", _cb("nf4", NF4_VALUES, NF4_THRESHOLDS), 64),
        "af4": Spec("codebook", _cb("af4", AF4_VALUES), 64),
        "bof4": Spec("codebook", _cb("bof4", shipped_values("bof4_mse_b64")), 64),
        "bof4s": Spec("codebook", _cb("bof4s", shipped_values("bof4s_mse_b64")), 64, signed=True),
        "bof4_mae": Spec("codebook", _cb("bof4_mae", shipped_values("bof4_mae_b64")), 64),
        "bof4s_mae": Spec("codebook", _cb("bof4s_mae", shipped_values("bof4s_mae_b64")), 64,
                          signed=True),
        "bof4s_opq": Spec("opq", _cb("bof4s", shipped_values("bof4s_mse_b64")), 64, signed=True,
                          opq_q=0.95),
    }


SPECS = _specs()
E4M3 = Minifloat(4, 3, "fn")
E2M1 = Minifloat(2, 1)


def spec(name: str, block_size="preset", scale_rule=None) -> Spec:
    s = SPECS[name]
    if block_size != "preset":
        s = Spec(s.kind, s.element, block_size, s.rule, s.signed, s.opq_q)
    if scale_rule is not None:
        assert s.kind == "pow2"
        s = Spec(s.kind, s.element, s.block, scale_rule, s.signed, s.opq_q)
    return s


# ----------------------------------------------------------------------------------------------
# block rules


def pow2_exponent(amax: Fraction, element, rule: str) -> int:
    """The shared exponent e of a finite block with absolute maximum amax, clamped to E8M0's
    [-127, 127]; an all-zero block gets -127."""
    if amax == 0:
        return -E8M0_BIAS
    top = floor_log2(amax)
    if rule == "floor":
        e = top - element.emax
    elif rule == "ceil":
        e = ceil_log2(amax) - element.emax
    elif rule == "rceil":  # the smallest e with max_value * 2**e >= amax
        e = ceil_log2(amax / element.max_value)
    elif rule == "even":
        e = top - element.emax + element.carries(amax / pow2(top))
    else:
        raise ValueError(rule)
    return max(-E8M0_BIAS, min(E8M0_BIAS, e))


@dataclass
class Expected:
    want: np.ndarray  # float32; NaN where the output must be NaN
    alt: np.ndarray  # float32; a second acceptable value (equal to want where unique)

    def ok(self, got) -> np.ndarray:
        got = np.asarray(got, dtype=np.float32)
        return ((got == self.want) | (got == self.alt)
                | (np.isnan(got) & np.isnan(self.want)))


def _nearest_in(x: Fraction, candidates):
    """(best, second) members of candidates nearest to x; second = best unless an exact tie."""
    cands = sorted({c for c in candidates})
    dist = [abs(x - c) for c in cands]
    d = min(dist)
    hits = [c for c, di in zip(cands, dist) if di == d]
    return hits[0], hits[-1]


def _pow2_block(xs, element, rule):
    e = pow2_exponent(max(abs(frac(v)) for v in xs), element, rule)
    scale = pow2(e)
    out = [to_f32(element.nearest(frac(v) / scale) * scale) for v in xs]
    return out, out, e


def _absmax_block(xs, element):
    s = max(abs(F32(v)) for v in xs)
    if s == 0:
        z = [F32(0)] * len(xs)
        return z, z
    maxv = F32(float(element.max_value))
    qmul = f32_div(maxv, s)
    mult = f32_div(s, maxv)
    if not np.isfinite(qmul):  # formula undefined: ask for the nearest representable value
        grid = [frac(f32_mul(float(v), mult)) for v in element.values()]
        pairs = [_nearest_in(frac(v), grid) for v in xs]
        return [to_f32(a) for a, _ in pairs], [to_f32(b) for _, b in pairs]
    out = [f32_mul(float(element.nearest(frac(f32_mul(v, qmul)))), mult) for v in xs]
    return out, out


def signed_absmax(xs) -> np.float32:
    """The block element of largest magnitude with its sign; the positive one on a tie."""
    hi, lo = max(F32(v) for v in xs), min(F32(v) for v in xs)
    return hi if hi >= -lo else lo


def _codebook_block(xs, cb: Codebook, signed: bool, exact_rule=False):
    s = signed_absmax(xs) if signed else max(abs(F32(v)) for v in xs)
    if s == 0:
        z = [F32(0)] * len(xs)
        return z, z
    qmul = f32_div(1.0, s)
    if not np.isfinite(qmul):
        grid = [frac(f32_mul(v, s)) for v in cb.values_f32]
        pairs = [_nearest_in(frac(v), grid) for v in xs]
        return [to_f32(a) for a, _ in pairs], [to_f32(b) for _, b in pairs]
    pick = cb.nearest_exact if exact_rule else cb.code
    out = [f32_mul(cb.values_f32[pick(frac(f32_mul(v, qmul)))], s) for v in xs]
    return out, out


def _nvfp4_scale(amax_block: np.float32, ts: np.float32):
    """(e4m3 block scale value, s = fp32(bs * ts))."""
    if not ts > 0:
        return Fraction(0), F32(0)
    target = f32_div(f32_div(amax_block, 6.0), ts)
    bs = E4M3.max_value if np.isinf(target) else E4M3.nearest(frac(target))
    return bs, f32_mul(float(bs), ts)


def _nvfp4_block(xs, ts):
    amax = max(abs(F32(v)) for v in xs)
    _, s = _nvfp4_scale(amax, ts)
    if s == 0:
        z = [F32(0)] * len(xs)
        return z, z
    qmul = f32_div(1.0, s)
    if not np.isfinite(qmul):
        grid = [frac(f32_mul(float(v), s)) for v in E2M1.values()]
        pairs = [_nearest_in(frac(v), grid) for v in xs]
        return [to_f32(a) for a, _ in pairs], [to_f32(b) for _, b in pairs]
    out = [f32_mul(float(E2M1.nearest(frac(f32_mul(v, qmul)))), s) for v in xs]
    return out, out


def opq_limit(count: int, q: float) -> float:
    """F_M^-1(q) for F_M(m) = (2 G(m) - 1)^I = erf(m / sqrt 2)^I, I = count (BOF4 paper), solved
    from that definition by bisection on log F_M(m) = log q, not by a closed-form inverse (the
    implementation's). Near the root erf is within 1e-3 of 1: erfc keeps its precision there."""
    def log_cdf(m):
        t = m / math.sqrt(2)
        return count * (math.log(math.erf(t)) if t < 1 else math.log1p(-math.erfc(t)))

    lo, hi = 0.0, 64.0
    for _ in range(100):  # the interval shrinks to adjacent float64s long before 100 halvings
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if log_cdf(mid) < math.log(q) else (lo, mid)
    return hi


def opq_outliers(xs, q: float):
    """Indices of the OPQ outliers of one (finite) block of real elements (BOF4 paper):
    |w| > sigma * F_M^-1(q), sigma the corrected standard deviation (exact rationals),
    F_M(m) = (2 G(m) - 1)^I, I = len(xs). One element has no deviation, so no outlier."""
    c = len(xs)
    if c < 2:
        return set()
    vals = [frac(v) for v in xs]
    mean = sum(vals) / c
    var = sum((v - mean) ** 2 for v in vals) / (c - 1)
    limit = Fraction(opq_limit(c, q))
    return {i for i, v in enumerate(vals) if v * v > var * limit * limit}


def quantile_table(normalised, bits: int = 4):
    """The quantile codebook from its definition: level i = Q(i / (2**bits - 1)), Q the linearly
    interpolated empirical quantile of the normalised values, divided by the largest |level|;
    exact rationals, one rounding to float32, ascending."""
    v = sorted(frac(t) for t in normalised)
    n = 2**bits
    if not v:
        return None
    levels = []
    for i in range(n):
        p = Fraction(i * (len(v) - 1), n - 1)
        lo = math.floor(p)
        hi = min(lo + 1, len(v) - 1)
        levels.append(v[lo] + (p - lo) * (v[hi] - v[lo]))
    peak = max(abs(t) for t in levels)
    if peak > 0:
        levels = [t / peak for t in levels]
    return sorted(to_f32(t) for t in levels)


# ----------------------------------------------------------------------------------------------
# whole tensors


def _rows(x: np.ndarray, axis: int):
    xm = np.moveaxis(np.asarray(x, dtype=np.float32), axis, -1)
    k = xm.shape[-1]
    return xm, xm.reshape(int(np.prod(xm.shape[:-1], dtype=np.int64)), k), k


def fake_quantize(x, name: str, axis: int = -1, block_size="preset", scale_rule=None,
                  codebook_table=None, exact_codebook_rule=False) -> Expected:
    """What qcompile.fake_quantize(x, name, axis) must return, for float32 input x (numpy).

    Blocks of the spec's size run along `axis`, the row's last block may be short (padding zeros
    change no block statistic of these rules; OPQ and the quantile table use real elements
    only). A block holding a NaN or Inf is all NaN. codebook_table overrides the quantile table
    (to check the encode rule against a given table); exact_codebook_rule switches codebooks to
    exact nearest (ties to the lower code) instead of float32-midpoint thresholds.
    """
    sp = spec(name, block_size, scale_rule)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0:
        x, axis = x.reshape(1), 0
    xm, rows, k = _rows(x, axis)
    block = sp.block or max(k, 1)
    want = np.zeros(rows.shape, dtype=np.float32)
    alt = np.zeros(rows.shape, dtype=np.float32)
    spans = [(r, b, min(b + block, k)) for r in range(rows.shape[0]) for b in range(0, k, block)]
    finite = {sp_: bool(np.isfinite(rows[sp_[0], sp_[1]:sp_[2]]).all()) for sp_ in spans}

    ts = None
    if sp.kind == "nvfp4":
        fin = rows[np.isfinite(rows)]
        amax = np.abs(fin).max() if fin.size else F32(0)
        ts = f32_div(amax, F32(float(NVFP4_DIVISOR)))
    table = None
    if sp.kind == "quantile":
        if codebook_table is not None:
            table = [F32(v) for v in codebook_table]
        else:
            normalised = []
            for (r, b, e), ok in finite.items():
                if ok:
                    xs = rows[r, b:e]
                    s = np.abs(xs).max()
                    qmul = f32_div(1.0, s) if s != 0 else F32(0)
                    normalised += [f32_mul(v, qmul) for v in xs]
            table = quantile_table(normalised)

    for (r, b, e), ok in finite.items():
        xs = [F32(v) for v in rows[r, b:e]]
        if not ok:
            want[r, b:e] = np.nan
            alt[r, b:e] = np.nan
            continue
        if sp.kind == "pow2":
            w, a, _ = _pow2_block(xs, sp.element, sp.rule)
        elif sp.kind == "absmax":
            w, a = _absmax_block(xs, sp.element)
        elif sp.kind == "codebook":
            w, a = _codebook_block(xs, sp.element, sp.signed, exact_codebook_rule)
        elif sp.kind == "nvfp4":
            w, a = _nvfp4_block(xs, ts)
        elif sp.kind == "quantile":
            w, a = _codebook_block(xs, Codebook("quantile", table), False)
        elif sp.kind == "opq":
            out = opq_outliers(xs, sp.opq_q)
            kept = [F32(0) if i in out else v for i, v in enumerate(xs)]
            w, a = _codebook_block(kept, sp.element, sp.signed)
            for i in out:
                w[i] = a[i] = to_f32(to_bf16_value(frac(xs[i])))
        else:
            raise ValueError(sp.kind)
        want[r, b:e] = w
        alt[r, b:e] = a
    shape = xm.shape
    return Expected(np.moveaxis(want.reshape(shape), -1, axis),
                    np.moveaxis(alt.reshape(shape), -1, axis))


def block_exponents(x, name: str, block_size="preset", scale_rule=None):
    """The E8M0 exponent of every block (rows along the last axis) of a pow2 format; None for a
    block holding NaN/Inf."""
    sp = spec(name, block_size, scale_rule)
    x = np.asarray(x, dtype=np.float32)
    rows = x.reshape(-1, x.shape[-1])
    k = rows.shape[-1]
    block = sp.block or max(k, 1)
    out = []
    for r in range(rows.shape[0]):
        row = []
        for b in range(0, k, block):
            xs = rows[r, b:b + block]
            if not np.isfinite(xs).all():
                row.append(None)
            else:
                row.append(pow2_exponent(max(abs(frac(v)) for v in xs), sp.element, sp.rule))
        out.append(row)
    return out


# ----------------------------------------------------------------------------------------------
# packing and decoding, written from the packing rule (big-endian bit stream, first code in the
# most significant bits), for checking stored codes


def unpack_codes(row_bytes, bits: int, n: int):
    """uint8 bytes -> the first n b-bit codes of the big-endian bit stream."""
    stream = 0
    for byte in row_bytes:
        stream = (stream << 8) | int(byte)
    total = 8 * len(row_bytes)
    return [(stream >> (total - bits * (i + 1))) & (2**bits - 1) for i in range(n)]


def pack_codes(codes, bits: int):
    """b-bit codes -> uint8 bytes, padded with zero codes to a multiple of 8 codes."""
    codes = list(codes) + [0] * (-len(codes) % 8)
    stream = 0
    for c in codes:
        stream = (stream << bits) | c
    nbytes = len(codes) * bits // 8
    return [(stream >> (8 * (nbytes - 1 - i))) & 0xFF for i in range(nbytes)]


def decode_element(element, code: int):
    """The value of one element code of a spec element (two's complement for ints)."""
    if isinstance(element, Minifloat):
        return element.table[code]
    if isinstance(element, IntGrid):
        bits = (2 * element.qmax + 2).bit_length() - 1
        signed = code - 2**bits if code >= 2 ** (bits - 1) else code
        return Fraction(signed, 2**element.frac_bits)
    if isinstance(element, LogGrid):
        mag = code & (2 ** (element.bits - 1) - 1)
        v = Fraction(0) if mag == 0 else pow2(mag - (2 ** (element.bits - 1) - 1))
        return -v if code >> (element.bits - 1) else v
    if isinstance(element, Codebook):
        return element.table[code]
    raise TypeError(element)


def element_bits(element) -> int:
    if isinstance(element, (Minifloat, LogGrid)):
        return element.bits
    if isinstance(element, IntGrid):
        return (2 * element.qmax + 2).bit_length() - 1
    return 4 if len(element.table) == 16 else 8


# ----------------------------------------------------------------------------------------------
# comparing


def assert_matches(got, expected: Expected, x=None, what=""):
    """got (torch tensor or array) equals the oracle element for element (NaN where NaN)."""
    g = got.detach().float().numpy() if hasattr(got, "detach") else np.asarray(got)
    ok = expected.ok(g)
    if ok.all():
        return
    bad = np.argwhere(~ok)
    lines = [f"{what}: {len(bad)} of {ok.size} elements differ from the oracle"]
    for idx in bad[:6]:
        idx = tuple(idx)
        xin = "" if x is None else f"x={np.asarray(x, dtype=np.float32)[idx]!r} "
        lines.append(f"  at {idx}: {xin}expected {expected.want[idx]!r}"
                     f"{'' if expected.alt[idx] == expected.want[idx] else f' or {expected.alt[idx]!r}'}"
                     f" got {g[idx]!r}")
    raise AssertionError("\n".join(lines))


def same_bits(a, b) -> bool:
    """Bit-for-bit equality of two tensors (NaN payloads and signed zeros included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ia = a.contiguous().view(_INT_OF[a.dtype])
    ib = b.contiguous().view(_INT_OF[b.dtype])
    return bool((ia == ib).all())


def _int_views():
    import torch
    return {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


_INT_OF = _int_views()


# ----------------------------------------------------------------------------------------------
# hypothesis strategies: blocks that pin a scale, plus values at and next to the ties

from hypothesis import strategies as st  # noqa: E402


def f32_floats(**kw):
    """Finite float32 values (subnormals included wherever the range reaches them)."""
    return st.floats(width=32, allow_nan=False, allow_infinity=False, **kw)


def element_points(element):
    """Positive rationals where an element's rounding decides: grid values and the midpoints
    between neighbours (exact ties); for a log grid the float32 neighbours of 2**k * sqrt 2."""
    if isinstance(element, LogGrid):
        root = frac(F32(math.sqrt(2)))
        pts = [pow2(k) for k in range(element.kmin, 1)]
        pts += [root * pow2(k) for k in range(element.kmin - 1, 1)]
        return sorted(set(pts))
    if isinstance(element, Codebook):
        return sorted({abs(v) for v in element.table} | {abs(t) for t in element.thresholds})
    vals = sorted({abs(v) for v in element.values()})
    mids = [(a + b) / 2 for a, b in zip(vals, vals[1:])]
    beyond = [vals[-1] + (vals[-1] - vals[-2]) / 2, vals[-1] * Fraction(3, 2)]
    return sorted(set(vals + mids + beyond))


def special_mantissas(element):
    """float32 mantissas m in [1, 2) where a scale rule changes its mind."""
    ms = {Fraction(1), Fraction(3, 2)}
    if isinstance(element, Minifloat):
        ms.add(2 - pow2(-(element.man_bits + 1)))  # carries under 'even' (tie goes up)
    elif isinstance(element, IntGrid):
        ms.add(2 - pow2(-(element.frac_bits + element.emax + 1)))
    elif isinstance(element, LogGrid):
        ms.add(frac(F32(math.sqrt(2))))
    ms.add(element.max_value / pow2(floor_log2(element.max_value)))  # rceil boundary
    out = set()
    for m in ms:
        base = to_f32(m)
        for steps in (-1, 0, 1):
            v = frac(f32_ulp_steps(base, steps))
            if 1 <= v < 2:
                out.add(v)
    out.add(2 - pow2(-23))
    return sorted(out)


@st.composite
def near(draw, points, scale: Fraction, limit: Fraction):
    """A signed float32 at or within two ulps of points[i] * scale, clipped to |x| <= limit."""
    p = draw(st.sampled_from(points)) * scale
    x = f32_ulp_steps(to_f32(p), draw(st.sampled_from([0, 0, 0, 1, -1, 2, -2])))
    v = min(frac(x), limit)
    v = to_f32(v)
    if frac(v) > limit:
        v = f32_ulp_steps(v, -1)
    return -float(v) if draw(st.booleans()) else float(v)


@st.composite
def filler(draw, points, scale: Fraction, amax: Fraction):
    """One block element below the block maximum: a tie or near tie, a random float32 in range,
    a zero, or a tiny value."""
    lim = float(to_f32(amax))
    kind = draw(st.sampled_from(["near", "near", "near", "uniform", "zero", "tiny"]))
    if kind == "near":
        return draw(near(points, scale, amax))
    if kind == "uniform":
        return draw(f32_floats(min_value=-lim, max_value=lim))
    if kind == "zero":
        return draw(st.sampled_from([0.0, -0.0]))
    tiny = min(lim, 2.0**-100)
    return draw(f32_floats(min_value=-tiny, max_value=tiny))


@st.composite
def pow2_block(draw, element, rule, size, e_lo=-40, e_hi=40):
    """One block for a power-of-two scaled format: the block maximum has a drawn mantissa (often
    one where a scale rule turns) and exponent, the shared exponent e that fixes follows from the
    rule (oracle), and the other elements sit at or next to element ties scaled by 2**e."""
    top = draw(st.integers(e_lo, e_hi))
    mant = draw(st.one_of(st.sampled_from(special_mantissas(element)),
                          st.integers(0, 2**23 - 1).map(lambda k: 1 + Fraction(k, 2**23))))
    amax = frac(to_f32(mant * pow2(top)))
    e = pow2_exponent(amax, element, rule)
    pts = element_points(element)
    xs = [draw(filler(pts, pow2(e), amax)) for _ in range(size - 1)]
    sign = -1.0 if draw(st.booleans()) else 1.0
    xs.insert(draw(st.integers(0, size - 1)), sign * float(amax))
    return xs


@st.composite
def pow2_tensor(draw, element, rule, block, e_lo=-40, e_hi=40, max_rows=2, max_blocks=2):
    rows = draw(st.integers(1, max_rows))
    nblocks = draw(st.integers(1, max_blocks))
    data = [sum((draw(pow2_block(element, rule, block, e_lo, e_hi)) for _ in range(nblocks)), [])
            for _ in range(rows)]
    return np.array(data, dtype=np.float32)


def n_domain_points(element):
    """Points where rounding decides, in the element domain (after the absmax multiplier)."""
    if isinstance(element, Codebook):
        return sorted({abs(t) for t in element.thresholds} | {abs(v) for v in element.table})
    return element_points(element)


@st.composite
def absmax_block(draw, element, size, signed=False, e_lo=-60, e_hi=60):
    """One block for an absmax-scaled format: a drawn absmax s, and elements x placed so that
    fp32(x * qmul) (qmul = fp32(max/s)) lands at or next to the element's ties."""
    s = abs(draw(f32_floats(min_value=2.0**e_lo, max_value=2.0**e_hi)))
    s32 = F32(s)
    maxv = 1.0 if isinstance(element, Codebook) else float(element.max_value)
    qmul = f32_div(maxv, s32)
    pts = n_domain_points(element)
    xs = [draw(filler(pts, 1 / frac(qmul), frac(s32))) for _ in range(size - 1)]
    if signed and size > 1 and draw(st.booleans()):
        xs[draw(st.integers(0, size - 2))] = -float(s32)  # a magnitude tie: + must win
    sign = -1.0 if draw(st.booleans()) else 1.0
    xs.insert(draw(st.integers(0, size - 1)), sign * float(s32))
    return xs


@st.composite
def absmax_tensor(draw, element, block, signed=False, max_rows=2, max_blocks=2, e_lo=-60,
                  e_hi=60):
    rows = draw(st.integers(1, max_rows))
    nblocks = draw(st.integers(1, max_blocks))
    data = [sum((draw(absmax_block(element, block, signed, e_lo, e_hi))
                 for _ in range(nblocks)), []) for _ in range(rows)]
    return np.array(data, dtype=np.float32)
