"""The fresh process of benchmarks/package.py: load a decoder's two packages and time them as
the speed section times a model, with no torch.compile.

    python -m benchmarks.package_worker FOLDER INPUTS.pt OUT.json

INPUTS.pt (``torch.save`` of a dict): prompt [1, P] (the timed prefill), decode_prompt [1, D]
(before the timed decode steps), decode, repeats, threads. OUT.json: load_s, first_token_s
(load + the cold prefill of decode_prompt + one cold decode step), first_prefill_s, the
prefill seconds and decode-step seconds of every timed round (after a warm-up round), top1
(the predicted next token at each position of decode_prompt, teacher-forced through the decode
package), threads, and dynamo_frames (the frames Dynamo compiled in this process: 0).
"""
from __future__ import annotations

import json
import sys
import time
from types import SimpleNamespace

import torch

import qcompile

from .speed import timed_rounds


class PackageLM:
    """A loaded decoder called as ``speed.generate_timed`` calls a transformers model:
    ``(input_ids=..., past_key_values=None | the previous call's, use_cache=True)`` ->
    ``.logits`` [1, 1, vocab] (the last token's) and ``.past_key_values`` (the position and
    the cache tensors). A prompt of 2 tokens or more runs the prefill package, one token the
    decode package."""

    def __init__(self, decoder):
        self.decoder = decoder

    def __call__(self, input_ids, past_key_values=None, use_cache=True):
        if past_key_values is None:
            position, cache = torch.zeros(1, dtype=torch.long), self.decoder.new_cache()
        else:
            position, cache = past_key_values
        n = input_ids.shape[1]
        if int(position) + n > self.decoder.max_cache_len:
            raise ValueError(f"PackageLM: {int(position)} cached tokens and {n} new ones exceed "
                             f"the packages' max_cache_len={self.decoder.max_cache_len}")
        step = self.decoder.prefill if n >= 2 else self.decoder.decode
        last, *cache = step(input_ids, position, *cache)
        return SimpleNamespace(logits=last[:, None, :], past_key_values=(position + n, cache))


def first_token(folder: str, decode_prompt: torch.Tensor) -> tuple[PackageLM, dict]:
    """Load the packages, prefill ``decode_prompt`` and run one decode step, all cold:
    (the model, {load_s, first_prefill_s, first_token_s})."""
    start = time.perf_counter()
    lm = PackageLM(qcompile.load_decoder(folder))
    load_s = time.perf_counter() - start
    out = lm(input_ids=decode_prompt)
    first_prefill_s = time.perf_counter() - start - load_s
    lm(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values)
    return lm, {"load_s": load_s, "first_prefill_s": first_prefill_s,
                "first_token_s": time.perf_counter() - start}


@torch.no_grad()
def teacher_forced(lm: PackageLM, prompt: torch.Tensor) -> list[int]:
    """The predicted next token at every position of ``prompt`` [1, P], one token a step."""
    past, predictions = None, []
    for i in range(prompt.shape[1]):
        out = lm(input_ids=prompt[:, i:i + 1], past_key_values=past)
        past = out.past_key_values
        predictions.append(int(out.logits[0, -1].argmax()))
    return predictions


def main(folder: str, inputs: str, out: str) -> None:
    spec = torch.load(inputs)
    torch.set_num_threads(spec["threads"])
    prompts = (spec["prompt"], spec["decode_prompt"])
    lm, result = first_token(folder, spec["decode_prompt"])
    timed_rounds(lm, prompts, spec["decode"], 1, "warm-up")
    prefills, steps = timed_rounds(lm, prompts, spec["decode"], spec["repeats"], "package")
    from torch._dynamo.utils import counters
    result.update(prefills=prefills, steps=steps, top1=teacher_forced(lm, prompts[1]),
                  threads=torch.get_num_threads(),
                  dynamo_frames=sum(counters["frames"].values()))
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
