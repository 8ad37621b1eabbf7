"""Decode speed of two (or more) checkouts of blockquant, side by side, in lockstep.

    python -m benchmarks ab TREE_A TREE_B [--formats mxint8,nf4,w8a8,w4a8] [--rounds 12]
                            [--decode 8] [--threads 1] [--cpu 1] [--model FOLDER]

On the shared 2-core VMs this project runs on, the same checkout's decode time moves by 1.5x
from one run to the next (neighbours' load), so two runs one after the other cannot tell a 20 %
regression from noise. Here one worker process per checkout builds the compiled model, then the
workers take turns: round r times ``--decode`` greedy steps in each worker, alternating which
goes first, so slow swings of the machine hit every checkout alike. Reported per format and
checkout: the median ms/token over rounds and the median of the per-round ratio to the first
checkout. Naming the same checkout twice measures the harness's own spread.

A checkout is a folder holding the ``qcompile`` package; its worker runs with the folder's own
``.venv/bin/python`` when it has one (a git worktree set up as the README says), else with this
Python and the folder first on PYTHONPATH. Each worker reports the ``qcompile`` it imported, and
a worker that imported another checkout's code is refused. The worker (benchmarks/ab_worker.py)
uses only the public API (``quantize_model_``, ``compile(lowering="eager")``, ``Policy``,
``LayerSpec``), so older checkouts run it too.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

WORKER = Path(__file__).with_name("ab_worker.py")
#: name -> (weight format, activation format or "-")
CONFIGS = {"mxint8": ("mxint8", "-"), "nf4": ("nf4", "-"), "w8a8": ("mxint8", "mxint8"),
           "w4a8": ("int4", "int8")}


def python_for(tree: Path) -> tuple[str, dict]:
    """The interpreter and environment that import ``tree``'s qcompile."""
    own = tree / ".venv" / "bin" / "python"
    if own.exists():
        return str(own), dict(os.environ)
    path = os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH")) if p)
    return sys.executable, {**os.environ, "PYTHONPATH": path}


def start(tree: Path, config: str, args) -> subprocess.Popen:
    python, env = python_for(tree)
    weight, act = CONFIGS[config]
    cmd = [python, str(WORKER), str(args.model), weight, act, str(args.threads), str(args.decode)]
    if args.cpu is not None:
        cmd = ["taskset", "-c", str(args.cpu)] + cmd
    return subprocess.Popen(cmd, cwd=tree, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def check_import(worker: subprocess.Popen, tree: Path):
    """Read the worker's "qcompile <path>" line; refuse a worker that failed or imported
    another checkout's qcompile."""
    line = worker.stdout.readline().split(maxsplit=1)
    if len(line) != 2 or line[0] != "qcompile":
        raise SystemExit(f"ab: the worker in {tree} failed:\n{worker.stderr.read()[-3000:]}")
    imported = Path(line[1].strip()).resolve()
    if tree.resolve() not in imported.parents:
        raise SystemExit(f"ab: the worker for {tree} imported qcompile from {imported}, not from "
                         "that checkout; give it a .venv whose qcompile is its own")


def wait_ready(worker: subprocess.Popen, tree: Path):
    if worker.stdout.readline().strip() != "ready":
        raise SystemExit(f"ab: the worker in {tree} failed:\n{worker.stderr.read()[-3000:]}")


def measure(trees: list[Path], config: str, args) -> list[list[float]]:
    """ms/token per round, one list per tree (in the order given)."""
    workers = [start(t, config, args) for t in trees]
    try:
        for w, t in zip(workers, trees):
            check_import(w, t)
        for w, t in zip(workers, trees):
            wait_ready(w, t)
        times = [[] for _ in trees]
        for r in tqdm(range(args.rounds), desc=config, unit="round"):
            order = range(len(trees)) if r % 2 == 0 else reversed(range(len(trees)))
            for i in order:
                workers[i].stdin.write("go\n")
                workers[i].stdin.flush()
                times[i].append(float(workers[i].stdout.readline()))
    except BaseException:
        for w in workers:  # the others may still be compiling: stop them now
            w.kill()
        raise
    for w in workers:
        w.stdin.close()
        w.wait(timeout=60)
    return times


def table(config: str, trees: list[Path], labels: list[str], times: list[list[float]]) -> str:
    """One Markdown table: ms/token medians and the median per-round ratio to the first tree."""
    rows = [f"| {config} | checkout | median ms/token | min | median ratio to {labels[0]} |",
            "|---|---|---|---|---|"]
    for label, t in zip(labels, times):
        ratio = statistics.median(a / b for a, b in zip(t, times[0]))
        rows.append(f"| | {label} | {statistics.median(t):.2f} | {min(t):.2f} | {ratio:.3f} |")
    return "\n".join(rows)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks ab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trees", nargs="+", type=Path, help="checkouts to compare (at least two)")
    ap.add_argument("--formats", default="mxint8,nf4,w8a8",
                    help=f"comma-separated, from {', '.join(CONFIGS)} (default mxint8,nf4,w8a8)")
    ap.add_argument("--rounds", type=int, default=12, help="turns per worker (default 12)")
    ap.add_argument("--decode", type=int, default=8, help="decode steps per turn (default 8)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    ap.add_argument("--cpu", type=int, default=None,
                    help="pin every worker to this core (taskset), so they share one core")
    ap.add_argument("--model", type=Path, default=None,
                    help="a Hugging Face causal LM folder (default: the packaged SmolLM2-135M)")
    return ap


def main(argv):
    ap = parser()
    args = ap.parse_args(argv)
    configs = [c for c in args.formats.split(",") if c]
    bad = [c for c in configs if c not in CONFIGS]
    if bad or not configs:
        ap.error(f"--formats: unknown {bad or 'empty list'}; choose from {', '.join(CONFIGS)}")
    if len(args.trees) < 2:
        ap.error("give at least two checkouts (the same one twice measures the harness's spread)")
    missing = [str(t) for t in args.trees if not (t / "qcompile" / "__init__.py").exists()]
    if missing:
        ap.error(f"not a blockquant checkout (no qcompile/__init__.py): {', '.join(missing)}")
    if args.rounds < 1 or args.decode < 1 or args.threads < 1:
        ap.error("--rounds, --decode and --threads must be at least 1")
    if args.model is None:
        from .data import smollm2_folder
        args.model = smollm2_folder()
    labels = [f"{i}:{t}" for i, t in enumerate(args.trees)]
    for config in configs:
        print(table(config, args.trees, labels, measure(args.trees, config, args)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
