"""The ``blockquant`` torch.compile backend.

    qcompile.compile(model, policy, **options)                     # in place: forward, generate
    model.compile(backend="blockquant", options={"policy": policy, ...})     # the same
    torch.compile(model, backend="blockquant", options={...})      # a wrapper: its forward only

``torch.compile(model)`` returns a wrapper whose ``generate`` (and every other method) calls the
original module, uncompiled; compiling in place compiles what ``generate`` calls too.

Options: ``policy`` (a qcompile.Policy; default weight-only nf4, said once), ``lowering``
("inductor" default, or "eager"), ``kernels`` ("auto": the generated Triton kernels on CUDA
tensors, the generated C++ kernels on CPU ones; "triton"; "cpu"; "reference": with the eager
lowering, bit-exact with ``fake_quantize_model_``; the environment variable QCOMPILE_KERNELS
overrides it), ``mode`` (Inductor's mode: torch.compile does not
take ``mode`` and ``options`` together, so it goes inside options) and ``cpp_wrapper`` (False by
default; True: Inductor writes each graph's wrapper, the code that calls its kernels, in C++
rather than Python, which costs less per call; see docs/architecture.md).

The backend validates the options, runs the six passes in ``qcompile.passes`` (find -> plan ->
quantise weights -> rewrite -> fuse -> use CPU kernels), then lowers the graph with Inductor or
runs it eagerly.
Packed weights are extra graph inputs supplied by ``CompiledGraph``, so Inductor sees ordinary
tensors; before each call it checks that the weights they were packed from did not change
(``load_state_dict``), and packs them again if they did.

Never silent: Dynamo splitting a frame at a graph break (the code between graphs runs eagerly,
in full precision), a graph with nothing to quantise, layers left alone for their dtype (float64
after ``.double()``), a frame Dynamo gives up on after its recompile limit (it then runs eagerly,
never reaching the backend), a copy of a model compiled in place (it runs uncompiled): each is
said once. A graph that takes more than ``config.PROGRESS_AFTER_S`` to compile says on stderr
what it compiles.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import sys
import threading
import time
import types
import weakref

import torch

from qcompile import passes
from qcompile.passes.graph import copy_graph_module, graph_record
from qcompile.passes.names import frame_description, names_for, remember_root
from qcompile.passes.plan import left_alone, planned as planned_sites, warn_float_experts, \
    warn_unmatched
from qcompile.passes.report import site_rows

from . import config, ops, tensor_parallel
from .linear_rule import forward_beyond_linear, linear_like
from .codegen import cpu, select
from .experts_call import route_packed_experts
from .policy import DEFAULT_POLICY_DOC, Policy, PolicyError, default_policy
from .swap import QuantEmbedding, QuantLinear, quantize_experts_

LOWERINGS = ("inductor", "eager")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
OPTION_NAMES = ("policy", "lowering", "kernels", "mode", "cpp_wrapper")


def parse_options(options, example_inputs=None) -> dict:
    """Validate the backend options; returns a dict with policy, lowering, impl (the
    ``kernels`` choice, which the environment variable QCOMPILE_KERNELS overrides, under the
    name the ops' ``impl`` argument gives it) and mode."""
    options = dict(options or {})
    unknown = set(options) - set(OPTION_NAMES)
    if unknown:
        raise ValueError(f"blockquant: unknown option(s) {sorted(unknown)}; "
                         f"known: {', '.join(OPTION_NAMES)}")
    policy = options.get("policy")
    if policy is None:
        config.warn(f"blockquant: no policy given; using the default ({DEFAULT_POLICY_DOC})",
                    once="default policy")
        policy = default_policy()
    elif not isinstance(policy, Policy):
        raise PolicyError(f"blockquant: options['policy'] must be a qcompile.Policy, got "
                          f"{type(policy).__name__}")
    lowering = options.get("lowering", "inductor")
    if lowering not in LOWERINGS:
        raise ValueError(f"blockquant: lowering must be one of {LOWERINGS}, got {lowering!r}")
    kernels = options.get("kernels", "auto")
    if kernels not in config.KERNELS:
        raise ValueError(f"blockquant: kernels must be one of {config.KERNELS}, got "
                         f"{kernels!r}")
    kernels = config.kernels_override() or kernels  # the environment overrides the option
    if kernels == "triton":
        _check_triton_can_run(example_inputs)
    mode = options.get("mode") or "default"
    if mode not in MODES:
        raise ValueError(f"blockquant: mode must be one of {MODES}, got {mode!r}")
    if mode != "default" and lowering == "eager":
        raise ValueError(f"blockquant: mode={mode!r} is an Inductor mode; it needs "
                         "lowering='inductor'")
    cpp_wrapper = options.get("cpp_wrapper", False)
    if cpp_wrapper not in (True, False):
        raise ValueError(f"blockquant: cpp_wrapper must be True or False, got {cpp_wrapper!r}")
    if cpp_wrapper and lowering == "eager":
        raise ValueError("blockquant: cpp_wrapper=True is an Inductor setting; it needs "
                         "lowering='inductor'")
    # "auto" is resolved per call by the ops: Triton for CUDA tensors, C++ for CPU ones
    return {"policy": policy, "lowering": lowering, "impl": kernels, "mode": mode,
            "cpp_wrapper": bool(cpp_wrapper)}


def _check_triton_can_run(example_inputs):
    """kernels='triton' needs Triton, and CUDA tensors or the interpreter (TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        raise RuntimeError("blockquant: kernels='triton' needs the triton package; use "
                           "kernels='reference' or 'auto'") from err
    tensors = [t for t in (example_inputs or ()) if isinstance(t, torch.Tensor)]
    on_cpu = any(not t.is_cuda for t in tensors) if tensors else not torch.cuda.is_available()
    if not select.triton_launchable(not on_cpu):
        raise RuntimeError("blockquant: kernels='triton' runs generated Triton kernels, which need "
                           "CUDA tensors; on CPU they run only in Triton's interpreter (set "
                           "TRITON_INTERPRET=1 before triton is imported). Use kernels='auto' "
                           "(Triton on CUDA, the generated C++ kernels on CPU) or 'reference'")


def run_passes(gm, example_inputs, policy: Policy, impl: str = "auto", names=None):
    """All six passes on a copy of gm. Returns the rewritten graph module (its extra inputs in
    ``graph_record(gm).extra_inputs``, its packed weights in ``graph_record(gm).packed``),
    the list of planned (node, site, spec) and the explain rows. ``names``: the frame's module
    names (passes.names), found from Dynamo's frame when not given."""
    names = names_for(gm) if names is None else names
    gm = copy_graph_module(gm)
    passes.debug_graph(gm, "dynamo")
    passes.find_quantisable(gm, policy.op_kinds(), example_inputs, names)
    passes.debug_graph(gm, "find_quantisable")
    passes.plan(gm, policy, example_inputs, names)
    if names.root is not None:
        warn_unmatched(policy, names.root)
        warn_float_experts(policy, names.root)
        tensor_parallel.check_compile(names.root, policy)
    planned = planned_sites(gm)
    passes.debug_graph(gm, "plan")
    _set_impl(gm, impl)
    rows = site_rows(gm)
    if planned:
        passes.quantize_weights(gm, example_inputs, names)
        rows = site_rows(gm)  # after quantising: explain counts the bytes stored
        passes.debug_graph(gm, "quantize_weights")
        passes.rewrite(gm, impl=impl)
        passes.debug_graph(gm, "rewrite")
        passes.fuse(gm)
        passes.debug_graph(gm, "fuse")
    if _has_qcompile_ops(gm):
        passes.use_cpu_kernels(gm, example_inputs)
        passes.debug_graph(gm, "use_cpu_kernels")
    return gm, planned, rows


def _set_impl(gm, impl: str):
    """Point every qcompile op already in the graph (quantize_model_'s QuantLinear) at impl."""
    changed = False
    for n in gm.graph.nodes:
        if n.op != "call_function" or not str(n.target).startswith("qcompile."):
            continue
        op = n.target if hasattr(n.target, "_schema") else getattr(n.target, "default", None)
        schema = getattr(op, "_schema", None)
        names = [a.name for a in schema.arguments] if schema is not None else []
        if "impl" not in names:
            continue
        i = names.index("impl")
        if "impl" in n.kwargs:
            n.update_kwarg("impl", impl)
        elif len(n.args) > i:
            n.update_arg(i, impl)
        else:
            n.update_kwarg("impl", impl)
        changed = True
    if changed:
        gm.recompile()


def _lower(gm, inputs, lowering, mode="default", cpp_wrapper=False):
    if lowering == "eager":
        return gm.forward
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx
    patches = dict(list_mode_options(mode)) if mode and mode != "default" else {}
    if cpp_wrapper:
        patches.update(cpp_wrapper=True, post_grad_custom_post_pass=_quote_text_pass())
    with _inductor_cache_tag():
        return compile_fx(gm, inputs, config_patches=patches)


class _CppText(str):
    """Text that formats as the body of a C++ string literal. Inductor's C++ wrapper writes a
    text argument as ``f'"{value}"'`` without escaping it (torch 2.13), and a format's
    description holds quotes (``'{"fmt": "nf4", ...}'``); the literal then reads back as the
    very text, which every other use (the fake implementations) sees unchanged."""

    def __format__(self, spec):
        return str.__format__(self.replace("\\", "\\\\").replace('"', '\\"'), spec)

    def __reduce__(self):
        return _CppText, (str(self),)


def _quote_text_arguments(graph):
    """Make every text argument of a qcompile operator in ``graph`` a ``_CppText``: on the
    graph Inductor lowers (post-grad), as tracing turns the arguments back into plain text."""
    for n in graph.nodes:
        if n.op == "call_function" and str(n.target).startswith("qcompile"):
            n.args = tuple(_CppText(a) if type(a) is str else a for a in n.args)
            n.kwargs = {k: _CppText(v) if type(v) is str else v for k, v in n.kwargs.items()}


def _quote_text_pass():
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class QuoteText(CustomGraphPass):
        def __call__(self, graph):
            _quote_text_arguments(graph)

        def uuid(self):  # Inductor's graph cache key: the pass's version
            return "qcompile-quote-text-1"
    return QuoteText()


def _inductor_cache_tag():
    """Inductor's on-disk graph cache does not hash a custom op's fake implementation nor a C++
    operator's schema: tag our graphs with the source of the ops (qcompile/ops.py and the CPU
    operator's files, codegen/cpu/build.py operator_files), so a new version of them is never
    served an old graph."""
    cfg = getattr(torch.compiler, "config", None)
    if cfg is None or not hasattr(cfg, "cache_key_tag"):
        return contextlib.nullcontext()
    digest = hashlib.sha256()
    for path in (ops.__file__, *cpu.operator_files()):
        with open(path, "rb") as f:
            digest.update(f.read())
    return cfg.patch(cache_key_tag=f"{cfg.cache_key_tag}|qcompile-ops-{digest.hexdigest()[:16]}")


# the ops through which a layer packed ahead (quantize_model_, from_pretrained) reads its weight
_PACKED_LAYER_OPS = ("qcompile.linear", "qcompile.embedding", "qcompile_moe.experts_call")


def packed_layer_calls(gm) -> int:
    """Calls of layers packed before compiling: the backend quantises none of them, yet each
    runs quantised, so the progress line counts them with the layers it quantises."""
    return sum(n.op == "call_function" and str(n.target).startswith(_PACKED_LAYER_OPS)
               for n in gm.graph.nodes)


def _has_qcompile_ops(gm) -> bool:
    return any(n.op == "call_function" and str(n.target).startswith(("qcompile.", "qcompile_cpu."))
               for n in gm.graph.nodes)


# Every CompiledGraph alive (Dynamo's cache holds them): explain(compiled model) reads them.
COMPILED: "weakref.WeakSet[CompiledGraph]" = weakref.WeakSet()
_SERIAL = iter(range(1, 1 << 62))


def compiled_variants() -> list:
    """Every live Variant of every CompiledGraph, newest first."""
    return sorted((v for g in list(COMPILED) for v in g.variants.values()),
                  key=lambda v: -v.serial)


class Variant:
    """One plan of a graph for one set of weights: the lowered graph and its packed weights."""

    def __init__(self, gm, fn, rows, args, param_inputs, model):
        self.gm, self.fn, self.rows = gm, fn, rows
        self.model = weakref.ref(model) if model is not None else lambda: None
        self.extra = list(graph_record(gm).extra_inputs)
        self.packed = list(graph_record(gm).packed)
        self.inputs = [weakref.ref(t) for t in args if isinstance(t, torch.Tensor)]
        self.params = [(i, weakref.ref(args[i])) for i in param_inputs]
        self.serial = next(_SERIAL)  # compile order: explain lets the newest win

    def owns(self, args) -> bool:
        """Whether ``args`` holds the very parameters this variant was planned for."""
        return all(args[i] is ref() for i, ref in self.params)

    def requantise(self, args, lowering: str):
        """Pack again the weights that changed in place; same shapes, same lowered graph."""
        new_shapes = False
        for p in self.packed:
            t = args[p.input_index]
            if not p.changed(t):
                continue
            old_q, old = p.q, list(p.q.tensors().values())
            start = next(i for i, e in enumerate(self.extra) if e is old[0])
            p.requantise(t)
            new = list(p.q.tensors().values())
            new_shapes |= any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(old, new))
            self.extra[start:start + len(new)] = new
            for row in self.rows:
                if row.qtensor is old_q:
                    row.qtensor, row.bits = p.q, p.q.bits_per_element
        if new_shapes and lowering != "eager":
            # Inductor specialised its code on the old packed sizes (OPQ outlier counts): run
            # the same graph without it rather than feed it tensors of other sizes
            config.warn("blockquant: weights changed after compiling and their packed sizes "
                        "changed too (OPQ outliers); this graph now runs without Inductor. "
                        "Compile the model again for full speed", once=("new shapes", id(self)))
            self.fn = self.gm.forward


class CompiledGraph:
    """What the backend returns for one Dynamo graph. It is called with the packed weights as
    extra inputs, and before each call it checks the full-precision weights it is given:
    - the same tensors, changed in place (``load_state_dict``, ``copy_``): packed again, so
      the model never mixes new norms and embeddings with stale packed weights;
    - other tensors (Dynamo runs one graph for every instance of a module class, e.g. each
      decoder layer compiled on its own): the policy is applied to that instance by its own
      names, a Variant each; variants whose rewritten graphs are the same share one lowering."""

    def __init__(self, gm, example_inputs, opts: dict, names, where: str = "a compiled function"):
        self.source, self.opts, self.names = copy_graph_module(gm), opts, names
        _GRAPH_COUNT[where] += 1
        self.what = f"graph {_GRAPH_COUNT[where]} of {where}"
        self.param_inputs = [i for i, t in enumerate(example_inputs)
                             if isinstance(t, torch.nn.Parameter)]
        self.traced = [example_inputs[i] for i in self.param_inputs]
        self.variants: dict[tuple, Variant] = {}
        self.current = self._build(example_inputs, names)
        COMPILED.add(self)

    def _key(self, args) -> tuple:
        return tuple(id(args[i]) for i in self.param_inputs)

    def _build(self, args, names) -> Variant:
        o = self.opts
        with _Progress(self.what, o["lowering"]) as progress:
            gm, planned, rows = run_passes(self.source, args, o["policy"], o["impl"], names)
            progress.quantised = len(planned) + packed_layer_calls(self.source)
            extra = list(graph_record(gm).extra_inputs)
            same = next((v for v in self.variants.values() if v.gm.code == gm.code and all(
                a.shape == b.shape and a.dtype == b.dtype for a, b in zip(v.extra, extra))),
                None)
            cpp = {"cpp_wrapper": True} if o["cpp_wrapper"] else {}
            fn = same.fn if same is not None else _lower(gm, list(args) + extra, o["lowering"],
                                                         o["mode"], **cpp)
        variant = Variant(gm, fn, rows, args, self.param_inputs, names.root)
        self.variants[self._key(args)] = variant
        return variant

    def __call__(self, *args):
        v = self.current
        if not v.owns(args):
            v = self.variants.get(self._key(args))
            if v is None or not v.owns(args):
                v = self._build(args, self.names.for_instance(
                    self.traced, [args[i] for i in self.param_inputs]))
            self.current = v
        if any(p.changed(args[p.input_index]) for p in v.packed):
            v.requantise(args, self.opts["lowering"])
        return v.fn(*args, *v.extra)


_GRAPH_COUNT: collections.Counter = collections.Counter()  # graphs compiled, per model


class _Progress:
    """Says on stderr what is being compiled when one graph takes longer than
    ``config.PROGRESS_AFTER_S`` (a cold Inductor compile of a small model takes minutes on a
    2-core CPU): a line when that time has passed, and one when the graph is done."""

    def __init__(self, what: str, lowering: str):
        self.what, self.lowering, self.quantised = what, lowering, None
        self.shown = self.done = False
        self.lock = threading.Lock()
        self.timer = threading.Timer(config.PROGRESS_AFTER_S, self._show)
        self.timer.daemon = True

    def __enter__(self):
        self.start = time.monotonic()
        self.timer.start()
        return self

    def _show(self):
        with self.lock:
            if self.done:
                return
            self.shown = True
            stage = ("planning and quantising its weights" if self.quantised is None else
                     f"{self.quantised} quantised layer(s); lowering it with {self.lowering}")
            _say(f"blockquant: compiling {self.what} ({stage}) ...")

    def __exit__(self, kind, err, tb):
        self.timer.cancel()
        with self.lock:
            self.done = True
            if self.shown:
                seconds = time.monotonic() - self.start
                _say(f"blockquant: {self.what} {'failed' if kind else 'compiled'} in "
                     f"{seconds:.1f} s ({self.quantised or 0} quantised layer(s))")


def _say(line: str):
    print(line, file=sys.stderr, flush=True)


def blockquant_backend(gm, example_inputs, options=None, mode=None):
    """The torch.compile backend (registered as ``backend="blockquant"``)."""
    opts = parse_options(options, example_inputs)
    if mode not in (None, "default"):  # only reachable when called directly
        opts["mode"] = mode
    _watch_dynamo_fallbacks()
    frame = frame_description()
    _BACKEND_FRAMES.add(frame)
    names = names_for(gm)
    where = frame
    if names.root is not None:  # say which model; the frame too when it is the user's code
        internal = frame.find(torch.__path__[0]) >= 0 or frame.find(__file__) >= 0
        where = f"the {type(names.root).__name__} model" + ("" if internal else f" ({frame})")
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is not None and getattr(reason, "graph_break", False):
        config.warn(f"blockquant: Dynamo split {where} into several graphs (graph break: "
                    f"{str(getattr(reason, 'reason', '')).splitlines()[0]}); the code between "
                    "the graphs runs eagerly, so a linear layer there runs in full precision. "
                    "fullgraph=True makes this an error", once=("graph break", where))
    graph = CompiledGraph(gm, example_inputs, opts, names, where)
    weighted = bool(graph.param_inputs) or next(gm.parameters(), None) is not None
    _say_what_runs_unquantised(graph.current, weighted, names.root, where)
    return graph


def _say_what_runs_unquantised(variant: Variant, weighted: bool, root, where: str):
    """Once per model and reason: layers left alone for their dtype (the reason, not "nothing
    matched"); else a graph that holds layers and quantises none of them, in a model that holds
    no packed layer either. A graph without parameters (``weighted`` False: rotary embeddings,
    the pieces Dynamo resumes between packed experts' decodes) has nothing the policy could
    match, and a model holding packed layers (``quantize_model_``, the experts
    ``qcompile.compile`` packs) does not run unquantised: neither is said."""
    model = _identity(root, where)
    by_reason: dict[str, list[str]] = {}
    for fqn, why in left_alone(variant.gm):
        by_reason.setdefault(why, []).append(fqn)
    for why, layers in by_reason.items():
        config.warn(f"blockquant: {len(layers)} layer(s) of {where} ({_some(layers)}) run "
                    f"unquantised, in full precision: {why}. Convert the model (.float(), "
                    ".half() or .bfloat16()) to quantise them", once=("dtype", model, why))
    no_layer = not variant.rows and not weighted  # no layer: nothing the policy could match
    if not by_reason and not no_layer and not variant.packed and not _has_qcompile_ops(
            variant.gm) and not any(r.weight_fmt != "-" or r.act_fmt != "-" for r in variant.rows) \
            and not _holds_packed(root):
        config.warn(f"blockquant: nothing in a graph of {where} matched the policy; it runs "
                    "unquantised", once=("nothing matched", model))


def _holds_packed(model) -> bool:
    """Whether ``model`` (None: not known) holds layers whose weights are packed already."""
    return model is not None and any(
        getattr(m, mark, False) for m in model.modules()
        for mark in ("quantised_linear", "quantised_embedding", "quantised_experts"))


def _identity(model, where: str):
    """A once-key part for ``model``: equal only for the same live model (a weak reference,
    never mistaken for a later model at the same address); ``where`` without one."""
    return weakref.ref(model) if model is not None else where


def _some(names: list[str], shown: int = 3) -> str:
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


# -- Dynamo giving up on a frame ---------------------------------------------------------------

_BACKEND_FRAMES: set[str] = set()  # frames handed to this backend, as Dynamo describes them


class _RecompileLimitFilter(logging.Filter):
    """Dynamo says it hit its recompile limit only in its log, then runs that frame eagerly
    for good: for a frame blockquant compiled, that means full precision. Say so loudly."""

    def filter(self, record):
        if str(record.msg).startswith("torch._dynamo hit config."):
            text = record.getMessage()
            for frame in _BACKEND_FRAMES:
                if frame in text:
                    config.warn(f"blockquant: Dynamo hit its recompile limit for {frame} and now "
                                "runs it eagerly, in full precision, without the policy. "
                                "Raise torch._dynamo.config.recompile_limit, or compile fewer "
                                "variants (e.g. dynamic=True)", RuntimeWarning,
                                once=("recompile limit", frame))
        return True


_FILTER = _RecompileLimitFilter()


def _watch_dynamo_fallbacks():
    log = logging.getLogger("torch._dynamo.convert_frame")
    if _FILTER not in log.filters:
        log.addFilter(_FILTER)


class _EagerWatch:
    """A forward pre-hook for a layer the policy quantises. Inside a graph Dynamo traces it to
    nothing; if it ever runs, the layer runs eagerly (Dynamo skipped the frame it is in, could
    not resume after a graph break, or hit its recompile limit): in full precision.

    A class, not a closure, so a compiled model pickles. In a deep copy or a pickled copy it
    watches nothing (the copy runs uncompiled and says so once, see ``_UncompiledCopy``): one
    warning for the copy, not one per layer; ``compile`` of the copy arms it again."""

    def __init__(self, name: str, module: torch.nn.Module | None):
        self.name = name
        self.module = weakref.ref(module) if module is not None else None

    def __call__(self, mod, args):
        if torch.compiler.is_compiling() or self.module is None or mod is not self.module():
            return  # first: inside a graph Dynamo traces nothing else of it
        config.warn(f"blockquant: layer {self.name!r} ran eagerly, in full precision: Dynamo "
                    "did not compile the code it runs in (a graph break it could not resume "
                    "after, a skipped frame, or its recompile limit; TORCH_LOGS="
                    "graph_breaks,recompiles says which)", RuntimeWarning,
                    once=("ran eagerly", id(mod)))

    def __deepcopy__(self, memo):
        return _EagerWatch(self.name, None)

    def __reduce__(self):
        return _EagerWatch, (self.name, None)


def _watch_eager_layers(model: torch.nn.Module, policy: Policy):
    """Arm a watch on every linear layer the policy quantises (again, in a copy)."""
    for name, mod in model.named_modules():
        if not linear_like(mod) or policy.match(name, "linear")[1] is None \
                or forward_beyond_linear(mod) is not None:  # kept in full precision anyway
            continue
        watches = [h for h in mod._forward_pre_hooks.values() if isinstance(h, _EagerWatch)]
        for watch in watches:
            watch.name, watch.module = name, weakref.ref(mod)
        if not watches:
            mod.register_forward_pre_hook(_EagerWatch(name, mod))


# -- compiling in place ------------------------------------------------------------------------

def compile(model: torch.nn.Module, policy: Policy | None = None, *, fullgraph: bool = False,
            dynamic: bool | None = None, **options) -> torch.nn.Module:
    """Compile ``model`` in place with the blockquant backend, so that calling it, and
    everything that calls it (``generate``), runs quantised. Options as for the backend
    (``lowering``, ``kernels``, ``mode``), validated now. Returns the model.

    Like ``model.compile()``, but ``model.compile()`` compiles nothing for a model made only of
    torch modules (an nn.Sequential: Dynamo skips frames in torch's own files), and all models
    compiled through one function share its recompile budget; here each model gets a frame of
    its own, compiled in the user's name. An encoder-decoder model's encoder (T5, BART,
    Whisper) is compiled in place too: ``generate`` calls it on its own, outside the model's
    frame. A deep copy or a pickle of the compiled model runs uncompiled (it says so once).

    Mixture-of-experts tensors (qcompile.experts) the policy gives a format are packed first,
    in place, as ``quantize_model_`` packs them (the same rule, the same packed tensors): a
    graph cannot pack them, so the model's float expert tensors are replaced by
    ``PackedExperts`` whose view the experts module's forward reads; each module holding them
    is then one operator in the graphs (qcompile.experts_call: no graph break, so ``generate``
    compiles one graph per shape however many layers)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"qcompile.compile: expected an nn.Module, got {type(model).__name__}")
    options = {"policy": policy, **options}
    opts = parse_options(options)
    warn_unmatched(opts["policy"], model)  # now, not at the first call
    tensor_parallel.check_compile(model, opts["policy"])  # refused before any work
    # graphs cannot pack them; the experts run the kernels asked for
    quantize_experts_(model, opts["policy"], "qcompile.compile", opts["impl"])
    route_packed_experts(model)  # one operator each in the graphs: no graph break there
    remember_root(model)  # the encoder's frame is named in the whole model
    _watch_eager_layers(model, opts["policy"])
    _watch_copies(model)
    _compile_frame(model, options, fullgraph, dynamic)
    for part in _separately_called_parts(model):
        _compile_frame(part, options, fullgraph, dynamic)
    return model


def _separately_called_parts(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Submodules that ``generate`` calls by themselves: an encoder-decoder's encoder."""
    config_ = getattr(model, "config", None)
    get_encoder = getattr(model, "get_encoder", None)
    if not getattr(config_, "is_encoder_decoder", False) or not callable(get_encoder):
        return []
    encoder = get_encoder()
    return [encoder] if isinstance(encoder, torch.nn.Module) and encoder is not model else []


def _compile_frame(module: torch.nn.Module, options: dict, fullgraph, dynamic):
    """Point ``module``'s calls at a compiled frame of its own."""
    def call(*args, **kwargs):
        return module._call_impl(*args, **kwargs)
    # a fresh code object per module: Dynamo's cache and recompile limit are per code object
    name = f"blockquant_{type(module).__name__}"
    frame = types.FunctionType(call.__code__.replace(co_name=name, co_qualname=name),
                               call.__globals__, name, None, call.__closure__)
    options = dict(options, guard_filter_fn=_packed_guards_dropped(module))  # torch pops it
    module._compiled_call_impl = _CompiledCall(torch.compile(
        frame, backend="blockquant", options=options, fullgraph=fullgraph, dynamic=dynamic))


def _packed_guards_dropped(module: torch.nn.Module):
    """A Dynamo guard filter: no tensor guard on the packed buffers of ``module``'s
    QuantLinear / QuantEmbedding layers (about 2 per linear layer, evaluated at every call).
    blockquant owns them and never changes their shapes or dtypes (a weight loaded into one is
    copied in place); everything else keeps its guards, the float weights (which are packed
    again when they change) and hooks included."""
    root = weakref.ref(module)

    def keep(entries):
        model = root()
        packed = set() if model is None else {
            id(b) for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))
            for b in m.buffers(recurse=False)}
        return [not (e.guard_type == "TENSOR_MATCH" and id(e.value) in packed)
                for e in entries]
    return keep


class _CompiledCall:
    """``module._compiled_call_impl`` set by ``compile``. torch's Module.__getstate__ leaves
    it out of a deep copy and a pickle; should it not, a copy gets None (runs uncompiled, and
    ``_CopyWatch`` says so) rather than this module's compiled frame."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return _nothing, ()


def _nothing():
    return None


class _CopyWatch:
    """A forward pre-hook on a model compiled by ``compile``. The model itself never trips it
    (in its compiled frame it traces to nothing; eagerly, the layer watches speak). A deep
    copy or a pickle (``torch.save``) of the model runs uncompiled, in full precision: the
    copy's own watch (made by ``__deepcopy__`` / ``__reduce__``) says so on its first call."""

    def __init__(self, module: torch.nn.Module | None, how: str = ""):
        self.module = weakref.ref(module) if module is not None else None
        self.how, self.said = how, False

    def __call__(self, mod, args):
        if torch.compiler.is_compiling() or self.said:
            return
        if self.module is not None and mod is self.module():
            return
        self.said = True
        config.warn(f"blockquant: this {type(mod).__name__} {self.how} a model compiled "
                    "by qcompile.compile: it runs uncompiled, in full precision. Compile it "
                    "with qcompile.compile(model, policy); to save a quantised model, use "
                    "qcompile.save_quantized", RuntimeWarning)

    def __deepcopy__(self, memo):
        return _CopyWatch(None, "is a deep copy of")

    def __reduce__(self):
        return _CopyWatch, (None, "was loaded from a pickle (torch.save) of")

    def arm(self, module: torch.nn.Module):
        self.module, self.said = weakref.ref(module), False


def _watch_copies(model: torch.nn.Module):
    watches = [h for h in model._forward_pre_hooks.values() if isinstance(h, _CopyWatch)]
    for watch in watches:  # a copy compiled in turn: its watch is the model's own now
        watch.arm(model)
    if not watches:
        model.register_forward_pre_hook(_CopyWatch(model))
