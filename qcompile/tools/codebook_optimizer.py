"""Lloyd's algorithm for block-wise absmax codebooks (BOF4 and BOF4-S, arXiv:2505.06653).

Model. Weights are i.i.d. N(0, 1) cut into blocks of I values. A block is divided by its
absmax m (BOF4) or by its signed absmax s, |s| = m, the largest-magnitude element with its
sign (BOF4-S), and each normalised value x is replaced by its nearest codebook level q. The
error is counted in the original scale, z - scale*q = scale*(x - q), so every normalised value
carries the weight w = m of its block:

    MSE: minimise E[m^2 (x - q)^2]  ->  cell centroid sum(m^2 x) / sum(m^2)
    MAE: minimise E[m |x - q|]      ->  cell centroid = median of x weighted by m

Because m scales a whole block, nearest-level (midpoint) cells are optimal for both criteria,
and Lloyd's algorithm alternates cells and weighted centroids until the levels stop moving.

Fixed levels. BOF4 keeps {-1, 0, 1}, BOF4-S keeps {0, 1}. The block maximum lands exactly on
+-1 (BOF4) or +1 (BOF4-S), a fixed level, with zero error: it never falls in a free cell, so it
moves no free level whether or not it is counted. The free levels are fitted to the other
I - 1 values. Their law is the same for both scalings: given M = m they are i.i.d. normals
truncated to |z| < m, and dividing by +m or by -m leaves that law symmetric on (-1, 1). The
BOF4-S table is asymmetric only because its codebook has no level at -1 (the value -1 itself
never occurs, since only the maximum reaches magnitude 1 and it maps to +1): values near -1,
from an opposite-sign element almost as large as the maximum, are served by a free lowest
level (about -0.86 for MSE, I = 64). The positive halves of BOF4 and BOF4-S coincide.

Two ways to evaluate the centroids:
  "quadrature" (default, deterministic): the x-integrals over a cell are closed-form given
      M = m, and the integral over m is done by composite Gauss-Legendre quadrature;
  "monte_carlo": Lloyd on simulated blocks, an independent check of the formulas above.

Shipped tables. Where the BOF4 paper publishes a table (its Tables 6/7), qcompile ships the
published numbers (provenance "published"); this optimiser's table for that configuration is
recorded beside it, with its distance from the published one (below 1e-3 per level), as a check.
The optimiser's tables are shipped for the other block sizes and bit widths (provenance
"optimised"). See qcompile.formats.codebooks.

CLI:  python -m qcompile.tools.codebook_optimizer --write qcompile/data/codebooks.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

CRITERIA = ("mse", "mae")
METHODS = ("quadrature", "monte_carlo")
_F64 = torch.float64


def _check(bits, block_size, criterion, method, nodes, n_blocks) -> None:
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(bits) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8 (a codebook of 2**bits levels), got {bits!r}")
    if not is_int(block_size) or block_size < 2:
        raise ValueError(f"block_size must be an integer >= 2 (values per absmax block), got {block_size!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {CRITERIA}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if not is_int(nodes) or nodes < 16:
        raise ValueError(f"nodes must be an integer >= 16 (quadrature points over the block max), got {nodes!r}")
    if not is_int(n_blocks) or n_blocks < 1:
        raise ValueError(f"n_blocks must be a positive integer (Monte-Carlo blocks), got {n_blocks!r}")


def initial_levels(bits: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending starting levels and the mask of the fixed ones.

    Both variants get 2**(bits-1) - 1 free positive levels. BOF4 has 2**(bits-1) - 2 free
    negative levels between -1 and 0 (NF4's layout); BOF4-S, with no level at -1, has
    2**(bits-1) - 1 and its lowest level is free. Lloyd keeps levels in order (a centroid stays
    inside its cell), so this split is kept.
    """
    half = 2 ** (bits - 1)
    pos = [k / half for k in range(1, half)]
    if signed:
        neg = [-k / (half - 1) for k in range(half - 1, 0, -1)]
        levels, fixed = neg + [0.0] + pos + [1.0], [0.0, 1.0]
    else:
        neg = [-k / (half - 1) for k in range(half - 2, 0, -1)]
        levels, fixed = [-1.0] + neg + [0.0] + pos + [1.0], [-1.0, 0.0, 1.0]
    levels = torch.tensor(levels, dtype=_F64)
    return levels, torch.isin(levels, torch.tensor(fixed, dtype=_F64))


# ----------------------------------------------------------------------------- samples
class WeightedSamples:
    """Weighted 1-D samples with the weighted centroid of any interval cell [lo, hi).

    Sorted once, with prefix sums of w, w^2 and w^2 x, so one Lloyd step costs O(cells log n).
    """

    def __init__(self, x, w):
        x = torch.as_tensor(x, dtype=_F64).flatten()
        w = torch.as_tensor(w, dtype=_F64).flatten()
        self.x, order = torch.sort(x)
        w = w[order]
        zero = torch.zeros(1, dtype=_F64)
        self.cw = torch.cat([zero, torch.cumsum(w, 0)])
        self.cw2 = torch.cat([zero, torch.cumsum(w * w, 0)])
        self.cw2x = torch.cat([zero, torch.cumsum(w * w * self.x, 0)])

    def centroids(self, lo, hi, criterion: str, current=None) -> torch.Tensor:
        lo, hi = torch.as_tensor(lo, dtype=_F64), torch.as_tensor(hi, dtype=_F64)
        i, j = torch.searchsorted(self.x, lo), torch.searchsorted(self.x, hi)  # x[i:j] in [lo, hi)
        if criterion == "mse":  # sum(w^2 x) / sum(w^2)
            c = (self.cw2x[j] - self.cw2x[i]) / (self.cw2[j] - self.cw2[i])
        else:  # weighted median: first x whose cumulative weight within the cell reaches half
            half = (self.cw[i] + self.cw[j]) / 2
            k = torch.searchsorted(self.cw, half) - 1
            c = self.x[torch.minimum(torch.maximum(k, i), (j - 1).clamp(min=0))]
        empty = j <= i
        if empty.any():  # an empty cell keeps its level (or its midpoint)
            keep = (lo + hi) / 2 if current is None else torch.as_tensor(current, dtype=_F64)
            c = torch.where(empty, keep, c)
        return c


def simulate_blocks(block_size: int, signed: bool, n_blocks: int, seed: int = 0,
                    chunk: int = 1 << 20):
    """Normalised values x and block weights w (= absmax) of n_blocks Gaussian blocks."""
    gen = torch.Generator().manual_seed(seed)
    xs, ws = [], []
    rows = max(1, chunk // block_size)
    for start in range(0, n_blocks, rows):
        z = torch.randn(min(rows, n_blocks - start), block_size, generator=gen, dtype=_F64)
        s = z.gather(1, z.abs().argmax(1, keepdim=True))  # signed absmax of each block
        scale = s if signed else s.abs()
        xs.append((z / scale).flatten())  # the maximum itself becomes exactly +-1
        ws.append(s.abs().expand_as(z).flatten())
    return torch.cat(xs), torch.cat(ws)


# -------------------------------------------------------------------------- quadrature
def _gauss_legendre(k: int):
    """Nodes and weights of k-point Gauss-Legendre on [-1, 1] (Golub-Welsch)."""
    i = torch.arange(1, k, dtype=_F64)
    beta = i / torch.sqrt(4 * i * i - 1)
    nodes, vecs = torch.linalg.eigh(torch.diag(beta, 1) + torch.diag(beta, -1))
    return nodes, 2 * vecs[0] ** 2


def _phi(t):
    return torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)


class GaussianBlockQuadrature:
    """Exact-in-x, quadrature-in-m centroids of the non-maximal normalised values.

    M = max|z| has CDF F(m) = erf(m/sqrt2)^I and density f(m) = 2 I phi(m) erf(m/sqrt2)^(I-1).
    Given M = m, a non-maximal value has density m phi(m x) / erf(m/sqrt2) in x on (-1, 1).
    Over a cell [a, b] the x-integrals are closed-form,
        int_a^b   m phi(m x) dx = Phi(m b) - Phi(m a)
        int_a^b x m phi(m x) dx = (phi(m a) - phi(m b)) / m,
    so with rho(m) = f(m) / erf(m/sqrt2):
        MSE centroid = int rho m (phi(ma) - phi(mb)) dm  /  int rho m^2 (Phi(mb) - Phi(ma)) dm
        MAE centroid = c solving W(c) = (W(a) + W(b)) / 2,  W(c) = int rho m Phi(m c) dm.
    The m-integral runs where all but ~2 eps of the mass of rho lies, with composite
    16-point Gauss-Legendre panels; the integrand is smooth, so a few hundred nodes suffice.
    """

    def __init__(self, block_size: int, nodes: int = 256, eps: float = 1e-15):
        def quantile(log_p, k):  # m with erf(m/sqrt2)^k = p, via the upper tail 1 - Phi(m) = (1 - p^(1/k)) / 2
            tail = -math.expm1(log_p / k) / 2
            return -float(torch.special.ndtri(torch.tensor(tail, dtype=_F64)))

        # rho ~ erf^(I-2) phi near 0 integrates like erf^(I-1), hence the power I-1 at the lower end
        lo, hi = quantile(math.log(eps), block_size - 1), quantile(math.log1p(-eps), block_size)
        gx, gw = _gauss_legendre(16)
        edges = torch.linspace(lo, hi, max(1, nodes // 16) + 1, dtype=_F64)
        mid, half = (edges[1:] + edges[:-1]) / 2, (edges[1:] - edges[:-1]) / 2
        m = (mid[:, None] + half[:, None] * gx).flatten()
        q = (half[:, None] * gw).flatten()
        e = torch.special.erf(m / math.sqrt(2))
        log_e = torch.where(m < 1, torch.log(e), torch.log1p(-torch.special.erfc(m / math.sqrt(2))))
        rho = 2 * block_size * _phi(m) * torch.exp((block_size - 2) * log_e)
        self.m, self.mu = m, q * rho  # sum(mu * g(m)) = int rho(m) g(m) dm

    def _w(self, c):  # W(c) for a vector of c
        return (self.mu * self.m * torch.special.ndtr(c[:, None] * self.m)).sum(1)

    def centroids(self, lo, hi, criterion: str, current=None) -> torch.Tensor:
        m, mu = self.m, self.mu
        a, b = torch.as_tensor(lo, dtype=_F64)[:, None], torch.as_tensor(hi, dtype=_F64)[:, None]
        if criterion == "mse":
            num = (mu * m * (_phi(a * m) - _phi(b * m))).sum(1)
            den = (mu * m * m * (torch.special.ndtr(b * m) - torch.special.ndtr(a * m))).sum(1)
            return num / den
        # MAE: safeguarded Newton on W(c) = target, W'(c) = int rho m^2 phi(m c) dm > 0.
        a, b = a[:, 0].clone(), b[:, 0].clone()
        target = (self._w(a) + self._w(b)) / 2
        c = (a + b) / 2 if current is None else torch.as_tensor(current, dtype=_F64).clamp(a, b)
        for _ in range(100):
            f = self._w(c) - target
            a, b = torch.where(f < 0, c, a), torch.where(f > 0, c, b)
            new = c - f / (mu * m * m * _phi(c[:, None] * m)).sum(1)
            new = torch.where((new >= a) & (new <= b), new, (a + b) / 2)  # bisect if Newton leaves
            done = bool((new - c).abs().max() < 1e-14)
            c = new
            if done:
                break
        return c


# ------------------------------------------------------------------------------- Lloyd
def lloyd(model, levels: torch.Tensor, fixed: torch.Tensor, criterion: str,
          tol: float = 1e-12, max_iter: int = 100_000) -> torch.Tensor:
    """Alternate midpoint cells and weighted centroids; fixed levels never move."""
    levels, free = levels.clone(), ~fixed
    one = torch.ones(1, dtype=_F64)
    for _ in range(max_iter):
        edges = torch.cat([-one, (levels[1:] + levels[:-1]) / 2, one])
        new = model.centroids(edges[:-1][free], edges[1:][free], criterion, levels[free])
        step = float((new - levels[free]).abs().max())
        levels[free] = new
        if step < tol:
            break
    return levels


def optimize_codebook(bits: int = 4, block_size: int = 64, signed: bool = False,
                      criterion: str = "mse", *, method: str = "quadrature", nodes: int = 256,
                      n_blocks: int = 200_000, seed: int = 0, tol: float = 1e-12,
                      max_iter: int = 100_000) -> list[float]:
    """Lloyd-optimal codebook for absmax (signed=False, BOF4) or signed-absmax (BOF4-S) blocks.

    Returns 2**bits ascending levels in [-1, 1]. `nodes` sets the quadrature size (method
    "quadrature"); `n_blocks` and `seed` the simulated sample (method "monte_carlo").
    """
    _check(bits, block_size, criterion, method, nodes, n_blocks)
    if method == "quadrature":
        model = GaussianBlockQuadrature(block_size, nodes)
    else:
        model = WeightedSamples(*simulate_blocks(block_size, bool(signed), n_blocks, seed))
    levels, fixed = initial_levels(bits, bool(signed))
    return [float(v) for v in lloyd(model, levels, fixed, criterion, tol, max_iter)]


# --------------------------------------------------------------------------------- CLI
# name -> (bits, block_size, signed, criterion)
GENERATED = {
    f"bof{bits}{'s' if signed else ''}_{crit}_b{size}": (bits, size, signed, crit)
    for bits, signed, crit, size in [
        (4, False, "mse", 64), (4, False, "mae", 64), (4, True, "mse", 64), (4, True, "mae", 64),
        (4, True, "mse", 32), (4, True, "mse", 128), (4, True, "mse", 256),
        (4, False, "mse", 32), (4, False, "mse", 128), (4, True, "mae", 32), (4, True, "mae", 128),
        (3, True, "mse", 64),
    ]
}
DEFAULT_REFERENCE = Path(__file__).resolve().parents[3] / "shared/reference/codebooks.json"
CONVERSION = ("each published decimal, as printed, rounded once to the nearest float32 (ties to "
              "even) in exact rational arithmetic (qcompile.codebooks.decimal_to_float32); values "
              "holds those float32 numbers written exactly")


def _f32(v: float) -> float:
    """Round to float32 and keep 9 significant digits (enough to recover the float32 exactly)."""
    return float(f"{float(torch.tensor(v, dtype=torch.float32)):.9g}")


def _scale_kind(text: str) -> str:
    if text.startswith("signed"):
        return "signed_absmax"
    if text.startswith("absmax"):
        return "absmax"
    raise SystemExit(f"unknown scale {text!r} in the published tables")


def published_tables(reference: Path, previous: dict) -> dict:
    """name -> {decimals, block_size, scale, source, thresholds} of every published table.

    Read from the reference file (its numbers kept as the decimal text printed there); without
    one, from the published entries of the file being rewritten, whose provenance keeps the
    same decimals, so a checkout without the reference regenerates the same file."""
    if reference.is_file():
        ref = json.loads(reference.read_text(), parse_float=str)
        return {name: {"decimals": [str(v) for v in e["values"]], "block_size": e["block_size"],
                       "scale": _scale_kind(e["scale"]), "source": e["source"],
                       "thresholds": [str(t) for t in e["thresholds"]] if "thresholds" in e
                       else None}
                for name, e in ref.items() if not name.startswith("_")}
    kept = {name: e for name, e in previous.items()
            if not name.startswith("_") and e.get("provenance", {}).get("kind") == "published"}
    if not kept:
        raise SystemExit(f"no published tables: {reference} is absent and the file being rewritten "
                         f"holds none; pass --reference")
    return {name: {"decimals": e["provenance"]["published_values"], "block_size": e["block_size"],
                   "scale": e["scale"], "source": e["source"],
                   "thresholds": e["provenance"].get("published_thresholds")}
            for name, e in kept.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qcompile.tools.codebook_optimizer", description=__doc__.split("\n")[0])
    p.add_argument("--write", type=Path, help="write all shipped tables to this JSON file")
    p.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE,
                   help="published tables, shipped as published (default: the shared reference; "
                        "without it, the published tables already in the --write file are kept)")
    p.add_argument("--nodes", type=int, default=256, help="quadrature nodes over the block max")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--signed", action="store_true", help="signed absmax (BOF4-S)")
    p.add_argument("--criterion", choices=CRITERIA, default="mse")
    args = p.parse_args(argv)
    if args.write is None:  # print one codebook
        print(json.dumps(optimize_codebook(args.bits, args.block_size, args.signed, args.criterion,
                                           nodes=args.nodes)))
        return 0

    from tqdm import tqdm

    from qcompile.formats import codebooks

    previous = json.loads(args.write.read_text()) if args.write.is_file() else {}
    published = published_tables(args.reference, previous)
    command = "python -m qcompile.tools.codebook_optimizer " + " ".join(sys.argv[1:] if argv is None else argv)
    method = (f"Lloyd's algorithm, semi-analytic centroids of block-normalised N(0,1) values "
              f"(closed form in x, {args.nodes}-node Gauss-Legendre over the block max), "
              f"converged to 1e-12")
    out = {"_about": "Normalised block-wise codebooks (ascending values in [-1, 1]). "
                     "provenance.kind 'published': numbers copied from a publication (source), "
                     "the printed decimals in provenance.published_values, values their nearest "
                     "float32; 'optimised': made by qcompile.tools.codebook_optimizer where no table is "
                     "published."}
    for name, pub in published.items():
        prov = {"kind": codebooks.PUBLISHED, "published_values": pub["decimals"],
                "conversion": CONVERSION}
        if pub["thresholds"] is not None:
            prov["published_thresholds"] = pub["thresholds"]
        out[name] = {"values": [codebooks.decimal_to_float32(d) for d in pub["decimals"]],
                     "block_size": pub["block_size"], "scale": pub["scale"],
                     "source": pub["source"], "provenance": prov}
    optimised = {}
    for name, (bits, size, signed, crit) in (bar := tqdm(GENERATED.items(), desc="codebooks")):
        bar.set_postfix_str(name)
        values = [_f32(v) for v in optimize_codebook(bits, size, signed, crit, nodes=args.nodes)]
        record = {"generator": "qcompile.tools.codebook_optimizer", "command": command,
                  "criterion": crit, "method": method}
        if name in out:  # published: the optimiser's table is kept as a check, not shipped
            entry = out[name]
            scale = "signed_absmax" if signed else "absmax"
            if (entry["block_size"], entry["scale"]) != (size, scale):
                raise SystemExit(f"{name}: published as block {entry['block_size']} "
                                 f"{entry['scale']}, its name says block {size} {scale}")
            dev = float(f"{max(abs(a - b) for a, b in zip(values, entry['values'])):.3g}")
            entry["provenance"]["optimiser"] = {**record, "values": values,
                                                "max_abs_deviation_from_published": dev}
            continue
        optimised[name] = {
            "values": values, "block_size": size, "scale": "signed_absmax" if signed else "absmax",
            "source": "BOF4 paper (arXiv:2505.06653) method, Lloyd-optimised here (no published table)",
            "provenance": {"kind": codebooks.OPTIMISED, **record},
        }
    out.update(optimised)
    args.write.parent.mkdir(parents=True, exist_ok=True)
    args.write.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {len(out) - 1} tables ({len(published)} published, {len(optimised)} optimised) "
          f"to {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
