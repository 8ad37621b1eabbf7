"""The benchmark harness (python -m benchmarks run) on a tiny random Llama, a tiny random BERT
encoder and a synthetic text, all built offline in a temporary folder, so the tests stay fast."""
import importlib
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import qcompile  # noqa: E402
from benchmarks import perplexity, report, run  # noqa: E402

WORDS = ("the river runs past an old mill where seven quiet farmers grow wheat and barley "
         "while children read books about distant mountains and bright northern lights").split()


def synthetic_text(sentences=120, seed=0) -> str:
    rng = random.Random(seed)
    out = []
    for _ in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(8, 16))]
        out.append(" ".join(words).capitalize() + ".")
    return " ".join(out)


def char_vocab(text):
    return sorted(set(text))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Folders of a tiny causal LM, a tiny encoder (each with a character tokenizer) and a
    text file."""
    root = tmp_path_factory.mktemp("tiny")
    text = synthetic_text()
    (root / "text.txt").write_text(text, encoding="utf-8")
    chars = char_vocab(text)

    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Split(
        tokenizers.Regex("."), behavior="isolated")
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True))
    lm.save_pretrained(root / "lm")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>").save_pretrained(
        root / "lm")

    enc_dir = root / "enc"
    enc_dir.mkdir()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = specials + sorted(set(w.strip(".").lower() for w in text.split())) + ["."]
    (enc_dir / "vocab.txt").write_text("\n".join(words) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(enc_dir / "vocab.txt")).save_pretrained(enc_dir)
    transformers.BertModel(transformers.BertConfig(
        vocab_size=len(words), hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=128)).save_pretrained(enc_dir)
    return root


def manual_perplexity(model, windows):
    """exp of the mean next-token NLL, from log_softmax of the logits (independent of
    perplexity.perplexity, which uses cross_entropy and running sums)."""
    nlls = []
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(w[None]).logits[0].double(), dim=-1)
            nlls.append(-logp[torch.arange(len(w) - 1), w[1:]])
    return math.exp(torch.cat(nlls).mean().item())


class FixedDistribution(torch.nn.Module):
    """Predicts the same next-token distribution q at every position, whatever the input."""

    def __init__(self, q):
        super().__init__()
        self.logits = torch.log(q)

    def forward(self, input_ids, **_):
        out = self.logits.expand(*input_ids.shape, -1)
        return type("Out", (), {"logits": out})()


def test_perplexity_of_a_known_distribution():
    q = torch.tensor([0.5, 0.25, 0.125, 0.125])
    ids = torch.tensor([0, 1, 2, 3, 0, 0, 1, 3])
    windows = perplexity.token_windows(ids, window=4, budget=8)
    # predictions: targets 1,2,3 (window 1) and 0,1,3 (window 2): -log2 probabilities 2,3,3,1,2,3
    expected = 2 ** ((2 + 3 + 3 + 1 + 2 + 3) / 6)
    got = perplexity.perplexity(FixedDistribution(q), windows)
    assert got["predictions"] == 6
    assert got["ppl"] == pytest.approx(expected, rel=1e-6)
    uniform = perplexity.perplexity(FixedDistribution(torch.full((7,), 1 / 7)), windows)
    assert uniform["ppl"] == pytest.approx(7, rel=1e-6)


def test_perplexity_matches_log_softmax_on_a_tiny_llama(tiny):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny / "lm").eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (300,), generator=gen)
    windows = perplexity.token_windows(ids, window=64, budget=256)
    got = perplexity.perplexity(model, windows)
    assert got["predictions"] == 4 * 63
    assert got["ppl"] == pytest.approx(manual_perplexity(model, windows), rel=1e-5)


def test_token_windows_are_the_first_non_overlapping_ones():
    ids = torch.arange(100)
    w = perplexity.token_windows(ids[None], window=16, budget=70)  # 4 windows; 6 tokens unused
    assert w.shape == (4, 16) and torch.equal(w.reshape(-1), ids[:64])
    with pytest.raises(ValueError, match="fewer than the budget"):
        perplexity.token_windows(ids, window=16, budget=128)
    with pytest.raises(ValueError, match="smaller than one window"):
        perplexity.token_windows(ids, window=16, budget=8)


def test_sweep_policies_cover_the_issue_and_reject_unknown_names():
    every = perplexity.sweep_policies()
    assert list(every)[0] == "fp32" and every["fp32"] is None
    assert len(every) == 1 + 18 + 4 + 2
    w4a8 = every["int4 W4A8"].default
    assert w4a8.weight.key == "int4" and w4a8.act.key == "int8"
    assert every["nf4 (bf16 model)"].default.weight.key == "nf4"
    assert every["int4[block_size=128]"].default.weight.block_size == 128
    spec = every["bfp6 W6A6"].default
    assert spec.weight.key == "bfp6" and spec.act.key == "bfp6"
    assert every["nf4"].match("lm_head")[1] is None  # lm_head stays full precision
    assert list(perplexity.sweep_policies(["nf4", "WA:int8"])) == ["fp32", "nf4", "int8 W+A"]
    with pytest.raises(ValueError, match="neither a sweep label"):
        perplexity.sweep_policies(["no_such_format"])


def _cli(tiny, out, *extra):
    return run.main(["--model", str(tiny / "lm"), "--text", str(tiny / "text.txt"),
                     "--encoder", str(tiny / "enc"), "--tokens", "256", "--window", "64",
                     "--out", str(out), *extra])


def test_cli_writes_report_plots_and_consistent_numbers(tiny, tmp_path):
    out = tmp_path / "res"
    path = _cli(tiny, out, "--policies", "int8", "bfp6 W6A6", "nf4 (bf16 model)",
                "--formats", "nf4", "bof4s",
                "--sentences", "8", "--prefill", "32", "--decode", "2", "--repeats", "1",
                "--speed-lowering", "eager", "--no-peers", "--gemv-shapes", "64x256",
                "--speed-dtypes", "bf16")
    assert path == out / "report.md"
    text = path.read_text()
    for heading in ("## Perplexity", "## Weight error and embedding fidelity",
                    "## Speed and memory", "## CPU GEMV against memory bandwidth", "## Goals"):
        assert heading in text
    assert "Q4_1" not in text  # the SmolLM2 caveat is for the packaged model only
    assert "were not run (`--no-peers`)" in text
    for png in ("ppl_vs_bits.png", "weight_error.png", "speed.png", "gemv.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in text
    res = json.loads((out / "results.json").read_text())
    assert res["machine"]["torch"] == torch.__version__ and res["machine"]["cpus"] >= 1
    ppl = {r["label"]: r for r in res["perplexity"]}
    assert list(ppl) == ["fp32", "int8", "bfp6 W6A6", "nf4 (bf16 model)"]
    # each row's bits come from explain of that policy's own compiled model
    assert ppl["int8"]["bits"] == pytest.approx(qcompile.formats.get("int8").effective_bits(64))
    bfp6_bits = qcompile.formats.get("bfp6").effective_bits(64)
    assert ppl["bfp6 W6A6"]["bits"] == pytest.approx(bfp6_bits)
    # the numbers are the model's: fp32 against the independent computation, int8 (compiled,
    # eager lowering) against the eager fake-quantised model
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny / "lm").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny / "lm")
    ids = tok((tiny / "text.txt").read_text(), return_tensors="pt").input_ids
    windows = perplexity.token_windows(ids, 64, 256)
    assert ppl["fp32"]["ppl"] == pytest.approx(manual_perplexity(model, windows), rel=1e-5)
    fq = qcompile.fake_quantize_model_(model, perplexity.weight_only("int8"))
    assert ppl["int8"]["ppl"] == pytest.approx(manual_perplexity(fq, windows), rel=1e-5)
    assert ppl["int8"]["ppl"] != ppl["fp32"]["ppl"]
    # the bf16 row runs the model cast to bf16, as the reference fake-quantises it in bf16
    # (bf16 roundings of sums in another batch shape: not bit for bit; measured 8e-9 apart,
    # while the float32 model's nf4 perplexity is 1.1e-4 away)
    bf16 = transformers.AutoModelForCausalLM.from_pretrained(tiny / "lm").eval().bfloat16()
    fq16 = qcompile.fake_quantize_model_(bf16, perplexity.weight_only("nf4"))
    assert ppl["nf4 (bf16 model)"]["ppl"] == pytest.approx(manual_perplexity(fq16, windows),
                                                           rel=1e-6)
    # and not the float32 model's nf4 perplexity (the row must run the bf16 model)
    fq32 = qcompile.fake_quantize_model_(
        transformers.AutoModelForCausalLM.from_pretrained(tiny / "lm").eval(),
        perplexity.weight_only("nf4"))
    assert ppl["nf4 (bf16 model)"]["ppl"] != pytest.approx(manual_perplexity(fq32, windows),
                                                           rel=1e-6)
    emb = {r["format"]: r for r in res["embeddings"]}
    assert set(emb) == {"nf4", "bof4s"}
    assert all(0.5 < r["cos_mean"] <= 1.0 + 1e-6 and r["mse"] > 0 for r in emb.values())
    speed = {r["label"]: r for r in res["speed"]}
    assert len(speed) == 10 and all(r["prefill_s"] > 0 and r["decode_ms"] > 0
                                    for r in speed.values())
    assert {"blockquant W8A8 mxint8 (eager)", "blockquant W4A8 int4 (eager)", "bf16: eager",
            "bf16: blockquant nf4 (eager)"} <= set(speed)
    # the bf16 rows run the model in bf16: half the float32 model's bytes, and less packed
    assert speed["bf16: eager"]["resident_bytes"] * 2 == speed["eager fp32"]["resident_bytes"]
    assert (speed["bf16: blockquant nf4 (eager)"]["resident_bytes"]
            < speed["bf16: eager"]["resident_bytes"])
    bq = speed["blockquant nf4 (eager)"]
    assert bq["resident_bytes"] < speed["eager fp32"]["resident_bytes"]
    assert bq["quantised_layer_bytes"] < 0.2 * bq["quantised_layer_fp32_bytes"]
    assert "peers" not in res
    gemv = {(r["format"], r["kernel"]): r for r in res["gemv"]}
    assert set(gemv) == {(f, k) for f in ("mxint8", "nf4")
                         for k in ("qcompile_cpu::linear", "cpu.linear")}
    assert all(r["N"] == 64 and r["K"] == 256 and r["gbs"] > 0 and r["err_vs_bound"] <= 1
               for r in gemv.values())


@pytest.mark.parametrize("args, message", [
    (["--model", "{missing}"], "no such folder"),
    (["--model", "{empty}"], "not a Hugging Face model folder"),
    (["--policies", "nf5x"], "neither a sweep label"),
    (["--tokens", "100", "--window", "512"], "smaller than one --window"),
    (["--formats", "bogus"], "unknown format"),
    (["--gemv-shapes", "64by256"], "not a shape NxK"),
])
def test_cli_argument_errors_are_clear(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    args = [a.format(missing=tmp_path / "missing", empty=tmp_path / "empty") for a in args]
    with pytest.raises(SystemExit) as e:
        run.main(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_text_shorter_than_the_budget_is_an_error(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _cli(tiny, tmp_path / "x", "--sections", "ppl", "--tokens", "100000")
    assert "fewer than the budget" in capsys.readouterr().err


def test_goals_are_judged_from_the_numbers():
    base = {"label": "fp32", "ppl": 20.0}
    res = {"settings": {"w4": "nf4"},
           "perplexity": [base, {"label": "int8", "ppl": 20.1}, {"label": "mxint8", "ppl": 20.3},
                          {"label": "bfp6 W6A6", "ppl": 20.5}, {"label": "nf4", "ppl": 23.0},
                          {"label": "bof4s", "ppl": 22.0}, {"label": "bof4s_opq", "ppl": 22.5}],
           "embeddings": [{"format": "nf4", "mse": 3.0}, {"format": "bof4s", "mse": 2.0},
                          {"format": "bof4s_opq", "mse": 1.0}],
           "speed": [{"label": "eager fp32", "prefill_s": 1.0, "decode_tok_s": 10.0},
                     {"label": "torch.compile fp32 (Inductor)", "prefill_s": 0.8,
                      "decode_tok_s": 15.0},
                     {"label": "blockquant mxint8 (inductor)", "prefill_s": 0.7,
                      "decode_tok_s": 24.0},  # 2.4x eager: short of 2.5x
                     {"label": "blockquant nf4 (inductor)", "prefill_s": 0.9,
                      "decode_tok_s": 41.0,  # 4.1x eager, 2.7x torch.compile
                      "resident_bytes": 19, "fp32_bytes": 100, "quantised_layer_bytes": 10,
                      "quantised_layer_fp32_bytes": 80}]}
    goal = dict(report.GOALS_DOC)
    status = {g: s for g, s, _ in report.goals(res)}
    assert status == {
        "W8 weight-only formats within 1% of full-precision perplexity": "missed",  # mxint8 +1.5%
        "bfp6 W6A6 within 3% of full-precision perplexity": "met",
        "perplexity: bof4s_opq <= bof4s <= nf4": "missed",
        "weight MSE (MiniLM): bof4s_opq <= bof4s <= nf4": "met",
        goal["decode4"]: "met", goal["decode8"]: "missed",
        goal["prefill"]: "missed",  # nf4 0.9 s against torch.compile's 0.8 s
        goal["memory"]: "met",  # 0.19x
        goal["gemv"]: "not measured", goal["peers"]: "not measured",
        goal["llama"]: "not measured", goal["dtype16"]: "not measured"}
    res["speed"][3]["prefill_s"] = 0.75
    res["speed"][3]["resident_bytes"] = 21
    status = {g: s for g, s, _ in report.goals(res)}
    assert status[goal["prefill"]] == "met" and status[goal["memory"]] == "missed"


def _speed_row(label, prefill_s, tok_s, **extra) -> dict:
    return {"label": label, "prefill_s": prefill_s, "decode_tok_s": tok_s,
            "decode_ms": 1e3 / tok_s, **extra}


def test_llama_and_dtype_goals_are_judged_from_the_numbers():
    goal = dict(report.GOALS_DOC)
    speed = [_speed_row("blockquant nf4 (inductor)", 1.0, 100.0, resident_bytes=19,
                        fp32_bytes=100, quantised_layer_bytes=10, quantised_layer_fp32_bytes=80),
             _speed_row("blockquant W8A8 mxint8 (inductor)", 1.0, 130.0),
             _speed_row("blockquant W4A8 int4 (inductor)", 1.0, 160.0),
             _speed_row("bf16: eager", 2.0, 20.0),
             # 0.91x the float32 row, 4.55x eager bf16, prefill 0.95x eager bf16's
             _speed_row("bf16: blockquant nf4 (inductor)", 1.9, 91.0)]
    res = {"settings": {"w4": "nf4"}, "speed": speed,
           "peers": [_speed_row("llama.cpp Q4_1 (packaged GGUF)", 1.0, 100.0),
                     {"label": "torchao int8", "skipped": "not installed"}]}
    status = {g: s for g, s, _ in report.goals(res)}
    # 1.0x, 1.3x (>= 1.2) and 1.6x (>= 1.5) llama.cpp's tokens/s
    assert status[goal["llama"]] == "met" and status[goal["dtype16"]] == "met"
    speed[2].update(_speed_row(speed[2]["label"], 1.0, 149.0))  # W4A8 1.49x: short of 1.5x
    speed[4]["decode_tok_s"] = 89.0  # 0.89x the float32 row: short of 0.9x
    status = {g: s for g, s, _ in report.goals(res)}
    assert status[goal["llama"]] == "missed" and status[goal["dtype16"]] == "missed"
    speed[2].update(_speed_row(speed[2]["label"], 1.0, 160.0))
    speed[4]["decode_tok_s"] = 91.0
    speed[4]["prefill_s"] = 2.1  # slower prefill than eager bf16
    assert {g: s for g, s, _ in report.goals(res)}[goal["dtype16"]] == "missed"
    del res["peers"]
    assert {g: s for g, s, _ in report.goals(res)}[goal["llama"]] == "not measured"


def test_report_lists_failed_rows_and_plots_the_others(tmp_path):
    res = {"started": "now", "total_s": 60.0,
           "machine": {"cpus": 2, "machine": "x86_64", "processor": "cpu", "platform": "Linux",
                       "threads": 2, "python": "3.11", "torch": "2.13", "transformers": "5",
                       "qcompile": "0.1"},
           "settings": {"command": "python -m benchmarks run", "model": "m", "text": "t",
                        "window": 8, "windows": 2, "batch": 1, "lowering": "eager",
                        "packaged_model": False},
           "perplexity": [{"label": "fp32", "ppl": 10.0, "bits": 32.0, "predictions": 14,
                           "compile_s": 0.0, "sec_per_window": 0.1, "act": False},
                          {"label": "nf4", "ppl": 11.0, "bits": 4.5, "predictions": 14,
                           "compile_s": 1.0, "sec_per_window": 0.2, "act": False},
                          {"label": "int3", "error": "RuntimeError: boom"}]}
    text = report.write(res, tmp_path).read_text()
    assert "| `nf4` | 4.500 | 11.000 | +10.00% |" in text
    assert "`int3` failed: RuntimeError: boom" in text
    assert "Q4_1" not in text  # the SmolLM2 caveat belongs to the packaged model only
    assert (tmp_path / "ppl_vs_bits.png").stat().st_size > 1000
    assert not (tmp_path / "speed.png").exists()
    assert json.loads((tmp_path / "results.json").read_text())["perplexity"][2]["error"]


def test_cli_lists_commands_and_rejects_an_unknown_one(capsys):
    from benchmarks.__main__ import MODULES, main
    with pytest.raises(SystemExit) as stop:
        main(["nonsense"])
    assert stop.value.code == 2  # a usage error, as argparse reports one: the message on stderr
    err = capsys.readouterr().err
    for command in ("weights", "run", "policy", "kernels"):
        assert command in err
    for module in MODULES.values():  # every command names a module with a main()
        assert callable(importlib.import_module(f"benchmarks.{module}").main)


def _python_m_benchmarks(*args):
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=root,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))


COMMANDS = ("weights", "run", "policy", "kernels")


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_cli_help_lists_every_command_and_exits_0(flag):
    done = _python_m_benchmarks(flag)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m benchmarks")
    for command in COMMANDS:  # each sub-command on a line of its own, with what it does
        assert any(line.split()[:1] == [command] for line in done.stdout.splitlines()), command
    assert "each command's --help lists its options" in done.stdout
    assert done.stderr == ""
    # and a command's own --help still reaches that command's parser
    own = _python_m_benchmarks("weights", flag)
    assert own.returncode == 0, own.stderr
    assert own.stdout.startswith("usage: python -m benchmarks weights")


@pytest.mark.parametrize("args", [["nonsense"], ["--nonsense"], []])
def test_cli_unknown_or_missing_command_exits_2_listing_the_valid_ones(args):
    done = _python_m_benchmarks(*args)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stdout == ""
    assert done.stderr.startswith("usage: python -m benchmarks")
    last = done.stderr.strip().splitlines()[-1]  # argparse's "prog: error: ..." line
    assert last.startswith("python -m benchmarks: error:"), last
    for command in COMMANDS:
        assert command in last, (command, last)
    if args:
        assert repr(args[0]) in last, last

