"""Comparison methods (token compression) in the same harness as p-MoD: a registry of typed configs.

``pmod_bench.methods`` is light to import (configs only); the implementations import torch on use.

    from pmod_bench.methods import parse_method_spec, apply_method
    cfg = parse_method_spec("visionzip:dominant=54,contextual=10")
    model = apply_method(model, cfg)            # any HF LLaVA-1.5 / LLaVA-NeXT model, vanilla or p-MoD
    out = model.generate(**inputs)              # the method runs inside forward / generate

Registered (``stage`` = where the method acts): ``visionzip``, ``fastervlm``, ``prumerge``,
``prumerge_plus``, ``downsample``, ``random`` (``vision``: before the LLM); ``fastv``, ``pyramiddrop``,
``sparsevlm``, ``random_llm`` (``llm``: inside the LLM's layers, see :mod:`.llm`); ``illava`` (both: merges in
the vision tower, then in the LLM's layers; registered as ``llm``). A new method is one
module with a ``MethodConfig`` subclass under ``@register_method("name")``, imported below.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import (METHODS, STAGES, MethodConfig, MethodError, ModelGeometry, VisionAccount, field_docs, get_method,
                   method_dict, param, parse_method_spec, register_method)

# the method modules register themselves; they import torch, so they load on first use of the registry
_MODULES = ("visionzip", "fastervlm", "prumerge", "downsample", "random_prune", "fastv", "pyramiddrop", "random_llm",
            "sparsevlm", "illava")
_loaded = False


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for name in _MODULES:
            importlib.import_module(f"{__name__}.{name}")
        _loaded = True


def _wrap(fn):
    def inner(*args: Any, **kwargs: Any):
        _load_all()
        return fn(*args, **kwargs)

    inner.__doc__, inner.__name__, inner.__wrapped__ = fn.__doc__, fn.__name__, fn
    return inner


get_method = _wrap(get_method)  # noqa: F811
parse_method_spec = _wrap(parse_method_spec)  # noqa: F811
method_dict = _wrap(method_dict)  # noqa: F811


def available_methods() -> dict[str, type[MethodConfig]]:
    """Every registered method by name."""
    _load_all()
    return dict(METHODS)


def apply_method(model, method, **method_args):
    """Run ``model`` with ``method`` (see :func:`pmod_bench.methods.apply.apply_method`)."""
    _load_all()
    from .apply import apply_method as _apply

    return _apply(model, method, **method_args)


def solve(*args: Any, **kwargs: Any):
    """The equal-compute solver (see :func:`pmod_bench.methods.accounting.solve`)."""
    _load_all()
    from .accounting import solve as _solve

    return _solve(*args, **kwargs)


__all__ = [
    "METHODS", "STAGES", "MethodConfig", "MethodError", "ModelGeometry", "VisionAccount", "param", "field_docs",
    "register_method", "get_method", "parse_method_spec", "method_dict", "available_methods", "apply_method", "solve",
]
