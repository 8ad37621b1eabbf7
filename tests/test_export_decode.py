"""qcompile.export_decoder / qcompile.load_decoder: a prefill package and a decode package over
a static KV cache passed as tensors, and a greedy ``generate`` over them.

One decoder (the tiny random Llama of tests/archs.py, nf4 weights, a cache of 24 tokens) is
compiled once for the module: two AOTInductor compiles, a few minutes on 2 cores. The oracle is
transformers' own ``generate(do_sample=False)`` on another copy of the model quantised by
``quantize_model_`` with the same policy, run eagerly with its dynamic cache: the same tokens,
and each step's logits within the Inductor bound of docs/architecture.md (rtol = atol = 1e-4)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import archs
import qcompile
from qcompile import LayerSpec, Policy, aot

ROOT = Path(__file__).resolve().parents[1]
POLICY = Policy({}, default=LayerSpec(weight="nf4"))
CACHE = 24
NEW = 8
PROMPTS = [[1, 5, 9, 2, 77, 3], [7, 100, 42], [11]]  # the prefill graph; a 1-token prompt: decode


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("dec") / "llama"
    assert qcompile.export_decoder(archs.small_llama(), POLICY, path, max_cache_len=CACHE) \
        == str(path)
    return path


@pytest.fixture(scope="module")
def decoder(folder):
    return qcompile.load_decoder(folder)


@pytest.fixture(scope="module")
def eager_runs():
    """{prompt: (tokens, logits)} of transformers' greedy generate on the quantised model."""
    model = qcompile.quantize_model_(archs.small_llama(), POLICY)
    model.generation_config.eos_token_id = None  # all NEW tokens, as the package's generate
    out = {}
    with torch.no_grad():
        for prompt in PROMPTS:
            run = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False,
                                 output_logits=True,
                                 return_dict_in_generate=True)
            out[tuple(prompt)] = (run.sequences, run.logits)
    return out


@pytest.mark.parametrize("prompt", PROMPTS, ids=["prefill6", "prefill3", "decode-only"])
def test_generate_equals_transformers_greedy_generate(decoder, eager_runs, prompt):
    tokens, logits = decoder.generate(torch.tensor([prompt]), NEW, return_logits=True)
    want_tokens, want_logits = eager_runs[tuple(prompt)]
    assert torch.equal(tokens, want_tokens)
    assert len(logits) == NEW
    for got, want in zip(logits, want_logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_packages_run_the_quantised_model(decoder):
    """Not the float model: its first logits differ by more than the bound."""
    ids = torch.tensor([PROMPTS[0]])
    _, logits = decoder.generate(ids, 1, return_logits=True)
    with torch.no_grad():
        plain = archs.small_llama()(ids).logits[:, -1]
    assert (logits[0] - plain).abs().max() > 1e-3


def test_each_package_records_the_cache_layout(decoder):
    info = decoder.prefill.record["decoder"]
    assert info == decoder.decode.record["decoder"]
    assert info["max_cache_len"] == CACHE
    assert info["cache_shapes"] == [[1, 2, CACHE, 16]] * 4  # 2 layers x (keys, values)
    assert [e["format"] for e in decoder.prefill.record["formats"].values()] == ["nf4"]


CHILD = """
import sys, torch, qcompile
dec = qcompile.load_decoder(sys.argv[1])
torch.save(dec.generate(torch.tensor([[1, 5, 9, 2, 77, 3]]), 8), sys.argv[2])
from torch._dynamo.utils import counters
print("FRAMES", sum(counters["frames"].values()))
"""


def test_a_fresh_process_generates_the_same_tokens_without_dynamo(folder, eager_runs,
                                                                   tmp_path):
    done = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(tmp_path / "t.pt")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FRAMES 0" in done.stdout
    assert torch.equal(torch.load(tmp_path / "t.pt"), eager_runs[tuple(PROMPTS[0])][0])


def test_a_request_longer_than_the_cache_is_refused(decoder):
    with pytest.raises(ValueError, match="max_cache_len=24"):
        decoder.generate(torch.tensor([PROMPTS[0]]), CACHE)
    with pytest.raises(ValueError, match="int64 tensor of shape \\[1, prompt length\\]"):
        decoder.generate(torch.tensor([PROMPTS[0]] * 2), 2)


def test_packages_not_exported_together_are_refused(folder, tmp_path):
    """A decode package whose record names another cache (as one from another export would)."""
    from torch.export.pt2_archive import PT2ArchiveReader
    other = tmp_path / "mixed"
    shutil.copytree(folder, other)
    with PT2ArchiveReader(str(folder / "decode.pt2")) as r:
        record = json.loads(r.read_string(aot.RECORD_PATH))
    for key, value in (("max_cache_len", 2 * CACHE), ("export", "0" * 32)):
        # another cache; the same cache from another export (e.g. of another model)
        changed = {**record, "decoder": {**record["decoder"], key: value}}
        aot._copy_with_record(str(folder / "decode.pt2"), str(other / "decode.pt2"), changed)
        with pytest.raises(aot.PackageError, match="not exported together"):
            qcompile.load_decoder(other)
    with pytest.raises(FileNotFoundError, match="writes a folder"):
        qcompile.load_decoder(tmp_path / "nothing")


def test_what_export_decoder_cannot_run_is_refused_before_compiling(tmp_path):
    with pytest.raises(TypeError, match="transformers causal LM"):
        qcompile.export_decoder(torch.nn.Linear(4, 4), POLICY, tmp_path / "x", max_cache_len=8)
    with pytest.raises(ValueError, match="max_cache_len must be an int >= 3"):
        qcompile.export_decoder(archs.small_llama(), POLICY, tmp_path / "x", max_cache_len=2)
    import transformers
    windowed = transformers.MistralForCausalLM(transformers.MistralConfig(
        num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, sliding_window=4))
    with pytest.raises(NotImplementedError, match="StaticSlidingWindowLayer"):
        qcompile.export_decoder(windowed, POLICY, tmp_path / "x", max_cache_len=8)
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.slow
def test_the_docs_example_runs_as_written(tmp_path, eager_runs):
    """docs/export.md's decoding block in a fresh interpreter: its model is archs.small_llama's
    with the same seed, so its 8 new tokens are the eager oracle's for that prompt."""
    import re
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs/export.md").read_text(), re.S)
    block = next(b for b in blocks if "export_decoder(" in b)
    done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    want = eager_runs[tuple(PROMPTS[0])][0][0, 6:].tolist()
    assert f"torch.Size([1, 14]) {want}" in done.stdout
