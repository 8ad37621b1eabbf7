"""Mixture-of-experts matmuls on the packed codes of the active experts (issue 23).

Every experts implementation of transformers (the eager loop's ``F.linear(x, W[e])`` / ``x @
W[e]``, ``grouped_mm``, ``batched_mm``) runs each expert's matmul as a packed linear on that
expert's codes (``qcompile.ops.expert_linear``), with the CPU kernels or the reference, and never
writes a float copy of an expert on the kernel path. The oracles are independent of the code
under test: tests/test_moe.py's emulation (each expert's matrix fake-quantised with
``qcompile.fake_quantize``), float64 products of the emulation's matrices for the documented
float32 bound, and ``qcompile.quantize(W[e]).nbytes`` of each expert the router picked (read off
the experts module's arguments) for the bytes read.
"""
import copy

import pytest
import torch

import qcompile
from qcompile import ops
from qcompile.expert_stack import PackedExperts
from test_moe import (IDS, POLICY, build, emulation, expert_params, implementations, logits,
                      reference_linears)

pytest.importorskip("transformers")

NAMES = ["qwen3-moe", "mixtral", "gpt-oss"]
CASES = [(n, i) for n in NAMES for i in implementations(n)]
# The default run: every architecture and implementation on the CPU kernels once; the reference
# and the float32 bound on Qwen3-MoE's implementations and GPT-OSS's [E, K, N] layout (eager
# loop); the rest under slow (-m slow)
_DEFAULT = {("reference", "qwen3-moe"), ("bound", "qwen3-moe"), ("bound", "gpt-oss:eager")}


def _cases(test: str, kernels: str = ""):
    """CASES (with ``kernels`` when given), those outside _DEFAULT marked slow."""
    out = []
    for name, impl in CASES:
        key = test if test == "bound" else kernels
        fast = kernels == "cpu" or (key, name) in _DEFAULT or (key, f"{name}:{impl}") in _DEFAULT
        values = (name, impl, kernels) if kernels else (name, impl)
        out.append(pytest.param(*values, marks=() if fast else pytest.mark.slow))
    return out
STEP = IDS[:1, :1]  # one token (a decoding step): 2 of the 4 experts of each layer are idle


def _stacks(model) -> dict[str, PackedExperts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedExperts)}


def _packed(model, kernels: str):
    """quantize_model_'s model with the experts on ``kernels`` (the other layers on the
    reference: only the experts are under test)."""
    packed = reference_linears(qcompile.quantize_model_(copy.deepcopy(model), POLICY))
    for stack in _stacks(packed).values():
        stack.impl = kernels
    return packed


def _active_experts(model, ids) -> dict[str, set[int]]:
    """{experts module name: the experts its router picked} for one forward of ``ids``, read off
    the integer tensor the experts module is called with (its top-k indices)."""
    picked, hooks = {}, []
    parents = {n.rpartition(".")[0] for n in _stacks(model)}
    for name in parents:
        def record(module, args, name=name):
            index = next(a for a in args
                         if isinstance(a, torch.Tensor) and not a.is_floating_point())
            picked[name] = set(index.flatten().tolist())
        hooks.append(model.get_submodule(name).register_forward_pre_hook(record))
    try:
        logits(model, ids)
    finally:
        for h in hooks:
            h.remove()
    return picked


def _poison(stack: PackedExperts, experts):
    """Codes and scales of ``experts`` overwritten with values that decode to NaN or garbage."""
    with torch.no_grad():
        for e in experts:
            stack.codes[e].fill_(0xFF)
            stack.scales[e].fill_(float("nan") if stack.scales.is_floating_point() else 0xFF)


def _expected_bytes(model, name, active) -> int:
    """The packed bytes of every expert the routers picked, once per expert tensor and layer:
    ``qcompile.quantize`` of each picked expert's matrix, in the policy's format."""
    total = 0
    for pname, (p, axis) in expert_params(model, name).items():
        fmt = POLICY.match(pname, "linear")[1].weight
        for e in active[pname.rsplit(".", 1)[0]]:
            total += qcompile.quantize(p[e].detach(), fmt, axis=axis).nbytes
    return total


@pytest.mark.parametrize("name,impl,kernels", _cases("read", "reference") + _cases("read", "cpu"))
def test_only_the_active_experts_packed_codes_are_read(name, impl, kernels, monkeypatch):
    model = build(name, impl)
    packed = _packed(model, kernels)
    if kernels == "cpu":  # no float copy of an expert: decoding is not on the kernel path
        def no_decode(self, e):
            raise AssertionError(f"expert {e} decoded to float on the kernel path")
        monkeypatch.setattr(PackedExperts, "decode", no_decode)
    for ids in (STEP, IDS):
        stacks = _stacks(packed)
        for s in stacks.values():
            s.reset_bytes_read()
        clean = logits(packed, ids)
        read = sum(s.bytes_read for s in stacks.values())
        if kernels == "reference":  # bit for bit the emulation's
            assert torch.equal(clean, logits(emulation(model, name), ids))
        active = _active_experts(packed, ids)
        assert set(active) == {n.rpartition(".")[0] for n in stacks}
        # the run read each picked expert's packed bytes once per expert tensor
        assert read == _expected_bytes(model, name, active)
    # one token picks 2 of 4 experts per layer: the other 2 are never read
    poisoned = _packed(model, kernels)
    active = _active_experts(poisoned, STEP)
    clean = logits(poisoned, STEP)
    idle = 0
    for sname, stack in _stacks(poisoned).items():
        unused = set(range(stack.num_experts)) - active[sname.rpartition(".")[0]]
        idle += len(unused)
        _poison(stack, unused)
    assert idle > 0
    assert torch.equal(logits(poisoned, STEP), clean)
    for stack in _stacks(poisoned).values():  # the poison shows where an expert is read
        _poison(stack, range(stack.num_experts))
    assert not torch.equal(logits(poisoned, STEP), clean)


def _float32_bound(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x @ w exactly, in float64, and the documented bound gamma(K + 2) |x| @ |w| of a float32
    kernel, docs/architecture.md "The accumulation bound"), plus the float64 product's own
    rounding gamma64(K) |x| @ |w|."""
    k = x.shape[-1]
    gamma = (k + 2) * 2.0**-23 / (1 - (k + 2) * 2.0**-23) + k * 2.0**-52 / (1 - k * 2.0**-52)
    x64, w64 = x.double(), w.double()
    return x64 @ w64, gamma * (x64.abs() @ w64.abs())


@pytest.mark.parametrize("name,impl", _cases("bound"))
def test_cpu_kernels_are_within_the_float32_bound(name, impl, monkeypatch):
    model = build(name, impl)
    want = emulation(model, name)
    packed = _packed(model, "cpu")
    # each expert's matrix as the emulation holds it, [K, N] (reduced along its first axis)
    owners = {id(s): pname for pname, s in _stacks(packed).items()}
    emulated = {pname: p.detach() if axis == 0 else p.detach().transpose(1, 2)
                for pname, (p, axis) in expert_params(want, name).items()}
    calls, real, real_grouped = [], ops.expert_linear, ops.experts_linear

    def spy(x, stack, e, bias=None):
        y = real(x, stack, e, bias)
        calls.append((x, owners[id(stack)], e, bias, y))
        return y

    def spy_grouped(x, stack, groups):  # one grouped call (tests/test_moe_grouped.py): per group
        y = real_grouped(x, stack, groups)
        calls.extend((x[r], owners[id(stack)], e, None, y[r].clone()) for e, r in groups)
        return y
    monkeypatch.setattr(ops, "expert_linear", spy)
    monkeypatch.setattr(ops, "experts_linear", spy_grouped)
    logits(packed)
    assert {c[1] for c in calls} == set(emulated)  # every expert tensor went through
    for x, pname, e, bias, y in calls:
        exact, bound = _float32_bound(x.reshape(-1, x.shape[-1]), emulated[pname][e])
        assert bias is None  # (GPT-OSS adds its biases itself)
        err = (y.reshape(exact.shape).double() - exact).abs()
        assert bool((err <= bound).all()), (pname, e, float((err - bound).max()))
    for pname, stack in _stacks(packed).items():  # explain's bookkeeping: the CPU kernel ran
        assert ops.kernels_ran("linear", stack.codes) == ["cpu"], pname


def test_compiled_model_reads_the_packed_experts_without_decoding(monkeypatch):
    model = build("qwen3-moe", "eager")
    monkeypatch.setattr(PackedExperts, "decode", lambda self, e: pytest.fail("decoded"))
    torch._dynamo.reset()
    compiled = copy.deepcopy(model)
    qcompile.compile(compiled, POLICY, lowering="eager", kernels="reference")
    reference_linears(compiled)
    stacks = _stacks(compiled)
    assert stacks and all(s.impl == "reference" for s in stacks.values())
    got = logits(compiled, STEP)
    assert torch.equal(got, logits(emulation(model, "qwen3-moe"), STEP))
    active = _active_experts(reference_linears(qcompile.quantize_model_(
        copy.deepcopy(model), POLICY)), STEP)
    for s in stacks.values():
        s.reset_bytes_read()
    logits(compiled, STEP)
    assert sum(s.bytes_read for s in stacks.values()) == _expected_bytes(model, "qwen3-moe",
                                                                          active)


def test_a_decoding_steps_embedding_row_is_decoded_on_one_thread(monkeypatch):
    # a token's row of the packed table is one row of work: a parallel region of two threads
    # for it only waits for the second thread (on a busy CPU, for milliseconds)
    from qcompile.codegen.cpu import entry, plans
    torch.manual_seed(0)
    table = torch.randn(32, 128)
    q = qcompile.quantize(table, "nf4", axis=1)
    p, threads = plans.plan(q), []
    real = p.decode_fn
    monkeypatch.setattr(p, "decode_fn", lambda *args: threads.append(args[-1].value) or real(*args))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rows = entry.gather_rows(q, torch.tensor([[5]]))
        whole = entry.decode_rows(q, p, 0, 32)
    finally:
        torch.set_num_threads(before)
    assert threads == [1, 2]
    assert torch.equal(rows[0, 0], qcompile.dequantize(q)[5])
    assert torch.equal(whole, qcompile.dequantize(q))
