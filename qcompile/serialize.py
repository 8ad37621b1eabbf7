"""Quantised models as files: ``save_quantized(model, path)`` writes a model that
``quantize_model_`` quantised to one safetensors file; ``load_quantized(path, model)`` puts it
back into a freshly built float model of the same architecture, which may live on the meta
device (no float copy of the quantised layers is ever made).

The file holds every parameter and buffer of the model once (non-persistent buffers too, so a
meta-device model is complete after loading) and, as safetensors string metadata under the key
"blockquant", a JSON document (docs/saving.md):

    {"format": "blockquant.quantized_model", "version": 2,
     "policies": [the policy JSON of each quantize_model_ call, in order],
     "packed":   {owner: {"fmt", "shape", "dtype", "axis", "block", "side", "digest"}
                         (+ "ragged" for an expert stack [E, a, b])},
     "modules":  {name: {"kind": "linear" | "conv1d" | "embedding" | "experts", "packed": owner,
                         "impl", "act", "bias" (linear, conv1d) | "padding_idx" (embedding)}},
     "parameters": {name: requires_grad}, "buffers": [name, ...],
     "aliases":  {name: the name it shares a tensor with},
     "tensors":  {name: [dtype, shape]},
     "digests":  {"tensors": {name: digest of its dtype, shape and bytes},
                  "entries": {"modules['x']", "policies[0]", ...: digest of that entry},
                  "document": digest of the whole document but this one field}}

A packed QTensor is stored as "<owner>.codes", "<owner>.scales" and "<owner>.side_<name>", the
owner being the first module holding it; modules sharing it (a tied embedding / lm_head given
one format) name the same owner and share it again after loading. Each tensor is checked against
the metadata and the layout its format implies before it is used, and "digest" (a hash of the
format description and the packed bytes) makes sure bytes are never read as another format, even
one with the same layout. A packed mixture-of-experts tensor (qcompile.expert_stack) is the
entry of kind "experts" named after its 3-d parameter: each expert's parts stacked along a
leading E axis, or, for side data of varying length ("ragged"), concatenated with
"<owner>.offsets_<k>"; each part is checked against the layout of one expert's matrix. "digests"
(version 2) covers every tensor of the file, full-precision ones too, and every field of the
document: a byte changed after saving is refused, naming the tensor or the metadata entry. A
digest stored in the file catches damage and careless edits, not someone who rewrites the
digests too (docs/saving.md).
"""
from __future__ import annotations

import hashlib
import json
import math
import os

import torch

from . import config, formats, tensor_parallel
from .formats.packing import packed_length
from .expert_stack import PackedExperts
from .expert_stack import install as install_experts
from .formats.qtensor import QTensor
from .linear_rule import conv1d_class
from .policy import Policy, PolicyError
from .swap import POLICIES_ATTR, QuantEmbedding, QuantLinear, _set_child

FILE_FORMAT = "blockquant.quantized_model"
VERSION = 2  # 2: "digests" over every tensor and the whole document; 1 had none
METADATA_KEY = "blockquant"
DOC_FIELDS_V1 = ("format", "version", "policies", "packed", "modules", "parameters", "buffers",
                 "aliases", "tensors")
DOC_FIELDS = (*DOC_FIELDS_V1, "digests")
DIGEST_FIELDS = ("tensors", "entries", "document")
PACKED_FIELDS = ("fmt", "shape", "dtype", "axis", "block", "side", "digest")
# an expert stack [E, a, b] (qcompile.expert_stack): "ragged" names its side data concatenated
# over the experts with offsets (a different length per expert)
STACK_FIELDS = (*PACKED_FIELDS, "ragged")
MODULE_FIELDS = {"linear": ("kind", "packed", "impl", "act", "bias"),
                 "conv1d": ("kind", "packed", "impl", "act", "bias"),
                 "embedding": ("kind", "packed", "impl", "padding_idx"),
                 "experts": ("kind", "packed", "impl")}
AXIS_OF_KIND = {"linear": 1, "conv1d": 0, "embedding": 1}
WEIGHT_DTYPES = ("float32", "float16", "bfloat16")
RESAVE = "load it and save it again with qcompile.save_quantized"


class QuantizedFileError(ValueError):
    """A file ``load_quantized`` refuses, or a model ``save_quantized`` cannot write."""


# -- saving -----------------------------------------------------------------------------------

def save_quantized(model: torch.nn.Module, path) -> None:
    """Write ``model`` (after ``qcompile.quantize_model_``) to ``path``: one safetensors file
    holding every tensor once and the metadata ``load_quantized`` needs."""
    from safetensors.torch import save_file
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    tensors, packed, modules = packed_state(model)
    if not modules:
        raise QuantizedFileError(
            "save_quantized: the model has no quantised layer (QuantLinear / QuantEmbedding / "
            "packed experts); "
            "call qcompile.quantize_model_(model, policy) first (a model compiled by the "
            "backend keeps its packed weights in the compiled code, not in its modules)")
    parameters, buffers, aliases, seen, storages = {}, [], {}, {}, set()
    for name, mod, leaf, t, role in _state(model):
        if t.is_meta:
            raise QuantizedFileError(f"save_quantized: {name} is on the meta device: there is "
                                     "nothing to save")
        if role == "parameter":
            parameters[name] = t.requires_grad
        else:
            buffers.append(name)
        # one tensor under several names (tied weights) of one role is saved once
        view = (role, t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype,
                tuple(t.shape), t.stride()) if t.numel() else None
        canonical = seen.get((role, id(t))) or seen.get(view)
        if canonical is not None:
            aliases[name] = canonical
            continue
        seen[(role, id(t))] = name
        if view is not None:
            seen[view] = name
        data = t.detach().cpu().contiguous()
        if view is not None:
            storage = (t.device, view[2])
            if storage in storages:  # part of a saved tensor's storage: saved as its own copy
                data = data.clone()
            storages.add(storage)
        tensors[name] = data
    doc = {"format": FILE_FORMAT, "version": VERSION,
           "policies": [json.loads(p.to_json()) for p in getattr(model, POLICIES_ATTR, ())],
           "packed": packed, "modules": modules, "parameters": parameters, "buffers": buffers,
           "aliases": aliases,
           "tensors": {n: [_dtype_name(t.dtype), list(t.shape)] for n, t in tensors.items()}}
    sealed = seal(doc, tensors)
    save_file(tensors, os.fspath(path), metadata={METADATA_KEY: json.dumps(sealed), "format": "pt"})


def packed_state(model: torch.nn.Module):
    """``(tensors, packed, modules)`` of the quantised layers: each packed QTensor's parts once
    (CPU, under its owner's name) and the "packed" and "modules" entries of the metadata."""
    tensor_parallel.refuse_sharded(model, "saving")
    tensors, packed, modules, owners = {}, {}, {}, {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if not isinstance(mod, (QuantLinear, QuantEmbedding)):
            continue
        q = mod.qtensor()
        key = (mod.meta, *(id(t) for t in q.tensors().values()))
        if key not in owners:
            owners[key] = name
            _check_key(q.fmt)
            parts = {leaf: t.detach().cpu().contiguous() for leaf, t in _packed_parts(q)}
            tensors.update({f"{name}.{leaf}": t for leaf, t in parts.items()})
            desc = _describe(q)
            packed[name] = {**desc, "digest": _digest(desc, parts.values())}
        modules[name] = _module_entry(mod, owners[key])
    for name, mod in model.named_modules():
        if isinstance(mod, PackedExperts):  # an expert stack: its own owner, never shared
            _check_key(mod.fmt)
            desc = {"fmt": mod.fmt_key, "shape": list(mod.shape), "dtype": _dtype_name(mod.dtype),
                    "axis": mod.axis, "block": mod.block, "side": list(mod.side_names),
                    "ragged": list(mod.ragged)}
            parts = {leaf: getattr(mod, leaf).detach().cpu().contiguous()
                     for leaf in stack_leaves(desc)}
            tensors.update({f"{name}.{leaf}": t for leaf, t in parts.items()})
            packed[name] = {**desc, "digest": _digest(desc, parts.values())}
            modules[name] = {"kind": "experts", "packed": name, "impl": mod.impl}
    return tensors, packed, modules


def stack_leaves(entry: dict) -> list[str]:
    """The buffers of an expert stack, in the order its digest reads them."""
    return ["codes", "scales", *(f"side_{k}" for k in entry["side"]),
            *(f"offsets_{k}" for k in entry["ragged"])]


def _packed_leaves(entry: dict) -> list[str]:
    if "ragged" in entry:
        return stack_leaves(entry)
    return ["codes", "scales", *(f"side_{k}" for k in entry["side"])]


def _check_key(fmt):
    if not formats.key_rebuilds(fmt):
        raise QuantizedFileError(f"save_quantized: format {fmt.name!r} has no key that "
                                 f"qcompile.formats.get rebuilds (its key is {fmt.key!r})")


def _packed_parts(q: QTensor):
    return [("codes", q.codes), ("scales", q.scales), *((f"side_{k}", v) for k, v in
                                                        q.side.items())]


def _describe(q: QTensor) -> dict:
    return {"fmt": q.fmt.key, "shape": list(q.shape), "dtype": _dtype_name(q.dtype),
            "axis": q.axis, "block": q.block, "side": list(q.side)}


def _module_entry(mod, owner: str) -> dict:
    if isinstance(mod, QuantLinear):
        return {"kind": "conv1d" if mod.conv1d else "linear", "packed": owner, "impl": mod.impl,
                "act": mod.act or None, "bias": mod.bias is not None}
    return {"kind": "embedding", "packed": owner, "impl": mod.impl,
            "padding_idx": mod.padding_idx}


def _state(model):
    """``(name, module, leaf, tensor, role)`` for every parameter and buffer, a shared one under
    each of its names; the packed buffers of quantised modules are left out."""
    for prefix, mod in model.named_modules(remove_duplicate=False):
        skip = set()
        if isinstance(mod, (QuantLinear, QuantEmbedding)):
            skip = {"codes", "scales", *(f"side_{k}" for k in mod.side_names)}
        elif isinstance(mod, PackedExperts):
            skip = set(mod._buffers)
        for role, table in (("parameter", mod._parameters), ("buffer", mod._buffers)):
            for leaf, t in table.items():
                if t is not None and leaf not in skip:
                    yield (f"{prefix}.{leaf}" if prefix else leaf), mod, leaf, t, role


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _digest(desc: dict, tensors) -> str:
    """A hash of the format description and the packed bytes (CPU tensors, contiguous)."""
    h = hashlib.blake2b(json.dumps(desc, sort_keys=True).encode(), digest_size=16)
    for t in tensors:
        h.update(f"{_dtype_name(t.dtype)}{list(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# -- integrity: a digest of every tensor and of the whole document ----------------------------

def tensor_digest(t: torch.Tensor) -> str:
    """A hash of a tensor's dtype, shape and bytes (on any device)."""
    h = hashlib.blake2b(f"{_dtype_name(t.dtype)}{list(t.shape)}".encode(), digest_size=16)
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _entries(doc: dict) -> dict:
    """{entry: digest} for each item of the document's object fields, each element of its list
    fields and each plain field ("modules['x']", "policies[0]", "version"), and each stored
    tensor digest: they name what changed when the whole document's digest differs."""
    out = {}
    for field, value in doc.items():
        if field == "digests":  # the tensors' digests; not those of the document
            field, value = "digests.tensors", value["tensors"]
        if isinstance(value, dict):
            items = [(f"{field}[{k!r}]", v) for k, v in value.items()]
        elif isinstance(value, list):
            items = [(f"{field}[{i}]", v) for i, v in enumerate(value)]
        else:
            items = [(field, value)]
        for entry, v in items:
            out[entry] = hashlib.blake2b(_canonical(v), digest_size=8).hexdigest()
    return out


def _document_digest(doc: dict) -> str:
    """A hash of every field of the document, the stored digests included, but this one."""
    rest = {**doc, "digests": {k: v for k, v in doc["digests"].items() if k != "document"}}
    return hashlib.blake2b(_canonical(rest), digest_size=16).hexdigest()


def seal(doc: dict, tensors: dict) -> dict:
    """``doc`` with its "digests": of each of ``tensors`` ({name: tensor}, every tensor the
    file holds) and of the document itself."""
    digests = {"tensors": {name: tensor_digest(t) for name, t in tensors.items()}}
    sealed = {**doc, "digests": digests}
    digests["entries"] = _entries(sealed)
    digests["document"] = _document_digest(sealed)
    return sealed


def _listed(names, most: int = 6) -> str:
    names = list(names)
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most
                                      else "")


def verify_document(doc: dict, resave: str) -> bool:
    """Check the (structurally checked) document against its digest, naming the entries that
    differ. A version-1 document has no digests: warned once (``resave`` says how to add
    them), and False returned."""
    if doc["version"] < 2:
        config.warn(f"a version-1 blockquant file: it carries no digests, so a tensor or "
                    f"metadata changed after saving cannot be detected; {resave} to add them",
                    once=("blockquant file version 1", resave))
        return False
    stored = doc["digests"]
    if _document_digest(doc) == stored["document"]:
        return True
    mine, theirs = _entries(doc), stored["entries"]
    problems = [f"{e} differs" for e in mine if e in theirs and mine[e] != theirs[e]]
    problems += [f"{e} was added" for e in mine if e not in theirs]
    problems += [f"{e} was removed" for e in theirs if e not in mine]
    what = _listed(problems) if problems else "its digest does not match"
    raise QuantizedFileError(f"the metadata was changed after saving: {what}")


def verify_tensors(doc: dict, tensors: dict) -> None:
    """Check ``tensors`` ({name: tensor}, every tensor loaded from the file) against the
    document's digests (version 2; a version-1 document has none)."""
    if doc["version"] < 2:
        return
    stored = doc["digests"]["tensors"]
    lacking = [n for n in stored if n not in tensors]
    if lacking:
        raise QuantizedFileError(f"tensor(s) {_listed(lacking)} were saved but did not load: "
                                 "the checkpoint lacks them")
    unsaved = [n for n in tensors if n not in stored]
    if unsaved:
        raise QuantizedFileError(f"tensor(s) {_listed(unsaved)} have no digest: they were not "
                                 "saved with the model")
    for name, t in tensors.items():
        if tensor_digest(t) != stored[name]:
            raise QuantizedFileError(f"tensor {name!r} does not match its digest: the file was "
                                     "changed after saving")


# -- loading ----------------------------------------------------------------------------------

def load_quantized(path, model: torch.nn.Module, device="cpu") -> torch.nn.Module:
    """Load the file ``save_quantized`` wrote into ``model``, a freshly built float model of the
    same architecture (on any device, the meta device included): its quantised layers are
    swapped for the saved ``QuantLinear`` / ``QuantEmbedding`` modules and every tensor is
    loaded (onto ``device``). Everything is checked before the model is changed; a file that
    does not match raises QuantizedFileError naming the tensor and the problem."""
    try:
        return _load(path, model, device)
    except QuantizedFileError as e:
        raise QuantizedFileError(f"load_quantized({os.fspath(path)!r}): {e}") from None


def saved_policies(path) -> list[Policy]:
    """The policies recorded in a file ``save_quantized`` wrote (one per ``quantize_model_``
    call, in order): compile the loaded model with the last one."""
    try:
        doc = _read(path)[0]
        policies = _policies(doc)
        verify_document(doc, RESAVE)
        return policies
    except QuantizedFileError as e:
        raise QuantizedFileError(f"saved_policies({os.fspath(path)!r}): {e}") from None


def _load(path, model, device):
    from safetensors import safe_open
    doc, keys = _read(path)
    target = getattr(model, "_orig_mod", model)
    _check_modules(doc, target)
    _check_state(doc, target)
    with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
        loaded = {name: _checked_tensor(f, name, doc["tensors"][name]) for name in keys}
    qtensors = {owner: _packed(owner, entry, loaded, device)
                for owner, entry in doc["packed"].items()}
    policies = _policies(doc)
    # last, the digests (the checks above name a problem more precisely where they find one)
    verify_document(doc, RESAVE)
    verify_tensors(doc, loaded)
    # every check passed: change the model
    fp = {}
    for name, requires_grad in doc["parameters"].items():
        if name not in doc["aliases"]:
            fp[name] = torch.nn.Parameter(loaded[name].to(device), requires_grad=requires_grad)
    fp.update({name: loaded[name].to(device) for name in doc["buffers"]
               if name not in doc["aliases"]})
    fp.update({name: fp[canonical] for name, canonical in doc["aliases"].items()})
    for name, entry in doc["modules"].items():
        _install(target, name, entry, qtensors[entry["packed"]], fp.get(f"{name}.bias"))
    for name, t in fp.items():
        prefix, _, leaf = name.rpartition(".")
        setattr(target.get_submodule(prefix) if prefix else target, leaf, t)
    left = [name for name, _, _, t, _ in _state(target) if t.is_meta]  # a guard: checked above
    if left:
        raise QuantizedFileError(f"after loading, {left} are still on the meta device: the file "
                                 "does not hold them")
    setattr(target, POLICIES_ATTR, tuple(policies))
    return model


def _read(path) -> tuple[dict, set]:
    """The checked metadata document and the names of the file's tensors."""
    from safetensors import safe_open
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file {path!r}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta, keys = f.metadata() or {}, set(f.keys())
    except Exception as e:  # safetensors' own error types differ between its versions
        raise QuantizedFileError(
            f"the file is truncated or damaged, or is not a safetensors file "
            f"({os.path.getsize(path)} bytes; {type(e).__name__}: {e})") from None
    if METADATA_KEY not in meta:
        raise QuantizedFileError(f"a safetensors file that blockquant did not write: its "
                                 f"metadata has no {METADATA_KEY!r} entry (qcompile."
                                 "save_quantized writes one)")
    try:
        doc = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise QuantizedFileError(f"the {METADATA_KEY!r} metadata is not JSON ({e})") from None
    _check_doc(doc)
    listed = set(doc["tensors"])
    if listed - keys:
        raise QuantizedFileError(f"tensor(s) {sorted(listed - keys)} listed in the metadata are "
                                 "missing from the file")
    if keys - listed:
        raise QuantizedFileError(f"the file holds tensor(s) {sorted(keys - listed)} that its "
                                 "metadata does not list")
    return doc, keys


def _need(ok: bool, where: str, problem: str):
    if not ok:
        raise QuantizedFileError(f"damaged metadata: {where}: {problem}")


def _fields(obj, where: str, fields):
    _need(isinstance(obj, dict), where, f"expected a JSON object, got {obj!r}")
    unknown, missing = sorted(set(obj) - set(fields)), [k for k in fields if k not in obj]
    _need(not unknown, where, f"unknown field(s) {unknown}; known: {list(fields)}")
    _need(not missing, where, f"missing field(s) {missing}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_shape(v) -> bool:
    return isinstance(v, list) and all(_is_int(d) and d >= 0 for d in v)


def _check_doc(doc, file_format: str = FILE_FORMAT):
    """The document's structure: its version first (a newer one may differ in anything)."""
    _need(isinstance(doc, dict), "the document", f"expected a JSON object, got {doc!r}")
    if doc.get("format") != file_format:
        raise QuantizedFileError(f"not a blockquant quantised model: its metadata format is "
                                 f"{doc.get('format')!r}, not {file_format!r}")
    version = doc.get("version")
    _need(_is_int(version) and version >= 1, "version", f"expected a positive integer, got "
                                                        f"{version!r}")
    if version > VERSION:
        raise QuantizedFileError(f"written by a newer blockquant (file format version {version}; "
                                 f"this one reads versions up to {VERSION}): upgrade blockquant "
                                 "to load it")
    _fields(doc, "the document", DOC_FIELDS if version >= 2 else DOC_FIELDS_V1)
    _need(isinstance(doc["policies"], list), "policies", "expected a list")
    _need(isinstance(doc["packed"], dict), "packed", "expected a JSON object")
    for owner, entry in doc["packed"].items():
        where = f"packed[{owner!r}]"
        stack = isinstance(entry, dict) and "ragged" in entry  # an expert stack [E, a, b]
        _fields(entry, where, STACK_FIELDS if stack else PACKED_FIELDS)
        _need(isinstance(entry["fmt"], str), where, f"fmt {entry['fmt']!r} is not a format key")
        dims, axes = (3, (1, 2)) if stack else (2, (0, 1))
        _need(_is_shape(entry["shape"]) and len(entry["shape"]) == dims, where,
              f"shape {entry['shape']!r} is not the shape of a {dims}-d weight")
        _need(entry["dtype"] in WEIGHT_DTYPES, where,
              f"dtype {entry['dtype']!r} is not one of {WEIGHT_DTYPES}")
        _need(_is_int(entry["axis"]) and entry["axis"] in axes, where,
              f"axis {entry['axis']!r} is not {axes[0]} or {axes[1]}")
        if stack:
            _need(isinstance(entry["ragged"], list) and isinstance(entry["side"], list)
                  and all(k in entry["side"] for k in entry["ragged"]), where,
                  f"ragged {entry['ragged']!r} is not a list of its side data's names")
        _need(_is_int(entry["block"]) and entry["block"] >= 1, where,
              f"block {entry['block']!r} is not a positive integer")
        _need(isinstance(entry["side"], list) and all(isinstance(s, str) for s in entry["side"]),
              where, f"side {entry['side']!r} is not a list of names")
        _need(isinstance(entry["digest"], str), where, "digest is not a string")
    _need(isinstance(doc["modules"], dict), "modules", "expected a JSON object")
    for name, entry in doc["modules"].items():
        where = f"modules[{name!r}]"
        kind = entry.get("kind") if isinstance(entry, dict) else None
        _need(kind in MODULE_FIELDS, where, f"kind {kind!r} is not one of {list(MODULE_FIELDS)}")
        _fields(entry, where, MODULE_FIELDS[kind])
        _need(isinstance(entry["packed"], str) and entry["packed"] in doc["packed"], where,
              f"packed {entry['packed']!r} names no entry of 'packed'")
        stack = "ragged" in doc["packed"][entry["packed"]]
        if kind == "experts":
            _need(stack and entry["packed"] == name, where,
                  "an expert tensor names its own packed expert stack")
        else:
            _need(not stack, where, f"a {kind} cannot hold an expert stack")
            _need(doc["packed"][entry["packed"]]["axis"] == AXIS_OF_KIND[kind], where,
                  f"a {kind} is packed along axis {AXIS_OF_KIND[kind]}, its packed entry says "
                  f"{doc['packed'][entry['packed']]['axis']}")
        _need(isinstance(entry["impl"], str) and entry["impl"] in config.KERNELS, where,
              f"impl {entry['impl']!r} is not one of {config.KERNELS}")
        if kind == "experts":
            pass
        elif kind == "embedding":
            _need(entry["padding_idx"] is None or _is_int(entry["padding_idx"]), where,
                  f"padding_idx {entry['padding_idx']!r} is not an integer or null")
        else:
            _need(entry["act"] is None or isinstance(entry["act"], str), where,
                  f"act {entry['act']!r} is not a format key or null")
            _need(isinstance(entry["bias"], bool), where, f"bias {entry['bias']!r} is not a bool")
    _need(isinstance(doc["parameters"], dict)
          and all(isinstance(v, bool) for v in doc["parameters"].values()), "parameters",
          "expected {name: requires_grad}")
    _need(isinstance(doc["buffers"], list) and all(isinstance(v, str) for v in doc["buffers"]),
          "buffers", "expected a list of names")
    both = sorted(set(doc["parameters"]) & set(doc["buffers"]))
    _need(not both, "buffers", f"{both} are listed as parameters too")
    _need(isinstance(doc["aliases"], dict), "aliases", "expected a JSON object")
    saved = (set(doc["parameters"]) | set(doc["buffers"])) - set(doc["aliases"])
    for name, canonical in doc["aliases"].items():
        _need(name in doc["parameters"] or name in doc["buffers"], "aliases",
              f"{name!r} is neither a parameter nor a buffer")
        _need(canonical in saved, "aliases", f"{name!r} shares {canonical!r}, which is not a "
                                             "saved parameter or buffer")
        _need((name in doc["parameters"]) == (canonical in doc["parameters"]), "aliases",
              f"{name!r} and {canonical!r} are not both parameters or both buffers")
    _need(isinstance(doc["tensors"], dict) and all(
        isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and _is_shape(v[1])
        for v in doc["tensors"].values()), "tensors", "expected {name: [dtype, shape]}")
    packed = {f"{owner}.{leaf}" for owner, e in doc["packed"].items()
              for leaf in _packed_leaves(e)}
    unlisted, unknown = sorted((packed | saved) - set(doc["tensors"])), sorted(
        set(doc["tensors"]) - packed - saved)
    _need(not unlisted, "tensors", f"{unlisted} are not listed")
    _need(not unknown, "tensors", f"{unknown} are listed but are neither packed nor saved "
                                  "parameters or buffers")
    if version >= 2:
        _check_digests(doc["digests"])


def _check_digests(digests):
    _fields(digests, "digests", DIGEST_FIELDS)
    for field in ("tensors", "entries"):
        _need(isinstance(digests[field], dict) and all(
            isinstance(v, str) for v in digests[field].values()), f"digests.{field}",
            "expected {name: hex digest}")
    _need(isinstance(digests["document"], str), "digests.document", "expected a hex digest")


def _policies(doc) -> list[Policy]:
    out = []
    for i, p in enumerate(doc["policies"]):
        try:
            out.append(Policy.from_json(json.dumps(p)))
        except PolicyError as e:
            raise QuantizedFileError(f"damaged metadata: policies[{i}]: {e}") from None
    return out


def _kind_class(kind: str):
    return {"linear": torch.nn.Linear, "conv1d": conv1d_class(),
            "embedding": torch.nn.Embedding, "experts": None}[kind]


def _check_modules(doc, model):
    """Each quantised module of the file names a float layer of the model of the same kind and
    weight shape (with a bias where the file has one)."""
    for name, entry in doc["modules"].items():
        if entry["kind"] == "experts":
            _check_expert_tensor(name, doc["packed"][name]["shape"], model)
            continue
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise QuantizedFileError(f"module {name!r} of the file is not in the model (a model "
                                     "of another architecture or configuration?)") from None
        kind, cls = entry["kind"], _kind_class(entry["kind"])
        if entry.get("act"):
            try:
                formats.get(entry["act"])
            except (ValueError, TypeError) as e:
                raise QuantizedFileError(f"module {name!r}: act format key {entry['act']!r}: {e}"
                                         ) from None
        if isinstance(mod, (QuantLinear, QuantEmbedding)):
            raise QuantizedFileError(f"module {name!r} of the model is quantised already: load "
                                     "into a freshly built float model")
        if cls is None or not isinstance(mod, cls):
            raise QuantizedFileError(f"module {name!r}: the file holds a quantised {kind}, the "
                                     f"model has a {type(mod).__name__}")
        shape = doc["packed"][entry["packed"]]["shape"]
        if list(mod.weight.shape) != shape:
            raise QuantizedFileError(f"module {name!r}: the file's weight has shape {shape}, the "
                                     f"model's {list(mod.weight.shape)}")
        if kind == "embedding":
            if mod.padding_idx != entry["padding_idx"]:
                raise QuantizedFileError(f"module {name!r}: the file's embedding has padding_idx "
                                         f"{entry['padding_idx']}, the model's {mod.padding_idx}")
        elif (mod.bias is not None) != entry["bias"]:
            has = "has" if entry["bias"] else "has no"
            raise QuantizedFileError(f"module {name!r}: the file's layer {has} bias, the "
                                     "model's does not match")


def _check_expert_tensor(name: str, shape: list, model):
    """The file's expert stack ``name`` names a float 3-d parameter of the model of its shape."""
    prefix, _, attr = name.rpartition(".")
    try:
        mod = model.get_submodule(prefix)
    except AttributeError:
        raise QuantizedFileError(f"expert tensor {name!r} of the file is not in the model (a "
                                 "model of another architecture or configuration?)") from None
    if isinstance(mod._modules.get(attr), PackedExperts):
        raise QuantizedFileError(f"expert tensor {name!r} of the model is quantised already: "
                                 "load into a freshly built float model")
    p = mod._parameters.get(attr)
    if p is None or p.dim() != 3:
        raise QuantizedFileError(f"expert tensor {name!r}: the file holds packed experts, the "
                                 f"model has no 3-d parameter {attr!r} in {prefix!r}")
    if list(p.shape) != shape:
        raise QuantizedFileError(f"expert tensor {name!r}: the file's experts have shape "
                                 f"{shape}, the model's {list(p.shape)}")


def _check_state(doc, model):
    """The model's parameters and buffers, once its quantised layers are swapped, are exactly the
    file's, by name, role and shape."""
    swapped = {name if entry["kind"] == "experts" else f"{name}.weight"
               for name, entry in doc["modules"].items()}
    mine = {name: (role, t) for name, _, _, t, role in _state(model) if name not in swapped}
    roles = {**{n: "parameter" for n in doc["parameters"]}, **{n: "buffer" for n in doc["buffers"]}}
    for name in sorted(set(roles) - set(mine)):
        raise QuantizedFileError(f"tensor {name!r} of the file names a parameter or buffer the "
                                 "model does not have")
    for name in sorted(set(mine) - set(roles)):
        raise QuantizedFileError(f"the model's {mine[name][0]} {name!r} is not in the file")
    for name, (role, t) in mine.items():
        if role != roles[name]:
            raise QuantizedFileError(f"{name!r} is a {roles[name]} in the file, a {role} in the "
                                     "model")
        saved = doc["tensors"][doc["aliases"].get(name, name)][1]
        if list(t.shape) != saved:
            raise QuantizedFileError(f"tensor {name!r}: the file holds shape {saved}, the model's "
                                     f"is {list(t.shape)}")


def _checked_tensor(f, name: str, listed) -> torch.Tensor:
    t = f.get_tensor(name)
    dtype, shape = listed
    if _dtype_name(t.dtype) != dtype or list(t.shape) != shape:
        raise QuantizedFileError(f"tensor {name!r}: the file holds {_dtype_name(t.dtype)} "
                                 f"{list(t.shape)}, the metadata says {dtype} {shape}")
    return t


def packed_layout(fmt, shape, axis: int, block: int) -> dict:
    """{leaf: (dtype, shape)} of the tensors ``quantize`` makes for a weight of ``shape`` with
    blocks along ``axis`` (OPQ outlier lists: shape None, their length depends on the data)."""
    k, lead = shape[axis], [d for i, d in enumerate(shape) if i != axis]
    n_blocks = -(-k // block)
    layout = {"codes": (torch.uint8, [*lead, packed_length(n_blocks * block, fmt.bits)]),
              "scales": (fmt.scale.stored_dtype, [*lead, n_blocks])}
    if fmt.proxy is not None:  # the order quantize puts side data in
        kept = fmt.proxy_count(k)
        layout["side_proxy_index"] = (torch.int32, [kept])
        layout["side_proxy_value"] = (torch.bfloat16, [*lead, kept])
    if fmt.opq is not None:
        padded = math.prod(lead) * n_blocks * block
        layout["side_outlier_index"] = (torch.int32 if padded < 2**31 else torch.int64, None)
        layout["side_outlier_value"] = (torch.bfloat16, None)
    for name, (dtype, side_shape) in fmt.whole_tensor_side.items():
        layout[f"side_{name}"] = (dtype, side_shape)
    return layout


def _format(owner: str, entry: dict):
    try:
        return formats.get(entry["fmt"])
    except (ValueError, TypeError) as e:
        raise QuantizedFileError(f"packed weight {owner!r}: format key {entry['fmt']!r}: {e}; "
                                 "qcompile.formats.names() lists the presets") from None


def _packed(owner: str, entry: dict, loaded: dict, device=None):
    """The checked packed tensor of ``owner`` (moved to ``device`` when given): a QTensor, or
    for an expert stack the list of its experts' QTensors."""
    if "ragged" in entry:
        stack = expert_qtensors(owner, entry, loaded)
        return stack if device is None else [q.to(device) for q in stack]
    q = _qtensor(owner, entry, loaded)
    return q if device is None else q.to(device)


def _install(model, name: str, entry: dict, packed, bias):
    """Put the loaded layer ``name`` in the model: a QuantLinear / QuantEmbedding swapped in, or
    an expert stack in place of its 3-d parameter."""
    if entry["kind"] != "experts":
        _set_child(model, name, _build(entry, packed, bias))
        return
    prefix, _, attr = name.rpartition(".")
    axis = packed[0].axis + 1
    install_experts(model.get_submodule(prefix), attr, PackedExperts(packed, axis, entry["impl"]))


def expert_qtensors(owner: str, entry: dict, loaded: dict) -> list[QTensor]:
    """The experts of the stack ``owner`` [E, a, b], each part checked against what its format
    implies for one expert's matrix, stacked along a leading E axis (or, "ragged", concatenated
    with offsets)."""
    fmt = _format(owner, entry)
    if fmt.proxy is not None:
        raise QuantizedFileError(f"packed experts {owner!r}: format {fmt.key!r} has proxy "
                                 "columns, which expert tensors do not take")
    (n, *matrix), axis, block = entry["shape"], entry["axis"] - 1, entry["block"]
    layout = _checked_layout(owner, entry, fmt, matrix, axis)
    ragged = entry["ragged"]
    uneven = [leaf[5:] for leaf, (_, want) in layout.items() if want is None]
    if not set(ragged) <= set(uneven):
        raise QuantizedFileError(f"packed experts {owner!r}: only side data of varying length "
                                 f"({uneven}) may be ragged, the metadata says {ragged}")
    parts = {leaf: loaded[f"{owner}.{leaf}"] for leaf in stack_leaves(entry)}
    for leaf, (dtype, want) in layout.items():
        t, shape = parts[leaf], list(parts[leaf].shape)
        if leaf[5:] in ragged:
            ok, need = t.dim() == 1, "[n]"
        else:
            ok = shape[:1] == [n] and (shape[1:] == want if want is not None else t.dim() == 2)
            need = f"[{n}, {'n' if want is None else ', '.join(map(str, want))}]"
        if t.dtype != dtype or not ok:
            raise QuantizedFileError(
                f"tensor {owner}.{leaf}: format {fmt.key!r} of {n} experts of {matrix} needs "
                f"{_dtype_name(dtype)} {need}, the file holds {_dtype_name(t.dtype)} {shape}")
    for k in ragged:
        _check_offsets(owner, k, parts[f"offsets_{k}"], n, parts[f"side_{k}"].shape[0])
    _check_digest(owner, entry, fmt, parts)
    stack = []
    for e in range(n):
        side = {}
        for k in entry["side"]:
            t = parts[f"side_{k}"]
            if k in ragged:
                off = parts[f"offsets_{k}"]
                t = t[int(off[e]):int(off[e + 1])]
            else:
                t = t[e]
            side[k] = t
        if fmt.opq is not None:
            _check_outliers(f"{owner}[{e}]", side["outlier_index"], side["outlier_value"],
                            math.prod(layout["scales"][1]) * block)
        stack.append(QTensor(fmt, parts["codes"][e], parts["scales"][e], torch.Size(matrix),
                             getattr(torch, entry["dtype"]), axis, block, side))
    return stack


def _check_offsets(owner: str, k: str, off: torch.Tensor, n: int, length: int):
    if off.dtype != torch.int64 or list(off.shape) != [n + 1]:
        raise QuantizedFileError(f"tensor {owner}.offsets_{k}: {n} experts need int64 [{n + 1}], "
                                 f"the file holds {_dtype_name(off.dtype)} {list(off.shape)}")
    if int(off[0]) != 0 or int(off[-1]) != length or not bool((off[1:] >= off[:-1]).all()):
        raise QuantizedFileError(f"tensor {owner}.offsets_{k}: offsets must ascend from 0 to "
                                 f"{length}, the length of side_{k}")


def _checked_layout(owner: str, entry: dict, fmt, shape, axis: int) -> dict:
    """``packed_layout`` of one weight of ``shape``, its block and side data checked against the
    metadata."""
    if entry["block"] != fmt.block_for(shape[axis]):
        raise QuantizedFileError(f"packed weight {owner!r}: block {entry['block']} does not match "
                                 f"format {fmt.key!r}, whose block on rows of {shape[axis]} is "
                                 f"{fmt.block_for(shape[axis])}")
    layout = packed_layout(fmt, shape, axis, entry["block"])
    sides = [f"side_{k}" for k in entry["side"]]
    if sides != list(layout)[2:]:
        raise QuantizedFileError(f"packed weight {owner!r}: format {fmt.key!r} has side data "
                                 f"{[k[5:] for k in list(layout)[2:]]}, the metadata lists "
                                 f"{entry['side']}")
    return layout


def _check_digest(owner: str, entry: dict, fmt, parts: dict):
    desc = {k: entry[k] for k in entry if k != "digest"}
    if _digest(desc, parts.values()) != entry["digest"]:
        raise QuantizedFileError(
            f"packed weight {owner!r}: its bytes do not match the format description of the "
            f"metadata (format {fmt.key!r}, shape {entry['shape']}, axis {entry['axis']}): the "
            "digest differs, so the metadata or the tensors were changed after saving")


def _qtensor(owner: str, entry: dict, loaded: dict) -> QTensor:
    """The packed tensor of ``owner``, each part checked against what its format implies."""
    fmt = _format(owner, entry)
    shape, axis = entry["shape"], entry["axis"]
    layout = _checked_layout(owner, entry, fmt, shape, axis)
    parts = {leaf: loaded[f"{owner}.{leaf}"] for leaf in layout}
    for leaf, (dtype, want) in layout.items():
        t = parts[leaf]
        if t.dtype != dtype or (want is not None and list(t.shape) != want) or (
                want is None and t.dim() != 1):
            need = f"{_dtype_name(dtype)} {want if want is not None else '[n]'}"
            raise QuantizedFileError(
                f"tensor {owner}.{leaf}: format {fmt.key!r} of a {shape} weight needs {need}, "
                f"the file holds {_dtype_name(t.dtype)} {list(t.shape)}")
    if fmt.proxy is not None:
        _check_proxy(owner, parts["side_proxy_index"], shape[axis])
    if fmt.opq is not None:
        _check_outliers(owner, parts["side_outlier_index"], parts["side_outlier_value"],
                        math.prod(layout["scales"][1]) * entry["block"])
    _check_digest(owner, entry, fmt, parts)
    side = {k: parts[f"side_{k}"] for k in entry["side"]}
    return QTensor(fmt, parts["codes"], parts["scales"], torch.Size(shape),
                   getattr(torch, entry["dtype"]), axis, entry["block"], side)


def _check_proxy(owner: str, index: torch.Tensor, k: int):
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= k
                          or not bool((index[1:] > index[:-1]).all())):
        raise QuantizedFileError(f"tensor {owner}.side_proxy_index: columns must ascend "
                                 f"within [0, {k})")


def _check_outliers(owner: str, index: torch.Tensor, value: torch.Tensor, padded: int):
    if index.numel() != value.numel():
        raise QuantizedFileError(f"tensor {owner}.side_outlier_value: {value.numel()} outlier "
                                 f"values for {index.numel()} outlier positions")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= padded
                          or not bool((index[1:] > index[:-1]).all())):
        raise QuantizedFileError(f"tensor {owner}.side_outlier_index: positions must ascend "
                                 f"within [0, {padded})")


def _build(entry: dict, q: QTensor, bias):
    if entry["kind"] == "embedding":
        return QuantEmbedding(q, entry["padding_idx"], impl=entry["impl"])
    act = formats.get(entry["act"]) if entry["act"] else None
    return QuantLinear(q, bias, act, entry["kind"] == "conv1d", impl=entry["impl"])
