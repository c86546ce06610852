"""`pmod-bench train --demo` under `accelerate launch` with two CPU processes (gloo): no race on the
generated data, a per-device batch chosen to fit the demo's global batch, the same losses as one process.
Marked slow (one launch, ~30 s)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_with_two_processes(tmp_path, one_thread):
    from pmod_bench.cli import main

    assert main(["train", "--demo", "-o", str(tmp_path / "one"), "train.max_steps=3", "train.progress_bar=false"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    # on a machine without GPUs accelerate starts several processes only with --multi_gpu (then on gloo)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(_free_port()), "-m", "pmod_bench.cli", "train", "--demo",
           "-o", str(tmp_path / "two"), "train.max_steps=3", "train.progress_bar=false"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 processes, train.per_device_batch_size=2 (global batch 4)" in proc.stderr
    one, two = ([json.loads(l) for l in (tmp_path / d / "train_log.jsonl").read_text().splitlines()] for d in ("one", "two"))
    assert [r["world_size"] for r in two] == [2, 2, 2] and [r["samples"] for r in two] == [r["samples"] for r in one]
    assert max(abs(a["loss"] - b["loss"]) / a["loss"] for a, b in zip(one, two)) < 1e-3
    data = json.loads((tmp_path / "two" / "demo_data" / "data.json").read_text())
    assert data == json.loads((tmp_path / "one" / "demo_data" / "data.json").read_text())
    s = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert s["status"] == "completed" and s["world_size"] == 2 and s["gradient_accumulation_steps"] == 1
