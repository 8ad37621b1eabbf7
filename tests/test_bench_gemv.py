"""The GEMV bandwidth benchmark (benchmarks/gemv.py), the peers (benchmarks/peers.py) and their
parts of the report, on tiny shapes and a tiny random Llama so the tests stay fast."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import qcompile  # noqa: E402
from benchmarks import gemv, peers, report  # noqa: E402

SMALL_L3 = 64 * 2**10  # a pretend L3: tiny shapes can then rotate past it


def test_copies_read_more_than_twice_the_l3_between_uses():
    for nbytes in (1, 1000, 9 * 2**20, 25 * 2**20, 47 * 2**20, 180 * 2**20):
        c = gemv.copies_for(nbytes, 32 * 2**20)
        assert c >= 2
        if c < gemv.MAX_COPIES:
            assert (c - 1) * nbytes >= 2 * 32 * 2**20 > (c - 2) * nbytes
            assert gemv.from_dram(nbytes, c, 32 * 2**20)
    assert not gemv.from_dram(1000, gemv.copies_for(1000, 32 * 2**20), 32 * 2**20)


def test_l3_size_is_read_from_sysfs_text(tmp_path):
    (tmp_path / "size").write_text("32768K\n")
    assert gemv.l3_bytes(tmp_path / "size") == 32 * 2**20
    (tmp_path / "size").write_text("96M\n")
    assert gemv.l3_bytes(tmp_path / "size") == 96 * 2**20
    assert gemv.l3_bytes(tmp_path / "missing") == gemv.L3_DEFAULT


def test_gemv_rows_on_a_tiny_shape():
    n, k = 64, 256
    rows = gemv.measure("mxint8", "nf4", shapes=[(n, k)], rounds=5, l3=SMALL_L3)
    assert {(r["format"], r["kernel"]) for r in rows} == {
        (f, e) for f in ("nf4", "mxint8") for e in ("qcompile_cpu::linear", "cpu.linear")}
    for r in rows:
        assert "error" not in r, r
        q = qcompile.quantize(torch.zeros(n, k), r["format"], axis=1)
        assert r["bytes"] == q.nbytes + 4 * k + 4 * n
        assert r["us"] > 0 and r["gbs"] > 0 and r["stream_gbs"] > 0 and r["fp32_gbs"] > 0
        assert r["gbs"] == pytest.approx(r["bytes"] / r["us"] / 1e3)
        assert r["pct_stream"] == pytest.approx(100 * r["gbs"] / r["stream_gbs"])
        assert r["stream"] in gemv.STREAMS
        assert 0 <= r["err_vs_bound"] <= 1 and r["max_abs_err"] < 1e-4
        assert r["from_dram"] and (r["copies"] - 1) * q.nbytes >= 2 * SMALL_L3


def test_a_wrong_kernel_result_fails_its_row(monkeypatch):
    from qcompile.codegen import cpu

    def wrong(q, x):
        return {"off by one": lambda c: cpu.linear(x, c, None, None) + 1.0}
    monkeypatch.setattr(gemv, "_entries", wrong)
    [row] = gemv.measure_one("nf4", 32, 128, rounds=3, l3=SMALL_L3)
    assert row["err_vs_bound"] > 1 and row["max_abs_err"] == pytest.approx(1.0, rel=1e-3)
    assert row["error"].startswith("wrong result")
    res = {"gemv": [row]}
    status = dict((g, s) for g, s, _ in report.goals(res))
    assert status[dict(report.GOALS_DOC)["gemv"]] == "not measured"
    text = "\n".join(report.gemv_section([row], None))
    assert "FAILED (wrong result)" in text and "failed: wrong result" in text


def test_gemv_and_peer_goals_are_judged_from_the_numbers():
    def g(fmt, n, pct, kernel="qcompile_cpu::linear", **kw):
        return {"format": fmt, "N": n, "K": 4096, "M": 1, "kernel": kernel, "pct_stream": pct,
                **kw}
    rows = [g("nf4", 4096, 80), g("nf4", 11008, 75), g("nf4", 4096, 10, "cpu.linear"),
            g("mxint8", 4096, 71), g("mxint8", 11008, 90)]
    speed = [{"label": "blockquant nf4 (inductor)", "decode_ms": 5.0, "resident_bytes": 1,
              "fp32_bytes": 4, "quantised_layer_bytes": 1, "quantised_layer_fp32_bytes": 4}]
    peer_rows = [{"label": "llama.cpp", "kind": "peer", "decode_ms": 6.0},
                 {"label": "torchao int8", "kind": "peer", "error": "boom"},
                 {"label": "torchao", "kind": "peer", "skipped": "not installed: pip ..."}]
    res = {"settings": {"w4": "nf4"}, "gemv": rows, "speed": speed, "peers": peer_rows}
    gemv_goal, peer_goal = dict(report.GOALS_DOC)["gemv"], dict(report.GOALS_DOC)["peers"]
    status = {goal: (s, ev) for goal, s, ev in report.goals(res)}
    assert status[gemv_goal][0] == "met"  # the Python entry's 10% is not what graphs call
    assert status[peer_goal] == ("met", "0.83x the latency of llama.cpp")
    rows[3]["pct_stream"] = 69
    peer_rows[0]["decode_ms"] = 4.0
    status = {goal: s for goal, s, _ in report.goals(res)}
    assert status[gemv_goal] == "missed" and status[peer_goal] == "missed"


def _results(tmp_path, speed, peer_rows):
    return {"started": "now", "total_s": 1.0,
            "machine": {"cpus": 2, "machine": "x86_64", "processor": "cpu", "platform": "Linux",
                        "threads": 2, "python": "3.11", "torch": "2.13", "transformers": "5",
                        "qcompile": "0.1"},
            "settings": {"command": "c", "model": "m", "text": "t", "window": 8, "windows": 1,
                         "lowering": "eager", "packaged_model": False, "prefill": 32,
                         "decode_prompt": 16, "decode": 2, "repeats": 1},
            "speed": speed, "peers": peer_rows}


def test_report_says_when_a_peer_is_not_installed(tmp_path, monkeypatch):
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)).eval()
    monkeypatch.setattr(peers, "installed", lambda module: False)
    ids = torch.randint(0, 64, (1, 32))
    rows = peers.measure(lm, ids, ids[:, :16], 2, 1, gguf=None)
    assert [r["label"] for r in rows] == [peers.LLAMA_LABEL, "torchao weight-only int4 / int8"]
    assert all(r["skipped"].startswith("not installed: pip install") for r in rows)
    eager = {"label": "eager fp32", "kind": "eager", "prefill_s": 0.2, "decode_ms": 10.0,
             "decode_tok_s": 100.0, "compile_s": 0.0, "resident_bytes": 400, "fp32_bytes": 400}
    peer = {"label": "some peer", "kind": "peer", "prefill_s": 0.1, "decode_ms": 5.0,
            "decode_tok_s": 200.0, "compile_s": None, "resident_bytes": 100, "fp32_bytes": 400,
            "version": "9.9", "top1_vs_fp32": 0.75}
    text = report.write(_results(tmp_path, [eager], rows + [peer]), tmp_path).read_text()
    assert f"`{peers.LLAMA_LABEL}`: not installed: pip install -c constraints.txt " \
           "llama-cpp-python" in text
    assert "not installed: pip install -c constraints.txt torchao" in text
    assert "| some peer | 0.100 | 0.50x | 5.0 | 200.0 | - | 0.0 MiB | 0.250x |" in text
    assert "`some peer` (version 9.9): top-1 75.0% vs fp32" in text
    assert (tmp_path / "speed.png").read_bytes()[:4] == b"\x89PNG"


def test_report_without_peers_says_they_were_not_run(tmp_path):
    eager = {"label": "eager fp32", "kind": "eager", "prefill_s": 0.2, "decode_ms": 10.0,
             "decode_tok_s": 100.0, "compile_s": 0.0, "resident_bytes": 400, "fp32_bytes": 400}
    res = _results(tmp_path, [eager], None)
    del res["peers"]
    assert "were not run (`--no-peers`)" in report.write(res, tmp_path).read_text()


def test_torchao_int4_group_divides_every_linear():
    lin = torch.nn.Sequential(torch.nn.Linear(576, 1536), torch.nn.Linear(1536, 576))
    assert peers.int4_group(lin) == 64  # 576 is no multiple of torchao's default 128
    assert peers.int4_group(torch.nn.Linear(256, 8)) == 128


def test_llama_cpp_peer_on_the_packaged_gguf():
    """Real llama.cpp on the packaged GGUF, fed the benchmark's token ids: its next-token
    predictions agree with the float32 model converted from the same file (same vocabulary,
    same weights: it quantises only the activations, to 8 bits)."""
    pytest.importorskip("llama_cpp")
    data = pytest.importorskip("benchmarks.data")
    try:
        model, tok = data.load_causal_lm()
        gguf = peers.packaged_gguf()
    except SystemExit as e:  # the model package is not installed
        pytest.skip(str(e))
    ids = tok(data.wiki_text()[:2000], return_tensors="pt").input_ids[:, :64]
    reference = peers.top1(model, ids[:, :32])
    row = peers.llama_cpp(gguf, ids, ids[:, :32], 3, 1, model.config.vocab_size, reference,
                          qcompile.resident_weight_bytes(model))
    assert row["prefill_s"] > 0 and row["decode_ms"] > 0 and row["kind"] == "peer"
    assert row["resident_bytes"] == gguf.stat().st_size < row["fp32_bytes"] / 4
    assert row["top1_vs_fp32"] >= 0.8, row["top1_vs_fp32"]


@pytest.mark.slow
def test_torchao_peers_on_a_tiny_llama():
    """torchao's int8 weight-only through Inductor (minutes of compiling on 2 cores)."""
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)).eval()
    ids = torch.randint(0, 64, (1, 32))
    rows = peers.torchao_rows(lm, ids, ids[:, :16], 2, 1, peers.top1(lm, ids[:, :16]),
                              qcompile.resident_weight_bytes(lm))
    int8 = next(r for r in rows if "int8" in r["label"])
    assert int8["decode_ms"] > 0 and int8["quantised_linears"] == "8/8"
    assert int8["resident_bytes"] < 0.5 * int8["fp32_bytes"]
    assert int8["top1_vs_fp32"] >= 0.9  # int8 per row barely moves a random model's logits
