"""Tests of qcompile.tools.codebook_optimizer and the shipped qcompile/data/codebooks.json.

Correctness oracles: the BOF4 paper's published tables as the tests' own copy holds them
(tests/data/published_codebooks.json through tests/oracles.py; the optimiser never writes that
file), closed-form facts about the block-maximum law, simulated Gaussian blocks, and centroids
worked out by hand. Comparisons with qcompile/data/codebooks.json, which the optimiser's CLI
writes, are regression checks only: they say the optimiser still makes the tables it made.
"""
import functools
import json
import math
import shutil
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import oracles as O
from qcompile.tools import codebook_optimizer as co

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_PATH = ROOT / "qcompile/data/codebooks.json"
SHIPPED = json.loads(SHIPPED_PATH.read_text())
TEST_COPY_PATH = ROOT / "tests/data/published_codebooks.json"  # same layout as the shared file
PUBLISHED_BOF = ["bof4_mse_b64", "bof4_mae_b64", "bof4s_mse_b64", "bof4s_mae_b64",
                 "bof4s_mse_b32", "bof4s_mse_b128", "bof4s_mse_b256"]
EXTRA = ["bof4_mse_b32", "bof4_mse_b128", "bof4s_mae_b32", "bof4s_mae_b128", "bof3s_mse_b64"]


# the published levels, each printed decimal rounded once to float32 (the tests' copy)
PUBLISHED = {name: list(O.published_f32(name)) for name in PUBLISHED_BOF}


def spec(name):
    """(bits, block_size, signed, criterion) read off a table name like bof4s_mae_b64."""
    stem, crit, size = name.split("_")
    return int(stem[3]), int(size[1:]), stem.endswith("s"), crit


def max_dev(a, b):
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def nearest_f32(decimal: str) -> float:
    """The float32 nearest to a decimal, by exact comparison with its two float32 neighbours."""
    r = Fraction(decimal)
    g = torch.tensor(float(r), dtype=torch.float32)
    cands = [g] + [torch.nextafter(g, torch.tensor(d, dtype=torch.float32)) for d in (-2.0, 2.0)]
    return min((c.item() for c in cands), key=lambda c: abs(Fraction(c) - r))


def without_commands(entries: dict) -> dict:
    """The file's entries with the optimiser's recorded command line blanked."""
    out = json.loads(json.dumps(entries))
    for e in out.values():
        if isinstance(e, dict):
            prov = e["provenance"]
            for rec in (prov, prov.get("optimiser", {})):
                if "command" in rec:
                    rec["command"] = "..."
    return out


# ------------------------------------------------------------------- shipped data file
@pytest.mark.parametrize("name", PUBLISHED_BOF + ["nf4", "af4"])
def test_shipped_published_tables_are_the_printed_decimals_in_float32(name):
    entry = SHIPPED[name]
    prov = entry["provenance"]
    assert prov["kind"] == "published"
    assert all(isinstance(d, str) for d in prov["published_values"])
    assert entry["values"] == [nearest_f32(d) for d in prov["published_values"]]
    assert "nearest float32" in prov["conversion"]


@pytest.mark.parametrize("name", PUBLISHED_BOF + ["nf4", "af4"])
def test_shipped_published_tables_match_the_tests_copy(name):
    """The package's published tables are the tests' copy of the publications' numbers
    (tests/data/published_codebooks.json, laid out as ../shared/reference/codebooks.json),
    decimal text for decimal text."""
    shared = O.PUBLISHED_DECIMALS[name]
    entry = SHIPPED[name]
    assert entry["provenance"]["published_values"] == shared["values"]
    assert entry["source"] == shared["source"] and entry["block_size"] == shared["block_size"]
    assert entry["provenance"].get("published_thresholds") == shared.get("thresholds")


@pytest.mark.parametrize("name", PUBLISHED_BOF)
def test_shipped_published_tables_record_the_optimiser_check(name):
    entry = SHIPPED[name]
    bits, size, signed, crit = spec(name)
    assert entry["block_size"] == size
    assert entry["scale"] == ("signed_absmax" if signed else "absmax")
    assert "BOF4 paper" in entry["source"]
    opt = entry["provenance"]["optimiser"]
    assert opt["generator"] == "qcompile.tools.codebook_optimizer" and opt["criterion"] == crit
    assert opt["command"].startswith("python -m qcompile.tools.codebook_optimizer --write")
    assert len(opt["values"]) == 2 ** bits and all(a < b for a, b in zip(opt["values"], opt["values"][1:]))
    dev = max_dev(opt["values"], PUBLISHED[name])
    assert opt["max_abs_deviation_from_published"] == float(f"{dev:.3g}") and 1e-5 < dev < 1e-3


@pytest.mark.parametrize("name", EXTRA)
def test_shipped_optimised_schema(name):
    entry = SHIPPED[name]
    bits, size, signed, crit = spec(name)
    values = entry["values"]
    assert len(values) == 2 ** bits and all(a < b for a, b in zip(values, values[1:]))
    assert entry["block_size"] == size
    assert entry["scale"] == ("signed_absmax" if signed else "absmax")
    prov = entry["provenance"]
    assert prov["kind"] == "optimised"
    assert prov["generator"] == "qcompile.tools.codebook_optimizer" and prov["criterion"] == crit
    assert prov["command"].startswith("python -m qcompile.tools.codebook_optimizer --write")
    assert "published_values" not in prov and "optimiser" not in prov


def test_shipped_file_has_about_and_nothing_unexpected():
    assert isinstance(SHIPPED["_about"], str)
    assert set(SHIPPED) == {"_about", "nf4", "af4", *PUBLISHED_BOF, *EXTRA}
    assert set(co.GENERATED) == {*PUBLISHED_BOF, *EXTRA}
    assert "optimiser" not in SHIPPED["nf4"]["provenance"]  # never generated
    assert len(SHIPPED["nf4"]["provenance"]["published_thresholds"]) == 15


# ----------------------------------------------------------------- running the optimiser
# full runs of the b32 / b64 tables are this file's slowest; the default run does the two quick
# tables in full and every table at the fast run's precision (test_fast_run_matches_published)
FULL_RUN_BY_DEFAULT = {"bof4s_mse_b128", "bof4s_mse_b256"}
FULL_RUN_TABLES = [pytest.param(n, marks=() if n in FULL_RUN_BY_DEFAULT else pytest.mark.slow)
                   for n in PUBLISHED_BOF]


@functools.lru_cache(maxsize=None)
def full_run(name):
    """Lloyd at full precision (256 quadrature nodes, converged to 1e-12), once per table."""
    bits, size, signed, crit = spec(name)
    return tuple(co.optimize_codebook(bits, size, signed, crit))


@pytest.mark.parametrize("name", FULL_RUN_TABLES)
def test_full_run_reproduces_the_published_table(name):
    """The correctness check: a full run lands within 1e-3 of every published level (BOF4 paper
    Tables 6/7, from the tests' copy)."""
    assert max_dev(full_run(name), PUBLISHED[name]) < 1e-3


@pytest.mark.parametrize("name", FULL_RUN_TABLES)
def test_full_run_is_the_recorded_optimiser_table(name):
    """Regression check only: a full run gives, bit for bit, the optimiser table the CLI
    recorded in the shipped file (the file it wrote itself)."""
    assert [co._f32(v) for v in full_run(name)] == SHIPPED[name]["provenance"]["optimiser"]["values"]


@pytest.mark.parametrize("name", PUBLISHED_BOF)
def test_fast_run_matches_published(name):
    bits, size, signed, crit = spec(name)
    values = co.optimize_codebook(bits, size, signed, crit, nodes=32, tol=1e-9)
    assert max_dev(values, PUBLISHED[name]) < 1e-3


def test_monte_carlo_lloyd_near_published():
    values = co.optimize_codebook(4, 64, True, "mse", method="monte_carlo", n_blocks=20_000, seed=3)
    assert max_dev(values, PUBLISHED["bof4s_mse_b64"]) < 1e-2


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
def test_quadrature_centroids_match_simulated_blocks(signed):
    # One Lloyd step on the published cells: formulas versus real normalised blocks.
    levels = torch.tensor(PUBLISHED["bof4s_mse_b64" if signed else "bof4_mse_b64"],
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
@pytest.mark.slow  # twelve full runs; the quick sibling below runs the same code on two tables
def test_cli_regenerates_the_shipped_tables(tmp_path):
    """Regression check: from a reference file (the tests' copy, laid out as the shared one)
    the CLI writes the shipped file again: published tables from the reference, optimised ones
    from a full run."""
    out = tmp_path / "codebooks.json"
    assert co.main(["--write", str(out), "--reference", str(TEST_COPY_PATH)]) == 0
    made = json.loads(out.read_text())
    assert without_commands(made) == without_commands(SHIPPED)
    assert made["bof4_mse_b64"]["provenance"]["optimiser"]["command"] == (
        f"python -m qcompile.tools.codebook_optimizer --write {out} --reference {TEST_COPY_PATH}")
    assert made["bof4_mse_b32"]["provenance"]["command"] == (
        f"python -m qcompile.tools.codebook_optimizer --write {out} --reference {TEST_COPY_PATH}")


def test_cli_regenerates_the_shipped_tables_quick_ones(tmp_path, monkeypatch):
    """Regression check, as above for the two quickest tables: a published one (its optimiser
    table kept as a check) and an optimised one; every published table from the reference."""
    out = tmp_path / "codebooks.json"
    quick = ("bof4s_mse_b128", "bof4_mse_b128")
    monkeypatch.setattr(co, "GENERATED", {k: co.GENERATED[k] for k in quick})
    assert co.main(["--write", str(out), "--reference", str(TEST_COPY_PATH)]) == 0
    made, shipped = without_commands(json.loads(out.read_text())), without_commands(SHIPPED)
    assert set(made) == {"_about", "nf4", "af4", *PUBLISHED_BOF, "bof4_mse_b128"}
    for name in made:
        if name in PUBLISHED_BOF and name not in quick:  # not run: no optimiser table
            shipped[name]["provenance"].pop("optimiser")
        assert made[name] == shipped[name], name


def test_cli_keeps_the_published_tables_without_a_reference(tmp_path, monkeypatch):
    """Without the reference file (a checkout without ../shared) the published tables of the
    file being rewritten are kept, decimals and all. Two configurations keep this quick."""
    out = tmp_path / "codebooks.json"
    shutil.copy(SHIPPED_PATH, out)
    monkeypatch.setattr(co, "GENERATED", {k: co.GENERATED[k] for k in ("bof4s_mse_b64", "bof3s_mse_b64")})
    assert co.main(["--write", str(out), "--reference", str(tmp_path / "absent.json"), "--nodes", "32"]) == 0
    made = json.loads(out.read_text())
    assert set(made) == {"_about", "nf4", "af4", *PUBLISHED_BOF, "bof3s_mse_b64"}
    for name in ["nf4", "af4", *PUBLISHED_BOF]:
        assert made[name]["values"] == SHIPPED[name]["values"]
        kept = {k: v for k, v in made[name]["provenance"].items() if k != "optimiser"}
        assert kept == {k: v for k, v in SHIPPED[name]["provenance"].items() if k != "optimiser"}
        assert ("optimiser" in made[name]["provenance"]) == (name == "bof4s_mse_b64")
    assert made["bof3s_mse_b64"]["provenance"]["kind"] == "optimised"


def test_cli_without_any_published_tables_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no published tables"):
        co.main(["--write", str(tmp_path / "new.json"), "--reference", str(tmp_path / "absent.json")])


def test_cli_prints_one_codebook(capsys):
    """Regression check: the printed 3-bit table is the one shipped (no publication has one)."""
    assert co.main(["--bits", "3", "--block-size", "64", "--signed", "--nodes", "32"]) == 0
    values = json.loads(capsys.readouterr().out)
    assert max_dev(values, SHIPPED["bof3s_mse_b64"]["values"]) < 1e-5 and math.isclose(values[-1], 1.0)
