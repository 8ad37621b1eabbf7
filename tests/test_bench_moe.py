"""The mixture-of-experts benchmark (benchmarks/moe.py, ``python -m benchmarks run --sections
moe``) on a tiny Qwen3-MoE (hidden 64, 4 experts, 2 active), eager rows only (the compiled
rows cost a Dynamo compile each), and its report section and verdicts on made-up rows."""
import pytest
import torch

pytest.importorskip("transformers")

import qcompile  # noqa: E402
from benchmarks import moe, report, run  # noqa: E402

H, I, E, K, LAYERS = 64, 32, 4, 2, 2  # hidden, expert width, experts, active, layers
TINY = dict(hidden_size=H, num_experts_per_tok=K, moe_intermediate_size=I, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)


def tiny_config():
    return moe.moe_config(E, vocab=256, **TINY)


def float_bytes(model) -> int:
    """The oracle of the fp32 model's size: every parameter's and buffer's (the rotary
    embedding's frequencies) element count times 4."""
    return sum(4 * t.numel() for t in [*model.parameters(), *model.buffers()])


def expert_bytes_oracle(fmt=None, elem=4) -> int:
    """One expert's bytes: gate_up [2I, H] and down [H, I], in ``fmt`` (blocks along K: H for
    gate_up, I for down, at the format's stored bits per weight) or floats of ``elem`` bytes."""
    if fmt is None:
        return elem * (2 * I * H + H * I)
    f = qcompile.formats.get(fmt)
    return round((2 * I * H * f.effective_bits(H) + H * I * f.effective_bits(I)) / 8)


@pytest.fixture(scope="module")
def rows():
    torch._dynamo.reset()
    saved = []  # what on_row saw after each row
    got = moe.measure(tiny_config(), ["fp32", "bf16"], prefill=8, decode_prompt=4, decode=2,
                      repeats=1, lowering="eager", kinds=("eager",),
                      on_row=lambda rows: saved.append([r["label"] for r in rows]))
    assert saved == [[r["label"] for r in got[:n]] for n in range(1, len(got) + 1)]
    return {r["label"]: r for r in got}


def test_the_eager_rows_are_measured_with_the_oracles_byte_counts(rows):
    assert list(rows) == ["eager fp32", "blockquant nf4 fp32 (packed, eager)",
                          "blockquant W4A8 fp32 (packed, eager)", "eager bf16",
                          "blockquant nf4 bf16 (packed, eager)",
                          "blockquant W4A8 bf16 (packed, eager)"]
    assert not [r for r in rows.values() if "error" in r]
    fp32 = float_bytes(moe.build_model(tiny_config()))
    for r in rows.values():
        assert r["fp32_bytes"] == fp32 and r["prefill_s"] > 0 and r["decode_ms"] > 0
        assert r["expert_bytes_read"] is None or r["expert_bytes_read"] > 0
    # each decode step, each layer's router picks K distinct experts, at their bytes as held
    assert rows["eager fp32"]["active_expert_bytes"] == LAYERS * K * expert_bytes_oracle()
    assert rows["eager bf16"]["active_expert_bytes"] == LAYERS * K * expert_bytes_oracle(elem=2)
    for dtype in ("fp32", "bf16"):
        nf4 = rows[f"blockquant nf4 {dtype} (packed, eager)"]
        assert nf4["active_expert_bytes"] == LAYERS * K * expert_bytes_oracle("nf4")
        assert nf4["resident_bytes"] < 0.2 * fp32
        assert rows[f"blockquant W4A8 {dtype} (packed, eager)"]["active_expert_bytes"] == \
            LAYERS * K * expert_bytes_oracle("int4")
        assert rows[f"eager {dtype}"]["resident_bytes"] == fp32 // (1 if dtype == "fp32" else 2)
    assert "act int8 not applied" in rows["blockquant W4A8 fp32 (packed, eager)"]["experts_note"]
    assert rows["blockquant nf4 fp32 (packed, eager)"]["experts_note"] == ""


def test_every_configuration_is_listed_compiled_ones_too():
    labels = [label for label, _, _ in moe.configurations(torch.nn.Linear(1, 1), "bf16",
                                                           "inductor")]
    assert labels == ["eager bf16", "torch.compile bf16 (Inductor)",
                      "blockquant nf4 bf16 (packed, eager)", "blockquant nf4 bf16 (inductor)",
                      "blockquant W4A8 bf16 (packed, eager)", "blockquant W4A8 bf16 (inductor)"]


def test_the_read_counter_is_read_over_the_decode_steps_alone():
    """The packed experts' counter (``PackedExperts.bytes_read``), read over the decode steps
    alone: with the grouped matmul, which reads the experts that have tokens, exactly the active
    experts' bytes (the oracle: element counts of the packed format, layers x k experts)."""
    model = moe.build_model(tiny_config())
    model.set_experts_implementation("grouped_mm")
    qcompile.quantize_model_(model, moe.every_linear("nf4"))
    for p in moe._packs(model):
        p.reset_bytes_read()
    got = moe.decode_bytes(model, model, torch.arange(6)[None], decode=3)
    assert got["active_expert_bytes"] == LAYERS * K * expert_bytes_oracle("nf4")
    assert got["expert_bytes_read"] == got["active_expert_bytes"]


def _row(label, tok_s, resident=10, read=None, active=100):
    return {"label": label, "kind": "eager", "prefill_s": 1.0, "decode_ms": 1e3 / tok_s,
            "decode_tok_s": tok_s, "compile_s": 0.0, "build_s": 0.0, "resident_bytes": resident,
            "fp32_bytes": 100, "active_expert_bytes": active, "expert_bytes_read": read,
            "experts_note": ""}


def test_verdicts_follow_the_numbers():
    text = dict((k, t) for k, _, t in report.MOE_TARGETS)
    rows = [_row("eager fp32", 2.0, resident=100),
            _row("blockquant nf4 fp32 (packed, eager)", 4.0, resident=15),
            _row("blockquant nf4 fp32 (inductor)", 6.2, resident=15),  # 3.1x: the best counts
            {"label": "blockquant W4A8 fp32 (inductor)", "kind": "compiled", "error": "boom"}]
    got = {t: (st, ev) for t, st, ev in report.moe_verdicts(rows)}
    assert got[text["decode"]][0] == "met" and "3.10x" in got[text["decode"]][1]
    assert got[text["memory"]] == ("met", "blockquant nf4 fp32 (packed, eager) 0.150x, "
                                          "blockquant nf4 fp32 (inductor) 0.150x")
    assert got[text["bytes"]][0] == "not measured"
    rows[2].update(decode_tok_s=5.8, resident_bytes=17, expert_bytes_read=110)
    rows[1]["expert_bytes_read"] = 130  # 1.3x the active experts
    got = {t: st for t, st, _ in report.moe_verdicts(rows)}
    assert got == {text["decode"]: "not met", text["memory"]: "not met",
                   text["bytes"]: "not met"}
    rows[1]["expert_bytes_read"] = 90  # fewer bytes than the chosen experts: a broken counter
    rows[2]["expert_bytes_read"] = 100
    (_, st, ev), = [v for v in report.moe_verdicts(rows) if v[0] == text["bytes"]]
    assert st == "not met" and "misses reads" in ev
    rows[1]["expert_bytes_read"] = 119
    assert [st for t, st, _ in report.moe_verdicts(rows) if t == text["bytes"]] == ["met"]


def test_the_report_section_has_a_row_per_configuration_and_the_verdicts():
    rows = [_row("eager fp32", 2.0, resident=100), _row("blockquant nf4 fp32 (inductor)", 8.0)]
    rows[1]["experts_note"] = "act int8 not applied: expert inputs stay full precision"
    lines = report.moe_section(rows, {"moe": {"experts": 64}, "prefill": 512})
    table = [line for line in lines if line.startswith("| blockquant nf4")]
    assert table == ["| blockquant nf4 fp32 (inductor) | 1.000 | 125.0 | 8.00 | 4.00x | 0.0 | "
                     "0.0 | 0.0 MiB | 0.100x | 0.0 MiB | n/a | n/a |"]
    assert "- Expert tensors: act int8 not applied: expert inputs stay full precision." in lines
    assert sum(line.startswith("- **") for line in lines) == len(report.MOE_TARGETS)


def test_cli_runs_moe_only_when_named_and_checks_the_expert_count(capsys):
    ap = run.parser()
    assert "moe" not in run.settle(ap.parse_args([]), ap).sections
    args = run.settle(ap.parse_args(["--sections", "moe", "--quick"]), ap)
    assert args.moe_experts == moe.QUICK_EXPERTS and args.moe_dtypes == ["fp32", "bf16"]
    with pytest.raises(SystemExit) as stop:
        run.main(["--sections", "moe", "--moe-experts", "4"])
    assert stop.value.code == 2
    assert "--moe-experts must be at least 8" in capsys.readouterr().err
