"""The tensor-level side data of quantisation, OPQ outliers (BOF4 paper) and the quantile4 table
(Dettmers & Zettlemoyer), from both implementations against oracles that share no code with
qcompile (tests/oracles.py: exact rationals, math.erfc, sorted()).

The Triton quantise computes these two steps in torch with the reference's own functions
(reference._take_outliers, codebooks.quantile_codebook) before its kernel runs, so comparing it
with the reference cannot catch an error in them: here both face the definitions.
"""
from kernel_device import dev, host  # noqa: E402  (before anything imports triton)

import dataclasses  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import oracles as O  # noqa: E402
import qcompile  # noqa: E402
from qcompile import formats  # noqa: E402

IMPLS = ["reference", "triton"]
F32 = np.float32
FEW = settings(max_examples=12)  # the interpreter runs the Triton kernel: small, few examples


def quantize(x: torch.Tensor, fmt, impl: str, axis: int = -1):
    if impl == "triton":
        return host(qcompile.quantize(dev(x), fmt, axis=axis, impl="triton"))
    return qcompile.quantize(x, fmt, axis=axis)


def blocks_of(rows: np.ndarray, block: int):
    """(row, start, end) of every block of a [rows, K] array; the last block of a row may be
    short, a block longer than the row is the row."""
    k = rows.shape[-1]
    return [(r, b, min(b + block, k)) for r in range(rows.shape[0]) for b in range(0, k, block)]


@st.composite
def spiky_rows(draw, block):
    """Gaussian rows (a drawn power-of-two scale) with a few spikes of a few sigma, whole blocks
    and sometimes a short last block (1 element: no deviation; 10: its own F_M), sometimes a NaN."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rows = draw(st.integers(1, 3))
    k = block * draw(st.integers(1, 2)) + draw(st.sampled_from([0, 1, 10]))
    x = rng.standard_normal((rows, k)) * 2.0 ** draw(st.integers(-20, 20))
    for _ in range(draw(st.integers(0, 6))):
        x[rng.integers(rows), rng.integers(k)] *= draw(st.sampled_from([-30.0, -5.0, 4.0, 12.0]))
    if draw(st.booleans()):
        x[rng.integers(rows), rng.integers(k)] = np.nan
    return x.astype(F32)


# ---------------------------------------------------------------------------------------- OPQ


def opq_expected(rows: np.ndarray, block: int, q: float):
    """The OPQ outliers of [rows, K] from the oracle: flat positions in the padded
    [rows, n_blocks * block] layout (ascending), and how close any element comes to its
    block's limit (relative), so examples on the edge of float64 rounding can be left out."""
    block = min(block, rows.shape[-1])
    padded = -(-rows.shape[-1] // block) * block
    index, margin = [], math.inf
    for r, b, e in blocks_of(rows, block):
        xs = rows[r, b:e]
        if not np.isfinite(xs).all():  # a NaN/Inf block is NaN as a whole: nothing kept apart
            continue
        index += [r * padded + b + i for i in sorted(O.opq_outliers(list(xs), q))]
        sigma = float(np.std(xs.astype(np.float64), ddof=1)) if xs.size > 1 else 0.0
        if sigma > 0:
            limit = sigma * O.opq_limit(xs.size, q)
            margin = min([margin] + [abs(abs(float(v)) / limit - 1) for v in xs])
    return index, margin


def test_opq_limit_oracle_at_one_element():
    """For I = 1, F_M(m) = 2 G(m) - 1: the limit is the two-sided 95 % normal quantile, 1.96."""
    assert O.opq_limit(1, 0.95) == pytest.approx(1.959963984540054, rel=1e-14)
    assert O.opq_limit(1, 0.5) == pytest.approx(0.6744897501960817, rel=1e-14)  # the quartile


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["bof4s_opq", "int4[opq=0.9]", "nf4[block_size=32,opq=0.99]"])
@FEW
@given(data=st.data())
def test_opq_outliers_are_the_definitions(impl, name, data):
    """Outlier positions are the oracle's, their values x in bfloat16 (rounded to nearest even),
    and everything else is the plain format of x with exactly those outliers set to zero."""
    fmt = formats.get(name)
    x = data.draw(spiky_rows(fmt.block_size))
    index, margin = opq_expected(x, fmt.block_size, fmt.opq)
    assume(margin > 1e-9)
    q = quantize(torch.from_numpy(x), fmt, impl)
    assert q.side["outlier_index"].tolist() == index
    flat = np.pad(x, ((0, 0), (0, -x.shape[-1] % fmt.block_size))).reshape(-1)
    assert q.side["outlier_value"].dtype == torch.bfloat16
    assert q.side["outlier_value"].float().tolist() == [
        float(O.to_bf16_value(O.frac(flat[i]))) for i in index]
    flat[index] = 0.0
    kept = torch.from_numpy(flat.reshape(x.shape[0], -1)[:, :x.shape[-1]].copy())
    plain = qcompile.quantize(kept, dataclasses.replace(fmt, opq=None))
    assert torch.equal(q.codes, plain.codes)
    assert torch.equal(q.scales.view(torch.int32), plain.scales.view(torch.int32))


@pytest.mark.parametrize("impl", IMPLS)
def test_opq_outliers_in_full_and_short_blocks(impl):
    """Seeded rows where the definition finds outliers in whole blocks of 64 and in a row's
    short last block of 10 (its own I = 10), and none in a last block of one element."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 138)).astype(F32)
    x[0, [3, 70]] = [9.0, -7.5]  # whole blocks: limit about 3.35 sigma
    x[1, 130] = 12.0  # the short block 128..137: limit F_M^-1(0.95) for I = 10, about 2.8 sigma
    index, margin = opq_expected(x, 64, 0.95)
    assert {3, 70, 192 + 130} <= set(index) and margin > 1e-6
    q = quantize(torch.from_numpy(x), "bof4s_opq", impl)
    assert q.side["outlier_index"].tolist() == index
    # 129 elements: the last block is x[0, 128] alone, which has no deviation to exceed
    y = rng.standard_normal((1, 129)).astype(F32)
    y[0, 128] = 100.0
    q = quantize(torch.from_numpy(y), "bof4s_opq", impl)
    assert q.side["outlier_index"].tolist() == opq_expected(y, 64, 0.95)[0]
    assert 128 not in q.side["outlier_index"].tolist()


# ------------------------------------------------------------------------------- quantile table


def normalised_values(rows: np.ndarray, block: int):
    """The block-normalised real elements the table is made from: fp32(x * fp32(1 / s)), s the
    float32 block absmax (0 for an all-zero block: its elements normalise to 0), from every
    block without a NaN or Inf (padding is no element)."""
    out = []
    for r, b, e in blocks_of(rows, min(block, rows.shape[-1])):
        xs = rows[r, b:e]
        if np.isfinite(xs).all():
            s = np.abs(xs).max()
            qmul = O.f32_div(1.0, s) if s != 0 else F32(0)
            out += [O.f32_mul(v, qmul) for v in xs]
    return out


@st.composite
def quantile_input(draw):
    """Rows of normal values with exact repeats (ties in the sort), zero blocks, NaN blocks."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rows, k = draw(st.integers(1, 3)), draw(st.integers(1, 150))
    x = rng.standard_normal((rows, k)) * 2.0 ** draw(st.integers(-30, 30))
    x = np.where(rng.random((rows, k)) < 0.2, x.flat[0], x)  # repeats
    if draw(st.booleans()):
        x[rng.integers(rows), :min(k, 32)] = 0.0
    if draw(st.booleans()):
        x[rng.integers(rows), rng.integers(k)] = np.inf
    return x.astype(F32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["quantile4", "quantile4[block_size=32]"])
@FEW
@given(x=quantile_input(), axis=st.sampled_from([-1, 0]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_quantile_table_is_the_definition(impl, name, x, axis, dtype):
    """docs/formats.md: level i = Q(i / 15), Q the linearly interpolated empirical quantile of
    the block-normalised values, divided by the largest |level|, rounded once to float32;
    computed by oracles.quantile_table (sorted() and exact index arithmetic)."""
    fmt = formats.get(name)
    xt = torch.from_numpy(x).to(dtype)
    rows = np.moveaxis(xt.float().numpy(), axis, -1)  # blocks run along `axis`
    values = normalised_values(rows.reshape(-1, rows.shape[-1]), fmt.block_size)
    assume(values)  # some block without NaN/Inf
    q = quantize(xt, fmt, impl, axis)
    assert q.side["codebook"].dtype == torch.float32
    assert q.side["codebook"].tolist() == [float(v) for v in O.quantile_table(values)]


@pytest.mark.parametrize("impl", IMPLS)
def test_quantile_table_leaves_out_padding_and_bad_blocks(impl):
    """70 elements in blocks of 64: the short block's 58 padding zeros are no data, nor is a
    block holding an Inf. Here the real data has no zero, so a table built with either would
    differ from the oracle's (checked: the padded version gives another table)."""
    rng = np.random.default_rng(11)
    x = (rng.random((2, 70)) + 0.5).astype(F32) * np.where(rng.random((2, 70)) < 0.5, -1, 1)
    x = x.astype(F32)
    x[1, 3] = np.inf
    want = [float(v) for v in O.quantile_table(normalised_values(x, 64))]
    padded = normalised_values(np.pad(x, ((0, 0), (0, 58))), 64)
    assert [float(v) for v in O.quantile_table(padded)] != want
    with_bad = normalised_values(np.where(np.isinf(x), 1.0, x).astype(F32), 64)
    assert [float(v) for v in O.quantile_table(with_bad)] != want
    assert quantize(torch.from_numpy(x), "quantile4", impl).side["codebook"].tolist() == want
