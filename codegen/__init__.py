"""Triton source generation, kernel cache and launch (installed as qcompile.codegen).

Kernels are generated as readable Python/Triton source from a Format description, written to
a cache folder named by content hash and imported from there (Triton reads a kernel's source
from its file). Set QCOMPILE_DUMP_KERNELS=1 to print each source when it is generated.
dequant.py: dequantise; quant.py: quantise; linear.py: the fused block-scaled linear.
On a machine without a GPU set TRITON_INTERPRET=1 before importing this package.
"""
from .dequant import dequant_source, dequantize, load_kernel
from .quant import quant_source, quantize, supported
from .linear import linear_source  # the fused linear itself: qcompile.codegen.linear.linear

__all__ = ["dequantize", "dequant_source", "load_kernel", "quantize", "quant_source", "supported",
           "linear_source"]
