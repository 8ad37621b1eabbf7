"""Quantising a transformers checkpoint too large to load in float: ``quantize_checkpoint``
(and ``python -m qcompile quantize``, docs/saving.md) reads the safetensors shards one tensor at
a time, packs each weight the policy quantises as soon as it is read and keeps only the packed
model, so memory stays about the packed model plus one float tensor (and its quantisation
temporaries), whatever the size of the float model or of its shards.

Mixture-of-experts tensors (qcompile.experts) are packed too, as ``quantize_model_`` packs
them: a fused 3-d checkpoint tensor [E, a, b] as it is read; per-expert checkpoint tensors
(``experts.0.gate_proj.weight``, which transformers' conversion mapping stacks, and
concatenates, into ``experts.gate_up_proj`` while loading) expert by expert, each expert's
matrix packed as soon as its parts are read, so memory stays one expert's matrix. The
conversions the stream does are those stacks and concatenations and transformers' renamings;
any other conversion is refused by name.

The output folder is what ``save_pretrained`` writes for a model loaded with
``BlockQuantConfig(policy)``: ``from_pretrained(out)`` (after ``import qcompile``) gives the
model that ``from_pretrained(model_dir)`` followed by ``quantize_model_(model, policy)`` makes,
bit for bit. The model is built from config.json on the meta device (no memory); shards are
read with plain file reads rather than memory-mapped, so untouched and finished shards never
count as resident memory.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import api
from ..expert_stack import PackedExperts
from ..expert_stack import install as install_experts
from ..explain import Explanation, module_rows, uncovered
from ..policy import Policy, PolicyError
from ..serialize import QuantizedFileError
from ..swap import POLICIES_ATTR, expert_layers, mark_expert_stack, pack_expert_tensor
from . import hf

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
# the safetensors dtype names (https://github.com/huggingface/safetensors, "Format")
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
NAMES = {v: k for k, v in DTYPES.items()}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


@dataclass
class Quantized:
    """What ``quantize_checkpoint`` did: the packed layers and the sizes."""
    explanation: Explanation
    input_bytes: int  # the float checkpoint's weight files
    output_bytes: int  # the packed model.safetensors
    seconds: float

    def __str__(self) -> str:
        mib = lambda n: f"{n / 2**20:.1f} MiB"
        return (f"{self.explanation}\nweights on disk: {mib(self.input_bytes)} -> "
                f"{mib(self.output_bytes)} ({self.input_bytes / self.output_bytes:.2f}x "
                f"smaller), in {self.seconds:.1f} s")


# -- safetensors, read and written without mapping the file -----------------------------------

def read_header(f) -> tuple[dict, int]:
    """(header, offset of the data) of the open safetensors file ``f``."""
    raw = f.read(8)
    if len(raw) != 8:
        raise QuantizedFileError(f"{f.name}: the file is truncated or damaged (shorter than the "
                                 "8 bytes of a safetensors header's length)")
    (size,) = struct.unpack("<Q", raw)
    try:
        header = json.loads(f.read(size))
    except (json.JSONDecodeError, UnicodeDecodeError, MemoryError) as e:
        raise QuantizedFileError(f"{f.name}: the file is truncated or damaged, or is not a "
                                 f"safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise QuantizedFileError(f"{f.name}: the file is truncated or damaged, or is not a "
                                 "safetensors file (its header is not a JSON object)")
    return header, 8 + size


def read_tensor(f, entry: dict, data_start: int) -> torch.Tensor:
    """One tensor of a safetensors header entry, read into fresh memory."""
    dtype, shape, (begin, end) = DTYPES.get(entry["dtype"]), entry["shape"], entry["data_offsets"]
    if dtype is None:
        raise QuantizedFileError(f"{f.name}: unsupported dtype {entry['dtype']!r} (known: "
                                 f"{sorted(DTYPES)})")
    t = torch.empty(shape, dtype=dtype)
    if t.numel() * t.element_size() != end - begin:
        raise QuantizedFileError(f"{f.name}: a {entry['dtype']} tensor of shape {shape} cannot "
                                 f"hold {end - begin} bytes")
    f.seek(data_start + begin)
    if f.readinto(t.view(-1).view(torch.uint8).numpy()) != end - begin:
        raise QuantizedFileError(f"{f.name}: the file ends inside a tensor")
    return t


def write_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
    """Write ``tensors`` as one safetensors file, streaming each tensor's bytes (no copy of
    the whole file in memory, as safetensors.torch.save_file would make)."""
    header, offset = {"__metadata__": metadata}, 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            f.write(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())


# -- the checkpoint ---------------------------------------------------------------------------

def shard_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files, in the index's order."""
    if (model_dir / INDEX).exists():
        weight_map = json.loads((model_dir / INDEX).read_text())["weight_map"]
        return [model_dir / f for f in dict.fromkeys(weight_map.values())]
    if (model_dir / WEIGHTS).exists():
        return [model_dir / WEIGHTS]
    others = sorted(p.name for p in model_dir.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    raise QuantizedFileError(
        f"{model_dir}: no {WEIGHTS} or {INDEX}; quantize_checkpoint reads safetensors "
        f"checkpoints only (found {others or 'no weight files'}; save_pretrained writes "
        "safetensors)")


def _meta_model(config, dtype):
    import transformers
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = cls._from_config(config, dtype=dtype)
    model.tie_weights()
    return model.eval()


def _slots(model) -> dict[str, list[tuple]]:
    """{state name: [(module, leaf, kind), ...]}: every place a tensor of that name lives
    (several for a tied weight), under each of its names."""
    by_id, slots = {}, {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for kind, store in (("parameter", mod._parameters), ("buffer", mod._buffers)):
            for leaf, t in store.items():
                if t is not None:
                    by_id.setdefault(id(t), []).append(
                        (f"{mod_name}.{leaf}" if mod_name else leaf, mod, leaf, kind))
    for places in by_id.values():
        unique = list(dict.fromkeys((m, leaf, kind) for _, m, leaf, kind in places))
        for name, *_ in places:
            slots[name] = unique
    return slots


def quantize_checkpoint(model_dir, out_dir, policy: Policy, dtype: torch.dtype | None = None,
                        progress: bool = True) -> Quantized:
    """Quantise the transformers checkpoint in ``model_dir`` with ``policy``, tensor by tensor,
    into ``out_dir`` (config.json with the quantization_config, one packed model.safetensors,
    and the folder's other files: tokenizer, generation config). ``dtype``: the dtype the
    weights are packed from (default: config.json's, as ``from_pretrained`` loads them)."""
    return prepare(model_dir, out_dir, policy, dtype).run(progress)


@dataclass
class Job:
    """A checkpoint checked against the model its config.json builds (on the meta device),
    ready to quantise: ``prepare`` does every check that needs no tensor data."""
    model_dir: Path
    out_dir: Path
    policy: Policy
    config: object
    dtype: torch.dtype
    model: torch.nn.Module
    plan: dict  # hf.layer_plan: the layers to pack
    slots: dict  # _slots: where each tensor goes
    headers: list  # (path, safetensors header, data offset) per shard
    experts: dict  # {expert tensor name: (ExpertTensor, spec)} to pack
    routes: dict  # {checkpoint key: model key, or the Piece of an expert tensor it is}

    def run(self, progress: bool = True) -> Quantized:
        from tqdm.auto import tqdm

        start, model = time.perf_counter(), self.model
        holders = {}  # id(meta weight) -> the layers packing it
        for name in self.plan:
            holders.setdefault(id(model.get_submodule(name).weight), []).append(name)
        cache, packed, done = {}, {}, set()  # by (weight, format, axis); by layer; slot ids
        experts = _ExpertAssembly(model, self.experts, self.policy)
        total = sum(_size(e) for _, h, _ in self.headers for e in h.values())
        with tqdm(total=total, unit="B", unit_scale=True, desc="quantising",
                  disable=not progress) as bar:
            for path, header, data_start in self.headers:
                with open(path, "rb") as f:
                    for key in sorted(header, key=lambda k: header[k]["data_offsets"][0]):
                        bar.set_postfix_str(key, refresh=False)
                        route = self.routes[key]
                        if isinstance(route, Piece):
                            experts.add(route, read_tensor(f, header[key], data_start))
                        elif route in self.experts:  # a fused expert tensor
                            experts.add_fused(route, read_tensor(f, header[key], data_start))
                        elif id(self.slots[route]) not in done:  # a tied weight may be saved
                            done.add(id(self.slots[route]))  # twice
                            _load(model, read_tensor(f, header[key], data_start),
                                  self.slots[route], self.plan, holders, cache, packed)
                        bar.update(_size(header[key]))

        hf.swap_packed(model, self.plan, packed)
        experts.install()
        setattr(model, POLICIES_ATTR, (self.policy,))
        hf._untie(model, set(self.plan))
        state, metadata = hf.checkpoint_state(model, self.policy)
        still_meta = [k for k, t in state.items() if t.is_meta]
        if still_meta:  # a persistent buffer no checkpoint holds: from_pretrained would fail
            raise QuantizedFileError(f"{self.model_dir}: the checkpoint lacks {still_meta[:8]}")

        self.out_dir.mkdir(parents=True, exist_ok=True)
        for p in self.model_dir.iterdir():  # tokenizer, generation config, ...
            if p.is_file() and p.name not in ("config.json", INDEX) \
                    and not p.name.endswith(WEIGHT_SUFFIXES):
                shutil.copy2(p, self.out_dir / p.name)
        self.config.quantization_config = hf.BlockQuantConfig(self.policy)
        self.config.dtype = self.dtype
        self.config.save_pretrained(self.out_dir)
        written = _deduplicated(model, state)
        write_safetensors(self.out_dir / WEIGHTS, written, {"format": "pt", **metadata})
        held = sum(t.numel() * t.element_size() for t in written.values())  # a tied one once
        rows = module_rows(model)
        return Quantized(Explanation(rows, held, uncovered(model, rows)),
                         sum(os.path.getsize(p) for p, _, _ in self.headers),
                         os.path.getsize(self.out_dir / WEIGHTS), time.perf_counter() - start)


def _size(entry: dict) -> int:
    return entry["data_offsets"][1] - entry["data_offsets"][0]


@dataclass(frozen=True)
class Piece:
    """A per-expert checkpoint tensor: part ``part`` of ``parts`` (concatenated along the
    matrix axis ``axis`` when several) of expert ``expert``'s matrix of the expert tensor
    ``target``."""
    target: str
    expert: int
    part: int
    parts: int
    axis: int


class _ExpertAssembly:
    """Expert tensors as they stream in: a fused tensor packed at once, per-expert pieces joined
    into each expert's matrix and packed as soon as it is whole (float expert tensors are
    filled in place)."""

    def __init__(self, model, experts: dict, policy: Policy):
        self.model, self.experts, self.policy = model, experts, policy
        self.pending: dict[tuple, dict] = {}  # (target, expert) -> {part: tensor}
        self.stacks: dict[str, dict] = {}  # target -> {expert: QTensor}
        self.done: dict[str, PackedExperts] = {}

    def _param(self, name):
        prefix, _, attr = name.rpartition(".")
        return self.model.get_submodule(prefix), attr

    def add_fused(self, name: str, t: torch.Tensor):
        mod, attr = self._param(name)
        t = t.to(mod._parameters[attr].dtype)
        self.done[name] = pack_expert_tensor(t, *self.experts[name], self.policy)

    def add(self, piece: Piece, t: torch.Tensor):
        parts = self.pending.setdefault((piece.target, piece.expert), {})
        parts[piece.part] = t
        if len(parts) < piece.parts:
            return
        del self.pending[(piece.target, piece.expert)]
        matrix = torch.cat([parts[j] for j in range(piece.parts)], dim=piece.axis - 1)
        mod, attr = self._param(piece.target)
        meta = mod._parameters[attr]
        matrix = matrix.to(meta.dtype)  # as from_pretrained casts it
        if piece.target not in self.experts:  # kept in float: filled in place
            if meta.is_meta:
                meta = torch.nn.Parameter(torch.empty(meta.shape, dtype=meta.dtype),
                                          requires_grad=meta.requires_grad)
                mod._parameters[attr] = meta
            with torch.no_grad():
                meta[piece.expert] = matrix
            return
        t_, spec = self.experts[piece.target]
        stack = self.stacks.setdefault(piece.target, {})
        with torch.no_grad():
            stack[piece.expert] = api.quantize_weight(matrix, spec.weight, t_.axis - 1)
        if len(stack) == meta.shape[0]:
            qs = [stack.pop(e) for e in range(meta.shape[0])]
            self.done[piece.target] = mark_expert_stack(PackedExperts(qs, t_.axis), t_, spec,
                                                        self.policy)

    def install(self):
        for name, packed in self.done.items():
            install_experts(*self._param(name), packed)


def _conversions(model):
    """transformers' (renamings, converters) for ``model``'s checkpoints, as from_pretrained
    applies them."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming
    mapping = get_model_conversion_mapping(model)
    return ([c for c in mapping if isinstance(c, WeightRenaming)],
            [c for c in mapping if isinstance(c, WeightConverter)])


def _route(key: str, slots: dict, conversions, model_dir) -> "str | Piece | None":
    """Where the checkpoint tensor ``key`` goes: a model key (renamed as from_pretrained renames
    it), the Piece of an expert tensor it is, or None (not in the model)."""
    from transformers.core_model_loading import Concatenate, MergeModulelist, rename_source_key
    if key in slots:
        return key
    renamings, converters = conversions
    renamed, pattern = rename_source_key(key, renamings, converters)
    if renamed not in slots:
        return None
    if pattern is None:
        return renamed
    conv = next(c for c in converters if pattern in c.source_patterns)
    ops = list(conv.operations)
    kinds = [type(op) for op in ops]
    if kinds not in ([MergeModulelist], [MergeModulelist, Concatenate]) or ops[0].dim != 0 \
            or (len(ops) == 2 and ops[1].dim not in (1, 2)):
        raise QuantizedFileError(
            f"{model_dir}: transformers converts checkpoint tensor {key!r} into {renamed!r} with "
            f"{[k.__name__ for k in kinds]}, which the streaming command does not do (it stacks "
            "per-expert tensors and concatenates them along a matrix axis); quantise it with "
            "from_pretrained(path, quantization_config=qcompile.BlockQuantConfig(policy))")
    glob = re.escape(pattern).replace(r"\*", r"(\d+)")
    expert = int(re.search(glob, key).group(1))
    return Piece(renamed, expert, conv.source_patterns.index(pattern), len(conv.source_patterns),
                 ops[1].dim if len(ops) == 2 else 1)


def _check_pieces(pieces: dict, slots: dict, model_dir) -> set:
    """Each expert tensor built from per-expert pieces gets every part of every expert once,
    of shapes that join into its matrix; returns the model keys they cover."""
    by_target: dict[str, dict] = {}
    for key, (piece, shape) in pieces.items():
        by_target.setdefault(piece.target, {})[(piece.expert, piece.part)] = (key, shape)
    for target, got in by_target.items():
        mod, leaf, _ = slots[target][0]
        n, *matrix = mod._parameters[leaf].shape
        piece = next(p for p, _ in pieces.values() if p.target == target)
        lacking = [(e, j) for e in range(n) for j in range(piece.parts) if (e, j) not in got]
        if lacking:
            raise QuantizedFileError(f"{model_dir}: the checkpoint lacks part {lacking[0][1]} of "
                                     f"expert {lacking[0][0]} of {target!r}")
        along = piece.axis - 1  # the matrix axis the parts are concatenated along
        for e in range(n):
            keys = [got[(e, j)][0] for j in range(piece.parts)]
            shapes = [got[(e, j)][1] for j in range(piece.parts)]
            rest = [[d for i, d in enumerate(s) if i != along] for s in [*shapes, matrix]]
            if any(len(s) != len(matrix) for s in shapes) or any(r != rest[-1] for r in rest) \
                    or sum(s[along] for s in shapes) != matrix[along]:
                raise QuantizedFileError(
                    f"{model_dir}: the checkpoint's tensors {keys} of shapes {shapes} do not "
                    f"make expert {e}'s matrix {list(matrix)} of {target!r}")
    return set(by_target)


def prepare(model_dir, out_dir, policy: Policy, dtype: torch.dtype | None = None) -> Job:
    """Every check of ``quantize_checkpoint`` that needs no tensor data: the folders, the
    policy, and each tensor's name and shape against the model config.json builds."""
    import transformers

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not isinstance(policy, Policy):
        raise PolicyError(f"quantize_checkpoint: policy must be a qcompile.Policy, got "
                          f"{type(policy).__name__}")
    if not (model_dir / "config.json").is_file():
        raise QuantizedFileError(f"{model_dir}: not a transformers model folder (no config.json)")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise QuantizedFileError(f"{out_dir}: exists and is not an empty folder; choose a new "
                                 "output folder")
    files = shard_files(model_dir)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = _meta_model(config, dtype)
    plan = hf.layer_plan(model, policy)
    experts = {t.name: (t, spec) for t, spec in
               expert_layers(model, policy, "quantize_checkpoint", meta_stand_ins=True)}
    if not plan and not experts:
        raise PolicyError(f"quantize_checkpoint: the policy quantises no layer of this "
                          f"{type(model).__name__}: {policy!r}")
    proxied = [n for n, (_, spec, _) in plan.items() if spec.weight.proxy is not None]
    if proxied:
        raise PolicyError(
            f"quantize_checkpoint: {proxied[0]!r} gets {plan[proxied[0]][1].weight.key}, whose "
            "proxy columns are scored from other layers' full-precision weights, which a "
            "stream of one tensor at a time does not hold; load the model with "
            "from_pretrained(..., quantization_config=qcompile.BlockQuantConfig(policy)) and "
            "save_pretrained it instead")
    slots, conversions = _slots(model), _conversions(model)

    headers, unknown, covered, routes, pieces = [], [], set(), {}, {}
    for path in files:
        with open(path, "rb") as f:
            header, data_start = read_header(f)
        header.pop("__metadata__", None)
        for key, entry in header.items():
            route = routes[key] = _route(key, slots, conversions, model_dir)
            if route is None:
                unknown.append(key)
                continue
            if isinstance(route, Piece):
                pieces[key] = (route, list(entry.get("shape", ())))
                continue
            covered.add(id(slots[route]))
            mod, leaf, kind = slots[route][0]
            want = tuple((mod._parameters if kind == "parameter" else mod._buffers)[leaf].shape)
            if tuple(entry.get("shape", ())) != want:
                raise QuantizedFileError(
                    f"{path.name}: tensor {key!r} has shape {tuple(entry.get('shape', ()))} in "
                    f"the checkpoint, {want} in the model config.json builds")
        headers.append((path, header, data_start))
    if unknown:
        raise QuantizedFileError(
            f"{model_dir}: tensors {unknown[:8]}{' ...' if len(unknown) > 8 else ''} are not "
            f"in the {type(model).__name__} that config.json builds (transformers renames some "
            "checkpoints' keys while loading: quantise those with from_pretrained(path, "
            "quantization_config=qcompile.BlockQuantConfig(policy)))")
    covered |= {id(slots[k]) for k in _check_pieces(pieces, slots, model_dir)}
    missing = [k for k in model.state_dict() if id(slots[k]) not in covered]
    if missing:
        raise QuantizedFileError(f"{model_dir}: the checkpoint lacks {missing[:8]}"
                                 f"{' ...' if len(missing) > 8 else ''}")
    return Job(model_dir, out_dir, policy, config, dtype, model, plan, slots, headers, experts,
               routes)


def _load(model, t, places, plan, holders, cache, packed):
    """Put one checkpoint tensor in place: packed for every layer the plan packs it for, and
    kept in float where any other module holds it (an embedding tied to a packed lm_head)."""
    mod, leaf, kind = places[0]
    meta = mod._parameters[leaf] if kind == "parameter" else mod._buffers[leaf]
    if t.is_floating_point():
        t = t.to(meta.dtype)  # as from_pretrained casts it
    packers = holders.get(id(meta), [])
    for name in packers:
        _, spec, axis = plan[name]
        key = (id(meta), spec.weight.key, axis)
        if key not in cache:  # one packed tensor per (weight, format, axis), as quantize_model_
            with torch.no_grad():
                cache[key] = api.quantize_weight(t, spec.weight, axis)
        packed[name] = cache[key]
    owners = {id(model.get_submodule(name)) for name in packers}
    if all(id(m) in owners for m, _, _ in places):
        return  # only packed layers read it: no float copy is kept
    if kind == "parameter":
        t = torch.nn.Parameter(t, requires_grad=meta.requires_grad)
    for m, lf, _ in places:
        (m._parameters if kind == "parameter" else m._buffers)[lf] = t


def _deduplicated(model, state: dict) -> dict:
    """The state dict with a tied tensor once, under the name save_pretrained keeps."""
    out, seen = {}, set()
    for name, t in state.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr and ptr in seen and name in model.all_tied_weights_keys:
            continue
        seen.add(ptr)
        out[name] = t
    return out
