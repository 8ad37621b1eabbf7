"""The Triton linear as a ``torch.library.triton_op`` (``qcompile::triton_linear``) and the
GPU side of ``qcompile.export``, checked as far as a CPU can (docs/export.md, "GPU").

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, kernel_device), so
shapes are small. The oracle for the results is the eager Triton path, ``qcompile::linear``
with ``impl="triton"`` (itself checked against the reference definition by
tests/test_codegen_linear.py): the exported graph runs the same kernels on the same operands
and must agree bit for bit. What needs a GPU (AOTInductor's CUDA compile, loading the package)
is the last test, skipped here: ``QCOMPILE_TEST_DEVICE=cuda QCOMPILE_CUDA_EXPORT=1 pytest
tests/test_triton_export.py`` on a GPU machine.
"""
import logging

import pytest
import torch
from kernel_device import ON_GPU, cpu_only

import qcompile
from qcompile import LayerSpec, Policy, aot, api, ops
from qcompile.aot import PackageError

HOP = "triton_kernel_wrapper_functional"
# weight-only nf4 (one fused kernel) and the integer path (its prologue, then the fused kernel)
POLICY = Policy({"2": LayerSpec(weight="mxint8", act="mxint8")}, default=LayerSpec(weight="nf4"))


@pytest.fixture(autouse=True)
def quiet_mutation_analysis():
    """Without a GPU torch cannot lower a kernel to TTIR to see which arguments it writes, so
    it logs a traceback and takes every argument as written (each kernel then writes copies of
    its inputs: the same results, more copies; ``run_lifted``)."""
    log = logging.getLogger("torch._higher_order_ops.triton_kernel_wrap")
    level = log.level
    log.setLevel(logging.ERROR)
    yield
    log.setLevel(level)


def packed_mlp():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 32)).eval()
    return qcompile.quantize_model_(mlp, POLICY)


def eager_triton(mlp, x):
    """The oracle: the packed model run eagerly with every layer on the Triton kernels."""
    for layer in mlp.modules():
        if getattr(layer, "quantised_linear", False):
            layer.impl = "triton"
    with torch.no_grad():
        return mlp(x)


def exported_with_triton_kernels(mlp, x):
    """export's GPU steps before AOTInductor on CPU tensors: torch.export, the pass to
    qcompile::triton_linear, then the decomposition AOTInductor runs, which opens the ops."""
    with torch.no_grad():
        program = torch.export.export(mlp, (x,), strict=False)
        tables = aot.lower_to_triton_operators(program)
    return program, tables, program.run_decompositions(decompose_custom_triton_ops=True)


def run_lifted(program, *user_inputs):
    """The program's user outputs, its graph run on its own parameters, buffers and constants.
    (``program.module()`` cannot unlift the parameter writes that torch's pessimistic mutation
    analysis records without a GPU; the kernels write copies, so the weights are unchanged.)"""
    from torch.export.graph_signature import InputKind, OutputKind
    users, args = iter(user_inputs), []
    for spec in program.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            args.append(next(users))
        else:
            args.append(program.state_dict.get(spec.target, program.constants.get(spec.target)))
    outs = program.graph_module(*args)
    return [o for o, spec in zip(outs, program.graph_signature.output_specs)
            if spec.kind == OutputKind.USER_OUTPUT]


def kernel_names(program) -> list[str]:
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    names = []
    for n in program.graph.nodes:
        if n.op == "call_function" and str(n.target) == HOP:
            kernel = kernel_side_table.get_kernel(n.kwargs["kernel_idx"])
            names.append(getattr(kernel, "base_fn", getattr(kernel, "fn", None)).__name__)
    return names


@cpu_only
@pytest.mark.parametrize("m", [3, 1])  # the GEMM and the GEMV (split K for nf4)
def test_export_sees_the_triton_kernels_and_runs_them_bit_for_bit(m):
    mlp = packed_mlp()
    x = torch.randn(m, 128, generator=torch.Generator().manual_seed(m))
    program, tables, opened = exported_with_triton_kernels(mlp, x)
    lowered = [str(n.target) for n in program.graph.nodes if n.op == "call_function"
               and str(n.target).startswith("qcompile.")]
    assert lowered == ["qcompile.triton_linear.default"] * 2
    assert tables["triton"] == ["mxint8 x mxint8", "nf4"] and tables["formats"] == {}
    # the kernels themselves are the graph's nodes now, no opaque qcompile op is left
    assert kernel_names(opened) == ["linear_kernel", "act_quant_kernel", "linear_kernel"]
    assert not [n for n in opened.graph.nodes if str(n.target).startswith("qcompile.")]
    (got,) = run_lifted(opened, x)
    want = eager_triton(mlp, x)
    assert got.dtype == want.dtype and torch.equal(got, want)


@cpu_only
def test_triton_op_is_the_triton_linear_bit_for_bit():
    """Called eagerly, qcompile::triton_linear launches the same kernels as qcompile::linear
    with impl="triton": a bias, a 3-d input and the integer path's GEMV."""
    torch.manual_seed(1)
    cases = [("nf4", "", torch.randn(2, 3, 128)), ("mxint8", "mxint8", torch.randn(1, 128))]
    for wfmt, act, x in cases:
        q = api.quantize_weight(torch.randn(48, 128), wfmt, 1)
        bias = torch.randn(48)
        args = (x, q.codes, q.scales, [], ops.qtensor_meta(q), act, bias)
        got = ops.triton_linear_op()(*args)
        want = torch.ops.qcompile.linear(*args, "triton")
        assert got.shape == (*x.shape[:-1], 48) and torch.equal(got, want), wfmt


def test_triton_op_fake_gives_the_shape_without_running():
    q = api.quantize_weight(torch.randn(48, 128), "nf4", 1)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = ops.triton_linear_op()(torch.empty(5, 7, 128), q.codes, q.scales, [],
                                   ops.qtensor_meta(q), "", None)
        with pytest.raises(RuntimeError, match="the weight K=128"):
            ops.triton_linear_op()(torch.empty(5, 64), q.codes, q.scales, [],
                                   ops.qtensor_meta(q), "", None)
    assert y.shape == (5, 7, 48) and y.dtype == torch.float32


@cpu_only
def test_layers_without_a_traceable_kernel_are_refused_by_name():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 32)).eval()
    with torch.no_grad():
        mlp[0].weight[3, 5] = 40.0  # an outlier OPQ keeps apart
    qcompile.quantize_model_(mlp, Policy({"0": LayerSpec(weight="bof4s_opq")},
                                         default=LayerSpec(weight="nf4")))
    with torch.no_grad():
        program = torch.export.export(mlp, (torch.randn(3, 128),), strict=False)
    with pytest.raises(NotImplementedError, match=r"0 \(OPQ outliers"):
        aot.lower_to_triton_operators(program)


def fake_cuda(*shape):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        return torch.empty(*shape, device="cuda")


@cpu_only
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_cuda_export_without_a_gpu_says_what_is_missing(tmp_path):
    with pytest.raises(NotImplementedError) as err:
        qcompile.export(packed_mlp(), None, (fake_cuda(3, 128),), tmp_path / "m.pt2")
    said = str(err.value)
    for needed in ("no CUDA device", "torch.cuda.is_available() is False",
                   "torch.export on real CUDA tensors", "AOTInductor's CUDA compile",
                   "qcompile::triton_linear", "move the model and its inputs to the CPU"):
        assert needed in said
    assert not (tmp_path / "m.pt2").exists()


@cpu_only
def test_cuda_export_on_a_gpu_waits_for_the_opt_in(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv(aot.CUDA_EXPORT_ENV, raising=False)
    with pytest.raises(NotImplementedError, match=f"not yet verified on a GPU: set "
                                                  f"{aot.CUDA_EXPORT_ENV}=1"):
        qcompile.export(torch.nn.ReLU(), Policy({}, default=None), (fake_cuda(3, 8),),
                        tmp_path / "m.pt2")


def test_cuda_package_is_refused_where_there_is_no_gpu(monkeypatch, tmp_path):
    """A package recorded for CUDA needs a GPU to load: refused by name, before AOTInductor
    opens it (the archive here is a stand-in: the record and digest are what is checked)."""
    from torch.export.pt2_archive import PT2ArchiveWriter
    raw, path = tmp_path / "raw.pt2", tmp_path / "cuda.pt2"
    with PT2ArchiveWriter(str(raw)) as w:
        w.write_string("data/stand_in.txt", "compiled model")
    record = {**aot._record({"formats": {}, "acts": {}, "triton": ["nf4"]}, "cuda")}
    aot._copy_with_record(str(raw), str(path), record)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PackageError, match="is a CUDA package .* no CUDA device"):
        qcompile.load_package(path)


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU: QCOMPILE_TEST_DEVICE=cuda "
                                       "QCOMPILE_CUDA_EXPORT=1 pytest tests/test_triton_export.py")
@pytest.mark.parametrize("m", [3, 1])
def test_cuda_package_runs_the_triton_kernels_bit_for_bit(m, tmp_path, monkeypatch):
    monkeypatch.setenv(aot.CUDA_EXPORT_ENV, "1")
    mlp = packed_mlp().cuda()
    x = torch.randn(m, 128, generator=torch.Generator().manual_seed(m)).cuda()
    path = qcompile.export(mlp, None, (x,), tmp_path / "mlp.pt2")
    run = qcompile.load_package(path)
    assert run.record["device"] == "cuda" and run.record["operators"] == {}
    got, want = run(x), eager_triton(mlp, x)
    assert torch.equal(got.cpu(), want.cpu())
