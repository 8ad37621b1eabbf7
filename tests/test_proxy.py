"""Proxy quantisation (Dettmers & Zettlemoyer): the ``proxy`` format option keeps the input
columns whose source layer's weight rows vary most in bfloat16 and quantises the rest.

Oracles: the kept columns are the top scores picked by plain Python sorting; the quantised rest
is the base format's reference on the tensor with those columns zeroed (for formats whose block
statistics a zero cannot change: absmax and power-of-two scales); the column scores come from
weights planted with one outsized row in a tiny model, so the expected column is known by
construction. Kernels (CPU, Triton under the interpreter) against the reference."""
import copy
import math

import pytest
import torch
import transformers
from kernel_device import dev, host

import qcompile
from qcompile import LayerSpec, Policy, formats, proxy
from qcompile.codegen import cpu
from qcompile.codegen.triton.linear import gamma
from qcompile.policy import PolicyError
from qcompile.swap import QuantLinear

from archs import build
from hf_models import LLAMA, save_llama


def top_columns(score, n):
    """The oracle's choice: highest score first, ties to the lower index, NaN last."""
    key = [(math.isnan(s), -s if not math.isnan(s) else 0.0, j) for j, s in
           enumerate(score.tolist())]
    return sorted(j for _, _, j in sorted(key)[:n])


def bits(t):
    return t.contiguous().view(torch.int32)


def llama(seed=0, **overrides):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{**LLAMA, "tie_word_embeddings": False, **overrides})).eval()


def gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0,
        eos_token_id=0)).eval()


# -- the format option -------------------------------------------------------------------------

def test_keys_round_trip_and_counts():
    f = formats.get("int3[proxy=0.02]")
    assert f.proxy == 0.02 and f.key == "int3[proxy=0.02]" and formats.get(f.key) == f
    c = formats.get("nf4[block_size=32,proxy=8]")
    assert c.proxy == 8 and isinstance(c.proxy, int) and formats.get(c.key) == c
    assert formats.get("mxfp4", proxy=3).key == "mxfp4[proxy=3]"
    assert f.proxy_count(600) == 12  # 0.02 * 600 is 12.000000000000002 in floats
    assert f.proxy_count(601) == 13 and f.proxy_count(10) == 1
    assert c.proxy_count(5) == 5 and c.proxy_count(100) == 8
    assert formats.get("int3").proxy_count(100) == 0


@pytest.mark.parametrize("bad", ["int3[proxy=0]", "int3[proxy=1.0]", "int3[proxy=-2]",
                                 "int3[proxy=abc]", "int3[proxy=1.5]"])
def test_bad_proxy_values_name_the_range(bad):
    with pytest.raises(ValueError, match=r"fraction of the input columns in \(0, 1\)"):
        formats.get(bad)


def test_bool_proxy_is_refused():
    with pytest.raises(ValueError, match="proxy"):
        formats.get("int3", proxy=True)


def test_proxy_is_a_weight_option_of_linear_layers():
    with pytest.raises(PolicyError, match="weight option"):
        LayerSpec(weight="nf4", act="mxint8[proxy=0.1]")
    with pytest.raises(PolicyError, match="linear layers"):
        LayerSpec(weight="nf4[proxy=2]", op="embedding")
    with pytest.raises(PolicyError, match="linear layers"):
        LayerSpec(weight="nf4[proxy=2]", op="matmul")


# -- the reference -----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["int3", "nf4", "mxfp4", "fp4_e2m1", "int4[block_size=None]",
                                 "mxint8[block_size=16]"])
@pytest.mark.parametrize("axis", [1, 0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kept_columns_and_the_rest_against_the_base_format(fmt, axis, seed):
    g = torch.Generator().manual_seed(seed)
    k, n = [70, 129, 33][seed], 9
    w = torch.randn(n, k, generator=g) * torch.rand(n, k, generator=g) ** 4
    w[:, 5] *= 100  # an outlier column: zeroing it changes the rest's block scales
    score = torch.rand(k, generator=g)
    score[3] = score[7] = 2.0  # a tie: the lower column goes first
    x = w if axis == 1 else w.T.contiguous()
    kept = 4
    q = qcompile.quantize(x, f"{fmt.split('[')[0]}[{_opts(fmt)}proxy={kept}]", axis=axis,
                          proxy_score=score)
    cols = top_columns(score, kept)
    assert q.side["proxy_index"].tolist() == cols and q.side["proxy_index"].dtype == torch.int32
    zeroed = w.clone()
    zeroed[:, cols] = 0.0
    want = qcompile.fake_quantize(zeroed, fmt, axis=1)
    want[:, cols] = w[:, cols].to(torch.bfloat16).float()
    got = qcompile.dequantize(q)
    assert torch.equal(bits(got if axis == 1 else got.T), bits(want))


def _opts(fmt):
    return fmt.split("[", 1)[1][:-1] + "," if "[" in fmt else ""


def test_nan_scores_last_and_special_values_kept():
    score = torch.tensor([float("nan"), 1.0, 3.0, float("nan"), 2.0])
    x = torch.tensor([[float("nan"), 1.0, float("inf"), 2.0, -0.0]])
    q = qcompile.quantize(x, "int4[proxy=4]", axis=1, proxy_score=score)
    assert q.side["proxy_index"].tolist() == [0, 1, 2, 4]  # column 3: NaN score, not kept
    got = qcompile.dequantize(q)
    assert got[0, 0].isnan() and got[0, 2] == float("inf") and got[0, 1] == 1.0
    # the NaN column is kept apart, so it does not poison the block the others share
    assert torch.isfinite(got[0, 3])


def test_opq_outliers_avoid_the_kept_columns():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 128, generator=g)
    w[:, 10] *= 50  # would be OPQ outliers, but the column is kept apart first
    score = torch.zeros(128)
    score[10] = 1.0
    q = qcompile.quantize(w, "bof4s_opq[proxy=1]", axis=1, proxy_score=score)
    row = q.scales.shape[-1] * q.block
    assert not (q.side["outlier_index"].long() % row == 10).any()
    got = qcompile.dequantize(q)
    assert torch.equal(got[:, 10], w[:, 10].to(torch.bfloat16).float())


def test_stored_bytes_count_the_kept_columns():
    w = torch.randn(24, 200)
    q = qcompile.quantize(w, "int3[proxy=0.05]", axis=1, proxy_score=torch.rand(200))
    base = qcompile.quantize(w, "int3", axis=1)
    assert q.nbytes == base.nbytes + 4 * 10 + 2 * 24 * 10  # int32 columns, bf16 values


def test_quantize_weight_in_pieces_is_the_whole(monkeypatch):
    from qcompile import api
    monkeypatch.setattr(api, "CHUNK_ELEMENTS", 300)
    g = torch.Generator().manual_seed(1)
    for axis, w in ((1, torch.randn(40, 96, generator=g)), (0, torch.randn(96, 40, generator=g))):
        score = torch.rand(96, generator=g)
        for fmt in ("nf4[proxy=0.1]", "bof4s_opq[proxy=3]", "nvfp4[proxy=2]"):
            whole = qcompile.quantize(w, fmt, axis=axis, proxy_score=score)
            parts = api.quantize_weight(w, fmt, axis, score)
            assert torch.equal(parts.codes, whole.codes)
            assert list(parts.side) == list(whole.side)
            assert all(torch.equal(parts.side[k], whole.side[k]) for k in whole.side)


def test_scores_are_required_and_checked():
    w = torch.randn(4, 10)
    with pytest.raises(ValueError, match="pass proxy_score="):
        qcompile.quantize(w, "int3[proxy=2]", axis=1)
    with pytest.raises(ValueError, match=r"shape \(10,\)"):
        qcompile.quantize(w, "int3[proxy=2]", axis=1, proxy_score=torch.rand(4))
    with pytest.raises(ValueError, match="keeps no proxy columns"):
        qcompile.quantize(w, "int3", axis=1, proxy_score=torch.rand(10))
    with pytest.raises(NotImplementedError, match="impl='reference'"):
        qcompile.quantize(w, "int3[proxy=2]", axis=1, impl="triton", proxy_score=torch.rand(10))


# -- the scores: which layer feeds which columns --------------------------------------------------

def planted(model, name, rows, axis):
    """Make the weight rows (output units) ``rows`` of ``name`` vary 50 times more."""
    w = model.get_submodule(name).weight
    with torch.no_grad():
        if axis == 1:
            w[rows] *= 50
        else:
            w[:, rows] *= 50


def kept(model, name):
    s = proxy.input_scores(model, [name])[name]
    return int(s.argmax())


def test_llama_sources():
    m = llama()
    planted(m, "model.layers.0.mlp.up_proj", [7], 1)
    assert kept(m, "model.layers.0.mlp.down_proj") == 7
    planted(m, "model.layers.0.mlp.down_proj", [11], 1)  # writes the residual stream
    for name in ("q_proj", "k_proj", "v_proj"):
        assert kept(m, f"model.layers.1.self_attn.{name}") == 11
    planted(m, "model.layers.1.self_attn.o_proj", [20], 1)
    assert kept(m, "model.layers.1.mlp.gate_proj") == 20
    assert kept(m, "model.layers.1.mlp.up_proj") == 20
    with torch.no_grad():  # the norm's weight scales column 30 of what q/k/v read
        m.model.layers[1].input_layernorm.weight[30] = 1000.0
    assert kept(m, "model.layers.1.self_attn.q_proj") == 30
    with torch.no_grad():
        m.model.embed_tokens.weight[:, 40] *= 50
    assert kept(m, "model.layers.0.self_attn.k_proj") == 40
    planted(m, "model.layers.1.mlp.down_proj", [50], 1)
    assert kept(m, "lm_head") == 50


def test_llama_value_heads_spread_over_o_proj():
    m = llama()  # 4 heads of 16, 2 value heads: value head h serves heads 2h and 2h + 1
    planted(m, "model.layers.0.self_attn.v_proj", [16 + 3], 1)  # value head 1, dimension 3
    s = proxy.input_scores(m, ["model.layers.0.self_attn.o_proj"])["model.layers.0.self_attn.o_proj"]
    assert sorted(s.topk(2).indices.tolist()) == [2 * 16 + 3, 3 * 16 + 3]


def test_gpt2_sources():
    m = gpt2()
    planted(m, "transformer.h.0.mlp.c_fc", [9], 0)  # Conv1D [in, out]: output unit 9
    assert kept(m, "transformer.h.0.mlp.c_proj") == 9
    planted(m, "transformer.h.0.attn.c_attn", [2 * 32 + 5], 0)  # the value third
    assert kept(m, "transformer.h.0.attn.c_proj") == 5
    planted(m, "transformer.h.0.attn.c_proj", [13], 0)
    assert kept(m, "transformer.h.0.mlp.c_fc") == 13
    planted(m, "transformer.h.0.mlp.c_proj", [21], 0)
    assert kept(m, "transformer.h.1.attn.c_attn") == 21
    with torch.no_grad():
        m.transformer.wpe.weight[:, 2] *= 100
    assert kept(m, "transformer.h.0.attn.c_attn") == 2


def test_unknown_layers_and_quantised_sources_are_named():
    with pytest.raises(ValueError, match=r"which layer feeds '0'.*Llama-style"):
        proxy.input_scores(torch.nn.Sequential(torch.nn.Linear(4, 4)), ["0"])
    gemma = build("gemma3")  # Llama-like names, but its MLP input has its own (1 + w) norm
    with pytest.raises(ValueError, match="does not know which layer feeds"):
        proxy.input_scores(gemma, ["model.layers.0.mlp.up_proj"])
    m = qcompile.quantize_model_(llama(), Policy({"*.up_proj": LayerSpec(weight="nf4")}))
    with pytest.raises(ValueError, match="full-precision weight of 'model.layers.0.mlp.gate_proj'|"
                                         "full-precision weight of 'model.layers.0.mlp.up_proj'"):
        proxy.input_scores(m, ["model.layers.0.mlp.down_proj"])


# -- kernels -----------------------------------------------------------------------------------

def proxy_weight(axis, fmt="nf4[proxy=5]", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 150, generator=g)
    w[:, [4, 60]] *= 30
    x = w if axis == 1 else w.T.contiguous()
    return qcompile.quantize(x, fmt, axis=axis, proxy_score=torch.rand(150, generator=g))


@pytest.mark.parametrize("fmt", ["nf4[proxy=5]", "bof4s_opq[proxy=0.05]", "int3[proxy=2]",
                                 "mxfp4[proxy=7]"])
@pytest.mark.parametrize("axis", [1, 0])
def test_cpu_kernels_decode_and_linear(fmt, axis):
    q = proxy_weight(axis, fmt)
    ref = qcompile.dequantize(q)
    assert torch.equal(bits(cpu.dequantize(q)), bits(ref))
    w_nk = ref if axis == 1 else ref.T
    extra = q.side["proxy_index"].numel() + (
        q.side["outlier_index"].numel() if "outlier_index" in q.side else 0)
    for m, act in ((1, None), (5, None), (33, None), (1, "mxint8"), (17, "mxint8")):
        x = torch.randn(m, 150)
        y = cpu.linear(x, q, act)  # with mxint8 activations: not the integer path
        xq = qcompile.fake_quantize(x, act, axis=-1) if act else x
        exact = xq.double() @ w_nk.double().T
        bound = gamma(150 + 2 + extra) * (xq.double().abs() @ w_nk.double().abs().T)
        assert ((y.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("fmt", ["nf4[proxy=5]", "bof4s_opq[proxy=0.05]", "int3[proxy=2]"])
def test_triton_dequantize_is_the_reference(fmt):
    for axis in (1, 0):
        q = proxy_weight(axis, fmt)
        got = host(qcompile.dequantize(dev(q), impl="triton"))
        assert torch.equal(bits(got), bits(qcompile.dequantize(q)))


# -- models ------------------------------------------------------------------------------------

POLICY = Policy({"lm_head": None, "*.mlp.down_proj": LayerSpec(weight="int3[proxy=0.05]")},
                default=LayerSpec(weight="nf4[proxy=2]"))
IDS = torch.tensor([[1, 5, 9, 2, 77, 3, 120, 8]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_quantize_model_fake_quantize_model_and_the_backend_agree():
    base = llama()
    scores = proxy.input_scores(base, ["model.layers.1.mlp.down_proj"])
    packed = qcompile.quantize_model_(copy.deepcopy(base), POLICY)
    layer = packed.get_submodule("model.layers.1.mlp.down_proj")
    assert isinstance(layer, QuantLinear)
    want_cols = top_columns(scores["model.layers.1.mlp.down_proj"], 7)  # 0.05 * 128 -> 7
    assert layer.qtensor().side["proxy_index"].tolist() == want_cols
    fake = qcompile.fake_quantize_model_(copy.deepcopy(base), POLICY)
    eager = logits(fake)
    assert torch.allclose(logits(packed), eager, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(base), eager, atol=1e-3)  # the policy did something
    compiled = torch.compile(copy.deepcopy(base), backend="blockquant",
                             options={"policy": POLICY})
    assert torch.allclose(logits(compiled), eager, atol=1e-5, rtol=1e-5)
    eager_lowered = torch.compile(copy.deepcopy(base), backend="blockquant",
                                  options={"policy": POLICY, "lowering": "eager"})
    assert torch.allclose(logits(eager_lowered), eager, atol=1e-5, rtol=1e-5)
    rows = {r.fqn: r for r in qcompile.explain(packed, POLICY, IDS).rows}
    q = layer.qtensor()
    assert rows["model.layers.1.mlp.down_proj"].bits == pytest.approx(8 * q.nbytes / q.numel)


def test_backend_requantises_with_new_scores_after_load_state_dict():
    model = llama(seed=0)
    compiled = torch.compile(model, backend="blockquant", options={"policy": POLICY})
    logits(compiled)
    other = llama(seed=1)
    model.load_state_dict(other.state_dict())
    want = logits(qcompile.fake_quantize_model_(copy.deepcopy(other), POLICY))
    assert torch.allclose(logits(compiled), want, atol=1e-5, rtol=1e-5)


def test_gpt2_conv1d_layers():
    base = gpt2()
    pol = Policy({"lm_head": None}, default=LayerSpec(weight="int4[proxy=0.1]"))
    ids = torch.tensor([[1, 2, 3, 50, 7]])
    want = logits(qcompile.fake_quantize_model_(copy.deepcopy(base), pol), ids)
    got = logits(qcompile.quantize_model_(copy.deepcopy(base), pol), ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_unknown_architecture_is_refused_before_any_work():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="does not know which layer feeds"):
        qcompile.quantize_model_(model, Policy({}, default=LayerSpec(weight="nf4[proxy=1]")))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_saved_and_loaded_again(tmp_path):
    model = qcompile.quantize_model_(llama(), POLICY)
    qcompile.save_quantized(model, tmp_path / "m.safetensors")
    loaded = qcompile.load_quantized(tmp_path / "m.safetensors", llama(seed=5))
    assert torch.equal(logits(loaded), logits(model))


def test_from_pretrained_loads_every_weight_first_and_stream_refuses(tmp_path):
    folder = save_llama(tmp_path / "src")
    cfg = qcompile.BlockQuantConfig(policy=POLICY)
    got = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=cfg)
    want = qcompile.quantize_model_(
        transformers.AutoModelForCausalLM.from_pretrained(folder), POLICY)
    assert torch.equal(logits(got.eval()), logits(want.eval()))
    with pytest.raises(PolicyError, match="from_pretrained"):
        qcompile.quantize_checkpoint(folder, tmp_path / "out", POLICY)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_search_with_a_proxy_candidate():
    model = llama()
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    result = qcompile.search_policy(model, ids, bits=4.0, progress=False,
                                    candidates=["int3[proxy=0.05]", "int3", "nf4"],
                                    keep={"lm_head": None})
    packed = qcompile.quantize_model_(copy.deepcopy(model), result.policy)
    rows = {r.fqn: r for r in qcompile.explain(packed, result.policy, ids).rows}
    names = [r.name for r in result.table]
    stored = sum(rows[n].bits * rows[n].numel for n in names) / sum(rows[n].numel for n in names)
    assert stored == pytest.approx(result.bits) and result.bits <= 4.0
    s = result.sensitivities  # the kept columns are in the proxy candidate's cost
    mods = dict(model.named_modules())
    for i, name in enumerate(s.layers):
        n_out, k = mods[name].weight.shape
        kept = math.ceil(0.05 * k)
        assert s.cost[i][0] == s.cost[i][1] + 32 * kept + 16 * n_out * kept
    with pytest.raises(ValueError, match="does not know which layer feeds"):
        qcompile.search_policy(torch.nn.Sequential(torch.nn.Embedding(10, 8),
                                                   torch.nn.Linear(8, 10)),
                               torch.randint(0, 10, (1, 4)), bits=9.0, progress=False,
                               candidates=["nf4[proxy=1]"])
