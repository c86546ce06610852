"""Register the p-MoD classes with transformers' Auto classes without importing transformers early.

``import pmod_bench`` must stay light (no torch / transformers import), yet after it
``AutoConfig`` / ``AutoModelForImageTextToText`` / ``AutoProcessor`` must know the p-MoD model types.
So registration runs at the moment transformers loads its auto modules: a meta-path finder wraps
the loader of those modules and registers right after the module has executed. If they are loaded
already, registration happens at once. Nothing of transformers is modified; registration goes
through the public ``Auto*.register`` API.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings

_CONFIG_MODULE = "transformers.models.auto"  # the auto package, once fully executed
# Models and processors are registered when the first p-MoD config is built (its __post_init__
# calls register_all), i.e. just before an Auto class looks the model up; transformers is fully
# imported by then. If transformers' auto modules are loaded already, everything registers at once.
_LOADED_MARKER = "transformers.models.auto.modeling_auto"
_state = {"configs": False, "models": False}


def register_configs() -> None:
    if _state["configs"]:
        return
    _state["configs"] = True
    from transformers.models.auto.configuration_auto import AutoConfig

    from pmod_bench.model.hf_config import PMoDLlavaConfig, PMoDLlavaNextConfig

    AutoConfig.register(PMoDLlavaConfig.model_type, PMoDLlavaConfig, exist_ok=True)
    AutoConfig.register(PMoDLlavaNextConfig.model_type, PMoDLlavaNextConfig, exist_ok=True)


def register_all() -> None:
    """Register configs, models and processors now (idempotent)."""
    if _state["models"]:
        return
    _state["models"] = True
    register_configs()
    from pmod_bench.model.modeling import register_auto_classes

    register_auto_classes()


def _safe(fn):
    def run() -> None:
        try:
            fn()
        except Exception as exc:  # never break `import transformers` because of us
            warnings.warn(f"pmod_bench could not register its classes with transformers: {exc!r}", stacklevel=2)

    return run


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader, callback):
        self._loader, self._callback = loader, callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._callback()

    def __getattr__(self, name):  # get_source, is_package, ... of the real loader
        return getattr(self._loader, name)


class _AutoModuleFinder(importlib.abc.MetaPathFinder):
    def __init__(self, callbacks):
        self.callbacks = callbacks

    def find_spec(self, fullname, path=None, target=None):
        callback = self.callbacks.get(fullname)
        if callback is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader, callback)
        return spec


def install() -> None:
    if _LOADED_MARKER in sys.modules:
        _safe(register_all)()
    elif _CONFIG_MODULE in sys.modules:
        _safe(register_configs)()
    elif not any(isinstance(f, _AutoModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AutoModuleFinder({_CONFIG_MODULE: _safe(register_configs)}))
