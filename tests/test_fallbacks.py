"""Fallbacks and copies of a compiled model speak (issue "Fallbacks and copies must speak"):
a copy or a pickle of a compiled model runs uncompiled and says so once; a dtype the formats do
not take is named as the reason; kernel fallbacks are said again for another dtype; an
encoder-decoder's encoder runs through the backend under ``generate``; a slow compile says
what it compiles. Each test here failed on the code before the fix. Oracles: the float model
itself (a copy runs uncompiled), and emulation.py / hf_models.py (qcompile.fake_quantize only)."""
import copy
import io
import pickle
import re
import time
import warnings

import pytest
import torch
import torch.nn as nn

import qcompile
from emulation import emulate
from qcompile import LayerSpec, Policy, backend, config

NF4 = Policy({}, default=LayerSpec(weight="nf4"))
X = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def fresh():
    torch._dynamo.reset()
    yield


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)).eval()


def compiled_mlp():
    """(the model compiled in place and run once, a float copy made before compiling)."""
    model = mlp()
    float_model = copy.deepcopy(model)
    qcompile.compile(model, NF4, lowering="eager", kernels="reference")
    with torch.no_grad():
        model(X)
    return model, float_model


def run_recording(fn, calls=2):
    """[fn() for each call] and the messages of the warnings the calls gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            outs = [fn() for _ in range(calls)]
    return outs, [str(w.message) for w in caught if "blockquant" in str(w.message)]


def torch_save_load(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# -- copies: deepcopy, pickle, torch.save -----------------------------------------------------

COPIES = {
    "deepcopy": (copy.deepcopy, "deep copy"),
    "pickle": (lambda m: pickle.loads(pickle.dumps(m)), "pickle"),
    "torch.save": (torch_save_load, "pickle"),
}


@pytest.mark.parametrize("how", list(COPIES))
def test_a_copy_of_a_compiled_model_runs_uncompiled_and_says_so_once(how):
    model, float_model = compiled_mlp()
    make, said = COPIES[how]
    twin = make(model)
    outs, messages = run_recording(lambda: twin(X))
    for y in outs:  # uncompiled: the float model's own output, bit for bit
        assert torch.equal(y, float_model(X))
    assert len(messages) == 1, messages  # one clear warning, not one per layer
    assert said in messages[0] and "uncompiled, in full precision" in messages[0]
    assert "qcompile.compile" in messages[0] and "save_quantized" in messages[0]
    assert "ran eagerly" not in messages[0]
    # a second copy is a model of its own: it says so too
    _, again = run_recording(lambda: make(model)(X), calls=1)
    assert len(again) == 1 and said in again[0]
    # the original stays compiled and silent
    outs, messages = run_recording(lambda: model(X), calls=1)
    assert messages == [] and not torch.equal(outs[0], float_model(X))


def test_a_copy_compiled_in_turn_is_quantised_and_silent():
    model, _ = compiled_mlp()
    twin = pickle.loads(pickle.dumps(model))
    qcompile.compile(twin, NF4, lowering="eager", kernels="reference")
    outs, messages = run_recording(lambda: twin(X))
    want = emulate(mlp(), [], ("nf4", None))(X)
    assert messages == []
    assert all(torch.equal(y, want) for y in outs)
    # its layer watches are armed again: a layer run outside the compiled frame says so
    _, messages = run_recording(lambda: twin[0]._call_impl(X), calls=1)
    assert len(messages) == 1 and "layer '0' ran eagerly" in messages[0]


# -- dtypes the formats do not take ------------------------------------------------------------

def test_double_after_compiling_names_the_dtype_for_each_model():
    model, _ = compiled_mlp()
    model.double()
    outs, messages = run_recording(lambda: model(X.double()))
    assert all(y.dtype == torch.float64 and torch.equal(y, mlp().double()(X.double()))
               for y in outs)
    assert len(messages) == 1, messages
    assert "float64" in messages[0] and "float32, float16 and bfloat16" in messages[0]
    assert "matched the policy" not in messages[0]
    # a second float64 model in the process is told too
    other = mlp(seed=1).double()
    qcompile.compile(other, NF4, lowering="eager", kernels="reference")
    _, messages = run_recording(lambda: other(X.double()), calls=1)
    assert len(messages) == 1 and "float64" in messages[0]


def test_a_kernel_fallback_is_said_again_for_another_dtype(monkeypatch):
    """The CPU kernel fails (simulated, strict mode off): bf16 then fp16 inputs each get their
    own warning, naming the dtype; the result is the reference's."""
    monkeypatch.setenv("QCOMPILE_STRICT", "0")
    def crash(*args, **kwargs):
        raise RuntimeError("simulated kernel crash")
    monkeypatch.setattr(qcompile.ops.cpu, "linear", crash)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    said = []
    for dtype in (torch.bfloat16, torch.float16, torch.bfloat16):
        q = qcompile.quantize(w.to(dtype), "int8")
        x = torch.randn(2, 64, generator=torch.Generator().manual_seed(4)).to(dtype)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = torch.ops.qcompile.linear(x, q.codes, q.scales, list(q.side.values()),
                                          qcompile.ops.qtensor_meta(q), "", None, "cpu")
        said.append([str(c.message) for c in caught])
        assert torch.equal(y, torch.nn.functional.linear(x, qcompile.dequantize(q)))
    assert len(said[0]) == 1 and "bfloat16" in said[0][0] and "simulated" in said[0][0]
    assert len(said[1]) == 1 and "float16" in said[1][0] and "bfloat16" not in said[1][0]
    assert said[2] == []  # bf16 again: said already


# -- encoder-decoder models: generate runs the encoder through the backend ----------------------

def t5():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                                pad_token_id=0, eos_token_id=1)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    ids = torch.randint(2, 64, (1, 7), generator=torch.Generator().manual_seed(3))
    return model, {"input_ids": ids}, "lm_head", "encoder.block.0.layer.0.SelfAttention.q"


def whisper():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(
        vocab_size=100, num_mel_bins=16, encoder_layers=1, decoder_layers=1, d_model=32,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_source_positions=16, max_target_positions=32,
        decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=1,
        begin_suppress_tokens=None, suppress_tokens=None)
    model = transformers.WhisperForConditionalGeneration(cfg).eval()
    feats = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(3))
    return model, {"input_features": feats}, "proj_out", "model.encoder.layers.0.fc1"


@pytest.mark.parametrize("build", [t5, whisper])
def test_generate_of_an_encoder_decoder_runs_its_encoder_quantised(build):
    from hf_models import reference_copy
    model, inputs, head, encoder_layer = build()
    policy = Policy({head: None}, default=LayerSpec(weight="nf4"))
    want = reference_copy(model, policy)
    qcompile.compile(model, policy, lowering="eager", kernels="reference")

    def scores(m):
        out = m.generate(**inputs, max_new_tokens=3, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
        return torch.stack(out.scores)
    (got,), messages = run_recording(lambda: scores(model), calls=1)
    assert not [m for m in messages if "ran eagerly" in m], messages
    with torch.no_grad():
        assert torch.equal(got, scores(want))
    # a plain forward of the whole model: quantised once, the same as the reference
    dec = torch.tensor([[1, 5, 6]])
    (y,), messages = run_recording(lambda: model(**inputs, decoder_input_ids=dec).logits, 1)
    with torch.no_grad():
        assert torch.equal(y, want(**inputs, decoder_input_ids=dec).logits)
    assert messages == []
    names = {r.fqn for r in qcompile.explain(model).rows if r.weight_fmt != "-"}
    assert encoder_layer in names  # the whole model's names


# -- a slow compile says what it compiles ---------------------------------------------------------

def slow_graph_compiles(monkeypatch):
    """Each graph's passes take 0.6 s, three times the (lowered) progress threshold."""
    real_passes = backend.run_passes

    def slow_passes(*args, **kwargs):
        time.sleep(0.6)
        return real_passes(*args, **kwargs)
    monkeypatch.setattr(backend, "run_passes", slow_passes)
    monkeypatch.setattr(config, "PROGRESS_AFTER_S", 0.2)


def test_a_slow_graph_compile_says_what_it_compiles_and_a_fast_one_is_quiet(monkeypatch, capfd):
    fast = mlp()
    qcompile.compile(fast, NF4, lowering="eager", kernels="reference")
    fast(X)
    assert "blockquant" not in capfd.readouterr().err
    torch._dynamo.reset()
    slow_graph_compiles(monkeypatch)
    model = mlp()
    qcompile.compile(model, NF4, lowering="eager", kernels="reference")
    model(X)
    err = capfd.readouterr().err
    assert re.search(r"blockquant: compiling graph \d+ of the Sequential model", err), err
    done = re.search(r"graph \d+ of the Sequential model compiled in ([0-9.]+) s "
                     r"\(2 quantised layer\(s\)\)", err)
    assert done and float(done.group(1)) >= 0.6, err


def test_the_progress_line_counts_layers_packed_before_compiling(monkeypatch, capfd):
    """A model packed by quantize_model_ runs every layer quantised: the progress line must not
    say 0 quantised layers (it did: it counted only the layers the backend packed itself)."""
    slow_graph_compiles(monkeypatch)
    model = mlp()
    qcompile.quantize_model_(model, NF4)
    qcompile.compile(model, NF4, lowering="eager", kernels="reference")
    model(X)
    err = capfd.readouterr().err
    assert re.search(r"compiled in [0-9.]+ s \(2 quantised layer\(s\)\)", err), err
