"""Kernel generation from a Format description, for two targets (installed as qcompile.codegen).

Shared by both: select.py, which kernel runs (``choose`` and its siblings; ``NoKernel`` where
none exists by design); constants.py, the constants a format's kernels need, derived once from
the reference; cache.py, the private kernel cache (cache_dir, write_atomically, load_kernel).

triton/ (CUDA tensors, or CPU ones under TRITON_INTERPRET=1 set before triton is imported):
dequant.py (dequantise), quant.py (quantise) and linear.py (the fused block-scaled linear) write
readable Python/Triton source from the registry of element and scale emitters (emit.py) and run
that very string (load_kernel compiles and executes it and hands Triton the same text through
linecache); a copy named by content hash is written to the cache folder for people to read,
never read back to run.

cpu/ (CPU tensors): C++ source files shipped as package data (args.h, the argument structs
every translation unit includes; simd.h, decode.h; kernels.cpp, int_kernels.cpp; operator.cpp,
the torch operators qcompile_cpu::linear / int_linear, the one CPU linear driver), built by the
system compiler once per instruction set into checked shared libraries in the same cache folder
(build.py); plans.py reads a packed weight's tables, entry.py holds the Python entry points.

Set QCOMPILE_DUMP_KERNELS=1 to print each source when it is first built.
"""
from .cache import load_kernel
from .triton.dequant import dequant_source, dequantize
from .triton.linear import linear_source  # the fused linear: qcompile.codegen.triton.linear.linear
from .triton.quant import quant_source, quantize, supported

__all__ = ["dequantize", "dequant_source", "load_kernel", "quantize", "quant_source", "supported",
           "linear_source"]
