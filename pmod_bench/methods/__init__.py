"""Comparison methods (token compression) in the same harness as p-MoD: a registry of typed configs.

``pmod_bench.methods`` is light to import (configs only); the implementations import torch on use.

    from pmod_bench.methods import parse_method_spec, apply_method
    cfg = parse_method_spec("visionzip:dominant=54,contextual=10")
    model = apply_method(model, cfg)            # a supported HF model (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL, LLaVA-OneVision), vanilla or p-MoD
    out = model.generate(**inputs)              # the method runs inside forward / generate

Registered (``stage`` = where the method acts): ``visionzip``, ``fastervlm``, ``prumerge``,
``prumerge_plus``, ``downsample``, ``random``, ``dycoke`` (video only) (``vision``: before the LLM; on video prompts see
:mod:`.video`); ``fastv``, ``pyramiddrop``,
``sparsevlm``, ``random_llm`` (``llm``: inside the LLM's layers, see :mod:`.llm`); ``illava`` (both: merges in
the vision tower, then in the LLM's layers; registered as ``llm``). A new method is one module of this package with a
``MethodConfig`` subclass under ``@register_method("name")``: the registry imports every module of the
package on its first lookup (:class:`pmod_bench.model.registry.Registry`), so there is no list to edit.
"""

from __future__ import annotations

from typing import Any

from .base import (METHODS, STAGES, MethodConfig, MethodError, ModelGeometry, VisionAccount, field_docs, get_method,
                   method_dict, param, parse_method_spec, register_method)


def available_methods() -> dict[str, type[MethodConfig]]:
    """Every registered method by name (every module of this package imported once: its registry's discovery)."""
    return dict(METHODS.items())


def apply_method(model, method, **method_args):
    """Run ``model`` with ``method`` (see :func:`pmod_bench.methods.apply.apply_method`)."""
    from .apply import apply_method as _apply

    return _apply(model, method, **method_args)


def solve(*args: Any, **kwargs: Any):
    """The equal-compute solver (see :func:`pmod_bench.methods.accounting.solve`)."""
    from .accounting import solve as _solve

    return _solve(*args, **kwargs)


__all__ = [
    "METHODS", "STAGES", "MethodConfig", "MethodError", "ModelGeometry", "VisionAccount", "param", "field_docs",
    "register_method", "get_method", "parse_method_spec", "method_dict", "available_methods", "apply_method", "solve",
]
