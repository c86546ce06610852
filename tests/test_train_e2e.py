"""End to end on CPU: the real `pmod-bench train` CLI on the tiny preset and a generated dataset.

One uninterrupted run (20 steps) is the reference for: the loss going down, the checkpoint loading with
``AutoModelForImageTextToText.from_pretrained`` and generating, frozen modules staying put, a run
stopped at step 10 and resumed (identical losses), and two processes through ``accelerate launch``
(gloo) at the same global batch (losses within 1e-3).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import train_workspace

pytestmark = pytest.mark.slow

STEPS = 20


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A vanilla tiny LLaVA-NeXT checkpoint, a generated dataset (with bad records) and a recipe using both."""
    return train_workspace(tmp_path_factory, "train_e2e", f"max_steps: {STEPS}, save_steps: 10, progress_bar: false")


def _cli(*args) -> int:
    from pmod_bench.cli import main

    return main(["train", *map(str, args)])


def _log(run: Path) -> list:
    return [json.loads(l) for l in (run / "train_log.jsonl").read_text().splitlines() if l.strip()]


@pytest.fixture(scope="module")
def run_a(ws):
    root, recipe = ws
    out = root / "A"
    torch.set_num_threads(1)
    assert _cli("--config", recipe, "-o", out) == 0
    return out


def test_loss_goes_down_and_the_checkpoint_loads_and_generates(ws, run_a):
    root, _ = ws
    rows = _log(run_a)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in rows]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    print(f"loss: first 4 steps {first:.3f}, last 4 steps {last:.3f}")
    assert last < 0.8 * first
    for key in ("step", "epoch", "loss", "lr", "tokens_per_s", "samples_per_s", "gpu_hours", "world_size"):
        assert key in rows[0]
    assert all(b["gpu_hours"] >= a["gpu_hours"] for a, b in zip(rows, rows[1:])) and rows[-1]["tokens_per_s"] > 0
    run = json.loads((run_a / "run.json").read_text())
    assert run["kind"] == "train" and run["schema_version"] == 1 and run["command"].startswith("pmod-bench train --config")
    summary = json.loads((run_a / "train_summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == STEPS and summary["stage"] == "sft"
    assert summary["final_loss"] == losses[-1] and summary["gpu_hours"] > 0 and summary["tokens_per_s"] > 0
    assert summary["bad_samples"] == 3  # 1 malformed (dropped at load) + missing + corrupt image (skipped)
    bad = [json.loads(l)["id"] for l in (run_a / "bad_samples.jsonl").read_text().splitlines()]
    assert sorted(bad) == ["corrupt-0", "malformed-0", "missing-0"]

    from transformers import AutoModelForImageTextToText, AutoProcessor

    import pmod_bench

    pmod_bench.register()

    model = AutoModelForImageTextToText.from_pretrained(run_a)
    processor = AutoProcessor.from_pretrained(run_a)
    assert type(model).__name__ == "PMoDLlavaNextForConditionalGeneration"
    assert model.config.pmod["overflow_guard"] is False  # the training guard is not left on for inference
    base = AutoModelForImageTextToText.from_pretrained(root / "base")
    trained, before = model.state_dict(), base.state_dict()
    vision = [k for k in before if k.startswith("model.vision_tower.")]
    assert vision and all(torch.equal(trained[k], before[k]) for k in vision)  # frozen
    assert not torch.equal(trained["model.multi_modal_projector.linear_1.weight"], before["model.multi_modal_projector.linear_1.weight"])
    assert not torch.equal(trained["model.language_model.layers.0.mlp.up_proj.weight"], before["model.language_model.layers.0.mlp.up_proj.weight"])
    # routers learned, except the last layer's: its vision-token outputs reach no labelled position, so the
    # language-model loss gives it no gradient at all (it keeps its zero init; selection there is by position)
    last = len(model.model.language_model.layers) - 1
    assert all(torch.count_nonzero(l.router.weight) > 0 for i, l in model.pmod_layers.items() if i != last)
    assert torch.count_nonzero(model.pmod_layers[last].router.weight) == 0

    from PIL import Image

    img = Image.open(root / "data" / "images" / "0000.png").convert("RGB")
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the color of the object?"}]}],
        add_generation_prompt=True)
    inputs = processor(images=img, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_resume_continues_exactly(ws, run_a):
    root, recipe = ws
    out = root / "B"
    assert _cli("--config", recipe, "-o", out, "train.stop_at_step=10") == 0
    s = json.loads((out / "train_summary.json").read_text())
    assert s["status"] == "stopped" and s["steps"] == 10 and (out / "checkpoint-10").is_dir()
    assert not (out / "config.json").exists()  # no final model for a stopped run
    assert _cli("--config", recipe, "-o", out) == 0  # train.resume=auto picks checkpoint-10
    s = json.loads((out / "train_summary.json").read_text())
    assert s["status"] == "completed" and s["resumed_from"].endswith("checkpoint-10")
    a, b = _log(run_a), _log(out)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    diffs = [abs(x["loss"] - y["loss"]) for x, y in zip(a, b)]
    print("resume: |loss differences| =", [round(d, 4) for d in diffs])
    assert max(diffs) <= 1e-6 * max(r["loss"] for r in a), [round(d, 4) for d in diffs]
    assert [x["lr"] for x in a] == [y["lr"] for y in b]
    assert b[-1]["gpu_hours"] > b[9]["gpu_hours"]  # accumulated over both sessions
    assert _cli("--config", recipe, "-o", out, "train.resume=null") == 2  # refuses to overwrite checkpoints


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one(ws, run_a):
    """accelerate launch, 2 CPU processes (gloo), 2 samples each = the 1-process run's global batch of 4."""
    root, recipe = ws
    out = root / "C"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           "-m", "pmod_bench.cli", "train", "--config", str(recipe), "-o", str(out),
           "train.per_device_batch_size=2", "train.stop_at_step=4", "train.device=cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, c = _log(run_a), _log(out)
    assert [r["step"] for r in c] == [1, 2, 3, 4] and all(r["world_size"] == 2 for r in c)
    assert [r["samples"] for r in c] == [r["samples"] for r in a[:4]]  # same global batches
    rel = [abs(x["loss"] - y["loss"]) / x["loss"] for x, y in zip(a, c)]
    print("1 vs 2 processes: losses", [round(r["loss"], 5) for r in a[:4]], [round(r["loss"], 5) for r in c],
          "max rel diff", max(rel))
    assert max(rel) < 1e-3
    s = json.loads((out / "train_summary.json").read_text())
    assert s["world_size"] == 2 and s["gradient_accumulation_steps"] == 1 and s["status"] == "stopped"


def test_pt_stage_trains_only_the_connector(ws):
    root, recipe = ws
    out = root / "PT"
    assert _cli("--config", recipe, "-o", out, "stage=pt", "pmod=null", "data.template=plain", "train.max_steps=3",
                "train.lr=1.0e-3") == 0
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(out)
    base = AutoModelForImageTextToText.from_pretrained(root / "base")
    assert type(model).__name__ == "LlavaNextForConditionalGeneration"  # PT: the vanilla model
    after, before = model.state_dict(), base.state_dict()
    changed = {k.split(".")[1] if k.startswith("model.") else k.split(".")[0]
               for k in before if not torch.equal(after[k], before[k])}
    assert changed == {"multi_modal_projector", "image_newline"}
    with safe_open(str(out / "connector.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("model.multi_modal_projector.linear_2.weight"),
                           after["model.multi_modal_projector.linear_2.weight"])
    assert json.loads((out / "train_summary.json").read_text())["trainable"] == ["connector"]


def test_overflow_guard_stops_training_and_records_it(ws, tmp_path):
    """weight_norm none + a router gone to infinity: PMoDOverflowError names the layer; the summary says OVERFLOW."""
    from pmod_bench.model.plan import PMoDOverflowError
    from pmod_bench.model.presets import build_preset

    from pmod_bench.train.config import load_recipe
    from pmod_bench.train.trainer import train

    root, recipe = ws
    cfg = load_recipe(recipe, ["pmod.weight_norm=none", f"output_dir={tmp_path / 'ovf'}", "train.max_steps=2"])
    model, processor = build_preset("tiny", pmod=cfg.resolved_pmod(8))
    layer = next(iter(model.pmod_layers.values()))
    with torch.no_grad():
        layer.router.bias.fill_(float("inf"))
    with pytest.raises(PMoDOverflowError, match=rf"step \d+: OVERFLOW: .* p-MoD layer {layer.layer_idx} \(router logits"):
        train(cfg, model=model, processor=processor)
    s = json.loads((tmp_path / "ovf" / "train_summary.json").read_text())
    assert s["status"] == "overflow" and f"layer {layer.layer_idx}" in s["error"]


def test_a_run_in_a_worker_process_gives_the_weights_of_one_in_this_process(ws, run_a, tmp_path):
    """``reproduce --toy --jobs N`` trains models in spawned worker processes (pmod_bench.toy.parallel): the weights
    must be those of a run in this process, bit for bit, so the shipped checkpoints do not depend on N."""
    from safetensors.torch import load_file

    from pmod_bench.toy.parallel import Jobs, train_job

    root, recipe = ws
    with Jobs(2) as jobs:
        result = jobs.submit(train_job, ["train", "--config", str(recipe), "-o", str(tmp_path / "W")], str(tmp_path / "W.log")).result()
    assert result["rc"] == 0 and result["wall_s"] > 0
    assert "step" in (tmp_path / "W.log").read_text()  # the run's own output went to its log
    a, w = load_file(str(run_a / "model.safetensors")), load_file(str(tmp_path / "W" / "model.safetensors"))
    assert a.keys() == w.keys() and all(torch.equal(a[k], w[k]) for k in a)
    assert [r["loss"] for r in _log(run_a) if "loss" in r] == [r["loss"] for r in _log(tmp_path / "W") if "loss" in r]


def test_router_lr_scale_trains_the_routers_at_their_own_rate(ws, run_a, tmp_path):
    """train.router_lr_scale: from the same start, the routers move about that many times further."""
    from safetensors.torch import load_file

    from pmod_bench.train.build import param_group

    root, recipe = ws
    assert _cli("--config", recipe, "-o", tmp_path / "R", "train.router_lr_scale=20", "train.max_steps=4", "train.warmup_ratio=0") == 0
    assert _cli("--config", recipe, "-o", tmp_path / "S", "train.max_steps=4", "train.warmup_ratio=0") == 0
    base = load_file(str(root / "base" / "model.safetensors"))
    r, s = load_file(str(tmp_path / "R" / "model.safetensors")), load_file(str(tmp_path / "S" / "model.safetensors"))
    routers = [k for k in r if param_group(k) == "routers"]
    assert routers, "the demo recipe has p-MoD layers"
    moved = lambda d, k: float((d[k].float() - base.get(k, torch.zeros_like(d[k])).float()).abs().max())  # noqa: E731
    # an AdamW step moves a parameter with a gradient by about its learning rate: 20x for the routers (four steps:
    # a batch without images leaves the routers without one)
    trained = [k for k in routers if moved(s, k) > 0]
    assert len(trained) >= len(routers) // 2, routers
    for k in trained:
        assert moved(r, k) > 5 * moved(s, k), k
