"""Mixture-of-experts models saved, loaded, streamed and searched (issue 23, second slice).

The oracles: test_moe's emulation (each expert's matrix fake-quantised with
``qcompile.fake_quantize`` along its reduction axis, from the test's own layout table) for
logits; ``quantize_model_``'s packed tensors for the streaming command; ``qcompile.quantize``
of each expert's matrix for the search's costs. Damaged files reuse the corruption fuzz of
test_file_integrity, on the expert stacks' tensors and metadata entries.
"""
import copy
import json
import logging
import warnings

import pytest
import torch

import qcompile
from qcompile import LayerSpec, Policy, experts
from qcompile.expert_stack import PackedExperts
from qcompile.integrations import hf
from qcompile.integrations.stream import quantize_checkpoint
from qcompile.serialize import QuantizedFileError, saved_policies

from test_file_integrity import (metadata_cases, metadata_edits, read, refused, tensor_cases,
                                 tensor_edits, write)
from test_moe import (ARCHS, IDS, POLICY, _packed_bits, build, emulation, expert_params, logits,
                      reference_linears)

T = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*tables with OPQ outliers are gathered by the ref")
NAMES = ["mixtral", "qwen3-moe", "gpt-oss"]  # per-expert renamed, per-expert, fused checkpoints
EXPERTS_NF4 = Policy({"*.experts.*": LayerSpec(weight="nf4")}, default=None)
# OPQ outliers: a different count per expert, so side data concatenated with offsets
RAGGED = Policy({"*.experts.gate_up_proj": LayerSpec(weight="int4[opq=0.01]"),
                 "*.experts.down_proj": LayerSpec(weight="nf4")}, default=None)


def skeleton(name):
    with torch.device("meta"):
        model = ARCHS[name][0]().eval()
    model.set_experts_implementation("eager")
    return model


def stacks(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedExperts)}


def assert_same_state(got: dict, want: dict):
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


# -- save_quantized / load_quantized ----------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_save_quantized_and_load_quantized_round_trip_bit_for_bit(name, tmp_path):
    model = build(name, "eager")
    want = logits(emulation(model, name))
    packed = qcompile.quantize_model_(copy.deepcopy(model), POLICY)
    qcompile.save_quantized(packed, tmp_path / "m.safetensors")
    loaded = reference_linears(qcompile.load_quantized(tmp_path / "m.safetensors", skeleton(name)))
    assert set(stacks(loaded)) == set(expert_params(model, name))
    assert_same_state(loaded.state_dict(), packed.state_dict())
    assert torch.equal(logits(loaded), want)
    assert saved_policies(tmp_path / "m.safetensors") == [POLICY]


@pytest.fixture(scope="module")
def moe_file(tmp_path_factory):
    """GPT-OSS (expert biases, [E, K, N]) with ragged OPQ side data in its stacks, saved."""
    packed = qcompile.quantize_model_(build("gpt-oss", "eager"), RAGGED)
    path = tmp_path_factory.mktemp("moe") / "m.safetensors"
    qcompile.save_quantized(packed, path)
    return path, logits(packed)


@pytest.fixture
def moe_fuzz(moe_file, tmp_path):
    path, want = moe_file
    tensors, meta = read(path)
    assert "model.layers.0.mlp.experts.gate_up_proj.offsets_outlier_index" in tensors
    model = [skeleton("gpt-oss")]
    edited = tmp_path / "edited.safetensors"
    write(edited, tensors, meta)  # unchanged, written back as the fuzz writes: loads as saved
    assert torch.equal(logits(qcompile.load_quantized(edited, skeleton("gpt-oss"))), want)

    def load():
        qcompile.load_quantized(edited, model[0])

    def rebuild():
        model[0] = skeleton("gpt-oss")
    return tensors, json.loads(meta["blockquant"]), edited, load, rebuild


def test_moe_file_every_expert_tensor_changed_or_swapped_is_refused(moe_fuzz):
    tensors, doc, edited, load, rebuild = moe_fuzz
    meta = {"blockquant": json.dumps(doc), "format": "pt"}
    cases = [(what, edit) for what, edit in tensor_edits(tensors) if ".experts." in what]
    assert len(cases) > 20
    assert refused(load, tensor_cases(cases, tensors, edited, meta), rebuild) == []


def test_moe_file_every_expert_metadata_entry_changed_is_refused(moe_fuzz):
    tensors, doc, edited, load, rebuild = moe_fuzz
    cases = [(what, d) for what, d in metadata_edits(doc) if ".experts." in what]
    assert len(cases) > 50
    policy_missed = []
    assert refused(load, metadata_cases(cases, tensors, edited, policy_missed), rebuild) == []
    assert policy_missed == []


# -- transformers ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_from_pretrained_packs_experts_while_loading_and_save_pretrained_round_trips(
        name, tmp_path, monkeypatch):
    model = build(name, "eager")
    model.save_pretrained(tmp_path / "float")
    left_float, real = [], hf.quantize_model_

    def after_loading(m, policy):  # what is still float when loading ends
        left_float.append([n for n, _, _ in experts.candidates(m)])
        return real(m, policy)
    monkeypatch.setattr(hf, "quantize_model_", after_loading)
    loaded = T.AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", quantization_config=qcompile.BlockQuantConfig(EXPERTS_NF4)).eval()
    assert left_float == [[]]  # every expert tensor was packed as it loaded
    loaded.set_experts_implementation("eager")
    want = logits(emulation(model, name, EXPERTS_NF4))
    assert torch.equal(logits(reference_linears(loaded)), want)
    loaded.save_pretrained(tmp_path / "q")
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    back.set_experts_implementation("eager")
    assert set(stacks(back)) == set(expert_params(model, name))
    assert_same_state(back.state_dict(), loaded.state_dict())
    assert torch.equal(logits(reference_linears(back)), want)


def test_a_damaged_expert_stack_of_a_pretrained_folder_is_refused(tmp_path):
    model = build("qwen3-moe", "eager")
    model.save_pretrained(tmp_path / "float")
    T.AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", quantization_config=qcompile.BlockQuantConfig(EXPERTS_NF4)
    ).save_pretrained(tmp_path / "q")
    shard = tmp_path / "q" / "model.safetensors"
    tensors, meta = read(shard)
    doc = json.loads(meta["blockquant"])
    stack = "model.layers.1.mlp.experts.down_proj"
    changed = {f"{stack}.codes": tensors[f"{stack}.codes"].flip(0)}  # experts reordered
    moved = copy.deepcopy(doc)
    moved["packed"][stack]["axis"] = 1
    for what, ts, d in [("tensor", {**tensors, **changed}, doc), ("axis", tensors, moved)]:
        write(shard, ts, {**meta, "blockquant": json.dumps(d)})
        with pytest.raises(QuantizedFileError, match=stack.replace(".", r"\.")):
            T.AutoModelForCausalLM.from_pretrained(tmp_path / "q")


# -- the streaming command ---------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_the_stream_packs_experts_as_quantize_model_does(name, tmp_path):
    model = build(name, "eager")
    model.save_pretrained(tmp_path / "float")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing stays float: nothing to say
        quantize_checkpoint(tmp_path / "float", tmp_path / "q", POLICY, progress=False)
    want = qcompile.quantize_model_(copy.deepcopy(model), POLICY)
    assert_same_state(read(tmp_path / "q" / "model.safetensors")[0], want.state_dict())
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    back.set_experts_implementation("eager")
    assert torch.equal(logits(reference_linears(back)), logits(emulation(model, name)))


def test_the_stream_refuses_a_checkpoint_lacking_an_expert(tmp_path):
    build("qwen3-moe").save_pretrained(tmp_path / "float")
    weights = tmp_path / "float" / "model.safetensors"
    tensors, meta = read(weights)
    del tensors["model.layers.1.mlp.experts.2.up_proj.weight"]
    write(weights, tensors, meta)
    with pytest.raises(QuantizedFileError, match="lacks part 1 of expert 2 of "
                                                 "'model.layers.1.mlp.experts.gate_up_proj'"):
        quantize_checkpoint(tmp_path / "float", tmp_path / "q", POLICY, progress=False)


# -- search_policy -----------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:.*is not a linear layer")  # the routers
def test_search_policy_chooses_formats_for_expert_tensors():
    model = build("qwen3-moe", "eager")
    result = qcompile.search_policy(model, IDS, 6.0, ["int4", "int8", None], progress=False,
                                    refine=False)
    rules = {rule.pattern: rule.spec for rule in result.policy.rules}
    rows = {row.name: row for row in result.table}
    tensors = expert_params(model, "qwen3-moe")
    for pname, (p, axis) in tensors.items():  # each expert tensor: a rule, its stored bits
        spec = rules[pname]
        want = 32 * p.numel() if spec is None else _packed_bits(p, axis, spec.weight.key)
        assert rows[pname].bits == want / p.numel()
    picked = {n: s for n, s in rules.items() if n in tensors and s is not None}
    assert picked and result.bits <= 6.0
    packed = stacks(qcompile.quantize_model_(copy.deepcopy(model), result.policy))
    chosen = {n: s.weight.key for n, s in picked.items()}
    assert {n: m.fmt_key for n, m in packed.items()} == chosen
