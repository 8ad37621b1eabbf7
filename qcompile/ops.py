"""The qcompile ops that compiled graphs call, registered with ``torch.library``.

* ``qcompile::dequantize(codes, scales, side, meta, impl)`` -> the weight a packed QTensor
  stands for. ``meta`` is a JSON string (format key, shape, dtype, axis, block, side names): a
  QTensor travels through the graph as its tensors plus this string.
* ``qcompile::fake_quantize_act(x, fmt, axis, impl)`` -> dequantize(quantize(x)) with blocks
  along ``axis``, computed at run time (dynamic activation quantisation).
* ``qcompile::linear(x, codes, scales, side, meta, act_fmt, bias, impl)`` -> the fused form:
  fake-quantise x (if ``act_fmt``), dequantise the weight, then the same matmul the original
  graph did: ``F.linear(x, W, bias)`` for an [N, K] weight (axis 1), ``addmm(bias, x, W)`` for
  a GPT-2 Conv1D [K, N] weight (axis 0; x of more than two dims is flattened to [M, K] first).
* ``qcompile::embedding(ids, codes, scales, side, meta, impl)`` -> ``F.embedding(ids, W)`` for a
  packed table W [vocab, hidden] (blocks along the hidden axis): only the rows gathered are
  decoded (``reference.dequantize_rows``), so the table is never materialised.

Outputs are contiguous tensors (row-major, whatever the input's strides), and each op's fake
(meta) implementation describes exactly that, so Dynamo, AOTAutograd and Inductor can trace it.

Autograd (weights frozen, activations straight through): ``linear`` gives x the gradient
grad_y @ W (W the dequantised weight; with ``act_fmt`` the activation quantiser is a
straight-through estimator) and the bias grad_y summed over the leading dims; the packed
tensors get none. ``fake_quantize_act`` is straight through (identity gradient);
``dequantize`` and ``embedding`` give no gradient.

The bodies dispatch on ``impl``: "reference" runs qcompile's reference implementation (the
definition of each format); "triton" runs the generated Triton kernels of qcompile.codegen
(dequantise, quantise, the fused linear of codegen/triton/linear.py); "cpu" the generated C++ kernels
of codegen/cpu/ (the linear and the dequantise of 2-d weights; int x int layers quantise
their activations in C++, other activation formats are quantised by the reference); "auto" is
"triton" for CUDA tensors and "cpu" otherwise. Which kernel runs is codegen/select.py's answer;
where no kernel exists for a format or input by design (the selector's reason, or a
``NoKernel`` a generator raises: a format codegen does not cover, CPU tensors without Triton's
interpreter, ...) the op warns once (per op, format, dtype and device) and computes the
reference result. A kernel that fails in any other way does the same, unless
QCOMPILE_STRICT=1 (the test suite's setting): then its exception propagates.

Each op notes which implementation ran for each packed weight (``kernels_ran``, read by
``explain``): "cpu", "triton", or "reference (why)". A note is made when the kernel differs
from the one noted last for that weight: a call costs a dict lookup.
"""
from __future__ import annotations

import functools
import itertools
import json
import weakref

import torch
import torch.nn.functional as F

from . import api, config, formats
from .codegen import cpu
from .codegen.triton import linear as fused
from .codegen import select
from .codegen.select import NoKernel
from .formats import reference
from .formats.qtensor import QTensor

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def qtensor_meta(q: QTensor) -> str:
    """The non-tensor part of a QTensor, as the string the ops take."""
    return json.dumps({"fmt": q.fmt.key, "shape": list(q.shape), "dtype": str(q.dtype)[6:],
                       "axis": q.axis, "block": q.block, "side": list(q.side)})


@functools.lru_cache(maxsize=4096)
def _parse_meta(meta: str) -> tuple:
    """Each meta string is parsed once: compiled graphs pass the same strings on every call."""
    m = json.loads(meta)
    return (formats.get(m["fmt"]), torch.Size(m["shape"]), _DTYPES[m["dtype"]], m["axis"],
            m["block"], tuple(m["side"]))


def qtensor_from(codes, scales, side, meta: str) -> QTensor:
    fmt, shape, dtype, axis, block, names = _parse_meta(meta)
    return QTensor(fmt, codes, scales, shape, dtype, axis, block, dict(zip(names, side)))




# -- which implementation ran, per op and packed weight ------------------------------------------

CPU, TRITON = "cpu", "triton"
ASKED = f"reference ({select.ASKED.reason})"
OPS = ("linear", "dequantize", "embedding")
RAN: dict[str, dict[int, dict[str, None]]] = {op: {} for op in OPS}  # {id(codes): {kernels}}
LAST: dict[str, dict[int, str]] = {op: {} for op in OPS}  # {id(codes): the kernel noted last}


def note_kernel(op: str, codes: torch.Tensor, kernel: str):
    """Record that ``op`` ran ``kernel`` on the packed weight whose codes are ``codes``. The ops
    call this through ``ran_kernel``, which skips a kernel already noted last.
    An entry goes when its codes tensor does (ids are reused)."""
    key, last = id(codes), LAST[op]
    if key not in last:
        weakref.finalize(codes, _forget, op, key)
    last[key] = kernel
    RAN[op].setdefault(key, {})[kernel] = None


def ran_kernel(op: str, codes: torch.Tensor, kernel: str):
    """Record, at the cost of one dict lookup per call, that ``op`` ran ``kernel`` on the
    packed weight whose codes are ``codes``."""
    if LAST[op].get(id(codes)) != kernel:
        note_kernel(op, codes, kernel)


def _forget(op: str, key: int):
    LAST[op].pop(key, None)
    RAN[op].pop(key, None)


def kernels_ran(op: str, codes) -> list[str]:
    """The kernels ``op`` ran on the packed weight with these codes, in the order first run."""
    return list(RAN[op].get(id(codes), ()))


def _why(where: str, err: Exception) -> str:
    """The reference's label after a kernel could not run: the error's first clause."""
    first = (str(err).splitlines() or [type(err).__name__])[0].split("; ")[0]
    first = first.removeprefix("qcompile ")
    how = "no" if no_kernel_by_design(err) else "failed"
    return f"reference ({how} {where} kernel: {first[:70]})"


def no_kernel_by_design(err: BaseException) -> bool:
    """Whether ``err`` says that no generated kernel exists or can run for this format / input /
    device (a NoKernel, the selector's and the generators' answer, raised before any kernel is
    launched). Anything else (an error inside a kernel, in Triton or in torch, any other
    NotImplementedError) is a failure."""
    return isinstance(err, NoKernel)


def _fallback(op: str, key: str, err: Exception, kind: str, dtype: torch.dtype,
              device: torch.device):
    """In strict mode re-raise a kernel failure; else warn once per (op, format, kernel kind,
    the op's float dtype and device) that the reference runs instead of a generated (``kind``:
    Triton or CPU) kernel: an fp16 call after a bf16 one is said again. Call it inside the
    ``except`` block."""
    first = str(err).splitlines()[0] if str(err) else ""
    where = f"qcompile::{op} ({str(dtype).replace('torch.', '')} on {device.type})"
    if no_kernel_by_design(err):
        message = (f"{where}: no generated {kind} kernel for {key} "
                   f"(NotImplementedError: {first}); using the reference implementation")
    elif config.strict():
        raise err
    else:
        message = (f"{where}: the generated {kind} kernel for {key} failed "
                   f"({type(err).__name__}: {first}); using the reference implementation "
                   "instead (QCOMPILE_STRICT=1 makes this an error)")
    config.warn(message, once=("qcompile.ops", op, key, kind, dtype, str(device)))


_KIND = {"triton": "Triton", "cpu": "CPU", "cpu_int": "CPU"}
_NOTED = {"triton": TRITON, "cpu": CPU, "cpu_int": CPU}


def _run(op: str, codes, choice: select.Choice, kernel, reference, args: tuple, label: tuple):
    """The chosen kernel's result, ``kernel(*args, choice)`` (it raises NoKernel where the choice
    is the reference for want of a kernel), or the reference's, ``reference(*args)``: said once
    where a kernel was asked for (``_fallback``; a kernel failure raises in strict mode), and
    noted for explain per packed weight (``codes``; None: not noted). ``label``: (Format,
    activation format or "", the op's float dtype, a tensor on the op's device), for the
    warning (read only when there is one: a decoding model calls this for every layer)."""
    if choice.kernel == "reference" and not choice.tried:  # by plan: nothing to say
        ran = f"reference ({choice.reason})"
    else:
        try:
            out = kernel(*args, choice)
            if codes is not None:
                ran_kernel(op, codes, _NOTED[choice.kernel])
            return out
        except Exception as err:  # no kernel here (or, unless strict, one failed)
            kind = choice.tried or _KIND[choice.kernel]
            fmt, act_fmt, dtype, on = label
            key = fmt.key + (f" x {act_fmt}" if act_fmt else "")
            _fallback(op, key, err, kind, dtype, on.device)
            ran = _why(kind, err)
    if codes is not None:
        ran_kernel(op, codes, ran)
    return reference(*args)


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    """The fixed output layout of every op (what the fakes say): contiguous, row-major."""
    return t.contiguous()


# -- qcompile::dequantize ---------------------------------------------------------------------

_LIB = torch.library.Library("qcompile", "DEF")


def _define(schema: str):
    """Define ``qcompile::<schema>`` with the decorated function as its implementation on every
    device. torch.library.Library rather than @torch.library.custom_op: a call costs about 10
    microseconds less, which a decoding model pays for every layer and every token."""
    def register(fn):
        _LIB.define(schema)
        _LIB.impl(schema.split("(")[0], fn, "CompositeExplicitAutograd")
        return fn
    return register


@_define("dequantize(Tensor codes, Tensor scales, Tensor[] side, str meta, "
         "str impl='reference') -> Tensor")
def dequantize(codes: torch.Tensor, scales: torch.Tensor, side: list[torch.Tensor], meta: str,
               impl: str = "reference") -> torch.Tensor:
    q = qtensor_from(codes, scales, side, meta)
    choice = select.choose_dequantize(q, impl)
    return _run("dequantize", codes, choice, _dequantize_kernel, _dequantize_reference, (q,),
                (q.fmt, "", q.dtype, codes))


def dequantize_noted(q: QTensor, impl: str, noted: torch.Tensor) -> torch.Tensor:
    """``qcompile::dequantize``'s body for a QTensor that is one piece of a larger packed
    tensor (one expert of a mixture's stack), its kernel noted for explain against ``noted``,
    the codes of the whole (eager only: not an op)."""
    choice = select.choose_dequantize(q, impl)
    return _run("dequantize", noted, choice, _dequantize_kernel, _dequantize_reference, (q,),
                (q.fmt, "", q.dtype, q.codes))


def _dequantize_kernel(q: QTensor, choice: select.Choice) -> torch.Tensor:
    if choice.require().kernel == "cpu":
        return cpu.dequantize(q)
    return _contiguous(api.dequantize(q, impl="triton"))


def _dequantize_reference(q: QTensor) -> torch.Tensor:
    return _contiguous(api.dequantize(q))


@torch.library.register_fake("qcompile::dequantize")
def _(codes, scales, side, meta, impl="reference"):
    m = json.loads(meta)
    return codes.new_empty(m["shape"], dtype=_DTYPES[m["dtype"]])


def _dequantize_setup(ctx, inputs, output):
    ctx.n_side = len(inputs[2])


def _grads(ctx, *grads):
    """The backward's result, one entry per argument the op was called with (the dispatcher
    drops trailing arguments equal to their defaults before autograd sees them)."""
    return grads[:len(ctx.needs_input_grad)]


def _dequantize_backward(ctx, grad):
    # packed weights are frozen: no gradient for codes, scales or side data
    return _grads(ctx, None, None, [None] * ctx.n_side, None, None)


torch.library.register_autograd("qcompile::dequantize", _dequantize_backward,
                                setup_context=_dequantize_setup)


# -- qcompile::fake_quantize_act ----------------------------------------------------------------

@_define("fake_quantize_act(Tensor x, str fmt, int axis=-1, str impl='reference') -> Tensor")
def fake_quantize_act(x: torch.Tensor, fmt: str, axis: int = -1,
                      impl: str = "reference") -> torch.Tensor:
    if x.numel() == 0:
        return x.clone(memory_format=torch.contiguous_format)
    choice = select.choose_fake_quantize(formats.get(fmt), x, impl)
    return _run("fake_quantize_act", None, choice, _fake_quantize_kernel,
                _fake_quantize_reference, (x, fmt, axis), (formats.get(fmt), "", x.dtype, x))


def _fake_quantize_kernel(x, fmt: str, axis: int, choice: select.Choice) -> torch.Tensor:
    choice.require()
    return _contiguous(api.fake_quantize_values(x, fmt, axis=axis, impl="triton"))


def _fake_quantize_reference(x, fmt: str, axis: int) -> torch.Tensor:
    return _contiguous(api.fake_quantize_values(x, fmt, axis=axis))


@torch.library.register_fake("qcompile::fake_quantize_act")
def _(x, fmt, axis=-1, impl="reference"):
    return x.new_empty(x.shape)


def _straight_through(ctx, grad):
    return _grads(ctx, grad, None, None, None)


torch.library.register_autograd("qcompile::fake_quantize_act", _straight_through)


# -- qcompile::linear ---------------------------------------------------------------------------

def _matmul(x, w, bias, weight_axis: int):
    if weight_axis == 0:  # [K, N]: GPT-2 Conv1D, the original op was addmm(bias, x, W)
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y = torch.mm(x2, w) if bias is None else torch.addmm(bias, x2, w)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], w.shape[1])
    return F.linear(x, w, bias)


@_define("linear(Tensor x, Tensor codes, Tensor scales, Tensor[] side, str meta, str act_fmt, "
         "Tensor? bias, str impl='reference') -> Tensor")
def linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, side: list[torch.Tensor],
           meta: str, act_fmt: str, bias: torch.Tensor | None,
           impl: str = "reference") -> torch.Tensor:
    q = qtensor_from(codes, scales, side, meta)
    choice = select.choose(q, act_fmt, x, impl, bias)
    # the entry point raises NoKernel itself where the choice is the reference
    triton = choice.kernel == "triton" or choice.tried == "Triton"
    return _run("linear", codes, choice, _fused_kernel if triton else cpu.linear,
                _reference_linear, (x, q, act_fmt or None, bias), (q.fmt, act_fmt, x.dtype, x))


def _fused_kernel(x, q, act_fmt, bias, choice):
    return _contiguous(fused.linear(x, q, act_fmt, bias, choice))


def _reference_linear(x, q, act_fmt, bias):
    w = api.dequantize(q)
    if act_fmt and x.numel():
        x = api.fake_quantize_values(x, act_fmt, axis=-1)
    return _contiguous(_matmul(x, w, bias, q.axis))


# -- qcompile::triton_linear: the Triton linear as a triton_op, for export ---------------------

@functools.lru_cache(maxsize=None)
def triton_linear_op():
    """``torch.ops.qcompile.triton_linear.default``, registered on first use: registering a
    triton_op imports Triton, which importing qcompile must not do (TRITON_INTERPRET is read
    when the first kernel is decorated, and may be set after qcompile is imported)."""
    op = torch.library.triton_op("qcompile::triton_linear", _triton_linear, mutates_args=())
    op.register_fake(_triton_linear_fake)
    return torch.ops.qcompile.triton_linear.default


def _triton_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                   side: list[torch.Tensor], meta: str, act_fmt: str,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """``qcompile::triton_linear``: ``qcompile::linear``'s Triton kernels (the fused linear, and the integer path's
    prologue) as a ``torch.library.triton_op``: ``torch.export`` followed by
    ``run_decompositions(decompose_custom_triton_ops=True)``, and AOTInductor, see each launch
    as a ``triton_kernel_wrapper_functional`` node rather than an opaque op. Same kernels and
    results as ``qcompile::linear`` with ``impl="triton"``, but no reference fallback: a layer
    with no Triton kernel raises NoKernel (export's pass (passes/triton_kernels.py) lowers
    only the layers that have one). ``qcompile::linear`` calls the same code directly, without
    this op's dispatch."""
    q = qtensor_from(codes, scales, side, meta)
    return _contiguous(fused.traced_linear(x, q, act_fmt or None, bias))


def _triton_linear_fake(x, codes, scales, side, meta, act_fmt, bias):
    return _linear_output(x, meta, "triton_linear")


def _weight_dims(meta: str) -> tuple[int, int, int]:
    """(axis, K, N) of the packed weight: [N, K] for axis 1, [K, N] for axis 0."""
    m = json.loads(meta)
    shape, axis = m["shape"], m["axis"]
    if len(shape) != 2 or axis not in (0, 1):
        raise ValueError(f"qcompile::linear: the weight must be 2-d with blocks along axis 0 or "
                         f"1, got shape {shape} and axis {axis}")
    return (axis, shape[1], shape[0]) if axis == 1 else (axis, shape[0], shape[1])


def _linear_output(x, meta: str, op: str = "linear"):
    """The fake (meta) result of the linear ops: x's leading dims and N, x's dtype."""
    _, k, n = _weight_dims(meta)
    torch._check(x.dim() >= 1 and x.shape[-1] == k,
                 lambda: f"qcompile::{op}: x has shape {tuple(x.shape)}, the weight K={k}")
    return x.new_empty((*x.shape[:-1], n))


@torch.library.register_fake("qcompile::linear")
def _(x, codes, scales, side, meta, act_fmt, bias, impl="reference"):
    return _linear_output(x, meta)


def _linear_setup(ctx, inputs, output):
    x, codes, scales, side, meta, act_fmt, bias, impl = inputs
    ctx.save_for_backward(codes, scales, *side)
    ctx.meta, ctx.impl, ctx.n_side = meta, impl, len(side)


def _linear_backward(ctx, grad):
    """dy/dx = W (the dequantised weight; the activation quantiser, if any, is straight
    through), dy/dbias = 1 summed over the leading dims; the packed weight is frozen."""
    codes, scales, *side = ctx.saved_tensors
    axis, _, n = _weight_dims(ctx.meta)
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = torch.ops.qcompile.dequantize(codes, scales, side, ctx.meta, ctx.impl)
        w = w.to(grad.dtype)
        grad_x = grad @ w if axis == 1 else grad @ w.t()
    if ctx.needs_input_grad[6]:
        grad_bias = grad.reshape(-1, n).sum(0)
    return _grads(ctx, grad_x, None, None, [None] * ctx.n_side, None, None, grad_bias, None)


torch.library.register_autograd("qcompile::linear", _linear_backward,
                                setup_context=_linear_setup)


# -- qcompile::embedding ------------------------------------------------------------------------

@_define("embedding(Tensor ids, Tensor codes, Tensor scales, Tensor[] side, str meta, "
         "str impl='reference') -> Tensor")
def embedding(ids: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
              side: list[torch.Tensor], meta: str, impl: str = "reference") -> torch.Tensor:
    q = qtensor_from(codes, scales, side, meta)
    vocab = q.shape[0]
    low, high = (int(v) for v in torch.aminmax(ids)) if ids.numel() else (0, 0)
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise IndexError(f"qcompile::embedding: token id {bad} is out of range for a table of "
                         f"{vocab} rows")
    return _run("embedding", codes, select.choose_embedding(q, ids, impl), _gather_kernel,
                _gather_reference, (q, ids), (q.fmt, "", q.dtype, ids))


def _gather_kernel(q: QTensor, ids: torch.Tensor, choice: select.Choice) -> torch.Tensor:
    choice.require()
    return cpu.gather_rows(q, ids)


def _gather_reference(q: QTensor, ids: torch.Tensor) -> torch.Tensor:
    return _contiguous(reference.dequantize_rows(q, ids))


@torch.library.register_fake("qcompile::embedding")
def _(ids, codes, scales, side, meta, impl="reference"):
    m = json.loads(meta)
    return codes.new_empty((*ids.shape, m["shape"][1]), dtype=_DTYPES[m["dtype"]])


def _embedding_setup(ctx, inputs, output):
    ctx.n_side = len(inputs[3])


def _embedding_backward(ctx, grad):
    # token ids have no gradient and the packed table is frozen
    return _grads(ctx, None, None, None, [None] * ctx.n_side, None, None)


torch.library.register_autograd("qcompile::embedding", _embedding_backward,
                                setup_context=_embedding_setup)


# -- the experts of a mixture: one packed linear per expert of a stack ----------------------------

def expert_linear(x: torch.Tensor, packed, e: int,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W_e (+ bias), W_e expert ``e``'s matrix of ``packed`` (a PackedExperts,
    qcompile.expert_stack) reduced along its packed reduction axis: ``qcompile::linear``'s body
    (weight-only) on the expert's QTensor, with the kernel the selector chooses for the stack's
    impl (the CPU kernels with the plan the stack keeps, Triton on CUDA, else the reference:
    dequantise, then the matmul), noted for explain against the stack's codes (eager only: not
    an op). Counts the expert's packed bytes as read."""
    q = packed.expert_qtensor(e)
    packed.note_read(e)
    choice = select.choose(q, None, x, packed.impl, bias)
    triton = choice.kernel == "triton" or choice.tried == "Triton"

    def on_cpu(x, q, act_fmt, bias, choice):
        choice.require()
        return cpu.linear(x, q, act_fmt, bias, choice, packed.expert_plan(e))

    return _run("linear", packed.codes, choice, _fused_kernel if triton else on_cpu,
                _expert_reference, (x, q, None, bias), (q.fmt, "", x.dtype, x))


def _expert_reference(x, q, act_fmt, bias):
    """The reference of one expert: its decoded matrix (contiguous, as ``decode`` gives it), then
    the matmul its layout means (``F.linear`` for [N, K], ``x @ W`` for [K, N])."""
    return _contiguous(_matmul(x, _dequantize_reference(q), bias, q.axis))


def experts_linear(x: torch.Tensor, packed, groups) -> torch.Tensor:
    """[S, N]: for each (expert e, rows) of ``groups`` (rows: a slice or an index tensor into
    x's rows, each row in one group at most), ``y[rows] = expert_linear(x[rows], packed, e)``;
    rows in no group are zero. Only the experts named are read. On the CPU kernels, one call of
    the operator ``qcompile_cpu::experts_linear`` for all the groups (bit for bit the per-expert
    results), where one plan serves every expert (``PackedExperts.grouped_plan``); else one
    ``expert_linear`` per group."""
    if groups and x.dim() == 2:
        choice = select.choose(packed.expert_qtensor(groups[0][0]), None, x, packed.impl)
        plan = packed.grouped_plan() if choice.kernel == "cpu" else None
        if plan is not None:
            for e, _ in groups:
                packed.note_read(e)
            return _run("linear", packed.codes, choice, _grouped_kernel, _grouped_reference,
                        (x, packed, groups, plan), (packed.fmt, "", x.dtype, x))
    out = x.new_zeros((x.shape[0], packed.out_features))
    for e, rows in groups:
        out[rows] = expert_linear(x[rows], packed, e)
    return out


def _grouped_kernel(x, packed, groups, plan, choice) -> torch.Tensor:
    """One operator call for every group: x's rows in group order (slices that follow one
    another are x's own rows; else the rows' indices, concatenated) with each group's offsets."""
    choice.require()
    experts = torch.tensor([e for e, _ in groups], dtype=torch.int64)
    spans = [r for _, r in groups]
    if all(isinstance(r, slice) and r.step in (None, 1) for r in spans) and \
            all(a.stop == b.start for a, b in zip(spans, spans[1:])):
        offsets, rows = [spans[0].start or 0] + [r.stop for r in spans], None
    else:
        parts = [torch.arange(x.shape[0])[r] if isinstance(r, slice) else r.reshape(-1)
                 for r in spans]
        rows = torch.cat(parts).to(torch.int64)
        offsets = [0, *itertools.accumulate(p.numel() for p in parts)]
    return cpu.experts_linear(x, packed.codes, packed.scales, plan, experts,
                              torch.tensor(offsets, dtype=torch.int64), rows)


def _grouped_reference(x, packed, groups, plan) -> torch.Tensor:
    """The reference of a grouped matmul: each group's expert decoded, then its matmul."""
    out = x.new_zeros((x.shape[0], packed.out_features))
    for e, rows in groups:
        q = packed.expert_qtensor(e)
        out[rows] = _expert_reference(x[rows], q, None, None)
    return out
