"""The speed section's ahead-of-time row: blockquant <fmt> as two AOTInductor packages
(``qcompile.export_decoder``: a prefill and a decode package over a static KV cache), loaded
and timed in a fresh process.

* Export, timed once: a copy of the model with every linear layer in <fmt>, ``lm_head`` too,
  the embedding table in float32 (a package cannot hold a quantised embedding yet:
  docs/export.md), and a static cache of max(prefill prompt, decode prompt + decode steps)
  tokens. The packages stay in the git-ignored cache folder (``.cache/packages/``), under a key
  of everything they depend on (the weights, the config, the format, the cache length,
  qcompile's source, torch, the CPU instruction set), and are reused while the key matches:
  the row's "export (s)" is then the first export's, marked as reused.
* Measured in a new Python process (benchmarks/package_worker.py; no torch.compile, its Dynamo
  frame count is recorded): the load (``qcompile.load_decoder``), the first token (load, the
  prefill of the decode prompt and one decode step, all cold), then the speed section's rounds
  (``speed.timed_rounds``: the same prompts, steps, repeats and threads as the other rows), and
  the next-token predictions over the decode prompt (teacher-forced through the decode
  package), compared with eager fp32's (top-1 agreement, as the peers report it).

A failing export or worker becomes a row with an "error", never a lost run.

    python -m benchmarks.package     # the compiled nf4 row and the package row side by side
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

import qcompile

from .peers import agreement, top1
from .policies import every_linear

ROOT = Path(__file__).resolve().parents[1]
FOLDER = "packages"  # under the cache folder
RECORD = "export.json"  # beside the packages: the key and the export time
WORKER_TIMEOUT_S = 1800
EMBEDDING_NOTE = "embedding float32: packages hold no quantised embedding yet"


def label(fmt: str) -> str:
    return f"blockquant {fmt} (package)"


def cache_length(prompt: torch.Tensor, decode_prompt: torch.Tensor, decode: int) -> int:
    """The static cache the rounds need: the prefill prompt, or the decode prompt and its
    steps (each step's token enters the cache)."""
    return max(prompt.shape[1], decode_prompt.shape[1] + decode)


def measure(model, prompt: torch.Tensor, decode_prompt: torch.Tensor, decode: int,
            repeats: int, fmt: str = "nf4", cache: Path | None = None) -> dict:
    """The package row (kind "package") for ``model`` (float, left as it is): ``prompt``
    [1, P] times the prefill, ``decode_prompt`` starts the timed decoding. ``cache``: the
    folder holding ``packages/`` (default: the benchmarks' cache folder)."""
    if cache is None:
        from .data import CACHE as cache
    name = label(fmt)
    try:
        folder, exported = packaged(model, fmt, cache_length(prompt, decode_prompt, decode),
                                    Path(cache))
    except Exception as e:  # (AOTInductor's failures come in many types) a row saying why
        return _failed(name, "export", e)
    try:
        got = run_worker(folder, prompt, decode_prompt, decode, repeats)
    except Exception as e:
        return _failed(name, "the fresh process", e)
    row = _row(name, model, prompt, decode_prompt, got, exported, folder)
    tqdm.write(f"  {name:<40} prefill {row['prefill_s']:7.3f} s  decode {row['decode_ms']:8.1f} "
               f"ms/token  load {row['load_s']:.2f} s  first token {row['first_token_s']:.2f} s")
    return row


def _failed(name: str, what: str, e: Exception) -> dict:
    row = {"label": name, "kind": "package", "error": f"{what} failed: {type(e).__name__}: {e}"}
    tqdm.write(f"  {name:<40} FAILED: {row['error'][:300]}")
    return row


def _row(name, model, prompt, decode_prompt, got: dict, exported: dict, folder: Path) -> dict:
    prefill_s, step_s = statistics.median(got["prefills"]), statistics.median(got["steps"])
    return {"label": name, "kind": "package", "prefill_s": prefill_s,
            "prefill_tok_s": prompt.shape[1] / prefill_s,
            "decode_ms": 1e3 * step_s, "decode_tok_s": 1 / step_s, "compile_s": None,
            "export_s": exported["export_s"], "export_reused": exported["reused"],
            "load_s": got["load_s"], "first_token_s": got["first_token_s"],
            "first_prefill_s": got["first_prefill_s"], "dynamo_frames": got["dynamo_frames"],
            "threads": got["threads"], "max_cache_len": exported["max_cache_len"],
            # the two files: each package holds its own copy of the packed weights
            "resident_bytes": sum((folder / n).stat().st_size for n in _package_files()),
            "resident_note": "the two package files", "note": EMBEDDING_NOTE,
            "fp32_bytes": qcompile.resident_weight_bytes(model),
            "top1": got["top1"],
            "top1_vs_fp32": agreement(got["top1"], top1(model, decode_prompt))}


def _package_files() -> tuple[str, str]:
    from qcompile.aot_decode import DECODE, PREFILL
    return PREFILL, DECODE


# -- the packages, exported once --------------------------------------------------------------

def packaged(model, fmt: str, max_cache_len: int, cache: Path) -> tuple[Path, dict]:
    """The folder of ``model``'s packages and their record (key, export_s, max_cache_len,
    reused): the cached ones when their key matches, else exported now (into a temporary
    folder renamed into place, so an interrupted export is never reused)."""
    key = package_key(model, fmt, max_cache_len)
    folder = cache / FOLDER / f"{fmt}-{key[:16]}"
    record = _cached_record(folder, key)
    if record is not None:
        return folder, {**record, "reused": True}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        start = time.perf_counter()
        qcompile.export_decoder(copy.deepcopy(model), every_linear(fmt, embedding=False), tmp,
                                max_cache_len=max_cache_len)
        record = {"key": key, "format": fmt, "max_cache_len": max_cache_len,
                  "export_s": time.perf_counter() - start}
        (tmp / RECORD).write_text(json.dumps(record, indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, {**record, "reused": False}


def _cached_record(folder: Path, key: str) -> dict | None:
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None
    complete = all((folder / n).is_file() for n in _package_files())
    return record if complete and record.get("key") == key else None


def package_key(model, fmt: str, max_cache_len: int) -> str:
    """SHA-256 of what the packages depend on: the weights (every state-dict tensor's name,
    dtype, shape and bytes), the config, the format and the cache length, qcompile's source
    and version, torch's version and the CPU instruction set the formats register for."""
    from qcompile.aot_decode import DECODER_FORMAT
    from qcompile.codegen import cpu
    h = hashlib.sha256(json.dumps({
        "format": fmt, "policy": "every linear layer, embedding full precision",
        "max_cache_len": max_cache_len, "decoder_format": DECODER_FORMAT,
        "qcompile": qcompile.__version__, "source": source_digest(), "torch": torch.__version__,
        "isa": cpu.chosen_isa(), "config": model.config.to_json_string(use_diff=False)},
        sort_keys=True).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy())  # (0-d too)
    return h.hexdigest()


def source_digest() -> str:
    """SHA-256 of qcompile's Python and C++ source (codegen and passes included): another
    checkout's packages are not reused."""
    import qcompile.codegen
    import qcompile.passes
    h = hashlib.sha256()
    for pkg in (qcompile, qcompile.codegen, qcompile.passes):
        root = Path(pkg.__file__).parent
        for f in sorted(root.rglob("*")):
            if f.suffix in (".py", ".cpp", ".h") and "__pycache__" not in f.parts:
                h.update(f"{pkg.__name__}/{f.relative_to(root)}\0".encode() + f.read_bytes())
    return h.hexdigest()


# -- the fresh process --------------------------------------------------------------------

def run_worker(folder: Path, prompt, decode_prompt, decode: int, repeats: int) -> dict:
    """benchmarks/package_worker.py's measurements of the packages in ``folder``, with this
    process's thread count; its error output (the end of it) when it fails."""
    with tempfile.TemporaryDirectory(prefix="qcompile_package_") as tmp:
        inputs, out = Path(tmp) / "inputs.pt", Path(tmp) / "out.json"
        torch.save({"prompt": prompt, "decode_prompt": decode_prompt, "decode": decode,
                    "repeats": repeats, "threads": torch.get_num_threads()}, inputs)
        done = subprocess.run([sys.executable, "-m", "benchmarks.package_worker", str(folder),
                               str(inputs), str(out)], cwd=ROOT, capture_output=True, text=True,
                              timeout=WORKER_TIMEOUT_S)
        if done.returncode != 0 or not out.is_file():
            raise RuntimeError(f"exit status {done.returncode}: {done.stderr[-2000:].strip()}")
        return json.loads(out.read_text())


# -- python -m benchmarks.package -----------------------------------------------------------

def main(argv=None) -> list[dict]:
    """The compiled nf4 row (Inductor) and the package row of the speed section, side by side
    in one process, on the packaged SmolLM2 and the Wikipedia text, with the section's
    defaults; prints both rows and the start-up table."""
    import argparse

    from . import speed
    from .data import load_causal_lm, tokens_of, wiki_text
    ap = argparse.ArgumentParser(prog="python -m benchmarks.package", description=main.__doc__)
    ap.add_argument("--format", default="nf4")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode-prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="a JSON file for the rows")
    args = ap.parse_args(argv)
    model, tok = load_causal_lm()
    ids = tokens_of(tok, wiki_text(), max(args.prefill, args.decode_prompt))
    prompts = (ids[None, :args.prefill], ids[None, :args.decode_prompt])
    package = measure(model, *prompts, args.decode, args.repeats, args.format)  # the long part
    label_c, kind, build = next(c for c in speed.configurations(model, "mxint8", args.format)
                                if c[0] == f"blockquant {args.format} (inductor)")
    compiled = speed._one(label_c, kind, build, prompts, args.decode, args.repeats,
                          qcompile.resident_weight_bytes(model))
    rows = [compiled, package]
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    print(json.dumps([{k: v for k, v in r.items() if k != "top1"} for r in rows], indent=1))
    if "error" not in package and "error" not in compiled:
        from .report import startup_table
        print("\n".join(startup_table(compiled, package, args.prefill, args.decode_prompt)))
    return rows


if __name__ == "__main__":
    main()
