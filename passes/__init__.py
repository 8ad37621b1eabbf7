"""FX graph passes of the blockquant backend, each a function from graph module to graph module.

The passes talk through one typed record per quantisable op, ``find.Op`` under
``node.meta[find.KEY]``, which each pass fills in:

1. ``find.find_quantisable``: mark linear / addmm (and, when a policy asks, matmul and
   embedding) nodes with their ``Site`` (operands, module name, K axis).
2. ``plan.plan``: the first matching rule and the LayerSpec per site from the Policy.
3. ``quantize_weights.quantize_weights``: quantise the real weights once (cached) -> the
   record's packed QTensor.
4. ``rewrite.rewrite``: the semantic form, explicit ``qcompile::dequantize`` /
   ``qcompile::fake_quantize_act`` ops; packed tensors become extra graph inputs, listed in
   the graph's record (``graph.GraphRecord`` under ``gm.meta[graph.KEY]``).
5. ``fuse.fuse``: dequantize(W) [+ fake_quantize_act(x)] + matmul -> ``qcompile::linear``.
6. ``cpu_kernels.use_cpu_kernels``: on CPU, without autograd, ``qcompile::linear`` ->
   ``qcompile_cpu::linear`` (the same C++ kernels, called without Python).

Set QCOMPILE_DEBUG=1 to print the graph after each pass.
"""
from .cpu_kernels import use_cpu_kernels
from .debug import debug_graph
from .find import Site, find_quantisable
from .fuse import fuse
from .plan import plan
from .quantize_weights import quantize_weights
from .rewrite import rewrite

__all__ = ["Site", "find_quantisable", "plan", "quantize_weights", "rewrite",
           "fuse", "use_cpu_kernels", "debug_graph"]
