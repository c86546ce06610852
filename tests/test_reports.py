"""Tests of pmod_bench.reports: the paper's data, matching, renderers (golden files), figures, CLI.

Run directories are built by hand here, following docs/RUN_DIRS.md key for key. Regenerate the
golden files after an intended change of the renderers with
``PMOD_UPDATE_GOLDEN=1 python -m pytest tests/test_reports.py -k golden``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pmod_bench.reports import (
    LabelError,
    ReportError,
    RunDirError,
    build_report,
    build_table,
    canonical_model,
    canonical_variant,
    load_paper_tables,
    load_run,
    match_runs,
    paper_average,
    paper_table,
    parse_label,
    render_csv,
    render_latex,
    render_markdown,
)
from pmod_bench.reports.matching import Reproduction, pmod_config, variant_from_pmod
from pmod_bench.reports.paper import (AVG_TOLERANCE, PAPER_CITATION, PAPER_MODELS, PaperColumn, PaperRow, PaperTable,
                                     as_number)

GOLDEN = Path(__file__).parent / "golden" / "reports"
BENCH6 = ["Doc", "Chart", "Text", "GQA", "SEED", "MMB"]


# ----------------------------------------------------------------------------- run-dir builders
def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def _run_json(run_dir: Path, kind: str, label: str | None = None) -> None:
    meta = {"kind": kind, "schema_version": 1, "created": "2026-11-24T02:30:00Z", "pmod_bench_version": "0.1.0",
            "command": f"pmod-bench {kind} ..."}
    if label is not None:
        meta["label"] = label
    _write_json(run_dir / "run.json", meta)


def _profile_row(variant: str, shift, tflops: float, kv: float, lat: float, gpu_h: float) -> dict:
    base_tflops, base_lat = 40.0, 500.0
    L = 32
    ratios = [1.0] * L if shift is None else [1.0] * 8 + [round(shift, 2)] * 24
    return {
        "arch": "llava-next-7b", "variant": variant, "method": "baseline" if shift is None else "pmod",
        "shift": shift, "schedule": None if shift is None else "cosine", "ratios": ratios,
        "image_size": [672, 672], "batch_size": 1, "vision_tokens": 2880, "text_tokens": 64, "gen_tokens": 16,
        "prefill_tflops": tflops, "prefill_tflops_causal": tflops * 0.9, "decode_tflops_per_token": 0.014,
        "vision_tflops": 1.2, "tflops_ratio": tflops / base_tflops, "kv_cache_bytes": int(1.6e9 * kv),
        "kv_cache_ratio": kv, "kv_cache_ratio_all_tokens": kv + 0.01, "prefill_latency_ms": lat,
        "decode_latency_ms_per_token": 25.0, "latency_ratio": lat / base_lat, "peak_memory_bytes": 15_000_000_000,
        "device": "NVIDIA H100 80GB HBM3", "train_tflops_per_sample": 3 * tflops, "train_gpu_hours": gpu_h,
    }


def make_profile_run(run_dir: Path) -> Path:
    rows = [
        _profile_row("baseline", None, 40.0, 1.0, 500.0, 550.0),
        _profile_row("p-MoD-0.3", 0.3, 18.0, 0.43, 330.0, 400.0),
        _profile_row("p-MoD-0.4", 0.4, 20.0, 0.48, 350.0, 410.0),
        _profile_row("p-MoD-0.5", 0.5, 22.0, 0.54, 370.0, 430.0),
    ]
    # a second scenario of the same configuration: the batch-size-1 row must win
    rows.append({**_profile_row("p-MoD-0.5", 0.5, 99.0, 0.99, 999.0, 999.0), "batch_size": 8})
    _run_json(run_dir, "profile")
    _write_json(run_dir / "profile.json", {"rows": rows})
    with open(run_dir / "profile.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    return run_dir


def _pmod(shift: float = 0.5, **kw) -> dict:
    d = {"schedule": "cosine", "shift": shift, "max_ratio": 0.85, "min_ratio": 0.15, "steps": 4, "ratios": None,
         "weight_norm": "tanh", "norm_scale": 0.2, "norm_bias": 1.0, "string": True, "router_bias": True,
         "router_zero_init": True, "overflow_guard": False}
    d.update(kw)
    return d


def make_eval_run(run_dir: Path, model: str, pmod: dict | None, scores: dict, label: str | None = None) -> Path:
    _run_json(run_dir, "eval", label)
    rows = [{"benchmark": b, "task": f"task_{b.lower()}", "metric": "exact_match,none", "value": v, "n": 100}
            for b, v in scores.items()]
    _write_json(run_dir / "summary.json", {"model": model, "pmod": pmod, "rows": rows})
    with open(run_dir / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["benchmark", "task", "metric", "value", "n"])
        w.writeheader()
        w.writerows(rows)
    (run_dir / "lmms_eval").mkdir(exist_ok=True)
    return run_dir


def add_introspection(run_dir: Path, rows: int = 6, cols: int = 8, num_layers: int = 8) -> None:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (cols * 14, rows * 14), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([10, 10, 60, 50], fill="#3a7")
    d.text((70, 20), "p-MoD", fill="black")
    img.save(run_dir / "input.png")
    V = rows * cols + 3  # three tokens beyond the grid (newline tokens) are not drawn in Fig. 5
    ratios = [1.0, 1.0, 0.8, 0.7, 0.5, 0.4, 0.3, 0.2][:num_layers]
    layers = {str(i): list(range(i, V, max(1, round(1 / r))))[: int(V * r)] for i, r in enumerate(ratios) if r < 1.0}
    _write_json(run_dir / "introspection.json", {"image": "input.png", "grid": [rows, cols], "num_layers": num_layers,
                                                 "vision_tokens": V, "layers": layers, "ratios": ratios})


PAPER7 = {"Doc": 70.0, "Chart": 61.8, "Text": 60.5, "GQA": 63.3, "SEED": 69.0, "MMB": 67.3}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {"profile": make_profile_run(root / "profile-next")}
    out["base"] = make_eval_run(root / "eval-base", "llava-hf/llava-v1.6-vicuna-7b-hf", None,
                                {"Doc": 70.5, "Chart": 61.0, "Text": 62.7, "GQA": 63.9, "SEED": 68.5, "MMB": 67.0,
                                 "MME": 1510.0, "POPE": 87.0})
    out["pmod05"] = make_eval_run(root / "eval-pmod05", "MCG-NJU/p-MoD-LLaVA-NeXT-7B", _pmod(0.5),
                                  {**{k: v - 0.5 for k, v in PAPER7.items()}, "MME": 1490.0})
    out["pmod04"] = make_eval_run(root / "eval-pmod04", "llava-next-7b", _pmod(0.4),
                                  {"Doc": 66.0, "Chart": 59.0, "Text": 58.0, "GQA": 63.5, "SEED": 68.0, "MMB": 66.0})
    out["pmod03"] = make_eval_run(root / "eval-pmod03", "llava-next-7b", _pmod(0.3), {"Doc": 65.0, "GQA": 63.0})
    out["vanilla"] = make_eval_run(root / "eval-vanilla", "llava-next-7b", _pmod(0.5, schedule="constant", string=False),
                                   {"Doc": 60.0})
    out["grounding"] = make_eval_run(root / "eval-13b", "llava-next-13b", None, {"Doc": 73.0, "GQA": 65.0},
                                     label="notes: first 13B try")
    for group, r, doc in (("base", 0.7, 66.0), ("deep", 0.5, 65.5), ("deep", 0.3, 64.0), ("middle", 0.5, 63.0),
                          ("shallow", 0.5, 60.0), ("shallow", 0.3, 52.0)):
        d = make_eval_run(root / f"eval-fig3-{group}-{r}", "tiny", _pmod(0.7, schedule="constant"),
                          {"Doc": doc, "GQA": doc - 2.0}, label=f"fig3:{group}:{r}")
        out[f"fig3-{group}-{r}"] = d
    add_introspection(out["pmod05"])
    return out


# ----------------------------------------------------------------------------- the paper's data
def test_paper_tables_complete_and_consistent():
    tables = load_paper_tables()
    assert [t.number for t in tables] == list(range(1, 13))
    for t in tables:
        assert t.columns[0].kind == "label"
        assert {c.header_source for c in t.columns} <= {"paper", "restored", "inferred", "unknown"}
        assert t.source_text == f"{PAPER_CITATION}, Table {t.number}"  # the paper, not files the repo lacks
        keys = [r.key for r in t.rows if r.key]
        assert len(keys) == len(set(keys)), f"{t.id}: two rows report the same configuration"
        for r in t.rows:
            assert set(r.cells) <= {c.key for c in t.columns}
            if r.model:
                assert r.model in PAPER_MODELS
    assert [c.kind for c in paper_table(8).columns].count("unknown") == 1
    assert [c.kind for c in paper_table(10).columns].count("unknown") == 1
    assert paper_table(1).column("Doc").header_source == "inferred"
    assert paper_table(11).rows[1].cells["KV cache"] == "> 60%"
    assert paper_table(6).rows[0].cells["Doc"] == "OVERFLOW"


def test_table2_llava_row_example():
    row = paper_table(2).rows[0]
    avg = paper_average(row.cells, paper_table(2).avg_over)
    assert avg == pytest.approx((69.7 + 64.1 + 36.6 + 76.6 + 1506.8 / 20) / 5)
    assert round(avg, 1) == 64.5 == row.cells["AVG"]


def test_printed_averages_recompute():
    """Every printed AVG recomputes within 0.05 by the paper's convention, except the rows the data
    file marks (Table 5, LLaVolta: 62.075 printed as 62.0). Tables 8-10 and 12 print no AVG."""
    checked, mismatched = 0, []
    for t in load_paper_tables():
        if not t.avg_over:
            assert t.number in (8, 9, 10, 12)
            continue
        for r in t.rows:
            printed, recomputed = as_number(r.cells.get("AVG")), paper_average(r.cells, t.avg_over)
            if printed is None:  # Table 6's OVERFLOW rows
                assert recomputed is None and t.number == 6
                continue
            if r.avg_recomputes:
                assert abs(recomputed - printed) <= AVG_TOLERANCE + 1e-9, (t.id, r.label, recomputed, printed)
                checked += 1
            else:
                assert abs(recomputed - printed) > AVG_TOLERANCE, f"{t.id} {r.label} is marked but recomputes"
                mismatched.append((t.number, r.label))
    assert checked == 31 and mismatched == [(5, "+ LLaVolta")]


def test_average_needs_every_cell():
    assert paper_average({"Doc": 70.0}, ["Doc", "GQA"]) is None
    assert paper_average({"Doc": 70.0, "GQA": "OVERFLOW"}, ["Doc", "GQA"]) is None
    assert paper_average({"MME": 2000.0, "Doc": 50.0}, ["MME", "Doc"]) == 75.0


# ----------------------------------------------------------------------------- matching
def test_model_and_variant_names():
    assert canonical_model("llava-hf/llava-v1.6-vicuna-7b-hf") == "llava-next-7b"
    assert canonical_model("liuhaotian/llava-v1.5-7b") == "llava-v1.5-7b"
    assert canonical_model("llava-hf/llava-v1.6-vicuna-13b-hf") == "llava-next-13b"
    assert canonical_model("llava-1.5-7b") == "llava-v1.5-7b"  # the model presets' spelling
    assert canonical_model("llava-v1.5-13b") is None and canonical_model("tiny") is None
    assert canonical_variant("p-MoD-cosine-0.4") == "p-MoD-0.4"
    assert canonical_variant("+ FastV") == "FastV"
    assert canonical_variant("γ-MoD") == "gamma-MoD"
    assert canonical_variant("p-MoD-linear-0.57") == "p-MoD-linear"
    assert canonical_variant("ratios:1.0,0.5") is None
    assert parse_label("llava-v1.5-7b/p-MoD").variant == "p-MoD-0.5"
    assert parse_label("fig3:deep:40").retention == pytest.approx(0.4)
    assert parse_label("fig3:sideways:0.4") is None
    assert parse_label("a free-text note") is None


def test_variant_from_pmod_config():
    assert variant_from_pmod(None)[0] == "baseline"
    assert variant_from_pmod(_pmod(0.3))[0] == "p-MoD-0.3"
    assert variant_from_pmod(_pmod(0.57, schedule="linear"))[0] == "p-MoD-linear"
    assert variant_from_pmod(_pmod(0.5, weight_norm="softmax", norm_scale=1.0))[0] == "p-MoD-softmax"
    assert variant_from_pmod(_pmod(0.5, norm_scale=1.0))[0] == "p-MoD-tanh-1"
    assert variant_from_pmod(_pmod(0.5, weight_norm="shifted_softmax", norm_scale=0.4, norm_bias=0.8))[0] == "p-MoD-shifted-softmax"
    assert variant_from_pmod(_pmod(0.5, weight_norm="none", norm_scale=1.0))[0] == "p-MoD-norm-none"
    # Table 3 (no STRing, constant ratio as the t3-* recipes) and Table 4's constant row, from the data alone
    assert variant_from_pmod(_pmod(0.54, schedule="constant", weight_norm="none", norm_scale=1.0, string=False))[0] == "vanilla-MoD"
    assert variant_from_pmod(_pmod(0.54, schedule="constant", string=False))[0] == "MoD+TanhNorm"
    assert variant_from_pmod(_pmod(0.54, schedule="constant"))[0] == "p-MoD-constant"
    # a configuration no paper row reports keeps a key of its own, its spec: different configs never share a row
    assert variant_from_pmod(_pmod(0.5, ratios=[1.0, 0.5]))[0] == "ratios:1,0.5"
    assert variant_from_pmod(_pmod(0.5, ratios=[1.0, 0.25]))[0] == "ratios:1,0.25"
    assert variant_from_pmod(_pmod(0.5, weight_norm="none", norm_scale=1.0, string=False))[0] == "pmod:weight_norm=none,string=false"
    assert variant_from_pmod(_pmod(0.5, max_ratio=0.9))[0] == "p-MoD-0.5-max0.9"  # not PRD's clamps: not p-MoD-0.5
    assert variant_from_pmod(_pmod(0.5, weight_norm="shifted_softmax", norm_scale=0.4))[0] != "p-MoD-shifted-softmax"
    # training details of the same model do not decide the row; keys a newer writer adds are ignored
    assert variant_from_pmod(_pmod(0.5, router_zero_init=False, overflow_guard=True, future_key=1))[0] == "p-MoD-0.5"


def test_variant_from_real_pmod_config():
    config = pytest.importorskip("pmod_bench.model.config")
    cfg = config.PMoDConfig(shift=0.4)
    assert variant_from_pmod(cfg.to_dict())[0] == "p-MoD-0.4" == cfg.name
    assert variant_from_pmod(config.PMoDConfig(weight_norm="softmax").to_dict())[0] == "p-MoD-softmax"


def test_match_runs(runs):
    loaded = [load_run(p) for p in runs.values()]
    rep = match_runs(loaded, labels={str(runs["vanilla"]): "vanilla-MoD"})
    assert rep.get("llava-next-7b/p-MoD-0.5", "Doc") == pytest.approx(69.5)
    assert rep.get("llava-next-7b/p-MoD-0.5", "prefill_tflops") == 22.0  # batch-size-1 scenario
    assert rep.get("llava-next-7b/p-MoD-0.5", "kv_cache_pct") == pytest.approx(54.0)
    assert rep.get("llava-next-7b/baseline", "MME") == 1510.0
    assert rep.get("llava-next-7b/vanilla-MoD", "Doc") == 60.0
    assert rep.get("llava-next-13b/baseline", "Doc") == 73.0
    assert sorted((p.group, p.retention) for p in rep.exploration)[0] == ("base", 0.7)
    assert [r.name for r in rep.introspections] == ["eval-pmod05"]
    assert any("free text" in n for n in rep.notes)  # eval-13b's label is a note, not a label
    with pytest.raises(LabelError, match="cannot read label"):
        match_runs(loaded, labels={str(runs["vanilla"]): "something else"})
    with pytest.raises(LabelError, match="MODEL only"):
        match_runs(loaded, labels={str(runs["profile"]): "p-MoD-0.5"})
    with pytest.raises(LabelError, match="not one of the run directories"):
        match_runs(loaded, labels={"runs/nowhere": "p-MoD-0.5"})


def _profile_run_of(run_dir: Path, rows: list) -> Path:
    _run_json(run_dir, "profile")
    _write_json(run_dir / "profile.json", {"rows": rows})
    return run_dir


def test_profile_rows_match_on_their_config_not_their_name(tmp_path):
    """Vanilla MoD and p-MoD do the same work: two rows identical but for weight_norm / STRing (and with the same
    display name) land in different report rows, because rows are matched on their ``pmod`` data."""
    row = _profile_row("same-name", 0.54, 21.0, 0.54, 360.0, 420.0)
    constant = _pmod(0.54, schedule="constant")
    vanilla = _pmod(0.54, schedule="constant", weight_norm="none", norm_scale=1.0, string=False)
    prd, prd_vanilla = _pmod(0.5), _pmod(0.5, weight_norm="none", norm_scale=1.0, string=False)
    rows = [{**row, "pmod": constant}, {**row, "pmod": vanilla, "prefill_tflops": 21.5},
            {**row, "pmod": prd, "prefill_tflops": 22.0}, {**row, "pmod": prd_vanilla, "prefill_tflops": 22.5},
            {**_profile_row("baseline", None, 40.0, 1.0, 500.0, 550.0), "pmod": None}]
    rep = match_runs([load_run(_profile_run_of(tmp_path / "prof", rows))])
    assert rep.get("llava-next-7b/p-MoD-constant", "prefill_tflops") == 21.0  # Table 4, constant
    assert rep.get("llava-next-7b/vanilla-MoD", "prefill_tflops") == 21.5  # Table 3, row 1
    assert rep.get("llava-next-7b/p-MoD-0.5", "prefill_tflops") == 22.0
    assert rep.get("llava-next-7b/pmod:weight_norm=none,string=false", "prefill_tflops") == 22.5  # no paper row
    assert rep.get("llava-next-7b/baseline", "prefill_tflops") == 40.0
    assert not any("repeat a configuration" in n for n in rep.notes)
    # a row's pmod must be a p-MoD config: the reader names the row and the fix
    bad = _profile_run_of(tmp_path / "bad", [{**row, "pmod": {"shift": 7}}])
    with pytest.raises(RunDirError, match=r"rows\[0\] 'pmod' is not a p-MoD config .*shift.*PMoDConfig.to_dict\(\)"):
        load_run(bad)


def test_rows_without_pmod_data_are_read_by_name(runs, tmp_path):
    """Rows written before rows carried ``pmod``: the name, read by the model's one parser, then matched as data."""
    rows = [_profile_row("p-MoD-cosine-0.4", 0.4, 20.0, 0.48, 350.0, 410.0),
            _profile_row("p-MoD-linear-0.57", 0.57, 21.0, 0.5, 355.0, 415.0),
            {**_profile_row("ratios:1*8,0.5*24", 0.5, 23.0, 0.6, 380.0, 440.0), "schedule": "explicit", "shift": None},
            {**_profile_row("my label", 0.3, 18.0, 0.43, 330.0, 400.0)}]  # a labelled variant: its schedule and shift
    rep = match_runs([load_run(_profile_run_of(tmp_path / "legacy", rows))])
    assert rep.get("llava-next-7b/p-MoD-0.4", "prefill_tflops") == 20.0
    assert rep.get("llava-next-7b/p-MoD-linear", "prefill_tflops") == 21.0
    assert rep.get("llava-next-7b/ratios:1*8,0.5*24", "prefill_tflops") == 23.0
    assert rep.get("llava-next-7b/p-MoD-0.3", "prefill_tflops") == 18.0
    # the same rows with their data match the same keys
    data_rows = [{**r, "pmod": p} for r, p in zip(rows, (_pmod(0.4), _pmod(0.57, schedule="linear"),
                                                         _pmod(0.5, ratios=[1.0] * 8 + [0.5] * 24), _pmod(0.3)))]
    rep2 = match_runs([load_run(_profile_run_of(tmp_path / "data", data_rows))])
    assert sorted(rep2.keys) == sorted(rep.keys)


def test_unknown_model_gets_its_own_rows(tmp_path):
    """A tiny / random-weight run never fills a paper row unless --default-model asks for it."""
    run = load_run(make_eval_run(tmp_path / "tiny-eval", "tiny", _pmod(0.5), {"Doc": 1.0}))
    rep = match_runs([run])
    assert rep.get("tiny/p-MoD-0.5", "Doc") == 1.0 and rep.get("llava-next-7b/p-MoD-0.5", "Doc") is None
    assert any("not a paper model" in n for n in rep.notes)
    assert match_runs([run], default_model="llava-v1.5-7b").get("llava-v1.5-7b/p-MoD-0.5", "Doc") == 1.0
    # an eval of the random-weight llava-next-7b preset (model_info.random_weights) is not the paper's model
    preset = make_eval_run(tmp_path / "preset-eval", "llava-next-7b", _pmod(0.5), {"Doc": 2.0})
    doc = json.loads((preset / "summary.json").read_text())
    doc["model_info"] = {"class": "PMoDLlavaNextForConditionalGeneration", "num_params": 7_063_000_000, "random_weights": True}
    _write_json(preset / "summary.json", doc)
    rep = match_runs([load_run(preset)])
    assert rep.keys == ["llava-next-7b (random weights)/p-MoD-0.5"]
    # a local checkpoint path of the real architecture is recognised from model_info
    local = make_eval_run(tmp_path / "local-eval", "/ckpt/my-run-3", _pmod(0.5), {"Doc": 3.0})
    doc = json.loads((local / "summary.json").read_text())
    doc["model_info"] = {"class": "PMoDLlavaNextForConditionalGeneration", "num_params": 7_063_000_000}
    _write_json(local / "summary.json", doc)
    assert match_runs([load_run(local)]).get("llava-next-7b/p-MoD-0.5", "Doc") == 3.0
    # the tiny run's own line, labelled with what it is, next to (not inside) the paper's rows
    t7 = build_table(paper_table(7), match_runs([run]))
    measured = [ln for ln in t7.lines if ln.kind == "measured"]
    assert [ln.label for ln in measured] == ["tiny · p-MoD-0.5"]
    assert not [ln for ln in t7.lines if ln.kind in ("reproduced", "diff")]


def test_incomplete_eval_runs_are_warned_about(tmp_path):
    failed = make_eval_run(tmp_path / "failed", "MCG-NJU/p-MoD-LLaVA-NeXT-7B", _pmod(0.5), {})
    doc = json.loads((failed / "summary.json").read_text())
    doc.update(complete=False, suite="table1", failures={"Doc": "DataError: local copy not found"})
    _write_json(failed / "summary.json", doc)
    rep = match_runs([load_run(failed)])
    assert not rep.entries and rep.unmatched and rep.warnings
    assert "incomplete eval run" in rep.warnings[0] and "Doc: DataError" in rep.warnings[0]
    res = build_report([failed], tmp_path / "r", figures=False)
    index = (tmp_path / "r" / "index.md").read_text()
    assert "## Warnings" in index and "incomplete eval run" in index and res.warnings


def test_label_naming_no_paper_row_exits_2(runs, tmp_path):
    out = tmp_path / "r"
    rc, log = _cli(["report", str(runs["base"]), "--label", f"{runs['base']}=llava-next-13b/p-MoD-0.3",
                    "--output", str(out), "--no-figures"])
    assert rc == 2, log
    lines = [ln for ln in log.splitlines() if ln.strip()]
    assert lines[-1].startswith("pmod-bench report: error:") and "llava-next-13b/p-MoD-0.3" in lines[-1]
    assert "which no paper table reports" in lines[-1] and "baseline" in lines[-1]
    assert not out.exists()


def test_train_run_gives_measured_gpu_hours(runs, tmp_path):
    train = tmp_path / "train-sft"
    _run_json(train, "train", label="llava-next-7b/p-MoD-0.5")
    _write_json(train / "train_summary.json", {"recipe": "llava-next-7b-sft", "stage": "sft", "steps": 10,
                                               "final_loss": 1.2, "gpu_hours": 12.5, "tokens_per_s": 1000.0,
                                               "output_dir": "ckpt"})
    (train / "train_log.jsonl").write_text("")
    unlabelled = tmp_path / "train-unlabelled"
    _run_json(unlabelled, "train")
    _write_json(unlabelled / "train_summary.json", {"recipe": "r", "stage": "pt", "steps": 1, "final_loss": 1.0,
                                                    "gpu_hours": 1.0, "tokens_per_s": 1.0, "output_dir": "x"})
    # the train run is given first, yet replaces the profile's estimate (train runs are applied last)
    rep = match_runs([load_run(train), load_run(unlabelled), load_run(runs["profile"])])
    assert rep.get("llava-next-7b/p-MoD-0.5", "train_gpu_hours") == 12.5
    assert any("replaces" in n for n in rep.notes)
    assert [r.name for r, _ in rep.unmatched] == ["train-unlabelled"]


_NO_PMOD = object()
#: train_summary.json model_info of a LLaVA-NeXT-7B run (class + parameter count say the paper model)
NEXT7B_INFO = {"class": "PMoDLlavaNextForConditionalGeneration", "family": "llava_next", "num_params": 7_063_000_000}


def make_train_run(run_dir: Path, gpu_hours: float, label: str | None = None, pmod=_NO_PMOD,
                   model_info: dict | None = NEXT7B_INFO) -> Path:
    """A train run directory as the trainer writes it: ``pmod`` (without overflow_guard) and ``model_info``; pass
    ``pmod=_NO_PMOD`` for a run written before train_summary.json carried pmod."""
    _run_json(run_dir, "train", label=label)
    summary = {"recipe": "pmod-llava-next-7b-sft", "stage": "sft", "steps": 10, "final_loss": 1.2, "gpu_hours": gpu_hours,
               "tokens_per_s": 1000.0, "output_dir": "ckpt", "label": label}
    if pmod is not _NO_PMOD:
        summary["pmod"] = None if pmod is None else {k: v for k, v in pmod.items() if k != "overflow_guard"}
        if model_info is not None:
            summary["model_info"] = model_info
    _write_json(run_dir / "train_summary.json", summary)
    (run_dir / "train_log.jsonl").write_text("")
    return run_dir


def test_train_runs_match_on_their_pmod_data_not_their_label(tmp_path):
    """The trainer's label follows the recipe (a base recipe's label survives include:); the row follows pmod."""
    from pmod_bench.train.config import variant_label

    # labelled p-MoD-0.5 (the included recipe's label), trained at delta 0.4: the p-MoD-0.4 row, with a warning
    misled = make_train_run(tmp_path / "misled", 11.0, "llava-next-7b/p-MoD-0.5", _pmod(0.4))
    # free-text label: the model from model_info, the variant from pmod
    free = make_train_run(tmp_path / "free", 12.0, "second try", _pmod(0.3))
    base = make_train_run(tmp_path / "base", 13.0, "llava-next-7b/p-MoD-0.5", None)  # a vanilla model: baseline
    # no paper row: the configuration's own key (its spec, as the trainer's label writes it)
    cfg = _pmod(0.5, string=False)
    odd = make_train_run(tmp_path / "odd", 14.0, "llava-next-7b/" + variant_label(pmod_config(cfg)), cfg)
    rep = match_runs([load_run(p) for p in (misled, free, base, odd)])
    assert rep.get("llava-next-7b/p-MoD-0.4", "train_gpu_hours") == 11.0
    assert rep.get("llava-next-7b/p-MoD-0.5", "train_gpu_hours") is None
    assert rep.get("llava-next-7b/p-MoD-0.3", "train_gpu_hours") == 12.0
    assert rep.get("llava-next-7b/baseline", "train_gpu_hours") == 13.0
    assert rep.get("llava-next-7b/pmod:string=false", "train_gpu_hours") == 14.0
    warned = [w for w in rep.warnings if "misled" in w]
    assert len(warned) == 1 and "names p-MoD-0.5, but train_summary.json's pmod is p-MoD-0.4" in warned[0]
    assert not any("free" in w or "odd" in w for w in rep.warnings) and not rep.unmatched
    # an explicit --label that contradicts the data is an error; one naming the model only is fine
    with pytest.raises(LabelError, match="names p-MoD-0.3, but train_summary.json's pmod is p-MoD-0.4"):
        match_runs([load_run(misled)], labels={str(misled): "llava-next-7b/p-MoD-0.3"})
    rep = match_runs([load_run(misled)], labels={str(misled): "llava-next-13b"})
    assert rep.get("llava-next-13b/p-MoD-0.4", "train_gpu_hours") == 11.0


def test_train_run_label_may_name_another_row_of_its_configuration(tmp_path):
    """Table 3's + STRing row is Table 4's constant schedule: data says p-MoD-constant, the t3-string label its row."""
    cfg = _pmod(0.5375, schedule="constant")
    t3 = make_train_run(tmp_path / "t3", 9.0, "llava-next-7b/MoD+TanhNorm+STRing", cfg)
    t4 = make_train_run(tmp_path / "t4", 8.0, None, cfg)
    rep = match_runs([load_run(t3), load_run(t4)])
    assert rep.get("llava-next-7b/MoD+TanhNorm+STRing", "train_gpu_hours") == 9.0
    assert rep.get("llava-next-7b/p-MoD-constant", "train_gpu_hours") == 8.0 and not rep.warnings


def test_train_runs_without_pmod_data_fall_back_to_the_label(tmp_path):
    legacy = make_train_run(tmp_path / "legacy", 5.0, "llava-next-7b/p-MoD-0.4")  # no pmod key
    # failed before its model was built: pmod null and no model_info is no data either
    early = make_train_run(tmp_path / "early", 0.1, "llava-next-7b/p-MoD-0.3", None, model_info=None)
    tiny = make_train_run(tmp_path / "tiny", 0.2, "tiny p-MoD demo", _pmod(0.5),
                          model_info={"class": "PMoDLlavaNextForConditionalGeneration", "num_params": 2_000_000})
    rep = match_runs([load_run(p) for p in (legacy, early, tiny)])
    assert rep.get("llava-next-7b/p-MoD-0.4", "train_gpu_hours") == 5.0
    assert rep.get("llava-next-7b/p-MoD-0.3", "train_gpu_hours") == pytest.approx(0.1)
    assert [r.name for r, why in rep.unmatched] == ["tiny"] and "model_info" in rep.unmatched[0][1]
    assert match_runs([load_run(tiny)], default_model="llava-next-7b").get(
        "llava-next-7b/p-MoD-0.5", "train_gpu_hours") == pytest.approx(0.2)
    bad = make_train_run(tmp_path / "bad", 1.0, None, {"shift": 7.0})
    with pytest.raises(RunDirError, match="'pmod' is not a p-MoD config"):
        load_run(bad)


# ----------------------------------------------------------------------------- renderers (golden)
def _small_table():
    cols = (
        PaperColumn("Model", "Model", "label", "restored"),
        PaperColumn("α", "α", "text", "restored"),
        PaperColumn("KV cache", "KV cache", "efficiency", "inferred", metric="kv_cache_pct", unit="%"),
        PaperColumn("Doc", "Doc", "benchmark", "restored", metric="Doc"),
        PaperColumn("MME", "MME", "benchmark", "restored", metric="MME"),
        PaperColumn("AVG", "AVG", "avg", "restored"),
    )
    rows = (
        PaperRow("LLaVA_NeXT & co", {"α": "-", "KV cache": 100.0, "Doc": 70.1, "MME": 1519.3, "AVG": 73.0},
                 model="llava-next-7b", variant="baseline"),
        PaperRow("+ p-MoD", {"α": "0.2", "KV cache": 53.7, "Doc": 70.0, "MME": 1495.5, "AVG": 72.4},
                 model="llava-next-7b", variant="p-MoD-0.5"),
        PaperRow("TanhNorm", {"α": "1", "KV cache": None, "Doc": "OVERFLOW", "MME": None, "AVG": "-"},
                 model="llava-next-7b", variant="p-MoD-tanh-1"),
    )
    table = PaperTable("table99", 99, "A small fixed table (δ = 0.5)", cols, rows,
                       {"paper": "p-MoD"},
                       notes=("A note with 50% and under_score.",), avg_over=("Doc", "MME"))
    rep = Reproduction()
    rep.values["llava-next-7b/baseline"] = {"Doc": (70.44, "runs/a"), "MME": (1500.0, "runs/a"),
                                            "kv_cache_pct": (100.0, "runs/p row 0")}
    rep.values["llava-next-7b/p-MoD-0.5"] = {"Doc": (69.96, "runs/b"), "kv_cache_pct": (53.66, "runs/p row 1")}
    return table, rep


@pytest.mark.parametrize("fmt, render", [("md", render_markdown), ("tex", render_latex), ("csv", render_csv)])
@pytest.mark.parametrize("mode", ["paper", "compare"])
def test_renderers_golden(fmt, render, mode):
    table, rep = _small_table()
    text = render(build_table(table, rep if mode == "compare" else None))
    golden = GOLDEN / f"small_{mode}.{fmt}"
    if os.environ.get("PMOD_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text, encoding="utf-8")
    assert text == golden.read_text(encoding="utf-8"), f"{golden} differs; PMOD_UPDATE_GOLDEN=1 regenerates it"


def test_compare_lines_never_invent():
    table, rep = _small_table()
    t = build_table(table, rep)
    by = {(ln.key, ln.kind): dict(zip([c.key for c in t.columns], ln.values)) for ln in t.lines}
    base = by[("llava-next-7b/baseline", "reproduced")]
    assert base["AVG"] == pytest.approx((70.44 + 1500.0 / 20) / 2)
    assert by[("llava-next-7b/baseline", "diff")]["AVG"] == pytest.approx(base["AVG"] - 73.0)
    assert by[("llava-next-7b/p-MoD-0.5", "reproduced")]["AVG"] is None  # MME missing -> no AVG
    assert by[("llava-next-7b/p-MoD-0.5", "diff")]["MME"] is None
    assert ("llava-next-7b/p-MoD-tanh-1", "reproduced") not in by  # no run: paper line only


def test_table_to_frame_has_the_csv_columns_with_typed_values():
    table, rep = _small_table()
    t = build_table(table, rep)
    df = t.to_frame()
    csv_rows = list(csv.reader(io.StringIO(render_csv(t))))
    assert list(df.columns) == csv_rows[0] and len(df) == len(csv_rows) - 1
    assert list(df["line"]) == [row[2] for row in csv_rows[1:]] and list(df["key"]) == [row[1] for row in csv_rows[1:]]
    assert set(df.loc[df["key"] == "llava-next-7b/baseline", "Model"]) == {"LLaVA_NeXT & co"}  # label on every line
    base = df[(df["key"] == "llava-next-7b/baseline") & (df["line"] == "reproduced")].iloc[0]
    assert base["Doc"] == 70.44 and base["AVG"] == pytest.approx((70.44 + 1500.0 / 20) / 2)  # unrounded
    assert all(df[c].dtype == float for c in ("KV cache", "Doc", "MME", "AVG"))
    tanh = df[df["key"] == "llava-next-7b/p-MoD-tanh-1"].iloc[0]
    assert tanh["α"] == "1" and tanh[["KV cache", "Doc", "AVG"]].isna().all()  # None, 'OVERFLOW', '-': NaN
    assert df.loc[df["line"] == "reproduced", "α"].isna().all()  # text columns do not apply to reproduced lines


# ----------------------------------------------------------------------------- figures data
def test_fig4_schedules_share_mean_retention():
    from pmod_bench.reports.figures import retention_schedules_data

    s = retention_schedules_data(32)
    assert list(s) == ["constant", "interleaved", "stepped", "linear", "cosine"]
    target = sum(s["cosine"]) / 32
    assert target == pytest.approx(0.5375, abs=1e-3)
    for name, ratios in s.items():
        assert len(ratios) == 32 and all(0 < r <= 1 for r in ratios)
        assert sum(ratios) / 32 == pytest.approx(target, abs=0.01), name


def test_selection_matrix_codes():
    from pmod_bench.reports.figures import selection_matrix

    m = selection_matrix({"num_layers": 3, "vision_tokens": 4, "layers": {"2": [1, 3]}, "ratios": [1.0, 0.5, 0.5]})
    assert m.tolist() == [[2, 2, 2, 2], [3, 3, 3, 3], [0, 1, 0, 1]]


# ----------------------------------------------------------------------------- end to end
def _valid_image(path: Path) -> None:
    from PIL import Image

    assert path.stat().st_size > 0
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 300 and im.size[1] > 100


def _csv_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


@pytest.mark.slow
@pytest.mark.filterwarnings("error::UserWarning")  # e.g. matplotlib's legend / layout warnings
def test_report_end_to_end(runs, tmp_path):
    from pmod_bench.reports.cli import main

    out = tmp_path / "report"
    argv = [str(p) for p in runs.values()] + ["--label", f"{runs['vanilla']}=vanilla-MoD", "--output", str(out)]
    assert main(argv) == 0
    for n in range(1, 13):
        for ext in ("md", "tex", "csv"):
            assert (out / "tables" / f"table{n}.{ext}").is_file()
    stems = ["tradeoff", "fig4_retention_schedules", "fig3_exploration", "fig5_token_selection_eval-pmod05",
             "fig6_selection_map_eval-pmod05"]
    index = (out / "index.md").read_text()
    for stem in stems:
        _valid_image(out / "figures" / f"{stem}.png")
        assert (out / "figures" / f"{stem}.pdf").read_bytes().startswith(b"%PDF")
    for f in out.rglob("*"):
        if f.is_file() and f.name not in ("index.md", "report.json"):
            assert str(f.relative_to(out)) in index, f"index.md does not link {f}"
    assert not list(tmp_path.glob(".report.staging-*"))

    # Table 7: reproduced values beside the paper's, differences, AVG only for complete rows
    t7 = {(r["key"], r["line"]): r for r in _csv_rows(out / "tables" / "table7.csv")}
    r05, d05 = t7[("llava-next-7b/p-MoD-0.5", "reproduced")], t7[("llava-next-7b/p-MoD-0.5", "diff")]
    assert float(r05["Doc"]) == pytest.approx(69.5) and float(d05["Doc"]) == pytest.approx(-0.5)
    assert float(r05["AVG"]) == pytest.approx(sum(PAPER7.values()) / 6 - 0.5, abs=1e-4)
    assert float(r05["TFLOPs"]) == 22.0 and float(r05["KV cache"]) == pytest.approx(54.0)
    assert float(r05["Training GPU hours"]) == 430.0 and float(r05["Latency (ms)"]) == 370.0
    assert t7[("llava-next-7b/p-MoD-0.5", "paper")]["Doc"] == "70.0"
    r03 = t7[("llava-next-7b/p-MoD-0.3", "reproduced")]
    assert r03["Doc"] == "65.0" and r03["Chart"] == "" and r03["AVG"] == ""
    md7 = (out / "tables" / "table7.md").read_text()
    assert "|  | reproduced | 430 | 22.00 | 370.0 | 54.0% | 69.5 | 61.3 |" in md7
    assert "|  | Δ | -5 | +0.06 | +2.0 | +0.3 | -0.5 | -0.5 |" in md7
    assert "|  | reproduced | 400 | 18.00 | 330.0 | 43.0% | 65.0 | – | – | 63.0 | – | – | – |" in md7
    # Table 9 (RefCOCO): no run measured it, so no reproduced line although the configurations matched
    assert "reproduced" not in (out / "tables" / "table9.csv").read_text()
    # the same configuration fills other tables; the explicit label fills Table 3
    assert ("llava-next-7b/p-MoD-0.5", "reproduced") in {(r["key"], r["line"]) for r in _csv_rows(out / "tables" / "table4.csv")}
    t3 = {(r["key"], r["line"]): r for r in _csv_rows(out / "tables" / "table3.csv")}
    assert t3[("llava-next-7b/vanilla-MoD", "reproduced")]["Doc"] == "60.0"
    t2 = {(r["key"], r["line"]): r for r in _csv_rows(out / "tables" / "table2.csv")}
    assert t2[("llava-next-7b/baseline", "reproduced")]["MME"] == "1510.0"
    t8 = {(r["key"], r["line"]): r for r in _csv_rows(out / "tables" / "table8.csv")}
    assert t8[("llava-next-13b/baseline", "reproduced")]["(unknown)"] == ""
    assert "\\toprule" in (out / "tables" / "table7.tex").read_text()
    summary = json.loads((out / "report.json").read_text())
    assert "llava-next-7b/p-MoD-0.5" in summary["tables"]["table7"]["reproduced_rows"]


def _cli(argv: list[str]) -> tuple[int, str]:
    """Run the project's CLI in a subprocess (the real entry point, as a user would)."""
    code = "import sys; from pmod_bench.cli import main; sys.exit(main(sys.argv[1:]))"
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout + p.stderr


@pytest.mark.slow
def test_report_paper_through_real_cli(tmp_path):
    pytest.importorskip("pmod_bench.cli", reason="pmod_bench/cli.py (the project's CLI) is not there yet")
    out = tmp_path / "paper"
    rc, log = _cli(["report", "--paper", "--output", str(out)])
    assert rc == 0, log
    for n in range(1, 13):
        for ext in ("md", "tex", "csv"):
            assert (out / "tables" / f"table{n}.{ext}").stat().st_size > 0
    for stem in ("tradeoff", "fig4_retention_schedules"):
        _valid_image(out / "figures" / f"{stem}.png")
        assert (out / "figures" / f"{stem}.pdf").stat().st_size > 0
    md = (out / "tables" / "table2.md").read_text()
    assert "| LLaVA-v1.5 | 69.7 | 64.1 | 36.6 | 76.6 | 1506.8 | 64.5 |" in md
    assert "reproduced" not in md
    assert "tables/table12.tex" in (out / "index.md").read_text()


def test_report_paper_stand_alone_entry(tmp_path):
    from pmod_bench.reports.cli import main

    out = tmp_path / "paper"
    assert main(["--paper", "--no-figures", "--output", str(out)]) == 0
    assert (out / "tables" / "table11.tex").is_file() and not (out / "figures").exists()


def test_import_stays_light():
    code = "import sys, pmod_bench.reports; bad = [m for m in ('matplotlib', 'pandas', 'torch') if m in sys.modules]; print(bad)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- bad input
def _bad_runs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    cases = {}
    d = tmp_path / "no-run-json"
    d.mkdir()
    cases["no run.json"] = (d, "run.json: not found")
    d = make_eval_run(tmp_path / "bad-kind", "llava-next-7b", None, {"Doc": 1.0})
    _write_json(d / "run.json", {"kind": "benchmark", "schema_version": 1})
    cases["unknown kind"] = (d, "unknown kind 'benchmark'")
    d = make_eval_run(tmp_path / "new-schema", "llava-next-7b", None, {"Doc": 1.0})
    _write_json(d / "run.json", {"kind": "eval", "schema_version": 2})
    cases["schema_version"] = (d, "schema_version 2 is not supported")
    d = make_eval_run(tmp_path / "broken-json", "llava-next-7b", None, {"Doc": 1.0})
    (d / "summary.json").write_text('{"model": "x", "rows": [')
    cases["malformed"] = (d, "summary.json: malformed JSON")
    d = make_profile_run(tmp_path / "missing-key")
    doc = json.loads((d / "profile.json").read_text())
    del doc["rows"][1]["kv_cache_ratio"]
    _write_json(d / "profile.json", doc)
    cases["missing key"] = (d, "rows[1] has no 'kv_cache_ratio' key")
    return cases


def test_bad_runs_fail_cleanly(runs, tmp_path, capsys):
    from pmod_bench.reports.cli import main

    out = tmp_path / "report"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier file")
    for name, (bad, message) in _bad_runs(tmp_path).items():
        with pytest.raises(RunDirError, match=re.escape(message)):
            load_run(bad)
        rc = main([str(runs["base"]), str(bad), "--output", str(out)])
        err = capsys.readouterr().err
        assert rc == 2, name
        assert message in err and str(bad) in err, (name, err)
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"], f"{name}: something was written"
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]


def test_bad_arguments(runs, tmp_path):
    with pytest.raises(ReportError, match="drop --paper"):
        build_report([runs["base"]], tmp_path / "r", paper=True)
    with pytest.raises(ReportError, match="or --paper"):
        build_report([], tmp_path / "r")
    from pmod_bench.reports.cli import main

    assert main([str(runs["base"]), "--label", "no-equals-sign", "--output", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- LaTeX, citations, figures
def _compile_tex(tex_files: list[Path], workdir: Path) -> None:
    """pdflatex every table file in a minimal document (booktabs + graphicx, utf8)."""
    for tex in tex_files:
        doc = workdir / f"doc_{tex.stem}.tex"
        doc.write_text("\\documentclass{article}\n\\usepackage[utf8]{inputenc}\n\\usepackage[T1]{fontenc}\n"
                       "\\usepackage{booktabs}\n\\usepackage{graphicx}\n\\begin{document}\n"
                       f"\\input{{{tex.resolve()}}}\n\\end{{document}}\n")
        p = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=workdir,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, f"{tex.name} does not compile:\n{p.stdout[-2000:]}"


@pytest.mark.slow
@pytest.mark.skipif(__import__("shutil").which("pdflatex") is None,
                    reason="no LaTeX engine (apt-get install texlive-latex-base texlive-latex-recommended)")
def test_every_generated_tex_compiles(runs, tmp_path):
    out = tmp_path / "report"
    argv = [str(p) for p in runs.values()] + ["--label", f"{runs['vanilla']}=vanilla-MoD"]
    build_report(argv[:-2], out, labels={str(runs["vanilla"]): "vanilla-MoD"}, figures=False)
    build_report([], tmp_path / "paper", paper=True, figures=False)
    table, rep = _small_table()
    small = tmp_path / "small.tex"
    small.write_text(render_latex(build_table(table, rep)))
    files = sorted((out / "tables").glob("*.tex")) + sorted((tmp_path / "paper" / "tables").glob("*.tex")) + [small]
    assert len(files) == 25
    _compile_tex(files, tmp_path)


def test_reports_cite_the_paper_not_missing_files(runs, tmp_path):
    out = tmp_path / "report"
    build_report([runs["base"], runs["profile"]], out, figures=False)
    build_report([], tmp_path / "paper", paper=True, figures=False)
    for f in [*out.rglob("*.*"), *(tmp_path / "paper").rglob("*.*")]:
        text = f.read_text(encoding="utf-8")
        for bad in ("TABLES.md", "p-MoD-paper.txt", "dagger", "†", "inferred"):
            assert bad not in text, f"{f.name} mentions {bad!r}"
    t7 = (out / "tables" / "table7.md").read_text()
    assert "prefill_tflops_paper (the paper's counting convention" in t7
    assert "Table 7" in t7 and "Progressive Ratio Decay" in t7
    tex = (out / "tables" / "table1.tex").read_text()
    assert "100.0\\%" in tex and not re.search(r"[^.\d]100\\%", tex)  # one precision per column


def test_profile_rows_prefer_the_paper_scenario(tmp_path):
    d = make_profile_run(tmp_path / "prof")
    doc = json.loads((d / "profile.json").read_text())
    off = {**doc["rows"][3], "image_size": [640, 480], "prefill_tflops_paper": 15.0, "paper_scenario": False}
    doc["rows"] = [off] + [{**r, "paper_scenario": True} for r in doc["rows"]]
    _write_json(d / "profile.json", doc)
    rep = match_runs([load_run(d)])
    assert rep.get("llava-next-7b/p-MoD-0.5", "prefill_tflops") == 22.0  # the 672x672 row, not the 640x480 one


def test_tradeoff_skips_unreliable_latency(runs, tmp_path):
    from pmod_bench.reports.figures import tradeoff_data

    d = make_profile_run(tmp_path / "prof")
    doc = json.loads((d / "profile.json").read_text())
    for r in doc["rows"]:
        r.update(arch="tiny", latency_unreliable=r["variant"] == "p-MoD-0.5", latency_ratio_min=0.2, latency_ratio_max=3.0)
    _write_json(d / "profile.json", doc)
    ev = make_eval_run(tmp_path / "ev", "tiny", _pmod(0.5), dict(PAPER7))
    ev0 = make_eval_run(tmp_path / "ev0", "tiny", None, dict(PAPER7))
    data = tradeoff_data(match_runs([load_run(d), load_run(ev), load_run(ev0)]))
    assert data.reproduced_model == "tiny"
    by = {p.key: p for p in data.reproduced}
    assert by["tiny/p-MoD-0.5"].latency_pct is None and by["tiny/baseline"].latency_pct is not None
    assert any("latency not drawn" in n and "20-300%" in n for n in data.notes)


def test_fig5_and_fig6_say_what_they_show(tmp_path, monkeypatch):
    from pmod_bench.reports import figures as F

    d = tmp_path / "intro"
    d.mkdir()
    add_introspection(d)
    intro = json.loads((d / "introspection.json").read_text())
    assert F.token_segments(intro) == [("base tile", 0, 48), ("high-resolution tiles (+ row newlines)", 48, 51)]
    texts: list[str] = []
    from matplotlib.figure import Figure

    real_save = F._save

    def capture(fig: Figure, stem: Path):
        texts.extend(t.get_text() for t in fig.findobj(lambda o: hasattr(o, "get_text")) if t.get_text())
        return real_save(fig, stem)

    monkeypatch.setattr(F, "_save", capture)
    F.plot_token_selection(intro, d / "input.png", tmp_path / "fig5")
    assert any("base-tile tokens kept" in t for t in texts)
    assert "kept (processed by the layer)" in texts and "skipped (shaded)" in texts  # the colour key
    assert any(t.startswith("Base tile only") for t in texts)
    texts.clear()
    F.plot_selection_map(intro, tmp_path / "fig6")
    assert "base tile" in texts and "high-resolution tiles (+ row newlines)" in texts
