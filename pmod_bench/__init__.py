"""pmod-bench: train, evaluate, measure and report p-MoD multimodal LLMs.

``import pmod_bench`` is light (no torch, transformers or lmms-eval import). The model classes load
on first use; the p-MoD configs and models are registered with transformers' Auto classes as soon as
transformers loads them, so after ``import pmod_bench``::

    model = AutoModelForImageTextToText.from_pretrained(p_mod_checkpoint_dir)
"""

from __future__ import annotations

import importlib
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
    "PMoDOverflowError": "pmod_bench.model.layer",
    "build_preset": "pmod_bench.model.presets",
    "preset_config": "pmod_bench.model.presets",
    "load_model": "pmod_bench.model.loading",
}

__all__ = ["PMoDConfig", "prd_ratios", "mean_retention", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pmod_bench' has no attribute '{name}'")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)


from pmod_bench import _autoregister  # noqa: E402

_autoregister.install()
