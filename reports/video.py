"""A host's video table: the video benchmarks' scores beside prefill TFLOPs and KV cache at the clip budget.

For every host that is not the paper's (:mod:`.hosts`), the eval runs holding rows of the video benchmarks (Video-MME,
MVBench, EgoSchema: ``pmod-bench eval --suite video``) give one line per configuration (``MODEL/VARIANT``, as the
other tables key them): the baseline, p-MoD at each shift factor δ, and the comparison methods at matched FLOPs (the
run solved to p-MoD-0.5, ``eval --method M --match p-MoD-0.5``, where a method has several). Each score carries its
sample count ``n`` and one standard error, ``sqrt(p(1-p)/n)`` (:func:`.hosts.score_error`).

The efficiency columns are the profile row of the same configuration (a method: its config dict, as the methods
table matches them) at the line's clip budget, batch 1 (``pmod-bench profile --frames N --frame-size WxH``):

* a method run solved with ``--match``: the clip it was solved on (``method_match`` ``frames`` and ``image_size``, the
  frame size);
* any other run: the frames its host's requests read at most (``model_info.max_num_frames``, Qwen2.5-VL; else
  lmms-eval's 32), of any frame size (LLaVA-OneVision's tokens do not depend on it; on Qwen2.5-VL the row's frame
  size is shown, a 1280x720 one preferred: the size ``--match`` solves at by default). A run that reads its clips at
  an ``fps`` has no fixed budget: no efficiency.

Nothing else is read: the eval runs and profile rows are matched as :func:`.matching.match_runs` matched them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from .hosts import _shift, _slug, host_title, score_error
from .matching import (VIDEO_BENCHMARK_KEYS, Reproduction, _own_model, budget_text, method_key, method_of,
                       variant_from_profile_row)
from .paper import PaperColumn
from .tables import Line, ReportTable

#: the video benchmarks' keys in eval rows, in the video suite's order (``pmod_bench.tasks.benchmarks.VIDEO_BENCHMARKS``;
#: reports read run directories, not the tasks package: tests/test_video_reports.py keeps the two equal)
VIDEO_BENCHMARKS = VIDEO_BENCHMARK_KEYS
VIDEO_TITLES = {"VideoMME": "Video-MME", "MVBench": "MVBench", "EgoSchema": "EgoSchema"}
#: lmms-eval 0.7.3's ``max_num_frames`` / ``max_frames_num``: a run's clip budget when it records none
DEFAULT_FRAMES = 32
#: the frame size ``eval --match`` solves a video suite at by default (``pmod_bench.tasks.runner.MATCH_FRAME_SIZE``)
DEFAULT_FRAME_SIZE = (1280, 720)


@dataclass
class VideoLine:
    """One configuration's line: scores (benchmark -> (value %, n, source)), its clip budget and profile row."""

    key: str
    scores: dict[str, tuple[float, Optional[int], str]] = field(default_factory=dict)
    frames: Optional[int] = None
    frame_size: Optional[tuple[int, int]] = None
    config: Optional[str] = None
    """the profile rows' key: a method's config (``method_key``), else the variant"""
    budget: Optional[str] = None
    """a method's budget as evaluated (``k=0.63``), shown beside its name"""
    profile: Optional[Mapping[str, Any]] = None
    profile_source: Optional[str] = None


def _clip_budget(run, method_match: Optional[Mapping[str, Any]]) -> tuple[Optional[int], Optional[tuple[int, int]]]:
    """(frames, frame size or None) of an eval run's clips (module docstring)."""
    if isinstance(method_match, Mapping) and isinstance(method_match.get("frames"), int):
        size = method_match.get("image_size")
        return method_match["frames"], (tuple(size) if isinstance(size, list) and len(size) == 2 else None)
    info = run.meta.get("model_info") or run.data.get("model_info") or {}
    if not isinstance(info, Mapping):
        info = {}
    if info.get("fps") is not None:
        return None, None
    frames = info.get("max_num_frames")
    return (frames if isinstance(frames, int) and not isinstance(frames, bool) and frames > 0 else DEFAULT_FRAMES), None


def video_lines(rep: Reproduction) -> list[VideoLine]:
    """The lines of one host's video table, baseline first, then p-MoD by shift factor, then the rest by name."""
    lines: dict[str, VideoLine] = {}
    for e in rep.entries:
        if e.run.kind != "eval" or e.extra.get("off_budget"):
            continue
        rows = [r for r in e.run.rows if r.get("benchmark") in VIDEO_BENCHMARKS]
        if not rows:
            continue
        line = lines.setdefault(e.key, VideoLine(e.key))
        method = e.extra.get("method")
        line.frames, line.frame_size = _clip_budget(e.run, e.extra.get("method_match"))
        line.config = method_key(method) if method else e.variant
        line.budget = budget_text(method) if method else None
        for r in rows:
            n = r.get("n")
            line.scores[r["benchmark"]] = (float(r["value"]), n if isinstance(n, int) and n > 0 else None, e.source)
    _attach_profiles(list(lines.values()), rep)
    return sorted(lines.values(), key=lambda ln: (_shift(ln.key.rpartition("/")[2]) is None,
                                                  -(_shift(ln.key.rpartition("/")[2]) or 0.0), ln.key))


def _attach_profiles(lines: Sequence[VideoLine], rep: Reproduction) -> None:
    """Each line's profile row: same model and configuration, its frames, batch 1; its frame size when the line has
    one, else a 1280x720 row, else the last one given."""
    runs = list({str(e.run.path): e.run for e in rep.entries if e.run.kind == "profile"}.values())
    index: dict[tuple[str, str, int], list[tuple[Mapping[str, Any], str]]] = {}
    for run in runs:
        for i, row in enumerate(run.rows):
            if not row.get("frames") or row.get("batch_size") != 1:
                continue
            cfg = method_of(row.get("method_config"))
            config = method_key(cfg) if cfg else variant_from_profile_row(row)[0]
            index.setdefault((_own_model(row["arch"]), config, int(row["frames"])), []).append((row, f"{run.path} row {i}"))
    for ln in lines:
        model = ln.key.rpartition("/")[0]
        found = index.get((model, ln.config or "", ln.frames or 0), [])
        want = ln.frame_size or DEFAULT_FRAME_SIZE
        exact = [f for f in found if tuple(f[0].get("image_size") or ()) == tuple(want)]
        if ln.frame_size is not None:
            found = exact
        pick = (exact or found)[-1:]
        if pick:
            ln.profile, ln.profile_source = pick[0]


def _columns(benches: Sequence[str]) -> list[PaperColumn]:
    cols = [PaperColumn("clip", "Clip (frames × WxH)", "text", "inferred"),
            PaperColumn("tflops", "TFLOPs", "efficiency", "inferred", "prefill_tflops", decimals=2),
            PaperColumn("kv", "KV cache", "efficiency", "inferred", "kv_cache_pct", "%", 1)]
    for b in benches:
        title = VIDEO_TITLES[b]
        cols += [PaperColumn(b, title, "benchmark", "inferred", b),
                 PaperColumn(f"{b}_se", f"{title} SE", "efficiency", "inferred", f"{b}_se"),
                 PaperColumn(f"{b}_n", f"{title} n", "efficiency", "inferred", f"{b}_n", decimals=0)]
    if len(benches) > 1:
        cols += [PaperColumn("AVG", "AVG", "avg", "inferred"), PaperColumn("AVG_se", "AVG SE", "efficiency", "inferred", "AVG_se")]
    return cols


def _values(ln: VideoLine, benches: Sequence[str]) -> tuple:
    p = ln.profile
    clip = "" if ln.frames is None else f"{ln.frames}" + (f" × {p['image_size'][0]}x{p['image_size'][1]}" if p else "")
    out: list[Any] = [clip or None, float(p["prefill_tflops"]) if p else None,
                      100.0 * float(p["kv_cache_ratio"]) if p else None]
    for b in benches:
        v, n, _ = ln.scores.get(b, (None, None, None))
        out += [v, score_error({b: (v, n)}) if v is not None else None, n]
    if len(benches) > 1:
        have = all(b in ln.scores for b in benches)
        out += [sum(ln.scores[b][0] for b in benches) / len(benches) if have else None,
                score_error({b: ln.scores[b][:2] for b in benches}) if have else None]
    return tuple(out)


def video_table(host: str, rep: Reproduction) -> Optional[ReportTable]:
    """The video table of one host (module docstring); None when none of its eval runs has a video benchmark row."""
    lines = video_lines(rep)
    if not lines:
        return None
    benches = [b for b in VIDEO_BENCHMARKS if any(b in ln.scores for ln in lines)]
    name = host_title(host)
    sources = [s for ln in lines for s in [*(src for _, _, src in ln.scores.values()), ln.profile_source] if s]
    sources = list(dict.fromkeys(sources))
    missing = [ln.key for ln in lines if ln.profile is None]
    notes = ["measured = this host's own runs; a dash is a value no run measured.",
             "Scores: multiple-choice accuracy (%); SE = one standard error, sqrt(p(1-p)/n), n = the eval row's sample "
             "count (MVBench: its 20 tasks pooled); AVG and its SE only when every benchmark was measured.",
             "TFLOPs: LLM prefill per sample (2 FLOPs per multiply-add, attention counted full, the vision tower "
             "excluded); KV cache: vision-token KV cache, % of the baseline's (the paper's convention); both from the "
             "profile row of the same configuration at the line's clip (pmod-bench profile --frames N --frame-size WxH).",
             "Clip: frames the eval read at most (a method's --match clip; else model_info.max_num_frames, or lmms-eval's "
             "32) and the profile row's frame size.",
             "Methods at matched FLOPs: the eval run of each method solved to p-MoD-0.5 on its clip (pmod-bench eval "
             "--suite video --method NAME --match p-MoD-0.5), else its last run."]
    if missing:
        notes.append(f"No profile row at the clip for {', '.join(missing)}: add one with pmod-bench profile --frames N "
                     "(and --frame-size WxH, --method SPEC as evaluated).")
    notes.append(f"Runs: {', '.join(sources)}.")
    return ReportTable(id=f"{_slug(host)}-video", number=0, title=f"{name}: video benchmarks beside prefill compute and KV "
                       "cache at the clip budget", label_header="Model · variant", columns=tuple(_columns(benches)),
                       lines=tuple(Line(" · ".join(ln.key.rpartition("/")[::2]) + (f" ({ln.budget})" if ln.budget else ""),
                                        "measured", _values(ln, benches), ln.key, i) for i, ln in enumerate(lines)),
                       compare=False, notes=tuple(notes), sources=tuple(sources),
                       heading=f"{name}: video benchmarks at the clip budget (baseline, p-MoD, methods at matched FLOPs)")


def video_tables(reps: Mapping[str, Reproduction]) -> list[ReportTable]:
    """The video table of every host that has one."""
    return [t for host, rep in reps.items() for t in [video_table(host, rep)] if t is not None]


__all__ = ["VIDEO_BENCHMARKS", "VideoLine", "video_lines", "video_table", "video_tables"]
