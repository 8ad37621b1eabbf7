"""The kernel selector (codegen/select.py): its answers for a table of cases, written by hand
from the documented rules (docs/architecture.md: CPU kernels for float32, bfloat16 and float16
weights of 2..8-bit codes on CPU tensors, the integer path for int x int pairs with each
activation block inside a weight block, Triton on CUDA or under the interpreter for float32/16/bf16, GEMV up to M = 1 on
Triton and M = 16 on the CPU), its NoKernel reasons, and that the ops tell "no kernel by
design" from a failure by the error's type, not by the source line that raised it."""
import pytest
import torch

import qcompile
from qcompile import formats, ops
from qcompile.codegen import select
from qcompile.codegen.select import Choice, NoKernel


def packed(fmt="nf4", n=16, k=64, dtype=torch.float32, shape=None):
    w = torch.randn(*(shape or (n, k)), generator=torch.Generator().manual_seed(1)).to(dtype)
    return qcompile.quantize(w, fmt, axis=-1)


# (weight format, weight dtype, act format, x dtype, rows, impl, interpreter) -> (kernel, variant)
LINEAR_CASES = [
    ("nf4", torch.float32, "", torch.float32, 1, "cpu", False, ("cpu", "gemv")),
    ("nf4", torch.float32, "", torch.float32, 16, "auto", False, ("cpu", "gemv")),
    ("nf4", torch.float32, "", torch.float32, 17, "cpu", False, ("cpu", "panels")),
    ("nf4", torch.bfloat16, "", torch.bfloat16, 1, "cpu", False, ("cpu", "gemv")),
    ("int4", torch.float16, "", torch.float16, 17, "auto", False, ("cpu", "panels")),
    ("mxint8", torch.float32, "mxint8", torch.float32, 1, "cpu", False, ("cpu_int", "gemv")),
    ("int4", torch.float32, "mxint8", torch.float32, 40, "cpu", False, ("cpu_int", "panels")),
    ("mxint8", torch.bfloat16, "mxint8", torch.bfloat16, 1, "cpu", False, ("cpu_int", "gemv")),
    ("int8", torch.float16, "int8", torch.float16, 17, "auto", False, ("cpu_int", "panels")),
    ("mxint8", torch.float32, "mxfp8_e4m3", torch.float32, 1, "cpu", False, ("cpu", "gemv")),
    ("nf4", torch.float32, "mxint8", torch.float32, 1, "cpu", False, ("cpu", "gemv")),
    ("mxint8", torch.float32, "", torch.float32, 1, "reference", True, ("reference", "")),
    ("nf4", torch.float32, "", torch.float32, 1, "triton", True, ("triton", "gemv")),
    ("nf4", torch.float32, "", torch.float32, 2, "triton", True, ("triton", "gemm")),
    ("nf4", torch.bfloat16, "", torch.bfloat16, 3, "triton", True, ("triton", "gemm")),
]


@pytest.mark.parametrize("wfmt,wdtype,act,xdtype,rows,impl,interp,want", LINEAR_CASES)
def test_linear_choices(monkeypatch, wfmt, wdtype, act, xdtype, rows, impl, interp, want):
    monkeypatch.setenv("TRITON_INTERPRET", "1" if interp else "0")
    q = packed(wfmt, dtype=wdtype)
    got = select.choose(q, act, torch.zeros(rows, 64, dtype=xdtype), impl)
    assert (got.kernel, got.variant) == want


# cases with no kernel by design: (what differs from an nf4 float32 [16, 64] weight) -> reason
NO_KERNEL = [
    (dict(impl="cpu", xdtype=torch.float16, wdtype=torch.bfloat16),
     "CPU", "qcompile CPU kernels cover float32, bfloat16 and float16 models with x, the weight "
     "and the bias in one dtype, not x torch.float16, weight torch.bfloat16, bias None"),
    (dict(impl="cpu", shape=(2, 16, 64)), "CPU", "qcompile CPU kernels cover 2-d weights"),
    (dict(impl="triton", interp=False), "Triton",
     "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)"),
    (dict(impl="triton", shape=(2, 16, 64)), "Triton",
     "fused linear needs a 2-d weight with blocks along K"),
    (dict(impl="triton", xdtype=torch.float16), "Triton",
     "x, the weight and the bias must share one dtype"),
]


@pytest.mark.parametrize("case,kind,reason", NO_KERNEL)
def test_no_kernel_reasons(monkeypatch, case, kind, reason):
    monkeypatch.setenv("TRITON_INTERPRET", "0" if case.get("interp") is False else "1")
    q = packed(case.get("fmt", "nf4"), dtype=case.get("wdtype", torch.float32),
               shape=case.get("shape"))
    x = torch.zeros(1, 64, dtype=case.get("xdtype", torch.float32))
    got = select.choose(q, "", x, case["impl"])
    assert got == Choice("reference", reason=reason, tried=kind)
    with pytest.raises(NoKernel, match="^" + reason.replace("(", r"\(").replace(")", r"\)")) as e:
        got.require()
    assert e.value.reason == reason and isinstance(e.value, NotImplementedError)


def test_integer_pairs():
    """The integer path: int elements with E8M0 or absmax scales on both sides, no OPQ, each
    activation block inside one weight block, the GEMM's activation blocks at least 16 long."""
    get = formats.get
    assert select.int_path(get("mxint8"), get("mxint8"), "gemm")
    assert select.int_path(get("int4"), get("mxint8"), "gemv")
    assert not select.int_path(get("nf4"), get("mxint8"), "gemv")  # a codebook weight
    assert not select.int_path(get("mxint8"), get("mxfp8_e4m3"), "gemv")  # a minifloat activation
    assert not select.int_path(get("mxint8"), None, "gemv")
    assert select.splits_k(get("nf4"), None, "gemv") and not select.splits_k(
        get("mxint8"), get("mxint8"), "gemv") and not select.splits_k(get("nf4"), None, "gemm")


def test_other_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = packed("nf4")
    assert select.choose_dequantize(q, "cpu") == Choice("cpu")
    assert select.choose_dequantize(packed(shape=(2, 16, 64)), "cpu").reason == \
        "no CPU kernel: not a 2-d weight"
    assert select.choose_dequantize(q, "triton").tried == "Triton"
    assert select.cpu_weight_problem(True, True, torch.float32, 9) == \
        "qcompile CPU kernels cover 2..8-bit codes, not 9"  # no format has such codes yet
    assert select.cpu_weight_problem(True, True, torch.float32, 2) == ""
    ids = torch.arange(16)
    assert select.choose_embedding(q, ids, "cpu") == Choice("cpu")
    for dtype in (torch.bfloat16, torch.float16):  # decoded in float32, rounded once
        assert select.choose_embedding(packed("nf4", dtype=dtype), ids, "cpu") == Choice("cpu")
        assert select.choose_dequantize(packed("nf4", dtype=dtype), "cpu") == Choice("cpu")
    assert select.choose_embedding(q, torch.arange(17), "cpu").kernel == "reference"
    assert select.choose_embedding(q, ids, "triton").reason == "no Triton gather"
    assert select.choose_embedding(packed("bof4s_opq"), ids, "cpu").tried == "CPU"
    assert select.choose_fake_quantize(formats.get("mxint8"), ids.float(), "cpu") == select.ASKED
    with pytest.raises(ValueError, match="unknown impl 'cuda'"):
        select.choose(q, "", torch.zeros(1, 64), "cuda")


def test_the_answer_is_cached_per_format_and_size_class():
    q = packed("nf4")
    first = select.choose(q, "", torch.zeros(1, 64), "cpu")
    assert select.choose(q, "", torch.ones(1, 64), "cpu") is first  # values do not matter
    assert select.choose(q, "", torch.zeros(17, 64), "cpu").variant == "panels"


def test_no_kernel_by_design_is_the_type_not_the_source_line():
    """A NotImplementedError our own code raises is a failure unless it is a NoKernel, however
    the raising line reads; a NoKernel from anywhere is by design."""
    def ours_not_by_design():
        err = NotImplementedError("qcompile: something our code did not expect")
        raise err  # the last line of the traceback is not a `raise NotImplementedError(`
    with pytest.raises(NotImplementedError) as failure:
        ours_not_by_design()
    assert not ops.no_kernel_by_design(failure.value)
    with pytest.raises(NotImplementedError) as plain:
        raise NotImplementedError("raised by a raise statement in a test")
    assert not ops.no_kernel_by_design(plain.value)
    reason = NoKernel("no kernel here")
    assert ops.no_kernel_by_design(reason)  # never raised: no traceback at all
    made = eval("NoKernel('from generated code')", {"NoKernel": NoKernel})
    assert ops.no_kernel_by_design(made)
