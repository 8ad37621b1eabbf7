"""``qcompile.explain``: what a policy does to each op of a model.

* ``explain(model, policy, *inputs, **kwargs)`` traces ``model(*inputs, **kwargs)`` once with
  Dynamo, through a backend that runs the find and plan passes and quantises nothing. The trace
  runs through a throwaway function, so the model keeps no compiled state and spends none of
  its recompile budget: explain can be called any number of times.
* ``explain(compiled)``, for a model compiled with the blockquant backend (``torch.compile``'s
  wrapper, or compiled in place by ``qcompile.compile`` / ``model.compile``), reads what the
  backend did, after the model's first call.

Every quantisable op gets a row: module name, op, weight shape, the rule that matched, weight
and activation formats, bits per weight. Bits are the bytes actually stored (codes, scales,
padding, OPQ outliers, tensor scales) where the weight was quantised (a compiled model, a layer
swapped by ``quantize_model_``), and the format's nominal effective bits where nothing was
quantised (a traced explain): those rows are marked ``*``. Layers the policy quantises but that
cannot be (a parent reading ``.weight`` directly) are listed with the reason. The summary
compares the bits stored with the same weights in the model's own dtype (bfloat16: 16 bits),
and counts every weight of the model: the parameters no row covers (norms, biases, embedding
tables no rule names, expert biases) at their own dtype's bits, listed on a line that says why
they stay in full precision. A mixture-of-experts tensor has a row of its own (op "experts",
"E x N x K"): packed by ``quantize_model_``, or skipped with the reason.

Rows with a packed weight say which kernel their op ran (qcompile.ops records it per packed
weight): "cpu (ISA)", "cpu (ISA, int)" for integer dot products, "triton", or "reference (why)";
"not run yet" before the model's first call. After ``quantize_model_`` the rule column shows
the rule that matched each swapped layer (for a loaded model: the first of its saved policies
that gives the layer a weight format).
"""
from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field

import torch

from qcompile import config
from qcompile.passes import find_quantisable, plan
from qcompile.passes.graph import copy_graph_module
from qcompile.passes.names import names_for, remember_root
from qcompile.passes.plan import float_experts, warn_unmatched
from qcompile.passes.report import Row, dtype_name, site_rows

from . import formats, ops
from .backend import compiled_variants
from .codegen import cpu, select
from .experts import EXPERTS_OP
from .experts import candidates as expert_candidates
from .policy import Policy, default_policy
from .swap import (POLICIES_ATTR, SKIPPED_EXPERTS_ATTR, QuantEmbedding, QuantLinear, matched_rule,
                   resident_weight_bytes, skipped_layers)

_DTYPE_BITS = {"float32": 32, "float64": 64, "float16": 16, "bfloat16": 16}


@dataclass
class Rest:
    """A parameter of the model that no row covers: it stays in full precision, for ``reason``."""
    name: str
    numel: int
    dtype: str
    reason: str

    @property
    def bits(self) -> int:
        return _DTYPE_BITS.get(self.dtype, 32)


@dataclass
class Explanation:
    rows: list[Row] = field(default_factory=list)
    resident_weight_bytes: int = 0  # measured: the model's parameters and buffers, now
    rest: list[Rest] = field(default_factory=list)  # the model's other weights, full precision

    def _stored(self) -> list[Row]:
        """The rows, a tensor that several ops read counted once: a packed tensor (a tied
        embedding / lm_head given one format), and in a traced explain a tied weight its
        holders keep or would pack in one format."""
        seen, rows = set(), []
        for r in self.rows:
            key = None
            if r.qtensor is not None:
                key = id(r.qtensor.codes)
            elif r.tied:
                key = (frozenset((r.fqn, *r.tied)), r.weight_fmt)
            if key is None or key not in seen:
                rows.append(r)
                seen.add(key)
        return rows

    @property
    def total_weights(self) -> int:
        """Every weight of the model: the rows' and the rest's (``rest``)."""
        return sum(r.numel for r in self._stored()) + sum(r.numel for r in self.rest)

    @property
    def total_bits(self) -> float:
        return sum(r.numel * r.bits for r in self._stored()) + \
            sum(r.numel * r.bits for r in self.rest)

    @property
    def avg_bits(self) -> float:
        return self.total_bits / self.total_weights if self.total_weights else float("nan")

    @property
    def density_vs_fp32(self) -> float:
        return 32.0 / self.avg_bits if self.rows else float("nan")

    @property
    def dtype(self) -> str:
        """The dtype the weights had ("bfloat16"), or "mixed: float32, bfloat16"."""
        names = sorted({r.dtype for r in (*self._stored(), *self.rest) if r.dtype})
        return names[0] if len(names) == 1 else "mixed: " + ", ".join(names)

    @property
    def baseline_bits(self) -> float:
        """The same weights' bits in their own dtype, a weight read by several ops (a tied
        pair) counted once."""
        groups = _tied_groups(self._stored())
        return sum(max(r.numel * _DTYPE_BITS.get(r.dtype, r.bits) for r in g) for g in groups) \
            + sum(r.numel * r.bits for r in self.rest)

    @property
    def density(self) -> float:
        """How many times fewer bits than the same weights in the model's own dtype."""
        return self.baseline_bits / self.total_bits if self.total_bits else float("nan")

    def _density_text(self) -> str:
        d, than = self.density, self.dtype
        if d != d:
            return "no weights"
        return f"{d:.2f}x denser than {than}" if d >= 1 else f"{1 / d:.2f}x larger than {than}"

    def __str__(self) -> str:
        head = ["module", "op", "weight", "rule", "weight fmt", "act fmt", "bits/w"]
        notes = any(r.note for r in self.rows)
        kernels = any(r.kernel != "-" for r in self.rows)
        body = [[r.fqn or "<root>", r.op + (f" #{r.index + 1}" if r.index else ""),
                 _shape_text(r), r.rule, r.weight_fmt, r.act_fmt,
                 f"{r.bits:.3f}{'*' if r.nominal else ''}"] + ([r.kernel] if kernels else [])
                + ([r.note] if notes else []) for r in self.rows]
        head += (["kernel"] if kernels else []) + (["note"] if notes else [])
        widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
        line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
        out = [line(head), line("-" * w for w in widths), *map(line, body)]
        if self.rest:
            out.append(_rest_text(self.rest))
        out.append(f"total: {len(self.rows)} ops, {self.total_weights} weights, "
                   f"{self.total_bits / 8:.0f} bytes, {self.avg_bits:.3f} bits/weight, "
                   f"{self._density_text()}; model holds "
                   f"{self.resident_weight_bytes} bytes of parameters and buffers")
        if any(r.nominal for r in self.rows):
            out.append("* nominal: the format's effective bits (no padding or OPQ outliers); "
                       "compiled or quantize_model_ layers count the bytes stored")
        return "\n".join(out)


def _shape_text(row: Row) -> str:
    """"96x32"; an expert tensor's "4 x 96x32" (E experts, each one's matrix)."""
    if row.op == EXPERTS_OP and len(row.weight_shape) == 3:
        return f"{row.weight_shape[0]} x " + "x".join(map(str, row.weight_shape[1:]))
    return "x".join(map(str, row.weight_shape))


# why a parameter no row covers stays in full precision, in the order explain lists them
VECTORS = "vectors (norm scales, biases): blockquant quantises matrices"
TABLES = "embedding tables: quantised only by a rule with op='embedding'"
EXPERT_BIASES = "expert biases: kept in the model's dtype"
OTHER = "parameters no linear layer or expert tensor reads as its weight"


def _rest_text(rest: list[Rest]) -> str:
    """The line saying which weights stay in full precision outside the rows, and why."""
    parts = []
    for reason in (VECTORS, TABLES, EXPERT_BIASES, OTHER):
        group = [r for r in rest if r.reason == reason]
        if group:
            names = "" if reason == VECTORS else " (" + ", ".join(
                r.name for r in group[:3]) + (" ..." if len(group) > 3 else "") + ")"
            parts.append(f"{sum(r.numel for r in group)} weights in {len(group)} {reason}{names}")
    return "full precision outside the rows (counted in the total): " + "; ".join(parts)


def uncovered(model, rows: list[Row]) -> list[Rest]:
    """The model's parameters that no row covers (each tensor once), with why each stays in
    full precision: a row covers its module's ``weight``, or the parameter it is named after
    (an expert tensor)."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    covered = set()
    for r in rows:
        mod = modules.get(r.fqn)
        w = getattr(mod, "_parameters", {}).get("weight") if mod is not None else None
        if w is not None:
            covered.add(id(w))
        if r.fqn in params:
            covered.add(id(params[r.fqn]))
    owners = {id(m) for _, m, _ in expert_candidates(model)} | {
        id(m) for m in modules.values()
        if any(getattr(c, "quantised_experts", False) for c in m.children())}
    rest = []
    for mname, mod in modules.items():
        for attr, p in mod._parameters.items():
            if p is None or id(p) in covered:
                continue
            covered.add(id(p))
            reason = VECTORS if p.dim() <= 1 else TABLES if isinstance(mod, torch.nn.Embedding) \
                else EXPERT_BIASES if id(mod) in owners and p.dim() == 2 else OTHER
            rest.append(Rest(f"{mname}.{attr}".lstrip("."), p.numel(), dtype_name(p.dtype),
                             reason))
    return rest


def _tied_groups(rows: list[Row]) -> list[list[Row]]:
    """The rows grouped by the weight they were made from: the rows of modules that held one
    tied weight (``Row.tied`` names the others) are one group; every other row is its own."""
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.get(name, name) != name:
            name = parent[name]
        return name

    for r in rows:
        for other in r.tied:
            a, b = root(r.fqn), root(other)
            if a != b:
                parent[b] = a
    holders = {n for r in rows if r.tied for n in (r.fqn, *r.tied)}
    groups: dict = {}
    for r in rows:
        groups.setdefault(root(r.fqn) if r.fqn in holders else id(r), []).append(r)
    return list(groups.values())


def _kernel(row: Row) -> str:
    """What the row's op ran, from the ops' record; "-" for a row with no packed weight."""
    q = row.qtensor
    if q is None:
        return "-"
    names = ("embedding",) if row.op.endswith("embedding") else ("linear", "dequantize")
    # an expert row's QTensor is one expert's: its codes are a view of the stack's, noted
    codes = q.codes._base if row.op == EXPERTS_OP and q.codes._base is not None else q.codes
    ran = dict.fromkeys(k for op in names for k in ops.kernels_ran(op, codes))
    if not ran:
        return "not run yet"
    return ", ".join(_cpu_variant(q, row) if k == "cpu" else k for k in ran)


def _cpu_variant(q, row: Row) -> str:
    """"cpu (avx512_vnni)"; ", int" where the integer path runs (int activations with int or
    fp4 weights: exact integer block dots)."""
    try:
        isa = cpu.plan(q).isa
    except (NotImplementedError, ValueError, RuntimeError):  # it ran, so this is rare: say less
        return "cpu"
    act = formats.get(row.act_fmt) if row.act_fmt not in ("", "-") else None
    return f"cpu ({isa}, int)" if select.cpu_int_applies(q, act) else f"cpu ({isa})"


def _with_kernels(rows: list[Row]) -> list[Row]:
    """Copies of the rows (a compiled graph keeps its own) with the kernels run so far."""
    return [dataclasses.replace(r, kernel=_kernel(r)) for r in rows]


def _rule(model, name: str, mod) -> str:
    """The rule that gave a swapped layer its format: remembered by quantize_model_, else
    (a loaded model) the first of the model's policies that gives the layer a weight."""
    if getattr(mod, "rule", ""):
        return mod.rule
    kind = "embedding" if isinstance(mod, QuantEmbedding) else "linear"
    policies = getattr(model, POLICIES_ATTR, ())
    for policy in policies:
        text = matched_rule(policy, name, kind)
        if text is not None:
            return text
    return "quantize_model_ (no saved policy matches)"


def module_rows(model) -> list[Row]:
    """Rows for the layers ``quantize_model_`` swapped (they hold packed weights and appear in
    graphs as qcompile ops, not as linears) and for the layers it had to skip."""
    rows, readers = [], {}
    for name, mod in model.named_modules():
        if isinstance(mod, (QuantLinear, QuantEmbedding)):
            readers.setdefault(id(mod.codes), []).append(name)
    for name, mod in model.named_modules():
        if isinstance(mod, (QuantLinear, QuantEmbedding)):
            q = mod.qtensor()
            sharing = [n for n in readers[id(mod.codes)] if n != name]
            op = "qcompile.linear" if isinstance(mod, QuantLinear) else "qcompile.embedding"
            rows.append(Row(name, op, mod.weight_shape, _rule(model, name, mod), mod.fmt_key,
                            getattr(mod, "act", "") or "-", q.bits_per_element,
                            note=f"one packed table with {', '.join(sharing)}" if sharing else "",
                            qtensor=q, dtype=dtype_name(q.dtype),
                            tied=tuple(getattr(mod, "tied_with", ()))))
        if getattr(mod, "quantised_experts", False):
            rows.append(_experts_row(model, name, mod))
        for attr, reason in getattr(mod, SKIPPED_EXPERTS_ATTR, {}).items():
            if isinstance(mod._parameters.get(attr), torch.Tensor):
                w = mod._parameters[attr]
                rows.append(Row(f"{name}.{attr}".lstrip("."), EXPERTS_OP, tuple(w.shape),
                                "quantize_model_", "-", "-", torch.finfo(w.dtype).bits,
                                note=f"skipped: {reason}", dtype=dtype_name(w.dtype)))
    for name, mod, reason in skipped_layers(model):
        w = mod.weight
        rows.append(Row(name, "-", tuple(w.shape), "quantize_model_", "-", "-",
                        torch.finfo(w.dtype).bits if w.dtype.is_floating_point else 32,
                        note=f"skipped: {reason}", dtype=dtype_name(w.dtype)))
    return rows


def _float_expert_rows(policy: Policy, model, rows: list[Row]) -> list[Row]:
    """Rows for the expert tensors the policy gives a format that compiled graphs keep in
    full precision, where no graph row has them already (an eager loop over the experts runs
    outside the graphs)."""
    have = {r.fqn for r in rows}
    return [Row(s.fqn, "-", s.weight_shape, s.rule, "-", "-", float(s.bits),
                note=f"skipped: {s.reason}") for s in float_experts(policy, model)
            if s.fqn not in have]


def _with_module_rows(traced: list[Row], mine: list[Row]) -> list[Row]:
    """The graphs' rows, then the modules' (``module_rows``): an expert tensor that
    quantize_model_ skipped has the module's row only (it says why)."""
    experts = {r.fqn for r in mine if r.op == EXPERTS_OP}
    return [r for r in traced if r.fqn not in experts] + mine


def _experts_row(model, name: str, packed) -> Row:
    """The row of an expert tensor ``quantize_model_`` packed: E experts of one matrix shape,
    the bits of everything stored (codes, scales, side data of every expert)."""
    note = f"each expert reduced along axis {packed.axis}"
    if packed.act_note:
        note += f"; {packed.act_note}"
    return Row(name, EXPERTS_OP, tuple(packed.shape), _rule(model, name, packed),
               packed.fmt_key, "-", packed.bits_per_element, note=note,
               qtensor=packed.expert_qtensor(0), dtype=dtype_name(packed.dtype))


def _compiled_module(model):
    """The module a blockquant-compiled model runs, or None if ``model`` is not compiled."""
    if hasattr(model, "_orig_mod"):  # torch.compile's wrapper
        return model._orig_mod
    if getattr(model, "_compiled_call_impl", None) is not None:  # compiled in place
        return model
    return None


class _Recorder:
    """explain's backend: the rows of a graph, planned and not quantised; and, since Dynamo
    runs one graph for every instance of a module class, the rows again for each other
    instance that runs it (its parameters tell its names)."""

    def __init__(self, gm, inputs, policy: Policy, rows: list):
        self.gm, self.policy, self.rows = gm, policy, rows
        self.names = names_for(gm)
        self.params = [i for i, t in enumerate(inputs) if isinstance(t, torch.nn.Parameter)]
        self.traced = [inputs[i] for i in self.params]
        self.seen: set = set()
        self._record(inputs, self.names)

    def _record(self, args, names):
        key = tuple(id(args[i]) for i in self.params)
        if key in self.seen:
            return
        self.seen.add(key)
        g = copy_graph_module(self.gm)
        find_quantisable(g, self.policy.op_kinds(), args, names)
        plan(g, self.policy, args, names)
        self.rows.extend(site_rows(g))

    def __call__(self, *args):
        if any(args[i] is not t for i, t in zip(self.params, self.traced)):
            self._record(args, self.names.for_instance(self.traced,
                                                       [args[i] for i in self.params]))
        return self.gm(*args)


def _explain_compiled(model) -> Explanation:
    own = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    result, seen = Explanation(), set()
    for graph in compiled_variants():  # newest first: a recompile's policy wins
        if graph.model() is model or any(id(t) in own for t in (r() for r in graph.inputs)
                                         if t is not None):
            for row in graph.rows:
                key = (row.fqn, row.op, row.index)
                if key not in seen:
                    seen.add(key)
                    result.rows.append(row)
    result.rows = _with_module_rows(result.rows, module_rows(model))
    result.rows = _with_kernels(result.rows)
    result.rest = uncovered(model, result.rows)
    if not result.rows:
        raise RuntimeError("explain: this compiled model has no blockquant graph yet; call it "
                           "once first (torch.compile compiles lazily), or pass a policy and "
                           "example inputs: explain(model, policy, *inputs)")
    result.resident_weight_bytes = resident_weight_bytes(model)
    return result


def _trace(model, args, kwargs, capture):
    """Run ``model(*args, **kwargs)`` once under Dynamo with ``capture`` as the backend, leaving
    no compiled state behind: the frame Dynamo compiles is a fresh copy of a small function, so
    its cache entries die with it. A model with graph breaks makes Dynamo compile frames of its
    own code too; the cache entries explain added there are removed again."""
    def call(*a, **k):
        return model(*a, **k)
    fresh = types.FunctionType(call.__code__.replace(), call.__globals__, "qcompile_explain",
                               None, call.__closure__)
    before = _cache_sizes()
    with torch.no_grad():
        torch.compile(fresh, backend=lambda gm, inputs, **_: capture(gm, inputs),
                      dynamic=False)(*args, **kwargs)
    for code, n in _cache_sizes().items():
        if code is not fresh.__code__ and n > before.get(code, 0):
            _forget(code, had=before.get(code, 0))


def _cache_sizes() -> dict:
    """{code object: number of Dynamo cache entries} for every code Dynamo has compiled."""
    try:
        from torch._dynamo.convert_frame import input_codes
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
        codes = [ref() for ref in input_codes.seen]
        return {c: len(_debug_get_cache_entry_list(c)) for c in codes if c is not None}
    except (ImportError, AttributeError):  # a Dynamo without these: nothing can be removed
        return {}


def _forget(code, had: int):
    """Remove the cache entries explain's trace added to ``code`` (a frame of the model's own
    code, compiled after a graph break), unless some were there before: those are the user's,
    and Dynamo cannot remove entries one by one."""
    if had == 0:
        from torch._C._dynamo.eval_frame import reset_code
        reset_code(code)
    else:
        config.warn(f"explain: the model has graph breaks and was compiled before, so explain's "
                    f"trace added entries to Dynamo's cache for {code.co_name!r} that it cannot "
                    "remove alone", once=("explain cache", id(code)))


def explain(model, policy: Policy | None = None, *example_inputs, **example_kwargs) -> Explanation:
    """Tabulate what ``policy`` (None: the backend default) does to every quantisable op that
    ``model(*example_inputs, **example_kwargs)`` runs. ``explain(compiled)``, with only a model
    compiled by the blockquant backend, reports what the backend did, after its first call."""
    if policy is None and not example_inputs and not example_kwargs:
        inner = _compiled_module(model)
        if inner is not None:
            return _explain_compiled(inner)
        raise TypeError("explain: give a policy and example inputs to trace the model with: "
                        "explain(model, policy, *inputs); or a model compiled with the "
                        "blockquant backend, after its first call")
    if not example_inputs and not example_kwargs:
        raise TypeError("explain: give example inputs to trace the model with: "
                        "explain(model, policy, *inputs)")
    policy = default_policy() if policy is None else policy
    if not isinstance(policy, Policy):
        raise TypeError(f"explain: policy must be a qcompile.Policy or None, got "
                        f"{type(policy).__name__}")
    result = Explanation()

    def capture(gm, inputs):
        return _Recorder(gm, inputs, policy, result.rows)

    target = _compiled_module(model) or model
    warn_unmatched(policy, target, "explain")
    remember_root(target)  # frames Dynamo compiles on their own are named inside it
    _trace(target, example_inputs, example_kwargs, capture)
    result.rows = _with_module_rows(result.rows + _float_expert_rows(policy, target, result.rows),
                                    module_rows(target))
    result.rows = _with_kernels(result.rows)
    result.rest = uncovered(target, result.rows)
    result.resident_weight_bytes = resident_weight_bytes(target)
    return result
