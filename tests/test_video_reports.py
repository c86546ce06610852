"""`pmod-bench report` on video runs: each host's video table (Video-MME, MVBench, EgoSchema scores with n and standard
errors beside prefill TFLOPs / KV cache at the clip budget, for baseline, p-MoD and methods at matched FLOPs) and the
video trade-off figure with the methods' rows; the paper's tables unchanged by any of it.

Run directories are crafted by hand following docs/RUN_DIRS.md (profile rows with ``frames``, eval rows of the video
benchmarks, ``method_match`` with ``frames`` as ``eval --suite video --match`` writes it).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from pmod_bench.reports import build_report, load_run
from pmod_bench.reports.matching import match_runs
from pmod_bench.reports.video import VIDEO_BENCHMARKS, video_lines
from test_reports import _profile_row, _run_json, _write_json, make_eval_run
from test_reports_hosts import _llava_runs, _say_host

QWEN = "Qwen/Qwen2.5-VL-7B-Instruct"
DYCOKE = {"method": "dycoke", "k": 0.63, "dp": False}
DYCOKE_LOW = {"method": "dycoke", "k": 0.8, "dp": False}
SCORES = {"VideoMME": 60.0, "MVBench": 55.0, "EgoSchema": 50.0}
N = {"VideoMME": 300, "MVBench": 4000, "EgoSchema": 500}


def _pmod_dict(shift: float) -> dict:
    from pmod_bench.model.config import PMoDConfig

    return PMoDConfig(shift=shift).to_dict()


def _video_row(variant: str, shift, frames: int, tflops: float, kv: float, size=(1280, 720), method: dict | None = None,
               target: str | None = None) -> dict:
    row = _profile_row(variant, shift, tflops, kv, 100.0 * tflops, 0.0)
    row.update(arch="qwen2.5-vl-7b", image_size=list(size), frames=frames, vision_tokens=360 * frames,
               kv_cache_bytes=int(2**30 * kv * frames / 8), tflops_ratio=kv, train_gpu_hours=None,
               ratios=[1.0] * 28 if shift is None else [1.0] * 7 + [shift] * 21, paper_scenario=False)
    if method is not None:
        row.update(method=method["method"], method_config=dict(method), ratios=[kv] * 28,
                   method_match={"target_label": target, "method": dict(method)} if target else None)
    return row


def _match(cfg: dict, label: str, frames: int = 32, size=(1280, 720)) -> dict:
    return {"method": dict(cfg), "metric": "prefill", "target": 7.0e13, "achieved": 7.0e13, "rel_err": 0.001,
            "target_label": label, "target_pmod": _pmod_dict(float(label.rsplit("-", 1)[1])), "convention": "headline",
            "solved": {"k": cfg["k"]}, "arch": "qwen2.5-vl-7b", "image_size": list(size), "text_tokens": 58,
            "method_spec": f"dycoke:k={cfg['k']}", "frames": frames}


def _video_eval(run_dir: Path, pmod, scores: dict, method: dict | None = None, match: dict | None = None,
                info: dict | None = None) -> Path:
    make_eval_run(run_dir, QWEN, pmod, scores)
    summary = json.loads((run_dir / "summary.json").read_text())
    for row in summary["rows"]:
        row["n"] = N[row["benchmark"]]
        if method is not None:
            row["method"], row["method_match"] = dict(method), match
    if method is not None:
        summary["method"] = dict(method)
    _write_json(run_dir / "summary.json", summary)
    _say_host(run_dir, "qwen2_5_vl")
    if info is not None:
        meta = json.loads((run_dir / "run.json").read_text())
        meta["model_info"] = info
        _write_json(run_dir / "run.json", meta)
    return run_dir


def _qwen_video_runs(root: Path) -> list[Path]:
    prof = root / "profile-video"
    rows = []
    for f, scale in ((8, 0.25), (16, 0.5), (32, 1.0)):
        rows += [_video_row("baseline", None, f, 100.0 * scale, 1.0), _video_row("p-MoD-0.5", 0.5, f, 54.0 * scale, 0.54),
                 _video_row("dycoke:k=0.63", None, f, 55.0 * scale, 0.55, method=DYCOKE, target="p-MoD-0.5")]
    rows.append(_video_row("baseline", None, 32, 40.0, 1.0, size=(640, 360)))  # another frame size: not the clip's
    rows.append(_video_row("dycoke:k=0.8", None, 32, 35.0, 0.35, method=DYCOKE_LOW))
    _run_json(prof, "profile")
    _write_json(prof / "profile.json", {"rows": rows})
    (prof / "profile.csv").write_text("arch\n")
    _say_host(prof, "qwen2_5_vl", {"qwen2.5-vl-7b": "qwen2_5_vl"})
    return [prof,
            _video_eval(root / "v-base", None, SCORES, info={"max_num_frames": 32}),
            _video_eval(root / "v-pmod", _pmod_dict(0.5), {k: v - 2 for k, v in SCORES.items()}),
            _video_eval(root / "v-dycoke", None, {k: v - 3 for k, v in SCORES.items()}, DYCOKE, _match(DYCOKE, "p-MoD-0.5")),
            _video_eval(root / "v-dycoke-low", None, {k: v - 9 for k, v in SCORES.items()}, DYCOKE_LOW,
                        _match(DYCOKE_LOW, "p-MoD-0.3"))]


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _se(p: float, n: int) -> float:
    return 100.0 * math.sqrt(p / 100 * (1 - p / 100) / n)


def test_video_benchmark_keys_are_the_video_suites():
    from pmod_bench.tasks.benchmarks import SUITES

    assert VIDEO_BENCHMARKS == tuple(SUITES["video"])


def test_video_lines_join_scores_and_the_profile_row_at_the_clip(tmp_path):
    runs = [load_run(p) for p in _qwen_video_runs(tmp_path)]
    rep = match_runs(runs)
    lines = {ln.key: ln for ln in video_lines(rep)}
    assert list(lines) == ["qwen2.5-vl-7b/baseline", "qwen2.5-vl-7b/p-MoD-0.5", "qwen2.5-vl-7b/dycoke"]
    base, dycoke = lines["qwen2.5-vl-7b/baseline"], lines["qwen2.5-vl-7b/dycoke"]
    assert base.frames == 32 and base.profile["prefill_tflops"] == 100.0  # the 1280x720 row, not the 640x360 one
    assert dycoke.frames == 32 and dycoke.frame_size == (1280, 720) and dycoke.profile["method_config"] == DYCOKE
    assert dycoke.scores["VideoMME"][:2] == (57.0, 300) and dycoke.scores["VideoMME"][2].endswith("v-dycoke")  # at target
    assert not any("VideoMME" in n and "not a paper column" in n for n in rep.notes)


def test_report_writes_each_hosts_video_table_and_leaves_the_paper_tables_alone(tmp_path):
    llava = _llava_runs(tmp_path / "runs")
    qwen = _qwen_video_runs(tmp_path / "runs")
    alone = build_report(llava, tmp_path / "alone", figures=False)
    both = build_report(llava + qwen, tmp_path / "both", figures=False)
    for table in alone.tables:
        for ext in ("md", "tex", "csv"):
            rel = Path("tables") / f"{table.id}.{ext}"
            assert (tmp_path / "both" / rel).read_bytes() == (tmp_path / "alone" / rel).read_bytes(), rel
    assert "qwen2-5-vl-video" in {t.id for t in both.tables} and "qwen2-5-vl-video" not in {t.id for t in alone.tables}
    rows = {r["key"]: r for r in _csv(tmp_path / "both" / "tables" / "qwen2-5-vl-video.csv")}
    assert list(rows) == ["qwen2.5-vl-7b/baseline", "qwen2.5-vl-7b/p-MoD-0.5", "qwen2.5-vl-7b/dycoke"]
    header = list(next(iter(rows.values())))
    assert header[:6] == ["Model · variant", "key", "line", "Clip (frames × WxH)", "TFLOPs", "KV cache"]
    assert header[6:9] == ["Video-MME", "Video-MME SE", "Video-MME n"] and header[-2:] == ["AVG", "AVG SE"]
    base, pmod, dycoke = rows.values()
    assert base["Clip (frames × WxH)"] == "32 × 1280x720" and float(base["TFLOPs"]) == 100.0 and float(base["KV cache"]) == 100.0
    assert float(pmod["TFLOPs"]) == 54.0 and float(pmod["KV cache"]) == 54.0
    assert float(dycoke["TFLOPs"]) == 55.0 and float(dycoke["Video-MME"]) == 57.0 and float(dycoke["Video-MME n"]) == 300
    assert float(dycoke["Video-MME SE"]) == pytest.approx(_se(57.0, 300), abs=1e-4)
    assert float(dycoke["AVG"]) == pytest.approx(sum(SCORES.values()) / 3 - 3)
    md = (tmp_path / "both" / "tables" / "qwen2-5-vl-video.md").read_text()
    assert md.startswith("# Qwen2.5-VL: video benchmarks at the clip budget") and "| 57.0 | 2.9 | 300 |" in md
    assert "| qwen2.5-vl-7b · dycoke (k=0.63,dp=False) | 32 × 1280x720 |" in md
    # a video-only method's run has no all-dash line in the host's image methods table
    methods = _csv(tmp_path / "both" / "tables" / "qwen2-5-vl-methods.csv")
    assert not any("dycoke" in r["key"] for r in methods)
    assert "tables/qwen2-5-vl-video.md" in (tmp_path / "both" / "index.md").read_text()


def test_a_line_without_a_profile_row_or_a_fixed_clip_says_so(tmp_path):
    runs = [_video_eval(tmp_path / "fps", None, SCORES, info={"fps": 1.0}),
            _video_eval(tmp_path / "pmod", _pmod_dict(0.3), SCORES, info={"max_num_frames": 16})]
    out = build_report(runs, tmp_path / "r", figures=False)
    table = next(t for t in out.tables if t.id == "qwen2-5-vl-video")
    by_key = {ln.key: ln.values for ln in table.lines}
    assert by_key["qwen2.5-vl-7b/baseline"][:3] == (None, None, None)       # read at an fps: no clip budget
    assert by_key["qwen2.5-vl-7b/p-MoD-0.3"][:3] == ("16", None, None)       # 16 frames, no profile row at them
    assert any("No profile row at the clip for qwen2.5-vl-7b/baseline, qwen2.5-vl-7b/p-MoD-0.3" in n for n in table.notes)


def test_video_figure_draws_the_methods_rows(tmp_path):
    from pmod_bench.reports.figures import METHOD_COLORS, _video_styles, video_tradeoff_data

    runs = _qwen_video_runs(tmp_path / "runs")
    data = video_tradeoff_data([load_run(p) for p in runs])
    series = {(s.frame_size, s.variant): s for s in data.series}
    matched = series[(1280, 720), "dycoke (matched to p-MoD-0.5)"]
    assert matched.method == "dycoke" and sorted(matched.points) == [8, 16, 32]  # one series, k solved at each count
    assert [matched.points[f][0] for f in (8, 16, 32)] == [13.75, 27.5, 55.0]
    assert [matched.points[f][1] for f in (8, 16, 32)] == pytest.approx([0.55, 1.1, 2.2])  # KV GiB
    assert series[(1280, 720), "dycoke:k=0.8"].points[32] == (35.0, pytest.approx(1.4))
    _, _, methods = _video_styles(data)
    assert len({m for _, m in methods.values()}) == len(methods) == 2 and all(c in METHOD_COLORS for c, _ in methods.values())


@pytest.mark.slow
def test_report_draws_the_video_figure_with_methods(tmp_path):
    runs = _qwen_video_runs(tmp_path / "runs")
    out = build_report(runs, tmp_path / "report")
    name = next(n for n in out.figures if n.startswith("Video:"))
    assert name.endswith("and comparison methods")
    assert (tmp_path / "report" / "figures" / "video_tradeoff.png").stat().st_size > 10_000
