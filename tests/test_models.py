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
import re

import pytest
import torch
import torch.nn as nn

import qcompile
from emulation import emulate, expected_table, explained_table, policy

transformers = pytest.importorskip("transformers")
T = transformers
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield


def _decoder(cfg_cls, model_cls, **kw):
    cfg = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
               bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg.update(kw)
    return lambda: model_cls(cfg_cls(**cfg))


# name -> (builder, lm head name, decoder layers prefix, regex of layer 1's MLP linears)
ARCHS = {
    "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=64, bos_token_id=0,
        eos_token_id=0)), "lm_head", "transformer.h", r"mlp\..*"),
    "bert": (lambda: T.BertForMaskedLM(T.BertConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2,
        vocab_size=128, max_position_embeddings=64)), "cls.predictions.decoder",
        "bert.encoder.layer", r"(intermediate|output)\.dense"),
    "llama": (_decoder(T.LlamaConfig, T.LlamaForCausalLM, tie_word_embeddings=False),
              "lm_head", "model.layers", r"mlp\..*"),
    "llama-tied": (_decoder(T.LlamaConfig, T.LlamaForCausalLM, tie_word_embeddings=True),
                   "lm_head", "model.layers", r"mlp\..*"),
    "qwen2": (_decoder(T.Qwen2Config, T.Qwen2ForCausalLM), "lm_head", "model.layers", r"mlp\..*"),
    "mistral": (_decoder(T.MistralConfig, T.MistralForCausalLM), "lm_head", "model.layers",
                r"mlp\..*"),
    "gemma3": (_decoder(T.Gemma3TextConfig, T.Gemma3ForCausalLM, head_dim=16, sliding_window=16),
               "lm_head", "model.layers", r"mlp\..*"),
    "phi3": (_decoder(T.Phi3Config, T.Phi3ForCausalLM), "lm_head", "model.layers", r"mlp\..*"),
    "opt": (lambda: T.OPTForCausalLM(T.OPTConfig(
        num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4, vocab_size=128,
        max_position_embeddings=64, word_embed_proj_dim=64, bos_token_id=0, eos_token_id=0,
        pad_token_id=1)), "lm_head", "model.decoder.layers", r"fc[12]"),
}
CAUSAL = [a for a in ARCHS if a != "bert"]


def build(arch, dtype=torch.float32):
    torch.manual_seed(0)
    return ARCHS[arch][0]().to(dtype).eval()


def rules_for(arch, weight_only=False):
    _, head, layers, mlp = ARCHS[arch]
    act = None if weight_only else "mxint8"
    rules = [(head, ("int8", None)),
             (f"{layers}.0.*", ("mxint8", act)),
             (f"re:{re.escape(layers)}\\.1\\.{mlp}", ("int4[block_size=32]", None)),
             (f"{layers}.1.*", None)]
    return rules, ("nf4", None)


def batch(arch, n=7):
    """Two sequences, the second one padded (left for decoders, right for BERT)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 128, (2, n), generator=g)
    mask = torch.ones(2, n, dtype=torch.long)
    if arch == "bert":
        mask[1, -3:] = 0
    else:
        mask[1, :3] = 0
    return ids, mask


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


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
