"""The blockquant torch.compile backend: passes, bit-exact eager lowering, Inductor bound,
recompiles reusing quantised weights, validation, explain.

Reference: an eager copy whose linear weights are replaced by qcompile.fake_quantize of
themselves (blocks along K) and whose activations are fake-quantised by forward pre-hooks.
lowering="eager" must equal it bit for bit. With Inductor the qcompile ops still run the same
reference code; only the surrounding ops are Inductor's, so we check the float32 bound
|y - y_ref| <= 4 * K * eps32 * (|x| @ |W|^T + |b|) elementwise for one linear layer, and
for whole models rtol=atol=1e-4 (weight-only policies, so no activation rounding can flip).
"""
import copy
import logging
import warnings

import pytest
import torch
import torch.nn as nn

import qcompile
from qcompile import LayerSpec, Policy
from qcompile.backend import blockquant_backend
from qcompile.passes import find_quantisable, fuse, plan, quantize_weights, rewrite
from qcompile.passes.find import op_record, sites
from qcompile.passes.names import text_fqn
from qcompile.passes.quantize_weights import STATS

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)
from transformers.pytorch_utils import Conv1D  # noqa: E402

from benchmarks.policy_report import MIXED  # noqa: E402  (the one mixed example policy)
from hf_models import logits, reference_copy  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts from empty Dynamo caches (the models share nn.Sequential.forward)."""
    torch._dynamo.reset()
    yield


def compiled(model, policy, lowering, **kw):
    """The reference kernels: the eager lowering is then bit-exact (the CPU kernels' sums run in
    another order; tests/test_cpu_kernels.py holds them to the float32 bound)."""
    return torch.compile(model, backend="blockquant",
                         options={"policy": policy, "lowering": lowering, "kernels": "reference"},
                         **kw)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 80), nn.ReLU(),
                         nn.Linear(80, 16)).eval()


MLP_POLICY = Policy({"0": LayerSpec(weight="mxint8", act="mxfp8_e4m3"),
                     "2": LayerSpec(weight="int4[block_size=32]", act="nvfp4"),
                     "4": None}, default=None)


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=64, tie_word_embeddings=False,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                  num_attention_heads=2, vocab_size=128,
                                  max_position_embeddings=64)
    return transformers.BertForMaskedLM(cfg).eval()


BERT_POLICY = Policy({"cls.*": None,
                      "*.intermediate.dense": LayerSpec(weight="bof4s_opq"),
                      "re:.*attention\\.self\\.(query|key|value)": LayerSpec(weight="mxint8",
                                                                           act="mxint8")},
                     default=LayerSpec(weight="nf4"))


# -- passes, alone ------------------------------------------------------------------------

def test_text_fallback_reads_dynamo_paths():
    """The last resort when no model object is found (names.py); roots of any shape."""
    assert text_fqn("L['self'].transformer.h.0.attn.c_attn") == "transformer.h.0.attn.c_attn"
    assert text_fqn("L['self'].h[0]._modules['mlp']") == "h.0.mlp"
    assert text_fqn("L['fn'].2") == "2"
    assert text_fqn("L['args'][0].model.layers.0.mlp") == "model.layers.0.mlp"
    assert text_fqn("G['model'].lm_head") == "lm_head"


def _dynamo_graph(model, *inputs):
    got = []

    def grab(gm, ex, **_):
        got.append((gm, ex))
        return gm.forward
    with torch.no_grad():
        torch.compile(model, backend=grab, dynamic=False)(*inputs)
    assert len(got) == 1
    return got[0]


def test_passes_find_plan_rewrite_fuse_on_gpt2():
    model = gpt2()
    gm, ex = _dynamo_graph(model, torch.randint(0, 128, (1, 6)))
    from qcompile.passes.graph import copy_graph_module
    from qcompile.passes.names import ModuleNames
    gm = copy_graph_module(gm)
    find_quantisable(gm, ("linear",), ex, ModuleNames(model))  # outside a backend: the model given
    found = {s.fqn: s.target for _, s in sites(gm)}
    assert found["transformer.h.1.mlp.c_fc"] == "addmm" and found["lm_head"] == "linear"
    assert len(found) == 9  # 4 Conv1D per block x 2 + lm_head
    plan(gm, MIXED)
    specs = {s.fqn: op_record(n).spec for n, s in sites(gm)}
    assert specs["lm_head"] is None
    assert specs["transformer.h.0.attn.c_attn"].act.key == "mxint8"
    assert specs["transformer.h.0.attn.c_proj"].weight.key == "nf4"
    quantize_weights(gm, ex)
    q = [op_record(n).qtensor for n, _ in sites(gm) if op_record(n).qtensor is not None]
    assert len(q) == 8 and all(t.axis == 0 for t in q)  # Conv1D weights [K, N]: K is axis 0
    rewrite(gm)
    targets = [n.target for n in gm.graph.nodes]
    assert targets.count(torch.ops.qcompile.dequantize.default) == 8
    assert targets.count(torch.ops.qcompile.fake_quantize_act.default) == 2
    fuse(gm)
    targets = [n.target for n in gm.graph.nodes]
    assert targets.count(torch.ops.qcompile.linear.default) == 8
    assert torch.ops.qcompile.dequantize.default not in targets
    assert torch.addmm not in targets


# -- bit-exact eager lowering --------------------------------------------------------------

def test_mlp_eager_lowering_is_bit_exact():
    m = mlp()
    ref = reference_copy(m, MLP_POLICY)
    f = compiled(m, MLP_POLICY, "eager", fullgraph=True)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        assert torch.equal(f(x), ref(x))
        assert not torch.equal(m(x), ref(x))  # the policy did change the result


@pytest.mark.parametrize("build, policy", [(gpt2, MIXED), (llama, MIXED), (bert, BERT_POLICY)],
                         ids=["gpt2", "llama", "bert"])
def test_transformers_eager_lowering_is_bit_exact(build, policy):
    m = build()
    ref = reference_copy(m, policy)
    f = compiled(m, policy, "eager", fullgraph=True)
    for t in (7, 11):  # a second sequence length: recompile, still exact
        ids = torch.randint(0, 128, (2, t))
        assert torch.equal(logits(f, ids), logits(ref, ids))


# -- Inductor ------------------------------------------------------------------------------

def test_single_linear_inductor_within_float32_bound():
    torch.manual_seed(1)
    lin = nn.Linear(100, 24).eval()  # K = 100: not a multiple of the blocks (32, 64)
    pol = Policy({}, default=LayerSpec(weight="nf4", act="mxint8"))
    ref = reference_copy(lin, pol)
    x = torch.randn(4, 100)
    with torch.no_grad():
        y = compiled(lin, pol, "inductor", fullgraph=True)(x)
        xq = qcompile.fake_quantize(x, "mxint8", axis=-1)
        y_ref = ref(x)
        bound = 4 * 100 * torch.finfo(torch.float32).eps * (xq.abs() @ ref.weight.abs().T
                                                            + ref.bias.abs())
    assert ((y - y_ref).abs() <= bound).all()


@pytest.fixture(scope="module")
def gpt2_inductor():
    pol = Policy({"lm_head": None}, default=LayerSpec(weight="nf4"))
    m = gpt2()
    return m, reference_copy(m, pol), compiled(m, pol, "inductor", fullgraph=True)


def test_gpt2_inductor_close_to_reference(gpt2_inductor):
    m, ref, f = gpt2_inductor
    ids = torch.randint(0, 128, (2, 9))
    torch.testing.assert_close(logits(f, ids), logits(ref, ids), rtol=1e-4, atol=1e-4)


def test_recompiles_reuse_quantised_weights():
    m = mlp(seed=5)  # fresh parameters: nothing cached for them yet
    pol = Policy({}, default=LayerSpec(weight="int4"))
    ref = reference_copy(m, pol)
    before = dict(STATS)
    f = compiled(m, pol, "inductor")  # automatic dynamic shapes: the second length recompiles
    with torch.no_grad():
        for t in (5, 9, 13):
            x = torch.randn(2, t, 64)
            torch.testing.assert_close(f(x), ref(x), rtol=1e-5, atol=1e-5)
    assert STATS["quantised"] - before["quantised"] == 3  # three weights, quantised once each
    assert STATS["reused"] - before["reused"] >= 3  # at least one recompile reused all three


# -- no work, bad input, options ------------------------------------------------------------

def test_nothing_to_quantise_compiles_unchanged_with_one_warning():
    m = nn.Sequential(nn.Linear(8, 8), nn.Tanh()).eval()
    gm = torch.fx.symbolic_trace(m)
    x = torch.randn(2, 8)
    pol = Policy({"*": None})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = blockquant_backend(gm, [x], options={"policy": pol, "lowering": "eager"})
    msgs = [str(i.message) for i in w]
    assert sum("nothing in a graph" in s for s in msgs) == 1
    assert out.current.gm.code == gm.code  # the same graph
    assert torch.equal(out(x)[0] if isinstance(out(x), tuple) else out(x), m(x))


def test_bad_options_fail_before_any_work(monkeypatch):
    # kernels="triton" on CPU tensors needs Triton's interpreter: without it, a clear error
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("QCOMPILE_KERNELS", raising=False)
    before = dict(STATS)
    m = mlp(seed=7)
    x = torch.randn(2, 64)
    for options, err, match in [
        ({"policy": {"*": "int4"}}, ValueError, "must be a qcompile.Policy"),
        ({"kernels": "triton"}, RuntimeError, "TRITON_INTERPRET=1"),
        ({"kernels": "cuda"}, ValueError, "kernels must be one of"),
        ({"lowering": "tvm"}, ValueError, "lowering"),
        ({"polcy": None}, ValueError, "unknown option"),
    ]:
        torch._dynamo.reset()
        with pytest.raises(Exception, match=match) as e:
            torch.compile(m, backend="blockquant", options=options)(x)
        inner = getattr(e.value, "inner_exception", e.value)  # Dynamo wraps backend errors
        assert isinstance(inner, err)
    assert STATS["quantised"] == before["quantised"]


def test_default_policy_is_weight_only_nf4():
    m = mlp(seed=3)
    ref = reference_copy(m, Policy({}, default=LayerSpec(weight="nf4")))
    x = torch.randn(2, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = torch.compile(m, backend="blockquant", options={"lowering": "eager",
                                                            "kernels": "reference"})
        with torch.no_grad():
            assert torch.equal(f(x), ref(x))


def test_entry_point_registers_backend():
    from torch._dynamo.backends.registry import lookup_backend
    assert lookup_backend("blockquant") is blockquant_backend


def test_unmatched_rule_warns():
    pol = Policy({"no.such.module": LayerSpec(weight="int8")}, default=None)
    with pytest.warns(UserWarning, match="matches no layer of the Sequential model"):
        with torch.no_grad():
            compiled(mlp(seed=2), pol, "eager")(torch.randn(1, 64))


# -- explain ------------------------------------------------------------------------------

def test_explain_table_and_totals():
    e = qcompile.explain(gpt2(), MIXED, torch.randint(0, 128, (1, 5)))
    rows = {r.fqn: r for r in e.rows}
    assert rows["lm_head"].weight_fmt == "-" and rows["lm_head"].bits == 32
    assert rows["transformer.h.0.attn.c_attn"].act_fmt == "mxint8"
    assert rows["transformer.h.0.attn.c_attn"].weight_shape == (64, 192)
    assert rows["transformer.h.0.attn.c_attn"].bits == qcompile.formats.get("mxint8").effective_bits()
    # traced, nothing quantised: quantised rows carry the format's nominal bits, marked
    assert rows["transformer.h.0.attn.c_attn"].nominal and not rows["lm_head"].nominal
    assert "* nominal" in str(e) and "8.250*" in str(e)
    assert rows["transformer.h.1.mlp.c_fc"].rule.endswith("'*.mlp.*'")
    assert rows["transformer.h.0.attn.c_proj"].rule == "default"
    # the totals count every weight of the model: the rows' and, in float32, all the others
    every = sum(p.numel() for p in gpt2().parameters())
    total = sum(r.numel * r.bits for r in e.rows) + 32 * (every - sum(r.numel for r in e.rows))
    assert e.total_weights == every
    assert e.total_bits == total and e.avg_bits == total / e.total_weights
    from qcompile.swap import resident_weight_bytes
    assert e.resident_weight_bytes == resident_weight_bytes(gpt2()) > 0
    text = str(e)
    assert "transformer.h.1.mlp.c_proj" in text and "denser than float32" in text


def test_debug_env_prints_graph_after_each_pass(monkeypatch, capsys):
    monkeypatch.setenv("QCOMPILE_DEBUG", "1")
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, 64))

        def forward(self, x):
            return torch.nn.functional.linear(x, self.w).relu()

    torch.manual_seed(4)
    m = Functional()
    gm = torch.fx.symbolic_trace(m)  # the weight is a get_attr node, no module stack
    x = torch.randn(2, 64)
    pol = Policy({}, default=LayerSpec(weight="int8"))
    out = blockquant_backend(gm, [x], options={"policy": pol, "lowering": "eager",
                                               "kernels": "reference"})
    err = capsys.readouterr().err
    for stage in ("dynamo", "find_quantisable", "plan", "quantize_weights", "rewrite", "fuse"):
        assert f"graph after {stage}:" in err
    assert "qcompile.linear" in err.split("graph after fuse:")[1]
    with torch.no_grad():
        w = qcompile.fake_quantize(m.w, "int8", axis=-1)
        assert torch.equal(out(x), torch.nn.functional.linear(x, w).relu())


def test_matmul_quantised_only_when_a_rule_names_it():
    class Scores(nn.Module):
        def forward(self, q, k):
            return torch.matmul(q, k.transpose(-1, -2))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Scores()
            self.proj = nn.Linear(40, 8)

        def forward(self, q, k):
            return self.proj(self.attn(q, k))

    torch.manual_seed(6)
    m = Block().eval()
    q, k = torch.randn(2, 5, 40), torch.randn(2, 40, 40)
    mm = LayerSpec(weight="mxint8", act="mxfp8_e4m3", op="matmul")
    pol = Policy({"attn": mm}, default=None)
    with torch.no_grad():
        got = compiled(m, pol, "eager", fullgraph=True)(q, k)
        a = qcompile.fake_quantize(q, "mxfp8_e4m3", axis=-1)
        b = qcompile.fake_quantize(k.transpose(-1, -2), "mxint8", axis=-2)
        assert torch.equal(got, m.proj(torch.matmul(a, b)))
        torch._dynamo.reset()
        # the same spec without op="matmul" applies to linear layers only: the matmul stays
        plain = Policy({"attn": LayerSpec(weight="mxint8", act="mxfp8_e4m3")}, default=None)
        with pytest.warns(UserWarning):
            got2 = compiled(m, plain, "eager", fullgraph=True)(q, k)
        assert torch.equal(got2, m(q, k))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_are_bit_exact(dtype):
    m = mlp(seed=8).to(dtype)
    ref = reference_copy(m, MLP_POLICY)
    x = torch.randn(2, 3, 64, dtype=dtype)
    with torch.no_grad():
        y = compiled(m, MLP_POLICY, "eager", fullgraph=True)(x)
        assert y.dtype == dtype and torch.equal(y, ref(x))


def test_generate_with_kv_cache_matches_reference():
    m = gpt2()
    ref = reference_copy(m, MIXED)
    m.forward = torch.compile(m.forward, backend="blockquant",
                              options={"policy": MIXED, "lowering": "eager",
                                       "kernels": "reference"})
    ids = torch.randint(0, 128, (1, 4))
    before = STATS["quantised"]
    kw = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        out, expect = m.generate(ids, **kw), ref.generate(ids, **kw)
    assert torch.equal(out, expect)
    assert STATS["quantised"] - before == 8  # the compiled forward ran: 8 Conv1D weights, once


def test_quantize_model_keeps_no_full_precision_copy_and_stays_exact():
    from qcompile.swap import QuantLinear, quantize_model_, resident_weight_bytes
    m = gpt2()
    ref = reference_copy(m, MIXED)
    fp32_linear = sum(mod.weight.numel() * 4 for n, mod in m.named_modules()
                      if isinstance(mod, Conv1D))
    before = resident_weight_bytes(m)
    quantize_model_(m, MIXED)
    swapped = [n for n, mod in m.named_modules() if isinstance(mod, QuantLinear)]
    assert len(swapped) == 8 and not isinstance(m.lm_head, QuantLinear)  # lm_head: None rule
    assert not any(isinstance(mod, Conv1D) for mod in m.modules())
    saved = before - resident_weight_bytes(m)
    assert saved > 0.7 * fp32_linear  # 4-8 bit packed weights replaced the float32 ones
    ids = torch.randint(0, 128, (2, 7))
    # eager, through the qcompile ops (the CPU kernels: float32 sums in another order)
    torch.testing.assert_close(logits(m, ids), logits(ref, ids), rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the graph already holds qcompile ops: no warning
        f = compiled(m, MIXED, "eager", fullgraph=True)
        assert torch.equal(logits(f, ids), logits(ref, ids))


def test_explain_reads_a_compiled_model_after_its_first_call():
    m = gpt2()
    f = compiled(m, MIXED, "eager")
    with pytest.raises(RuntimeError, match="call it once first"):
        qcompile.explain(f)
    ids = torch.randint(0, 128, (1, 5))
    f(ids)
    got = qcompile.explain(f)
    want = qcompile.explain(gpt2(), MIXED, ids)  # traced afresh: the same table
    assert [(r.fqn, r.weight_fmt, r.act_fmt) for r in got.rows] == \
           [(r.fqn, r.weight_fmt, r.act_fmt) for r in want.rows]
    assert got.resident_weight_bytes == qcompile.resident_weight_bytes(m)
    # compiled: the bytes stored. K = 64 or 256 here (whole blocks, no padding): mxint8 is
    # 8 + 8/32 bits, nf4 and bof4s 4 + 32/64, plus 16 + 32 bits for each OPQ outlier
    params = dict(m.named_parameters())
    outliers = 0
    for r in got.rows:
        assert not r.nominal
        if r.weight_fmt == "mxint8":
            assert r.bits == 8.25
        elif r.weight_fmt == "nf4":
            assert r.bits == 4.5
        elif r.weight_fmt == "bof4s_opq":  # Conv1D weights [K, N]: blocks along axis 0
            q = qcompile.quantize(params[r.fqn + ".weight"].detach(), "bof4s_opq", axis=0)
            n = q.side["outlier_index"].numel()
            outliers += n
            assert r.bits == pytest.approx(4.5 + 48 * n / r.numel, abs=1e-12)
        else:
            assert (r.fqn, r.weight_fmt, r.bits) == ("lm_head", "-", 32)
    assert outliers > 0  # the test sees outliers, so it would see them missing


def test_explain_lists_layers_swapped_by_quantize_model_():
    m = qcompile.quantize_model_(gpt2(), MIXED)
    e = qcompile.explain(m, MIXED, torch.randint(0, 128, (1, 5)))
    rows = {r.fqn: r for r in e.rows}
    fc = rows["transformer.h.0.mlp.c_fc"]  # Conv1D [K=64, N=256], swapped ahead of time
    assert (fc.op, fc.rule, fc.weight_fmt, fc.weight_shape) == \
           ("qcompile.linear", "#1 '*.mlp.*'", "bof4s_opq", (64, 256))  # MIXED's rule 1
    assert rows["transformer.h.0.attn.c_attn"].act_fmt == "mxint8"
    assert rows["lm_head"].weight_fmt == "-"  # kept in full precision, still a linear
    assert e.resident_weight_bytes == qcompile.resident_weight_bytes(m)


def test_explain_counts_padding_of_a_partial_block():
    """K = 100 in nf4 blocks of 64: 128 codes (64 bytes) and 2 float32 scales (8 bytes) per
    row, 576 bits for 100 weights, whether compiled or swapped by quantize_model_."""
    torch.manual_seed(0)
    pol = Policy({}, default=LayerSpec(weight="nf4"))
    net = nn.Sequential(nn.Linear(100, 8)).eval()
    f = compiled(net, pol, "eager")
    f(torch.randn(2, 100))
    (row,) = qcompile.explain(f).rows
    assert row.bits == 5.76 and not row.nominal
    swapped = qcompile.quantize_model_(nn.Sequential(nn.Linear(100, 8)).eval(), pol)
    (row,) = qcompile.explain(swapped, pol, torch.randn(2, 100)).rows
    assert row.bits == 5.76 and row.op == "qcompile.linear"


def test_fake_quantize_model_is_the_eager_reference():
    m = gpt2()
    ids = torch.randint(0, 128, (2, 6))
    ours = qcompile.fake_quantize_model_(copy.deepcopy(m), MIXED)
    assert torch.equal(logits(ours, ids), logits(reference_copy(m, MIXED), ids))
    assert not torch.equal(logits(ours, ids), logits(m, ids))  # it did quantise
    with pytest.raises(ValueError, match="must be a qcompile.Policy"):
        qcompile.fake_quantize_model_(m, {"lm_head": None})


def test_explain_reports_the_newest_policy_after_a_recompile():
    m = gpt2()
    ids = torch.randint(0, 128, (1, 5))
    compiled(m, MIXED, "eager")(ids)
    torch._dynamo.reset()
    f = compiled(m, Policy({}, default=LayerSpec(weight="int4")), "eager")
    f(ids)
    rows = {r.fqn: r for r in qcompile.explain(f).rows}
    assert rows["transformer.h.0.mlp.c_fc"].weight_fmt == "int4"
    assert rows["lm_head"].weight_fmt == "int4"
