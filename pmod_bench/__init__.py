"""pmod-bench: train, evaluate, measure and report p-MoD multimodal LLMs.

``import pmod_bench`` is light (no torch, transformers or lmms-eval import); the model classes load
on first use.

Registration with transformers' Auto classes (``AutoConfig``, ``AutoModelForImageTextToText``,
``AutoProcessor``) follows one rule: **it happens when the p-MoD model module is imported**
(``pmod_bench.model.modeling``), which every entry point of the toolkit does (``load_model``,
``to_pmod``, ``build_preset``, the CLI, the lmms-eval plugin) and which :func:`register` does
explicitly.  ``import pmod_bench`` does it too when transformers is already imported (it costs
nothing extra then).  So, in your own script::

    import pmod_bench
    pmod_bench.register()              # or: import transformers first, then pmod_bench
    model = AutoModelForImageTextToText.from_pretrained(p_mod_checkpoint_dir)
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

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


if "transformers" in sys.modules:  # already paid for: register now (see the module docstring)
    register()
