"""Codebook elements: nf4 (bitsandbytes semantics), af4, BOF4 / BOF4-S (MSE, MAE), dynexp4/8,
the per-tensor quantile4 codebook and BOF4-S with OPQ outliers, against tests/oracles and the
published tables: tests/data/published_codebooks.json, the tests' own copy of
../shared/reference/codebooks.json (read here directly, never through qcompile; checked against
the digest of ../shared's file recorded with the copy, and against the file where present)."""
import hashlib
import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import oracles as O
from format_strategies import codes_of, tiled
import qcompile
from qcompile import formats
from qcompile.formats import codebooks
from qcompile.formats.qtensor import QTensor

REFERENCE = json.loads(O.PUBLISHED_JSON.read_text())  # the tests' copy of the published tables
SHARED_REFERENCE = Path(__file__).resolve().parents[2] / "shared/reference/codebooks.json"
SHIPPED = json.loads(O.SHIPPED_JSON.read_text())
BOF4_TABLES = [k for k in REFERENCE if k.startswith("bof4")]
CODEBOOKS = ["nf4", "af4", "bof4", "bof4s", "bof4_mae", "bof4s_mae", "dynexp4", "dynexp8"]
PRESET_TABLE = {"nf4": "nf4", "af4": "af4", "bof4": "bof4_mse_b64", "bof4s": "bof4s_mse_b64",
                "bof4_mae": "bof4_mae_b64", "bof4s_mae": "bof4s_mae_b64",
                "bof4s_opq": "bof4s_mse_b64"}
F32 = np.float32


def f32(values):
    return [float(F32(v)) for v in values]


def quantize(x, fmt):
    return qcompile.quantize(torch.as_tensor(np.asarray(x, dtype=np.float32)), fmt)


def expected_with(x, cb, block, signed=False):
    """The oracle's codebook rule with a given table (for tables the SPECS do not carry)."""
    rows = np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    k = rows.shape[-1]
    block = block or k
    want, alt = np.zeros_like(rows), np.zeros_like(rows)
    for r in range(rows.shape[0]):
        for b in range(0, k, block):
            w, a = O._codebook_block([F32(v) for v in rows[r, b:b + block]], cb, signed)
            want[r, b:b + block], alt[r, b:b + block] = w, a
    return O.Expected(want.reshape(x.shape), alt.reshape(x.shape))


# ---------------------------------------------------------------------------- the tables


@pytest.mark.parametrize("name", ["nf4", "af4"])
def test_nf4_af4_tables_are_the_published_values_exactly(name):
    published = f32(REFERENCE[name]["values"])
    assert list(formats.get(name).element.values) == published
    assert f32(SHIPPED[name]["values"]) == published
    # the oracle's own copy (which the property tests trust) is the published table too
    assert f32({"nf4": O.NF4_VALUES, "af4": O.AF4_VALUES}[name]) == published
    assert len(published) == 16 and published[0] == -1.0 and published[7] == 0.0
    assert published[-1] == 1.0 and published == sorted(published)


def test_nf4_published_thresholds_are_the_float32_midpoints_qcompile_uses():
    """bitsandbytes' dQuantizeNF4 constants are the midpoints of neighbouring table values; the
    float32 rounding of each exact midpoint is the float32 of the published constant."""
    vals = [O.frac(F32(v)) for v in REFERENCE["nf4"]["values"]]
    pub = f32(REFERENCE["nf4"]["thresholds"])
    assert f32(O.NF4_THRESHOLDS) == pub
    assert [float(O.to_f32((a + b) / 2)) for a, b in zip(vals, vals[1:])] == pub


def canonical_digest(tables: dict) -> str:
    """SHA-256 of a codebook file's canonical form: numbers as their decimal text, keys sorted."""
    return hashlib.sha256(json.dumps(tables, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()


def test_published_copy_is_the_shared_reference():
    """tests/data/published_codebooks.json holds the shared reference file's numbers as printed
    (compared as decimal text, not as floats): in every checkout through the digest of the
    shared file recorded when it was copied, and directly where ../shared is present."""
    copy = json.loads(O.PUBLISHED_JSON.read_text(), parse_float=str)
    assert isinstance(copy.pop("_copy_of"), str)
    recorded = copy.pop("_shared_sha256")
    assert canonical_digest(copy) == recorded
    if SHARED_REFERENCE.is_file():  # a changed reference must be copied again
        assert json.loads(SHARED_REFERENCE.read_text(), parse_float=str) == copy


def test_published_copy_holds_the_tables_the_tests_need():
    """Runs without ../shared: the copy has NF4 (values and thresholds), AF4 and the BOF4
    paper's Tables 6 (block 64: BOF4 / BOF4-S, MSE / MAE) and 7 (BOF4-S MSE at 32, 128, 256)."""
    assert set(BOF4_TABLES) == {"bof4_mse_b64", "bof4_mae_b64", "bof4s_mse_b64", "bof4s_mae_b64",
                                "bof4s_mse_b32", "bof4s_mse_b128", "bof4s_mse_b256"}
    assert set(O.PUBLISHED_DECIMALS) == {"nf4", "af4", *BOF4_TABLES}
    assert len(O.PUBLISHED_DECIMALS["nf4"]["thresholds"]) == 15
    for name in BOF4_TABLES:
        assert "BOF4 paper" in REFERENCE[name]["source"]
        assert ("Table 7" if name.endswith(("b32", "b128", "b256")) else "Table 6") in \
            REFERENCE[name]["source"]


@pytest.mark.parametrize("table", BOF4_TABLES)
def test_shipped_bof4_tables_are_the_published_numbers(table):
    """BOF4 paper Tables 6/7 as shipped: the printed decimals kept verbatim, each rounded once to
    the nearest float32 (exact rational arithmetic here, in the oracle), the source as the
    reference gives it, marked published; the paper's fixed levels (BOF4: -1, 0, 1; BOF4-S: 0, 1)
    and strictly ascending."""
    entry = SHIPPED[table]
    want = list(O.published_f32(table))
    assert entry["values"] == want  # float32 numbers, written exactly
    assert list(codebooks.table(table)) == want
    prov = entry["provenance"]
    assert prov["kind"] == "published" and codebooks.provenance(table) == "published"
    assert prov["published_values"] == list(O.published_decimals(table))
    assert list(codebooks.published_values(table)) == list(O.published_decimals(table))
    assert entry["source"] == REFERENCE[table]["source"] == codebooks.source(table)
    assert entry["block_size"] == REFERENCE[table]["block_size"] == int(table.rsplit("_b")[1])
    assert entry["scale"] == ("signed_absmax" if table.startswith("bof4s") else "absmax")
    assert len(want) == 16 and all(a < b for a, b in zip(want, want[1:]))
    assert want[7] == 0.0 and want[15] == 1.0
    if table.startswith("bof4s"):
        assert -1.0 < want[0] < -0.75  # signed absmax: nothing maps to -1
    else:
        assert want[0] == -1.0
    # the optimiser's table for this configuration is recorded, not shipped
    opt = prov["optimiser"]
    assert opt["generator"] == "qcompile.tools.codebook_optimizer" and opt["values"] != want
    assert 0 < max(abs(a - b) for a, b in zip(opt["values"], want)) < 1e-3


@pytest.mark.parametrize("name", ["nf4", "af4"])
def test_nf4_af4_shipped_as_published(name):
    entry = SHIPPED[name]
    assert entry["provenance"]["kind"] == "published"
    assert entry["provenance"]["published_values"] == list(O.published_decimals(name))
    assert entry["values"] == list(O.published_f32(name)) and entry["source"] == REFERENCE[name]["source"]


def test_which_tables_are_published_and_which_optimised():
    """Published exactly where a publication gives the table; every other shipped table is the
    optimiser's, says so, and has no published table at all."""
    published = set(codebooks.names("published"))
    assert published == set(O.PUBLISHED_DECIMALS)
    optimised = set(codebooks.names("optimised"))
    assert optimised == {"bof4_mse_b32", "bof4_mse_b128", "bof4s_mae_b32", "bof4s_mae_b128",
                         "bof3s_mse_b64"}
    assert published | optimised == set(codebooks.names()) and not published & optimised
    for name in optimised:
        prov = SHIPPED[name]["provenance"]
        assert prov["kind"] == "optimised" and prov["generator"] == "qcompile.tools.codebook_optimizer"
        assert "published_values" not in prov and "no published table" in SHIPPED[name]["source"]
        with pytest.raises(ValueError, match="not published"):
            codebooks.published_values(name)
    with pytest.raises(ValueError, match="provenance"):
        codebooks.names("made up")
    with pytest.raises(ValueError, match="no shipped codebook"):
        codebooks.provenance("bof4_mse_b48")


@pytest.mark.parametrize("text, want", [
    ("1.000000059604644775390625", 1.0),  # 1 + 2^-24: exactly between 1 and 1 + 2^-23, ties to even
    ("1.000000059604644775390626", 1.0000001192092896),  # a hair above the midpoint: up
    ("1.000000178813934326171875", 1.0000002384185791),  # 1 + 3 * 2^-24: tie, to even (up)
    ("-0.7535245418548584", -0.7535245418548584),  # printed float32s: 16 digits, within 5e-17
    ("-0.090308666229248", -0.09030866622924805),  # (the paper's trailing zero dropped)
])
def test_decimal_to_float32_rounds_the_printed_decimal_once(text, want):
    assert codebooks.decimal_to_float32(text) == want
    assert want == float(O.to_f32(Fraction(text)))


def test_every_published_decimal_converts_like_the_oracle():
    for name, entry in O.PUBLISHED_DECIMALS.items():
        for d in entry["values"]:
            assert codebooks.decimal_to_float32(d) == float(O.to_f32(Fraction(d))), (name, d)


@pytest.mark.parametrize("name, block, table", [
    ("bof4", 64, "bof4_mse_b64"), ("bof4s", 64, "bof4s_mse_b64"),
    ("bof4_mae", 64, "bof4_mae_b64"), ("bof4s_mae", 64, "bof4s_mae_b64"),
    ("bof4s_opq", 64, "bof4s_mse_b64"), ("bof4s", 32, "bof4s_mse_b32"),
    ("bof4s", 128, "bof4s_mse_b128"), ("bof4s", 256, "bof4s_mse_b256"),
])
def test_formats_use_the_published_table_for_their_block_size(name, block, table):
    fmt = formats.get(name, block_size=block) if block != 64 else formats.get(name)
    assert fmt.element.table == table
    assert list(fmt.element.values) == list(O.published_f32(table))
    assert codebooks.provenance(table) == "published"
    assert fmt.scale.signed == ("bof4s" in name)
    if block != 64:  # a different table from the block-64 one
        assert fmt.element.values != formats.get(name).element.values


@pytest.mark.parametrize("name, block, table", [
    ("bof4", 32, "bof4_mse_b32"), ("bof4", 128, "bof4_mse_b128"),
    ("bof4s_mae", 32, "bof4s_mae_b32"), ("bof4s_mae", 128, "bof4s_mae_b128"),
])
def test_formats_use_the_optimised_table_where_none_is_published(name, block, table):
    fmt = formats.get(name, block_size=block)
    assert fmt.element.table == table and codebooks.provenance(table) == "optimised"
    assert list(fmt.element.values) == f32(SHIPPED[table]["values"])


def test_block_size_without_a_table_falls_back_to_64_with_a_warning():
    with pytest.warns(UserWarning, match="block size 100"):
        fmt = formats.get("bof4s", block_size=100)
    assert fmt.element.values == formats.get("bof4s").element.values
    assert fmt.block_size == 100


def test_dynexp_tables_are_the_dynamic_exponent_map():
    """Reference README: the signed 4-bit map with 3 exponent levels is 0,
    +-{0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875}, 1.0."""
    d4 = list(formats.get("dynexp4").element.values)
    assert d4 == f32(O.dynexp_values(4))
    readme = [Fraction(d) for d in O.DYNEXP4_DECIMALS[1:-1]]
    want = sorted([Fraction(0), Fraction(1)] + readme + [-v for v in readme])
    assert d4 == [float(O.to_f32(v)) for v in want]
    d8 = list(formats.get("dynexp8").element.values)
    assert d8 == f32(O.dynexp_values(8))
    # 7 levels: 1 + 2 + ... + 64 = 127 magnitudes, each signed, plus 0 and 1 (no -1)
    assert len(d8) == 256 and len(set(d8)) == 256 and d8 == sorted(d8)
    assert d8[-1] == 1.0 and d8[0] == float(F32(-(0.1 + 0.9 * 127 / 128)))  # -0.99296875
    assert min(v for v in d8 if v > 0) == float(F32(0.55e-6))  # 0.55 * 10^-6
    for bits in (3, 5, 6, 7):
        assert list(formats.get(f"dynexp{bits}").element.values) == f32(O.dynexp_values(bits))


# ---------------------------------------------------------------------------- nf4 exactly


def _n(x, s):
    return F32(x) * (F32(1.0) / F32(s))


def _hit(target, s):
    """A float32 x with fp32(x * fp32(1/s)) == target (searching x near target * s), or None."""
    x0 = F32(target) * F32(s)
    for steps in sorted(range(-12, 13), key=abs):
        x = O.f32_ulp_steps(x0, steps)
        if _n(x, s) == F32(target):
            return x
    return None


@pytest.mark.parametrize("s", [1.0, 2.0**-20, 4096.0, 0.7, 3.0])
def test_nf4_values_at_each_threshold_and_one_ulp_either_side(s):
    """bitsandbytes: n = fp32(x * fp32(1/absmax)); code = how many published thresholds lie
    strictly below n, so n exactly on threshold i gives code i (the lower), one float32 ulp above
    gives i + 1, one below gives i; value = fp32(table[code] * absmax). Expected values here come
    straight from the published JSON."""
    thresholds = f32(REFERENCE["nf4"]["thresholds"])
    table = f32(REFERENCE["nf4"]["values"])
    xs, want_codes = [s], [15]
    for i, t in enumerate(thresholds):
        for steps, code in [(0, i), (1, i + 1), (-1, i)]:
            x = _hit(O.f32_ulp_steps(F32(t), steps), s)
            if x is not None:
                xs.append(float(x))
                want_codes.append(code)
    if s in (1.0, 2.0**-20, 4096.0):  # fp32(1/s) is a power of two: every target is hit
        assert len(xs) == 1 + 3 * 15
    else:
        assert len(xs) >= 1 + 15
    x = np.array(xs, dtype=np.float32)
    q = quantize(x, "nf4")
    assert codes_of(q, 4, len(xs))[0] == want_codes
    assert q.scales.tolist() == [float(F32(s))]
    out = qcompile.dequantize(q).tolist()
    assert out == [float(F32(table[c]) * F32(s)) for c in want_codes]
    O.assert_matches(torch.tensor(out), O.fake_quantize(x, "nf4"), x, "nf4")


def test_nf4_normalises_with_the_rounded_reciprocal_not_a_division():
    """absmax 3: fp32(1/3) = 0x3EAAAAAB = 0.3333333432674408 is above 1/3. x = 0.11937045 gives
    x / 3 = 0.03979014977812767 exactly on threshold 7 (code 7, value 0), but
    fp32(x * fp32(1/3)) = 0.03979015350341797 is one ulp above it: code 8, value
    fp32(fp32(0.07958029955625534) * 3) = 0.23874089121818542."""
    x = np.array([3.0, 0.11937045305967331], dtype=np.float32)
    assert F32(x[1]) / F32(3.0) == F32(REFERENCE["nf4"]["thresholds"][7])  # the division's code 7
    q = quantize(x, "nf4")
    assert codes_of(q, 4, 2)[0] == [15, 8]
    assert qcompile.dequantize(q).tolist() == [3.0, 0.23874089121818542]


# ---------------------------------------------------------------------------- all codebooks


@pytest.mark.parametrize("name", CODEBOOKS)
@settings(max_examples=20)
@given(data=st.data())
def test_codebook_is_the_threshold_count_of_the_normalised_value(name, data):
    """n = fp32(x * fp32(1/s)), code = number of float32-midpoint thresholds strictly below n
    (nf4: the published ones), value fp32(table[code] * s); s the block absmax (signed for
    BOF4-S: the element of largest magnitude with its sign, positive on a tie), stored as is."""
    sp = O.spec(name)
    x = data.draw(tiled(O.absmax_block(sp.element, 16, sp.signed), sp.block))
    q = quantize(x, name)
    O.assert_matches(qcompile.dequantize(q), O.fake_quantize(x, name), x, name)
    assert q.scales.dtype == torch.float32
    scale = O.signed_absmax if sp.signed else (lambda b: np.abs(b).max())
    want = [[float(scale(r[b:b + sp.block])) for b in range(0, x.shape[-1], sp.block)]
            for r in x.reshape(-1, x.shape[-1])]
    assert q.scales.tolist() == want


@pytest.mark.parametrize("name, block", [("nf4", 128), ("nf4", None), ("af4", 16),
                                         ("dynexp4", 32), ("bof4s", 128), ("bof4", 32)])
@settings(max_examples=10)
@given(data=st.data())
def test_codebooks_at_other_block_sizes(name, block, data):
    sp = O.spec(name)
    fmt = formats.get(name, block_size=block)
    table = fmt.element.table
    cb = sp.element
    if table != PRESET_TABLE.get(name, table):  # a BOF4 table made for this block size
        cb = O.Codebook(table, SHIPPED[table]["values"])
    x = data.draw(tiled(O.absmax_block(cb, 16, sp.signed), block or 96, max_rows=1,
                        max_blocks=2 if block else 1))
    q = quantize(x, fmt)
    O.assert_matches(qcompile.dequantize(q), expected_with(x, cb, block, sp.signed), x,
                     f"{name}[{block}]")
    assert q.scales.shape[-1] == (x.shape[-1] // block if block else 1)


BOF4S_REGRESSIONS = [
    # (x, codes, scale); value = fp32(table[code] * scale) with the shipped bof4s_mse_b64 table
    # (BOF4 paper Table 6; levels -0.857 -0.669 -0.524 -0.400 -0.291 -0.190 -0.094 0 0.089 0.179
    # 0.274 0.376 0.489 0.619 0.779 1). The largest magnitude is -2, so s = -2 and qmul = -0.5:
    # -2 -> n = 1 (code 15, value -2); 0.5 -> -0.25, nearest -0.291 (code 4); 1 -> -0.5, nearest
    # -0.524 (code 2);
    # -0.0 -> n = -0.0 * -0.5 = +0 -> code 7 (7 thresholds below 0), value 0 * -2 = -0.
    ([-2.0, 0.5, 1.0, -0.0], [15, 4, 2, 7], -2.0),
    # magnitude tie 2 / -2: the positive one is the scale; -2 -> n = -1, below every level ->
    # code 0 (-0.857); 1 -> 0.5 nearest 0.489 (code 12); -0.2 -> -0.1 nearest -0.094 (code 6)
    ([2.0, -2.0, 1.0, -0.2], [15, 0, 12, 6], 2.0),
]


@pytest.mark.parametrize("x, codes, scale", BOF4S_REGRESSIONS)
def test_bof4s_signed_absmax_regressions(x, codes, scale):
    x = np.array(x, dtype=np.float32)
    q = quantize(x, "bof4s")
    assert q.scales.tolist() == [scale]
    assert codes_of(q, 4, len(x))[0] == codes
    table = SHIPPED["bof4s_mse_b64"]["values"]
    out = qcompile.dequantize(q)
    assert out.tolist() == [float(F32(table[c]) * F32(scale)) for c in codes]
    assert out[0].item() == x[0]  # the scale element maps to +1 and back to itself
    O.assert_matches(out, O.fake_quantize(x, "bof4s"), x, "bof4s")


def by_hand(x, table, signed):
    """One block coded from a published table's printed decimals alone: s = the block absmax as
    float32 (signed: the element of largest magnitude with its sign, the positive one on a tie),
    n = fp32(x * fp32(1/s)) (numpy float32), code = the level nearest to n in exact rational
    arithmetic on the decimals, value = fp32(fp32(level) * s). Also returns how far n is from
    the nearest midpoint of the decimals (a row near a midpoint could round either way)."""
    levels = [Fraction(d) for d in table]
    x = np.asarray(x, dtype=F32)
    s = O.signed_absmax(x) if signed else np.abs(x).max()
    qmul = F32(1.0) / F32(s)
    codes, values, margin = [], [], math.inf
    for v in x:
        n = O.frac(F32(v) * qmul)
        code = min(range(len(levels)), key=lambda i: (abs(n - levels[i]), i))
        codes.append(code)
        values.append(float(F32(O.to_f32(levels[code])) * F32(s)))
        margin = min([margin] + [abs(float(n - (a + b) / 2)) for a, b in zip(levels, levels[1:])])
    return codes, values, float(s), margin


BOF4_PUBLISHED_REGRESSIONS = [
    # (format, table, x, codes, scale). Each row has normalised values that sit between the
    # midpoint of the published levels and the midpoint of the old Lloyd-optimised levels
    # (qcompile's table before it shipped the paper's), so the old table gives other codes.
    # bof4: s = 2, n = x / 2. n = 0.32505 is above the published 10/11 midpoint 0.324986
    # (code 11, 0.3372), under the old 0.325099; n = 0.4322 above 0.432157 (code 12, 0.4414);
    # n = -0.50893 below -0.508902 (code 2, -0.5792).
    ("bof4", "bof4_mse_b64", [2.0, 0.6501, 0.8644, -1.01786, 0.0], [15, 11, 12, 2, 7], 2.0),
    # bof4, s = 3: fp32(1/3) is above 1/3 and fp32(level * 3) rounds; same cells as above.
    ("bof4", "bof4_mse_b64", [3.0, 0.97515, -1.52679, -3.0], [15, 11, 2, 0], 3.0),
    # bof4s, s = 4: n = 0.32512 below the published 10/11 midpoint 0.325165 (code 10, 0.2743);
    # n = -0.59635 above -0.596407 (code 2, -0.5235); n = 0.55372 below 0.553757 (code 12, 0.4887)
    ("bof4s", "bof4s_mse_b64", [4.0, 1.30048, -2.3854, 2.21488, -0.3], [15, 10, 2, 12, 6], 4.0),
    # bof4s, s = -2 (the maximum is negative), n = -x / 2: n = -0.763 is above the published 0/1
    # midpoint -0.763067 (code 1, -0.6693); the old table put it in code 0.
    ("bof4s", "bof4s_mse_b64", [-2.0, 1.526, 1.0, -0.0], [15, 1, 2, 7], -2.0),
    # bof4_mae, s = 1: n = -0.4611 below the 2/3 midpoint -0.460972 (code 2); -0.6151 below the
    # 1/2 midpoint -0.614950 (code 1)
    ("bof4_mae", "bof4_mae_b64", [1.0, -0.4611, -0.6151, 0.2], [15, 2, 1, 9], 1.0),
    # bof4s_mae, s = -1: n = -x. n = -0.7048 below the 0/1 midpoint -0.704742 (code 0);
    # n = -0.4124 below the 2/3 midpoint -0.412394 (code 2)
    ("bof4s_mae", "bof4s_mae_b64", [-1.0, 0.7048, 0.4124, -0.3], [15, 0, 2, 11], -1.0),
    # bof4s at block 32 (paper Table 7), s = 2: n = 0.5722 above the 12/13 midpoint 0.572129
    # (code 13); n = 0.4486 above the 11/12 midpoint 0.448498 (code 12)
    ("bof4s[block_size=32]", "bof4s_mse_b32", [2.0, 1.1444, 0.8972, -0.5], [15, 13, 12, 5], 2.0),
]


@pytest.mark.parametrize("fmt, table, x, codes, scale", BOF4_PUBLISHED_REGRESSIONS)
def test_bof4_codes_and_values_follow_the_published_table(fmt, table, x, codes, scale):
    """Codes and dequantised values equal those worked out by hand (exact arithmetic) from the
    paper's printed decimals, in rows where the old optimised table gives other codes."""
    signed = "bof4s" in fmt
    decimals = O.published_decimals(table)
    want_codes, want_values, want_scale, margin = by_hand(x, decimals, signed)
    assert (want_codes, want_scale) == (codes, scale)  # the hand-written codes are the oracle's
    assert margin > 1e-6  # no row is near a midpoint: nearest-level is unambiguous
    q = quantize(x, fmt)
    assert q.scales.tolist() == [scale]
    assert codes_of(q, 4, len(x))[0] == codes
    assert qcompile.dequantize(q).tolist() == want_values
    old = SHIPPED[table]["provenance"]["optimiser"]["values"]
    assert by_hand(x, [repr(v) for v in old], signed)[0] != codes  # the regression this guards


def test_nf4_regressions():
    """absmax 2: qmul = 0.5. 1 -> n = 0.5, below the 12/13 threshold 0.50166 -> code 12
    (0.4407, although 0.5 is closer to neither by much); 0.25 -> 0.125 above threshold 8 (0.12026)
    -> code 9 (0.1609); -2 -> -1 (code 0); 0.0795 -> 0.03975 below threshold 7 (0.03979) ->
    code 7 (0). Values fp32(table[code] * 2) are exact doubles of the published table."""
    x = np.array([2.0, 1.0, 0.25, -2.0, 0.0795], dtype=np.float32)
    q = quantize(x, "nf4")
    assert codes_of(q, 4, 5)[0] == [15, 12, 9, 0, 7]
    t = f32(REFERENCE["nf4"]["values"])
    assert qcompile.dequantize(q).tolist() == [2.0, 2 * t[12], 2 * t[9], -2.0, 0.0]


# ---------------------------------------------------------------------------- quantile4


@st.composite
def quantile_tensor(draw):
    rows = draw(st.integers(1, 2))
    cols = draw(st.integers(1, 160))  # a short last block: only real elements make the table
    elems = st.one_of(O.f32_floats(min_value=-100.0, max_value=100.0),
                      st.sampled_from([0.0, 1.0, -1.0, 0.5, -0.25, 3.0]))
    return np.array([[draw(elems) for _ in range(cols)] for _ in range(rows)], dtype=np.float32)


def _normalised(x):
    """fp32(x * fp32(1/absmax)) of every real element, block by block (block 64)."""
    out = []
    for r in x.reshape(-1, x.shape[-1]):
        for b in range(0, r.size, 64):
            blk = r[b:b + 64]
            s = np.abs(blk).max()
            qmul = O.f32_div(1.0, s) if s != 0 else F32(0)
            out += [O.f32_mul(v, qmul) for v in blk]
    return out


@settings(max_examples=25)
@given(x=quantile_tensor())
def test_quantile4_table_is_the_tensors_own_quantiles(x):
    """level i = Q(i/15) (linear interpolation of the sorted block-normalised values), divided by
    the largest |level|; stored in the QTensor as 16 float32, and the elements encode against it
    by float32-midpoint thresholds."""
    q = quantize(x, "quantile4")
    table = q.side["codebook"]
    assert table.dtype == torch.float32 and table.shape == (16,)
    want = O.quantile_table(_normalised(x))
    assert table.tolist() == [float(v) for v in want]
    if np.abs(x).max() > 0:
        assert table.abs().max().item() == 1.0
    out = qcompile.dequantize(q)
    O.assert_matches(out, O.fake_quantize(x, "quantile4"), x, "quantile4")
    O.assert_matches(out, O.fake_quantize(x, "quantile4", codebook_table=want), x, "quantile4")


def test_quantile4_level_is_rounded_once():
    """Shrunk from test_quantile4_table_is_the_tensors_own_quantiles (it failed while the table
    was interpolated in float64 and rounded twice). One block, absmax 95.11358: sorted normalised
    values v = -1, 0 (x23), a = fp32(0.33333334 * fp32(1/95.11358)), b = fp32(1 * fp32(1/
    95.11358)) (x7). Level 12 sits at position 12 * 31 / 15 = 24.8 = v[24] + 4/5 (v[25] - v[24])
    = a + 4/5 (b - a), the peak |level| is 1, and the exact value rounds once to float32
    0.009111912921071053 (float64 interpolation gave the next float32 up)."""
    x = np.array([0.0] * 23 + [1.0] * 6 + [0.33333334, -95.11358, 1.0], dtype=np.float32)
    qmul = F32(1.0) / F32(95.11358)
    a, b = O.frac(F32(0.33333334) * qmul), O.frac(F32(1.0) * qmul)
    level = float(O.to_f32(a + Fraction(4, 5) * (b - a)))
    assert level == 0.009111912921071053
    table = quantize(x, "quantile4").side["codebook"].tolist()
    assert table[12] == level
    assert table == [float(v) for v in O.quantile_table(_normalised(x))]


def test_quantile4_table_travels_with_the_qtensor():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 128)).astype(np.float32)
    y = rng.standard_t(2, (2, 128)).astype(np.float32)  # a different tensor, another table
    qx, qy = quantize(x, "quantile4"), quantize(y, "quantile4")
    assert not torch.equal(qx.side["codebook"], qy.side["codebook"])
    out = qcompile.dequantize(qx)  # after another tensor was quantised: still x's own table
    O.assert_matches(out, O.fake_quantize(x, "quantile4"), x, "quantile4")
    assert torch.equal(qcompile.dequantize(qx.to("cpu")), out)
    # dequantize reads the table from the QTensor: halving it halves every output exactly
    halved = QTensor(qx.fmt, qx.codes, qx.scales, qx.shape, qx.dtype, qx.axis, qx.block,
                     {**qx.side, "codebook": qx.side["codebook"] * 0.5})
    assert torch.equal(qcompile.dequantize(halved), out * 0.5)
    assert "codebook" in qx.tensors()


# ---------------------------------------------------------------------------- OPQ (bof4s_opq)


def _spiky_block(draw, size=64):
    if size == 0:
        return np.zeros(0)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    sigma = 2.0 ** draw(st.integers(-12, 12))
    xs = rng.standard_normal(size) * sigma
    for _ in range(draw(st.integers(0, 4))):
        xs[draw(st.integers(0, size - 1))] = sigma * draw(st.sampled_from(
            [-25.0, -8.0, -4.0, 3.4, 4.0, 6.0, 12.0, 40.0]))
    return xs


@st.composite
def opq_tensor(draw):
    rows = draw(st.integers(1, 2))
    nblocks = draw(st.integers(1, 2))
    tail = draw(st.sampled_from([0, 0, 10]))  # sometimes a short last block
    return np.array([np.concatenate([_spiky_block(draw) for _ in range(nblocks)]
                                    + [_spiky_block(draw, tail)]) for _ in range(rows)],
                    dtype=np.float32)


def _opq_expected_index(x):
    """Flat outlier positions in the padded [rows, n_blocks * 64] layout, from the oracle."""
    k = x.shape[-1]
    padded = -(-k // 64) * 64
    out = []
    for r, row in enumerate(x.reshape(-1, k)):
        for b in range(0, k, 64):
            out += [r * padded + b + i for i in sorted(O.opq_outliers(row[b:b + 64], 0.95))]
    return out


@settings(max_examples=25)
@given(x=opq_tensor())
def test_opq_outliers_scale_and_values(x):
    """Outliers: |w| > sigma_b * F_M^-1(0.95) (corrected std of the block's real elements, F_M
    the law of the max of I |normals|); kept as bfloat16 with their flat index, zeroed before
    the signed block absmax is taken; the others are bof4s of the remaining block."""
    q = quantize(x, "bof4s_opq")
    idx = _opq_expected_index(x)
    assert q.side["outlier_index"].tolist() == idx
    flat = np.pad(x, ((0, 0), (0, -x.shape[-1] % 64))).reshape(-1)
    assert q.side["outlier_value"].dtype == torch.bfloat16
    assert q.side["outlier_value"].float().tolist() == [
        float(O.to_bf16_value(O.frac(flat[i]))) for i in idx]
    # block scale: signed absmax of the block with its outliers set to zero
    kept = flat.copy()
    kept[idx] = 0
    kept = kept.reshape(x.shape[0], -1, 64)
    assert q.scales.tolist() == [[float(O.signed_absmax(b)) for b in row] for row in kept]
    O.assert_matches(qcompile.dequantize(q), O.fake_quantize(x, "bof4s_opq"), x, "bof4s_opq")
    # every outlier costs a bfloat16 value and an int32 index: 48 bits more than plain bof4s
    plain = quantize(x, "bof4s")
    extra = q.bits_per_element - plain.bits_per_element
    assert extra == pytest.approx(48 * len(idx) / x.size, rel=1e-12, abs=1e-12)


def test_opq_spike_count_regressions():
    """k equal spikes a in a block of 64 zeros: mean k a / 64, corrected variance
    a^2 k (64 - k) / (64 * 63); F_M^-1(0.95) for I = 64 is 3.3524 (1/3.3524^2 = 0.08898).
    The spikes are outliers iff k (64 - k) / 4032 < 0.08898: k = 6 (0.0863) yes, k = 7 (0.0990)
    no. Outliers come back as bfloat16 (1.2345678 -> 1.234375 = 1 + 30/128) and the block
    scale, taken without them, is 0; without outliers the block is plain bof4s (1.2345678 maps
    to +1 and back to itself)."""
    a = 1.2345678
    six = np.zeros(64, dtype=np.float32)
    six[[1, 9, 20, 33, 47, 63]] = a
    q = quantize(six, "bof4s_opq")
    assert q.side["outlier_index"].tolist() == [1, 9, 20, 33, 47, 63]
    assert q.scales.tolist() == [0.0]
    out = qcompile.dequantize(q).numpy()
    assert out[[1, 9, 20, 33, 47, 63]].tolist() == [1.234375] * 6
    assert not out[[0, 2, 10, 62]].any()
    seven = six.copy()
    seven[5] = a
    q = quantize(seven, "bof4s_opq")
    assert q.side["outlier_index"].tolist() == []
    assert q.scales.tolist() == [float(F32(a))]
    assert torch.equal(qcompile.dequantize(q), torch.from_numpy(seven))


def test_opq_outlier_does_not_set_the_block_scale():
    """63 elements in [-0.5, 0.5] with max +0.5, one -30: -30 is the outlier (sigma about 3.8,
    limit 12.8), so the stored scale is 0.5 not -30, and -30 returns exactly (bf16 holds it)."""
    x = np.linspace(-0.5, 0.5, 64).astype(np.float32)
    x[10] = -30.0
    q = quantize(x, "bof4s_opq")
    assert q.side["outlier_index"].tolist() == [10]
    assert q.scales.tolist() == [0.5]
    out = qcompile.dequantize(q)
    assert out[10].item() == -30.0 and out[63].item() == 0.5
    plain = quantize(x, "bof4s")
    assert plain.scales.tolist() == [-30.0]
    err_opq = (out - torch.from_numpy(x)).abs().sum()
    err_plain = (qcompile.dequantize(plain) - torch.from_numpy(x)).abs().sum()
    assert err_opq < err_plain
    assert q.bits_per_element > plain.bits_per_element
