"""Training under faults, on one CPU process: every way a run can end leaves a correct run directory.

A straight 6-step reference run is compared with runs that are interrupted the ways jobs are: a kill
during a checkpoint save (a checkpoint without trainer_state.json), a stop at a step, a kill during the
final save, a failing batch; and with re-running the same command (idempotent), and with pointing
``train -o`` at another tool's run directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from conftest import train_workspace

from pmod_bench.train.config import ConfigError, load_recipe

STEPS = 6


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A vanilla tiny checkpoint, data with bad records (1 missing, 1 corrupt image, 1 malformed), a recipe."""
    return train_workspace(tmp_path_factory, "train_runs", f"max_steps: {STEPS}, save_steps: 2, save_total_limit: null, progress_bar: false")


def _train(recipe, out, *overrides):
    from pmod_bench.train.trainer import train

    torch.set_num_threads(1)
    return train(load_recipe(recipe, [f"output_dir={out}", *overrides]))


def _log(run: Path) -> list:
    return [json.loads(l) for l in (run / "train_log.jsonl").read_text().splitlines() if l.strip()]


def _bad(run: Path) -> list:
    return sorted(json.loads(l)["id"] for l in (run / "bad_samples.jsonl").read_text().splitlines() if l.strip())


def _files(run: Path) -> dict:
    return {str(p.relative_to(run)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ref(ws):
    root, recipe = ws
    out = root / "ref"
    s = _train(recipe, out)
    assert s["status"] == "completed" and s["steps"] == STEPS
    return out


@pytest.mark.slow
def test_half_written_checkpoint_falls_back_and_resumes_exactly(ws, ref, caplog):
    """checkpoint-4 without trainer_state.json (a kill during its save): resume=auto takes checkpoint-2, says
    so, sets the broken one aside; the losses, the bad-sample list and the skip counter equal the straight run's."""
    root, recipe = ws
    out = root / "halfsave"
    s = _train(recipe, out, "train.stop_at_step=4")
    assert s["status"] == "stopped" and (out / "checkpoint-4").is_dir() and (out / "checkpoint-2").is_dir()
    (out / "checkpoint-4" / "trainer_state.json").unlink()
    (out / "checkpoint-2" / "pmod_train_state.json").unlink()  # accounting then comes from the log row of step 2
    with caplog.at_level(logging.WARNING, logger="pmod_bench.train.trainer"):
        s = _train(recipe, out)
    assert "checkpoint-4 is incomplete" in caplog.text and "resuming from checkpoint-2" in caplog.text
    assert s["status"] == "completed" and s["resumed_from"].endswith("checkpoint-2") and s["steps"] == STEPS
    assert (out / "incomplete-checkpoint-4").is_dir()
    a, b = _log(ref), _log(out)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) <= 1e-6 * max(r["loss"] for r in a)
    assert [r["samples"] for r in a] == [r["samples"] for r in b]
    # bad samples: each record once although both sessions met them; the skip counter carries over
    r = json.loads((ref / "train_summary.json").read_text())
    assert _bad(out) == _bad(ref) == ["corrupt-0", "malformed-0", "missing-0"]
    assert s["bad_samples"] == r["bad_samples"] == 3 and s["bad_sample_skips"] == r["bad_sample_skips"] > 0
    assert not list(out.glob("bad_samples.rank*.jsonl"))


@pytest.mark.slow
def test_rerunning_a_command_changes_nothing(ws, ref, capsys):
    """A completed run reports it is finished; a repeated stop_at_step=N stays at N; nothing is rewritten."""
    from pmod_bench.cli import main

    root, recipe = ws
    before = _files(ref)
    s = _train(recipe, ref)
    assert s["unchanged"] and s["status"] == "completed" and "nothing to do" in s["note"] and s["steps"] == STEPS
    assert main(["train", "--config", str(recipe), "-o", str(ref)]) == 0
    assert "the run is complete (6/6 steps); nothing to do" in capsys.readouterr().out
    assert _files(ref) == before
    # other settings over a completed run: refused, naming the key
    with pytest.raises(ConfigError, match=r"completed run with other settings \(train.lr: 0.002 -> 0.001\)"):
        _train(recipe, ref, "train.lr=1e-3")

    out = root / "stop2"
    assert _train(recipe, out, "train.stop_at_step=2")["steps"] == 2
    before = _files(out)
    s = _train(recipe, out, "train.stop_at_step=2")
    assert s["unchanged"] and s["status"] == "stopped" and s["steps"] == 2 and "train.stop_at_step=2" in s["note"]
    assert _files(out) == before and not (out / "checkpoint-3").exists()


@pytest.mark.slow
def test_resumed_at_the_last_step_saves_the_final_model_without_another_step(ws, ref):
    """A kill during the final save: the rerun finds checkpoint-6 = max_steps and only saves (HF Trainer alone
    would train a 7th step)."""
    from transformers import AutoModelForImageTextToText

    root, recipe = ws
    out = root / "finalsave"
    _train(recipe, out)
    for name in ("config.json", "model.safetensors", "train_summary.json"):
        (out / name).unlink()
    s = _train(recipe, out)
    assert s["status"] == "completed" and s["steps"] == STEPS and s["resumed_from"].endswith(f"checkpoint-{STEPS}")
    assert [r["step"] for r in _log(out)] == list(range(1, STEPS + 1)) and s["final_loss"] == _log(ref)[-1]["loss"]
    a = AutoModelForImageTextToText.from_pretrained(ref).state_dict()
    b = AutoModelForImageTextToText.from_pretrained(out).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_refuses_another_tools_run_directory(ws, capsys):
    from pmod_bench.cli import main

    root, recipe = ws
    for kind in ("eval", "profile"):
        d = root / f"{kind}-run"
        d.mkdir()
        meta = json.dumps({"kind": kind, "schema_version": 1, "command": f"pmod-bench {kind} ..."})
        (d / "run.json").write_text(meta)
        assert main(["train", "--config", str(recipe), "-o", str(d)]) == 2
        err = capsys.readouterr().err
        assert f"holds a '{kind}' run; pass a new output_dir" in err and err.count("\n") == 1
        assert (d / "run.json").read_text() == meta and sorted(p.name for p in d.iterdir()) == ["run.json"]


@pytest.mark.slow
def test_a_failure_is_recorded_with_the_error_and_the_last_step(ws):
    """on_bad_sample=fail: the run stops at the missing image; train_summary.json says failed, why, and where."""
    from pmod_bench.train.data import BadSampleError

    root, recipe = ws
    out = root / "fails"
    good = [r for r in json.loads((root / "data" / "data.json").read_text()) if not r["id"].startswith("malformed")]
    (root / "nomalformed.json").write_text(json.dumps(good))
    with pytest.raises(BadSampleError):
        _train(recipe, out, "data.on_bad_sample=fail", f"data.json={root / 'nomalformed.json'}")
    s = json.loads((out / "train_summary.json").read_text())
    assert s["status"] == "failed" and s["error"].startswith("BadSampleError: bad sample: record")
    assert "image file not found" in s["error"] or "cannot be decoded" in s["error"]
    assert s["steps"] == len(_log(out)) < STEPS and s["max_steps"] == STEPS
