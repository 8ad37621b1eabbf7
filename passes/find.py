"""Pass 1: find the quantisable ops of a Dynamo graph and the module each belongs to."""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
from torch import fx

LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear)
ADDMM_TARGETS = (torch.addmm,)
MATMUL_TARGETS = (torch.matmul, operator.matmul, torch.bmm, torch.Tensor.matmul)


@dataclass
class Site:
    """One quantisable op. ``weight_axis`` is the K axis of the static operand: 1 for an
    nn.Linear weight [N, K], 0 for a GPT-2 Conv1D weight [K, N] (addmm), -2 for the right-hand
    operand of a matmul."""
    kind: str  # "linear" (linear and addmm) or "matmul"
    target: str  # "linear", "addmm" or "matmul"
    fqn: str
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    weight_axis: int


_ROOT = re.compile(r"^L\['[^']*'\]")


def module_fqn(path: str) -> str:
    """Dynamo's module path (``L['self'].transformer.h[0]._modules['mlp']``) as an FQN
    (``transformer.h.0.mlp``)."""
    s = _ROOT.sub("", path)
    s = re.sub(r"\._modules\['([^']*)'\]", r".\1", s)
    s = re.sub(r"\[['\"]?([^\]'\"]*)['\"]?\]", r".\1", s)
    return s.strip(".")


def node_fqn(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return module_fqn(path)


def _site(node: fx.Node, with_matmul: bool) -> Site | None:
    if node.op != "call_function" and not (node.op == "call_method" and node.target == "matmul"):
        return None
    t = node.target
    if t in LINEAR_TARGETS:
        args = list(node.args) + [None] * 3
        x = node.kwargs.get("input", args[0])
        w = node.kwargs.get("weight", args[1])
        b = node.kwargs.get("bias", args[2])
        if isinstance(x, fx.Node) and isinstance(w, fx.Node):
            return Site("linear", "linear", node_fqn(node), x, w, b, 1)
    elif t in ADDMM_TARGETS:
        if len(node.args) == 3 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args):
            b, x, w = node.args
            return Site("linear", "addmm", node_fqn(node), x, w, b, 0)
    elif with_matmul and (t in MATMUL_TARGETS or node.op == "call_method"):
        if len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args):
            return Site("matmul", "matmul", node_fqn(node), node.args[0], node.args[1], None, -2)
    return None


def find_quantisable(gm: fx.GraphModule, with_matmul: bool = False) -> fx.GraphModule:
    """Mark each linear (torch._C._nn.linear), GPT-2 Conv1D (torch.addmm) and, with
    ``with_matmul``, matmul/bmm node with ``node.meta["qcompile_site"]``."""
    for node in gm.graph.nodes:
        site = _site(node, with_matmul)
        if site is not None:
            node.meta["qcompile_site"] = site
        else:
            node.meta.pop("qcompile_site", None)
    return gm


def sites(gm: fx.GraphModule) -> list[tuple[fx.Node, Site]]:
    return [(n, n.meta["qcompile_site"]) for n in gm.graph.nodes if "qcompile_site" in n.meta]
