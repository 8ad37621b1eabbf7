"""The generated fused linear (codegen/triton/linear.py) and the dispatch of the qcompile ops to it.

Oracles: the reference dequantised weight and fake-quantised activations, multiplied out in
float64. Float kernels must lie within the documented float32 bound
|y - y_exact| <= gamma(K + 2 + c) * (|xq| @ |W|^T + |b|), gamma(n) = n u / (1 - n u), u = 2^-23
(c: OPQ outliers of the weight row), and within twice that of the reference F.linear. The integer
W+A path must equal, bit for bit, its formula computed independently here from the reference
QTensors: exact int64 block dot products D_t, scaled by fl32(a_x a_w), summed in float32 in K
order. Kernels run in Triton's interpreter on the CPU, or on a GPU with QCOMPILE_TEST_DEVICE=cuda
(tests/kernel_device.py); the oracles always run on the CPU.
"""
import os

from kernel_device import DEVICE, cpu_only, dev, host  # noqa: E402  (before anything imports triton)

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import qcompile  # noqa: E402
from qcompile import LayerSpec, Policy, config, formats, ops  # noqa: E402
import qcompile.codegen.cache  # noqa: E402
from qcompile.codegen.triton import linear as cg  # noqa: E402
from int_formula import int_formula  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")
SETTINGS = settings(max_examples=5, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
WEIGHT_ONLY = ["int8", "int4", "mxint8", "mxfp4", "mxfp8_e4m3", "nf4", "bof4s", "bfp8", "bl8"]


@st.composite
def problems(draw):
    """Shapes for both variants (M <= 16: GEMV, M > 16: GEMM), K not a multiple of the block."""
    return dict(m_small=draw(st.integers(1, 16)), m_large=draw(st.integers(17, 40)),
                k=draw(st.integers(1, 150)), n=draw(st.integers(1, 70)), bias=draw(st.booleans()),
                axis=draw(st.sampled_from([1, 0])), seed=draw(st.integers(0, 2**16)),
                scale=draw(st.sampled_from([1.0, 1e-3, 300.0])))


def make(p, m, wfmt, dtype=torch.float32):
    """x [m, K], the packed weight (nn.Linear [N, K] or Conv1D [K, N]) and a bias."""
    g = torch.Generator().manual_seed(p["seed"])
    k, n = p["k"], p["n"]
    x = (torch.randn(m, k, generator=g) * p["scale"]).to(dtype)
    w = torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) < 0.02] *= 30  # a few large elements per row
    w[0, : min(k, 40)] = 0.0  # all-zero blocks
    w = (w if p["axis"] == 1 else w.T.contiguous()).to(dtype)
    b = (torch.randn(n, generator=g) * p["scale"]).to(dtype) if p["bias"] else None
    return x, qcompile.quantize(w, wfmt, axis=p["axis"]), b


def fused(x, q, act=None, b=None):
    """The generated fused linear on the kernel device, its result back on the CPU."""
    return host(cg.linear(dev(x), dev(q), act, dev(b)))


def w_nk(q):
    """The reference dequantised weight as [N, K]."""
    w = qcompile.dequantize(q)
    return w if q.axis == 1 else w.T


def reference(x, q, b, act=None):
    xq = qcompile.fake_quantize(x, act, axis=-1) if act else x
    if q.axis == 0:
        w = qcompile.dequantize(q)
        return xq, (torch.addmm(b, xq, w) if b is not None else xq @ w)
    return xq, F.linear(xq, w_nk(q), b)


def assert_within_bound(y, xq, w, b, extra=0, depth=None):
    """|y - exact| <= gamma(depth) S, depth = K + 2 + extra unless given; the same NaN pattern.
    Returns S = |xq| @ |W|^T + |b| (float64)."""
    k = w.shape[1]
    x64, w64 = xq.double(), w.double()
    exact = x64 @ w64.T + (b.double() if b is not None else 0.0)
    s = x64.abs() @ w64.abs().T + (b.double().abs() if b is not None else 0.0)
    err = (y.double() - exact).abs()
    bound = cg.gamma(depth or k + 2 + extra) * s
    assert torch.equal(y.isnan(), exact.isnan())
    ok = (err <= bound) | exact.isnan()
    assert ok.all(), f"max err/bound {(err / bound.clamp(min=1e-300))[~ok].max().item()}"
    return s


def check(x, q, b, act=None):
    y = fused(x, q, act, b)
    xq, ref = reference(x, q, b, act)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    s = assert_within_bound(y, xq, w_nk(q), b)
    # against the reference's own float32 result: both err by at most the bound
    diff = (y.double() - ref.double()).abs()
    assert ((diff <= 2 * cg.gamma(q.shape[q.axis] + 2) * s) | ref.isnan()).all()
    return y


@pytest.mark.parametrize("wfmt", WEIGHT_ONLY)
@SETTINGS
@given(p=problems())
def test_weight_only_within_float32_bound(wfmt, p):
    for m in (p["m_small"], p["m_large"]):
        x, q, b = make(p, m, wfmt)
        check(x, q, b)


@pytest.mark.parametrize("wfmt", ["nf4", "bof4s_opq", "mxint8"])
@pytest.mark.parametrize("k, axis", [(1024, 1), (1000, 0)])  # whole K tiles, and a ragged end
def test_gemv_split_k_within_float32_bound(wfmt, k, axis):
    """At M = 1 with a long K and few outputs the GEMV splits K (so the grid has enough
    programs); the splits' sums, added by the launcher, stay within the bound."""
    p = dict(k=k, n=40, bias=True, axis=axis, seed=7, scale=1.0)
    x, q, b = make(p, 1, wfmt)
    assert '"SPLIT_K": split_k' in cg.linear_source(q.fmt, variant="gemv")
    assert 'triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}' in cg.linear_source(q.fmt, variant="gemv")
    # min(32, ceil(528 / one program), K // (2 * 64)) splits under the interpreter's one config
    assert cg.split_k({"N": 40, "K": k, "BLOCK_N": 64, "BLOCK_K": 64}) == k // 128 > 1
    y = check(x, q, b)
    assert y.shape == (1, 40)


@pytest.mark.parametrize("wfmt", ["nvfp4", "bof4s_opq", "quantile4", "int3", "mxfp6_e3m2",
                                  formats.get("int4", block_size=None), "mxfp8_e5m2"],
                         ids=str)
@pytest.mark.parametrize("m", [1, 33])
def test_more_weight_formats(wfmt, m):
    p = dict(k=150, n=40, bias=True, axis=1, seed=3, scale=1.0)
    x, q, b = make(p, m, wfmt)
    if wfmt == "bof4s_opq":
        assert q.side["outlier_index"].numel() > 0
        rows = q.side["outlier_index"].long() // (q.scales.shape[-1] * q.block)
        extra = int(torch.bincount(rows, minlength=40).max())
        assert_within_bound(fused(x, q, None, b), x, w_nk(q), b, extra=extra)
        xq = qcompile.fake_quantize(x, "mxfp8_e4m3")  # the correction uses the quantised x
        y = fused(x, q, "mxfp8_e4m3", b)
        assert_within_bound(y, xq, w_nk(q), b, extra=extra)
    else:
        check(x, q, b)


@pytest.mark.parametrize("wfmt", ["int4[proxy=5]", "mxint8[proxy=0.05]", "bof4s_opq[proxy=3]"])
@pytest.mark.parametrize("axis", [1, 0])
def test_proxy_columns_added_after_the_kernel(wfmt, axis):
    """Proxy columns kept apart (bfloat16) are added after the kernel like OPQ outliers; with
    an activation format the integer path is not taken (it has no such correction)."""
    g = torch.Generator().manual_seed(4)
    k, n = 150, 40
    w = torch.randn(n, k, generator=g)
    w[:, [3, 77]] *= 40
    q = qcompile.quantize(w if axis == 1 else w.T.contiguous(), wfmt, axis=axis,
                          proxy_score=torch.rand(k, generator=g))
    extra = q.side["proxy_index"].numel() + (
        int(torch.bincount(q.side["outlier_index"].long() // (q.scales.shape[-1] * q.block),
                           minlength=n).max()) if "outlier_index" in q.side else 0)
    assert not cg.int_path(q.fmt, formats.get("mxint8"), "gemm")
    for m in (1, 33):
        x = torch.randn(m, k, generator=g)
        b = torch.randn(n, generator=g)
        assert_within_bound(fused(x, q, None, b), x, w_nk(q), b, extra=extra)
        xq = qcompile.fake_quantize(x, "mxint8")
        assert_within_bound(fused(x, q, "mxint8", b), xq, w_nk(q), b, extra=extra)


def test_empty_and_three_d_inputs():
    p = dict(k=50, n=12, bias=True, axis=1, seed=2, scale=1.0)
    x, q, b = make(p, 6, "nf4")
    assert fused(x[:0], q, None, b).shape == (0, 12)
    y3 = fused(x.reshape(2, 3, 50), q, "mxint8", b)
    assert torch.equal(y3.reshape(6, 12), fused(x, q, "mxint8", b))
    xt = torch.randn(50, 6).T  # non-contiguous rows
    assert torch.equal(fused(xt, q, None, b), fused(xt.contiguous(), q, None, b))


# ---- weight + activation ------------------------------------------------------------------

INT_PAIRS = [("mxint8", "mxint8"), ("int8", "mxint8"), ("bfp8", "bfp8"), ("int4", "mxint8"),
             ("mxint8[block_size=64]", "mxint8"), ("int4", "int8")]


@pytest.mark.parametrize("wfmt, act", INT_PAIRS)
@SETTINGS
@given(p=problems())
def test_integer_w_a_path_is_bit_exact(wfmt, act, p):
    for m in (p["m_small"], p["m_large"]):
        x, q, b = make(p, m, wfmt)
        variant = "gemv" if m <= cg.GEMV_MAX_M else "gemm"
        assert cg.int_path(q.fmt, formats.get(act), variant)
        y = fused(x, q, act, b)
        want = int_formula(x, q, b, act)
        assert torch.equal(y.view(torch.int32), want.view(torch.int32))
        xq, _ = reference(x, q, b, act)  # the documented bound of the integer path
        assert_within_bound(y, xq, w_nk(q), b, depth=-(-p["k"] // formats.get(act).block_size) + 5)


# K = 512 (two whole GEMV tiles) for mxint8 by default, for the other weight formats under slow
# (each runs whole tiles at K = 256 by default)
TILE_CASES = [pytest.param(k, wfmt, marks=pytest.mark.slow if k == 512 and wfmt != "mxint8" else ())
              for k in (256, 512, 200)
              for wfmt in ("mxint8", "mxint8[block_size=64]", "mxint8[block_size=96]", "int4")]


@pytest.mark.parametrize("k, wfmt", TILE_CASES)
def test_integer_path_whole_and_ragged_tiles(wfmt, k):
    """Whole K tiles (EVEN_K: unmasked loads; 256 and 512 are multiples of the interpreter's
    BLOCK_K, 128 for the GEMM and 256 for the GEMV) and a ragged end; weight blocks of 1, 2 and
    3 activation blocks (96: not a power of two, one multiplier load per block); 256 rows
    make four GEMM row tiles, so the GROUP_M program order groups them (GROUP_M = 4)."""
    p = dict(k=k, n=70, bias=True, axis=1, seed=12, scale=1.0)
    assert cg.group_m({"M": 256, "BLOCK_M": 64}) == 4
    for m in (1, 256):
        x, q, b = make(p, m, wfmt)
        assert cg.int_path(q.fmt, formats.get("mxint8"), "gemv" if m == 1 else "gemm")
        y = fused(x, q, "mxint8", b)
        want = int_formula(x, q, b, "mxint8")
        assert torch.equal(y.view(torch.int32), want.view(torch.int32))


def test_integer_prologue_is_the_reference_quantize():
    """The prologue kernel's int8 codes and block multipliers a = multiplier * 2^-frac are the
    reference QTensor's (tests/int_formula.int_operands), zero codes past K; edge inputs: a
    NaN, an Inf, zeros, subnormals, huge values, K not a multiple of the block."""
    from int_formula import int_operands
    g = torch.Generator().manual_seed(3)
    for act in ("mxint8", "int8", "bfp8"):
        x = torch.randn(11, 150, generator=g) * 10
        x[1, 5], x[2, 70], x[3] = float("nan"), float("inf"), 0.0
        x[4, :40] = torch.randn(40, generator=g) * 1e-40  # subnormal blocks
        x[5, 100:] = 3e38
        af = formats.get(act)
        xq, ax = cg._int_operands(dev(x), af)
        xq, ax = host(xq), host(ax)
        want_i, want_a = int_operands(qcompile.quantize(x, af, axis=-1))
        nb = want_a.shape[1]
        assert xq.shape[1] % 16 == 0 and ax.shape == (xq.shape[1] // af.block_size, 11)
        assert torch.equal(xq[:, :150].long(), want_i[:, :150]) and not xq[:, 150:].any()
        assert torch.equal(ax[:nb].T.contiguous().view(torch.int32),
                           want_a.to(torch.float32).contiguous().view(torch.int32))


def test_gemm_program_order_groups_row_tiles():
    """group_m: the largest power of two <= 8 dividing the row tiles (whole groups only)."""
    assert [cg.group_m({"M": m, "BLOCK_M": 64}) for m in (1, 64, 128, 130, 256, 64 * 12,
                                                          64 * 32)] == [1, 1, 2, 1, 4, 4, 8]
    p = dict(k=100, n=70, bias=True, axis=1, seed=6, scale=1.0)
    x, q, b = make(p, 256, "nf4")  # four row tiles in one group, two N tiles
    check(x, q, b)


def test_fixed_codebook_table_made_once_per_device():
    """A fixed codebook's table is made on the device once (cached), not copied per launch;
    a 4-bit one decodes in registers and gets no table at all."""
    p = dict(k=64, n=16, bias=False, axis=1, seed=1, scale=1.0)
    from qcompile.formats import elements
    x, q, b = make(p, 3, "nf4")
    fused(x, q, None, b)  # the kernel's source written (its constants read off the table)
    elements._table_on.cache_clear()
    y = fused(x, q, None, b)
    assert elements._table_on.cache_info().misses == 0  # a select tree: no table operand
    assert torch.equal(y, check(x, q, b))
    x, q, b = make(p, 3, "dynexp8")
    elements._table_on.cache_clear()
    ys = [fused(x, q, None, b) for _ in range(3)]
    assert elements._table_on.cache_info().misses == 1  # made once, on the kernel's device
    assert all(torch.equal(y, check(x, q, b)) for y in ys)
    el, d = q.fmt.element, dev(q).codes.device
    assert el.table_tensor(d) is el.table_tensor(d)


@cpu_only
def test_float32_dots_option_reaches_the_source(monkeypatch):
    """QCOMPILE_FLOAT32_DOTS=tf32 sets the float GEMM's dot precision of float32 models (the
    source says so; speed and the wider bound need a GPU); the default is IEEE float32, and
    half-precision models and the GEMV are unaffected; a bad value names the choices."""
    monkeypatch.delenv("QCOMPILE_FLOAT32_DOTS", raising=False)
    default = cg.linear_source("nf4", variant="gemm", interpret=False)
    assert default == cg.linear_source("nf4", variant="gemm", interpret=False, float32_dots="ieee")
    assert 'input_precision="ieee"' in default and "tf32" not in default
    tf32 = cg.linear_source("nf4", variant="gemm", interpret=False, float32_dots="tf32")
    assert tf32 == default.replace('input_precision="ieee"', 'input_precision="tf32"')
    monkeypatch.setenv("QCOMPILE_FLOAT32_DOTS", "TF32")
    assert cg.linear_source("nf4", variant="gemm", interpret=False) == tf32
    assert "tf32" not in cg.linear_source("nf4", variant="gemm", dtype=torch.float16)
    assert "tf32" not in cg.linear_source("nf4", variant="gemv")
    # the launch builds its kernel from the option too (the interpreter's dot is float32)
    p = dict(k=64, n=16, bias=False, axis=1, seed=1, scale=1.0)
    x, q, b = make(p, 20, "int4")
    sources = []
    real_load = cg.load_kernel
    monkeypatch.setattr(cg, "load_kernel", lambda src, name: sources.append(src)
                        or real_load(src, name))
    cg._kernel.cache_clear()
    check(x, q, b)
    assert len(sources) == 1 and 'input_precision="tf32"' in sources[0]
    monkeypatch.setenv("QCOMPILE_FLOAT32_DOTS", "fast")
    with pytest.raises(ValueError, match="QCOMPILE_FLOAT32_DOTS.*ieee, tf32"):
        cg.linear(x, q)
    with pytest.raises(ValueError, match="ieee, tf32"):
        cg.linear_source("nf4", float32_dots="tf16")


def test_integer_path_nan_blocks():
    g = torch.Generator().manual_seed(9)
    x, w = torch.randn(20, 96, generator=g), torch.randn(24, 96, generator=g)
    x[3, 40] = float("nan")  # one activation block of row 3 -> the whole row is NaN
    w[5, 70] = float("inf")  # one weight block of row 5 -> column 5 is NaN
    for m in (20, 4):
        q = qcompile.quantize(w, "mxint8", axis=1)
        y = fused(x[:m], q, "mxint8", None)
        want = int_formula(x[:m], q, None, "mxint8")
        assert torch.equal(y.isnan(), want.isnan()) and y[:, 5].isnan().all()
        assert y.isnan().sum() == (m + 24 - 1 if m > 3 else m)
        ok = ~want.isnan()
        assert torch.equal(y[ok].view(torch.int32), want[ok].view(torch.int32))


@pytest.mark.parametrize("wfmt, act", [("nf4", "mxfp8_e4m3"), ("mxfp4", "mxfp8_e4m3"),
                                       ("bl8", "bl8"), ("bfp8", "mxint8"), ("nf4", "int8")])
@SETTINGS
@given(p=problems())
def test_float_w_a_path_within_bound(wfmt, act, p):
    assert not cg.int_path(formats.get(wfmt), formats.get(act), "gemv")
    for m in (p["m_small"], p["m_large"]):
        x, q, b = make(p, m, wfmt)
        check(x, q, b, act)


def test_unfusable_activation_runs_outside_with_one_warning():
    p = dict(k=70, n=20, bias=False, axis=1, seed=1, scale=1.0)
    x, q, b = make(p, 3, "int4")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        check(x, q, b, "nvfp4")  # a per-tensor scale: no prologue for it
        check(x, q, b, "nvfp4")
    assert sum("outside the fused kernel" in str(r.message) for r in rec) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("wfmt, act", [("nf4", None), ("mxfp4", "mxfp8_e4m3"), ("mxint8", "mxint8")])
@pytest.mark.parametrize("m", [2, 20])
def test_half_precision_models(dtype, wfmt, act, m):
    """x, W, bias and y in float16/bfloat16: the operands are the reference's rounded values;
    the result adds one rounding to the output dtype (u_out |y| + its smallest subnormal)."""
    p = dict(k=100, n=30, bias=True, axis=1, seed=4, scale=1.0)
    x, q, b = make(p, m, wfmt, dtype)
    y = fused(x, q, act, b)
    xq, ref = reference(x, q, b, act)
    assert y.dtype == dtype == ref.dtype
    x64, w64, b64 = xq.double(), w_nk(q).double(), b.double()
    exact = x64 @ w64.T + b64
    s = x64.abs() @ w64.abs().T + b64.abs()
    u_out = 2.0**-11 if dtype == torch.float16 else 2.0**-8
    tiny = 2.0**-24 if dtype == torch.float16 else 2.0**-133
    g = cg.gamma(p["k"] + 2) * s
    assert ((y.double() - exact).abs() <= g + u_out * (exact.abs() + g) + tiny).all()


# ---- the source, the cache, the dump --------------------------------------------------------

@cpu_only
def test_source_readable_one_config_under_interpreter_and_dumped(monkeypatch, capsys, tmp_path):
    src = cg.linear_source(formats.get("nf4"), variant="gemm")
    assert "def linear_kernel(" in src and "16-level codebook nf4" in src
    assert src.count("triton.Config(") == 1 and 'input_precision="ieee"' in src
    gpu = cg.linear_source(formats.get("nf4"), variant="gemm", dtype=torch.float16, interpret=False)
    assert gpu.count("triton.Config(") > 1 and "tl.float16" in gpu
    both = cg.linear_source(formats.get("mxint8"), "mxint8", variant="gemm")
    # the integer GEMM: int8 codes from the prologue kernel, one tl.dot per 32-element block
    assert "out_dtype=tl.int32" in both and "tl.static_range(BLOCK_K // 32)" in both
    assert "fake-quantise" not in both and "xq_ptr" in both
    assert "fake-quantise the activation tile" in cg.act_quant_source("mxint8")
    # 16-element blocks: int8 tensor-core dots need K >= 32, so an exact float16 dot
    assert "tl.dot(xi.to(tl.float16), wi.to(tl.float16))" in cg.linear_source("bfp8", "bfp8")
    gemv = cg.linear_source(formats.get("mxint8"), "mxint8", variant="gemv")
    assert "prod = xi[:, None].to(tl.int32) * wi.to(tl.int32)" in gemv and "SPLIT_K" not in gemv
    # the block length is a launch constant (QBLOCK): one source per element and scale
    assert cg.linear_source(formats.get("int4[block_size=32]")) == cg.linear_source(formats.get("int4"))
    monkeypatch.setattr(qcompile.codegen.cache, "_KERNELS", {})
    cg._kernel.cache_clear()
    monkeypatch.setenv("QCOMPILE_DUMP_KERNELS", "1")
    monkeypatch.setenv("QCOMPILE_KERNEL_CACHE", str(tmp_path))
    check(*make(dict(k=40, n=8, bias=False, axis=1, seed=0, scale=1.0), 2, "mxfp6_e3m2"))
    err = capsys.readouterr().err
    assert "def linear_kernel(" in err and "E3M2" in err
    digest = err.split("qcompile kernel ")[1].split()[0]
    assert (tmp_path / f"qk_{digest}.py").read_text() in err


def test_gamma_and_bound_are_tight_enough_to_catch_a_wrong_kernel():
    """A kernel that rounds every weight to bfloat16 would break the float32 bound."""
    p = dict(k=150, n=40, bias=False, axis=1, seed=5, scale=1.0)
    x, q, b = make(p, 20, "int8")
    wrong = F.linear(x, w_nk(q).bfloat16().float())
    with pytest.raises(AssertionError):
        assert_within_bound(wrong, x, w_nk(q), b)
    assert cg.gamma(1) == 2.0**-23 / (1 - 2.0**-23)


# ---- dispatch: the ops and the backend ------------------------------------------------------

def op_args(q):
    return q.codes, q.scales, list(q.side.values()), ops.qtensor_meta(q)


@cpu_only
def test_ops_run_the_kernels_with_impl_triton(monkeypatch):
    p = dict(k=90, n=24, bias=True, axis=1, seed=7, scale=1.0)
    x, q, b = make(p, 5, "mxint8")
    calls = []
    real = cg.linear
    monkeypatch.setattr(cg, "linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = torch.ops.qcompile.linear(x, *op_args(q), "mxint8", b, "triton")
        assert calls and torch.equal(y, real(x, q, "mxint8", b))
        w = torch.ops.qcompile.dequantize(*op_args(q), "triton")
        assert torch.equal(w.view(torch.int32), qcompile.dequantize(q).view(torch.int32))
        a = torch.ops.qcompile.fake_quantize_act(x, "mxfp8_e4m3", -1, "triton")
        assert torch.equal(a.view(torch.int32),
                           qcompile.fake_quantize(x, "mxfp8_e4m3").view(torch.int32))
        # "auto" on CPU tensors is the reference
        calls.clear()
        y_auto = torch.ops.qcompile.linear(x, *op_args(q), "mxint8", b, "auto")
        assert not calls and torch.equal(y_auto, reference(x, q, b, "mxint8")[1])
    with pytest.raises(ValueError, match="unknown impl"):
        torch.ops.qcompile.linear(x, *op_args(q), "", b, "cuda")


@cpu_only
def test_ops_fall_back_to_the_reference_with_one_warning(monkeypatch):
    p = dict(k=64, n=16, bias=False, axis=1, seed=8, scale=1.0)
    x, q, b = make(p, 3, "int4")
    ref = reference(x, q, b)[1]
    monkeypatch.setattr(config, "_said", set())
    monkeypatch.setenv("QCOMPILE_STRICT", "0")  # a failing kernel: the fallback is under test

    def broken(*a, **k):
        raise NotImplementedError("simulated: no kernel for this format")
    monkeypatch.setattr(cg, "linear", broken)
    with pytest.warns(UserWarning, match="Triton kernel for int4") as rec:
        for _ in range(3):
            assert torch.equal(torch.ops.qcompile.linear(x, *op_args(q), "", b, "triton"), ref)
    assert sum("qcompile::linear" in str(r.message) for r in rec) == 1
    # no interpreter and no GPU: the launch cannot happen, the result is still the reference
    # (no kernel by design: strict mode, back on after undo(), falls back too)
    monkeypatch.undo()
    monkeypatch.setattr(config, "_said", set())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.warns(UserWarning, match="reference implementation"):
        assert torch.equal(torch.ops.qcompile.linear(x, *op_args(q), "", b, "triton"), ref)
    with pytest.warns(UserWarning, match="need CUDA tensors"):
        w = torch.ops.qcompile.dequantize(*op_args(q), "triton")
    assert torch.equal(w, qcompile.dequantize(q))
    monkeypatch.setattr("qcompile.codegen.select.quant_supported", lambda fmt: False)
    with pytest.warns(UserWarning, match="fake_quantize_act"):
        got = torch.ops.qcompile.fake_quantize_act(x, "mxint8", -1, "triton")
    assert torch.equal(got, qcompile.fake_quantize(x, "mxint8"))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(11)
        self.fc1 = nn.Linear(72, 40)
        self.fc2 = nn.Linear(40, 24)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


TINY_POLICY = Policy({"fc1": LayerSpec(weight="mxint8", act="mxint8")},
                     default=LayerSpec(weight="nf4"))


def test_compiled_tiny_model_with_triton_kernels(monkeypatch):
    """kernels='triton' (the interpreter, or the GPU): the kernels run, and the result matches
    the eager fake-quantised model on the CPU within the bound propagated through both layers."""
    torch._dynamo.reset()
    monkeypatch.delenv("QCOMPILE_KERNELS", raising=False)
    calls = []
    real = cg.linear
    monkeypatch.setattr(cg, "linear", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    model = Tiny().eval().to(DEVICE)
    ref = qcompile.fake_quantize_model_(Tiny().eval(), TINY_POLICY)
    f = torch.compile(model, backend="blockquant", fullgraph=True,
                      options={"policy": TINY_POLICY, "lowering": "eager", "kernels": "triton"})
    for shape in ((2, 3, 72), (40, 72)):  # M = 6 (GEMV) and M = 40 (GEMM)
        x = torch.randn(*shape)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error")
            y = host(f(dev(x)))
            h = F.relu(ref.fc1(x))  # the eager model's hidden layer (fc1's act hook applied)
            y_ref = ref(x)
        x2, h2 = x.reshape(-1, 72), h.reshape(-1, 40)
        xq = qcompile.fake_quantize(x2, "mxint8")
        w1, w2 = ref.fc1.weight.double(), ref.fc2.weight.double()
        b1, b2 = ref.fc1.bias.double().abs(), ref.fc2.bias.double().abs()
        # layer 1 (vs the reference's float32 result: twice the bound), then through ReLU and fc2
        d1 = 2 * cg.gamma(72 + 2) * (xq.double().abs() @ w1.abs().T + b1)
        s2 = (h2.double().abs() + d1) @ w2.abs().T + b2
        bound = d1 @ w2.abs().T * (1 + cg.gamma(42)) + 2 * cg.gamma(40 + 2) * s2
        err = (y.reshape(-1, 24).double() - y_ref.reshape(-1, 24).double()).abs()
        assert (err <= bound).all()
    assert calls.count("mxint8") == 2 and calls.count(None) == 2


@cpu_only
def test_backend_kernel_option_and_environment(monkeypatch):
    from qcompile.backend import parse_options
    monkeypatch.delenv("QCOMPILE_KERNELS", raising=False)
    x = torch.randn(2, 8)
    pol = {"policy": TINY_POLICY}
    assert parse_options({**pol, "kernels": "triton"}, [x])["impl"] == "triton"  # interpreter on
    assert parse_options(pol, [x])["impl"] == "auto"
    monkeypatch.setenv("QCOMPILE_KERNELS", "reference")
    assert parse_options({**pol, "kernels": "triton"}, [x])["impl"] == "reference"
    monkeypatch.setenv("QCOMPILE_KERNELS", "fast")
    with pytest.raises(ValueError, match="QCOMPILE_KERNELS"):
        parse_options(pol, [x])
    monkeypatch.setenv("QCOMPILE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):  # CPU tensors, no interpreter
        parse_options({**pol, "kernels": "reference"}, [x])


@cpu_only
def test_quantize_model_layers_follow_the_kernels_option(monkeypatch):
    """QuantLinear's ops default to "auto"; compiling with kernels='triton' points them at the
    kernels (the backend rewrites the impl of qcompile ops already in the graph)."""
    torch._dynamo.reset()
    monkeypatch.delenv("QCOMPILE_KERNELS", raising=False)
    calls = []
    real = cg.linear
    monkeypatch.setattr(cg, "linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = qcompile.quantize_model_(Tiny().eval(), Policy({}, default=LayerSpec(weight="int4")))
    x = torch.randn(3, 72)
    with torch.no_grad():
        eager = m(x)  # "auto" on CPU: the reference
        assert not calls
        f = torch.compile(m, backend="blockquant", options={"policy": TINY_POLICY,
                                                            "lowering": "eager", "kernels": "triton"})
        y = f(x)
    assert len(calls) == 2
    torch.testing.assert_close(y, eager, rtol=1e-5, atol=1e-5)


@cpu_only
def test_kernel_benchmark_smoke_run(tmp_path):
    """python -m benchmarks kernels --smoke: runs end to end on the interpreter, every kernel
    within its bound, and writes the markdown table."""
    from benchmarks import kernels
    from benchmarks.__main__ import MODULES
    assert MODULES["kernels"] == "kernels"
    out = tmp_path / "kernels.md"
    report = kernels.main(["--smoke", "--repeats", "1", "--out", str(out)])
    assert out.read_text() == report
    rows = [line.split("|") for line in report.splitlines() if line.startswith("| ")][1:]
    weight_only = sum(act is None for _, act in kernels.KERNELS)
    large = sum(m >= kernels.DEQUANT_MATMUL_MIN_M for m, _, _ in kernels.SMOKE_MNK)
    assert large >= 1  # the decode-then-matmul rows are exercised too
    assert len(rows) == len(kernels.SMOKE_MNK) * (1 + len(kernels.KERNELS)) + large * weight_only
    assert sum("decoded + torch matmul" in r[4] for r in rows) == large * weight_only
    fractions = [float(r[9]) for r in rows if r[4].strip().startswith("qcompile")]
    assert len(fractions) == len(kernels.SMOKE_MNK) * len(kernels.KERNELS) + large * weight_only
    assert all(0 <= f <= 1 for f in fractions)


AOT_SCRIPT = r'''
import sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qcompile import formats
from qcompile.codegen.cache import load_kernel
from qcompile.codegen.triton.linear import linear_source

DT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
for wf, af, variant, dtype in [("nf4", None, "gemm", "float16"), ("mxfp4", None, "gemv", "bfloat16"),
                              ("mxint8", "mxint8", "gemm", "bfloat16"), ("int4", "mxint8", "gemv", "float16"),
                              ("nf4", "mxfp8_e4m3", "gemm", "float32"), ("bof4s", None, "gemm", "bfloat16"),
                              ("bfp8", "bfp8", "gemm", "float16")]:
    fmt = formats.get(wf)
    tuner = load_kernel(linear_source(fmt, af, variant=variant, dtype=getattr(torch, dtype),
                                      interpret=False), "linear_kernel")
    d = DT[dtype]
    sig = {"x_ptr": "*" + d, "xq_ptr": "*i8", "ax_ptr": "*fp32", "codes_ptr": "*u8",
           "table_ptr": "*fp32", "tensor_scale_ptr": "*fp32",
           "scales_ptr": {torch.float32: "*fp32", torch.uint8: "*u8"}[fmt.scale.stored_dtype],
           "bias_ptr": "*" + d,
           "out_ptr": "*i16" if d == "bf16" else "*" + d, "ws_ptr": "*fp32"}
    fn, heuristics = tuner.fn, {}
    while not isinstance(fn, triton.runtime.JITFunction):  # autotune(heuristics(jit))
        heuristics.update(getattr(fn, "values", {}))
        fn = fn.fn
    sig = {n: sig.get(n, "constexpr" if n.isupper() and len(n) > 1 else "i32") for n in fn.arg_names}
    for cfg in tuner.configs:
        consts = {"HAS_BIAS": True, "BLOCK_M": 1, "QBLOCK": fmt.block_size, **cfg.kwargs}
        consts.update({n: rule({"M": 4000, "N": 4000, "K": 4000, **consts})
                       for n, rule in heuristics.items()})
        k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                                    "enable_fp_fusion": False})
        assert len(k.asm["cubin"]) > 0
    print("compiled", wf, af, variant, dtype, len(tuner.configs), "configs", flush=True)
from qcompile.codegen.triton.linear import ACT_QUANT_TILE, act_quant_source
for af, dtype in [("mxint8", "bfloat16"), ("int8", "float16"), ("bfp8", "float32")]:
    fn = load_kernel(act_quant_source(af, getattr(torch, dtype)), "act_quant_kernel")
    sig = {n: {"x_ptr": "*" + DT[dtype], "xq_ptr": "*i8", "ax_ptr": "*fp32"}.get(
        n, "constexpr" if n.startswith("BLOCK") else "i32") for n in fn.arg_names}
    consts = dict(zip(("BLOCK_M", "BLOCK_K"), ACT_QUANT_TILE))
    k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                       options={"enable_fp_fusion": False})
    assert len(k.asm["cubin"]) > 0
    print("compiled the prologue", af, dtype, flush=True)
'''


@pytest.mark.slow
def test_gpu_sources_compile_for_sm90_without_a_gpu(tmp_path):
    """The GPU variants (every autotune config, fp16/bf16/fp32 dots, int8 dots) and the integer
    path's prologue kernel go through Triton's real compiler down to a cubin for sm_90 (ptxas
    ships with the triton wheel)."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["QCOMPILE_KERNEL_CACHE"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("compiled") == 7 + 3
