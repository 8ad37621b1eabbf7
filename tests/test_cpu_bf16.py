"""bfloat16 / float16 models on the weight-only CPU linear (codegen/cpu/operator.cpp): the weight
is the reference's dequantised float32 value rounded to the model's dtype, bit for bit; products
and sums in float32, the output rounded to the dtype once.

Oracle: float64 ``x @ W_ref^T + b`` with W_ref the reference's weight in the model's dtype
(``qcompile.dequantize``), widened by the float32 bound of docs/architecture.md and rounded to the
dtype at both ends (rounding is monotonic, so the kernel's output, its float32 result rounded,
lies between the two); the decoded weight itself, bit for bit: a one-hot x and the bias -W_ref
give exact zeros."""
import warnings

import pytest
import torch

import qcompile
from qcompile.codegen import cpu, select
from qcompile.codegen.triton.linear import gamma

ISAS = [i for i in cpu.ISAS if cpu.ISAS.index(i) >= cpu.ISAS.index(cpu.machine_isa())]
DTYPES = [torch.bfloat16, torch.float16]
FORMATS = ["nf4", "mxint8", "int4", "mxfp4", "quantile4", "nvfp4", "int4[opq=true]"]
PANELS_M = cpu.GEMV_MAX_M + 9


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CPU_ISA", request.param)
    return request.param


def packed(fmt, dtype, n=24, k=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 3
    w[torch.rand(n, k, generator=g) < 0.03] *= 40
    return qcompile.quantize(w.to(dtype), fmt, axis=1)


def assert_rounded_within_bound(y, x, w, b):
    """y (the model dtype) lies between the dtype's roundings of exact -/+ gamma(K + 2) S."""
    x64, w64 = x.double(), w.double()
    exact = x64 @ w64.T + (b.double() if b is not None else 0.0)
    s = x64.abs() @ w64.abs().T + (b.double().abs() if b is not None else 0.0)
    slack = gamma(w.shape[1] + 2) * s
    lo, hi = (exact - slack).to(y.dtype).double(), (exact + slack).to(y.dtype).double()
    assert y.dtype == w.dtype and y.shape == exact.shape
    assert ((lo <= y.double()) & (y.double() <= hi)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, PANELS_M])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_within_the_bound_of_the_rounded_weight(dtype, fmt, m, bias, isa):
    q = packed(fmt, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, q.shape[1], generator=g).to(dtype)
    b = torch.randn(q.shape[0], generator=g).to(dtype) if bias else None
    assert select.choose(q, None, x, "cpu", b).kernel == "cpu"
    assert_rounded_within_bound(cpu.linear(x, q, None, b), x, qcompile.dequantize(q), b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, PANELS_M])
def test_the_weight_is_the_reference_rounded_bit_for_bit(dtype, fmt, m, isa):
    """x = e_i in every row, bias = -W_ref[:, i]: y = w_i - W_ref[:, i] in float32, zero exactly
    when the kernel's weight is W_ref (the difference of two values within a factor 2 is exact:
    a weight not rounded to the dtype leaves its rounding error, and the output keeps it)."""
    q = packed(fmt, dtype, k=40)
    w_ref = qcompile.dequantize(q)
    assert w_ref.dtype == dtype and w_ref.isfinite().all()
    for i in (0, 7, 23, 39):
        x = torch.zeros(m, q.shape[1], dtype=dtype)
        x[:, i] = 1
        y = cpu.linear(x, q, None, -w_ref[:, i])
        assert (y == 0).all(), (i, (y != 0).sum())


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_weights_stay_nan(dtype, isa):
    w = torch.randn(8, 64)
    w[3, 5] = float("nan")
    q = qcompile.quantize(w.to(dtype), "nf4", axis=1)
    for m in (1, PANELS_M):
        y = cpu.linear(torch.ones(m, 64, dtype=dtype), q, None, None)
        want = torch.zeros(8, dtype=torch.bool)
        want[3] = True
        assert torch.equal(y.isnan().all(0), want) and not y[:, want.logical_not()].isnan().any()


def test_mixed_dtypes_stay_on_the_reference_and_say_why():
    q = packed("nf4", torch.bfloat16)
    x = torch.randn(2, q.shape[1], dtype=torch.float16)
    choice = select.choose(q, None, x, "cpu", None)
    assert choice.kernel == "reference" and "bfloat16" in choice.reason \
        and "float16" in choice.reason


def test_a_compiled_bf16_model_runs_its_linears_on_the_kernel():
    """A tiny bf16 Llama compiled with the eager lowering: every linear a qcompile_cpu::linear
    node, no fallback warning, and the logits close to the reference lowering's (both round the
    same bf16 weights; they differ by float32 summation order, then bf16 roundings of the
    activations: a few bf16 ulps of the logits' scale)."""
    from archs import batch, build, logits
    from emulation import policy
    from qcompile.backend import compiled_variants
    rules, default = [("lm_head", ("int8", None)), ("*.mlp.*", ("mxint8", None))], ("nf4", None)
    model, oracle = build("llama", torch.bfloat16), build("llama", torch.bfloat16)
    qcompile.compile(model, policy(rules, default), lowering="eager")
    qcompile.compile(oracle, policy(rules, default), lowering="eager", kernels="reference")
    ids, mask = batch("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        got = logits(model, ids, mask)
    targets = [str(n.target) for n in compiled_variants()[0].gm.graph.nodes]
    assert targets.count("qcompile_cpu.linear.default") == 15 and \
        "qcompile.linear.default" not in targets
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = logits(oracle, ids, mask)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0,
                               atol=float(4 * 2**-8 * want.float().abs().max()))
