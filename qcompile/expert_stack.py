"""A mixture-of-experts tensor held packed, for ``quantize_model_``: ``PackedExperts`` holds all
E experts of one 3-D parameter [E, a, b] as one packed tensor (codes and scales with a leading
E axis, no float copy), and ``ExpertsView`` is what the experts module's own forward reads in
the parameter's place.

Why a view that the forward reads, not a qcompile experts implementation registered in
transformers' experts interface: the forward differs per architecture and per
``config._experts_implementation`` (an eager loop reading ``W[e]``, ``batched_mm`` reading
``W[ids]``, ``grouped_mm`` passing all of W with group offsets, Llama 4 calling ``bmm`` on all
of W), and a module that keeps its own forward stays right for each of them, and for
implementations added later. The view speaks the tensor protocol (``__torch_function__``,
``shape``, ``dtype``, ``device``, indexing), and the matmuls of each implementation run on the
packed codes of the active experts only (``ops.expert_linear``: the kernel the selector chooses
for the stack's impl, the CPU kernels with a plan the stack keeps per expert, Triton on CUDA, or
the reference), with no float copy of an expert:

* the eager loop: ``view[e]`` is an ``Expert``; ``F.linear(x, m, b)``, ``x @ m``,
  ``torch.matmul`` / ``torch.mm`` with it run the packed linear of expert e;
* ``grouped_mm`` (``torch._grouped_mm``, ``F.grouped_mm``, transformers' fallback op) with the
  view: ``ops.experts_linear`` over the groups that have rows (on the CPU kernels one call of
  the C++ operator ``qcompile_cpu::experts_linear`` for them all; ``batched_mm`` too);
* ``batched_mm``: ``view[ids]`` is ``ExpertRows``; ``bmm`` with it groups the rows by expert
  (under kernels='reference' it decodes the experts named and runs the model's ``bmm``, whose
  sums are ordered unlike a GEMM's: the emulation's bits);

where the matmul reduces the packed reduction axis. Any other use decodes: the experts selected
(an index, a matmul along the other axis) or every expert (Llama 4's ``bmm``, which uses every
expert anyway). ``bytes_read`` counts the packed bytes of each expert every time a kernel or a
decode reads it (``reset_bytes_read()``).

The holder is registered as a submodule under the parameter's name, so its buffers are the
model's (``.to()``, ``state_dict``, ``resident_weight_bytes``) and its module name is the
expert tensor's rule name; the view lives in the experts module's ``__dict__`` under the same
name, which Python finds before ``nn.Module.__getattr__`` would find the submodule.

Each expert is quantised on its own (``api.quantize_weight`` of the 2-D matrix along its
reduction axis), so the decoded expert equals ``qcompile.fake_quantize`` of that matrix bit for
bit for every format, formats with whole-tensor side data included (NVFP4's tensor scale is one
per expert). Side data of equal shape for every expert is stacked [E, ...]; side data of
varying length (OPQ outliers) is concatenated with offsets per expert.
"""
from __future__ import annotations

import torch

from . import api, ops
from .codegen import cpu, select
from .formats.qtensor import QTensor

_GROUPED = ("grouped_mm",)  # torch._grouped_mm, F.grouped_mm, transformers' fallback op
_OUT_OF_GRAPHS: list[bool] = []


def _keep_decode_out_of_graphs():
    """Compiled graphs call the entry points that read packed experts (``PackedExperts.decode``
    and the matmuls of the views) as they are (a graph break), not traced inside. Made so at the
    first stack, not at import: ``torch.compiler.disable`` imports Dynamo, which imports triton,
    and importing qcompile must not (that would fix triton's mode before TRITON_INTERPRET may be
    set)."""
    if not _OUT_OF_GRAPHS:
        PackedExperts.decode = torch.compiler.disable(PackedExperts.decode)
        for cls in (ExpertsView, Expert, ExpertRows):
            cls.__torch_function__ = classmethod(
                torch.compiler.disable(cls.__torch_function__.__func__))
        _OUT_OF_GRAPHS.append(True)


class _Expert:
    """What a kernel needs of one expert, made at its first use: its QTensor (views of the
    stack's tensors: the same objects every call, so the CPU plan keyed on them is stable), its
    CPU plan once asked for, and its packed bytes."""
    __slots__ = ("q", "plan", "nbytes")

    def __init__(self, q: QTensor):
        self.q, self.plan, self.nbytes = q, None, q.nbytes


class PackedExperts(torch.nn.Module):
    """All E experts of one expert tensor [E, a, b], packed; each expert's matmul runs on its
    codes (``ops.expert_linear``), other uses decode it on demand."""

    quantised_experts = True  # explain and the passes recognise packed experts by this mark

    def __init__(self, stack: list[QTensor], axis: int, impl: str = "auto"):
        super().__init__()
        _keep_decode_out_of_graphs()
        first = stack[0]
        self.fmt, self.fmt_key, self.block = first.fmt, first.fmt.key, first.block
        self.matrix_shape, self.dtype = tuple(first.shape), first.dtype
        self.num_experts, self.axis, self.impl = len(stack), axis, impl
        self.register_buffer("codes", torch.stack([q.codes for q in stack]))
        self.register_buffer("scales", torch.stack([q.scales for q in stack]))
        self.side_names, self.ragged = list(first.side), []
        for k in self.side_names:
            parts = [q.side[k] for q in stack]
            if all(p.shape == parts[0].shape for p in parts):
                self.register_buffer(f"side_{k}", torch.stack(parts))
            else:  # a different length per expert: concatenated, with each expert's offset
                self.ragged.append(k)
                lengths = torch.tensor([0] + [p.shape[0] for p in parts])
                self.register_buffer(f"side_{k}", torch.cat(parts))
                self.register_buffer(f"offsets_{k}", lengths.cumsum(0))
        self.rule = ""  # the policy rule that gave this tensor its format (quantize_model_)
        self.act_note = ""  # set when the policy's activation format is not applied
        self.bytes_read = 0  # packed bytes of the experts read by kernels and decodes
        self._experts: list | None = None  # per expert: its _Expert once used

    def reset_bytes_read(self):
        self.bytes_read = 0

    def _apply(self, fn, *args, **kwargs):
        self._experts = None  # buffers replaced (.to(), .cuda()): the views would keep the old
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):  # a copy or a pickle makes its own views of its own buffers
        state = super().__getstate__()
        state["_experts"] = None
        return state

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.num_experts, *self.matrix_shape))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    @property
    def bits_per_element(self) -> float:
        return 8 * self.nbytes / self.shape.numel()

    @property
    def out_features(self) -> int:
        """N of each expert's matmul (the axis it does not reduce)."""
        return self.matrix_shape[2 - self.axis]

    def expert(self, e: int) -> _Expert:
        """Expert ``e``'s kernel inputs, kept while the stack's buffers are the same tensors."""
        cache = self._experts
        if cache is None or cache[0] is not self.codes:
            cache = self._experts = [self.codes] + [None] * self.num_experts
        hit = cache[e + 1]
        if hit is None:
            hit = cache[e + 1] = _Expert(self._make_qtensor(e))
        return hit

    def expert_qtensor(self, e: int) -> QTensor:
        """Expert ``e``'s matrix as the QTensor quantize_weight made of it."""
        return self.expert(e).q

    def expert_plan(self, e: int):
        """Expert ``e``'s CPU plan (codegen/cpu/plans.py), kept here: a model's experts would
        overflow the shared plan cache."""
        hit = self.expert(e)
        if hit.plan is None:
            hit.plan = cpu.plan(hit.q)
        return hit.plan

    def grouped_plan(self):
        """A CPU plan that serves every expert of the stack in one grouped operator call
        (``ops.experts_linear``): expert 0's, where the tables are the format's alone and no
        expert keeps weights apart from its blocks (OPQ outliers, proxy columns: side data every
        expert has, of its own); else None (each expert runs with its own plan)."""
        plan = self.expert_plan(0)
        return plan if not plan.data_dependent and plan.apart is None else None

    def note_read(self, e: int):
        """Count expert ``e``'s packed bytes as read (by a kernel or a decode). Written to the
        instance dict directly: ``nn.Module.__setattr__`` (which looks the name up among the
        parameters, buffers and submodules) would cost more than the count, per expert and call."""
        self.__dict__["bytes_read"] += self.expert(e).nbytes

    def _make_qtensor(self, e: int) -> QTensor:
        side = {}
        for k in self.side_names:
            t = getattr(self, f"side_{k}")
            if k in self.ragged:
                off = getattr(self, f"offsets_{k}")
                side[k] = t[int(off[e]):int(off[e + 1])]
            else:
                side[k] = t[e]
        return QTensor(self.fmt, self.codes[e], self.scales[e], torch.Size(self.matrix_shape),
                       self.dtype, self.axis - 1, self.block, side)

    def __setstate__(self, state):  # unpickled in a fresh process: no __init__ ran there
        super().__setstate__(state)
        _keep_decode_out_of_graphs()

    def decode(self, e: int) -> torch.Tensor:
        """Expert ``e``'s matrix, dequantised (its kernel noted for explain against the stack's
        codes)."""
        self.note_read(e)
        return ops.dequantize_noted(self.expert_qtensor(e), self.impl, self.codes)

    def by_reference(self, x: torch.Tensor) -> bool:
        """Whether this stack's matmuls on ``x`` run the reference (kernels='reference'): then
        ``batched_mm``'s rows decode the experts named and run the model's own ``bmm``, bit for
        bit the emulation's (``bmm`` sums in another order than a GEMM per expert)."""
        return select.resolve(self.impl, x) == "reference"

    def reduces(self, transposed: bool, matrix_axis: int) -> bool:
        """Whether a matmul that reduces axis ``matrix_axis`` of an expert's matrix, as a view
        (``transposed``: its two axes swapped) shows it, reduces the packed reduction axis."""
        return (matrix_axis ^ int(transposed)) == self.axis - 1

    def decode_experts(self, used) -> torch.Tensor:
        """The whole stack [E, a, b] with the experts in ``used`` decoded and zeros elsewhere
        (``used``: every expert when None)."""
        used = range(self.num_experts) if used is None else used
        out = torch.zeros(self.shape, dtype=self.dtype, device=self.codes.device)
        for e in used:
            out[e] = self.decode(int(e))
        return out

    def view(self) -> "ExpertsView":
        return ExpertsView(self)

    def extra_repr(self):
        return (f"{self.num_experts} x {'x'.join(map(str, self.matrix_shape))}, "
                f"weight={self.fmt_key}, reduced along axis {self.axis}")


def pack_experts(w: torch.Tensor, fmt, axis: int) -> PackedExperts:
    """Quantise each expert's matrix of ``w`` [E, a, b] along ``axis`` (1 or 2), one at a time
    (the reference's temporaries stay the size of one expert)."""
    with torch.no_grad():
        stack = [api.quantize_weight(w[e], fmt, axis - 1) for e in range(w.shape[0])]
    return PackedExperts(stack, axis)


def install(module: torch.nn.Module, attr: str, packed: PackedExperts):
    """Put ``packed`` in place of ``module``'s parameter ``attr`` (dropping the float tensor):
    the holder as the submodule ``attr``, its view where the forward looks first."""
    module._parameters.pop(attr, None)  # (a loading holder in its place is replaced)
    module.add_module(attr, packed)
    object.__setattr__(module, attr, ExpertsView(packed))


class _TensorLike:
    """The tensor protocol the views share: ``size``, ``ndim``, and any other tensor method or
    attribute taken from the decoded tensor (``decoded()``)."""

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]

    ndim = property(lambda self: self.dim())

    def __getattr__(self, name):
        if name.startswith("_") or not hasattr(torch.Tensor, name):
            raise AttributeError(name)
        return getattr(self.decoded(), name)


class ExpertsView(_TensorLike):
    """What an experts module's forward reads in place of a 3-D parameter: a tensor-like over a
    ``PackedExperts`` (``transposed``: its last two axes swapped)."""

    def __init__(self, packed: PackedExperts, transposed: bool = False):
        self.packed, self.transposed = packed, transposed

    # -- metadata, read without decoding ------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        s = self.packed.shape
        return torch.Size((s[0], s[2], s[1])) if self.transposed else s

    def dim(self) -> int:
        return 3

    @property
    def dtype(self) -> torch.dtype:
        return self.packed.dtype

    @property
    def device(self) -> torch.device:
        return self.packed.codes.device

    @property
    def requires_grad(self) -> bool:
        return False

    def __len__(self) -> int:
        return self.packed.num_experts

    def __repr__(self) -> str:
        return f"ExpertsView({self.packed.extra_repr()}{', transposed' if self.transposed else ''})"

    # -- views --------------------------------------------------------------------------------
    def transpose(self, a: int, b: int):
        if {a % 3, b % 3} == {1, 2}:
            return ExpertsView(self.packed, not self.transposed)
        return self.full().transpose(a, b)

    @property
    def mT(self):
        return ExpertsView(self.packed, not self.transposed)

    # -- decoding -----------------------------------------------------------------------------
    def _oriented(self, t: torch.Tensor) -> torch.Tensor:
        return t.transpose(-2, -1) if self.transposed else t

    def full(self, used=None) -> torch.Tensor:
        """Every expert decoded (only those in ``used``, zeros elsewhere, when given)."""
        return self._oriented(self.packed.decode_experts(used))

    def __getitem__(self, index):
        """``view[e]``: an ``Expert``, ``view[ids]`` (1-D ids): ``ExpertRows``, both decoded only
        where used otherwise than in a matmul; any other index decodes."""
        rest = ()
        if isinstance(index, tuple):
            index, rest = index[0], index[1:]
        if isinstance(index, torch.Tensor) and index.dim() == 0 and not index.is_floating_point():
            index = int(index)
        if isinstance(index, int) and not isinstance(index, bool):
            picked = Expert(self.packed, index % self.packed.num_experts, self.transposed)
        elif isinstance(index, torch.Tensor) and index.dim() == 1 and \
                index.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
            picked = ExpertRows(self, index)
        else:
            return self.full()[(index, *rest)]
        return picked.decoded()[rest] if rest else picked

    def decoded(self) -> torch.Tensor:
        """Every expert decoded (any other tensor method or attribute is of this)."""
        return self.full()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_grouped(func):
            out = _grouped_linear(args, kwargs)
            if out is not None:
                return out
        used = _grouped_used(func, args, kwargs)
        args = tuple(a.full(used) if isinstance(a, ExpertsView) else a for a in args)
        kwargs = {k: v.full(used) if isinstance(v, ExpertsView) else v for k, v in kwargs.items()}
        return _decoded_call(func, args, kwargs)


class Expert(_TensorLike):
    """``view[e]``: expert ``e``'s matrix, not decoded. ``F.linear(x, m, b)``, ``x @ m``,
    ``torch.matmul(x, m)`` and ``torch.mm(x, m)`` run the packed linear on the expert's codes
    (``ops.expert_linear``) where they reduce its packed reduction axis; any other use decodes
    it (the tensor protocol, as ``ExpertsView``)."""

    def __init__(self, packed: PackedExperts, e: int, transposed: bool = False):
        self.packed, self.e, self.transposed = packed, e, transposed

    @property
    def shape(self) -> torch.Size:
        a, b = self.packed.matrix_shape
        return torch.Size((b, a) if self.transposed else (a, b))

    def dim(self) -> int:
        return 2

    dtype, device, requires_grad = ExpertsView.dtype, ExpertsView.device, ExpertsView.requires_grad

    def t(self) -> "Expert":
        return Expert(self.packed, self.e, not self.transposed)

    T = mT = property(t)

    def transpose(self, a: int, b: int) -> "Expert":
        if {a % 2, b % 2} != {0, 1}:
            return self.decoded().transpose(a, b)
        return self.t()

    def __repr__(self) -> str:
        return f"Expert({self.e} of {self.packed.extra_repr()})"

    def decoded(self) -> torch.Tensor:
        t = self.packed.decode(self.e)
        return t.t() if self.transposed else t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = _expert_matmul(func, args, kwargs)
        return out if out is not None else _decoded_call(func, args, kwargs)


class ExpertRows(_TensorLike):
    """``view[ids]`` (one expert id per row): the experts' matrices stacked per row, not
    decoded. ``torch.bmm`` (or ``matmul``) with rows of x ([S, 1, K] first, or [S, K, 1]
    second), as transformers' ``batched_mm`` calls it, runs ``ops.experts_linear`` on the rows
    grouped by expert; any other use decodes the experts named (each once)."""

    def __init__(self, view: ExpertsView, ids: torch.Tensor):
        self.view, self.ids = view, ids

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.ids.shape[0], *self.view.shape[1:]))

    def dim(self) -> int:
        return 3

    dtype = property(lambda self: self.view.dtype)
    device = property(lambda self: self.view.device)
    requires_grad = False

    def decoded(self) -> torch.Tensor:
        packed = self.view.packed
        used, inverse = torch.unique(self.ids, return_inverse=True)
        decoded = torch.stack([packed.decode(int(e)) for e in used]) if used.numel() \
            else packed.codes.new_empty((0, *packed.matrix_shape), dtype=packed.dtype)
        return self.view._oriented(decoded)[inverse]

    def groups(self) -> list:
        """(expert, its rows) for each expert named, rows as an index tensor."""
        order = torch.argsort(self.ids, stable=True)
        used, counts = torch.unique_consecutive(self.ids[order], return_counts=True)
        ends = counts.cumsum(0).tolist()
        return [(e, order[end - n:end]) for e, n, end in zip(used.tolist(), counts.tolist(), ends)]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = _batched_linear(func, args, kwargs)
        return out if out is not None else _decoded_call(func, args, kwargs)


# -- the matmuls the views run on the packed codes -------------------------------------------

_LINEAR = (torch.nn.functional.linear,)
_MATMUL = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm)
_BMM = (torch.bmm, torch.Tensor.bmm, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)


def _decoded_call(func, args, kwargs):
    """``func`` on the decoded tensors of any ``Expert`` / ``ExpertRows`` among its arguments."""
    def plain(a):
        return a.decoded() if isinstance(a, (Expert, ExpertRows)) else a
    return func(*map(plain, args), **{k: plain(v) for k, v in kwargs.items()})


def _expert_matmul(func, args, kwargs):
    """``x @ W_e (+ b)`` on expert e's codes for ``F.linear(x, m, b)`` (reduces m's axis 1) and
    ``x @ m`` (its axis 0), where that is its packed reduction axis; None otherwise."""
    if func in _LINEAR and len(args) + len(kwargs) <= 3:
        x, m = args[0], args[1] if len(args) > 1 else kwargs.get("weight")
        bias, axis = args[2] if len(args) > 2 else kwargs.get("bias"), 1
    elif func in _MATMUL and len(args) == 2 and not kwargs:
        (x, m), bias, axis = args, None, 0
    else:
        return None
    if not (isinstance(m, Expert) and isinstance(x, torch.Tensor) and x.dim() >= 1
            and (bias is None or isinstance(bias, torch.Tensor))
            and m.packed.reduces(m.transposed, axis)):
        return None
    return ops.expert_linear(x, m.packed, m.e, bias)


def _batched_linear(func, args, kwargs):
    """``bmm(x [S, 1, K], rows [S, K, N])`` -> [S, 1, N] and ``bmm(rows [S, N, K], x [S, K, 1])``
    -> [S, N, 1] on the codes of the experts named, rows grouped by expert; None for any other
    call, and under kernels='reference' (whose bits are the model's own ``bmm``'s)."""
    if func not in _BMM or len(args) != 2 or kwargs:
        return None
    a, b = args
    rows, x, axis = (b, a, 0) if isinstance(b, ExpertRows) else (a, b, 1)
    if not (isinstance(rows, ExpertRows) and isinstance(x, torch.Tensor) and x.dim() == 3
            and x.shape[0] == rows.ids.shape[0] and x.shape[1 + axis] == 1
            and rows.view.packed.reduces(rows.view.transposed, axis)):
        return None
    packed = rows.view.packed
    if packed.by_reference(x):
        return None
    y = ops.experts_linear(x.squeeze(1 + axis), packed, rows.groups())
    return y.unsqueeze(1 + axis)


def _is_grouped(func) -> bool:
    name = getattr(func, "__name__", "") or str(func)
    return any(g in name for g in _GROUPED)


def _grouped_linear(args, kwargs):
    """A grouped matmul ``(x [S, K], view [E, K, N], offs)`` on the codes of the experts whose
    group of rows is not empty, where it reduces the packed reduction axis; None otherwise
    (other arguments, or the other axis: decoded as before)."""
    offs = kwargs.get("offs", args[2] if len(args) > 2 else None)
    if len(args) < 2 or len(args) > 3 or set(kwargs) - {"offs", "bias", "out_dtype"} \
            or kwargs.get("bias") is not None:
        return None
    x, view = args[0], args[1]
    if kwargs.get("out_dtype") not in (None, getattr(x, "dtype", None)):
        return None
    if not (isinstance(view, ExpertsView) and isinstance(x, torch.Tensor) and x.dim() == 2
            and isinstance(offs, torch.Tensor) and offs.dim() == 1
            and offs.shape[0] == view.packed.num_experts
            and view.packed.reduces(view.transposed, 0)):
        return None
    groups, start = [], 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            groups.append((e, slice(start, end)))
        start = max(start, end)
    return ops.experts_linear(x, view.packed, groups)

def _grouped_used(func, args, kwargs):
    """For a grouped matmul (inputs grouped by expert, ``offs``: each group's end): the experts
    whose group is not empty; None (every expert) for any other op."""
    name = getattr(func, "__name__", "") or str(func)
    if not any(g in name for g in _GROUPED):
        return None
    offs = kwargs.get("offs", args[2] if len(args) > 2 else None)
    if not isinstance(offs, torch.Tensor):
        return None
    ends = offs.long().cpu()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    return (ends > starts).nonzero().flatten().tolist()
