"""Pass 2: decide each site's LayerSpec from the Policy and check the op can carry it."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from qcompile import config
from qcompile.modules import linear_like
from qcompile.policy import Policy

from .find import MAX_NORM_REASON, embedding_options, op_record, real_input, sites
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
    rule_index: int | None
    rule: str
    reason: str
    bits: int


def plan(gm: fx.GraphModule, policy: Policy, example_inputs=None,
         names: ModuleNames | None = None) -> fx.GraphModule:
    """Set the ``rule`` and ``spec`` of every found op's record (passes.find.Op): the spec
    only where the policy quantises it. Sites with a policy answer of None are left alone, and so
    are sites with operands of another dtype than float32/16/bf16 (the reason in their ``note``).
    The graph record's ``matched_rules`` collects the indices of the rules that matched; its
    ``skipped`` lists the layers the policy quantises that this graph
    cannot (see ``_skipped``), each said once."""
    matched, skipped = set(), []
    for node, site in sites(gm):
        op = op_record(node)
        rule, spec = policy.match(site.fqn, site.kind)
        op.rule, op.spec = rule, None
        if rule is not None:
            matched.add(rule.index)
        if spec is None:
            continue
        reason = names.read_by_parent(site.fqn) if names is not None else None
        if reason is not None and site.kind == "linear":
            skipped.append(_skip(site.fqn, example_value(site.weight), rule, spec, reason))
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
    record = graph_record(gm)
    record.skipped = skipped
    matched |= {s.rule_index for s in skipped if s.rule_index is not None}
    record.matched_rules = matched
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


def _skip(fqn, weight, rule, spec, reason) -> Skipped:
    """Record a skipped layer and say so once: the policy asked for a format it does not get."""
    config.warn(f"blockquant: layer {fqn!r} stays in full precision although the policy gives "
                f"it {spec.weight.key if spec.weight else spec.act.key}: {reason} "
                "(explain() lists it)", once=("skipped", fqn, reason))
    shape = tuple(int(s) for s in weight.shape) if isinstance(weight, torch.Tensor) else ()
    return Skipped(fqn, shape, rule.index if rule else None, rule.describe() if rule else "default",
                   reason, dtype_bits(weight))


def dtype_bits(v) -> int:
    return torch.finfo(v.dtype).bits if isinstance(v, torch.Tensor) and v.is_floating_point() else 32


def _unreached(gm, policy: Policy, example_inputs, names: ModuleNames | None) -> list[Skipped]:
    """Linear layers whose weight this graph reads, but not through a linear op the backend can
    quantise (nn.MultiheadAttention's out_proj inside its fused kernel, say)."""
    if names is None or names.root is None:
        return []
    consumed = {id(real_input(gm, s.weight, example_inputs)) for _, s in sites(gm)
                if s.kind == "linear"}
    skipped = []
    for ph in placeholders(gm):
        t = real_input(gm, ph, example_inputs)
        if t is None or id(t) in consumed:
            continue
        for name in names.weight_holders(t):
            rule, spec = policy.match(name, "linear")
            if spec is None or spec.weight is None:
                continue
            readers = ", ".join(sorted({_op_name(u) for u in ph.users})) or "nothing"
            skipped.append(_skip(name, t, rule, spec,
                                 f"its weight is read by {readers}, not by a linear op"))
    return skipped


def planned(gm: fx.GraphModule):
    """(node, site, spec) of every op the plan quantises."""
    return [(n, site, op_record(n).spec) for n, site in sites(gm)
            if op_record(n).spec is not None]


def warn_unmatched(policy: Policy, matched: set[int], names: ModuleNames | None = None):
    """Warn once per policy for each rule that matches no layer of the model (with the model
    known: every linear layer is a candidate, whichever graph it lands in), or, without it, no
    op of this graph."""
    if names is not None and names.root is not None:
        modules = list(names.root.named_modules())
        candidates = {
            "linear": [n for n, m in modules
                       if linear_like(m) or getattr(m, "quantised_linear", False)],
            "embedding": [n for n, m in modules if isinstance(m, torch.nn.Embedding)
                          or getattr(m, "quantised_embedding", False)],
            "matmul": [n for n, _ in modules]}
        for rule in policy.rules:
            kind = (rule.spec.op if rule.spec is not None else None) or "linear"
            if not any(rule.matches(n, kind) for n in candidates[kind]):
                config.warn(f"blockquant: policy rule {rule.describe()} matches no layer of the "
                            f"{type(names.root).__name__} model",
                            once=("unmatched", repr(policy), rule.index))
        return
    for rule in policy.rules:
        if rule.index not in matched:
            config.warn(f"blockquant: policy rule {rule.describe()} matched no op",
                        once=("unmatched", repr(policy), rule.index))
