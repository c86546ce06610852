"""Reports across hosts: which host each run (or profile row) measured, and the per-host tables and figure.

The paper's tables are LLaVA's (LLaVA-1.5, LLaVA-NeXT): only runs of those hosts (and runs from before run
directories said their host) feed them. Every other host found among the runs (Qwen2.5-VL, LLaVA-OneVision, ...)
gets tables of its own, built from its runs alone, as the paper's are built (:func:`.matching.match_runs`):

- ``HOST-efficiency``: the analog of Table 7, baseline and p-MoD shift factors δ with Table 7's columns (training
  cost, TFLOPs, latency, KV cache, Table 7's benchmarks and their AVG);
- ``HOST-methods``: the analog of Tables 5 / 8-10, baseline, p-MoD-δ and the comparison methods (matched to
  p-MoD-0.5's FLOPs as for the paper's rows) with KV cache, TFLOPs and every benchmark the host's runs measured;

and one trade-off figure (accuracy vs prefill TFLOPs / KV cache, % of the baseline: p-MoD's shifts and the
methods' budgets). Where a run says its host: docs/RUN_DIRS.md (eval run.json ``host``, profile run.json
``hosts`` per arch, train_summary.json ``host``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .matching import PAPER_HOSTS, Reproduction
from .paper import BENCHMARKS, PaperColumn, paper_average, paper_table
from .runs import Run
from .tables import Line, ReportTable


#: display names of host families (others are shown as their family)
HOST_TITLES = {"llava": "LLaVA-1.5", "llava_next": "LLaVA-NeXT", "qwen2_5_vl": "Qwen2.5-VL",
               "llava_onevision": "LLaVA-OneVision"}


def host_title(host: str) -> str:
    return HOST_TITLES.get(host, host)


def _family(value: Any) -> Optional[str]:
    return value if isinstance(value, str) and value else None


def run_host(run: Run, row: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """The host family a run (for a profile run: one of its rows) measured, or None when it does not say."""
    if run.kind == "profile":
        hosts = run.meta.get("hosts")
        if row is not None and isinstance(hosts, Mapping) and _family(hosts.get(row.get("arch"))):
            return hosts[row["arch"]]
        return _family(run.meta.get("host"))
    if run.kind == "train":
        info = run.data.get("model_info")
        return _family(run.data.get("host")) or _family(run.meta.get("host")) or (
            _family(info.get("family")) if isinstance(info, Mapping) else None)
    info = run.data.get("model_info") or run.meta.get("model_info")
    return _family(run.meta.get("host")) or (_family(info.get("host")) if isinstance(info, Mapping) else None)


def split_by_host(runs: Sequence[Run]) -> tuple[list[Run], dict[str, list[Run]]]:
    """(the runs of the paper's hosts or of no stated host, {other host: its runs}); a profile run whose rows
    measured several hosts is split into one run per host, each holding that host's rows."""
    paper: list[Run] = []
    other: dict[str, list[Run]] = {}

    def put(host: Optional[str], run: Run) -> None:
        if host is None or host in PAPER_HOSTS:
            paper.append(run)
        else:
            other.setdefault(host, []).append(run)

    for run in runs:
        if run.kind != "profile":
            put(run_host(run), run)
            continue
        by_host: dict[Optional[str], list] = {}
        for row in run.rows:
            by_host.setdefault(run_host(run, row), []).append(row)
        if len(by_host) <= 1:
            put(next(iter(by_host), run_host(run)), run)
            continue
        for host, rows in by_host.items():
            put(host, dataclasses.replace(run, data={**run.data, "rows": rows}))
    return paper, other


def label_subset(runs: Sequence[Run], labels: Mapping[str, str]) -> dict[str, str]:
    """The --label entries that name one of ``runs`` (path as given, resolved, or base name)."""
    paths = {str(r.path) for r in runs} | {r.path.name for r in runs} | {str(r.path.resolve()) for r in runs}
    return {k: v for k, v in labels.items() if k in paths or str(Path(k).resolve()) in paths}


# ------------------------------------------------------------------------------------------------ tables
def _shift(variant: str) -> Optional[float]:
    if variant == "baseline":
        return 2.0  # first
    try:
        return float(variant.removeprefix("p-MoD-")) if variant.startswith("p-MoD-") else None
    except ValueError:
        return None


def _values(columns: Sequence[PaperColumn], key: str, rep: Reproduction, avg_over: Sequence[str]) -> tuple:
    measured = {c.key: rep.get(key, c.metric) for c in columns if c.kind in ("benchmark", "efficiency")}
    out = []
    for c in columns:
        out.append(measured.get(c.key) if c.kind != "avg" else paper_average(
            {c2.key: measured.get(c2.key) for c2 in columns if c2.metric in avg_over}, list(avg_over)))
    return tuple(out)


def _lines(keys: Sequence[str], columns: Sequence[PaperColumn], rep: Reproduction, avg_over: Sequence[str]) -> list[Line]:
    lines = []
    for i, key in enumerate(keys):
        model, _, variant = key.rpartition("/")
        lines.append(Line(f"{model} · {variant}", "measured", _values(columns, key, rep, avg_over), key, i))
    return lines


def _sources(keys: Sequence[str], rep: Reproduction) -> tuple[str, ...]:
    out: list[str] = []
    for k in keys:
        out.extend(s for s in rep.sources(k) if s not in out)
    return tuple(out)


def efficiency_table(host: str, rep: Reproduction) -> ReportTable:
    """Table 7's analog for one host: baseline and p-MoD-δ rows of the host's runs, Table 7's columns."""
    t7 = paper_table(7)
    keys = sorted((k for k in rep.keys if _shift(k.rpartition("/")[2]) is not None),
                  key=lambda k: (k.rpartition("/")[0], -_shift(k.rpartition("/")[2])))
    name = host_title(host)
    notes = ["measured = this host's own runs (no paper counterpart); a dash is a value no run measured.",
             f"AVG: mean of {', '.join(t7.avg_over)} (only when every one was measured).",
             f"Rows as the paper's Table 7 joins them: profile rows (efficiency) with eval runs (scores) of the same "
             f"configuration. Runs: {', '.join(_sources(keys, rep)) or 'none'}."]
    return ReportTable(id=f"{_slug(host)}-efficiency", number=7, title=f"{name}: efficiency-performance trade-off across "
                       "shift factors δ (analog of Table 7)", label_header="Model · variant", columns=t7.value_columns,
                       lines=tuple(_lines(keys, t7.value_columns, rep, t7.avg_over)), compare=False, notes=tuple(notes),
                       sources=_sources(keys, rep), heading=f"{name}: efficiency across shift factors (analog of Table 7)")


def _benchmark_columns(keys: Sequence[str], rep: Reproduction) -> list[PaperColumn]:
    known = {c.metric: c for n in (5, 9, 10) for c in paper_table(n).value_columns if c.kind == "benchmark"}
    have = {m for k in keys for m in rep.values.get(k, {}) if m in BENCHMARKS}
    return [known.get(b) or PaperColumn(b, b, "benchmark", "inferred", b) for b in BENCHMARKS if b in have]


def methods_table(host: str, rep: Reproduction) -> ReportTable:
    """Tables 5 / 8-10's analog for one host: baseline, p-MoD-δ and the comparison methods at matched FLOPs."""
    t5 = paper_table(5)
    keys = [k for k in rep.keys if rep.values.get(k) and (_shift(k.rpartition("/")[2]) is not None
                                                          or k.rpartition("/")[2] in rep.method_variants)]
    # (a run with nothing for these columns, a video-only method's, has its line in the host's video table, reports.video)
    keys.sort(key=lambda k: (k.rpartition("/")[0], -(_shift(k.rpartition("/")[2]) or 0.0), k))
    benches = _benchmark_columns(keys, rep)
    columns = [c for c in t5.value_columns if c.kind == "efficiency"] + benches
    if benches:
        columns.append(PaperColumn("AVG", "AVG", "avg", "inferred"))
    avg_over = [c.metric for c in benches]
    name = host_title(host)
    notes = ["measured = this host's own runs (no paper counterpart); a dash is a value no run measured.",
             "Methods at matched FLOPs: the eval run of each method solved to p-MoD-0.5's prefill FLOPs "
             "(pmod-bench eval --method NAME --match p-MoD-0.5), else its last run; TFLOPs / KV cache from the profile "
             "row of the same config.",
             f"AVG: mean of {', '.join(avg_over) or 'no benchmark'} (MME as score/20), only when every one was measured.",
             f"Runs: {', '.join(_sources(keys, rep)) or 'none'}."]
    return ReportTable(id=f"{_slug(host)}-methods", number=5, title=f"{name}: comparison with token-compression methods at "
                       "matched FLOPs (analog of Tables 5, 8-10)", label_header="Model · method", columns=tuple(columns),
                       lines=tuple(_lines(keys, columns, rep, avg_over)), compare=False, notes=tuple(notes),
                       sources=_sources(keys, rep), heading=f"{name}: methods at matched FLOPs (analog of Tables 5, 8-10)")


def host_tables(reps: Mapping[str, Reproduction]) -> list[ReportTable]:
    """Both tables of every host, built once (rendered by :mod:`.render` like the paper's)."""
    return [t for host, rep in reps.items() for t in (efficiency_table(host, rep), methods_table(host, rep))]


def _slug(host: str) -> str:
    return host.replace("_", "-")


# ------------------------------------------------------------------------------------------------ figure
def host_figure_data(rep: Reproduction):
    """The trade-off of one host: its methods' budgets beside its p-MoD shifts (or the shifts alone); each score with
    its standard error where the eval rows carry their sample count ``n`` (:func:`score_error`)."""
    from .figures import MethodsTradeoffData, methods_tradeoff_data, tradeoff_data

    data = methods_tradeoff_data(rep)
    if not data.drawable:
        shifts = tradeoff_data(rep)
        if not shifts.reproduced:
            data.notes.extend(shifts.notes)
            return data
        data = MethodsTradeoffData(model=shifts.reproduced_model, benchmarks=shifts.reproduced_benchmarks,
                                   pmod=list(shifts.reproduced), sources=_sources([p.key for p in shifts.reproduced], rep),
                                   notes=list(shifts.notes))
    counts = _sample_counts(rep)
    data.pmod = [dataclasses.replace(p, score_err=score_error(
        {b: (rep.get(p.key, b), counts.get((rep.source_of(p.key, b), b))) for b in data.benchmarks})) for p in data.pmod]
    for name, pts in data.curves.items():  # the curve's points in the order methods_tradeoff_data drew them
        mps = sorted((mp for mp in rep.method_points if mp.model == data.model and mp.name == name and mp.efficiency),
                     key=lambda mp: mp.efficiency["tflops_ratio"])
        data.curves[name] = [dataclasses.replace(p, score_err=score_error(
            {b: (mp.values.get(b), counts.get((mp.source, b))) for b in data.benchmarks})) for p, mp in zip(pts, mps)]
    if any(p.score_err for p in data.pmod + [p for c in data.curves.values() for p in c]):
        data.notes.append("error bars: one standard error of the mean score, sqrt(p(1-p)/n) per benchmark (n = the eval "
                          "rows' sample count), combined over the benchmarks averaged.")
    return data


def _sample_counts(rep: Reproduction) -> dict[tuple[str, str], int]:
    """(eval run source, benchmark) -> the row's ``n`` (samples scored), where the row carries it."""
    out: dict[tuple[str, str], int] = {}
    for e in rep.entries:
        if e.run.kind == "eval":
            for row in e.run.rows:
                n = row.get("n")
                if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                    out[(e.source, str(row.get("benchmark")))] = n
    return out


def score_error(cells: Mapping[str, tuple[Optional[float], Optional[int]]]) -> Optional[float]:
    """The standard error of a mean of accuracies (%, benchmark -> (value, n)): sqrt(sum p(1-p)/n) / k, in points.
    None when a value or its n is missing, or a benchmark is not an accuracy (MME's raw score)."""
    if not cells:
        return None
    var = 0.0
    for bench, (value, n) in cells.items():
        if value is None or not n or bench == "MME" or not 0.0 <= value <= 100.0:
            return None
        p = value / 100.0
        var += p * (1.0 - p) / n
    return 100.0 * var ** 0.5 / len(cells)


__all__ = ["PAPER_HOSTS", "HOST_TITLES", "host_title", "run_host", "split_by_host", "label_subset", "efficiency_table",
           "methods_table", "host_tables", "host_figure_data", "score_error"]
