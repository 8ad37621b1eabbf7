"""One checkout's worker for benchmarks/ab.py (run as a script, with that checkout's Python):

    ab_worker.py MODEL_FOLDER WEIGHT_FMT ACT_FMT|- THREADS DECODE

Loads the model in float32, quantises and compiles it (every linear layer and the embedding in
WEIGHT_FMT, the linear layers' activations in ACT_FMT; eager lowering), warms it up, prints
"qcompile <the package it imported>" first and "ready" then; then for each line on stdin times one prefill of a fixed
128-token prompt (shorter for a model with fewer positions) and DECODE greedy steps with the KV cache, and prints the median ms per step.
Public API only, so that older checkouts run it too.
"""
import copy
import statistics
import sys
import time

import torch
import transformers

import qcompile
from qcompile import LayerSpec, Policy


def main(folder, weight, act, threads, decode):
    print("qcompile", qcompile.__file__, flush=True)  # checked by the driver before any work
    torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
    act = None if act == "-" else act
    policy = Policy({"*": LayerSpec(weight=weight, op="embedding")},
                    default=LayerSpec(weight=weight, act=act))
    run = qcompile.compile(qcompile.quantize_model_(copy.deepcopy(model), policy), policy,
                           lowering="eager")
    length = min(128, getattr(model.config, "max_position_embeddings", 128) // 2)
    prompt = torch.randint(0, model.config.vocab_size, (1, length),
                           generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def steps(n):
        out = run(input_ids=prompt, use_cache=True)
        times = []
        for _ in range(n):
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            out = run(input_ids=nxt, past_key_values=past, use_cache=True)
            times.append(time.perf_counter() - start)
        return times

    steps(max(decode, 2))  # compiles the prefill and both decode graphs
    print("ready", flush=True)
    for _ in sys.stdin:
        print(f"{1e3 * statistics.median(steps(decode)):.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
