"""Hypothesis fuzz: random small module trees x random policies, compiled (eager lowering)
against the independent emulation of emulation.py, bit for bit, and explain() against the
expected first-match table."""
import re

import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import qcompile
from emulation import emulate, expected_table, explained_table, linear_layers, policy

D = 32
WEIGHT_FORMATS = ["int8", "nf4", "mxint8", "int4[block_size=32]", "mxfp4", "bfp6", "bof4s_opq"]
ACT_FORMATS = [None, None, "mxint8", "mxfp8_e4m3", "bfp8"]


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.inner = nn.ModuleDict({"gate": nn.Linear(D, D, bias=False)})

    def forward(self, x):
        return x + self.inner["gate"](torch.tanh(self.proj(x)))


class Tree(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.layers = nn.ModuleList(blocks)
        self.out = nn.Linear(D, 8)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


BLOCKS = {
    "linear": lambda: nn.Linear(D, D),
    "mlp": lambda: nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D)),
    "gated": Gated,
    "nested": lambda: nn.Sequential(Gated(), nn.Sequential(nn.Linear(D, D), nn.ReLU())),
}


@st.composite
def specs(draw):
    return draw(st.sampled_from(WEIGHT_FORMATS + [None])), draw(st.sampled_from(ACT_FORMATS))


@st.composite
def trees_and_rules(draw):
    kinds = draw(st.lists(st.sampled_from(sorted(BLOCKS)), min_size=1, max_size=4))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = Tree([BLOCKS[k]() for k in kinds]).eval()
    names = [n for n, _, _ in linear_layers(model)]

    def pattern():
        name = draw(st.sampled_from(names))
        parts = name.split(".")
        how = draw(st.sampled_from(["exact", "glob", "regex", "star"]))
        if how == "glob":
            i = draw(st.integers(0, len(parts) - 1))
            return ".".join(parts[:i] + ["*"])
        if how == "regex":
            return "re:" + re.escape(".".join(parts[:draw(st.integers(1, len(parts)))])) + r"(\..*)?"
        return "*" if how == "star" else name

    def spec():  # None (full precision) one time in five
        if draw(st.integers(0, 4)) == 0:
            return None
        w, a = draw(specs())
        return (w, a) if (w or a) else ("int8", None)

    rules = [(pattern(), spec()) for _ in range(draw(st.integers(0, 4)))]
    default = spec()
    return model, rules, default


@settings(max_examples=30)
@given(trees_and_rules(), st.integers(1, 5))
def test_random_trees_and_policies_match_the_emulation(case, batch):
    model, rules, default = case
    torch._dynamo.reset()
    ref = emulate(model, rules, default)
    qcompile.compile(model, policy(rules, default), lowering="eager", kernels="reference", fullgraph=True)
    x = torch.randn(batch, D)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    assert explained_table(qcompile.explain(model)) == expected_table(model, rules, default)
