"""Mixture-of-experts models on the compiled path (issue 23): ``qcompile.compile`` packs the
expert tensors the policy names (by ``quantize_model_``'s rule) before compiling, so the compiled
model runs packed experts; ``torch.compile``'s backend, which sees only graphs, says by name
what to do instead.

The oracle is tests/test_moe.py's emulation: each expert's 2-D matrix fake-quantised with
``qcompile.fake_quantize`` along its reduction axis, from the test's own layout table.
"""
import copy
import warnings

import pytest
import torch

import qcompile
from test_moe import BASE, IDS, POLICY, T, build, emulation, expert_params, logits, \
    reference_linears

pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts from empty Dynamo caches: the models of one architecture share their
    forwards' code objects, and with them Dynamo's recompile limit."""
    torch._dynamo.reset()
    yield


def _compiled(model, **options):
    """``model`` compiled in place with the eager lowering and the reference kernels (bit-exact
    with fake_quantize_model_), and the warnings said on the way and at its first call."""
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        qcompile.compile(model, POLICY, **{"lowering": "eager", "kernels": "reference",
                                           **options})
        out = logits(model)
    return out, [str(w.message) for w in said]


@pytest.mark.parametrize("name", ["mixtral", "qwen3-moe", "gpt-oss"])
def test_compile_packs_the_experts_and_equals_quantize_model(name):
    model = build(name, "eager")
    want = logits(emulation(model, name))
    assert not torch.equal(want, logits(model))  # the experts' formats move the logits
    got, said = _compiled(copy.deepcopy(model))
    assert torch.equal(got, want)
    # the same compile of quantize_model_'s model gives the same logits
    packed = reference_linears(qcompile.quantize_model_(copy.deepcopy(model), POLICY))
    assert torch.equal(_compiled(packed)[0], want)
    # nothing says the experts stay float, or that a graph runs unquantised
    assert not [s for s in said if "3-D parameter" in s or "nothing in a graph" in s], said


def test_compiled_model_holds_packed_experts_and_explain_lists_them():
    model = build("qwen3-moe", "eager")
    compiled = copy.deepcopy(model)
    _compiled(compiled)
    assert not [n for n, p in compiled.named_parameters() if p.dim() == 3]
    rows = {r.fqn: r for r in qcompile.explain(compiled).rows if r.op == "experts"}
    experts = expert_params(model, "qwen3-moe")
    assert set(rows) == set(experts)
    for pname, (p, _) in experts.items():
        r = rows[pname]
        assert r.weight_fmt == POLICY.match(pname, "linear")[1].weight.key
        assert r.weight_shape == tuple(p.shape) and not r.note.startswith("skipped")


def _generate_equals_quantize_model(model, **options):
    """``generate`` with a KV cache on ``model`` compiled equals it on quantize_model_'s model,
    and nothing says a layer ran eagerly, a frame was split or Dynamo gave up on one: the
    packed experts run as one operator in the graphs (qcompile.experts_call)."""
    packed = reference_linears(qcompile.quantize_model_(copy.deepcopy(model), POLICY))
    compiled = copy.deepcopy(model)
    _compiled(compiled, **options)
    kw = dict(max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad(), warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        want, got = packed.generate(IDS[:1], **kw), compiled.generate(IDS[:1], **kw)
    assert got.shape[1] == IDS.shape[1] + 5 and torch.equal(got, want)
    assert not [w for w in said if "full precision" in str(w.message)
                or "recompile limit" in str(w.message)], [str(w.message) for w in said]
    return got, kw


@pytest.mark.parametrize("dynamic", [None, True])
def test_generate_with_a_kv_cache_on_the_compiled_model_equals_quantize_model(dynamic):
    # before: the eager loop over the experts broke the graphs, each caller became a frame of
    # its own, and transformers 5.25's shared 'wrapped_func' frame hit the recompile limit
    model = build("qwen3-moe", "eager")
    got, kw = _generate_equals_quantize_model(model, dynamic=dynamic)
    # and the tokens are the emulation's (the float model's differ: the formats matter)
    with torch.no_grad():
        assert torch.equal(emulation(model, "qwen3-moe").generate(IDS[:1], **kw), got)


def test_generate_on_a_compiled_model_of_nine_layers_stays_compiled():
    # before: each decoder layer's frame needed entries of its own (its layer_idx and cache
    # are guarded), so nine layers passed Dynamo's recompile limit with any transformers
    torch.manual_seed(0)
    model = T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(
        **dict(BASE, num_hidden_layers=9), num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=24, head_dim=8)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    model.set_experts_implementation("eager")
    _generate_equals_quantize_model(model)


def test_the_backend_alone_says_by_name_what_to_do_with_the_experts():
    model = build("mixtral", "eager")
    wrapped = torch.compile(copy.deepcopy(model), backend="blockquant",
                            options={"policy": POLICY, "lowering": "eager"})
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        logits(wrapped)
    said = [str(w.message) for w in said if "'model.layers.0.mlp.experts.gate_up_proj'"
            in str(w.message)]
    assert said and "qcompile.quantize_model_(model, policy)" in said[0] \
        and "qcompile.compile(model, policy)" in said[0], said


def test_inductor_within_the_float32_bound():
    model = build("mixtral", "eager")
    want = logits(emulation(model, "mixtral"))
    got, _ = _compiled(copy.deepcopy(model), lowering="inductor", kernels="auto")
    torch.testing.assert_close(got, want, rtol=0, atol=float(2e-5 * want.abs().max() + 1e-6))


class WideExperts(torch.nn.Module):
    """Experts whose output is wider than their input: no operator of the input's shape."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 16, 8))

    def forward(self, x, index, weights):
        return sum(torch.nn.functional.linear(x, self.w[e]) for e in range(self.w.shape[0]))


class WithWideExperts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.experts = WideExperts()

    def forward(self, x):
        idx = torch.zeros(x.shape[0], 2, dtype=torch.long)
        return self.experts(self.proj(x), idx, torch.ones(x.shape[0], 2))


def test_experts_returning_another_shape_are_refused_by_name_in_a_compiled_graph():
    model = WithWideExperts().eval()
    policy = qcompile.Policy({"experts.w": qcompile.LayerSpec(weight="nf4")}, default=None)
    qcompile.compile(model, policy, lowering="eager", kernels="reference")
    with pytest.raises(RuntimeError, match="WideExperts returned a torch.float32 tensor of "
                                           "shape \\(3, 16\\), not a tensor of its input's"):
        with torch.no_grad():
            model(torch.randn(3, 8))


def test_grad_mode_forward_runs_and_a_backward_through_the_experts_is_refused_by_name():
    model = build("qwen3-moe", "eager")
    compiled = copy.deepcopy(model)
    want, _ = _compiled(compiled)  # logits() runs under no_grad
    got = compiled(IDS).logits  # grad mode, as a user forgetting no_grad runs it
    assert got.requires_grad and torch.equal(got.detach(), want)
    with pytest.raises(NotImplementedError, match="backward through packed experts"):
        got.sum().backward()
