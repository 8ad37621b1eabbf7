"""benchmarks/package.py: the speed section's package row, on a one-layer tiny random Llama with
a tied embedding / lm_head (as SmolLM2's): exported once into a cache folder (two AOTInductor
compiles: about a minute of CPU), then loaded and timed in a fresh process. The oracle for its
predictions is the same model quantised by ``quantize_model_`` with the row's policy (every
linear layer nf4, lm_head too, the embedding in float32), run eagerly: what
``qcompile.compile(..., lowering="eager")`` runs bit for bit."""
import copy

import pytest
import torch

pytest.importorskip("transformers")

import archs  # noqa: E402
import transformers  # noqa: E402

import qcompile  # noqa: E402
from benchmarks import package, report, run  # noqa: E402
from qcompile import LayerSpec, Policy  # noqa: E402

IDS = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(0))
PROMPT, DECODE_PROMPT, DECODE, REPEATS = IDS, IDS[:, :8], 3, 2
BOUND = 1e-4  # the Inductor bound of docs/architecture.md on the logits


def tiny_llama():
    return archs._decoder(transformers.LlamaConfig, transformers.LlamaForCausalLM,
                          tie_word_embeddings=True, num_hidden_layers=1)().eval()


# the row needs two AOTInductor compiles (minutes on 2 cores): outside make test's budget; the
# fresh-process package decoding itself is in the default run (tests/test_export_decode.py)
SLOW_EXPORT = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_llama()


@pytest.fixture(scope="module")
def row(model, cache):
    return package.measure(model, PROMPT, DECODE_PROMPT, DECODE, REPEATS, "nf4", cache)


@SLOW_EXPORT
def test_the_row_is_measured_in_a_fresh_process_without_dynamo(row):
    assert "error" not in row, row.get("error")
    assert row["label"] == "blockquant nf4 (package)" and row["kind"] == "package"
    assert row["export_s"] > 0 and row["export_reused"] is False
    assert 0 < row["load_s"] < row["first_token_s"]
    assert row["prefill_s"] > 0 and row["decode_ms"] > 0
    assert row["decode_tok_s"] == pytest.approx(1e3 / row["decode_ms"])
    assert row["prefill_tok_s"] == pytest.approx(PROMPT.shape[1] / row["prefill_s"])
    assert row["dynamo_frames"] == 0
    assert row["threads"] == torch.get_num_threads()
    assert row["max_cache_len"] == 20  # the 20-token prefill; the decode needs 8 + 3
    assert row["compile_s"] is None


@SLOW_EXPORT
def test_its_predictions_are_the_quantised_model_s(row, model):
    """Teacher-forced next tokens over the decode prompt: the eager quantised model's, except
    where its two best logits are closer than the bound; top-1 vs fp32 counts the float
    model's own predictions."""
    quantised = qcompile.quantize_model_(copy.deepcopy(model),
                                         Policy({}, default=LayerSpec(weight="nf4")))
    with torch.no_grad():
        logits = quantised(DECODE_PROMPT).logits[0]
        fp32 = model(DECODE_PROMPT).logits[0].argmax(-1)
    got = torch.tensor(row["top1"])
    assert got.shape == (DECODE_PROMPT.shape[1],)
    best = logits.max(-1).values
    assert torch.all(best - logits.gather(1, got[:, None])[:, 0] <= BOUND)
    assert row["top1_vs_fp32"] == pytest.approx(float((got == fp32).float().mean()))


@SLOW_EXPORT
def test_a_second_run_reuses_the_packages_while_the_inputs_match(row, model, cache):
    length = package.cache_length(PROMPT, DECODE_PROMPT, DECODE)
    folder, record = package.packaged(model, "nf4", length, cache)
    assert record["reused"] is True and record["export_s"] == row["export_s"]
    assert sorted(p.name for p in folder.iterdir()) == ["decode.pt2", "export.json",
                                                        "prefill.pt2"]
    key = package.package_key(model, "nf4", length)
    assert package.package_key(model, "nf4", length + 1) != key
    assert package.package_key(model, "mxint8", length) != key
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight[0, 0] += 1
    assert package.package_key(other, "nf4", length) != key


def test_a_failing_export_is_a_row_saying_why(tmp_path):
    windowed = transformers.MistralForCausalLM(transformers.MistralConfig(
        num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, sliding_window=4)).eval()
    got = package.measure(windowed, PROMPT, DECODE_PROMPT, DECODE, REPEATS, "nf4", tmp_path)
    assert set(got) == {"label", "kind", "error"}
    assert got["error"].startswith("export failed: NotImplementedError")
    assert "StaticSlidingWindowLayer" in got["error"]
    assert not list((tmp_path / "packages").iterdir())  # no half-written package left


@pytest.mark.parametrize("argv, runs", [([], True), (["--no-package"], False),
                                        (["--speed-lowering", "eager"], False),
                                        (["--quick"], False)])
def test_the_package_row_runs_with_the_inductor_speed_lowering_unless_skipped(argv, runs):
    ap = run.parser()
    args = run.settle(ap.parse_args(argv + ["--out", "unused"]), ap)
    assert run.package_runs(args) is runs


def test_the_report_puts_the_row_beside_the_compiled_one():
    compiled = {"label": "blockquant nf4 (inductor)", "kind": "compiled", "prefill_s": 2.0,
                "prefill_tok_s": 10.0, "decode_ms": 100.0, "decode_tok_s": 10.0,
                "compile_s": 30.0, "build_s": 4.0, "resident_bytes": 10, "fp32_bytes": 40,
                "quantised_layer_bytes": 5, "quantised_layer_fp32_bytes": 40}
    pkg = {"label": "blockquant nf4 (package)", "kind": "package", "prefill_s": 1.5,
           "prefill_tok_s": 13.3, "decode_ms": 90.0, "decode_tok_s": 11.1, "compile_s": None,
           "export_s": 300.0, "export_reused": True, "load_s": 0.25, "first_token_s": 1.75,
           "first_prefill_s": 1.2, "dynamo_frames": 0, "threads": 2, "max_cache_len": 20,
           "resident_bytes": 30, "fp32_bytes": 40, "top1": [1, 2], "top1_vs_fp32": 0.5}
    results = {"started": "now", "total_s": 1.0, "machine": run.machine(),
               "settings": {"command": "c", "model": "m", "packaged_model": False,
                            "prefill": 20, "decode_prompt": 8, "decode": DECODE,
                            "repeats": REPEATS, "w4": "nf4"},
               "speed": [compiled], "package": [pkg]}
    text = report.markdown(results, {"speed": "speed.png"})
    table = [line for line in text.splitlines() if line.startswith("| blockquant nf4 (")]
    assert table[0].startswith("| blockquant nf4 (inductor) | 2.000 | 1.00x | 100.0 |")
    assert table[1] == ("| blockquant nf4 (package) | 1.500 | 0.75x | 90.0 | 11.1 | - | "
                        "0.0 MiB | 0.750x |")
    # start-up: 4 + 30 + the warm first token, 2 s * 8 / 20 + 100 ms
    assert table[2] == ("| blockquant nf4 (inductor) | - | 34.9 | quantise + wrap 4.0, compile "
                        "30.0, first token warm 0.90 (estimated) |")
    assert table[3] == ("| blockquant nf4 (package) | 300.0 (reused) | 1.75 | load 0.25, "
                        "prefill + first step cold 1.50 |")
    assert "- `blockquant nf4 (package)`: top-1 50.0% vs fp32, static cache of 20 tokens, " \
           "0 Dynamo frames" in text
    assert "Package targets (load + first token under 5 s, decode no slower than the compiled " \
           "4-bit row): met (" in text
    for slow in ({"first_token_s": 5.0}, {"decode_ms": 100.5}):
        slower = {**results, "package": [{**pkg, **slow}]}
        assert "4-bit row): missed (" in report.markdown(slower, {"speed": "speed.png"})
    failed = {**results, "package": [{"label": "blockquant nf4 (package)", "kind": "package",
                                      "error": "export failed: boom"}]}
    text = report.markdown(failed, {"speed": "speed.png"})
    assert "- `blockquant nf4 (package)` failed: export failed: boom" in text
    skipped = {**results, "settings": {**results["settings"], "package_skipped": "--no-package"}}
    del skipped["package"]
    assert "- The package row was not run (`--no-package`)." in report.markdown(
        skipped, {"speed": "speed.png"})
