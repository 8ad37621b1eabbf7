"""Export's pass for GPU packages: ``qcompile::linear`` -> ``qcompile::triton_linear``.

``qcompile::triton_linear`` (qcompile/ops.py) is the Triton linear as a
``torch.library.triton_op``: the same kernels ``qcompile::linear`` launches for CUDA tensors, but
visible to ``torch.export``'s decompositions and to AOTInductor, which compile them into the
package (``triton_kernel_wrapper_functional`` nodes) instead of calling a Python op. It has no
reference fallback, so only the layers the selector gives a Triton kernel, and whose kernel
launch is traceable (no OPQ outliers or proxy columns added after the kernel, no activation
format quantised outside it), are rewritten; ``use_triton_kernels`` returns why each other one
was left as it is. Device-agnostic: on CPU tensors under TRITON_INTERPRET=1 the same graph runs
in Triton's interpreter (how tests/test_triton_export.py checks it without a GPU).
"""
from __future__ import annotations

import torch
from torch import fx

from qcompile import formats, ops
from qcompile.codegen import select
from qcompile.formats import reference

from .cpu_kernels import _arguments

LINEAR = torch.ops.qcompile.linear.default


def _value(arg, values: dict):
    """The real tensor of a graph input, or the example (fake) value a node carries."""
    if arg is None:
        return None
    return values.get(arg.name, arg.meta.get("val"))


def untraceable(q, af) -> str:
    """Why ``qcompile::triton_linear`` cannot trace this layer's kernel launch ('' if it can):
    the steps ``codegen/triton/linear.py`` does outside its traced kernels."""
    apart = reference.kept_apart(q)
    if apart is not None and apart[0].numel() > 0:
        return ("OPQ outliers / proxy columns are added after the kernel (data-dependent "
                "indexing), not lowered yet")
    if af is not None and not select.fusable_act(af):
        return f"activation format {af.key} is quantised outside the fused kernel"
    return ""


def use_triton_kernels(gm: fx.GraphModule, values: dict) -> list[tuple[fx.Node, str]]:
    """Rewrite, in place, each ``qcompile::linear`` node of ``gm`` (an exported graph;
    ``values``: {placeholder name: its tensor} for the packed weights) that runs a traceable
    Triton kernel into ``qcompile::triton_linear``. Returns (node, why) for the linear nodes
    left as they are."""
    left = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != LINEAR:
            continue
        a = _arguments(node)
        q = ops.qtensor_from(values[a["codes"].name], values[a["scales"].name],
                             [values[s.name] for s in a["side"]], a["meta"])
        af = formats.get(a["act_fmt"]) if a["act_fmt"] else None
        choice = select.choose(q, a["act_fmt"], a["x"].meta["val"], "triton",
                               _value(a["bias"], values))
        why = choice.reason if choice.kernel != "triton" else untraceable(q, af)
        if why:
            left.append((node, why))
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(ops.triton_linear_op(), (
                a["x"], a["codes"], a["scales"], a["side"], a["meta"], a["act_fmt"], a["bias"]))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return left
