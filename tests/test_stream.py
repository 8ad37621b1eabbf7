"""Quantising a sharded checkpoint tensor by tensor (qcompile/integrations/stream.py,
`python -m qcompile quantize`): the folder it writes loads with from_pretrained into the model
that float loading plus quantize_model_ makes, bit for bit; the peak resident memory of the
command stays near the packed model, far below the float one; bad input is refused before any
work; the safetensors reader and writer agree with the safetensors library."""
import json
import os
import re
import time
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import qcompile
from qcompile import LayerSpec, Policy
from qcompile.integrations.stream import (quantize_checkpoint, read_header, read_tensor,
                                          write_safetensors)
from qcompile.policy import PolicyError
from qcompile.serialize import QuantizedFileError
from qcompile.swap import QuantEmbedding, QuantLinear

from hf_models import MIXED, assert_same, reference, save_gpt2, save_llama

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args) -> tuple[float, float, float, str]:
    """One `python -m qcompile ...` run: (resident MiB before quantising and its peak while
    quantising, as the command reports them from the kernel's counters in /proc; the largest
    resident size this process saw sampling the child's /proc status every 2 ms; stdout).
    (getrusage cannot be the oracle: a child's ru_maxrss includes the parent's resident size,
    copied at fork.)"""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "qcompile", *map(str, args)], cwd=ROOT,
                                stdout=out, stderr=err, text=True)
        sampled, deadline = 0.0, time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    rss = next((int(line.split()[1]) for line in f if line.startswith("VmRSS")),
                               0)
                sampled = max(sampled, rss / 1024)
            except OSError:  # exited between poll and open
                pass
            time.sleep(0.002)
        proc.kill() if proc.poll() is None else None
        out.seek(0), err.seek(0)
        out, err = out.read(), err.read()
    assert proc.wait() == 0, err[-3000:]
    start, peak = re.search(r"resident memory: ([\d.]+) MiB before quantising, peak ([\d.]+) "
                            r"MiB while quantising", out).groups()
    return float(start), float(peak), sampled, out


@pytest.mark.parametrize("tie", [True, False])
def test_sharded_checkpoint_loads_as_quantize_model_makes_it(tmp_path, caplog, tie):
    folder = save_llama(tmp_path / "float", tie=tie, max_shard_size="20KB")
    assert len(list(folder.glob("*.safetensors"))) > 5
    policy = MIXED if tie else Policy({"model.embed_tokens": None}, default=LayerSpec("nf4"))
    result = quantize_checkpoint(folder, tmp_path / "q", policy, progress=False)
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert "LOAD REPORT" not in caplog.text  # no missing, unexpected or mismatched key
    want = reference(folder, policy)
    assert_same(got, want)
    assert [r.fqn for r in result.explanation.rows] == [  # the table lists each packed layer
        n for n, m in want.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    assert result.output_bytes == os.path.getsize(tmp_path / "q" / "model.safetensors")
    if not tie:  # the float embedding stays a parameter; nothing else is float
        assert isinstance(got.model.embed_tokens, torch.nn.Embedding)


def test_gpt2_conv1d_and_a_tied_float_embedding(tmp_path):
    folder = save_gpt2(tmp_path / "gpt2", max_shard_size="10KB")
    policy = Policy({"transformer.wte": None, "*.mlp.*": LayerSpec(weight="nf4")},
                    default=LayerSpec(weight="mxfp4"))  # lm_head packed, its tied wte float
    quantize_checkpoint(folder, tmp_path / "q", policy, progress=False)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert got.transformer.h[0].attn.c_attn.conv1d
    assert isinstance(got.transformer.wte, torch.nn.Embedding)
    assert_same(got, reference(folder, policy))


@pytest.mark.filterwarnings("ignore:.*no generated CPU kernel:UserWarning")  # bf16: reference
def test_bfloat16_checkpoint_packs_from_bfloat16(tmp_path):
    folder = save_llama(tmp_path / "float", tie=False, dtype=torch.bfloat16,
                        max_shard_size="30KB")
    quantize_checkpoint(folder, tmp_path / "q", MIXED, progress=False)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["dtype"] == "bfloat16"
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "q")  # dtype from config.json
    assert got.model.layers[0].mlp.up_proj.qtensor().dtype == torch.bfloat16
    assert_same(got, reference(folder, MIXED))


# -- memory -----------------------------------------------------------------------------------

def test_cli_peak_memory_is_the_packed_model_plus_one_tensor(tmp_path):
    """A 43M-parameter Llama (164 MiB in float32) in 20 shards: the command's peak resident
    memory while quantising, above its memory before (the interpreter, torch, transformers),
    stays within the packed model plus a few times the largest float tensor: the float
    model is never held."""
    def llama(folder, layers, hidden, inter, vocab):
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(num_hidden_layers=layers, hidden_size=hidden,
                                       intermediate_size=inter, num_attention_heads=8,
                                       num_key_value_heads=8, vocab_size=vocab,
                                       tie_word_embeddings=False)
        with torch.no_grad():
            transformers.LlamaForCausalLM(cfg).save_pretrained(folder, max_shard_size="9MB")
        return folder

    big = llama(tmp_path / "big", 12, 512, 1536, 2048)
    float_mib = sum(p.stat().st_size for p in big.glob("*.safetensors")) / 2**20
    assert len(list(big.glob("*.safetensors"))) >= 15 and float_mib > 160
    policy = tmp_path / "policy.json"
    policy.write_text(MIXED.to_json())
    start, peak, sampled, out = run_cli("quantize", big, tmp_path / "q", "--policy", policy,
                                        "--quiet")
    assert "weights on disk" in out
    assert sampled <= peak + 1  # the reported peak is not below what could be seen
    packed_mib = os.path.getsize(tmp_path / "q" / "model.safetensors") / 2**20
    largest_mib = 1536 * 512 * 4 / 2**20  # one MLP weight in float32
    grown = peak - start
    print(f"float {float_mib:.0f} MiB, packed {packed_mib:.0f} MiB, resident {start:.0f} MiB "
          f"at the start, peak {grown:.0f} MiB above it")
    assert grown < packed_mib + 8 * largest_mib + 16, (grown, packed_mib)
    assert grown < float_mib / 2
    want = reference(big, MIXED)  # and it is still exactly the quantised model
    assert_same(AutoModelForCausalLM.from_pretrained(tmp_path / "q"), want)


# -- bad input --------------------------------------------------------------------------------

def bad_cli_input(tmp_path):
    """(a float checkpoint, a good policy file, [(extra arguments, the message)] of bad ones)."""
    folder = save_llama(tmp_path / "float")
    good = tmp_path / "policy.json"
    good.write_text(MIXED.to_json())
    (tmp_path / "bad.json").write_text('{"rules": [["*", {"weight": "nf5"}]]}')
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    cases = [(("--policy", tmp_path / "missing.json"), "cannot read"),
             (("--policy", tmp_path / "bad.json"), "--policy"),
             ((), "the following arguments are required: --policy")]
    return folder, good, cases


def test_cli_refuses_bad_input_in_process(tmp_path, capsys):
    """The refusals below, through the command's main() in this process (each command run
    imports torch: seconds); one of them as a command too."""
    from qcompile.__main__ import main
    folder, good, cases = bad_cli_input(tmp_path)
    for extra, message in cases:
        with pytest.raises(SystemExit) as stop:
            main(["quantize", str(folder), str(tmp_path / "out"), *map(str, extra)])
        assert stop.value.code == 2 and message in capsys.readouterr().err, extra
        assert not (tmp_path / "out").exists()
    assert main(["quantize", str(folder), str(tmp_path / "full"), "--policy", str(good)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    done = subprocess.run([sys.executable, "-m", "qcompile", "quantize", folder,
                           tmp_path / "out", *cases[0][0]], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and cases[0][1] in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow  # four command runs; test_cli_refuses_bad_input_in_process runs one
def test_cli_refuses_bad_input_with_a_message(tmp_path):
    folder, good, cases = bad_cli_input(tmp_path)
    for extra, message in cases:
        done = subprocess.run([sys.executable, "-m", "qcompile", "quantize", folder,
                               tmp_path / "out", *extra], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 2 and message in done.stderr, (extra, done.stderr)
        assert not (tmp_path / "out").exists()
    done = subprocess.run([sys.executable, "-m", "qcompile", "quantize", folder,
                           tmp_path / "full", "--policy", good], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and "not an empty folder" in done.stderr
    assert "Traceback" not in done.stderr


def test_bad_checkpoints_are_refused_before_writing(tmp_path):
    folder = save_llama(tmp_path / "float", tie=False)
    out = tmp_path / "out"
    with pytest.raises(PolicyError, match="quantises no layer"):
        quantize_checkpoint(folder, out, Policy({}, default=None), progress=False)
    with pytest.raises(PolicyError, match="must be a qcompile.Policy"):
        quantize_checkpoint(folder, out, "nf4", progress=False)
    with pytest.raises(QuantizedFileError, match="no config.json"):
        quantize_checkpoint(tmp_path, out, MIXED, progress=False)

    weights = folder / "model.safetensors"
    with safe_open(weights, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}

    def variant(name, change):
        bad = tmp_path / name
        bad.mkdir()
        (bad / "config.json").write_text((folder / "config.json").read_text())
        t = dict(tensors)
        change(t)
        save_file(t, bad / "model.safetensors", metadata={"format": "pt"})
        return bad

    renamed = variant("renamed", lambda t: t.update({"model.layer.0.x": t.pop(
        "model.layers.0.mlp.up_proj.weight")}))
    with pytest.raises(QuantizedFileError, match=r"model\.layer\.0\.x.*are not in the"):
        quantize_checkpoint(renamed, out, MIXED, progress=False)
    missing = variant("missing", lambda t: t.pop("model.norm.weight"))
    with pytest.raises(QuantizedFileError, match=r"lacks \['model\.norm\.weight'\]"):
        quantize_checkpoint(missing, out, MIXED, progress=False)
    reshaped = variant("reshaped", lambda t: t.update({
        "model.layers.1.mlp.up_proj.weight": torch.zeros(64, 64)}))
    with pytest.raises(QuantizedFileError, match=r"shape \(64, 64\) in the checkpoint"):
        quantize_checkpoint(reshaped, out, MIXED, progress=False)
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "config.json").write_text((folder / "config.json").read_text())
    (binary / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(QuantizedFileError, match=r"safetensors checkpoints only.*pytorch_model"):
        quantize_checkpoint(binary, out, MIXED, progress=False)
    truncated = variant("truncated", lambda t: None)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(QuantizedFileError, match="ends inside a tensor"):
        quantize_checkpoint(truncated, out, MIXED, progress=False)
    assert not out.exists()


# -- the safetensors reader and writer, against the library -----------------------------------

def sample_tensors() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(7, generator=g).bfloat16(),
            "f16": torch.randn(2, 2, generator=g).half(), "i64": torch.arange(6).view(2, 3),
            "u8": torch.randint(0, 255, (9,), dtype=torch.uint8, generator=g),
            "i8": torch.tensor([-128, 0, 127], dtype=torch.int8), "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 4), "bool": torch.tensor([True, False, True]),
            "e4m3": torch.randn(4, generator=g).to(torch.float8_e4m3fn)}


def test_written_files_read_back_with_the_safetensors_library(tmp_path):
    tensors = sample_tensors()
    write_safetensors(tmp_path / "a.safetensors", tensors, {"note": "x"})
    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        assert f.metadata() == {"note": "x"} and sorted(f.keys()) == sorted(tensors)
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.view(-1).view(torch.uint8), t.view(-1).view(torch.uint8))


def test_library_written_files_read_with_our_reader(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, tmp_path / "b.safetensors", metadata={"format": "pt"})
    with open(tmp_path / "b.safetensors", "rb") as f:
        header, start = read_header(f)
        assert header.pop("__metadata__") == {"format": "pt"}
        assert sorted(header) == sorted(tensors)
        for name, t in tensors.items():
            got = read_tensor(f, header[name], start)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.view(-1).view(torch.uint8), t.view(-1).view(torch.uint8))


def test_the_docs_example_runs_as_written():
    text = (ROOT / "docs" / "saving.md").read_text()
    script = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    script = script.replace(".venv/bin/python", sys.executable)  # the venv running the tests
    done = subprocess.run(["bash", "-e", "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "weights on disk" in done.stdout and "peak" in done.stdout
    loaded = AutoModelForCausalLM.from_pretrained("/tmp/packed-llama")
    assert isinstance(loaded.model.layers[1].mlp.up_proj, QuantLinear)
    assert loaded.model.layers[1].mlp.up_proj.fmt_key == "bof4s_opq"


@pytest.mark.parametrize("mode", ["command", "saved"])
def test_loading_benchmark_rows_on_a_tiny_llama(tmp_path, mode):
    """benchmarks/loading.py's child, on a tiny Llama instead of SmolLM2: one JSON row each."""
    folder = save_llama(tmp_path / "float", max_shard_size="50KB")
    out = tmp_path / "packed"
    if mode == "saved":
        quantize_checkpoint(folder, out, MIXED, progress=False)
    done = subprocess.run([sys.executable, "-m", "benchmarks", "loading", "--one", mode, folder,
                           out], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["mode"] == mode and 0 <= row["peak_above_start_mib"] < 200
    if mode == "command":
        assert row["on_disk_mib"] == round(os.path.getsize(out / "model.safetensors") / 2**20, 1)
    else:
        assert row["model_holds_mib"] > 0
