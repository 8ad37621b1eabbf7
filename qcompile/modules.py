"""Which torch modules are linear layers: nn.Linear (weight [N, K]) and GPT-2's Conv1D
(transformers.pytorch_utils.Conv1D, weight [K, N]). One rule for the passes, the module swapping
and the proxy scores; transformers is imported only when it is installed."""
from __future__ import annotations

import torch


def conv1d_class():
    """transformers' Conv1D class, or None where transformers is not installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


def is_conv1d(mod) -> bool:
    cls = conv1d_class()
    return cls is not None and isinstance(mod, cls)


def linear_like(mod) -> bool:
    return isinstance(mod, torch.nn.Linear) or is_conv1d(mod)
