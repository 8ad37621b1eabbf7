"""An experts module holding packed experts, called from a compiled graph as one operator.

An experts module's forward picks the experts its tokens use (transformers' eager loop:
``nonzero`` and a loop over the experts hit; the packed views' matmuls), which Dynamo cannot
trace: it splits the graph there, and a graph break inside nested calls makes every caller
down to the experts (the model, each decoder layer, transformers' decorators) a frame of its
own. A decoder layer's frame then needs an entry per layer (its ``layer_idx`` and its cache
are guarded) and per shape, so a model of a few layers passes Dynamo's recompile limit
(8 per code object) and the rest of its forward runs eagerly; transformers 5.25 wraps the model's,
the decoder layers' and the attention's forwards in one decorator function (``wrapped_func``),
whose shared code object reaches the limit with two layers.

``qcompile.compile`` therefore routes the call of each module holding ``PackedExperts`` through
the operator ``qcompile_moe::experts_call`` while Dynamo traces: the graph holds the call, no
break, one graph per shape for the whole model; the operator runs the module eagerly (its own
forward, the packed views' kernels) and returns a tensor of its first input's shape and dtype
(checked). Outside a compiled graph, and in a deep copy or a pickle (torch drops
``_compiled_call_impl`` from both), the module runs as before.
"""
from __future__ import annotations

import itertools
import weakref

import torch

# operator key -> the experts module (weakly: the model owns it)
_MODULES: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()
_KEYS = itertools.count(1)


@torch.library.custom_op("qcompile_moe::experts_call", mutates_args=())
def experts_call(key: int, inputs: list[torch.Tensor]) -> torch.Tensor:
    """``module(*inputs)`` for the experts module registered under ``key``, run eagerly."""
    module = _MODULES.get(key)
    if module is None:
        raise RuntimeError(f"blockquant: the experts module of operator key {key} is gone "
                           "(the model was freed); compile the model again")
    out = module._call_impl(*inputs)
    first = inputs[0]
    if not isinstance(out, torch.Tensor) or out.shape != first.shape or out.dtype != first.dtype:
        what = (f"a {out.dtype} tensor of shape {tuple(out.shape)}" if isinstance(
            out, torch.Tensor) else type(out).__name__)
        raise RuntimeError(
            f"blockquant: the experts module {type(module).__name__} returned {what}, not a "
            f"tensor of its input's shape {tuple(first.shape)} and dtype {first.dtype}, so it "
            "cannot run as one operator in a compiled graph. Run the model uncompiled after "
            "qcompile.quantize_model_(model, policy)")
    if any(out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in inputs):
        out = out.clone()  # an operator's output never aliases its inputs
    return out


@experts_call.register_fake
def _(key, inputs):
    return torch.empty_like(inputs[0])


def _no_backward(ctx, grad):
    raise NotImplementedError(
        "blockquant: backward through packed experts is not supported (their weights are packed "
        "codes, frozen); run the compiled model under torch.no_grad() or torch.inference_mode(), "
        "or train the float model and quantise it afterwards")


# a forward in grad mode runs; only a backward through the experts is refused, by name
experts_call.register_autograd(_no_backward)


class _ExpertsCall:
    """``module._compiled_call_impl``: inside a graph Dynamo traces, the call with tensor
    arguments only becomes the operator; any other call runs the module as it is."""

    def __init__(self, module: torch.nn.Module, key: int):
        self.module, self.key = weakref.ref(module), key

    def __call__(self, *args, **kwargs):
        module = self.module()
        if torch.compiler.is_compiling() and not kwargs and args and all(
                isinstance(a, torch.Tensor) for a in args):
            return experts_call(self.key, list(args))
        return module._call_impl(*args, **kwargs)


class _ThroughCall:
    """A forward pre-hook that does nothing: a module with a hook is traced by Dynamo through
    ``Module.__call__``, which calls ``_compiled_call_impl``; without hooks Dynamo goes to
    ``forward`` directly. A class, so the model pickles."""

    def __call__(self, mod, args):
        return None


def route_packed_experts(model: torch.nn.Module) -> int:
    """Make every module of ``model`` that holds packed experts one operator in compiled
    graphs. Returns how many."""
    count = 0
    for mod in model.modules():
        if any(getattr(c, "quantised_experts", False) for c in mod.children()):
            key = next(_KEYS)
            _MODULES[key] = mod
            mod._compiled_call_impl = _ExpertsCall(mod, key)
            if not any(isinstance(h, _ThroughCall) for h in mod._forward_pre_hooks.values()):
                mod.register_forward_pre_hook(_ThroughCall())
            count += 1
    return count
