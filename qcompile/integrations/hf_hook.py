"""Registers blockquant with transformers' quantizer registry without importing transformers.

Importing ``transformers.quantizers.auto`` (the registry) takes seconds, so ``import qcompile``
must not do it. transformers has no plugin hook of its own, so ``install()`` puts a finder on
``sys.meta_path`` that runs ``qcompile.integrations.hf`` (which registers BlockQuantConfig and
its quantizer) right after the registry module has executed, before ``from_pretrained`` can read
a config.
Where the registry is imported already, it registers at once.
"""
from __future__ import annotations

import sys

REGISTRY = "transformers.quantizers.auto"


def _register():
    try:
        from . import hf  # noqa: F401 - registers on import
    except Exception as e:  # noqa: BLE001 - never break importing transformers itself
        from .. import config
        config.warn(f"blockquant could not register with transformers ({type(e).__name__}: "
                    f"{e}); BlockQuantConfig checkpoints will not load")


class _Loader:  # duck-typed: importlib.abc costs milliseconds to import
    """The registry's own loader, registering blockquant once the module has run."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _register()

    def __getattr__(self, name):  # get_source, get_data, ... as the inner loader has them
        return getattr(self.inner, name)


class _Finder:
    def find_spec(self, name, path, target=None):
        if name != REGISTRY:
            return None
        sys.meta_path.remove(self)  # once; also keeps the lookup below from finding us
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install():
    if REGISTRY in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
