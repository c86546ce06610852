"""The toy world's report: analogs of the paper's Tables 1, 3, 4, 6 and 7, trade-off curves, Fig. 5/6.

Reads only run directories (docs/RUN_DIRS.md): ``eval/<model>/summary.json``, ``profile/profile.json``,
``models/<model>/train_summary.json`` (or the reused checkpoint's), ``routing.json`` and
``methods/methods.json``, ``controls/baseline-blanked/`` and the eval runs' logged samples. Rows are built once
and rendered as Markdown, LaTeX (booktabs) and CSV. Scores are percentages; AVG is the mean over the six toy
benchmarks, shown with its 95% bootstrap interval; column headers give n, the documents each score rests on
(``pmod_bench.toy.stats``). The controls table (``pmod_bench.toy.controls``) sets the baseline beside its own
score on blanked images, a text-only answerer and the best constant answer (chance).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Optional

from pmod_bench.atomic import atomic_write_json, atomic_write_text

from .models import MODELS, TABLE_ROWS

BENCH = ("Toy-Exist", "Toy-Attr", "Toy-Count", "Toy-MC", "Toy-Text", "Toy-Ground")
SHORT = {"Toy-Exist": "Exist", "Toy-Attr": "Attr", "Toy-Count": "Count", "Toy-MC": "MC", "Toy-Text": "Text",
         "Toy-Ground": "Ground"}
SCHEDULE_FLAGS = {"Constant": ("no", "no"), "Interleaved": ("no", "no"), "Stepped": ("yes", "no"), "Linear": ("yes", "yes"),
                  "PRD (cosine)": ("yes", "yes")}
#: where ``reproduce --toy`` evaluates the baseline on the blanked benchmark (``pmod_bench.toy.controls``)
CONTROLS_DIR, BLANK_RUN = "controls", "baseline-blanked"
BLANK_LABEL = "baseline, blanked images"
CONTROL_LABELS = {"text-only": "text only (question prior)", "chance": "chance (best constant answer)"}
TITLES = {
    "table1": "Toy Table 1: the baseline and p-MoD-0.5 on the toy suite, with prefill TFLOPs and KV cache",
    "table3": "Toy Table 3: ablation of p-MoD's components (same mean retention)",
    "table4": "Toy Table 4: retention-ratio schedules (same mean retention)",
    "table6": "Toy Table 6: weight normalisation of the router output",
    "table7": "Toy Table 7: efficiency-performance trade-off across shift factors",
    "controls": "Toy controls: the baseline beside what is scored without the image or without a model",
}


def _read(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def collect(out: Path) -> dict:
    """Everything the report shows, from the run directories under ``out``."""
    out = Path(out)
    state = _read(out / "reproduce.json") or {}
    scores, n = {}, {}
    for d in sorted((out / "eval").glob("*")):
        s = _read(d / "summary.json")
        if s:
            scores[d.name] = {r["benchmark"]: r["value"] for r in s["rows"]}
            n[d.name] = {r["benchmark"]: r["n"] for r in s["rows"]}
    prof = {}
    for r in (_read(out / "profile" / "profile.json") or {}).get("rows", []):
        prof[r["variant"]] = r
    train = {}
    for name in MODELS:
        src = Path((state.get("sources") or {}).get(name, out / "models" / name))
        if str(src) == "trained":
            src = out / "models" / name
        s = _read(src / "train_summary.json")
        if s:
            train[name] = {"wall_s": s.get("wall_s"), "steps": s.get("steps"), "final_loss": s.get("final_loss"),
                           "samples": s.get("samples"), "source": str(src)}
    stats = _statistics(out, list(scores))
    return {"scores": scores, "n": n, "profile": prof, "train": train, "routing": _read(out / "routing.json") or {},
            "methods": _read(out / "methods" / "methods.json") or {}, "state": state, **stats}


def _public(summary: dict) -> dict:
    """A ``stats.summarise`` result as plain data: scores, n, AVG and its 95% interval."""
    from .stats import interval

    ci = interval(summary["boot_avg"])
    return {"scores": summary["scores"], "n": summary["n"], "avg": summary["avg"],
            "avg_low": None if ci is None else ci[0], "avg_high": None if ci is None else ci[1],
            "exist_accuracy": summary.get("exist_accuracy")}


def _statistics(out: Path, models: list) -> dict:
    """Intervals of every evaluated model, the controls (``pmod_bench.toy.controls``) and the paired differences of
    AVG that the report may claim (``pmod_bench.toy.stats``)."""
    from .stats import difference, load_docs, summarise

    summaries = {m: summarise(load_docs(out / "eval" / m)) for m in models}
    intervals = {m: _public(s) for m, s in summaries.items() if s["scores"]}
    controls: dict = {}
    blank = out / CONTROLS_DIR / BLANK_RUN
    if (blank / "summary.json").is_file():
        controls[BLANK_LABEL] = _public(summarise(load_docs(blank)))
    if "baseline" in summaries and summaries["baseline"]["scores"]:
        from .controls import no_model_controls

        for key, docs in no_model_controls(out / "eval" / "baseline").items():
            controls[CONTROL_LABELS[key]] = _public(summarise(docs))
    for name, m in (((_read(out / "methods" / "methods.json") or {}).get("methods")) or {}).items():
        if isinstance(m, dict) and m.get("run_dir") and Path(m["run_dir"]).is_dir():  # comparison methods
            summary = summarise(load_docs(m["run_dir"]))
            if summary["scores"]:
                intervals[f"method:{name}"] = _public(summary)
    pairs = [(m, "baseline") for m in models if m != "baseline"]
    pairs += [(a, b) for a, b in (("p-MoD-0.3", "p-MoD-0.5"), ("p-MoD-0.4", "p-MoD-0.5")) if a in models and b in models]
    differences = []
    for a, b in pairs:
        if "baseline" in summaries and a in summaries and b in summaries:
            d = difference(summaries[a], summaries[b])
            if d is not None:
                differences.append({"model": a, "reference": b, **d})
    return {"intervals": intervals, "controls": controls, "differences": differences}


def average(vals: dict) -> Optional[float]:
    got = [vals.get(b) for b in BENCH]
    return None if any(v is None for v in got) else sum(got) / len(got)


# --------------------------------------------------------------------------------------- tables
def build_tables(data: dict) -> dict:
    """{table key: {"title", "columns", "rows": [[cell, ...]]}}; cells are str / float / None."""
    S, P, T = data["scores"], data["profile"], data["train"]
    common = _common_n(data.get("n") or {})
    bcols = [SHORT[b] + (f" (n={common[b]})" if b in common else "") for b in BENCH]

    def scores(name):
        v, n = S.get(name, {}), (data.get("n") or {}).get(name, {})
        return [_with_n(v.get(b), None if b in common else n.get(b)) for b in BENCH] + \
            [_avg_cell(average(v), (data.get("intervals") or {}).get(name))]

    tables = {}
    rows = []
    for label, name in TABLE_ROWS["table1"]:
        p = P.get(name, {})
        rows.append([label, _g(p, "prefill_tflops", 1e6), _pct(p.get("kv_cache_ratio")), *scores(name)])
    tables["table1"] = {"columns": ["Model", "MFLOPs", "KV cache", *bcols, "AVG"], "rows": rows}
    tables["table3"] = {"columns": ["Model", *bcols, "AVG"],
                        "rows": [[label, *scores(name)] for label, name in TABLE_ROWS["table3"]]}
    tables["table4"] = {"columns": ["Schedule", "Decay", "Progressive", "Mean retention", *bcols, "AVG"],
                        "rows": [[label, *SCHEDULE_FLAGS[label], _pct(P.get(name, {}).get("mean_retention")), *scores(name)]
                                 for label, name in TABLE_ROWS["table4"]]}
    t6 = [[label, alpha, *scores(name)] for label, alpha, name in TABLE_ROWS.get("table6", []) if name in S]
    if t6:
        tables["table6"] = {"columns": ["Normalisation", "alpha", *bcols, "AVG"], "rows": t6}
    rows = []
    for label, name in TABLE_ROWS["table7"]:
        p, t = P.get(name, {}), T.get(name, {})
        rows.append([label, t.get("wall_s"), _g(p, "prefill_tflops", 1e6), _pct(p.get("tflops_ratio")),
                     p.get("prefill_latency_ms"), _pct(p.get("kv_cache_ratio")), *scores(name)])
    tables["table7"] = {"columns": ["Model", "Training CPU s", "MFLOPs", "TFLOPs %", "Latency (ms)", "KV cache", *bcols, "AVG"],
                        "rows": rows}
    controls = data.get("controls") or {}
    if controls:  # + existence accuracy: F1 scores a right "no" to everything (a blank image) 0, accuracy 50 (chance)
        base = scores("baseline")
        rows = [["toy LLaVA-NeXT (baseline)", *base[:-1],
                 ((data.get("intervals") or {}).get("baseline") or {}).get("exist_accuracy"), base[-1]]]
        for label, c in controls.items():
            rows.append([label, *[_with_n(c["scores"].get(b), None if c["n"].get(b) == common.get(b) else c["n"].get(b))
                                  for b in BENCH], c.get("exist_accuracy"), _avg_cell(c["avg"], c)])
        tables["controls"] = {"columns": ["Control", *bcols, "Exist acc", "AVG [95% CI]"], "rows": rows}
    limit = ((data.get("state") or {}).get("plan") or {}).get("eval_limit")
    for k in tables:
        tables[k]["title"] = TITLES[k] + (f" (--quick: at most {limit} documents a task, a smoke-test size)" if limit else "")
        tables[k]["columns"] = [c.replace("AVG", "AVG [95% CI]") if c == "AVG" else c for c in tables[k]["columns"]]
    return tables


def _common_n(n: dict) -> dict:
    """{benchmark: n} for the benchmarks every evaluated model scored on the same number of documents."""
    out = {}
    for b in BENCH:
        got = {v.get(b) for v in n.values() if v.get(b) is not None}
        if len(got) == 1:
            out[b] = got.pop()
    return out


def _with_n(v: Optional[float], n: Optional[int]):
    """A score, with its document count when the column header does not give it."""
    return v if v is None or n is None else f"{v:.1f} (n={n})"


def _avg_cell(avg: Optional[float], iv: Optional[dict]):
    """AVG with its 95% bootstrap interval (``pmod_bench.toy.stats``) when known."""
    if avg is None or not iv or iv.get("avg_low") is None:
        return avg
    return f"{avg:.1f} [{iv['avg_low']:.1f}, {iv['avg_high']:.1f}]"


def _g(row: dict, key: str, scale: float) -> Optional[float]:
    v = row.get(key)
    return None if v is None else v * scale


def _pct(v: Optional[float]) -> Optional[str]:
    return None if v is None else f"{100 * v:.1f}%"


def _cell(v: Any, style: str = "md") -> str:
    if v is None:
        return "–" if style == "md" else "--"
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 0.1 or v == 0 else f"{v:.3f}"
    s = str(v)
    return s.replace("%", r"\%").replace("_", r"\_") if style == "tex" else s


def render_markdown(t: dict) -> str:
    lines = [f"**{t['title']}**", "", "| " + " | ".join(t["columns"]) + " |", "|" + "---|" * len(t["columns"])]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in t["rows"]]
    return "\n".join(lines) + "\n"


def render_latex(t: dict) -> str:
    cols = "l" + "r" * (len(t["columns"]) - 1)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_cell(t['title'], 'tex')}}}", rf"\begin{{tabular}}{{{cols}}}",
             r"\toprule", " & ".join(_cell(c, "tex") for c in t["columns"]) + r" \\", r"\midrule"]
    lines += [" & ".join(_cell(c, "tex") for c in row) + r" \\" for row in t["rows"]]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def render_csv(t: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(t["columns"])
    for row in t["rows"]:
        w.writerow(["" if c is None else (round(c, 4) if isinstance(c, float) else c) for c in row])
    return buf.getvalue()


# -------------------------------------------------------------------------------------- figures
def _ratio(P: dict, name: str, key: str) -> Optional[float]:
    """A profile ratio to the baseline; latency from the two medians when they were timed in separate calls."""
    p = P.get(name, {})
    if p.get(key) is not None:
        return p[key]
    if key == "latency_ratio" and p.get("prefill_latency_ms") and P.get("baseline", {}).get("prefill_latency_ms"):
        return p["prefill_latency_ms"] / P["baseline"]["prefill_latency_ms"]
    return None


def plot_tradeoff(data: dict, stem: Path) -> list:
    """Average toy score against prefill TFLOPs, KV cache and CPU latency (each relative to the baseline)."""
    from pmod_bench.reports.figures import _figure, _rc, _save

    S, P = data["scores"], data["profile"]
    axes_spec = (("tflops_ratio", "prefill TFLOPs (% of baseline)"), ("kv_cache_ratio", "KV cache (% of baseline)"),
                 ("latency_ratio", "prefill latency on CPU (% of baseline)"))
    shift_series = [m for m in ("p-MoD-0.3", "p-MoD-0.4", "p-MoD-0.5") if m in S]
    # the ablations sit at one mean retention, so their points cluster: each gets its own marker and colour, named in
    # the legend, instead of a text label that would collide with its neighbours'
    ablations = [m for m in S if m != "baseline" and m not in shift_series]
    markers, colours = "sDvP^Xhp<>", ("#7f7f7f", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#ff7f0e")
    look = {m: (markers[i % len(markers)], colours[i % len(colours)]) for i, m in enumerate(ablations)}
    with _rc():
        fig = _figure(10.5, 4.0)
        axs = fig.subplots(1, 3)
        for ax, (key, xlabel) in zip(axs, axes_spec):
            labelled: set = set()  # one legend entry per kind of point

            def once(kind: str, label: str):
                if kind in labelled:
                    return None
                labelled.add(kind)
                return label

            for name, vals in S.items():
                avg = average(vals)
                x = 1.0 if name == "baseline" else _ratio(P, name, key)
                if avg is None or x is None:
                    continue
                is_shift = name in shift_series or name == "baseline"
                iv = (data.get("intervals") or {}).get(name) or {}
                if iv.get("avg_low") is not None:  # the AVG's 95% bootstrap interval
                    ax.errorbar([100 * x], [avg], yerr=[[avg - iv["avg_low"]], [iv["avg_high"] - avg]], fmt="none",
                                ecolor="#999999", elinewidth=0.8, capsize=2, zorder=2,
                                label=once("ci", "95% bootstrap interval of the average"))
                if is_shift:
                    ax.scatter([100 * x], [avg], s=28, marker="*" if name == "baseline" else "o",
                               color="#c0392b" if name == "baseline" else "#1f6fb4", zorder=3)
                    below = name in shift_series and shift_series.index(name) % 2 == 1  # neighbours' labels apart
                    ax.annotate(name.replace("p-MoD-", "δ="), (100 * x, avg), fontsize=6, xytext=(3, -9 if below else 3),
                                textcoords="offset points")
                else:
                    marker, colour = look[name]
                    ax.scatter([100 * x], [avg], s=18, marker=marker, color=colour, zorder=3,
                               label=once(name, f"{name} (Table 3/4, same mean retention)"))
            pts = [(100 * (1.0 if m == "baseline" else _ratio(P, m, key) or float("nan")), average(S[m]))
                   for m in ("baseline", *reversed(shift_series)) if m in S and average(S[m]) is not None]
            pts = sorted(p for p in pts if p[0] == p[0])
            if len(pts) > 1:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color="#1f6fb4", lw=1, zorder=2,
                        label="baseline and p-MoD δ = 0.3 / 0.4 / 0.5")
            if key == "tflops_ratio":  # comparison methods (pmod_bench.methods), budget solved to p-MoD-0.5's FLOPs
                base_flops = (P.get("baseline", {}).get("prefill_tflops") or 0) * 1e12
                for mname, m in ((data.get("methods") or {}).get("methods") or {}).items():
                    avg = average(m.get("scores") or {}) if isinstance(m, dict) else None
                    match = m.get("match") or {} if isinstance(m, dict) else {}
                    if avg is None or not base_flops or match.get("metric") != "prefill":
                        continue
                    x = 100 * match["achieved"] / base_flops
                    iv = (data.get("intervals") or {}).get(f"method:{mname}") or {}
                    if iv.get("avg_low") is not None:
                        ax.errorbar([x], [avg], yerr=[[avg - iv["avg_low"]], [iv["avg_high"] - avg]], fmt="none",
                                    ecolor="#999999", elinewidth=0.8, capsize=2, zorder=2)
                    ax.scatter([x], [avg], marker="^", s=22, color="#2ca02c", zorder=3,
                               label=once("method", "comparison method on the baseline, FLOPs of p-MoD-0.5"))
                    ax.annotate(mname, (x, avg), fontsize=6, xytext=(3, -8), textcoords="offset points")
            for (label, c), style in zip((data.get("controls") or {}).items(), (":", "--", "-.")):
                if c.get("avg") is not None:  # the controls' level (no FLOPs of their own)
                    ax.axhline(c["avg"], color="#7f7f7f", lw=0.8, ls=style, zorder=1, label=once(label, f"control: {label}"))
            ax.set_xlabel(xlabel)
            ax.set_ylabel("toy suite average (%)")
        handles, labels = axs[0].get_legend_handles_labels()  # below the panels: no point hidden under it
        fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=6, frameon=False)
        fig.suptitle("Toy world: accuracy vs efficiency", fontsize=8)
        fig.tight_layout(rect=(0, 0.05 + 0.028 * -(-len(labels) // 4), 1, 1))
        return _save(fig, stem)


def plot_routing(routing: dict, stem: Path) -> list:
    """Per routed layer: the keep rate of shape tokens vs background tokens, for every p-MoD model."""
    from pmod_bench.reports.figures import _figure, _rc, _save

    names = [n for n in routing if routing[n].get("layers")]
    with _rc():
        fig = _figure(max(3.2 * len(names) / 2, 6.0), 3.0)
        ax = fig.subplots(1, 1)
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            layers = sorted(int(k) for k in routing[name]["layers"])
            shape = [100 * routing[name]["layers"][str(l)]["keep_rate_shape_tokens"] for l in layers]
            bg = [100 * routing[name]["layers"][str(l)]["keep_rate_background_tokens"] for l in layers]
            xs = [l + (i - len(names) / 2) * width for l in layers]
            ax.bar(xs, shape, width=width * 0.95, label=f"{name}: shape tokens", alpha=0.9)
            ax.scatter([x for x in xs], bg, marker="_", s=60, color="black", zorder=3,
                       label="background tokens (black ticks)" if i == 0 else None)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("tokens kept (%)")
        ax.set_title("Trained routers keep shape tokens more than background tokens", fontsize=8)
        ax.legend(fontsize=5, ncol=2)
        fig.tight_layout()
        return _save(fig, stem)


# --------------------------------------------------------------------------------------- report
def _differences_lines(data: dict) -> list:
    """What the report may claim: each model's AVG minus its reference's, with the paired 95% bootstrap interval."""
    diffs = data.get("differences") or []
    if not diffs:
        return []
    lines = ["## Differences in AVG (paired bootstrap over the same documents)", "",
             "| model | reference | difference | 95% CI | claim |", "|---|---|---|---|---|"]
    for d in diffs:
        claim = ("lower" if d["diff"] < 0 else "higher") if d["distinguishable"] else "not distinguishable (interval holds 0)"
        lines.append(f"| {d['model']} | {d['reference']} | {d['diff']:+.1f} | [{d['low']:+.1f}, {d['high']:+.1f}] | {claim} |")
    return lines + ["", "A difference whose interval holds 0 is within what another draw of documents could give: not "
                    "claimed.", ""]


def write_report(out: Path, plan: Any = None) -> Path:
    from pmod_bench.reports.figures import plot_selection_map, plot_token_selection

    out = Path(out)
    rep = out / "report"
    rep.mkdir(parents=True, exist_ok=True)
    data = collect(out)
    tables = build_tables(data)
    index = ["# Toy world reproduction", "",
             "Every number below was measured by `pmod-bench reproduce --toy` in this output directory: models trained with",
             "`pmod-bench train` (toy recipes), scored through lmms-eval with the `pmod_llava` plugin (`--suite toy`), profiled",
             "with `pmod-bench profile`'s library. Scores in %; AVG = mean of the six toy benchmarks, with its 95% bootstrap",
             "interval (documents resampled, `pmod_bench.toy.stats`); n = documents a benchmark was scored on.", ""]
    limit = (data["state"].get("plan") or {}).get("eval_limit")
    if limit:
        index += [f"**Quick run, a smoke-test size**: at most {limit} documents per task (`--limit {limit}`); the intervals "
                  "are wide, and differences within them are not results.", ""]
    for key, t in tables.items():
        atomic_write_text(rep / f"{key}.md", render_markdown(t))
        atomic_write_text(rep / f"{key}.tex", render_latex(t))
        atomic_write_text(rep / f"{key}.csv", render_csv(t))
        index += [render_markdown(t), f"({key}.md / .tex / .csv)", ""]
        if key == "controls":
            index += ["Existence is scored by F1 (POPE's headline metric), which counts only \"yes\" answers: a model "
                      "that answers \"no\" to every question, as it should on a blank image, scores F1 0 while its "
                      "accuracy (`Exist acc`, POPE accuracy, chance 50) is at chance. The controls' existence is judged by "
                      "that accuracy.", ""]
    index += _differences_lines(data)
    figs = []
    if data["scores"]:
        figs += plot_tradeoff(data, rep / "tradeoff")
        index += ["![trade-off](tradeoff.png)", "", "Trade-off: toy suite average against prefill TFLOPs, KV cache and CPU "
                  "latency, relative to the baseline.", ""]
    routing = data["routing"]
    if routing:
        figs += plot_routing(routing, rep / "routing")
        index += ["## Where the trained routers keep tokens", "",
                  "| model | kept tokens on shapes | all tokens on shapes | shape area | keep rate shape / background tokens |",
                  "|---|---|---|---|---|"]
        for name, r in routing.items():
            index.append(f"| {name} | {100 * r['kept_on_shapes']:.1f}% | {100 * r['tokens_on_shapes']:.1f}% | "
                         f"{100 * r['shape_area']:.1f}% | {100 * r['keep_rate_shape_tokens']:.1f}% / "
                         f"{100 * r['keep_rate_background_tokens']:.1f}% |")
        index += ["", f"Over {next(iter(routing.values()))['images']} benchmark images, routed layers pooled; newline tokens "
                  "excluded. ![routing](routing.png)", ""]
    for name in data["scores"]:
        intro_path = out / "eval" / name / "introspection.json"
        intro = _read(intro_path)
        if not intro:
            continue
        image = intro_path.parent / intro.get("image", "introspection_input.png")
        slug = name.replace(".", "_")  # the figure writer takes a stem: no dots
        figs += plot_token_selection(intro, image, rep / f"fig5_{slug}")
        figs += plot_selection_map(intro, rep / f"fig6_{slug}")
        index += [f"## Fig. 5 / 6 ({name}, trained routers)", "", f"![fig5](fig5_{slug}.png)", "", f"![fig6](fig6_{slug}.png)", ""]
    m = data["methods"]
    index += ["## Comparison methods (pmod_bench.methods, token budget solved to p-MoD-0.5's prefill FLOPs)", ""]
    if m.get("available"):
        common = _common_n(data.get("n") or {})
        index += ["| method | setting | FLOPs matched (rel. err.) | "
                  + " | ".join(SHORT[b] + (f" (n={common[b]})" if b in common else "") for b in BENCH) + " | AVG [95% CI] |",
                  "|---|---|---|" + "---|" * (len(BENCH) + 1)]
        for name, r in (m.get("methods") or {}).items():
            if "error" in r:
                index.append(f"| {name} | failed: {r['error']} |" + " |" * (len(BENCH) + 2))
                continue
            sc = r.get("scores") or {}
            index.append(f"| {name} | `{r['spec']}` | {r['match']['rel_err']:.3f} | "
                         + " | ".join(_cell(sc.get(b)) for b in BENCH)
                         + f" | {_cell(_avg_cell(average(sc), (data.get('intervals') or {}).get(f'method:{name}')))} |")
        index.append("")
    else:
        index += [m.get("note", "not run") if m else "not run", ""]
    atomic_write_json(rep / "data.json", {**{k: v for k, v in data.items() if k != "state"}, "tables": tables}, indent=1)
    atomic_write_text(rep / "index.md", "\n".join(index) + "\n")
    return rep / "index.md"


__all__ = ["BENCH", "average", "build_tables", "collect", "plot_routing", "plot_tradeoff", "render_csv", "render_latex",
           "render_markdown", "write_report"]
