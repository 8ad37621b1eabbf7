"""Settings read from the environment, in one place, and the project's way of warning.

Imports nothing from qcompile: every layer may use it.

Environment variables (booleans accept 1/true/yes/on and 0/false/no/off, any case; anything
else is an error that names the variable, never a silent guess):
  QCOMPILE_DEBUG=1         print the graph after each backend pass (stderr)
  QCOMPILE_STRICT=1        a generated kernel that fails raises instead of falling back to the
                           reference (the test suite runs this way)
  QCOMPILE_KERNELS=...     auto | reference | triton | cpu: overrides the backend's ``kernels``
                           option (the ops' ``impl``)
  QCOMPILE_CPU_ISA=...     avx512 | avx2 | scalar: force the CPU kernels' instruction set
  QCOMPILE_FLOAT32_DOTS=.. ieee (default) | tf32: the precision of the Triton GEMM's float
                           dots in float32 models; tf32 is faster and widens the error bound
                           (docs/architecture.md)
  QCOMPILE_DUMP_KERNELS=1  print each generated kernel's source when it is first built
  QCOMPILE_KERNEL_CACHE=D  the kernel cache folder (default: $XDG_CACHE_HOME/qcompile/kernels,
                           else ~/.cache/qcompile/kernels)
  TRITON_INTERPRET=1       Triton's own switch: run kernels in its CPU interpreter
  CXX=...                  the C++ compiler for the CPU kernels (default g++)
"""
from __future__ import annotations

import os
import sys
import sysconfig
import warnings

# compiling one graph longer than this (seconds) prints what is being compiled to stderr
PROGRESS_AFTER_S = 3.0
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")
# The kernels, one list: the per-tensor functions qcompile.quantize / dequantize / fake_quantize
# take IMPLS as their ``impl``; the backend's ``kernels`` option and the ops' ``impl`` take
# KERNELS, the same two plus "cpu" (the C++ matmul kernels) and "auto" (Triton on CUDA tensors,
# cpu on CPU ones).
IMPLS = ("reference", "triton")
KERNELS = ("auto", *IMPLS, "cpu")
CPU_ISAS = ("avx512_vnni", "avx512", "avx2", "scalar")
FLOAT32_DOTS = ("ieee", "tf32")


def flag(name: str) -> bool:
    """A boolean environment variable; unset or empty is False."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={raw!r}: expected one of "
                     f"{'/'.join(_TRUE)} (on) or {'/'.join(_FALSE[1:])} (off), or unset")


def choice(name: str, choices: tuple[str, ...]) -> str | None:
    """An environment variable that must be one of ``choices``; None when unset or empty."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if not value:
        return None
    if value not in choices:
        raise ValueError(f"environment variable {name}={raw!r}: expected one of "
                         f"{', '.join(choices)}")
    return value


def debug() -> bool:
    return flag("QCOMPILE_DEBUG")


def strict() -> bool:
    return flag("QCOMPILE_STRICT")


def dump_kernels() -> bool:
    return flag("QCOMPILE_DUMP_KERNELS")


def kernels_override() -> str | None:
    return choice("QCOMPILE_KERNELS", KERNELS)


def cpu_isa() -> str | None:
    """QCOMPILE_CPU_ISA: force the CPU kernels' instruction set (None: the machine's best)."""
    return choice("QCOMPILE_CPU_ISA", CPU_ISAS)


def cxx() -> str:
    """CXX: the C++ compiler the CPU kernels are built with (g++ unset)."""
    return os.environ.get("CXX", "").strip() or "g++"


def float32_dots() -> str:
    """QCOMPILE_FLOAT32_DOTS: tl.dot input precision of float32 models' GEMMs ("ieee" unset)."""
    return choice("QCOMPILE_FLOAT32_DOTS", FLOAT32_DOTS) or "ieee"


def triton_interpret() -> bool:
    """Triton's interpreter switch, read the way Triton reads it (lenient: Triton's choice)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE + ("y",)


def kernel_cache_setting() -> str:
    """The kernel cache folder the user asked for (not yet checked or created)."""
    explicit = os.environ.get("QCOMPILE_KERNEL_CACHE", "").strip()
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(
        os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qcompile", "kernels")


# -- warnings: point at the user's line, say each thing once ---------------------------------

def _internal_dirs() -> tuple[str, ...]:
    """Folders whose frames are not the user's: this project, torch, transformers, the stdlib."""
    here = os.path.dirname(os.path.abspath(__file__))
    dirs = [here, os.path.join(os.path.dirname(here), "passes"),
            os.path.join(os.path.dirname(here), "codegen"), sysconfig.get_paths()["stdlib"]]
    for name in ("torch", "transformers", "accelerate"):
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "__file__", None):
            dirs.append(os.path.dirname(os.path.abspath(mod.__file__)))
    return tuple(os.path.join(d, "") for d in dirs)


def _user_stacklevel() -> int:
    """The ``stacklevel`` for a warnings.warn called in ``warn`` below that names the first
    frame outside the internal folders (the user's own line); the outermost frame if none."""
    internal = _internal_dirs()
    frame, level = sys._getframe(2), 2  # frame 2 and stacklevel 2: the caller of warn()
    while frame.f_back is not None:
        name = frame.f_code.co_filename
        if not (name.startswith("<") or os.path.abspath(name).startswith(internal)):
            return level
        frame, level = frame.f_back, level + 1
    return level


_said: set = set()


def warn(message: str, category: type[Warning] = UserWarning, once: object = None) -> None:
    """warnings.warn(message) attributed to the user's line. With ``once`` (a hashable key) the
    warning is given at most once per process for that key."""
    if once is not None:
        if once in _said:
            return
        _said.add(once)
    warnings.warn(message, category, stacklevel=_user_stacklevel())
