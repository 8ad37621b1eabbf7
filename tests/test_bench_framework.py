"""The framework-time benchmark (benchmarks/framework.py): its split of a step's profile, on a
hand-built event tree whose parts are known, and the whole measurement on a tiny Llama."""
import types

import pytest
import torch

pytest.importorskip("transformers")

import qcompile  # noqa: E402
from archs import small_llama  # noqa: E402
from benchmarks import framework  # noqa: E402
from benchmarks.speed import every_linear  # noqa: E402


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
