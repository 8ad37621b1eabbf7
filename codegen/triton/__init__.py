"""Generated Triton kernels (installed as qcompile.codegen.triton): dequant.py (dequantise),
quant.py (quantise), linear.py (the fused block-scaled linear). Nothing is imported here, so
that the registry of emitters can be read without the generators."""
