"""Faults a new user met (issue "Reliability"): each test here failed on the code before the
fix. Oracles come from emulation.py (qcompile.fake_quantize and nothing else of qcompile)."""
import copy
import functools
import logging
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qcompile
from archs import build, small_llama as llama
from emulation import emulate, expected_table, explained_table, policy
from qcompile import LayerSpec, Policy, config

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    """Empty Dynamo caches, and every once-only warning may be said again."""
    torch._dynamo.reset()
    monkeypatch.setattr(config, "_said", set())
    yield


RULES = [("lm_head", ("int8", None)), ("model.layers.0.*", ("mxint8", None))]
DEFAULT = ("nf4", None)
IDS = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(3))


def out(model, ids=IDS):
    with torch.no_grad():
        y = model(ids)
    return y.logits if hasattr(y, "logits") else y


def newest_rows():
    variant = qcompile.backend.compiled_variants()[0]
    return {r.fqn: (r.weight_fmt, r.act_fmt) for r in variant.rows}


# -- 1. names are model.named_modules() names, whatever Dynamo calls the root -----------------

G_MODEL = None


def global_fn(ids):
    return G_MODEL(ids)


def decorated(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # the model arrives as args[0], as in transformers 5.24
        return fn(*args, **kwargs)
    return wrapper


@pytest.mark.parametrize("root", ["self", "forward", "global", "closure", "args0",
                                  "module.compile", "qcompile.compile"])
def test_names_do_not_depend_on_the_root(root):
    global G_MODEL
    model = llama(tied=True)
    ref = emulate(model, RULES, DEFAULT)
    opts = {"policy": policy(RULES, DEFAULT), "lowering": "eager", "kernels": "reference"}
    if root == "self":
        run = torch.compile(model, backend="blockquant", options=opts)
    elif root == "forward":
        run = torch.compile(model.forward, backend="blockquant", options=opts)
    elif root == "global":
        G_MODEL = model
        run = torch.compile(global_fn, backend="blockquant", options=opts)
    elif root == "closure":
        def run_closure(ids):
            return model(ids)
        run = torch.compile(run_closure, backend="blockquant", options=opts)
    elif root == "args0":
        f = torch.compile(decorated(lambda m, ids: m(ids)), backend="blockquant", options=opts)
        run = functools.partial(f, model)
    elif root == "module.compile":
        model.compile(backend="blockquant", options=opts)
        run = model
    else:
        run = qcompile.compile(model, opts["policy"], lowering="eager", kernels="reference")
    assert torch.equal(out(run), out(ref))
    want = expected_table(model, RULES, DEFAULT)
    assert newest_rows() == want and want["lm_head"] == ("int8", "-")


class Block(nn.Module):
    def __init__(self, graph_break=False):
        super().__init__()
        self.fc = nn.Linear(32, 32)
        self.graph_break = graph_break

    def forward(self, x):
        x = torch.relu(self.fc(x))
        if self.graph_break:
            torch._dynamo.graph_break()
        return x * 2


class Net(nn.Module):
    def __init__(self, graph_break=False):
        super().__init__()
        self.b0, self.b1 = Block(graph_break), Block(graph_break)
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        return self.head(self.b1(self.b0(x)))


class Regions(nn.Module):
    """Dynamo compiles each block's frame on its own, one graph for both instances."""
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(32, 8)

    @torch._dynamo.disable(recursive=False)
    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


NET_RULES = [("b1.fc", ("int8", None)), ("blocks.1.fc", ("int8", None)),
             ("head", ("mxint8", None))]


@pytest.mark.parametrize("make", [lambda: Net(graph_break=True), Regions],
                         ids=["graph-break", "one-graph-per-instance"])
def test_frames_of_submodules_are_named_in_the_model(make):
    torch.manual_seed(0)
    net = make().eval()
    ref = emulate(net, NET_RULES, ("nf4", None))
    x = torch.randn(4, 32)
    qcompile.compile(net, policy(NET_RULES, ("nf4", None)), lowering="eager", kernels="reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = out(net, x)
    assert torch.equal(got, out(ref, x))
    said = " ".join(str(w.message) for w in caught)
    assert ("graph break" in said) == isinstance(net, Net)


def test_regional_compilation_of_decoder_layers():
    """Each decoder layer compiled on its own: Dynamo runs one graph for all of them, and each
    layer still gets its own rule, by its name in the model that runs it."""
    model = llama()
    rules = [("model.layers.0.*", ("int8", None)), ("model.layers.1.*", ("mxint8", "mxint8"))]
    ref = emulate(model, rules, None)
    pol = policy(rules, None)
    for layer in model.model.layers:
        layer.compile(backend="blockquant", options={"policy": pol, "lowering": "eager", "kernels": "reference"})
    assert torch.equal(out(model), out(ref))


class Hidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self._eager(x))

    @torch._dynamo.disable
    def _eager(self, x):
        return self.fc(x)


def test_a_layer_that_runs_eagerly_is_said_loudly():
    torch.manual_seed(0)
    net = Hidden().eval()
    qcompile.compile(net, Policy({}, default=LayerSpec(weight="int8")), lowering="eager", kernels="reference")
    with pytest.warns(RuntimeWarning, match="layer 'fc' ran eagerly, in full precision"):
        out(net, torch.randn(2, 16))


# -- 2. a weight changed after compiling is packed again ---------------------------------------

@pytest.mark.parametrize("change", ["load_state_dict", "in-place", "data"])
def test_changed_weights_are_quantised_again(change):
    model, other = llama(), llama(seed=1)
    qcompile.compile(model, policy(RULES, DEFAULT), lowering="eager", kernels="reference")
    out(model)
    if change == "load_state_dict":
        model.load_state_dict(other.state_dict())
        want = out(emulate(other, RULES, DEFAULT))
    else:
        w = model.model.layers[1].mlp.up_proj.weight
        with torch.no_grad():
            if change == "in-place":
                w.mul_(-3.0)
            else:
                w.data = torch.randn_like(w)
        want = out(emulate(model, RULES, DEFAULT))
    assert torch.equal(out(model), want)


def test_new_packed_sizes_after_a_change_run_without_inductor():
    """OPQ keeps a data-dependent number of outliers: a new weight, a new size."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32)).eval()
    rules, default = [], ("bof4s_opq", None)
    qcompile.compile(net, policy(rules, default))  # Inductor
    x = torch.randn(3, 64)
    out(net, x)
    with torch.no_grad():
        net[0].weight.copy_(torch.randn(32, 64) * torch.rand(32, 64) ** 4)
    with pytest.warns(UserWarning, match="packed sizes changed"):
        got = out(net, x)
    want = out(emulate(net, rules, default), x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# -- 3. explain leaves no compiled state; Dynamo giving up is said -----------------------------

def _explain_more_times_than_the_recompile_limit(limit):
    model = llama()
    pol = policy(RULES, DEFAULT)
    for _ in range(limit + 4):  # more than Dynamo's recompile limit
        assert explained_table(qcompile.explain(model, pol, IDS)) == \
               expected_table(model, RULES, DEFAULT)
    return model, pol


def test_explain_more_times_than_a_lowered_recompile_limit_then_compile():
    """As below, against a recompile limit of 2 (each explain traces the model once more)."""
    with torch._dynamo.config.patch(recompile_limit=2):
        model, pol = _explain_more_times_than_the_recompile_limit(2)
        ref = emulate(model, RULES, DEFAULT)
        f = torch.compile(model, backend="blockquant",
                          options={"policy": pol, "lowering": "eager", "kernels": "reference"})
        assert torch.equal(out(f), out(ref))
        assert explained_table(qcompile.explain(f)) == expected_table(model, RULES, DEFAULT)


@pytest.mark.slow  # twelve explains: the test above runs six against a lowered limit
def test_explain_many_times_then_compile():
    model, pol = _explain_more_times_than_the_recompile_limit(
        torch._dynamo.config.recompile_limit)
    ref = emulate(model, RULES, DEFAULT)
    f = torch.compile(model, backend="blockquant", options={"policy": pol, "lowering": "eager", "kernels": "reference"})
    assert torch.equal(out(f), out(ref))
    assert explained_table(qcompile.explain(f)) == expected_table(model, RULES, DEFAULT)


def test_explain_on_a_model_with_graph_breaks_removes_its_cache_entries():
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    torch.manual_seed(0)
    net = Net(graph_break=True).eval()
    pol = Policy({}, default=LayerSpec(weight="nf4"))
    rows = qcompile.explain(net, pol, torch.randn(2, 32)).rows
    assert {r.fqn for r in rows} == {"b0.fc", "b1.fc", "head"}
    for code in (Block.forward.__code__, Net.forward.__code__):
        assert _debug_get_cache_entry_list(code) == []


def test_recompile_limit_is_said_loudly():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8)).eval()
    f = torch.compile(net, backend="blockquant", dynamic=False,
                      options={"policy": Policy({}, default=LayerSpec(weight="int8")),
                               "lowering": "eager", "kernels": "reference"})
    with torch._dynamo.config.patch(recompile_limit=2, automatic_dynamic_shapes=False):
        with pytest.warns(RuntimeWarning, match="recompile limit.*full precision"):
            for n in range(1, 6):
                out(f, torch.randn(n, 16))


# -- 4. fake_quantize_model_ and tied weights --------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt2", "bert", "llama-tied"])
def test_fake_quantize_model_unties_and_equals_the_eager_lowering(arch):
    model = build(arch)
    pol = Policy({}, default=LayerSpec(weight="int4[block_size=32]"))
    emb = model.get_input_embeddings().weight.detach().clone()
    fq = qcompile.fake_quantize_model_(copy.deepcopy(model), pol)
    assert torch.equal(fq.get_input_embeddings().weight, emb)  # the embedding keeps its table
    qcompile.compile(model, pol, lowering="eager", kernels="reference", fullgraph=True)
    assert torch.equal(out(model), out(fq))


# -- 5. generate runs compiled ----------------------------------------------------------------

def test_module_compile_in_place_runs_generate_through_the_backend():
    model = llama()
    ref = emulate(model, RULES, DEFAULT)
    model.compile(backend="blockquant",
                  options={"policy": policy(RULES, DEFAULT), "lowering": "eager", "kernels": "reference"})
    kw = dict(max_new_tokens=4, do_sample=False, use_cache=True)
    with torch.no_grad():
        assert torch.equal(model.generate(IDS, **kw), ref.generate(IDS, **kw))
    assert explained_table(qcompile.explain(model)) == expected_table(model, RULES, DEFAULT)


# -- 10. layers whose parent reads .weight; weights computed by a parametrization --------------

def test_quantize_model_skips_layers_their_parent_reads_and_says_why():
    """nn.MultiheadAttention reads out_proj.weight; nn.TransformerEncoderLayer reads
    linear1/linear2.weight for its fast path: swapping them would break the model."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 2, 64, batch_first=True).eval()
    x = torch.randn(2, 5, 32)
    pol = Policy({}, default=LayerSpec(weight="int8"))
    with pytest.warns(UserWarning, match="reads .weight directly") as caught:
        qcompile.quantize_model_(layer, pol)
    said = " ".join(str(w.message) for w in caught)
    assert all(f"'{n}'" in said for n in ("self_attn.out_proj", "linear1", "linear2"))
    with torch.no_grad():
        layer(x)  # runs: the layers were left in place
    rows = {r.fqn: r for r in qcompile.explain(layer, pol, x).rows}
    assert rows["self_attn.out_proj"].note.startswith("skipped: its parent")


def test_compiled_fused_encoder_layer_says_which_layers_stay_in_full_precision():
    """In eval mode without grad, torch runs the layer as one fused op: nothing to quantise."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 2, 64, batch_first=True).eval()
    x = torch.randn(2, 5, 32)
    pol = Policy({}, default=LayerSpec(weight="int8"))
    f = torch.compile(layer, backend="blockquant", options={"policy": pol, "lowering": "eager", "kernels": "reference"})
    with pytest.warns(UserWarning, match="'linear1', 'linear2' stay in full precision") as caught:
        out(f, x)
    said = " ".join(str(w.message) for w in caught)
    assert "'self_attn.out_proj' stays" in said
    rows = {r.fqn: r for r in qcompile.explain(f).rows}
    # the reason quantize_model_ gives for these layers too
    assert all(rows[n].note.startswith("skipped: its parent (") and "reads .weight directly"
               in rows[n].note for n in ("linear1", "linear2", "self_attn.out_proj"))


def test_weight_norm_parametrization_is_quantised_on_every_call():
    from torch.nn.utils.parametrizations import weight_norm
    torch.manual_seed(0)
    net = nn.Sequential(weight_norm(nn.Linear(64, 16))).eval()
    x = torch.randn(3, 64)
    w, b = net[0].weight.detach(), net[0].bias.detach()
    want = F.linear(x, qcompile.fake_quantize(w, "int4[block_size=32]", axis=1), b)
    pol = Policy({}, default=LayerSpec(weight="int4[block_size=32]"))
    eager = qcompile.fake_quantize_model_(copy.deepcopy(net), pol)
    with pytest.warns(UserWarning, match="computed in the graph"):
        qcompile.compile(net, pol, lowering="eager", kernels="reference")
        got = out(net, x)
    assert torch.equal(got, want) and torch.equal(out(eager, x), want)


# -- 12. options, warnings, explain rows ------------------------------------------------------

def test_mode_goes_inside_options(monkeypatch):
    from qcompile import backend
    seen = {}
    real = backend._lower

    def spy(gm, inputs, lowering, mode="default"):
        seen["mode"] = mode
        return real(gm, inputs, "eager")
    monkeypatch.setattr(backend, "_lower", spy)
    net = nn.Sequential(nn.Linear(16, 8)).eval()
    qcompile.compile(net, Policy({}, default=LayerSpec(weight="int8")), mode="max-autotune")
    out(net, torch.randn(2, 16))
    assert seen["mode"] == "max-autotune"
    with pytest.raises(ValueError, match="mode must be one of"):
        qcompile.compile(net, None, mode="fastest")


def test_no_policy_warning_points_at_the_users_line():
    net = nn.Sequential(nn.Linear(16, 8)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(net, backend="blockquant", options={"lowering": "eager", "kernels": "reference"})(torch.randn(2, 16))
    (w,) = [w for w in caught if "no policy given" in str(w.message)]
    assert w.filename == __file__


class TwoMatmuls(nn.Module):
    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2)
        return torch.softmax(scores, -1) @ v


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = TwoMatmuls()

    def forward(self, q, k, v):
        return self.attn(q, k, v)


def test_explain_keeps_a_modules_two_matmuls_apart():
    pol = Policy({"attn": LayerSpec(weight="mxfp8_e4m3", act="mxfp8_e4m3", op="matmul")})
    q, k, v = (torch.randn(2, 8, 32) for _ in range(3))
    traced = qcompile.explain(Attn(), pol, q, k, v)
    m = Attn()
    qcompile.compile(m, pol, lowering="eager", kernels="reference")
    out_ = m(q, k, v)
    compiled = qcompile.explain(m)
    for e in (traced, compiled):
        rows = [r for r in e.rows if r.op == "matmul"]
        assert [(r.fqn, r.index) for r in rows] == [("attn", 0), ("attn", 1)]
    assert out_.shape == (2, 8, 32)


def test_a_deep_copy_of_a_model_compiled_in_place_is_its_own_model():
    model = llama()
    qcompile.compile(model, policy(RULES, DEFAULT), lowering="eager", kernels="reference")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    assert not torch.equal(out(twin), out(model))  # the copy computes with its own weights
    assert torch.equal(out(twin), out(copy.deepcopy(twin)))
