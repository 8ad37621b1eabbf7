"""The CPU entry points of the ops: linear, experts_linear, dequantize, gather of table rows.

``linear`` calls the operator (operator.cpp, the one linear driver: the GEMV kernel for a few
rows, else decoded panels and torch's GEMM), as compiled graphs do, and ``experts_linear`` its
grouped form (a mixture's experts, one call per grouped matmul); ``dequantize`` and
``gather_rows`` call the decode kernel through ctypes.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from qcompile import formats
from qcompile.formats import reference

from ..select import CPU_LINEAR_DTYPES, NoKernel, choose, cpu_table_problem, require_cpu_weight
from .plans import Plan, act_params, plan
from .structs import ActArgs


def decode_rows(q, p: Plan, n0: int, n1: int) -> torch.Tensor:
    """Rows n0..n1 of the packed weight, decoded: float32 [n1 - n0, n_blocks * block]. The
    kernel splits rows among threads: no more threads than rows (a gathered token's one row
    would open a parallel region for one thread's work, which costs the most on a busy CPU)."""
    out = torch.empty((n1 - n0, q.scales.shape[-1] * q.block), dtype=torch.float32)
    a = p.args(q, None, None, None)
    threads = max(1, min(torch.get_num_threads(), n1 - n0))
    p.decode_fn(ctypes.byref(a), ctypes.c_int64(n0), ctypes.c_int64(n1),
                ctypes.c_void_p(out.data_ptr()), ctypes.c_int(threads))
    return out


def gather_rows(q, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of a packed table [vocab, hidden] (blocks along axis 1), each decoded by the
    kernels: the reference's values, bit for bit (a bfloat16 / float16 table's decoded float32
    values rounded to its dtype once, as the reference's cast rounds them). For a few rows (a
    decoding step); the reference's gather serves many rows as fast and keeps OPQ tables."""
    why = cpu_table_problem(q)
    if why:
        raise NoKernel(why)
    p = plan(q)
    k = q.shape[1]
    rows = ids.reshape(-1).tolist()
    out = torch.empty((len(rows), k), dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i] = decode_rows(q, p, r, r + 1)[0, :k]
    return out.reshape(*ids.shape, k).to(q.dtype)


def dequantize(q) -> torch.Tensor:
    """The weight a 2-d packed QTensor stands for: the reference's values, bit for bit (decoded
    in float32, rounded to a bfloat16 / float16 weight's dtype once, as the reference's cast)."""
    require_cpu_weight(q, CPU_LINEAR_DTYPES)
    p = plan(q)
    n, k = q.scales.shape[0], (q.shape[1] if q.axis == 1 else q.shape[0])
    w = decode_rows(q, p, 0, n)
    if p.outliers is not None:
        r, c, delta = p.outliers
        w[r, c] += delta
    w = w[:, :k]
    return (w if q.axis == 1 else w.t()).to(q.dtype).contiguous()


def linear(x: torch.Tensor, q, act_fmt=None, bias: torch.Tensor | None = None,
           choice=None, known: Plan | None = None) -> torch.Tensor:
    """fq(x) @ W^T + bias for a packed weight (Conv1D [K, N] weights too: their codes are stored
    K-last like nn.Linear's), in x's shape with the last axis N. ``choice``: the selector's
    answer (asked here when not given); ``known``: ``q``'s Plan where the caller keeps it (one
    expert of a stack: the plan cache would hold thousands of them). Kept short: decoding a
    model calls this for every linear layer and token."""
    choice = (choice or choose(q, act_fmt, x, "cpu", bias)).require()
    p = known if known is not None else plan(q)
    fmt_id = p.op_id if p.op_id is not None else p.register()  # (loads the operators)
    if choice.kernel == "cpu_int":
        return _operator("int_linear")(x, q.codes, q.scales, bias, fmt_id,
                                       p.register_act(formats.get(act_fmt)), p.n, p.k, q.block)
    if act_fmt and x.numel():
        x = reference.fake_quantize(x.reshape(-1, p.k), formats.get(act_fmt), 1).reshape(x.shape)
    index, value = p.apart if p.apart is not None else (None, None)
    return _operator("linear")(x, q.codes, q.scales, bias, index, value, fmt_id, p.n, p.k,
                               q.block)


def experts_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, p: Plan,
                   experts: torch.Tensor, offsets: torch.Tensor,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """[S, N]: one grouped matmul of a mixture's experts, one operator call: the rows
    offsets[g]..offsets[g + 1] of x (of ``x[rows]`` where given) times expert experts[g]'s
    matrix of the stack ``codes`` / ``scales`` [E, ...], each as ``linear`` computes it (bit for
    bit); rows in no group are zero. ``p``: the plan of any expert of the stack, whose tables
    serve them all (the format's alone, nothing kept apart: the caller checks)."""
    fmt_id = p.op_id if p.op_id is not None else p.register()  # (loads the operators)
    return _operator("experts_linear")(x, codes, scales, experts, offsets, rows, fmt_id, p.n,
                                       p.k, p.block)


@functools.lru_cache(maxsize=None)
def _operator(name: str):
    """The C++ function behind ``torch.ops.qcompile_cpu.<name>.default``: called without the
    overload's Python frame (a decoding model calls it for every layer and token)."""
    overload = getattr(torch.ops.qcompile_cpu, name).default
    return getattr(overload, "_op", overload)


def quantize_act(lib, x2: torch.Tensor, af):
    """int8 codes [M, n_tiles * tile], a_x [M, n_tiles] and code sums of contiguous float32
    x2 [M, K], by the C++ quantiser of the integer path on its own (``int_linear`` runs it
    inside the operator)."""
    p = act_params(af, x2.shape[1])
    m = x2.shape[0]
    xq = torch.empty((m, p["n_tiles"] * p["tile"]), dtype=torch.int8)
    ax = torch.empty((m, p["n_tiles"]), dtype=torch.float32)
    xsum = torch.empty((m, p["n_tiles"]), dtype=torch.int32)
    a = ActArgs(x=x2.data_ptr(), M=m, ldx=x2.shape[1], xq=xq.data_ptr(), ax=ax.data_ptr(),
                xsum=xsum.data_ptr(), **p)
    lib.qc_act_quantize(ctypes.byref(a), ctypes.c_int(torch.get_num_threads()))
    return xq, ax, xsum
