"""The transformers integration (docs/saving.md): ``BlockQuantConfig(policy=...)`` as the
``quantization_config`` of ``from_pretrained`` quantises a model while it loads, exactly as
``quantize_model_`` would; ``save_pretrained`` writes the packed weights and the config (the
policy as its JSON) to config.json; ``from_pretrained`` loads them back, checked.

Quantising while loading: each weight of a layer the policy quantises is packed as soon as it is
read (transformers' on-the-fly quantisation hook, one float layer at a time) and its layer keeps
a weightless meta stand-in until loading ends, when the layers are swapped (model code such as
GPT-2's weight init still reads ``.weight`` while loading). Weights that transformers ties after
loading (an embedding and its lm_head) are packed after loading with ``quantize_model_``, which
keeps the sharing rules of docs/policies.md.

Mixture-of-experts tensors are packed as transformers' conversion mapping hands them over
(per-expert checkpoint tensors stacked into the 3-d parameter), expert by expert; they are
saved fused under the model's names (the conversion back to per-expert tensors is not applied
to them) and loaded back the same way.

Loading a saved model: the packed layers (and expert stacks) are swapped for placeholders
holding buffers of the saved shapes before the weights load; after loading each packed weight is
checked against its format and digest (serialize.py) and the placeholders become QuantLinear /
QuantEmbedding. Every shard holds the metadata document, checked against its digest before
loading; every tensor of the loaded model, full-precision ones too, is checked against the
digest saved with it (by its name in the model, whatever shards and names transformers wrote).

Importing this module imports transformers and registers both classes
(qcompile/integrations/hf_hook.py).
"""
from __future__ import annotations

import json
import os
import re

import torch
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING,
                                          AUTO_QUANTIZER_MAPPING, register_quantization_config,
                                          register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .. import api, formats, serialize, tensor_parallel
from ..expert_stack import PackedExperts
from ..expert_stack import install as install_experts
from ..policy import POLICY_JSON_FORMAT, Policy, PolicyError
from ..serialize import METADATA_KEY, QuantizedFileError
from ..swap import (POLICIES_ATTR, QuantEmbedding, QuantLinear, _set_child, embedding_layers,
                    expert_layers, linear_layers, mark_expert_stack, pack_expert_tensor,
                    quantize_model_)

QUANT_METHOD = "blockquant"
CHECKPOINT_FORMAT = "blockquant.hf_checkpoint"  # the safetensors metadata of save_pretrained
WHO = "from_pretrained(quantization_config=BlockQuantConfig)"
RESAVE = "load it with from_pretrained and save_pretrained it again"


HOW = ("pass a qcompile.Policy (or its JSON, policy.to_json()), e.g. BlockQuantConfig(policy="
       "qcompile.Policy({'*.mlp.*': qcompile.LayerSpec(weight='nf4')}))")


def _as_policy(policy) -> Policy:
    if isinstance(policy, Policy):
        return policy
    if policy is None:
        raise ValueError("BlockQuantConfig needs a policy: BlockQuantConfig(policy=qcompile."
                         "Policy(...)); a config.json quantization_config with quant_method "
                         f"'blockquant' must have a 'policy' field (the policy JSON); {HOW}")
    if isinstance(policy, dict):  # config.json holds the policy JSON as an object
        if policy.get("format") != POLICY_JSON_FORMAT:  # {pattern: format}, a guess at a policy
            raise PolicyError(f"BlockQuantConfig: policy {_short(policy)} is a dict, not a "
                              f"policy; {HOW}")
        policy = json.dumps(policy)
    if not isinstance(policy, (str, bytes)):
        raise PolicyError(f"BlockQuantConfig: policy must be a qcompile.Policy or its JSON, got "
                          f"{type(policy).__name__}; {HOW}")
    if not policy.lstrip().startswith("{" if isinstance(policy, str) else b"{"):  # "nf4"
        raise PolicyError(f"BlockQuantConfig: policy {_short(policy)} is not a policy; {HOW}")
    try:
        return Policy.from_json(policy)
    except PolicyError as e:
        raise PolicyError(f"BlockQuantConfig: quantization_config 'policy' is not a blockquant "
                          f"policy: {e}; {HOW}") from None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class BlockQuantConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of ``from_pretrained`` for blockquant: the policy decides
    which layers get which formats, as in ``qcompile.quantize_model_(model, policy)``."""

    def __init__(self, policy=None, quant_method: str = QUANT_METHOD, **kwargs):
        if quant_method != QUANT_METHOD:
            raise ValueError(f"BlockQuantConfig: quant_method is {quant_method!r}, not "
                             f"{QUANT_METHOD!r}")
        if kwargs:  # a newer blockquant's field, or a typo: never ignored
            raise ValueError(f"BlockQuantConfig: unknown field(s) {sorted(kwargs)}; known: "
                             f"['quant_method', 'policy']; {HOW}")
        self.quant_method = QUANT_METHOD
        self.policy = _as_policy(policy)

    def to_dict(self) -> dict:
        return {"quant_method": QUANT_METHOD, "policy": json.loads(self.policy.to_json())}

    def __iter__(self):
        yield from self.to_dict().items()

    def __deepcopy__(self, memo):  # from_pretrained copies configs; a Policy is not changed
        return BlockQuantConfig(self.policy)


class BlockQuantHfQuantizer(HfQuantizer):
    """transformers' side of BlockQuantConfig (the HfQuantizer hooks of transformers 5)."""

    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.stream: dict[str, tuple] = {}  # layers packed as their weight loads
        self.packed: dict[str, object] = {}  # their QTensors, until loading ends
        self.meshes: dict[str, object] = {}  # the device mesh of each one sharded (tp_plan)
        self.checked = False  # the tensor-parallel splits, checked before the first weight
        self.expert_stream: dict[str, tuple] = {}  # expert tensors packed as they load
        self.packed_experts: dict[str, object] = {}  # their PackedExperts, until loading ends
        self.doc: dict | None = None  # a saved model's metadata

    @property
    def policy(self) -> Policy:
        return self.quantization_config.policy

    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("BlockQuantConfig: disk offloading (device_map with 'disk') is not "
                             "supported")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if self.pre_quantized:
            self._prepare_saved(model, checkpoint_files)
            return model
        tied = {k.removesuffix(".weight") for kv in model.all_tied_weights_keys.items()
                for k in kv}
        plan = layer_plan(model, self.policy)
        if any(spec.weight.proxy is not None for _, spec, _ in plan.values()):
            plan = {}  # proxy columns are scored from other layers' full-precision weights:
            # every weight loads first, then quantize_model_ packs them all
        self.stream = {name: entry for name, entry in plan.items() if name not in tied}
        # expert tensors, fused by transformers' conversions (per-expert checkpoint tensors
        # stacked into the 3-d parameter) before the quantize op sees them
        self.expert_stream = {t.name: (t, spec) for t, spec in
                              expert_layers(model, self.policy, WHO, meta_stand_ins=True)}
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        if not self.checked:  # the model is parallelised by now
            self.checked = True
            tensor_parallel.check_layers(model, [
                (name, model.get_submodule(name).weight, spec, axis, kind)
                for name, (kind, spec, axis) in self.stream.items()])
            tensor_parallel.check_experts(self.expert_stream.values())
        return param_name in self.expert_stream or (
            param_name.endswith(".weight") and param_name.removesuffix(".weight") in self.stream)

    def get_quantize_ops(self):
        return _quantize_op()(self)

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            self._finish_saved(model)
        else:
            swap_packed(model, self.stream, self.packed, self.meshes)
            self.packed.clear()
            for name, packed in self.packed_experts.items():
                prefix, _, attr = name.rpartition(".")
                install_experts(model.get_submodule(prefix), attr, packed)
            self.packed_experts.clear()
            # the tied weights, and any layer whose weight the checkpoint did not hold
            quantize_model_(model, self.policy)
            _untie(model, {n for n, m in model.named_modules()
                           if isinstance(m, (QuantLinear, QuantEmbedding))})
        return model

    # -- saving -------------------------------------------------------------------------------

    def get_state_dict_and_metadata(self, model):
        keep_stacks_fused(model)
        return checkpoint_state(model, self.policy)

    def is_serializable(self, *args, **kwargs):
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True

    # -- loading a saved model ----------------------------------------------------------------

    def _prepare_saved(self, model, checkpoint_files):
        doc = _read_doc(checkpoint_files)
        saved = serialize._policies(doc)
        if saved != [self.policy]:
            raise QuantizedFileError(
                f"the checkpoint's weights were packed with the policy {saved}, its config.json "
                f"quantization_config names {self.policy!r}: config.json was changed after "
                "saving")
        serialize._check_modules(doc, model)
        for name, entry in doc["modules"].items():
            packed_from = doc["packed"][entry["packed"]]["dtype"]
            dtype = serialize._dtype_name(_float_weight(model, name, entry).dtype)
            if packed_from != dtype:  # the packed layers would compute in another dtype
                raise QuantizedFileError(
                    f"layer {name!r} was packed from {packed_from} weights, the model is built "
                    f"in {dtype}: load with dtype=torch.{packed_from}")
        _untie(model, set(doc["modules"]))
        for name, entry in doc["modules"].items():
            if entry["kind"] == "experts":
                _prepare_stack(model, name, doc)
                continue
            mod = model.get_submodule(name)
            holder = torch.nn.Module()  # the saved buffers load into it by name
            holder.weight = _stand_in(mod.weight)  # not a parameter: no key to load
            if entry["kind"] != "embedding":
                holder.bias = mod.bias
                # transformers' tp_plan styles read these from the layer they parallelise
                holder.out_features, holder.in_features = _linear_shape(mod.weight, entry)
            if entry["packed"] == name:
                for key, (dtype, shape) in doc["tensors"].items():
                    if key.rpartition(".")[0] == name:
                        holder.register_buffer(key.rpartition(".")[2], torch.empty(
                            shape, dtype=getattr(torch, dtype), device="meta"))
            _set_child(model, name, holder)
        self.doc = doc

    def _finish_saved(self, model):
        doc, loaded = self.doc, {}
        for owner in doc["packed"]:
            for leaf, t in model.get_submodule(owner)._buffers.items():
                if t.is_meta:
                    raise QuantizedFileError(f"tensor {owner}.{leaf} is not in the checkpoint")
                loaded[f"{owner}.{leaf}"] = t
        qtensors = {owner: serialize._packed(owner, entry, loaded)  # where they loaded
                    for owner, entry in doc["packed"].items()}
        # every tensor as loaded (full-precision ones too) against the digest saved with it
        serialize.verify_tensors(doc, _WholeTensors(model.state_dict()))
        mesh = tensor_parallel.plan_mesh(model)  # under a tp_plan: each rank keeps its shard
        for name, entry in doc["modules"].items():
            if entry["kind"] == "experts":
                stack = qtensors[entry["packed"]]
                if mesh is not None:  # each expert's matrix cut as the plan splits the stack
                    stack = tensor_parallel.shard_saved_experts(model, name, stack, mesh)
                serialize._install(model, name, entry, stack, None)
                if stack is not qtensors[entry["packed"]]:  # (the holder, not its view)
                    prefix, _, attr = name.rpartition(".")
                    tensor_parallel.mark_sharded(model.get_submodule(prefix)._modules[attr])
                continue
            holder = model.get_submodule(name)
            q, bias = qtensors[entry["packed"]], holder._parameters.get("bias")
            if mesh is not None:
                act = formats.get(entry["act"]) if entry.get("act") else None
                q, bias = tensor_parallel.shard_saved(model, name, entry["kind"], q, bias,
                                                      mesh, act)
            serialize._install(model, name, entry, q, bias)
            if mesh is not None and tensor_parallel.parallel_style(model, name) is not None:
                tensor_parallel.keep_style(model, name, holder, model.get_submodule(name), mesh)
        setattr(model, POLICIES_ATTR, (self.policy,))


class _WholeTensors(dict):
    """A state dict whose DTensors (float weights a tp_plan sharded) are gathered whole one at a
    time as they are checked: their digests are of the whole saved tensor."""

    def items(self):
        for name, t in super().items():
            yield name, t.full_tensor() if tensor_parallel.is_distributed(t) else t


def _linear_shape(weight, entry: dict) -> tuple[int, int]:
    """(out_features, in_features) of the linear layer (or GPT-2 Conv1D) ``weight`` belongs to."""
    return tuple(reversed(weight.shape)) if entry["kind"] == "conv1d" else tuple(weight.shape)


def _float_weight(model, name: str, entry: dict) -> torch.Tensor:
    """The float weight of the model that the file's layer ``name`` packs."""
    if entry["kind"] == "experts":
        prefix, _, attr = name.rpartition(".")
        return model.get_submodule(prefix)._parameters[attr]
    return model.get_submodule(name).weight


def _prepare_stack(model, name: str, doc: dict):
    """The expert parameter ``name`` becomes a holder of the saved stack's buffers (of their
    saved shapes, on the meta device), which the checkpoint's tensors load into by name."""
    prefix, _, attr = name.rpartition(".")
    mod, holder = model.get_submodule(prefix), torch.nn.Module()
    # a tp_plan's style for the stack checks these on its holder as the model is parallelised;
    # each rank's part of the stack is then cut (tensor_parallel.shard_saved_experts)
    holder.out_features, holder.in_features = mod._parameters[attr].shape[-2:]
    for leaf in serialize.stack_leaves(doc["packed"][name]):
        dtype, shape = doc["tensors"][f"{name}.{leaf}"]
        holder.register_buffer(leaf, torch.empty(shape, dtype=getattr(torch, dtype),
                                                 device="meta"))
    del mod._parameters[attr]
    mod.add_module(attr, holder)


def keep_stacks_fused(model):
    """Drop from the model's weight conversions (which save_pretrained reverts, e.g. splitting
    ``experts.gate_up_proj`` back into per-expert ``w1`` / ``w3`` checkpoint tensors) those that
    write a packed expert stack: the stack's buffers are saved as they are, under the model's
    names, which the conversions do not match when loading."""
    from transformers.core_model_loading import WeightConverter
    stacks = [n for n, m in model.named_modules() if isinstance(m, PackedExperts)]
    if not stacks:
        return

    def writes_a_stack(conversion) -> bool:
        return isinstance(conversion, WeightConverter) and any(
            re.search(t.replace("*", r"[^.]+"), n) for t in conversion.target_patterns
            for n in stacks)
    kept = getattr(model, "_weight_conversions", None) or []
    model._weight_conversions = [c for c in kept if not writes_a_stack(c)]


def swap_packed(model, plan: dict, packed: dict, meshes: dict | None = None):
    """Swap each layer named in ``packed`` ({name: QTensor}) for its QuantLinear /
    QuantEmbedding, as ``quantize_model_`` builds them (``plan`` from ``layer_plan``); a layer
    sharded on a device mesh (``meshes``) keeps its tp_plan style."""
    for name, q in packed.items():
        kind, spec, axis = plan[name]
        mod = model.get_submodule(name)
        if kind == "linear":
            new = QuantLinear(q, mod.bias, spec.act, axis == 0)
            tensor_parallel.keep_style(model, name, mod, new, (meshes or {}).get(name))
        else:
            new = QuantEmbedding(q, mod.padding_idx)
        _set_child(model, name, new)


def checkpoint_state(model, policy: Policy) -> tuple[dict, dict]:
    """(state dict, safetensors metadata) of a model that ``policy`` quantised once, as
    ``save_pretrained`` writes it: each packed weight once, under its owner's name, and the
    "blockquant.hf_checkpoint" document."""
    if getattr(model, POLICIES_ATTR, ()) != (policy,):
        raise QuantizedFileError(
            "save_pretrained: the model was quantised again after loading (its policies: "
            f"{getattr(model, POLICIES_ATTR, ())}), config.json can name one policy: use "
            "qcompile.save_quantized")
    tensors, packed, modules = serialize.packed_state(model)
    state = model.state_dict()
    for name, mod in model.named_modules():
        if isinstance(mod, (QuantLinear, QuantEmbedding)):
            for leaf in mod._buffers:
                state.pop(f"{name}.{leaf}", None)
    state.update(tensors)
    doc = {"format": CHECKPOINT_FORMAT, "version": serialize.VERSION,
           "policies": [json.loads(policy.to_json())], "packed": packed,
           "modules": modules, "parameters": {}, "buffers": [], "aliases": {},
           "tensors": {n: [serialize._dtype_name(t.dtype), list(t.shape)]
                       for n, t in tensors.items()}}
    # a digest of every tensor under its name in the model (a tied one under each name): it is
    # checked against the loaded model, whatever shards and names transformers writes
    sealed = serialize.seal(doc, {n: t for n, t in state.items() if not t.is_meta})
    return state, {METADATA_KEY: json.dumps(sealed)}


def _untie(model, swapped: set):
    """transformers' tie map without the weights the packed layers no longer have (it would tie
    them after loading, or when the model is tied again)."""
    for target, source in list(model.all_tied_weights_keys.items()):
        if {target.removesuffix(".weight"), source.removesuffix(".weight")} & swapped:
            del model.all_tied_weights_keys[target]


def _stand_in(weight, parameter: bool = False, device="meta") -> torch.Tensor:
    """A tensor of ``weight``'s shape and dtype for a packed layer's weight until loading ends,
    marked so that transformers' weight init leaves it alone: on the meta device, or on
    ``device`` as one element seen through zero strides (transformers 5.25 reads the model's
    device from its first parameter while loading, and refuses the meta device)."""
    if device == "meta":
        t = torch.empty(weight.shape, dtype=weight.dtype, device="meta")
    else:
        t = torch.zeros((), dtype=weight.dtype, device=device).expand(weight.shape)
    if parameter:
        t = torch.nn.Parameter(t, requires_grad=False)
    t._is_hf_initialized = True
    return t


def layer_plan(model, policy: Policy) -> dict[str, tuple]:
    """{name: (kind, spec, axis)} of the layers ``quantize_model_`` would swap."""
    plan = {name: ("linear", spec, axis)
            for name, _, spec, axis, _ in linear_layers(model, policy, WHO)
            if spec.weight is not None}  # act-only layers stay nn.Linear
    plan.update({name: ("embedding", spec, 1)
                 for name, _, spec, _ in embedding_layers(model, policy, WHO)})
    return plan


def _read_doc(checkpoint_files) -> dict:
    """The checked metadata document, which every shard holds (save_pretrained writes it into
    each): the same in each, and matching its digest."""
    files = [os.fspath(f) for f in checkpoint_files or ()]
    if not files or not all(f.endswith(".safetensors") for f in files):
        raise QuantizedFileError(f"a blockquant checkpoint loads from safetensors files, got "
                                 f"{files or 'none'}")
    docs = {f: _shard_doc(f) for f in files}
    first, doc = next(iter(docs.items()))
    for f, other in docs.items():
        if other != doc:
            raise QuantizedFileError(f"{f}: its {METADATA_KEY!r} metadata differs from that of "
                                     f"{first}: a shard was changed after saving")
    return doc


def _shard_doc(path: str) -> dict:
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors' own error types differ between its versions
        raise QuantizedFileError(f"{path}: the file is truncated or damaged, or is not a "
                                 f"safetensors file ({type(e).__name__}: {e})") from None
    if METADATA_KEY not in meta:
        raise QuantizedFileError(
            f"{path}: config.json says quant_method 'blockquant' but the weights have no "
            f"{METADATA_KEY!r} metadata (save_pretrained of a model loaded with "
            "BlockQuantConfig writes it)")
    try:
        doc = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise QuantizedFileError(f"{path}: the {METADATA_KEY!r} metadata is not JSON ({e})"
                                 ) from None
    try:
        serialize._check_doc(doc, CHECKPOINT_FORMAT)
        serialize.verify_document(doc, RESAVE)
    except QuantizedFileError as e:
        raise QuantizedFileError(f"{path}: {e}") from None
    return doc


_OP = None



def _quantize_op():
    """The conversion op class, made on first use: transformers.core_model_loading is not
    importable while the registry module (which imports this one) is still executing."""
    global _OP
    if _OP is None:
        from transformers.core_model_loading import ConversionOps

        class BlockQuantize(ConversionOps):
            """Packs one weight as it loads and swaps its layer, as quantize_model_ does."""

            def __init__(self, quantizer):
                self.quantizer = quantizer

            def convert(self, input_dict, model=None, missing_keys=None, **kwargs):
                out, stream = {}, self.quantizer.stream
                for key in list(input_dict):
                    value = input_dict.pop(key)  # so that the float tensor dies once packed
                    value = value[0] if isinstance(value, list) else value
                    if key in self.quantizer.expert_stream:
                        self.pack_experts(key, value)
                        if missing_keys is not None:
                            missing_keys.discard(key)
                        continue
                    name = key.removesuffix(".weight")
                    if not key.endswith(".weight") or name not in stream:
                        out[key] = value  # not a weight the policy packs: loaded as usual
                        continue
                    kind, spec, axis = stream[name]
                    mod = model.get_submodule(name)
                    if tensor_parallel.is_distributed(mod.weight):  # value: this rank's shard
                        self.quantizer.meshes[name] = mod.weight.device_mesh
                    with torch.no_grad():  # in the model's dtype, as plain loading casts it
                        self.quantizer.packed[name] = tensor_parallel.quantize_weight(
                            mod.weight, spec.weight, axis, part=value.to(mod.weight.dtype))
                    mod.weight = _stand_in(mod.weight, parameter=True, device=value.device)
                    del value
                    api.give_back_freed_memory()  # the float tensor and temporaries
                    if missing_keys is not None:
                        missing_keys.discard(key)
                return out

            def pack_experts(self, name, value):
                """The fused expert tensor ``name`` packed, one expert at a time, as
                quantize_model_ packs it."""
                t, spec = self.quantizer.expert_stream[name]
                param, policy = t.module._parameters[t.attr], self.quantizer.policy
                value = value.to(param.dtype)
                if tensor_parallel.is_distributed(param):  # value: this rank's part
                    self.quantizer.packed_experts[name] = mark_expert_stack(
                        tensor_parallel.pack_experts(param, value, spec.weight, t.axis), t, spec,
                        policy)
                else:
                    self.quantizer.packed_experts[name] = pack_expert_tensor(value, t, spec,
                                                                             policy)
                t.module._parameters[t.attr] = _stand_in(param, parameter=True,
                                                         device=value.device)

        _OP = BlockQuantize
    return _OP


def _register():
    """Register both classes once (a second import, e.g. importlib.reload, finds them)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is None:
        register_quantization_config(QUANT_METHOD)(BlockQuantConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is None:
        register_quantizer(QUANT_METHOD)(BlockQuantHfQuantizer)


_register()
