"""pmod-bench: train, evaluate, measure and report p-MoD multimodal LLMs.

``import pmod_bench`` is light (no torch, transformers or lmms-eval import); the model classes load
on first use.

Registration with transformers' Auto classes (``AutoConfig``, ``AutoModelForImageTextToText``,
``AutoProcessor``) does not depend on import order: after ``import pmod_bench`` it happens the moment
transformers' Auto classes are imported (or at once, if they already are; see ``_autoregister.py``), and
importing the p-MoD model module (``pmod_bench.model.modeling``) or calling :func:`register` does it
explicitly.  So, in your own script, either order works::

    import pmod_bench
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(p_mod_checkpoint_dir)
"""

from __future__ import annotations

import importlib
from typing import Any

from pmod_bench import _autoregister
from pmod_bench.model.config import PMoDConfig
from pmod_bench.model.schedules import mean_retention, prd_ratios

__version__ = "0.1.0"

_LAZY = {
    "to_pmod": "pmod_bench.model.modeling",
    "PMoDLlavaConfig": "pmod_bench.model.hf_config",
    "PMoDLlavaNextConfig": "pmod_bench.model.hf_config",
    "PMoDLlavaForConditionalGeneration": "pmod_bench.model.modeling",
    "PMoDLlavaNextForConditionalGeneration": "pmod_bench.model.modeling",
    "PMoDQwen2_5_VLConfig": "pmod_bench.model.modeling",
    "PMoDQwen2_5_VLForConditionalGeneration": "pmod_bench.model.modeling",
    "PMoDLlavaOnevisionConfig": "pmod_bench.model.modeling",
    "PMoDLlavaOnevisionForConditionalGeneration": "pmod_bench.model.modeling",
    "PMoDOverflowError": "pmod_bench.model.plan",
    "build_preset": "pmod_bench.model.presets",
    "preset_config": "pmod_bench.model.presets",
    "load_model": "pmod_bench.model.loading",
}

__all__ = ["PMoDConfig", "prd_ratios", "mean_retention", "register", "__version__", *_LAZY]


def register() -> None:
    """Register the p-MoD configs, models and processors with transformers' Auto classes (idempotent)."""
    importlib.import_module("pmod_bench.model.modeling")  # registers at import


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pmod_bench' has no attribute '{name}'")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)


_autoregister.install(register)  # now if transformers' Auto classes are loaded, else the moment they are
