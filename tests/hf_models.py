"""Tiny transformers checkpoints and the oracles the transformers integration is checked
against: plain float loading, then ``quantize_model_`` (tests/test_hf_quantizer.py,
tests/test_stream.py), and ``reference_copy``, an eager fake-quantised copy written without
qcompile's model passes (tests/test_backend.py, tests/test_smollm2.py)."""
import copy

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import qcompile
from qcompile import LayerSpec, Policy
from qcompile.swap import POLICIES_ATTR, QuantEmbedding, QuantLinear

LLAMA = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128)
IDS = torch.tensor([[1, 5, 9, 2, 77, 3, 120]])
MIXED = Policy({"model.embed_tokens": LayerSpec(weight="nf4", op="embedding"),  # shared with
                "lm_head": LayerSpec(weight="nf4"),                          # the tied lm_head
                "*.mlp.down_proj": LayerSpec(weight="bof4s_opq"),           # outlier side data
                "re:.*self_attn\\.[qk]_proj": LayerSpec(weight="mxint8", act="mxint8")},
               default=LayerSpec(weight="int4"))


def save_llama(folder, tie=True, seed=0, dtype=torch.float32, **save_kwargs):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**LLAMA, tie_word_embeddings=tie)
    transformers.LlamaForCausalLM(cfg).to(dtype).save_pretrained(folder, **save_kwargs)
    return folder


def save_gpt2(folder, **save_kwargs):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder, **save_kwargs)
    return folder


def reference(folder, policy, **kwargs):
    """The oracle: plain float loading, then quantize_model_ (no BlockQuantConfig involved)."""
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    return qcompile.quantize_model_(model, policy)


def with_config(folder, policy, **kwargs):
    cfg = qcompile.BlockQuantConfig(policy=policy)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=cfg, **kwargs).eval()


def reference_copy(model, policy):
    """A deep copy of ``model`` whose linear weights (nn.Linear, GPT-2's Conv1D) are replaced by
    their fake-quantised values and whose activation formats run as forward pre-hooks, matched
    by ``policy`` on module names: the backend's oracle, independent of qcompile's own
    fake_quantize_model_ and of the FX passes."""
    ref = copy.deepcopy(model)
    for name, mod in ref.named_modules():
        if isinstance(mod, nn.Linear):
            axis = -1
        elif isinstance(mod, Conv1D):
            axis = 0
        else:
            continue
        _, spec = policy.match(name, "linear")
        if spec is None:
            continue
        if spec.weight is not None:  # a Parameter of its own: a tied embedding keeps its table
            with torch.no_grad():
                fq = qcompile.fake_quantize(mod.weight.detach(), spec.weight, axis=axis)
            mod.weight = nn.Parameter(fq, requires_grad=False)
        if spec.act is not None:
            mod.register_forward_pre_hook(
                lambda m, args, f=spec.act: (qcompile.fake_quantize(args[0], f, axis=-1), *args[1:]))
    return ref


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def state(model) -> dict:
    return {**dict(model.named_parameters(remove_duplicate=False)),
            **dict(model.named_buffers(remove_duplicate=False))}


def sharing(model) -> list:
    """Which names share one tensor (tied tables, a packed table shared by two layers)."""
    groups = {}
    for name, t in state(model).items():
        groups.setdefault(id(t), []).append(name)
    return sorted(g for g in groups.values() if len(g) > 1)


def assert_same(got, want):
    assert {n: type(m) for n, m in got.named_modules()} == {
        n: type(m) for n, m in want.named_modules()}
    quantised = [n for n, m in want.named_modules() if isinstance(m, (QuantLinear,
                                                                          QuantEmbedding))]
    assert quantised
    for name in quantised:
        g, w = got.get_submodule(name), want.get_submodule(name)
        assert (g.meta, g.impl, getattr(g, "act", None)) == (w.meta, w.impl, getattr(w, "act",
                                                                                      None))
    sg, sw = state(got), state(want)
    assert sorted(sg) == sorted(sw)
    for name, t in sw.items():
        assert sg[name].dtype == t.dtype and torch.equal(sg[name], t), name
    assert sharing(got) == sharing(want)
    assert getattr(got, POLICIES_ATTR) == getattr(want, POLICIES_ATTR)
    assert torch.equal(logits(got), logits(want))
