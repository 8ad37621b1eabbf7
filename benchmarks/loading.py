"""``python -m benchmarks loading``: peak memory and sizes of getting SmolLM2-135M packed, each
way in a fresh process (docs/saving.md, "Measured").

Ways: float32 ``from_pretrained`` plus one forward; ``from_pretrained`` with
``BlockQuantConfig(policy)`` (glibc's default allocator, and with a fixed mmap threshold);
``python -m qcompile quantize``; ``from_pretrained`` of the folder that command wrote. Peak: the
kernel's high-water mark of resident memory (VmHWM), reset after the imports
(/proc/self/clear_refs), minus the resident memory then: what loading or quantising added.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("float", "config", "config, MALLOC_MMAP_THRESHOLD_=65536", "command", "saved")


def policy():
    from qcompile import LayerSpec, Policy
    return Policy({"model.embed_tokens": LayerSpec(weight="nf4", op="embedding"),
                   "*.mlp.*": LayerSpec(weight="bof4s_opq"),
                   r"re:.*self_attn\.[qk]_proj": LayerSpec(weight="mxint8", act="mxint8")},
                  default=LayerSpec(weight="nf4"))


def _one(mode: str, folder: str, out: str) -> dict:
    """Runs in the child: one way of loading, measured."""
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401 - imported before the count
    import transformers.quantizers.auto  # noqa: F401
    from transformers import AutoModelForCausalLM

    import qcompile
    from qcompile.__main__ import _reset_peak, _resident_mib
    from qcompile.integrations.stream import prepare

    start = _resident_mib() if _reset_peak() else float("nan")
    t = time.perf_counter()
    if mode == "float":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():  # a forward reads every weight, as any use does
            model(torch.tensor([[1, 2, 3]]))
    elif mode.startswith("config"):
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, quantization_config=qcompile.BlockQuantConfig(policy()))
    elif mode == "command":  # the command's own code path, in this process
        from qcompile.__main__ import _return_freed_memory
        _return_freed_memory()
        result = prepare(folder, out, policy()).run(progress=False)
        model = None
    else:
        model = AutoModelForCausalLM.from_pretrained(out)
    row = {"mode": mode, "peak_above_start_mib": round(_resident_mib("VmHWM") - start, 1),
           "start_mib": round(start, 1), "seconds": round(time.perf_counter() - t, 1)}
    if model is not None:
        row["model_holds_mib"] = round(qcompile.resident_weight_bytes(model) / 2**20, 1)
    else:
        row["on_disk_mib"] = round(result.output_bytes / 2**20, 1)
        row["float_on_disk_mib"] = round(result.input_bytes / 2**20, 1)
    return row


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(prog="python -m benchmarks loading", description=__doc__)
    parser.add_argument("--one", nargs=3, metavar=("MODE", "FOLDER", "OUT"),
                        help=argparse.SUPPRESS)  # the child's entry
    parser.add_argument("--out", type=Path, default=Path("results/loading.md"))
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(_one(*args.one)))
        return ""
    from .data import smollm2_folder
    folder, packed = smollm2_folder(), Path(tempfile.mkdtemp()) / "smollm2-packed"
    rows = []
    for mode in MODES:
        env = dict(os.environ)
        if "MALLOC" in mode:
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        done = subprocess.run([sys.executable, "-m", "benchmarks", "loading", "--one", mode,
                               str(folder), str(packed)], env=env, capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise SystemExit(f"benchmarks loading: {mode} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    lines = ["| how | peak above the imports (MiB) | model holds (MiB) | on disk (MiB) | s |",
             "|---|---|---|---|---|"]
    for r in rows:
        disk = (f"{r['on_disk_mib']} (float {r['float_on_disk_mib']})" if "on_disk_mib" in r
                else "")
        lines.append(f"| {r['mode']} | {r['peak_above_start_mib']} | "
                     f"{r.get('model_holds_mib', '')} | {disk} | {r['seconds']} |")
    report = (f"SmolLM2-135M, one fresh process per row; imports take about "
              f"{rows[0]['start_mib']:.0f} MiB and are not counted.\n\n" + "\n".join(lines) + "\n")
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    return report


if __name__ == "__main__":
    main()
