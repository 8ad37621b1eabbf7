"""QCOMPILE_DEBUG=1 prints the graph after each pass (to stderr)."""
from __future__ import annotations

import os
import sys


def enabled() -> bool:
    return os.environ.get("QCOMPILE_DEBUG", "") not in ("", "0")


def debug_graph(gm, stage: str):
    if enabled():
        print(f"[qcompile] graph after {stage}:\n{gm.graph}", file=sys.stderr)
    return gm
