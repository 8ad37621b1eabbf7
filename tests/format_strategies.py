"""Shared Hypothesis strategies and readers of the format tests (test modules do not import
each other)."""
import numpy as np
from hypothesis import strategies as st

import oracles as O


def codes_of(q, bits, n):
    """The element codes of every row of a QTensor, read with the oracle's unpacking."""
    return [O.unpack_codes(row, bits, n) for row in q.codes.reshape(-1, q.codes.shape[-1]).tolist()]


@st.composite
def tiled(draw, block_strategy, block, max_rows=2, max_blocks=2):
    """Rows of blocks of `block` elements, each made from one drawn block (its maximum, ties and
    near ties; at most `block` long) topped up with seeded copies of its own elements and put in
    a seeded order: the ties of a fully drawn block at a fraction of Hypothesis' drawing cost.
    Copies never change a block's maximum, so the drawn block still fixes the scale."""
    rows, nblocks = draw(st.integers(1, max_rows)), draw(st.integers(1, max_blocks))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    out = []
    for _ in range(rows):
        row = []
        for _ in range(nblocks):
            xs = np.array(draw(block_strategy), dtype=np.float32)
            xs = np.concatenate([xs, xs[rng.integers(0, xs.size, block - xs.size)]])
            rng.shuffle(xs)
            row.append(xs)
        out.append(np.concatenate(row))
    return np.array(out, dtype=np.float32)
