"""Where the kernel tests launch the generated kernels.

By default in Triton's interpreter on the CPU: TRITON_INTERPRET=1 is set here, before anything
imports triton (import this module before qcompile). On a machine with a CUDA GPU,
QCOMPILE_TEST_DEVICE=cuda runs the same tests with the kernels compiled for that GPU: inputs move
there, the oracles (the reference, the bounds) stay on the CPU and the results come back to it.
"""
import os

DEVICE = os.environ.get("QCOMPILE_TEST_DEVICE", "cpu")
if DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"QCOMPILE_TEST_DEVICE must be 'cpu' or 'cuda', got {DEVICE!r}")
ON_GPU = DEVICE == "cuda"
if ON_GPU:
    os.environ["TRITON_INTERPRET"] = "0"
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if ON_GPU and not torch.cuda.is_available():
    raise RuntimeError("QCOMPILE_TEST_DEVICE=cuda, but torch sees no CUDA device")

# tests of CPU dispatch rules and of the interpreter itself
cpu_only = pytest.mark.skipif(ON_GPU, reason="checks CPU dispatch / the interpreter")


def dev(t):
    """A tensor or QTensor (or None) on the kernel device."""
    return None if t is None else t.to(DEVICE)


def host(t):
    """A kernel's result (tensor or QTensor) back on the CPU, where the oracles are."""
    return t.to("cpu")
