"""Pass 1: find the quantisable ops of a Dynamo graph and the module each belongs to."""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from .names import ModuleNames, names_for, text_name

LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear)
ADDMM_TARGETS = (torch.addmm,)
MATMUL_TARGETS = (torch.matmul, operator.matmul, torch.bmm, torch.Tensor.matmul)
EMBEDDING_TARGETS = (torch.nn.functional.embedding,)
# why an embedding with max_norm stays in full precision (the backend and quantize_model_ say it)
MAX_NORM_REASON = "an embedding with max_norm renormalises its table in place"


@dataclass
class Site:
    """One quantisable op. ``weight_axis`` is the K axis of the static operand: 1 for an
    nn.Linear weight [N, K], 0 for a GPT-2 Conv1D weight [K, N] (addmm), -2 for the right-hand
    operand of a matmul, 1 (the hidden axis) for an embedding table [vocab, hidden], whose
    ``x`` is the token ids."""
    kind: str  # "linear" (linear and addmm), "matmul" or "embedding"
    target: str  # "linear", "addmm", "matmul" or "embedding"
    fqn: str
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    weight_axis: int
    tied: tuple = ()  # the other modules holding the same weight (a tied embedding / lm_head)
    # a linear written as ``x @ W.T`` (transformers' FalconLinear): ``weight`` is W itself, and
    # the rewrite turns the matmul into a linear op once the weight is quantised
    transposed: bool = False


KEY = "qcompile"  # node.meta[KEY]: the Op record of a quantisable node


@dataclass
class Op:
    """What the passes know about one quantisable op, one record under ``node.meta[KEY]``,
    filled in pass by pass: found (``site``), planned (``rule``: the first rule that matched,
    None for the default; ``spec``: None when the op is left alone), quantised (``qtensor``:
    the packed weight, None when it is quantised on every call, with the reason in ``note``)."""
    site: Site
    rule: object = None
    spec: object = None
    qtensor: object = None
    note: str = ""


def linear_operands(node: fx.Node):
    """(x, weight, bias) of a linear (x @ W^T + b) or GPT-2 addmm (b + x @ W) node, else None."""
    if node.op != "call_function":
        return None
    if node.target in LINEAR_TARGETS:
        args = list(node.args) + [None] * 3
        return (node.kwargs.get("input", args[0]), node.kwargs.get("weight", args[1]),
                node.kwargs.get("bias", args[2]))
    if node.target in ADDMM_TARGETS and len(node.args) == 3 and not node.kwargs:
        b, x, w = node.args
        return x, w, b
    return None


def transposed_operand(node) -> fx.Node | None:
    """W when ``node`` is W's 2-D transpose (``W.T``, ``W.t()``, ``W.transpose(0, 1)``,
    ``W.permute(1, 0)``, ...) of a graph input or attribute W, else None."""
    if not isinstance(node, fx.Node) or not node.args:
        return None
    base, rest, t = node.args[0], tuple(node.args[1:]), node.target
    if not (isinstance(base, fx.Node) and base.op in ("placeholder", "get_attr")) or node.kwargs:
        return None
    if node.op == "call_function" and t is getattr:
        return base if rest in (("T",), ("mT",)) else None
    name = t if node.op == "call_method" else getattr(t, "__name__", None)
    if node.op == "call_function" and t not in (torch.t, torch.transpose, torch.permute):
        return None
    swaps = {"t": [()], "transpose": [(0, 1), (1, 0), (-1, -2), (-2, -1), (0, -1), (-1, 0)],
             "permute": [(1, 0), ((1, 0),), (-1, 0), ((-1, 0),)]}
    return base if rest in swaps.get(name, []) else None


def _is_real(t) -> bool:
    return (isinstance(t, torch.Tensor) and not isinstance(t, torch._subclasses.FakeTensor)
            and t.device.type != "meta")


def real_input(gm: fx.GraphModule, node, example_inputs) -> torch.Tensor | None:
    """The real tensor behind a graph input or attribute node, or None when it is neither
    (a value computed in the graph) or not a real tensor."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "placeholder":
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        i = phs.index(node)
        t = example_inputs[i] if example_inputs is not None and i < len(example_inputs) else None
    elif node.op == "get_attr":
        t = gm
        for part in node.target.split("."):
            t = getattr(t, part, None)
    else:
        return None
    return t if _is_real(t) else None


def site_name(node: fx.Node, weight: torch.Tensor | None, names: ModuleNames) -> str:
    """The model.named_modules() name of the module an op belongs to: for a linear op the
    linear-like module holding its weight (tied weights: the one that ran the op), else the
    module that ran it."""
    ran = names.module(node)
    holders = names.weight_holders(weight, embedding=node.target in EMBEDDING_TARGETS)
    if holders:
        return ran if ran in holders else holders[0]
    if ran is not None and names.root is not None:
        return ran
    return text_name(node)


def _matmul_site(node: fx.Node, kinds) -> Site | None:
    if "matmul" in kinds and len(node.args) == 2 and all(isinstance(a, fx.Node)
                                                         for a in node.args):
        return Site("matmul", "matmul", "", node.args[0], node.args[1], None, -2)
    return None


def _site(node: fx.Node, kinds) -> Site | None:
    """The Site of a quantisable node (its name still empty), or None."""
    if node.op != "call_function" and not (node.op == "call_method" and node.target == "matmul"):
        return None
    t = node.target
    operands = linear_operands(node)
    if operands is not None:
        x, w, b = operands
        addmm = t in ADDMM_TARGETS
        if isinstance(x, fx.Node) and isinstance(w, fx.Node) and (
                not addmm or isinstance(b, fx.Node)):
            return Site("linear", "addmm" if addmm else "linear", "", x, w, b, 0 if addmm else 1)
    elif (t in MATMUL_TARGETS or node.op == "call_method") and len(node.args) == 2 and (
            transposed_operand(node.args[1]) is not None) and isinstance(node.args[0], fx.Node):
        return Site("linear", "linear", "", node.args[0], transposed_operand(node.args[1]), None,
                    1, transposed=True)
    elif t in MATMUL_TARGETS or node.op == "call_method":
        return _matmul_site(node, kinds)
    elif "embedding" in kinds and t in EMBEDDING_TARGETS:
        args = list(node.args) + [None] * 2
        ids, w = node.kwargs.get("input", args[0]), node.kwargs.get("weight", args[1])
        if isinstance(ids, fx.Node) and isinstance(w, fx.Node):
            return Site("embedding", "embedding", "", ids, w, None, 1)
    return None


def embedding_options(node: fx.Node) -> dict:
    """The F.embedding arguments after the table (padding_idx, max_norm, ...) by name."""
    names = ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
    given = dict(zip(names, node.args[2:]))
    given.update({k: v for k, v in node.kwargs.items() if k in names})
    return given


def find_quantisable(gm: fx.GraphModule, kinds=("linear",), example_inputs=None,
                     names: ModuleNames | None = None) -> fx.GraphModule:
    """Mark each linear (torch._C._nn.linear) and GPT-2 Conv1D (torch.addmm) node and, when
    ``kinds`` (the op kinds a policy may quantise: ``Policy.op_kinds()``) has them, each
    matmul/bmm and embedding node with an ``Op`` record holding its ``Site`` in
    ``node.meta[KEY]``, named by ``names`` (the frame's model, see names.py; computed here when
    not given)."""
    names = names_for(gm) if names is None else names
    for node in gm.graph.nodes:
        site = _site(node, kinds)
        if site is not None:
            weight = (real_input(gm, site.weight, example_inputs)
                      if site.kind != "matmul" else None)
            if site.transposed and not names.weight_holders(weight):
                site, weight = _matmul_site(node, kinds), None  # not a linear layer's weight
        if site is not None:
            site.fqn = site_name(node, weight, names)
            if weight is not None:
                site.tied = tuple(dict.fromkeys(n for n, _, _ in names.holders.get(id(weight), ())
                                                if n != site.fqn))
            node.meta[KEY] = Op(site)
        else:
            node.meta.pop(KEY, None)
    return gm


def sites(gm: fx.GraphModule) -> list[tuple[fx.Node, Site]]:
    return [(n, n.meta[KEY].site) for n in gm.graph.nodes if KEY in n.meta]


def op_record(node: fx.Node) -> Op:
    return node.meta[KEY]
