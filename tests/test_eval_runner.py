"""`pmod-bench eval`: resume after a killed run, run-dir identity, the real CLI, the lmms-eval CLI plugin.

The kill is an injected ``BaseException`` raised by the model after a few batches (like SIGINT /
a kill: nothing in the runner catches it), in the middle of the second benchmark.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval")

from conftest import benchmark_data_env  # noqa: E402
from conftest import lmms_eval_responses as responses  # noqa: E402
from pmod_bench.tasks.runner import EvalConfig, RunDirMismatch, run_eval  # noqa: E402

SUITE = "POPE,MME,RWQA"  # 6 + 8 + 3 samples
GEN = "max_new_tokens=3"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    yield from benchmark_data_env(tmp_path_factory, ["POPE", "MME", "RWQA"])


@pytest.fixture(scope="module")
def tiny():
    from pmod_bench.model.presets import build_preset, random_routers

    model, processor = build_preset("tiny")
    random_routers(model)
    return model, processor


class Killed(BaseException):
    """Stands for a kill: not an Exception, so no handler in the runner swallows it."""


def make_lm(tiny, batch_size, kill_after=None):
    from pmod_bench.tasks.plugin import PMoDLlava

    class Flaky(PMoDLlava):
        def _generate_batch(self, *args, **kwargs):
            if kill_after is not None and self.model_calls >= kill_after:
                raise Killed()
            return super()._generate_batch(*args, **kwargs)

    return Flaky.from_loaded(*tiny, name="tiny", batch_size=batch_size)

@pytest.mark.slow
def test_resume_after_kill_recomputes_nothing_and_matches_uninterrupted_run(data_root, tiny, tmp_path):
    run = tmp_path / "run"
    cfg = EvalConfig(model="tiny", suite=SUITE, output=str(run), batch_size=2, gen_kwargs=GEN)
    # POPE: 3 batches of 2; MME: 1 batch, then the kill
    with pytest.raises(Killed):
        run_eval(cfg, lm=make_lm(tiny, 2, kill_after=4), log=lambda m: None)
    assert (run / "benchmarks" / "POPE.json").is_file() and not (run / "benchmarks" / "MME.json").exists()
    partial = json.loads((run / "summary.json").read_text())
    assert [r["benchmark"] for r in partial["rows"]] == ["POPE"] and not partial["complete"]
    assert len((run / "responses" / "responses.rank0.jsonl").read_text().splitlines()) == 8  # 6 POPE + 2 MME

    lm2 = make_lm(tiny, 4)  # another batch size on resume
    cfg2 = EvalConfig(model="tiny", suite=SUITE, output=str(run), batch_size=4, gen_kwargs=GEN)
    out = run_eval(cfg2, lm=lm2, log=lambda m: None)
    assert out.skipped == ["POPE"] and out.ran == ["MME", "RWQA"] and not out.failures
    assert lm2.cache.hits == 2 and out.resumed_answers == 2  # the 2 MME answers persisted before the kill
    assert lm2.model_calls == 2 + 1 and out.computed_answers == 6 + 3  # the other 6 MME requests + 3 RWQA

    ref = tmp_path / "ref"
    ref_out = run_eval(EvalConfig(model="tiny", suite=SUITE, output=str(ref), batch_size=1, gen_kwargs=GEN),
                       lm=make_lm(tiny, 1), log=lambda m: None)
    assert out.rows == ref_out.rows
    assert responses(run) == responses(ref) and len(responses(ref)) == 17

    # a third invocation computes nothing
    lm3 = make_lm(tiny, 4, kill_after=0)
    again = run_eval(cfg2, lm=lm3, log=lambda m: None)
    assert again.ran == [] and again.rows == out.rows


@pytest.mark.slow
def test_run_dir_belongs_to_one_evaluation(data_root, tiny, tmp_path):
    run = tmp_path / "run"
    run_eval(EvalConfig(model="tiny", suite="RWQA", output=str(run), gen_kwargs=GEN), lm=make_lm(tiny, 4), log=lambda m: None)
    with pytest.raises(RunDirMismatch, match="gen_kwargs: 'max_new_tokens=3' in the run dir vs 'max_new_tokens=2' now"):
        run_eval(EvalConfig(model="tiny", suite="RWQA", output=str(run), gen_kwargs="max_new_tokens=2"),
                 lm=make_lm(tiny, 4), log=lambda m: None)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(RunDirMismatch, match="is not empty and holds no run.json"):
        run_eval(EvalConfig(model="tiny", suite="RWQA", output=str(tmp_path / "other")), lm=make_lm(tiny, 4))


@pytest.mark.slow
def test_cli_eval_writes_a_report_readable_run_dir(data_root, tmp_path, capsys):
    from pmod_bench.cli import main

    run = tmp_path / "cli"
    rc = main(["eval", "--model", "tiny", "--suite", "MME,RWQA", "--output", str(run), "--limit", "3",
               "--batch-size", "4", "--gen-kwargs", GEN, "--threads", "1", "--label", "smoke"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "MME" in out and "summary.json" in out
    meta = json.loads((run / "run.json").read_text())
    assert meta["kind"] == "eval" and meta["schema_version"] == 1 and meta["label"] == "smoke"
    assert meta["command"].startswith("pmod-bench") and meta["model_info"]["layer_ratios"]
    summary = json.loads((run / "summary.json").read_text())
    rows = {r["benchmark"]: r for r in summary["rows"]}
    assert rows["MME"]["n"] == 4 and rows["MME"]["limit"] == 4  # limit rounded up to whole MME pairs
    # the evaluated model's full PMoDConfig as data: run.json's model_info, summary.json and every row
    from pmod_bench.model.config import PMoDConfig

    pmod = summary["pmod"]
    assert pmod == meta["model_info"]["pmod"] == PMoDConfig.from_dict(pmod).to_dict()
    assert all(r["pmod"] == pmod for r in rows.values())
    assert rows["RWQA"]["n"] == 3
    assert (run / "summary.csv").read_text().splitlines()[0].startswith("benchmark,task,metric,value,n")
    from pmod_bench.reports.runs import load_run  # the report reader accepts the run directory

    assert load_run(run).kind == "eval"


def test_cli_eval_fails_loudly_on_missing_data(tmp_path, capsys, monkeypatch):
    from pmod_bench.cli import main

    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "cache"))
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PMOD_BENCH_DATA", str(empty))  # --data sets it; monkeypatch restores it afterwards
    rc = main(["eval", "--model", "tiny", "--suite", "POPE", "--output", str(tmp_path / "r"), "--data", str(empty),
               "--limit", "1", "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "POPE" in err and str(empty / "lmms-lab-encoder" / "POPE") in err and "re-run the same command" in err
    assert (tmp_path / "r" / "errors" / "POPE.txt").is_file()
    assert main(["eval", "--model", "tiny", "--suite", "tabel1", "--output", str(tmp_path / "s")]) == 2
    assert "Did you mean 'table1'" in capsys.readouterr().err
    assert main(["eval", "--suite", "POPE"]) == 2


@pytest.mark.slow
def test_plugin_through_python_m_lmms_eval(data_root, tmp_path):
    """`python -m lmms_eval --model pmod_llava` in a fresh process (entry point, include_path, CLI)."""
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PMOD_BENCH_DATA=str(data_root))
    from pmod_bench.tasks import tasks_dir

    cmd = [sys.executable, "-m", "lmms_eval", "--model", "pmod_llava", "--model_args", "pretrained=tiny",
           "--batch_size", "2", "--tasks", "pmod_realworldqa", "--include_path", str(tasks_dir()), "--limit", "2", "--gen_kwargs", "max_new_tokens=2",
           "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    results = list(out.glob("*/*_results.json"))
    # lmms-eval exits 0 even when evaluation raised: the results file is the evidence
    assert results, f"no results file; exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    res = json.loads(results[0].read_text())
    assert "exact_match,none" in res["results"]["pmod_realworldqa"]
    assert "PMoDLlava" in res["config"]["model_backend"]
    assert list(out.glob("*/*_samples_pmod_realworldqa.jsonl"))


@pytest.mark.slow
def test_two_processes_split_the_requests(data_root, tmp_path):
    """`torchrun` (CPU: ACCELERATE_USE_CPU=1; on GPUs `accelerate launch`) runs the runner on 2 ranks:
    each rank answers its interleaved shard, rank 0 gathers and writes the run directory."""
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", PMOD_BENCH_DATA=str(data_root))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pmod_bench.cli",
           "eval", "--model", "tiny", "--suite", "MME", "--output", str(run), "--batch-size", "2", "--gen-kwargs", GEN]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {p.name: len(p.read_text().splitlines()) for p in (run / "responses").glob("*.jsonl")}
    assert lines == {"responses.rank0.jsonl": 4, "responses.rank1.jsonl": 4}  # 8 requests, split evenly
    (row,) = json.loads((run / "summary.json").read_text())["rows"]
    assert row["benchmark"] == "MME" and row["n"] == 8
    assert json.loads((run / "run.json").read_text())["model_info"]["world_size"] == 2
