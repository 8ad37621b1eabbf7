"""The numerical core: every number format and its exact arithmetic, with no knowledge of
torch.compile or transformers.

``names()`` lists the presets and ``get(name, **overrides)`` returns a ``Format`` (presets.py).
The modules beside it: bits (float32 bit tricks), elements and scales (the two halves of a
format), codebooks (shipped and data-dependent tables), packing (codes in bytes), qtensor (the
quantised tensor) and reference (the quantise/dequantise every kernel is checked against).
"""
from .presets import Format, get, key_rebuilds, markdown_table, names

__all__ = ["Format", "get", "names", "key_rebuilds", "markdown_table"]
