"""Reports across hosts: each host's own efficiency table (Table 7's analog), methods table (Tables 5 / 8-10's analog)
and trade-off figure; the paper's tables fed by LLaVA runs alone, whatever other hosts' runs are given.

Run directories are crafted by hand following docs/RUN_DIRS.md (eval run.json ``host``, profile run.json ``host`` /
``hosts``); the slow test writes them with the real CLI on the tiny Qwen2.5-VL preset.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from pmod_bench.reports import build_report, load_run
from pmod_bench.reports.hosts import (
    host_figure_data,
    run_host,
    score_error,
    split_by_host,
)
from pmod_bench.reports.matching import match_runs
from test_reports import (
    _pmod,
    _profile_row,
    _run_json,
    _write_json,
    make_eval_run,
    make_profile_run,
    make_train_run,
)
from test_reports_methods import FASTV, _method_row, make_method_eval

QWEN = "Qwen/Qwen2.5-VL-7B-Instruct"
QWEN6 = {"Doc": 90.0, "Chart": 80.0, "Text": 82.0, "GQA": 60.0, "SEED": 75.0, "MMB": 82.0}


def _say_host(run_dir: Path, host: str, hosts: dict | None = None) -> Path:
    meta = json.loads((run_dir / "run.json").read_text())
    meta["host"] = host
    if hosts is not None:
        meta["hosts"] = hosts
    _write_json(run_dir / "run.json", meta)
    return run_dir


def _qwen_row(variant: str, shift, tflops: float, kv: float, method: dict | None = None) -> dict:
    row = _method_row(method, tflops, kv) if method else _profile_row(variant, shift, tflops, kv, 200.0 * tflops / 30, 300.0)
    row.update(arch="qwen2.5-vl-7b", tflops_ratio=tflops / 30.0, latency_ratio=tflops / 30.0)
    if not method:
        row.update(ratios=[1.0] * 28 if shift is None else [1.0] * 7 + [shift] * 21)
    return row


def _llava_runs(root: Path) -> list[Path]:
    prof = _say_host(make_profile_run(root / "profile-next"), "llava_next", {"llava-next-7b": "llava_next"})
    base = _say_host(make_eval_run(root / "eval-base", "llava-hf/llava-v1.6-vicuna-7b-hf", None,
                                   {"Doc": 70.5, "Chart": 61.0, "Text": 62.7, "GQA": 63.9, "SEED": 68.5, "MMB": 67.0}),
                     "llava_next")
    pmod = _say_host(make_eval_run(root / "eval-pmod", "llava-next-7b", _pmod(0.5), {"Doc": 69.0, "GQA": 63.0}), "llava_next")
    return [prof, base, pmod]


def _qwen_runs(root: Path) -> list[Path]:
    prof = root / "profile-qwen"
    rows = [_qwen_row("baseline", None, 30.0, 1.0), _qwen_row("p-MoD-0.5", 0.5, 16.0, 0.55),
            _qwen_row("p-MoD-0.3", 0.3, 13.0, 0.45), _qwen_row("", None, 16.2, 0.56, method=FASTV)]
    _run_json(prof, "profile")
    _write_json(prof / "profile.json", {"rows": rows})
    (prof / "profile.csv").write_text("arch\n")
    _say_host(prof, "qwen2_5_vl", {"qwen2.5-vl-7b": "qwen2_5_vl"})
    base = _say_host(make_eval_run(root / "qwen-base", QWEN, None, QWEN6), "qwen2_5_vl")
    pmod = _say_host(make_eval_run(root / "qwen-pmod05", QWEN, _pmod(0.5), {k: v - 1 for k, v in QWEN6.items()}), "qwen2_5_vl")
    pmod3 = _say_host(make_eval_run(root / "qwen-pmod03", QWEN, _pmod(0.3), {k: v - 3 for k, v in QWEN6.items()}), "qwen2_5_vl")
    fastv = make_method_eval(root / "qwen-fastv", FASTV, {k: v - 2 for k, v in QWEN6.items()})
    summary = json.loads((fastv / "summary.json").read_text())
    summary["model"] = QWEN
    _write_json(fastv / "summary.json", summary)
    return [prof, base, pmod, pmod3, _say_host(fastv, "qwen2_5_vl")]


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_run_host_reads_each_kind(tmp_path):
    llava = [load_run(p) for p in _llava_runs(tmp_path)]
    qwen = [load_run(p) for p in _qwen_runs(tmp_path)]
    assert {run_host(r, r.rows[0] if r.kind == "profile" else None) for r in llava} == {"llava_next"}
    assert {run_host(r, r.rows[0] if r.kind == "profile" else None) for r in qwen} == {"qwen2_5_vl"}
    paper, other = split_by_host(llava + qwen)
    assert [r.path for r in paper] == [r.path for r in llava]
    assert list(other) == ["qwen2_5_vl"] and [r.path for r in other["qwen2_5_vl"]] == [r.path for r in qwen]


def test_a_profile_run_of_two_hosts_is_split_by_row(tmp_path):
    prof = tmp_path / "mixed"
    rows = [_profile_row("baseline", None, 40.0, 1.0, 500.0, 550.0), _qwen_row("baseline", None, 30.0, 1.0)]
    _run_json(prof, "profile")
    _write_json(prof / "profile.json", {"rows": rows})
    (prof / "profile.csv").write_text("arch\n")
    _say_host(prof, None, {"llava-next-7b": "llava_next", "qwen2.5-vl-7b": "qwen2_5_vl"})
    paper, other = split_by_host([load_run(prof)])
    assert [r["arch"] for r in paper[0].rows] == ["llava-next-7b"]
    assert [r["arch"] for r in other["qwen2_5_vl"][0].rows] == ["qwen2.5-vl-7b"]


def test_per_host_tables_and_figures_leave_the_paper_tables_alone(tmp_path):
    llava = _llava_runs(tmp_path / "runs")
    qwen = _qwen_runs(tmp_path / "runs")
    alone = build_report(llava, tmp_path / "alone", figures=False)
    both = build_report(llava + qwen, tmp_path / "both")

    # the paper's tables: byte-identical with and without the Qwen runs
    for table in alone.tables:
        for ext in ("md", "tex", "csv"):
            rel = f"tables/{table.id}.{ext}"
            assert (tmp_path / "both" / rel).read_text() == (tmp_path / "alone" / rel).read_text(), rel
    for table in both.tables:
        if table.heading is None:
            assert not any("qwen" in (ln.key or "").lower() for ln in table.lines), table.id

    eff = _csv(tmp_path / "both" / "tables" / "qwen2-5-vl-efficiency.csv")
    assert [r["key"] for r in eff] == ["qwen2.5-vl-7b/baseline", "qwen2.5-vl-7b/p-MoD-0.5", "qwen2.5-vl-7b/p-MoD-0.3"]
    assert [float(r["TFLOPs"]) for r in eff] == [30.0, 16.0, 13.0]  # profile rows joined with ...
    assert [round(float(r["AVG"]), 4) for r in eff] == [78.1667, 77.1667, 75.1667]  # ... eval runs of the same config
    assert float(eff[1]["KV cache"]) == 55.0 and float(eff[0]["Training GPU hours"]) == 300.0

    meth = _csv(tmp_path / "both" / "tables" / "qwen2-5-vl-methods.csv")
    assert [r["key"] for r in meth] == ["qwen2.5-vl-7b/baseline", "qwen2.5-vl-7b/p-MoD-0.5", "qwen2.5-vl-7b/p-MoD-0.3",
                                        "qwen2.5-vl-7b/FastV"]
    fastv = meth[-1]
    assert float(fastv["TFLOPs"]) == 15.7 and float(fastv["Doc"]) == 88.0  # the method's own profile row (paper convention)
    assert "MMB" in meth[0] and "Info" not in meth[0]  # the benchmarks the host's runs measured

    md = (tmp_path / "both" / "tables" / "qwen2-5-vl-efficiency.md").read_text()
    assert md.startswith("# Qwen2.5-VL: efficiency across shift factors (analog of Table 7)")
    tex = (tmp_path / "both" / "tables" / "qwen2-5-vl-methods.tex").read_text()
    assert "Paper:" not in tex and r"\begin{tabular}" in tex

    figs = [name for name in both.figures if name.startswith("Qwen2.5-VL")]
    assert len(figs) == 1 and all(p.stat().st_size > 1000 for p in both.figures[figs[0]])
    index = (tmp_path / "both" / "index.md").read_text()
    assert "qwen2-5-vl-efficiency" in index and "Qwen2.5-VL: `qwen2.5-vl-7b/p-MoD-0.5`" in index
    report = json.loads((tmp_path / "both" / "report.json").read_text())
    assert "qwen2.5-vl-7b/FastV" in report["tables"]["qwen2-5-vl-methods"]["measured_rows"]


def test_a_host_with_shift_factors_alone_still_gets_its_figure(tmp_path):
    qwen = _qwen_runs(tmp_path / "runs")[:4]  # no method run
    got = build_report(qwen, tmp_path / "r")
    figs = [name for name in got.figures if name.startswith("Qwen2.5-VL")]
    assert len(figs) == 1
    eff = _csv(tmp_path / "r" / "tables" / "qwen2-5-vl-efficiency.csv")
    assert len(eff) == 3


def test_small_sample_scores_carry_their_standard_error(tmp_path):
    assert score_error({"Doc": (50.0, 100)}) == pytest.approx(5.0)  # sqrt(0.25 / 100) = 5 points
    assert score_error({"Doc": (50.0, 100), "GQA": (90.0, 400)}) == pytest.approx(100 * (0.0025 + 0.09 / 400) ** 0.5 / 2)
    assert score_error({"Doc": (50.0, None)}) is None and score_error({"MME": (1500.0, 100)}) is None
    _, other = split_by_host([load_run(p) for p in _qwen_runs(tmp_path)])
    data = host_figure_data(match_runs(other["qwen2_5_vl"], {}, None))
    pmod05 = next(p for p in data.pmod if p.key == "qwen2.5-vl-7b/p-MoD-0.5")
    want = 100 * sum((v - 1) / 100 * (1 - (v - 1) / 100) / 100 for v in QWEN6.values()) ** 0.5 / 6  # n = 100 per row
    assert pmod05.score_err == pytest.approx(want)
    assert data.curves["fastv"][0].score_err is not None and any("standard error" in n for n in data.notes)


def test_a_host_train_run_gives_its_measured_training_cost(tmp_path):
    """A train run of Qwen2.5-VL (train_summary.json host, model) fills the GPU-hours cell of its configuration in the
    host's efficiency table, never a paper row; without ``model`` it stays unmatched, as before."""
    qwen = _qwen_runs(tmp_path / "runs")[:3]
    info = {"class": "PMoDQwen2_5_VLForConditionalGeneration", "family": "qwen2_5_vl", "num_params": 8_290_000_000}
    train = make_train_run(tmp_path / "runs" / "qwen-train", 123.0, label="qwen p-MoD sft", pmod=_pmod(0.5), model_info=info)
    summary = json.loads((train / "train_summary.json").read_text())
    _write_json(train / "train_summary.json", {**summary, "host": "qwen2_5_vl", "model": QWEN})
    got = build_report([*qwen, train], tmp_path / "r", figures=False)
    eff = {r["key"]: r for r in _csv(tmp_path / "r" / "tables" / "qwen2-5-vl-efficiency.csv")}
    assert float(eff["qwen2.5-vl-7b/p-MoD-0.5"]["Training GPU hours"]) == 123.0  # measured, over the profile's 300
    assert float(eff["qwen2.5-vl-7b/baseline"]["Training GPU hours"]) == 300.0
    assert not any("qwen" in (ln.key or "").lower() for t in got.tables if t.heading is None for ln in t.lines)
    _write_json(train / "train_summary.json", {**summary, "host": "qwen2_5_vl"})  # no model: nothing names it
    build_report([*qwen, train], tmp_path / "r2", figures=False)
    assert "Qwen2.5-VL: not matched" in (tmp_path / "r2" / "index.md").read_text()
