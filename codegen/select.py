"""Which kernel runs: every "can a generated kernel run here" rule and threshold, in one place.

``choose(q, act_fmt, x, impl, bias)`` answers for the fused linear with a ``Choice``: "triton"
(variant "gemv" / "gemm"), "cpu" (variant "gemv" / "panels"), "cpu_int" (integer block dot
products) or "reference", with the reason. Siblings answer for the other ops:
``choose_dequantize``, ``choose_embedding``, ``choose_fake_quantize``; ``cpu_operator`` for pass 6
(the C++ operator in CPU graphs). Where no kernel exists by design, a kernel entry point raises
``NoKernel(reason)`` (a NotImplementedError): the ops tell it from a kernel that failed by its
type alone. Answers that do not depend on values are cached: decoding calls the ops for every
layer and token.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from qcompile import config, formats
from qcompile.formats.elements import IntElement, integer_grid

from .errors import NoKernel  # noqa: F401  (re-exported: qcompile.codegen.select.NoKernel)
from .triton import emit

TRITON_GEMV_MAX_M = 1  # M up to this runs the GEMV-shaped Triton kernel; more rows a GEMM
CPU_GEMV_MAX_M = 16  # M up to this runs the CPU GEMV kernel; more rows decoded panels and a GEMM
MAX_ACT_BLOCK = 256  # larger activation blocks are fake-quantised outside the fused kernel
EMBEDDING_KERNEL_ROWS = 16  # up to this many ids the CPU kernels decode row by row
CPU_CODE_BITS = range(2, 9)  # code widths the CPU kernels decode
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_INT_SCALES = ("pow2", "absmax", "nvfp4")  # weight scales of the CPU integer kernels
NEED_LAUNCH = "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)"


@dataclasses.dataclass(frozen=True)
class Choice:
    """kernel: "triton", "cpu", "cpu_int" or "reference"; variant: the kernel's shape where
    one is decided before launch; reason: why the reference runs; tried: the kernel kind
    ("Triton", "CPU") that was asked for and cannot run (the op warns), "" when the reference
    runs by plan (asked for, or the faster choice for this size)."""
    kernel: str
    variant: str = ""
    reason: str = ""
    tried: str = ""

    def require(self) -> Choice:
        """This choice, or NoKernel where it is the reference."""
        if self.kernel == "reference":
            raise NoKernel(self.reason)
        return self


ASKED = Choice("reference", reason="kernels='reference'")


def _no(kind: str, reason: str) -> Choice:
    return Choice("reference", reason=reason, tried=kind)


def resolve(impl: str, t: torch.Tensor) -> str:
    """The implementation asked for, "auto" resolved by the tensor's device."""
    if impl not in config.KERNELS:
        raise ValueError(f"qcompile ops: unknown impl {impl!r}; choose one of "
                         f"{', '.join(config.KERNELS)}")
    if impl == "auto":
        return "triton" if t.is_cuda else "cpu"
    return impl


def triton_launchable(on_cuda: bool) -> bool:
    """Generated Triton kernels run on CUDA tensors, or on CPU ones in Triton's interpreter."""
    return on_cuda or config.triton_interpret()


# ---- format rules ---------------------------------------------------------------------------

def quant_supported(fmt) -> bool:
    """Whether a quantise kernel is generated for ``fmt``: every format get() builds (presets,
    families, overrides), the kinds with Triton emitters (codegen/triton/emit.py). Not
    generated: a signed absmax scale on an integer or minifloat element, which only a hand-built
    Format has (its multiplier is -Inf for a negative subnormal block maximum; the NaN element
    inputs that makes are matched for codebooks, but these encoders were never checked on
    them)."""
    return emit.encodable(fmt)


def _pow2(n) -> bool:
    return isinstance(n, int) and n > 0 and n & (n - 1) == 0


def fusable_act(af) -> bool:
    """Can the fused kernel's prologue fake-quantise activations of format ``af``?"""
    return (emit.reads_no_operands(af)  # the prologue has no parameter for a table
            and af.opq is None and quant_supported(af)
            and _pow2(af.block_size) and af.block_size <= MAX_ACT_BLOCK)


def int_path(wfmt, af, variant: str, cpu: bool = False) -> bool:
    """Integer block dot products: int elements on both sides, each activation block (one K
    tile) inside one weight block, products summed exactly (|D| < 2^24 for the float32 cast).
    ``cpu``: the CPU integer kernels' wider rule: a weight element whose every value is an
    integer multiple of 2^-s (``formats.elements.integer_grid``: mxfp4's and nvfp4's E2M1, its
    codes decoded to the integers 2^s v by a table) and NVFP4's byte scales (a multiplier
    table) too; the Triton integer path keeps int weights with E8M0 / absmax scales."""
    if af is None or not fusable_act(af) or wfmt.opq is not None or wfmt.proxy is not None:
        return False
    we, ae = wfmt.element, af.element
    grid = integer_grid(we) if cpu or isinstance(we, IntElement) else None
    if grid is None or not isinstance(ae, IntElement):
        return False
    if wfmt.scale.kind not in (CPU_INT_SCALES if cpu else ("pow2", "absmax")) \
            or wfmt.block_size is None:
        return False
    if wfmt.block_size % af.block_size or (variant == "gemm" and af.block_size < 16):
        return False
    return af.block_size * grid[1] * ae.qmax < 2**24


def splits_k(wfmt, af, variant: str) -> bool:
    """Does the Triton kernel split K? The float GEMV only: the integer formula fixes the
    order of the tiles."""
    return variant == "gemv" and not int_path(wfmt, af, variant)


def cpu_int_applies(q, af) -> bool:
    """The CPU integer path: the Triton integer path's pairs and the CPU's wider weights
    (``int_path(..., cpu=True)``), where each activation block lies inside one weight block."""
    return af is not None and _cpu_int(q.fmt, af, q.block, _weight_k(q))


@functools.lru_cache(maxsize=1024)
def _cpu_int(wfmt, af, block: int, k: int) -> bool:
    return int_path(wfmt, af, "gemv", cpu=True) and block % af.block_for(k) == 0


def tables_from_side_data(fmt) -> bool:
    """The format's decode tables come from the tensor's own side data (quantile codebooks,
    NVFP4's tensor scale), not from the format alone."""
    return bool(fmt.whole_tensor_side)


# the model dtypes of the CPU kernels: the weight-only linear (a bfloat16 / float16 weight
# decoded, rounded to its dtype as the reference rounds it, multiplied in float32), the integer
# path (x widened to float32, exact; the output rounded to the dtype once), the gather and
# dequantise (decoded in float32, rounded to the dtype once, as the reference's cast)
CPU_LINEAR_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cpu_weight_problem(on_cpu: bool, two_d: bool, dtype, bits: int,
                       dtypes=(torch.float32,)) -> str:
    """Why the CPU kernels cannot read this packed weight, or "" (``dtypes``: the weight
    dtypes the asking kernel covers)."""
    if not on_cpu:
        return "qcompile CPU kernels run on CPU tensors"
    if not two_d:
        return "qcompile CPU kernels cover 2-d weights"
    if dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        return (f"qcompile CPU kernels cover {names} weights; this one is {dtype} (its "
                "reference rounds W to that dtype)")
    if bits not in CPU_CODE_BITS:
        return f"qcompile CPU kernels cover 2..8-bit codes, not {bits}"
    return ""


def _two_d(q) -> bool:
    return len(q.shape) == 2 and q.axis in (0, 1)


def require_cpu_weight(q, dtypes=(torch.float32,)):
    """NoKernel where the CPU kernels (covering weights of ``dtypes``) cannot read ``q``."""
    why = cpu_weight_problem(q.codes.is_cpu, _two_d(q), q.dtype, q.fmt.element.bits, dtypes)
    if why:
        raise NoKernel(why)


# ---- the fused linear -----------------------------------------------------------------------

_CHOICES: dict[tuple, tuple] = {}


def choose(q, act_fmt, x: torch.Tensor, impl: str, bias: torch.Tensor | None = None) -> Choice:
    """Which kernel computes ``fq(x, act_fmt) @ W^T (+ bias)`` for the packed weight ``q``."""
    where = impl if impl == "cpu" or impl == "triton" else resolve(impl, x)
    if where == "reference":
        return ASKED
    k = x.shape[-1]
    bdtype = bias.dtype if bias is not None else None
    if where == "triton":  # (rows <= the GEMV's, without a division)
        key = (id(q.fmt), q.shape, q.axis, q.dtype, x.dtype, k, bdtype,
               triton_launchable(x.is_cuda), x.numel() <= k * TRITON_GEMV_MAX_M)
    else:
        key = (id(q.fmt), q.shape, q.axis, q.block, q.dtype, act_fmt, x.dtype, bdtype,
               q.codes.is_cpu, x.numel() <= k * CPU_GEMV_MAX_M)
    hit = _CHOICES.get(key)
    if hit is None or hit[0] is not q.fmt:  # ids are reused: the same Format, not another
        if len(_CHOICES) > 4096:
            _CHOICES.clear()
        decide = _triton_linear if where == "triton" else _cpu_linear
        hit = _CHOICES[key] = (q.fmt, decide(q, act_fmt, key))
    return hit[1]


def _weight_k(q) -> int:
    return q.shape[1] if q.axis == 1 else q.shape[0]


def _triton_linear(q, act_fmt, key) -> Choice:
    *_, xdtype, k, bdtype, launchable, gemv = key
    if not _two_d(q):
        return _no("Triton", "fused linear needs a 2-d weight with blocks along K")
    if k != _weight_k(q):
        return _no("Triton", f"x has {k} features, the weight {_weight_k(q)}")
    if xdtype != q.dtype or bdtype not in (None, xdtype):
        return _no("Triton", "x, the weight and the bias must share one dtype")
    if xdtype not in TRITON_DTYPES:
        return _no("Triton", f"no fused linear for {xdtype}")
    if not launchable:
        return _no("Triton", NEED_LAUNCH)
    return Choice("triton", "gemv" if gemv else "gemm")


def _cpu_linear(q, act_fmt, key) -> Choice:
    *_, xdtype, bdtype, on_cpu, gemv = key
    if xdtype not in CPU_LINEAR_DTYPES or bdtype not in (None, xdtype) or q.dtype != xdtype:
        return _no("CPU", "qcompile CPU kernels cover float32, bfloat16 and float16 models with "
                   f"x, the weight and the bias in one dtype, not x {xdtype}, weight {q.dtype}, "
                   f"bias {bdtype}")
    why = cpu_weight_problem(on_cpu, _two_d(q), q.dtype, q.fmt.element.bits, CPU_LINEAR_DTYPES)
    if why:
        return _no("CPU", why)
    af = formats.get(act_fmt) if act_fmt else None
    if cpu_int_applies(q, af):
        return Choice("cpu_int", "gemv" if gemv else "panels")
    return Choice("cpu", "gemv" if gemv else "panels")


# ---- the other ops --------------------------------------------------------------------------

def choose_dequantize(q, impl: str) -> Choice:
    """Which kernel decodes the packed weight ``q``."""
    where = resolve(impl, q.codes)
    if where == "triton":
        if not triton_launchable(q.codes.is_cuda):
            return _no("Triton", NEED_LAUNCH)
        return Choice("triton")
    if where == "cpu":
        if len(q.shape) != 2:
            return Choice("reference", reason="no CPU kernel: not a 2-d weight")
        why = cpu_weight_problem(q.codes.is_cpu, _two_d(q), q.dtype, q.fmt.element.bits,
                                 CPU_LINEAR_DTYPES)
        return _no("CPU", why) if why else Choice("cpu")
    return ASKED


def choose_embedding(q, ids: torch.Tensor, impl: str) -> Choice:
    """Which kernel gathers rows ``ids`` of the packed table ``q``: the CPU kernels decode a
    decoding step's few rows; many rows (a prefill) and other devices go through the
    reference's gather, as fast per row."""
    where = resolve(impl, q.codes)
    if where == "triton":
        return Choice("reference", reason="no Triton gather")
    if where != "cpu":
        return ASKED
    if ids.numel() > EMBEDDING_KERNEL_ROWS:
        return Choice("reference", reason=f"more than {EMBEDDING_KERNEL_ROWS} ids: its gather")
    why = cpu_table_problem(q)
    return _no("CPU", why) if why else Choice("cpu")


def cpu_table_problem(q) -> str:
    """Why the CPU kernels cannot gather rows of the packed table ``q``, or ""."""
    if q.axis != 1:
        return "qcompile CPU kernels gather rows of tables with blocks along axis 1"
    why = cpu_weight_problem(q.codes.is_cpu, _two_d(q), q.dtype, q.fmt.element.bits,
                             CPU_LINEAR_DTYPES)
    if why:
        return why
    if "outlier_index" in q.side or "proxy_index" in q.side:
        return "tables with OPQ outliers or proxy columns are gathered by the reference"
    return ""


def choose_fake_quantize(fmt, x: torch.Tensor, impl: str) -> Choice:
    """Which kernel fake-quantises activations ``x`` to ``fmt`` (a Format): only Triton has
    one; the CPU path quantises with the reference."""
    where = resolve(impl, x)
    if where != "triton":
        return ASKED
    if not triton_launchable(x.is_cuda):
        return _no("Triton", NEED_LAUNCH)
    if not quant_supported(fmt):
        return _no("Triton", "no generated quantise kernel")
    return Choice("triton")


def cpu_operator(q, af, impl: str, x_on_cpu: bool) -> Choice:
    """Whether pass 6 may put the C++ operator (``qcompile_cpu::linear`` / ``int_linear``,
    which run no Python and cannot fall back) in place of ``qcompile::linear``: where the op
    would run the CPU kernels anyway and the tables depend on the format alone."""
    if impl not in ("auto", "cpu") or not x_on_cpu:
        return Choice("reference", reason="not the CPU kernels")
    why = cpu_weight_problem(q.codes.is_cpu, _two_d(q), q.dtype, q.fmt.element.bits,
                             CPU_LINEAR_DTYPES)
    if why:
        return _no("CPU", why)
    if tables_from_side_data(q.fmt) or "proxy_index" in q.side:
        return Choice("reference", reason="tables or proxy columns from side data: the op")
    if cpu_int_applies(q, af):
        return Choice("cpu_int")
    return Choice("cpu")
