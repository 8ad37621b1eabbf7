"""qcompile.search_policy: the budget as explain counts it, the knapsack solver against brute
force, the sensitivities against fake_quantize_model_, the metric against a hand-computed KL,
and bad input refused before any forward pass."""
import copy
import fnmatch
import itertools
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import qcompile
from qcompile import LayerSpec, Policy
from qcompile.policy import PolicyError
from qcompile.search import FULL_PRECISION, kl_and_top1, solve_budget

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = ["bof4s_opq", "nf4", "mxfp4", "int4[block_size=32]", "mxfp6_e2m3", "mxint8", None]


def tiny_llama(tie=False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


def calibration():
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


# -- the metric ---------------------------------------------------------------------------------

def test_kl_and_top1_on_a_hand_computed_distribution():
    p = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.25, 0.5, 0.25], [0.2, 0.3, 0.5]])
    kl, top1 = kl_and_top1(p.log(), q.log() + 3.0)  # logits: any shift gives the same softmax
    # row 1: 0.5 ln(0.5/0.25) + 0.25 ln(0.25/0.5) = 0.25 ln 2; row 2: 0
    assert kl == pytest.approx(0.125 * math.log(2), rel=1e-6)
    assert top1 == 0.5  # row 1's top token moves from 0 to 1


def test_kl_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        kl_and_top1(torch.zeros(2, 3), torch.zeros(2, 4))


# -- the solver against brute force ----------------------------------------------------------

def brute_force(sens, cost, budget):
    """The least total sensitivity over all assignments within the budget (None: none fits)."""
    best = None
    for pick in itertools.product(*[range(len(r)) for r in cost]):
        if sum(cost[i][j] for i, j in enumerate(pick)) <= budget:
            total = sum(sens[i][j] for i, j in enumerate(pick))
            best = total if best is None else min(best, total)
    return best


def totals(sens, cost, pick):
    return (sum(sens[i][j] for i, j in enumerate(pick)),
            sum(cost[i][j] for i, j in enumerate(pick)))


def random_case(rng, ties=False):
    n, m = rng.randint(3, 5), 3
    sens = [[float(rng.randint(0, 3)) if ties else rng.random() for _ in range(m)]
            for _ in range(n)]
    cost = [[rng.randint(1, 40) for _ in range(m)] for _ in range(n)]
    return sens, cost


@pytest.mark.parametrize("seed", range(60))
def test_solver_is_exact_against_brute_force(seed):
    rng = random.Random(seed)
    sens, cost = random_case(rng, ties=seed % 3 == 0)
    lo = sum(min(r) for r in cost)
    hi = sum(max(r) for r in cost)
    pick_any = [rng.randrange(3) for _ in cost]
    for budget in (lo, rng.randint(lo, hi), hi, totals(sens, cost, pick_any)[1]):
        pick = solve_budget(sens, cost, budget)
        value, spent = totals(sens, cost, pick)
        assert spent <= budget
        assert value == pytest.approx(brute_force(sens, cost, budget), abs=1e-12)


def test_solver_prefers_the_cheaper_of_equal_losses():
    sens = [[0.0, 0.0], [1.0, 1.0]]
    cost = [[5, 3], [7, 2]]
    assert solve_budget(sens, cost, 100) == [1, 1]


def test_solver_refuses_an_impossible_budget():
    with pytest.raises(ValueError, match="cheapest"):
        solve_budget([[0.0, 1.0]], [[10, 20]], 9)


@pytest.mark.parametrize("seed", range(30))
def test_rounded_cost_axis_never_exceeds_the_budget(seed):
    # large costs with no common divisor and few cells: costs are rounded up to cells of
    # step = ceil(room / max_units); the answer is feasible and at least as good as the
    # exact optimum with n * step less budget
    rng = random.Random(seed)
    n, max_units = rng.randint(3, 5), 16
    sens = [[rng.random() for _ in range(3)] for _ in range(n)]
    cost = [[rng.randint(10**6, 10**7) for _ in range(3)] for _ in range(n)]
    lo, hi = sum(min(r) for r in cost), sum(max(r) for r in cost)
    budget = rng.randint(lo, hi)
    step = -(-(budget - lo) // max_units)
    pick = solve_budget(sens, cost, budget, max_units=max_units)
    value, spent = totals(sens, cost, pick)
    assert spent <= budget
    tighter = brute_force(sens, cost, budget - n * step)
    if tighter is not None:
        assert value <= tighter + 1e-12


@pytest.mark.parametrize("seed", range(20))
def test_a_larger_budget_never_loses_more(seed):
    rng = random.Random(seed)
    sens, cost = random_case(rng)
    lo, hi = sum(min(r) for r in cost), sum(max(r) for r in cost)
    values = [totals(sens, cost, solve_budget(sens, cost, b))[0] for b in range(lo, hi + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))


# -- search_policy on tiny models --------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_result():
    model = tiny_llama()
    return model, qcompile.search_policy(model, calibration(), bits=4.5, candidates=CANDIDATES,
                                         progress=False)


@pytest.fixture(scope="module")
def gpt2_result():
    model = tiny_gpt2()
    return model, qcompile.search_policy(model, calibration(), bits=4.5, candidates=CANDIDATES,
                                         progress=False)


@pytest.mark.parametrize("searched_model", ["llama_result", "gpt2_result"],
                         ids=["llama", "gpt2-conv1d"])
def test_budget_is_met_as_explain_counts_it(searched_model, request):
    (model, result), ids = request.getfixturevalue(searched_model), calibration()
    packed = qcompile.quantize_model_(copy.deepcopy(model), result.policy)
    rows = {r.fqn: r for r in qcompile.explain(packed, result.policy, ids).rows}
    searched = [r.name for r in result.table]
    assert all(name in rows for name in searched)
    n = sum(rows[name].numel for name in searched)
    avg = sum(rows[name].numel * rows[name].bits for name in searched) / n
    assert result.bits == pytest.approx(avg, rel=1e-12)
    assert avg <= 4.5
    for r in result.table:
        assert r.bits == pytest.approx(rows[r.name].bits, rel=1e-12)


def test_sensitivity_and_end_to_end_kl_match_fake_quantize_model(llama_result):
    model, result = llama_result
    ids = calibration()
    ref = logits_of(model, ids)
    s = result.sensitivities
    act = LayerSpec(weight="mxint8", act="mxfp4")
    for i, j in [(0, 0), (3, 2), (8, 4), (len(s.layers) - 1, 1)]:  # incl. a late layer, lm_head
        one = qcompile.fake_quantize_model_(copy.deepcopy(model),
                                            Policy({s.layers[i]: s.candidates[j]}))
        kl, _ = kl_and_top1(ref, logits_of(one, ids))
        assert s.kl[i, j] == pytest.approx(max(kl, 0.0), rel=1e-5, abs=1e-12)
    every = qcompile.fake_quantize_model_(copy.deepcopy(model), result.policy)
    kl, top1 = kl_and_top1(ref, logits_of(every, ids))
    assert result.kl == pytest.approx(kl, rel=1e-5) and result.top1 == top1
    # an activation format is measured through the layer's input
    name = "model.layers.1.mlp.down_proj"
    got = qcompile.search_policy(model, ids, bits=32, candidates=[act, None], patterns=[name],
                                 progress=False)
    one = qcompile.fake_quantize_model_(copy.deepcopy(model), Policy({name: act}))
    kl, _ = kl_and_top1(ref, logits_of(one, ids))
    assert got.sensitivities.kl[0, 0] == pytest.approx(kl, rel=1e-5)


def test_refinement_keeps_only_what_measures_better(llama_result):
    model, refined = llama_result
    plain = qcompile.search_policy(model, calibration(), bits=4.5, candidates=CANDIDATES,
                                   progress=False, sensitivities=refined.sensitivities,
                                   refine=False)
    assert plain.refinement == [] and refined.kl <= plain.kl
    kept = [r for r in refined.refinement if r["kept"]]
    assert refined.kl == (kept[-1]["measured"] if kept else plain.kl) or refined.note


def test_refinement_repairs_a_wrong_additive_estimate(llama_result):
    """Sensitivities of block 1 made 100 times too small: the knapsack then spends the budget
    elsewhere, the block measured together shows it, and the next solution measures better."""
    model, result = llama_result
    s = copy.deepcopy(result.sensitivities)
    block1 = [i for i, n in enumerate(s.layers) if n.startswith("model.layers.1.")]
    s.kl[block1] *= 0.01
    wrong = qcompile.search_policy(model, calibration(), bits=4.5, candidates=CANDIDATES,
                                   progress=False, sensitivities=s, refine=False)
    fixed = qcompile.search_policy(model, calibration(), bits=4.5, candidates=CANDIDATES,
                                   progress=False, sensitivities=s)
    assert fixed.refinement and fixed.refinement[0]["kept"]
    assert fixed.kl < wrong.kl and fixed.bits <= 4.5


def test_policy_has_one_exact_rule_per_searched_layer(llama_result):
    model, result = llama_result
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert [r.name for r in result.table] == linears
    assert [r.pattern for r in result.policy.rules] == linears and result.policy.default is None
    namespace = {}
    exec(result.policy.to_python(), namespace)
    assert namespace["policy"] == result.policy
    for r in result.table:
        spec = result.policy.match(r.name)[1]
        assert (FULL_PRECISION if spec is None else spec.weight.key) == r.choice


def test_patterns_and_keep_restrict_the_search():
    model = tiny_llama()
    keep = {"model.layers.0.mlp.*": LayerSpec(weight="int8")}
    result = qcompile.search_policy(model, calibration(), bits=6, candidates=["nf4", "mxint8"],
                                    patterns=["*.mlp.*"], keep=keep, progress=False)
    want = [n for n, m in model.named_modules() if fnmatch.fnmatchcase(n, "*.mlp.*")
            and isinstance(m, torch.nn.Linear) and not n.startswith("model.layers.0.")]
    assert [r.name for r in result.table] == want
    assert result.policy.rules[0].pattern == "model.layers.0.mlp.*"
    assert result.policy.match("model.layers.0.mlp.up_proj")[1] == LayerSpec(weight="int8")
    assert result.policy.match("lm_head")[1] is None  # not searched: the default, None


def test_budget_of_32_bits_loses_nothing(llama_result):
    model, first = llama_result
    result = qcompile.search_policy(model, calibration(), bits=32, candidates=CANDIDATES,
                                    progress=False, sensitivities=first.sensitivities)
    assert result.estimated_kl == 0.0
    assert all(r.choice == FULL_PRECISION or r.sensitivity == 0.0 for r in result.table)


def test_larger_budgets_never_estimate_a_larger_loss(llama_result):
    model, first = llama_result
    s = first.sensitivities
    n = sum(s.numel)
    losses = []
    for bits in (4.25, 4.5, 5, 6, 8, 12, 32):
        pick = solve_budget(s.kl, s.cost, math.floor(bits * n))
        losses.append(sum(s.kl[i, j] for i, j in enumerate(pick)))
    assert all(a >= b for a, b in zip(losses, losses[1:]))
    assert losses[0] > losses[-1] == 0.0


def test_search_leaves_the_model_as_it_was():
    model = tiny_llama(tie=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = qcompile.search_policy(model, calibration(), bits=5, candidates=["nf4", "mxint8"],
                                    progress=False)
    assert "lm_head" in [r.name for r in result.table]
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training and not any(m._forward_pre_hooks for m in model.modules())


def test_other_budget_needs_the_same_layers_and_candidates(llama_result):
    model, first = llama_result
    with pytest.raises(ValueError, match="other layers or candidates"):
        qcompile.search_policy(model, calibration(), bits=5, candidates=["nf4"],
                               sensitivities=first.sensitivities, progress=False)


# -- bad input, refused before any forward pass ------------------------------------------------

class NoForward(RuntimeError):
    pass


@pytest.fixture()
def guarded():
    model = tiny_llama()

    def refuse(*_):
        raise NoForward("a forward pass ran")
    model.register_forward_pre_hook(refuse)
    return model


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(candidates=[]), ValueError, "candidates is empty"),
    (dict(candidates="nf4"), ValueError, "must be a list"),
    (dict(candidates=["nf4", "nf5x"]), PolicyError, "unknown format 'nf5x'; presets: .*nf4"),
    (dict(candidates=[LayerSpec(weight="nf4", op="embedding")]), PolicyError, "linear layers"),
    (dict(bits=4.0, candidates=["nf4", "mxint8"]), ValueError,
     "below the cheapest candidate: nf4 needs 4.5000"),
    # nominally 4.5 bits, but its outliers are stored too: refused once the bits are exact
    (dict(bits=4.5, candidates=["bof4s_opq"]), ValueError, "at least 4.5[1-9]"),
    (dict(bits=0), ValueError, "positive number"),
    (dict(bits=float("nan")), ValueError, "positive number"),
    (dict(bits=True), ValueError, "positive number"),
    (dict(patterns=["*.no_such_layer"]), ValueError, "no quantisable layer"),
    (dict(keep={"*": None}), ValueError, "no quantisable layer"),
    (dict(patterns=["re:("]), PolicyError, "malformed regular expression"),
    (dict(calibration=torch.rand(2, 8)), ValueError, "integer tensor.*float32"),
    (dict(calibration=torch.ones(2, 8, dtype=torch.bool)), ValueError, "torch.bool"),
    (dict(calibration=torch.arange(8)), ValueError, "ids\\[None\\]"),
    (dict(calibration=torch.full((1, 4), 128)), ValueError, "vocabulary"),
    (dict(calibration=[]), ValueError, "token ids"),
    (dict(calibration=[torch.arange(8)[None], "text"]), ValueError, "str"),
])
def test_bad_input_is_refused_before_any_forward_pass(guarded, kwargs, error, message):
    args = dict(calibration=calibration(), bits=4.5, candidates=CANDIDATES, progress=False)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        qcompile.search_policy(guarded, args.pop("calibration"), **args)


def test_a_model_without_linear_layers_is_refused():
    model = torch.nn.Sequential(torch.nn.Embedding(16, 8))
    with pytest.raises(ValueError, match="no quantisable layer"):
        qcompile.search_policy(model, torch.zeros(1, 4, dtype=torch.long), bits=8,
                               candidates=["nf4"], progress=False)


def test_the_guard_sees_a_forward_pass(guarded):
    # the fixture's hook is what the rejection tests rely on: a valid call does reach it
    with pytest.raises(NoForward):
        qcompile.search_policy(guarded, calibration(), bits=4.5, candidates=CANDIDATES,
                               progress=False)


# -- the docs -----------------------------------------------------------------------------------

def test_docs_example_runs_as_written():
    text = (ROOT / "docs" / "search.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S)[1]
    done = subprocess.run([sys.executable, "-c", block], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "policy = Policy([" in done.stdout and "budget 4.5 bits/weight" in done.stdout


# -- the benchmark's judgement of the targets -------------------------------------------

def test_benchmark_goals_judge_hand_built_results():
    from benchmarks.search import goals

    def results(searched_ppl):
        uniform = [{"label": "fp32", "bits": 32.0, "ppl": 10.0},
                   {"label": "nf4", "bits": 4.5, "ppl": 12.0, "kl": 0.2},
                   {"label": "bof4s_opq", "bits": 4.54, "ppl": 11.5, "kl": 0.15},
                   {"label": "mxint8", "bits": 8.25, "ppl": 10.02, "kl": 0.01}]
        search = [{"label": "search 4.5", "budget": 4.5, "bits": 4.5, "ppl": searched_ppl,
                   "kl": 0.1},
                  {"label": "search 6", "budget": 6.0, "bits": 6.0, "ppl": 10.2, "kl": 0.02}]
        return {"perplexity": uniform, "search": search}

    good = {g: status for g, status, _ in goals(results(11.0))}
    assert list(good.values()) == ["met", "missed", "met"]  # 10.2 is 2% above 10.0
    bad = goals(results(11.7))  # worse than bof4s_opq (4.54 bits, above the searched 4.5)
    assert [status for _, status, _ in bad] == ["missed", "missed", "met"]
    assert "not beaten: bof4s_opq" in bad[0][2]
    above = goals({**results(11.0), "search": [{"label": "search 5", "budget": 5.0, "bits": 5.0,
                                                "ppl": 11.8, "kl": 0.1}]})
    assert above[-1][1] == "missed" and "above bof4s_opq" in above[-1][2]
