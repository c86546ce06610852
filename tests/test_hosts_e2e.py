"""One workflow per new host through the real CLI, as a user with a GPU runs it on the 7B (README "other hosts"):
``train --demo``, ``eval`` of the trained run directory, ``eval`` of a comparison method at p-MoD-0.5's FLOPs,
``profile`` of the preset (its p-MoD shifts and the solved method), then ``report`` over all four run directories:
the host's efficiency table, methods table and trade-off figure name the host and the runs.

Kept small for the CI: one fixture benchmark (GQA), one document, 3 new tokens, 2 training steps.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

#: preset -> (host family, its report slug, its title in the report)
HOSTS = {
    "tiny-qwen2.5-vl": ("qwen2_5_vl", "qwen2-5-vl", "Qwen2.5-VL"),
    "tiny-llava-onevision": ("llava_onevision", "llava-onevision", "LLaVA-OneVision"),
}
METHOD = "fastv"


def _cli(args: list[str]) -> None:
    """One command through the real CLI, in this process (lmms-eval and torch imported once for the six commands)."""
    from pmod_bench.cli import main

    assert main(args) == 0, args


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _host(run_dir: Path) -> str:
    return json.loads((run_dir / "run.json").read_text())["host"]


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.mark.parametrize("host, joined", [("llava_onevision", True), ("llava_next", False)])
def test_an_eval_of_a_train_run_joins_its_rows(tmp_path, host, joined):
    """``eval --model runs/T`` of a host that is not the paper's is keyed as the train run's model (``T`` given to the
    same report), so its scores sit on the row of T's training cost and its preset's profile rows; a paper host's
    checkpoint keeps the directory's name (paper rows are matched on a label, model_info or --default-model only)."""
    from test_reports import _pmod, make_eval_run, make_train_run

    from pmod_bench.reports.matching import match_runs
    from pmod_bench.reports.runs import load_run

    train = make_train_run(tmp_path / "T", 0.01, pmod=_pmod(0.5), model_info={"class": "PMoDLlavaOnevisionForConditionalGeneration"})
    summary = json.loads((train / "train_summary.json").read_text())
    _write(train / "train_summary.json", {**summary, "model": "tiny-llava-onevision", "host": host})
    ev = make_eval_run(tmp_path / "E", str(train), _pmod(0.5), {"GQA": 40.0})
    _write(ev / "run.json", {**json.loads((ev / "run.json").read_text()), "host": host})
    rep = match_runs([load_run(ev), load_run(train)], default_model=None)
    keys = {e.source: e.key for e in rep.entries}
    assert keys[str(ev)] == ("tiny-llava-onevision/p-MoD-0.5" if joined else "T/p-MoD-0.5")
    assert keys.get(str(train)) == ("tiny-llava-onevision/p-MoD-0.5" if joined else None)  # a paper host needs a label


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(HOSTS))
def test_train_eval_method_profile_report(tmp_path, preset):
    family, slug, title = HOSTS[preset]
    data, train, ev, meth, prof, rep = (tmp_path / d for d in ("data", "T", "E", "M", "P", "R"))
    small = ["--suite", "GQA", "--limit", "1", "--data", str(data), "--gen-kwargs", "max_new_tokens=3"]
    _cli(["data", "fixtures", str(data), "--suite", "GQA"])
    _cli(["train", "--demo", "--model", preset, "train.max_steps=2", "train.progress_bar=false", "-o", str(train)])
    _cli(["eval", "--model", str(train), *small, "--output", str(ev)])
    _cli(["eval", "--model", f"{preset}:vanilla", *small, "--method", METHOD, "--match", "p-MoD-0.5", "--output", str(meth)])
    _cli(["profile", "--arch", preset, "--shift", "0.3", "0.5", "--method", METHOD, "--match", "p-MoD-0.5",
          "--no-latency", "--output", str(prof), "--quiet"])
    _cli(["report", str(prof), str(train), str(ev), str(meth), "--output", str(rep)])

    assert {_host(d) for d in (ev, meth, prof)} == {family}
    assert json.loads((train / "train_summary.json").read_text())["host"] == family
    solved = json.loads((meth / "run.json").read_text())
    eff = _csv(rep / "tables" / f"{slug}-efficiency.csv")
    keys = {r["key"]: r for r in eff}
    assert {f"{preset}/baseline", f"{preset}/p-MoD-0.3", f"{preset}/p-MoD-0.5"} <= set(keys), sorted(keys)
    trained = keys[f"{preset}/p-MoD-0.5"]  # the demo trains the preset's p-MoD-0.5: the eval of its run dir joins it
    assert trained["TFLOPs"] and trained["GQA"] != "" and trained["Training GPU hours"] != ""
    methods = _csv(rep / "tables" / f"{slug}-methods.csv")
    method_rows = [r for r in methods if r["key"].lower() == f"{preset}/{METHOD}"]
    assert method_rows and method_rows[0]["GQA"] != "" and method_rows[0]["TFLOPs"], (methods, solved.get("method"))
    assert any(r["key"] == f"{preset}/p-MoD-0.5" for r in methods)
    index = (rep / "index.md").read_text()
    assert f"{title}: efficiency-performance trade-off across shift factors" in index
    assert f"{title}: comparison with token-compression methods at matched FLOPs" in index
    for d in (prof, train, ev, meth):
        assert f"`{d}`" in index, d
    assert any(p.name.startswith(f"tradeoff_{slug}") and p.suffix == ".png" for p in (rep / "figures").iterdir())
    assert not any(preset in r["key"] for r in _csv(rep / "tables" / "table7.csv"))  # the paper's table stays LLaVA's
