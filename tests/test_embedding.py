"""Quantised embedding tables (LayerSpec(weight=..., op="embedding")): rows gathered and decoded
on the fly, equal to ``qcompile.fake_quantize`` of the table row by row; a tied embedding /
lm_head pair given one format shares one packed table."""
import copy
import logging
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qcompile
from qcompile import LayerSpec, Policy, config, formats
from qcompile.formats.reference import dequantize_rows
from qcompile.policy import PolicyError
from archs import small_llama as reliability_llama

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

# every element and scale kind, OPQ outliers, a data-dependent table, a tensor scale, a block
# longer than the row and one that does not divide it
FORMATS = formats.names() + ["nf4[block_size=24]", "int4[block_size=None]", "int4[opq=true]"]


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(config, "_said", set())


def table(vocab, hidden, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(vocab, hidden, generator=g)
    t[0, : min(5, hidden)] *= 40  # outliers for OPQ, a wide block for the scales
    return t


@pytest.mark.parametrize("fmt", FORMATS)
def test_gathered_rows_equal_the_dequantised_table_bit_for_bit(fmt):
    w = table(40, 80)
    q = qcompile.quantize(w, fmt, axis=1)
    rows = torch.tensor([[3, 0, 0, 39], [7, 3, 21, 0]])  # repeats, the outlier row, the last
    want = qcompile.fake_quantize(w, fmt, axis=1)[rows]
    got = dequantize_rows(q, rows)
    assert got.shape == (2, 4, 80)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_cpu_kernels_gather_the_same_rows(fmt):
    w = table(40, 80)
    q = qcompile.quantize(w, fmt, axis=1)
    ids = torch.tensor([[3, 0, 0, 39]])
    want = qcompile.fake_quantize(w, fmt, axis=1)[ids]
    args = (q.codes, q.scales, list(q.side.values()), qcompile.ops.qtensor_meta(q), "cpu")
    if fmt.endswith("opq") or "opq=true" in fmt:  # gathered by the reference, said once
        with pytest.warns(UserWarning, match="no generated CPU kernel .*OPQ"):
            got = torch.ops.qcompile.embedding(ids, *args)
    else:  # the kernels ran: no fallback warning
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = torch.ops.qcompile.embedding(ids, *args)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    many = torch.arange(40).repeat(2)[None]  # more rows than the kernels take: the reference
    assert torch.equal(torch.ops.qcompile.embedding(many, *args), qcompile.fake_quantize(
        w, fmt, axis=1)[many])


@settings(max_examples=25)
@given(vocab=st.integers(1, 30), hidden=st.integers(1, 70), n=st.integers(0, 12),
       fmt=st.sampled_from(["bof4s_opq", "nf4", "mxint8", "int4[opq=true]", "nvfp4"]),
       seed=st.integers(0, 2**16))
def test_gathered_rows_property(vocab, hidden, n, fmt, seed):
    g = torch.Generator().manual_seed(seed)
    w = table(vocab, hidden, seed) * torch.rand(vocab, 1, generator=g)  # rows of every size
    q = qcompile.quantize(w, fmt, axis=1)
    rows = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed + 1))
    want = qcompile.fake_quantize(w, fmt, axis=1)[rows]
    got = dequantize_rows(q, rows)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_embedding_op_checks_ids_and_has_no_gradient():
    w = table(16, 32)
    q = qcompile.quantize(w, "nf4", axis=1)
    args = (q.codes, q.scales, [], qcompile.ops.qtensor_meta(q))
    with pytest.raises(IndexError, match="token id 16 is out of range for a table of 16 rows"):
        torch.ops.qcompile.embedding(torch.tensor([1, 16]), *args)
    with pytest.raises(IndexError, match="token id -1"):
        torch.ops.qcompile.embedding(torch.tensor([-1]), *args)
    y = torch.ops.qcompile.embedding(torch.tensor([[2, 5]]), *args)
    assert y.shape == (1, 2, 32) and not y.requires_grad
    empty = torch.ops.qcompile.embedding(torch.zeros(0, dtype=torch.long), *args)
    assert empty.shape == (0, 32)
    torch.library.opcheck(torch.ops.qcompile.embedding.default,
                          (torch.tensor([[2, 5], [0, 15]]), *args, "reference"))


def test_policy_errors_for_embedding_specs():
    with pytest.raises(PolicyError, match="takes a weight format and no act format"):
        LayerSpec(weight="nf4", act="mxint8", op="embedding")
    with pytest.raises(PolicyError, match="takes a weight format"):
        LayerSpec(act="mxint8", op="embedding")
    with pytest.raises(PolicyError, match="name embedding ops in a rule"):
        Policy({}, default=LayerSpec(weight="nf4", op="embedding"))
    with pytest.raises(PolicyError, match="one of \\('linear', 'matmul', 'embedding'\\)"):
        LayerSpec(weight="nf4", op="embed")
    p = Policy({"*embed*": LayerSpec(weight="nf4", op="embedding")},
               default=LayerSpec(weight="int8"))
    assert p.match("model.embed_tokens", "embedding")[1].weight.key == "nf4"
    assert p.match("model.embed_tokens", "linear")[1].weight.key == "int8"  # the default
    assert p.match("lm_head", "embedding") == (None, None)  # the default is for linears only
    assert p.op_kinds() == ("linear", "embedding")


def llama(tied=True):
    return reliability_llama(tied=tied)  # a 2-layer Llama with a vocabulary of 128


IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(5))


def emulated(model, emb_fmt, head_fmt, linear_fmt):
    """The oracle: every quantised table replaced by qcompile.fake_quantize of itself (untied)."""
    m = copy.deepcopy(model)
    table = m.model.embed_tokens.weight.detach()
    with torch.no_grad():
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear):
                fmt = head_fmt if name == "lm_head" else linear_fmt
                mod.weight = torch.nn.Parameter(qcompile.fake_quantize(mod.weight.detach(), fmt,
                                                                       axis=1))
        m.model.embed_tokens.weight = torch.nn.Parameter(
            qcompile.fake_quantize(table, emb_fmt, axis=1))
    return m


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("head", ["bof4s_opq", "mxint8"])  # the same format as the table, or not
def test_compiled_tied_embedding_and_lm_head_equal_the_emulation(head):
    model = llama(tied=True)
    policy = Policy({"model.embed_tokens": LayerSpec(weight="bof4s_opq", op="embedding"),
                     "lm_head": LayerSpec(weight=head)}, default=LayerSpec(weight="nf4"))
    want = logits(emulated(model, "bof4s_opq", head, "nf4"))
    compiled = torch.compile(model, backend="blockquant",
                             options={"policy": policy, "lowering": "eager",
                                      "kernels": "reference"})
    got = logits(compiled)
    assert torch.equal(got, want)
    rows = {(r.fqn, r.op): r for r in qcompile.explain(compiled).rows}
    emb, lm = rows[("model.embed_tokens", "embedding")], rows[("lm_head", "linear")]
    assert emb.weight_fmt == "bof4s_opq" and lm.weight_fmt == head
    if head == "bof4s_opq":
        assert emb.qtensor is lm.qtensor
        assert emb.note == "one packed table with lm_head"
    else:
        assert emb.qtensor is not lm.qtensor
        assert emb.note == "tied to lm_head: its own packed copy"
    # eager, with the same policy: fake_quantize_model_ is the same emulation
    fq = qcompile.fake_quantize_model_(copy.deepcopy(model), policy)
    assert torch.equal(logits(fq), want)


def test_quantize_model_shares_one_table_and_drops_the_float_copy():
    model = llama(tied=True)
    policy = Policy({"*": LayerSpec(weight="nf4", op="embedding")}, default=LayerSpec(weight="nf4"))
    want = logits(emulated(model, "nf4", "nf4", "nf4"))
    fp32 = qcompile.resident_weight_bytes(model)
    qm = qcompile.quantize_model_(copy.deepcopy(model), policy)
    emb = qm.model.embed_tokens
    assert isinstance(emb, qcompile.swap.QuantEmbedding)
    assert emb.codes is qm.lm_head.codes and emb.scales is qm.lm_head.scales
    assert not any(isinstance(m, torch.nn.Embedding) for m in qm.modules())
    # the packed weights and the norms only: 4.5 bits a weight instead of 32
    assert qcompile.resident_weight_bytes(qm) < 0.16 * fp32
    bound = 1e-5 * want.abs().max()
    assert (logits(qm) - want).abs().max() <= bound  # C++ kernels: float32 sums reordered
    text = str(qcompile.explain(qm, policy, IDS))
    assert "one packed table with lm_head" in text
    compiled = qcompile.compile(qm, policy)  # Inductor
    assert (logits(compiled) - want).abs().max() <= bound
    out = compiled.generate(IDS[:1], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 11)


def test_an_untied_embedding_quantised_alone_in_grad_mode():
    model = llama(tied=False)
    policy = Policy({"model.embed_tokens": LayerSpec(weight="mxint8", op="embedding")})
    want = copy.deepcopy(model)
    with torch.no_grad():
        want.model.embed_tokens.weight.copy_(qcompile.fake_quantize(
            model.model.embed_tokens.weight, "mxint8", axis=1))
    compiled = torch.compile(model, backend="blockquant",
                             options={"policy": policy, "lowering": "eager",
                                      "kernels": "reference"})
    y = compiled(IDS).logits  # grad mode: the rest of the model still trains
    assert torch.equal(y.detach(), logits(want))
    y.sum().backward()
    assert model.lm_head.weight.grad is not None
    assert model.model.embed_tokens.weight.grad is None  # frozen: its packed copy is used


def test_embedding_with_max_norm_is_skipped_loudly():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 16, max_norm=1.0)
            self.out = torch.nn.Linear(16, 4)

        def forward(self, ids):
            return self.out(self.emb(ids))

    policy = Policy({"emb": LayerSpec(weight="nf4", op="embedding")})
    ids = torch.tensor([[1, 2, 3]])
    with pytest.warns(UserWarning, match="'emb' .*max_norm renormalises its table in place"):
        qcompile.quantize_model_(Net(), policy)
    net = Net()  # the passes skip it: the eager lowering (Inductor is not what is checked)
    compiled = torch.compile(net, backend="blockquant",
                             options={"policy": policy, "lowering": "eager"})
    with pytest.warns(UserWarning, match="'emb' stays in full precision .*max_norm"):
        compiled(ids)


def test_an_embedding_rule_that_matches_nothing_is_said():
    policy = Policy({"model.embed": LayerSpec(weight="nf4", op="embedding")})
    compiled = torch.compile(llama(), backend="blockquant",
                             options={"policy": policy, "lowering": "eager"})
    with pytest.warns(UserWarning, match="rule #0 'model.embed' matches no layer"):
        logits(compiled)
