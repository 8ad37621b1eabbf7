"""The architectures a user brings, compiled as the README says (``qcompile.compile``, in
place, so ``generate`` runs compiled too), against the independent emulation in emulation.py.

Each model gets a policy anchored at its root (``lm_head``, ``model.layers.0.*``, a ``re:`` rule
for one layer's MLP, a None rule, a default), so a name that does not equal
``model.named_modules()`` shows up as a wrong format. ``explain(model)`` must list exactly the
expected first-match table. With ``lowering="eager", kernels="reference"`` the compiled model equals the emulation
bit for bit (forward with a padded batch, and ``generate`` with a KV cache); with Inductor it
stays within float32 reordering error (weight-only policies: docs/architecture.md).
"""
import logging

import pytest
import torch
import torch.nn as nn

import qcompile
from archs import ARCHS, CAUSAL, batch, build, logits, rules_for
from emulation import emulate, expected_table, explained_table, policy

transformers = pytest.importorskip("transformers")
T = transformers
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield


@pytest.mark.parametrize("arch", list(ARCHS))
def test_eager_lowering_is_the_emulation_bit_for_bit(arch):
    model = build(arch)
    rules, default = rules_for(arch)
    ref = emulate(model, rules, default)
    qcompile.compile(model, policy(rules, default), lowering="eager", kernels="reference", fullgraph=True)
    ids, mask = batch(arch)
    got, want = logits(model, ids, mask), logits(ref, ids, mask)
    assert torch.equal(got, want)
    assert explained_table(qcompile.explain(model)) == expected_table(model, rules, default)
    if arch in CAUSAL:
        kw = dict(max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
        with torch.no_grad():
            out = model.generate(ids[:1, :5], **kw)
            expect = ref.generate(ids[:1, :5], **kw)
        assert out.shape == (1, 9) and torch.equal(out, expect)


def test_the_emulation_sees_each_rule():
    """The check above could pass if every format were the same: it is not."""
    model = build("llama-tied")
    rules, default = rules_for("llama-tied")
    table = expected_table(model, rules, default)
    assert table["lm_head"] == ("int8", "-")
    assert table["model.layers.0.self_attn.q_proj"] == ("mxint8", "mxint8")
    assert table["model.layers.1.mlp.up_proj"] == ("int4[block_size=32]", "-")
    assert table["model.layers.1.self_attn.q_proj"] == ("-", "-")
    ids, mask = batch("llama-tied")
    assert not torch.equal(logits(model, ids, mask),
                           logits(emulate(model, rules, default), ids, mask))


@pytest.mark.parametrize("arch,dtype", [("llama", torch.bfloat16), ("llama", torch.float16),
                                        ("gpt2", torch.bfloat16), ("gpt2", torch.float16)])
def test_half_precision_models(arch, dtype):
    model = build(arch, dtype)
    rules, default = rules_for(arch)
    ref = emulate(model, rules, default)
    qcompile.compile(model, policy(rules, default), lowering="eager", kernels="reference", fullgraph=True)
    ids, mask = batch(arch)
    got = logits(model, ids, mask)
    assert got.dtype == dtype and torch.equal(got, logits(ref, ids, mask))


def test_dynamic_shapes_two_lengths():
    model = build("llama")
    rules, default = rules_for("llama")
    ref = emulate(model, rules, default)
    qcompile.compile(model, policy(rules, default), lowering="eager", kernels="reference", dynamic=True,
                     fullgraph=True)
    for n in (5, 11):
        ids, mask = batch("llama", n)
        assert torch.equal(logits(model, ids, mask), logits(ref, ids, mask))


def _close(got, want):
    scale = want.abs().max()
    torch.testing.assert_close(got, want, rtol=0, atol=float(2e-5 * scale + 1e-6))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_inductor_within_float32_reordering(arch):
    model = build(arch)
    rules, default = rules_for(arch, weight_only=True)
    ref = emulate(model, rules, default)
    qcompile.compile(model, policy(rules, default), fullgraph=True)  # Inductor, the default
    ids, mask = batch(arch)
    _close(logits(model, ids, mask), logits(ref, ids, mask))
    assert explained_table(qcompile.explain(model)) == expected_table(model, rules, default)


def test_inductor_forward_in_grad_mode():
    """The README's example as written runs under grad mode (no torch.no_grad)."""
    model = build("llama")
    rules, default = rules_for("llama", weight_only=True)
    ref = emulate(model, rules, default)
    qcompile.compile(model, policy(rules, default))
    ids, mask = batch("llama")
    got = model(input_ids=ids, attention_mask=mask).logits
    _close(got.detach(), logits(ref, ids, mask))


def test_sequential_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 80), nn.ReLU(),
                          nn.Linear(80, 16)).eval()
    rules = [("0", ("mxint8", "mxfp8_e4m3")), ("2", ("int4[block_size=32]", "nvfp4")),
             ("4", None)]
    ref = emulate(model, rules, None)
    qcompile.compile(model, policy(rules, None), lowering="eager", kernels="reference", fullgraph=True)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    assert explained_table(qcompile.explain(model)) == expected_table(model, rules, None)
