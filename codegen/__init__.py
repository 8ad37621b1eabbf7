"""Kernel generation from a Format description: Triton kernels for CUDA tensors and C++ kernels
for CPU tensors, their cache and their launch (installed as qcompile.codegen).

Triton (dequant.py: dequantise; quant.py: quantise; linear.py: the fused block-scaled linear):
each kernel is generated as readable Python/Triton source and run from that very string
(cache.py: load_kernel compiles and executes it, and hands Triton the same text through
linecache); a copy named by content hash is written to a private cache folder for people to
read, never read back to run. On a machine without a GPU they run only with TRITON_INTERPRET=1
set before triton is imported.

C++ (cpu.py: build, instruction set, launch of the weight-only kernels, C++ in cpu_source.py;
cpu_int.py: the integer-activation path, C++ in cpu_int_source.py): one translation unit per
instruction set, compiled by the system compiler into a checked shared library in the same
cache folder. cache.py: the kernel cache (cache_dir, write_atomically, load_kernel).
Set QCOMPILE_DUMP_KERNELS=1 to print each source when it is first built.
"""
from .dequant import dequant_source, dequantize, load_kernel
from .quant import quant_source, quantize, supported
from .linear import linear_source  # the fused linear itself: qcompile.codegen.linear.linear

__all__ = ["dequantize", "dequant_source", "load_kernel", "quantize", "quant_source", "supported",
           "linear_source"]
