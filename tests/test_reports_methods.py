"""Reports of comparison-method runs: Tables 5, 8, 9 and 10 filled from runs matched on their method config
dict, and the methods trade-off figure (accuracy vs TFLOPs per method across budgets beside p-MoD's shifts).

Run directories are crafted by hand following docs/RUN_DIRS.md (the rows `pmod-bench profile --method` and
`pmod-bench eval --method ... --match ...` write).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pmod_bench.reports import RunDirError, build_report, build_table, load_run, match_runs, paper_table
from test_reports import _pmod, _profile_row, _run_json, _write_json, make_eval_run

T5 = ["Doc", "Chart", "Text", "Info", "RWQA", "GQA", "SQA", "MMMU", "POPE", "AI2D", "VQAv2", "SEED"]


def _method_row(cfg: dict, tflops: float, kv: float) -> dict:
    spec = cfg["method"] + ":" + ",".join(f"{k}={v}" for k, v in cfg.items() if k != "method")
    row = _profile_row(spec, None, tflops, kv, 300.0, 420.0)
    row.update(method=cfg["method"], ratios=[1.0] * 32, method_config=dict(cfg), prefill_tflops_paper=tflops - 0.5,
               paper_scenario=True, method_extra_tflops=0.01)
    return row


_WRITTEN, _LEGACY = object(), object()  # target_pmod as the solver writes it / left out (rows older than the key)


def _match(cfg: dict, label: str, target_pmod=_WRITTEN) -> dict:
    """A ``method_match`` as the solver writes it: ``target_pmod`` is the target's PMoDConfig.to_dict() (null for
    kv=... / TFLOPs targets); pass ``target_pmod=None`` / a dict to set it, ``_LEGACY`` to leave the key out."""
    from pmod_bench.model.config import parse_pmod_spec

    if target_pmod is _WRITTEN:
        got = parse_pmod_spec(label) if label.lower().startswith(("p-mod", "pmod", "ratios")) else None
        target_pmod = got.to_dict() if got is not None else None
    out = {"method": dict(cfg), "metric": "prefill", "target": 2.3e13, "achieved": 2.3e13, "rel_err": 0.001,
           "target_label": label, "target_pmod": target_pmod, "convention": "headline",
           "solved": {k: v for k, v in cfg.items() if k != "method"}, "arch": "llava-next-7b", "image_size": [672, 672],
           "text_tokens": 58}
    if target_pmod is _LEGACY:
        del out["target_pmod"]
    return out


def make_method_eval(run_dir: Path, cfg: dict, scores: dict, label: str = "p-MoD-0.5", target_pmod=_WRITTEN) -> Path:
    make_eval_run(run_dir, "llava-hf/llava-v1.6-vicuna-7b-hf", None, scores)
    summary = json.loads((run_dir / "summary.json").read_text())
    for row in summary["rows"]:
        row["method"], row["method_match"] = dict(cfg), _match(cfg, label, target_pmod)
    summary["method"] = dict(cfg)
    _write_json(run_dir / "summary.json", summary)
    return run_dir


FASTV = {"method": "fastv", "k": 2, "keep": 0.518}
FASTV_LOW = {"method": "fastv", "k": 2, "keep": 0.3}
VZIP = {"method": "visionzip", "dominant": 272, "contextual": 50}
DOWN = {"method": "downsample", "keep": 0.25, "grid_h": None, "grid_w": None}


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("methods")
    prof = root / "profile"
    rows = [_profile_row("baseline", None, 40.0, 1.0, 500.0, 550.0), _profile_row("p-MoD-0.5", 0.5, 22.0, 0.54, 370.0, 430.0),
            _profile_row("p-MoD-0.3", 0.3, 18.0, 0.43, 330.0, 400.0),
            _method_row(FASTV_LOW, 14.0, 0.33), _method_row(FASTV, 23.0, 0.55), _method_row(VZIP, 23.1, 0.55),
            _method_row(DOWN, 12.0, 0.25)]
    _run_json(prof, "profile")
    _write_json(prof / "profile.json", {"rows": rows})
    (prof / "profile.csv").write_text("arch\n")
    t = {b: 60.0 + i for i, b in enumerate(T5)}
    runs = {"profile": prof,
            "base": make_eval_run(root / "base", "llava-hf/llava-v1.6-vicuna-7b-hf", None, {b: v + 1.0 for b, v in t.items()}),
            "pmod": make_eval_run(root / "pmod", "llava-hf/llava-v1.6-vicuna-7b-hf", _pmod(0.5), t),
            "pmod03": make_eval_run(root / "pmod03", "llava-hf/llava-v1.6-vicuna-7b-hf", _pmod(0.3), {b: v - 1 for b, v in t.items()}),
            "fastv": make_method_eval(root / "fastv", FASTV, {b: v - 0.5 for b, v in t.items()}),
            "fastv_low": make_method_eval(root / "fastv_low", FASTV_LOW, {b: v - 3.0 for b, v in t.items()}, "kv=0.33"),
            "vzip": make_method_eval(root / "vzip", VZIP, {b: t[b] - 2.0 for b in ("Doc", "Chart", "SEED", "GQA")}),
            "down": make_method_eval(root / "down", DOWN, {b: t[b] - 1.5 for b in ("Doc", "Chart", "SEED", "GQA")}, "kv=0.25")}
    return runs


def _lines(table, key):
    return {ln.kind: ln for ln in table.lines if ln.key == key}


def test_method_runs_fill_their_rows_by_config(method_runs):
    # fastv_low comes last: the table still shows the run solved to p-MoD-0.5
    order = ["profile", "base", "pmod", "fastv", "fastv_low", "vzip", "down"]
    rep = match_runs([load_run(method_runs[k]) for k in order])
    t5 = build_table(paper_table(5), rep)
    cols = [c.key for c in t5.columns]
    fastv = _lines(t5, "llava-next-7b/FastV")["reproduced"]
    assert fastv.values[cols.index("Doc")] == pytest.approx(59.5)  # the keep=0.518 run, not keep=0.3 (57.0)
    assert fastv.values[cols.index("TFLOPs")] == pytest.approx(22.5)  # its own profile row (paper convention)
    assert fastv.values[cols.index("KV cache")] == pytest.approx(55.0)
    base = _lines(t5, "llava-next-7b/baseline")["reproduced"]
    assert base.values[cols.index("Doc")] == pytest.approx(61.0)  # a method run never fills the baseline row
    pm = _lines(t5, "llava-next-7b/p-MoD-0.5")["reproduced"]
    assert pm.values[cols.index("Doc")] == pytest.approx(60.0)
    assert "reproduced" not in _lines(t5, "llava-next-7b/MQT") and "reproduced" not in _lines(t5, "llava-next-7b/LLaVolta")
    assert any("MQT, LLaVolta: paper values only" in n and "own training" in n for n in t5.notes)
    assert any("keep=0.518" in n and "2 eval runs of fastv" in n for n in rep.notes)
    t10 = build_table(paper_table(10), rep)
    cols10 = [c.key for c in t10.columns]
    assert _lines(t10, "llava-next-7b/VisionZip")["reproduced"].values[cols10.index("GQA")] == pytest.approx(63.0)
    down = [ln for ln in t10.lines if ln.kind == "measured"]
    assert [ln.key for ln in down] == ["llava-next-7b/downsample"] and down[0].values[cols10.index("Doc")] == pytest.approx(58.5)
    assert any("FreeVideoLLM: not implemented" in n for n in t10.notes)
    t8 = build_table(paper_table(8), rep)  # 13B rows: nothing matched from 7B runs
    assert not any(ln.kind == "reproduced" for ln in t8.lines)
    assert any("paper values only" in n for n in build_table(paper_table(11)).notes)  # gamma-MoD, paper mode too


def test_the_budget_solved_to_p_mod_05_is_read_as_data(method_runs, tmp_path):
    """``--match`` in any spelling of p-MoD-0.5's configuration picks the table's run, wherever it comes."""
    spelled = make_method_eval(tmp_path / "fastv", FASTV, {"Doc": 50.0}, "pmod:shift=0.5,schedule=cosine")
    low = make_method_eval(tmp_path / "fastv_low", FASTV_LOW, {"Doc": 40.0}, "kv=0.33")
    rep = match_runs([load_run(method_runs["profile"]), load_run(spelled), load_run(low)])
    assert rep.get("llava-next-7b/FastV", "Doc") == pytest.approx(50.0)


def test_the_match_target_is_its_pmod_data_not_its_label(method_runs, tmp_path):
    """``method_match.target_pmod`` decides which budget is p-MoD-0.5's, whatever ``target_label`` says; rows
    written before ``target_pmod`` existed fall back to reading the label."""
    from pmod_bench.model.config import PMoDConfig

    prof = load_run(method_runs["profile"])
    # the label says p-MoD-0.5, the data says delta 0.3: not the equal-compute run; the other one (label free text,
    # data p-MoD-0.5's configuration) is, though it comes first
    at_05 = make_method_eval(tmp_path / "a", FASTV, {"Doc": 50.0}, "my budget", target_pmod=PMoDConfig().to_dict())
    at_03 = make_method_eval(tmp_path / "b", FASTV_LOW, {"Doc": 40.0}, "p-MoD-0.5",
                             target_pmod=PMoDConfig(shift=0.3).to_dict())
    rep = match_runs([prof, load_run(at_05), load_run(at_03)])
    assert rep.get("llava-next-7b/FastV", "Doc") == pytest.approx(50.0)
    assert any("solved to p-MoD-0.5" in n and "keep=0.518" in n for n in rep.notes)
    # null data (a kv / TFLOPs / baseline target) is never p-MoD-0.5, even labelled so: the last run is taken
    none = make_method_eval(tmp_path / "c", FASTV, {"Doc": 45.0}, "p-MoD-0.5", target_pmod=None)
    last = make_method_eval(tmp_path / "d", FASTV_LOW, {"Doc": 41.0}, "kv=0.33")
    rep = match_runs([prof, load_run(none), load_run(last)])
    assert rep.get("llava-next-7b/FastV", "Doc") == pytest.approx(41.0)
    # legacy rows (no target_pmod): the label, read by the model's parser
    legacy = make_method_eval(tmp_path / "e", FASTV, {"Doc": 47.0}, "p-MoD-cosine-0.5", target_pmod=_LEGACY)
    rep = match_runs([prof, load_run(legacy), load_run(last)])
    assert rep.get("llava-next-7b/FastV", "Doc") == pytest.approx(47.0)
    bad = make_method_eval(tmp_path / "f", FASTV, {"Doc": 47.0}, "p-MoD-0.5", target_pmod={"shift": 9.0})
    with pytest.raises(RunDirError, match=r"rows\[0\] method_match 'target_pmod' is not a p-MoD config"):
        load_run(bad)


def test_methods_tradeoff_curves(method_runs):
    from pmod_bench.reports.figures import methods_tradeoff_data

    rep = match_runs([load_run(p) for p in method_runs.values()])
    data = methods_tradeoff_data(rep)
    assert data.model == "llava-next-7b" and data.benchmarks == ("Doc", "Chart", "GQA", "SEED")
    assert [p.name for p in data.curves["fastv"]] == ["k=2,keep=0.3", "k=2,keep=0.518"]
    assert [p.tflops_pct for p in data.curves["fastv"]] == pytest.approx([35.0, 57.5])
    assert set(data.curves) == {"fastv", "visionzip", "downsample"}
    assert {p.name for p in data.pmod} == {"baseline", "δ=0.5", "δ=0.3"}
    assert data.curves["fastv"][1].score == pytest.approx((60 + 61 + 65 + 71) / 4 - 0.5)


@pytest.mark.slow
def test_report_writes_the_methods_figure(method_runs, tmp_path):
    res = build_report(list(method_runs.values()), tmp_path / "report")
    out = tmp_path / "report"
    for ext in ("png", "pdf"):
        f = out / "figures" / f"tradeoff_methods.{ext}"
        assert f.is_file() and f.stat().st_size > 1000
    index = (out / "index.md").read_text()
    assert "tradeoff_methods.png" in index and "comparison methods across budgets" in index
    assert "tradeoff_methods" in json.dumps({k: [str(p) for p in v] for k, v in res.figures.items()})


def test_method_run_without_profile_row_is_named(method_runs, tmp_path):
    from pmod_bench.reports.figures import methods_tradeoff_data

    rep = match_runs([load_run(method_runs["fastv"])])
    data = methods_tradeoff_data(rep)
    assert not data.drawable and "pmod-bench profile --method fastv:k=2,keep=0.518" in data.notes[0]
