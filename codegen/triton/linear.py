"""Generated fused block-scaled linear kernels: y = fq(x) @ W^T (+ bias), W a packed QTensor.

One generator, ``linear_source``, writes every kernel from the Format descriptions, reusing the
decode lines of codegen/triton/dequant.py (unpack, element, block multiplier) and the quantise lines of
codegen/triton/quant.py (block scale, element code). Three kinds of kernel come out of it:

* weight-only: a [BLOCK_K, BLOCK_N] tile of W is decoded in registers (the same float32 value
  the reference dequantise gives, rounded to the weight's dtype), float32 accumulation;
* weight + activation, float: the activation tile is fake-quantised in the prologue, block by
  block along K, bit for bit as ``qcompile.fake_quantize`` (formats codegen/select.quant_supported()
  covers with int or minifloat elements and a block that is a power of two), then as above;
* weight + activation, integer (int/mxint/bfp elements on both sides, the weight block a
  multiple of the activation block): the activations are quantised once per call by a prologue
  kernel (``act_quant_source``: int8 codes and block multipliers), then each activation block's
  integer dot product is exact (an int8 dot into int32; for 16-element blocks a float16 dot,
  exact because codes and every partial sum are integers below 2^24), then scaled by the pair
  of block multipliers:
  ``y = fl32(...fl32(fl32(D_0 s_0) + fl32(D_1 s_1))... + b)``, blocks in K order, where
  ``D_t = sum q_x q_w`` over activation block t and ``s_t = fl32(a_x a_w)``,
  ``a = multiplier * 2^-frac``. A K tile of 128-1024 elements holds several blocks, handled
  one after another.

Each kind has a GEMV-shaped variant (M = 1: one program per BLOCK_N outputs and K split, products
summed per K lane and reduced with tl.sum once after the K loop; the integer GEMV does not split
K but takes 2-4 outputs per program) and a tiled GEMM (tl.dot, GROUP_M program order; its
sweep has 16-row tiles for M = 2..16). On a GPU both are autotuned over a few configs; under
TRITON_INTERPRET=1 one large-tile config is generated (the interpreter cannot autotune over two
or more). Float dots use fp16/bf16 operands for fp16/bf16 models (the operands are exactly
representable there, so products are exact) and IEEE float32 otherwise (TF32 with
QCOMPILE_FLOAT32_DOTS=tf32, off by default: a wider bound); the interpreter always dots in
float32 (its bf16 tl.dot is broken).

Layouts: a QTensor stores its codes with the quantised axis last, so an nn.Linear weight [N, K]
(axis=1) and a GPT-2 Conv1D weight [K, N] (axis=0) both arrive as [N, packed K] rows: the same
kernel serves both (the Conv1D result is x @ W = x @ (W^T)^T).

Bound (derived in docs/architecture.md): with u = 2^-23 and S = |fq(x)| @ |W|^T + |b|, float
kernels give |y - y_exact| <= gamma(K + 2 + c) S elementwise, gamma(n) = n u / (1 - n u), c the
OPQ outliers in the weight row; against the reference F.linear (which has its own float32 error)
twice that. The integer path is its formula above, bit for bit, and within gamma(n_t + 5) S
(n_t = number of activation blocks along K). TF32 dots: (e + (1 + e) gamma(K + 2 + c)) S,
e = 2^-9 + 2^-20.
"""
from __future__ import annotations

import functools
import inspect

import torch

from qcompile import config
from qcompile.formats import reference
from qcompile import formats as _formats

from . import quant as _quant
from .dequant import (_SCALE_NAMES, _element_lines, _next_pow2, _scale_lines, _unpack_lines,
                      int_code_lines, load_kernel, multiplier_lines, triton_cdiv)
from .dequant import dequantize as _dequantize
from ..select import (TRITON_GEMV_MAX_M, NoKernel, choose, fusable_act, int_path,  # noqa: F401
                     quant_supported, splits_k)

GEMV_MAX_M = TRITON_GEMV_MAX_M  # M = 2..16 run the GEMM with BLOCK_M 16
UNIT = 2.0**-23  # the bound's unit roundoff: covers round-to-nearest and truncating adders
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def gamma(n) -> float:
    """gamma(n) = n u / (1 - n u), u = 2^-23: the float32 summation error factor of the bound."""
    return n * UNIT / (1 - n * UNIT)


def interpreting() -> bool:
    return config.triton_interpret()


# ---- source -------------------------------------------------------------------------------

def _round_lines(v: str, dtype: str) -> list[str]:
    """Round float32 `v` (in place) to `dtype` and back, as torch's cast does (nearest, even)."""
    if dtype == "float16":
        return [f"{v} = {v}.to(tl.float16).to(tl.float32)  # round to float16"]
    if dtype == "bfloat16":
        return [f"# round to bfloat16 on the bit pattern (nearest, ties to even); NaN stays NaN",
                f"{v}_b = {v}.to(tl.int32, bitcast=True)",
                f"{v}_r = ({v}_b + 0x7FFF + (({v}_b >> 16) & 1)) & -65536",
                f"{v} = tl.where({v} != {v}, {v}, {v}_r.to(tl.float32, bitcast=True))"]
    return []


def _configs(variant: str, k_multiple: int, interpret: bool, integer: bool = False) -> list[str]:
    """triton.Config lines: one large tile under the interpreter, a small sweep on a GPU.

    The integer GEMV cannot split K (its float sum runs in K order), so it takes few outputs
    per program (N / BLOCK_N >= 4 x 132 programs on 4096 outputs) and long K tiles; the
    integer GEMM keeps the float32 accumulator and one int32 block dot within the registers
    (BLOCK_M * BLOCK_N <= 64 per thread each)."""
    def bk(k):
        return max(k, k_multiple)
    if variant == "gemv":
        if integer:
            tiles = [(4, 256, 1, 1)] if interpret else [
                (4, 256, 1, 3), (4, 512, 1, 3), (4, 512, 2, 3), (2, 512, 1, 3), (4, 1024, 2, 2)]
        else:
            tiles = [(64, 64, 4, 1)] if interpret else [
                (32, 128, 4, 3), (64, 64, 4, 3), (16, 256, 4, 3), (128, 32, 4, 3), (64, 128, 8, 3)]
        return sorted({f'triton.Config({{"BLOCK_N": {n}, "BLOCK_K": {bk(k)}}}, num_warps={w}, '
                       f'num_stages={s})' for n, k, w, s in tiles})
    if integer:
        tiles = [(64, 64, 128, 4, 1)] if interpret else [
            (128, 128, 128, 8, 3), (128, 64, 128, 8, 3), (64, 128, 128, 8, 3),
            (64, 64, 256, 4, 3), (128, 128, 256, 8, 2),
            (16, 64, 256, 4, 3), (16, 128, 128, 4, 3)]  # M = 2..16
    else:
        tiles = [(64, 64, 64, 4, 1)] if interpret else [
            (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),
            (128, 256, 64, 8, 3), (64, 64, 128, 4, 3), (32, 64, 128, 4, 4),
            (16, 64, 128, 4, 3), (16, 128, 64, 4, 3)]  # M = 2..16: tl.dot on a 16-row tile
    return sorted({f'triton.Config({{"BLOCK_M": {m}, "BLOCK_N": {n}, "BLOCK_K": {bk(k)}}}, '
                   f'num_warps={w}, num_stages={s})' for m, n, k, w, s in tiles})


def _act_lines(af, dtype: str, integer: bool) -> list[str]:
    """Prologue: fake-quantise the activation tile `xt` [BLOCK_M, BLOCK_K] in blocks along K."""
    ab = af.block_size
    el = af.element
    lines = [f"# fake-quantise the activation tile: {el.describe()}, {af.scale.describe()}, "
             f"blocks of {ab} along K (as qcompile.fake_quantize)",
             f"xb = tl.reshape(xt, (BLOCK_M * (BLOCK_K // {ab}), {ab}))  # one block per row",
             "xbits = xb.to(tl.int32, bitcast=True)",
             f"valid = tl.reshape(x_ok, (BLOCK_M * (BLOCK_K // {ab}), {ab}))",
             "bad = tl.max(((xbits & 0x7F800000) == 0x7F800000).to(tl.int32), axis=1) > 0",
             "amax = tl.max(xbits & 0x7FFFFFFF, axis=1).to(tl.float32, bitcast=True)",
             *_quant._scale_lines(af),
             "n = tl.where(bad[:, None], 0.0, xb * qmul[:, None])",
             *_quant._ENCODERS[el.kind](el, "n", "code"),
             "xsc = stored" if af.scale.kind == "absmax" else "xsc = stored.to(tl.int32)",
             *multiplier_lines(af, "xsc", "xmult")]
    if integer:  # signed codes, and a = multiplier * 2^-frac per block (row-major blocks)
        return lines + [*int_code_lines(el, "code", "xi"),
                        "xi = tl.reshape(xi, (BLOCK_M, BLOCK_K))",
                        f"axb = xmult * {float(2.0 ** -el.frac_bits)!r}  # exact"]
    return lines + [*_element_lines(el, "code", "xv"),
                    "xt = tl.reshape(xv * xmult[:, None], (BLOCK_M, BLOCK_K))",
                    *_round_lines("xt", dtype),
                    "xt = tl.where(x_ok, xt, 0.0)"]


def _k_mask(name: str, other: str | None, k_test: str, shape: str) -> list[str]:
    """``name = other & k_test`` (other None: k_test alone); without the K test where EVEN_K
    (K a multiple of BLOCK_K), so that the mask is constant along K and the loads can be
    vector loads."""
    if other is None:
        return ["if EVEN_K:", f"    {name} = tl.full({shape}, True, tl.int1)",
                "else:", f"    {name} = {k_test}"]
    return ["if EVEN_K:",
            f"    {name} = tl.broadcast_to({other}, {shape})",
            "else:",
            f"    {name} = {other} & ({k_test})"]


def _block_scale_lines(wfmt) -> list[str]:
    """``w``: the decoded tile times its block multipliers, the reference's float32 values.
    With a power-of-two block a tile holds whole blocks (SPB of them) or lies inside one, so
    each multiplier is computed once per block and row and broadcast; other block lengths
    (a row shorter than the block) take one multiplier per element."""
    one = ["# the tile lies inside one block: a vector of BLOCK_N multipliers",
           "sidx = offs_n.to(tl.int64) * n_blocks + k0 // QBLOCK",
           *_scale_lines(wfmt, mask="offs_n < N"),
           "w = tl.where(in_range, value * mult[None, :], 0.0)"]
    several = ["# the tile holds SPB whole blocks",
               "bidx = k0 // QBLOCK + tl.arange(0, SPB)[:, None]",
               "sidx = rows.to(tl.int64) * n_blocks + bidx",
               *_scale_lines(wfmt, mask="n_ok & (bidx < n_blocks)"),
               "w = tl.reshape(tl.reshape(value, (SPB, BLOCK_K // SPB, BLOCK_N)) "
               "* mult[:, None, :], (BLOCK_K, BLOCK_N))",
               "w = tl.where(in_range, w, 0.0)"]
    per_block = (["if SPB == 1:"] + ["    " + line for line in one] + ["else:"]
                 + ["    " + line for line in several])
    per_element = ["sidx = rows.to(tl.int64) * n_blocks + cols // QBLOCK",
                   *_scale_lines(wfmt),
                   "w = tl.where(in_range, value * mult, 0.0)"]
    return (["if POW2_BLOCK:  # one multiplier per block and weight row"]
            + ["    " + line for line in per_block] + ["else:"]
            + ["    " + line for line in per_element])


def _nibble_lines(start: str = "k0", length: str = "BLOCK_K") -> list[str]:
    """4-bit codes, two per byte (the first in the high nibble): each byte of the tile of
    `length` elements from K offset `start` loaded once, as a [length // 2, BLOCK_N] tile
    contiguous along K (vector loads on a GPU), then split and interleaved into the codes."""
    return ["# 4-bit codes, big-endian within each byte: each byte loaded once",
            f"kb = {start} // 2 + tl.arange(0, {length} // 2)",
            *_k_mask("b_ok", "n_ok", "2 * kb[:, None] < K", f"({length} // 2, BLOCK_N)"),
            "byte = tl.load(row_codes + kb[:, None], mask=b_ok, other=0).to(tl.int32)",
            "code = tl.reshape(tl.permute(tl.join(byte >> 4, byte & 15), (0, 2, 1)), "
            f"({length}, BLOCK_N))"]


MAX_SPLIT_K = 32  # rows of the float GEMV's workspace
MIN_PROGRAMS = 4 * 132  # M = 1: several programs per SM of an H100


def split_k(a) -> int:
    """K splits of the M = 1 float GEMV (a heuristic of the generated kernel, which carries
    this very source): enough programs for several per SM, each split at least 2 K tiles."""
    programs = -(-a["N"] // a["BLOCK_N"])
    return max(1, min(MAX_SPLIT_K, -(-MIN_PROGRAMS // programs), a["K"] // (2 * a["BLOCK_K"])))


_SPLIT_K_SOURCE = [f"MAX_SPLIT_K = {MAX_SPLIT_K}", f"MIN_PROGRAMS = {MIN_PROGRAMS}", "", "",
                   *inspect.getsource(split_k).splitlines(), "", ""]


def _store_lines(out_name: str) -> list[str]:
    """Add the bias, round to the output dtype, store."""
    body = [
        "if HAS_BIAS:",
        "    acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]",
        "out_ok = m_ok & n_ok",
        "out_at = out_ptr + offs_m[:, None].to(tl.int64) * N + rows",
    ]
    if out_name == "bfloat16":  # stored through an int16 view: exact rounding on the bits
        body += [*_round_lines("acc", "bfloat16"),
                 "acc_hi = tl.where(acc != acc, 0x7FC0, acc.to(tl.int32, bitcast=True) >> 16)",
                 "tl.store(out_at, acc_hi.to(tl.int16), mask=out_ok)"]
    elif out_name == "float16":
        body.append("tl.store(out_at, acc.to(tl.float16), mask=out_ok)")
    else:
        body.append("tl.store(out_at, acc, mask=out_ok)")
    return body


def group_m(a):
    """Row tiles per group of the GEMM's program order (GROUP_M swizzle): the largest power of
    two up to 8 that divides the number of row tiles, so every group is whole (no idle
    program) and the grouping needs no integer division."""
    tiles = -(-a["M"] // a["BLOCK_M"])
    g = 8
    while tiles % g:
        g //= 2
    return g


_GROUP_M_SOURCE = [*inspect.getsource(group_m).splitlines(), "", ""]


def _indent(lines: list[str], by: str = "    ") -> list[str]:
    return [by + line for line in lines]


def _program_lines(gemv: bool) -> list[str]:
    """pid_m / pid_n. The GEMM runs GROUP_M row tiles across every N tile before the next
    group (program_id(0) the fastest): those programs share their x rows and weight tiles in
    L2."""
    if gemv:
        return ["tl.static_assert(BLOCK_M == 1)  # the GEMV serves M = 1",
                "pid_m = 0",
                "pid_n = tl.program_id(0)"]
    return ["# L2-friendly order: GROUP_M row tiles, then the next N tile (powers of two: shifts)",
            "pid_m = tl.program_id(1) * GROUP_M + tl.program_id(0) % GROUP_M",
            "pid_n = tl.program_id(0) // GROUP_M"]


def _int_weight_lines(el, start: str, length) -> list[str]:
    """`wi`, the int8 weight codes [length, BLOCK_N] from K offset `start` (`cols`, `in_range`
    already set): bytes as they are for 8-bit codes, else unpacked and sign-extended."""
    if el.bits == 8:
        return ["wi = tl.load(row_codes + cols, mask=in_range, other=0).to(tl.int8, "
                "bitcast=True)  # two's complement bytes"]
    unpack = _nibble_lines(start, str(length)) if el.bits == 4 else _unpack_lines(el.bits)
    return [*unpack, *int_code_lines(el, "code", "wi"), "wi = wi.to(tl.int8)"]


def _int_gemv_lines(wfmt, af) -> list[str]:
    """The integer GEMV's K loop body: the whole [BLOCK_K, BLOCK_N] weight tile loaded at once
    (128-bit loads), the NSUB = BLOCK_K // AB block products p_t = fl32(D_t) * fl32(a_x a_w)
    computed side by side, then added to the accumulator one by one in K order."""
    el, ab = wfmt.element, af.block_size
    frac = float(2.0 ** -el.frac_bits)
    return [
        "ks = k0 + tl.arange(0, BLOCK_K)",
        *_k_mask("x_ok", None, "ks < K", "(BLOCK_K,)"),
        "xi = tl.load(xq_ptr + ks, mask=x_ok, other=0)  # int8 codes of the one row",
        "cols = ks[:, None]",
        *_k_mask("in_range", "n_ok", "cols < K", "(BLOCK_K, BLOCK_N)"),
        *_int_weight_lines(el, "k0", "BLOCK_K"),
        "# exact integer dot product of each block: [NSUB, BLOCK_N]",
        "prod = xi[:, None].to(tl.int32) * wi.to(tl.int32)",
        f"d = tl.sum(tl.reshape(prod, (BLOCK_K // {ab}, {ab}, BLOCK_N)), axis=1)",
        f"# multipliers: a_x per block, a_w per block and weight row",
        f"tk = k0 + tl.arange(0, BLOCK_K // {ab}) * {ab}  # each block's first K index",
        *_k_mask("t_ok", None, "tk < K", f"(BLOCK_K // {ab},)"),
        f"ax = tl.load(ax_ptr + k0 // {ab} + tl.arange(0, BLOCK_K // {ab}), mask=t_ok, "
        "other=0.0)",
        "sidx = rows.to(tl.int64) * n_blocks + (tk // QBLOCK)[:, None]",
        *_scale_lines(wfmt, mask="n_ok & t_ok[:, None]"),
        f"aw = mult * {frac!r}  # exact",
        "p = d.to(tl.float32) * (ax[:, None] * aw)",
        "if not EVEN_K:  # a block past K adds nothing (not even 0 * Inf)",
        "    p = tl.where(t_ok[:, None], p, 0.0)",
        f"# K order: row j of p alone (the others are zeros, so the sum is exactly p[j])",
        f"for j in tl.static_range(BLOCK_K // {ab}):",
        f"    acc += tl.sum(tl.where(tl.arange(0, BLOCK_K // {ab})[:, None] == j, p, 0.0), "
        "axis=0)[None, :]",
    ]


def _int_gemm_lines(wfmt, af) -> list[str]:
    """The integer GEMM's K loop body for the K tile at k0: its BLOCK_K // AB activation blocks
    in K order, each an exact integer tl.dot D scaled by fl32(a_x a_w), added to the float32
    accumulator (the formula of the module docstring, block by block)."""
    el, ab = wfmt.element, af.block_size
    frac = float(2.0 ** -el.frac_bits)
    if ab >= 32:  # int8 tensor-core dots need K >= 32
        dot = "d = tl.dot(xi, wi, out_dtype=tl.int32)"
    else:  # codes |q| <= 127 are exact in float16, every partial sum is an integer < 2^24
        dot = "d = tl.dot(xi.to(tl.float16), wi.to(tl.float16))  # exact"
    return [
        "# the weight multipliers of the tile, [BLOCK_N, SPB] (SPB blocks per row, contiguous)",
        "if POW2_BLOCK:",
        "    bidx = k0 // QBLOCK + tl.arange(0, SPB)[None, :]",
        "    sidx = offs_n[:, None].to(tl.int64) * n_blocks + bidx",
        *_indent(_scale_lines(wfmt, mask="(offs_n[:, None] < N) & (bidx < n_blocks)")),
        f"    aw_tile = mult * {frac!r}  # exact",
        f"for j in tl.static_range(BLOCK_K // {ab}):  # the activation blocks, in K order",
        *_indent([
            f"kj = k0 + j * {ab} + tl.arange(0, {ab})",
            *_k_mask("xj_ok", "m_ok", "kj[None, :] < K", f"(BLOCK_M, {ab})"),
            "xi = tl.load(xq_rows + kj[None, :], mask=xj_ok, other=0)  # int8 codes",
            "cols = kj[:, None]",
            *_k_mask("in_range", "n_ok", "cols < K", f"({ab}, BLOCK_N)"),
            *_int_weight_lines(el, f"(k0 + j * {ab})", ab),
            "# exact integer block dot product",
            dot,
            "# its multipliers: a_x of each row (stored block-major), a_w of each weight row",
            *_k_mask("a_ok", "(offs_m < M)", f"k0 + j * {ab} < K", "(BLOCK_M,)"),
            "ax = tl.load(ax_at, mask=a_ok, other=0.0)",
            "ax_at += M  # the next block's multipliers",
            "if POW2_BLOCK:  # column (j * AB) // QBLOCK of the tile's multipliers (exact: + 0s)",
            f"    aw = tl.sum(tl.where(tl.arange(0, SPB)[None, :] == (j * {ab}) // QBLOCK, "
            "aw_tile, 0.0), axis=1)",
            "else:",
            f"    sidx = offs_n.to(tl.int64) * n_blocks + (k0 + j * {ab}) // QBLOCK",
            *_indent(_scale_lines(wfmt, mask="offs_n < N")),
            f"    aw = mult * {frac!r}  # exact",
            "s = ax[:, None] * aw[None, :]",
            "if not EVEN_K:  # a block past K adds nothing (not even 0 * Inf)",
            f"    s = tl.where(k0 + j * {ab} < K, s, 0.0)",
            "acc += d.to(tl.float32) * s",
        ]),
    ]


def linear_source(wfmt, act_fmt=None, *, variant: str = "gemm", dtype=torch.float32,
                  out_float32: bool = False, interpret: bool | None = None,
                  float32_dots: str | None = None) -> str:
    """Readable Triton source of the fused linear kernel ``linear_kernel``.

    wfmt: the weight Format; act_fmt: an activation Format fused in the prologue (None for
    weight-only; must satisfy ``fusable_act``); variant: "gemm" or "gemv"; dtype: the model's
    dtype (x, W and the output); out_float32: store the float32 accumulator instead;
    float32_dots: the float GEMM's tl.dot input precision for float32 models, "ieee" or
    "tf32" (None: QCOMPILE_FLOAT32_DOTS, default "ieee"). On the integer path x_ptr is replaced
    by the codes and multipliers the prologue kernel (``act_quant_source``) wrote."""
    wfmt = _formats.get(wfmt)
    af = _formats.get(act_fmt) if act_fmt else None
    if af is not None and not fusable_act(af):
        raise NoKernel(f"activation format {af.key} cannot be fused in the prologue")
    if variant not in ("gemm", "gemv"):
        raise ValueError(f"variant must be 'gemm' or 'gemv', got {variant!r}")
    interpret = interpreting() if interpret is None else interpret
    float32_dots = config.float32_dots() if float32_dots is None else float32_dots
    if float32_dots not in config.FLOAT32_DOTS:
        raise ValueError(f"float32_dots must be one of {', '.join(config.FLOAT32_DOTS)}, "
                         f"got {float32_dots!r}")
    dname = _DTYPE_NAMES[dtype] if isinstance(dtype, torch.dtype) else dtype
    out_name = "float32" if out_float32 else dname
    integer = int_path(wfmt, af, variant)
    el = wfmt.element
    gemv = variant == "gemv"

    args = ["xq_ptr", "ax_ptr"] if integer else ["x_ptr"]
    args += ["codes_ptr", "scales_ptr"]
    if el.kind == "codebook":
        args.append("table_ptr")
    if wfmt.scale.kind == "nvfp4":
        args.append("tensor_scale_ptr")
    split = splits_k(wfmt, af, variant)
    args += ["bias_ptr", "out_ptr", *(["ws_ptr"] if split else []), "M", "N", "K", "M_KEY",
             "stride_xm", "row_bytes", "n_blocks",
             "QBLOCK: tl.constexpr", "EVEN_K: tl.constexpr", "POW2_BLOCK: tl.constexpr",
             "SPB: tl.constexpr", "HAS_BIAS: tl.constexpr", "BLOCK_M: tl.constexpr",
             "BLOCK_N: tl.constexpr", "BLOCK_K: tl.constexpr",
             *(["SPLIT_K: tl.constexpr"] if split else []),
             *([] if gemv else ["GROUP_M: tl.constexpr"])]

    body = _program_lines(gemv) + [
        "offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)",
        "offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)",
        "m_ok = offs_m[:, None] < M",
        "rows = offs_n[None, :]  # weight rows (output features) run along the tile's columns",
        "n_ok = rows < N",
        "row_codes = codes_ptr + rows.to(tl.int64) * row_bytes",
        ("xq_rows = xq_ptr" if integer else "x_rows = x_ptr")
        + " + offs_m[:, None].to(tl.int64) * stride_xm",
        *(["ax_at = ax_ptr + offs_m  # block 0's multipliers of these rows"]
          if integer and not gemv else []),
        "acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)",
        *(["# split-K: program (n, s) sums K tiles [s * k_per, (s + 1) * k_per)",
           "pid_k = tl.program_id(1)",
           "k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K",
           "acc_k = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)",
           "for k0 in range(pid_k * k_per, tl.minimum(K, (pid_k + 1) * k_per), BLOCK_K):"]
          if split else ["for k0 in range(0, K, BLOCK_K):"]),
    ]
    if integer:
        loop = _int_gemv_lines(wfmt, af) if gemv else _int_gemm_lines(wfmt, af)
    else:
        loop = [
            "ks = k0 + tl.arange(0, BLOCK_K)",
            *_k_mask("x_ok", "m_ok", "ks[None, :] < K", "(BLOCK_M, BLOCK_K)"),
            "xt = tl.load(x_rows + ks[None, :], mask=x_ok, other=0.0).to(tl.float32)",
            *(_act_lines(af, dname, False) if af is not None else []),
            f"# weight tile [BLOCK_K, BLOCK_N]: {el.describe()}, element k of weight row n",
            "cols = ks[:, None]",
            *_k_mask("in_range", "n_ok", "cols < K", "(BLOCK_K, BLOCK_N)"),
            *(_nibble_lines() if el.bits == 4 else _unpack_lines(el.bits)),
            *_element_lines(el, "code", "value"), *_block_scale_lines(wfmt),
            *_round_lines("w", dname)]
        if gemv:
            loop.append("acc_k += tl.trans(xt) * w  # per K lane; one reduction after the loop")
        elif dname == "float32" or interpret:
            precision = float32_dots if dname == "float32" else "ieee"
            loop.append(f'acc += tl.dot(xt, w, input_precision="{precision}")')
        else:
            t = {"float16": "tl.float16", "bfloat16": "tl.bfloat16"}[dname]
            loop.append(f"acc += tl.dot(xt.to({t}), w.to({t}))  # exact: both hold {dname} values")
    body += _indent(loop)
    if split:  # one partial sum per split; the launcher adds them and the bias, and rounds
        body += ["acc += tl.sum(acc_k, axis=0)[None, :]",
                 "tl.store(ws_ptr + pid_k.to(tl.int64) * N + rows, acc, mask=m_ok & n_ok)"]
    else:
        body += _store_lines(out_name)

    kind = ("float32 partial sums per K split" if split else
            "integer block dots" if integer else "float32 accumulation")
    act = (f", activations {af.key} (codes from the prologue kernel)" if integer else
           f", activations {af.key} fused" if af is not None else ", weight-only")
    configs = _configs(variant, af.block_size if af is not None else 16, interpret, integer)
    head = [
        f'"""Generated by qcompile.codegen: fused linear ({variant}) on {el.describe()} weights with '
        f'{_SCALE_NAMES[wfmt.scale.kind]} block scales{act}; {kind}; {dname} model, '
        f'{out_name} output."""',
        "import triton",
        "import triton.language as tl",
        "",
        "CONFIGS = [",
        *[f"    {c}," for c in configs],
        "]",
        "",
        "",
        *(_SPLIT_K_SOURCE if split else []),
        *([] if gemv else _GROUP_M_SOURCE),
        "# autotuned once per (next power of two of M, N, K): M_KEY is only the tuning key",
        f'@triton.autotune(configs=CONFIGS, key=["M_KEY", "N", "K"])',
        "@triton.heuristics({",
        '    "EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0,',
        '    "POW2_BLOCK": lambda a: a["QBLOCK"] & (a["QBLOCK"] - 1) == 0,',
        '    "SPB": lambda a: max(1, a["BLOCK_K"] // a["QBLOCK"]),  # scales per tile and row',
        *(['    "SPLIT_K": split_k,'] if split else []),
        *([] if gemv else ['    "GROUP_M": group_m,']),
        "})",
        "@triton.jit",
        "def linear_kernel(",
        *[f"        {', '.join(args[i:i + 6])}," for i in range(0, len(args), 6)],
        "):",
    ]
    return "\n".join(head + _indent(body)) + "\n"


ACT_QUANT_TILE = (8, 256)  # (rows, K elements) per program of the prologue kernel


def act_quant_source(af, dtype=torch.float32) -> str:
    """Readable Triton source of ``act_quant_kernel``, the integer path's prologue: activations
    [M, K] quantised once (not once per N tile), bit for bit as ``qcompile.quantize``, into
    int8 codes [M, KP] (zero past K) and a = multiplier * 2^-frac per block, stored block-major
    ([KP / AB, M]: the GEMM reads one contiguous vector of rows per block)."""
    af = _formats.get(af)
    dname = _DTYPE_NAMES[dtype] if isinstance(dtype, torch.dtype) else dtype
    ab = af.block_size
    body = [
        "pid_m = tl.program_id(0)",
        "pid_k = tl.program_id(1)",
        "offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)",
        "ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)",
        "m_ok = offs_m[:, None] < M",
        "x_ok = m_ok & (ks[None, :] < K)",
        "xt = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + ks[None, :], "
        "mask=x_ok, other=0.0).to(tl.float32)",
        *_act_lines(af, dname, True),
        "tl.store(xq_ptr + offs_m[:, None].to(tl.int64) * KP + ks[None, :], xi.to(tl.int8), "
        "mask=m_ok & (ks[None, :] < KP))",
        f"blk = pid_k * (BLOCK_K // {ab}) + tl.arange(0, BLOCK_K // {ab})[None, :]",
        f"tl.store(ax_ptr + blk.to(tl.int64) * M + offs_m[:, None], "
        f"tl.reshape(axb, (BLOCK_M, BLOCK_K // {ab})), mask=m_ok & (blk * {ab} < KP))",
    ]
    head = [f'"""Generated by qcompile.codegen: activations quantised to {af.key} integer codes '
            f'and block multipliers (the integer linear\'s prologue); {dname} input."""',
            "import triton",
            "import triton.language as tl",
            "",
            "",
            "@triton.jit",
            "def act_quant_kernel(x_ptr, xq_ptr, ax_ptr, M, K, stride_xm, KP, "
            "BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):"]
    return "\n".join(head + _indent(body)) + "\n"


# ---- launch ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _kernel(wfmt, af, variant, dtype, out_float32, interpret, float32_dots):
    """The compiled kernel for one source (generated once per process; cached on disk by hash)."""
    src = linear_source(wfmt, af, variant=variant, dtype=dtype, out_float32=out_float32,
                        interpret=interpret, float32_dots=float32_dots)
    return load_kernel(src, "linear_kernel")


@functools.lru_cache(maxsize=None)
def _act_kernel(af, dtype):
    return load_kernel(act_quant_source(af, dtype), "act_quant_kernel")


def _int_operands(x2, af):
    """The integer path's prologue: int8 codes [M, KP] and block multipliers [KP / AB, M] of
    the activations, quantised once for every N tile (KP: K rounded up to whole blocks and to
    16 bytes, so rows start aligned for vector loads)."""
    m, k = x2.shape
    ab = af.block_size
    kp = -(-k // max(16, ab)) * max(16, ab)
    xq = torch.empty((m, kp), dtype=torch.int8, device=x2.device)
    ax = torch.empty((kp // ab, m), dtype=torch.float32, device=x2.device)
    bm, bk = ACT_QUANT_TILE
    _act_kernel(af, x2.dtype)[(triton_cdiv(m, bm), triton_cdiv(kp, bk))](
        x2, xq, ax, m, k, x2.stride(0), kp, BLOCK_M=bm, BLOCK_K=bk, enable_fp_fusion=False)
    return xq, ax


def linear(x: torch.Tensor, q, act_fmt=None, bias: torch.Tensor | None = None,
           choice=None) -> torch.Tensor:
    """The fused linear on generated kernels: fake_quantize(x, act_fmt) @ W^T (+ bias) where
    W = dequantize(q) is [N, K] (axis=1) or [K, N] (axis=0, GPT-2 Conv1D: x @ W). ``choice``:
    the selector's answer (codegen/select.py), asked here when not given. Raises NoKernel
    where no kernel applies (the caller falls back to the reference)."""
    choice = (choice or choose(q, act_fmt, x, "triton", bias)).require()
    k_len, n_len = (q.shape[1], q.shape[0]) if q.axis == 1 else (q.shape[0], q.shape[1])
    af = _formats.get(act_fmt) if act_fmt else None
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k_len)
    m_len = x2.shape[0]
    if m_len == 0 or n_len == 0 or k_len == 0:
        y = x2.new_zeros((m_len, n_len))
        return (y + bias if bias is not None else y).reshape(*lead, n_len)
    apart = reference.kept_apart(q)  # OPQ outliers, proxy columns: added after the kernel
    opq = apart is not None and apart[0].numel() > 0
    if af is not None and (opq or not fusable_act(af)):
        # the correction after the kernel needs the fake-quantised activations themselves
        if not opq:
            config.warn(f"qcompile linear: activation format {af.key} is quantised outside the "
                        "fused kernel (no prologue for it)", once=("act outside", af.key))
        if quant_supported(af):
            x2 = _dequantize(_quant.quantize(x2, af, 1))
        else:
            x2 = reference.fake_quantize(x2, af, 1)
        af = None
    variant = choice.variant
    interp = interpreting()
    kernel = _kernel(q.fmt, af, variant, x.dtype, opq, interp, config.float32_dots())

    if interp and x2.dtype == torch.bfloat16:  # the interpreter's bf16 loads: widen in torch
        x2 = x2.float()
        bias = bias.float() if bias is not None else None
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    el = q.fmt.element
    codes = q.codes.reshape(n_len, -1)
    scales = q.scales.reshape(n_len, -1)
    if not codes.is_contiguous():
        codes = codes.contiguous()
    if not scales.is_contiguous():
        scales = scales.contiguous()
    if int_path(q.fmt, af, variant):
        xq, ax = _int_operands(x2, af)
        args, stride_xm = [xq, ax, codes, scales], xq.stride(0)
    else:
        args, stride_xm = [x2, codes, scales], x2.stride(0)
    if el.kind == "codebook":
        if el.data_dependent:
            args.append(q.side["codebook"].to(device=codes.device, dtype=torch.float32)
                        .contiguous())
        else:
            args.append(el.table_tensor(codes.device))
    if q.fmt.scale.kind == "nvfp4":
        args.append(q.side["tensor_scale"].to(torch.float32).contiguous())
    out_dtype = torch.float32 if opq else x.dtype
    split = splits_k(q.fmt, af, variant)
    if split:  # partial sums per K split, added below (rows past the split count stay zero)
        ws = torch.zeros((MAX_SPLIT_K, m_len, n_len), dtype=torch.float32, device=x.device)
        args += [bias if bias is not None else scales, ws, ws]
    else:
        out = torch.empty((m_len, n_len), dtype=out_dtype, device=x.device)
        args += [bias if bias is not None else scales,
                 out.view(torch.int16) if out_dtype == torch.bfloat16 else out]
    args += [m_len, n_len, k_len, _next_pow2(m_len), stride_xm, codes.shape[-1],
             scales.shape[-1]]
    # no fused multiply-add contraction (acc + d * s): every float op rounds as written, so the
    # integer path's result is the documented formula on a GPU too
    # the block length a constant: block indices are shifts, not integer divisions
    meta = {"QBLOCK": q.block, "HAS_BIAS": bias is not None, "enable_fp_fusion": False}
    if variant == "gemv":
        meta["BLOCK_M"] = 1
        def grid(m):
            return (triton_cdiv(n_len, m["BLOCK_N"]), m.get("SPLIT_K", 1))
    else:
        def grid(m):  # GROUP_M row tiles per N tile along axis 0 (group_m: whole groups)
            return (triton_cdiv(n_len, m["BLOCK_N"]) * m["GROUP_M"],
                    triton_cdiv(m_len, m["BLOCK_M"]) // m["GROUP_M"])
    kernel[grid](*args, **meta)
    if split:  # the splits in order, then the bias (as the kernel would add it), then rounding
        out = ws.sum(0)
        if bias is not None:
            out = out + bias.to(torch.float32)
        out = out if opq else out.to(x.dtype)

    if opq:  # kept apart: add x[:, k] * (v - decoded) for each, then round to the model dtype
        r, c, decoded = reference.decoded_at(q, apart[0])
        keep = c < k_len
        r, c, decoded = r[keep], c[keep], decoded[keep]
        v = apart[1][keep]
        delta = v.to(x.dtype).to(torch.float32) - decoded.to(x.dtype).to(torch.float32)
        corr = torch.zeros_like(out)
        corr.index_add_(1, r, x2[:, c].to(torch.float32) * delta)
        out = (out + corr).to(x.dtype)
    return out.reshape(*lead, n_len)
