"""The CPU integer path: int weights times int activations, exact integer block dot products.

Which pairs take it is the selector's rule (codegen/select.py ``cpu_int_applies``: the Triton
integer path's pairs, int elements with power-of-two or absmax scales on both sides, no OPQ,
products summed exactly, where each activation block lies inside one weight block). ``linear``
quantises the activations in C++ (the reference's codes and scales, bit for bit) and returns
the Triton integer path's formula (see cpu_int_source.py), on every instruction set. Other
activation formats are fake-quantised by the reference and multiplied by the weight-only
kernels (within the float32 bound).
"""
from __future__ import annotations

import ctypes
import functools

import torch

from . import cpu_int_source

_RULES = {"floor": 0, "ceil": 1, "rceil": 2, "even": 3}


class ActArgs(ctypes.Structure):
    """Mirror of ``struct ActArgs`` in cpu_int_source.py."""
    _fields_ = [("x", ctypes.c_void_p), ("M", ctypes.c_int64), ("ldx", ctypes.c_int64),
                ("K", ctypes.c_int64), ("tile", ctypes.c_int64), ("n_tiles", ctypes.c_int64),
                ("clamped", ctypes.c_int32), ("scale", ctypes.c_int32), ("rule", ctypes.c_int32),
                ("is_signed", ctypes.c_int32), ("emax", ctypes.c_int32), ("frac", ctypes.c_int32),
                ("qmax", ctypes.c_int32), ("maxv", ctypes.c_float), ("xstep", ctypes.c_float),
                ("xq", ctypes.c_void_p), ("ax", ctypes.c_void_p), ("xsum", ctypes.c_void_p)]


class IntArgs(ctypes.Structure):
    """Mirror of ``struct IntArgs`` in cpu_int_source.py."""
    _fields_ = [("xq", ctypes.c_void_p), ("ax", ctypes.c_void_p), ("xsum", ctypes.c_void_p),
                ("M", ctypes.c_int64), ("n_tiles", ctypes.c_int64), ("tile", ctypes.c_int64),
                ("codes", ctypes.c_void_p), ("row_bytes", ctypes.c_int64),
                ("scales", ctypes.c_void_p), ("n_blocks", ctypes.c_int64),
                ("block", ctypes.c_int64), ("mult_table", ctypes.c_void_p),
                ("maxv", ctypes.c_float), ("wstep", ctypes.c_float), ("bias", ctypes.c_void_p),
                ("y", ctypes.c_void_p), ("N", ctypes.c_int64)]


@functools.lru_cache(maxsize=256)
def act_params(af, k: int) -> dict:
    """The activation format as ActArgs fields, for rows of k elements."""
    el, tile = af.element, af.block_for(k)
    return dict(K=k, tile=tile, n_tiles=-(-k // tile), clamped=int(af.block_size > k),
                scale=0 if af.scale.kind == "pow2" else 1,
                rule=_RULES.get(getattr(af.scale, "rule", ""), 0),
                is_signed=int(bool(getattr(af.scale, "signed", False))), emax=el.emax,
                frac=el.frac_bits, qmax=el.qmax, maxv=float(el.max_value),
                xstep=2.0 ** -el.frac_bits)


def quantize_act(lib, x2: torch.Tensor, af):
    """int8 codes [M, n_tiles * tile], a_x [M, n_tiles] and code sums of contiguous float32
    x2 [M, K], by the C++ quantiser."""
    p = act_params(af, x2.shape[1])
    m = x2.shape[0]
    xq = torch.empty((m, p["n_tiles"] * p["tile"]), dtype=torch.int8)
    ax = torch.empty((m, p["n_tiles"]), dtype=torch.float32)
    xsum = torch.empty((m, p["n_tiles"]), dtype=torch.int32)
    a = ActArgs(x=x2.data_ptr(), M=m, ldx=x2.shape[1], xq=xq.data_ptr(), ax=ax.data_ptr(),
                xsum=xsum.data_ptr(), **p)
    lib.qc_act_quantize(ctypes.byref(a), ctypes.c_int(torch.get_num_threads()))
    return xq, ax, xsum


def linear(plan, q, x2: torch.Tensor, af, bias) -> torch.Tensor:
    """The integer formula for contiguous float32 x2 [M, K]: y [M, N]."""
    xq, ax, xsum = quantize_act(plan.lib, x2, af)
    n = q.scales.shape[0]
    y = torch.empty((x2.shape[0], n), dtype=torch.float32)
    if x2.shape[0] == 0:
        return y
    a = IntArgs(xq=xq.data_ptr(), ax=ax.data_ptr(), xsum=xsum.data_ptr(), M=x2.shape[0],
                n_tiles=ax.shape[1], tile=xq.shape[1] // ax.shape[1], codes=q.codes.data_ptr(),
                row_bytes=q.codes.shape[-1], scales=q.scales.data_ptr(),
                n_blocks=q.scales.shape[-1], block=q.block,
                mult_table=plan.mult_table.data_ptr() if plan.mult_table is not None else None,
                maxv=plan.maxv, wstep=2.0 ** -q.fmt.element.frac_bits,
                bias=bias.data_ptr() if bias is not None else None, y=y.data_ptr(), N=n)
    fn = getattr(plan.lib, f"qc_int_linear_{cpu_int_source.tag(plan.bits, plan.scale)}")
    fn(ctypes.byref(a), ctypes.c_int(torch.get_num_threads()))
    return y
