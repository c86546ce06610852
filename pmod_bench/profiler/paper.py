"""The paper's efficiency numbers, printed beside the profiler's (p-MoD paper, Tables 1 and 7).

TFLOPs are the paper's inference TFLOPs; KV cache is relative to the baseline; latency in ms on one
RTX A6000; GPU hours of training on 8 x RTX A6000 (vision encoder frozen for every model).
"""

from __future__ import annotations

from typing import Optional

#: arch -> variant -> metric -> value
PAPER_EFFICIENCY: dict[str, dict[str, dict[str, float]]] = {
    "llava-next-7b": {  # Table 7 (efficiency columns) and Tables 1 / 5
        "baseline": {"tflops": 39.46, "kv_cache_ratio": 1.0, "latency_ms": 519.1, "gpu_hours": 560},
        "p-MoD-0.3": {"tflops": 17.78, "kv_cache_ratio": 0.423, "latency_ms": 326.7, "gpu_hours": 403},
        "p-MoD-0.4": {"tflops": 19.56, "kv_cache_ratio": 0.475, "latency_ms": 347.1, "gpu_hours": 415},
        "p-MoD-0.5": {"tflops": 21.94, "kv_cache_ratio": 0.537, "latency_ms": 368.0, "gpu_hours": 435},
    },
    "llava-1.5-7b": {  # Table 1
        "baseline": {"tflops": 8.38, "kv_cache_ratio": 1.0},
        "p-MoD-0.5": {"tflops": 4.92, "kv_cache_ratio": 0.537},
    },
}

#: the scenario the paper's numbers correspond to (see docs in flops.paper_prefill_flops)
PAPER_SCENARIO = {"image_size": (672, 672), "text_tokens": 58}


def is_paper_scenario(image_size, text_tokens: int) -> bool:
    """Whether (image size, text tokens) is the scenario of the paper's efficiency numbers (672x672, 58)."""
    return tuple(int(x) for x in image_size) == PAPER_SCENARIO["image_size"] and int(text_tokens) == PAPER_SCENARIO["text_tokens"]


def paper_value(arch: str, variant: str, metric: str) -> Optional[float]:
    return PAPER_EFFICIENCY.get(arch, {}).get(variant, {}).get(metric)


__all__ = ["PAPER_EFFICIENCY", "PAPER_SCENARIO", "paper_value", "is_paper_scenario"]
