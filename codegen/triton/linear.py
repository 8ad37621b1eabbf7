"""Generated fused block-scaled linear kernels: y = fq(x) @ W^T (+ bias), W a packed QTensor.

One generator, ``linear_source``, writes every kernel from the Format descriptions: a skeleton
with named holes (templates/linear_*.py.jinja, jinja2 with StrictUndefined, so a hole left
unfilled is an error) filled by the emitters' lines (emit.py: element decode and encode, block
multiplier and block scale), the same lines the dequantise and quantise kernels use. Three
kinds of kernel come out of it, one skeleton each:

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

import contextlib
import functools
import inspect
from pathlib import Path

import torch

from qcompile import config
from qcompile import formats as _formats
from qcompile.formats import reference

from ..cache import load_kernel
from . import emit
from . import quant as _quant
from .dequant import dequantize as _dequantize
from .elements import int_code_lines
from .lines import cdiv, indent, next_pow2, unpack_lines
from .traceable import interpretable, outside_tracing
from ..select import (TRITON_GEMV_MAX_M, NoKernel, choose, fusable_act, int_path,  # noqa: F401
                     quant_supported, splits_k)

GEMV_MAX_M = TRITON_GEMV_MAX_M  # M = 2..16 run the GEMM with BLOCK_M 16
UNIT = 2.0**-23  # the bound's unit roundoff: covers round-to-nearest and truncating adders
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
TEMPLATES = Path(__file__).parent / "templates"  # the kernel skeletons, package data


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
             *emit.scale_encode_lines(af),
             "n = tl.where(bad[:, None], 0.0, xb * qmul[:, None])",
             *emit.encode_lines(el, "n", "code"),
             emit.stored_as_int_line(af, "stored", "xsc"),
             *emit.multiplier_lines(af, "xsc", "xmult")]
    if integer:  # signed codes, and a = multiplier * 2^-frac per block (row-major blocks)
        return lines + [*int_code_lines(el, "code", "xi"),
                        "xi = tl.reshape(xi, (BLOCK_M, BLOCK_K))",
                        f"axb = xmult * {float(2.0 ** -el.frac_bits)!r}  # exact"]
    return lines + [*emit.decode_lines(el, "code", "xv"),
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


_SPLIT_K_SOURCE = "\n".join([f"MAX_SPLIT_K = {MAX_SPLIT_K}", f"MIN_PROGRAMS = {MIN_PROGRAMS}", "", "",
                             inspect.getsource(split_k).rstrip()])


def group_m(a):
    """Row tiles per group of the GEMM's program order (GROUP_M swizzle): the largest power of
    two up to 8 that divides the number of row tiles, so every group is whole (no idle
    program) and the grouping needs no integer division."""
    tiles = -(-a["M"] // a["BLOCK_M"])
    g = 8
    while tiles % g:
        g //= 2
    return g


_GROUP_M_SOURCE = inspect.getsource(group_m).rstrip()


def _int_weight_lines(el, start: str, length) -> list[str]:
    """`wi`, the int8 weight codes [length, BLOCK_N] from K offset `start` (`cols`, `in_range`
    already set): bytes as they are for 8-bit codes, else unpacked and sign-extended."""
    if el.bits == 8:
        return ["wi = tl.load(row_codes + cols, mask=in_range, other=0).to(tl.int8, "
                "bitcast=True)  # two's complement bytes"]
    unpack = _nibble_lines(start, str(length)) if el.bits == 4 else unpack_lines(el.bits)
    return [*unpack, *int_code_lines(el, "code", "wi"), "wi = wi.to(tl.int8)"]


def _template_environment():
    """The jinja environment of the kernel skeletons (templates/*.py.jinja): a hole left unfilled
    is an error (StrictUndefined); block tags take their whole line."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    env.filters["lines"] = _join_lines
    env.globals["k_mask"] = _k_mask
    return env


def _join_lines(lines, width: int) -> str:
    """A hole's lines as one string for a template line indented by ``width``: the first line
    takes the template's indentation, the others get ``width`` spaces."""
    return ("\n" + " " * width).join(lines)


@functools.lru_cache(maxsize=None)
def _template(name: str):
    return _template_environment().get_template(name)


def _signature(wfmt, integer: bool, split: bool, gemv: bool) -> list[str]:
    """The kernel's parameters, six per line: activation operands, the packed weight and the
    operands its emitters read, then sizes and constants."""
    args = ["xq_ptr", "ax_ptr"] if integer else ["x_ptr"]
    args += ["codes_ptr", "scales_ptr", *emit.decode_operands(wfmt)]
    args += ["bias_ptr", "out_ptr", *(["ws_ptr"] if split else []), "M", "N", "K", "M_KEY",
             "stride_xm", "row_bytes", "n_blocks",
             "QBLOCK: tl.constexpr", "EVEN_K: tl.constexpr", "POW2_BLOCK: tl.constexpr",
             "SPB: tl.constexpr", "HAS_BIAS: tl.constexpr", "BLOCK_M: tl.constexpr",
             "BLOCK_N: tl.constexpr", "BLOCK_K: tl.constexpr",
             *(["SPLIT_K: tl.constexpr"] if split else []),
             *([] if gemv else ["GROUP_M: tl.constexpr"])]
    return [", ".join(args[i:i + 6]) for i in range(0, len(args), 6)]


def _skeleton_holes(wfmt, af, variant, dname, out_name, interpret, integer, split) -> dict:
    """The holes every skeleton has (linear_base.py.jinja): header, configs, signature, store."""
    gemv = variant == "gemv"
    kind = ("float32 partial sums per K split" if split else
            "integer block dots" if integer else "float32 accumulation")
    act = (f", activations {af.key} (codes from the prologue kernel)" if integer else
           f", activations {af.key} fused" if af is not None else ", weight-only")
    return dict(
        variant=variant, weight=wfmt.element.describe(), scale=emit.scale_name(wfmt), act=act,
        accumulation=kind, dname=dname, out_name=out_name, gemv=gemv, split=split,
        configs=_configs(variant, af.block_size if af is not None else 16, interpret, integer),
        split_k_source=_SPLIT_K_SOURCE, group_m_source=_GROUP_M_SOURCE,
        signature=_signature(wfmt, integer, split, gemv), round_acc=_round_lines("acc", "bfloat16"))


def _float_holes(wfmt, af, dname, interpret, float32_dots) -> dict:
    """linear_float.py.jinja's holes (and linear_act_float's prologue): the weight tile's
    unpack, decode and block multipliers under each mask, its rounding, the dot."""
    el = wfmt.element
    precision = float32_dots if dname == "float32" else "ieee"
    half = {"float16": "tl.float16", "bfloat16": "tl.bfloat16"}.get(dname)
    return dict(
        unpack=_nibble_lines() if el.bits == 4 else unpack_lines(el.bits),
        decode=emit.decode_lines(el, "code", "value"),
        scale_in_one_block=emit.scale_decode_lines(wfmt, mask="offs_n < N"),
        scale_whole_blocks=emit.scale_decode_lines(wfmt, mask="n_ok & (bidx < n_blocks)"),
        scale_per_element=emit.scale_decode_lines(wfmt),
        round_w=_round_lines("w", dname), precision=precision,
        half_dot=None if dname == "float32" or interpret else half,
        act_prologue=_act_lines(af, dname, False) if af is not None else [])


def _int_holes(wfmt, af, gemv: bool) -> dict:
    """linear_int.py.jinja's holes: the int8 weight codes and the weight multipliers (a_w =
    multiplier * 2^-frac) under each mask, the block dot."""
    el, ab = wfmt.element, af.block_size
    if ab >= 32:  # int8 tensor-core dots need K >= 32
        dot = "d = tl.dot(xi, wi, out_dtype=tl.int32)"
    else:  # codes |q| <= 127 are exact in float16, every partial sum is an integer < 2^24
        dot = "d = tl.dot(xi.to(tl.float16), wi.to(tl.float16))  # exact"
    start, length = ("k0", "BLOCK_K") if gemv else (f"(k0 + j * {ab})", ab)
    return dict(
        ab=ab, frac=repr(float(2.0 ** -el.frac_bits)), dot=dot,
        weight_codes=_int_weight_lines(el, start, length),
        scales_per_block=emit.scale_decode_lines(wfmt, mask="n_ok & t_ok[:, None]"),
        scales_tile=emit.scale_decode_lines(wfmt, mask="(offs_n[:, None] < N) & (bidx < n_blocks)"),
        scales_one_block=emit.scale_decode_lines(wfmt, mask="offs_n < N"))


def linear_source(wfmt, act_fmt=None, *, variant: str = "gemm", dtype=torch.float32,
                  out_float32: bool = False, interpret: bool | None = None,
                  float32_dots: str | None = None) -> str:
    """Readable Triton source of the fused linear kernel ``linear_kernel``: one of three
    skeletons (templates/: weight-only float, act-fused float, integer blocks) filled by the
    emitters' lines.

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
    split = splits_k(wfmt, af, variant)
    holes = _skeleton_holes(wfmt, af, variant, dname, out_name, interpret, integer, split)
    if integer:
        return _template("linear_int.py.jinja").render(**holes, **_int_holes(wfmt, af, holes["gemv"]))
    name = "linear_float.py.jinja" if af is None else "linear_act_float.py.jinja"
    return _template(name).render(**holes, **_float_holes(wfmt, af, dname, interpret, float32_dots))


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
    return "\n".join(head + indent(body)) + "\n"


# ---- launch ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _kernel(wfmt, af, variant, dtype, out_float32, interpret, float32_dots):
    """The compiled kernel for one source (generated once per process; cached on disk by hash),
    traceable by torch under the interpreter too (traceable.py)."""
    src = linear_source(wfmt, af, variant=variant, dtype=dtype, out_float32=out_float32,
                        interpret=interpret, float32_dots=float32_dots)
    return interpretable(load_kernel(src, "linear_kernel"))


@functools.lru_cache(maxsize=None)
def _act_kernel(af, dtype):
    return interpretable(load_kernel(act_quant_source(af, dtype), "act_quant_kernel"))


def _direct(kernel):
    """The kernel launched as it is (eager calls: no tracing wrapper on the way)."""
    return kernel


def _real(launch):
    """Where kernels and tables are made: outside any tracing for a traced launch (eager
    launches run on real tensors already)."""
    return contextlib.nullcontext() if launch is _direct else outside_tracing()


def _int_operands(x2, af, launch=_direct):
    """The integer path's prologue: int8 codes [M, KP] and block multipliers [KP / AB, M] of
    the activations, quantised once for every N tile (KP: K rounded up to whole blocks and to
    16 bytes, so rows start aligned for vector loads)."""
    m, k = x2.shape
    ab = af.block_size
    kp = -(-k // max(16, ab)) * max(16, ab)
    xq = torch.empty((m, kp), dtype=torch.int8, device=x2.device)
    ax = torch.empty((kp // ab, m), dtype=torch.float32, device=x2.device)
    bm, bk = ACT_QUANT_TILE
    with _real(launch):
        kernel = _act_kernel(af, x2.dtype)
    launch(kernel)[(cdiv(m, bm), cdiv(kp, bk))](
        x2, xq, ax, m, k, x2.stride(0), kp, BLOCK_M=bm, BLOCK_K=bk, enable_fp_fusion=False)
    return xq, ax


def _act_outside(x2, af, opq: bool):
    """Activations the prologue cannot quantise (no prologue for the format, or the OPQ
    correction after the kernel, which needs them) are fake-quantised here: (x2, af) for the
    kernel."""
    if af is None or not (opq or not fusable_act(af)):
        return x2, af
    if not opq:
        config.warn(f"qcompile linear: activation format {af.key} is quantised outside the "
                    "fused kernel (no prologue for it)", once=("act outside", af.key))
    if quant_supported(af):
        return _dequantize(_quant.quantize(x2, af, 1)), None
    return reference.fake_quantize(x2, af, 1), None


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _weight(q, n_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed weight as the kernel reads it: [N, packed K] codes and [N, blocks] scales."""
    return (_contiguous(q.codes.reshape(n_len, -1)), _contiguous(q.scales.reshape(n_len, -1)))


def _act_operands(x2, af, q, variant: str, launch) -> tuple[list, int]:
    """The activation operands (x, or the integer path's codes and multipliers, quantised by
    the prologue kernel) and their row stride."""
    if int_path(q.fmt, af, variant):
        xq, ax = _int_operands(x2, af, launch)
        return [xq, ax], xq.stride(0)
    return [x2], x2.stride(0)


def _grid(variant: str, m_len: int, n_len: int):
    if variant == "gemv":
        def grid(m):
            return (cdiv(n_len, m["BLOCK_N"]), m.get("SPLIT_K", 1))
    else:
        def grid(m):  # GROUP_M row tiles per N tile along axis 0 (group_m: whole groups)
            return (cdiv(n_len, m["BLOCK_N"]) * m["GROUP_M"],
                    cdiv(m_len, m["BLOCK_M"]) // m["GROUP_M"])
    return grid


def _meta(q, bias, variant: str) -> dict:
    """The launch's constants. No fused multiply-add contraction (acc + d * s): every float op
    rounds as written, so the integer path's result is the documented formula on a GPU too;
    the block length a constant: block indices are shifts, not integer divisions."""
    meta = {"QBLOCK": q.block, "HAS_BIAS": bias is not None, "enable_fp_fusion": False}
    if variant == "gemv":
        meta["BLOCK_M"] = 1
    return meta


def _sum_splits(ws, bias, out_dtype):
    """The splits in order, then the bias (as the kernel would add it), then rounding."""
    out = ws.sum(0)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)


def _add_kept_apart(out, q, apart, x2, k_len: int, dtype):
    """OPQ outliers kept apart: add x[:, k] * (v - decoded) for each to the float32 result,
    then round to the model dtype."""
    r, c, decoded = reference.decoded_at(q, apart[0])
    keep = c < k_len
    r, c, decoded = r[keep], c[keep], decoded[keep]
    v = apart[1][keep]
    delta = v.to(dtype).to(torch.float32) - decoded.to(dtype).to(torch.float32)
    corr = torch.zeros_like(out)
    corr.index_add_(1, r, x2[:, c].to(torch.float32) * delta)
    return (out + corr).to(dtype)


def linear(x: torch.Tensor, q, act_fmt=None, bias: torch.Tensor | None = None,
           choice=None) -> torch.Tensor:
    """The fused linear on generated kernels: fake_quantize(x, act_fmt) @ W^T (+ bias) where
    W = dequantize(q) is [N, K] (axis=1) or [K, N] (axis=0, GPT-2 Conv1D: x @ W). ``choice``:
    the selector's answer (codegen/select.py), asked here when not given. Raises NoKernel
    where no kernel applies (the caller falls back to the reference). The kernels are launched
    directly; ``traced_linear`` is the same with launches torch's tracing records."""
    return _linear(x, q, act_fmt, bias, choice, _direct)


def traced_linear(x: torch.Tensor, q, act_fmt=None, bias: torch.Tensor | None = None,
                  choice=None) -> torch.Tensor:
    """``linear`` with each launch through ``torch.library.wrap_triton``: the body of the
    triton_op ``qcompile::triton_linear`` (qcompile/ops.py), whose kernels ``torch.export``
    and AOTInductor see (``triton_kernel_wrapper_functional`` nodes) where ``linear``'s are
    opaque. Same kernels, same arguments, same results."""
    from torch.library import wrap_triton
    return _linear(x, q, act_fmt, bias, choice, wrap_triton)


def _linear(x, q, act_fmt, bias, choice, launch) -> torch.Tensor:
    choice = (choice or choose(q, act_fmt, x, "triton", bias)).require()
    k_len, n_len = (q.shape[1], q.shape[0]) if q.axis == 1 else (q.shape[0], q.shape[1])
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k_len)
    m_len = x2.shape[0]
    if m_len == 0 or n_len == 0 or k_len == 0:
        y = x2.new_zeros((m_len, n_len))
        return (y + bias if bias is not None else y).reshape(*lead, n_len)
    apart = reference.kept_apart(q)  # OPQ outliers, proxy columns: added after the kernel
    opq = apart is not None and apart[0].numel() > 0
    x2, af = _act_outside(x2, _formats.get(act_fmt) if act_fmt else None, opq)
    variant = choice.variant
    interp = interpreting()
    with _real(launch):  # the source and tables are made from constants, once, for real
        kernel = _kernel(q.fmt, af, variant, x.dtype, opq, interp, config.float32_dots())
        tables = emit.decode_tensors(q.fmt, q.side, q.codes.device)
    if interp and x2.dtype == torch.bfloat16:  # the interpreter's bf16 loads: widen in torch
        x2 = x2.float()
        bias = bias.float() if bias is not None else None
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    codes, scales = _weight(q, n_len)
    acts, stride_xm = _act_operands(x2, af, q, variant, launch)
    # the order of the signature (linear_source's _signature)
    operands = [*acts, codes, scales, *tables,
                bias if bias is not None else scales]
    out_dtype = torch.float32 if opq else x.dtype
    split = splits_k(q.fmt, af, variant)
    if split:  # partial sums per K split, added below (rows past the split count stay zero)
        ws = torch.zeros((MAX_SPLIT_K, m_len, n_len), dtype=torch.float32, device=x.device)
        outputs = [ws, ws]
    else:
        out = torch.empty((m_len, n_len), dtype=out_dtype, device=x.device)
        outputs = [out.view(torch.int16) if out_dtype == torch.bfloat16 else out]
    launch(kernel)[_grid(variant, m_len, n_len)](
        *operands, *outputs, m_len, n_len, k_len, next_pow2(m_len), stride_xm, codes.shape[-1],
        scales.shape[-1], **_meta(q, bias, variant))
    if split:
        out = _sum_splits(ws, bias, out_dtype)
    if opq:
        out = _add_kept_apart(out, q, apart, x2, k_len, x.dtype)
    return out.reshape(*lead, n_len)
