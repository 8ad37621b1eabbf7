"""Pass 5: fuse dequantize(W) [+ fake_quantize_act(x)] + linear/addmm into ``qcompile::linear``.

Matches linear(x', W', b) and addmm(b, x', W') where W' = qcompile::dequantize(...) and x' is
either the activation or qcompile::fake_quantize_act(x, fmt, -1). The fused op computes exactly
the same operations, so results do not change.
"""
from __future__ import annotations

import torch
from torch import fx

from qcompile import ops  # noqa: F401

from .find import linear_operands

DEQUANT = torch.ops.qcompile.dequantize.default
FQ_ACT = torch.ops.qcompile.fake_quantize_act.default
LINEAR = torch.ops.qcompile.linear.default


def fuse(gm: fx.GraphModule) -> fx.GraphModule:
    g = gm.graph
    for node in list(g.nodes):
        ops_ = linear_operands(node)
        if ops_ is None:
            continue
        x, w, b = ops_
        if not (isinstance(w, fx.Node) and w.target is DEQUANT):
            continue
        codes, scales, side, meta, impl = w.args
        act_fmt = ""
        if isinstance(x, fx.Node) and x.target is FQ_ACT and x.args[2] == -1:
            x, act_fmt = x.args[0], x.args[1]
        with g.inserting_before(node):
            fused = g.call_function(LINEAR, (x, codes, scales, side, meta, act_fmt, b, impl))
        fused.meta.update({k: v for k, v in node.meta.items() if not k.startswith("qcompile")})
        node.replace_all_uses_with(fused)
        g.erase_node(node)
        for dead in (ops_[0], w):  # the unfused producers, when nothing else reads them
            if isinstance(dead, fx.Node) and dead.target in (DEQUANT, FQ_ACT) and not dead.users:
                g.erase_node(dead)
    g.lint()
    gm.recompile()
    return gm
