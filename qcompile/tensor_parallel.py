"""Packed weights under tensor parallelism (docs/distributed.md): a layer whose weight is a
DTensor (transformers' ``tp_plan``, torch.distributed) is packed from this rank's shard alone,
and its packed layer runs under the same parallel style as the float layer did.

A shard packs to exactly the rows or blocks the whole tensor would pack to only where the
split keeps every block whole and the format's side data is local to blocks or rows:
- a split along the output rows (column-parallel) is right at any row;
- a split along the reduction axis (row-parallel) is right only where every rank's first column
  is a block boundary (and a byte boundary of the packed codes);
- side data describing the whole tensor (NVFP4's tensor scale, a quantile codebook) is computed
  across the ranks (``AcrossRanks``: a max, and order statistics counted over every shard), so
  each shard gets the whole tensor's, exactly; an activation format with such side data on an
  input split with K cannot be (each rank quantises its part of the input as it runs);
- proxy columns are chosen by the whole tensor's column scores (qcompile.proxy gathers them
  across the ranks from the source layers' shards), so they are the one-process choice; a
  column-parallel shard keeps every one of them (for its rows), a row-parallel shard those in
  its columns (``_proxy_part``).
Everything else is refused, naming the layer, the split and why, before any weight is packed.
Mixture-of-experts stacks [E, a, b] follow the same rules per expert matrix (``check_experts``,
``pack_experts``).

A saved packed folder loaded under a tp_plan (``shard_saved``, ``shard_saved_experts`` for an
expert stack, per expert matrix) is cut the same way from its packed bytes, never decoded;
there the whole-tensor side data is simply replicated (it was computed over the whole tensor
when saved), and OPQ outliers and proxy columns go to the rank owning their position.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from . import api
from .formats import reference
from .formats.codebooks import quantile_levels
from .formats.qtensor import QTensor
from .formats.reference import _outliers_of_rows

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


def mark_sharded(module):
    """Mark ``module`` (a packed layer or expert stack) as holding this rank's shard only."""
    setattr(module, SHARDED_ATTR, True)


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


def plan_mesh(model):
    """The 1-D tp mesh transformers' tp_plan parallelised ``model`` over, or None."""
    if (getattr(model, "_tp_size", None) or 1) <= 1:
        return None
    return model._mesh_manager.get_mesh("tp")


def shard_saved(model, name: str, kind: str, q, bias, mesh, act=None):
    """This rank's part (QTensor, bias) of the saved, whole packed weight ``q`` of layer
    ``name``, cut as its tp_plan style splits it: (q, bias) unchanged when the plan has no style
    for it. Codes and scales are sliced, never decoded: a saved tensor's side data describing
    the whole tensor (NVFP4's tensor scale, a quantile codebook) was computed over the whole
    tensor, so it is replicated, and OPQ outliers and proxy columns go to the rank owning their
    position."""
    style = parallel_style(model, name)
    if style is None:
        return q, bias
    where = f"layer {name!r} ({q.fmt.key}, weight {list(q.shape)})"
    if kind != "linear":
        raise ValueError(f"{WHO}: {where} is a saved packed {kind} under a tp_plan style; only "
                         "packed linear layers load sharded: keep it out of the tp_plan")
    unknown = set(q.side) - {*q.fmt.whole_tensor_side, *KEPT_APART}
    if unknown:
        raise ValueError(f"{WHO}: {where}: its side data {sorted(unknown)} is not one blockquant "
                         "knows how to cut; load this folder without tp_plan")
    from transformers.distributed.tensor_parallel import ColwiseParallel
    parts, rank = mesh.size(), mesh.get_local_rank()
    if isinstance(style, ColwiseParallel):
        lo, hi = _my_range(q.shape[0], parts, rank)
        return _rows(q, torch.arange(lo, hi)), _bias_rows(bias, lo, hi)
    for fmt, what in ((q.fmt, "weight"), (act, "input")):
        if fmt is not None:
            _check_blocks(where, q.shape[1], parts, fmt, what)
    return _columns(q, *_my_range(q.shape[1], parts, rank)), bias


KEPT_APART = ("outlier_index", "outlier_value", "proxy_index", "proxy_value")


def _bias_rows(bias, lo: int, hi: int):
    """A column-parallel layer's bias rows lo:hi: a DTensor (the plan sharded it as it loaded)
    is kept, its style runs on its local rows."""
    if bias is None or is_distributed(bias):
        return bias
    return torch.nn.Parameter(bias[lo:hi].clone(), requires_grad=False)


def _my_range(size: int, parts: int, rank: int) -> tuple[int, int]:
    offsets = chunk_offsets(size, parts) + [size]
    return offsets[rank], offsets[rank + 1]


def _rows(q, rows: torch.Tensor):
    """The rows ``rows`` (positions along the axis that is not reduced, in that order) of a
    2-d packed weight: its codes, scales and per-row side data, and the outliers inside them."""
    side = dict(q.side)
    if "outlier_index" in side:
        index, value = _outliers_of_rows(side["outlier_index"], side["outlier_value"], rows,
                                         q.scales.shape[-1] * q.block)
        side["outlier_index"], side["outlier_value"] = \
            index.to(q.side["outlier_index"].dtype), value
    if "proxy_value" in side:
        side["proxy_value"] = side["proxy_value"].index_select(0, rows)
    shape = list(q.shape)
    shape[1 - q.axis % 2] = rows.numel()
    return QTensor(q.fmt, q.codes.index_select(0, rows), q.scales.index_select(0, rows),
                   torch.Size(shape), q.dtype, q.axis, q.block, side)


def _columns(q, lo: int, hi: int):
    """Columns lo:hi (the reduction axis) of a 2-d packed weight, ``lo`` on a block and byte
    boundary (_check_blocks): whole blocks of codes and scales, and the weights kept apart
    (OPQ outliers, proxy columns) inside them."""
    row_len, blocks = q.scales.shape[-1] * q.block, -(-(hi - lo) // q.block)
    first, width = lo // q.block, blocks * q.block
    byte = lo * q.fmt.bits // 8
    side = dict(q.side)
    if "outlier_index" in side:
        index = side["outlier_index"].long()
        row, col = index // row_len, index % row_len
        mine = (col >= lo) & (col < lo + width)
        side["outlier_index"] = (row[mine] * width + col[mine] - lo).to(
            q.side["outlier_index"].dtype)
        side["outlier_value"] = side["outlier_value"][mine]
    if "proxy_index" in side:
        col = side["proxy_index"].long()
        mine = (col >= lo) & (col < hi)
        side["proxy_index"] = (col[mine] - lo).to(q.side["proxy_index"].dtype)
        side["proxy_value"] = side["proxy_value"][:, mine]
    codes = q.codes[:, byte:byte + -(-width * q.fmt.bits // 8)].clone()
    shape = list(q.shape)
    shape[q.axis % 2] = hi - lo
    return QTensor(q.fmt, codes, q.scales[:, first:first + blocks].clone(), torch.Size(shape),
                   q.dtype, q.axis, q.block, side)


def shard_saved_experts(model, name: str, stack: list, mesh) -> list:
    """This rank's part of each expert's saved packed matrix of the expert stack ``name``
    (``stack``: its experts' QTensors), cut as the stack's tp_plan style splits the stack
    [E, a, b] (unchanged when the plan has no style for it): rows at any row (a strided split,
    packed_colwise's gate and up halves, too), the reduction axis in whole blocks and bytes
    only; never decoded, side data describing an expert's whole matrix replicated. A whole
    stack under a style for its experts module alone (moe_tp_experts, which sums the ranks'
    outputs) is refused."""
    style_name, key = _plan_style(model, name)
    q = stack[0]
    where = f"saved packed expert stack {name!r} ({q.fmt.key}, {len(stack)} experts of " \
        f"{list(q.shape)})"
    dim, place = _stack_split(name, style_name, (len(stack), *q.shape), mesh)
    if dim is None:  # whole on every rank
        owner_style, owner = _plan_style(model, name.rpartition(".")[0])
        if owner_style is not None:
            raise ValueError(f"{WHO}: {where}: its experts module runs under the tp_plan style "
                             f"{owner_style!r} (of {owner!r}) but the plan has no style for the "
                             "stack itself, so each rank would add the whole stack's output: "
                             "load this folder without tp_plan")
        return stack
    if dim == 0:
        raise ValueError(f"{WHO}: {where} is split by experts (expert parallelism, {place}, "
                         f"style {style_name!r} of {key!r}); packed expert stacks are not run "
                         "under expert parallelism: load this folder without tp_plan")
    held = _held(q.shape[dim - 1], place, mesh)
    if dim - 1 != q.axis % 2:  # the rows: any rows, in the order the rank holds them
        return [_rows(e, held) for e in stack]
    lo, hi = (int(held[0]), int(held[-1]) + 1) if held.numel() else (0, 0)
    if not torch.equal(held, torch.arange(lo, hi)):
        raise ValueError(f"{WHO}: {where} is split along its reduction axis by {place} (style "
                         f"{style_name!r}), interleaving its columns across ranks; a packed "
                         "expert stack's shard must be whole blocks: load this folder without "
                         "tp_plan")
    _check_blocks(where, q.shape[q.axis % 2], mesh.size(), q.fmt, "weight")
    return [_columns(e, lo, hi) for e in stack]


def _plan_style(model, name: str):
    """(style name, plan key) of the tp_plan entry for ``name``, or (None, None)."""
    plan = getattr(model, "tp_plan", None) or {}
    from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard
    for key in (name, replace_layer_number_by_wildcard(name)):
        if key in plan:
            return plan[key], key
    return None, None


def _stack_split(name: str, style_name: str | None, shape, mesh):
    """(dimension, placement) the style ``style_name`` splits a 3-d stack of ``shape`` with, as
    transformers' style places the float parameter it stands for (on the meta device); (None,
    None) for no style or a stack it leaves whole."""
    from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES
    if style_name is None:
        return None, None
    probe = torch.nn.Module()
    probe.w = torch.nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)
    ALL_PARALLEL_STYLES[style_name].shard_param(probe, "w", mesh)
    w = probe.w
    if not is_distributed(w) or w.placements[0].is_replicate():
        return None, None
    from torch.distributed.tensor.placement_types import _StridedShard
    place = w.placements[0]
    if mesh.ndim != 1 or not (place.is_shard() or isinstance(place, _StridedShard)):
        raise ValueError(f"{WHO}: saved packed expert stack {name!r} is placed {place} by the "
                         f"tp_plan style {style_name!r}; a packed stack can be replicated or "
                         "sharded on a 1-D (tp) mesh: load this folder without tp_plan")
    return place.dim % len(shape), place


def _held(size: int, place, mesh) -> torch.Tensor:
    """The positions, along a dimension of ``size``, that this rank holds under ``place``
    (Shard or _StridedShard of that dimension): placed as DTensor places them."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard
    along = _StridedShard(0, split_factor=place.split_factor) \
        if isinstance(place, _StridedShard) else Shard(0)
    return distribute_tensor(torch.arange(size), mesh, [along], src_data_rank=None).to_local()


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
    if whole and what != "weight":  # a weight's: computed across the ranks (AcrossRanks)
        raise ValueError(f"{WHO}: {where}: the {what} format keeps side data describing the "
                         f"whole tensor ({', '.join(sorted(whole))}), which each rank would "
                         "compute from its part of the input as it runs; give this layer an "
                         "activation format without it (mxint8, mxfp4, int8, ...), or keep its "
                         "input in full precision (act=None)")


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


def quantize_weight(weight, fmt, axis: int, proxy_score=None, part=None):
    """``api.quantize_weight`` of this rank's part of ``weight``: its local shard when a DTensor,
    or ``part``, the shard transformers is loading into the DTensor ``weight``. A sharded
    weight's side data describing the whole tensor is computed across the ranks holding its
    shards (AcrossRanks), and a proxy format's columns are the whole tensor's (``proxy_score``:
    the whole tensor's, one per position along ``axis``), so the shard packs to exactly its
    part of the whole tensor's packing; every rank must call this for the weight, in the same
    order."""
    mine = local(weight) if part is None else part
    mine_fmt, score = fmt, proxy_score
    split_k = _split_dim(weight) == axis % weight.dim()
    if fmt.proxy is not None and proxy_score is not None and split_k:  # (None: api says)
        mine_fmt, score = _proxy_part(weight, fmt, axis, proxy_score)
    if fmt.whole_tensor_side and _sharded(weight):
        q = reference.quantize(mine, mine_fmt, axis, score, whole=AcrossRanks(weight.device_mesh))
    else:
        q = api.quantize_weight(mine, mine_fmt, axis, score)
    return q if mine_fmt is fmt else _with_proxy_format(q, fmt)


def _split_dim(weight) -> int | None:
    return weight.placements[0].dim % weight.dim() if _sharded(weight) else None


def _proxy_part(weight, fmt, axis: int, score):
    """(format, scores) that pick, in this rank's columns of a weight split along its
    reduction ``axis``, exactly the proxy columns the whole tensor's ``score`` picks there:
    their count as a proxy count, and a score of 1 for them, 0 for the others."""
    k = weight.shape[axis]
    lo, hi = _my_range(k, weight.device_mesh.size(), weight.device_mesh.get_local_rank())
    keep = reference.proxy_columns(score, fmt.proxy_count(k))
    kept = torch.zeros(k, dtype=torch.float32, device=score.device).index_fill_(0, keep, 1.0)
    count = int(kept[lo:hi].sum())
    return replace(fmt, proxy=count or None), kept[lo:hi] if count else None


def _with_proxy_format(q, fmt):
    """A shard packed with its own proxy count (or none) made a QTensor of the layer's format
    ``fmt``: a shard holding none of the proxy columns keeps empty proxy side data."""
    if "proxy_index" in q.side:
        return replace(q, fmt=fmt)
    rows = q.codes.shape[:-1]
    side = {"proxy_index": torch.zeros(0, dtype=torch.int32, device=q.codes.device),
            "proxy_value": torch.zeros(*rows, 0, dtype=torch.bfloat16, device=q.codes.device),
            **q.side}
    return replace(q, fmt=fmt, side=side)


def pack_experts(weight, part: torch.Tensor, fmt, axis: int):
    """The PackedExperts of this rank's part ``part`` [E, a, b] of the expert stack ``weight``
    (a DTensor), each expert's matrix packed along ``axis`` (1 or 2) by ``quantize_weight``:
    a side datum describing an expert's whole matrix is computed across the ranks."""
    from .expert_stack import PackedExperts
    with torch.no_grad():
        packed = PackedExperts([quantize_weight(weight, fmt, axis - 1, part=part[e])
                                for e in range(part.shape[0])], axis)
    if _sharded(weight):
        mark_sharded(packed)
    return packed


def _sharded(weight) -> bool:
    return is_distributed(weight) and not weight.placements[0].is_replicate()


class AcrossRanks(reference.WholeTensor):
    """The whole tensor's statistics from the shards held by the ranks of a 1-D ``mesh``,
    exactly: the largest of every shard's (an all-reduce of the maxima), and order statistics
    of every shard's values together, found by bisection over the values' float32 bit
    patterns with the counts below each probe summed across the ranks (never gathering the
    values: each rank keeps its shard only)."""

    def __init__(self, mesh):
        self.group = mesh.get_group()

    def max(self, part: torch.Tensor) -> torch.Tensor:
        out = part.clone()
        torch.distributed.all_reduce(out, torch.distributed.ReduceOp.MAX, group=self.group)
        return out

    def quantile_codebook(self, values: torch.Tensor, bits: int) -> torch.Tensor:
        keys = _ordered_keys(values.flatten().to(torch.float32)).sort().values
        count = self._sum(torch.tensor([keys.numel()], device=keys.device))
        return quantile_levels(lambda at: self._ranked(keys, at.to(keys.device)),
                               int(count), bits, values.device)

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(t, group=self.group)
        return t

    def _ranked(self, keys: torch.Tensor, at: torch.Tensor) -> list[float]:
        """The values at 0-based positions ``at`` of every rank's values sorted together: for
        each, the smallest key with more than ``at`` keys at or below it, over all ranks."""
        lo = torch.full_like(at, -2**31)
        hi = torch.full_like(at, 2**31 - 1)
        for _ in range(32):  # 2**32 keys: the interval halves each time
            mid = torch.div(lo + hi, 2, rounding_mode="floor")
            enough = self._sum(torch.searchsorted(keys, mid, right=True)) > at
            lo, hi = torch.where(enough, lo, mid + 1), torch.where(enough, mid, hi)
        return _float_of_key(lo).tolist()


def _ordered_keys(v: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered as the float32 values ``v`` are (no NaN; -0 just below +0): the bit
    pattern for a positive value, negatives mirrored below zero."""
    bits = v.view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, -2**31 - 1 - bits, bits)


def _float_of_key(key: torch.Tensor) -> torch.Tensor:
    bits = torch.where(key < 0, -2**31 - 1 - key, key)
    return bits.to(torch.int32).view(torch.float32)


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


def check_experts(expert_tensors):
    """Refuse, before any weight is packed, every mixture-of-experts stack of ``expert_tensors``
    ((ExpertTensor, spec) pairs) whose DTensor split its experts' packings cannot follow: each
    expert's matrix is packed from this rank's part of it, so the split must be one a 2-D
    weight could take (output rows, or whole blocks of the reduction axis)."""
    for t, spec in expert_tensors:
        weight = t.tensor
        if not is_distributed(weight) or weight.placements[0].is_replicate():
            continue
        from torch.distributed.tensor.placement_types import Shard, _StridedShard
        place, fmt = weight.placements[0], spec.weight
        where = f"expert stack {t.name!r} ({fmt.key}, weight {list(weight.shape)})"
        strided = isinstance(place, _StridedShard)  # (packed_colwise: gate and up rows each)
        if weight.device_mesh.ndim != 1 or not (place.is_shard() or strided):
            raise ValueError(f"{WHO}: {where} is placed {place} on a {weight.device_mesh.ndim}-D "
                             "mesh; a packed expert stack can be replicated or sharded on a 1-D "
                             "(tp) mesh only: keep the experts in full precision (None)")
        dim = place.dim % weight.dim()
        if dim == 0:
            raise ValueError(f"{WHO}: {where} is split by experts (expert parallelism, "
                             f"{place}); packed expert stacks are not run under expert "
                             "parallelism: load without it, or keep the experts in full "
                             "precision (None)")
        _check_format(f"split {place} of {where}", fmt, "weight")
        if dim == t.axis:  # the reduction axis: whole blocks on every rank, in order
            if strided or type(place) is not Shard:
                raise ValueError(f"{WHO}: {where} is split along its reduction axis by {place}, "
                                 "interleaving its columns across ranks; a packed expert "
                                 "stack's shard must be whole blocks: keep the experts in full "
                                 "precision (None)")
            _check_blocks(where, weight.shape[dim], weight.device_mesh.size(), fmt, "weight")


def refuse_sharded_experts(model, policy):
    """Refuse quantize_model_ of a model whose mixture-of-experts stacks the policy quantises
    are float DTensors already split by a tp_plan: recognising an expert stack runs its module
    on a probe, which the plan's hooks and split parameters do not allow, so the stacks would
    stay in float while one process packs them."""
    from .experts import SKIPPED_EXPERTS_ATTR, candidates
    for name, mod, attr in candidates(model):
        if attr in mod.__dict__.get(SKIPPED_EXPERTS_ATTR, {}):
            continue  # found not to be a stack blockquant packs (said then): float in one process
        spec = policy.match(name, "linear")[1]
        if spec is not None and spec.weight is not None and is_distributed(mod._parameters[attr]):
            raise ValueError(
                f"{WHO}: expert stack {name!r} is a float DTensor (a tensor-parallel model) that "
                f"the policy gives {spec.weight.key}; quantize_model_ cannot pack expert stacks "
                "already split by a tp_plan: load the float checkpoint with from_pretrained(..., "
                "tp_plan=..., quantization_config=BlockQuantConfig(policy)), which packs each "
                "rank's part as it loads, or keep the experts in full precision (None)")


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
    mark_sharded(new)
    w = old.weight
    new.out_features, new.in_features = (w.shape[1], w.shape[0]) if new.conv1d else w.shape
    style.install_forward(new, mesh)
