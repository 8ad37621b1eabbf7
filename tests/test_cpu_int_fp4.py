"""fp4 weights on the CPU integer path: mxfp4 / nvfp4 (E2M1, every value a multiple of 1/2)
times int8 activations as exact integer block dot products (codegen/cpu/int_kernels.cpp, the
``_t`` entry points: each code read as the integer 2 v through a table).

Oracle, computed here without the kernels: the weight's integers 2 v from the reference decode of
its codes (checked to be integers, and times their block multiplier / 2 to be the reference's
dequantised weight), the activation's codes and multipliers from the reference quantiser
(tests/int_formula.py ``int_operands``, checked against ``qcompile.fake_quantize``), exact int64
block dot products, then the integer path's float32 formula in K order (docs/architecture.md):
``y = fl32(...fl32(fl32(D_0 s_0) + fl32(D_1 s_1))... + b)``, ``s_t = fl32(a_x a_w)``, here with
``a_w = multiplier / 2``. Bit for bit on every instruction set this machine runs.
"""
import pytest
import torch

import qcompile
from int_formula import int_operands
from qcompile import LayerSpec, Policy, formats
from qcompile.codegen import cpu, select
from qcompile.formats.packing import unpack

ISAS = [i for i in cpu.ISAS if cpu.ISAS.index(i) >= cpu.ISAS.index(cpu.machine_isa())]
E2M1_TWICE = {0, 1, 2, 3, 4, 6, 8, 12}  # 2 x the E2M1 magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}
BITS_VIEW = {torch.bfloat16: torch.int16, torch.float32: torch.int32}
# weight, activation: E8M0 weight blocks of 32 (packed nibbles on AVX2), 64 and 128 with absmax
# or E8M0 activations; activation blocks of 16 (the codes unpacked through the table); NVFP4's
# E4M3 x tensor-scale multipliers; an absmax-scaled E2M1 weight
PAIRS = [("mxfp4", "mxint8"), ("mxfp4[block_size=64]", "int8"),
         ("mxfp4[block_size=128]", "mxint8"), ("mxfp4", "int8[block_size=16]"),
         ("nvfp4", "mxint8[block_size=16]"), ("fp4_e2m1", "int8")]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CPU_ISA", request.param)
    return request.param


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and \
        torch.equal(a.view(BITS_VIEW[a.dtype]), b.view(BITS_VIEW[b.dtype]))


def e2m1_operands(q):
    """The weight's integers 2 v [rows, padded K] (int64) and a_w = multiplier / 2 [rows,
    blocks] (float32, exact), from the reference's decode; checked against its dequantise."""
    el, rows = q.fmt.element, q.scales.shape[0]
    codes = unpack(q.codes.reshape(rows, -1), el.bits, q.scales.shape[-1] * q.block)
    twice = el.decode(codes).double() * 2
    assert torch.equal(twice, twice.round()) and set(twice.abs().long().unique().tolist()) \
        <= E2M1_TWICE
    mult = q.fmt.scale.multiplier(q.scales, el, q.side).to(torch.float32)
    k = q.shape[1]
    w = (twice / 2 * mult.double().repeat_interleave(q.block, 1))[:, :k]  # exact in float64
    assert torch.equal(w.to(torch.float32).to(q.dtype), qcompile.dequantize(q))
    return twice.long(), mult * 0.5


def formula(x, q, b, act):
    """The integer path's result for float32 x [M, K] and the E2M1 weight q, independently."""
    af = formats.get(act)
    xi, ax = int_operands(qcompile.quantize(x, af, axis=-1))
    k = x.shape[1]
    if af.scale.kind == "pow2":  # the integers times the multipliers: the fake-quantised x
        recon = xi[:, :k].double() * ax.double().repeat_interleave(af.block_size, 1)[:, :k]
        assert torch.equal(recon, qcompile.fake_quantize(x, af, axis=-1).double())
    wi, aw = e2m1_operands(q)
    acc = torch.zeros(x.shape[0], wi.shape[0], dtype=torch.float32)
    for t in range(-(-k // af.block_size)):
        ks = slice(t * af.block_size, min((t + 1) * af.block_size, k))
        d = xi[:, ks] @ wi[:, ks].T  # int64, exact
        s = ax[:, t][:, None] * aw[:, (t * af.block_size) // q.block][None, :]
        acc = acc + d.to(torch.float32) * s
    return acc + b if b is not None else acc


def problem(m, n, k, seed, dtype=torch.float32):
    """Weights with outliers (many binades per block) and an all-zero row; activations at three
    magnitudes' worth of spread; a bias."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) < 0.05] *= 30
    w[0] = 0.0
    x = torch.randn(m, k, generator=g) * 2.0 ** torch.randint(-6, 6, (m, 1), generator=g)
    b = torch.randn(n, generator=g)
    return x.to(dtype), w.to(dtype), b.to(dtype)


def test_the_integer_grid_of_elements():
    """The format layer's rule: every value an integer multiple of 2^-s, |2^s v| <= 127. The
    expected (s, largest |2^s v|) from each element's definition."""
    from qcompile.formats.elements import CodebookElement, FloatElement, IntElement, integer_grid
    assert integer_grid(FloatElement(2, 1)) == (1, 12)  # E2M1: 0.5 .. 6
    assert integer_grid(FloatElement(2, 3)) == (3, 60)  # E2M3: 0.125 .. 7.5
    assert integer_grid(FloatElement(2, 0)) == (0, 4)  # E2M0: 1, 2, 4
    assert integer_grid(IntElement(8, frac_bits=6)) == (6, 127)  # mxint8
    assert integer_grid(IntElement(4)) == (0, 7)
    assert integer_grid(FloatElement(3, 2)) is None  # E3M2: 2^-4 .. 28, 448 leaves a byte
    assert integer_grid(FloatElement(4, 3, specials="fn")) is None  # a NaN code
    assert integer_grid(formats.get("nf4").element) is None  # not dyadic
    assert integer_grid(CodebookElement(4, "quantile")) is None  # data-dependent


def test_selection_takes_the_integer_path_for_fp4_weights():
    w = torch.randn(8, 96)
    take = [("mxfp4", "mxint8"), ("mxfp4", "int8[block_size=32]"),
            ("nvfp4", "mxint8[block_size=16]"), ("fp4_e2m1", "int8"), ("mxfp6_e2m3", "mxint8")]
    # (nvfp4 x mxint8: activation blocks of 32 across weight blocks of 16)
    leave = [("mxfp4", "mxfp8_e4m3"), ("mxfp4", "nvfp4"), ("mxfp6_e3m2", "mxint8"),
             ("nvfp4", "mxint8"), ("fp4_e2m1[opq=0.01]", "int8")]
    x = torch.randn(1, 96)
    for wfmt, act in take:
        q = qcompile.quantize(w, wfmt, axis=1)
        assert select.cpu_int_applies(q, formats.get(act)), (wfmt, act)
        assert select.choose(q, act, x, "cpu").kernel == "cpu_int"
    for wfmt, act in leave:
        q = qcompile.quantize(w, wfmt, axis=1)
        assert not select.cpu_int_applies(q, formats.get(act)), (wfmt, act)
        assert select.choose(q, act, x, "cpu").kernel == "cpu"
    # the Triton integer path keeps int weights only (its kernels have no table)
    assert not select.int_path(formats.get("mxfp4"), formats.get("mxint8"), "gemv")
    assert select.int_path(formats.get("mxfp4"), formats.get("mxint8"), "gemv", cpu=True)


@pytest.mark.parametrize("wfmt, act", PAIRS)
def test_fp4_linear_is_the_formula_bit_for_bit(wfmt, act, isa):
    """GEMV (M = 1) and panels (M > 16) rows, K ending inside a block and inside a byte, N past
    multiples of 8 and 16."""
    seed = 0
    for k in (31, 64, 97, 300):
        for m, n in ((1, 9), (3, 17), (17, 1), (40, 24)):
            seed += 1
            x, w, b = problem(m, n, k, seed)
            q = qcompile.quantize(w, wfmt, axis=1)
            if not select.cpu_int_applies(q, formats.get(act)):  # a clamped weight block
                assert q.block % formats.get(act).block_for(k)
                continue
            for bias in (b, None):
                y = cpu.linear(x, q, act, bias)
                assert same_bits(y, formula(x, q, bias, act)), (k, m, n)


@pytest.mark.parametrize("wfmt", ["mxfp4", "mxfp4[block_size=128]"])
def test_packed_nibbles_at_the_largest_int16_sums(wfmt, isa):
    """Every weight at +-6 or +-4 times its block's scale (2 v = +-12, +-8, the table's ends)
    and activations at the int8 codes' ends: the packed 4-bit dot products' int16 pair sums
    at their largest."""
    g = torch.Generator().manual_seed(4)
    for k, m, n in ((64, 1, 9), (128, 3, 17), (96, 2, 8)):
        w = torch.where(torch.rand(n, k, generator=g) < 0.5, -6.0, 6.0)
        w[:, 1::3] *= 2 / 3
        x = torch.where(torch.rand(m, k, generator=g) < 0.5, -1.0, 1.0) * 127 / 64  # codes 127
        q = qcompile.quantize(w, wfmt, axis=1)
        assert select.choose(q, "mxint8", x, "cpu").kernel == "cpu_int"
        assert same_bits(cpu.linear(x, q, "mxint8"), formula(x, q, None, "mxint8"))


def test_bf16_model_is_the_formula_rounded_once(isa):
    """A bfloat16 model: x and the bias widened to float32 (exact), the formula, the output
    rounded to bfloat16 once."""
    for m, k in ((1, 97), (20, 200)):
        x, w, b = problem(m, 24, k, seed=m)
        x, w, b = x.to(torch.bfloat16), w.to(torch.bfloat16), b.to(torch.bfloat16)
        q = qcompile.quantize(w, "mxfp4", axis=1)
        assert select.choose(q, "mxint8", x, "cpu").kernel == "cpu_int"
        y = cpu.linear(x, q, "mxint8", b)
        want = formula(x.float(), q, b.float(), "mxint8").to(torch.bfloat16)
        assert same_bits(y, want)


def binade_spread_input(k: int, rows: int = 3) -> torch.Tensor:
    """Activations whose 32-element blocks span many binades: float32 accumulation of the
    fake-quantised operands rounds differently from the integer formula here."""
    g = torch.Generator().manual_seed(0)
    scale = 2.0 ** torch.randint(-12, 12, (rows, k // 32), generator=g)
    return torch.randn(rows, k, generator=g) * scale.repeat_interleave(32, 1)


def test_compiled_model_runs_the_int_operator_on_mxfp4_weights():
    """A compiled MLP (eager lowering) with mxfp4 weights and mxint8 activations: each layer is
    ``qcompile_cpu::int_linear``, explain says "cpu (ISA, int)", and the output is the formula
    of each layer's input, bit for bit (the float path, told apart on this input, is not)."""
    from qcompile.backend import compiled_variants
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 32))
    qcompile.compile(model, Policy(default=LayerSpec(weight="mxfp4", act="mxint8")),
                     lowering="eager")
    x = binade_spread_input(1024)
    with torch.no_grad():
        y = model(x)
        q0 = qcompile.quantize(model[0].weight, "mxfp4", axis=1)
        q2 = qcompile.quantize(model[2].weight, "mxfp4", axis=1)
        h = formula(x, q0, model[0].bias, "mxint8")
        float_path = torch.nn.functional.linear(qcompile.fake_quantize(x, "mxint8", axis=-1),
                                                qcompile.dequantize(q0), model[0].bias)
        assert not torch.equal(float_path, h)
        want = formula(torch.relu(h), q2, model[2].bias, "mxint8")
    assert same_bits(y, want)
    targets = [str(n.target) for n in compiled_variants()[0].gm.graph.nodes]
    assert targets.count("qcompile_cpu.int_linear.default") == 2
    kernels = [r.kernel for r in qcompile.explain(model).rows if r.weight_fmt != "-"]
    assert kernels == [f"cpu ({cpu.machine_isa()}, int)"] * 2


def test_compiled_nvfp4_runs_the_integer_path_through_the_python_op():
    """NVFP4's multipliers come from the tensor's side data, so the graph keeps
    ``qcompile::linear`` (no C++ operator), whose CPU entry runs the integer path: explain says
    "cpu (ISA, int)" and the output is the formula, bit for bit."""
    from qcompile.backend import compiled_variants
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(256, 40))
    act = "mxint8[block_size=16]"
    qcompile.compile(model, Policy(default=LayerSpec(weight="nvfp4", act=act)),
                     lowering="eager")
    x = binade_spread_input(256)
    with torch.no_grad():
        y = model(x)
        want = formula(x, qcompile.quantize(model[0].weight, "nvfp4", axis=1), model[0].bias,
                       act)
    assert same_bits(y, want)
    targets = [str(n.target) for n in compiled_variants()[0].gm.graph.nodes]
    assert "qcompile.linear.default" in targets
    kernels = [r.kernel for r in qcompile.explain(model).rows if r.weight_fmt != "-"]
    assert kernels == [f"cpu ({cpu.machine_isa()}, int)"]
