"""Generated dequantise kernels: packed codes + block scales -> float32 values.

``dequant_source(fmt)`` writes one kernel's source from the element and scale descriptions;
``dequantize(q)`` launches it and does the rest in torch exactly as qcompile.formats.reference
does (OPQ outliers put back, padding cropped, axis moved back, cast to the original dtype).
Every step in the kernel reproduces the reference bit for bit: element values and power-of-two
multipliers are built from float32 bit patterns with integer ops; the only float arithmetic is
what the reference does itself (the absmax division, the NVFP4 scale product, value * multiplier).
"""
from __future__ import annotations

import torch

from qcompile.formats.elements import CodebookElement, FloatElement, IntElement, LogElement
from qcompile.formats.reference import unblocked
from qcompile.formats.scales import E4M3

from ..cache import load_kernel  # noqa: F401  (the cache lives in cache.py; quant.py and
# linear.py import load_kernel from here)
from ..select import NoKernel

F32_NAN = 0x7FC00000  # the float32 NaN torch writes for math.nan
F32_INF = 0x7F800000


# ---- element decoders: lines computing float32 `out_name` from int32 `code` -----------------

def _float_lines(el: FloatElement, code: str, out: str) -> list[str]:
    b, m = el.bits, el.man_bits
    emin = el.emin
    if not (-126 <= emin and el.emax <= 127):
        raise NoKernel(f"{el.describe()}: exponent range leaves float32 normals")
    lines = [
        f"# {el.describe()}: sign | {el.exp_bits}-bit exponent (bias {el.bias}) | {m}-bit mantissa",
        f"{out}_mag = {code} & {2 ** (b - 1) - 1}",
        f"{out}_exp = {out}_mag >> {m}",
        f"{out}_man = {out}_mag & {2 ** m - 1}",
        f"# normal: float32 exponent field exp - bias + 127, mantissa bits moved to the top",
        f"{out}_nbits = (({out}_exp + {127 - el.bias}) << 23) | ({out}_man << {23 - m})",
        f"# subnormal: man * 2^({emin - m}) = (1.man * 2^{emin}) - 2^{emin}, an exact subtraction",
        f"{out}_sub = ((({emin + 127}) << 23) | ({out}_man << {23 - m})).to(tl.float32, bitcast=True)"
        f" - {float(2.0 ** emin)!r}",
        f"{out}_bits = tl.where({out}_exp == 0, {out}_sub.to(tl.int32, bitcast=True), {out}_nbits)",
    ]
    if el.specials == "ieee":
        top = 2 ** el.exp_bits - 1
        lines.append(f"# top exponent: Inf (mantissa 0) or NaN")
        lines.append(f"{out}_bits = tl.where({out}_exp == {top}, "
                     f"tl.where({out}_man == 0, {F32_INF}, {F32_NAN}), {out}_bits)")
    elif el.specials == "fn":
        lines.append(f"# all-ones magnitude is NaN")
        lines.append(f"{out}_bits = tl.where({out}_mag == {2 ** (b - 1) - 1}, {F32_NAN}, {out}_bits)")
    lines.append(f"{out}_bits = {out}_bits | (({code} >> {b - 1}) << 31)  # sign")
    lines.append(f"{out} = {out}_bits.to(tl.float32, bitcast=True)")
    return lines


def int_code_lines(el: IntElement, code: str, out: str) -> list[str]:
    """Lines computing the signed int32 `out` of an integer element's unsigned `code`."""
    sh = 32 - el.bits
    return [f"# {el.describe()}: two's complement, sign-extended by shifts",
            f"{out} = ({code} << {sh}) >> {sh}"]


def _element_lines(el, code: str, out: str, mask: str = "in_range") -> list[str]:
    if isinstance(el, IntElement):
        return int_code_lines(el, code, f"{out}_int") + [
            f"{out} = {out}_int.to(tl.float32) * {float(2.0 ** -el.frac_bits)!r}  # exact"]
    if isinstance(el, FloatElement):
        return _float_lines(el, code, out)
    if isinstance(el, LogElement):
        top = el.top
        return [f"# {el.describe()}: magnitude 0 is zero, else 2^(mag - {top})",
                f"{out}_mag = {code} & {top}",
                f"{out}_bits = tl.where({out}_mag == 0, 0, ({out}_mag + {127 - top}) << 23)",
                f"{out}_bits = {out}_bits | (({code} >> {el.bits - 1}) << 31)  # sign",
                f"{out} = {out}_bits.to(tl.float32, bitcast=True)"]
    if isinstance(el, CodebookElement) and not el.data_dependent and el.bits <= 4:
        return _select_tree_lines(el, code, out)
    if isinstance(el, CodebookElement):
        return [f"# {el.describe()}: table lookup (the table is a kernel argument)",
                f"{out} = tl.load(table_ptr + {code}, mask={mask}, other=0.0)"]
    raise NoKernel(f"no decoder for element {el!r}")


def _select_tree_lines(el, code: str, out: str) -> list[str]:
    """A fixed codebook of at most 16 values decoded in registers: a tree of selects on the
    code's bits, lowest bit first, over the float32 table values written as constants (no
    gather from memory per element)."""
    level = [repr(float(v)) for v in torch.tensor(el.values, dtype=torch.float32).tolist()]
    lines = [f"# {el.describe()}: the table's float32 values, selected by the code's bits"]
    for bit in range(el.bits):
        names = [f"{out}_{bit}_{i}" for i in range(len(level) // 2)]
        if len(names) == 1:
            names = [out]
        lines += [f"{name} = tl.where(({code} & {1 << bit}) != 0, {hi}, {lo})"
                  for name, lo, hi in zip(names, level[0::2], level[1::2])]
        level = names
    return lines


# ---- block multipliers: lines computing float32 `mult` from the loaded scale `sc` ----------

def _scale_lines(fmt, mask: str = "in_range") -> list[str]:
    """Load the stored scale at `sidx` into `sc`, then its multiplier `mult`."""
    if fmt.scale.kind == "absmax":
        load = f"sc = tl.load(scales_ptr + sidx, mask={mask}, other=0.0)"
    else:  # E8M0 / E4M3 codes in a byte
        load = f"sc = tl.load(scales_ptr + sidx, mask={mask}, other=0).to(tl.int32)"
    return [load] + multiplier_lines(fmt, "sc", "mult")


def multiplier_lines(fmt, sc: str, out: str) -> list[str]:
    """Lines turning a stored block scale `sc` (int32 code, or float32 absmax) into the float32
    multiplier `out` the decoded elements are multiplied by (the reference's multiplier)."""
    kind = fmt.scale.kind
    if kind == "pow2":
        return ["# E8M0: 255 is NaN, 0 is the float32 subnormal 2^-127, else 2^(code - 127)",
                f"{out}_bits = tl.where({sc} == 255, {F32_NAN}, tl.where({sc} == 0, {1 << 22}, {sc} << 23))",
                f"{out} = {out}_bits.to(tl.float32, bitcast=True)"]
    if kind == "absmax":
        mv = float(fmt.element.max_value)
        if mv == 1.0:  # x / 1 is x exactly (NaN and infinities included)
            return [f"{out} = {sc}  # float32 absmax / max_value (1.0)"]
        return [f"# float32 absmax / max_value ({mv!r}), correctly rounded as the reference",
                f"{out} = tl.math.div_rn({sc}, tl.full({sc}.shape, {mv!r}, tl.float32))"]
    if kind == "nvfp4":
        return (["# NVFP4: E4M3 block scale times the float32 tensor scale"]
                + _float_lines(E4M3, sc, "bs")
                + [f"{out} = bs * tl.load(tensor_scale_ptr)"])
    raise NoKernel(f"no multiplier for scale {fmt.scale!r}")


def _unpack_lines(bits: int, idx: str = "cols", row: str = "row_codes", mask: str = "in_range") -> list[str]:
    """Lines loading the int32 `code` of element `idx` from the packed row at pointer `row`."""
    if bits == 8:
        return [f"code = tl.load({row} + {idx}, mask={mask}, other=0).to(tl.int32)"]
    bmask = 2 ** bits - 1
    if 8 % bits == 0:  # a code never crosses a byte boundary
        return [f"# {bits}-bit codes, big-endian within each byte",
                f"byte = tl.load({row} + ({idx} * {bits}) // 8, mask={mask}, other=0).to(tl.int32)",
                f"code = (byte >> (8 - {bits} - ({idx} * {bits}) % 8)) & {bmask}"]
    return [f"# {bits}-bit codes in a big-endian bit stream: read the two bytes a code may span",
            f"bit = {idx} * {bits}",
            "first = bit // 8",
            f"spans = {mask} & ((bit % 8) + {bits} > 8)",
            f"hi = tl.load({row} + first, mask={mask}, other=0).to(tl.int32)",
            f"lo = tl.load({row} + first + 1, mask=spans, other=0).to(tl.int32)",
            f"code = (((hi << 8) | lo) >> (16 - {bits} - bit % 8)) & {bmask}"]


# The decode depends on the scale kind only (not on the rule that chose the scale).
_SCALE_NAMES = {"pow2": "E8M0 power-of-two", "absmax": "float32 absmax",
                "nvfp4": "E4M3 x float32 tensor (NVFP4)"}


def dequant_source(fmt) -> str:
    """Readable Triton source of the dequantise kernel for ``fmt`` (element + scale kind)."""
    el = fmt.element
    args = ["codes_ptr", "scales_ptr"]
    if el.kind == "codebook":
        args.append("table_ptr")
    if fmt.scale.kind == "nvfp4":
        args.append("tensor_scale_ptr")
    args += ["out_ptr", "n_rows", "row_len", "row_bytes", "n_blocks", "block",
             "BLOCK_R: tl.constexpr", "BLOCK_C: tl.constexpr"]
    body = [
        "pid_r = tl.program_id(0)",
        "pid_c = tl.program_id(1)",
        "rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]",
        "cols = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]",
        "in_range = (rows < n_rows) & (cols < row_len)",
        "row_codes = codes_ptr + rows.to(tl.int64) * row_bytes",
        *_unpack_lines(el.bits),
        *_element_lines(el, "code", "value"),
        "sidx = rows.to(tl.int64) * n_blocks + cols // block",
        *_scale_lines(fmt),
        "tl.store(out_ptr + rows.to(tl.int64) * row_len + cols, value * mult, mask=in_range)",
    ]
    head = [
        f'"""Generated by qcompile.codegen: dequantise {el.describe()} with {_SCALE_NAMES[fmt.scale.kind]} '
        'block scales."""',
        "import triton",
        "import triton.language as tl",
        "",
        "",
        "@triton.jit",
        f"def dequant_kernel({', '.join(args)}):",
    ]
    return "\n".join(head + ["    " + line for line in body]) + "\n"


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def dequantize(q) -> torch.Tensor:
    """Same result as qcompile.formats.reference.dequantize(q), the decode done by a generated
    kernel."""
    fmt, el = q.fmt, q.fmt.element
    n_blocks = q.scales.shape[-1]
    row_len = n_blocks * q.block
    n_rows = q.scales.shape[:-1].numel()
    out = torch.empty((n_rows, row_len), dtype=torch.float32, device=q.codes.device)
    if out.numel():
        codes = q.codes.reshape(n_rows, -1).contiguous()
        scales = q.scales.reshape(n_rows, n_blocks).contiguous()
        args = [codes, scales]
        if el.kind == "codebook":
            table = q.side["codebook"] if el.data_dependent else el.table_tensor(codes.device)
            args.append(table.to(device=codes.device, dtype=torch.float32).contiguous())
        if fmt.scale.kind == "nvfp4":
            args.append(q.side["tensor_scale"].to(torch.float32).contiguous())
        block_c = min(_next_pow2(row_len), 1024)
        block_r = max(1, min(_next_pow2(n_rows), 4096 // block_c))
        grid = (triton_cdiv(n_rows, block_r), triton_cdiv(row_len, block_c))
        load_kernel(dequant_source(fmt))[grid](
            *args, out, n_rows, row_len, codes.shape[-1], n_blocks, q.block,
            BLOCK_R=block_r, BLOCK_C=block_c)
    return unblocked(out, q)  # the reference's own: kept-apart weights back, crop, axis back


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
