"""Codebook tables: shipped data (published and optimiser-made), dynamic-exponent maps, and the
data-dependent quantile codebook.

Every shipped table (qcompile/data/codebooks.json) says where its numbers come from in
``provenance["kind"]``, read with ``provenance(name)``:

  "published"  copied as numbers from a publication (``source`` names it: paper, table or
               appendix). ``provenance["published_values"]`` keeps the decimals exactly as printed;
               ``values`` holds each decimal rounded once to the nearest float32 (ties to even,
               exact rational arithmetic), written exactly. NF4, AF4 and the BOF4 paper's Tables
               6/7 (BOF4/BOF4-S, MSE/MAE at block 64; BOF4-S MSE at blocks 32, 128, 256). Where
               the optimiser also ran for that configuration, its table and its distance from the
               published one are recorded under ``provenance["optimiser"]``, as a check only.
  "optimised"  made by qcompile.tools.codebook_optimizer (Lloyd's algorithm, the BOF4 paper's method)
               for the configurations the paper publishes no table for.
"""
from __future__ import annotations

import json
from fractions import Fraction
from functools import lru_cache
from importlib import resources

import torch


PUBLISHED, OPTIMISED = "published", "optimised"
PROVENANCES = (PUBLISHED, OPTIMISED)


@lru_cache(maxsize=None)
def shipped() -> dict:
    """qcompile/data/codebooks.json: name -> {values, block_size, scale, source, provenance}."""
    text = resources.files("qcompile").joinpath("data/codebooks.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def _entry(name: str) -> dict:
    data = shipped()
    if name not in data:
        raise ValueError(f"no shipped codebook {name!r}; available: {', '.join(sorted(data))}")
    return data[name]


def provenance(name: str) -> str:
    """Where a shipped table's numbers come from: "published" (copied from a publication) or
    "optimised" (made by qcompile.tools.codebook_optimizer)."""
    return _entry(name)["provenance"]["kind"]


def names(kind: str | None = None) -> list[str]:
    """Shipped table names, all or those of one provenance ("published" / "optimised")."""
    if kind is not None and kind not in PROVENANCES:
        raise ValueError(f"unknown provenance {kind!r}; choose one of {PROVENANCES}")
    return [n for n, e in shipped().items() if kind is None or e["provenance"]["kind"] == kind]


def source(name: str) -> str:
    """Where a shipped table comes from (a publication and its table, or the optimiser)."""
    return _entry(name)["source"]


def published_values(name: str) -> tuple[str, ...]:
    """A published table's decimals exactly as printed (``table(name)`` is their float32)."""
    entry = _entry(name)
    if entry["provenance"]["kind"] != PUBLISHED:
        raise ValueError(f"codebook {name!r} is {entry['provenance']['kind']}, not published")
    return tuple(entry["provenance"]["published_values"])


def decimal_to_float32(text: str) -> float:
    """A decimal as printed (e.g. "-0.7535245418548584") -> the float32 nearest to its exact
    value, ties to even: how published tables become the float32 ``values`` shipped."""
    return _round_f32(Fraction(str(text)))


def table(name: str) -> tuple[float, ...]:
    """A shipped table's float32 levels (ascending)."""
    return tuple(float(torch.tensor(v, dtype=torch.float32)) for v in _entry(name)["values"])


def block_table(stem: str, block_size: int | None) -> str:
    """Name of the shipped table of a codebook family (e.g. "bof4s_mse") for this block size.

    BOF4 tables depend on the block size they were made for (published by the BOF4 paper, or
    optimised here where it publishes none: see ``provenance``); when no table exists for the
    asked size the 64-element table is used and the caller is warned.
    """
    name = f"{stem}_b{block_size}"
    if name in shipped():
        return name
    import warnings
    sizes = sorted(int(k.rsplit("_b", 1)[1]) for k in shipped() if k.startswith(stem + "_b"))
    warnings.warn(f"no {stem} codebook for block size {block_size} (have {sizes}, published or "
                  f"optimised); using the block-64 table. Make one with python -m "
                  f"qcompile.tools.codebook_optimizer", stacklevel=3)
    return f"{stem}_b64"


def dynamic_exponent_map(bits: int, exponent_bits: int) -> tuple[float, ...]:
    """Signed dynamic-exponent data type (Dettmers 2016; bitsandbytes create_dynamic_map).

    For exponent level i = 0..E-1 the fraction interval [0.1, 1] is cut into 2**i equal parts
    whose midpoints are scaled by 10**(i - E + 1), giving +-values; 0 and 1 complete the table.
    Computed in exact rationals, rounded once to float32.
    """
    if exponent_bits != bits - 1:
        raise ValueError("dynamic exponent maps here use bits - 1 exponent levels")
    values = [Fraction(0), Fraction(1)]
    for i in range(exponent_bits):
        parts = 2**i
        for j in range(parts):
            mid = Fraction(1, 10) + Fraction(9, 10) * Fraction(2 * j + 1, 2 * parts)
            v = mid * Fraction(10) ** (i - exponent_bits + 1)
            values += [v, -v]
    return tuple(sorted(float(torch.tensor(float(v), dtype=torch.float32)) for v in values))


def _round_f32(r: Fraction) -> float:
    """The float32 nearest to the rational r, ties to even (one rounding: float(r) is the nearest
    float64, whose cast to float32 may round a second time, so the neighbours are compared)."""
    g = torch.tensor(float(r), dtype=torch.float32)
    cands = [torch.nextafter(g, torch.tensor(d, dtype=torch.float32)) for d in (-1e38, 1e38)]
    best = min([g] + cands, key=lambda c: (abs(Fraction(c.item()) - r),
                                          int(c.view(torch.int32)) & 1))
    return best.item()


def quantile_codebook(normalised: torch.Tensor, bits: int) -> torch.Tensor:
    """2**bits levels at the tensor's own quantiles (the quantile type of Dettmers & Zettlemoyer):
    level i = Q(i / (2**bits - 1)) for i = 0..2**bits - 1, Q the linearly interpolated empirical
    quantile of the block-normalised values (so the extremes, where every block maximum lands,
    are levels), then divided by the largest |level| so the table spans [-1, 1]. The levels are
    computed exactly (rationals) and rounded once to float32 (ascending)."""
    v = normalised.flatten().to(torch.float64).sort().values
    return quantile_levels(lambda at: v[at].tolist(), v.numel(), bits, normalised.device)


def quantile_levels(ranked, count: int, bits: int, device=None) -> torch.Tensor:
    """quantile_codebook's table from the order statistics of ``count`` values: ``ranked(at)``
    gives the values at 0-based positions ``at`` (an int64 tensor) of the values sorted
    ascending, as Python floats (the values being float32, e.g. gathered across the ranks
    holding parts of one tensor: qcompile.tensor_parallel)."""
    n = 2**bits
    if count == 0:
        return torch.linspace(-1, 1, n, dtype=torch.float32, device=device)
    last = count - 1
    at = [divmod(i * last, n - 1) for i in range(n)]  # i * last / (n - 1) = lo + rem / (n - 1)
    wanted = sorted({p for lo, _ in at for p in (lo, min(lo + 1, last))})
    value = dict(zip(wanted, ranked(torch.tensor(wanted, dtype=torch.int64))))
    levels = []
    for lo, rem in at:
        a, b = Fraction(value[lo]), Fraction(value[min(lo + 1, last)])
        levels.append(a + Fraction(rem, n - 1) * (b - a))
    peak = max(abs(t) for t in levels)
    if peak > 0:
        levels = [t / peak for t in levels]
    return torch.tensor(sorted(_round_f32(t) for t in levels), dtype=torch.float32,
                        device=device)
