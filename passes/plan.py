"""Pass 2: decide each site's LayerSpec from the Policy and check the op can carry it."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from qcompile import config
from qcompile.experts import SKIPPED_EXPERTS_ATTR, candidates as expert_candidates
from qcompile.linear_rule import linear_like, linear_lookalike
from qcompile.policy import Policy

from .find import KEY, MAX_NORM_REASON, embedding_options, op_record, real_input, sites
from .graph import graph_record, placeholders
from .names import ModuleNames

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def example_value(node):
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def _float(node) -> bool:
    v = example_value(node)
    return v is None or (isinstance(v, torch.Tensor) and v.dtype in FLOAT_DTYPES)


@dataclass
class Skipped:
    """A linear layer the policy quantises that this graph cannot quantise, and why."""
    fqn: str
    weight_shape: tuple
    rule: str
    reason: str
    bits: int


def plan(gm: fx.GraphModule, policy: Policy, example_inputs=None,
         names: ModuleNames | None = None) -> fx.GraphModule:
    """Set the ``rule`` and ``spec`` of every found op's record (passes.find.Op): the spec
    only where the policy quantises it. Sites with a policy answer of None are left alone, and so
    are sites with operands of another dtype than float32/16/bf16 (the reason in their ``note``).
    The graph record's ``skipped`` lists the layers the policy quantises that this graph cannot
    (``qcompile.linear_rule.skip_reason``, ``_unreached``), said once per reason."""
    skipped = []
    for node, site in sites(gm):
        op = op_record(node)
        rule, spec = policy.match(site.fqn, site.kind)
        op.rule, op.spec = rule, None
        if spec is None:
            continue
        reason = names.skip_reason(site.fqn) if names is not None else None
        if reason is not None and site.kind == "linear":
            skipped.append(_skip(site.fqn, example_value(site.weight), rule, spec, reason))
            del node.meta[KEY]  # not a quantisable op after all: its row is the skipped one
            continue
        if site.kind == "embedding" and embedding_options(node).get("max_norm") is not None:
            skipped.append(_skip(site.fqn, example_value(site.weight), rule, spec,
                                 MAX_NORM_REASON))
            continue
        op.note = _dtype_reason(site, spec)
        if op.note:
            continue  # a dtype the formats do not take: left alone, the backend says why
        op.spec = spec
    skipped += _unreached(gm, policy, example_inputs, names)
    warn_skipped("blockquant", [(s.fqn, s.reason) for s in skipped],
                 id(names.root) if names is not None else None)
    graph_record(gm).skipped = skipped
    return gm


def _dtype_reason(site, spec) -> str:
    """Why an op the policy quantises is left alone because of its operands' dtype, or ""."""
    for what, node, fmt in (("weights", site.weight, spec.weight), ("inputs", site.x, spec.act)):
        if fmt is not None and not _float(node):
            v = example_value(node)
            dtype = str(v.dtype).replace("torch.", "") if isinstance(v, torch.Tensor) else \
                type(v).__name__
            return (f"the {what} are {dtype}; blockquant quantises float32, float16 and "
                    f"bfloat16 {what}")
    return ""


def left_alone(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """(layer name, reason) of every op the policy quantises that ``plan`` left alone because
    of its dtype."""
    return [(site.fqn, op_record(n).note) for n, site in sites(gm)
            if op_record(n).spec is None and op_record(n).note]


def _op_name(node: fx.Node) -> str:
    t = node.target
    return getattr(t, "__name__", None) or str(t)


def warn_skipped(who: str, skipped, scope=None):
    """Say once per reason (and ``scope``: the model) which layers stay in full precision
    although the policy gives them a format (``skipped``: (name, reason) pairs)."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in skipped:
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        shown = ", ".join(repr(n) for n in names[:3]) + (
            f" and {len(names) - 3} more" if len(names) > 3 else "")
        what = f"layer {shown} stays" if len(names) == 1 else f"layers {shown} stay"
        config.warn(f"{who}: {what} in full precision although the policy gives "
                    f"{'it' if len(names) == 1 else 'them'} a format: {reason} (explain() lists "
                    f"{'it' if len(names) == 1 else 'them'})", once=(who, "skipped", reason, scope))


def _skip(fqn, weight, rule, spec, reason) -> Skipped:
    """Record a layer the policy gives a format that it does not get (said by warn_skipped)."""
    shape = tuple(int(s) for s in weight.shape) if isinstance(weight, torch.Tensor) else ()
    return Skipped(fqn, shape, rule.describe() if rule else "default",
                   reason, dtype_bits(weight))


def dtype_bits(v) -> int:
    return torch.finfo(v.dtype).bits if isinstance(v, torch.Tensor) and v.is_floating_point() else 32


def _unreached(gm, policy: Policy, example_inputs, names: ModuleNames | None) -> list[Skipped]:
    """Linear layers whose weight this graph reads, but not through a linear op the backend can
    quantise (nn.MultiheadAttention's out_proj inside its fused kernel, say), and the
    mixture-of-experts tensors (qcompile.experts) the policy gives a format that are still
    float parameters: the backend cannot pack them from a graph (``qcompile.compile`` packs
    them before compiling)."""
    if names is None or names.root is None:
        return []
    consumed = {id(real_input(gm, s.weight, example_inputs)) for _, s in sites(gm)
                if s.kind == "linear"}
    experts = {id(mod._parameters[attr]): (name, mod.__dict__.get(SKIPPED_EXPERTS_ATTR, {}).get(
        attr, EXPERTS_COMPILED_REASON)) for name, mod, attr in expert_candidates(names.root)}
    skipped = []
    for ph in placeholders(gm):
        t = real_input(gm, ph, example_inputs)
        if t is None or id(t) in consumed:
            continue
        if id(t) in experts:
            name, reason = experts[id(t)]
            rule, spec = policy.match(name, "linear")
            if spec is not None and spec.weight is not None:
                skipped.append(_skip(name, t, rule, spec, reason))
            continue
        for name in names.weight_holders(t):
            rule, spec = policy.match(name, "linear")
            if spec is None or spec.weight is None:
                continue
            readers = ", ".join(sorted({_op_name(u) for u in ph.users})) or "nothing"
            reason = names.skip_reason(name) or (
                f"its weight is read by {readers}, not by a linear op (x @ W^T), so the compiled "
                "graph cannot quantise it; quantize_model_ and fake_quantize_model_, which "
                "replace the layer itself, do")
            skipped.append(_skip(name, t, rule, spec, reason))
    return skipped


EXPERTS_COMPILED_REASON = (
    "it is a 3-D parameter (a mixture-of-experts tensor: one matrix per expert), and the "
    "torch.compile backend, which sees only graphs, cannot pack expert tensors. Call "
    "qcompile.quantize_model_(model, policy) before torch.compile, or compile with "
    "qcompile.compile(model, policy), which packs them first")


def float_experts(policy: Policy, model: torch.nn.Module) -> list[Skipped]:
    """The mixture-of-experts tensors of ``model`` that ``policy`` gives a weight format and
    that compiled graphs keep in full precision: every one still a float parameter, except
    those the eager helpers already refused (with their own reason)."""
    out = []
    for name, mod, attr in expert_candidates(model):
        rule, spec = policy.match(name, "linear")
        if attr in mod.__dict__.get(SKIPPED_EXPERTS_ATTR, {}):
            continue  # quantize_model_ / qcompile.compile said why it stays float
        if spec is not None and spec.weight is not None:
            out.append(_skip(name, mod._parameters[attr], rule, spec, EXPERTS_COMPILED_REASON))
    return out


def warn_float_experts(policy: Policy, model: torch.nn.Module, who: str = "blockquant"):
    """Say, by name, once per model, which expert tensors the policy gives a format that a
    compiled graph keeps in full precision: a graph may never hold them (an eager loop over
    the experts breaks the graph and runs outside it), so this is said for the whole model."""
    warn_skipped(who, [(s.fqn, s.reason) for s in float_experts(policy, model)], id(model))


def planned(gm: fx.GraphModule):
    """(node, site, spec) of every op the plan quantises."""
    return [(n, site, op_record(n).spec) for n, site in sites(gm)
            if op_record(n).spec is not None]


def rule_candidates(model: torch.nn.Module) -> dict[str, list[str]]:
    """The names a rule of each op kind may match in ``model``: linear layers (look-alikes,
    layers quantize_model_ swapped and mixture-of-experts tensors included), embeddings, and
    any module for matmuls."""
    modules = list(model.named_modules())
    return {"linear": [n for n, m in modules if linear_like(m) or linear_lookalike(m)
                       or getattr(m, "quantised_linear", False)
                       or getattr(m, "quantised_experts", False)]
            + [name for name, _, _ in expert_candidates(model)],
            "embedding": [n for n, m in modules if isinstance(m, torch.nn.Embedding)
                          or getattr(m, "quantised_embedding", False)],
            "matmul": [n for n, _ in modules]}


def warn_unmatched(policy: Policy, model: torch.nn.Module, who: str = "blockquant"):
    """Warn once per entry point (``who``) and policy for each rule that matches no layer of
    ``model`` (a typo, or a rule for another architecture): every entry point calls this with
    the whole model, so a rule is judged against every layer, whichever graph it lands in."""
    candidates = rule_candidates(model)
    for rule in policy.rules:
        kind = (rule.spec.op if rule.spec is not None else None) or "linear"
        if not any(rule.matches(n, kind) for n in candidates[kind]):
            config.warn(f"{who}: policy rule {rule.describe()} matches no layer of the "
                        f"{type(model).__name__} model", once=(who, "unmatched", repr(policy),
                                                             rule.index))
