"""What the passes decided, one ``Row`` per quantisable op: the record explain() tabulates.

Rows are made from a graph after planning and quantising (before rewriting), so they say what
the compiled graph runs: the module, the op, the rule that matched, the formats and the bits
per weight (stored bytes where a weight was packed, the format's nominal bits otherwise) and
the weight's own dtype (what the quantised bits are compared with). Which kernel each op ran is
known only once it has run: explain fills ``kernel`` in then.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .find import op_record, sites
from .graph import graph_record
from .plan import dtype_bits, example_value


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
    note: str = ""  # how the weight is quantised when not ahead of time, or why it is not
    index: int = 0  # the op's position among this module's ops of the same kind (0, 1, ...)
    qtensor: object = field(default=None, repr=False, compare=False)  # the packed weight
    dtype: str = ""  # the weight's own dtype ("float32", "bfloat16", ...); "" if not known
    tied: tuple = ()  # the other modules that held this weight when it was quantised
    kernel: str = "-"  # what ran: "cpu (...)", "triton", "reference (why)", "not run yet"

    @property
    def numel(self) -> int:
        n = 1
        for s in self.weight_shape:
            n *= s
        return n


def site_rows(gm) -> list[Row]:
    """A Row for every found site of ``gm`` (planned or not), then one per skipped layer."""
    rows, seen = [], {}
    readers: dict[int, list[str]] = {}  # id(packed weight) -> the modules whose ops read it
    for node, site in sites(gm):
        q = op_record(node).qtensor
        if q is not None:
            readers.setdefault(id(q), []).append(site.fqn)
    for node, site in sites(gm):
        op = op_record(node)
        spec, rule, q = op.spec, op.rule, op.qtensor
        w = example_value(site.weight)
        shape = tuple(int(s) for s in w.shape) if isinstance(w, torch.Tensor) else ()
        wf = spec.weight if spec is not None else None
        note = op.note or _tied_note(site, q, readers)
        nominal = False
        if q is not None:
            bits = q.bits_per_element
        elif wf is not None:
            bits, nominal = wf.effective_bits(shape[site.weight_axis] if shape else None), True
        else:
            bits = dtype_bits(w)
        index = seen.get((site.fqn, site.target), 0)
        seen[(site.fqn, site.target)] = index + 1
        rows.append(Row(site.fqn, site.target, shape, rule.describe() if rule else "default",
                        wf.key if wf else "-",
                        spec.act.key if spec is not None and spec.act else "-",
                        bits, nominal, note, index, q, dtype_name(getattr(w, "dtype", None)),
                        tuple(site.tied)))
    for s in graph_record(gm).skipped:
        rows.append(Row(s.fqn, "-", s.weight_shape, s.rule, "-", "-", float(s.bits),
                        note=f"skipped: {s.reason}"))
    return rows


def dtype_name(dtype) -> str:
    """"float32" for torch.float32; "" for anything else (None, an integer dtype)."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return str(dtype).removeprefix("torch.")
    return ""


def _tied_note(site, q, readers) -> str:
    """For a weight shared with other modules: whether its packed tensor is shared too."""
    if not site.tied:
        return ""
    others = ", ".join(site.tied)
    if q is None:
        return f"tied to {others}"
    sharing = [n for n in readers.get(id(q), ()) if n != site.fqn]
    if sharing:
        return f"one packed table with {', '.join(sharing)}"
    return f"tied to {others}: its own packed copy"
