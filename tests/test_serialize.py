"""Policies as JSON, and quantised models saved to one safetensors file and loaded again
(qcompile.serialize): bit for bit, into meta-device models, in another process, and every
damaged or mismatched file refused with an error that names the problem."""
import copy
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qcompile
from qcompile import LayerSpec, Policy, formats
from qcompile.policy import PolicyError
from qcompile.serialize import QuantizedFileError, packed_layout, saved_policies
from qcompile.swap import QuantEmbedding, QuantLinear

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
from safetensors import safe_open  # noqa: E402

logging.getLogger("transformers").setLevel(logging.ERROR)
# OPQ tables are gathered by the reference, said once: expected here
pytestmark = pytest.mark.filterwarnings("ignore:.*tables with OPQ outliers are gathered by the ref")
ROOT = Path(__file__).resolve().parents[1]

# -- policies as JSON -------------------------------------------------------------------------

KEYS = formats.names() + ["int4[block_size=128]", "nf4[block_size=none]", "int5", "fp5_e2m2",
                          "mxfp4[scale_rule=ceil]", "nf4[opq=0.9]", "bof4[block_size=32]"]
fmt_keys = st.sampled_from(KEYS)
linear_specs = st.tuples(st.none() | fmt_keys, st.none() | fmt_keys,
                         st.sampled_from([None, "linear", "matmul"])).filter(
    lambda t: t[0] or t[1]).map(lambda t: LayerSpec(weight=t[0], act=t[1], op=t[2]))
embedding_specs = fmt_keys.map(lambda k: LayerSpec(weight=k, op="embedding"))
patterns = (st.text(min_size=1, max_size=12).filter(lambda s: not s.startswith("re:"))
            | st.sampled_from([r"re:.*self_attn\.[qkv]_proj", r"re:model\.layers\.[0-3]\..*",
                               "re:(a|b)+", "*.mlp.*", "lm_head", "h.[0-9].*"]))
policies = st.builds(
    Policy, st.lists(st.tuples(patterns, st.none() | linear_specs | embedding_specs), max_size=6),
    default=st.none() | linear_specs.filter(lambda s: s.op != "matmul"))


def rebuilt(source: str) -> Policy:
    scope = {}
    exec(source, scope)
    return scope["policy"]


@given(policies)
def test_policy_json_round_trip_property(p):
    text = p.to_json()
    back = Policy.from_json(text)
    assert back == p
    assert [(r.pattern, r.spec) for r in back.rules] == [(r.pattern, r.spec) for r in p.rules]
    assert back.default == p.default
    assert back.to_json() == text
    assert rebuilt(p.to_python()) == p


EXAMPLES = [
    Policy(),
    Policy({}, default=LayerSpec(weight="nf4")),
    Policy({"lm_head": None, "*.mlp.*": LayerSpec(weight="bof4s_opq"),
            r"re:.*self_attn\.[qkv]_proj": LayerSpec(weight="mxint8", act="mxint8"),
            "model.embed_tokens": LayerSpec(weight="int8", op="embedding"),
            "*attn*": LayerSpec(weight="mxfp8_e4m3", act="mxfp8_e4m3", op="matmul"),
            "act.only": LayerSpec(act="nvfp4", op="linear"),
            "q\"uote\\d 'ü' ✓": LayerSpec(weight="int4[block_size=128]")},
           default=LayerSpec(weight=formats.get("mxfp4", scale_rule="ceil"))),
    Policy([("b", LayerSpec(weight="int4")), ("a", LayerSpec(weight="int4")), ("b", None)]),
]


@pytest.mark.parametrize("p", EXAMPLES, ids=["empty", "default-only", "readme", "order"])
def test_policy_json_round_trip_examples(p):
    assert Policy.from_json(p.to_json()) == p
    assert Policy.from_json(p.to_json().encode()) == p
    assert rebuilt(p.to_python()) == p


def test_policy_json_document_says_what_the_policy_says():
    doc = json.loads(EXAMPLES[2].to_json())  # the JSON itself, not read back by from_json
    assert doc["format"] == "blockquant.policy" and doc["version"] == 1
    assert [r["pattern"] for r in doc["rules"]][:3] == ["lm_head", "*.mlp.*",
                                                        r"re:.*self_attn\.[qkv]_proj"]
    assert doc["rules"][0]["spec"] is None
    assert doc["rules"][2]["spec"] == {"weight": "mxint8", "act": "mxint8", "op": None}
    assert doc["rules"][3]["spec"]["op"] == "embedding"
    assert doc["default"] == {"weight": "mxfp4[scale_rule=ceil]", "act": None, "op": None}


GOOD = json.loads(EXAMPLES[2].to_json())


def edited(**changes):
    doc = copy.deepcopy(GOOD)
    for path, value in changes.items():
        *keys, last = path.split("__")
        obj = doc
        for k in keys:
            obj = obj[int(k)] if isinstance(obj, list) else obj[k]
        obj[last] = value
    return json.dumps(doc)


@pytest.mark.parametrize("text, match", [
    ("{", "policy JSON is malformed"),
    ("[]", "must be a JSON object"),
    (json.dumps({"format": "other", "version": 1}), "not a blockquant policy"),
    (edited(version=2, extra=1), "version 2 was written by a newer blockquant"),
    (edited(version="1"), "'version' must be a positive integer"),
    (edited(extra=1), r"unknown field\(s\) \['extra'\]"),
    (json.dumps({"format": "blockquant.policy", "version": 1, "rules": []}),
     r"missing field\(s\) \['default'\]"),
    (edited(rules={}), "'rules' must be a list"),
    (edited(rules__0__note="x"), r"rules\[0\]: unknown field\(s\) \['note'\]"),
    (edited(rules__1__spec__weight="nf5"),
     r"rules\[1\] \('\*\.mlp\.\*'\): LayerSpec weight format: unknown format 'nf5'; presets: "
     r".*qcompile\.formats\.names\(\) lists the presets"),
    (edited(rules__2__spec__act="int4[block_size=0]"), "act format: block_size must be"),
    (edited(rules__1__spec__weight=4), "must be a format key"),
    (edited(rules__1__spec__bits=4), r"unknown field\(s\) \['bits'\]"),
    (edited(rules__1__spec__op="conv"), "op must be None or one of"),
    (edited(rules__1__spec={"weight": None}), "quantises nothing"),
    (edited(rules__1__pattern=""), "non-empty string"),
    (edited(rules__1__pattern="re:(("), "malformed regular expression"),
    (edited(default={"weight": "nf4", "op": "embedding"}), "the default applies to linear"),
])
def test_policy_json_refusals(text, match):
    with pytest.raises(PolicyError, match=match):
        Policy.from_json(text)


def test_policy_json_refuses_a_format_without_a_key():
    from dataclasses import replace
    handmade = replace(formats.get("int4"), preset="")  # not rebuilt by formats.get
    with pytest.raises(PolicyError, match="has no key that qcompile.formats.get rebuilds"):
        Policy({}, default=LayerSpec(weight=handmade)).to_json()
    with pytest.raises(PolicyError, match="takes the JSON text"):
        Policy.from_json({"format": "blockquant.policy"})


# -- the packed layout the loader checks against, against quantize itself ----------------------

@pytest.mark.parametrize("key", formats.names() + ["int5", "int4[block_size=24]",
                                                   "nf4[block_size=none]", "quantile4[opq=true]"])
def test_packed_layout_is_what_quantize_makes(key):
    w = torch.randn(5, 80, generator=torch.Generator().manual_seed(0))
    w[0, :3] *= 30
    for axis in (0, 1):
        q = qcompile.quantize(w, key, axis=axis)
        layout = packed_layout(q.fmt, list(w.shape), axis, q.block)
        got = {f"side_{k}" if k not in ("codes", "scales") else k: t
               for k, t in q.tensors().items()}
        assert list(layout) == list(got)
        for leaf, (dtype, shape) in layout.items():
            assert got[leaf].dtype == dtype
            assert shape is None or list(got[leaf].shape) == shape


# -- tiny models --------------------------------------------------------------------------------

LLAMA = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, bos_token_id=0,
             eos_token_id=0, pad_token_id=0)
IDS = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(3))


def llama(tied=True, meta=False, seed=0, **kw):
    cfg = transformers.LlamaConfig(**{**LLAMA, "tie_word_embeddings": tied, **kw})
    torch.manual_seed(seed)
    if meta:
        with torch.device("meta"):
            return transformers.LlamaForCausalLM(cfg).eval()
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # outliers for OPQ, wide blocks for the scales
        model.model.layers[0].mlp.up_proj.weight[:4, :5] *= 30
        model.model.embed_tokens.weight[3, :6] *= 30
    return model


def gpt2(meta=False):
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            return transformers.GPT2LMHeadModel(cfg).eval()
    return transformers.GPT2LMHeadModel(cfg).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def packed_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}


def raw_bytes(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def sharing(model):
    """Which modules share one packed table, as sets of names."""
    groups = {}
    for n, m in packed_modules(model).items():
        groups.setdefault(id(m.codes), set()).add(n)
    return sorted(map(sorted, groups.values()))


def assert_same(original, loaded, want):
    """The loaded model holds the same packed bytes, formats, tensors and sharing, and computes
    the same output bit for bit."""
    a, b = packed_modules(original), packed_modules(loaded)
    assert list(a) == list(b) and a
    for name in a:
        qa, qb = a[name].qtensor(), b[name].qtensor()
        assert type(a[name]) is type(b[name]) and a[name].meta == b[name].meta
        assert list(qa.tensors()) == list(qb.tensors())
        for k in qa.tensors():
            ta, tb = qa.tensors()[k], qb.tensors()[k]
            assert ta.dtype == tb.dtype and ta.shape == tb.shape
            assert torch.equal(raw_bytes(ta), raw_bytes(tb)), (name, k)
        if isinstance(a[name], QuantLinear):
            assert (a[name].act, a[name].conv1d) == (b[name].act, b[name].conv1d)
    fa, fb = original.state_dict(), loaded.state_dict()
    assert list(fa) == list(fb)
    assert all(torch.equal(raw_bytes(fa[n]), raw_bytes(fb[n])) for n in fa)
    assert sharing(original) == sharing(loaded)
    assert qcompile.resident_weight_bytes(loaded) == qcompile.resident_weight_bytes(original)
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    got = logits(loaded)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def round_trip(model, policy, tmp_path, fresh):
    qcompile.quantize_model_(model, policy)
    want = logits(model)
    path = tmp_path / "model.safetensors"
    qcompile.save_quantized(model, path)
    loaded = qcompile.load_quantized(path, fresh)
    assert loaded is fresh
    assert_same(model, loaded, want)
    assert saved_policies(path) == [policy]
    return path, loaded


# every element and scale kind, shipped and data-dependent codebooks, OPQ outliers, a tensor
# scale, a block that does not divide the row and a whole-row block
FAMILIES = ["int4", "int8[block_size=32]", "int5", "fp4_e2m1", "mxint8", "mxfp4", "mxfp8_e4m3",
            "bfp8", "bl8", "nf4", "dynexp4", "quantile4", "bof4s_opq", "int4[opq=true]", "nvfp4",
            "int4[block_size=24]", "nf4[block_size=none]"]


@pytest.mark.parametrize("fmt", FAMILIES)
def test_round_trip_bit_for_bit_into_a_meta_model(fmt, tmp_path):
    policy = Policy({"model.embed_tokens": LayerSpec(weight=fmt, op="embedding")},
                    default=LayerSpec(weight=fmt))
    model = llama(tied=False)
    _, loaded = round_trip(model, policy, tmp_path, llama(tied=False, meta=True))
    if formats.get(fmt).opq is not None:  # outlier lists sized by the data, restored as saved
        index = loaded.model.layers[0].mlp.up_proj.side_outlier_index
        assert index.numel() == model.model.layers[0].mlp.up_proj.side_outlier_index.numel() > 0


def test_weight_and_activation_specs(tmp_path):
    policy = Policy({"*.mlp.*": LayerSpec(weight="nvfp4", act="mxint8"),
                     "lm_head": None, "*.v_proj": LayerSpec(act="mxfp4")},  # act-only: not swapped
                    default=LayerSpec(weight="mxint8", act="nf4"))
    _, loaded = round_trip(llama(tied=False), policy, tmp_path, llama(tied=False, meta=True))
    assert loaded.model.layers[1].mlp.up_proj.act == "mxint8"
    assert isinstance(loaded.lm_head, torch.nn.Linear)
    assert isinstance(loaded.model.layers[0].self_attn.v_proj, torch.nn.Linear)


def test_gpt2_conv1d(tmp_path):
    policy = Policy({"*.attn.c_attn": LayerSpec(weight="mxint8", act="mxint8"),
                     "transformer.wte": LayerSpec(weight="nf4", op="embedding"),
                     "lm_head": LayerSpec(weight="nf4")}, default=LayerSpec(weight="bof4s_opq"))
    _, loaded = round_trip(gpt2(), policy, tmp_path, gpt2(meta=True))
    c_fc = loaded.transformer.h[0].mlp.c_fc
    assert isinstance(c_fc, QuantLinear) and c_fc.conv1d and c_fc.bias is not None
    assert loaded.lm_head.codes is loaded.transformer.wte.codes  # GPT-2's tied pair


def test_tied_pair_sharing_one_table(tmp_path):
    policy = Policy({"model.embed_tokens": LayerSpec(weight="bof4s_opq", op="embedding")},
                    default=LayerSpec(weight="bof4s_opq"))
    path, loaded = round_trip(llama(), policy, tmp_path, llama(meta=True))
    emb, head = loaded.model.embed_tokens, loaded.lm_head
    assert emb.codes is head.codes and emb.scales is head.scales
    assert all(a is b for a, b in zip(emb.side(), head.side()))
    with safe_open(path, "pt") as f:  # saved once
        assert not any(k.startswith("lm_head.") for k in f.keys())
    again = tmp_path / "again.safetensors"  # a loaded model saves to the same file
    qcompile.save_quantized(loaded, again)
    (first, doc), (second, doc_again) = read(path), read(again)
    assert doc == doc_again and list(first) == list(second)
    assert all(torch.equal(raw_bytes(first[k]), raw_bytes(second[k])) for k in first)


def test_tied_pair_with_two_formats(tmp_path):
    policy = Policy({"model.embed_tokens": LayerSpec(weight="nf4", op="embedding"),
                     "lm_head": LayerSpec(weight="int8")}, default=LayerSpec(weight="mxfp4"))
    _, loaded = round_trip(llama(), policy, tmp_path, llama(meta=True))
    assert loaded.model.embed_tokens.fmt_key == "nf4" and loaded.lm_head.fmt_key == "int8"
    assert loaded.model.embed_tokens.codes is not loaded.lm_head.codes


HALF_TIED = {  # which of the tied pair is packed: (embedding rule, lm_head rule)
    "neither": (None, None), "lm_head": (None, LayerSpec(weight="nf4")),
    "embedding": (LayerSpec(weight="int8", op="embedding"), None)}


@pytest.mark.parametrize("packed", list(HALF_TIED))
def test_tied_pair_half_quantised_or_kept_tied_in_full_precision(packed, tmp_path):
    emb, head = HALF_TIED[packed]
    policy = Policy({"model.embed_tokens": emb, "lm_head": head,
                     "*.mlp.*": LayerSpec(weight="nf4")})
    _, loaded = round_trip(llama(), policy, tmp_path, llama(meta=True))
    table, lm_head = loaded.model.embed_tokens, loaded.lm_head
    assert isinstance(table, QuantEmbedding) == (packed == "embedding")
    assert isinstance(lm_head, QuantLinear) == (packed == "lm_head")
    if packed == "neither":  # still one parameter
        assert lm_head.weight is table.weight


def test_load_into_a_float_model_on_the_cpu(tmp_path):
    policy = Policy({}, default=LayerSpec(weight="nf4"))
    path, _ = round_trip(llama(), policy, tmp_path, llama(meta=True))
    model = llama()
    qcompile.quantize_model_(model, policy)
    fresh = llama(seed=7)  # other random weights: all of them replaced
    assert_same(model, qcompile.load_quantized(path, fresh), logits(model))


def test_round_trip_in_a_fresh_process(tmp_path):
    model = llama()
    policy = Policy({"*embed*": LayerSpec(weight="bof4s_opq", op="embedding")},
                    default=LayerSpec(weight="nvfp4", act="mxint8"))
    qcompile.quantize_model_(model, policy)
    qcompile.save_quantized(model, tmp_path / "m.safetensors")
    torch.save(IDS, tmp_path / "ids.pt")
    script = (
        "import json, sys, torch, transformers, qcompile\n"
        "cfg = transformers.LlamaConfig(**json.loads(sys.argv[1]))\n"
        "with torch.device('meta'):\n"
        "    model = transformers.LlamaForCausalLM(cfg).eval()\n"
        "qcompile.load_quantized(sys.argv[2] + '/m.safetensors', model)\n"
        "with torch.no_grad():\n"
        "    y = model(torch.load(sys.argv[2] + '/ids.pt')).logits\n"
        "torch.save(y, sys.argv[2] + '/y.pt')\n")
    done = subprocess.run([sys.executable, "-c", script, json.dumps({**LLAMA,
                           "tie_word_embeddings": True}), str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "y.pt"), logits(model))


def test_compiled_with_inductor_after_loading(tmp_path):
    policy = Policy({"model.embed_tokens": LayerSpec(weight="nf4", op="embedding")},
                    default=LayerSpec(weight="int4"))
    model = llama(num_hidden_layers=1)
    qcompile.quantize_model_(model, policy)
    eager = logits(model)
    qcompile.save_quantized(model, tmp_path / "m.safetensors")
    loaded = qcompile.load_quantized(tmp_path / "m.safetensors",
                                     llama(num_hidden_layers=1, meta=True))
    torch._dynamo.reset()
    with torch.no_grad():
        want = torch.compile(model, backend="inductor")(IDS).logits
        got = torch.compile(loaded, backend="inductor")(IDS).logits
    assert torch.equal(got, want)
    assert torch.allclose(got, eager, rtol=0, atol=1e-5 * float(eager.abs().max()))


# -- refusals -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tied Llama: bof4s_opq table shared with lm_head, int4 linears, nvfp4 MLP with act."""
    model = llama()
    qcompile.quantize_model_(model, Policy(
        {"model.embed_tokens": LayerSpec(weight="bof4s_opq", op="embedding"),
         "lm_head": LayerSpec(weight="bof4s_opq"), "*.mlp.*": LayerSpec(weight="nvfp4",
                                                                        act="mxint8")},
        default=LayerSpec(weight="int4")))
    path = tmp_path_factory.mktemp("saved") / "model.safetensors"
    qcompile.save_quantized(model, path)
    return path


def read(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["blockquant"])


def rewrite(src, dst, edit):
    """Copy ``src`` to ``dst`` after ``edit(tensors, doc)`` changed tensors and metadata."""
    tensors, doc = read(src)
    edit(tensors, doc)
    safetensors_torch.save_file(tensors, dst, metadata={"blockquant": json.dumps(doc)})
    return dst


def set_fmt(key):
    def edit(tensors, doc):
        doc["packed"]["model.layers.0.self_attn.q_proj"]["fmt"] = key
    return edit


def drop(name):
    return lambda tensors, doc: tensors.pop(name)


def reshape_scales(tensors, doc):  # a wrong shape, the metadata's list updated to match
    name = "model.layers.0.self_attn.q_proj.scales"
    tensors[name] = tensors[name][:-1].clone()
    doc["tensors"][name][1] = list(tensors[name].shape)


def retype_scales(tensors, doc):
    name = "model.layers.0.self_attn.q_proj.scales"
    tensors[name] = tensors[name].to(torch.float16)
    doc["tensors"][name][0] = "float16"


def fewer_outliers(tensors, doc):
    name = "model.embed_tokens.side_outlier_value"
    tensors[name] = tensors[name][:-1].clone()
    doc["tensors"][name][1] = list(tensors[name].shape)


def shuffle_outliers(tensors, doc):
    name = "model.embed_tokens.side_outlier_index"
    tensors[name] = tensors[name].flip(0).contiguous()


def flip_a_code(tensors, doc):
    tensors["model.layers.1.mlp.up_proj.codes"][0, 0] ^= 1


def field(path, value):
    def edit(tensors, doc):
        *keys, last = path
        obj = doc
        for k in keys:
            obj = obj[k]
        if value is KeyError:
            del obj[last]
        else:
            obj[last] = value
    return edit


Q = "model.layers.0.self_attn.q_proj"
REFUSALS = {
    "newer version": (field(["version"], 3), "newer blockquant .*version 3.*upgrade"),
    "unknown field": (field(["extra"], 1), r"unknown field\(s\) \['extra'\]"),
    "missing field": (field(["aliases"], KeyError), r"missing field\(s\) \['aliases'\]"),
    "other format, other layout": (set_fmt("int8"), rf"tensor {Q}\.codes: format 'int8' of a "
                                                    r"\[64, 64\] weight needs uint8 \[64, 64\]"),
    "other format, same layout": (set_fmt("fp4_e2m1"), f"packed weight '{Q}': its bytes do not "
                                                       "match .*format 'fp4_e2m1'.*digest"),
    "other block": (set_fmt("int4[block_size=32]"), "block 64 does not match format"),
    "other side data": (set_fmt("int4[opq=true]"), r"format 'int4\[opq=0.95\]' has side data "
                                                   r"\['outlier_index', 'outlier_value'\]"),
    "unknown format": (set_fmt("int9x"), "format key 'int9x'.*presets"),
    "damaged bytes": (flip_a_code, "'model.layers.1.mlp.up_proj': its bytes do not match"),
    "missing tensor": (drop("model.norm.weight"), r"\['model.norm.weight'\] listed in the "
                                                  "metadata are missing from the file"),
    "missing packed tensor": (drop(f"{Q}.scales"), rf"\['{Q}.scales'\] listed in the metadata"),
    "extra tensor": (lambda t, d: t.update(stray=torch.zeros(2)),
                     r"holds tensor\(s\) \['stray'\] that its metadata does not list"),
    "wrong shape": (reshape_scales, rf"tensor {Q}\.scales: format 'int4' of a \[64, 64\] weight "
                                    r"needs float32 \[64, 1\], the file holds float32 \[63, 1\]"),
    "wrong dtype": (retype_scales, rf"tensor {Q}\.scales: .*needs float32 \[64, 1\], the file "
                                   r"holds float16"),
    "shape unlike the metadata": (
        lambda t, d: t.update({"model.norm.weight": torch.zeros(3)}),
        r"tensor 'model.norm.weight': the file holds float32 \[3\], the metadata says float32 "
        r"\[64\]"),
    "outlier counts": (fewer_outliers, "outlier values for .* outlier positions"),
    "outlier order": (shuffle_outliers, "positions must ascend"),
    "module kind": (field(["modules", Q, "kind"], "embedding"),
                    rf"modules\['{Q}'\]: unknown field\(s\) \['act', 'bias'\]"),
    "module name": (lambda t, d: d["modules"].update({"model.layers.7.mlp": d["modules"][Q]}),
                    "module 'model.layers.7.mlp' of the file is not in the model"),
    "policy": (field(["policies", 0, "rules", 0, "spec", "weight"], "nf5"),
               r"policies\[0\]: policy JSON rules\[0\].*unknown format 'nf5'"),
    "not ours": (field(["format"], "someone.else"), "not a blockquant quantised model"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_damaged_or_mismatched_files_are_refused(case, saved, tmp_path):
    edit, match = REFUSALS[case]
    path = rewrite(saved, tmp_path / "edited.safetensors", edit)
    fresh = llama(meta=True)
    kinds = [type(m) for m in fresh.modules()]
    with pytest.raises(QuantizedFileError, match=match):
        qcompile.load_quantized(path, fresh)
    assert [type(m) for m in fresh.modules()] == kinds  # refused before anything was changed


def test_the_unedited_file_loads(saved, tmp_path):  # the refusals above are the edits' doing
    path = rewrite(saved, tmp_path / "copy.safetensors", lambda t, d: None)
    loaded = qcompile.load_quantized(path, llama(meta=True))
    assert isinstance(loaded.lm_head, QuantLinear)


def test_files_blockquant_did_not_write(tmp_path):
    plain = tmp_path / "plain.safetensors"
    safetensors_torch.save_file({"w": torch.zeros(3)}, plain)
    with pytest.raises(QuantizedFileError, match="a safetensors file that blockquant did not "
                                                 "write: its metadata has no 'blockquant' entry"):
        qcompile.load_quantized(plain, llama(meta=True))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(QuantizedFileError, match="the file is truncated or damaged"):
        qcompile.load_quantized(junk, llama(meta=True))
    with pytest.raises(FileNotFoundError, match="no file"):
        qcompile.load_quantized(tmp_path / "absent.safetensors", llama(meta=True))


@pytest.mark.parametrize("kw, match", [
    (dict(num_hidden_layers=1), "'model.layers.1.self_attn.q_proj' of the file is not in the "
                                "model"),
    (dict(intermediate_size=96), r"'model.layers.0.mlp.gate_proj': the file's weight has shape "
                                 r"\[128, 64\], the model's \[96, 64\]"),
    (dict(num_hidden_layers=3), "the model's parameter 'model.layers.2.input_layernorm.weight' "
                                "is not in the file"),
])
def test_models_of_another_architecture_are_refused(kw, match, saved):
    with pytest.raises(QuantizedFileError, match=match):
        qcompile.load_quantized(saved, llama(meta=True, **kw))


def test_other_model_mismatches_are_refused(saved):
    fresh = llama(meta=True)
    fresh.model.norm.register_buffer("extra", torch.zeros(2, device="meta"))
    with pytest.raises(QuantizedFileError, match="the model's buffer 'model.norm.extra' is not "
                                                 "in the file"):
        qcompile.load_quantized(saved, fresh)
    loaded = qcompile.load_quantized(saved, llama(meta=True))
    with pytest.raises(QuantizedFileError, match="is quantised already"):
        qcompile.load_quantized(saved, loaded)


def test_saving_needs_a_quantised_model(tmp_path):
    with pytest.raises(QuantizedFileError, match="call qcompile.quantize_model_"):
        qcompile.save_quantized(llama(), tmp_path / "m.safetensors")
    with pytest.raises(QuantizedFileError, match="on the meta device"):
        meta = llama(meta=True)
        meta.lm_head = QuantLinear(qcompile.quantize(torch.zeros(128, 64), "nf4", axis=1), None,
                                   None, False)
        qcompile.save_quantized(meta, tmp_path / "m.safetensors")


# -- docs/saving.md's example runs as written ------------------------------------------------------

def test_the_saving_docs_example_runs_as_written():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "saving.md").read_text(), re.S)
    assert blocks and "qcompile.load_quantized(" in blocks[0]
    done = subprocess.run([sys.executable, "-c", blocks[0]], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "same output: True" in done.stdout
