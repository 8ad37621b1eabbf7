"""A parametrised sweep split in two: a pairwise-covering set of its cases runs by default, the
rest of the cross product under the ``slow`` marker (``-m slow`` runs them, ``-m ''`` all).

Pairwise: every value of each parameter meets every value of each other parameter in at least
one default case, so each value (each format, dtype, layout...) and each two-way interaction
is still checked in the default run; only the higher-order combinations wait for ``-m slow``.
"""
import itertools

import pytest


def _pairs(row):
    return {(i, row[i], j, row[j]) for i, j in itertools.combinations(range(len(row)), 2)}


def covering_rows(sizes):
    """Index rows of the cross product of ``range(n) for n in sizes`` that cover every pair of
    values of two parameters, picked greedily (the row covering most uncovered pairs first, the
    earliest on a tie): deterministic, so the default run is the same on every machine."""
    rows = list(itertools.product(*(range(n) for n in sizes)))
    if len(sizes) < 2:
        return rows
    uncovered = set().union(*(_pairs(r) for r in rows))
    chosen = []
    while uncovered:
        best = max(rows, key=lambda r: len(_pairs(r) & uncovered))
        chosen.append(best)
        uncovered -= _pairs(best)
    return chosen


def pairwise(*axes):
    """pytest.param for each case of the cross product of ``axes`` (lists of values; a value
    that is a tuple gives several arguments), those outside the pairwise cover marked slow."""
    keep = set(covering_rows([len(a) for a in axes]))
    params = []
    for index in itertools.product(*(range(len(a)) for a in axes)):
        args = []
        for axis, i in zip(axes, index):
            value = axis[i]
            args.extend(value if isinstance(value, tuple) else (value,))
        params.append(pytest.param(*args, marks=() if index in keep else pytest.mark.slow))
    return params


def examples(n):
    """Hypothesis settings drawing ``n`` examples in the default profile (tests/conftest.py) and
    proportionally more under HYPOTHESIS_PROFILE=blockquant-long (ten times: the sweeps)."""
    from hypothesis import settings
    scale = settings.default.max_examples / settings.get_profile("blockquant").max_examples
    return settings(max_examples=max(1, round(n * scale)))
