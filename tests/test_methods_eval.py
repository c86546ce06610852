"""`pmod-bench eval --method M --match p-MoD-0.5` (equal compute) and the paper tables' suites.

The budget is solved on the evaluated model's architecture before anything is loaded or written; the
solved config and the match (target, achieved, rel_err) are in run.json and in every summary row.
"""

from __future__ import annotations

import json

import pytest

from pmod_bench.tasks.runner import EvalConfig


def test_suites_are_the_paper_tables_columns():
    from pmod_bench.reports.paper import paper_table
    from pmod_bench.tasks.benchmarks import resolve_suite

    for number in (5, 8, 9, 10):
        cols = [c.metric for c in paper_table(number).value_columns if c.kind == "benchmark"]
        assert [b.key for b in resolve_suite(f"table{number}")] == cols, number


def test_match_solves_on_the_model_architecture(tmp_path):
    from pmod_bench.methods import solve

    cfg = EvalConfig(model="llava-next-7b", suite="table5", output=str(tmp_path / "r"), method="fastv", match="p-MoD-0.5")
    ref = solve("fastv", "llava-next-7b", (672, 672), match="p-MoD-0.5", text_tokens=58)
    assert cfg.method == ref.config.spec() == "fastv:keep=0.518"
    mm = cfg.method_match
    assert mm["target_label"] == "p-MoD-0.5" and mm["rel_err"] <= 0.01 and mm["solved"] == {"k": 2, "keep": 0.518}
    assert mm["image_size"] == [672, 672] and mm["text_tokens"] == 58 and mm["arch"] == "llava-next-7b"
    assert cfg.identity()["method"] == cfg.method and cfg.model_args()["method"] == cfg.method
    # LLaVA-1.5: one tile (336x336 for the 7B; the tiny preset's own tile size)
    one = EvalConfig(model="tiny-llava", suite="POPE", output=str(tmp_path / "s"), method="fastv", match_kv=0.5,
                     match_tolerance=0.1)
    assert one.method_match["image_size"] == [32, 32] and one.method_match["metric"] == "kv"
    other = EvalConfig(model="llava-next-7b", suite="POPE", output=str(tmp_path / "t"), method="visionzip",
                       match="p-MoD-0.5", match_image_size="640x480")
    assert other.method_match["image_size"] == [640, 480] and other.method.startswith("visionzip:")
    tf = EvalConfig(model="llava-next-7b", suite="POPE", output=str(tmp_path / "u"), method="pyramiddrop",
                    match_tflops=21.94, match_convention="paper")
    assert abs(tf.method_match["achieved"] / 21.94e12 - 1) <= 0.01 and tf.method_match["convention"] == "paper"
    # the target as data beside the text typed: PMoDConfig.to_dict(), null for a TFLOPs / KV / baseline target
    from pmod_bench.model.config import PMoDConfig

    assert mm["target_pmod"] == PMoDConfig().to_dict() and other.method_match["target_pmod"] == PMoDConfig().to_dict()
    assert tf.method_match["target_pmod"] is None and one.method_match["target_pmod"] is None
    spelled = solve("fastv", "llava-next-7b", (672, 672), match="pmod:schedule=linear,shift=0.4", text_tokens=58)
    assert spelled.target_label == "pmod:schedule=linear,shift=0.4"
    assert spelled.to_dict()["target_pmod"] == PMoDConfig(schedule="linear", shift=0.4).to_dict()
    assert solve("fastv", "llava-next-7b", (672, 672), match="baseline", text_tokens=58,
                 tolerance=0.2).to_dict()["target_pmod"] is None


@pytest.mark.parametrize("extra, message", [
    (["--match", "p-MoD-0.5"], "add --method NAME"),
    (["--method", "fastv", "--match", "p-MoD-0.5", "--match-kv", "0.5"], "give exactly one of --match"),
    (["--method", "fastervlm", "--match", "p-MoD-0.5"], "cannot match p-MoD-0.5"),
    (["--method", "fastv", "--match", "p-MoD-0.5", "--match-image-size", "big"], "bad image size 'big'"),
    (["--method", "fastv", "--match-kv", "1.5"], "--match-kv must be in (0, 1]"),
    (["--method", "fastv:kep=0.5", "--match", "p-MoD-0.5"], "did you mean 'keep'"),
])
def test_bad_match_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, extra, message):
    from pmod_bench.cli import main

    out = tmp_path / "run"
    rc = main(["eval", "--model", "tiny", "--suite", "table5", "--output", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.slow
def test_cli_eval_match_records_the_solved_config(tmp_path, tmp_path_factory, capsys):
    pytest.importorskip("lmms_eval")
    from conftest import benchmark_data_env

    from pmod_bench.cli import main
    from pmod_bench.methods import solve

    env = benchmark_data_env(tmp_path_factory, ["RWQA"])
    next(env)
    try:
        run = tmp_path / "fastv"
        rc = main(["eval", "--model", "tiny", "--suite", "RWQA", "--output", str(run), "--limit", "2", "--method", "fastv",
                   "--match", "p-MoD-0.5", "--gen-kwargs", "max_new_tokens=4", "--threads", "1"])
        assert rc == 0, capsys.readouterr().err
    finally:
        next(env, None)
    ref = solve("fastv", "tiny", (64, 64), match="p-MoD-0.5", text_tokens=58)
    meta = json.loads((run / "run.json").read_text())
    assert meta["eval"]["identity"]["method"] == ref.config.spec()
    mm = meta["eval"]["method_match"]
    assert mm["target_label"] == "p-MoD-0.5" and mm["method"] == ref.config.to_dict() and mm["rel_err"] <= 0.01
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == ref.config.to_dict() and summary["method_match"]["achieved"] == mm["achieved"]
    for row in summary["rows"]:
        assert row["method"] == ref.config.to_dict() and row["method_match"] == mm
    from pmod_bench.reports.runs import load_run

    assert load_run(run).kind == "eval"
