"""Pass 4: rewrite to the semantic form with explicit qcompile ops.

For a site with a packed weight, the weight operand becomes
``qcompile::dequantize(codes, scales, side, meta)`` whose tensors are new graph inputs (appended
after the existing placeholders; their values are listed in the graph record's
``extra_inputs`` for the caller to pass); an embedding with a packed table becomes
``qcompile::embedding(ids, codes, scales, side, meta)``, which decodes only the rows it
gathers. A weight that is not a graph input (a matmul operand, a weight computed by a
parametrization) becomes ``qcompile::fake_quantize_act(w, fmt, K axis)``,
quantised on every call. For a site with an activation format, the activation operand becomes
``qcompile::fake_quantize_act(x, fmt, -1)``. The result runs eagerly and equals the
fake-quantised model.
"""
from __future__ import annotations

import torch
from torch import fx

from qcompile import ops  # noqa: F401  (registers torch.ops.qcompile.*)
from qcompile.ops import qtensor_meta

from .find import op_record
from .graph import add_input as add_graph_input
from .plan import planned

DEQUANT = torch.ops.qcompile.dequantize.default
FQ_ACT = torch.ops.qcompile.fake_quantize_act.default
EMBEDDING = torch.ops.qcompile.embedding.default
LINEAR = torch._C._nn.linear


def rewrite(gm: fx.GraphModule, impl: str = "reference") -> fx.GraphModule:
    g = gm.graph
    packed_nodes = {}  # id(QTensor) -> (codes, scales, [side]) placeholder nodes

    def add_input(name, tensor):
        return add_graph_input(gm, name, tensor)

    for node, site, spec in planned(gm):
        q = op_record(node).qtensor
        if site.transposed:  # x @ W.T: the linear op it is, so the fuse pass finds it
            node = _as_linear(g, node, site)
        if q is not None:
            if id(q) not in packed_nodes:
                stem = f"qc_w{len(packed_nodes)}"
                packed_nodes[id(q)] = (add_input(f"{stem}_codes", q.codes),
                                       add_input(f"{stem}_scales", q.scales),
                                       [add_input(f"{stem}_{k}", t) for k, t in q.side.items()])
            codes, scales, side = packed_nodes[id(q)]
            if site.kind == "embedding":
                with g.inserting_before(node):
                    rows = g.call_function(EMBEDDING, (site.x, codes, scales, side,
                                                       qtensor_meta(q), impl))
                rows.meta.update({k: v for k, v in node.meta.items()
                                  if not k.startswith("qcompile")})
                node.replace_all_uses_with(rows)
                g.erase_node(node)
                continue
            with g.inserting_before(node):
                deq = g.call_function(DEQUANT, (codes, scales, side, qtensor_meta(q), impl))
            node.replace_input_with(site.weight, deq)
        elif spec.weight is not None:  # a matmul operand, or a weight computed in the graph
            with g.inserting_before(node):
                wq = g.call_function(FQ_ACT, (site.weight, spec.weight.key, site.weight_axis,
                                              impl))
            node.replace_input_with(site.weight, wq)
        if spec.act is not None:
            with g.inserting_before(node):
                xq = g.call_function(FQ_ACT, (site.x, spec.act.key, -1, impl))
            node.replace_input_with(site.x, xq)
    g.lint()
    gm.recompile()
    return gm


def _as_linear(g: fx.Graph, node: fx.Node, site) -> fx.Node:
    """Replace ``x @ W.T`` by ``linear(x, W)`` (the same product) and return the new node; the
    transpose goes too when nothing else reads it."""
    with g.inserting_before(node):
        linear = g.call_function(LINEAR, (site.x, site.weight))
    linear.meta.update(node.meta)
    transpose = node.args[1]
    node.replace_all_uses_with(linear)
    g.erase_node(node)
    if not transpose.users:
        g.erase_node(transpose)
    return linear
