"""Reports: every table and trade-off curve of the p-MoD paper, rebuilt from run directories.

    from pmod_bench.reports import build_report
    build_report(["runs/profile", "runs/eval-pmod05"], "report")   # runs beside the paper
    build_report(output="report-paper", paper=True)                 # the paper alone

The pieces, each usable alone: :mod:`.paper` (the paper's Tables 1-12 as data), :mod:`.runs` (read
run directories, docs/RUN_DIRS.md), :mod:`.matching` (runs -> paper rows), :mod:`.tables` (build
rows once), :mod:`.render` (Markdown / LaTeX / CSV, pure), :mod:`.figures` (matplotlib, imported
lazily), :mod:`.build` (write everything atomically), :mod:`.cli` (``pmod-bench report``).
Importing this package imports neither matplotlib nor pandas.
"""

from .build import ReportError, ReportResult, build_report
from .matching import (
    DEFAULT_MODEL,
    Label,
    LabelError,
    Reproduction,
    canonical_model,
    canonical_variant,
    match_runs,
    parse_label,
)
from .paper import (
    PaperColumn,
    PaperRow,
    PaperTable,
    load_paper_tables,
    paper_average,
    paper_table,
)
from .render import render_csv, render_latex, render_markdown
from .runs import Run, RunDirError, load_run, load_runs
from .tables import Line, ReportTable, build_table, build_tables

__all__ = [
    "build_report", "ReportResult", "ReportError",
    "load_paper_tables", "paper_table", "paper_average", "PaperTable", "PaperRow", "PaperColumn",
    "load_run", "load_runs", "Run", "RunDirError",
    "match_runs", "parse_label", "canonical_model", "canonical_variant", "Label", "LabelError", "Reproduction",
    "DEFAULT_MODEL",
    "build_table", "build_tables", "ReportTable", "Line",
    "render_markdown", "render_latex", "render_csv",
]
