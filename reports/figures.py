"""The paper's figures, rebuilt from its tables and from runs (PNG at 200 dpi and PDF).

Data preparation (``*_data`` functions, pure) is separate from drawing (``plot_*``); drawing uses
matplotlib's object API with the Agg canvas (no pyplot state, no display needed). matplotlib, numpy
and Pillow are imported inside the functions so that ``import pmod_bench.reports`` stays light.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .matching import ExplorationPoint, Reproduction
from .paper import BENCHMARKS, PAPER_MODELS, as_number, paper_average, paper_table

DPI = 200
FORMATS = ("png", "pdf")
PAPER_COLOR = "#1f4e9c"
REPRO_COLOR = "#d9731a"
STYLE = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "pdf.fonttype": 42,  # TrueType in PDFs (editable text, accepted by publishers)
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.03,
}
SCHEDULE_TITLES = {"constant": "Constant", "interleaved": "Interleaved", "stepped": "Stepped",
                   "linear": "Linear", "cosine": "PRD (shifted cosine)"}


def _figure(width: float, height: float):
    """A figure on the Agg canvas (no pyplot, no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, stem: Path) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in FORMATS:
        p = stem.with_suffix(f".{fmt}")
        fig.savefig(p, dpi=DPI, format=fmt)
        paths.append(p)
    return paths


def _rc():
    import matplotlib

    return matplotlib.rc_context(STYLE)


# --------------------------------------------------------------------------- trade-off (Table 7)
@dataclass(frozen=True)
class TradeoffPoint:
    name: str  # "baseline", "δ=0.5"
    tflops_pct: Optional[float]
    kv_pct: Optional[float]
    latency_pct: Optional[float]
    score: Optional[float]
    key: Optional[str] = None  # MODEL/VARIANT of a reproduced point
    score_err: Optional[float] = None  # standard error of the score (small samples: eval rows with n), drawn as a bar


@dataclass
class TradeoffData:
    paper: list[TradeoffPoint]
    reproduced: list[TradeoffPoint] = field(default_factory=list)
    reproduced_model: Optional[str] = None
    reproduced_benchmarks: tuple[str, ...] = ()
    same_measure: bool = True  # reproduced score is the paper's AVG over Table 7's benchmarks
    notes: list[str] = field(default_factory=list)


def _point_name(variant: str) -> str:
    return "baseline" if variant == "baseline" else "δ=" + variant.removeprefix("p-MoD-")


def _is_shift_variant(variant: str) -> bool:
    if variant == "baseline":
        return True
    try:
        float(variant.removeprefix("p-MoD-"))
        return variant.startswith("p-MoD-")
    except ValueError:
        return False


def tradeoff_data(rep: Optional[Reproduction] = None) -> TradeoffData:
    """Points of the efficiency-performance trade-off: Table 7's, and those the runs reproduce.

    Efficiency is relative to the baseline (%), the score is the average over Table 7's benchmarks.
    Reproduced points need a profile row (efficiency) and an eval run (score) of the same
    configuration. When not every point has all six benchmarks, the reproduced score is the mean of
    the benchmarks that all points share, labelled as such and drawn in its own row.
    """
    t7 = paper_table(7)
    base = t7.rows[0].cells
    pts = []
    for row in t7.rows:
        c = row.cells
        pts.append(TradeoffPoint(
            _point_name(row.variant), 100 * c["TFLOPs"] / base["TFLOPs"], c["KV cache"],
            100 * c["Latency (ms)"] / base["Latency (ms)"], as_number(c["AVG"]),
        ))
    data = TradeoffData(paper=pts)
    if rep is None:
        return data
    # configurations with efficiency (profile) numbers, grouped by model
    by_model: dict[str, list[str]] = {}
    for key in rep.efficiency:
        model, _, variant = key.partition("/")
        if _is_shift_variant(variant):
            by_model.setdefault(model, []).append(key)
    if not by_model:
        data.notes.append("no profile run of the baseline or a p-MoD-δ variant: only the paper's points are drawn.")
        return data
    model = "llava-next-7b" if "llava-next-7b" in by_model else max(by_model, key=lambda m: len(by_model[m]))
    keys = by_model[model]
    def benches_of(k: str) -> set[str]:
        return {m for m in rep.values.get(k, {}) if m in BENCHMARKS}

    scored = [k for k in keys if benches_of(k)]
    table7 = list(t7.avg_over)
    if scored and all(all(rep.get(k, b) is not None for b in table7) for k in scored):
        benches = table7
    else:
        common = None
        for k in scored:
            common = benches_of(k) if common is None else common & benches_of(k)
        common = common or set()
        benches = [b for b in table7 if b in common] or sorted(common)
    if not benches:
        data.notes.append("no benchmark was evaluated for every profiled configuration: no reproduced points.")
        scored = []
    for k in keys:
        eff = rep.efficiency[k]
        score = paper_average({b: rep.get(k, b) for b in benches}, benches) if k in scored else None
        if score is None:
            data.notes.append(f"{k}: profiled but not evaluated on {', '.join(benches) or 'any shared benchmark'}; not drawn.")
            continue
        lat = eff.get("latency_ratio")
        if lat is not None and eff.get("latency_unreliable"):
            lo, hi = eff.get("latency_ratio_min"), eff.get("latency_ratio_max")
            rng = f" (ratio anywhere in {100 * lo:.0f}-{100 * hi:.0f}%)" if lo is not None and hi is not None else ""
            data.notes.append(f"{k}: latency not drawn, its timing spread is too large to give a ratio{rng}; "
                              "re-profile on an idle machine or with more --repeats.")
            lat = None
        data.reproduced.append(TradeoffPoint(
            _point_name(k.partition("/")[2]), 100 * eff["tflops_ratio"], 100 * eff["kv_cache_ratio"],
            None if lat is None else 100 * lat, score, key=k,
        ))
    data.reproduced_model = model
    data.reproduced_benchmarks = tuple(benches)
    data.same_measure = list(benches) == table7
    return data


def _draw_series(ax, pts: Sequence[TradeoffPoint], attr: str, color: str, marker: str, ls: str, label: str, below: bool):
    pts = sorted((p for p in pts if getattr(p, attr) is not None and p.score is not None), key=lambda p: getattr(p, attr))
    if not pts:
        return None
    xs, ys = [getattr(p, attr) for p in pts], [p.score for p in pts]
    (h,) = ax.plot(xs, ys, color=color, marker=marker, ls=ls, lw=1.2, ms=4.5, label=label)
    if any(p.score_err for p in pts):
        ax.errorbar(xs, ys, yerr=[p.score_err or 0.0 for p in pts], fmt="none", ecolor=color, elinewidth=0.8, capsize=2)
    # the curves rise to the right: labels above-left of their point, or below-right for a second series
    # (the leftmost point is labelled to its right, clear of the y axis)
    off, ha, va = ((4, -3), "left", "top") if below else ((-4, 3), "right", "bottom")
    for i, (p, x, y) in enumerate(zip(pts, xs, ys)):
        o, h_al, v_al = ((5, -1), "left", "top" if below else "center") if i == 0 else (off, ha, va)
        ax.annotate(p.name, (x, y), xytext=o, textcoords="offset points", ha=h_al, va=v_al, fontsize=6.5, color=color)
    return h


def _scores_far_apart(data: TradeoffData, gap: float = 5.0) -> bool:
    """Would one shared score axis squash both series (e.g. an untrained model scoring near 0)?"""
    paper = [p.score for p in data.paper if p.score is not None]
    repro = [p.score for p in data.reproduced if p.score is not None]
    if not paper or not repro:
        return False
    return min(repro) > max(paper) + gap or max(repro) < min(paper) - gap


def plot_tradeoff(data: TradeoffData, stem: Path) -> list[Path]:
    """Three panels: TFLOPs, KV cache and latency (% of baseline) against the average score.

    When the reproduced score is the paper's measure (AVG over Table 7's six benchmarks) and lies in
    its range, both series share the panels; otherwise the reproduced series gets its own row (same x
    axes): the two scores are different quantities, or one axis would squash both.
    """
    panels = [("tflops_pct", "Prefill TFLOPs (% of baseline)"), ("kv_pct", "KV cache (% of baseline)"),
              ("latency_pct", "Latency (% of baseline)")]
    paper_label = "paper (Table 7, LLaVA-NeXT-7B)"
    model = data.reproduced_model
    repro_label = f"reproduced ({model})" if model in PAPER_MODELS else f"measured: {model} (not a paper model)"
    two_rows = bool(data.reproduced) and (not data.same_measure or _scores_far_apart(data))
    with _rc():
        fig = _figure(7.0, 4.3 if two_rows else 2.45)
        grid = fig.subplots(2 if two_rows else 1, 3, sharex="col", sharey="row", squeeze=False)
        handles: dict[str, Any] = {}
        for col, (attr, xlabel) in enumerate(panels):
            ax = grid[0][col]
            h = _draw_series(ax, data.paper, attr, PAPER_COLOR, "o", "-", paper_label, below=False)
            handles[paper_label] = h
            rax = grid[1][col] if two_rows else ax
            h = _draw_series(rax, data.reproduced, attr, REPRO_COLOR, "s", "--", repro_label, below=not two_rows)
            if h is not None:
                handles[repro_label] = h
            for a in {id(ax): ax, id(rax): rax}.values():
                a.margins(x=0.2, y=0.2)
            grid[-1][col].set_xlabel(xlabel)
        grid[0][0].set_ylabel("Average score\n(paper AVG, Table 7)" if two_rows else "Average score (AVG, Table 7)")
        if two_rows:
            benches = ", ".join(data.reproduced_benchmarks) if not data.same_measure else "Table 7's six"
            what = "Reproduced" if model in PAPER_MODELS else f"{model}"
            grid[1][0].set_ylabel(f"{what} score\n(mean of {benches})")
        fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=len(handles),
                   bbox_to_anchor=(0.5, 1.0), frameon=False)
        fig.tight_layout()
        return _save(fig, stem)


# ------------------------------------------------------------- methods: accuracy vs TFLOPs per budget
@dataclass
class MethodsTradeoffData:
    """Accuracy against prefill compute: one curve per comparison method (its budgets) and p-MoD's shifts."""

    model: Optional[str] = None
    benchmarks: tuple[str, ...] = ()
    pmod: list[TradeoffPoint] = field(default_factory=list)
    curves: dict[str, list[TradeoffPoint]] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def drawable(self) -> bool:
        return bool(self.curves or self.pmod)


def methods_tradeoff_data(rep: Optional[Reproduction]) -> MethodsTradeoffData:
    """Points of the methods trade-off: every eval run of a comparison method with a profile row of the same
    config (``tflops_ratio``, ``kv_cache_ratio``), grouped by method, and the model's p-MoD-δ / baseline points.

    The score is the mean (MME as score/20) of the benchmarks that every drawn point has.
    """
    from .matching import budget_text

    data = MethodsTradeoffData()
    if rep is None or not rep.method_points:
        data.notes.append("no eval run of a comparison method (pmod-bench eval --method NAME).")
        return data
    counts: dict[str, int] = {}
    for mp in rep.method_points:
        if mp.efficiency is not None:
            counts[mp.model] = counts.get(mp.model, 0) + 1
    if not counts:
        specs = sorted({f"{mp.name}:{budget_text(mp.method)}".rstrip(":") for mp in rep.method_points})
        data.notes.append("no comparison-method eval run has a profile row of the same config: profile them "
                          f"(pmod-bench profile --method {' --method '.join(specs)}).")
        return data
    model = "llava-next-7b" if "llava-next-7b" in counts else max(counts, key=lambda m: counts[m])
    pts = [mp for mp in rep.method_points if mp.model == model]
    for mp in pts:
        if mp.efficiency is None:
            data.notes.append(f"{mp.source} ({mp.name}:{budget_text(mp.method)}): no profile row of this config; not drawn "
                              f"(pmod-bench profile --method {mp.name}:{budget_text(mp.method)}).".replace(":)", ")"))
    pts = [mp for mp in pts if mp.efficiency is not None]
    pmod_keys = [k for k in rep.efficiency if k.partition("/")[0] == model and _is_shift_variant(k.partition("/")[2])
                 and any(m in BENCHMARKS for m in rep.values.get(k, {}))]
    common: Optional[set] = None
    for vals in [mp.values for mp in pts] + [{m: v for m, (v, _) in rep.values[k].items()} for k in pmod_keys]:
        have = {b for b in vals if b in BENCHMARKS}
        common = have if common is None else common & have
    if not common and pmod_keys:  # p-MoD shares no benchmark with the methods: draw the methods alone
        data.notes.append(f"the p-MoD runs of {model} share no benchmark with the method runs; p-MoD not drawn.")
        pmod_keys, common = [], None
        for mp in pts:
            have = {b for b in mp.values if b in BENCHMARKS}
            common = have if common is None else common & have
    benches = [b for b in BENCHMARKS if b in (common or set())]
    if not benches:
        data.notes.append(f"the comparison-method runs of {model} share no benchmark: not drawn.")
        return data
    for mp in sorted(pts, key=lambda m: m.efficiency["tflops_ratio"]):
        score = paper_average({b: mp.values.get(b) for b in benches}, benches)
        eff = mp.efficiency
        data.curves.setdefault(mp.name, []).append(TradeoffPoint(
            budget_text(mp.method) or "defaults", 100 * eff["tflops_ratio"], 100 * eff["kv_cache_ratio"], None, score,
            key=f"{mp.model}/{mp.variant}"))
        data.sources.extend(s for s in (mp.source, mp.profile_source) if s and s not in data.sources)
    for k in pmod_keys:
        eff = rep.efficiency[k]
        score = paper_average({b: rep.get(k, b) for b in benches}, benches)
        data.pmod.append(TradeoffPoint(_point_name(k.partition("/")[2]), 100 * eff["tflops_ratio"],
                                       100 * eff["kv_cache_ratio"], None, score, key=k))
        data.sources.extend(s for s in rep.sources(k) if s not in data.sources)
    data.model, data.benchmarks = model, tuple(benches)
    return data


def plot_methods_tradeoff(data: MethodsTradeoffData, stem: Path, title: Optional[str] = None) -> list[Path]:
    """Two panels, prefill TFLOPs and KV cache (% of the baseline) against the mean score: one curve per method.
    ``title`` replaces the default title (a host's figure names its host)."""
    from matplotlib import colormaps

    panels = [("tflops_pct", "Prefill TFLOPs (% of baseline)"), ("kv_pct", "KV cache, vision tokens (% of baseline)")]
    markers = "sD^v<>pPXh*"
    colors = colormaps["tab10"]
    with _rc():
        fig = _figure(7.0, 3.0)
        axes = fig.subplots(1, 2, sharey=True)
        handles: dict[str, Any] = {}
        for ax, (attr, xlabel) in zip(axes, panels):
            if data.pmod:
                h = _draw_series(ax, data.pmod, attr, PAPER_COLOR, "o", "-", "p-MoD (shift factors δ) / baseline", below=False)
                if h is not None:
                    handles["p-MoD (shift factors δ) / baseline"] = h
            for i, (name, pts) in enumerate(sorted(data.curves.items())):
                color = colors(1 + i % 9)
                h = _draw_series(ax, pts, attr, color, markers[i % len(markers)], "--", f"{name} (budgets)", below=True)
                if h is not None:
                    handles[f"{name} (budgets)"] = h
            ax.margins(x=0.2, y=0.2)
            ax.set_xlabel(xlabel)
        axes[0].set_ylabel(f"Mean score (%)\nover {', '.join(data.benchmarks)}" + (" (MME/20)" if "MME" in data.benchmarks else ""))
        fig.suptitle(title or f"Accuracy vs compute: token-reduction methods across budgets beside p-MoD ({data.model})", y=1.0)
        fig.legend(list(handles.values()), list(handles.keys()), loc="upper center", ncol=min(4, len(handles)),
                   bbox_to_anchor=(0.5, 0.0), frameon=False)
        fig.tight_layout()
        return _save(fig, stem)


# --------------------------------------------------------------- video: prefill TFLOPs and KV cache vs frames
@dataclass
class VideoSeries:
    """One curve: an architecture at one frame size under one variant; points (frames, prefill TFLOPs, KV GiB)."""

    arch: str
    frame_size: tuple[int, int]
    variant: str
    shift: Optional[float]
    points: dict[int, tuple[float, float]] = field(default_factory=dict)
    method: Optional[str] = None
    """a comparison method's series: its name (``variant`` is then the legend label: the spec, or the method and the
    target its budget was solved to at each frame count)"""


@dataclass
class VideoTradeoffData:
    series: list[VideoSeries] = field(default_factory=list)
    kv_dtypes: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def drawable(self) -> bool:
        return any(s.points for s in self.series)


def _video_series_name(row: Mapping[str, Any]) -> tuple[str, Optional[str]]:
    """(series label, method name or None) of a video profile row: a method solved with ``--match`` is one series
    across frame counts (its budget is solved again at each), named by the target; other rows by their variant."""
    cfg = row.get("method_config")
    if not isinstance(cfg, Mapping) or not cfg.get("method"):
        return str(row["variant"]), None
    match = row.get("method_match")
    target = match.get("target_label") if isinstance(match, Mapping) else None
    return (f"{cfg['method']} (matched to {target})" if target else str(row["variant"])), str(cfg["method"])


def video_tradeoff_data(runs: Sequence[Any]) -> VideoTradeoffData:
    """The video rows (``frames``) of every profile run, baseline, p-MoD and the comparison methods, batch 1: one series
    per (arch, frame size, variant; a method solved with ``--match``: per target), x the frames the model sees. A later
    row at the same point replaces an earlier one (noted)."""
    data = VideoTradeoffData()
    by_key: dict[tuple, VideoSeries] = {}
    for run in runs:
        if run.kind != "profile":
            continue
        for i, row in enumerate(run.rows):
            if not row.get("frames") or row.get("batch_size") != 1:
                continue
            name, method = _video_series_name(row)
            if method is None and row.get("method") not in ("baseline", "pmod"):
                continue
            size = tuple(row.get("image_size") or (0, 0))
            key = (row["arch"], size, name)
            series = by_key.setdefault(key, VideoSeries(row["arch"], size, name, row.get("shift"), method=method))
            n = int(row["frames"])
            if n in series.points:
                data.notes.append(f"{row['arch']} {row['variant']} at {n} frames of {size[0]}x{size[1]}: {run.path} row {i} "
                                  "replaces an earlier row.")
            series.points[n] = (float(row["prefill_tflops"]), float(row["kv_cache_bytes"]) / 2**30)
            dtype = str(row.get("kv_dtype", "bfloat16"))
            if dtype not in data.kv_dtypes:
                data.kv_dtypes.append(dtype)
            if str(run.path) not in data.sources:
                data.sources.append(str(run.path))
    data.series = sorted(by_key.values(), key=lambda s: (s.arch, s.frame_size, s.method is not None, s.shift is not None,
                                                         -(s.shift or 0), s.variant))
    if not data.series:
        data.notes.append("no profile row of a video prompt (pmod-bench profile --arch qwen2.5-vl-7b --frames 8 16 32 64).")
    return data


#: comparison methods in the video trade-off: colours (none of them black or blue, p-MoD's) and markers, one per method
METHOD_COLORS = ("#d9731a", "#2a9d3a", "#c0392b", "#8e44ad", "#8c564b", "#d6408f", "#7f7f00", "#17a0b5")
METHOD_MARKERS = ("v", "P", "X", "*", "h", "<", ">", "p")


def _video_styles(data: VideoTradeoffData) -> tuple[list, dict, dict]:
    """(the (arch, frame size) pairs in order, the colour of each p-MoD shift, the (colour, marker) of each method)."""
    from matplotlib import colormaps

    archs = list(dict.fromkeys((s.arch, s.frame_size) for s in data.series))
    shifts = sorted({s.shift for s in data.series if s.shift is not None and s.method is None}, reverse=True)
    blues = colormaps["Blues"]
    color = {sh: blues(0.95 - 0.55 * i / max(len(shifts) - 1, 1)) for i, sh in enumerate(shifts)}
    names = list(dict.fromkeys(s.variant for s in data.series if s.method is not None))
    methods = {n: (METHOD_COLORS[i % len(METHOD_COLORS)], METHOD_MARKERS[i % len(METHOD_MARKERS)]) for i, n in enumerate(names)}
    return archs, color, methods


def plot_video_tradeoff(data: VideoTradeoffData, stem: Path) -> list[Path]:
    """Two log-log panels against the frames the model sees: LLM prefill TFLOPs and the KV cache (GiB) per sample; one
    colour per variant (baseline black, p-MoD shifts from dark to light, each comparison method a colour and a hollow
    marker of its own), one line style per architecture."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator

    archs, color, methods = _video_styles(data)
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]
    frames = sorted({n for s in data.series for n in s.points})
    kv_max = max(p[1] for s in data.series for p in s.points.values())
    kv_unit, kv_scale = ("GiB", 1.0) if kv_max >= 1 else ("MiB", 1024.0)
    with _rc():
        fig = _figure(7.0, 2.9)
        axes = fig.subplots(1, 2)
        panels = ((axes[0], 0, 1.0, "LLM prefill (TFLOPs per sample)"), (axes[1], 1, kv_scale, f"KV cache ({kv_unit} per sample)"))
        for ax, k, scale, ylabel in panels:
            for s in data.series:
                ls, marker = styles[archs.index((s.arch, s.frame_size)) % len(styles)]
                xs = sorted(s.points)
                if s.method is not None:
                    c, m = methods[s.variant]
                    ax.plot(xs, [s.points[x][k] * scale for x in xs], ls=ls, marker=m, ms=4.5, lw=1.0, color=c,
                            markerfacecolor="none", zorder=3)
                    continue
                ax.plot(xs, [s.points[x][k] * scale for x in xs], ls=ls, marker=marker, ms=3.5, lw=1.2,
                        color="black" if s.shift is None else color.get(s.shift, PAPER_COLOR))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(FixedLocator(frames))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([str(n) for n in frames])
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_minor_locator(NullLocator())
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
            ax.set_xlabel("Frames seen by the model")
            ax.set_ylabel(ylabel)
        handles = [Line2D([], [], color="black", lw=1.2, label="baseline")] if any(
            s.shift is None and s.method is None for s in data.series) else []
        handles += [Line2D([], [], color=color[sh], lw=1.2, label=f"p-MoD δ={sh:g}") for sh in color]
        handles += [Line2D([], [], color=c, lw=1.0, marker=m, ms=4.5, markerfacecolor="none", label=name)
                    for name, (c, m) in methods.items()]
        handles += [Line2D([], [], color="grey", ls=styles[i % len(styles)][0], marker=styles[i % len(styles)][1], ms=3.5,
                           label=f"{arch} ({w}x{h} frames)") for i, (arch, (w, h)) in enumerate(archs)]
        fig.suptitle(f"Video prompts: prefill compute and KV cache vs frames ({'/'.join(data.kv_dtypes)} KV cache; 2 FLOPs "
                     "per multiply-add)", y=1.0)
        fig.legend(handles=handles, loc="upper center", ncol=min(4, len(handles)), bbox_to_anchor=(0.5, 0.0), frameon=False)
        fig.tight_layout()
        return _save(fig, stem)


# --------------------------------------------------------------------------- Fig. 4: schedules
def retention_schedules_data(num_layers: int = 32, target_shift: float = 0.5) -> dict[str, list[float]]:
    """Per-layer retention of Table 4's schedules, each at PRD's mean retention (about 54% for δ=0.5).

    Uses ``pmod_bench.prd_ratios`` (model/schedules.py); each schedule's shift is solved so that its
    mean retention equals the cosine schedule's, as in the paper's Table 4.
    """
    from pmod_bench.model.schedules import match_shift, mean_retention

    from pmod_bench import prd_ratios

    cosine = prd_ratios(num_layers, schedule="cosine", shift=target_shift)
    target = mean_retention(cosine)
    out: dict[str, list[float]] = {}
    for sched in ("constant", "interleaved", "stepped", "linear"):
        min_ratio = 0.15
        try:
            shift = match_shift(sched, num_layers, target)
        except ValueError:
            # interleaved: half the layers are ordinary, so its routed layers need a ratio below 0.15
            min_ratio = 0.01
            shift = match_shift(sched, num_layers, target, min_ratio=min_ratio)
        out[sched] = prd_ratios(num_layers, schedule=sched, shift=shift, min_ratio=min_ratio)
    out["cosine"] = cosine
    return out


def plot_retention_schedules(schedules: Mapping[str, Sequence[float]], stem: Path) -> list[Path]:
    """The paper's Fig. 4: one bar panel per schedule; grey bars are ordinary layers (no routing)."""
    with _rc():
        n = len(schedules)
        fig = _figure(7.0, 1.95)
        axes = fig.subplots(1, n, sharey=True)
        axes = [axes] if n == 1 else list(axes)
        for ax, (name, ratios) in zip(axes, schedules.items()):
            L = len(ratios)
            colors = ["#b8b8b8" if r >= 1.0 else PAPER_COLOR for r in ratios]
            ax.bar(range(L), [100 * r for r in ratios], width=0.85, color=colors)
            mean = 100 * sum(ratios) / L
            ax.set_title(f"{SCHEDULE_TITLES.get(name, name)}\nmean {mean:.1f}%")
            ax.set_xticks([0, L // 4, L // 2, 3 * L // 4, L - 1])
            ax.set_xlim(-0.8, L - 0.2)
            ax.set_ylim(0, 105)
            ax.set_xlabel("Layer")
            ax.grid(axis="x", visible=False)
        axes[0].set_ylabel("Retention (%)")
        from matplotlib.patches import Patch

        fig.legend([Patch(color=PAPER_COLOR), Patch(color="#b8b8b8")], ["p-MoD layer", "ordinary layer (100%)"],
                   loc="lower center", ncol=2, bbox_to_anchor=(0.5, 1.0), frameon=False)
        fig.tight_layout(w_pad=0.6)
        return _save(fig, stem)


# --------------------------------------------------------------------------- Fig. 3: exploration
def exploration_data(points: Sequence[ExplorationPoint]) -> tuple[dict[str, list[tuple[float, float]]], list[str]]:
    """Per layer group, (retention %, score) sorted by retention; the score is the mean over the
    benchmarks every exploration run has (MME as score/20). The ``base`` run joins every group."""
    if not points:
        return {}, []
    common = set(points[0].values)
    for p in points[1:]:
        common &= set(p.values)
    benches = sorted(common)
    if not benches:
        return {}, []
    series: dict[str, list[tuple[float, float]]] = {}
    base = [p for p in points if p.group == "base"]
    for p in points:
        if p.group == "base":
            continue
        series.setdefault(p.group, []).append((100 * p.retention, paper_average(p.values, benches)))
    for group in series:
        for b in base:
            series[group].append((100 * b.retention, paper_average(b.values, benches)))
        series[group].sort()
    order = ["shallow", "middle", "deep"]
    return {g: series[g] for g in order if g in series}, benches


def plot_exploration(series: Mapping[str, Sequence[tuple[float, float]]], benchmarks: Sequence[str], stem: Path) -> list[Path]:
    """The paper's Fig. 3(b): score as the retention of one layer group is lowered."""
    colors = {"shallow": "#c0392b", "middle": "#7d5ba6", "deep": PAPER_COLOR}
    with _rc():
        fig = _figure(3.5, 2.6)
        ax = fig.subplots()
        for group, pts in series.items():
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", ms=4, lw=1.2, color=colors.get(group), label=f"{group} layers lowered")
        ax.invert_xaxis()
        ax.set_xlabel("Retention of the lowered layer group (%)")
        label = "Average score" if len(benchmarks) > 1 else f"{benchmarks[0]} score"
        ax.set_ylabel(label)
        if len(benchmarks) > 1:
            ax.set_title("mean of " + ", ".join(benchmarks), fontsize=7)
        ax.legend(frameon=False)
        fig.tight_layout()
        return _save(fig, stem)


# --------------------------------------------------------------------------- Figs. 5 and 6: selection
def _routed_layers(intro: Mapping[str, Any]) -> list[int]:
    return sorted(int(k) for k in intro["layers"])


def pick_layers(layers: Sequence[int], n: int = 4) -> list[int]:
    """Up to ``n`` layers spread evenly over ``layers`` (first and last included)."""
    layers = sorted(layers)
    if len(layers) <= n:
        return layers
    idx = sorted({round(i * (len(layers) - 1) / (n - 1)) for i in range(n)})
    return [layers[i] for i in idx]


def plot_token_selection(
    intro: Mapping[str, Any], image_path: Path, stem: Path, layers: Optional[Sequence[int]] = None
) -> list[Path]:
    """The paper's Fig. 5: the tokens a layer keeps, over the input image (skipped tokens shaded).

    Vision token ``i < rows * cols`` covers grid cell ``(i // cols, i % cols)``; tokens beyond the grid
    (LLaVA-NeXT's high-resolution tiles and row newlines) are not drawn, and the panels say so: their
    counts are of the base tile's ``rows * cols`` tokens only. A colour key explains the shading.
    """
    import numpy as np
    from matplotlib.patches import Patch
    from PIL import Image

    rows, cols = intro["grid"]
    chosen = list(layers) if layers is not None else pick_layers(_routed_layers(intro))
    with Image.open(image_path) as im:
        img = np.asarray(im.convert("RGB"))
    h, w = img.shape[:2]
    n = len(chosen)
    grid_tokens = rows * cols
    beyond = int(intro["vision_tokens"]) - grid_tokens
    panel = min(1.75, 7.0 / max(n, 1))
    with _rc():
        fig = _figure(max(panel * n, 3.2), panel * h / w + 0.75)
        axes = fig.subplots(1, n, squeeze=False)[0]
        for ax, layer in zip(axes, chosen):
            keep = np.zeros(rows * cols, dtype=bool)
            sel = [i for i in intro["layers"].get(str(layer), []) if i < rows * cols]
            keep[sel] = True
            # skipped tokens are shaded dark (a white fade would vanish on white backgrounds)
            overlay = np.zeros((rows, cols, 4))
            overlay[..., :3] = 0.08
            overlay[..., 3] = np.where(keep.reshape(rows, cols), 0.0, 0.68)
            ax.imshow(img, extent=(0, w, h, 0))
            ax.imshow(overlay, extent=(0, w, h, 0), interpolation="nearest")
            what = "base-tile tokens" if beyond > 0 else "tokens"
            ax.set_title(f"layer {layer}: {len(sel)}/{grid_tokens} {what} kept", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            for s in ax.spines.values():
                s.set_visible(True)
                s.set_linewidth(0.4)
        key = [Patch(facecolor="white", edgecolor="#888888", linewidth=0.4),
               Patch(facecolor=(0.08, 0.08, 0.08, 0.68), edgecolor="#888888", linewidth=0.4)]
        names = ["kept (processed by the layer)", "skipped (shaded)"]
        fig.legend(key, names, loc="lower center", ncol=2, bbox_to_anchor=(0.5, 1.0), frameon=False)
        if beyond > 0:
            fig.text(0.5, 0.0, f"Base tile only: the whole image at one tile ({rows}x{cols} tokens); the other {beyond:,} "
                     "vision tokens (high-resolution tiles, row newlines) are in Fig. 6.", ha="center", va="top", fontsize=6)
        fig.tight_layout(w_pad=0.4)
        return _save(fig, stem)


def selection_matrix(intro: Mapping[str, Any]):
    """Layer x token codes: 0 skipped, 1 selected, 2 ordinary layer (all processed), 3 no data."""
    import numpy as np

    L, V = intro["num_layers"], intro["vision_tokens"]
    ratios = intro.get("ratios")
    m = np.full((L, V), 3, dtype=np.int8)
    for layer in range(L):
        sel = intro["layers"].get(str(layer))
        if sel is not None:
            m[layer, :] = 0
            m[layer, sel] = 1
        elif ratios is not None and ratios[layer] >= 1.0:
            m[layer, :] = 2
    return m


def token_segments(intro: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    """Named token ranges ``(name, start, end)`` of the vision tokens (for Fig. 6's tile boundaries)."""
    V = int(intro["vision_tokens"])
    seg = intro.get("segments")
    if isinstance(seg, list) and all(isinstance(x, (list, tuple)) and len(x) == 3 for x in seg):
        return [(str(n), int(a), int(b)) for n, a, b in seg]
    grid = intro.get("grid")
    if grid and grid[0] * grid[1] < V:
        g = grid[0] * grid[1]
        return [("base tile", 0, g), ("high-resolution tiles (+ row newlines)", g, V)]
    return []


def plot_selection_map(intro: Mapping[str, Any], stem: Path) -> list[Path]:
    """The paper's Fig. 6: selection decisions as a layer x vision-token map, tile boundaries marked.

    With a ``grid`` (rows, cols) holding fewer tokens than ``vision_tokens`` (LLaVA-NeXT), the first
    ``rows * cols`` tokens are the base tile and the rest the high-resolution tiles (with one newline
    token per feature row): a line separates them and each part is named above the map. An optional
    ``segments`` list (``[[name, start, end], ...]``, end exclusive) marks any other token ranges.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    m = selection_matrix(intro)
    colors = ["#f4f4f4", PAPER_COLOR, "#9db8e0", "#d9d9d9"]
    names = ["skipped", "selected", "ordinary layer (all processed)", "no data"]
    present = sorted(set(int(v) for v in set(m.flatten().tolist())))
    L, V = m.shape
    with _rc():
        fig = _figure(7.0, min(max(1.6, 0.09 * L + 0.9), 4.2))
        ax = fig.subplots()
        ax.imshow(m, cmap=ListedColormap(colors), vmin=-0.5, vmax=3.5, aspect="auto", interpolation="nearest",
                  extent=(-0.5, V - 0.5, L - 0.5, -0.5))
        ax.set_xlabel("Vision-token index")
        ax.set_ylabel("Layer")
        ax.grid(False)
        for name, start, end in token_segments(intro):
            if start > 0:
                ax.axvline(start - 0.5, color="#c0392b", lw=0.9)
            ax.text((start + end - 1) / 2, -0.5, name, ha="center", va="bottom", fontsize=6.5, color="#c0392b",
                    transform=ax.transData, clip_on=False)
        fig.legend([Patch(facecolor=colors[i], edgecolor="#888888", linewidth=0.4) for i in present],
                   [names[i] for i in present], loc="lower center", ncol=len(present), bbox_to_anchor=(0.5, 1.04),
                   frameon=False)
        fig.tight_layout()
        return _save(fig, stem)


__all__ = [
    "TradeoffPoint", "TradeoffData", "tradeoff_data", "plot_tradeoff", "MethodsTradeoffData", "methods_tradeoff_data",
    "plot_methods_tradeoff", "retention_schedules_data",
    "plot_retention_schedules", "exploration_data", "plot_exploration", "plot_token_selection",
    "selection_matrix", "plot_selection_map", "token_segments", "pick_layers", "DPI",
]
