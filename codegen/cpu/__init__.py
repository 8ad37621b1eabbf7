"""CPU kernels for packed weights: C++ source files of this folder, built per instruction set.

``linear(x, q, act_fmt, bias)`` computes ``fq(x) @ W^T (+ bias)`` for a packed QTensor W
without writing W out, through the operator ``qcompile_cpu::linear`` (``int_linear`` for int
weights with int activations) that compiled graphs call too: for M <= GEMV_MAX_M rows the GEMV
kernel decodes each weight row in registers and accumulates in float32; for more rows decoded
panels of weight rows (cache-sized, never the whole weight unless it is small) are multiplied
with torch's GEMM, so the decode cost is spread over M. ``dequantize(q)`` and ``gather_rows``
decode with the same code: the reference's values, bit for bit.

The folder, by job:

* C++: args.h (the argument blocks, shared by every translation unit), simd.h (the vector
  helpers of each instruction set), decode.h (one weight's code, element and multiplier),
  kernels.cpp (the weight-only kernels), int_kernels.cpp (the integer path: int weights times
  int activations, exact integer block dot products), operator.cpp (the torch operators: the
  one linear driver), package.cpp (``qc_register_package``: an exported package's formats
  registered from C++, with no Python);
* isa.py: the instruction set (``QCOMPILE_CPU_ISA``); build.py: build, cache and load of the
  libraries; structs.py: the ctypes mirrors of args.h, read from it; plans.py: a weight's
  Plan (entry points and tables from the reference) and its registration with the operator;
  package.py: the kernel library and manifest an exported package carries for package.cpp;
  entry.py: the entry points the ops call.

Formats: every element of 2..8 bits and every scale kind (E8M0, float32 absmax, NVFP4), OPQ
outliers and proxy columns added after the kernel. Models in float32, bfloat16 and float16
(their reference rounds the decoded weight to the dtype: the weight-only kernels round each
decoded weight, the gather and dequantise their float32 result; the integer path widens x to
float32 and rounds its output); other dtypes: NoKernel (codegen/select.py says which weights
the kernels read), so the op falls back to the reference with one warning.
"""
from .build import GEMV_MAX_M, PANEL_BYTES, WHOLE_BYTES, library, op_library, operator_files
from .entry import decode_rows, dequantize, experts_linear, gather_rows, linear, quantize_act
from .isa import ISAS, chosen_isa, machine_isa
from .plans import Plan, act_params, plan

__all__ = ["GEMV_MAX_M", "PANEL_BYTES", "WHOLE_BYTES", "ISAS", "Plan", "act_params",
           "chosen_isa", "decode_rows", "dequantize", "experts_linear", "gather_rows", "library",
           "linear", "machine_isa", "op_library", "operator_files", "plan", "quantize_act"]
