"""``qcompile.explain(model, policy, *example_inputs)``: what a policy does to each op.

Traces the model with Dynamo (a capture-only backend that runs the find and plan passes and
quantises nothing), or reads what the backend recorded for a compiled model, and tabulates
every quantisable op: module FQN, op, weight shape, the rule that matched, weight and activation
formats, bits per weight; with totals. Bits are the bytes actually stored (codes, scales, padding,
OPQ outliers, tensor scales) where the weight was quantised (a compiled model, a layer swapped by
``quantize_model_``), and the format's nominal effective bits where nothing was quantised (a
traced ``explain(model, policy, *inputs)``): those rows are marked ``nominal``.
"""
from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field

import torch

from . import formats
from .policy import Policy


@dataclass
class Row:
    fqn: str
    op: str
    weight_shape: tuple
    rule: str
    weight_fmt: str
    act_fmt: str
    bits: float  # bits per weight element
    nominal: bool = False  # True: the format's effective bits, not bytes that were stored

    @property
    def numel(self) -> int:
        n = 1
        for s in self.weight_shape:
            n *= s
        return n


@dataclass
class Explanation:
    rows: list[Row] = field(default_factory=list)
    resident_weight_bytes: int = 0  # measured: the model's parameters and buffers, now

    @property
    def total_weights(self) -> int:
        return sum(r.numel for r in self.rows)

    @property
    def total_bits(self) -> float:
        return sum(r.numel * r.bits for r in self.rows)

    @property
    def avg_bits(self) -> float:
        return self.total_bits / self.total_weights if self.total_weights else float("nan")

    @property
    def density_vs_fp32(self) -> float:
        return 32.0 / self.avg_bits if self.rows else float("nan")

    def __str__(self) -> str:
        head = ("module", "op", "weight", "rule", "weight fmt", "act fmt", "bits/w")
        body = [(r.fqn or "<root>", r.op, "x".join(map(str, r.weight_shape)), r.rule,
                 r.weight_fmt, r.act_fmt, f"{r.bits:.3f}{'*' if r.nominal else ''}")
                for r in self.rows]
        widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
        line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
        out = [line(head), line("-" * w for w in widths), *map(line, body)]
        out.append(f"total: {len(self.rows)} ops, {self.total_weights} weights, "
                   f"{self.total_bits / 8:.0f} bytes, {self.avg_bits:.3f} bits/weight, "
                   f"{self.density_vs_fp32:.2f}x denser than float32; model holds "
                   f"{self.resident_weight_bytes} bytes of parameters and buffers")
        if any(r.nominal for r in self.rows):
            out.append("* nominal: the format's effective bits (no padding or OPQ outliers); "
                       "compiled or quantize_model_ layers count the bytes stored")
        return "\n".join(out)


def _dtype_bits(v) -> int:
    return torch.finfo(v.dtype).bits if isinstance(v, torch.Tensor) and v.is_floating_point() else 32


def _site_row(node, site) -> Row:
    """The table row of one found (and maybe planned) site of a Dynamo graph."""
    from .passes.plan import example_value
    spec = node.meta.get("qcompile_spec")
    rule = node.meta.get("qcompile_rule")
    w = example_value(site.weight)
    shape = tuple(int(s) for s in w.shape) if isinstance(w, torch.Tensor) else ()
    k = shape[site.weight_axis] if shape else None
    wf = spec.weight if spec is not None else None
    q = node.meta.get("qcompile_qtensor")
    nominal = False
    if node.meta.get("qcompile_skip_weight"):
        wf = None  # not a real tensor the backend could quantise: left as it is
    if q is not None:
        bits = q.bits_per_element
    elif wf is not None and site.kind == "linear":
        bits, nominal = wf.effective_bits(k), True
    else:
        bits = _dtype_bits(w)
    return Row(site.fqn, site.target, shape, rule.describe() if rule else "default",
               wf.key if wf else "-", spec.act.key if spec is not None and spec.act else "-",
               bits, nominal)


def _quantized_module_rows(model) -> list[Row]:
    """Rows for the layers ``quantize_model_`` already swapped (they hold packed weights and
    appear in graphs as qcompile ops, not as linears)."""
    from .backend import QuantLinear
    from .ops import qtensor_from
    rows = []
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            m = json.loads(mod.meta)
            fmt = formats.get(m["fmt"])
            shape = tuple(m["shape"])
            side = [getattr(mod, f"side_{k}") for k in mod.side_names]
            q = qtensor_from(mod.codes, mod.scales, side, mod.meta)
            rows.append(Row(name, "qcompile.linear", shape, "quantize_model_", fmt.key,
                            mod.act or "-", q.bits_per_element))
    return rows


# Graphs the blockquant backend compiled: (weak references to the graph's tensor inputs, rows).
# explain(compiled_model) picks the records whose inputs include the model's parameters.
_COMPILED: list[tuple[list, list[Row]]] = []


def record_compiled(gm, example_inputs):
    """Called by the backend after planning: remember this graph's rows for explain()."""
    from .passes.find import sites
    refs = [weakref.ref(t) for t in example_inputs if isinstance(t, torch.Tensor)]
    _COMPILED.append((refs, [_site_row(n, s) for n, s in sites(gm)]))


def _explain_compiled(compiled) -> Explanation:
    from .backend import resident_weight_bytes
    model = compiled._orig_mod
    own = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    result, seen = Explanation(), set()
    for refs, rows in reversed(_COMPILED):  # newest first: a recompile's policy wins
        if any(id(t) in own for t in (r() for r in refs) if t is not None):
            for row in rows:
                if (row.fqn, row.op, row.weight_shape) not in seen:
                    seen.add((row.fqn, row.op, row.weight_shape))
                    result.rows.append(row)
    result.rows += _quantized_module_rows(model)
    if not result.rows:
        raise RuntimeError("explain: this compiled model has no blockquant graph yet; call it "
                           "once first (torch.compile compiles lazily), or pass a policy and "
                           "example inputs: explain(model, policy, *inputs)")
    result.resident_weight_bytes = resident_weight_bytes(model)
    return result


def explain(model, policy: Policy | None = None, *example_inputs) -> Explanation:
    """Tabulate what ``policy`` (None: the backend default) does to every quantisable op that
    ``model(*example_inputs)`` runs. ``explain(compiled)`` with only a model compiled by
    ``torch.compile(..., backend="blockquant")`` reports what the backend did, after its first
    call."""
    from .backend import copy_graph_module, resident_weight_bytes
    from .passes import find_quantisable, plan
    from .passes.find import sites
    from .policy import default_policy

    if policy is None and not example_inputs and hasattr(model, "_orig_mod"):
        return _explain_compiled(model)
    if not example_inputs:
        raise TypeError("explain: give example inputs to trace the model with: "
                        "explain(model, policy, *inputs)")
    policy = default_policy() if policy is None else policy
    if not isinstance(policy, Policy):
        raise TypeError(f"explain: policy must be a qcompile.Policy or None, got "
                        f"{type(policy).__name__}")
    result = Explanation()

    def capture(gm, inputs, **_):
        g = copy_graph_module(gm)
        find_quantisable(g, with_matmul=policy.wants("matmul"))
        plan(g, policy)
        result.rows.extend(_site_row(node, site) for node, site in sites(g))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=capture, dynamic=False)(*example_inputs)
    result.rows += _quantized_module_rows(model)
    result.resident_weight_bytes = resident_weight_bytes(model)
    return result
