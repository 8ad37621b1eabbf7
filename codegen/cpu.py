"""CPU kernels: build, cache, choice of instruction set, launch (the C++ is in cpu_source.py).

``linear(x, q, act_fmt, bias)`` computes ``fq(x) @ W^T (+ bias)`` for a packed QTensor W
without writing W out: for M <= GEMV_MAX_M rows the C++ kernel decodes each weight row in
registers and accumulates in float32; for more rows it decodes panels of weight rows
(cache-sized, never the whole weight) and multiplies each with torch's GEMM, so the decode cost
is spread over M. ``dequantize(q)`` decodes with the same code: the reference's values, bit for
bit.

Build: the one translation unit is compiled by the system C++ compiler (``$CXX``, else g++)
into a shared library with a C interface, once per instruction set, and cached in the kernel
cache folder (codegen/cache.py: private, checked) under a name holding the hash of the source,
the flags and the compiler's version. A sidecar ``.json`` records that hash and the SHA-256 of
the library's bytes: a library is loaded only if its bytes match (a damaged file never reaches
dlopen) and, once loaded, it must report the same source hash (``qc_source_hash``); anything
else is rebuilt. Builds go to a private temporary file that is loaded, checked, then renamed
into place, so processes building at once never see half a file.

Instruction set: AVX-512 where torch reports it (with VNNI where the CPU has it: its own build,
used by the integer path of cpu_int.py), else AVX2, else scalar; ``QCOMPILE_CPU_ISA`` forces one
(an ISA the machine lacks is an error, not a crash).

Formats: every element of 2..8 bits and every scale kind (E8M0, float32 absmax, NVFP4), OPQ
outliers added after the kernel. Models in float32; other dtypes (whose reference rounds the
decoded weight to bf16/fp16) are not covered yet: NoKernel (codegen/select.py says which weights
the kernels read), so the op falls back to the reference with one warning.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import subprocess
import tempfile
import threading
import weakref

import torch

from qcompile import config, formats
from qcompile.formats import reference

from . import constants, cpu_int, cpu_int_source, cpu_source
from .cache import cache_dir, write_atomically
from .select import CPU_GEMV_MAX_M as GEMV_MAX_M
from .select import (NoKernel, choose, cpu_table_problem, require_cpu_weight,
                     tables_from_side_data)

PANEL_BYTES = 1 << 20  # decoded weight rows per GEMM call: about L2-sized
# a weight up to this size decoded is one panel: one GEMM, which beats several panels' GEMMs
# (measured on SmolLM2's layers at M=512); bigger ones (lm_head) go in L2-sized panels, which
# also beat one float32 GEMM over the whole 113 MB table
WHOLE_BYTES = 16 << 20
ISAS = config.CPU_ISAS  # best first
_ISA_NUMBER = {"avx512_vnni": 3, "avx512": 2, "avx2": 1, "scalar": 0}
_AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma", "-mavx2"]
_ISA_FLAGS = {"avx512_vnni": _AVX512 + ["-mavx512vnni"], "avx512": _AVX512,
              "avx2": ["-mavx2", "-mfma"], "scalar": []}
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off"]


class _Args(ctypes.Structure):
    """Mirror of ``struct Args`` in cpu_source.py."""
    _fields_ = [("x", ctypes.c_void_p), ("M", ctypes.c_int64), ("ldx", ctypes.c_int64),
                ("codes", ctypes.c_void_p), ("row_bytes", ctypes.c_int64),
                ("scales", ctypes.c_void_p), ("n_blocks", ctypes.c_int64),
                ("block", ctypes.c_int64), ("table", ctypes.c_void_p),
                ("mult_table", ctypes.c_void_p), ("maxv", ctypes.c_float),
                ("step", ctypes.c_float), ("bias", ctypes.c_void_p), ("y", ctypes.c_void_p),
                ("N", ctypes.c_int64)]


# -- instruction set -----------------------------------------------------------------------

def machine_isa() -> str:
    """The best instruction set torch's CPU dispatch finds on this machine (and VNNI)."""
    cap = torch.backends.cpu.get_cpu_capability().upper()
    if "AVX512" in cap:
        return "avx512_vnni" if _has_vnni() else "avx512"
    return "avx2" if "AVX2" in cap else "scalar"


def _has_vnni() -> bool:
    probe = getattr(torch.cpu, "_is_vnni_supported", None)  # private: not in every torch
    if probe is not None:
        return bool(probe())
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return "avx512_vnni" in f.read().split()
    except OSError:
        return False


def chosen_isa() -> str:
    forced = config.cpu_isa()
    have = machine_isa()
    if forced is None:
        return have
    if ISAS.index(forced) < ISAS.index(have):
        raise RuntimeError(f"QCOMPILE_CPU_ISA={forced}, but this CPU (torch reports "
                           f"{torch.backends.cpu.get_cpu_capability()}) has only {have}; choose "
                           f"one of {', '.join(ISAS[ISAS.index(have):])}")
    return forced


# -- build and load --------------------------------------------------------------------------

_LIBS: dict[str, ctypes.CDLL] = {}
_LOCK = threading.Lock()


def _compiler() -> tuple[str, str]:
    cxx = config.cxx()
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        raise NoKernel(f"qcompile CPU kernels need a C++ compiler: {cxx!r} does not "
                                  f"run ({err}); set CXX, or use kernels='reference'") from err
    return cxx, out.stdout.splitlines()[0] if out.stdout else cxx


def _load(path: str, digest: str) -> ctypes.CDLL | None:
    """The library at ``path`` if it was built from ``digest``, else None. A damaged file must
    never reach dlopen (a truncated library can crash the process while it is mapped), so the
    file's bytes are checked first against the SHA-256 its sidecar recorded at build time."""
    try:
        with open(path[:-3] + ".json", encoding="utf-8") as f:
            record = json.load(f)
        with open(path, "rb") as f:
            data = f.read()
    except (OSError, ValueError):
        return None
    if record.get("source") != digest or record.get("library") != hashlib.sha256(data).hexdigest():
        return None
    return _open(path, digest)


def _open(path: str, digest: str) -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(path)
        lib.qc_source_hash.restype = ctypes.c_char_p
        return lib if lib.qc_source_hash().decode() == digest else None
    except (OSError, AttributeError):
        return None


def library(isa: str | None = None) -> ctypes.CDLL:
    """The compiled kernels for ``isa`` (default: chosen_isa()), built once and cached."""
    isa = isa or chosen_isa()
    with _LOCK:
        if isa in _LIBS:
            return _LIBS[isa]
        cxx, version = _compiler()
        source = cpu_source.source()
        flags = _FLAGS + _ISA_FLAGS[isa] + [f"-DQC_ISA={_ISA_NUMBER[isa]}"]
        digest = hashlib.sha256("\0".join([source, *flags, version]).encode()).hexdigest()
        folder = cache_dir()
        path = os.path.join(folder, f"qc_cpu_{isa}_{digest[:20]}.so")
        lib = _load(path, digest) or _build(cxx, source, flags, digest, folder, path)
        _LIBS[isa] = lib
        return lib


def _build(cxx, source, flags, digest, folder, path, libs=()) -> ctypes.CDLL:
    """Compile (the source from stdin: no file name ends up in the library), load the result
    from its private temporary path, check it, record its hash, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".qc_cpu_", suffix=".so")
    os.close(fd)
    try:
        cmd = [cxx, *flags, f'-DQC_SOURCE_HASH="{digest}"', "-x", "c++", "-", "-o", tmp, *libs]
        done = subprocess.run(cmd, input=source, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"qcompile CPU kernels: the C++ build failed ({' '.join(cmd)}):\n"
                               f"{done.stderr[-3000:]}")
        lib = _open(tmp, digest)  # a fresh path: never a library already loaded under `path`
        if lib is None:
            raise RuntimeError(f"qcompile CPU kernels: {tmp} was built but does not load")
        with open(tmp, "rb") as f:
            record = {"source": digest, "library": hashlib.sha256(f.read()).hexdigest()}
        write_atomically(path[:-3] + ".json", json.dumps(record))
        os.replace(tmp, path)  # for the next process; this one keeps its mapping
        return lib
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -- the torch operator qcompile_cpu::linear ----------------------------------------------------

_OP: list = []  # the loaded operator library (loaded at most once: it registers an operator)


def op_library() -> ctypes.CDLL:
    """The library defining ``torch.ops.qcompile_cpu.linear`` (built against this torch, once;
    cached like the kernels). Its fake (shape) implementation is registered here too."""
    with _LOCK:
        if _OP:
            return _OP[0]
        from torch.utils import cpp_extension
        cxx, version = _compiler()
        source = cpu_source.op_source(GEMV_MAX_M, PANEL_BYTES, WHOLE_BYTES)
        flags = _FLAGS + [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"] + [
            f"-I{p}" for p in cpp_extension.include_paths()]
        libs = [f"-L{p}" for p in cpp_extension.library_paths()] + ["-lc10", "-ltorch",
                                                                    "-ltorch_cpu"]
        digest = hashlib.sha256("\0".join([source, *flags, *libs, version,
                                           torch.__version__]).encode()).hexdigest()
        folder = cache_dir()
        path = os.path.join(folder, f"qc_cpu_op_{digest[:20]}.so")
        lib = _load(path, digest) or _build(cxx, source, flags, digest, folder, path, libs)
        lib.qc_register.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 4 + [
            ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_float, ctypes.c_void_p,
            ctypes.c_float]
        lib.qc_register_act.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64] + [
            ctypes.c_int32] * 6 + [ctypes.c_float, ctypes.c_float]
        torch.library.register_fake("qcompile_cpu::linear")(_linear_fake)
        torch.library.register_fake("qcompile_cpu::int_linear")(_int_linear_fake)
        _OP.append(lib)
        return lib


def _linear_fake(x, codes, scales, bias, outlier_index, outlier_value, format, n, k, block):
    # the sizes from the int arguments, never from the packed tensors: those are extra graph
    # inputs, which Dynamo has no source for (a size read from them would become a guard)
    torch._check(x.shape[-1] == k, lambda: f"qcompile_cpu::linear: x has K={x.shape[-1]}, not {k}")
    return x.new_empty((*x.shape[:-1], n))


def _int_linear_fake(x, codes, scales, bias, format, act, n, k, block):
    torch._check(x.shape[-1] == k, lambda: f"qcompile_cpu::int_linear: x has K={x.shape[-1]}, "
                                           f"not {k}")
    return x.new_empty((*x.shape[:-1], n))


# -- what a format needs: tables computed by the reference -----------------------------------

class Plan:
    """How one packed weight is read: the kernel's entry points and the tables it uses."""

    def __init__(self, q):
        fmt, el = q.fmt, q.fmt.element
        require_cpu_weight(q)
        self.bits, self.block = el.bits, q.block
        values = constants.element_values(el, q.side)
        self.table = torch.zeros(max(16, values.numel()), dtype=torch.float32)
        self.table[:values.numel()] = values
        step = constants.exact_int_step(values)
        self.dec, self.step = (2, step) if step is not None else (1 if el.bits > 4 else 0, 0.0)
        self.mult_table = constants.multiplier_table(fmt, q.side)
        # byte scale codes: a table of multipliers; float32 ones: the reference's s / max_value
        self.scale, self.maxv = (0, 1.0) if self.mult_table is not None else \
            (1, float(el.max_value))
        combo = (self.bits, self.scale, self.dec)
        tag = cpu_source.tag(*combo)
        isa = chosen_isa()
        lib = self.lib = library(isa)
        self.fmt, self.isa = fmt, isa
        self.linear_fn = getattr(lib, f"qc_linear_{tag}")
        self.decode_fn = getattr(lib, f"qc_decode_{tag}")
        self.values_fn = getattr(lib, f"qc_values_{tag}")
        # the operator's name for this format: the same in every process (graphs cached on disk)
        self.format_id = int.from_bytes(hashlib.sha256(f"{fmt.key}|{isa}".encode()).digest()[:8],
                                        "little") >> 2
        self.data_dependent = tables_from_side_data(fmt)
        self.outliers = _outliers(q)
        self.codes, self.scales = weakref.ref(q.codes), weakref.ref(q.scales)
        self.k = q.shape[1] if q.axis == 1 else q.shape[0]
        self.padded = q.scales.shape[-1] * q.block
        self._gemv_args = None
        self.linear_fn.argtypes = [ctypes.c_void_p, ctypes.c_int]

    def args(self, q, x, y, bias) -> _Args:
        n, n_blocks = q.scales.shape[0], q.scales.shape[-1]
        return _Args(x=x.data_ptr() if x is not None else None, M=0, ldx=0,
                     codes=q.codes.data_ptr(), row_bytes=q.codes.shape[-1],
                     scales=q.scales.data_ptr(), n_blocks=n_blocks, block=q.block,
                     table=self.table.data_ptr(),
                     mult_table=self.mult_table.data_ptr() if self.mult_table is not None else None,
                     maxv=self.maxv, step=self.step,
                     bias=bias.data_ptr() if bias is not None else None,
                     y=y.data_ptr() if y is not None else None, N=n)

    def gemv(self, q, x2: torch.Tensor, bias) -> torch.Tensor:
        """The GEMV kernel on contiguous float32 x2 [M, padded K]: y [M, N]. The argument block
        is kept (codes, scales and tables do not move while the plan lives): a call only sets
        the pointers of x, y and bias."""
        a = self._gemv_args
        if a is None:
            a = self._gemv_args = self.args(q, None, None, None)
        y = torch.empty((x2.shape[0], a.N), dtype=torch.float32)
        a.x, a.y, a.M, a.ldx = x2.data_ptr(), y.data_ptr(), x2.shape[0], x2.shape[1]
        a.bias = bias.data_ptr() if bias is not None else None
        self.linear_fn(ctypes.byref(a), torch.get_num_threads())
        return y


    def register(self) -> int:
        """Hand this format's kernels and tables to the operator library (it copies the
        tables); returns the format's id for ``qcompile_cpu::linear``."""
        el = self.fmt.element
        int_fn = _address(getattr(self.lib, "qc_int_linear_" + cpu_int_source.tag(
            self.bits, self.scale))) if el.kind == "int" else None
        op_library().qc_register(
            self.format_id, _address(self.linear_fn), _address(self.decode_fn),
            _address(self.values_fn), self.table.data_ptr(), self.table.numel(),
            self.mult_table.data_ptr() if self.mult_table is not None else None, self.maxv,
            self.step, int_fn, 2.0 ** -getattr(el, "frac_bits", 0))
        return self.format_id

    def register_act(self, af) -> int:
        """Hand an activation format of the integer path to the operator library; returns its
        id for ``qcompile_cpu::int_linear`` (the same in every process)."""
        act_id = int.from_bytes(hashlib.sha256(f"act|{af.key}|{self.isa}".encode()).digest()[:8],
                                "little") >> 2
        p = cpu_int.act_params(af, af.block_size)  # the format's fields (K set per call)
        op_library().qc_register_act(
            act_id, _address(self.lib.qc_act_quantize), af.block_size, p["scale"], p["rule"],
            p["is_signed"], p["emax"], p["frac"], p["qmax"], p["maxv"], p["xstep"])
        return act_id


def _address(fn) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


def _outliers(q):
    """(row n, column k, value - decoded value) of each weight kept apart from the blocks (OPQ
    outliers, proxy columns) in the padded layout, or None."""
    apart = reference.kept_apart(q)
    if apart is None:
        return None
    r, c, decoded = reference.decoded_at(q, apart[0])
    return r, c, apart[1].to(torch.float32) - decoded.to(torch.float32)


_PLANS: dict[tuple, Plan] = {}


def plan(q) -> Plan:
    """The Plan of a packed weight, kept while its codes tensor lives (compiled graphs call the
    same weights over and over)."""
    # the format by identity (formats.get gives one object per key) and the forced instruction
    # set as written (read, not parsed, per call: a Plan is made, and the setting checked, once
    # per value)
    key = (q.codes.data_ptr(), q.scales.data_ptr(), id(q.fmt), q.shape, q.dtype,
           os.environ.get("QCOMPILE_CPU_ISA", ""))
    hit = _PLANS.get(key)
    # the same tensors and format, not others that reuse their memory
    if hit is None or hit.codes() is not q.codes or hit.scales() is not q.scales or \
            hit.fmt is not q.fmt or not (q.codes.is_contiguous() and q.scales.is_contiguous()):
        _check(q)
        if len(_PLANS) > 4096:
            _PLANS.clear()
        hit = _PLANS[key] = Plan(q)
    return hit


def _check(q):
    if q.codes.device.type != "cpu" or len(q.shape) != 2 or q.axis not in (0, 1):
        require_cpu_weight(q)
    if not (q.codes.is_contiguous() and q.scales.is_contiguous()):
        raise ValueError("qcompile CPU kernels read codes and scales in memory order: they must "
                         "be contiguous (qcompile.quantize makes them so)")


# -- entry points ----------------------------------------------------------------------------

def decode_rows(q, p: Plan, n0: int, n1: int) -> torch.Tensor:
    """Rows n0..n1 of the packed weight, decoded: float32 [n1 - n0, n_blocks * block]."""
    out = torch.empty((n1 - n0, q.scales.shape[-1] * q.block), dtype=torch.float32)
    a = p.args(q, None, None, None)
    p.decode_fn(ctypes.byref(a), ctypes.c_int64(n0), ctypes.c_int64(n1),
                ctypes.c_void_p(out.data_ptr()), ctypes.c_int(torch.get_num_threads()))
    return out


def gather_rows(q, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of a packed table [vocab, hidden] (blocks along axis 1), each decoded by the
    kernels: the reference's values, bit for bit. For a few rows (a decoding step); the
    reference's gather serves many rows as fast and keeps OPQ tables."""
    why = cpu_table_problem(q)
    if why:
        raise NoKernel(why)
    p = plan(q)
    k = q.shape[1]
    rows = ids.reshape(-1).tolist()
    out = torch.empty((len(rows), k), dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i] = decode_rows(q, p, r, r + 1)[0, :k]
    return out.reshape(*ids.shape, k)


def dequantize(q) -> torch.Tensor:
    """The weight a 2-d packed QTensor stands for: the reference's values, bit for bit."""
    p = plan(q)
    n, k = q.scales.shape[0], (q.shape[1] if q.axis == 1 else q.shape[0])
    w = decode_rows(q, p, 0, n)
    if p.outliers is not None:
        r, c, delta = p.outliers
        w[r, c] += delta
    w = w[:, :k]
    return (w if q.axis == 1 else w.t()).contiguous()


def linear(x: torch.Tensor, q, act_fmt=None, bias: torch.Tensor | None = None,
           choice=None) -> torch.Tensor:
    """fq(x) @ W^T + bias for a packed weight (Conv1D [K, N] weights too: their codes are stored
    K-last like nn.Linear's), in x's shape with the last axis N. ``choice``: the selector's
    answer (asked here when not given). Kept short: decoding a model calls this for every
    linear layer and token."""
    choice = (choice or choose(q, act_fmt, x, "cpu", bias)).require()
    p = plan(q)
    x2 = x if x.dim() == 2 else x.reshape(-1, p.k)
    af = formats.get(act_fmt) if act_fmt else None
    if choice.kernel == "cpu_int":
        y = cpu_int.linear(p, q, x2.contiguous(), af, _contiguous(bias))
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[1])
    if af is not None and x2.numel():
        x2 = reference.fake_quantize(x2, af, 1)
    if p.padded != p.k:
        x2 = torch.nn.functional.pad(x2, (0, p.padded - p.k))
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    bias = _contiguous(bias)
    m = x2.shape[0]
    if m == 0:
        y = x2.new_empty((0, q.scales.shape[0]))
    elif choice.variant == "gemv":
        y = p.gemv(q, x2, bias)
    else:
        y = _panels(x2, q, p, bias)
    if p.outliers is not None and m:
        r, c, delta = p.outliers
        y.index_add_(1, r, x2[:, c] * delta)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[1])


def _contiguous(t):
    return t if t is None or t.is_contiguous() else t.contiguous()


def _panels(x2, q, p: Plan, bias) -> torch.Tensor:
    n, padded = q.scales.shape[0], x2.shape[1]
    if 4 * n * padded <= WHOLE_BYTES:
        w = decode_rows(q, p, 0, n)
        return x2 @ w.t() if bias is None else torch.addmm(bias, x2, w.t())
    rows = max(16, PANEL_BYTES // (4 * padded))
    y = torch.empty((x2.shape[0], n), dtype=torch.float32)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        w = decode_rows(q, p, n0, n1)
        if bias is None:
            y[:, n0:n1].copy_(x2 @ w.t())
        else:
            y[:, n0:n1].copy_(torch.addmm(bias[n0:n1], x2, w.t()))
    return y
