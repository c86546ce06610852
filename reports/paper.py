"""The paper's Tables 1-12 as data (``paper_tables.json``) and the paper's averaging convention.

The numbers are those printed in the p-MoD paper (:data:`PAPER_TITLE`, ICCV 2025); every column
records where its header came from (``header_source``: ``paper``, ``restored``, ``inferred`` by
matching values across tables, or ``unknown``; data provenance only, never shown in a report, which
cites the paper and the table number). Percentages are stored as numbers (``53.7%`` -> ``53.7``), MME as the raw
perception score (0-2000), non-numeric marks (``OVERFLOW``, ``> 60%``, ``-``) as strings and empty
cells as ``null``.

Averages follow the paper: the mean of a row's benchmark columns with MME entering as score / 20,
e.g. Table 2, LLaVA-v1.5: (69.7 + 64.1 + 36.6 + 76.6 + 1506.8 / 20) / 5 = 64.5.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from typing import Mapping, Optional, Sequence, Union

Value = Union[float, str, None]

#: benchmark names of the paper's columns (the ``benchmark`` key of an eval run's summary rows)
BENCHMARKS = (
    "Doc", "Chart", "Text", "Info", "RWQA", "GQA", "OKVQA", "POPE", "AI2D", "SEED",
    "SQA", "MMB", "MMMU", "VQAv2", "MME", "RefCOCO", "RefCOCO+", "RefCOCOg",
)
#: benchmarks whose score enters an average divided by this (MME: score out of 2000 -> percent)
AVERAGE_DIVISOR = {"MME": 20.0}
#: the three paper models a run can be matched to
PAPER_MODELS = ("llava-v1.5-7b", "llava-next-7b", "llava-next-13b")
#: the paper every table comes from (cited in reports)
PAPER_TITLE = "p-MoD: Building Mixture-of-Depths MLLMs via Progressive Ratio Decay"
PAPER_CITATION = f"{PAPER_TITLE} (Zhang et al., ICCV 2025)"
#: |recomputed - printed| allowed when checking a printed AVG (values are printed to 1 decimal)
AVG_TOLERANCE = 0.05


@dataclass(frozen=True)
class PaperColumn:
    """One column of a paper table."""

    key: str
    header: str
    kind: str  # label | text | benchmark | efficiency | avg | unknown
    header_source: str  # paper | restored | inferred | unknown
    metric: Optional[str] = None  # benchmark name, or the efficiency metric (prefill_tflops, ...)
    unit: str = ""
    decimals: int = 1


@dataclass(frozen=True)
class PaperRow:
    """One row of a paper table; ``model``/``variant`` say which configuration it reports."""

    label: str
    cells: Mapping[str, Value]
    model: Optional[str] = None
    variant: Optional[str] = None
    note: Optional[str] = None
    avg_recomputes: bool = True

    @property
    def key(self) -> Optional[str]:
        """``MODEL/VARIANT`` (e.g. ``llava-next-7b/p-MoD-0.5``), the key runs are matched to."""
        return f"{self.model}/{self.variant}" if self.model and self.variant else None


@dataclass(frozen=True)
class PaperTable:
    id: str
    number: int
    title: str
    columns: tuple[PaperColumn, ...]
    rows: tuple[PaperRow, ...]
    source: Mapping[str, object]
    notes: tuple[str, ...] = ()
    avg_over: tuple[str, ...] = ()

    @property
    def label_column(self) -> PaperColumn:
        return self.columns[0]

    @property
    def value_columns(self) -> tuple[PaperColumn, ...]:
        return self.columns[1:]

    def column(self, key: str) -> PaperColumn:
        for c in self.columns:
            if c.key == key:
                return c
        raise KeyError(f"{self.id} has no column '{key}'; columns: {[c.key for c in self.columns]}")

    @property
    def source_text(self) -> str:
        """The citation of this table: the paper's title and the table number."""
        return f"{PAPER_CITATION}, Table {self.number}"


def as_number(value: Value) -> Optional[float]:
    """The numeric value of a cell, or None for a missing / non-numeric one (OVERFLOW, '> 60%')."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def paper_average(values: Mapping[str, Value], over: Sequence[str]) -> Optional[float]:
    """The paper's AVG of ``values`` over the benchmark columns ``over``; None if any is missing.

    MME enters as score / 20. Nothing is averaged from a partial row: one missing or non-numeric
    cell makes the average missing.

    >>> round(paper_average({"SQA": 69.7, "MMB": 64.1, "MMMU": 36.6, "VQAv2": 76.6, "MME": 1506.8},
    ...                     ["SQA", "MMB", "MMMU", "VQAv2", "MME"]), 2)
    64.47
    """
    if not over:
        return None
    total = 0.0
    for key in over:
        x = as_number(values.get(key))
        if x is None:
            return None
        total += x / AVERAGE_DIVISOR.get(key, 1.0)
    return total / len(over)


def _column(d: Mapping) -> PaperColumn:
    return PaperColumn(
        key=d["key"], header=d["header"], kind=d["kind"], header_source=d["header_source"],
        metric=d.get("metric"), unit=d.get("unit", ""), decimals=int(d.get("decimals", 1)),
    )


def _row(d: Mapping) -> PaperRow:
    return PaperRow(
        label=d["label"], cells=dict(d["cells"]), model=d.get("model"), variant=d.get("variant"),
        note=d.get("note"), avg_recomputes=bool(d.get("avg_recomputes", True)),
    )


@functools.lru_cache(maxsize=1)
def _load() -> tuple[dict, tuple[PaperTable, ...]]:
    text = resources.files(__package__).joinpath("paper_tables.json").read_text(encoding="utf-8")
    doc = json.loads(text)
    tables = tuple(
        PaperTable(
            id=t["id"], number=int(t["number"]), title=t["title"],
            columns=tuple(_column(c) for c in t["columns"]), rows=tuple(_row(r) for r in t["rows"]),
            source=dict(t["source"]), notes=tuple(t.get("notes", ())), avg_over=tuple(t.get("avg_over", ())),
        )
        for t in doc["tables"]
    )
    meta = {k: v for k, v in doc.items() if k != "tables"}
    return meta, tables


def paper_metadata() -> dict:
    """The data file's description, source and conventions (everything but the tables)."""
    return dict(_load()[0])


def load_paper_tables() -> tuple[PaperTable, ...]:
    """Tables 1-12 of the paper, in order."""
    return _load()[1]


def paper_table(table: Union[int, str]) -> PaperTable:
    """One paper table by number (``7``) or id (``"table7"``)."""
    want = f"table{table}" if isinstance(table, int) or str(table).isdigit() else str(table).lower()
    for t in load_paper_tables():
        if t.id == want:
            return t
    known = ", ".join(t.id for t in load_paper_tables())
    raise KeyError(f"unknown paper table {table!r}; known: {known}")


@functools.lru_cache(maxsize=1)
def paper_keys() -> frozenset:
    """Every ``MODEL/VARIANT`` some paper row reports."""
    return frozenset(r.key for t in load_paper_tables() for r in t.rows if r.key)


def paper_variants() -> tuple[str, ...]:
    """Every ``variant`` a paper row reports (baseline, p-MoD-0.5, FastV, ...), in first-seen order."""
    seen: dict[str, None] = {}
    for t in load_paper_tables():
        for r in t.rows:
            if r.variant:
                seen.setdefault(r.variant, None)
    return tuple(seen)


__all__ = [
    "BENCHMARKS", "AVERAGE_DIVISOR", "PAPER_MODELS", "PAPER_TITLE", "PAPER_CITATION", "paper_keys", "AVG_TOLERANCE", "PaperColumn", "PaperRow", "PaperTable",
    "as_number", "paper_average", "load_paper_tables", "paper_table", "paper_metadata", "paper_variants",
]
