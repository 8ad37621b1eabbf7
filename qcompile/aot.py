"""Ahead of time: a quantised model compiled by AOTInductor into one ``.pt2`` package.

    path = qcompile.export(model, policy, (ids,), "model.pt2", dynamic_shapes=...)
    run = qcompile.load_package("model.pt2")        # in any process: no torch.compile
    logits = run(ids)

``export`` packs the model's linear layers as ``quantize_model_`` does (in place; a model it
already quantised is taken as it is), exports it with ``torch.export`` (non-strict: the packed
layers' forward calls ``qcompile::linear``), runs the backend's CPU pass on the exported graph
(``qcompile::linear`` -> the C++ operator ``qcompile_cpu::linear`` / ``int_linear``, named by
format ids), and compiles it with ``torch._inductor.aoti_compile_and_package``. The packed codes
and scales are the package's constants; no float copy of a quantised weight is made.

The package is the AOTInductor archive plus one extra file, ``extra/qcompile.json`` (an
AOTInductor package is a zip archive; ``aoti_compile_and_package`` takes no extra files, so the
archive is copied once through torch's ``PT2ArchiveReader`` / ``PT2ArchiveWriter`` with the
record added). The record holds what a fresh process needs before the graph runs: the package
format's version, qcompile's and torch's versions, the operators' schemas, every format id the
graph names with its format key, instruction set and a digest of its tables, and a SHA-256 over
every other file of the archive and the record itself. The operators find their formats by id
in a table each process fills (codegen/cpu/operator.cpp), so ``load_package`` loads the
operator library, registers each format again from its key (checking that the id and the
tables come out the same), checks the digest, and only then hands the archive to
``torch._inductor.aoti_load_package``. Anything that does not match is refused, naming what.

Not yet: layers that would run a Python op in the package (embeddings, activation formats other
than the integer path's, formats whose tables come from side data, matmul rules, packed
experts). CUDA packages (the linear layers lowered to the Triton op ``qcompile::triton_linear``,
whose kernels AOTInductor compiles in: ``lower_to_triton_operators``) are built but refused
until a GPU run has verified them (``QCOMPILE_CUDA_EXPORT=1`` builds one; docs/export.md,
"GPU"). A C++ process registers the formats from the kernel
library and manifest the package carries (codegen/cpu/package.py; examples/cpp/). Decoding
with a KV cache: ``aot_decode.py``.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile

import torch

from . import api, config, formats
from .backend import _inductor_cache_tag
from .codegen import cpu, select
from .codegen.cpu import package as cpu_package
from .linear_rule import linear_like
from .ops import qtensor_from
from .policy import DEFAULT_POLICY_DOC, Policy, PolicyError, default_policy
from .swap import POLICIES_ATTR, quantize_model_

PACKAGE_FORMAT = 1  # the record's layout; a package of another layout is refused
RECORD = "qcompile.json"  # under the archive's extra/ folder
RECORD_PATH = f"extra/{RECORD}"
OPERATORS = ("linear", "int_linear")  # torch.ops.qcompile_cpu.<name>: the package calls them
_PYTHON_OPS = "qcompile."  # str(node.target) of the Python custom ops (qcompile::linear, ...)


class PackageError(RuntimeError):
    """A package that this process cannot run as it was exported: damaged, changed, made by
    another version, or naming formats this qcompile defines otherwise."""


# -- export ------------------------------------------------------------------------------------

def export(model: torch.nn.Module, policy: Policy | None, example_inputs, path,
           *, dynamic_shapes=None) -> str:
    """Compile ``model`` ahead of time into the AOTInductor package ``path`` (a ``.pt2``
    file); returns the path. ``policy``: the layers' formats, applied in place by
    ``quantize_model_`` (None: a model ``quantize_model_`` packed is taken as it is, any other
    gets the default policy, said once). ``example_inputs``: a tuple of the forward's
    positional arguments; ``dynamic_shapes``: as for ``torch.export.export`` (e.g.
    ``{"ids": {1: torch.export.Dim("seq", max=512)}}``). The model and inputs on the CPU
    (C++ operators); CUDA packages wait for a GPU run to verify them (docs/export.md, "GPU")."""
    return _export(model, policy, example_inputs, path, dynamic_shapes=dynamic_shapes)


def _export(model, policy, example_inputs, path, *, dynamic_shapes=None, extra=None) -> str:
    """``export``; ``extra``: more entries for the record (covered by its digest), e.g. the
    decoder's cache layout (aot_decode.py)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"qcompile.export: expected an nn.Module, got {type(model).__name__}")
    path = _package_path(path)
    example_inputs = _example_tuple(example_inputs)
    policy = _export_policy(model, policy)
    if policy is not None:
        _refuse_unexportable_policy(model, policy)
        quantize_model_(model, policy)
    _refuse_packed_experts(model)
    device = _export_device(model, example_inputs)
    with torch.no_grad():
        program = torch.export.export(model.eval(), example_inputs, dynamic_shapes=dynamic_shapes,
                                      strict=False)
        if device == "cuda":
            tables, native = lower_to_triton_operators(program), {}
        else:
            tables, native = _lower_to_cpu_operators(program, model)
    record = {**_record(tables, device), **(extra or {})}
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.TemporaryDirectory(dir=folder, prefix=".qcompile_export_") as tmp:
        raw = os.path.join(tmp, "aoti.pt2")
        from torch._inductor import aoti_compile_and_package
        with _inductor_cache_tag():
            aoti_compile_and_package(program, package_path=raw)
        _copy_with_record(raw, path, record, native)
    return path


def _package_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"qcompile.export: path must be a file path ending in .pt2, got "
                        f"{type(path).__name__}")
    path = os.fspath(path)
    if not path.endswith(".pt2"):
        raise ValueError(f"qcompile.export: the package path must end in .pt2 (AOTInductor's "
                         f"archive), got {path!r}")
    return path


def _example_tuple(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError("qcompile.export: example_inputs must be a tuple of the forward's "
                        f"positional arguments, got {type(example_inputs).__name__}")
    return tuple(example_inputs)


def _export_policy(model, policy) -> Policy | None:
    """The policy to apply, or None for a model that ``quantize_model_`` packed already."""
    if policy is None:
        if any(getattr(m, POLICIES_ATTR, ()) or getattr(m, "quantised_linear", False)
               for m in model.modules()):  # (a wrapper around a packed model too)
            return None
        config.warn(f"qcompile.export: no policy given; using the default ({DEFAULT_POLICY_DOC})",
                    once="export default policy")
        return default_policy()
    if not isinstance(policy, Policy):
        raise PolicyError(f"qcompile.export: policy must be a qcompile.Policy, got "
                          f"{type(policy).__name__}")
    return policy


def _refuse_unexportable_policy(model, policy: Policy):
    """What ``quantize_model_`` leaves to the compiled graph (activation-only layers, matmul
    rules) would run in full precision in a package: refused before any work."""
    for kind, what in (("matmul", "attention matmuls"), ("embedding", "embedding tables")):
        if kind in policy.op_kinds():
            raise NotImplementedError(f"qcompile.export: rules with op={kind!r} ({what}) are "
                                      "not exported yet; use qcompile.compile for them")
    act_only = [name for name, mod in model.named_modules() if linear_like(mod)
                and (spec := policy.match(name, "linear")[1]) is not None
                and spec.weight is None and spec.act is not None]
    if act_only:
        raise NotImplementedError(
            f"qcompile.export: the policy quantises only the activations of {act_only[:3]}"
            f"{' and more' if len(act_only) > 3 else ''}; export quantises weights (and the "
            "integer path's activations) only: give these layers a weight format too, or use "
            "qcompile.compile")


def _refuse_packed_experts(model):
    experts = [n for n, m in model.named_modules() if getattr(m, "quantised_experts", False)]
    if experts:
        raise NotImplementedError(f"qcompile.export: packed mixture-of-experts tensors "
                                  f"({experts[:3]}) are decoded outside graphs and cannot be "
                                  "exported yet; use qcompile.compile")


CUDA_EXPORT_ENV = "QCOMPILE_CUDA_EXPORT"  # =1: build CUDA packages (not yet run on a GPU)
_NO_GPU = (
    "qcompile.export: the model or its inputs are on CUDA, and this process has no CUDA device "
    "(torch {torch} {build}; torch.cuda.is_available() is False). A CUDA package needs what only "
    "a GPU gives: torch.export on real CUDA tensors, and AOTInductor's CUDA compile (Inductor "
    "compiles the Triton kernels of qcompile::triton_linear to cubins for the GPU it runs on, "
    "and builds the wrapper with the CUDA toolkit). Export on a GPU machine (docs/export.md, "
    "\"GPU\"), or move the model and its inputs to the CPU for a CPU package")
_NOT_VERIFIED = (
    "qcompile.export: CUDA packages are built (the linear layers lowered to the Triton op "
    "qcompile::triton_linear, then AOTInductor) but not yet verified on a GPU: set "
    f"{CUDA_EXPORT_ENV}=1 to build one anyway, and check it as docs/export.md (\"GPU\") says")


def _export_device(model, example_inputs) -> str:
    """The device the package is made for: "cpu" (the C++ operators) or "cuda" (the Triton
    kernels, compiled in by AOTInductor). Other devices, mixed devices and CUDA without a GPU
    (or without the opt-in, until a GPU run has verified the path) are refused."""
    tensors = [*model.parameters(), *model.buffers(),
               *(t for t in example_inputs if isinstance(t, torch.Tensor))]
    devices = sorted({t.device.type for t in tensors} - {"meta"}) or ["cpu"]
    if "cuda" in devices and not torch.cuda.is_available():
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
        raise NotImplementedError(_NO_GPU.format(torch=torch.__version__, build=build))
    if set(devices) - {"cpu", "cuda"}:
        raise NotImplementedError(f"qcompile.export: the model or its inputs are on {devices}; "
                                  "packages are made for the CPU (C++ operators) or CUDA (the "
                                  "Triton kernels): move the model and its inputs to one")
    if len(devices) > 1:
        raise ValueError(f"qcompile.export: the model and its inputs are on {devices}: move "
                         "them to one device (cpu, or cuda for a GPU package)")
    if devices == ["cuda"] and os.environ.get(CUDA_EXPORT_ENV, "0") != "1":
        raise NotImplementedError(_NOT_VERIFIED)
    return devices[0]


def _placeholder_values(program) -> dict:
    """{placeholder name: its tensor} for the exported program's parameters, buffers and
    constants (user inputs have none)."""
    values = {}
    for spec in program.graph_signature.input_specs:
        if spec.target in program.state_dict:
            values[spec.arg.name] = program.state_dict[spec.target]
        elif spec.target in program.constants:
            values[spec.arg.name] = program.constants[spec.target]
    return values


def _lower_to_cpu_operators(program, model) -> tuple[dict, dict]:
    """The backend's CPU pass on the exported graph, in place; returns the format and
    activation tables the graph's operators name (``_tables``) and the files a C++ process
    registers them from (codegen/cpu/package.py). Any Python op left is refused: a package
    runs only what its process can call without qcompile's Python ops."""
    from .passes.cpu_kernels import use_cpu_kernels
    gm = program.graph_module
    named = _placeholder_values(program)
    values = [named.get(n.name) for n in gm.graph.nodes if n.op == "placeholder"]
    use_cpu_kernels(gm, values)
    left = [n for n in gm.graph.nodes if n.op == "call_function"
            and str(n.target).startswith(_PYTHON_OPS)]
    if left:
        raise NotImplementedError("qcompile.export: " + _why_python_ops(left, named))
    tables, plans, acts = _tables(gm, named, model)
    return tables, cpu_package.native_files(_operator_schemas(), plans, acts)


def lower_to_triton_operators(program) -> dict:
    """GPU packages: the exported graph's ``qcompile::linear`` nodes -> the triton_op
    ``qcompile::triton_linear`` (passes/triton_kernels.py), in place; AOTInductor (or
    ``program.run_decompositions(decompose_custom_triton_ops=True)``) then sees their Triton
    kernels. Any Python op left (a layer with no traceable Triton kernel, an embedding, ...)
    is refused, naming the layers and why. Returns the record's tables: no CPU formats; the
    format keys the Triton kernels run."""
    from .ops import triton_linear_op
    from .passes.triton_kernels import use_triton_kernels
    triton_linear = triton_linear_op()
    gm = program.graph_module
    named = _placeholder_values(program)
    left = use_triton_kernels(gm, named)
    others = [n for n in gm.graph.nodes if n.op == "call_function"
              and str(n.target).startswith(_PYTHON_OPS) and n.target != triton_linear
              and n not in dict(left)]
    if left or others:
        said = [f"{_layer_name(n)} ({why})" for n, why in left]
        said += [f"{_layer_name(n)} ({n.target})" for n in others]
        raise NotImplementedError(
            "qcompile.export: these layers have no Triton kernel a CUDA package can compile in: "
            f"{'; '.join(said[:4])}{' and more' if len(said) > 4 else ''}")
    keys = sorted({json.loads(n.args[4])["fmt"] + (f" x {n.args[5]}" if n.args[5] else "")
                   for n in gm.graph.nodes if n.target == triton_linear})
    return {"formats": {}, "acts": {}, "triton": keys}


def _layer_name(node) -> str:
    layer = node.meta.get("nn_module_stack", {})
    return list(layer.values())[-1][0] if layer else node.name


def _why_python_ops(nodes, values) -> str:
    from .passes.cpu_kernels import _arguments
    lines = []
    for n in nodes[:4]:
        layer = n.meta.get("nn_module_stack", {})
        where = list(layer.values())[-1][0] if layer else n.name
        why = str(n.target)
        if n.target == torch.ops.qcompile.linear.default:
            a = _arguments(n)
            act = a["act_fmt"]
            q = qtensor_from(values[a["codes"].name], values[a["scales"].name],
                             [values[s.name] for s in a["side"]], a["meta"])
            choice = select.cpu_operator(q, formats.get(act) if act else None, "auto", True)
            why = f"{q.fmt.key}{' x ' + act if act else ''}: {choice.reason or 'act format'}"
        lines.append(f"{where} ({why})")
    more = f" and {len(nodes) - 4} more" if len(nodes) > 4 else ""
    return ("these layers would run qcompile's Python ops, which a package cannot call yet: "
            f"{'; '.join(lines)}{more}. Exported layers run the C++ operator: CPU, float32 / "
            "bfloat16 / float16 weights in formats whose tables depend on the format alone "
            "(no quantile codebooks, NVFP4 or proxy columns), weight-only or the integer path "
            "(int weights x int activations); embeddings stay in full precision")


def _tables(gm, values, model) -> tuple[dict, dict, dict]:
    """{"formats": {id: entry}, "acts": {id: entry}} for the ids the C++ operators name: each
    entry the format key, the instruction set and a digest of the tables registered; and the
    plans ({id: Plan}) and activation formats ({id: (format, Plan)}) behind them."""
    out, plans, acts = {"formats": {}, "acts": {}}, {}, {}
    linear, int_linear = (getattr(torch.ops.qcompile_cpu, name).default for name in OPERATORS)
    for n in gm.graph.nodes:
        if n.target not in (linear, int_linear):
            continue
        layer = _layer_of(values[n.args[1].name], model)
        plan = cpu.plan(layer.qtensor())
        fmt_id = n.args[6] if n.target == linear else n.args[4]
        if plan.op_id != fmt_id:
            raise AssertionError(f"qcompile.export: {n.name} names format {fmt_id}, its plan "
                                 f"{plan.op_id}")
        out["formats"][str(fmt_id)], plans[fmt_id] = _format_entry(plan), plan
        if n.target == int_linear:
            af = formats.get(layer.act)
            out["acts"][str(n.args[5])], acts[n.args[5]] = _act_entry(af, plan.isa), (af, plan)
    return out, plans, acts


def _layer_of(codes: torch.Tensor, model):
    """The packed layer (``QuantLinear``) that holds ``codes``."""
    for mod in model.modules():
        if getattr(mod, "quantised_linear", False) and mod.codes is codes:
            return mod
    raise AssertionError("qcompile.export: a qcompile_cpu operator reads codes no packed layer "
                         "holds")


def _format_entry(plan) -> dict:
    return {"format": plan.fmt.key, "isa": plan.isa, "tables": table_digest(plan)}


def _act_entry(af, isa: str) -> dict:
    return {"format": af.key, "isa": isa, "tables": act_digest(af)}


def table_digest(plan) -> str:
    """SHA-256 of everything ``Plan.register`` hands the operator library for a format."""
    h = hashlib.sha256()
    h.update(plan.table.numpy().tobytes())
    if plan.mult_table is not None:
        h.update(plan.mult_table.numpy().tobytes())
    h.update(json.dumps([plan.bits, plan.scale, plan.dec, plan.maxv, plan.step, plan.wstep,
                         plan.int_fn is not None]).encode())
    return h.hexdigest()


def act_digest(af) -> str:
    """SHA-256 of the fields an activation format of the integer path is registered with."""
    params = cpu.act_params(af, af.block_size)
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def _version() -> str:
    return sys.modules[__package__].__version__  # (the package, always imported before this)


def _record(tables: dict, device: str = "cpu") -> dict:
    """The record's fields; a CUDA package calls no qcompile operator (its Triton kernels are
    compiled in), so it names none."""
    operators = _operator_schemas() if device == "cpu" else {}
    return {"package_format": PACKAGE_FORMAT, "qcompile": _version(), "device": device,
            "torch": torch.__version__, "operators": operators, **tables}


def _operator_schemas() -> dict:
    cpu.op_library()
    return {name: str(getattr(torch.ops.qcompile_cpu, name).default._schema)
            for name in OPERATORS}


# -- the archive and its digest ----------------------------------------------------------------

def _copy_with_record(raw: str, path: str, record: dict, extra_files: dict | None = None):
    """``raw``'s files and ``extra_files`` ({archive entry: bytes}, e.g. the C++ registration's
    manifest) in a new archive at ``path`` (written beside it, then renamed into place), with
    the record and its digest added. One file of ``raw`` in memory at a time."""
    extra_files = extra_files or {}
    from torch.export.pt2_archive import PT2ArchiveReader, PT2ArchiveWriter
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.{os.getpid()}.tmp.pt2")
    try:
        with PT2ArchiveReader(raw) as reader, PT2ArchiveWriter(tmp) as writer:
            digest = hashlib.sha256()
            for name in sorted(set(_payload_names(reader)) | set(extra_files)):
                data = extra_files[name] if name in extra_files else reader.read_bytes(name)
                _digest_file(digest, name, data)
                writer.write_bytes(name, data)
            record = dict(record, digest=_digest_record(digest, record))
            writer.write_string(RECORD_PATH, json.dumps(record, indent=1, sort_keys=True))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _payload_names(reader) -> list[str]:
    """The archive's files that the digest covers, sorted: all but the record and the zip
    writer's own ``.data/`` entries (a fresh serialization id each time it writes)."""
    return sorted(n for n in reader.get_file_names()
                  if not n.startswith(".data/") and n != RECORD_PATH)


def _digest_file(h, name: str, data: bytes):
    h.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)


def _digest_record(h, record: dict) -> str:
    """The digest: SHA-256 over the files (``_digest_file``, by name) and then the record
    without its digest field."""
    rest = {k: v for k, v in record.items() if k != "digest"}
    h.update(json.dumps(rest, sort_keys=True).encode())
    return h.hexdigest()


def _read_record(path: str) -> dict:
    """The record of the package at ``path``, checked against the digest of its files (read one
    at a time). A file torch cannot read as an archive, one without qcompile's record, or one
    whose bytes changed is refused."""
    from torch.export.pt2_archive import PT2ArchiveReader
    try:
        with PT2ArchiveReader(path) as reader:
            if RECORD_PATH not in reader.get_file_names():
                raise PackageError(f"qcompile.load_package: {path} has no {RECORD_PATH}: it was "
                                   "not made by qcompile.export (a plain AOTInductor package "
                                   "loads with torch._inductor.aoti_load_package)")
            record = _parse_record(path, reader.read_bytes(RECORD_PATH))
            digest = hashlib.sha256()
            for name in _payload_names(reader):
                _digest_file(digest, name, reader.read_bytes(name))
    except (RuntimeError, AssertionError) as err:  # (torch's reader: a wrong archive format)
        if isinstance(err, PackageError):
            raise
        raise PackageError(f"qcompile.load_package: {path} is damaged or not a .pt2 archive "
                           f"(torch's reader: {str(err).splitlines()[0]})") from err
    _check_format(path, record)
    if record.get("digest") != _digest_record(digest, record):
        raise PackageError(f"qcompile.load_package: {path} was damaged or changed after export: "
                           "the SHA-256 of its files does not match the digest recorded in "
                           f"{RECORD_PATH}")
    return record


def _parse_record(path: str, data: bytes) -> dict:
    try:
        record = json.loads(data)
    except ValueError as err:
        raise PackageError(f"qcompile.load_package: {path}'s {RECORD_PATH} is not JSON: it "
                           "was damaged or changed") from err
    if not isinstance(record, dict):
        raise PackageError(f"qcompile.load_package: {path}'s {RECORD_PATH} is not a record: it "
                           "was damaged or changed")
    return record


def _check_format(path: str, record: dict):
    if record.get("package_format") != PACKAGE_FORMAT:
        raise PackageError(f"qcompile.load_package: {path} has package format "
                           f"{record.get('package_format')!r}; this qcompile reads "
                           f"{PACKAGE_FORMAT}: export the model again")


# -- load --------------------------------------------------------------------------------------

class LoadedPackage:
    """The callable ``load_package`` returns: the AOTInductor model, with the formats its
    operators name registered in this process. ``record``: the package's qcompile record."""

    def __init__(self, runner, record: dict, plans: list):
        self.runner, self.record = runner, record
        self._plans = plans  # the registered formats' plans (their tables live in the library)

    def __call__(self, *args, **kwargs):
        with torch.no_grad():
            return self.runner(*args, **kwargs)

    def __repr__(self):
        keys = sorted({e["format"] for e in self.record["formats"].values()})
        return f"LoadedPackage(formats={keys}, qcompile={self.record['qcompile']})"


def load_package(path) -> LoadedPackage:
    """Load a package made by ``qcompile.export``: check its digest, versions and operator
    schemas, load the C++ operator library, register the formats it names (each must come out
    with the id and tables recorded), then load it with AOTInductor. Raises ``PackageError``
    naming the first thing that does not match. No torch.compile, no Dynamo."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"qcompile.load_package: no file {path!r}")
    record = _read_record(path)
    _check_versions(path, record)
    plans = _register_formats(path, record)
    from torch._inductor import aoti_load_package
    return LoadedPackage(aoti_load_package(path), record, plans)


def _check_versions(path: str, record: dict):
    if record.get("qcompile") != _version():
        raise PackageError(f"qcompile.load_package: {path} was exported by qcompile "
                           f"{record.get('qcompile')}, this is {_version()}: export "
                           "the model again with this version")
    if record.get("torch") != torch.__version__:
        config.warn(f"qcompile.load_package: {path} was compiled with torch "
                    f"{record.get('torch')}, this is {torch.__version__} (AOTInductor's C "
                    "interface usually loads it; export again if it fails)",
                    once=("torch version", path))
    if record.get("device", "cpu") == "cuda":
        _check_cuda_package(path, record)
        return
    try:
        schemas = _operator_schemas()
    except Exception as err:  # a missing compiler, a failed build: say what the package needs
        raise PackageError(f"qcompile.load_package: {path} calls the qcompile_cpu operators, "
                           f"and their library could not be loaded: {err}") from err
    if record.get("operators") != schemas:
        raise PackageError(f"qcompile.load_package: {path} calls operators "
                           f"{record.get('operators')}, this qcompile defines {schemas}: "
                           "export the model again")


def _check_cuda_package(path: str, record: dict):
    """A CUDA package calls no qcompile operator (AOTInductor compiled its Triton kernels in):
    it needs a CUDA device, and a record naming no operators."""
    if record.get("operators"):
        raise PackageError(f"qcompile.load_package: {path} is a CUDA package that names "
                           f"operators {sorted(record['operators'])}: it was damaged or changed")
    if not torch.cuda.is_available():
        raise PackageError(f"qcompile.load_package: {path} is a CUDA package (Triton kernels "
                           "compiled for a GPU), and this process has no CUDA device: load it on "
                           "a GPU machine, or export a CPU package")


def _register_formats(path: str, record: dict) -> list:
    """Register every format and activation format the package names, as ``export`` did;
    each must come out with the recorded id and tables."""
    isa = cpu.chosen_isa()
    plans = []
    for fmt_id, entry in record.get("formats", {}).items():
        _check_isa(path, entry, isa)
        fmt_plan = _format_plan(path, _known_format(path, entry))
        got = fmt_plan.register()
        if str(got) != fmt_id or table_digest(fmt_plan) != entry["tables"]:
            raise PackageError(f"qcompile.load_package: format {entry['format']!r} of {path} "
                               "does not match this qcompile's: its tables (or id) differ from "
                               f"the ones recorded at export (id {fmt_id}, here {got}); export "
                               "the model again with this version")
        plans.append(fmt_plan)
    for act_id, entry in record.get("acts", {}).items():
        _check_isa(path, entry, isa)
        af = _known_format(path, entry)
        got = plans[0].register_act(af) if plans else None
        if str(got) != act_id or act_digest(af) != entry["tables"]:
            raise PackageError(f"qcompile.load_package: activation format {entry['format']!r} "
                               f"of {path} does not match this qcompile's (id {act_id}, here "
                               f"{got}); export the model again with this version")
    return plans


def _check_isa(path: str, entry: dict, isa: str):
    if entry.get("isa") != isa:
        raise PackageError(f"qcompile.load_package: {path} was exported for the {entry.get('isa')}"
                           f" CPU kernels, this process chooses {isa}: set QCOMPILE_CPU_ISA="
                           f"{entry.get('isa')} if this CPU has it, or export on this machine")


def _known_format(path: str, entry: dict):
    try:
        return formats.get(entry["format"])
    except (KeyError, ValueError) as err:
        raise PackageError(f"qcompile.load_package: {path} names format {entry.get('format')!r},"
                           f" which this qcompile does not know ({err})") from err


def _format_plan(path: str, fmt):
    """The CPU plan (kernels and tables) of ``fmt``, made from a one-block stand-in weight."""
    try:
        return cpu.plan(api.quantize_weight(torch.zeros(1, fmt.block_size), fmt, 1))
    except (ValueError, NotImplementedError) as err:  # e.g. a format the CPU kernels lack
        raise PackageError(f"qcompile.load_package: {path} names format {fmt.key!r}, which the "
                           f"CPU operator cannot run here ({err})") from err
