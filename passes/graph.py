"""Small graph helpers shared by the passes, the backend and explain."""
from __future__ import annotations

from torch import fx


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with a copy of gm's graph: Dynamo reads its own graph's placeholders
    after the backend returns, so the passes must not edit it in place."""
    graph = fx.Graph()
    out, out_node = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(out, type_expr=out_node.type)
    graph.owning_module = None
    new = fx.GraphModule(gm, graph)
    new.meta.update(getattr(gm, "meta", {}))
    return new


def placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]
