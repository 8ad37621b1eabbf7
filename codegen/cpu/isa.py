"""The instruction set the CPU kernels are built for.

AVX-512 where torch reports it (with VNNI where the CPU has it: its own build, used by the
integer path), else AVX2, else scalar; ``QCOMPILE_CPU_ISA`` forces one (an ISA the machine lacks
is an error, not a crash). Each becomes the compiler flags of one library and the value of
``QC_ISA`` in simd.h.
"""
from __future__ import annotations

import torch

from qcompile import config

ISAS = config.CPU_ISAS  # best first
ISA_NUMBER = {"avx512_vnni": 3, "avx512": 2, "avx2": 1, "scalar": 0}  # QC_ISA
# (-mf16c: every AVX2 CPU has F16C, the float16 rounding of a bfloat16 / float16 model's weights)
_AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma", "-mavx2", "-mf16c"]
ISA_FLAGS = {"avx512_vnni": _AVX512 + ["-mavx512vnni"], "avx512": _AVX512,
             "avx2": ["-mavx2", "-mfma", "-mf16c"], "scalar": []}


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
    """QCOMPILE_CPU_ISA if this machine has it, else the machine's best."""
    forced = config.cpu_isa()
    have = machine_isa()
    if forced is None:
        return have
    if ISAS.index(forced) < ISAS.index(have):
        raise RuntimeError(f"QCOMPILE_CPU_ISA={forced}, but this CPU (torch reports "
                           f"{torch.backends.cpu.get_cpu_capability()}) has only {have}; choose "
                           f"one of {', '.join(ISAS[ISAS.index(have):])}")
    return forced
