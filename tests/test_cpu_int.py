"""The CPU integer path (codegen/cpu/int_kernels.cpp): int weights times int activations.

Oracles: the reference quantiser (the definition of each format) for the C++ activation codes and
block multipliers, bit for bit, on inputs drawn where the scale rules and the rounding decide
(tests/oracles.py) and on special values; and the integer formula computed independently from
the reference QTensors (tests/int_formula.py) for the products, bit for bit, on every instruction
set this machine has (forced with QCOMPILE_CPU_ISA).
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oracles
import qcompile
from int_formula import int_formula, int_operands
from qcompile import LayerSpec, Policy, formats
from qcompile.codegen import cpu, select
from qcompile.formats import Format
from qcompile.formats.elements import IntElement
from qcompile.formats.scales import AbsmaxScale

ISAS = [i for i in cpu.ISAS if cpu.ISAS.index(i) >= cpu.ISAS.index(cpu.machine_isa())]
SETTINGS = settings(max_examples=8, suppress_health_check=[HealthCheck.too_slow,
                                                       HealthCheck.function_scoped_fixture])
SPECIALS = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-40, -3e-39, 3e38, 1e-30]
SIGNED_INT8 = Format("int8 signed absmax", IntElement(8), AbsmaxScale(signed=True), 32, "test")
ACTS = ["mxint8", "int8", "bfp8", "bfp4", "mxint8[scale_rule=ceil]",
        "mxint8[scale_rule=rceil]", "mxint8[scale_rule=even]", "bfp8[scale_rule=even]",
        "int4[block_size=16]", SIGNED_INT8]
# weight, activation: the pairs of the Triton integer path's tests, other widths, K-block mixes
PAIRS = [("mxint8", "mxint8"), ("int8", "mxint8"), ("bfp8", "bfp8"), ("int4", "mxint8"),
         ("mxint8[block_size=64]", "mxint8"), ("int4", "int8"), ("int8", "int8"),
         ("bfp4", "bfp8"), ("int3[block_size=32]", "mxint8"), ("int5[block_size=16]", "bfp8"),
         ("mxint8", "mxint8[scale_rule=even]")]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CPU_ISA", request.param)
    return request.param


def act_format(act):
    return act if isinstance(act, Format) else formats.get(act)


def same_bits(a, b):
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@st.composite
def activations(draw, af):
    """Rows [M, K] drawn at the scale rules' and the rounding's decision points, with K cut so
    the last block is partial, and special values sprinkled in."""
    el, block = af.element, af.block_size
    grid = oracles.IntGrid(el.qmax, el.frac_bits, el.emax)
    if af.scale.kind == "pow2":
        x = draw(oracles.pow2_tensor(grid, af.scale.rule, block, max_rows=3, max_blocks=3))
    else:
        x = draw(oracles.absmax_tensor(grid, block, af.scale.signed, max_rows=3, max_blocks=3))
    x = torch.from_numpy(x)
    x = x[:, :draw(st.integers(1, x.shape[1]))].contiguous()  # a partial (or clamped) block
    for v in draw(st.lists(st.sampled_from(SPECIALS), max_size=3)):
        x[draw(st.integers(0, x.shape[0] - 1)), draw(st.integers(0, x.shape[1] - 1))] = v
    return x


# every activation format on this machine's instruction set; on the others, one of each element
# width and scale kind by default, the scale rules' variants under slow
def _act_case(act, isa):
    rule_variant = isinstance(act, str) and "scale_rule" in act
    return pytest.param(act, isa, marks=pytest.mark.slow if rule_variant and isa != ISAS[0] else ())


ACT_CASES = [_act_case(act, isa) for isa in ISAS for act in ACTS]


@pytest.mark.parametrize("act, isa", ACT_CASES, ids=str, indirect=["isa"])
@SETTINGS
@given(data=st.data())
def test_activation_codes_are_the_references(act, isa, data):
    af = act_format(act)
    x = data.draw(activations(af))
    xq, ax, xsum = cpu.quantize_act(cpu.library(), x, af)
    codes, a = int_operands(qcompile.quantize(x, af, axis=-1))
    assert torch.equal(xq.long(), codes)
    assert torch.equal(ax.isnan(), a.isnan()) and same_bits(ax[~ax.isnan()], a[~a.isnan()])
    tile = xq.shape[1] // ax.shape[1]
    assert torch.equal(xsum.long(), codes.reshape(*ax.shape, tile).sum(-1))


def test_activation_edge_blocks(isa):
    """All-zero, NaN, Inf, subnormal and huge blocks; a block longer than the row."""
    x = torch.tensor([[0.0] * 32 + [-0.0] * 32 + [1e-40, -3e-39] * 16 + [3e38, -1.0] * 16,
                      [float("nan")] + [1.0] * 31 + [float("inf")] + [2.0] * 31
                      + [5e-45] * 32 + [1e-30] * 32])
    for act in ACTS + ["mxint8[block_size=256]", "int8[block_size=512]"]:
        af = act_format(act)
        xq, ax, _ = cpu.quantize_act(cpu.library(), x, af)
        codes, a = int_operands(qcompile.quantize(x, af, axis=-1))
        assert torch.equal(xq.long(), codes), act
        assert torch.equal(ax.isnan(), a.isnan()) and same_bits(ax[~ax.isnan()], a[~a.isnan()])


@st.composite
def problems(draw):
    m = draw(st.sampled_from([1, 2, 3, 7, 16, 17, 40]))
    n, k = draw(st.integers(1, 40)), draw(st.integers(1, 200))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(m, k, generator=g) * draw(st.sampled_from([1.0, 1e-3, 50.0]))
    w = torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) < 0.03] *= 40
    if draw(st.booleans()):
        w[0] = 0.0
    b = torch.randn(n, generator=g) if draw(st.booleans()) else None
    axis = draw(st.sampled_from([1, 0]))
    return x, (w if axis == 1 else w.T.contiguous()), axis, b


@pytest.mark.parametrize("wfmt, act", PAIRS)
@SETTINGS
@given(p=problems())
def test_integer_linear_is_the_formula_bit_for_bit(wfmt, act, isa, p):
    x, w, axis, b = p
    q = qcompile.quantize(w, wfmt, axis=axis)
    af = formats.get(act)
    if not select.cpu_int_applies(q, af):  # an activation block across two weight blocks
        assert q.block % af.block_for(x.shape[1])
        return
    y = cpu.linear(x, q, act, b)
    assert same_bits(y, int_formula(x, q, b, act))


def test_nan_blocks_give_nan_rows_and_columns(isa):
    g = torch.Generator().manual_seed(9)
    x, w = torch.randn(20, 96, generator=g), torch.randn(24, 96, generator=g)
    x[3, 40] = float("nan")  # one activation block of row 3 -> the whole row is NaN
    w[5, 70] = float("inf")  # one weight block of row 5 -> column 5 is NaN
    q = qcompile.quantize(w, "mxint8", axis=1)
    for m in (20, 4, 1):
        y = cpu.linear(x[:m], q, "mxint8")
        want = int_formula(x[:m], q, None, "mxint8")
        assert torch.equal(y.isnan(), want.isnan()) and y[:, 5].isnan().all()
        ok = ~want.isnan()
        assert same_bits(y[ok], want[ok])


def binade_spread_input(k: int, rows: int = 3) -> torch.Tensor:
    """Activations whose 32-element blocks span many binades: float32 accumulation of the
    fake-quantised operands rounds differently from the integer formula here."""
    g = torch.Generator().manual_seed(0)
    scale = 2.0 ** torch.randint(-12, 12, (rows, k // 32), generator=g)
    return torch.randn(rows, k, generator=g) * scale.repeat_interleave(32, 1)


def test_the_python_entry_runs_the_integer_formula(isa):
    """cpu.linear takes the integer path (not the float path, which this input tells apart)."""
    x, w = binade_spread_input(1024), torch.randn(64, 1024)
    q = qcompile.quantize(w, "mxint8", axis=1)
    float_path = torch.nn.functional.linear(qcompile.fake_quantize(x, "mxint8", axis=-1),
                                            qcompile.dequantize(q))
    want = int_formula(x, q, None, "mxint8")
    assert not torch.equal(float_path, want)
    for m in (1, 3):
        assert same_bits(cpu.linear(x[:m], q, "mxint8"), want[:m])


def test_which_pairs_take_the_integer_path():
    w = torch.randn(8, 96)
    take = [("mxint8", "mxint8"), ("int4", "int8"), ("bfp8", "bfp8")]
    leave = [("mxint8", "mxfp8_e4m3"), ("nf4", "mxint8"), ("int4[opq=true]", "int8"),
             ("mxint8", "nvfp4")]
    for wfmt, act in take:
        assert select.cpu_int_applies(qcompile.quantize(w, wfmt, axis=1), formats.get(act))
    for wfmt, act in leave:
        assert not select.cpu_int_applies(qcompile.quantize(w, wfmt, axis=1), formats.get(act))
    # K = 48: the int8 weight block is clamped to 48, the 32-element activation blocks are not
    q = qcompile.quantize(torch.randn(8, 48), "int8", axis=1)
    assert not select.cpu_int_applies(q, formats.get("mxint8"))


def test_the_compiled_model_runs_the_integer_formula():
    """A compiled MLP whose layers are mxint8 x mxint8 runs the C++ operator, and each layer's
    output is the integer formula of its input, bit for bit. The input's blocks span many
    binades, so float32 accumulation of the fake-quantised operands rounds differently (checked:
    the test can tell the two paths apart)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 32))
    policy = Policy(default=LayerSpec(weight="mxint8", act="mxint8"))
    x = binade_spread_input(1024)
    with torch.no_grad():
        fast = torch.compile(model, backend="blockquant", options={"policy": policy})
        y = fast(x)
        q0 = qcompile.quantize(model[0].weight, "mxint8", axis=1)
        q2 = qcompile.quantize(model[2].weight, "mxint8", axis=1)
        h = int_formula(x, q0, model[0].bias, "mxint8")
        float_path = torch.nn.functional.linear(qcompile.fake_quantize(x, "mxint8", axis=-1),
                                                qcompile.dequantize(q0), model[0].bias)
        assert not torch.equal(float_path, h)
        want = int_formula(torch.relu(h), q2, model[2].bias, "mxint8")
    assert same_bits(y, want)


def test_the_operator_is_the_python_path_bit_for_bit(isa):
    """qcompile_cpu::int_linear (called by compiled graphs) = cpu.linear, for 3-d inputs, many
    rows (prefill), no bias, a block longer than the row, and rows of more than 64 blocks
    (one row of x then goes 16 weight rows at a time, not row by row)."""
    g = torch.Generator().manual_seed(3)
    for wfmt, act, k in [("mxint8", "mxint8", 200), ("int4", "int8", 96), ("bfp8", "bfp8", 10),
                         ("mxint8", "mxint8", 2200)]:
        w, b = torch.randn(37, k, generator=g), torch.randn(37, generator=g)
        q = qcompile.quantize(w, wfmt, axis=1)
        p = cpu.plan(q)
        fmt_id, act_id = p.register(), p.register_act(formats.get(act))
        for x in (torch.randn(2, 9, k, generator=g), torch.randn(1, k, generator=g)):
            for bias in (b, None):
                y = torch.ops.qcompile_cpu.int_linear(x, q.codes, q.scales, bias, fmt_id, act_id,
                                                      37, k, q.block)
                assert same_bits(y, cpu.linear(x, q, act, bias))
                assert same_bits(y.reshape(-1, 37), int_formula(x.reshape(-1, k), q, bias, act))


# 4-bit weights read packed (AVX2 / AVX-512 without VNNI: 64 codes per 32-byte load, a block of
# 32 alone, x in even/odd order, 8 x the code sum taken out): blocks of 32, 64 and 128 codes (an
# odd and an even count of 32-blocks), K ending inside a block and inside a byte, rows past a
# multiple of 8 and 16, several rows of x; blocks of 16 and K below 32 take the unpacking path
NIBBLE_PAIRS = [("int4", "int8"), ("int4", "mxint8"),
                ("int4[block_size=128]", "int8[block_size=128]"), ("int4[block_size=128]", "mxint8"),
                ("int4[block_size=32]", "int4[block_size=16]")]


def extreme_int4_problem(m, n, k, g):
    """Weights at the codes' ends (-8 and 7 after scaling by the row's absmax: -8 and 7 of 7) and
    activations at the int8 ends, so the int16 sums inside the kernel are at their largest."""
    w = torch.where(torch.rand(n, k, generator=g) < 0.5, -8.0, 7.0)
    w[:, ::7] = torch.randn(n, len(range(0, k, 7)), generator=g) * 4
    x = torch.where(torch.rand(m, k, generator=g) < 0.5, -1.0, 1.0)
    x[:, ::5] *= torch.rand(m, len(range(0, k, 5)), generator=g)
    return x, w


@pytest.mark.parametrize("wfmt, act", NIBBLE_PAIRS)
def test_packed_int4_blocks_tails_and_rows(wfmt, act, isa):
    g = torch.Generator().manual_seed(11)
    for k in (31, 64, 97, 300):
        for m, n in ((1, 9), (3, 17), (5, 1)):
            x, w = extreme_int4_problem(m, n, k, g)
            q = qcompile.quantize(w, wfmt, axis=1)
            if not select.cpu_int_applies(q, formats.get(act)):
                continue
            b = torch.randn(n, generator=g)
            assert same_bits(cpu.linear(x, q, act, b), int_formula(x, q, b, act)), (k, m, n)
