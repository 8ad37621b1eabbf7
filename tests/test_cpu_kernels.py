"""The C++ CPU kernels (codegen/cpu/): decoded weights equal the reference's bit for
bit, for every format; the linear stays within the float32 bound of docs/architecture.md; each
instruction set this machine has (AVX-512, AVX2, scalar: forced with QCOMPILE_CPU_ISA); the
backend runs them by default on CPU tensors; the build cache rebuilds what it cannot trust."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcompile
from qcompile import LayerSpec, Policy, formats
from qcompile.codegen import cpu
from qcompile.codegen.cpu import build as cpu_build
from qcompile.codegen.cpu import isa as cpu_isa
from qcompile.codegen.cpu import plans as cpu_plans
from qcompile.codegen.triton.linear import gamma

ISAS = [i for i in cpu.ISAS if cpu.ISAS.index(i) >= cpu.ISAS.index(cpu.machine_isa())]
FORMATS = formats.names() + ["int2", "int5", "int7", "fp5_e2m2", "fp6_e3m2", "bfp5", "bl6",
                             "dynexp4", "int4[block_size=None]", "nf4[block_size=16]",
                             "mxint8[block_size=64]", "mxfp4[scale_rule=rceil]",
                             "int4[opq=true]", "nf4[block_size=24]"]
SETTINGS = settings(max_examples=6, suppress_health_check=[HealthCheck.too_slow,
                                                       HealthCheck.function_scoped_fixture])
SPECIALS = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-40, -3e-39, 3e38, 1e-30]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CPU_ISA", request.param)
    return request.param


@st.composite
def weights(draw, specials=True):
    """A weight [N, K] (or [K, N] for axis 0) with K not a multiple of the block, a few large
    elements, an all-zero row and, optionally, special values."""
    n, k = draw(st.integers(1, 40)), draw(st.integers(1, 150))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    w = torch.randn(n, k, generator=g) * draw(st.sampled_from([1.0, 1e-3, 300.0]))
    w[torch.rand(n, k, generator=g) < 0.03] *= 40
    w[0] = 0.0
    if specials and draw(st.booleans()):
        for v in draw(st.lists(st.sampled_from(SPECIALS), min_size=1, max_size=4)):
            w[draw(st.integers(0, n - 1)), draw(st.integers(0, k - 1))] = v
    axis = draw(st.sampled_from([1, 0]))
    return (w if axis == 1 else w.T.contiguous()), axis


def same_bits(a, b):
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("fmt", FORMATS)
@SETTINGS
@given(case=weights())
def test_decode_is_the_reference_bit_for_bit(fmt, case, isa):
    w, axis = case
    q = qcompile.quantize(w, fmt, axis=axis)
    assert same_bits(cpu.dequantize(q), qcompile.dequantize(q))


def assert_within_bound(y, x, w_nk, b, extra=0):
    """|y - exact| <= gamma(K + 2 + extra) S elementwise, S = |x| |W|^T + |b| (float64); the
    same NaN pattern."""
    x64, w64 = x.double(), w_nk.double()
    exact = x64 @ w64.T + (b.double() if b is not None else 0.0)
    s = x64.abs() @ w64.abs().T + (b.double().abs() if b is not None else 0.0)
    assert torch.equal(y.isnan(), exact.isnan())
    ok = ((y.double() - exact).abs() <= gamma(w_nk.shape[1] + 2 + extra) * s) | exact.isnan()
    assert ok.all()


def w_nk(q):
    w = qcompile.dequantize(q)
    return w if q.axis == 1 else w.T


@pytest.mark.parametrize("fmt", ["nf4", "mxfp4", "mxint8", "int8", "mxfp8_e4m3", "int3",
                                 "bfp6", "nvfp4", "quantile4", "int4[block_size=None]",
                                 "nf4[block_size=24]", "nf4[block_size=8]", "fp5_e2m2"])
@SETTINGS
@given(case=weights(specials=False), m=st.sampled_from([1, 3, 5, 16, 17, 33]),
       bias=st.booleans())
def test_linear_within_the_float32_bound(fmt, case, m, bias, isa):
    w, axis = case
    q = qcompile.quantize(w, fmt, axis=axis)
    n = q.scales.shape[0]
    x = torch.randn(m, w.shape[axis])
    b = torch.randn(n) if bias else None
    y = cpu.linear(x, q, None, b)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert_within_bound(y, x, w_nk(q), b)


@pytest.mark.parametrize("m", [1, 7, 24])
def test_opq_outliers_and_activation_formats(m, isa):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(48, 200, generator=g) * torch.rand(48, 200, generator=g) ** 6
    q = qcompile.quantize(w, "bof4s_opq", axis=1)
    per_row = torch.bincount(q.side["outlier_index"].long() // (q.scales.shape[-1] * q.block),
                             minlength=48)
    assert per_row.sum() > 0
    x = torch.randn(m, 200, generator=g)
    for act in (None, "mxint8", "nvfp4"):
        y = cpu.linear(x, q, act)
        xq = qcompile.fake_quantize(x, act, axis=-1) if act else x
        assert_within_bound(y, xq, w_nk(q), None, extra=int(per_row.max()))


def test_three_d_input_and_conv1d_layout():
    x = torch.randn(2, 5, 64)
    for axis in (1, 0):
        w = torch.randn(24, 64) if axis == 1 else torch.randn(64, 24)
        q = qcompile.quantize(w, "int4[block_size=32]", axis=axis)
        y = cpu.linear(x, q)
        assert y.shape == (2, 5, 24)
        assert_within_bound(y.reshape(10, 24), x.reshape(10, 64), w_nk(q), None)


def test_the_op_runs_the_cpu_kernels_by_default(monkeypatch):
    calls = []
    real = cpu.linear
    monkeypatch.setattr(cpu, "linear", lambda *a: calls.append(1) or real(*a))
    q = qcompile.quantize(torch.randn(16, 64), "nf4", axis=1)
    x = torch.randn(3, 64)
    y = torch.ops.qcompile.linear(x, q.codes, q.scales, [], qcompile.ops.qtensor_meta(q), "",
                                  None, "auto")
    assert calls and y.shape == (3, 16)
    y_ref = torch.ops.qcompile.linear(x, q.codes, q.scales, [], qcompile.ops.qtensor_meta(q),
                                      "", None, "reference")
    assert len(calls) == 1 and torch.allclose(y, y_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lowering", ["inductor", "eager"])
def test_compiled_model_with_cpu_kernels_within_the_bound(lowering):
    """kernels="auto" (the default), no grad: every linear layer runs a C++ operator
    (qcompile_cpu::linear, or int_linear for int x int layers), and the logits stay within float32 reordering error of the eager
    fake-quantised model. Activation formats only with the eager lowering: after Inductor's
    reordered norms an activation can land on the neighbouring code (docs/architecture.md)."""
    from emulation import emulate, policy
    from archs import batch, build, logits
    from qcompile.backend import compiled_variants
    model = build("llama")
    act = "mxint8" if lowering == "eager" else None
    rules, default = [("lm_head", ("int8", None)), ("*.mlp.*", ("mxint8", act))], ("nf4", None)
    ref = emulate(model, rules, default)
    qcompile.compile(model, policy(rules, default), lowering=lowering)
    ids, mask = batch("llama")
    got, want = logits(model, ids, mask), logits(ref, ids, mask)
    torch.testing.assert_close(got, want, rtol=0, atol=float(3e-5 * want.abs().max()))
    targets = [str(n.target) for n in compiled_variants()[0].gm.graph.nodes]
    integer = 6 if act else 0  # mxint8 x mxint8: the integer path (tests/test_cpu_int.py)
    assert targets.count("qcompile_cpu.int_linear.default") == integer
    assert targets.count("qcompile_cpu.linear.default") == 15 - integer  # 2 layers x 7 + lm_head
    assert "qcompile.linear.default" not in targets


def test_the_operator_is_the_python_path_bit_for_bit():
    """qcompile_cpu::linear runs the same kernels as codegen.cpu.linear, without Python."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 100, generator=g) * torch.rand(40, 100, generator=g) ** 5
    for fmt in ("nf4", "mxint8", "bof4s_opq", "int3", "mxfp8_e4m3"):
        q = qcompile.quantize(w, fmt, axis=1)
        p = cpu.plan(q)
        for m in (1, 6, 40):
            x, b = torch.randn(3, m, 100, generator=g), torch.randn(40, generator=g)
            y = torch.ops.qcompile_cpu.linear(x, q.codes, q.scales, b,
                                              q.side.get("outlier_index"),
                                              q.side.get("outlier_value"), p.register(), 40,
                                              100, q.block)
            assert same_bits(y, cpu.linear(x, q, None, b))


def test_tables_from_side_data_are_registered_while_their_plan_lives():
    """A quantile codebook's tables come from the tensor: cpu.linear runs the operator under an
    id of that weight's plan alone, which names nothing once the plan is gone."""
    import gc
    g = torch.Generator().manual_seed(3)
    q1, q2 = (qcompile.quantize(torch.randn(24, 64, generator=g), "quantile4", axis=1)
              for _ in range(2))
    p1, p2 = cpu.plan(q1), cpu.plan(q2)
    x = torch.randn(2, 64, generator=g)
    assert p1.register() != p2.register()  # the same format, different tables
    args = (q1.codes, q1.scales, None, None, None, p1.register(), 24, 64, q1.block)
    assert same_bits(torch.ops.qcompile_cpu.linear(x, *args), cpu.linear(x, q1))
    cpu_plans._PLANS.clear()
    del p1
    gc.collect()
    with pytest.raises(RuntimeError, match="is not registered"):
        torch.ops.qcompile_cpu.linear(x, *args)


@pytest.mark.parametrize("fmt", ["mxint8", "int8"])
def test_int8_blocks_with_tiny_or_zero_multipliers(fmt, isa):
    """The factored int8 path (sum x*code, times multiplier*step) hands a block whose product
    would be subnormal to the per-weight decode; all-zero blocks give zeros."""
    g = torch.Generator().manual_seed(6)
    w = torch.randn(24, 160, generator=g)
    w[:8] *= 2.0**-122  # E8M0 multipliers near 2^-128: times 2^-6, subnormal
    w[8:12, :64] = 0.0
    q = qcompile.quantize(w, fmt, axis=1)
    for m in (1, 2, 5):
        x = torch.randn(m, 160, generator=g) * 2.0**20
        assert_within_bound(cpu.linear(x, q), x, w_nk(q), None)


def test_a_weight_bigger_than_one_panel_runs_in_panels():
    """Above cpu.WHOLE_BYTES decoded (lm_head-sized) the prefill path decodes row panels."""
    g = torch.Generator().manual_seed(4)
    k = 1024
    n = cpu.WHOLE_BYTES // (4 * k) + 37  # one panel more than fits, and a ragged last one
    w = torch.randn(n, k, generator=g)
    x, b = torch.randn(20, k, generator=g), torch.randn(n, generator=g)
    for fmt in ("nf4", "bof4s_opq"):
        q = qcompile.quantize(w, fmt, axis=1)
        y = cpu.linear(x, q, None, b)
        rows = q.side["outlier_index"].long() // k if fmt == "bof4s_opq" else torch.zeros(1)
        assert_within_bound(y, x, w_nk(q), b, extra=int(torch.bincount(rows.long()).max()))
        op = torch.ops.qcompile_cpu.linear(x, q.codes, q.scales, b, q.side.get("outlier_index"),
                                           q.side.get("outlier_value"), cpu.plan(q).register(),
                                           n, k, q.block)
        assert same_bits(op, y)


def test_grad_mode_graphs_keep_the_op_with_autograd():
    from qcompile.backend import compiled_variants
    net = torch.nn.Sequential(torch.nn.Linear(64, 32)).eval()
    qcompile.compile(net, Policy({}, default=LayerSpec(weight="nf4")))
    x = torch.randn(2, 64, requires_grad=True)
    net(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    targets = [str(n.target) for n in compiled_variants()[0].gm.graph.nodes]
    assert "qcompile.linear.default" in targets and "qcompile_cpu.linear.default" not in targets


def test_instruction_set_choice(monkeypatch):
    monkeypatch.setenv("QCOMPILE_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="QCOMPILE_CPU_ISA.*avx512, avx2, scalar"):
        cpu.chosen_isa()
    monkeypatch.setenv("QCOMPILE_CPU_ISA", "avx512")
    monkeypatch.setattr(cpu_isa, "machine_isa", lambda: "avx2")
    with pytest.raises(RuntimeError, match="has only avx2; choose one of avx2, scalar"):
        cpu.chosen_isa()
    monkeypatch.delenv("QCOMPILE_CPU_ISA")
    assert cpu.chosen_isa() == "avx2"


# -- the build cache ---------------------------------------------------------------------------

@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty kernel cache folder and no library loaded in this process."""
    monkeypatch.setenv("QCOMPILE_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_build, "_LIBS", {})
    monkeypatch.setattr(cpu_plans, "_PLANS", {})
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """isa -> (library, sidecar): copies of the scalar, avx2 and this machine's libraries as
    the session's own cache holds them (built there once), so that a test of the rebuild
    compiles only the rebuild (test_processes_building_at_once_all_succeed builds from empty)."""
    from qcompile.codegen.cache import cache_dir
    seed = tmp_path_factory.mktemp("built")
    copies = {}
    for isa in {"scalar", "avx2", cpu.machine_isa()}:
        digest = cpu.library(isa).qc_source_hash().decode()
        name = f"qc_cpu_{isa}_{digest[:20]}"
        copies[isa] = tuple(seed / f"{name}{ext}" for ext in (".so", ".json"))
        for copy in copies[isa]:
            copy.write_bytes((Path(cache_dir()) / copy.name).read_bytes())
    return copies


@pytest.fixture(params=["copied", pytest.param("compiled", marks=pytest.mark.slow)])
def rebuild(request, built, monkeypatch):
    """How the rebuild tests' rebuild compiles: by default a stand-in for the compiler that
    writes, to the command's -o path, the session's library for the ISA its -DQC_ISA flag names
    (the same source: what the compiler would make), so they test the refusal and the rebuild's
    load-check-record-rename without a minutes-long -O3 build each; the real compiler under slow
    (test_processes_building_at_once_all_succeed always builds for real). Returns the ISAs
    the stand-in built, None with the real compiler."""
    if request.param == "compiled":
        return None
    compiled = []
    real_run = cpu_build.subprocess.run
    isa_of = {f"-DQC_ISA={n}": isa for isa, n in cpu_isa.ISA_NUMBER.items()}

    def compile_by_copy(cmd, *args, **kwargs):
        flags = [a for a in cmd if a in isa_of] if isinstance(cmd, list) else []
        if not flags:  # not a library build (the compiler's --version)
            return real_run(cmd, *args, **kwargs)
        compiled.append(isa_of[flags[0]])
        Path(cmd[cmd.index("-o") + 1]).write_bytes(built[compiled[-1]][0].read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(cpu_build.subprocess, "run", compile_by_copy)
    return compiled


def _seed(cache, built, *isas):
    """The fresh cache holding the built libraries of ``isas``, as a build leaves them."""
    cache.mkdir(mode=0o700, exist_ok=True)
    for isa in isas:
        for copy in built[isa]:
            (cache / copy.name).write_bytes(copy.read_bytes())


def _library_file(folder, isa):
    (path,) = [p for p in folder.iterdir() if p.name.startswith(f"qc_cpu_{isa}_")
               and p.suffix == ".so"]
    return path


def test_a_damaged_library_is_rebuilt(fresh_cache, built, rebuild):
    isa = cpu.machine_isa()
    _seed(fresh_cache, built, isa)
    cpu.library(isa)
    path = _library_file(fresh_cache, isa)
    size = path.stat().st_size
    damaged = path.with_name("damaged")
    damaged.write_bytes(path.read_bytes()[: size // 3])  # truncated, in a new file: the loaded
    os.replace(damaged, path)                             # library's pages stay mapped
    cpu_build._LIBS.clear()
    lib = cpu.library(isa)  # the damaged file was never opened: its bytes fail the sidecar hash
    assert path.stat().st_size == size and lib.qc_isa() == cpu_isa.ISA_NUMBER[isa]
    assert rebuild in (None, [isa])  # rebuilt once (by the stand-in by default)


def test_a_library_built_from_other_source_is_rebuilt(fresh_cache, built, rebuild):
    _seed(fresh_cache, built, "scalar", "avx2")
    cpu.library("scalar")
    cpu.library("avx2")
    scalar, avx2 = _library_file(fresh_cache, "scalar"), _library_file(fresh_cache, "avx2")
    impostor = scalar.with_name("impostor")
    impostor.write_bytes(avx2.read_bytes())  # a valid library, not the one its name promises
    os.replace(impostor, scalar)
    cpu_build._LIBS.clear()
    assert cpu.library("scalar").qc_isa() == 0  # the impostor was refused and rebuilt
    assert scalar.read_bytes() != avx2.read_bytes()
    assert rebuild in (None, ["scalar"])


def test_processes_building_at_once_all_succeed(fresh_cache):
    script = textwrap.dedent("""
        import torch, qcompile
        from qcompile.codegen import cpu
        q = qcompile.quantize(torch.randn(8, 64), "nf4", axis=1)
        assert torch.equal(cpu.dequantize(q), qcompile.dequantize(q))
    """)
    env = {**os.environ, "QCOMPILE_KERNEL_CACHE": str(fresh_cache)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
             for _ in range(3)]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-2000:]
    libs = [p for p in fresh_cache.iterdir() if p.suffix == ".so"]
    assert len(libs) == 1 and not [p for p in fresh_cache.iterdir() if p.name.startswith(".")]


def test_the_cpp_files_are_package_data():
    """An installed package builds from the shipped files: every C++ file of codegen/cpu/ (and
    each one a library is built from) is matched by pyproject.toml's package data."""
    import fnmatch
    import tomllib
    from pathlib import Path
    setup = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    setup = setup["tool"]["setuptools"]
    assert "qcompile.codegen.cpu" in setup["packages"]
    shipped = setup["package-data"]["qcompile.codegen.cpu"]
    built = cpu_build.source_files(cpu_build.KERNEL_FILES + cpu_build.OPERATOR_FILES)
    folder = [f for f in cpu_build.HERE.iterdir() if f.suffix in (".cpp", ".h")]
    assert len(folder) >= 6 and set(built) <= set(folder)
    assert all(any(fnmatch.fnmatch(f.name, pattern) for pattern in shipped) for f in folder)


def test_a_missing_compiler_is_a_clear_error(fresh_cache, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(NotImplementedError, match="need a C\\+\\+ compiler.*CXX"):
        cpu.library("scalar")
    q = qcompile.quantize(torch.randn(8, 64), "nf4", axis=1)
    x = torch.randn(2, 64)
    args = (q.codes, q.scales, [], qcompile.ops.qtensor_meta(q), "", None)
    monkeypatch.setattr(qcompile.config, "_said", set())
    with pytest.warns(UserWarning, match="no generated CPU kernel"):  # by design, even strict
        y = torch.ops.qcompile.linear(x, *args, "auto")
    assert torch.equal(y, torch.ops.qcompile.linear(x, *args, "reference"))


def test_dynamic_shapes_with_the_cpu_operator():
    """Sizes the operator's fake reports come from its int arguments, never from the packed
    tensors (extra graph inputs Dynamo has no source for: a guard on them broke compiling)."""
    from emulation import emulate, policy
    from archs import batch, build, logits, rules_for
    model = build("llama")
    rules, default = rules_for("llama", weight_only=True)
    ref = emulate(model, rules, default)
    qcompile.compile(model, policy(rules, default), dynamic=True)
    for n in (5, 9):
        ids, mask = batch("llama", n)
        got, want = logits(model, ids, mask), logits(ref, ids, mask)
        torch.testing.assert_close(got, want, rtol=0, atol=float(3e-5 * want.abs().max()))
