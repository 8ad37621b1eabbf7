"""Tests of qcompile.codebook_optimizer and the shipped qcompile/data/codebooks.json.

Oracles: the BOF4 paper's published tables (shared reference file), closed-form facts about
the block-maximum law, simulated Gaussian blocks, and centroids worked out by hand.
"""
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile import codebook_optimizer as co

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = json.loads((ROOT / "qcompile/data/codebooks.json").read_text())
REFERENCE_PATH = Path(__file__).resolve().parents[2] / "shared/reference/codebooks.json"
PUBLISHED_BOF = ["bof4_mse_b64", "bof4_mae_b64", "bof4s_mse_b64", "bof4s_mae_b64",
                 "bof4s_mse_b32", "bof4s_mse_b128", "bof4s_mse_b256"]
EXTRA = ["bof4_mse_b32", "bof4_mse_b128", "bof4s_mae_b32", "bof4s_mae_b128", "bof3s_mse_b64"]


@pytest.fixture(scope="module")
def reference():
    if not REFERENCE_PATH.is_file():
        pytest.skip(f"published tables not found at {REFERENCE_PATH} (shared reference checkout absent)")
    return json.loads(REFERENCE_PATH.read_text())


def spec(name):
    """(bits, block_size, signed, criterion) read off a table name like bof4s_mae_b64."""
    stem, crit, size = name.split("_")
    return int(stem[3]), int(size[1:]), stem.endswith("s"), crit


def max_dev(a, b):
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


# ------------------------------------------------------------------- shipped data file
@pytest.mark.parametrize("name", PUBLISHED_BOF)
def test_shipped_table_matches_published(name, reference):
    assert max_dev(SHIPPED[name]["values"], reference[name]["values"]) < 1e-3


@pytest.mark.parametrize("name", ["nf4", "af4"])
def test_published_tables_copied_exactly(name, reference):
    assert SHIPPED[name]["values"] == reference[name]["values"]  # bit-exact, full precision
    assert SHIPPED[name]["source"] == reference[name]["source"]
    assert "provenance" not in SHIPPED[name]


@pytest.mark.parametrize("name", PUBLISHED_BOF + EXTRA)
def test_shipped_generated_schema(name):
    entry = SHIPPED[name]
    bits, size, signed, crit = spec(name)
    values = entry["values"]
    assert len(values) == 2 ** bits and all(a < b for a, b in zip(values, values[1:]))
    assert entry["block_size"] == size
    assert entry["scale"] == ("signed_absmax" if signed else "absmax")
    prov = entry["provenance"]
    assert prov["generator"] == "qcompile.codebook_optimizer" and prov["criterion"] == crit
    assert prov["command"].startswith("python -m qcompile.codebook_optimizer --write")
    dev = prov["max_abs_deviation_from_published"]
    assert (dev is None) == (name in EXTRA) and (dev is None or dev < 1e-3)


def test_shipped_file_has_about_and_nothing_unexpected():
    assert isinstance(SHIPPED["_about"], str)
    assert set(SHIPPED) == {"_about", "nf4", "af4", *PUBLISHED_BOF, *EXTRA}


# ----------------------------------------------------------------- running the optimiser
@pytest.mark.parametrize("name", PUBLISHED_BOF)
def test_fast_run_matches_published(name, reference):
    bits, size, signed, crit = spec(name)
    values = co.optimize_codebook(bits, size, signed, crit, nodes=32, tol=1e-9)
    assert max_dev(values, reference[name]["values"]) < 1e-3


def test_monte_carlo_lloyd_near_published(reference):
    values = co.optimize_codebook(4, 64, True, "mse", method="monte_carlo", n_blocks=20_000, seed=3)
    assert max_dev(values, reference["bof4s_mse_b64"]["values"]) < 1e-2


@pytest.mark.parametrize("bits", [3, 4, 5])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("criterion", ["mse", "mae"])
def test_fixed_levels_and_order(bits, signed, criterion):
    values = co.optimize_codebook(bits, 128, signed, criterion, nodes=32, tol=1e-8)
    assert len(values) == 2 ** bits
    assert all(a < b for a, b in zip(values, values[1:]))
    assert values.count(0.0) == 1 and values[-1] == 1.0
    if signed:  # BOF4-S: no level at -1, the lowest level is free and strictly inside
        assert -1.0 < values[0] < -0.3
        assert sum(v < 0 for v in values) == 2 ** (bits - 1) - 1
    else:  # BOF4: -1, 0, 1 fixed; one fewer negative level than positive ones
        assert values[0] == -1.0
        assert sum(v < 0 for v in values) == sum(v > 0 for v in values) - 1


@pytest.mark.parametrize("criterion", ["mse", "mae"])
def test_signed_and_unsigned_share_the_positive_half(criterion):
    # The non-maximal normalised values have the same symmetric law for both scalings, and
    # the positive cells only see the levels 0 and 1 around them.
    a = co.optimize_codebook(4, 64, False, criterion, nodes=64)
    b = co.optimize_codebook(4, 64, True, criterion, nodes=64)
    assert max_dev(a[7:], b[7:]) < 1e-9
    assert b[0] > -0.9 and max_dev(a[:7], b[:7]) > 0.05  # ...but not the negative half


@pytest.mark.parametrize("block_size", [2, 16, 64, 4096])
def test_quadrature_mass_matches_closed_form(block_size):
    # int f_M(m) / erf(m/sqrt2) dm = int 2 I phi(m) erf(m/sqrt2)^(I-2) dm = I / (I - 1)
    exact = block_size / (block_size - 1)
    assert float(co.GaussianBlockQuadrature(block_size, 256).mu.sum()) == pytest.approx(exact, rel=1e-13)
    assert float(co.GaussianBlockQuadrature(block_size, 64).mu.sum()) == pytest.approx(exact, rel=1e-7)


@pytest.mark.parametrize("signed", [False, True])
def test_quadrature_centroids_match_simulated_blocks(signed, reference):
    # One Lloyd step on the published cells: formulas versus real normalised blocks.
    levels = torch.tensor(reference["bof4s_mse_b64" if signed else "bof4_mse_b64"]["values"],
                          dtype=torch.float64)
    edges = torch.cat([torch.tensor([-1.0]), (levels[1:] + levels[:-1]) / 2, torch.tensor([1.0])])
    _, fixed = co.initial_levels(4, signed)
    lo, hi = edges[:-1][~fixed], edges[1:][~fixed]
    samples = co.WeightedSamples(*co.simulate_blocks(64, signed, 40_000, seed=7))
    quad = co.GaussianBlockQuadrature(64, 64)
    for crit in ("mse", "mae"):
        assert float((samples.centroids(lo, hi, crit) - quad.centroids(lo, hi, crit)).abs().max()) < 2e-3


def test_simulated_blocks_normalise_the_maximum():
    x, w = co.simulate_blocks(8, True, 100, seed=0)
    x, w = x.view(100, 8), w.view(100, 8)
    assert bool((x.max(1).values == 1.0).all()) and bool((x.min(1).values > -1.0).all())
    x, _ = co.simulate_blocks(8, False, 100, seed=0)
    assert bool((x.view(100, 8).abs().max(1).values == 1.0).all())
    assert bool((w > 0).all()) and bool((w == w[:, :1]).all())


# ------------------------------------------------------------------ centroid math by hand
def test_weighted_centroids_by_hand():
    s = co.WeightedSamples([0.1, 0.3, 0.5, 0.9, -0.2], [1.0, 2.0, 3.0, 5.0, 7.0])
    lo, hi = torch.tensor([0.0, 0.0], dtype=torch.float64), torch.tensor([0.4, 0.6], dtype=torch.float64)
    # MSE, weights squared: cell [0, 0.4): (1*0.1 + 4*0.3) / (1 + 4) = 0.26
    #                       cell [0, 0.6): (0.1 + 1.2 + 9*0.5) / (1 + 4 + 9) = 5.8 / 14
    assert s.centroids(lo, hi, "mse").tolist() == pytest.approx([0.26, 5.8 / 14], abs=1e-15)
    # MAE, weighted median: [0, 0.4): weights 1, 2 -> 0.3 ; [0, 0.6): 1, 2, 3 -> half = 3, reached at 0.3
    assert s.centroids(lo, hi, "mae").tolist() == [0.3, 0.3]
    # a heavy point dominates the median: [0, 1): 1, 2, 3, 5 -> total 11, half 5.5 -> 0.5
    assert s.centroids(torch.tensor([0.0]), torch.tensor([1.0]), "mae").tolist() == [0.5]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(-0.99, 0.99), st.floats(0.1, 10.0)), min_size=1, max_size=12))
def test_weighted_centroids_minimise_the_error(points):
    xs, ws = [p[0] for p in points], [p[1] for p in points]
    s = co.WeightedSamples(xs, ws)
    mse, mae = (float(s.centroids(torch.tensor([-1.0]), torch.tensor([1.0]), c)[0]) for c in ("mse", "mae"))

    def sq(c):
        return sum(w * w * (x - c) ** 2 for x, w in zip(xs, ws))

    def ab(c):
        return sum(w * abs(x - c) for x, w in zip(xs, ws))

    for d in (1e-3, -1e-3):
        assert sq(mse) <= sq(mse + d) + 1e-12
    assert mae in xs and all(ab(mae) <= ab(x) + 1e-9 for x in xs)


# ----------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=1), "bits"), (dict(bits=4.0), "bits"), (dict(bits=True), "bits"), (dict(bits=9), "bits"),
    (dict(block_size=1), "block_size"), (dict(block_size=64.5), "block_size"),
    (dict(criterion="l1"), "criterion"), (dict(method="grid"), "method"),
    (dict(nodes=8), "nodes"), (dict(method="monte_carlo", n_blocks=0), "n_blocks"),
])
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        co.optimize_codebook(**kwargs)


# --------------------------------------------------------------------------------- CLI
def test_cli_regenerates_the_shipped_tables(tmp_path, reference):
    out = tmp_path / "codebooks.json"
    assert co.main(["--write", str(out), "--reference", str(REFERENCE_PATH)]) == 0
    made = json.loads(out.read_text())
    assert set(made) == set(SHIPPED)
    for name in set(made) - {"_about"}:
        assert made[name]["values"] == SHIPPED[name]["values"], name
    assert made["bof4_mse_b64"]["provenance"]["command"] == (
        f"python -m qcompile.codebook_optimizer --write {out} --reference {REFERENCE_PATH}")


def test_cli_prints_one_codebook(capsys):
    assert co.main(["--bits", "3", "--block-size", "64", "--signed", "--nodes", "32"]) == 0
    values = json.loads(capsys.readouterr().out)
    assert max_dev(values, SHIPPED["bof3s_mse_b64"]["values"]) < 1e-5 and math.isclose(values[-1], 1.0)
