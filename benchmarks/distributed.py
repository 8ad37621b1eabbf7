"""Tensor parallelism on a CPU: ``python -m benchmarks distributed [options]``, the same as
``python -m benchmarks run --sections distributed [options]`` (issue 26).

A causal LM (default: the packaged SmolLM2-135M; ``--distributed-model``) with every linear
layer nf4 except lm_head (tensor parallelism shards a tied lm_head with the embedding, and a
quantised embedding table cannot be split: docs/distributed.md), loaded with
``from_pretrained(folder, tp_plan="auto", quantization_config=qcompile.BlockQuantConfig(policy))``
under ``python -m torch.distributed.run --standalone --nproc-per-node N`` (gloo, CPU, one thread
per rank), for N = 1 (no plan: the one-process model) and N = 2. Each rank runs
benchmarks/distributed_worker.py; per configuration and rank:

* packed bytes: the buffers of this rank's packed linear layers (``QuantLinear``), and the
  resident bytes of all its parameters and buffers (``qcompile.resident_weight_bytes``);
* the resident memory before ``from_pretrained`` and its peak while loading (VmHWM, restarted
  just before loading; the mapped safetensors pages count, as in any RSS);
* decode ms/token: the median over ``repeats`` rounds of ``decode`` greedy steps with the KV
  cache after a ``decode_prompt``-token prompt (random ids, seed 0), after a warm-up round, of
  the model as loaded (eager) and compiled (``qcompile.compile(model, policy,
  lowering="eager")``);
* the largest logit difference on that prompt against the one-process model, relative to its
  largest logit, and whether the greedy tokens are the one-process model's.

Two ranks on a 2-core machine measure correctness and memory, not speed-up: the ranks share
the cores and exchange every row-parallel sum through gloo.

SmolLM2-135M's 9 query / 3 key-value heads do not split over 2 ranks (transformers' attention
cannot run on 4.5 heads), so where the heads do not divide, the plan is the model's own without
its attention rules: the MLPs (and lm_head, gathered) are sharded, the attention replicated; the
report names the plan used.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RANKS = (1, 2)
KINDS = ("eager", "compiled")
NOT_SPEED_UP = ("**These runs measure correctness and memory, not speed-up**: {ranks} ranks "
                "share this machine's {cpus} CPU cores (one thread each) and exchange every "
                "row-parallel sum through gloo, so a rank's decode time is not expected to drop "
                "below the one-process time.")


def launch(folder: Path, ranks: int, out: Path, decode: int, repeats: int, prompt: int,
           kinds, timeout: float | None = None) -> tuple[list[dict], Path] | str:
    """Run the worker on ``ranks`` ranks: (rows, logits file), or the error text of a failed
    run (the end of its log, kept whole in ``out``/<ranks>ranks.log)."""
    rows_file, logits = out / f"{ranks}ranks.json", out / f"logits_{ranks}ranks.pt"
    log = out / f"{ranks}ranks.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(ranks), "-m", "benchmarks.distributed_worker", str(folder), str(rows_file),
           str(logits), "--decode", str(decode), "--repeats", str(repeats), "--prompt",
           str(prompt), "--kinds", *kinds]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with log.open("w") as f:
        try:
            done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"{ranks} ranks: no result within {timeout} s (log: {log})"
    if done.returncode != 0 or not rows_file.is_file():
        tail = log.read_text(errors="replace")[-3000:]
        return (f"{ranks} ranks: the workers exited with status {done.returncode} (log: {log}): "
                f"{tail}")
    return json.loads(rows_file.read_text()), logits


def relative_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest absolute difference relative to the largest absolute logit of ``want``."""
    if got.shape != want.shape:
        raise ValueError(f"logits of shape {list(got.shape)} against {list(want.shape)}: the "
                         "configurations did not run the same prompt and vocabulary")
    return ((got - want).abs().max() / want.abs().max()).item()


def compare(rows: list[dict], logits: Path, reference: dict | None) -> None:
    """Add to each row its comparison with the one-process ``reference`` ({"row", "logits"}):
    packed bytes relative to it, the logit difference, whether the greedy tokens agree."""
    if reference is None:
        return
    got = torch.load(logits)["logits"]
    diff = relative_difference(got, reference["logits"])
    ref = reference["row"]
    for row in rows:
        row["packed_vs_1rank"] = row["packed_bytes"] / ref["packed_bytes"]
        row["max_rel_logit_diff"] = diff
        row["same_tokens"] = {k: row[k]["tokens"] == ref[k]["tokens"]
                              for k in KINDS if k in row and k in ref}


def measure(folder: Path, out: Path, decode: int = 4, repeats: int = 3, prompt: int = 16,
            kinds=KINDS, ranks=RANKS, timeout: float | None = None) -> list[dict]:
    """One row per configuration and rank (an error row for a configuration that failed);
    the first configuration of ``ranks`` must be 1, the reference of the comparisons. Logs,
    rows and rank 0's logits of each configuration stay in ``out``."""
    if not ranks or ranks[0] != 1:
        raise ValueError(f"ranks must start with 1 (the one-process reference), got {ranks}")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown kinds {unknown}; choose from {', '.join(KINDS)}")
    out.mkdir(parents=True, exist_ok=True)
    rows, reference = [], None
    for n in ranks:
        label = f"{n} rank{'s' if n > 1 else ''}"
        print(f"distributed: {label} (torchrun, gloo) on {folder}", flush=True)
        got = launch(Path(folder), n, out, decode, repeats, prompt, kinds, timeout)
        if isinstance(got, str):
            print(f"  FAILED: {got[:500]}", flush=True)
            rows.append({"label": label, "ranks": n, "error": got})
            continue
        ranked, logits = got
        if n == 1:
            reference = {"row": ranked[0], "logits": torch.load(logits)["logits"]}
        compare(ranked, logits, reference)
        rows += [{"label": label, **r} for r in ranked]
    return rows

