"""Pass 2: decide each site's LayerSpec from the Policy and check the op can carry it."""
from __future__ import annotations

import warnings

import torch
from torch import fx

from qcompile.policy import Policy

from .find import sites

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def example_value(node):
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def _float(node) -> bool:
    v = example_value(node)
    return v is None or (isinstance(v, torch.Tensor) and v.dtype in FLOAT_DTYPES)


def plan(gm: fx.GraphModule, policy: Policy) -> fx.GraphModule:
    """Set ``node.meta["qcompile_spec"]`` (and ``"qcompile_rule"``) on every site the policy
    quantises. Sites with non-float operands, or a policy answer of None, are left alone.
    ``gm.meta["qcompile_matched_rules"]`` collects the indices of the rules that matched."""
    matched = set()
    for node, site in sites(gm):
        node.meta.pop("qcompile_spec", None)
        rule, spec = policy.match(site.fqn, site.kind)
        node.meta["qcompile_rule"] = rule
        if rule is not None:
            matched.add(rule.index)
        if spec is None:
            continue
        if spec.weight is not None and not _float(site.weight):
            continue  # non-float weight: leave alone
        if spec.act is not None and not _float(site.x):
            continue
        node.meta["qcompile_spec"] = spec
    gm.meta["qcompile_matched_rules"] = matched
    return gm


def planned(gm: fx.GraphModule):
    return [(n, n.meta["qcompile_site"], n.meta["qcompile_spec"]) for n, _ in sites(gm)
            if "qcompile_spec" in n.meta]


def warn_unmatched(policy: Policy, matched: set[int]):
    """Warn once per policy for each rule that matched no op."""
    for rule in policy.rules:
        if rule.index not in matched and rule.index not in policy._warned_unmatched:
            policy._warned_unmatched.add(rule.index)
            warnings.warn(f"blockquant: policy rule {rule.describe()} matched no op", stacklevel=2)
