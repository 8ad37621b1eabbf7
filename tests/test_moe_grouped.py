"""One C++ operator call per grouped expert matmul (issue 23): ``grouped_mm`` and ``batched_mm``
run all their experts in one call of ``qcompile_cpu::experts_linear`` on the CPU kernels.

Oracles, independent of the code under test: the per-expert path (``ops.expert_linear`` on each
group's rows: one ``qcompile_cpu::linear`` call per expert, the kernels the grouped call must
equal bit for bit), ``qcompile.fake_quantize`` of each expert's matrix with float64 products for
the documented float32 bound (tests/test_moe_kernels.py's), the number of expert tensors for the
number of grouped matmuls per forward, and idle experts poisoned.
"""
import pytest
import torch

import qcompile
from qcompile import ops
from qcompile.codegen import cpu
from qcompile.codegen.cpu import entry
from qcompile.expert_stack import pack_experts
from test_moe import IDS, build, expert_params, emulation, implementations
from test_moe_kernels import STEP, _active_experts, _float32_bound, _packed, _poison, _stacks

pytest.importorskip("transformers")

GROUPED = [(n, i) for n in ("qwen3-moe", "gpt-oss") for i in implementations(n)
           if i in ("grouped_mm", "batched_mm")]


@pytest.fixture
def operator_calls(monkeypatch):
    """The names of the ``qcompile_cpu`` operators called, in order."""
    calls, real = [], entry._operator

    def counted(name):
        op = real(name)

        def call(*args):
            calls.append(name)
            return op(*args)
        return call
    monkeypatch.setattr(entry, "_operator", counted)
    return calls


def _spy_groups(monkeypatch) -> list:
    """(x, stack, groups, y) of every ``ops.experts_linear`` call, as they were then (a model
    may write into its tensors afterwards)."""
    seen, real = [], ops.experts_linear

    def spy(x, packed, groups):
        y = real(x, packed, groups)
        seen.append((x.clone(), packed, groups, y.clone()))
        return y
    monkeypatch.setattr(ops, "experts_linear", spy)
    return seen


@pytest.mark.parametrize("name,impl", GROUPED)
def test_a_grouped_matmul_is_one_operator_call_equal_to_the_per_expert_kernels(
        name, impl, operator_calls):
    model = build(name, impl)
    packed = _packed(model, "cpu")
    stacks = _stacks(packed)
    owners = {id(s): pname for pname, s in stacks.items()}
    # each expert's matrix as the emulation holds it, [K, N]
    emulated = {p: w.detach() if axis == 0 else w.detach().transpose(1, 2)
                for p, (w, axis) in expert_params(emulation(model, name), name).items()}
    for ids in (STEP, IDS):
        operator_calls.clear()
        with pytest.MonkeyPatch.context() as patch:
            seen = _spy_groups(patch)
            logits(packed, ids)
        # one call per expert tensor and forward (each runs one grouped matmul), none per expert
        assert operator_calls == ["experts_linear"] * len(stacks)
        assert len(seen) == len(stacks)
        for x, stack, groups, y in seen:
            covered = torch.zeros(x.shape[0], dtype=torch.bool)
            for e, rows in groups:
                covered[rows] = True
                assert torch.equal(y[rows], ops.expert_linear(x[rows], stack, e))
                exact, bound = _float32_bound(x[rows], emulated[owners[id(stack)]][e])
                assert bool(((y[rows].double() - exact).abs() <= bound).all())
            assert not y[~covered].any()  # rows of no group: zero


@pytest.mark.parametrize("name,impl", GROUPED[:2])
def test_idle_experts_poisoned_do_not_change_the_grouped_call(name, impl, operator_calls):
    model = build(name, impl)
    poisoned = _packed(model, "cpu")
    active = _active_experts(poisoned, STEP)
    clean = logits(poisoned, STEP)
    for sname, stack in _stacks(poisoned).items():
        _poison(stack, set(range(stack.num_experts)) - active[sname.rpartition(".")[0]])
    operator_calls.clear()
    assert torch.equal(logits(poisoned, STEP), clean)
    assert operator_calls == ["experts_linear"] * len(_stacks(poisoned))
    for stack in _stacks(poisoned).values():  # the poison shows where an expert is read
        _poison(stack, range(stack.num_experts))
    assert not torch.equal(logits(poisoned, STEP), clean)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _stack(fmt: str, dtype=torch.float32):
    torch.manual_seed(0)
    w = torch.randn(5, 24, 80)  # [E, N, K], reduced along K
    stack = pack_experts(w.to(dtype), fmt, 2)
    stack.impl = "cpu"
    return w.to(dtype), stack


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["nf4", "int4[block_size=32]", "mxfp4", "int8"])
def test_grouped_rows_of_any_count_equal_the_per_expert_kernels(fmt, dtype, operator_calls):
    w, stack = _stack(fmt, dtype)
    x = torch.randn(40, 80).to(dtype)
    # slices (grouped_mm: an empty group, a GEMV-sized one, one of panels and a GEMM) and index
    # tensors (batched_mm), rows 38.. in no group
    for groups in ([(3, slice(0, 2)), (1, slice(2, 2)), (0, slice(2, 38))],
                   [(4, torch.tensor([7, 1])), (2, torch.arange(8, 30)), (3, torch.tensor([0]))]):
        operator_calls.clear()
        stack.reset_bytes_read()
        y = ops.experts_linear(x, stack, groups)
        assert operator_calls == ["experts_linear"]
        # the packed bytes of the experts named, each once
        assert stack.bytes_read == sum(qcompile.quantize(w[e], fmt, axis=1).nbytes
                                       for e, _ in groups)
        covered = torch.zeros(40, dtype=torch.bool)
        for e, rows in groups:
            covered[rows] = True
            assert torch.equal(y[rows], ops.expert_linear(x[rows], stack, e))
            if dtype == torch.float32:
                emulated = qcompile.fake_quantize(w[e], fmt, axis=1)
                exact, bound = _float32_bound(x[rows], emulated.t())
                assert bool(((y[rows].double() - exact).abs() <= bound).all())
        assert y.dtype == dtype and not y[~covered].any()


def test_the_operator_refuses_a_group_outside_the_stack_or_x():
    _, stack = _stack("nf4")
    plan, x = stack.grouped_plan(), torch.randn(4, 80)
    with pytest.raises(RuntimeError, match="names expert 5 of 5"):
        cpu.experts_linear(x, stack.codes, stack.scales, plan, torch.tensor([5]),
                           torch.tensor([0, 4]))
    with pytest.raises(RuntimeError, match="outside x's 4 rows"):
        cpu.experts_linear(x, stack.codes, stack.scales, plan, torch.tensor([1]),
                           torch.tensor([0, 5]))
    with pytest.raises(RuntimeError, match="row 2 is outside x's 4 rows or in two groups"):
        cpu.experts_linear(x, stack.codes, stack.scales, plan, torch.tensor([1, 3]),
                           torch.tensor([0, 1, 2]), torch.tensor([2, 2]))


def test_the_operators_fake_gives_the_output_shape():
    _, stack = _stack("nf4")
    plan = stack.grouped_plan()
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = torch.ops.qcompile_cpu.experts_linear(
            torch.empty(7, 80), stack.codes, stack.scales, torch.tensor([0]),
            torch.tensor([0, 7]), None, plan.register(), 24, 80, plan.block)
    assert y.shape == (7, 24) and y.dtype == torch.float32


def test_stacks_with_weights_kept_apart_keep_the_per_expert_calls(operator_calls):
    # (a guard of the routing: the per-expert path was the only one before the grouped call)
    torch.manual_seed(0)
    stack = pack_experts(torch.randn(3, 24, 80), "bof4s_opq", 2)
    stack.impl = "cpu"
    x = torch.randn(3, 80)
    y = ops.experts_linear(x, stack, [(0, slice(0, 1)), (2, slice(1, 3))])
    assert operator_calls == ["linear", "linear"]
    assert torch.equal(y[1:], ops.expert_linear(x[1:], stack, 2))


def test_counting_the_bytes_read_sets_no_module_attribute(monkeypatch):
    # a decoding step counts each active expert's bytes: through nn.Module.__setattr__ (which
    # searches the parameters, buffers and submodules) that was a large share of a small
    # block's Python time; the count itself is checked against quantize's bytes
    w, stack = _stack("nf4")
    groups = [(e, slice(e, e + 1)) for e in range(4)]
    ops.experts_linear(torch.randn(4, 80), stack, groups)  # (the first call makes its caches)
    stack.reset_bytes_read()
    sets, real = [], torch.nn.Module.__setattr__

    def counted(mod, name, value):
        sets.append(name)
        real(mod, name, value)
    monkeypatch.setattr(torch.nn.Module, "__setattr__", counted)
    ops.experts_linear(torch.randn(4, 80), stack, groups)
    stack.decode(4)
    assert sets == []
    assert stack.bytes_read == sum(qcompile.quantize(w[e], "nf4", axis=1).nbytes for e in range(5))
