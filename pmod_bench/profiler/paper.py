"""The paper's efficiency numbers, printed beside the profiler's (p-MoD paper, Tables 1 and 7).

TFLOPs are the paper's inference TFLOPs; KV cache is relative to the baseline; latency in ms on one
RTX A6000; GPU hours of training on 8 x RTX A6000 (vision encoder frozen for every model). The values
are read from the paper's tables as data (``pmod_bench/reports/paper_tables.json``, their one home), keyed by
the paper's row; a profile row finds its paper row by its configuration (:func:`paper_variant`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from .scenario import PAPER_IMAGE_SIZE, PAPER_TEXT_TOKENS

#: profiler architecture -> (paper table, that table's model name) of its efficiency numbers
_SOURCES = {"llava-next-7b": (7, "llava-next-7b"), "llava-1.5-7b": (1, "llava-v1.5-7b")}
#: table column -> metric (KV cache: percent in the tables, a ratio here)
_COLUMNS = {"TFLOPs": "tflops", "KV cache": "kv_cache_ratio", "Latency (ms)": "latency_ms", "Training GPU hours": "gpu_hours"}


def _efficiency() -> dict[str, dict[str, dict[str, float]]]:
    from pmod_bench.reports.paper import paper_table

    out: dict[str, dict[str, dict[str, float]]] = {}
    for arch, (number, model) in _SOURCES.items():
        for row in paper_table(number).rows:
            if row.model != model:
                continue
            values = {}
            for column, metric in _COLUMNS.items():
                v = row.cells.get(column)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    values[metric] = round(v / 100, 6) if metric == "kv_cache_ratio" else v
            out.setdefault(arch, {})[row.variant] = values
    return out


#: arch -> variant -> metric -> value (llava-next-7b: Table 7's efficiency columns; llava-1.5-7b: Table 1)
PAPER_EFFICIENCY: dict[str, dict[str, dict[str, float]]] = _efficiency()

#: the scenario the paper's numbers correspond to (see docs in flops.paper_prefill_flops)
PAPER_SCENARIO = {"image_size": PAPER_IMAGE_SIZE, "text_tokens": PAPER_TEXT_TOKENS}


def is_paper_scenario(image_size, text_tokens: int) -> bool:
    """Whether (image size, text tokens) is the scenario of the paper's efficiency numbers (672x672, 58)."""
    return tuple(int(x) for x in image_size) == PAPER_SCENARIO["image_size"] and int(text_tokens) == PAPER_SCENARIO["text_tokens"]


def paper_variant(row: Mapping[str, Any]) -> str:
    """The paper row a profile row measures, from its configuration as data (``pmod``, ``method_config``), as
    ``pmod-bench report`` decides it (:func:`pmod_bench.reports.matching.variant_from_profile_row`), never from
    its display name ``variant``: a row of p-MoD-0.5's configuration, whatever it is called, gets p-MoD-0.5's
    numbers; ``p-MoD-0.5-max0.9`` or ``pmod:string=false`` get none."""
    from pmod_bench.reports.matching import variant_from_profile_row

    return variant_from_profile_row(row)[0]


def paper_value(arch: str, row: Mapping[str, Any], metric: str) -> Optional[float]:
    """The paper's ``metric`` (tflops, kv_cache_ratio, latency_ms, gpu_hours) for the configuration of ``row``
    (a profile row dict) on ``arch``, or None (no paper row, or the table lacks the metric)."""
    table = PAPER_EFFICIENCY.get(arch)
    return table.get(paper_variant(row), {}).get(metric) if table else None


__all__ = ["PAPER_EFFICIENCY", "PAPER_SCENARIO", "paper_value", "paper_variant", "is_paper_scenario"]
