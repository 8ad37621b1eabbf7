"""Which torch modules are linear layers: the one rule that the backend, ``quantize_model_``,
``fake_quantize_model_``, ``explain`` and the search share.

A linear layer is an nn.Linear (weight [N, K], any subclass: transformers' FalconLinear computes
``x @ W.T + b`` itself) or GPT-2's Conv1D (weight [K, N]). A module that is neither but holds a
2-D float ``weight`` of its own (a mixture-of-experts router: its forward runs
``F.linear(x, self.weight)`` and then a top-k) is a *look-alike*: its forward may do more than a
matmul, so no helper can swap it for a quantised layer, and every helper keeps it in full
precision with the same reason (``LOOKALIKE_REASON``). transformers is imported only when it is
installed."""
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


def linear_lookalike(mod) -> bool:
    """A module that is not a linear layer or an embedding but holds a 2-D float ``weight``
    parameter of its own (an MoE router, say)."""
    w = getattr(mod, "_parameters", {}).get("weight")
    return (w is not None and w.dim() == 2 and w.dtype.is_floating_point
            and not linear_like(mod) and not isinstance(mod, torch.nn.Embedding))


def forward_beyond_linear(mod) -> str | None:
    """Why an nn.Linear subclass with a forward of its own is not a linear layer, or None: its
    forward, run once on a probe input, must return ``F.linear(x, W, b)`` (within float
    rounding: transformers' FalconLinear computes ``x @ W.T + b``); Llama 4's router, an
    nn.Linear subclass, returns top-k scores as well."""
    if type(mod).forward is torch.nn.Linear.forward or not isinstance(mod, torch.nn.Linear):
        return None
    w = mod.weight
    if not w.dtype.is_floating_point:
        return None
    meta = w.device.type == "meta"  # weights not loaded yet: the result's type and shape only
    gen = None if meta else torch.Generator(device=w.device).manual_seed(0)
    x = torch.randn(2, w.shape[1], generator=gen, device=w.device).to(w.dtype)
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, w, mod.bias)
        try:
            out = mod.forward(x)  # not mod(x): no hooks run for a probe
        except Exception as e:  # a forward that needs more than x
            return f"its forward does more than x @ W^T + b (it fails on x alone: {type(e).__name__})"
    if not isinstance(out, torch.Tensor) or out.shape != expected.shape or not meta and \
            not torch.allclose(out.float(), expected.float(), rtol=1e-2, atol=1e-3):
        what = type(out).__name__ if not isinstance(out, torch.Tensor) else "another tensor"
        return f"its forward returns {what}, not x @ W^T + b"
    return None


def lookalike_reason(mod) -> str:
    """Why a ``linear_lookalike`` module stays in full precision (every helper says this)."""
    return (f"a {type(mod).__name__} holds a 2-D weight but is not a linear layer (nn.Linear, "
            "Conv1D): its forward may do more than x @ W^T (a router's top-k), so blockquant "
            "keeps it in full precision")


# torch's own mark for a Linear whose parent reads .weight directly (MultiheadAttention.out_proj)
_READ_BY_PARENT = getattr(torch.nn.modules.linear, "NonDynamicallyQuantizableLinear", ())
# torch modules that read their children's .weight themselves (their fused fast paths)
_READERS = (torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer)


def read_by_parent(mod, parent) -> str | None:
    """Why a linear layer cannot be quantised in place because its parent reads its ``.weight``
    directly instead of calling it (nn.MultiheadAttention's out_proj), or None."""
    if isinstance(parent, _READERS) or isinstance(mod, _READ_BY_PARENT):
        return (f"its parent ({type(parent).__name__}) reads .weight directly instead of calling "
                "the layer")
    return None


def skip_reason(mod, parent) -> str | None:
    """Why a linear layer or look-alike that a policy gives a format stays in full precision,
    or None when it can be quantised: the one list every helper and the backend use."""
    if linear_lookalike(mod):
        return lookalike_reason(mod)
    beyond = forward_beyond_linear(mod)
    if beyond is not None:
        return (f"a {type(mod).__name__} is an nn.Linear whose own forward is not a linear "
                f"layer's: {beyond} (a router's top-k), so blockquant keeps it in full precision")
    reason = read_by_parent(mod, parent)
    if reason is not None:
        return reason
    if not mod.weight.dtype.is_floating_point:
        return f"its weight is {mod.weight.dtype}, not a float tensor"
    return None
