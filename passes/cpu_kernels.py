"""Pass 6 (CPU graphs): ``qcompile::linear`` -> ``qcompile_cpu::linear``, the C++ operator.

Both compute the same thing with the same C++ operator (codegen/cpu/operator.cpp), called here
without a Python frame, which a decoding model pays for every layer and token. It is used where
the graph runs without autograd (compiled with grad disabled: Dynamo guards on grad mode) and
the selector (codegen/select.py ``cpu_operator``) says the op would run the CPU kernels anyway
and nothing is lost: kernels "auto" or "cpu", the activation on the CPU, a float32, bfloat16
or float16 weight the CPU kernels read whose tables depend on the format alone (not quantile codebooks nor NVFP4's
tensor scale, which come from the tensor's side data), no proxy columns. Anything else stays
``qcompile::linear``, which says itself what it cannot do. The format's
element and multiplier tables are registered with the operator library (named by a format id).
Int weights (and mxfp4-like weights of integers times 2^-s) with int activations
(codegen/cpu/int_kernels.cpp) become ``qcompile_cpu::int_linear``, which quantises the
activations itself; another activation format becomes a ``qcompile::fake_quantize_act`` node
before ``qcompile_cpu::linear``.
"""
from __future__ import annotations

import torch
from torch import fx

from qcompile import formats, ops
from qcompile.codegen import cpu, select

from .graph import input_values

LINEAR = (torch.ops.qcompile.linear.default, torch.ops.qcompile.linear)  # fused, or traced
FQ_ACT = torch.ops.qcompile.fake_quantize_act.default
ARGS = ("x", "codes", "scales", "side", "meta", "act_fmt", "bias", "impl")


def _arguments(node) -> dict:
    values = dict(zip(ARGS, node.args))
    values.update(node.kwargs)
    values.setdefault("impl", "reference")
    return values


def _on_cpu(node) -> bool:
    v = node.meta.get("val", node.meta.get("example_value")) if isinstance(node, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.device.type == "cpu"


def use_cpu_kernels(gm: fx.GraphModule, example_inputs) -> fx.GraphModule:
    if torch.is_grad_enabled():
        return gm
    g, values = gm.graph, input_values(gm, example_inputs)
    changed = False
    for node in list(g.nodes):
        if node.op != "call_function" or node.target not in LINEAR:
            continue
        a = _arguments(node)
        try:
            af = formats.get(a["act_fmt"]) if a["act_fmt"] else None
            q = ops.qtensor_from(values[a["codes"]], values[a["scales"]],
                                 [values[s] for s in a["side"]], a["meta"])
            choice = select.cpu_operator(q, af, a["impl"], _on_cpu(a["x"]))
            plan = cpu.plan(q) if choice.kernel != "reference" else None
        except (KeyError, NotImplementedError, ValueError):
            continue  # not graph inputs, or no CPU kernel: the op says so when it runs
        if plan is None:
            continue  # the Python entry: it says itself what it cannot do
        side = dict(zip(q.side, a["side"]))
        fmt_id = plan.register()  # loads the operator library on first use
        x = a["x"]
        with g.inserting_before(node):
            if choice.kernel == "cpu_int":
                new = g.call_function(torch.ops.qcompile_cpu.int_linear.default, (
                    x, a["codes"], a["scales"], a["bias"], fmt_id, plan.register_act(af),
                    q.scales.shape[0], plan.k, q.block))
            else:
                if af is not None:
                    x = g.call_function(FQ_ACT, (x, a["act_fmt"], -1, a["impl"]))
                new = g.call_function(torch.ops.qcompile_cpu.linear.default, (
                    x, a["codes"], a["scales"], a["bias"], side.get("outlier_index"),
                    side.get("outlier_value"), fmt_id, q.scales.shape[0], plan.k, q.block))
        new.meta.update(node.meta)
        # no Python runs when the operator does (it cannot fall back): the graph runs as soon
        # as it is built, so explain's record says now that this weight runs the CPU kernel
        ops.note_kernel("linear", values[a["codes"]], ops.CPU)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        changed = True
    if changed:
        g.lint()
        gm.recompile()
    return gm
