"""The reference implementation: the definition of every format, in plain torch ops.

quantize: move the axis last, (proxy: take the kept columns out), pad the row with zeros to
whole blocks (a block_size longer than the row is clamped to the row: the same values, without
the padding), (OPQ: take outliers out), compute block scales, map each block onto the element
grid, encode, pack.
dequantize: unpack and decode (one lookup in a table of every code's value), multiply by the
block multiplier, (OPQ: put outliers back), (proxy: put the kept columns back), crop the
padding, move the axis back, cast to the original dtype (round half to even).
"""
from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import torch

from .codebooks import quantile_codebook
from .presets import Format
from .packing import codes_at, pack, unpack
from .qtensor import QTensor


@dataclass
class Blocked:
    """A tensor cut into blocks along its quantised axis, the weights kept apart taken out:
    what quantize (the reference's and the generated kernels') encodes."""
    values: torch.Tensor  # float32 [*lead, n_blocks, block]: zero padding; kept-apart zeroed
    valid: torch.Tensor  # bool [n_blocks, block]: a real element (not padding, not proxy)
    bad: torch.Tensor  # bool [*lead, n_blocks]: a NaN/Inf in the block (the block is NaN)
    block: int  # the block length used
    side: dict  # proxy columns and OPQ outliers, as QTensor.side holds them


def blocked(x: torch.Tensor, fmt: Format, axis: int, proxy_score=None) -> Blocked:
    """Move the axis last, (proxy: take the kept columns out), pad the rows with zeros to whole
    blocks, (OPQ: take the outliers out). ``proxy_score``: a proxy format's column scores."""
    xm = x.movedim(axis, -1).to(torch.float32)
    lead, k = xm.shape[:-1], xm.shape[-1]
    block = fmt.block_for(k)  # block_size clamped to the row; None: the row
    n_blocks = -(-k // block)
    valid = torch.arange(n_blocks * block, device=x.device) < k
    side = {}
    if fmt.proxy is not None:  # kept columns: out of the blocks and their statistics
        keep = proxy_columns(proxy_score, fmt.proxy_count(k))
        side["proxy_index"] = keep.to(torch.int32)
        side["proxy_value"] = xm.index_select(-1, keep).to(torch.bfloat16)
        xm = xm.index_fill(-1, keep, 0.0)
        valid = valid.index_fill(0, keep, False)
    valid = valid.reshape(n_blocks, block)
    blocks = torch.nn.functional.pad(xm, (0, n_blocks * block - k)).reshape(*lead, n_blocks, block)
    bad = ~torch.isfinite(blocks).all(-1)  # a NaN/Inf anywhere makes the whole block NaN
    if fmt.opq is not None:
        blocks, outliers = _take_outliers(blocks, valid, bad, fmt.opq)
        side.update(outliers)
    return Blocked(blocks, valid, bad, block, side)


def unblocked(rows: torch.Tensor, q: QTensor) -> torch.Tensor:
    """Decoded float32 rows [..., n_blocks * block] back to the tensor ``q`` stands for: the
    weights kept apart written back, the padding cropped, the axis moved back, q's dtype."""
    moved = torch.empty(q.shape, device="meta").movedim(q.axis, -1).shape
    lead, k = moved[:-1], moved[-1]
    apart = kept_apart(q)
    if apart is not None:
        rows = rows.flatten().index_put((apart[0],), apart[1].to(torch.float32))
    out = rows.reshape(*lead, q.scales.shape[-1] * q.block)[..., :k]
    return out.movedim(-1, q.axis).to(q.dtype)


def normalised(b: Blocked, qmul: torch.Tensor) -> torch.Tensor:
    """Each block times its quantisation multiplier (NaN blocks zero): the element inputs."""
    return torch.where(b.bad[..., None], 0.0, b.values * qmul[..., None])


class WholeTensor:
    """How quantize computes side data describing the whole tensor (NVFP4's tensor scale, a
    quantile codebook) from the values it is given: here they are the whole tensor. A part of
    a tensor (one rank's shard, qcompile.tensor_parallel) gives its own, which combines the
    parts' statistics into the whole tensor's."""

    def max(self, part: torch.Tensor) -> torch.Tensor:
        """The largest of every part's ``part`` (a 0-d statistic of each part)."""
        return part

    def quantile_codebook(self, values: torch.Tensor, bits: int) -> torch.Tensor:
        """codebooks.quantile_codebook of every part's ``values`` together."""
        return quantile_codebook(values, bits)


def quantile_table(b: Blocked, n: torch.Tensor, bits: int,
                   whole: WholeTensor = WholeTensor()) -> torch.Tensor:
    """A quantile format's codebook: from the block-normalised values ``n`` of the tensor's
    real elements (NaN blocks, padding and kept-apart weights left out)."""
    return whole.quantile_codebook(n[b.valid.expand_as(n) & ~b.bad[..., None]], bits)


def quantize(x: torch.Tensor, fmt: Format, axis: int, proxy_score=None,
             whole: WholeTensor = WholeTensor()) -> QTensor:
    """``proxy_score`` (a proxy format only): one score per position along ``axis``.
    ``whole``: where ``x`` is a part of a tensor, cut on block boundaries, its WholeTensor
    gives the whole tensor's side data, so the result is that part of the whole's packing."""
    b = blocked(x, fmt, axis, proxy_score)
    blocks, bad, block, side = b.values, b.bad, b.block, dict(b.side)
    lead, n_blocks = blocks.shape[:-2], blocks.shape[-2]
    # a block_size longer than the row: the block is the row, its statistics those of the
    # zero-padded block of the definition; one +0 stands for that padding (only signed absmax
    # sees it: an all-zero row's tie goes to the +0)
    clamped = block < (fmt.block_size or 0)
    stats = torch.nn.functional.pad(blocks, (0, 1)) if clamped else blocks
    given = {"tensor_scale": whole.max(fmt.scale.tensor_scale(stats))} \
        if fmt.scale.kind == "nvfp4" else {}  # (a division by a constant: max commutes)
    scales, qmul, scale_side = fmt.scale.compute(stats, fmt.element, bad, **given)
    side.update(scale_side)
    n = normalised(b, qmul)
    if fmt.element.kind == "log":
        # x * 2^-e can underflow float32 to zero, but only an exact zero encodes to zero: keep
        # such n nonzero (any |n| below 2^-126 clamps to the smallest magnitude anyway)
        lost = (n == 0) & (blocks != 0) & ~bad[..., None]
        n = torch.where(lost, torch.where(blocks < 0, -2.0**-149, 2.0**-149), n)
    if fmt.element.kind == "codebook" and fmt.element.data_dependent:
        table = quantile_table(b, n, fmt.element.bits, whole)
        side["codebook"] = table
        codes = fmt.element.encode(n, table)
    else:
        codes = fmt.element.encode(n)
    packed = pack(codes.reshape(*lead, n_blocks * block), fmt.element.bits)
    return QTensor(fmt, packed, scales.contiguous(), x.shape, x.dtype, axis, block, side)


def dequantize(q: QTensor) -> torch.Tensor:
    n_blocks = q.scales.shape[-1]
    values = decode_elements(q, n_blocks * q.block).reshape(*q.scales.shape, q.block)
    out = values.mul_(q.fmt.scale.multiplier(q.scales, q.fmt.element, q.side)[..., None])
    return unblocked(out, q)


def fake_quantize(x: torch.Tensor, fmt: Format, axis: int) -> torch.Tensor:
    """dequantize(quantize(x)): x rounded to the format (a format without proxy columns)."""
    return dequantize(quantize(x, fmt, axis))


def proxy_columns(score, count: int) -> torch.Tensor:
    """The ``count`` positions with the highest ``score`` (ties: the lower position first; NaN
    scores last), ascending, int64."""
    order = torch.argsort(-score.to(torch.float64), stable=True)  # NaN sorts last
    return order[:count].sort().values


def kept_apart(q: QTensor):
    """Every weight a QTensor keeps apart from its blocks, OPQ outliers and proxy columns alike:
    (flat positions in the padded [rows, n_blocks * block] layout, ascending, int64; their
    values, bfloat16), or None. Kernels decode the blocks and add these afterwards."""
    index, value = [], []
    if "outlier_index" in q.side:
        index.append(q.side["outlier_index"].long())
        value.append(q.side["outlier_value"])
    if "proxy_index" in q.side:
        pv = q.side["proxy_value"]
        rows = torch.arange(pv.numel() // max(pv.shape[-1], 1), device=pv.device)
        row_len = q.scales.shape[-1] * q.block
        index.append((rows[:, None] * row_len + q.side["proxy_index"].long()).flatten())
        value.append(pv.flatten())
    if not index:
        return None
    if len(index) == 1:
        return index[0], value[0]
    flat, order = torch.cat(index).sort()
    return flat, torch.cat(value)[order]


def dequantize_rows(q: QTensor, rows: torch.Tensor) -> torch.Tensor:
    """``dequantize(q)[rows]`` for a 2-d QTensor with blocks along its last axis (an embedding
    table [vocab, hidden]), decoding only the rows asked for. A value depends only on its
    block, so the gathered rows' codes and scales dequantise to exactly those rows; OPQ
    outliers (flat positions, ascending, in the padded [rows, n_blocks * block] layout) are
    moved to the gathered rows' positions."""
    if len(q.shape) != 2 or q.axis not in (1, -1):
        raise ValueError(f"dequantize_rows: a 2-d QTensor with blocks along axis 1 is needed, got "
                         f"shape {tuple(q.shape)} and axis {q.axis}")
    flat = rows.reshape(-1).long()
    side = dict(q.side)
    if "proxy_value" in side:
        side["proxy_value"] = side["proxy_value"].index_select(0, flat)
    if "outlier_index" in side:
        side["outlier_index"], side["outlier_value"] = _outliers_of_rows(
            side["outlier_index"], side["outlier_value"], flat, q.scales.shape[-1] * q.block)
    sub = QTensor(q.fmt, q.codes.index_select(0, flat), q.scales.index_select(0, flat),
                  torch.Size([flat.numel(), q.shape[1]]), q.dtype, 1, q.block, side)
    return dequantize(sub).reshape(*rows.shape, q.shape[1])


def _outliers_of_rows(index, value, rows, row_len: int):
    """The outliers of ``rows`` (in that order, repeats included), renumbered for a table made
    of those rows. ``index`` ascends (quantize takes it from ``nonzero``), so each row's
    outliers are one run, found by binary search."""
    index = index.long()
    starts = torch.searchsorted(index, rows * row_len)
    counts = torch.searchsorted(index, (rows + 1) * row_len) - starts
    total = int(counts.sum())
    owner = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), counts,
                                    output_size=total)
    first = torch.repeat_interleave(starts - torch.cumsum(counts, 0) + counts, counts,
                                    output_size=total)
    taken = first + torch.arange(total, device=rows.device)  # positions in index
    new_index = owner * row_len + index[taken] % row_len
    return new_index, value[taken]


def decoded_at(q: QTensor, flat: torch.Tensor):
    """(row, column, value) of the elements at ``flat`` positions of a 2-d QTensor's padded
    [rows, n_blocks * block] layout, decoded as dequantize decodes them (codes times their
    block multiplier, before the weights kept apart are written back)."""
    el = q.fmt.element
    rows = q.scales.shape[0]
    row_len = q.scales.shape[-1] * q.block
    r, c = flat // row_len, flat % row_len
    code = codes_at(q.codes.reshape(rows, -1), el.bits, r, c)
    values = el.decode(code, q.side["codebook"]) if el.kind == "codebook" and \
        el.data_dependent else el.decode(code)
    mult = q.fmt.scale.multiplier(q.scales.reshape(rows, -1)[r, c // q.block], el, q.side)
    return r, c, values * mult


def decode_elements(q: QTensor, n_codes: int) -> torch.Tensor:
    """The element values of the first n_codes codes of each packed row, float32.

    A value depends on its code alone, so the element is decoded once for each of its 2^bits
    codes and the rows are looked up in that table: 8-bit rows byte by byte, 4-bit rows through
    a table of code pairs (byte b holds codes b >> 4, then b & 15). A lookup, not arithmetic,
    per weight: this is what makes the reference fast enough to serve decoding on a CPU."""
    el = q.fmt.element
    every_code = torch.arange(2**el.bits, device=q.codes.device)
    if el.kind == "codebook" and el.data_dependent:
        table = el.decode(every_code, q.side["codebook"])
    else:
        table = el.decode(every_code)
    codes, per_index = q.codes, 1
    if el.bits == 4:
        table, per_index = torch.stack([table.repeat_interleave(16), table.repeat(16)], -1), 2
    elif el.bits != 8:
        codes = unpack(q.codes, el.bits, n_codes)
    # index_select: several times faster on a CPU than indexing with a tensor
    values = table.index_select(0, codes.flatten().long())
    return values.reshape(*codes.shape[:-1], codes.shape[-1] * per_index)[..., :n_codes]


def opq_threshold(block_len: int, q: float) -> float:
    """F_M^-1(q) for the maximum M of block_len |standard normals|: F_M(m) = (2 G(m) - 1)^I."""
    return NormalDist().inv_cdf((q ** (1.0 / block_len) + 1.0) / 2.0)


def _take_outliers(blocks, valid, bad, q):
    """OPQ (BOF4 paper): |w| > sigma_b * F_M^-1(q) is an outlier, sigma_b the block's corrected
    standard deviation over its real (unpadded) elements, computed in float64. Outliers are kept
    in bfloat16 with their flat index and zeroed before the block scale is taken."""
    x = blocks.to(torch.float64)
    count = valid.sum(-1)
    mean = (x * valid).sum(-1) / count.clamp(min=1)
    var = ((x - mean[..., None]) ** 2 * valid).sum(-1) / (count - 1).clamp(min=1)
    limit = torch.full(count.shape, float("inf"), dtype=torch.float64, device=blocks.device)
    for c in count.unique().tolist():  # a full block size and at most one shorter last block
        if c > 1:
            limit[count == c] = opq_threshold(c, q)
    out = (x.abs() > (var.sqrt() * limit)[..., None]) & valid & ~bad[..., None]
    flat = out.flatten().nonzero().flatten()
    index_dtype = torch.int32 if out.numel() < 2**31 else torch.int64
    side = {"outlier_index": flat.to(index_dtype),
            "outlier_value": blocks.flatten()[flat].to(torch.bfloat16)}
    return blocks.masked_fill(out, 0.0), side
