"""The framework-time benchmark (benchmarks/framework.py): its split of a step's profile, on a
hand-built event tree whose parts are known, and the whole measurement on a tiny Llama."""
import types

import pytest
import torch

pytest.importorskip("transformers")

import qcompile  # noqa: E402
from archs import small_llama  # noqa: E402
from benchmarks import framework  # noqa: E402
from benchmarks.policies import every_linear  # noqa: E402


def event(name, start, end, *children):
    e = types.SimpleNamespace(name=name, time_range=types.SimpleNamespace(start=start, end=end),
                              cpu_children=list(children))
    return e


def test_split_of_a_known_event_tree():
    # step 0..100: guards 2..7 (a nested aten op 3..4 in it), the compiled region 10..90
    # holding the Inductor wrapper 12..80, whose children are a qcompile_cpu op 20..50 (with
    # an aten op nested in it: counted once), an Inductor kernel 55..60 and an aten op 70..75;
    # an aten op outside every framework event 92..95
    step = event(framework.STEP, 0, 100,
                 event("TorchDynamo Cache Lookup", 2, 7, event("aten::empty", 3, 4)),
                 event("Torch-Compiled Region: 0/1", 10, 90,
                       event("Pregraph bytecode", 10, 11),
                       event("## Call CompiledFxGraph abc ##", 12, 80,
                             event("qcompile_cpu::linear", 20, 50, event("aten::empty", 21, 22)),
                             event("graph_0_cpp_fused_add_0", 55, 60),
                             event("aten::mm", 70, 75))),
                 event("aten::argmax", 92, 95))
    got = framework.split_step(step)
    operators = 1 + 30 + 5 + 5 + 3
    assert got["operators"] == operators
    assert got["wall"] == 100 and got["framework"] == 100 - operators
    assert got["guards"] == 4
    assert got["inductor wrapper"] == 68 - 40
    assert got["compiled region"] == 80 - 68  # the pregraph bytecode's 1 included
    assert got["other"] == 100 - 5 - 80 - 3
    parts = sum(got[p] for p in ("guards", "inductor wrapper", "compiled region", "other"))
    assert parts == got["framework"]


def test_measure_on_a_tiny_compiled_llama():
    model = small_llama()
    qcompile.compile(model, every_linear("nf4"), lowering="eager")
    row = framework.measure(model, torch.tensor([[1, 5, 9, 2]]), steps=2, repeats=1)
    assert row["steps"] == len(row["steps_ms"]) == 2
    for step in row["steps_ms"]:
        assert all(v >= 0 for v in step.values()), step
        assert step["operators"] > 0 and step["guards"] > 0 and step["compiled region"] > 0
        assert step["framework"] + step["operators"] == pytest.approx(step["wall"], abs=1e-6)
        parts = step["guards"] + step["inductor wrapper"] + step["compiled region"] + \
            step["other"]
        assert parts == pytest.approx(step["framework"], abs=1e-6)
    assert row["framework"] + row["operators"] == pytest.approx(row["wall"])
    assert row["unprofiled_ms"] > 0
    text = framework.table(row, "tiny")
    assert f"{row['framework']:9.2f}" in text and "guards" in text


# -- what the measurement led to: the backend's C++ wrapper option and its guard filter --------

def embedding_and_linear():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(128, 64), torch.nn.Linear(64, 32)).eval()


EMB_POLICY = qcompile.Policy({"0": qcompile.LayerSpec(weight="nf4", op="embedding")},
                             default=qcompile.LayerSpec(weight="nf4"))


def test_cpp_wrapper_compiles_a_graph_holding_text_arguments(monkeypatch):
    # the embedding operator takes its format as JSON text (quotes inside), which Inductor's
    # C++ wrapper wrote into the C++ source unescaped: a compile error
    from qcompile import backend
    seen = []
    real = backend._lower

    def spy(gm, inputs, lowering, mode="default", **kw):
        seen.append(kw)
        return real(gm, inputs, lowering, mode, **kw)
    monkeypatch.setattr(backend, "_lower", spy)
    model = embedding_and_linear()
    ref = embedding_and_linear()
    with torch.no_grad():  # the oracle: both weights fake-quantised along their rows
        ref[0].weight.copy_(qcompile.fake_quantize(ref[0].weight, "nf4", axis=-1))
        ref[1].weight.copy_(qcompile.fake_quantize(ref[1].weight, "nf4", axis=-1))
    qcompile.compile(model, EMB_POLICY, cpp_wrapper=True)
    ids = torch.tensor([[3, 17, 99, 127, 0]])
    with torch.no_grad():
        got, want = model(ids), ref(ids)
    assert seen and all(kw == {"cpp_wrapper": True} for kw in seen)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options, match", [({"cpp_wrapper": "yes"}, "True or False"),
                                            ({"cpp_wrapper": True, "lowering": "eager"},
                                             "needs lowering='inductor'")])
def test_bad_cpp_wrapper_option_is_refused(options, match):
    with pytest.raises(ValueError, match=match):
        qcompile.compile(embedding_and_linear(), EMB_POLICY, **options)


def test_guards_are_dropped_only_on_packed_buffers():
    from qcompile import backend
    model = qcompile.quantize_model_(embedding_and_linear(), qcompile.Policy(
        {"0": None}, default=qcompile.LayerSpec(weight="nf4")))
    packed = list(model[1].buffers())
    assert len(packed) >= 2  # codes and scales

    def entry(kind, value):
        return types.SimpleNamespace(guard_type=kind, value=value)
    entries = [entry("TENSOR_MATCH", t) for t in packed] + [
        entry("TENSOR_MATCH", model[0].weight),  # a float weight: keeps its guard
        entry("TENSOR_MATCH", packed[0].clone()),  # same values, another tensor
        entry("ID_MATCH", packed[0]), entry("TYPE_MATCH", model[1])]
    keep = backend._packed_guards_dropped(model)(entries)
    assert keep == [False] * len(packed) + [True] * 4
