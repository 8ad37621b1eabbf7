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
``shape``, ``dtype``, ``device``, indexing): indexing the expert axis decodes only the experts
selected, a grouped matmul decodes only the experts whose group has tokens, any other use
decodes every expert (Llama 4's ``bmm``, which uses every expert anyway).

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
from .formats.qtensor import QTensor

_GROUPED = ("grouped_mm",)  # torch._grouped_mm, F.grouped_mm, transformers' fallback op
_OUT_OF_GRAPHS: list[bool] = []


def _keep_decode_out_of_graphs():
    """Compiled graphs call ``PackedExperts.decode`` as it is (a graph break), not traced
    inside. Made so at the first stack, not at import: ``torch.compiler.disable`` imports Dynamo,
    which imports triton, and importing qcompile must not (that would fix triton's mode before
    TRITON_INTERPRET may be set)."""
    if not _OUT_OF_GRAPHS:
        PackedExperts.decode = torch.compiler.disable(PackedExperts.decode)
        _OUT_OF_GRAPHS.append(True)


class PackedExperts(torch.nn.Module):
    """All E experts of one expert tensor [E, a, b], packed; experts decoded on demand."""

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

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.num_experts, *self.matrix_shape))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    @property
    def bits_per_element(self) -> float:
        return 8 * self.nbytes / self.shape.numel()

    def expert_qtensor(self, e: int) -> QTensor:
        """Expert ``e``'s matrix as the QTensor quantize_weight made of it."""
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
        return ops.dequantize_noted(self.expert_qtensor(e), self.impl, self.codes)

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


class ExpertsView:
    """What an experts module's forward reads in place of a 3-D parameter: a tensor-like over a
    ``PackedExperts`` (``transposed``: its last two axes swapped)."""

    def __init__(self, packed: PackedExperts, transposed: bool = False):
        self.packed, self.transposed = packed, transposed

    # -- metadata, read without decoding ------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        s = self.packed.shape
        return torch.Size((s[0], s[2], s[1])) if self.transposed else s

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 3

    ndim = property(dim)

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
        rest = ()
        if isinstance(index, tuple):
            index, rest = index[0], index[1:]
        if isinstance(index, torch.Tensor) and index.dim() == 0 and not index.is_floating_point():
            index = int(index)
        if isinstance(index, int) and not isinstance(index, bool):
            picked = self._oriented(self.packed.decode(index % self.packed.num_experts))
        elif isinstance(index, torch.Tensor) and index.dim() == 1 and \
                index.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
            used, inverse = torch.unique(index, return_inverse=True)
            decoded = torch.stack([self.packed.decode(int(e)) for e in used]) if used.numel() \
                else self.packed.codes.new_empty((0, *self.packed.matrix_shape), dtype=self.dtype)
            picked = self._oriented(decoded)[inverse]
        else:
            return self.full()[(index, *rest)]
        return picked[rest] if rest else picked

    def __getattr__(self, name):
        """Any other tensor method or attribute: of the fully decoded tensor."""
        if name.startswith("_") or not hasattr(torch.Tensor, name):
            raise AttributeError(name)
        return getattr(self.full(), name)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        used = _grouped_used(func, args, kwargs)
        args = tuple(a.full(used) if isinstance(a, ExpertsView) else a for a in args)
        kwargs = {k: v.full(used) if isinstance(v, ExpertsView) else v for k, v in kwargs.items()}
        return func(*args, **kwargs)


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
