"""Exact float32 helpers shared by the reference implementation.

Everything here is exact: powers of two are built from bit patterns and exponents are read with
frexp, so no transcendental function can round differently on another device.
"""
import torch

F32_MANT_BITS = 23
E8M0_BIAS = 127
E8M0_NAN = 255
F32_MAX = torch.finfo(torch.float32).max


def pow2(e: torch.Tensor) -> torch.Tensor:
    """2**e as float32 for integer e in [-149, 127] (subnormal results included), built from bits."""
    e = e.to(torch.int32)
    normal = ((e + 127).clamp(min=1) << F32_MANT_BITS).view(torch.float32)
    subnormal = (torch.ones_like(e) << (e + 149).clamp(0, 22)).view(torch.float32)
    return torch.where(e >= -126, normal, subnormal)


def div(a, b) -> torch.Tensor:
    """Correctly rounded float32 a / b on every device.

    torch turns `tensor / python_float` on CUDA and `python_float / tensor` everywhere into a
    multiplication by a rounded reciprocal; dividing two full tensors avoids both."""
    like = a if isinstance(a, torch.Tensor) else b
    a = a if isinstance(a, torch.Tensor) else torch.full_like(like, a)
    b = b if isinstance(b, torch.Tensor) else torch.full_like(like, b)
    return torch.div(a, b)


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) for finite a > 0 (subnormals too) as int32; garbage for a <= 0."""
    _, e = torch.frexp(a)  # a = m * 2**e with m in [0.5, 1)
    return (e - 1).to(torch.int32)


def is_pow2(a: torch.Tensor) -> torch.Tensor:
    """True where finite a > 0 is an exact power of two."""
    m, _ = torch.frexp(a)
    return m == 0.5


def round_half_even(a: torch.Tensor) -> torch.Tensor:
    """torch.round rounds half to even; named so the rule is visible where it is used."""
    return torch.round(a)
