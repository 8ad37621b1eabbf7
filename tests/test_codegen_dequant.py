"""Generated Triton dequantise kernels equal the reference bit for bit (NaN included).

tests/kernel_device.py sets TRITON_INTERPRET=1 before qcompile.codegen (and so any @triton.jit
kernel) is imported, so on a machine without a GPU the kernels run in Triton's interpreter; with
QCOMPILE_TEST_DEVICE=cuda they run on the GPU. If another test module imports triton first
without it, run this file on its own (or export the variable).
"""
import ast
import dataclasses

from kernel_device import dev, host  # noqa: E402  (before anything imports triton)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

import qcompile  # noqa: E402
import qcompile.codegen  # noqa: E402
from qcompile import formats  # noqa: E402
from qcompile.codegen.triton import dequant as cg  # noqa: E402
from qcompile.codegen.triton import quant as qq  # noqa: E402
from qcompile.formats.packing import pack, unpack  # noqa: E402
from qcompile.formats.qtensor import QTensor  # noqa: E402
from qcompile.formats.scales import AbsmaxScale, Pow2Scale  # noqa: E402
from sweeps import examples  # noqa: E402

FAMILIES = ["fp5_e2m2", "int5", "bfp7", "bfp3", "bl6", "dynexp6", "int2", "fp7_e3m3", "fp6_e3m2"]
ALL = formats.names() + FAMILIES
# the interpreter computes with numpy, which warns where value * multiplier overflows or is NaN
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")
# examples per format (each a few interpreted kernel launches): 6 and 4 by default, ten times
# that under HYPOTHESIS_PROFILE=blockquant-long
SETTINGS = settings(examples(6), derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# float32 values with every kind of edge: NaN/Inf, signed zeros, subnormals, huge and tiny
EDGES = [0.0, -0.0, 1e-45, -1e-45, 1e-40, 1.1754942e-38, 3.4028235e38, -3.4028235e38, 1e-30,
         1e30, 65504.0, 448.0, 6.0, 0.5, -1.0, float("nan"), float("inf"), float("-inf")]
finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
any_f32 = st.one_of(finite_f32, st.sampled_from(EDGES), st.floats(-4, 4, width=32))


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.to(torch.float32) if t.dtype != torch.float32 else t
    return t.contiguous().view(torch.int32)


def assert_same(q: QTensor):
    ref = qcompile.dequantize(q, impl="reference")
    got = host(qcompile.dequantize(dev(q), impl="triton"))
    assert got.shape == ref.shape and got.dtype == ref.dtype
    if ref.dtype == torch.float32:
        a, b = bits(ref), bits(got)
    else:  # fp16 / bf16: compare their own bit patterns
        a, b = ref.view(torch.int16), got.view(torch.int16)
    bad = (a != b).nonzero()
    assert bad.numel() == 0, (f"{q.fmt.key}: {bad.shape[0]} differ, first at {bad[0].tolist()}: "
                              f"ref {ref[tuple(bad[0])].item()!r} triton {got[tuple(bad[0])].item()!r}")


@st.composite
def inputs(draw):
    rows = draw(st.integers(1, 8))
    cols = draw(st.integers(1, 200))
    arr = draw(hnp.arrays(np.float32, (rows, cols), elements=any_f32))
    x = torch.from_numpy(arr.copy())
    style = draw(st.sampled_from(["raw", "normal", "zero_rows"]))
    if style == "normal":  # mostly ordinary data with a few edges sprinkled in
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        scale = draw(st.sampled_from([1e-6, 1.0, 1e4]))
        keep = torch.rand(rows, cols, generator=g) < 0.05
        x = torch.where(keep, x, torch.randn(rows, cols, generator=g) * scale)
    elif style == "zero_rows":
        x[: rows // 2 + 1] = 0.0
    return x


@pytest.mark.parametrize("name", ALL)
@SETTINGS
@given(x=inputs())
def test_dequant_matches_reference(name, x):
    assert_same(qcompile.quantize(x, name))


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "int4", "nf4", "bof4s_opq", "bfp6", "quantile4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtypes_axes_and_blocks(name, dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 70, 5, generator=g) * 10).to(dtype)
    x[0, 3, 1] = float("nan")
    for axis in (0, 1, -1):
        assert_same(qcompile.quantize(x, name, axis=axis))
    assert_same(qcompile.quantize(x, formats.get(name, block_size=None), axis=1))
    assert_same(qcompile.quantize(x, formats.get(name, block_size=24), axis=1))
    assert_same(qcompile.quantize(x.transpose(0, 2), name))  # non-contiguous input


@pytest.mark.parametrize("name", ["mxfp8_e4m3", "int8", "nvfp4", "quantile4"])
def test_empty_and_scalar(name):
    cases = [torch.zeros(3, 0), torch.tensor(-2.5), torch.tensor(float("nan"))]
    if formats.get(name).bits == 8:  # reference pack() cannot reshape [0, K] for b < 8 (reported)
        cases.append(torch.zeros(0, 40))
    for x in cases:
        q = qcompile.quantize(x, name)
        assert_same(q)
        assert qcompile.dequantize(dev(q), impl="triton").shape == x.shape


def _random_codes_qtensor(name, seed, rows=4, cols=256):
    """A QTensor holding every code and arbitrary stored scales (E8M0 0 and 255, every E4M3
    byte, absmax scales that are negative, subnormal, huge, NaN or Inf)."""
    g = torch.Generator().manual_seed(seed)
    q = qcompile.quantize(torch.randn(rows, cols, generator=g), name)
    codes = torch.randint(0, 256, q.codes.shape, generator=g, dtype=torch.uint8)
    if q.fmt.element.bits == 8:
        codes.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    if q.scales.dtype == torch.uint8:
        scales = torch.randint(0, 256, q.scales.shape, generator=g, dtype=torch.uint8)
        scales.view(-1)[:4] = torch.tensor([0, 255, 1, 254], dtype=torch.uint8)
    else:
        raw = torch.randint(-2**31, 2**31 - 1, q.scales.shape, generator=g, dtype=torch.int32)
        scales = raw.view(torch.float32).clone()
        special = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -1e-42, 3.0e38, -7.0])
        scales.view(-1)[: special.numel()] = special[: scales.numel()]
    return QTensor(q.fmt, codes, scales, q.shape, q.dtype, q.axis, q.block, dict(q.side))


@pytest.mark.parametrize("name", [n for n in ALL if n != "bof4s_opq"])
@pytest.mark.parametrize("seed", [0, 1])
def test_every_code_and_scale(name, seed):
    assert_same(_random_codes_qtensor(name, seed))


def test_packing_widths_cross_bytes():
    """3-, 5-, 6- and 7-bit codes straddle byte boundaries: check the decode of a known stream."""
    for width in (3, 5, 6, 7):
        fmt = formats.get(f"int{width}", block_size=16)
        codes = torch.arange(48, dtype=torch.int32) % (2**width)
        packed = pack(codes.reshape(1, 48), width)
        q = QTensor(fmt, packed, torch.full((1, 3), fmt.element.max_value), torch.Size([1, 48]),
                    torch.float32, 1, 16)
        expected = fmt.element.decode(codes)
        got = host(qcompile.dequantize(dev(q), impl="triton"))
        assert torch.equal(bits(got.flatten()), bits(expected))


def code_of(src: str) -> str:
    """What a generated module runs: its syntax tree without comments and docstrings."""
    tree = ast.parse(src)
    tree.body = [n for n in tree.body
                 if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    return ast.dump(tree)


def test_source_is_generated_dumped_and_cached(monkeypatch, capsys, tmp_path):
    src = cg.dequant_source(formats.get("mxfp6_e3m2"))
    # one source per element + scale description: block size and scale rule do not change it
    assert cg.dequant_source(formats.get("mxfp6_e3m2", block_size=64, scale_rule="ceil")) == src
    assert code_of(cg.dequant_source(formats.get("mxfp6_e2m3"))) != code_of(src)
    assert cg.load_kernel(src) is cg.load_kernel(src)
    monkeypatch.setattr(qcompile.codegen.cache, "_KERNELS", {})
    monkeypatch.setenv("QCOMPILE_DUMP_KERNELS", "1")
    monkeypatch.setenv("QCOMPILE_KERNEL_CACHE", str(tmp_path))
    q = qcompile.quantize(torch.linspace(-3, 3, 40).reshape(2, 20), "mxfp6_e3m2")
    assert_same(q)
    err = capsys.readouterr().err
    assert src in err  # the dump is the generated source, whole
    digest = err.split("qcompile kernel ")[1].split()[0]
    assert (tmp_path / f"qk_{digest}.py").read_text() in err  # the file holds the dumped source


# ---- generated quantise kernels: every preset, family and override, bit for bit ------------

QUANT_FORMATS = formats.names() + FAMILIES + [
    "mxfp4[scale_rule=ceil]", "mxfp6_e2m3[block_size=16,scale_rule=ceil]",
    "mxfp8_e4m3[scale_rule=rceil]", "bfp6[scale_rule=rceil]", "mxint8[scale_rule=even]",
    "bm8[scale_rule=even]", "bl8[scale_rule=floor]", "nvfp4[block_size=32]",
    "bof4s[block_size=32]", "int4[opq=0.9]", "quantile4[opq=0.95]", "dynexp8[block_size=128]",
    formats.get("nf4", block_size=None)]  # (a key with block_size=None does not parse back: reported)
POW2_BASES = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "mxint8", "bfp8",
              "bfp4", "bfp3", "bm8", "bl8", "bl3", "fp7_e3m3", "fp5_e1m3"]  # (the fp* with E8M0)


def _tensor_bits(t: torch.Tensor) -> torch.Tensor:
    return bits(t) if t.is_floating_point() else t


def assert_same_qtensor(x, name, axis=-1, fake=False):
    """Triton quantise == reference quantise: codes, scales and side data bit for bit; with
    fake=True also fake_quantize end to end (quantise and dequantise kernels)."""
    ref = qcompile.quantize(x, name, axis=axis)
    got = host(qcompile.quantize(dev(x), name, axis=axis, impl="triton"))
    key = formats.get(name).key
    assert torch.equal(got.codes, ref.codes), f"{key}: codes differ"
    assert got.scales.dtype == ref.scales.dtype and got.scales.shape == ref.scales.shape
    assert torch.equal(bits(got.scales), bits(ref.scales)), f"{key}: scales differ"
    assert (got.shape, got.dtype, got.axis, got.block) == (ref.shape, ref.dtype, ref.axis, ref.block)
    assert list(got.side) == list(ref.side), f"{key}: side data {list(got.side)} vs {list(ref.side)}"
    for k in ref.side:
        assert got.side[k].dtype == ref.side[k].dtype and got.side[k].shape == ref.side[k].shape
        assert torch.equal(_tensor_bits(got.side[k]), _tensor_bits(ref.side[k])), f"{key}: {k} differs"
    if fake:
        fq_ref = qcompile.fake_quantize(x, name, axis=axis)
        fq_got = host(qcompile.fake_quantize(dev(x), name, axis=axis, impl="triton"))
        as_int = (lambda t: bits(t)) if x.dtype == torch.float32 else (lambda t: t.view(torch.int16))
        assert torch.equal(as_int(fq_got), as_int(fq_ref)), f"{key}: fake_quantize differs"


QUANT_SETTINGS = settings(SETTINGS, max_examples=examples(4).max_examples)


@pytest.mark.parametrize("name", QUANT_FORMATS, ids=str)
@QUANT_SETTINGS
@given(x=inputs(), dtype=st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16]),
       axis=st.sampled_from([-1, -1, 0]))
def test_quantize_matches_reference(name, x, dtype, axis):
    assert_same_qtensor(x.to(dtype), name, axis)


def _edge_rows(k=150):
    """One row per kind of edge, K = 150 (not a multiple of any block)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, k, generator=g)
    x[0, :64] = 0.0  # an all-zero block
    x[0, 64], x[0, 65] = 1e-45, -3e-45  # scale so small its reciprocal overflows (clamped)
    x[1, 5] = float("nan")
    x[1, 64:128] = torch.tensor([7e-39, -3e-39, 1e-45, -5.9e-39]).repeat(16)  # subnormal blocks
    x[2, 70] = float("-inf")
    x[2, :3] = torch.tensor([3.4028235e38, -3e38, 1e38])  # huge: n = x * 2^-e near the top
    x[2, 128:] = x[2, 128:] * 1e-30  # tiny, normal
    x[3] = torch.arange(k) * 0.5 - 32  # exact halves: ties round to even
    x[4, :64] = -0.0  # a block of -0: the sign of zero is kept where the element has one
    x[5, :64] = 0.0
    x[5, :3] = torch.tensor([-1e-40, 0.0, 5e-41])  # signed absmax: negative subnormal s (mult -Inf)
    x[6, 32:48] = 1e30
    x[6, 48:64] = -1e-30  # 2^-e * x underflows: the log element keeps it nonzero
    x[7, 16:32] = float("inf")
    return x


EDGES_X = _edge_rows()


@pytest.mark.parametrize("name", formats.names() + ["bl3", "dynexp3", "fp5_e1m3"])
@pytest.mark.filterwarnings("ignore:no bof4:UserWarning")  # whole-row BOF4: the 64 table, warned
def test_quantize_edges(name):
    """Every preset on NaN/Inf, zero, -0, subnormal, huge/tiny and tie rows with K = 150, as
    float32, bfloat16 along axis 0 and float16 in whole-row blocks of a non-contiguous view."""
    x = EDGES_X
    assert_same_qtensor(x, name, fake=True)
    assert_same_qtensor(x.to(torch.bfloat16), name, axis=0)
    whole = formats.get(name, block_size=None)
    assert_same_qtensor(x[:, :140].to(torch.float16).reshape(4, 5, 56).transpose(1, 2), whole, 1)
    for y in (torch.tensor(-3.0), torch.zeros(3, 0), torch.zeros(0, 40)):
        assert_same_qtensor(y, name)
    el = formats.get(name).element
    if el.kind == "codebook" and not el.data_dependent:
        # every threshold (a tie: the lower code) and every level, in blocks whose scale is 1
        table = el.table_tensor()
        values = torch.cat([el.thresholds(table), table])
        rows = torch.zeros(values.numel(), 64)
        rows[:, 0], rows[:, 1] = 1.0, values
        assert_same_qtensor(rows, formats.get(name, block_size=64) if name != "bof4s_opq" else name)


def _binade_edges():
    """float32 values (both signs) at and around every place a power-of-two scale rule can turn:
    binade edges, max_value mantissas, carry thresholds, in normal and subnormal binades."""
    mants = [0, 1, 0x200000, 0x3504F3, 0x3504F4, 0x3504F5, 0x3FFFFF, 0x400000, 0x400001,
             0x5FFFFF, 0x600000, 0x600001, 0x6FFFFF, 0x700000, 0x700001, 0x77FFFF, 0x780000,
             0x780001, 0x7BFFFF, 0x7C0000, 0x7C0001, 0x7E0000, 0x7EFFFF, 0x7F0000, 0x7F0001,
             0x7F8000, 0x7FFFFF]
    out = set()
    for e in [*range(-149, -120), *range(-5, 6), *range(120, 128)]:
        for m in mants:
            if e >= -126:
                b = ((e + 127) << 23) | m
            else:  # subnormal: the same significand shifted down (truncated)
                b = ((1 << 23) | m) >> (-126 - e) if -126 - e < 24 else 1
            out |= {b, b | (1 << 31)}
    return torch.tensor(sorted(out), dtype=torch.int64).to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("rule", ["floor", "ceil", "rceil", "even"])
def test_pow2_rules_at_every_turning_point(rule):
    """Each value is the maximum of its own block (block_size=2, with a zero), so every scale
    decision of the rule is compared with the reference, for every kind of element."""
    v = _binade_edges()
    x = torch.stack([v, torch.zeros_like(v)], 1)
    for base in POW2_BASES:
        fmt = formats.get(base, block_size=2)
        assert_same_qtensor(x, dataclasses.replace(fmt, scale=Pow2Scale(rule)))


def test_signed_absmax_zero_tie():
    """docs/formats.md: signed absmax takes the positive one on a tie, so a zero block mixing
    +0 and -0 (or -0 with +0 padding) has s = +0; a block of -0 only has s = -0."""
    x = torch.zeros(3, 64)
    x[0, 1::2] = -0.0
    x[1, :40] = -0.0  # torch's amax alone would answer -0 or +0 depending on positions
    x[2] = -0.0
    for name in ("bof4s", "bof4s_mae", "bof4s_opq"):
        for impl in ("triton", "reference"):
            q = host(qcompile.quantize(dev(x) if impl == "triton" else x, name, impl=impl))
            assert bits(q.scales).flatten().tolist() == [0, 0, -2**31], impl
    q = host(qcompile.quantize(dev(x[:, :40]), "bof4s", impl="triton"))  # -0 with +0 padding
    assert bits(q.scales)[2].item() == 0


def test_every_preset_has_a_generated_quantise_kernel():
    for name in QUANT_FORMATS:
        assert qcompile.codegen.supported(formats.get(name)), name
    # a signed absmax scale on a non-codebook element is no preset and is not generated
    odd = dataclasses.replace(formats.get("int4"), scale=AbsmaxScale(signed=True))
    assert not qcompile.codegen.supported(odd)
    with pytest.raises(NotImplementedError, match="no generated kernel for"):
        qcompile.quantize(torch.ones(4), odd, impl="triton")


def test_quant_source_comes_from_the_description():
    src = qq.quant_source(formats.get("nf4"))
    assert "def quant_kernel(" in src and "thr_ptr" in src
    # a 16-level code by branch-free binary search: 4 threshold loads, not 15 compares
    assert src.count("tl.load(thr_ptr") == 4
    # the block size is a launch argument, the table a tensor: one kernel body per element kind
    # and scale kind (comments and the docstring name the table, the code does not)
    assert qq.quant_source(formats.get("nf4", block_size=32)) == src
    assert code_of(qq.quant_source(formats.get("af4"))) == code_of(src)
    assert "tensor_scale_ptr" in qq.quant_source(formats.get("nvfp4"))  # NVFP4's tensor scale: an input
    # each pow2 scale rule is its own code, not only its own comment
    rules = [qq.quant_source(formats.get("mxfp4", scale_rule=r)) for r in ("floor", "ceil", "rceil", "even")]
    assert len({code_of(s) for s in rules}) == 4
    assert cg.load_kernel(src, "quant_kernel") is cg.load_kernel(src, "quant_kernel")
