"""Register the p-MoD classes with transformers' Auto classes the moment they are needed, in any import order.

``import pmod_bench`` must not import torch or transformers (the CLI's ``--help`` stays instant), yet
``import pmod_bench; from transformers import AutoModelForImageTextToText; A.from_pretrained(p_mod_dir)``
must work in a fresh process.  Auto classes cannot be used before ``transformers.models.auto.configuration_auto``
is imported (every Auto class reads its ``CONFIG_MAPPING``), so that import is the signal.

How: while registration is pending, a :class:`importlib.abc.MetaPathFinder` at the front of ``sys.meta_path``
answers for ``transformers`` modules by asking the other finders for the real spec and wrapping its loader, so
that after each such module has executed it can check two things: an Auto module is loaded, and no
``transformers`` / ``pmod_bench`` module is still half-initialised (registering then would import half-built
modules: e.g. ``from transformers import LlavaNextForConditionalGeneration`` loads the Auto classes from
inside ``modeling_llava_next``).  The first time both hold, it runs :func:`pmod_bench.register` and removes
itself.  Nothing of transformers is patched; the finder only wraps loaders of modules it did not create.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import threading
from typing import Callable, Optional

SIGNAL = "transformers.models.auto.configuration_auto"
_WATCHED = ("transformers", "pmod_bench")


def _watched(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in _WATCHED)


def _quiescent(just_run: str = "") -> bool:
    """No watched module but ``just_run`` (executed, not yet marked done) is half-initialised (importlib marks
    a module's spec ``_initializing`` while it runs; checked by ``tests/test_loading.py``)."""
    for name, module in list(sys.modules.items()):
        if name != just_run and _watched(name) and getattr(getattr(module, "__spec__", None), "_initializing", False):
            return False
    return True


class _Loader(importlib.abc.Loader):
    """Delegates to the real loader; after the module has executed, gives the finder a chance to register."""

    def __init__(self, inner: importlib.abc.Loader, finder: "RegisterWhenNeeded") -> None:
        self._inner = inner
        self._finder = finder

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        try:
            self._inner.exec_module(module)
        finally:
            module.__spec__.loader = self._inner  # the module keeps its own loader (reloads, resources)
        self._finder.maybe_register(module.__name__)

    def __getattr__(self, name: str):  # get_resource_reader, is_package, get_source, ...
        return getattr(self._inner, name)


class RegisterWhenNeeded(importlib.abc.MetaPathFinder):
    """Runs ``register`` once, at the first quiescent point after transformers' Auto classes are importable."""

    def __init__(self, register: Callable[[], None]) -> None:
        self._register = register
        self._lock = threading.RLock()
        self._done = False
        self._running = False

    def find_spec(self, name: str, path, target=None) -> Optional[importlib.machinery.ModuleSpec]:
        if self._done or not (name == "transformers" or name.startswith("transformers.")):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, self)
                return spec
        return None

    def maybe_register(self, just_run: str) -> None:
        with self._lock:
            if self._done or self._running or SIGNAL not in sys.modules or not _quiescent(just_run):
                return
            self._running = True
            try:
                self._register()
                self._done = True
            finally:
                self._running = False
                if self._done:
                    uninstall()


_FINDER: Optional[RegisterWhenNeeded] = None


def install(register: Callable[[], None]) -> None:
    """Register now if transformers' Auto classes are already loaded, else when they are (idempotent)."""
    global _FINDER
    if SIGNAL in sys.modules:  # already paid for (the importer of pmod_bench is not inside transformers)
        register()
        return
    if _FINDER is None:
        _FINDER = RegisterWhenNeeded(register)
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    global _FINDER
    if _FINDER is not None and _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
    _FINDER = None
