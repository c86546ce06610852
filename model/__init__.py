"""The p-MoD model: config, schedules, layer, HF model classes, presets (``pmod_bench.model``)."""

from .config import PMoDConfig
from .schedules import match_shift, mean_retention, prd_ratios

__all__ = ["PMoDConfig", "prd_ratios", "mean_retention", "match_shift"]
