"""Register the p-MoD classes with transformers' Auto classes without importing transformers early.

``import pmod_bench`` must stay light (no torch / transformers import), yet after it
``AutoConfig`` / ``AutoModelForImageTextToText`` / ``AutoProcessor`` must know the p-MoD model types.

* Configs register as soon as transformers can give us its LLaVA config classes: a meta-path
  finder watches the auto package and the two LLaVA configuration modules and, right after one of
  them has finished executing, tries to register (a try made while one of them is still half
  imported fails quietly and the next one succeeds).
* Models and processors register when the first p-MoD config is built (its ``__post_init__`` calls
  :func:`register_all`), i.e. just before an Auto class looks the model up; transformers is fully
  imported by then. If transformers' auto modules are loaded already, everything registers at once.

Nothing of transformers is modified; registration goes through the public ``Auto*.register`` API.
"""

from __future__ import annotations

import importlib.abc
import sys

_WATCHED = (
    "transformers.models.auto",
    "transformers.models.llava.configuration_llava",
    "transformers.models.llava_next.configuration_llava_next",
)
_MODELS_LOADED = "transformers.models.auto.modeling_auto"
_state = {"configs": False, "models": False}


def register_configs() -> None:
    """Register the p-MoD configs with AutoConfig (idempotent; the flag is set only on success)."""
    if _state["configs"]:
        return
    from transformers.models.auto.configuration_auto import AutoConfig

    from pmod_bench.model.hf_config import PMoDLlavaConfig, PMoDLlavaNextConfig

    AutoConfig.register(PMoDLlavaConfig.model_type, PMoDLlavaConfig, exist_ok=True)
    AutoConfig.register(PMoDLlavaNextConfig.model_type, PMoDLlavaNextConfig, exist_ok=True)
    _state["configs"] = True


def register_all() -> None:
    """Register configs, models and processors now (idempotent)."""
    if _state["models"]:
        return
    register_configs()
    from pmod_bench.model.modeling import register_auto_classes

    register_auto_classes()
    _state["models"] = True


def _half_imported(exclude: str) -> bool:
    """Is one of the modules we need still executing (a circular import in progress)?"""
    for name in (*_WATCHED, "transformers.models.auto.configuration_auto"):
        module = sys.modules.get(name)
        if name != exclude and module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False):
            return True
    return False


def _try_register_configs(just_loaded: str) -> None:
    # Called right after a watched module executed. If another one is still half imported, wait
    # for it: its own completion calls us again (or the first p-MoD config registers everything).
    if _state["configs"] or _state.get("busy") or _half_imported(just_loaded):
        return
    _state["busy"] = True
    try:
        register_configs()
    finally:
        _state["busy"] = False


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader, name):
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _try_register_configs(self._name)

    def __getattr__(self, name):  # get_source, is_package, ... of the real loader
        return getattr(self._loader, name)


class _AutoModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _WATCHED or _state["configs"]:
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
            spec.loader = _RegisteringLoader(spec.loader, fullname)
        return spec


def install() -> None:
    if _MODELS_LOADED in sys.modules:
        register_all()
        return
    if any(name in sys.modules for name in _WATCHED):
        _try_register_configs("")
    if not _state["configs"] and not any(isinstance(f, _AutoModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AutoModuleFinder())
