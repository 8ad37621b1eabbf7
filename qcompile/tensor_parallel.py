"""Packed weights under tensor parallelism (docs/distributed.md): a layer whose weight is a
DTensor (transformers' ``tp_plan``, torch.distributed) is packed from this rank's shard alone,
and its packed layer runs under the same parallel style as the float layer did.

A shard packs to exactly the rows or blocks the whole tensor would pack to only where the
split keeps every block whole and the format's side data is local to blocks or rows:
- a split along the output rows (column-parallel) is right at any row;
- a split along the reduction axis (row-parallel) is right only where every rank's first column
  is a block boundary (and a byte boundary of the packed codes);
- side data describing the whole tensor (NVFP4's tensor scale, a quantile codebook) and proxy
  columns (scored over the whole tensor) cannot be computed from one shard.
Everything else is refused, naming the layer, the split and why, before any weight is packed.
"""
from __future__ import annotations

import torch

WHO = "tensor parallelism"
SHARDED_ATTR = "_qcompile_tp_shard"  # a packed layer holding this rank's shard only


def refuse_sharded(model, doing: str):
    """Refuse ``doing`` (saving) a model whose packed layers hold one rank's shard: the file
    would hold the shard as if it were the whole weight."""
    for name, mod in model.named_modules():
        if getattr(mod, SHARDED_ATTR, False):
            raise ValueError(
                f"{WHO}: {doing} a tensor-parallel quantised model is not supported: layer "
                f"{name!r} holds only this rank's shard of its packed weight. Save from one "
                "process (from_pretrained without tp_plan, with BlockQuantConfig, then "
                "save_pretrained); under a tp_plan, load the float checkpoint with "
                "BlockQuantConfig and each rank packs its own shard")


def is_distributed(t) -> bool:
    """Whether ``t`` is a DTensor (torch.distributed.tensor), without importing it eagerly."""
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not isinstance(t, torch.Tensor) \
            or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def chunk_offsets(size: int, parts: int) -> list[int]:
    """Each rank's first index along a dimension of ``size`` split by DTensor's Shard (torch.chunk:
    ceil(size / parts) per rank, the last ones shorter or empty)."""
    step = -(-size // parts)
    return [min(r * step, size) for r in range(parts)]


def refuse_saved_under_plan(model):
    """Refuse loading a saved packed checkpoint into a model that a tp_plan parallelised: its
    packed weights are whole, and the plan's styles would run them as shards."""
    parallel = (getattr(model, "_tp_size", None) or 1) > 1
    if parallel or any(is_distributed(p) for p in model.parameters()):
        raise ValueError(f"{WHO}: loading a saved blockquant checkpoint under a tp_plan is not "
                         "supported: its packed weights are whole tensors, not this rank's "
                         "shards; under a tp_plan, load the float checkpoint with "
                         "BlockQuantConfig (each rank packs its own shard), or load this folder "
                         "without tp_plan")


def check_split(name: str, weight, fmt, axis: int, kind: str = "linear", act=None):
    """Refuse a DTensor ``weight`` whose shard would not pack to its part of the whole tensor's
    packing (weight format ``fmt``, or None, with blocks along ``axis``), or whose layer's input,
    split with it, would not quantise in the activation format ``act`` as the whole input
    would; no-op for a plain tensor."""
    if not is_distributed(weight):
        return
    mesh, placements = weight.device_mesh, weight.placements
    where = f"layer {name!r} ({fmt.key if fmt else 'weight full precision'}" \
        f"{', act ' + act.key if act else ''}, weight {list(weight.shape)})"
    if mesh.ndim != 1:
        raise ValueError(f"{WHO}: {where} is spread over a {mesh.ndim}-D device mesh; blockquant "
                         "packs weights split over one mesh dimension (a tp mesh) only")
    place = placements[0]
    if place.is_replicate():
        return
    if not place.is_shard():
        raise ValueError(f"{WHO}: {where} is placed {place}; a packed weight can be replicated or "
                         "sharded (Shard), not partial")
    dim = place.dim % weight.dim()
    split = "row-parallel split (along the reduction axis)" if dim == axis else \
        "column-parallel split (along the output rows)"
    if kind == "embedding":
        raise ValueError(f"{WHO}: {where}: a quantised embedding table cannot be split "
                         f"({split} by {place}): each rank would look up ids outside its rows; "
                         "keep the embedding in full precision (no op='embedding' rule) or out of "
                         "the tp_plan")
    # the input is split with the reduction axis only: a row-parallel layer quantises its shard
    for f, what in ((fmt, "weight"), (act if dim == axis else None, "input")):
        if f is not None:
            _check_format(f"{split} of {where}", f, what)
            if dim == axis:
                _check_blocks(where, weight.shape[axis], mesh.size(), f, what)


def _check_format(where: str, fmt, what: str):
    whole = dict(fmt.whole_tensor_side)
    if whole:
        raise ValueError(f"{WHO}: {where}: the {what} format keeps side data describing the "
                         f"whole tensor ({', '.join(sorted(whole))}), which one shard cannot "
                         "compute; give this layer a format without it (nf4, int4, mxint8, "
                         "mxfp4, bof4s_opq, ...) or keep it in full precision (None)")
    if getattr(fmt, "proxy", None) is not None:
        raise ValueError(f"{WHO}: {where}: proxy columns are chosen over the whole tensor, "
                         "which one shard cannot do; give this layer a format without proxy, "
                         "or keep it in full precision (None)")


def _check_blocks(where: str, k: int, parts: int, fmt, what: str):
    block = fmt.block_for(k)
    offsets = chunk_offsets(k, parts)
    cut = [o for o in offsets if o < k and (o % block or (o * fmt.bits) % 8)]  # (o == k: empty)
    if cut:
        raise ValueError(f"{WHO}: row-parallel split of {where} at K={cut} (of {k}, over "
                         f"{parts} ranks at {offsets}) cuts {what} blocks of {block}: a rank's "
                         "shard must start at a block boundary; use a format whose block "
                         f"divides the shard width, a tp size that splits K={k} on blocks of "
                         f"{block}, or keep this layer in full precision (None) or out of the "
                         "tp_plan")


def check_compile(model, policy):
    """Refuse compiling a model whose layers the policy quantises still hold float DTensor
    weights: the compiled graph sees only this rank's shard and would pack it as a whole
    tensor. Layers the policy gives only an activation format are checked as they run."""
    from .linear_rule import is_conv1d, linear_like
    for name, mod in model.named_modules():
        if not (linear_like(mod) and is_distributed(getattr(mod, "weight", None))):
            continue
        _, spec = policy.match(name, "linear")
        if spec is None:
            continue
        if spec.weight is not None:
            raise ValueError(
                f"{WHO}: layer {name!r} holds a float DTensor weight (a tensor-parallel model) "
                f"that the policy gives {spec.weight.key}; the compiled graph would see only "
                "this rank's shard: quantise the model first, qcompile.quantize_model_(model, "
                "policy) (or load it with from_pretrained(..., tp_plan=..., "
                "quantization_config=BlockQuantConfig(policy))), then compile it")
        check_split(name, mod.weight, None, 0 if is_conv1d(mod) else 1, act=spec.act)


def local(weight) -> torch.Tensor:
    """This rank's part of ``weight`` (the tensor itself when it is not a DTensor)."""
    return weight.to_local() if is_distributed(weight) else weight


def parallel_style(model, name: str):
    """transformers' tp_plan style for layer ``name`` of ``model``, or None when the model has
    no plan for it; ValueError for a style a packed layer cannot run under."""
    plan = getattr(model, "tp_plan", None) or {}
    if not plan:
        return None
    from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard
    from transformers.distributed.tensor_parallel import (ALL_PARALLEL_STYLES, ColwiseParallel,
                                                          RowwiseParallel)
    style_name = plan.get(name, plan.get(replace_layer_number_by_wildcard(name)))
    if style_name is None:
        return None
    style = ALL_PARALLEL_STYLES[style_name]
    if type(style) not in (ColwiseParallel, RowwiseParallel):
        raise ValueError(f"{WHO}: layer {name!r} runs under the tp_plan style {style_name!r}; a "
                         "packed layer runs under 'colwise', 'colwise_rep', "
                         "'colwise_gather_output', 'rowwise' or 'rowwise_rep' only: keep this "
                         "layer in full precision (None)")
    return style


def _style_or_refuse(model, name: str):
    style = parallel_style(model, name)
    if style is None:
        raise ValueError(f"{WHO}: layer {name!r} has a DTensor weight but no style in the model's "
                         "tp_plan (transformers'), whose styles blockquant re-installs on packed "
                         "layers: quantise before parallelising, or keep this layer in full "
                         "precision (None)")
    return style


def check_layers(model, layers):
    """Refuse, before any weight is packed, every layer of ``layers`` ((name, weight, spec,
    axis, kind) tuples) whose DTensor weight cannot be packed shard by shard or whose parallel
    style a packed layer cannot run under."""
    for name, weight, spec, axis, kind in layers:
        if is_distributed(weight):
            check_split(name, weight, spec.weight, axis, kind, spec.act)
            if kind == "linear":
                _style_or_refuse(model, name)


def keep_style(model, name: str, old: torch.nn.Module, new: torch.nn.Module, mesh=None):
    """Run the packed layer ``new`` under the tp_plan style that ``old`` (the float layer it
    replaces, its weight a DTensor on ``mesh``) ran under: the style's input and output
    collectives (the row-parallel sum, the gather of a column-parallel output) around the local
    packed matmul."""
    mesh = old.weight.device_mesh if is_distributed(old.weight) else mesh
    if mesh is None:
        return  # not parallel
    style = _style_or_refuse(model, name)
    new._hf_quantized_needs_local_tp = True  # transformers: run the forward on local tensors
    setattr(new, SHARDED_ATTR, True)
    w = old.weight
    new.out_features, new.in_features = (w.shape[1], w.shape[0]) if new.conv1d else w.shape
    style.install_forward(new, mesh)
