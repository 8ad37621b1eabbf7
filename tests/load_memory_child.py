"""The child of tests/test_load_memory.py (and of ``python -m benchmarks loading``'s anonymous
memory rows): ``load_memory_child.py FOLDER POLICY_JSON`` loads FOLDER with
``from_pretrained(quantization_config=BlockQuantConfig(policy))`` while a thread samples the
process's anonymous resident memory (RssAnon, every 2 ms), and prints one JSON object: the peak
above the memory before loading, the packed model's bytes, the float32 checkpoint's bytes and
its largest tensor's, in bytes."""
import json
import sys
import threading
import time
from pathlib import Path

import torch
import transformers.models.llama.modeling_llama  # noqa: F401 - imported before the count
import transformers.quantizers.auto  # noqa: F401
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import qcompile


def resident(field: str = "RssAnon") -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) * 1024


def float_sizes(folder: Path) -> tuple[int, int]:
    """(all tensors, the largest) of the checkpoint, in bytes."""
    sizes = []
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as f:
            sizes += [f.get_slice(k).get_shape() for k in f.keys()]
    nbytes = [4 * torch.Size(s).numel() for s in sizes]
    return sum(nbytes), max(nbytes)


def main(folder: str, policy_json: str):
    policy = qcompile.Policy.from_json(Path(policy_json).read_text())
    peak, running = [0, 0], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], resident())
            peak[1] = max(peak[1], resident("VmRSS"))
            time.sleep(0.002)

    start, start_rss = resident(), resident("VmRSS")
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, quantization_config=qcompile.BlockQuantConfig(policy))
    seconds = time.perf_counter() - t
    running[0] = False
    thread.join()
    total, largest = float_sizes(Path(folder))
    print(json.dumps({"peak_anon": peak[0] - start, "peak_rss": peak[1] - start_rss,
                      "model": qcompile.resident_weight_bytes(model), "float": total,
                      "largest": largest, "seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
