"""``build_report``: read runs, build every table and figure, write them all or nothing.

Output layout (``DIR``)::

    index.md                    links every table and figure and says which inputs each came from
    report.json                 the same, machine-readable
    tables/tableN.{md,tex,csv}  Tables 1-12 (runs of the paper's hosts, LLaVA-1.5 / LLaVA-NeXT, only)
    tables/HOST-efficiency.*    per other host found among the runs (Qwen2.5-VL, ...): Table 7's analog
    tables/HOST-methods.*       ... and Tables 5 / 8-10's analog (:mod:`.hosts`)
    tables/HOST-video.*         ... and, when its eval runs hold video benchmarks, their scores beside prefill TFLOPs
                                and KV cache at the clip budget (:mod:`.video`)
    figures/*.{png,pdf}         trade-off, Fig. 4, tradeoff_HOST per other host, and (when runs provide them) Figs. 3, 5, 6
                                and video_tradeoff (prefill TFLOPs and KV cache vs frames, methods' rows included)

Everything is first written to a staging directory beside ``DIR``; only when every file was produced
are they moved into ``DIR`` (one ``os.replace`` each). A bad input therefore leaves ``DIR`` as it was.
Other files already in ``DIR`` are left alone.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from pmod_bench.outputs import check_output_path, output_errors
from pmod_bench.rundir import refuse_run_dir

from .hosts import host_figure_data, host_tables, host_title, label_subset, split_by_host
from .matching import DEFAULT_MODEL, Reproduction, match_runs
from .paper import PAPER_CITATION, paper_table
from .render import RENDERERS
from .runs import Run, load_runs
from .tables import ReportTable, build_tables
from .video import video_tables


class ReportError(ValueError):
    """A report that cannot be built as asked; the message says what to change."""


@dataclass
class ReportResult:
    output: Path
    files: list[Path] = field(default_factory=list)
    tables: list[ReportTable] = field(default_factory=list)
    figures: dict[str, list[Path]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Item:
    name: str
    files: list[str]  # relative to the output dir
    inputs: str
    embed: Optional[str] = None


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("pmod-bench")
    except Exception:  # not installed (running from a checkout)
        return "unknown"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "run"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _runs_of(rep: Reproduction, keys: Sequence[Optional[str]]) -> list[str]:
    out: list[str] = []
    for k in keys:
        for s in rep.sources(k):
            if s not in out:
                out.append(s)
    return out


def _figures(stage: Path, rep: Optional[Reproduction], runs: Sequence[Run], notes: list[str]) -> list[_Item]:
    from . import figures as F

    items: list[_Item] = []
    fig_dir = stage / "figures"

    data = F.tradeoff_data(rep)
    paths = F.plot_tradeoff(data, fig_dir / "tradeoff")
    inputs = "paper: Table 7 (efficiency relative to LLaVA-NeXT-7B, AVG over Doc, Chart, Text, GQA, SEED, MMB)"
    if data.reproduced:
        benches = ", ".join(data.reproduced_benchmarks)
        sources = _runs_of(rep, [p.key for p in data.reproduced])
        inputs += f"; reproduced ({data.reproduced_model}, score = mean of {benches}): " + ", ".join(sources)
    elif rep is not None:
        inputs += "; no reproduced points"
    notes.extend(f"Trade-off figure: {n}" for n in data.notes)
    items.append(_Item("Efficiency-performance trade-off across shift factors δ (Table 7)",
                       [str(p.relative_to(stage)) for p in paths], inputs, str(paths[0].relative_to(stage))))

    items += _methods_figure(stage, rep, notes)
    items += _video_figure(stage, runs, notes)

    try:
        schedules = F.retention_schedules_data(32)
    except ImportError as e:
        raise ReportError(
            f"Fig. 4 needs pmod_bench.prd_ratios (model/schedules.py), which did not import ({e}). "
            "Reinstall pmod-bench (pip install -e .) or pass --no-figures."
        ) from e
    paths = F.plot_retention_schedules(schedules, fig_dir / "fig4_retention_schedules")
    items.append(_Item("Fig. 4: retention ratio per layer of each schedule of Table 4 (L = 32)",
                       [str(p.relative_to(stage)) for p in paths],
                       "pmod_bench.prd_ratios; each schedule's shift solved for the mean retention of PRD with δ = 0.5 "
                       "(model.schedules.match_shift)", str(paths[0].relative_to(stage))))

    if rep is not None and rep.exploration:
        series, benches = F.exploration_data(rep.exploration)
        if series:
            paths = F.plot_exploration(series, benches, fig_dir / "fig3_exploration")
            items.append(_Item("Fig. 3: score as the retention of one layer group is lowered",
                               [str(p.relative_to(stage)) for p in paths],
                               "eval runs labelled fig3:GROUP:RETENTION: " + ", ".join(str(p.run.path) for p in rep.exploration),
                               str(paths[0].relative_to(stage))))
        else:
            notes.append("Fig. 3 not drawn: the exploration runs share no benchmark, or all are 'base' runs.")
    used: set[str] = set()
    for run in (rep.introspections if rep is not None else []):
        intro = run.introspection
        slug = _slug(run.name)
        while slug in used:
            slug += "-2"
        used.add(slug)
        if not intro["layers"]:
            notes.append(f"Figs. 5 and 6 not drawn for {run.path}: introspection.json lists no layer.")
            continue
        if intro.get("grid") and intro.get("image"):
            paths = F.plot_token_selection(intro, run.path / intro["image"], fig_dir / f"fig5_token_selection_{slug}")
            items.append(_Item(f"Fig. 5: tokens selected at several layers, over the image ({run.name})",
                               [str(p.relative_to(stage)) for p in paths],
                               f"{run.path}/introspection.json, image {intro['image']}", str(paths[0].relative_to(stage))))
        else:
            notes.append(f"Fig. 5 not drawn for {run.path}: introspection.json has no image or no grid.")
        paths = F.plot_selection_map(intro, fig_dir / f"fig6_selection_map_{slug}")
        items.append(_Item(f"Fig. 6: selection decisions, layer x vision token ({run.name})",
                           [str(p.relative_to(stage)) for p in paths], f"{run.path}/introspection.json",
                           str(paths[0].relative_to(stage))))
    if rep is not None and not rep.exploration:
        notes.append("Fig. 3 not drawn: no eval run is labelled fig3:GROUP:RETENTION (see docs/RUN_DIRS.md).")
    if rep is not None and not rep.introspections:
        notes.append("Figs. 5 and 6 not drawn: no run holds introspection.json.")
    return items


def _methods_figure(stage: Path, rep: Optional[Reproduction], notes: list[str]) -> list[_Item]:
    """Accuracy vs prefill TFLOPs of the comparison methods beside p-MoD's shift factors (when eval runs of methods exist)."""
    from . import figures as F

    if rep is None or not rep.method_points:
        return []
    mdata = F.methods_tradeoff_data(rep)
    notes.extend(f"Methods trade-off figure: {n}" for n in mdata.notes)
    if not mdata.drawable:
        return []
    paths = F.plot_methods_tradeoff(mdata, stage / "figures" / "tradeoff_methods")
    return [_Item(f"Accuracy vs prefill TFLOPs: comparison methods across budgets beside p-MoD's shift factors "
                  f"({mdata.model})", [str(p.relative_to(stage)) for p in paths],
                  f"eval runs of each method (score = mean of {', '.join(mdata.benchmarks)}) with the profile "
                  f"rows of the same method config (efficiency % of the baseline): " + ", ".join(mdata.sources),
                  str(paths[0].relative_to(stage)))]


def _host_figures(stage: Path, host_reps: Mapping[str, Reproduction], notes: list[str]) -> list[_Item]:
    """One trade-off figure per host that is not the paper's: accuracy vs prefill TFLOPs / KV cache (% of its baseline),
    p-MoD's shift factors and the methods' budgets (:func:`.hosts.host_figure_data`)."""
    from . import figures as F

    items: list[_Item] = []
    for host, rep in host_reps.items():
        data = host_figure_data(rep)
        name = host_title(host)
        notes.extend(f"{name} trade-off figure: {n}" for n in data.notes)
        if not data.drawable:
            notes.append(f"{name} trade-off figure not drawn: it needs profile rows and eval runs of the same configurations.")
            continue
        title = f"{name}: accuracy vs compute, p-MoD shift factors and token-reduction methods ({data.model})"
        paths = F.plot_methods_tradeoff(data, stage / "figures" / f"tradeoff_{host.replace('_', '-')}", title=title)
        items.append(_Item(f"{name}: accuracy vs prefill TFLOPs and KV cache ({data.model})",
                           [str(p.relative_to(stage)) for p in paths],
                           f"{name} runs (score = mean of {', '.join(data.benchmarks)}): " + ", ".join(data.sources),
                           str(paths[0].relative_to(stage))))
    return items


def _video_figure(stage: Path, runs: Sequence[Run], notes: list[str]) -> list[_Item]:
    """The video trade-off (prefill TFLOPs and KV cache vs frames), when profile runs hold video rows."""
    from . import figures as F

    data = F.video_tradeoff_data(runs)
    if not data.drawable:
        return []
    paths = F.plot_video_tradeoff(data, stage / "figures" / "video_tradeoff")
    notes.extend(f"Video trade-off figure: {n}" for n in data.notes)
    methods = any(s.method is not None for s in data.series)
    return [_Item("Video: LLM prefill TFLOPs and KV cache vs frames, baseline and p-MoD shift factors"
                  + (" and comparison methods" if methods else ""),
                  [str(p.relative_to(stage)) for p in paths], "profile rows of video prompts (frames): " + ", ".join(data.sources),
                  str(paths[0].relative_to(stage)))]


def _md_links(files: Sequence[str]) -> str:
    return " · ".join(f"[{Path(f).suffix[1:]}]({f})" for f in files)


def _index(command: str, runs: Sequence[Run], rep: Optional[Reproduction], tables: Sequence[tuple[ReportTable, list[str]]],
           figures: Sequence[_Item], notes: Sequence[str], host_reps: Mapping[str, Reproduction]) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = ["# p-MoD report", ""]
    out.append(f"Generated by `{command}` at {now} (pmod-bench {_version()}).")
    if rep is None:
        out.append(f"The paper's own tables and figures; no runs. Values as printed in {PAPER_CITATION}.")
    else:
        out.append(f"{len(runs)} run(s) compared with the paper: each table shows the paper's line and, for every row a "
                   "run reproduced, a reproduced line and the difference (reproduced - paper). A dash is a value no run "
                   "measured; averages follow the paper (MME as score/20) and are computed only from complete rows. "
                   "Runs of models that are not the paper's get their own 'measured' lines, never a paper row's.")
        if host_reps:
            out.append("Runs of hosts other than the paper's (" + ", ".join(host_title(h) for h in host_reps) + ") never "
                       "enter the paper's tables: each host has its own tables and trade-off figure, built from its runs alone.")
    if rep is not None and rep.warnings:
        out += ["", "## Warnings", ""] + [f"- **{w}**" for w in rep.warnings]
    out += ["", "## Tables", "", "| Table | Title | Files | Inputs |", "|:--|:--|:--|:--|"]
    for t, files in tables:
        inputs = "" if t.heading else f"paper ({paper_table(t.number).source_text})"
        if rep is not None:
            inputs += ("; " if inputs else "") + "runs: " + (", ".join(f"`{u}`" for u in t.sources) if t.sources else "none matched")
        out.append(f"| {t.id if t.heading else t.number} | {t.title} | {_md_links(files)} | {inputs} |")
    out += ["", "## Figures", "", "| Figure | Files | Inputs |", "|:--|:--|:--|"]
    for f in figures:
        out.append(f"| {f.name} | {_md_links(f.files)} | {f.inputs} |")
    if runs:
        out += ["", "## Inputs and how they were matched", "",
                "| Run | Kind | run.json label | Created | Matched as | How |", "|:--|:--|:--|:--|:--|:--|"]
        assert rep is not None
        per_run: dict[str, list[tuple[str, str]]] = {}
        for host, hrep in host_reps.items():
            for e in hrep.entries:
                per_run.setdefault(str(e.run.path), []).append((f"{host_title(host)}: `{e.key}`", e.how))
            for run, why in hrep.unmatched:
                per_run.setdefault(str(run.path), []).append((f"{host_title(host)}: not matched", why))
        for e in rep.entries:
            per_run.setdefault(str(e.run.path), []).append((f"`{e.key}`", e.how))
        for p in rep.exploration:
            per_run.setdefault(str(p.run.path), []).append(
                (f"Fig. 3: {p.group} layers at {100 * p.retention:g}% retention", "label"))
        for run, why in rep.unmatched:
            per_run.setdefault(str(run.path), []).append(("not matched", why))
        for run in runs:
            matched = per_run.get(str(run.path), [("-", "")])
            out.append(f"| `{run.path}` | {run.kind} | {run.label or ''} | {run.meta.get('created', '')} | "
                       f"{'<br>'.join(m for m, _ in matched)} | {'<br>'.join(h for _, h in matched)} |")
        out += ["", "Matching rules: docs/RUN_DIRS.md, section \"How `pmod-bench report` matches runs to the paper's rows\"."]
    if notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    if figures:
        out += ["", "## Gallery", ""]
        for f in figures:
            if f.embed:
                out += [f"### {f.name}", "", f"![{f.name}]({f.embed})", ""]
    return "\n".join(out).rstrip() + "\n"


def build_report(
    run_dirs: Sequence["str | Path"] = (),
    output: "str | Path" = "report",
    *,
    paper: bool = False,
    labels: Optional[Mapping[str, str]] = None,
    default_model: str = DEFAULT_MODEL,
    figures: bool = True,
    command: Optional[str] = None,
    progress: bool = False,
) -> ReportResult:
    """Build the report into ``output``: every paper table (Markdown, LaTeX, CSV) and figure.

    ``paper=True`` renders the paper's own tables and figures without runs; otherwise ``run_dirs``
    are read (docs/RUN_DIRS.md), matched to the paper's rows (``labels`` maps a run directory to a
    label, see :mod:`pmod_bench.reports.matching`) and shown beside the paper's values.
    Raises :class:`~pmod_bench.reports.runs.RunDirError`, :class:`~pmod_bench.reports.matching.LabelError`
    or :class:`ReportError` before anything is written.
    """
    run_dirs = list(run_dirs)
    _check_arguments(run_dirs, output, paper, labels)
    output = Path(output)
    if command is None:
        command = "pmod-bench report " + ("--paper" if paper else " ".join(map(str, run_dirs))) + f" --output {output}"

    runs = load_runs(run_dirs, progress=progress)
    rep, host_reps = (None, {}) if paper else _match(runs, dict(labels or {}), default_model)
    notes: list[str] = list(rep.notes) if rep is not None else []

    with output_errors("--output", output, error=ReportError, within=output.parent):
        return _write_report(output, command, paper, runs, rep, notes, figures, host_reps)


def _match(runs: list, labels: dict, default_model: Optional[str]) -> tuple[Reproduction, dict[str, Reproduction]]:
    """The paper's hosts' runs matched to the paper's rows; every other host's runs matched on their own (never as a
    paper model), their notes and warnings added to the paper's, prefixed with the host."""
    paper_runs, other = split_by_host(runs)
    host_labels = {k for rs in other.values() for k in label_subset(rs, labels)}
    own = label_subset(paper_runs, labels)
    rep = match_runs(paper_runs, {k: v for k, v in labels.items() if k in own or k not in host_labels}, default_model)
    host_reps = {h: match_runs(rs, label_subset(rs, labels), None) for h, rs in sorted(other.items())}
    for h, hrep in host_reps.items():
        rep.notes.extend(f"{host_title(h)}: {n}" for n in hrep.notes)
        rep.warnings.extend(f"{host_title(h)}: {w}" for w in hrep.warnings)
    return rep, host_reps


def _write_report(output: Path, command: str, paper: bool, runs: list, rep: Optional[Reproduction], notes: list,
                  figures: bool, host_reps: Mapping[str, Reproduction]) -> ReportResult:
    """Every file into a staging sibling of ``output``, then each moved into place."""
    output.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".pmod-report.staging-", dir=output.parent))
    result = ReportResult(output=output)
    try:
        table_files = _write_tables(stage, build_tables(rep) + host_tables(host_reps) + video_tables(host_reps))
        fig_items: list[_Item] = []
        if figures:
            _require_matplotlib()
            fig_items = _figures(stage, rep, runs, notes) + _host_figures(stage, host_reps, notes)
        _write(stage / "index.md", _index(command, runs, rep, table_files, fig_items, notes, host_reps))
        summary = _summary(command, paper, runs, rep, table_files, fig_items, notes)
        _write(stage / "report.json", json.dumps(summary, indent=1, ensure_ascii=False) + "\n")

        # every file exists: move them into place (over an earlier report's, never over a file of someone else's)
        staged = sorted(p for p in stage.rglob("*") if p.is_file())
        taken = [output / p.relative_to(stage) for p in staged if (output / p.relative_to(stage)).exists()]
        if taken and not (output / "report.json").is_file():
            raise ReportError(f"--output {output} holds {taken[0].relative_to(output)}, which no earlier report wrote (there is "
                              "no report.json); pass a new or empty --output, or move that file away.")
        for src in staged:
            dst = output / src.relative_to(stage)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            result.files.append(dst)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    result.tables = [t for t, _ in table_files]
    result.figures = {f.name: [output / p for p in f.files] for f in fig_items}
    result.notes = notes
    result.warnings = list(rep.warnings) if rep is not None else []
    return result


def _check_arguments(run_dirs: list, output: "str | Path", paper: bool, labels: Optional[Mapping[str, str]]) -> None:
    """A :class:`ReportError` for arguments that ask for no report or for two at once, or for an ``output`` that is a file."""
    if paper and run_dirs:
        raise ReportError("--paper renders the paper alone; drop --paper to compare runs with the paper.")
    if not paper and not run_dirs:
        raise ReportError("give one or more RUN_DIRs to compare with the paper, or --paper for the paper's own tables.")
    if labels and paper:
        raise ReportError("--label applies to RUN_DIRs; it has no effect with --paper.")
    output = Path(output)
    check_output_path(output, "--output", error=ReportError, sibling=True)  # a file, a name too long, read-only
    refuse_run_dir(output, "--output", error=ReportError)


def _write_tables(stage: Path, tables: Sequence[ReportTable]) -> list[tuple[ReportTable, list[str]]]:
    """Each table rendered in every format (tables/ID.EXT under ``stage``), with its files' relative paths."""
    table_files: list[tuple[ReportTable, list[str]]] = []
    for t in tables:
        files = []
        for ext, render in RENDERERS.items():
            rel = f"tables/{t.id}.{ext}"
            _write(stage / rel, render(t))
            files.append(rel)
        table_files.append((t, files))
    return table_files


def _require_matplotlib() -> None:
    """The figures are drawn with matplotlib: when it cannot be imported, a :class:`ReportError` naming the fix
    (before any figure is drawn, so nothing is written)."""
    try:
        importlib.import_module("matplotlib")
    except ImportError as e:
        raise ReportError("figures need matplotlib: pip install matplotlib (or pass --no-figures).") from e


def _summary(command: str, paper: bool, runs: Sequence[Run], rep: Optional[Reproduction],
             table_files: Sequence[tuple[ReportTable, list[str]]], fig_items: Sequence[_Item], notes: list[str]) -> dict[str, Any]:
    """report.json: the report's tables, figures, runs and their matches, notes and warnings."""
    return {
        "mode": "paper" if paper else "runs",
        "command": command,
        "tables": {t.id: {"files": files, "reproduced_rows": sorted({ln.key for ln in t.lines if ln.kind == "reproduced"}),
                          "measured_rows": sorted({ln.key for ln in t.lines if ln.kind == "measured"})}
                   for t, files in table_files},
        "figures": {f.name: f.files for f in fig_items},
        "runs": [{"path": str(r.path), "kind": r.kind, "label": r.label} for r in runs],
        "matches": [{"source": e.source, "key": e.key, "how": e.how} for e in (rep.entries if rep else [])],
        "notes": notes,
        "warnings": list(rep.warnings) if rep is not None else [],
    }


__all__ = ["build_report", "ReportResult", "ReportError"]
