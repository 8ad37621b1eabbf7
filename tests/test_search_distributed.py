"""search_policy on many processes (docs/search.md): two ranks under ``torchrun
--nproc-per-node 2`` (gloo, CPU; tests/search_worker.py) each return exactly what one plain
process returns, policy and every number, while each runs about half of the model's forward
passes; ranks that disagree on their inputs are refused on every rank."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import search_worker as worker  # noqa: E402


@pytest.fixture(scope="module")
def one_process():
    """The oracle: the same searches in this process, torch.distributed not initialised, on one
    thread as the ranks run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = worker.model()
        first, result = worker.search(m, worker.calibration(), worker.BITS[0])
        again, _ = worker.search(m, worker.calibration(), worker.BITS[1], result.sensitivities)
    finally:
        torch.set_num_threads(threads)
    return {"search": first, "other_budget": again}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(HERE / "search_worker.py"), str(out)],
        capture_output=True, text=True, timeout=240, env=env, cwd=HERE.parent)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return json.loads(out.read_text())


def without_counts(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("forwards", "passes_by_rank")}


@pytest.mark.parametrize("case", ["search", "other_budget"])
def test_every_rank_returns_what_one_process_does(ranks, one_process, case):
    want = without_counts(one_process[case])
    assert want["table"] and want["uniform"]
    for got in ranks[case]:
        assert without_counts(got) == want  # floats exactly: JSON round-trips them
    # ... and it was divided among them, not done twice (forward calls of the model)
    forwards = [r["forwards"] for r in ranks[case]]
    assert sum(forwards) < 2 * one_process[case]["forwards"], forwards


def test_each_rank_runs_about_half_the_passes(ranks, one_process):
    single = one_process["search"]
    passes = single["passes"]
    assert passes == 15 * 4 and single["passes_by_rank"] == [passes]
    assert [r["passes_by_rank"] for r in ranks["search"]] == [[30, 30]] * 2
    # the model's forward calls (a hook, independent of the search's own count; one batch): one
    # per pass, reference, replay check and end-to-end check; only the reference, the replay
    # check and each refinement round's end-to-end check (2 at most) run on both ranks
    forwards = [r["forwards"] for r in ranks["search"]]
    assert all(f <= 0.55 * single["forwards"] for f in forwards), (forwards, single["forwards"])
    assert sum(forwards) <= single["forwards"] + 4, (forwards, single["forwards"])


@pytest.mark.parametrize("case, words", [
    ("other_calibration", "differ in calibration"),
    ("other_weights", "differ in full-precision logits"),
])
def test_ranks_that_disagree_are_refused_on_every_rank(ranks, case, words):
    errors = [r["error"] for r in ranks[case]]
    assert all(e is not None and words in e and "rank 1 and rank 0" in e for e in errors), errors
