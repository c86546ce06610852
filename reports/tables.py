"""Build each report table once, as lines of typed values; :mod:`.render` formats them.

Per paper row the table holds a ``paper`` line (the paper's values) and, when some run reproduced
that row, a ``reproduced`` line and a ``diff`` line (reproduced - paper). A run of a configuration no
paper row reports (a model that is not the paper's, e.g. the tiny test model) gets its own
``measured`` line, labelled with its model and variant, after the paper's rows of a table that has
its variant: it is never folded into a paper row. Nothing is invented: a value
no run measured stays ``None`` (rendered as a dash) and a reproduced AVG is computed only when every
benchmark cell of the row is present (MME entering as score / 20, the paper's convention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

from .matching import PAPER_METHOD_VARIANTS, TRAINED_ONLY_VARIANTS, Reproduction
from .paper import PaperColumn, PaperTable, Value, as_number, load_paper_tables, paper_average, paper_keys

#: a value that does not apply (descriptive text columns on a reproduced line): rendered empty
NOT_APPLICABLE = ""

LINE_KINDS = ("paper", "reproduced", "diff", "measured")


@dataclass(frozen=True)
class Line:
    label: str  # the row label on its first line, "" on the reproduced / diff lines
    kind: str  # paper | reproduced | diff | measured (a run with no paper row)
    values: tuple[Value, ...]  # one per value column; None = missing
    key: Optional[str] = None  # MODEL/VARIANT of the paper row
    group: int = 0  # index of the paper row the line belongs to


@dataclass(frozen=True)
class ReportTable:
    """One table ready to render: header, lines and notes (pure data)."""

    id: str
    number: int
    title: str
    label_header: str
    columns: tuple[PaperColumn, ...]  # the value columns
    lines: tuple[Line, ...]
    compare: bool  # True when lines include reproduced / diff lines (a 'line' column is shown)
    notes: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()  # the runs (or profile rows) whose values the table shows
    heading: Optional[str] = None  # a table that is not the paper's (a host's own, reports.hosts): its heading, no citation

    def header(self, col: PaperColumn) -> str:
        return col.header

    def to_frame(self):
        """The table as a pandas DataFrame, for analysis: :func:`.render.render_csv`'s columns (the label, ``key``,
        ``line``, then one per value column, named by its header), one row per line, with the values as built
        rather than formatted: numbers unrounded, and NaN in a numeric column where a value is missing or is a
        text mark (the paper's '-', 'OVERFLOW'). The paper row's label is repeated on its reproduced and diff
        lines. Needs pandas (imported here, not with the package)::

            build_tables(match_runs(load_runs(["runs/profile", "runs/eval"])), [7])[0].to_frame()
        """
        import pandas as pd

        first: dict[int, str] = {}
        records = []
        for line in self.lines:
            first.setdefault(line.group, line.label)
            label = line.label or first[line.group]
            values = [v if v != NOT_APPLICABLE else None for v in line.values]
            records.append([label, line.key, line.kind, *values])
        frame = pd.DataFrame(records, columns=[self.label_header, "key", "line", *(self.header(c) for c in self.columns)])
        for c in self.columns:
            if c.kind not in ("label", "text"):
                frame[self.header(c)] = pd.to_numeric(frame[self.header(c)], errors="coerce").astype(float)
        return frame


def _reproduced_values(table: PaperTable, key: str, rep: Reproduction) -> tuple[Value, ...]:
    cols = table.value_columns
    measured: dict[str, Optional[float]] = {}
    for c in cols:
        if c.kind in ("benchmark", "efficiency"):
            measured[c.key] = rep.get(key, c.metric)
    out: list[Value] = []
    for c in cols:
        if c.kind in ("benchmark", "efficiency"):
            out.append(measured[c.key])
        elif c.kind == "avg":
            out.append(paper_average(measured, table.avg_over))
        elif c.kind == "unknown":
            out.append(None)  # an unknown column cannot be measured
        else:
            out.append(NOT_APPLICABLE)
    return tuple(out)


def _diff(paper: Sequence[Value], repro: Sequence[Value]) -> tuple[Value, ...]:
    out: list[Value] = []
    for p, r in zip(paper, repro):
        if r == NOT_APPLICABLE:
            out.append(NOT_APPLICABLE)
            continue
        a, b = as_number(p), as_number(r)
        out.append(None if a is None or b is None else b - a)
    return tuple(out)


def _measured_sources(table: PaperTable, key: Optional[str], rep: Reproduction) -> list[str]:
    """The runs that measured at least one of this table's columns for configuration ``key``."""
    out: list[str] = []
    for c in table.value_columns:
        if c.kind in ("benchmark", "efficiency"):
            src = rep.source_of(key, c.metric)
            if src and src not in out:
                out.append(src)
    return out


def build_table(table: PaperTable, rep: Optional[Reproduction] = None) -> ReportTable:
    """The report table of one paper table; ``rep=None`` gives the paper's values only.

    A paper row gets reproduced / diff lines when some run measured at least one of the table's
    columns for that row's configuration.
    """
    cols = table.value_columns
    measured = {r.key: _measured_sources(table, r.key, rep) for r in table.rows if r.key} if rep is not None else {}
    lines, used, sources = _paper_lines(table, rep, measured)
    extra: list[str] = []
    if rep is not None:
        measured_lines, extra, extra_sources = _measured_lines(table, rep)
        lines += measured_lines
        sources.extend(s for s in extra_sources if s not in sources)
    notes = _table_notes(table, with_runs=rep is not None)
    if rep is not None:
        notes += _comparison_notes(table, measured, used, extra)
    return ReportTable(
        id=table.id, number=table.number, title=table.title, label_header=table.label_column.header,
        columns=cols, lines=tuple(lines), compare=any(measured.values()) or bool(extra), notes=tuple(notes),
        sources=tuple(sources),
    )


def _paper_lines(table: PaperTable, rep: Optional[Reproduction], measured: dict) -> tuple[list[Line], list[str], list[str]]:
    """(lines, what reproduced each row, the runs read): every paper row's line, with reproduced and diff
    lines after each row some run measured (``measured``: the runs per row key)."""
    lines: list[Line] = []
    used: list[str] = []
    sources: list[str] = []
    for gi, row in enumerate(table.rows):
        paper_vals = tuple(row.cells.get(c.key) for c in table.value_columns)
        lines.append(Line(row.label, "paper", paper_vals, row.key, gi))
        if measured.get(row.key):
            repro = _reproduced_values(table, row.key, rep)
            lines.append(Line("", "reproduced", repro, row.key, gi))
            lines.append(Line("", "diff", _diff(paper_vals, repro), row.key, gi))
            used.append(f"{row.label or row.key} ({row.key}): {', '.join(measured[row.key])}")
            sources.extend(s for s in measured[row.key] if s not in sources)
    return lines, used, sources


def _measured_lines(table: PaperTable, rep: Reproduction) -> tuple[list[Line], list[str], list[str]]:
    """(lines, what each measured, the runs read) of runs of configurations no paper row reports, whose
    variant this table has: their own lines."""
    lines: list[Line] = []
    extra: list[str] = []
    sources: list[str] = []
    variants = {r.variant for r in table.rows if r.variant}
    # a comparison table also shows runs of the registry's methods that the paper does not report
    # (downsample, random, random_llm, prumerge_plus), on the paper's model or another one
    method_table = bool(variants & set(PAPER_METHOD_VARIANTS.values()))
    for key in rep.keys:
        variant = key.rpartition("/")[2]
        if key in paper_keys() or not (variant in variants or (method_table and variant in rep.method_variants)):
            continue
        srcs = _measured_sources(table, key, rep)
        if not srcs:
            continue
        model, _, variant = key.rpartition("/")
        lines.append(Line(f"{model} · {variant}", "measured", _reproduced_values(table, key, rep), key, len(table.rows) + len(extra)))
        extra.append(f"{model} · {variant}: {', '.join(srcs)}")
        sources.extend(s for s in srcs if s not in sources)
    return lines, extra, sources


def _table_notes(table: PaperTable, with_runs: bool) -> list[str]:
    """The notes every report of ``table`` has, up to its source: the paper's, and what this toolkit reproduces."""
    notes: list[str] = []
    notes.extend(table.notes)
    for row in table.rows:
        if row.note:
            notes.append(f"{row.label}: {row.note}")
    trained = [r.label.lstrip("+ ").strip() for r in table.rows if r.variant in TRAINED_ONLY_VARIANTS]
    if trained:
        many = len(trained) > 1
        notes.append(f"{', '.join(trained)}: paper values only. {'These methods need their' if many else 'It needs its'} own "
                     "training (a model trained with the method), which this toolkit does not run: "
                     f"{'they are' if many else 'it is'} never reproduced.")
    registry = [r.label.lstrip("+ ").strip() for r in table.rows if r.variant in PAPER_METHOD_VARIANTS.values()]
    if registry:
        notes.append(f"{', '.join(registry)}: training-free, reproduced from eval runs of the method "
                     "(pmod-bench eval --method NAME --match p-MoD-0.5: its budget solved to p-MoD-0.5's prefill FLOPs), "
                     "matched on the run's method config"
                     + ("; TFLOPs / KV cache from a profile row of the same config."
                        if any(c.kind == "efficiency" for c in table.value_columns) else "."))
    other = [r.label.lstrip("+ ").strip() for r in table.rows
             if r.variant and r.variant not in TRAINED_ONLY_VARIANTS and r.variant not in PAPER_METHOD_VARIANTS.values()
             and r.variant != "baseline" and not r.variant.startswith("p-MoD") and "MoD" not in r.variant]
    if other:
        notes.append(f"{', '.join(other)}: not implemented in this toolkit (paper values only).")
    if table.avg_over:
        notes.append(
            f"AVG: mean of {', '.join(table.avg_over)}"
            + (" (MME as score/20)" if "MME" in table.avg_over else "")
            + ("; a reproduced AVG only when every one of them was measured." if with_runs else ".")
        )
    notes.append(f"Source: {table.source_text}.")
    return notes


def _comparison_notes(table: PaperTable, measured: dict, used: list[str], extra: list[str]) -> list[str]:
    """The notes of a report with runs: what the reproduced, diff and measured lines are, and which runs gave them."""
    notes: list[str] = []
    if any(measured.values()):
        notes.append("diff = reproduced - paper; a dash marks a value no run measured.")
        notes.extend(f"Reproduced {u}." for u in used)
        if any(not measured.get(r.key) for r in table.rows if r.key):
            notes.append("Rows without a reproduced line were not matched by any run.")
    elif any(r.key for r in table.rows):
        notes.append("No run matched a row of this table.")
    if extra:
        notes.append("measured = a run of a model that is not the paper's (or of a configuration the paper does not "
                     "report): its own values, with no paper counterpart and no diff.")
        notes.extend(f"Measured {u}." for u in extra)
    return notes


def build_tables(rep: Optional[Reproduction] = None, tables: Optional[Sequence[Union[int, str]]] = None) -> list[ReportTable]:
    """Report tables for every paper table (or the numbers / ids in ``tables``)."""
    wanted = None if tables is None else {f"table{t}" if str(t).isdigit() else str(t).lower() for t in tables}
    return [build_table(t, rep) for t in load_paper_tables() if wanted is None or t.id in wanted]


__all__ = ["Line", "ReportTable", "build_table", "build_tables", "NOT_APPLICABLE", "LINE_KINDS"]
