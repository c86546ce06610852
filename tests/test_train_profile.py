"""`pmod-bench profile --train-run`: a train run's measured throughput fills only the row of the architecture
and variant it trained, and the table says so (a tiny CPU demo run is not priced as the 7B recipe)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A train run directory (plain JSON, as `pmod-bench train` writes it) of the tiny preset with p-MoD-0.5."""
    from pmod_bench.model.config import PMoDConfig
    from pmod_bench.model.presets import build_preset
    from pmod_bench.train.trainer import model_info

    model, _ = build_preset("tiny", pmod=PMoDConfig())
    run = tmp_path_factory.mktemp("runs") / "train-tiny"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"kind": "train", "schema_version": 1, "command": "pmod-bench train --demo"}))
    (run / "train_summary.json").write_text(json.dumps({
        "recipe": "demo-tiny", "stage": "sft", "status": "completed", "steps": 30, "tokens_per_s": 4000.0,
        "gpu_hours": 0.01, "world_size": 1, "model_info": model_info(model, "cpu")}))
    return run


def test_a_run_of_another_architecture_is_not_priced_as_the_7b_row(tiny_run):
    from pmod_bench.profiler.core import profile
    from pmod_bench.profiler.render import format_table

    rows = profile("llava-next-7b", ["baseline", "p-MoD-0.5"], latency=False, verify=False, train_run=str(tiny_run))
    for r in rows:
        assert r.train_run_match is False and r.train_gpu_hours_measured is None and r.train_mfu_measured is None
        assert "another architecture (8 layers, hidden 64" in r.train_run_note and "llava-next-7b" in r.train_run_note
        assert r.train_gpu_hours is not None  # the calibrated estimate stays
    text = format_table([r.to_dict() for r in rows])
    assert "train run:" in text and "not used: the run trained another architecture" in text


def test_the_matching_row_gets_the_measured_throughput(tiny_run):
    from pmod_bench.profiler.core import profile
    from pmod_bench.profiler.render import format_table

    rows = profile("tiny", ["baseline", "p-MoD-0.5"], latency=False, verify=False, recipe="llava-next-sft",
                   train_run=str(tiny_run))
    by = {r.variant: r for r in rows}
    p = by["p-MoD-0.5"]
    assert p.train_run_match is True and p.train_gpu_hours_measured > 0 and "measured:" in p.train_run_note
    assert "(cpu x 1)" in p.train_run_note
    b = by["baseline"]
    assert b.train_run_match is False and b.train_gpu_hours_measured is None and "another variant" in b.train_run_note
    text = format_table([r.to_dict() for r in rows])
    assert "measured throughput used for p-MoD-0.5" in text and "other rows:" in text


def test_an_older_run_without_model_info_is_not_matched(tiny_run, tmp_path):
    from pmod_bench.profiler.training import read_train_run, train_run_mismatch
    from pmod_bench.profiler.arch import load_arch

    old = tmp_path / "old"
    old.mkdir()
    (old / "run.json").write_text((tiny_run / "run.json").read_text())
    s = json.loads((tiny_run / "train_summary.json").read_text())
    del s["model_info"]
    (old / "train_summary.json").write_text(json.dumps(s))
    assert "no model_info" in train_run_mismatch(read_train_run(old), load_arch("tiny"))
    assert train_run_mismatch(read_train_run(tiny_run), load_arch("tiny")) is None
