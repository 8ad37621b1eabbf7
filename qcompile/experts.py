"""Which parameters are mixture-of-experts tensors, and along which axis each expert's matrix is
reduced: the rule that ``quantize_model_``, ``fake_quantize_model_``, ``explain`` and the
backend share, next to the linear rule (qcompile.linear_rule).

transformers 5.x holds a mixture's experts in one module as 3-D parameters [E, a, b], one
matrix per expert, read by the module's own forward (``F.linear(x, W[e])``, ``x @ W[e]``,
``bmm``, ``grouped_mm``; which one depends on ``config._experts_implementation``). Such a
parameter is a layer of its own: its rule name is the parameter's name
(``model.layers.0.mlp.experts.gate_up_proj``).

Candidates are found from shapes alone (``candidates``): a float parameter of 3 dims with at
least two matrices, held by a module that is not a convolution. Whether a candidate is an
expert tensor, and its reduction axis, is found from how the forward uses it
(``expert_tensors``): the module's forward runs once on a small probe input under a
``TorchFunctionMode`` that follows every tensor derived from the parameter (an expert's slice
``W[e]``, a selection ``W[ids]``, a transpose) to the matmul that consumes it, and reads which
axis that matmul reduces. Never from a class name. A candidate whose use is anything else is
*unrecognised*, with the reason; every helper says it and keeps it in full precision.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

# the row kind of an expert tensor in explain
EXPERTS_OP = "experts"
# {parameter attribute: reason} on an experts module, for the tensors a helper kept float
SKIPPED_EXPERTS_ATTR = "_qcompile_skipped_experts"

CONVS = (torch.nn.modules.conv._ConvNd,)
# ops that consume a matrix operand: (x @ W) forms, with the weight first or second
_MATMULS = {"matmul", "mm", "bmm", "__matmul__", "__rmatmul__", "_grouped_mm", "grouped_mm",
            "grouped_mm_fallback"}
# ops whose result has the same axes as their tensor argument
_ALIASES = {"contiguous", "to", "float", "half", "bfloat16", "type_as", "detach", "clone",
            "requires_grad_", "data"}
# descriptors (properties) whose result is the tensor transposed
_TRANSPOSING = {"T", "mT", "H", "mH"}
# reads of metadata only
_METADATA = {"size", "dim", "numel", "data_ptr", "element_size", "is_contiguous", "stride",
             "storage_offset", "is_floating_point", "get_device", "__len__", "nelement",
             "untyped_storage", "_is_view", "__hash__", "shape", "dtype", "device", "ndim",
             "is_cuda", "layout", "requires_grad"}


@dataclass(frozen=True)
class ExpertTensor:
    """One expert tensor: the parameter ``name`` (``module.attr``) [E, a, b]; each expert's
    matrix is reduced along ``axis`` (1 or 2) of the 3-D tensor."""
    name: str
    module: torch.nn.Module
    attr: str
    axis: int

    @property
    def tensor(self) -> torch.Tensor:
        return self.module._parameters[self.attr]


def candidates(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str]]:
    """``(parameter name, module, attribute)`` of every parameter that may be an expert tensor,
    from shapes alone (cheap: no forward runs)."""
    out = []
    for mname, mod in model.named_modules():
        if isinstance(mod, CONVS):
            continue
        for attr, p in mod._parameters.items():
            if p is not None and p.dim() == 3 and p.shape[0] >= 2 and p.dtype.is_floating_point:
                out.append((f"{mname}.{attr}" if mname else attr, mod, attr))
    return out


def expert_tensors(model: torch.nn.Module, names=None, meta_stand_ins: bool = False
                   ) -> tuple[list[ExpertTensor], dict]:
    """The recognised expert tensors among ``candidates(model)`` (only those named in ``names``
    when given), and ``{name: reason}`` for the candidates that cannot be recognised. Each
    module holding candidates is probed once. ``meta_stand_ins``: a module whose parameters
    are not loaded yet (meta device, as while transformers loads a model) is probed with
    zero-filled stand-ins of one matrix each (how the forward reads a tensor does not depend
    on its values)."""
    by_module: dict[int, list] = {}
    for name, mod, attr in candidates(model):
        if names is None or name in names:
            by_module.setdefault(id(mod), []).append((name, mod, attr))
    found, unrecognised = [], {}
    for group in by_module.values():
        mod = group[0][1]
        attrs = [attr for _, _, attr in group]
        if meta_stand_ins:
            with _zero_stand_ins(mod):
                axes, reasons = _probe(mod, attrs)
        else:
            axes, reasons = _probe(mod, attrs)
        for name, _, attr in group:
            if attr in axes:
                found.append(ExpertTensor(name, mod, attr, axes[attr]))
            else:
                unrecognised[name] = reasons[attr]
    return found, unrecognised


def unrecognised_reason(why: str) -> str:
    """The text every helper says for an expert-like tensor it cannot quantise."""
    return (f"it looks like a mixture-of-experts tensor (3-D: one matrix per expert) but "
            f"{why}, so blockquant cannot tell along which axis each expert's matrix is "
            "reduced and keeps it in full precision")


# -- the probe --------------------------------------------------------------------------------

class _zero_stand_ins:
    """Within it, ``mod``'s meta-device parameters are zeros on the CPU, one matrix seen
    through a zero stride along the leading axis (grouped matmuls need matrices with strides);
    put back on exit."""

    def __init__(self, mod):
        self.mod, self.saved = mod, {}

    def __enter__(self):
        for attr, p in self.mod._parameters.items():
            if p is not None and p.device.type == "meta":
                self.saved[attr] = p
                zero = torch.zeros(p.shape[1:], dtype=p.dtype, device="cpu").expand(p.shape)
                self.mod._parameters[attr] = torch.nn.Parameter(zero, requires_grad=False)

    def __exit__(self, *exc):
        self.mod._parameters.update(self.saved)


def _probe(mod, attrs: list[str]) -> tuple[dict[str, int], dict[str, str]]:
    """Run ``mod``'s forward on small probe inputs (one per plausible hidden size) and return
    ``({attr: reduction axis}, {attr: why not})``."""
    params = {a: mod._parameters[a] for a in attrs}
    if any(p.device.type == "meta" for p in params.values()):  # a forward needs values
        why = "its values are not loaded yet (meta device), so its forward cannot be probed"
        return {}, {a: unrecognised_reason(why) for a in attrs}
    errors = []
    for args in _probe_inputs(mod, params):
        tracker = _Tracker(params)
        try:
            with torch.no_grad(), tracker:
                mod(*args)
        except Exception as e:  # this probe does not fit the forward: try the next one
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0][:120]}" if str(e)
                          else type(e).__name__)
            continue
        return tracker.result()
    why = "its module's forward did not run on a probe input (" + (
        errors[-1] if errors else "no probe input fits its signature") + ")"
    return {}, {a: unrecognised_reason(why) for a in attrs}


def _probe_inputs(mod, params):
    """Candidate argument tuples for an experts forward: hidden states [T, H] with T = E tokens
    (each routed to two experts), then the routing (indices [T, k], weights [T, k]) where the
    forward takes it, or the rows of each expert (a list of E counts: T rows sorted by expert,
    one each; JetMoE's parallel experts split x by it). H is tried from the parameters'
    matrix sizes."""
    first = next(iter(params.values()))
    e, dtype, device = first.shape[0], first.dtype, first.device
    k = min(2, e)
    index = (torch.arange(e, device=device)[:, None] + torch.arange(k, device=device)) % e
    weights = torch.full((e, k), 1.0 / k, dtype=dtype, device=device)
    hidden_sizes = dict.fromkeys(s for p in params.values() for s in p.shape[1:])
    try:
        positional = [p for p in inspect.signature(mod.forward).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        positional = []
    gen = torch.Generator(device=device).manual_seed(0)
    for h in hidden_sizes:
        x = torch.randn(e, h, generator=gen, device=device).to(dtype)
        if len(positional) >= 3:
            yield x, index, weights
        if len(positional) == 2:
            yield x, [1] * e
        yield (x,)


class _Tracker(TorchFunctionMode):
    """Follows the tensors derived from the probed parameters: ``derived[id(t)] = (attr, axes)``
    where ``axes[i]`` is the parameter axis that axis i of ``t`` is. Records the parameter axes
    each matmul reduces, and any other use."""

    def __init__(self, params: dict[str, torch.Tensor]):
        super().__init__()
        self.derived = {id(p): (a, (0, 1, 2)) for a, p in params.items()}
        self.keep = list(params.values())  # the ids above stay valid while the probe runs
        self.attrs = list(params)
        self.reduced: dict[str, set] = {a: set() for a in params}
        self.other: dict[str, list] = {a: [] for a in params}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._follow(func, args, kwargs, out)
        return out

    def _of(self, t):
        return self.derived.get(id(t)) if isinstance(t, torch.Tensor) else None

    def _follow(self, func, args, kwargs, out):
        name = getattr(func, "__name__", "") or str(func)
        if name == "__get__":  # a property: .T / .mT transpose, .data aliases, others read metadata
            name = getattr(getattr(func, "__self__", None), "__name__", "")
        name = name.split(".")[0].rsplit("::", 1)[-1]
        operands = [(i, a) for i, a in enumerate(args) if self._of(a)] + \
                   [(k, v) for k, v in kwargs.items() if self._of(v)]
        if not operands or name in _METADATA:
            return
        if name in _MATMULS or name == "linear":
            for where, t in operands:
                self._matmul(name, where, t)
            return
        where, t = operands[0]
        attr, axes = self._of(t)
        derived = self._derive(name, args, axes) if where == 0 and len(operands) == 1 else None
        if derived is None:
            self.other[attr].append(name)
        elif isinstance(out, torch.Tensor):
            self.derived[id(out)] = (attr, derived)
            self.keep.append(out)

    def _derive(self, name, args, axes):
        """The axes of the result of ``name(t, *args[1:])``, or None when it is not a view the
        tracker follows."""
        if name in _ALIASES:
            return axes
        if name in _TRANSPOSING and len(axes) >= 2:
            return (*axes[:-2], axes[-1], axes[-2])
        if name in ("transpose", "swapaxes", "swapdims") and len(args) == 3:
            a, b = (d % len(axes) for d in args[1:3])
            out = list(axes)
            out[a], out[b] = out[b], out[a]
            return tuple(out)
        if name == "__getitem__" and axes[0] == 0:
            return _index_axes(args[1], axes)
        return None

    def _matmul(self, name, where, t):
        attr, axes = self._of(t)
        if name == "linear":  # F.linear(x, W): W [N, K], reduced along its last axis
            ok, reduced = where in (1, "weight") and len(axes) == 2, axes[-1]
        else:  # a @ b: the first operand reduced along its last axis, the second along -2
            second = (where in (1, "mat2", "other", "weight")) != (name == "__rmatmul__")
            ok = len(axes) == 2 or (len(axes) == 3 and axes[0] == 0)
            reduced = axes[-2] if second else axes[-1]
        if ok:
            self.reduced[attr].add(reduced)
        else:
            self.other[attr].append(name)

    def result(self) -> tuple[dict[str, int], dict[str, str]]:
        axes, reasons = {}, {}
        for a in self.attrs:
            other, reduced = sorted(set(self.other[a])), self.reduced[a]
            if other:
                why = f"its module's forward reads it with {', '.join(other)}"
            elif not reduced:
                why = "its module's forward did not read it through a matmul on a probe input"
            elif len(reduced) > 1 or 0 in reduced:
                why = (f"its module's forward reduces it along axes {sorted(reduced)} (one axis of "
                       "each expert's matrix expected)")
            else:
                axes[a] = reduced.pop()
                continue
            reasons[a] = unrecognised_reason(why)
        return axes, reasons


def _index_axes(index, axes):
    """The axes left after indexing the expert axis (axis 0) with ``index``: one expert
    (an int or a 0-d integer tensor) drops it, a 1-d selection keeps it; None otherwise."""
    rest = ()
    if isinstance(index, tuple):
        index, rest = index[0], index[1:]
        if any(not (r is Ellipsis or r == slice(None)) for r in rest):
            return None
    if isinstance(index, int) and not isinstance(index, bool):
        return axes[1:]
    if isinstance(index, torch.Tensor) and not index.dtype.is_floating_point \
            and index.dtype != torch.bool:
        return axes[1:] if index.dim() == 0 else axes if index.dim() == 1 else None
    return None
