"""``pmod-bench profile``: FLOPs, KV cache, latency, memory and training cost of every variant.

Light to import (the CLI imports ``pmod_bench.profiler.cli`` at start-up); the names below load
their modules on first use::

    from pmod_bench.profiler import profile, Scenario
    rows = profile("llava-next-7b", ["baseline", "p-MoD-0.5"], [Scenario((672, 672), text_tokens=58)])
    rows[1].prefill_tflops, rows[1].kv_cache_ratio
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "profile": ".core", "Scenario": ".core", "ProfileRow": ".core", "scenarios_from": ".core", "REQUIRED_KEYS": ".core",
    "CONVENTIONS": ".core",
    "Arch": ".arch", "load_arch": ".arch", "vision_layout": ".arch", "VisionLayout": ".arch",
    "Variant": ".variants", "Baseline": ".variants", "PMoD": ".variants", "FastV": ".variants",
    "register_variant": ".variants", "parse_variant": ".variants", "default_variants": ".variants",
    "llm_prefill_flops": ".flops", "llm_decode_flops": ".flops", "vision_flops": ".flops", "paper_prefill_flops": ".flops",
    "train_flops": ".flops",
    "count_flops_meta": ".counters", "count_flops_model": ".counters", "count_flops_fvcore": ".counters",
    "kv_cache": ".kvcache", "kv_cache_batch": ".kvcache", "measure_kv": ".kvcache",
    "time_generation": ".latency", "telemetry": ".latency",
    "HARDWARE": ".hardware", "get_hardware": ".hardware",
    "RECIPES": ".training", "TrainRecipe": ".training", "get_recipe": ".training",
    "format_table": ".render", "write_run_dir": ".render", "write_json": ".render", "rows_to_csv": ".render",
    "ProfileError": ".errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pmod_bench.profiler' has no attribute '{name}'")
    return getattr(importlib.import_module(module, __name__), name)


def __dir__() -> list[str]:
    return sorted(__all__)
