"""Generated kernels that torch's tracing can record (``torch.library.triton_op``).

A launch through ``torch.library.wrap_triton(kernel)[grid](...)`` inside a ``triton_op`` that
torch traces (``torch.export`` then ``run_decompositions(decompose_custom_triton_ops=True)``,
AOTInductor, ``make_fx``) becomes a ``triton_kernel_wrapper_functional`` node holding the
kernel; where the op runs eagerly it is the kernel itself (linear.py's ``traced_linear``).

Under TRITON_INTERPRET=1 ``triton.jit`` gives an ``InterpretedFunction``, which torch's tracing
does not take (``wrap_triton`` hands it back unwrapped, and it cannot run on fake tensors). So
there the innermost ``InterpretedFunction`` of the autotune / heuristics chain is replaced, once
per kernel, by an ``InterpretingJIT``: a ``JITFunction`` of the same Python function (the arg names
and parameters torch's tracing reads) whose launches run that same ``InterpretedFunction``. The
kernel's results are unchanged (the interpreter runs the same function); only tracing differs.
"""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def _interpreting_jit():
    """The class ``InterpretingJIT``, made on first use: importing qcompile imports no Triton."""
    from triton.runtime.jit import JITFunction

    class InterpretingJIT(JITFunction):
        """A JITFunction for torch's tracing whose launches run Triton's interpreter."""

        def __init__(self, interpreted):
            super().__init__(interpreted.fn)
            self.interpreted = interpreted

        def run(self, *args, grid, warmup, **kwargs):
            return self.interpreted.run(*args, grid=grid, warmup=warmup, **kwargs)

    return InterpretingJIT


def interpretable(kernel):
    """``kernel`` (a jit function, or an autotune / heuristics chain around one) with its
    ``InterpretedFunction`` (TRITON_INTERPRET=1) replaced by an ``InterpretingJIT``: in place
    inside a chain, returned anew for a bare one; apply it once per loaded kernel. A compiled
    kernel (on a GPU) comes back as it is."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.interpreter import InterpretedFunction
    if isinstance(kernel, InterpretedFunction):
        return _interpreting_jit()(kernel)
    holder = kernel
    while isinstance(getattr(holder, "fn", None), (Autotuner, Heuristics)):
        holder = holder.fn
    if isinstance(getattr(holder, "fn", None), InterpretedFunction):
        holder.fn = _interpreting_jit()(holder.fn)
    return kernel


def outside_tracing():
    """A context in which no dispatch mode (fake tensors, export's tracing) is active: where a
    traced launch makes its kernel source and constant tables, so that they are made from real
    values and cached as real tensors, whichever call makes them first."""
    from torch.utils._python_dispatch import _disable_current_modes
    return _disable_current_modes()
