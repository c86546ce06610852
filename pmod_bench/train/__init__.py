"""Training: the paper's two-stage LLaVA recipe with p-MoD (``pmod-bench train``).

Library (this package) vs entrypoint (``pmod_bench.train.cli``) vs configs (``recipes/*.yaml``)::

    from pmod_bench.train import load_recipe, train
    cfg = load_recipe("pmod-llava-next-7b-sft", ["data.json=llava_next.json", "data.image_folder=images"])
    summary = train(cfg)

``import pmod_bench.train`` stays light; torch / transformers load with the first use of
``train`` or the data/model helpers.
"""

from __future__ import annotations

import importlib
from typing import Any

from pmod_bench.train.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    describe_keys,
    list_recipes,
    load_recipe,
)

_LAZY = {
    "train": "pmod_bench.train.trainer",
    "PMoDTrainer": "pmod_bench.train.trainer",
    "make_demo_dataset": "pmod_bench.train.demo",
    "LlavaConversationDataset": "pmod_bench.train.data",
    "DataCollator": "pmod_bench.train.data",
    "ModalityLengthGroupedSampler": "pmod_bench.train.data",
    "BadSampleError": "pmod_bench.train.data",
    "build_model": "pmod_bench.train.build",
    "apply_trainable": "pmod_bench.train.build",
}

__all__ = ["ConfigError", "DataConfig", "ModelConfig", "OptimConfig", "TrainConfig", "describe_keys", "list_recipes",
           "load_recipe", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pmod_bench.train' has no attribute '{name}'")
    return getattr(importlib.import_module(module), name)
