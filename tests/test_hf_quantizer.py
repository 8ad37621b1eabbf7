"""The transformers integration (qcompile/integrations/hf.py): from_pretrained(
quantization_config=BlockQuantConfig(policy)) against the oracle "load in float, then
quantize_model_" bit for bit, save_pretrained -> from_pretrained (in a fresh process too),
compiling the loaded model, and the errors for bad configs and damaged checkpoints."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import qcompile
from qcompile import LayerSpec, Policy
from qcompile.backend import compiled_variants
from qcompile.integrations import hf
from qcompile.policy import PolicyError
from qcompile.serialize import QuantizedFileError
from qcompile.swap import QuantEmbedding, QuantLinear

from hf_models import (IDS, MIXED, assert_same, logits, reference, save_gpt2,
                       save_llama, with_config)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("tie", [True, False])
def test_quantised_while_loading_equals_quantize_model_(tmp_path, monkeypatch, caplog, tie):
    folder = save_llama(tmp_path / "float", tie=tie)
    policy = MIXED if tie else Policy({"model.embed_tokens": LayerSpec(weight="int8",
                                                                       op="embedding")},
                                      default=LayerSpec(weight="nf4"))
    left = []  # what the policy still quantises once the weights are loaded

    def after_loading(model, policy):
        left.extend(sorted(hf.layer_plan(model, policy)))
        return qcompile.quantize_model_(model, policy)
    monkeypatch.setattr(hf, "quantize_model_", after_loading)
    got = with_config(folder, policy)
    monkeypatch.undo()
    assert "LOAD REPORT" not in caplog.text  # no missing, unexpected or mismatched key
    # every layer was packed as its weight loaded, except a pair that transformers ties later
    assert left == (["lm_head", "model.embed_tokens"] if tie else [])
    assert_same(got, reference(folder, policy))
    if tie:
        assert got.lm_head.codes is got.model.embed_tokens.codes  # one packed table
        assert isinstance(got.model.layers[0].mlp.down_proj, QuantLinear)
        assert got.model.layers[0].self_attn.q_proj.act == "mxint8"
    else:
        assert isinstance(got.model.embed_tokens, QuantEmbedding)


def test_gpt2_conv1d_while_loading(tmp_path):
    folder = save_gpt2(tmp_path / "gpt2")
    policy = Policy({"transformer.wte": LayerSpec(weight="int8", op="embedding"),
                     "*.mlp.*": LayerSpec(weight="nf4")}, default=LayerSpec(weight="mxfp4"))
    got = with_config(folder, policy)
    assert got.transformer.h[0].attn.c_attn.conv1d
    want = reference(folder, policy)
    assert_same(got, want)
    got.save_pretrained(tmp_path / "q")  # GPT-2's init reads c_proj.weight while loading
    assert_same(AutoModelForCausalLM.from_pretrained(tmp_path / "q"), want)


@pytest.mark.filterwarnings("ignore:.*no generated CPU kernel:UserWarning")  # bf16: reference
def test_while_loading_in_bfloat16(tmp_path):
    folder = save_llama(tmp_path / "float", tie=False)
    got = with_config(folder, MIXED, dtype=torch.bfloat16)
    assert got.model.layers[0].mlp.up_proj.qtensor().dtype == torch.bfloat16
    assert_same(got, reference(folder, MIXED, dtype=torch.bfloat16))


def test_config_json_holds_the_policy(tmp_path):
    cfg = qcompile.BlockQuantConfig(policy=MIXED)
    assert cfg.to_dict() == {"quant_method": "blockquant", "policy": json.loads(MIXED.to_json())}
    from transformers.quantizers import AutoQuantizationConfig
    rebuilt = AutoQuantizationConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert isinstance(rebuilt, qcompile.BlockQuantConfig) and rebuilt.policy == MIXED
    model = with_config(save_llama(tmp_path / "float"), MIXED)
    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert Policy.from_json(json.dumps(saved["policy"])) == MIXED


def test_save_and_load_round_trip_in_a_fresh_process(tmp_path, caplog):
    folder = save_llama(tmp_path / "float")
    model = with_config(folder, MIXED)
    model.save_pretrained(tmp_path / "q")
    assert_same(AutoModelForCausalLM.from_pretrained(tmp_path / "q"), reference(folder, MIXED))
    assert "LOAD REPORT" not in caplog.text
    torch.save(IDS, tmp_path / "ids.pt")
    script = (  # the registration must come from `import qcompile` alone, and stay lazy
        "import sys, torch\n"
        "import qcompile\n"
        "assert 'transformers' not in sys.modules, 'import qcompile imported transformers'\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1] + '/q')\n"
        "with torch.no_grad():\n"
        "    y = m(torch.load(sys.argv[1] + '/ids.pt')).logits\n"
        "torch.save({'logits': y, 'state': {**dict(m.named_parameters()),\n"
        "            **dict(m.named_buffers())}}, sys.argv[1] + '/out.pt')\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    want = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert sorted(out["state"]) == sorted(want)
    assert all(torch.equal(out["state"][k], v) for k, v in want.items())
    assert torch.equal(out["logits"], logits(reference(folder, MIXED)))


def test_a_policy_of_formats_with_options_loads_in_a_fresh_process(tmp_path):
    """transformers builds the model under torch.device("meta"); a format whose base preset is
    built there for the first time (a fresh process, only options-formats in the policy) made
    its tables on the meta device and failed ("Tensor.item() cannot be called on meta
    tensors")."""
    folder = save_llama(tmp_path / "float", tie=False)
    policy = Policy({"lm_head": None}, default=LayerSpec(weight="bof4s_opq[proxy=4]"))
    script = (
        "import sys, torch, qcompile\n"
        "from qcompile import LayerSpec, Policy\n"
        "from transformers import AutoModelForCausalLM\n"
        "policy = Policy({'lm_head': None}, default=LayerSpec(weight='bof4s_opq[proxy=4]'))\n"
        "cfg = qcompile.BlockQuantConfig(policy=policy)\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=cfg).eval()\n"
        "with torch.no_grad():\n"
        "    y = m(torch.load(sys.argv[2])).logits\n"
        "torch.save(y, sys.argv[2] + '.out')\n")
    torch.save(IDS, tmp_path / "ids.pt")
    done = subprocess.run([sys.executable, "-c", script, str(folder), str(tmp_path / "ids.pt")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "ids.pt.out"), logits(reference(folder, policy)))


def test_loaded_model_compiles_like_the_quantised_one(tmp_path):
    policy = Policy({"model.embed_tokens": LayerSpec(weight="nf4", op="embedding")},
                    default=LayerSpec(weight="int4"))
    folder = save_llama(tmp_path / "float")
    with_config(folder, policy).save_pretrained(tmp_path / "q")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    in_memory = reference(folder, policy)
    torch._dynamo.reset()
    with torch.no_grad():
        want = qcompile.compile(in_memory, policy)(IDS).logits
        got = qcompile.compile(loaded, policy)(IDS).logits
    assert torch.equal(got, want)
    assert any(v.model() is loaded for v in compiled_variants())  # the backend compiled it
    eager = logits(reference(folder, policy))  # Inductor reorders float sums: close, not equal
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)


SMOLLM2_POLICY = Policy({"model.embed_tokens": LayerSpec(weight="nf4", op="embedding"),
                         "*.mlp.*": LayerSpec(weight="bof4s_opq"),
                         r"re:.*self_attn\.[qk]_proj": LayerSpec(weight="mxint8", act="mxint8")},
                        default=LayerSpec(weight="nf4"))


def test_smollm2_cut_to_two_layers_round_trips_and_compiles(tmp_path, caplog):
    """The packaged SmolLM2-135M (real weights, tied embeddings) cut to 2 layers: quantised
    while loading, saved, loaded again and compiled, it matches the model quantised in memory
    and compiled the same way."""
    data = pytest.importorskip("benchmarks.data")
    try:
        folder = data.smollm2_folder()
    except SystemExit as e:  # the model package is not installed
        pytest.skip(str(e))
    cut = dict(num_hidden_layers=2, dtype=torch.float32)
    with_config(folder, SMOLLM2_POLICY, **cut).save_pretrained(tmp_path / "q")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    in_memory = reference(folder, SMOLLM2_POLICY, **cut)
    assert_same(loaded, in_memory)
    assert loaded.lm_head.codes is loaded.model.embed_tokens.codes  # tied: one packed table
    ids = torch.tensor([[1, 504, 3250, 314, 260, 1345, 28, 2]])
    torch._dynamo.reset()
    with torch.no_grad():
        want = qcompile.compile(in_memory, SMOLLM2_POLICY)(ids).logits
        got = qcompile.compile(loaded, SMOLLM2_POLICY)(ids).logits
    assert torch.equal(got, want)
    assert any(v.model() is loaded for v in compiled_variants())


def test_the_docs_example_runs_as_written():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "saving.md").read_text(), re.S)
    example = next(b for b in blocks if "BlockQuantConfig" in b)
    done = subprocess.run([sys.executable, "-c", example], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "same output: True" in done.stdout
    assert "compiled: torch.Size([1, 4, 128])" in done.stdout


# -- errors -----------------------------------------------------------------------------------

def test_a_config_needs_a_policy():
    with pytest.raises(ValueError, match="BlockQuantConfig needs a policy"):
        qcompile.BlockQuantConfig()
    with pytest.raises(PolicyError, match="must be a qcompile.Policy or its JSON, got int"):
        qcompile.BlockQuantConfig(policy=4)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['bits'\]"):
        qcompile.BlockQuantConfig(policy=MIXED, bits=4)


def edit_config(folder, edit):
    path = Path(folder) / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg["quantization_config"])
    path.write_text(json.dumps(cfg))


@pytest.fixture
def saved(tmp_path):
    with_config(save_llama(tmp_path / "float"), MIXED).save_pretrained(tmp_path / "q")
    return tmp_path / "q"


def test_config_json_without_a_policy(saved):
    edit_config(saved, lambda q: q.pop("policy"))
    with pytest.raises(ValueError, match="must have a 'policy' field"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_config_json_with_a_bad_policy(saved):
    edit_config(saved, lambda q: q["policy"]["rules"][0]["spec"].update(weight="nf9"))
    with pytest.raises(PolicyError, match=r"quantization_config 'policy' is not a blockquant "
                                          r"policy: policy JSON rules\[0\].*'nf9'"):
        AutoModelForCausalLM.from_pretrained(saved)
    edit_config(saved, lambda q: q.update(policy="{not json"))
    with pytest.raises(PolicyError, match="policy JSON is malformed"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_config_json_with_another_policy(saved):
    other = json.loads(Policy({}, default=LayerSpec(weight="int4")).to_json())
    edit_config(saved, lambda q: q.update(policy=other))
    with pytest.raises(QuantizedFileError, match="config.json was changed after saving"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_changed_packed_bytes(saved):
    from safetensors import safe_open
    from safetensors.torch import save_file
    path = str(saved / "model.safetensors")
    with safe_open(path, framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["model.layers.1.mlp.up_proj.codes"][0, 0] ^= 1
    save_file(tensors, path, metadata=meta)
    with pytest.raises(QuantizedFileError, match=r"packed weight 'model\.layers\.1\.mlp\.up_"
                                                 r"proj'.*the digest differs"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_weights_without_blockquant_metadata(saved, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    path = str(saved / "model.safetensors")
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(QuantizedFileError, match="the weights have no 'blockquant' metadata"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_saved_model_loaded_in_another_dtype(saved):
    with pytest.raises(QuantizedFileError, match="'model.embed_tokens' was packed from float32 "
                                                 "weights, the model is built in bfloat16"):
        AutoModelForCausalLM.from_pretrained(saved, dtype=torch.bfloat16)


def test_save_after_quantising_again(tmp_path):
    model = with_config(save_llama(tmp_path / "float", tie=False), Policy({"lm_head": None}))
    qcompile.quantize_model_(model, Policy({"lm_head": LayerSpec(weight="int8")}))
    with pytest.raises(QuantizedFileError, match="quantised again after loading"):
        model.save_pretrained(tmp_path / "q")
