"""DeepSpeed ZeRO-3 on CPU (gloo): a composed model (LLM + CLIP + new connector, as every shipped SFT recipe
builds it) trains under train.deepspeed=zero3 on two processes, stops, resumes, and matches a plain run.

Needs DeepSpeed (``pip install deepspeed``: CPU-only works); skipped without it. Two ``accelerate launch``
runs of a few steps: marked slow.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

deepspeed = pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

STEPS = 3


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny Llama (+ tokenizer) and CLIP vision tower saved as HF directories, data with bad records, a recipe
    composing them (model.llm + model.vision_tower, like the shipped recipes)."""
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from pmod_bench.model.presets import preset_config, tiny_tokenizer
    from pmod_bench.train.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("zero3")
    cfg = preset_config("tiny")
    torch.manual_seed(3)
    LlamaForCausalLM(cfg.text_config).save_pretrained(root / "llm")
    tiny_tokenizer().save_pretrained(root / "llm")
    CLIPVisionModel(cfg.vision_config).save_pretrained(root / "vision")
    make_demo_dataset(root / "data", n_image=8, n_text=4, bad={"missing": 1, "corrupt": 1})
    recipe = root / "recipe.yaml"
    recipe.write_text(
        f"# pmod-bench train --config {recipe}\n"
        "include: demo-tiny.yaml\n"
        f"model: {{source: null, llm: {root / 'llm'}, vision_tower: {root / 'vision'}, arch: llava_next}}\n"
        f"data: {{json: {root / 'data' / 'data.json'}, image_folder: {root / 'data'}}}\n"
        f"train: {{max_steps: {STEPS}, save_steps: 10, progress_bar: false, device: cpu}}\n"
    )
    return root, recipe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(recipe, out, *overrides):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "pmod_bench.cli", "train", "--config", str(recipe),
           "-o", str(out), "train.deepspeed=zero3", "train.per_device_batch_size=2", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    (out.parent / f"{out.name}.launch.log").write_text(proc.stdout + proc.stderr)  # kept for a failure's post-mortem
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "train_summary.json").read_text())


def _log(run) -> list:
    return [json.loads(l) for l in (run / "train_log.jsonl").read_text().splitlines() if l.strip()]


def test_composed_model_trains_under_zero3_on_two_processes_and_resumes(ws):
    from pmod_bench.train.config import load_recipe
    from pmod_bench.train.trainer import train

    root, recipe = ws
    plain = train(load_recipe(recipe, [f"output_dir={root / 'plain'}"]))
    assert plain["status"] == "completed"

    out = root / "z3"
    s = _launch(recipe, out, "train.stop_at_step=2")
    assert s["status"] == "stopped" and s["steps"] == 2 and s["world_size"] == 2
    assert (out / "init_model" / "config.json").is_file()  # the starting model, built once by the main process
    assert any(p.name.startswith("global_step") for p in (out / "checkpoint-2").iterdir())  # DeepSpeed's own state
    s = _launch(recipe, out)  # resume=auto: DeepSpeed restores its partitions
    assert s["status"] == "completed" and s["resumed_from"].endswith("checkpoint-2")
    assert not (out / "init_model").exists()  # removed once the final model is saved

    # every parameter counted in full although each process held a partition (ds_numel)
    assert s["params"] == plain["params"] and s["trainable_params"] == plain["trainable_params"]
    a, b = _log(root / "plain"), _log(out)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1)) and [r["samples"] for r in a] == [r["samples"] for r in b]
    rel = max(abs(x["loss"] - y["loss"]) / x["loss"] for x, y in zip(a, b))
    print("ZeRO-3 x2 (stopped + resumed) vs plain: losses", [round(r["loss"], 6) for r in b], "max rel diff", rel)
    assert rel < 1e-5
    # bad records of both processes in one file, each once; the skip counter is the plain run's
    ids = sorted(json.loads(l)["id"] for l in (out / "bad_samples.jsonl").read_text().splitlines())
    plain_ids = sorted(json.loads(l)["id"] for l in (root / "plain" / "bad_samples.jsonl").read_text().splitlines())
    assert ids == plain_ids and len(set(ids)) == len(ids) and not list(out.glob("bad_samples.rank*"))
    assert s["bad_sample_skips"] == plain["bad_sample_skips"]

    from transformers import AutoModelForImageTextToText

    import pmod_bench

    pmod_bench.register()
    z = AutoModelForImageTextToText.from_pretrained(out).state_dict()
    p = AutoModelForImageTextToText.from_pretrained(root / "plain").state_dict()
    assert z.keys() == p.keys()
    assert max((z[k] - p[k]).abs().max().item() for k in z) < 1e-4  # the gathered 16-bit save of the same weights
