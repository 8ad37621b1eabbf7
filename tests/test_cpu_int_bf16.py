"""bfloat16 / float16 models on the CPU integer path (``qcompile_cpu::int_linear``) and the CPU
embedding gather / dequantise (codegen/cpu/entry.py).

The integer path: x widened to float32 (exact), quantised as the reference quantises those
values, then the integer formula in float32, the output rounded to the model's dtype once (what
the Triton integer path does). Oracles: the formula computed independently from the reference
QTensors (tests/int_formula.py) on the widened operands, rounded to the dtype: bit for bit; and
the exact float64 product of the emulated integer operands (codes times block multipliers),
whose documented bound gamma(n_t + 5) S, rounded to the dtype at both ends, must hold the
output. The gather and dequantise: the reference's fake-quantised table in the model's dtype
(decoded in float32, cast once), bit for bit.
"""
import warnings

import pytest
import torch

import qcompile
from int_formula import int_formula, int_operands
from qcompile import config, formats
from qcompile.codegen import cpu, select
from qcompile.codegen.triton.linear import gamma

ISAS = [i for i in cpu.ISAS if cpu.ISAS.index(i) >= cpu.ISAS.index(cpu.machine_isa())]
DTYPES = [torch.bfloat16, torch.float16]
BITS_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
# W8A8 and W4A8: int8 / int4 weights (absmax scales) and mxint8 (E8M0), with int8 (absmax) or
# mxint8 activations
PAIRS = [("int8", "mxint8"), ("int4", "mxint8"), ("mxint8", "mxint8"), ("int8", "int8"),
         ("int4", "int8")]
PANELS_M = cpu.GEMV_MAX_M + 9  # more rows than the GEMV's: a prefill


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CPU_ISA", request.param)
    return request.param


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(config, "_said", set())


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and \
        torch.equal(a.view(BITS_VIEW[a.dtype]), b.view(BITS_VIEW[b.dtype]))


def problem(dtype, m, k=200, n=24, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) < 0.03] *= 40
    x = torch.randn(m, k, generator=g) * 3
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x.to(dtype), w.to(dtype), b


def formula_rounded(x, q, b, act):
    """The integer formula on the widened operands, rounded to x's dtype once."""
    return int_formula(x.float(), q, b.float() if b is not None else None, act).to(x.dtype)


def assert_within_the_exact_bound(y, x, q, b, act):
    """y between the dtype's roundings of exact -/+ gamma(n_t + 5) S, exact and S in float64
    from the integer codes and block multipliers of both operands."""
    af = formats.get(act)
    k = x.shape[-1]
    xi, ax = int_operands(qcompile.quantize(x.float(), af, axis=-1))
    wi, aw = int_operands(q)
    tile = af.block_for(k)
    xq = (xi.double() * ax.double().repeat_interleave(tile, 1))[:, :k]
    wq = (wi.double() * aw.double().repeat_interleave(q.block, 1))[:, :k]
    b64 = b.double() if b is not None else torch.zeros(wq.shape[0], dtype=torch.float64)
    exact = xq @ wq.T + b64
    slack = gamma(-(-k // tile) + 5) * (xq.abs() @ wq.abs().T + b64.abs())
    lo, hi = (exact - slack).to(y.dtype).double(), (exact + slack).to(y.dtype).double()
    assert ((lo <= y.double()) & (y.double() <= hi)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wfmt, act", PAIRS)
@pytest.mark.parametrize("m", [1, PANELS_M])
@pytest.mark.parametrize("bias", [False, True])
def test_the_integer_path_is_the_formula_rounded_once(dtype, wfmt, act, m, bias, isa):
    x, w, b = problem(dtype, m, bias=bias)
    q = qcompile.quantize(w, wfmt, axis=1)
    assert select.choose(q, act, x, "cpu", b) == \
        select.Choice("cpu_int", "gemv" if m <= cpu.GEMV_MAX_M else "panels")
    y = cpu.linear(x, q, act, b)
    assert same_bits(y, formula_rounded(x, q, b, act))
    assert_within_the_exact_bound(y, x, q, b, act)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_op_runs_the_integer_kernel_without_a_warning(dtype, isa):
    """torch.ops.qcompile.linear (impl "auto", as a compiled graph with autograd calls it): no
    fallback warning, the formula's result (which the reference's dtype-rounded operands do
    not give here: the test tells the two apart)."""
    x, w, b = problem(dtype, 3, k=256, seed=5)
    q = qcompile.quantize(w, "int8", axis=1)
    args = (q.codes, q.scales, [], qcompile.ops.qtensor_meta(q), "int8", b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = torch.ops.qcompile.linear(x, *args, "auto")
    assert same_bits(y, formula_rounded(x, q, b, "int8"))
    assert not torch.equal(y, torch.ops.qcompile.linear(x, *args, "reference"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_operator_takes_the_dtype_and_3d_inputs(dtype, isa):
    """qcompile_cpu::int_linear (what compiled graphs call) = cpu.linear = the formula, for 3-d
    inputs, many rows and one, with and without a bias; a bias of another dtype is refused."""
    x, w, b = problem(dtype, 18, k=96, n=37, seed=3)
    q = qcompile.quantize(w, "int4", axis=1)
    p = cpu.plan(q)
    ids = (p.register(), p.register_act(formats.get("mxint8")))
    for xs in (x.reshape(2, 9, 96), x[:1]):
        for bias in (b, None):
            y = torch.ops.qcompile_cpu.int_linear(xs, q.codes, q.scales, bias, *ids, 37, 96,
                                                  q.block)
            assert y.shape == (*xs.shape[:-1], 37)
            assert same_bits(y, cpu.linear(xs, q, "mxint8", bias))
            assert same_bits(y.reshape(-1, 37), formula_rounded(xs.reshape(-1, 96), q, bias,
                                                                "mxint8"))
    with pytest.raises(RuntimeError, match="the bias must be x's dtype"):
        torch.ops.qcompile_cpu.int_linear(x, q.codes, q.scales, b.float(), *ids, 37, 96, q.block)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        torch.ops.qcompile_cpu.int_linear(x.double(), q.codes, q.scales, None, *ids, 37, 96,
                                          q.block)


def test_nan_blocks_stay_nan_in_bf16(isa):
    x, w, _ = problem(torch.bfloat16, 20, k=96, bias=False, seed=9)
    x[3, 40] = float("nan")
    w[5, 70] = float("inf")
    q = qcompile.quantize(w, "mxint8", axis=1)
    for m in (20, 1, 4):
        y, want = cpu.linear(x[:m], q, "mxint8"), formula_rounded(x[:m], q, None, "mxint8")
        assert torch.equal(y.isnan(), want.isnan()) and y[:, 5].isnan().all()
        assert same_bits(y[~want.isnan()], want[~want.isnan()])


def test_the_cpu_operator_pass_takes_half_precision_integer_layers():
    for dtype in DTYPES:
        q = qcompile.quantize(torch.randn(16, 64).to(dtype), "mxint8", axis=1)
        assert select.cpu_operator(q, formats.get("mxint8"), "auto", True) == \
            select.Choice("cpu_int")


# -- the gather and dequantise ----------------------------------------------------------------

GATHER_FORMATS = ["nf4", "int4", "mxint8", "mxfp4", "nvfp4", "quantile4", "int8",
                  "nf4[block_size=24]"]


def table(dtype, vocab=40, hidden=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(vocab, hidden, generator=g)
    t[0, :5] *= 40
    return t.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", GATHER_FORMATS)
def test_the_gather_is_the_references_rows_bit_for_bit(dtype, fmt, isa):
    w = table(dtype)
    q = qcompile.quantize(w, fmt, axis=1)
    ids = torch.tensor([[3, 0, 0, 39], [7, 3, 21, 1]])
    want = qcompile.fake_quantize(w, fmt, axis=1)[ids]  # the whole table, then its rows
    assert want.dtype == dtype
    assert select.choose_embedding(q, ids, "cpu") == select.Choice("cpu")
    args = (q.codes, q.scales, list(q.side.values()), qcompile.ops.qtensor_meta(q), "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the kernels ran: no fallback warning
        got = torch.ops.qcompile.embedding(ids, *args)
    assert same_bits(got, want)
    assert same_bits(cpu.gather_rows(q, ids[0]), want[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["nf4", "int4[opq=true]", "mxint8", "nvfp4"])
@pytest.mark.parametrize("axis", [1, 0])
def test_dequantize_is_the_references_weight_bit_for_bit(dtype, fmt, axis, isa):
    w = table(dtype, 24, 72, seed=2)
    q = qcompile.quantize(w if axis == 1 else w.T.contiguous(), fmt, axis=axis)
    assert select.choose_dequantize(q, "cpu") == select.Choice("cpu")
    assert same_bits(cpu.dequantize(q), qcompile.dequantize(q))


# -- a compiled model --------------------------------------------------------------------------

def test_a_compiled_bf16_w8a8_llama_runs_the_integer_kernel():
    """A tiny bf16 Llama with W8A8 on every linear and a quantised embedding, compiled with the
    eager lowering: every linear a qcompile_cpu::int_linear node, the embedding gathered by the
    kernels, no fallback warning; the logits close to the reference lowering's (which multiplies
    the dtype-rounded operands: a few bf16 ulps of the logits' scale)."""
    from archs import batch, build, logits
    from qcompile import LayerSpec, Policy
    from qcompile.backend import compiled_variants
    policy = Policy({"model.embed_tokens": LayerSpec(weight="int8", op="embedding"),
                     "*.mlp.*": LayerSpec(weight="int4", act="mxint8")},
                    default=LayerSpec(weight="int8", act="int8"))
    model, oracle = build("llama", torch.bfloat16), build("llama", torch.bfloat16)
    qcompile.compile(model, policy, lowering="eager")
    qcompile.compile(oracle, policy, lowering="eager", kernels="reference")
    ids, mask = batch("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        got = logits(model, ids, mask)
    targets = [str(n.target) for n in compiled_variants()[0].gm.graph.nodes]
    assert targets.count("qcompile_cpu.int_linear.default") == 15 and \
        "qcompile.linear.default" not in targets
    kernels = {r.fqn: r.kernel for r in qcompile.explain(model).rows}
    assert kernels["model.embed_tokens"].startswith("cpu ("), kernels["model.embed_tokens"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = logits(oracle, ids, mask)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0,
                               atol=float(4 * 2**-8 * want.float().abs().max()))
