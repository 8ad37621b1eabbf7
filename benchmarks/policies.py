"""The policies the speed, framework and moe measurements share (a module of its own, below
all three, so that none of them imports another for it)."""
from __future__ import annotations

from qcompile import LayerSpec, Policy


def every_linear(fmt: str, act: str | None = None, embedding: bool = True) -> Policy:
    """``fmt`` on the weights of every linear layer, lm_head included, and on every embedding
    table (a tied embedding / lm_head pair shares one packed table): the setting the speed
    goals name. ``act``: the linear layers' activation format too. ``embedding=False``: the
    tables stay in full precision (what ``qcompile.export`` can package)."""
    rules = {"*": LayerSpec(weight=fmt, op="embedding")} if embedding else {}
    return Policy(rules, default=LayerSpec(weight=fmt, act=act))
