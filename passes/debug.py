"""QCOMPILE_DEBUG=1 prints the graph after each pass (to stderr).

The variable is read through qcompile.config: 1/true/yes/on turn it on, 0/false/no/off or unset
leave it off, anything else is an error that names the variable."""
from __future__ import annotations

import sys

from qcompile import config


def enabled() -> bool:
    return config.debug()


def debug_graph(gm, stage: str):
    if enabled():
        print(f"[qcompile] graph after {stage}:\n{gm.graph}", file=sys.stderr)
    return gm
