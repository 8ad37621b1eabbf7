"""A saved quantised model changed after saving is refused, never loaded (docs/saving.md, "What is
checked"): a corruption fuzz that changes every tensor of a ``save_quantized`` file in turn (one
element, or swapped with another tensor of its shape) and every field of its metadata document
(every leaf, list entry and object entry), writing the file back with the stored digests left
as they were, as a careless editor would; the same, on fewer cases, for a ``save_pretrained``
folder (sharded) and for ``python -m qcompile quantize``'s output. The unchanged files load bit
for bit. Also: version-1 files, truncated files, and what BlockQuantConfig accepts."""
import copy
import json
import logging
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import qcompile
from qcompile import LayerSpec, Policy, config, formats
from qcompile.integrations.stream import quantize_checkpoint
from qcompile.serialize import QuantizedFileError, saved_policies
from qcompile.swap import QuantLinear

from hf_models import LLAMA, MIXED, logits, save_llama, with_config

logging.getLogger("transformers").setLevel(logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore:.*tables with OPQ outliers are gathered by the ref")

# mixed formats, activation formats, OPQ side data, an embedding packed while its tied lm_head
# stays in full precision (float32), biases on the attention projections
POLICY = Policy({"model.embed_tokens": LayerSpec(weight="nf4", op="embedding"), "lm_head": None,
                 "*.mlp.down_proj": LayerSpec(weight="bof4s_opq"),
                 "re:.*self_attn\\.[qk]_proj": LayerSpec(weight="mxint8", act="mxint8")},
                default=LayerSpec(weight="int4"))
CFG = dict(LLAMA, tie_word_embeddings=True, attention_bias=True)


def llama(meta=False):
    cfg = transformers.LlamaConfig(**CFG)
    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            return transformers.LlamaForCausalLM(cfg).eval()
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # outliers for OPQ; biases and norms that differ from each other
        model.model.layers[0].mlp.down_proj.weight[:4, :5] *= 30
        for name, p in model.named_parameters():
            if name.endswith(("bias", "norm.weight", "layernorm.weight")):
                p.copy_(torch.randn(p.shape) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def read(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def write(path, tensors, meta):
    save_file(tensors, str(path), metadata=meta)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = llama()
    qcompile.quantize_model_(model, POLICY)
    path = tmp_path_factory.mktemp("integrity") / "model.safetensors"
    qcompile.save_quantized(model, path)
    return path, logits(model)


def test_the_unchanged_file_loads_bit_for_bit(saved, tmp_path):
    path, want = saved
    tensors, meta = read(path)
    write(tmp_path / "copy.safetensors", tensors, meta)  # written back as the fuzz does
    doc = json.loads(meta["blockquant"])  # version 2: a digest of every tensor
    assert doc["version"] == 2 and set(doc["digests"]["tensors"]) == set(tensors)
    loaded = qcompile.load_quantized(tmp_path / "copy.safetensors", llama(meta=True))
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, QuantLinear)
    assert loaded.model.layers[0].self_attn.q_proj.act == "mxint8"
    assert loaded.lm_head.weight.dtype == torch.float32  # the full-precision lm_head
    assert torch.equal(logits(loaded).view(torch.int32), want.view(torch.int32))
    assert saved_policies(tmp_path / "copy.safetensors") == [POLICY]


# -- the fuzz ---------------------------------------------------------------------------------

def element_changed(t: torch.Tensor) -> torch.Tensor:
    """``t`` with the lowest bit of one byte of its middle element flipped."""
    out = t.clone()
    raw = out.reshape(-1).view(torch.uint8)
    raw[(t.numel() // 2) * t.element_size()] ^= 1
    return out


def tensor_edits(tensors: dict):
    """(what, edit(tensors)) for every tensor changed in one element, and every tensor swapped
    with the next one of its dtype and shape that holds other bytes."""
    for name, t in tensors.items():
        assert t.numel(), name  # every tensor has an element to change
        yield f"changed {name}", lambda ts, n=name: ts.update({n: element_changed(ts[n])})
    names = list(tensors)
    for i, a in enumerate(names):
        b = next((b for b in names[i + 1:] if tensors[b].dtype == tensors[a].dtype
                  and tensors[b].shape == tensors[a].shape
                  and not torch.equal(tensors[b], tensors[a])), None)
        if b is not None:
            yield f"swapped {a} and {b}", lambda ts, a=a, b=b: ts.update({a: ts[b], b: ts[a]})


def leaves(obj, path=()):
    """(path, value) of every leaf of a JSON document."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from leaves(v, (*path, i))
    else:
        yield path, obj


def is_format_key(value) -> bool:
    try:
        formats.get(value)
        return True
    except (ValueError, TypeError):
        return False


def same_shaped_owner(doc, owner):
    """Another packed weight of the same shape and axis (the loader's checks of shape pass)."""
    entry = doc["packed"][owner]
    others = [o for o, e in doc["packed"].items() if o != owner and
              (e["shape"], e["axis"]) == (entry["shape"], entry["axis"])]
    return others[0] if others else next(o for o in doc["packed"] if o != owner)


def other_values(doc, path, value) -> list:
    """Other valid-looking values of the same type for the leaf at ``path``."""
    key = path[-1]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1]
    if isinstance(value, float):
        return [value * 2 + 1]
    if value is None:
        return {"padding_idx": [0], "op": ["linear"]}.get(key, ["int2"])
    if path[:2] == ("digests", "tensors") or path[0] == "digests":  # hex
        return [value[:-1] + ("0" if value[-1] != "0" else "1")]
    if path[0] == "modules" and key == "packed":
        return [same_shaped_owner(doc, value)]
    if key == "impl":
        return [k for k in config.KERNELS if k != value][:1]
    if key == "op":
        return ["embedding" if value != "embedding" else "linear"]
    if is_format_key(value):  # a format: another one, and for an act format none at all
        return ["int2" if value != "int2" else "nf4"] + ([None] if key == "act" else [])
    return [value + "x"]


def at(doc, path):
    for k in path[:-1]:
        doc = doc[k]
    return doc


def metadata_edits(doc: dict):
    """(what, edited document) for every leaf changed, every list entry and every object entry
    removed, every object entry renamed, a few levels deep."""
    for path, value in leaves(doc):
        for new in other_values(doc, path, value):
            edited = copy.deepcopy(doc)
            at(edited, path)[path[-1]] = new
            yield f"{list(path)}: {value!r} -> {new!r}", edited
    for path, obj in [((), doc), *containers_of(doc)]:
        keys = list(obj) if isinstance(obj, dict) else list(range(len(obj)))
        for k in keys[:1] if path else keys:  # every field, the first entry of each container
            edited = copy.deepcopy(doc)
            del at(edited, (*path, k))[k]
            yield f"removed {[*path, k]}", edited
            if isinstance(obj, dict):  # the entry under another name
                edited = copy.deepcopy(doc)
                container = at(edited, (*path, k))
                container[f"{k}x"] = container.pop(k)
                yield f"renamed {[*path, k]}", edited


def containers_of(obj, path=()):
    """(path, object or list) of the document's non-empty containers, up to three levels down."""
    if isinstance(obj, (dict, list)) and obj and len(path) <= 3:
        if path:
            yield path, obj
        for k, v in (obj.items() if isinstance(obj, dict) else enumerate(obj)):
            yield from containers_of(v, (*path, k))


def refused(load, cases, rebuild):
    """The cases ``load`` did not refuse with a QuantizedFileError (or refused otherwise)."""
    missed = []
    for what, write_case in cases:
        write_case()
        try:
            load()
        except QuantizedFileError:
            continue
        except Exception as e:  # a crash is not a refusal naming the problem
            missed.append(f"{what}: {type(e).__name__}: {e}")
            continue
        missed.append(f"{what}: loaded")
        rebuild()
    return missed


@pytest.fixture
def fuzz(saved, tmp_path):
    """(tensors, document, the path edited files go to, load, rebuild) for the save_quantized
    fuzz: one meta model for all cases, as a refused load leaves it unchanged (checked)."""
    path, _ = saved
    tensors, meta = read(path)
    doc = json.loads(meta["blockquant"])
    model = [llama(meta=True)]
    kinds = [type(m) for m in model[0].modules()]

    def load():
        qcompile.load_quantized(tmp_path / "edited.safetensors", model[0])
        assert [type(m) for m in model[0].modules()] == kinds

    def rebuild():
        model[0] = llama(meta=True)
    return tensors, doc, tmp_path / "edited.safetensors", load, rebuild


def tensor_cases(cases, tensors, edited, meta):
    """(what, write_case) pairs: each writes the file with one tensor edit applied."""
    def writer(edit):
        def write_case():
            ts = dict(tensors)
            edit(ts)
            write(edited, ts, meta)
        return write_case
    return [(what, writer(edit)) for what, edit in cases]


def test_fuzz_every_tensor_changed_or_swapped_is_refused(fuzz):
    tensors, doc, edited, load, rebuild = fuzz
    meta = {"blockquant": json.dumps(doc), "format": "pt"}
    cases = list(tensor_edits(tensors))
    assert len(cases) > len(tensors) + 10  # swaps of biases, norms, packed parts too
    assert {"model.norm.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.bias",
            "model.layers.0.mlp.down_proj.side_outlier_index"} <= set(tensors)

    assert refused(load, tensor_cases(cases, tensors, edited, meta), rebuild) == []


def metadata_cases(cases, tensors, edited, policy_missed: list):
    """(what, write_case) pairs: each writes the file with one edited document; a document
    that ``saved_policies`` (the documented way to get the policy) reads without refusing it
    is recorded in ``policy_missed``."""
    def writer(what, new_doc):
        def write_case():
            write(edited, tensors, {"blockquant": json.dumps(new_doc), "format": "pt"})
            try:
                saved_policies(edited)
                policy_missed.append(what)
            except QuantizedFileError:
                pass
        return write_case
    return [(what, writer(what, d)) for what, d in cases]


def test_fuzz_every_metadata_field_changed_is_refused(fuzz):
    tensors, doc, edited, load, rebuild = fuzz
    cases = list(metadata_edits(doc))
    assert len(cases) > 500
    policy_missed = []
    written = metadata_cases(cases, tensors, edited, policy_missed)
    assert refused(load, written, rebuild) == []
    assert policy_missed == []


NAMED = {  # the edits, and the entry the error names
    "act mxint8 -> null": (("modules", "model.layers.0.self_attn.q_proj", "act"), None,
                           r"modules\['model\.layers\.0\.self_attn\.q_proj'\] differs"),
    "act null -> int2": (("modules", "model.layers.0.mlp.up_proj", "act"), "int2",
                         r"modules\['model\.layers\.0\.mlp\.up_proj'\] differs"),
    "packed -> another layer's": (("modules", "model.layers.0.self_attn.q_proj", "packed"),
                                  "model.layers.1.self_attn.q_proj", r"modules\['model\.layers"
                                                                     r"\.0\.self_attn\.q_proj'\]"),
    "policy -> int2": (("policies", 0, "default", "weight"), "int2", r"policies\[0\] differs"),
}


@pytest.mark.parametrize("case", list(NAMED))
def test_a_changed_metadata_entry_is_named(case, fuzz):
    tensors, doc, edited, load, _ = fuzz
    path, value, match = NAMED[case]
    doc = copy.deepcopy(doc)
    at(doc, path)[path[-1]] = value
    write(edited, tensors, {"blockquant": json.dumps(doc), "format": "pt"})
    for read_it in (load, lambda: saved_policies(edited)):
        with pytest.raises(QuantizedFileError, match="the metadata was changed after saving: "
                                                     + match):
            read_it()


def test_a_changed_full_precision_tensor_is_named(fuzz):
    tensors, doc, edited, load, _ = fuzz
    write(edited, {**tensors, "model.norm.weight": element_changed(tensors["model.norm.weight"])},
          {"blockquant": json.dumps(doc), "format": "pt"})
    with pytest.raises(QuantizedFileError, match="tensor 'model.norm.weight' does not match its "
                                                 "digest: the file was changed after saving"):
        load()


# -- versions and damaged files ---------------------------------------------------------------

def test_a_version_1_file_loads_with_a_warning(saved, tmp_path, monkeypatch):
    path, want = saved
    tensors, meta = read(path)
    doc = json.loads(meta["blockquant"])
    del doc["digests"]
    doc["version"] = 1
    old = tmp_path / "v1.safetensors"
    write(old, tensors, {"blockquant": json.dumps(doc), "format": "pt"})
    monkeypatch.setattr(config, "_said", set())
    with pytest.warns(UserWarning, match="version-1 blockquant file: it carries no digests.*"
                                         "save it again with qcompile.save_quantized"):
        loaded = qcompile.load_quantized(old, llama(meta=True))
    assert torch.equal(logits(loaded), want)
    resaved = tmp_path / "v2.safetensors"  # the way to add the digests
    qcompile.save_quantized(loaded, resaved)
    assert json.loads(read(resaved)[1]["blockquant"])["version"] == 2


def test_a_truncated_file_is_called_truncated(saved, tmp_path):
    path, _ = saved
    data = path.read_bytes()
    for size in (len(data) - 100, 12, 4):
        cut = tmp_path / f"cut{size}.safetensors"
        cut.write_bytes(data[:size])
        with pytest.raises(QuantizedFileError, match="the file is truncated or damaged"):
            qcompile.load_quantized(cut, llama(meta=True))


# -- save_pretrained folders and the quantize command's output ---------------------------------

def shard_cases(shard: Path, names=None, fields=None):
    """(what, write_case) for tensors (``names``, default all) and metadata leaves (``fields``,
    paths; default none) of one shard, each written over the shard in turn."""
    tensors, meta = read(shard)
    doc = json.loads(meta["blockquant"])
    for what, edit in tensor_edits(tensors):
        if names is None or any(what.startswith(f"changed {n}") for n in names):
            def write_case(edit=edit):
                ts = dict(tensors)
                edit(ts)
                write(shard, ts, meta)
            yield what, write_case
    for path in fields or ():
        for new in other_values(doc, path, at(doc, path)[path[-1]]):
            edited = copy.deepcopy(doc)
            at(edited, path)[path[-1]] = new
            yield (f"{list(path)} -> {new!r}",
                   lambda e=edited: write(shard, tensors, {**meta, "blockquant": json.dumps(e)}))


HF_FIELDS = [("modules", "model.layers.0.self_attn.q_proj", "act"),
             ("modules", "model.layers.1.mlp.up_proj", "packed"),
             ("policies", 0, "default", "weight"), ("packed", "model.embed_tokens", "block"),
             ("version",)]


def fuzz_folder(folder: Path, shard: Path, names=None, fields=None):
    original = shard.read_bytes()
    want = logits(AutoModelForCausalLM.from_pretrained(folder))

    def load():
        AutoModelForCausalLM.from_pretrained(folder)

    cases = list(shard_cases(shard, names, fields))
    missed = []
    for what, write_case in cases:
        missed += refused(load, [(what, write_case)], lambda: None)
        shard.write_bytes(original)
    assert missed == []
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(folder)), want)
    return len(cases)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tied Llama quantised while loading with MIXED (the packed table shared with lm_head),
    saved in shards."""
    tmp = tmp_path_factory.mktemp("pretrained")
    model = with_config(save_llama(tmp / "float"), MIXED)
    model.save_pretrained(tmp / "q", max_shard_size="20KB")
    return tmp / "q", logits(model)


def test_save_pretrained_unchanged_loads_bit_for_bit(pretrained):
    folder, want = pretrained
    shards = list(folder.glob("*.safetensors"))
    assert len(shards) > 2
    got = AutoModelForCausalLM.from_pretrained(folder)
    docs = [json.loads(read(shard)[1]["blockquant"]) for shard in shards]
    assert all(doc == docs[0] for doc in docs)  # each shard holds the document
    written = {name for shard in shards for name in read(shard)[0]}
    assert written <= set(docs[0]["digests"]["tensors"])  # and a digest of every tensor
    assert torch.equal(logits(got).view(torch.int32), want.view(torch.int32))


def test_save_pretrained_fuzz_of_one_shard_is_refused(pretrained):
    folder, _ = pretrained
    shard = sorted(folder.glob("*.safetensors"))[-1]  # not the first: every shard is checked
    assert fuzz_folder(folder, shard, fields=HF_FIELDS) > 8


def test_save_pretrained_a_changed_full_precision_tensor(pretrained):
    folder, _ = pretrained
    shard = next(s for s in folder.glob("*.safetensors") if "model.norm.weight" in read(s)[0])
    original = shard.read_bytes()
    tensors, meta = read(shard)
    tensors["model.norm.weight"] = element_changed(tensors["model.norm.weight"])
    write(shard, tensors, meta)
    try:
        with pytest.raises(QuantizedFileError, match="tensor 'model.norm.weight' does not match "
                                                     "its digest"):
            AutoModelForCausalLM.from_pretrained(folder)
    finally:
        shard.write_bytes(original)


def test_save_pretrained_version_1_loads_with_a_warning(tmp_path, monkeypatch):
    model = with_config(save_llama(tmp_path / "float"), MIXED)
    model.save_pretrained(tmp_path / "q", max_shard_size="20KB")
    for shard in (tmp_path / "q").glob("*.safetensors"):
        tensors, meta = read(shard)
        doc = json.loads(meta["blockquant"])
        del doc["digests"]
        write(shard, tensors, {**meta, "blockquant": json.dumps({**doc, "version": 1})})
    monkeypatch.setattr(config, "_said", set())
    with pytest.warns(UserWarning, match="version-1 blockquant file: it carries no digests.*"
                                         "from_pretrained and save_pretrained it again"):
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.equal(logits(got), logits(model))


def test_quantize_command_output_fuzz_is_refused(tmp_path):
    folder = save_llama(tmp_path / "float", tie=False, max_shard_size="40KB")
    quantize_checkpoint(folder, tmp_path / "q", MIXED, progress=False)
    names = ["model.norm.weight", "lm_head.codes", "model.layers.0.self_attn.q_proj.scales",
             "model.layers.1.mlp.down_proj.side_outlier_value", "model.embed_tokens.codes",
             "model.layers.1.input_layernorm.weight"]
    assert fuzz_folder(tmp_path / "q", tmp_path / "q" / "model.safetensors", names,
                       HF_FIELDS) > 10


# -- BlockQuantConfig takes a Policy or its JSON ----------------------------------------------

HOW = r"pass a qcompile.Policy \(or its JSON, policy.to_json\(\)\), e.g. BlockQuantConfig\("


NOT_A_POLICY = [dict(policy={"*.mlp.*": "nf4"}), dict(policy="nf4"), dict(weight="nf4"),
                dict(policy=4), dict(policy='{"rules": []}')]


def test_block_quant_config_takes_a_policy_or_its_json_and_says_so():
    for given in (MIXED, MIXED.to_json(), json.loads(MIXED.to_json())):
        assert qcompile.BlockQuantConfig(policy=given).policy == MIXED
    for kwargs in NOT_A_POLICY:
        with pytest.raises(ValueError, match=HOW):
            qcompile.BlockQuantConfig(**kwargs)
