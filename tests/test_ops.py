"""The qcompile ops (qcompile/ops.py) and the autograd of the public API.

- gradients: fake_quantize is a straight-through estimator for every format; the linear op's
  gradients equal those of F.linear / addmm on the dequantised weight; a compiled model
  (default Inductor lowering) trains its activations' gradients like the eager fake-quantised
  model; packed weights are frozen;
- fakes: torch.library.opcheck on every op (schema, autograd registration, fake tensor,
  AOT dispatch with dynamic shapes) over non-contiguous, 3-d and empty inputs, both weight
  layouts, bias and activation formats, side tensors; Inductor on a transposed activation and
  on an attention-score matmul;
- strict mode: a kernel that raises propagates with QCOMPILE_STRICT=1, falls back otherwise;
  a format with no kernel by design falls back either way;
- impl="triton" on a CPU tensor without the interpreter: our error, before any work.
"""
import os

from kernel_device import cpu_only  # noqa: E402  (before anything imports triton)

import copy  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import qcompile  # noqa: E402
from qcompile import LayerSpec, Policy, config, ops  # noqa: E402
from sweeps import pairwise  # noqa: E402

LINEAR = torch.ops.qcompile.linear.default
DEQUANT = torch.ops.qcompile.dequantize.default
FQ_ACT = torch.ops.qcompile.fake_quantize_act.default
# an MX format, an absmax int format, nf4, nvfp4, a bfp format and OPQ
STE_FORMATS = ["mxfp4", "int4", "nf4", "nvfp4", "bfp8", "bof4s_opq"]


def bits(t):
    """Bit patterns, so that equal NaNs compare equal."""
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16,
                   torch.bfloat16: torch.int16}[t.dtype])


def op_args(q):
    return q.codes, q.scales, list(q.side.values()), ops.qtensor_meta(q)


def weight(axis, k=70, n=24, fmt="nf4", seed=0):
    """A packed weight: nn.Linear [N, K] (axis 1) or GPT-2 Conv1D [K, N] (axis 0)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) < 0.03] *= 20  # outliers (OPQ keeps some)
    return qcompile.quantize(w if axis == 1 else w.T.contiguous(), fmt, axis=axis)


# ---- autograd --------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", STE_FORMATS)
@pytest.mark.parametrize("axis, shape", [(-1, (5, 70)), (0, (40, 3, 6))])
def test_fake_quantize_is_straight_through(fmt, axis, shape):
    """Forward: exactly the reference values; backward: the incoming gradient, unchanged."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(*shape, generator=g) * 3
    x = x0.clone().requires_grad_()
    y = qcompile.fake_quantize(x, fmt, axis=axis)
    assert torch.equal(bits(y), bits(qcompile.fake_quantize(x0, fmt, axis=axis)))
    upstream = torch.randn(*shape, generator=g)
    y.backward(upstream)
    assert torch.equal(x.grad, upstream)
    with torch.no_grad():  # no graph is built outside grad mode
        assert qcompile.fake_quantize(x, fmt, axis=axis).grad_fn is None


def test_fake_quantize_straight_through_keeps_dtype_and_scalars():
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(4, 40).to(dtype).requires_grad_()
        y = qcompile.fake_quantize(x, "mxint8")
        assert y.dtype == dtype
        (y * 2).sum().backward()
        assert x.grad.dtype == dtype and torch.equal(x.grad, torch.full_like(x, 2))
    s = torch.tensor(0.3, requires_grad=True)
    qcompile.fake_quantize(s, "int8").backward()
    assert s.grad == 1.0


@pytest.mark.parametrize("fmt", ["int4", "bof4s_opq", "nvfp4"])
def test_quantize_of_a_tensor_that_requires_grad_carries_no_gradient(fmt):
    x = torch.randn(6, 128, requires_grad=True)
    q = qcompile.quantize(x, fmt)
    ref = qcompile.quantize(x.detach(), fmt)
    for name, t in q.tensors().items():
        assert not t.requires_grad and t.grad_fn is None, name
        assert torch.equal(t, ref.tensors()[name]), name


@pytest.mark.parametrize("fmt", ["nf4", "mxfp4", "bof4s_opq"])
@pytest.mark.parametrize("axis", [1, 0])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("act", ["", "mxint8"])
def test_linear_gradients_match_an_independent_computation(fmt, axis, with_bias, act):
    """d/dx = d/dx of F.linear(xq, W, b) (axis 1) or addmm(b, xq, W) (axis 0), W =
    qcompile.dequantize of the packed weight, xq the fake-quantised x taken straight through;
    d/db likewise; the packed tensors get nothing."""
    q = weight(axis, fmt=fmt)
    g = torch.Generator().manual_seed(2)
    shape = (2, 3, 70) if axis == 1 else (6, 70)
    x = torch.randn(*shape, generator=g).requires_grad_()
    b = torch.randn(24, generator=g).requires_grad_() if with_bias else None
    y = LINEAR(x, *op_args(q), act, b, "reference")
    upstream = torch.randn(*y.shape, generator=g)
    y.backward(upstream)

    w = qcompile.dequantize(q)  # the independent computation: plain torch autograd
    xq = qcompile.fake_quantize(x.detach(), act, axis=-1) if act else x.detach()
    x_leaf = xq.clone().requires_grad_()  # straight through: d/dx = d/dxq
    b_leaf = b.detach().clone().requires_grad_() if with_bias else None
    if axis == 1:
        y_ref = F.linear(x_leaf, w, b_leaf)
    else:
        y_ref = torch.addmm(b_leaf, x_leaf, w) if with_bias else x_leaf @ w
    y_ref.backward(upstream)
    with torch.no_grad():  # grad mode does not change the forward
        assert torch.equal(y, LINEAR(x, *op_args(q), act, b, "reference"))
    # float32 sums of the same products, maybe in different orders (BLAS layouts, matmul's
    # folding of 3-d inputs depends on requires_grad)
    w_nk = (w if axis == 1 else w.T).double()
    within_sum_bound(y, y_ref, xq.double().abs().reshape(-1, 70) @ w_nk.abs().T
                     + (b.double().abs() if with_bias else 0), terms=71)
    g64 = upstream.double().reshape(-1, 24)
    within_sum_bound(x.grad, x_leaf.grad, g64.abs() @ w_nk.abs(), terms=24)
    if with_bias:
        within_sum_bound(b.grad, b_leaf.grad, g64.abs().sum(0), terms=g64.shape[0])
    assert all(not t.requires_grad for t in q.tensors().values())


@cpu_only
@pytest.mark.parametrize("axis", [1, 0])
def test_linear_backward_on_the_generated_kernels(axis, monkeypatch):
    """impl="triton": the backward dequantises W with the generated kernel (bit-exact with the
    reference), so the gradients are those of impl="reference"."""
    import qcompile.codegen as codegen
    calls = []
    real = codegen.dequantize
    monkeypatch.setattr(codegen, "dequantize", lambda q: calls.append(1) or real(q))
    q = weight(axis, fmt="mxfp4")
    x0, b0 = torch.randn(5, 70), torch.randn(24)
    upstream = torch.randn(5, 24)
    grads = {}
    for impl in ("triton", "reference"):
        x, b = x0.clone().requires_grad_(), b0.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback
            LINEAR(x, *op_args(q), "mxint8", b, impl).backward(upstream)
        grads[impl] = (x.grad, b.grad)
    assert len(calls) == 1  # the triton run's backward
    assert torch.equal(grads["triton"][0], grads["reference"][0])
    assert torch.equal(grads["triton"][1], grads["reference"][1])


def within_sum_bound(a, b, abs_sum, terms):
    """|a - b| <= 2 gamma(terms) * abs_sum: two float32 sums of the same `terms` products
    (abs_sum = the sum of their magnitudes), each within gamma(terms) of the exact sum."""
    u = 2.0**-24
    gamma = terms * u / (1 - terms * u)
    diff = (a.double() - b.double()).abs().reshape(abs_sum.shape)
    assert (diff <= 2 * gamma * abs_sum).all(), (diff - 2 * gamma * abs_sum).max()


def test_dequantize_op_passes_no_gradient_to_packed_tensors():
    """Packed weights are frozen: even float absmax scales that require grad get none."""
    q = weight(1, fmt="int4")
    scales = q.scales.clone().requires_grad_()  # absmax scales are float: could ask for grad
    w = DEQUANT(q.codes, scales, [], ops.qtensor_meta(q), "reference")
    assert torch.equal(w, qcompile.dequantize(q))
    w.sum().backward()
    assert scales.grad is None


class MLP(nn.Sequential):
    def __init__(self):
        torch.manual_seed(3)
        super().__init__(nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 16))


GRAD_POLICY = Policy({"0": LayerSpec(weight="nf4", act="mxint8")},
                     default=LayerSpec(weight="int4"))


@pytest.mark.parametrize("swap, lowering", [(False, None), (True, None), (False, "eager")],
                         ids=["inductor", "quantize_model_-inductor", "eager"])
def test_compiled_model_backward_under_grad_mode_matches_eager(swap, lowering):
    """The README's example in grad mode, with the default Inductor lowering (and the eager
    one): the forward works, backward gives the input (activation) and bias gradients of the
    eager fake-quantised model; the quantised weights are frozen (no gradient)."""
    torch._dynamo.reset()
    model = MLP()
    ref = qcompile.fake_quantize_model_(copy.deepcopy(model), GRAD_POLICY)
    if swap:
        qcompile.quantize_model_(model, GRAD_POLICY)
    options = {"policy": GRAD_POLICY} if lowering is None else {"policy": GRAD_POLICY,
                                                                  "lowering": lowering}
    f = torch.compile(model, backend="blockquant", options=options)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(5, 48, generator=g)
    upstream = torch.randn(5, 16, generator=g)
    x, x_ref = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    y = f(x)
    assert y.requires_grad
    y.backward(upstream)
    y_ref = ref(x_ref)
    y_ref.backward(upstream)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for i in (0, 2):
        torch.testing.assert_close(model[i].bias.grad, ref[i].bias.grad, rtol=1e-5, atol=1e-5)
        if not swap:  # the full-precision weight is not used by the compiled graph
            assert model[i].weight.grad is None


# ---- fakes: opcheck --------------------------------------------------------------------------

def _xs():
    g = torch.Generator().manual_seed(5)
    return {"2d": torch.randn(4, 70, generator=g),
            "transposed": torch.randn(70, 4, generator=g).T,
            "3d": torch.randn(2, 3, 70, generator=g),
            "3d-strided": torch.randn(3, 2, 140, generator=g)[..., ::2].transpose(0, 1),
            "empty": torch.randn(0, 70, generator=g)}


def _check(op, args):
    result = torch.library.opcheck(op, args)  # every default test_util
    assert set(result) == {"test_schema", "test_autograd_registration", "test_faketensor",
                           "test_aot_dispatch_dynamic"}
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("fmt", ["nf4", "mxfp4", "bof4s_opq", "nvfp4"])
@pytest.mark.parametrize("axis", [1, 0])
def test_opcheck_dequantize(fmt, axis):
    q = weight(axis, fmt=fmt)
    if fmt == "bof4s_opq":
        assert q.side["outlier_index"].numel() > 0  # side tensors really travel
    out = DEQUANT(*op_args(q), "reference")
    assert out.is_contiguous()  # a Conv1D weight's movedim is made contiguous
    _check(DEQUANT, (*op_args(q), "reference"))


# opcheck takes seconds a case: a pairwise cover of each sweep by default, the rest under slow
@pytest.mark.parametrize("xname, fmt, axis, grad", pairwise(
    list(_xs()), [("mxint8", -1), ("int4", -1), ("nvfp4", -1), ("mxfp4", -2), ("int4", 0)],
    [False, True]))
def test_opcheck_fake_quantize_act(xname, fmt, axis, grad):
    x = _xs()[xname].clone() if xname == "empty" else _xs()[xname]
    if grad:
        x = x.detach().requires_grad_()
    out = FQ_ACT(x, fmt, axis, "reference")
    assert out.is_contiguous() and out.shape == x.shape and out.dtype == x.dtype
    if x.numel():
        assert torch.equal(bits(out), bits(qcompile.fake_quantize(x.detach(), fmt, axis=axis)))
    _check(FQ_ACT, (x, fmt, axis, "reference"))


@pytest.mark.parametrize("xname, axis, with_bias, fmt, act", pairwise(
    list(_xs()), [1, 0], [True, False],
    [("nf4", ""), ("mxint8", "mxint8"), ("bof4s_opq", "mxfp4")]))
def test_opcheck_linear(xname, axis, with_bias, fmt, act):
    q = weight(axis, fmt=fmt)
    x = _xs()[xname].detach().requires_grad_()
    b = torch.randn(24).requires_grad_() if with_bias else None
    out = LINEAR(x, *op_args(q), act, b, "reference")
    assert out.is_contiguous() and out.shape == (*x.shape[:-1], 24)
    _check(LINEAR, (x, *op_args(q), act, b, "reference"))


# ---- fakes under Inductor ------------------------------------------------------------------

class TransposedInput(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.fc = nn.Linear(40, 16)

    def forward(self, x):  # x [B, K, T] -> a non-contiguous [B, T, K] activation
        return self.fc(x.transpose(-1, -2))


class Attention(nn.Module):
    """Eager attention scores as HF models compute them: heads split by view + transpose."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.q_proj, self.k_proj = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, 2, 32).transpose(1, 2)
        k = self.k_proj(x).view(b, t, 2, 32).transpose(1, 2)
        return torch.matmul(q, k.transpose(-1, -2))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention()

    def forward(self, x):
        return self.attn(x)


def test_inductor_act_only_spec_on_a_transposed_activation():
    torch._dynamo.reset()
    model = TransposedInput()
    policy = Policy({"fc": LayerSpec(act="mxint8")}, default=None)
    f = torch.compile(model, backend="blockquant", options={"policy": policy})
    x = torch.randn(2, 40, 9)
    with torch.no_grad():
        y = f(x)
        xq = qcompile.fake_quantize(x.transpose(-1, -2), "mxint8", axis=-1)
        ref = F.linear(xq, model.fc.weight, model.fc.bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_inductor_matmul_rule_on_q_times_k_transposed():
    torch._dynamo.reset()
    model = Block()
    policy = Policy({"attn": LayerSpec(weight="mxint8", act="mxfp8_e4m3", op="matmul")},
                    default=None)
    f = torch.compile(model, backend="blockquant", options={"policy": policy})
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        y = f(x)
        a = model.attn
        q = a.q_proj(x).view(2, 5, 2, 32).transpose(1, 2)
        k = a.k_proj(x).view(2, 5, 2, 32).transpose(1, 2)
        ref = (qcompile.fake_quantize(q, "mxfp8_e4m3", axis=-1)
               @ qcompile.fake_quantize(k.transpose(-1, -2), "mxint8", axis=-2))
        plain = q @ k.transpose(-1, -2)
    assert not torch.allclose(ref, plain, rtol=1e-3, atol=1e-3)  # the rule changes the result
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


# ---- strict mode: a failing kernel versus no kernel by design ------------------------------------

@cpu_only
def test_strict_mode_lets_a_failing_kernel_raise(monkeypatch):
    from qcompile.codegen.triton import linear as cg
    q = weight(1, fmt="int4")
    x = torch.randn(3, 70)
    ref = LINEAR(x, *op_args(q), "", None, "reference")

    def crash(*a, **k):
        raise RuntimeError("simulated kernel crash")
    monkeypatch.setattr(cg, "linear", crash)
    monkeypatch.setattr("qcompile.codegen.dequantize", crash)
    monkeypatch.setenv("QCOMPILE_STRICT", "1")
    with pytest.raises(RuntimeError, match="simulated kernel crash"):
        LINEAR(x, *op_args(q), "", None, "triton")
    with pytest.raises(RuntimeError, match="simulated kernel crash"):
        DEQUANT(*op_args(q), "triton")
    # a NotImplementedError that is not one of qcompile's own checks is a failure too
    def not_ours(*a, **k):
        raise NotImplementedError("raised by something else")
    monkeypatch.setattr(cg, "linear", not_ours)
    with pytest.raises(NotImplementedError, match="something else"):
        LINEAR(x, *op_args(q), "", None, "triton")
    # without strict mode: one warning that says the kernel failed, and the reference result
    monkeypatch.setattr(cg, "linear", crash)
    monkeypatch.setenv("QCOMPILE_STRICT", "0")
    monkeypatch.setattr(config, "_said", set())
    with pytest.warns(UserWarning, match="Triton kernel for int4 failed .*simulated kernel crash"):
        assert torch.equal(LINEAR(x, *op_args(q), "", None, "triton"), ref)


@cpu_only
def test_strict_mode_keeps_fallbacks_that_are_by_design(monkeypatch):
    """No kernel for the format (codegen.supported), a weight the fused kernel does not take,
    CPU tensors without the interpreter: decided before launching, so they fall back."""
    monkeypatch.setenv("QCOMPILE_STRICT", "1")
    monkeypatch.setattr(config, "_said", set())
    x = torch.randn(3, 64)
    monkeypatch.setattr("qcompile.codegen.select.quant_supported", lambda fmt: False)
    with pytest.warns(UserWarning, match="no generated Triton kernel for mxint8"):
        got = FQ_ACT(x, "mxint8", -1, "triton")
    assert torch.equal(got, qcompile.fake_quantize(x, "mxint8"))
    monkeypatch.undo()
    monkeypatch.setenv("QCOMPILE_STRICT", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = weight(1, k=64, fmt="nf4")
    with pytest.warns(UserWarning, match="need CUDA tensors"):
        y = LINEAR(x, *op_args(q), "", None, "triton")
    assert torch.equal(y, LINEAR(x, *op_args(q), "", None, "reference"))


@cpu_only
def test_no_kernel_by_design_tells_our_checks_from_failures():
    from qcompile.codegen.triton import linear as cg
    q3 = qcompile.quantize(torch.randn(2, 3, 32), "int4")  # not a 2-d weight: our own check
    with pytest.raises(NotImplementedError) as ours:
        cg.linear(torch.randn(2, 32), q3)
    assert ops.no_kernel_by_design(ours.value)
    with pytest.raises(NotImplementedError) as theirs:
        raise NotImplementedError("a test's")
    assert not ops.no_kernel_by_design(theirs.value)
    # passes every check, then the launch fails (in torch, called by Triton's interpreter)
    with pytest.raises(NotImplementedError, match="meta tensor") as launched:
        cg.linear(torch.randn(2, 32, device="meta"), weight(1, k=32))
    assert not ops.no_kernel_by_design(launched.value)
    assert not ops.no_kernel_by_design(RuntimeError("not a NotImplementedError"))


# ---- impl="triton" without CUDA or the interpreter -----------------------------------------------

def test_triton_impl_on_cpu_without_the_interpreter_says_what_is_needed():
    """In a fresh process without TRITON_INTERPRET: our own error for each entry point (what
    is needed, the alternative), raised before any work: triton itself is never imported (an
    import before TRITON_INTERPRET is set would fix the mode for the process)."""
    script = textwrap.dedent("""
        import sys, torch, qcompile
        x = torch.randn(4, 64)
        q = qcompile.quantize(x, "mxfp4")
        calls = {"quantize": lambda: qcompile.quantize(x, "mxfp4", impl="triton"),
                 "dequantize": lambda: qcompile.dequantize(q, impl="triton"),
                 "fake_quantize": lambda: qcompile.fake_quantize(x, "mxfp4", impl="triton")}
        for name, call in calls.items():
            try:
                call()
                print(name, "NO ERROR")
            except RuntimeError as e:
                print(name, "|", str(e).replace(chr(10), " "))
        print("triton imported:", "triton" in sys.modules)
        """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "triton imported: False"
    assert len(lines) == 4
    for line, name in zip(lines, ("quantize", "dequantize", "fake_quantize")):
        assert line.startswith(f"{name} | qcompile.{name}(impl='triton'):")
        for needed in ("CUDA tensors", "TRITON_INTERPRET=1", "before triton is imported",
                       "impl='reference'"):
            assert needed in line, (needed, line)
        assert "active drivers" not in line
