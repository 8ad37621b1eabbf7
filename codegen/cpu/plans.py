"""What a packed weight needs from the CPU kernels: its Plan (entry points and tables, computed
by the reference), and the registration of its format with the operator library.

The element enters as a table of the float32 values of all its codes, or, where that table is
exactly int8(code) * step, as that step; the block multiplier as a table of all 256 byte scale
codes' multipliers, or, for float32 scales, the reference's division ``s / max_value``
(codegen/constants.py derives each from the reference).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import os
import weakref

import torch

from qcompile.formats import reference
from qcompile.formats.elements import IntElement, integer_grid

from .. import constants
from ..select import CPU_INT_SCALES, CPU_LINEAR_DTYPES, require_cpu_weight, tables_from_side_data
from .build import library, op_library
from .isa import chosen_isa
from .structs import Args

_RULES = {"floor": 0, "ceil": 1, "rceil": 2, "even": 3}  # ActArgs.rule
_PRIVATE_IDS = itertools.count(1)  # operator ids of tables from side data: -1, -2, ...


def tag(bits: int, scale: int, dec: int) -> str:
    """The suffix of a weight-only entry point in kernels.cpp."""
    return f"b{bits}_s{scale}_d{dec}"


def int_tag(bits: int, scale: int, table: bool = False) -> str:
    """The suffix of an integer-path entry point in int_kernels.cpp (``table``: codes read as
    the integers 2^s v of a table, not as two's complement)."""
    return f"b{bits}_s{scale}" + ("_t" if table else "")


class Plan:
    """How one packed weight is read: the kernel's entry points and the tables it uses."""

    def __init__(self, q):
        fmt, el = q.fmt, q.fmt.element
        require_cpu_weight(q, CPU_LINEAR_DTYPES)  # the tables: the same for every dtype
        self.bits, self.block = el.bits, q.block
        values = constants.element_values(el, q.side)
        self.table = torch.zeros(max(16, values.numel()), dtype=torch.float32)
        self.table[:values.numel()] = values
        step = constants.exact_int_step(values)
        self.dec, self.step = (2, step) if step is not None else (1 if el.bits > 4 else 0, 0.0)
        self.mult_table = constants.multiplier_table(fmt, q.side)
        # byte scale codes: a table of multipliers; float32 ones: the reference's s / max_value
        self.scale, self.maxv = (0, 1.0) if self.mult_table is not None else \
            (1, float(el.max_value))
        isa = chosen_isa()
        lib = self.lib = library(isa)
        self.fmt, self.isa = fmt, isa
        suffix = tag(self.bits, self.scale, self.dec)
        self.linear_fn = getattr(lib, f"qc_linear_{suffix}")
        self.decode_fn = getattr(lib, f"qc_decode_{suffix}")
        self.values_fn = getattr(lib, f"qc_values_{suffix}")
        # elements whose values are integers times 2^-s (the selector's rule for the integer
        # path): their integer kernel; other than int elements' it reads codes through a table
        grid = integer_grid(el) if fmt.scale.kind in CPU_INT_SCALES else None
        self.int_fn, self.wstep = (getattr(lib, "qc_int_linear_" + int_tag(
            self.bits, self.scale, not isinstance(el, IntElement))), 2.0 ** -grid[0]) \
            if grid is not None else (None, 1.0)
        self.data_dependent = tables_from_side_data(fmt)
        self.apart = reference.kept_apart(q)  # (flat positions, values) added after the kernel
        self.outliers = _outliers(q, self.apart)
        self.codes, self.scales = weakref.ref(q.codes), weakref.ref(q.scales)
        self.k = q.shape[1] if q.axis == 1 else q.shape[0]
        self.n = q.scales.shape[0]
        self.padded = q.scales.shape[-1] * q.block
        self.op_id = None  # the operator's id of the format, once registered

    def args(self, q, x, y, bias) -> Args:
        n, n_blocks = q.scales.shape[0], q.scales.shape[-1]
        return Args(x=x.data_ptr() if x is not None else None, M=0, ldx=0,
                    codes=q.codes.data_ptr(), row_bytes=q.codes.shape[-1],
                    scales=q.scales.data_ptr(), n_blocks=n_blocks, block=q.block,
                    table=self.table.data_ptr(),
                    mult_table=self.mult_table.data_ptr() if self.mult_table is not None else None,
                    maxv=self.maxv, step=self.step,
                    bias=bias.data_ptr() if bias is not None else None,
                    y=y.data_ptr() if y is not None else None, N=n)

    def register(self) -> int:
        """Hand this format's kernels and tables to the operator library (it copies the
        tables), once; returns the format's id for ``qcompile_cpu::linear`` / ``int_linear``:
        the same in every process where the tables depend on the format alone (graphs cached
        on disk name it), else an id of this plan's own, dropped with the plan."""
        if self.op_id is not None:
            return self.op_id
        op = op_library()
        if self.data_dependent:
            op_id = -next(_PRIVATE_IDS)
            weakref.finalize(self, op.qc_unregister, op_id).atexit = False
        else:
            op_id = _stable_id(f"{self.fmt.key}|{self.isa}")
        op.qc_register(
            op_id, _address(self.linear_fn), _address(self.decode_fn), _address(self.values_fn),
            self.table.data_ptr(), self.table.numel(),
            self.mult_table.data_ptr() if self.mult_table is not None else None, self.maxv,
            self.step, _address(self.int_fn) if self.int_fn is not None else None, self.wstep)
        self.op_id = op_id
        return op_id

    def register_act(self, af) -> int:
        """The id of activation format ``af`` of the integer path for ``qcompile_cpu::int_linear``
        (the same in every process), registered with the operator library once."""
        return _act_id(af, self.isa, self.lib)


@functools.lru_cache(maxsize=256)
def _act_id(af, isa: str, lib) -> int:
    act_id = _stable_id(f"act|{af.key}|{isa}")
    p = act_params(af, af.block_size)  # the format's fields (K set per call)
    op_library().qc_register_act(
        act_id, _address(lib.qc_act_quantize), af.block_size, p["scale"], p["rule"],
        p["is_signed"], p["emax"], p["frac"], p["qmax"], p["maxv"], p["xstep"])
    return act_id


@functools.lru_cache(maxsize=256)
def act_params(af, k: int) -> dict:
    """The activation format as ActArgs fields, for rows of k elements."""
    el, tile = af.element, af.block_for(k)
    # a byte scale code here is E8M0 (the selector gives the integer path no other byte scale)
    return dict(K=k, tile=tile, n_tiles=-(-k // tile), clamped=int(af.block_size > k),
                scale=0 if af.scale.stored_dtype == torch.uint8 else 1,
                rule=_RULES.get(getattr(af.scale, "rule", ""), 0),
                is_signed=int(bool(getattr(af.scale, "signed", False))), emax=el.emax,
                frac=el.frac_bits, qmax=el.qmax, maxv=float(el.max_value),
                xstep=2.0 ** -el.frac_bits)


def _stable_id(text: str) -> int:
    """A non-negative int64 from ``text``, the same in every process."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 2


def _address(fn) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


def _outliers(q, apart):
    """(row n, column k, value - decoded value) of each weight kept apart from the blocks (OPQ
    outliers, proxy columns) in the padded layout, or None."""
    if apart is None:
        return None
    r, c, decoded = reference.decoded_at(q, apart[0])
    return r, c, apart[1].to(torch.float32) - decoded.to(torch.float32)


_PLANS: dict[tuple, Plan] = {}


def plan(q) -> Plan:
    """The Plan of a packed weight, kept while its codes tensor lives (compiled graphs call the
    same weights over and over)."""
    # the format by identity (formats.get gives one object per key) and the forced instruction
    # set as written (read, not parsed, per call: a Plan is made, and the setting checked, once
    # per value)
    key = (q.codes.data_ptr(), q.scales.data_ptr(), id(q.fmt), q.shape, q.dtype,
           os.environ.get("QCOMPILE_CPU_ISA", ""))
    hit = _PLANS.get(key)
    # the same tensors and format, not others that reuse their memory
    if hit is None or hit.codes() is not q.codes or hit.scales() is not q.scales or \
            hit.fmt is not q.fmt or not (q.codes.is_contiguous() and q.scales.is_contiguous()):
        _check(q)
        if len(_PLANS) > 4096:
            _PLANS.clear()
        hit = _PLANS[key] = Plan(q)
    return hit


def _check(q):
    if q.codes.device.type != "cpu" or len(q.shape) != 2 or q.axis not in (0, 1):
        require_cpu_weight(q, CPU_LINEAR_DTYPES)
    if not (q.codes.is_contiguous() and q.scales.is_contiguous()):
        raise ValueError("qcompile CPU kernels read codes and scales in memory order: they must "
                         "be contiguous (qcompile.quantize makes them so)")
