"""The ``blockquant`` torch.compile backend.

    torch.compile(model, backend="blockquant", options={"policy": policy,
                                                        "lowering": "inductor" | "eager",
                                                        "kernels": "auto" | "reference" | "triton"})

``kernels``: "auto" (default) runs the generated Triton kernels on CUDA tensors and the reference
ops on CPU tensors; "triton" forces the kernels (on CPU only under TRITON_INTERPRET=1, else a
clear error); "reference" never runs them. The environment variable QCOMPILE_KERNELS
(triton|reference|auto) overrides the option.

torch.compile hands the backend its ``options`` dict as the keyword argument ``options`` (and
``mode`` when one is given). The backend validates the options, runs the passes in
``qcompile.passes`` (find -> plan -> quantise weights -> rewrite -> fuse), then lowers the graph
with Inductor or runs it eagerly. Packed weights are extra graph inputs supplied by a small
wrapper, so Inductor sees ordinary tensors.

Without a policy, the default is weight-only ``nf4`` on every linear layer (said once).
"""
from __future__ import annotations

import os
import warnings

import torch

from qcompile import passes
from qcompile.passes.plan import planned as planned_sites, warn_unmatched

from .explain import record_compiled
from .policy import DEFAULT_POLICY_DOC, Policy, PolicyError, default_policy

LOWERINGS = ("inductor", "eager")
KERNELS = ("auto", "reference", "triton")
_OPTION_NAMES = ("policy", "lowering", "kernels")
_said_default = False


def parse_options(options, example_inputs=None) -> dict:
    """Validate the backend options; returns a dict with policy, lowering and impl (the
    ``kernels`` choice, which the environment variable QCOMPILE_KERNELS overrides)."""
    global _said_default
    options = dict(options or {})
    unknown = set(options) - set(_OPTION_NAMES)
    if unknown:
        raise ValueError(f"blockquant: unknown option(s) {sorted(unknown)}; "
                         f"known: {', '.join(_OPTION_NAMES)}")
    policy = options.get("policy")
    if policy is None:
        if not _said_default:
            _said_default = True
            warnings.warn(f"blockquant: no policy given; using the default ({DEFAULT_POLICY_DOC})",
                          stacklevel=3)
        policy = default_policy()
    elif not isinstance(policy, Policy):
        raise PolicyError(f"blockquant: options['policy'] must be a qcompile.Policy, got "
                          f"{type(policy).__name__}")
    lowering = options.get("lowering", "inductor")
    if lowering not in LOWERINGS:
        raise ValueError(f"blockquant: lowering must be one of {LOWERINGS}, got {lowering!r}")
    kernels = options.get("kernels", "auto")
    if kernels not in KERNELS:
        raise ValueError(f"blockquant: kernels must be one of {KERNELS}, got {kernels!r}")
    env = os.environ.get("QCOMPILE_KERNELS", "").strip()
    if env:  # the environment overrides the option
        if env not in KERNELS:
            raise ValueError(f"blockquant: QCOMPILE_KERNELS must be one of {KERNELS}, got {env!r}")
        kernels = env
    if kernels == "triton":
        _check_triton_can_run(example_inputs)
    # "auto" is resolved per call by the ops: Triton for CUDA tensors, the reference otherwise
    return {"policy": policy, "lowering": lowering, "impl": kernels}


def _check_triton_can_run(example_inputs):
    """kernels='triton' needs Triton, and CUDA tensors or the interpreter (TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        raise RuntimeError("blockquant: kernels='triton' needs the triton package; use "
                           "kernels='reference' or 'auto'") from err
    tensors = [t for t in (example_inputs or ()) if isinstance(t, torch.Tensor)]
    on_cpu = any(not t.is_cuda for t in tensors) if tensors else not torch.cuda.is_available()
    if on_cpu and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("blockquant: kernels='triton' runs generated Triton kernels, which need "
                           "CUDA tensors; on CPU they run only in Triton's interpreter (set "
                           "TRITON_INTERPRET=1 before triton is imported). Use kernels='auto' "
                           "(Triton on CUDA, the reference on CPU) or 'reference'")


def copy_graph_module(gm):
    """A new GraphModule with a copy of gm's graph: Dynamo reads its own graph's placeholders
    after the backend returns, so the passes must not edit it in place."""
    from torch import fx
    graph = fx.Graph()
    out, out_node = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(out, type_expr=out_node.type)
    graph.owning_module = None
    new = fx.GraphModule(gm, graph)
    new.meta.update(getattr(gm, "meta", {}))
    return new


def run_passes(gm, example_inputs, policy: Policy, impl: str = "auto"):
    """All five passes on a copy of gm; returns the rewritten graph module (its extra inputs in
    ``gm.meta["qcompile_extra_inputs"]``) and the list of planned (node, site, spec)."""
    gm = copy_graph_module(gm)
    passes.debug_graph(gm, "dynamo")
    passes.find_quantisable(gm, with_matmul=policy.wants("matmul"))
    passes.debug_graph(gm, "find_quantisable")
    passes.plan(gm, policy)
    if not _has_qcompile_ops(gm):  # else quantize_model_ may have consumed the rules already
        warn_unmatched(policy, gm.meta["qcompile_matched_rules"])
    planned = planned_sites(gm)
    passes.debug_graph(gm, "plan")
    _set_impl(gm, impl)
    if not planned:
        record_compiled(gm, example_inputs)  # for explain(compiled_model)
        return gm, planned
    passes.quantize_weights(gm, example_inputs)
    record_compiled(gm, example_inputs)  # after quantising: explain counts the bytes stored
    passes.debug_graph(gm, "quantize_weights")
    passes.rewrite(gm, impl=impl)
    passes.debug_graph(gm, "rewrite")
    passes.fuse(gm)
    passes.debug_graph(gm, "fuse")
    return gm, planned


def _set_impl(gm, impl: str):
    """Point every qcompile op already in the graph (quantize_model_'s QuantLinear) at impl."""
    changed = False
    for n in gm.graph.nodes:
        if n.op != "call_function" or not str(n.target).startswith("qcompile."):
            continue
        op = n.target if hasattr(n.target, "_schema") else getattr(n.target, "default", None)
        schema = getattr(op, "_schema", None)
        names = [a.name for a in schema.arguments] if schema is not None else []
        if "impl" not in names:
            continue
        i = names.index("impl")
        if "impl" in n.kwargs:
            n.update_kwarg("impl", impl)
        elif len(n.args) > i:
            n.update_arg(i, impl)
        else:
            n.update_kwarg("impl", impl)
        changed = True
    if changed:
        gm.recompile()


def _lower(gm, inputs, lowering, mode=None):
    if lowering == "eager":
        return gm.forward
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx
    patches = list_mode_options(mode) if mode and mode != "default" else {}
    return compile_fx(gm, inputs, config_patches=patches)


def _has_qcompile_ops(gm) -> bool:
    return any(n.op == "call_function" and str(n.target).startswith("qcompile.")
               for n in gm.graph.nodes)


def blockquant_backend(gm, example_inputs, options=None, mode=None):
    """The torch.compile backend (registered as ``backend="blockquant"``). ``mode`` is
    torch.compile's mode, handed to Inductor as its mode options."""
    opts = parse_options(options, example_inputs)
    gm, planned = run_passes(gm, example_inputs, opts["policy"], opts["impl"])
    if not planned and not _has_qcompile_ops(gm):
        warnings.warn("blockquant: nothing in this graph matched the policy; compiling it "
                      "unchanged", stacklevel=2)
        return _lower(gm, list(example_inputs), opts["lowering"], mode)
    extra = tuple(gm.meta.get("qcompile_extra_inputs", ()))
    compiled = _lower(gm, list(example_inputs) + list(extra), opts["lowering"], mode)

    def run(*args):
        return compiled(*args, *extra)

    run.qcompile_graph = gm
    run.qcompile_plan = planned
    return run


# -- ahead-of-time weight swap: no full-precision copy of quantised weights ------------------

class QuantLinear(torch.nn.Module):
    """A linear layer (nn.Linear [N, K] or GPT-2 Conv1D [K, N]) whose weight is held only as a
    packed QTensor (buffers) and which runs ``qcompile::linear``; made by ``quantize_model_``."""

    def __init__(self, q, bias, act, conv1d: bool, impl: str = "auto"):
        super().__init__()
        from .ops import qtensor_meta
        self.register_buffer("codes", q.codes)
        self.register_buffer("scales", q.scales)
        self.side_names = list(q.side)
        for k, t in q.side.items():
            self.register_buffer(f"side_{k}", t)
        self.bias = bias
        self.meta = qtensor_meta(q)
        self.act = act.key if act is not None else ""
        self.conv1d = conv1d
        self.impl = impl
        self.fmt_key = q.fmt.key

    def forward(self, x):
        side = [getattr(self, f"side_{k}") for k in self.side_names]
        if self.conv1d:
            y = torch.ops.qcompile.linear(x.reshape(-1, x.shape[-1]), self.codes, self.scales,
                                          side, self.meta, self.act, self.bias, self.impl)
            return y.view(*x.shape[:-1], y.shape[-1])
        return torch.ops.qcompile.linear(x, self.codes, self.scales, side, self.meta, self.act,
                                         self.bias, self.impl)

    def extra_repr(self):
        return f"weight={self.fmt_key}, act={self.act or '-'}, conv1d={self.conv1d}"


def quantize_model_(model, policy: Policy | None = None):
    """Swap, in place, every linear layer (nn.Linear, GPT-2 Conv1D) that ``policy`` gives a
    weight format for a ``QuantLinear`` holding only the packed weight, so the process keeps no
    full-precision copy of it. Returns the model. Compile it afterwards as usual (the backend
    finds the qcompile ops already in place) or run it eagerly. Layers whose weight is shared
    with another module (tied) keep their full-precision weight."""
    from . import api
    from . import ops  # noqa: F401  (registers the ops)
    policy = default_policy() if policy is None else policy
    if not isinstance(policy, Policy):
        raise PolicyError(f"quantize_model_: policy must be a qcompile.Policy, got "
                          f"{type(policy).__name__}")
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    swaps = []
    for name, mod in model.named_modules():
        conv1d = isinstance(mod, Conv1D) if Conv1D else False
        if not (isinstance(mod, torch.nn.Linear) or conv1d):
            continue
        _, spec = policy.match(name, "linear")
        w = mod.weight
        if spec is None or spec.weight is None or counts.get(id(w), 0) > 1:
            continue
        if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            continue
        with torch.no_grad():
            q = api.quantize(w.detach(), spec.weight, axis=0 if conv1d else 1)
        swaps.append((name, QuantLinear(q, mod.bias, spec.act, conv1d)))
    for name, new in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return model


def resident_weight_bytes(model) -> int:
    """Bytes held by the model's parameters and buffers (each storage counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total
