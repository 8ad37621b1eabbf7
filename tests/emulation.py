"""An emulation of what a policy does to a model, written independently of qcompile's policy,
passes and module helpers: it uses only ``qcompile.fake_quantize`` (the format reference).

Rules are (pattern, spec) pairs with spec = (weight format or None, act format or None) or None;
the first match wins (``fnmatch`` glob on the module's ``named_modules()`` name, or ``re:``
regular expression over the whole name); linear layers are nn.Linear (weight [N, K], blocks
along axis 1) and GPT-2's Conv1D (weight [K, N], blocks along axis 0). A tied weight is untied:
only the linear layer sees the quantised copy. Activations are fake-quantised per token, in
blocks along their last axis, by a forward pre-hook.
"""
import copy
import fnmatch
import re

import torch
import torch.nn as nn

import qcompile
from qcompile import LayerSpec, Policy

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None


def first_match(rules, default, name):
    for pattern, spec in rules:
        hit = (re.fullmatch(pattern[3:], name) if pattern.startswith("re:")
               else fnmatch.fnmatchcase(name, pattern))
        if hit:
            return spec
    return default


def linear_layers(model):
    """(name, module, K axis of its weight) for every linear layer."""
    for name, mod in model.named_modules():
        if Conv1D is not None and isinstance(mod, Conv1D):
            yield name, mod, 0
        elif isinstance(mod, nn.Linear):
            yield name, mod, 1


def policy(rules, default) -> Policy:
    """The qcompile.Policy the rules stand for (what the user writes)."""
    def spec(s):
        return None if s is None else LayerSpec(weight=s[0], act=s[1])
    return Policy([(p, spec(s)) for p, s in rules], default=spec(default))


def emulate(model, rules, default):
    """A deep copy of ``model`` that computes what the policy says, eagerly."""
    ref = copy.deepcopy(model)
    for name, mod, axis in linear_layers(ref):
        spec = first_match(rules, default, name)
        if spec is None:
            continue
        weight_fmt, act_fmt = spec
        if weight_fmt is not None:
            with torch.no_grad():
                fq = qcompile.fake_quantize(mod.weight.detach(), weight_fmt, axis=axis)
            mod.weight = nn.Parameter(fq, requires_grad=False)  # its own copy: untied
        if act_fmt is not None:
            mod.register_forward_pre_hook(
                lambda m, args, f=act_fmt: (qcompile.fake_quantize(args[0], f, axis=-1), *args[1:]))
    return ref


def key(fmt):
    return "-" if fmt is None else qcompile.formats.get(fmt).key


def expected_table(model, rules, default) -> dict:
    """{layer name: (weight format key, act format key)} for every linear layer ("-": none)."""
    table = {}
    for name, _, _ in linear_layers(model):
        spec = first_match(rules, default, name) or (None, None)
        table[name] = (key(spec[0]), key(spec[1]))
    return table


def explained_table(explanation) -> dict:
    return {r.fqn: (r.weight_fmt, r.act_fmt) for r in explanation.rows}
