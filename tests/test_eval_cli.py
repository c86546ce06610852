"""`pmod-bench eval` / `data check` given bad input, through the real CLI (``pmod_bench.cli.main``).

Each case: exit code 2, one line ``pmod-bench eval: error: ...`` that names the fix, and nothing
written (no run directory), so the corrected command runs on the same ``--output``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

from conftest import benchmark_data_env  # noqa: E402
from pmod_bench.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    yield from benchmark_data_env(tmp_path_factory, ["MME", "RWQA"])


def _image(path: Path, truncated: bool = False) -> Path:
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 30, 30)).save(path, format="PNG")
    if truncated:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


def _checkpoint(tmp: Path, truncated: bool) -> Path:
    """A vanilla tiny checkpoint directory: its real config.json + a damaged model.safetensors."""
    from pmod_bench.model.presets import preset_config

    d = tmp / "ckpt"
    preset_config("tiny", pmod=None).save_pretrained(str(d))
    (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":" if truncated else b"")
    return d


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 1, err
    assert errors[0].startswith("pmod-bench eval: error: "), err
    assert "Traceback" not in err, err
    return errors[0]


def _bad_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    ok_img = _image(tmp / "ok.png")
    return {
        "dtype": (["--dtype", "float64"], "--dtype 'float64' is unknown; use auto, bfloat16, float16 or float32"),
        "shift": (["--shift", "7"], "--shift must be a shift factor delta in (0, 1.5]"),
        "ratios": (["--ratios", "1,abc"], "--ratios '1,abc': expected one retention ratio in (0, 1] per layer"),
        "gen-kwargs value": (["--gen-kwargs", "max_new_tokens=abc"], "--gen-kwargs: max_new_tokens='abc' must be a positive integer"),
        "gen-kwargs garbage": (["--gen-kwargs", "garbage"], "--gen-kwargs 'garbage': 'garbage' is not KEY=VALUE"),
        "gen-kwargs key": (["--gen-kwargs", "max_tokens=3"], "--gen-kwargs: unknown key 'max_tokens'; known: max_new_tokens"),
        "chat template": (["--chat-template", str(tmp / "nope.jinja")], "no such file; use vicuna_v1 (the paper's), processor"),
        "introspect missing": (["--introspect", str(tmp / "missing.png")], "--introspect: introspection image"),
        "introspect corrupt": (["--introspect", str(_image(tmp / "bad.png", truncated=True))], "is not a readable image"),
        "device": (["--device", "cuda"], "--device cuda: CUDA is not available on this machine; use --device cpu"),
        "device name": (["--device", "gpu0"], "--device 'gpu0' is not a device; use cpu, cuda or cuda:N"),
        "threads negative": (["--threads", "-3"], "--threads must be >= 1, got -3"),
        "threads zero": (["--threads", "0"], "--threads must be >= 1, got 0"),
        "limit": (["--limit", "0"], "--limit must be a positive integer"),
        "data": (["--data", str(tmp / "no-data")], "no such directory; pass the data root"),
        "attn": (["--attn", "flash"], "--attn 'flash' is unknown"),
        "ok image, vanilla + shift": (["--model", "tiny:vanilla", "--shift", "0.3", "--introspect", str(ok_img)],
                                      "need a p-MoD model; this checkpoint is vanilla (add --pmod default"),
        "pmod": (["--pmod", "{not json"], "--pmod (model_args pmod) must be 'default', a PMoDConfig JSON file"),
    }


def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    for name, (extra, message) in _bad_cases(tmp_path).items():
        out = tmp_path / f"run-{name.replace(' ', '-')}"
        argv = ["eval", "--model", "tiny", "--suite", "RWQA", "--output", str(out), *extra]
        if "--model" in extra:
            argv = ["eval", "--suite", "RWQA", "--output", str(out), *extra]
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2, (name, err)
        line = _one_error_line(err)
        assert message in line, (name, line)
        assert not out.exists(), f"{name}: {out} was written"


def test_damaged_weights_are_one_line(tmp_path, capsys):
    for truncated in (True, False):
        ckpt = _checkpoint(tmp_path / ("t" if truncated else "e"), truncated)
        out = tmp_path / f"run-{truncated}"
        rc = main(["eval", "--model", str(ckpt), "--suite", "RWQA", "--output", str(out)])
        line = _one_error_line(capsys.readouterr().err)
        assert rc == 2
        assert "are truncated or corrupt" in line and "model.safetensors" in line and "hf download" in line, line
        assert not out.exists()


def test_launch_mismatch_names_the_cpu_recipe(tmp_path, capsys, monkeypatch):
    """`accelerate launch --num_processes 2` without --multi_gpu runs one process; several CPU processes need
    ACCELERATE_USE_CPU=1 (else lmms-eval dies with "'int' object is not iterable")."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for env, message in (
        ({"ACCELERATE_MIXED_PRECISION": "no", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
         "started a single process"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, "need ACCELERATE_USE_CPU=1"),
    ):
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            out = tmp_path / "run"
            rc = main(["eval", "--model", "tiny", "--suite", "RWQA", "--output", str(out)])
        line = _one_error_line(capsys.readouterr().err)
        assert rc == 2 and message in line
        assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2" in line
        assert not out.exists()


def test_data_check_decode_names_damaged_rows(data_root, tmp_path, capsys):
    """`data check` passes a parquet whose image bytes are cut; `--decode` names benchmark, split, row and fix."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import shutil

    root = tmp_path / "data"
    shutil.copytree(data_root / "lmms-lab-encoder" / "RealWorldQA", root / "lmms-lab-encoder" / "RealWorldQA")
    f = next((root / "lmms-lab-encoder" / "RealWorldQA").rglob("*.parquet"))
    table = pq.read_table(f)
    images = table.column("image").to_pylist()
    images[1] = {"bytes": images[1]["bytes"][:40], "path": None}  # cut inside the PNG header
    table = table.set_column(table.schema.get_field_index("image"), "image",
                             pa.array(images, type=table.schema.field("image").type))
    pq.write_table(table, f)
    assert main(["data", "check", "RWQA", "--root", str(root)]) == 0  # the cheap check cannot see it
    assert "--decode opens them" in capsys.readouterr().out
    assert main(["data", "check", "RWQA", "--root", str(root), "--decode"]) == 1
    out = capsys.readouterr().out
    assert "RWQA: lmms-lab-encoder/RealWorldQA [default] split 'test': 1 image(s) do not decode: row 1 (column 'image'" in out
    assert "hf download lmms-lab-encoder/RealWorldQA --repo-type dataset" in out
    assert main(["data", "check", "RWQA", "--root", str(data_root), "--decode"]) == 0
    assert "every image decodes" in capsys.readouterr().out


def test_gen_kwargs_and_ratios_parse():
    from pmod_bench.tasks.runner import parse_gen_kwargs, parse_ratios

    assert parse_gen_kwargs("max_new_tokens=8,temperature=0,do_sample=false") == {
        "max_new_tokens": 8, "temperature": 0.0, "do_sample": False}
    assert parse_gen_kwargs(None) == {} and parse_ratios("[1,1,0.5]") == [1.0, 1.0, 0.5]
    with pytest.raises(ValueError, match="top_p='2' must be a number in"):
        parse_gen_kwargs("top_p=2")


def test_ratios_help_names_every_form(capsys):
    from pmod_bench.model.config import RATIOS_FORMS

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert RATIOS_FORMS in " ".join(capsys.readouterr().out.split())  # VALUE*COUNT included, from parse_ratios' home


def test_run_json_names_the_identity_fields():
    from pmod_bench.tasks.runner import EvalConfig

    cfg = EvalConfig(model="tiny", suite="MME", output="x", stop_at_until=True)
    assert cfg.identity()["stop_at_until"] is True and cfg.model_args()["stop_at_until"] is True
    assert json.dumps(cfg.identity())


# ----------------------------------------------------------------------------- runs that start (tiny:vanilla)
GEN = "max_new_tokens=2"


def _eval(out: Path, *extra: str) -> list[str]:
    return ["eval", "--model", "tiny:vanilla", "--output", str(out), "--gen-kwargs", GEN, "--threads", "1", *extra]


@pytest.mark.slow
def test_mme_limit_samples_perception_first(data_root, tmp_path, capsys):
    """The fixture follows the real split (cognition rows first); --limit 2 still yields a perception score."""
    import pyarrow.parquet as pq

    f = next((data_root / "lmms-lab-encoder" / "MME").rglob("*.parquet"))
    cats = pq.read_table(f, columns=["category"]).column("category").to_pylist()
    assert cats[:4] == ["code_reasoning"] * 4 and "existence" in cats  # like the hub split: cognition first
    run = tmp_path / "mme"
    assert main(_eval(run, "--suite", "MME", "--limit", "2")) == 0
    (row,) = json.loads((run / "summary.json").read_text())["rows"]
    assert row["metric"] == "mme_perception_score,none" and row["n"] == 2
    samples = [json.loads(x) for x in (run / "lmms_eval" / "pmod_mme" / "samples_pmod_mme.jsonl").read_text().splitlines()]
    assert {s["mme_perception_score"]["category"] for s in samples} == {"existence"}  # one whole pair
    # the full split: every category, order-independent score
    full = tmp_path / "mme-full"
    assert main(_eval(full, "--suite", "MME")) == 0
    assert json.loads((full / "summary.json").read_text())["rows"][0]["n"] == 8
    capsys.readouterr()


@pytest.mark.slow
def test_corrected_command_runs_on_the_same_output(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_eval(run, "--suite", "RWQA", "--limit", "1", "--dtype", "float64")) == 2
    assert not run.exists()
    assert main(_eval(run, "--suite", "RWQA", "--limit", "1")) == 0
    captured = capsys.readouterr()
    # stdout holds the result table and the results line only (lmms-eval's prints go to stderr)
    assert captured.out.splitlines()[0].startswith("benchmark ") and captured.out.splitlines()[-1].startswith("results: ")
    assert len(captured.out.splitlines()) == 3, captured.out
    from pmod_bench.atomic import new_file_mode

    for f in ("run.json", "summary.json", "summary.csv", "benchmarks/RWQA.json", "responses/responses.rank0.jsonl"):
        assert (run / f).stat().st_mode & 0o777 == new_file_mode(), f  # 0644 under umask 022, not mkstemp's 0600
    # resuming says where the answers came from: kill nothing, just re-run a finished benchmark's sibling
    (run / "benchmarks" / "RWQA.json").unlink()
    assert main(_eval(run, "--suite", "RWQA", "--limit", "1")) == 0
    err = capsys.readouterr().err
    assert "resumed " in err and "1 answer(s) from the saved responses, 0 computed" in err


@pytest.mark.slow
def test_damaged_image_mid_run_names_benchmark_row_and_fix(data_root, tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "data"
    shutil.copytree(data_root / "lmms-lab-encoder" / "RealWorldQA", root / "lmms-lab-encoder" / "RealWorldQA")
    f = next((root / "lmms-lab-encoder" / "RealWorldQA").rglob("*.parquet"))
    table = pq.read_table(f)
    images = table.column("image").to_pylist()
    images[1] = {"bytes": images[1]["bytes"][:40], "path": None}  # cut inside the PNG header
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image",
                                    pa.array(images, type=table.schema.field("image").type)), f)
    run = tmp_path / "run"
    # a fresh process: this one's lmms-eval has already built the task from the intact fixture
    env = dict(os.environ, OMP_NUM_THREADS="1", LMMS_EVAL_DATASETS_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "pmod_bench.cli", *_eval(run, "--suite", "RWQA", "--data", str(root))],
                          env=env, capture_output=True, text=True, timeout=300)
    err = proc.stderr
    assert proc.returncode == 1, err[-2000:]
    line = next(ln for ln in err.splitlines() if ln.strip().startswith("RWQA:"))
    assert "RWQA (pmod_realworldqa, split 'test', row 1): the image does not decode" in line, line
    assert "pmod-bench data check RWQA --decode" in line and "hf download" in line


@pytest.mark.slow
def test_sigint_ends_with_the_resume_command(data_root, tmp_path):
    import signal
    import time

    run = tmp_path / "run"
    argv = _eval(run, "--suite", "MME,RWQA")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "pmod_bench.cli", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "run.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "interrupted" in lines[-2] and "resume with:" in lines[-2]
    assert lines[-1].strip().startswith("pmod-bench eval --model tiny:vanilla") and str(run) in lines[-1]
    rc = subprocess.run([sys.executable, "-m", "pmod_bench.cli", *argv], env=env, capture_output=True, text=True,
                        timeout=300)
    assert rc.returncode == 0, rc.stderr[-2000:]
    assert [r["benchmark"] for r in json.loads((run / "summary.json").read_text())["rows"]] == ["RWQA", "MME"]
