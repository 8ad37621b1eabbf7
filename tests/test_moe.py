"""Mixture-of-experts models: expert tensors are layers (issue 23, eager helpers).

transformers 5.x holds a mixture's experts as 3-D parameters of one experts module. The oracle
here knows each architecture's layout (the test's own table, not qcompile's detection): each
expert's 2-D matrix ``W[e]`` is fake-quantised with ``qcompile.fake_quantize`` along its
reduction axis (the last for ``F.linear(x, W[e])`` layouts [E, N, K], the first for GPT-OSS and
Llama 4's ``x @ W[e]`` layouts [E, K, N]). ``quantize_model_`` and ``fake_quantize_model_`` must
give that emulation's logits bit for bit, with every experts implementation the installed
transformers offers on CPU.
"""
import copy
import logging
import warnings

import pytest
import torch
from torch import nn

import qcompile
from qcompile import LayerSpec, Policy
from qcompile.swap import QuantLinear

transformers = pytest.importorskip("transformers")
T = transformers
logging.getLogger("transformers").setLevel(logging.ERROR)

BASE = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, bos_token_id=0,
            eos_token_id=0, pad_token_id=0)
LINEAR, MATMUL = -1, 0  # the reduction axis of one expert's matrix: F.linear(x, W[e]), x @ W[e]


def _builders():
    """name -> (builder, {expert tensor attribute: reduction axis of W[e]}, implementations)"""
    gated = {"gate_up_proj": LINEAR, "down_proj": LINEAR}
    out = {
        "mixtral": (lambda: T.MixtralForCausalLM(T.MixtralConfig(
            **BASE, num_local_experts=4, num_experts_per_tok=2)), gated),
        "qwen2-moe": (lambda: T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(  # with a shared expert
            **BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
            shared_expert_intermediate_size=40)), gated),
        "qwen3-moe": (lambda: T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(
            **BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
            head_dim=8)), gated),
        "gpt-oss": (lambda: T.GptOssForCausalLM(T.GptOssConfig(  # biases, [E, K, N]
            **BASE, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
            layer_types=["full_attention"] * 2)), {"gate_up_proj": MATMUL, "down_proj": MATMUL}),
    }
    if hasattr(T, "OlmoeForCausalLM"):
        out["olmoe"] = (lambda: T.OlmoeForCausalLM(T.OlmoeConfig(
            **BASE, num_experts=4, num_experts_per_tok=2)), gated)
    if hasattr(T, "DeepseekV3ForCausalLM"):
        out["deepseek-v3"] = (lambda: T.DeepseekV3ForCausalLM(T.DeepseekV3Config(
            **dict(BASE, num_key_value_heads=4), n_routed_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=24, n_shared_experts=1, first_k_dense_replace=0, n_group=1,
            topk_group=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=8)), gated)
    if hasattr(T, "Llama4ForCausalLM"):  # bmm over every expert; no experts interface
        out["llama4"] = (lambda: T.Llama4ForCausalLM(T.Llama4TextConfig(
            **BASE, num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=64,
            head_dim=8, interleave_moe_layer_step=1)),
            {"gate_up_proj": MATMUL, "down_proj": MATMUL})
    # recognised from their forwards like the above (the gated [E, N, K] layout); a class
    # present in both transformers pinned (5.23) and newest (5.25)
    if hasattr(T, "GraniteMoeForCausalLM"):
        out["granitemoe"] = (lambda: T.GraniteMoeForCausalLM(T.GraniteMoeConfig(
            **BASE, num_local_experts=4, num_experts_per_tok=2)), gated)
    if hasattr(T, "PhimoeForCausalLM"):  # its router is an nn.Linear returning a tuple
        out["phimoe"] = (lambda: T.PhimoeForCausalLM(T.PhimoeConfig(
            **BASE, num_local_experts=4, num_experts_per_tok=2)), gated)
    if hasattr(T, "Ernie4_5_MoeForCausalLM"):
        out["ernie4.5-moe"] = (lambda: T.Ernie4_5_MoeForCausalLM(T.Ernie4_5_MoeConfig(
            **BASE, moe_num_experts=4, moe_k=2, moe_intermediate_size=24,
            moe_layer_start_index=0, moe_num_shared_experts=1)), gated)
    if hasattr(T, "Glm4MoeForCausalLM"):
        out["glm4-moe"] = (lambda: T.Glm4MoeForCausalLM(T.Glm4MoeConfig(
            **BASE, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
            first_k_dense_replace=0, n_group=1, topk_group=1, n_shared_experts=1,
            head_dim=8)), gated)
    if hasattr(T, "HunYuanMoEV1ForCausalLM"):
        out["hunyuan-moe"] = (lambda: T.HunYuanMoEV1ForCausalLM(T.HunYuanMoEV1Config(
            **BASE, num_experts=4, moe_topk=2, head_dim=8)), gated)
    if hasattr(T, "MiniMaxForCausalLM"):
        out["minimax"] = (lambda: T.MiniMaxForCausalLM(T.MiniMaxConfig(
            **BASE, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
            layer_types=["full_attention"] * 2)), gated)
    if hasattr(T, "JetMoeForCausalLM"):  # parallel experts: forward(x, rows per expert)
        out["jetmoe"] = (lambda: T.JetMoeForCausalLM(T.JetMoeConfig(
            **{k: v for k, v in BASE.items() if k != "num_attention_heads"}, kv_channels=8,
            num_local_experts=4, num_experts_per_tok=2)), {"weight": LINEAR})
    return out


ARCHS = _builders()
# the architectures added for issue 23's second part (the battery runs on each)
MORE = [a for a in ("granitemoe", "phimoe", "ernie4.5-moe", "glm4-moe", "hunyuan-moe",
                    "minimax") if a in ARCHS]
MORE_AND_JETMOE = MORE + [a for a in ("jetmoe",) if a in ARCHS]  # its own policy


def implementations(name):
    """The experts implementations this transformers offers that run on a CPU."""
    if name in ("llama4", "jetmoe"):
        return ["own"]  # its experts modules have one forward (bmm; a loop over the experts)
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    return ["eager"] + [i for i in ("batched_mm", "grouped_mm") if i in ALL_EXPERTS_FUNCTIONS]


CASES = [(a, i) for a in ARCHS for i in implementations(a)]
IDS = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 40], [4, 8, 15, 16, 23, 42, 2, 3]])
# the experts in two formats (down_proj with blocks of 32), one attention projection quantised
# too, everything else in full precision
POLICY = Policy({"*.experts.down_proj": LayerSpec(weight="int4[block_size=32]"),
                 "*.experts.*": LayerSpec(weight="nf4"),
                 "re:.*layers\\.0\\.self_attn\\.q_proj": LayerSpec(weight="int8")}, default=None)


# JetMoE's expert tensors are named '*_linear.weight' (in its MLP and its attention)
JETMOE_POLICY = Policy({"*.output_linear.weight": LayerSpec(weight="int4[block_size=32]"),
                        "*_linear.weight": LayerSpec(weight="nf4")}, default=None)


def policy_for(name):
    return JETMOE_POLICY if name == "jetmoe" else POLICY


def build(name, impl="own", dtype=torch.float32):
    torch.manual_seed(0)
    model = ARCHS[name][0]().eval()
    with torch.no_grad():  # weights large enough that 4 bits move the logits
        for n, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    if impl != "own":
        model.set_experts_implementation(impl)
    return model.to(dtype)


def expert_params(model, name):
    """{parameter name: (the parameter, reduction axis of each expert's matrix)}, from the
    test's layout table."""
    layout = ARCHS[name][1]
    return {f"{m}.{a}": (p, layout[a]) for m, mod in model.named_modules()
            for a, p in mod._parameters.items() if a in layout and p is not None and p.dim() == 3}


def emulation(model, name, policy=POLICY):
    """The oracle: a copy whose expert matrices and nn.Linear weights the policy names are
    fake-quantised, expert by expert, along their reduction axis."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for pname, (p, axis) in expert_params(ref, name).items():
            spec = policy.match(pname, "linear")[1]
            if spec is not None:
                for e in range(p.shape[0]):
                    p[e] = qcompile.fake_quantize(p[e], spec.weight, axis=axis)
        for mname, mod in ref.named_modules():
            spec = policy.match(mname, "linear")[1]
            if type(mod) is nn.Linear and spec is not None:
                mod.weight.copy_(qcompile.fake_quantize(mod.weight, spec.weight, axis=-1))
    return ref


def reference_linears(model):
    """Swapped linear layers and packed experts run the reference (the kernels sum in another
    order, within a bound: tests/test_moe_kernels.py)."""
    for m in model.modules():
        if isinstance(m, QuantLinear) or getattr(m, "quantised_experts", False):
            m.impl = "reference"
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name,impl", CASES)
def test_quantize_and_fake_quantize_equal_the_emulation(name, impl):
    model, policy = build(name, impl), policy_for(name)
    want = logits(emulation(model, name, policy))
    assert not torch.equal(want, logits(model))  # the experts' formats move the logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every rule matches a layer; nothing is skipped
        fake = qcompile.fake_quantize_model_(copy.deepcopy(model), policy)
        packed = qcompile.quantize_model_(copy.deepcopy(model), policy)
    assert torch.equal(logits(fake), want)
    reference_linears(packed)
    assert torch.equal(logits(packed), want)
    # one packed tensor per expert tensor (a leading E axis), no float copy left
    for pname, (p, _) in expert_params(model, name).items():
        holder = packed.get_submodule(pname.rpartition(".")[0])._modules[pname.rpartition(".")[2]]
        assert holder.codes.shape[0] == holder.scales.shape[0] == p.shape[0]
    assert not [n for n, p in packed.named_parameters() if p.dim() == 3]


def test_bf16_model_equals_the_emulation():
    model = build("mixtral", "eager", torch.bfloat16)
    want = logits(emulation(model, "mixtral"))
    assert not torch.equal(want, logits(model))
    got = logits(reference_linears(qcompile.quantize_model_(copy.deepcopy(model), POLICY)))
    assert got.dtype == torch.bfloat16 and torch.equal(got.view(torch.int16), want.view(torch.int16))
    fake = logits(qcompile.fake_quantize_model_(copy.deepcopy(model), POLICY))
    assert torch.equal(fake.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("name", ["qwen3-moe", "gpt-oss", *MORE_AND_JETMOE])
def test_generate_with_a_kv_cache_equals_the_emulation(name):
    model = build(name, "eager" if implementations(name) != ["own"] else "own")
    ref = emulation(model, name, policy_for(name))
    packed = reference_linears(qcompile.quantize_model_(copy.deepcopy(model),
                                                        policy_for(name)))
    kw = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        want, got = ref.generate(IDS[:1], **kw), packed.generate(IDS[:1], **kw)
    assert got.shape[1] == IDS.shape[1] + 6 and torch.equal(got, want)


def test_a_rule_naming_the_experts_matches_them():
    model = build("mixtral")
    policy = Policy({"*.experts.*": LayerSpec(weight="nf4")}, default=None)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        qcompile.quantize_model_(copy.deepcopy(model), policy)
        qcompile.fake_quantize_model_(copy.deepcopy(model), policy)
        qcompile.explain(copy.deepcopy(model), policy, IDS)
    assert not [w for w in said if "matches no layer" in str(w.message)]


@pytest.mark.parametrize("name", ["qwen3-moe", *MORE_AND_JETMOE])
def test_the_default_policy_reaches_the_experts(name):
    model = build(name, "eager" if implementations(name) != ["own"] else "own")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # routers said to stay in full precision
        packed = qcompile.quantize_model_(copy.deepcopy(model))
    names = set(expert_params(model, name))
    assert names and {n for n, m in packed.named_modules()
                      if getattr(m, "fmt_key", None) == "nf4"} >= names


def _packed_bits(p, axis, fmt):
    """Bits stored for all experts of ``p``, from qcompile.quantize of each expert's matrix."""
    return 8 * sum(qcompile.quantize(p[e], fmt, axis=axis).nbytes for e in range(p.shape[0]))


@pytest.mark.parametrize("name", ["mixtral", "gpt-oss", *MORE])
def test_explain_has_a_row_per_expert_tensor_and_counts_every_weight(name):
    model = build(name, "eager")
    packed = qcompile.quantize_model_(copy.deepcopy(model), POLICY)
    logits(packed)
    e = qcompile.explain(packed, POLICY, IDS)
    rows = {r.fqn: r for r in e.rows if r.op == "experts"}
    experts = expert_params(model, name)
    assert set(rows) == set(experts)
    for pname, (p, axis) in experts.items():
        r, spec = rows[pname], POLICY.match(pname, "linear")[1]
        assert r.weight_shape == tuple(p.shape) and r.weight_fmt == spec.weight.key
        assert r.rule == ("#0 '*.experts.down_proj'" if pname.endswith("down_proj")
                          else "#1 '*.experts.*'")
        assert r.bits == _packed_bits(p, axis, spec.weight) / p.numel()
        assert r.kernel != "not run yet"
    every = sum(p.numel() for p in model.parameters())
    assert e.total_weights == every
    text = str(e)
    assert f"{every} weights" in text and "full precision outside the rows" in text
    assert f"{p.shape[0]} x {p.shape[1]}x{p.shape[2]}" in text


def test_resident_weight_bytes_counts_the_packed_experts():
    model = build("mixtral", "eager")
    policy = Policy({"*.experts.*": LayerSpec(weight="nf4")}, default=None)
    experts = expert_params(model, "mixtral")
    expected = qcompile.resident_weight_bytes(model) + sum(
        _packed_bits(p, axis, "nf4") // 8 - p.numel() * 4 for p, axis in experts.values())
    packed = qcompile.quantize_model_(copy.deepcopy(model), policy)
    assert qcompile.resident_weight_bytes(packed) == expected


class OddExperts(nn.Module):
    """Expert-shaped tensors a forward uses in ways that are not a matmul per expert."""

    def __init__(self):
        super().__init__()
        self.scaled = nn.Parameter(torch.randn(4, 8, 8))  # multiplied elementwise
        self.mixed = nn.Parameter(torch.randn(4, 8, 8))  # contracted over the expert axis

    def forward(self, x, index, weights):
        y = x @ (self.scaled * 2)[0]
        return y + torch.einsum("th,ehk->tk", x, self.mixed)


class WithOddExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.experts = OddExperts()

    def forward(self, x):
        idx = torch.zeros(x.shape[0], 2, dtype=torch.long)
        return self.experts(self.proj(x), idx, torch.ones(x.shape[0], 2))


def test_an_unrecognised_expert_layout_is_said_by_name_and_shown_by_explain():
    model = WithOddExperts().eval()
    x = torch.randn(3, 8)
    with pytest.warns(UserWarning) as said:
        packed = qcompile.quantize_model_(copy.deepcopy(model))
    text = [str(w.message) for w in said]
    for attr in ("scaled", "mixed"):
        assert [t for t in text if t.startswith("quantize_model_:") and f"'experts.{attr}'" in t
                and "mixture-of-experts tensor" in t], text
    assert torch.equal(packed.experts.scaled, model.experts.scaled)  # kept as it was
    rows = {r.fqn: r for r in qcompile.explain(packed, None, x).rows}
    for attr in ("scaled", "mixed"):
        assert rows[f"experts.{attr}"].note.startswith("skipped: it looks like a mixture")


@pytest.mark.skipif(not hasattr(T, "DbrxForCausalLM"), reason="no DBRX in this transformers")
def test_experts_stored_as_2d_matrices_are_said_by_name_by_every_helper():
    # DBRX keeps its experts as [E * I, H] matrices that the parent's forward reshapes: not a
    # layout recognised yet, so they stay float, and every helper says so by name
    model = T.DbrxForCausalLM(T.DbrxConfig(
        d_model=32, n_heads=4, n_layers=2, vocab_size=64, max_seq_len=64,
        ffn_config=dict(ffn_hidden_size=24, moe_num_experts=4, moe_top_k=2),
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0))).eval()
    helpers = {"quantize_model_": qcompile.quantize_model_,
               "fake_quantize_model_": qcompile.fake_quantize_model_,
               "qcompile.compile": lambda m: logits(qcompile.compile(m, lowering="eager"))}
    for who, helper in helpers.items():
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            helper(copy.deepcopy(model))
        text = [str(w.message) for w in said if "stay in full precision" in str(w.message)
                and "'transformer.blocks.0.ffn.experts.mlp.w1'" in str(w.message)]
        assert text and text[0].startswith(who) and "DBRX" in text[0], [
            str(w.message) for w in said]
    # a model whose matrices are all read by layers says nothing of the kind
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        qcompile.quantize_model_(build("mixtral"))
    assert not [w for w in said if "no linear layer, embedding or expert" in str(w.message)]


def test_proxy_formats_are_refused_for_experts_by_name():
    model = build("mixtral", "eager")
    policy = Policy({"*.experts.*": LayerSpec(weight="int3[proxy=0.02]")}, default=None)
    with pytest.warns(UserWarning, match="experts.gate_up_proj.*proxy") as said:
        packed = qcompile.quantize_model_(copy.deepcopy(model), policy)
    assert any("experts.gate_up_proj" in str(w.message) for w in said)
    assert torch.equal(logits(packed), logits(model))


def test_a_router_that_subclasses_linear_keeps_full_precision():
    if "llama4" not in ARCHS:
        pytest.skip("this transformers has no Llama 4")
    model = build("llama4")  # its router is an nn.Linear whose forward returns top-k scores
    with pytest.warns(UserWarning, match="feed_forward.router.*not x @ W\\^T \\+ b"):
        packed = qcompile.quantize_model_(copy.deepcopy(model))  # the default: nf4 everywhere
    assert type(packed.model.layers[0].feed_forward.router) is type(
        model.model.layers[0].feed_forward.router)
    assert logits(packed).shape == (2, 8, 64)


def test_a_quantised_model_compiles_and_runs_its_packed_experts():
    # quantize_model_ first: the compiled model decodes the packed experts (outside its graphs)
    model = build("mixtral", "eager")
    policy = Policy({"*.experts.*": LayerSpec(weight="nf4")}, default=None)
    want = logits(emulation(model, "mixtral", policy))
    packed = reference_linears(qcompile.quantize_model_(copy.deepcopy(model), policy))
    qcompile.compile(packed, policy, lowering="eager")
    assert torch.equal(logits(packed), want)


def test_from_pretrained_packs_the_experts(tmp_path):
    model = build("qwen3-moe", "eager")
    model.save_pretrained(tmp_path / "float")
    policy = Policy({"*.experts.*": LayerSpec(weight="nf4")}, default=None)
    loaded = T.AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", quantization_config=qcompile.BlockQuantConfig(policy=policy)).eval()
    loaded.set_experts_implementation("eager")
    reference_linears(loaded)
    assert torch.equal(logits(loaded), logits(emulation(model, "qwen3-moe", policy)))
    # saving and loading it back: tests/test_moe_saving.py
