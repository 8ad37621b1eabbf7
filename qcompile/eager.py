"""``fake_quantize_model_``: the eager model a compiled one is checked against.

Every linear layer (nn.Linear [N, K], GPT-2 Conv1D [K, N]) that the policy quantises gets its
weight replaced by ``fake_quantize`` of itself (blocks along K) and, for an activation format,
a forward pre-hook that fake-quantises its input per token in blocks along K. The compiled
model with ``lowering="eager"`` equals this model bit for bit; with Inductor it stays within
the float32-accumulation bound in docs/architecture.md.
"""
from __future__ import annotations

import torch

from . import api
from .policy import Policy, PolicyError, default_policy


def _act_hook(fmt):
    def hook(module, args):
        return (api.fake_quantize(args[0], fmt, axis=-1), *args[1:])
    return hook


def fake_quantize_model_(model: torch.nn.Module, policy: Policy | None = None) -> torch.nn.Module:
    """Fake-quantise, in place, the weights (and, by hooks, the inputs) of every linear layer
    ``policy`` (None: the backend default) quantises. Returns the model."""
    policy = default_policy() if policy is None else policy
    if not isinstance(policy, Policy):
        raise PolicyError(f"fake_quantize_model_: policy must be a qcompile.Policy, got "
                          f"{type(policy).__name__}")
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()
    for name, mod in model.named_modules():
        conv1d = bool(Conv1D) and isinstance(mod, Conv1D)
        if not (isinstance(mod, torch.nn.Linear) or conv1d):
            continue
        _, spec = policy.match(name, "linear")
        if spec is None:
            continue
        if spec.weight is not None and mod.weight.dtype.is_floating_point:
            with torch.no_grad():
                mod.weight.data = api.fake_quantize(mod.weight.data, spec.weight,
                                                    axis=0 if conv1d else 1)
        if spec.act is not None:
            mod.register_forward_pre_hook(_act_hook(spec.act))
    return model
