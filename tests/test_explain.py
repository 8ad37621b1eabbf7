"""explain says what ran: the kernel each quantised op ran (or "not run yet"), the density
compared with the model's own dtype, the policy rule that matched a layer quantize_model_
swapped (after save / load too); and quantize_model_ warns when untying a tied embedding /
lm_head pair grows the model.

Oracles: the policy written out by hand (which rule each layer's name matches), the model's
storages summed here, bit-exact comparison with kernels="reference" (what the reference
computes), and which layers a forward call reaches."""
import warnings

import pytest
import torch
from torch import nn

import qcompile
from qcompile import LayerSpec, Policy
from qcompile.swap import QuantEmbedding, QuantLinear
from archs import small_llama

IDS = torch.tensor([[1, 5, 9, 2, 77, 3, 120]])
# by hand: the MLP linears match rule #0, q_proj rule #1, every other linear the default
RULES = Policy({"*.mlp.*": LayerSpec(weight="int4"),
                "re:.*self_attn\\.q_proj": LayerSpec(weight="mxint8", act="mxint8")},
               default=LayerSpec(weight="nf4"))


def expected_rule(name: str) -> str:
    if ".mlp." in name:
        return "#0 '*.mlp.*'"
    if name.endswith("self_attn.q_proj"):
        return "#1 're:.*self_attn\\\\.q_proj'"
    return "default"


def storage_bytes(model) -> int:
    """The oracle for resident bytes: each distinct storage of the model's tensors, once."""
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def rows_by_name(e):
    return {r.fqn: r for r in e.rows}


def run(model, *args):
    with torch.no_grad():
        return model(*args)


# -- the kernel column ------------------------------------------------------------------------

@pytest.mark.parametrize("grad", [False, True], ids=["cpu-operator", "python-op"])
def test_kernel_column_names_the_cpu_kernel(grad):
    # without autograd the graph calls the C++ operator, with it the Python op: both say cpu
    model = small_llama()
    qcompile.compile(model, RULES, lowering="eager", kernels="cpu")
    with torch.set_grad_enabled(grad):
        model(IDS)
    e = qcompile.explain(model)
    linears = [r for r in e.rows if r.weight_fmt != "-"]
    assert len(linears) == 15  # 7 linears in each of 2 decoder layers, and lm_head
    for r in linears:
        assert r.kernel.startswith("cpu ("), (r.fqn, r.kernel)
        assert "reference" not in r.kernel
    assert "kernel" in str(e).splitlines()[0]
    # mxint8 weights with mxint8 activations run the integer dot products
    assert rows_by_name(e)["model.layers.0.self_attn.q_proj"].kernel.endswith(", int)")
    assert not rows_by_name(e)["model.layers.0.mlp.up_proj"].kernel.endswith(", int)")


def test_kernel_column_names_the_reference_when_asked():
    model = small_llama()
    qcompile.compile(model, RULES, lowering="eager", kernels="reference")
    run(model, IDS)
    rows = [r for r in qcompile.explain(model).rows if r.weight_fmt != "-"]
    assert rows and all(r.kernel == "reference (kernels='reference')" for r in rows)


def test_bf16_model_runs_every_layer_on_the_cpu_kernels():
    # the CPU kernels cover bf16 weight-only linears and the integer path (q_proj: mxint8 x
    # mxint8), which explain names as such
    model = small_llama().to(torch.bfloat16)
    qcompile.compile(model, RULES, lowering="eager", kernels="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        run(model, IDS)
    e = qcompile.explain(model)
    rows = [r for r in e.rows if r.weight_fmt != "-"]
    assert len(rows) == 15
    for r in rows:
        assert r.kernel.startswith("cpu ("), (r.fqn, r.kernel)
        assert r.kernel.endswith(", int)") == r.fqn.endswith("q_proj"), (r.fqn, r.kernel)
    assert "x denser than bfloat16" in str(e).splitlines()[-1]


def test_kernel_column_names_triton():
    # the Triton kernels, in Triton's interpreter on the CPU (or on the test GPU)
    from kernel_device import DEVICE
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).to(DEVICE)
    qcompile.compile(model, Policy(default=LayerSpec(weight="nf4")), lowering="eager",
                     kernels="triton")
    run(model, torch.randn(2, 64, device=DEVICE))
    rows = [r for r in qcompile.explain(model).rows if r.weight_fmt != "-"]
    assert [(r.fqn, r.kernel) for r in rows] == [("0", "triton"), ("2", "triton")]


class TwoBranches(nn.Module):
    """``b`` is reached only when asked: a call without it leaves b's kernel unknown."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 32), nn.Linear(64, 32)

    def forward(self, x, use_b=False):
        return self.b(x) if use_b else self.a(x)


def test_kernel_column_after_quantize_model_says_not_run_yet_until_a_layer_runs():
    torch.manual_seed(0)
    model = qcompile.quantize_model_(TwoBranches().eval(), Policy(default=LayerSpec(weight="nf4")))
    x = torch.randn(3, 64)
    run(model, x)  # eager: reaches a only
    e = qcompile.explain(model, Policy(default=LayerSpec(weight="nf4")), x)
    rows = rows_by_name(e)
    assert rows["a"].kernel.startswith("cpu (") and rows["b"].kernel == "not run yet"
    run(model, x, True)
    rows = rows_by_name(qcompile.explain(model, Policy(default=LayerSpec(weight="nf4")), x))
    assert rows["b"].kernel.startswith("cpu (")


def test_kernel_recorded_from_inductor_generated_code():
    # with autograd on, Inductor's generated code calls the Python op qcompile::linear
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    qcompile.compile(model, Policy(default=LayerSpec(weight="nf4")), lowering="inductor",
                     kernels="cpu")
    model(torch.randn(2, 64, requires_grad=True))
    rows = [r for r in qcompile.explain(model).rows if r.weight_fmt != "-"]
    assert [r.fqn for r in rows] == ["0", "2"]
    assert all(r.kernel.startswith("cpu (") for r in rows), [r.kernel for r in rows]


# -- the density, compared with the model's own dtype -------------------------------------------

@pytest.mark.parametrize("dtype,name,bits", [(torch.float32, "float32", 32),
                                             (torch.bfloat16, "bfloat16", 16),
                                             (torch.float16, "float16", 16)])
def test_density_compares_with_the_models_own_dtype(dtype, name, bits):
    model = small_llama().to(dtype)
    policy = Policy(default=LayerSpec(weight="nf4"))
    qcompile.quantize_model_(model, policy)
    swapped = [m for m in model.modules() if isinstance(m, QuantLinear)]
    weights = sum(m.weight_shape[0] * m.weight_shape[1] for m in swapped)
    stored = 8 * sum(t.nbytes for m in swapped for t in m.buffers())
    # every weight counts: the norms and the embedding table stay parameters, in the dtype
    rest = sum(p.numel() for p in model.parameters())
    want = (weights + rest) * bits / (stored + rest * bits)
    e = qcompile.explain(model, policy, IDS)
    assert e.density == pytest.approx(want, rel=1e-12)
    assert f"{want:.2f}x denser than {name}" in str(e)
    assert name == "float32" or "float32" not in str(e).splitlines()[-1]


# -- the rule column after quantize_model_ (and after save / load) -------------------------------

def test_rule_column_after_quantize_model_and_after_load(tmp_path):
    model = qcompile.quantize_model_(small_llama(), RULES)
    rows = [r for r in qcompile.explain(model, RULES, IDS).rows if r.weight_fmt != "-"]
    assert len(rows) == 15
    for r in rows:
        assert r.rule == expected_rule(r.fqn), (r.fqn, r.rule)
    qcompile.save_quantized(model, tmp_path / "m.safetensors")
    loaded = qcompile.load_quantized(tmp_path / "m.safetensors", small_llama(seed=1))
    again = [r for r in qcompile.explain(loaded, RULES, IDS).rows if r.weight_fmt != "-"]
    assert [(r.fqn, r.rule) for r in again] == [(r.fqn, expected_rule(r.fqn)) for r in rows]


def test_rule_column_for_an_embedding_rule():
    policy = Policy({"model.embed_tokens": LayerSpec(weight="int8", op="embedding"),
                     "lm_head": LayerSpec(weight="int8")})
    model = qcompile.quantize_model_(small_llama(tied=True), policy)
    rows = rows_by_name(qcompile.explain(model, policy, IDS))
    assert rows["model.embed_tokens"].rule == "#0 'model.embed_tokens'"
    assert rows["lm_head"].rule == "#1 'lm_head'"


# -- a tied pair untied ------------------------------------------------------------------------

def quantise_warnings(model, policy):
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        qcompile.quantize_model_(model, policy)
    return [str(w.message) for w in said if "tied" in str(w.message)]


def test_untying_a_tied_pair_that_grows_the_model_warns_and_one_format_does_not():
    model = small_llama(tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = storage_bytes(model)
    # the embedding in int8, lm_head kept in float32: both tables are now held
    said = quantise_warnings(model, Policy({"model.embed_tokens": LayerSpec(weight="int8",
                                                                            op="embedding")}))
    after = storage_bytes(model)
    assert after > before
    assert len(said) == 1
    assert "'model.embed_tokens'" in said[0] and "'lm_head'" in said[0]
    assert f"from {before} to {after} bytes" in said[0]
    assert "op='embedding'" in said[0]
    # the pair given one format shares one packed table: the model shrinks, nothing is said
    shared = small_llama(tied=True)
    before = storage_bytes(shared)
    said = quantise_warnings(shared, Policy({
        "model.embed_tokens": LayerSpec(weight="int8", op="embedding"),
        "lm_head": LayerSpec(weight="int8")}))
    assert storage_bytes(shared) < before and said == []
    assert isinstance(shared.lm_head, QuantLinear)
    assert isinstance(shared.model.embed_tokens, QuantEmbedding)
    assert shared.lm_head.codes is shared.model.embed_tokens.codes


def test_density_counts_a_tied_weight_once():
    # lm_head keeps the float32 table, the embedding holds an int8 copy: against the float32
    # model (one table), the two tables are not denser
    model = small_llama(tied=True)
    policy = Policy({"model.embed_tokens": LayerSpec(weight="int8", op="embedding")})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qcompile.quantize_model_(model, policy)
    e = qcompile.explain(model, policy, IDS)
    linears = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]  # lm_head too
    norms = 32 * sum(p.numel() for p in model.parameters() if p.dim() == 1)  # every weight
    full = 32 * sum(w.numel() for w in linears) + norms
    stored = full + 8 * sum(t.nbytes for t in model.model.embed_tokens.buffers())
    assert e.total_bits == stored
    assert e.density == pytest.approx(full / stored)
    assert f"{stored / full:.2f}x larger than float32" in str(e)


def test_a_tied_pair_given_one_format_counts_once_before_quantising():
    # a traced explain quantises nothing: the tied table, packed once for both holders, is
    # still one table of weights
    model = small_llama(tied=True)
    policy = Policy({"model.embed_tokens": LayerSpec(weight="int8", op="embedding"),
                     "lm_head": LayerSpec(weight="int8")}, default=LayerSpec(weight="nf4"))
    e = qcompile.explain(model, policy, IDS)
    distinct = {id(m.weight): m.weight.numel() for m in model.modules()
                if isinstance(m, (nn.Linear, nn.Embedding))}
    assert len(distinct) == 15  # 14 decoder linears and one table
    norms = sum(p.numel() for p in model.parameters() if p.dim() == 1)  # every weight counts
    assert e.total_weights == sum(distinct.values()) + norms
