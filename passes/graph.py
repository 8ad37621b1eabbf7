"""Small graph helpers shared by the passes, the backend and explain."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import fx

KEY = "qcompile"  # gm.meta[KEY]: the GraphRecord


@dataclass
class GraphRecord:
    """What the passes record about a whole graph, one record under ``gm.meta[KEY]``."""
    extra_inputs: list = field(default_factory=list)  # values of the placeholders passes added
    packed: list = field(default_factory=list)  # PackedWeight of each weight packed ahead of time
    skipped: list = field(default_factory=list)  # layers the policy quantises, this graph cannot


def graph_record(gm: fx.GraphModule) -> GraphRecord:
    if KEY not in gm.meta:
        gm.meta[KEY] = GraphRecord()
    return gm.meta[KEY]


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with a copy of gm's graph (and of its record): Dynamo reads its own
    graph's placeholders after the backend returns, so the passes must not edit it in place."""
    graph = fx.Graph()
    out, out_node = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(out, type_expr=out_node.type)
    graph.owning_module = None
    new = fx.GraphModule(gm, graph)
    new.meta.update(getattr(gm, "meta", {}))
    if KEY in new.meta:
        r = new.meta[KEY]
        new.meta[KEY] = dataclasses.replace(r, extra_inputs=list(r.extra_inputs),
                                            packed=list(r.packed), skipped=list(r.skipped))
    return new


def placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def add_input(gm: fx.GraphModule, name: str, tensor) -> fx.Node:
    """A new placeholder after the last one, fed with ``tensor``: packed weights and kernel
    tables enter a graph as extra inputs, listed in the graph record's ``extra_inputs`` (in
    placeholder order) for the caller to pass after the graph's own inputs."""
    g = gm.graph
    phs = placeholders(gm)
    if phs:
        with g.inserting_after(phs[-1]):
            ph = g.placeholder(name)
    else:
        with g.inserting_before(next(iter(g.nodes))):
            ph = g.placeholder(name)
    graph_record(gm).extra_inputs.append(tensor)
    return ph


def input_values(gm: fx.GraphModule, example_inputs) -> dict:
    """{placeholder: its real value}: the graph's own inputs, then the extra inputs."""
    values = list(example_inputs) + list(graph_record(gm).extra_inputs)
    return dict(zip(placeholders(gm), values))
