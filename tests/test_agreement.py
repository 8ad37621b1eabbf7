"""Every helper decides each layer by one rule (qcompile.linear_rule): the compiled model,
``quantize_model_``, ``fake_quantize_model_`` and ``explain`` quantise the same layers, skip the
same ones for the same reason, and compute the same numbers.

The oracles are independent of qcompile's module logic: which layers are linear is read here
from the module classes (nn.Linear, any subclass, and GPT-2's Conv1D: FalconLinear computes
``x @ W.T`` itself), which modules only look like one (a mixture-of-experts router: its own 2-D
``weight`` used by ``F.linear`` inside a top-k), and the logits come from hf_models'
``reference_copy``, which fake-quantises each linear weight by module name without the passes.
"""
import copy
import logging

import pytest
import torch
from torch import nn

import qcompile
from archs import ARCHS, batch
from hf_models import reference_copy
from qcompile import LayerSpec, Policy
from qcompile.swap import QuantLinear, skipped_layers

transformers = pytest.importorskip("transformers")
T = transformers
Conv1D = transformers.pytorch_utils.Conv1D
logging.getLogger("transformers").setLevel(logging.ERROR)

SMALL = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128)
MOE = dict(SMALL, num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64)
EXTRA = {
    "falcon": lambda: T.FalconForCausalLM(T.FalconConfig(**SMALL, multi_query=True)),
    "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(
        d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=128,
        decoder_start_token_id=0)),
    "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(
        **MOE, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2-moe": lambda: T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(
        **MOE, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
        num_experts_per_tok=2)),
}
BUILDERS = {**{a: ARCHS[a][0] for a in ARCHS}, **EXTRA}
# block 1 with activations too, everything else weight-only 4 bit, lm_head in full precision
POLICY = Policy({"lm_head": None,
                 "re:.*\\.1\\..*": LayerSpec(weight="int8", act="mxint8")},
                default=LayerSpec(weight="int4[block_size=32]"))


def policy_for(name) -> Policy:
    """POLICY; for a mixture of experts, with its expert tensors kept in full precision: the
    backend's graphs cannot pack them (qcompile.compile packs them before compiling:
    tests/test_moe.py, tests/test_moe_compile.py), and this test compares layer by layer."""
    if not any(isinstance(p, nn.Parameter) and p.dim() == 3
               for p in BUILDERS[name]().parameters()):
        return POLICY
    return Policy([("*.experts.*", None)] + [(r.pattern, r.spec) for r in POLICY.rules],
                  default=POLICY.default)


def build(name):
    torch.manual_seed(0)
    model = BUILDERS[name]().eval()
    with torch.no_grad():  # weights large enough that 4 bits move the logits
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return model


def inputs(name) -> dict:
    if name == "t5":
        ids, _ = batch("llama")
        return dict(input_ids=ids, decoder_input_ids=ids[:, :4])
    ids, mask = batch(name if name in ARCHS else "llama")
    return dict(input_ids=ids, attention_mask=mask)


def logits(model, kw):
    with torch.no_grad():
        return model(**kw).logits


def expected(model):
    """(quantised, look-alikes): the linear layers the policy gives a format, read from their
    classes, and the modules holding a 2-D weight that are not linear layers or embeddings."""
    linear = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    lookalikes = {n for n, m in model.named_modules()
                  if isinstance(m._parameters.get("weight"), nn.Parameter)
                  and m._parameters["weight"].dim() == 2
                  and not isinstance(m, (nn.Linear, Conv1D, nn.Embedding))}
    return {n for n in linear if n != "lm_head"}, lookalikes


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield


# Llama's near twins (the same linear layers under the same names) under slow; test_models.py runs
# each of them through the compiled model by default
TWINS_OF_LLAMA = {"llama-tied", "qwen2", "mistral"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in TWINS_OF_LLAMA
                                  else n for n in BUILDERS])
def test_the_helpers_agree_layer_by_layer(name):
    model, kw, policy = build(name), inputs(name), policy_for(name)
    quantised, lookalikes = expected(model)
    assert quantised
    want = logits(reference_copy(model, policy), kw)
    assert not torch.equal(want, logits(model, kw))  # the policy changes the logits

    compiled = qcompile.compile(copy.deepcopy(model), policy, lowering="eager",
                                kernels="reference")
    assert torch.equal(logits(compiled, kw), want)
    rows = qcompile.explain(compiled).rows
    assert {r.fqn for r in rows if r.weight_fmt != "-"} == quantised
    compiled_skips = {r.fqn: r.note for r in rows if r.note.startswith("skipped")}
    assert set(compiled_skips) == lookalikes

    fake = qcompile.fake_quantize_model_(copy.deepcopy(model), policy)
    assert torch.equal(logits(fake, kw), want)
    before = dict(model.named_modules())
    changed = {n for n, m in fake.named_modules() if n in quantised | lookalikes
               and not torch.equal(m.weight, before[n].weight)}
    assert changed == quantised
    assert {n: f"skipped: {r}" for n, _, r in skipped_layers(fake)} == compiled_skips

    packed = qcompile.quantize_model_(copy.deepcopy(model), policy)
    assert {n for n, m in packed.named_modules() if isinstance(m, QuantLinear)} == quantised
    assert {n: f"skipped: {r}" for n, _, r in skipped_layers(packed)} == compiled_skips
    for m in packed.modules():  # eagerly, on the reference ops the compiled model ran
        if isinstance(m, QuantLinear):
            m.impl = "reference"
    assert torch.equal(logits(packed, kw), want)


def test_a_router_is_kept_in_full_precision_by_every_helper_with_one_reason():
    model = build("mixtral")
    policy = Policy({"*.mlp.gate": LayerSpec(weight="int8")}, default=None)
    kw = inputs("mixtral")
    with pytest.warns(UserWarning) as said:
        qcompile.quantize_model_(copy.deepcopy(model), policy)
        qcompile.fake_quantize_model_(copy.deepcopy(model), policy)
        compiled = qcompile.compile(copy.deepcopy(model), policy, lowering="eager",
                                    kernels="reference")
        out = logits(compiled, kw)
        qcompile.explain(copy.deepcopy(model), policy, **kw)
    text = [str(w.message) for w in said]
    assert not [t for t in text if "matches no layer" in t]  # the rule did match: the routers
    for who in ("quantize_model_", "fake_quantize_model_", "blockquant"):
        assert [t for t in text if t.startswith(f"{who}: layers 'model.layers.0.mlp.gate'")
                or t.startswith(f"{who}: layer 'model.layers.0.mlp.gate'")], (who, text)
    assert all("MixtralTopKRouter holds a 2-D weight but is not a linear layer" in t
               for t in text if "mlp.gate" in t)
    assert torch.equal(out, logits(model, kw))  # nothing else is quantised


@pytest.mark.parametrize("entry", ["quantize_model_", "fake_quantize_model_", "explain",
                                   "compile", "from_pretrained", "quantize_checkpoint"])
def test_every_entry_point_says_a_rule_matches_no_layer(entry, tmp_path):
    from hf_models import save_llama
    folder = save_llama(tmp_path / "llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    policy = Policy({"*.mlp.up_prj": LayerSpec(weight="int8")},  # a typo
                    default=LayerSpec(weight="nf4"))
    run = {"quantize_model_": lambda: qcompile.quantize_model_(model, policy),
           "fake_quantize_model_": lambda: qcompile.fake_quantize_model_(model, policy),
           "explain": lambda: qcompile.explain(model, policy, torch.tensor([[1, 2, 3]])),
           "compile": lambda: qcompile.compile(model, policy, lowering="eager"),
           "from_pretrained": lambda: transformers.AutoModelForCausalLM.from_pretrained(
               folder, quantization_config=qcompile.BlockQuantConfig(policy=policy)),
           "quantize_checkpoint": lambda: qcompile.quantize_checkpoint(
               folder, tmp_path / "out", policy, progress=False)}
    with pytest.warns(UserWarning, match=r"rule #0 '\*\.mlp\.up_prj' matches no layer"):
        run[entry]()


class _Transposed(nn.Linear):
    """A linear layer written as a matmul with its transposed weight, as FalconLinear is."""

    def __init__(self, form):
        super().__init__(64, 32)
        self.form = form

    def forward(self, x):
        w = self.weight
        wt = {"T": lambda: w.T, "t": lambda: w.t(), "transpose": lambda: w.transpose(-1, -2),
              "permute": lambda: w.permute(1, 0), "torch.t": lambda: torch.t(w)}[self.form]()
        return (torch.matmul(x, wt) if self.form == "torch.t" else x @ wt) + self.bias


class _Twice(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.inner = _Transposed(form)
        self.other = nn.Parameter(torch.randn(32, 64))  # not a linear layer's weight

    def forward(self, x):
        return self.inner(x) + x @ self.other.T


@pytest.mark.parametrize("form", ["T", "t", "transpose", "permute", "torch.t"])
def test_a_linear_written_as_x_at_w_transposed_is_quantised(form):
    torch.manual_seed(0)
    model, x = _Twice(form).eval(), torch.randn(3, 64)
    policy = Policy({}, default=LayerSpec(weight="int4[block_size=32]", act="mxint8"))
    want = qcompile.fake_quantize(x, "mxint8") @ qcompile.fake_quantize(
        model.inner.weight, "int4[block_size=32]").T + model.inner.bias + x @ model.other.T
    compiled = qcompile.compile(copy.deepcopy(model), policy, lowering="eager",
                                kernels="reference")
    with torch.no_grad():
        assert torch.equal(compiled(x), want)
        assert torch.equal(qcompile.fake_quantize_model_(copy.deepcopy(model), policy)(x), want)
    assert [(r.fqn, r.weight_fmt) for r in qcompile.explain(compiled).rows] == [
        ("inner", "int4[block_size=32]")]


# Dynamo traces the loop over every expert hit (the two slowest cases of this file): Mixtral by
# default, Qwen2-MoE's shared expert too under slow (its layers agree by default above)
@pytest.mark.parametrize("name", ["mixtral", pytest.param("qwen2-moe", marks=pytest.mark.slow)])
def test_explain_traced_on_a_moe_model_with_eager_experts_lists_every_layer(name):
    model = build(name)
    model.config._experts_implementation = "eager"  # a loop over the experts hit
    quantised, lookalikes = expected(model)
    rows = qcompile.explain(copy.deepcopy(model), POLICY, **inputs(name)).rows
    assert {r.fqn for r in rows if r.weight_fmt != "-"} == quantised
    # the expert tensors too: a traced explain of a float model sees the backend's graphs, which
    # keep them in full precision and say so (qcompile.compile packs them first)
    experts = {f"{m}.{a}" for m, mod in model.named_modules() if m.endswith(".experts")
               for a, p in mod._parameters.items() if p.dim() == 3}
    assert experts
    assert {r.fqn for r in rows if r.note.startswith("skipped")} == lookalikes | experts
