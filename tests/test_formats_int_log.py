"""Integer and logarithmic elements: absmax ints (int8, int4, int3), MXINT8, BFP (bfp8/6/4) and
the block logarithm bl8, each against an enumeration of every code (tests/oracles) and the exact
nearest value under each format's rounding and scale rule, plus hand-derived regressions."""
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import oracles as O
from format_strategies import codes_of, tiled
from sweeps import examples
import qcompile
from qcompile import formats

ABSMAX_INTS = ["int8", "int4", "int3"]
BFP = ["bfp8", "bfp6", "bfp4"]
POW2_INTS = ["mxint8"] + BFP
POW2 = POW2_INTS + ["bl8"]
RULES = ["floor", "ceil", "rceil", "even"]
# Hypothesis budgets (sweeps.examples): each example runs the exact Fraction oracle, seconds a
# format; ten times as many under HYPOTHESIS_PROFILE=blockquant-long


def fq(x, name, **kw):
    return qcompile.fake_quantize(torch.as_tensor(np.asarray(x, dtype=np.float32)), name, **kw)


def block_absmax(x, block):
    rows = np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    k = rows.shape[-1]
    return [[float(np.abs(r[b:b + block]).max()) for b in range(0, k, block)] for r in rows]


# ---------------------------------------------------------------------------- the enumerations


@pytest.mark.parametrize("el, values", [
    (O.IntGrid(127), [Fraction(k) for k in range(-127, 128)]),
    (O.IntGrid(7), [Fraction(k) for k in range(-7, 8)]),  # int4: -7..7, -8 unused
    (O.IntGrid(3), [Fraction(k) for k in range(-3, 4)]),  # int3: -3..3, -4 unused
    (O.IntGrid(127, 6), [Fraction(k, 64) for k in range(-127, 128)]),  # MXINT8 (OCP MX v1.0)
    (O.IntGrid(127, 7), [Fraction(k, 128) for k in range(-127, 128)]),  # bfp8 (W8: 7 bits)
    (O.IntGrid(31, 5), [Fraction(k, 32) for k in range(-31, 32)]),  # bfp6
    (O.IntGrid(7, 3), [Fraction(k, 8) for k in range(-7, 8)]),  # bfp4
    (O.LogGrid(8), sorted([Fraction(0)] + [s * Fraction(2) ** k for k in range(-126, 1)
                                           for s in (1, -1)])),
])
def test_enumeration_matches_hand_derived_grids(el, values):
    assert el.values() == values
    assert len(values) == 2 * len([v for v in values if v > 0]) + 1  # symmetric, one zero


def test_qcompile_elements_declare_the_published_ranges():
    """OCP MX v1.0: MXINT8 max 127/64 = 1.984375 (1.111111 binary), emax 0. BFP W-bit: max
    (2^(W-1)-1)/2^(W-1). Dettmers' absmax int k: qmax 2^(k-1)-1. bl8: magnitudes up to 2^0."""
    for name, max_value, block, bits in [
            ("mxint8", 1.984375, 32, 8), ("bfp8", 0.9921875, 16, 8), ("bfp6", 0.96875, 16, 6),
            ("bfp4", 0.875, 16, 4), ("int8", 127, 64, 8), ("int4", 7, 64, 4),
            ("int3", 3, 64, 3), ("bl8", 1.0, 16, 8)]:
        f = formats.get(name)
        assert (f.element.max_value, f.block_size, f.bits) == (max_value, block, bits), name
    assert formats.get("mxint8").scale.rule == "floor"
    assert {formats.get(n).scale.rule for n in BFP} == {"ceil"}
    assert formats.get("bl8").scale.rule == "even"


@pytest.mark.parametrize("name, bits, grid", [
    ("int8", 8, [Fraction(k) for k in range(-127, 128)]),
    ("int4", 4, [Fraction(k) for k in range(-7, 8)]),
    ("int3", 3, [Fraction(k) for k in range(-3, 4)]),
    ("mxint8", 8, [Fraction(k, 64) for k in range(-127, 128)]),
    ("bfp8", 8, [Fraction(k, 128) for k in range(-127, 128)]),
    ("bfp6", 6, [Fraction(k, 32) for k in range(-31, 32)]),
    ("bfp4", 4, [Fraction(k, 8) for k in range(-7, 8)]),
])
def test_every_grid_value_is_stored_as_its_twos_complement_code(name, bits, grid):
    """The whole grid in one row (block_size=None): the block max is the grid max, so the scale
    is 1 (absmax qmul = fp32(qmax / qmax) = 1; E8M0 e = 0 under floor and ceil), every value comes
    back unchanged and its code is k mod 2^bits; the code -2^(bits-1) never appears."""
    x = np.array([float(v) for v in grid], dtype=np.float32)
    q = qcompile.quantize(torch.from_numpy(x), formats.get(name, block_size=None))
    assert qcompile.dequantize(q).tolist() == x.tolist()
    scale = Fraction(1, 2**{"mxint8": 6, "bfp8": 7, "bfp6": 5, "bfp4": 3}.get(name, 0))
    codes = codes_of(q, bits, len(grid))[0]
    assert codes == [int(v / scale) % 2**bits for v in grid]
    assert 2 ** (bits - 1) not in codes
    assert q.scales.reshape(-1).tolist() == ([127] if name in POW2 else [float(max(grid))])


def test_bl8_every_code_is_used_once_by_its_power_of_two():
    """bl8 codes: sign bit | 7-bit c, c = 0 zero, else 2^(c - 127); +-2^k for k in [-126, 0] and
    +-0 use all 256 codes. amax 1 -> e = 0 under the even rule (1 is below sqrt 2)."""
    mags = [2.0**k for k in range(-126, 1)]
    x = np.array([0.0] + mags + [-0.0] + [-m for m in mags], dtype=np.float32)
    q = qcompile.quantize(torch.from_numpy(x), formats.get("bl8", block_size=None))
    out = qcompile.dequantize(q)
    assert O.same_bits(out, torch.from_numpy(x))
    codes = codes_of(q, 8, len(x))[0]
    assert codes == list(range(256))
    assert [O.decode_element(O.LogGrid(8), c) for c in codes] == [O.frac(v) for v in x]
    assert q.scales.tolist() == [127]


# ---------------------------------------------------------------------------- absmax ints


@pytest.mark.parametrize("name", ABSMAX_INTS)
@examples(15)
@given(data=st.data())
def test_absmax_ints_nearest_in_the_float32_definition(name, data):
    """n = fp32(x * fp32(qmax / absmax)) rounded half even to an integer in [-qmax, qmax], times
    fp32(absmax / qmax) in float32; the stored scale is the block absmax itself."""
    sp = O.spec(name)
    x = data.draw(tiled(O.absmax_block(sp.element, 16), sp.block))
    q = qcompile.quantize(torch.from_numpy(x), name)
    O.assert_matches(qcompile.dequantize(q), O.fake_quantize(x, name), x, name)
    assert q.scales.dtype == torch.float32
    assert q.scales.tolist() == block_absmax(x, sp.block)


# ---------------------------------------------------------------------------- E8M0 formats


@pytest.mark.parametrize("name", POW2)
@examples(12)
@given(data=st.data())
def test_preset_rule_every_element_is_the_scaled_nearest(name, data):
    """mxint8 (floor), bfp (ceil), bl8 (even): the stored E8M0 byte is e + 127 with e from the
    rule's exact definition, and every output is 2^e * nearest(x / 2^e) (ties to even for ints,
    in the log domain for bl8)."""
    sp = O.spec(name)
    x = data.draw(tiled(O.pow2_block(sp.element, sp.rule, 16), sp.block))
    q = qcompile.quantize(torch.from_numpy(x), name)
    O.assert_matches(qcompile.dequantize(q), O.fake_quantize(x, name), x, name)
    assert q.scales.dtype == torch.uint8
    assert q.scales.tolist() == [[e + 127 for e in row] for row in O.block_exponents(x, name)]


@pytest.mark.parametrize("name", POW2)
@pytest.mark.parametrize("rule", RULES)
@examples(4)
@given(data=st.data())
def test_every_scale_rule_against_its_definition(name, rule, data):
    """floor / ceil / rceil / even on integer and log elements, derived exactly (rceil: smallest
    e with max * 2^e >= amax; even: floor after rounding amax to the grid's top binade)."""
    sp = O.spec(name, scale_rule=rule)
    x = data.draw(tiled(O.pow2_block(sp.element, rule, 16), sp.block, max_rows=1))
    q = qcompile.quantize(torch.from_numpy(x), formats.get(name, scale_rule=rule))
    O.assert_matches(qcompile.dequantize(q), O.fake_quantize(x, name, scale_rule=rule), x,
                     f"{name} {rule}")
    assert q.scales.tolist() == [[e + 127 for e in row]
                                 for row in O.block_exponents(x, name, scale_rule=rule)]


@pytest.mark.parametrize("name, rule, amax, e", [
    # MXINT8 (max 127/64, emax 0). floor: e = floor(log2 amax)
    ("mxint8", "floor", 1.0, 0), ("mxint8", "floor", 1.999, 0), ("mxint8", "floor", 2.0, 1),
    # ceil: 1 is a power of two (e = 0), one ulp above moves up
    ("mxint8", "ceil", 1.0, 0), ("mxint8", "ceil", 1.0000001, 1),
    # rceil: 127/64 * 2^0 >= 1.984375, but < 1.98438 -> e = 1
    ("mxint8", "rceil", 1.984375, 0), ("mxint8", "rceil", 1.9843751, 1),
    # even: 1.9921875 = 127.5 / 64 ties 127 (odd) and 128 -> carries; 1.98828125 (127.25) not
    ("mxint8", "even", 1.9921875, 1), ("mxint8", "even", 1.98828125, 0),
    # BFP8 (max 127/128). ceil: e = ceil(log2 amax): 0.75 -> 0, 1 -> 0, 1.5 -> 1
    ("bfp8", "ceil", 0.75, 0), ("bfp8", "ceil", 1.0, 0), ("bfp8", "ceil", 1.5, 1),
    # floor on BFP (emax 0): 1.5 -> 0; rceil: 127/128 < 1 -> e = 1 for amax 1
    ("bfp8", "floor", 1.5, 0), ("bfp8", "rceil", 1.0, 1), ("bfp8", "rceil", 0.9921875, 0),
    # bl8 even: mantissa 1.4142135 < sqrt 2 stays (e = 0); 1.4142137 > sqrt 2 carries
    ("bl8", "even", 1.4142135, 0), ("bl8", "even", 1.4142137, 1), ("bl8", "even", 1.0, 0),
    ("bl8", "floor", 1.99, 0), ("bl8", "ceil", 1.01, 1), ("bl8", "rceil", 1.01, 1),
    # clamping to E8M0: 2^-140 would want e = -140 -> -127; an all-zero block gets -127
    ("mxint8", "floor", 2.0**-140, -127), ("bfp4", "ceil", 0.0, -127),
])
def test_scale_rule_boundaries(name, rule, amax, e):
    sp = O.spec(name)
    x = np.zeros(sp.block, dtype=np.float32)
    x[3] = amax
    assert O.block_exponents(x[None], name, scale_rule=rule) == [[e]]
    q = qcompile.quantize(torch.from_numpy(x), formats.get(name, scale_rule=rule))
    assert q.scales.tolist() == [e + 127]


# ---------------------------------------------------------------------------- other block sizes


@st.composite
def wide_row(draw, name, block, length):
    """One row of `length`: a drawn block (max, ties and near ties) first, then seeded uniform
    values below its maximum, so the whole row (or a long block) keeps the drawn scale."""
    sp = O.spec(name, block_size=block)
    if sp.kind == "pow2":
        head = draw(O.pow2_block(sp.element, sp.rule, 32))
    else:
        head = draw(O.absmax_block(sp.element, 32))
    amax = max(abs(v) for v in head)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    tail = (rng.uniform(-1.0, 1.0, length - 32) * amax).astype(np.float32)
    return np.concatenate([np.array(head, dtype=np.float32), tail])[None]


@pytest.mark.parametrize("name", ["int4", "int8", "mxint8", "bfp6", "bl8"])
@pytest.mark.parametrize("block", [16, 128])
@examples(6)
@given(data=st.data())
def test_other_block_sizes(name, block, data):
    sp = O.spec(name, block_size=block)
    fmt = formats.get(name, block_size=block)
    assert fmt.block_size == block
    if sp.kind == "pow2":
        x = data.draw(tiled(O.pow2_block(sp.element, sp.rule, 16), block, max_rows=1))
    else:
        x = data.draw(tiled(O.absmax_block(sp.element, 16), block, max_rows=1))
    q = qcompile.quantize(torch.from_numpy(x), fmt)
    O.assert_matches(qcompile.dequantize(q), O.fake_quantize(x, name, block_size=block), x,
                     f"{name}[{block}]")
    assert q.scales.shape == (1, x.shape[-1] // block)


@pytest.mark.parametrize("name", ["int4", "mxint8", "bfp8", "bl8"])
@pytest.mark.parametrize("block, length", [(4096, 4096), (None, 333)])
@settings(max_examples=3)
@given(data=st.data())
def test_long_blocks_and_whole_rows(name, block, length, data):
    """A 4096-element block and block_size=None (one block per row, here 333 long): one scale
    per row, fixed by the row maximum."""
    x = data.draw(wide_row(name, block, length))
    fmt = formats.get(name, block_size=block)
    q = qcompile.quantize(torch.from_numpy(x), fmt)
    O.assert_matches(qcompile.dequantize(q), O.fake_quantize(x, name, block_size=block), x,
                     f"{name}[{block}]")
    assert q.scales.shape == (1, 1)
    if O.spec(name).kind == "pow2":
        assert q.scales.tolist() == [[e + 127 for e in row]
                                     for row in O.block_exponents(x, name, block_size=block)]
    else:
        assert q.scales.tolist() == [[float(np.abs(x).max())]]


# ---------------------------------------------------------------------------- regressions

REGRESSIONS = [
    # (format, x, expected) written out by hand from the definitions
    # int4, absmax 7: qmul = fp32(7/7) = 1; 2.5 -> 2, 3.5 -> 4, 1.5 -> 2 (half even), -0.5 -> 0
    ("int4", [7.0, 2.5, 3.5, -0.5, 1.5, -6.5], [7.0, 2.0, 4.0, 0.0, 2.0, -6.0]),
    # int4, absmax 14: qmul = 0.5, multiplier 2; n = 2.5 -> 2, 1.5 -> 2, -3.5 -> -4, 0.5 -> 0
    ("int4", [14.0, 5.0, 3.0, -7.0, 1.0], [14.0, 4.0, 4.0, -8.0, 0.0]),
    # int4, absmax 1: qmul = fp32(7/1) = 7, multiplier fp32(1/7) = 0x3E124925 = 9586981 * 2^-26;
    # 0.5 -> n = 3.5 -> 4 -> 4 * fp32(1/7) = 38347924 * 2^-26 = 0.571428596973419189453125
    # (exact); 1 -> n = 7 -> 7 * fp32(1/7) = (2^26 + 3) * 2^-26, rounded to 24 bits: 1.0
    ("int4", [1.0, 0.5, -1.0], [1.0, 0.571428596973419189453125, -1.0]),
    # int3, absmax 3: qmul 1; 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -1.5 -> -2
    ("int3", [3.0, 0.5, 1.5, 2.5, -1.5], [3.0, 0.0, 2.0, 2.0, -2.0]),
    # int8, absmax 127: qmul 1; 126.5 -> 126 (even), -2.5 -> -2
    ("int8", [127.0, 0.5, 1.5, 126.5, -2.5], [127.0, 0.0, 2.0, 126.0, -2.0]),
    # mxint8, amax 1.5 -> e = 0, grid k/64: 1/128 = 0.5/64 ties 0 -> 0; 3/128 = 1.5/64 -> 2/64;
    # -5/128 = -2.5/64 -> -2/64
    ("mxint8", [1.5, 0.0078125, 0.0234375, -0.0390625], [1.5, 0.0, 0.03125, -0.03125]),
    # mxint8, amax 1.999 -> e = 0 (floor); 1.999 * 64 = 127.94 -> 128 -> saturates at 127/64
    ("mxint8", [1.999, -1.999, 1.0], [1.984375, -1.984375, 1.0]),
    # mxint8, amax 3 -> e = 1: 3/2 = 96/64 -> 3; 1/64 -> n = 0.5/64 -> 0; 3/64 -> 1.5/64 -> 2/64 * 2
    ("mxint8", [3.0, 0.015625, 0.046875], [3.0, 0.0, 0.0625]),
    # bfp8, amax 1 = 2^0 -> e = ceil(0) = 0; 1 * 128 = 128 saturates to 127 -> 0.9921875 (the
    # released BFP definition); 0.5/128 ties 0 -> 0; 1.5/128 -> 2/128
    ("bfp8", [1.0, 0.5, 0.00390625, 0.01171875], [0.9921875, 0.5, 0.0, 0.015625]),
    # bfp8 is not idempotent (docs): 0.501 -> e = 0, 64.128 -> 64 -> 0.5; and 0.5 -> e = -1,
    # 0.5 / 0.5 * 128 = 128 -> 127 -> 127/256 = 0.49609375
    ("bfp8", [0.501], [0.5]), ("bfp8", [0.5], [0.49609375]),
    # bfp4, amax 0.75 -> e = 0, grid k/8: 0.0625 = 0.5/8 -> 0; 0.1875 = 1.5/8 -> 2/8;
    # -0.3125 = -2.5/8 -> -2/8; 0.6875 = 5.5/8 -> 6/8
    ("bfp4", [0.75, 0.0625, 0.1875, -0.3125, 0.6875], [0.75, 0.0, 0.25, -0.25, 0.75]),
    # bfp4, amax 3 -> e = ceil(log2 3) = 2: 3/4 -> 6/8 -> 3; 0.5/4 = 1/8 -> 0.5;
    # 1.25/4 = 2.5/8 -> 2/8 -> 1
    ("bfp4", [3.0, 0.5, 1.25], [3.0, 0.5, 1.0]),
    # bfp6, amax 2 -> e = 1; 2/2 * 32 = 32 -> 31 -> 31/32 * 2 = 1.9375
    ("bfp6", [2.0, -2.0, 0.03125], [1.9375, -1.9375, 0.0]),
    # bl8, amax 1 -> e = 0 (1 < sqrt 2): 0.7071 = 2^-1 * 1.4142 (< sqrt 2) -> 0.5;
    # 0.75 = 2^-1 * 1.5 -> 1; 0.3 = 2^-2 * 1.2 -> 0.25; -0.6 -> -0.5; 2^-130 clamps to 2^-126
    ("bl8", [1.0, 0.7071, 0.75, 0.3, -0.6, 2.0**-130, -0.0],
     [1.0, 0.5, 1.0, 0.25, -0.5, 2.0**-126, -0.0]),
    # bl8, amax 1.5: mantissa 1.5 > sqrt 2 -> e = 1 (even rule); 1.5 / 2 = 0.75 -> 1 -> 2;
    # 0.7 / 2 = 0.35 = 2^-2 * 1.4 -> 0.25 -> 0.5
    ("bl8", [1.5, 0.7], [2.0, 0.5]),
    # bl8: only an exact zero encodes to zero. amax 2^40 -> e = 40; 1e-40 (a subnormal input)
    # and 2^-100 give n = x * 2^-40 below 2^-126 (1e-40 * 2^-40 underflows float32 to 0) and
    # must clamp to the smallest magnitude 2^-126 -> 2^-86 with x's sign. Found by
    # test_preset_rule_every_element_is_the_scaled_nearest[bl8].
    ("bl8", [2.0**40, 1e-40, -(2.0**-100), 2.0**-149],
     [2.0**40, 2.0**-86, -(2.0**-86), 2.0**-86]),
]


@pytest.mark.parametrize("name, x, want", REGRESSIONS)
def test_int_log_regressions(name, x, want):
    x = np.array(x, dtype=np.float32)
    got = fq(x, name)
    assert got.tolist() == np.array(want, dtype=np.float32).tolist()
    O.assert_matches(torch.tensor(want), O.fake_quantize(x, name), x, name)


def test_integer_zero_is_positive_and_log_zero_keeps_its_sign():
    """docs/formats.md: integer elements give +0; the logarithmic element has a sign bit."""
    x = np.array([1.0, -0.0, -0.01], dtype=np.float32)  # int4: -0.07 rounds to 0 -> +0
    out = fq(x, "int4")
    assert not torch.signbit(out[1:]).any()
    out = fq(np.array([1.0, -0.0, 0.0], dtype=np.float32), "bl8")
    assert torch.signbit(out).tolist() == [False, True, False]
