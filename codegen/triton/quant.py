"""Generated quantise kernels: float32 blocks -> element codes + block scales, bit-exact with
qcompile.formats.reference.quantize for every format description (element kind x scale kind).

``quant_source(fmt)`` writes one kernel from the format's element (int, minifloat, logarithmic,
codebook) and block scale (E8M0 power of two with its rule, float32 absmax signed or not, NVFP4).
``quantize(x, fmt, axis)`` runs it and returns the QTensor the reference returns.

Where the work is split between torch and the kernel:

* torch, before the launch, with the reference's own functions (one rule for both paths; their
  results are checked against independent oracles in tests/test_side_data_oracles.py): move the
  axis last, widen to float32 (exact), pad each row with zeros to whole blocks
  (``reference.blocked``); then the steps that need the whole tensor before any block can be
  encoded:
  - OPQ outliers (``opq=``, e.g. bof4s_opq): chosen with float64 statistics and zeroed (in
    ``blocked``); the kernel quantises what is left;
  - NVFP4's float32 tensor scale ts = amax(finite |x|) / (448 * 6) (``NVFP4Scale.tensor_scale``),
    passed in;
  - a data-dependent codebook (quantile4): the table comes from the block-normalised values
    (``reference.quantile_table``); the kernel gets its thresholds like any table.
* the kernel, per block: the NaN/Inf flag, the block scale (stored) and its multiplier, and every
  element's code.
* torch, after: pack the codes (qcompile.formats.packing).

Rounding is done on integers (truncate, then look at the exact remainder, or compare mantissa
bit fields), never with rint; exponents are read from bit patterns (subnormals scaled by 2^64
first, which is exact); the only float operations are those the reference does itself
(x * multiplier, correctly rounded divisions via div_rn, the NVFP4 scale product), so the
interpreter and a GPU agree.
"""
from __future__ import annotations

import torch

from qcompile.formats import reference
from qcompile.formats.bits import F32_MAX
from qcompile.formats.elements import CodebookElement
from qcompile.formats.packing import pack
from qcompile.formats.qtensor import QTensor
from qcompile.formats.scales import E4M3

from ..constants import carry_threshold, max_value_split
from .dequant import _float_lines, _next_pow2, load_kernel, triton_cdiv
from ..select import NoKernel
from ..select import quant_supported as supported

F32_NAN = 0x7FC00000


# ---- small line builders shared by several kernels ----------------------------------------

def _plus(c: int) -> str:
    """' + c' / ' - |c|' / '' for an integer constant added in generated source."""
    return f" + {c}" if c > 0 else (f" - {-c}" if c < 0 else "")


def _round_half_even(src: str, dst: str) -> list[str]:
    """dst (int32) = round half to even of finite float32 src with |src| < 2^31."""
    return [f"{dst}_t = {src}.to(tl.int32)  # truncates toward zero",
            f"{dst}_r = {src} - {dst}_t.to(tl.float32)  # exact remainder in (-1, 1)",
            f"{dst}_up = (tl.abs({dst}_r) > 0.5) | ((tl.abs({dst}_r) == 0.5) & (({dst}_t & 1) == 1))",
            f"{dst} = tl.where({dst}_up, tl.where({dst}_r > 0, {dst}_t + 1, {dst}_t - 1), {dst}_t)"]


def _exponent_lines(src: str, p: str) -> list[str]:
    """From float32 src > 0 (subnormals included): int32 `{p}_top` = floor(log2 src) and
    `{p}_mant`, its 23 mantissa bits after normalisation (so src = 1.mant * 2^top exactly)."""
    return [f"{p}_bits = {src}.to(tl.int32, bitcast=True)",
            f"{p}_tiny = ({p}_bits >> 23) == 0  # subnormal: scale by 2^64 (exact) to normalise",
            f"{p}_bits = tl.where({p}_tiny, ({src} * 18446744073709551616.0).to(tl.int32, bitcast=True), "
            f"{p}_bits)",
            f"{p}_top = (({p}_bits >> 23) & 255) - 127 - tl.where({p}_tiny, 64, 0)",
            f"{p}_mant = {p}_bits & 0x7FFFFF"]


def _div_line(dst: str, num, den: str) -> str:
    """Correctly rounded float32 num / den (num a Python float or a tensor name, den a tensor)."""
    if isinstance(num, float):
        num = f"tl.full({den}.shape, {num!r}, tl.float32)"
    return f"{dst} = tl.math.div_rn({num}, {den})"


def _multiplier_lines(s: str) -> list[str]:
    """qmul = fp32(max_value / s) as the reference, 0 for s == 0; an overflow (tiny |s|) is
    clamped to +-the largest float32."""
    return [f"qmul = tl.where({s} == 0, 0.0, "
            f"tl.minimum(tl.maximum(qdiv, {-F32_MAX!r}), {F32_MAX!r}))"]


# ---- block scales: lines computing `stored` (what goes to scales) and float32 `qmul` -------

def _pow2_scale_lines(fmt) -> list[str]:
    el, rule = fmt.element, fmt.scale.rule
    lines = [f"# E8M0 scale 2^e, rule {rule}: e from floor(log2 amax) read off the bit pattern",
             "safe = tl.where(amax > 0, amax, 1.0)",
             *_exponent_lines("safe", "am")]
    if rule == "floor":
        lines.append(f"e = am_top{_plus(-el.emax)}  # floor(log2 amax) - emax")
    elif rule == "ceil":
        lines.append(f"e = am_top + tl.where(am_mant != 0, 1, 0){_plus(-el.emax)}  # ceil(log2 amax) - emax")
    elif rule == "rceil":
        mv = float(el.max_value)
        mv_top, mv_mant = max_value_split(el)
        lines += [f"# smallest e with max_value * 2^e >= amax, max_value = {mv!r} = 1.m * 2^{mv_top}:",
                  f"# e = top - {mv_top}, plus 1 iff amax's mantissa exceeds max_value's ({mv_mant:#x})",
                  f"e = am_top{_plus(-mv_top)} + tl.where(am_mant > {mv_mant:#x}, 1, 0)"]
    else:  # even
        t = carry_threshold(el)
        lines += [f"# floor after rounding amax to the {el.describe()} grid in its top binade: the",
                  f"# binade moves up iff amax's mantissa rounds up to 2 there (mantissa >= {t:#x})",
                  f"e = am_top{_plus(-el.emax)} + tl.where(am_mant >= {t:#x}, 1, 0)"]
    lines += ["e = tl.minimum(tl.maximum(tl.where(amax > 0, e, -127), -127), 127)",
              "stored = tl.where(bad, 255, e + 127).to(tl.uint8)",
              "# qmul = 2^-e from bits (2^-127 is the float32 subnormal 0x00400000)",
              "qmul = tl.where(e == 127, 0x00400000, (127 - e) << 23).to(tl.float32, bitcast=True)"]
    return lines


def _absmax_scale_lines(fmt) -> list[str]:
    el, sc = fmt.element, fmt.scale
    mv = float(el.max_value)
    nan = f"tl.full(amax.shape, {F32_NAN}, tl.int32).to(tl.float32, bitcast=True)"
    if sc.signed:
        lines = ["# signed absmax: the element of largest magnitude with its sign, the positive one",
                 "# on a tie (docs/formats.md; so +0 beats -0). Max and min run on int32 keys that",
                 "# order floats totally (-0 < +0); lanes past the block get keys no finite x has",
                 "key = tl.where(xbits >= 0, xbits, xbits ^ 0x7FFFFFFF)",
                 "hi_k = tl.max(tl.where(valid, key, -2147483647), axis=1)",
                 "lo_k = tl.min(tl.where(valid, key, 2147483647), axis=1)",
                 "hi = tl.where(hi_k >= 0, hi_k, hi_k ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)",
                 "lo = tl.where(lo_k >= 0, lo_k, lo_k ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)",
                 "s = tl.where(hi >= -lo, hi, lo)"]
    else:
        lines = ["s = amax  # float32 absmax"]
    return lines + [f"stored = tl.where(bad, {nan}, s)",
                    f"# elements see x * fp32({mv!r} / s), correctly rounded",
                    _div_line("qdiv", mv, "stored"),
                    *_multiplier_lines("stored")]


def _nvfp4_scale_lines(fmt) -> list[str]:
    mv = float(fmt.element.max_value)
    return ["# NVFP4, level 2 (level 1, the float32 tensor scale ts, was computed before the launch):",
            f"# bs = e4m3(amax / {mv!r} / ts), round half to even, saturating; 0 where ts == 0",
            "ts = tl.broadcast_to(tl.load(ts_ptr), amax.shape)",
            _div_line("per_el", "amax", f"tl.full(amax.shape, {mv!r}, tl.float32)"),
            "target = tl.where(ts > 0, tl.math.div_rn(per_el, ts), 0.0)",
            *_float_encode_lines(E4M3, "target", "bcode"),
            "bcode = tl.where(bad, 0x7F, bcode)  # 0x7F is E4M3's NaN",
            "stored = bcode.to(tl.uint8)",
            "# the block's multiplier: elements see x * fp32(1 / fp32(bs * ts))",
            *_float_lines(E4M3, "bcode", "bs"),
            "s = bs * ts",
            _div_line("qdiv", 1.0, "s"),
            *_multiplier_lines("s")]


def _scale_lines(fmt) -> list[str]:
    """Block scale lines. They read `amax` (float32 per block, |x| max), `bad` (per block), and
    for a signed absmax also `xbits` / `valid` (the tile), for NVFP4 `ts_ptr`; they define
    `stored` (the scale as saved) and `qmul` (float32 per block). codegen/triton/linear.py splices
    them into its activation prologue with the same names."""
    kind = fmt.scale.kind
    if kind == "pow2":
        return _pow2_scale_lines(fmt)
    if kind == "absmax":
        return _absmax_scale_lines(fmt)
    if kind == "nvfp4":
        return _nvfp4_scale_lines(fmt)
    raise NoKernel(f"no generated block scale for {fmt.scale!r}")


# ---- elements: lines computing int32 code `dst` from float32 `src` (x on the element's grid) --

def _int_encode_lines(el, src: str, dst: str) -> list[str]:
    qmax, f = el.qmax, el.frac_bits
    return ([f"# {el.describe()}: round half to even, clamp to +-{qmax}, two's complement",
             f"v = {src} * {float(2.0 ** f)!r}  # exact: times 2^{f}",
             "# v is NaN only where a multiplier overflowed (0 * Inf); torch's int cast turns NaN",
             "# into 0x80000000, whose low bits code 0",
             "is_nan = v != v",
             f"v = tl.where(is_nan, 0.0, tl.minimum(tl.maximum(v, {-float(qmax) - 1.0!r}), "
             f"{float(qmax) + 1.0!r}))"]
            + _round_half_even("v", "q")
            + [f"q = tl.minimum(tl.maximum(q, {-qmax}), {qmax})",
               f"{dst} = tl.where(is_nan, 0, q & {2 ** el.bits - 1})"])


def _float_encode_lines(el, src: str, dst: str) -> list[str]:
    m, emin, b, p = el.man_bits, el.emin, el.bits, dst
    return [f"# {el.describe()}: saturate at {float(el.max_value)!r}; binade e (zero and subnormals "
            f"share emin {emin}), then {m} mantissa bits rounded half to even",
            f"{p}_sign = (({src}.to(tl.int32, bitcast=True) >> 31) & 1) << {b - 1}",
            f"{p}_a = tl.minimum(tl.abs({src}), {float(el.max_value)!r})",
            f"{p}_e = tl.maximum((({p}_a.to(tl.int32, bitcast=True) >> 23) & 255) - 127, {emin})",
            f"# a * 2^({m} - e) is exact and lies in [0, 2^{m + 1}); ties go to the even code (for",
            "# a mantissa-free element: the even exponent field, as bit-level RNE does)",
            f"{p}_scaled = {p}_a * ((({m} - {p}_e) + 127) << 23).to(tl.float32, bitcast=True)",
            f"{p}_low = {p}_scaled.to(tl.int32)  # floor: scaled >= 0",
            f"{p}_rest = {p}_scaled - {p}_low.to(tl.float32)",
            f"{p}_mag = (({p}_e{_plus(-emin)}) << {m}) + {p}_low  # low holds the leading bit",
            f"{p}_up = ({p}_rest > 0.5) | (({p}_rest == 0.5) & (({p}_mag & 1) == 1))",
            f"{dst} = {p}_sign | ({p}_mag + tl.where({p}_up, 1, 0))"]


def _log_encode_lines(el, src: str, dst: str) -> list[str]:
    t, kmin, b = carry_threshold(el), el.kmin, el.bits
    assert kmin >= -126, "the exponent below is exact for normal |n| only; subnormals clamp to kmin"
    return [f"# {el.describe()}: nearest power of two 2^k in the log domain, k in [{kmin}, 0];",
            f"# k = floor(log2 |n|) + 1 iff the mantissa is >= sqrt(2) (mantissa bits >= {t:#x})",
            f"lsign = (({src}.to(tl.int32, bitcast=True) >> 31) & 1) << {b - 1}",
            f"labs = {src}.to(tl.int32, bitcast=True) & 0x7FFFFFFF",
            f"k = ((labs >> 23) & 255) - 127 + tl.where((labs & 0x7FFFFF) >= {t:#x}, 1, 0)",
            f"# (a subnormal |n| gets k <= -126 here, clamped to {kmin} as its true k would be)",
            f"mag = tl.minimum(tl.maximum(k, {kmin}), 0) + {1 - kmin}  # code 1 is 2^{kmin}",
            "# only an exact zero encodes to zero: n that underflowed from a nonzero x (x * 2^-e",
            "# below 2^-149) keeps the smallest magnitude, with n's sign (that of x)",
            "nonzero = (labs != 0) | (((xbits & 0x7FFFFFFF) != 0) & ~bad[:, None])",
            f"{dst} = lsign | tl.where(nonzero, mag, 0)"]


def _codebook_encode_lines(el, src: str, dst: str) -> list[str]:
    lines = [f"# {el.describe()}: the code is the number of the {2 ** el.bits - 1} ascending float32",
             "# midpoint thresholds strictly below n (ties to the lower code), found by a branch-free",
             f"# binary search in {el.bits} steps; NaN counts as above all, as torch.searchsorted",
             f"nan_n = {src} != {src}",
             f"{dst} = tl.zeros({src}.shape, tl.int32)"]
    for step in (1 << i for i in reversed(range(el.bits))):
        lines += [f"thr = tl.load(thr_ptr + {dst} + {step - 1})",
                  f"{dst} = tl.where((thr < {src}) | nan_n, {dst} + {step}, {dst})"]
    return lines


# element kind -> lines(el, src, dst): int32 code `dst` from float32 `src`; the log encoder also
# reads `xbits` and `bad`, the codebook one `thr_ptr` (the same names in every kernel using them)
_ENCODERS = {"int": _int_encode_lines, "float": _float_encode_lines, "log": _log_encode_lines,
             "codebook": _codebook_encode_lines}


def quant_source(fmt) -> str:
    """Readable Triton source of the quantise kernel for ``fmt`` (element + scale description)."""
    el, sc = fmt.element, fmt.scale
    if not supported(fmt):
        raise NoKernel(f"no generated quantise kernel for {fmt.key}")
    args = ["x_ptr", "codes_ptr", "scales_ptr"]
    if el.kind == "codebook":
        args.append("thr_ptr")
    if sc.kind == "nvfp4":
        args.append("ts_ptr")
    args += ["n_blocks_total", "block", "BLOCK_B: tl.constexpr", "BLOCK_E: tl.constexpr"]
    body = [
        "# one row of the tile per block, BLOCK_E >= block lanes per row",
        "pid = tl.program_id(0)",
        "bidx = pid * BLOCK_B + tl.arange(0, BLOCK_B)",
        "blk = bidx[:, None]",
        "pos = tl.arange(0, BLOCK_E)[None, :]",
        "valid = (blk < n_blocks_total) & (pos < block)",
        "x = tl.load(x_ptr + blk.to(tl.int64) * block + pos, mask=valid, other=0.0)",
        "xbits = x.to(tl.int32, bitcast=True)",
        "# a NaN or Inf anywhere makes the block bad (NaN scale, zero codes)",
        "bad = tl.max(((xbits & 0x7F800000) == 0x7F800000).to(tl.int32), axis=1) > 0",
        "# absmax: |x| bit patterns order like the floats",
        "amax = tl.max(tl.where(valid, xbits & 0x7FFFFFFF, 0), axis=1).to(tl.float32, bitcast=True)",
        *_scale_lines(fmt),
        "tl.store(scales_ptr + bidx, stored, mask=bidx < n_blocks_total)",
        "n = tl.where(bad[:, None], 0.0, x * qmul[:, None])",
        *_ENCODERS[el.kind](el, "n", "code"),
        "tl.store(codes_ptr + blk.to(tl.int64) * block + pos, code.to(tl.uint8), mask=valid)",
    ]
    head = [
        f'"""Generated by qcompile.codegen: quantise {el.describe()} with {sc.describe()}."""',
        "import triton",
        "import triton.language as tl",
        "",
        "",
        "@triton.jit",
        f"def quant_kernel({', '.join(args)}):",
    ]
    return "\n".join(head + ["    " + line for line in body]) + "\n"


# ---- launch ---------------------------------------------------------------------------------

def quantize(x: torch.Tensor, fmt, axis: int) -> QTensor:
    """Same QTensor as qcompile.formats.reference.quantize(x, fmt, axis), side data included."""
    el, sc = fmt.element, fmt.scale
    if not supported(fmt):
        raise NoKernel(f"no generated quantise kernel for {fmt.key}")
    # -- tensor-level steps in torch (they need the whole tensor before any block is encoded):
    # the reference's own blocking (OPQ outliers out), tensor scale and quantile table --
    b = reference.blocked(x, fmt, axis)
    blocks, block, side = b.values, b.block, dict(b.side)
    lead, n_blocks = blocks.shape[:-2], blocks.shape[-2]
    extra: list[torch.Tensor] = []
    if sc.kind == "nvfp4":
        side["tensor_scale"] = sc.tensor_scale(blocks).reshape(1)
    if el.kind == "codebook":
        if el.data_dependent:  # quantile: the table from the tensor's block-normalised values
            _, qmul, _ = sc.compute(blocks, el, b.bad)
            table = reference.quantile_table(b, reference.normalised(b, qmul), el.bits)
        else:
            table = el.table_tensor(x.device)
        extra.append(CodebookElement.thresholds(table).contiguous())
    if sc.kind == "nvfp4":
        extra.append(side["tensor_scale"])
    # -- the kernel: block scales and element codes --
    total = lead.numel() * n_blocks
    codes = torch.zeros(lead.numel(), n_blocks * block, dtype=torch.uint8, device=x.device)
    scales = torch.empty(total, dtype=sc.stored_dtype, device=x.device)
    if total:
        block_e = _next_pow2(block)
        block_b = max(1, min(_next_pow2(total), 4096 // block_e))
        kernel = load_kernel(quant_source(fmt), "quant_kernel")
        kernel[(triton_cdiv(total, block_b),)](blocks.contiguous(), codes, scales, *extra, total,
                                               block, BLOCK_B=block_b, BLOCK_E=block_e)
    if block < (fmt.block_size or 0) and sc.kind == "absmax" and sc.signed:
        # block_size clamped to the row: as in the reference, the zero padding of the unclamped
        # block wins an all-zero row's tie (s = +0)
        scales = torch.where(scales == 0, 0.0, scales)
    if el.kind == "codebook" and el.data_dependent:
        side["codebook"] = table
    packed = pack(codes.reshape(*lead, n_blocks * block), el.bits)
    return QTensor(fmt, packed, scales.reshape(*lead, n_blocks), x.shape, x.dtype, axis, block, side)
