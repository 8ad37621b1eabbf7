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


def add_input(gm: fx.GraphModule, name: str, tensor) -> fx.Node:
    """A new placeholder after the last one, fed with ``tensor``: packed weights and kernel
    tables enter a graph as extra inputs, listed in ``gm.meta["qcompile_extra_inputs"]`` (in
    placeholder order) for the caller to pass after the graph's own inputs."""
    g = gm.graph
    phs = placeholders(gm)
    if phs:
        with g.inserting_after(phs[-1]):
            ph = g.placeholder(name)
    else:
        with g.inserting_before(next(iter(g.nodes))):
            ph = g.placeholder(name)
    gm.meta.setdefault("qcompile_extra_inputs", []).append(tensor)
    return ph


def input_values(gm: fx.GraphModule, example_inputs) -> dict:
    """{placeholder: its real value}: the graph's own inputs, then the extra inputs."""
    values = list(example_inputs) + list(gm.meta.get("qcompile_extra_inputs", ()))
    return dict(zip(placeholders(gm), values))
