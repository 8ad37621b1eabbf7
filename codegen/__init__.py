"""Triton source generation, kernel cache and launch (installed as qcompile.codegen).

Kernels are generated as readable Python/Triton source from a Format description and run from
that very string (cache.py: load_kernel compiles and executes it, and hands Triton the same text
through linecache); a copy named by content hash is written to a private cache folder for people
to read, never read back to run. Set QCOMPILE_DUMP_KERNELS=1 to print each source when it is
first loaded. dequant.py: dequantise; quant.py: quantise; linear.py: the fused block-scaled
linear; cache.py: the kernel cache (cache_dir, write_atomically, load_kernel).
On a machine without a GPU set TRITON_INTERPRET=1 before importing this package.
"""
from .dequant import dequant_source, dequantize, load_kernel
from .quant import quant_source, quantize, supported
from .linear import linear_source  # the fused linear itself: qcompile.codegen.linear.linear

__all__ = ["dequantize", "dequant_source", "load_kernel", "quantize", "quant_source", "supported",
           "linear_source"]
