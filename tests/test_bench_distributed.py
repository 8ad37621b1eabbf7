"""The distributed benchmark (benchmarks/distributed.py, ``python -m benchmarks run --sections
distributed``) on a tiny random Llama saved at test time (hidden 128, 2 layers: its row-parallel
halves start on nf4's blocks of 64, as in tests/test_tensor_parallel.py), 1 and 2 ranks under
torchrun (gloo, CPU), eager decoding only (a compiled row costs a Dynamo compile per rank)."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import qcompile  # noqa: E402
from benchmarks import distributed, distributed_cli, run  # noqa: E402
from qcompile import LayerSpec, Policy  # noqa: E402
from qcompile.swap import QuantLinear  # noqa: E402

NF4 = Policy({"lm_head": None}, default=LayerSpec(weight="nf4"))  # the benchmark's policy
BOUND = 1e-5  # relative to the largest logit: float32 sums reordered across 2 ranks


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def measured(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    run.main(["--sections", "distributed", "--distributed-model", str(tiny), "--decode", "2",
              "--repeats", "1", "--decode-prompt", "8", "--distributed-kinds", "eager",
              "--out", str(out)])
    return out, json.loads((out / "results.json").read_text())


def one_process(folder):
    """The oracle: the float checkpoint loaded in this process, then quantised."""
    model = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    return qcompile.quantize_model_(model, NF4)


def packed_buffer_bytes(model) -> int:
    return sum(b.numel() * b.element_size() for m in model.modules()
               if isinstance(m, QuantLinear) for b in m.buffers())


def test_rows_for_1_and_2_ranks_hold_the_packed_bytes_of_their_share(tiny, measured):
    _, results = measured
    rows = results["distributed"]
    assert not [r for r in rows if "error" in r], rows
    assert [(r["ranks"], r["rank"]) for r in rows] == [(1, 0), (2, 0), (2, 1)]
    whole = packed_buffer_bytes(one_process(tiny))
    one, *two = rows
    assert one["packed_bytes"] == whole and one["sharded_layers"] == 0
    # each rank holds its half of the 14 sharded layers (q k v o gate up down, 2 layers)
    for r in two:
        assert r["packed_bytes"] <= 0.55 * whole, (r["packed_bytes"], whole)
        assert r["sharded_layers"] == 14
    for r in rows:
        assert r["eager"]["decode_ms"] > 0 and len(r["eager"]["tokens"]) == 3
        assert r["peak_rss"] >= r["rss_before"] > 0 and r["load_s"] > 0
        assert "compiled" not in r


def test_two_ranks_give_the_logits_of_one_process(tiny, measured):
    out, results = measured
    model = one_process(tiny)
    for ranks in (1, 2):
        saved = torch.load(out / "distributed" / f"logits_{ranks}ranks.pt")
        assert saved["prompt"].shape == (1, 8)
        with torch.no_grad():
            want = model(saved["prompt"]).logits
        err = ((saved["logits"] - want).abs().max() / want.abs().max()).item()
        assert err <= BOUND, (ranks, err)
    for r in results["distributed"]:
        assert r["max_rel_logit_diff"] <= BOUND and r["same_tokens"] == {"eager": True}


def test_report_says_the_numbers_are_correctness_and_memory_not_speed_up(measured):
    out, _ = measured
    text = (out / "report.md").read_text()
    assert "measure correctness and memory, not speed-up" in text
    assert "2 ranks share this machine's" in text
    table = [line for line in text.splitlines() if line.startswith("| 2 ranks |")]
    assert len(table) == 2 and all("| 0.500x |" in line for line in table), table
    assert "- Plan, 2 ranks: auto (the model's own)." in text


def test_heads_that_do_not_split_keep_attention_replicated():
    from benchmarks.distributed_worker import plan
    smol = transformers.LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3)
    assert "9 query / 3 key-value heads" in plan(smol, 2)
    assert smol.base_model_tp_plan and not [k for k in smol.base_model_tp_plan if "attn" in k]
    assert [k for k in smol.base_model_tp_plan if ".mlp." in k]
    even = transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=2)
    rules = dict(even.base_model_tp_plan)
    assert plan(even, 2) == "auto (the model's own)" and even.base_model_tp_plan == rules
    assert plan(even, 1) == "none (one process)"


def test_cli_runs_distributed_only_when_named_and_checks_its_options(tmp_path, capsys):
    from benchmarks.__main__ import MODULES
    assert MODULES["distributed"] == "distributed_cli"
    ap = run.parser()
    assert "distributed" not in run.settle(ap.parse_args([]), ap).sections
    with pytest.raises(SystemExit) as stop:
        distributed_cli.main(["--distributed-model", str(tmp_path / "nothing")])
    assert stop.value.code == 2
    assert "--distributed-model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        distributed_cli.main(["--sections", "ppl"])
    assert stop.value.code == 2 and "drop --sections" in capsys.readouterr().err
    with pytest.raises(ValueError, match="must start with 1"):
        distributed.measure(tmp_path, tmp_path, ranks=(2,))


def test_report_leaves_comparisons_blank_when_the_one_process_run_failed():
    from benchmarks import report
    rows = [{"label": "1 rank", "ranks": 1, "error": "RuntimeError: boom"},
            {"label": "2 ranks", "ranks": 2, "rank": 0, "plan": "auto (the model's own)",
             "packed_bytes": 2**20, "sharded_layers": 14, "resident_bytes": 2**21,
             "rss_before": 2**28, "peak_rss": 2**29, "load_s": 1.0,
             "eager": {"decode_ms": 3.0, "tokens": [1, 2]}}]
    lines = report.distributed_section(rows, {"distributed": {"kinds": ["eager"]}}, {"cpus": 2})
    assert "| 2 ranks | 0 | 1.0 MiB | - | 14 | 2.0 MiB | 256.0 MiB | 512.0 MiB | 1.0 | 3.0 | - " \
           "| - |" in lines
    assert "- `1 rank` failed: RuntimeError: boom" in lines
