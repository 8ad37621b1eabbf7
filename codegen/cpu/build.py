"""Build, cache and load the CPU libraries from the C++ files of this folder.

Two libraries:

* the kernels (kernels.cpp + int_kernels.cpp): plain C entry points, one library per
  instruction set (isa.py), loaded with ctypes;
* the operator (operator.cpp): ``torch.ops.qcompile_cpu.linear`` / ``int_linear``, the one
  linear driver, built against this torch and loaded at most once per process (it registers
  the operators); with package.cpp, the registration of an exported package's formats from
  C++ (``qc_register_package``).

Both include args.h, the argument blocks. The system C++ compiler (``$CXX``, else g++) runs in
this folder on the files' names, so that no path ends up in a library. Compile-time values come
as ``-D`` flags (QC_ISA, QC_PREFETCH; QC_GEMV_MAX_M, QC_PANEL_BYTES, QC_WHOLE_BYTES). A library
is cached in the kernel cache folder (codegen/cache.py: private, checked) under a name holding
the hash of its source files' names and bytes, every header of the folder, the flags and the
compiler's version (and torch's, for the operator). A sidecar ``.json`` records that hash and
the SHA-256 of the library's bytes: a library is loaded only if its bytes match (a damaged file
never reaches dlopen) and, once loaded, it must report the same source hash
(``qc_source_hash``); anything else is rebuilt. Builds go to a private temporary file that is
loaded, checked, then renamed into place, so processes building at once never see half a file.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from qcompile import config

from ..cache import cache_dir, write_atomically
from ..select import CPU_GEMV_MAX_M as GEMV_MAX_M
from ..select import NoKernel
from .isa import ISA_FLAGS, ISA_NUMBER, chosen_isa

HERE = Path(__file__).parent
KERNEL_FILES = ("kernels.cpp", "int_kernels.cpp")
OPERATOR_FILES = ("operator.cpp", "package.cpp")
# Weight codes are fetched this many bytes ahead of their use: the hardware prefetcher alone left
# a one-row GEMV at a third of the streaming read's bandwidth (benchmarks/gemv.py, 2-core EPYC)
PREFETCH_BYTES = 2048
PANEL_BYTES = 1 << 20  # decoded weight rows per GEMM call: about L2-sized
# a weight up to this size decoded is one panel: one GEMM, which beats several panels' GEMMs
# (measured on SmolLM2's layers at M=512); bigger ones (lm_head) go in L2-sized panels, which
# also beat one float32 GEMM over the whole 113 MB table
WHOLE_BYTES = 16 << 20
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off"]

_LIBS: dict[str, ctypes.CDLL] = {}
_OP: list = []  # the loaded operator library (loaded at most once: it registers operators)
_PATHS: dict[str, str] = {}  # library name prefix -> its file in the cache
_LOCK = threading.Lock()


def source_files(names) -> list[Path]:
    """The files a library is built from: ``names`` and every header of this folder."""
    return [HERE / n for n in names] + sorted(HERE.glob("*.h"))


def operator_files() -> list[Path]:
    """Every file that defines the operators: their C++ and the Python that registers their
    fake implementations (the backend tags Inductor's graph cache with their bytes)."""
    return [Path(__file__), *source_files(OPERATOR_FILES)]


def _compiler() -> tuple[str, str]:
    cxx = config.cxx()
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        raise NoKernel(f"qcompile CPU kernels need a C++ compiler: {cxx!r} does not "
                       f"run ({err}); set CXX, or use kernels='reference'") from err
    return cxx, out.stdout.splitlines()[0] if out.stdout else cxx


def _digest(names, *extra: str) -> str:
    """SHA-256 of the source files (names and bytes) and ``extra`` (flags, versions)."""
    h = hashlib.sha256()
    for path in source_files(names):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update("\0".join(extra).encode())
    return h.hexdigest()


def library(isa: str | None = None) -> ctypes.CDLL:
    """The compiled kernels for ``isa`` (default: chosen_isa()), built once and cached."""
    isa = isa or chosen_isa()
    with _LOCK:
        if isa in _LIBS:
            return _LIBS[isa]
        cxx, version = _compiler()
        flags = _FLAGS + ISA_FLAGS[isa] + [f"-DQC_ISA={ISA_NUMBER[isa]}",
                                           f"-DQC_PREFETCH={PREFETCH_BYTES}"]
        _LIBS[isa] = _cached(cxx, KERNEL_FILES, flags, [], f"qc_cpu_{isa}", version)
        return _LIBS[isa]


def op_library() -> ctypes.CDLL:
    """The library defining ``torch.ops.qcompile_cpu.linear``, ``int_linear`` and
    ``experts_linear`` (built against this torch, once; cached like the kernels). Their fake
    (shape) implementations are registered here too."""
    with _LOCK:
        if _OP:
            return _OP[0]
        from torch.utils import cpp_extension
        cxx, version = _compiler()
        flags = _FLAGS + [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
                          f"-DQC_GEMV_MAX_M={GEMV_MAX_M}", f"-DQC_PANEL_BYTES={PANEL_BYTES}",
                          f"-DQC_WHOLE_BYTES={WHOLE_BYTES}"] + [
            f"-I{p}" for p in cpp_extension.include_paths()]
        libs = [f"-L{p}" for p in cpp_extension.library_paths()] + ["-lc10", "-ltorch",
                                                                    "-ltorch_cpu"]
        lib = _cached(cxx, OPERATOR_FILES, flags, libs, "qc_cpu_op", version, torch.__version__)
        lib.qc_register.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 4 + [
            ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_float, ctypes.c_void_p,
            ctypes.c_float]
        lib.qc_unregister.argtypes = [ctypes.c_int64]
        lib.qc_register_act.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64] + [
            ctypes.c_int32] * 6 + [ctypes.c_float, ctypes.c_float]
        lib.qc_register_package.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int64]
        lib.qc_register_package.restype = ctypes.c_int64
        torch.library.register_fake("qcompile_cpu::linear")(_linear_fake)
        torch.library.register_fake("qcompile_cpu::int_linear")(_int_linear_fake)
        torch.library.register_fake("qcompile_cpu::experts_linear")(_experts_linear_fake)
        _OP.append(lib)
        return lib


def library_file(isa: str) -> str:
    """The cached file of the kernel library for ``isa`` (built first if need be)."""
    library(isa)
    return _PATHS[f"qc_cpu_{isa}"]


def op_library_file() -> str:
    """The cached file of the operator library (built first if need be): what a C++ process
    dlopens before it loads a package (examples/cpp/)."""
    op_library()
    return _PATHS["qc_cpu_op"]


def library_bytes(path: str) -> bytes:
    """The bytes of the cached library ``path``, checked against the SHA-256 its sidecar
    recorded at build time."""
    with open(path[:-3] + ".json", encoding="utf-8") as f:
        recorded = json.load(f).get("library")
    with open(path, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != recorded:
        raise RuntimeError(f"qcompile CPU kernels: {path} changed after it was built (its "
                           "SHA-256 does not match its .json); delete it to rebuild it")
    return data


def _cached(cxx, names, flags, libs, prefix, *versions) -> ctypes.CDLL:
    """The library of ``names`` built with ``flags``: from the cache if it checks, else built."""
    digest = _digest(names, *flags, *libs, *versions)
    folder = cache_dir()
    path = _PATHS[prefix] = os.path.join(folder, f"{prefix}_{digest[:20]}.so")
    return _load(path, digest) or _build(cxx, names, flags, libs, digest, folder, path)


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


def _build(cxx, names, flags, libs, digest, folder, path) -> ctypes.CDLL:
    """Compile (in this folder, on the files' names), load the result from its private
    temporary path, check it, record its hash, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".qc_cpu_", suffix=".so")
    os.close(fd)
    try:
        cmd = [cxx, *flags, f'-DQC_SOURCE_HASH="{digest}"', *names, "-o", tmp, *libs]
        done = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"qcompile CPU kernels: the C++ build failed ({' '.join(cmd)} "
                               f"in {HERE}):\n{done.stderr[-3000:]}")
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


def _linear_fake(x, codes, scales, bias, outlier_index, outlier_value, format, n, k, block):
    # the sizes from the int arguments, never from the packed tensors: those are extra graph
    # inputs, which Dynamo has no source for (a size read from them would become a guard)
    torch._check(x.shape[-1] == k, lambda: f"qcompile_cpu::linear: x has K={x.shape[-1]}, not {k}")
    return x.new_empty((*x.shape[:-1], n))


def _int_linear_fake(x, codes, scales, bias, format, act, n, k, block):
    torch._check(x.shape[-1] == k, lambda: f"qcompile_cpu::int_linear: x has K={x.shape[-1]}, "
                                           f"not {k}")
    return x.new_empty((*x.shape[:-1], n))


def _experts_linear_fake(x, codes, scales, group_experts, group_offsets, rows, format, n, k,
                         block):
    torch._check(x.shape[-1] == k, lambda: f"qcompile_cpu::experts_linear: x has "
                                           f"K={x.shape[-1]}, not {k}")
    return x.new_empty((x.shape[0], n))
