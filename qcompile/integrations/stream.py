"""Quantising a transformers checkpoint too large to load in float: ``quantize_checkpoint``
(and ``python -m qcompile quantize``, docs/saving.md) reads the safetensors shards one tensor at
a time, packs each weight the policy quantises as soon as it is read and keeps only the packed
model, so memory stays about the packed model plus one float tensor (and its quantisation
temporaries), whatever the size of the float model or of its shards.

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
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import api
from ..experts import candidates as expert_candidates
from ..explain import Explanation, module_rows, uncovered
from ..passes.plan import warn_skipped
from ..policy import Policy, PolicyError
from ..serialize import QuantizedFileError
from ..swap import POLICIES_ATTR
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

    def run(self, progress: bool = True) -> Quantized:
        from tqdm.auto import tqdm

        start, model = time.perf_counter(), self.model
        holders = {}  # id(meta weight) -> the layers packing it
        for name in self.plan:
            holders.setdefault(id(model.get_submodule(name).weight), []).append(name)
        cache, packed, done = {}, {}, set()  # by (weight, format, axis); by layer; slot ids
        total = sum(_size(e) for _, h, _ in self.headers for e in h.values())
        with tqdm(total=total, unit="B", unit_scale=True, desc="quantising",
                  disable=not progress) as bar:
            for path, header, data_start in self.headers:
                with open(path, "rb") as f:
                    for key in sorted(header, key=lambda k: header[k]["data_offsets"][0]):
                        bar.set_postfix_str(key, refresh=False)
                        places = self.slots[key]
                        if id(places) not in done:  # a tied weight may be saved twice
                            done.add(id(places))
                            _load(model, read_tensor(f, header[key], data_start), places,
                                  self.plan, holders, cache, packed)
                        bar.update(_size(header[key]))

        hf.swap_packed(model, self.plan, packed)
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


STREAM_EXPERTS_REASON = (
    "it is a mixture-of-experts tensor, which the streaming command does not quantise yet: "
    "from_pretrained(..., quantization_config=qcompile.BlockQuantConfig(policy)) and "
    "quantize_model_ do")


def _warn_float_experts(model, policy: Policy):
    """Say, by name, which expert tensors the policy gives a format that the stream writes in
    full precision."""
    names = [n for n, _, _ in expert_candidates(model) if (s := policy.match(n, "linear")[1])
             is not None and s.weight is not None]
    warn_skipped("quantize_checkpoint", [(n, STREAM_EXPERTS_REASON) for n in names], id(model))


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
    _warn_float_experts(model, policy)
    if not plan:
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
    slots = _slots(model)

    headers, unknown, covered = [], [], set()
    for path in files:
        with open(path, "rb") as f:
            header, data_start = read_header(f)
        header.pop("__metadata__", None)
        for key, entry in header.items():
            if key not in slots:
                unknown.append(key)
                continue
            covered.add(id(slots[key]))
            mod, leaf, kind = slots[key][0]
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
    missing = [k for k in model.state_dict() if id(slots[k]) not in covered]
    if missing:
        raise QuantizedFileError(f"{model_dir}: the checkpoint lacks {missing[:8]}"
                                 f"{' ...' if len(missing) > 8 else ''}")
    return Job(model_dir, out_dir, policy, config, dtype, model, plan, slots, headers)


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
