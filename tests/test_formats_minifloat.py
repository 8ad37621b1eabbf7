"""Minifloat elements: MX floats (E4M3, E5M2, E3M2, E2M3, E2M1), bm8, NVFP4 and the absmax-scaled
floats (fp4_e2m1, fp4_e3m0, fp3_e2m0), each against an enumeration of every code (tests/oracles)
and the exact nearest value under round-half-even on the code, saturating at the max normal."""
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import oracles as O
import qcompile
from qcompile import formats
from sweeps import examples

# Hypothesis budgets per format (sweeps.examples): each example runs the exact Fraction oracle;
# ten times as many under HYPOTHESIS_PROFILE=blockquant-long
MX_FLOATS = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4"]
POW2_FLOATS = MX_FLOATS + ["bm8"]
ABSMAX_FLOATS = ["fp4_e2m1", "fp4_e3m0", "fp3_e2m0"]


def fq(x, name, **kw):
    return qcompile.fake_quantize(torch.as_tensor(np.asarray(x, dtype=np.float32)), name, **kw)


# ---------------------------------------------------------------------------- the enumerations


@pytest.mark.parametrize("el, max_value, emax, smallest", [
    (O.Minifloat(4, 3, "fn"), 448, 8, Fraction(1, 2**9)),
    (O.Minifloat(5, 2, "ieee"), 57344, 15, Fraction(1, 2**16)),
    (O.Minifloat(3, 2), 28, 4, Fraction(1, 16)),
    (O.Minifloat(2, 3), Fraction(15, 2), 2, Fraction(1, 8)),
    (O.Minifloat(2, 1), 6, 2, Fraction(1, 2)),
    (O.Minifloat(4, 3), 480, 8, Fraction(1, 2**9)),  # bm8: E4M3 with every code finite
    (O.Minifloat(3, 0), 16, 4, Fraction(1, 4)),
    (O.Minifloat(2, 0), 4, 2, Fraction(1)),
])
def test_enumeration_matches_published_numbers(el, max_value, emax, smallest):
    """OCP MX v1.0 table: E4M3 448 (emax 8), E5M2 57344 (15), E3M2 28 (4), E2M3 7.5 (2),
    E2M1 6 (2); the smallest positive value is the first subnormal."""
    assert el.max_value == max_value and el.emax == emax
    assert el.mag_values[0] == 0 and el.mag_values[1] == smallest
    finite = [v for v in el.table.values() if isinstance(v, Fraction)]
    assert max(finite) == max_value and min(finite) == -max_value


def test_e2m1_magnitudes_and_special_codes():
    assert O.Minifloat(2, 1).mag_values == [Fraction(v) for v in (0, 0.5, 1, 1.5, 2, 3, 4, 6)]
    e4m3 = O.Minifloat(4, 3, "fn")
    assert [c for c, v in e4m3.table.items() if v == "nan"] == [0x7F, 0xFF]
    e5m2 = O.Minifloat(5, 2, "ieee")
    assert sorted(c for c, v in e5m2.table.items() if v == "nan") == [0x7D, 0x7E, 0x7F,
                                                                       0xFD, 0xFE, 0xFF]
    assert [c for c, v in e5m2.table.items() if v in (np.inf, -np.inf)] == [0x7C, 0xFC]


@pytest.mark.parametrize("el, dtype", [(O.Minifloat(4, 3, "fn"), torch.float8_e4m3fn),
                                       (O.Minifloat(5, 2, "ieee"), torch.float8_e5m2)])
def test_enumeration_matches_torch_float8_bit_patterns(el, dtype):
    """A second, independent source: torch's own float8 types read bit pattern by bit pattern."""
    got = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float().tolist()
    for code, g in enumerate(got):
        want = el.table[code]
        if want == "nan":
            assert g != g, code
        else:
            assert g == float(want), (hex(code), g, want)


def test_qcompile_elements_declare_the_published_ranges():
    for name, max_value in [("mxfp8_e4m3", 448), ("mxfp8_e5m2", 57344), ("mxfp6_e3m2", 28),
                            ("mxfp6_e2m3", 7.5), ("mxfp4", 6), ("bm8", 480), ("nvfp4", 6),
                            ("fp4_e2m1", 6), ("fp4_e3m0", 16), ("fp3_e2m0", 4)]:
        assert formats.get(name).element.max_value == max_value, name
    for name, block in [("mxfp8_e4m3", 32), ("mxfp4", 32), ("bm8", 16), ("nvfp4", 16),
                        ("fp4_e2m1", 64)]:
        assert formats.get(name).block_size == block, name


# ---------------------------------------------------------------------------- MX floor rule


@pytest.mark.parametrize("name", POW2_FLOATS)
@examples(20)
@given(data=st.data())
def test_floor_rule_every_element_is_the_scaled_nearest(name, data):
    """A block whose maximum fixes e = floor(log2 amax) - emax: every output equals
    2**e * nearest(x / 2**e) exactly, and the stored E8M0 byte is e + 127."""
    sp = O.spec(name)
    x = data.draw(O.pow2_tensor(sp.element, "floor", sp.block))
    q = qcompile.quantize(torch.from_numpy(x), name)
    out = qcompile.dequantize(q)
    O.assert_matches(out, O.fake_quantize(x, name), x, name)
    want_e = O.block_exponents(x, name)
    assert q.scales.dtype == torch.uint8
    assert q.scales.tolist() == [[e + 127 for e in row] for row in want_e]
    # and e really is floor(log2 amax) - emax, as the generator meant it to be
    for row, erow in zip(x, want_e):
        for b, e in enumerate(erow):
            amax = max(abs(O.frac(v)) for v in row[b * sp.block:(b + 1) * sp.block])
            if amax and -127 < e < 127:
                assert O.pow2(e + sp.element.emax) <= amax < O.pow2(e + sp.element.emax + 1)


@pytest.mark.parametrize("name", POW2_FLOATS)
@pytest.mark.parametrize("rule", ["floor", "ceil", "rceil", "even"])
@examples(8)
@given(data=st.data())
def test_scale_rules_against_their_definitions(name, rule, data):
    """ceil: 2**(ceil(log2 amax) - emax); rceil: the smallest 2**e with max * 2**e >= amax;
    even: floor after rounding amax to the element's mantissa width; derived exactly."""
    sp = O.spec(name, scale_rule=rule)
    fmt = formats.get(name, scale_rule=rule)
    x = data.draw(O.pow2_tensor(sp.element, rule, sp.block, max_rows=1))
    q = qcompile.quantize(torch.from_numpy(x), fmt)
    O.assert_matches(qcompile.dequantize(q), O.fake_quantize(x, name, scale_rule=rule), x,
                     f"{name} {rule}")
    assert q.scales.tolist() == [[e + 127 for e in row]
                                 for row in O.block_exponents(x, name, scale_rule=rule)]


@pytest.mark.parametrize("name, rule, amax, e", [
    # exact power of two: floor and ceil agree; one ulp above, ceil moves up
    ("mxfp4", "ceil", 4.0, 0), ("mxfp4", "ceil", 4.0000005, 1),
    ("mxfp4", "floor", 7.9, 0),
    # rceil: 6 * 2**0 >= 6 but 6 * 2**0 < 6.0000005
    ("mxfp4", "rceil", 6.0, 0), ("mxfp4", "rceil", 6.0000005, 1),
    # even, one mantissa bit: 7 = 1.75 * 4 is the tie of 6 and 8 and goes to 8 (carry);
    # 6.9 rounds to 6 (no carry); 1.5 * 4 = 6 is on the grid
    ("mxfp4", "even", 7.0, 1), ("mxfp4", "even", 6.9, 0), ("mxfp4", "even", 6.0, 0),
    # even, three mantissa bits: 480 = 1.875 * 256 is on the grid (no carry although E4M3fn
    # cannot hold it); 496 = 1.9375 * 256 ties 480 / 512 and carries
    ("mxfp8_e4m3", "even", 480.0, 0), ("mxfp8_e4m3", "even", 496.0, 1),
    ("mxfp8_e4m3", "even", 495.0, 0),
    ("mxfp8_e4m3", "floor", 511.0, 0), ("mxfp8_e4m3", "rceil", 449.0, 1),
])
def test_scale_rule_boundaries(name, rule, amax, e):
    x = np.zeros(32, dtype=np.float32)
    x[3] = amax
    assert O.block_exponents(x[None], name, scale_rule=rule) == [[e]]
    q = qcompile.quantize(torch.from_numpy(x), formats.get(name, scale_rule=rule))
    assert q.scales.tolist() == [e + 127]


# ---------------------------------------------------------------------------- absmax floats


@pytest.mark.parametrize("name", ABSMAX_FLOATS)
@examples(20)
@given(data=st.data())
def test_absmax_floats_nearest_in_the_float32_definition(name, data):
    """n = fp32(x * fp32(max / absmax)) rounded to the element (half even on the code,
    saturating), times fp32(absmax / max) in float32."""
    sp = O.spec(name)
    x = data.draw(O.absmax_tensor(sp.element, sp.block))
    O.assert_matches(fq(x, name), O.fake_quantize(x, name), x, name)


# ---------------------------------------------------------------------------- NVFP4


@st.composite
def nvfp4_tensor(draw):
    """A tensor amax T (in block 0) and per-block maxima, elements at or next to E2M1 ties of
    each block's two-level scale."""
    nblocks = draw(st.integers(1, 4))
    t = abs(draw(O.f32_floats(min_value=2.0**-60, max_value=2.0**60)))
    ts = O.f32_div(t, 2688.0)
    rows = []
    for b in range(nblocks):
        if b == 0:
            amax = O.F32(t)
        else:
            ratio = draw(st.sampled_from([1.0, 0.5, 2.0**-9, 2.0**-12, 0.3, 0.77]))
            amax = O.f32_mul(t, ratio)
        _, s = O._nvfp4_scale(amax, ts)
        pts = O.element_points(O.E2M1)
        lim = O.frac(amax)
        if s == 0:
            xs = [draw(O.f32_floats(min_value=-float(amax), max_value=float(amax)))
                  for _ in range(15)]
        else:
            xs = [draw(O.filler(pts, O.frac(s), lim)) for _ in range(15)]
        xs.insert(draw(st.integers(0, 15)), float(amax) * (-1 if draw(st.booleans()) else 1))
        rows += xs
    return np.array(rows, dtype=np.float32)


@given(x=nvfp4_tensor())
def test_nvfp4_two_level_scale(x):
    """ts = fp32(amax / 2688); bs = e4m3(fp32(fp32(block_amax / 6) / ts)); elements E2M1 of
    fp32(x * fp32(1 / fp32(bs * ts))); stored bytes are E4M3 codes of bs."""
    q = qcompile.quantize(torch.from_numpy(x), "nvfp4")
    O.assert_matches(qcompile.dequantize(q), O.fake_quantize(x, "nvfp4"), x, "nvfp4")
    ts = O.f32_div(np.abs(x).max(), 2688.0)
    assert q.side["tensor_scale"].tolist() == [float(ts)]
    for b, code in enumerate(q.scales.tolist()):
        bs, _ = O._nvfp4_scale(np.abs(x[b * 16:(b + 1) * 16]).max(), ts)
        assert O.E4M3.table[code] == bs, (b, hex(code), bs)


def test_nvfp4_block_scale_saturates_and_underflows():
    x = np.zeros(48, dtype=np.float32)
    x[0] = 2688.0  # ts = 1, block 0: bs = 448 exactly
    x[16] = 2.0**-11  # bs target 2**-11/6: below E4M3's smallest subnormal 2**-9 / 2 -> 0
    x[17] = 2.0**-12
    x[32] = 6.0 * 2.0**-9  # bs = 2**-9, the smallest subnormal E4M3
    x[33] = 3.0 * 2.0**-9
    q = qcompile.quantize(torch.from_numpy(x), "nvfp4")
    assert q.scales.tolist() == [0x7E, 0x00, 0x01]
    out = qcompile.dequantize(q).numpy()
    assert out[0] == 2688.0 and out[16] == 0 and out[17] == 0
    assert out[32] == x[32] and out[33] == x[33]


# ---------------------------------------------------------------------------- idempotence

IDEMPOTENT = MX_FLOATS + ["mxint8", "bm8"]


@pytest.mark.parametrize("name", IDEMPOTENT)
@examples(10)
@given(data=st.data())
def test_power_of_two_floor_formats_are_idempotent(name, data):
    """fake_quantize(fake_quantize(x)) == fake_quantize(x), bit for bit: the rounded block max
    stays in the binade that fixed the scale and every element is on the grid already."""
    sp = O.spec(name)
    x = torch.from_numpy(data.draw(O.pow2_tensor(sp.element, "floor", sp.block, -130, 120)))
    once = qcompile.fake_quantize(x, name)
    twice = qcompile.fake_quantize(once, name)
    assert O.same_bits(once, twice)


# ---------------------------------------------------------------------------- regressions

REGRESSIONS = [
    # (format, block, expected) written out by hand from the definitions
    # mxfp4: amax 6 -> e = 0; 2.5 is the tie of 2 (code 4, even) and 3 (code 5) -> 2;
    # 5 ties 4 (code 6) and 6 (code 7) -> 4; 0.25 ties 0 and 0.5 -> 0; 0.75 ties 0.5, 1 -> 1
    ("mxfp4", [6.0, 2.5, 5.0, 0.25, 0.75, -1.25, 1.75, 7.0], [6.0, 2.0, 4.0, 0.0, 1.0, -1.0,
                                                              2.0, 6.0]),
    # mxfp4: amax 13 -> e = 1; 8 / 2 = 4 stays, 13 / 2 = 6.5 saturates to 6 -> 12
    ("mxfp4", [8.0, 13.0, 0.5, 1.5], [8.0, 12.0, 0.0, 2.0]),
    # mxfp8_e4m3: amax 500 -> e = 0, 500 saturates to 448; 464 (tie 448/480, 480 not finite)
    ("mxfp8_e4m3", [500.0, 464.0, 17.0, 2.0**-10], [448.0, 448.0, 16.0, 0.0]),
    # bm8: E4M3 without specials reaches 480; 464 ties 448 (mantissa 6) and 480 (7) -> 448
    ("bm8", [500.0, 464.0, 17.0, 2.0**-10], [480.0, 448.0, 16.0, 0.0]),
    # mxfp6_e2m3: amax 7 -> e = 0; 7.25 ties 7 (code 30) and 7.5 (31) -> 7; 0.0625 ties 0/0.125
    ("mxfp6_e2m3", [7.0, 7.25, 0.0625, 0.1875], [7.0, 7.0, 0.0, 0.25]),
    # fp4_e2m1 absmax 3: qmul = 2, 0.75 -> 1.5 exactly, 1.25 -> 2.5 tie -> 2 -> 1.0
    ("fp4_e2m1", [3.0, 0.75, 1.25, -0.125], [3.0, 0.75, 1.0, -0.0]),
    # Mantissa-free elements tie to the even exponent field (the even code), found by CI.
    # fp4_e3m0 = {0, 2^-2 .. 2^4}, field = log2 v + 3; amax 1 -> qmul 16. 0.1875 -> 3 ties
    # 2 (field 4) and 4 (field 5) -> 2; 0.375 -> 6 ties 4 (5) and 8 (6) -> 8; 0.09375 -> 1.5
    # ties 1 (3) and 2 (4) -> 2; 2^-7 -> 0.125 ties 0 (code 0) and 0.25 (field 1) -> 0
    ("fp4_e3m0", [1.0, 0.1875, 0.375, 0.09375, 2.0**-7], [1.0, 0.125, 0.5, 0.125, 0.0]),
    # fp3_e2m0 = {0, 1, 2, 4}, field = log2 v + 1; amax 4 -> qmul 1. 3 ties 2 (field 2) and
    # 4 (3) -> 2; 1.5 ties 1 (1) and 2 (2) -> 2; 0.5 ties 0 and 1 -> 0
    ("fp3_e2m0", [4.0, 3.0, 1.5, 0.5], [4.0, 2.0, 2.0, 0.0]),
]


@pytest.mark.parametrize("name, x, want", REGRESSIONS)
def test_minifloat_regressions(name, x, want):
    x = np.array(x, dtype=np.float32)
    assert fq(x, name).tolist() == want
    O.assert_matches(torch.tensor(want), O.fake_quantize(x, name), x, name)
