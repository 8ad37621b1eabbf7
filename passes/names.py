"""Module names of a Dynamo graph's ops, exactly as ``model.named_modules()`` gives them.

Dynamo's text paths are not stable (transformers 5.24 wraps ``forward`` in a decorator, and the
model's root turns from ``L['self']`` into ``L['args'][0]``), so names are not read from text.
They come from objects:

1. The model: every parameter input of the graph carries its Dynamo source, a chain of objects
   from the frame's root (``self``, ``args[0]``, a global, a closure cell) down to the tensor.
   The outermost module source of that chain is evaluated in the frame being compiled, which
   gives the model object itself; its ``named_modules()`` are the names. A frame whose model
   is a submodule of a bigger one (a decoder layer compiled on its own, a submodule frame that
   Dynamo compiles by itself after a graph break) is named in the bigger one: a model
   registered by ``remember_root``, or one whose own method is running around the frame.
2. An op's module: ``nn_module_stack`` keys are the ids of the module objects that ran the op;
   a linear op's weight parameter is found among the modules that hold it (for tied weights,
   the linear-like holder wins: ``lm_head`` rather than ``embed_tokens``).
3. Another instance running the same graph (Dynamo shares a graph between the instances of a
   class) is found by its parameters: ``ModuleNames.for_instance``.

Where no model object can be found (a graph without parameters or modules), names fall back to
Dynamo's path text, said once.
"""
from __future__ import annotations

import builtins
import copy
import re
import sys
import weakref

import torch
from torch import fx

from qcompile import config
from qcompile.linear_rule import linear_like, skip_reason

# Models compiled or explained before: frames of their submodules are named in them.
_KNOWN_ROOTS: list[weakref.ref] = []


def remember_root(model: torch.nn.Module) -> None:
    _KNOWN_ROOTS[:] = [r for r in _KNOWN_ROOTS if r() is not None and r() is not model]
    _KNOWN_ROOTS.append(weakref.ref(model))


class ModuleNames:
    """Names of one model's modules and of the modules holding each of its parameters.

    ``frame`` is the name, in the model, of the module whose frame Dynamo compiled ("" for the
    model itself). Dynamo shares one graph between instances of a class (each decoder layer
    compiled on its own: regional compilation); ``for_instance`` gives the names for another
    instance running the same graph."""

    def __init__(self, root: torch.nn.Module | None, frame: str = ""):
        self.root, self.frame = root, frame
        self.by_id: dict[int, str] = {}  # the modules the graph was traced with, by id
        self.moved: tuple[str, str] | None = None  # (traced frame name, running frame name)
        self.holders: dict[int, list[tuple[str, torch.nn.Module, str]]] = {}
        # {parameter name: tensor} of the instance running the graph where it is not ``root``
        # itself (another instance that no known model holds): for reading its weights
        self.weights: dict[str, torch.Tensor] | None = None
        if root is None:
            return
        for name, mod in root.named_modules(remove_duplicate=False):
            self.by_id.setdefault(id(mod), name)
            for pname, p in mod._parameters.items():
                if p is not None:
                    self.holders.setdefault(id(p), []).append((name, mod, pname))

    def module(self, node: fx.Node) -> str | None:
        """The name of the innermost module that ran ``node``: "" for the root itself, None
        when that module is not part of this model."""
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return self.frame
        ident = str(list(stack)[-1]).split("@")[0]  # Dynamo keys inlined modules by id(module)
        name = self.by_id.get(int(ident)) if ident.isdigit() else None
        if name is None or self.moved is None:
            return name
        traced, running = self.moved
        if traced and name != traced and not name.startswith(traced + "."):
            return name  # outside the frame's module: the same for every instance
        rest = name[len(traced):].lstrip(".") if traced else name
        return ".".join(p for p in (running, rest) if p)

    def param_name(self, t) -> str | None:
        hits = self.holders.get(id(t))
        return f"{hits[0][0]}.{hits[0][2]}".lstrip(".") if hits else None

    def for_instance(self, traced_params, running_params) -> "ModuleNames":
        """The names for the module instance whose parameters ``running_params`` are, when the
        graph was traced with ``traced_params`` (the same graph inputs): its frame module is
        found by the parameter paths relative to it, in this model or in a known one."""
        models = [self.root] + [r() for r in reversed(_KNOWN_ROOTS)]
        for model in dict.fromkeys(m for m in models if m is not None):
            names = self if model is self.root else ModuleNames(model)
            for then, now in zip(traced_params, running_params):
                old, new = self.param_name(then), names.param_name(now)
                if old is None or new is None:
                    continue
                rel = old[len(self.frame):].lstrip(".") if self.frame else old
                if new == rel or new.endswith("." + rel):
                    running = new[:len(new) - len(rel)].rstrip(".")
                    found = ModuleNames(model, running)
                    found.by_id, found.moved = self.by_id, (self.frame, running)
                    return found
        found = copy.copy(self)  # the same names; the running instance's own tensors
        found.weights = {self.param_name(t): r for t, r in zip(traced_params, running_params)
                         if self.param_name(t) is not None}
        return found

    def skip_reason(self, name: str) -> str | None:
        """qcompile.linear_rule.skip_reason() for the module called ``name`` in this model: why the
        policy's format cannot be applied to it (None: it can, or it is not a module here)."""
        if self.root is None or not name:
            return None
        try:
            mod = self.root.get_submodule(name)
            parent = self.root.get_submodule(name.rpartition(".")[0])
        except AttributeError:
            return None
        return skip_reason(mod, parent) if hasattr(mod, "weight") else None

    def weight_holders(self, weight: torch.Tensor | None, embedding: bool = False) -> list[str]:
        """Names of the linear-like modules (with ``embedding``: the nn.Embedding modules)
        holding ``weight`` as their ``weight``."""
        if weight is None:
            return []
        kind = (lambda m: isinstance(m, torch.nn.Embedding)) if embedding else linear_like
        return [name for name, mod, pname in self.holders.get(id(weight), ())
                if pname == "weight" and kind(mod)]


def _source_name(source) -> str:
    name = source.name
    return name() if callable(name) else name  # a method before torch 2.12, then a property


def _root_module_source(source):
    """The outermost nn.Module source in a parameter's source chain (the frame's model)."""
    from torch._dynamo.source import NNModuleSource
    found, s = None, source
    while s is not None:
        if isinstance(s, NNModuleSource):
            found = s
        s = getattr(s, "base", None)
    return found


def _current_frame():
    """Dynamo's translator of the frame being compiled (None outside a backend call)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        return InstructionTranslator.current_tx()
    except Exception:  # noqa: BLE001 - a Dynamo without it: no object names
        return None


def current_code():
    """The code object of the frame Dynamo is compiling (None outside a backend call)."""
    return getattr(_current_frame(), "f_code", None)


def frame_description() -> str:
    """The function Dynamo is compiling, as Dynamo names it: 'forward' (file:line)."""
    code = current_code()
    if code is None:
        return "a compiled function"
    return f"'{code.co_name}' ({code.co_filename}:{code.co_firstlineno})"


def _frame_root(gm: fx.GraphModule) -> torch.nn.Module | None:
    """The model object the graph's parameters hang from, evaluated in the frame Dynamo is
    compiling (the same scope Dynamo evaluates its guards in: L = locals, G = globals); for a
    graph without parameters, the module among the frame's locals (``self``, a closure)."""
    tx = _current_frame()
    if tx is None:
        return None
    scope = {"L": tx.f_locals, "G": tx.f_globals, "__builtins__": builtins.__dict__}
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        grapharg = node.meta.get("grapharg")
        source = _root_module_source(getattr(grapharg, "source", None))
        if source is None:
            continue
        try:
            value = eval(_source_name(source), scope)  # noqa: S307 - Dynamo's own guard text
        except Exception:  # noqa: BLE001
            continue
        if isinstance(value, torch.nn.Module):
            return value
    modules = [v for v in tx.f_locals.values() if isinstance(v, torch.nn.Module)]
    if len(modules) > 1 and isinstance(tx.f_locals.get("self"), torch.nn.Module):
        return tx.f_locals["self"]
    return modules[0] if modules else None


def _enclosing_models():
    """The modules whose own code is running now, around the frame Dynamo compiles (the
    ``self`` of each running method; torch.compile's wrapper excluded), innermost first."""
    from torch._dynamo.eval_frame import OptimizedModule
    frame = sys._getframe(1)
    while frame is not None:
        if "self" in frame.f_code.co_varnames[:1]:
            try:
                owner = frame.f_locals.get("self")
            except Exception:  # noqa: BLE001 - a frame whose locals cannot be read
                owner = None
            if isinstance(owner, torch.nn.Module) and not isinstance(owner, OptimizedModule):
                yield owner
        frame = frame.f_back


def _outermost_model(root: torch.nn.Module) -> torch.nn.Module:
    """The largest model containing ``root``: among the models qcompile.compile registered and
    those the running frames hold (after a graph break, Dynamo compiles a frame of a submodule
    on its own while the model that called it runs eagerly), else ``root`` itself."""
    best, size = root, None
    known = [r() for r in _KNOWN_ROOTS]
    for model in dict.fromkeys(m for m in [*known, *_enclosing_models()] if m is not None):
        if model is root:
            continue
        modules = list(model.modules())
        if any(m is root for m in modules) and (size is None or len(modules) > size):
            best, size = model, len(modules)
    return best


def names_for(gm: fx.GraphModule) -> ModuleNames:
    """The ModuleNames for the frame being compiled (call from inside a Dynamo backend)."""
    root = _frame_root(gm)
    if root is None:
        return ModuleNames(None)
    model = _outermost_model(root)
    remember_root(model)
    names = ModuleNames(model)
    names.frame = names.by_id.get(id(root), "")
    return names


# -- the last resort: Dynamo's path text -------------------------------------------------

_ROOT = re.compile(r"^(L|G)\[[^\]]*\](\[[^\]]*\])*")


def text_fqn(path: str) -> str:
    """Dynamo's module path (``L['self'].h[0]._modules['mlp']``) read as a name (``h.0.mlp``).
    Used only when no model object is known; unreliable across library versions."""
    s = _ROOT.sub("", path)
    s = re.sub(r"\._modules\['([^']*)'\]", r".\1", s)
    s = re.sub(r"\[['\"]?([^\]'\"]*)['\"]?\]", r".\1", s)
    return s.strip(".")


def text_name(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    config.warn("blockquant: no model object found for a compiled frame; module names are read "
                "from Dynamo's path text and may differ from model.named_modules()",
                once="text-names")
    return text_fqn(list(stack.values())[-1][0])
