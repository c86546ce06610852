"""Latency of LLaVA-OneVision image prompts: the profiler's synthetic batch (anyres tiles, image_sizes,
batch_num_images, exactly the row's vision-token count of <image> placeholders) is what the real tiny model, its p-MoD
model and its method-applied models take, in the layout the real processor gives; the CLI times the tiny arch."""

from __future__ import annotations

import json

import pytest

from pmod_bench.profiler.arch import load_arch, vision_layout
from pmod_bench.profiler.models import Sample, synthetic_batch

QUESTION = "What is shown?"
#: (image size, images per prompt): one tile + base, a grid shrunk past anyres_max_9, a tall image, several images
CASES = [((190, 190), 1), ((1000, 700), 1), ((20, 300), 1), ((64, 48), 3)]


@pytest.fixture(scope="module")
def tiny():
    from pmod_bench.model.presets import build_preset

    model, processor = build_preset("tiny-llava-onevision", pmod=None)
    return load_arch("tiny-llava-onevision"), model, processor


def _batch(arch, size, images, batch_size=2):
    return synthetic_batch(arch, [Sample(size, 12, images)] * batch_size, seed=1)


@pytest.mark.parametrize("size, images", CASES)
def test_synthetic_batch_has_the_processors_layout(tiny, size, images):
    """Per image: the processor's tile count (pixel_values dim 1), its (H, W) image_sizes and batch_num_images; per
    row, the profiler's vision tokens of <image> placeholders (the processor's own count)."""
    from pmod_bench.model.presets import demo_image

    arch, _, processor = tiny
    content = [{"type": "image"}] * images + [{"type": "text", "text": QUESTION}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    real = processor(images=[[demo_image(*size, seed=i) for i in range(images)]], text=[text], return_tensors="pt")
    batch = _batch(arch, size, images)
    V = vision_layout(arch, size, images).vision_tokens
    assert [int((row == arch.image_token_id).sum()) for row in batch["input_ids"]] == [V, V]
    assert int((real["input_ids"] == arch.image_token_id).sum()) == V
    assert tuple(batch["pixel_values"].shape) == (2 * images, *real["pixel_values"].shape[1:])
    assert batch["image_sizes"].tolist() == real["image_sizes"].tolist() * 2
    assert batch["batch_num_images"].tolist() == [int(n) for n in real["batch_num_images"]] * 2 == [images] * 2


@pytest.mark.parametrize("size, images", CASES)
def test_synthetic_batch_runs_the_tiny_model_and_its_pmod_model(tiny, size, images):
    """The model refuses placeholders that differ from the features it packs: the forward of the vanilla and the p-MoD
    tiny model on the synthetic batch is the check (token count == features), and it caches every position."""
    import torch

    from pmod_bench.profiler.models import random_model
    from pmod_bench.profiler.variants import PMoD, make_pmod_config

    arch = tiny[0]
    batch = _batch(arch, size, images)
    pmod, base = random_model(arch, PMoD(make_pmod_config(shift=0.5)))
    n = batch["input_ids"].shape[1]
    with torch.no_grad():
        for model in (base, pmod):
            out = model(**batch, use_cache=True, logits_to_keep=1)
            assert out.logits.shape[:2] == (2, 1) and torch.isfinite(out.logits).all()
    assert out.past_key_values.get_seq_length() <= n  # p-MoD's routed layers cache their kept tokens


@pytest.mark.parametrize("spec", ["random:tokens=5,seed=3", "visionzip:dominant=4,contextual=2",
                                  "downsample:grid_h=2,grid_w=3", "fastv:k=1,keep=0.5", "pyramiddrop:layers=1"])
def test_synthetic_batch_runs_the_comparison_methods(tiny, spec):
    """A method-applied tiny model (vision-stage: random, visionzip, downsample; in-LLM: fastv, pyramiddrop) takes the
    batch and keeps the vision tokens its accounting counts at the batch's image."""
    import torch

    from pmod_bench.methods import apply_method, parse_method_spec
    from pmod_bench.methods.accounting import method_flops
    from pmod_bench.profiler.models import random_model
    from pmod_bench.profiler.variants import Baseline

    arch = tiny[0]
    model, _ = random_model(arch, Baseline(), seed=2)
    apply_method(model, spec)
    batch = _batch(arch, (190, 190), 1)
    with torch.no_grad():
        out = model(**batch, use_cache=True, logits_to_keep=1)
    assert out.logits.shape[:2] == (2, 1) and torch.isfinite(out.logits).all()
    f = method_flops(parse_method_spec(spec), arch, (190, 190), 12)
    assert f.baseline_vision_tokens == vision_layout(arch, (190, 190)).vision_tokens
    if not f.layer_vision_tokens:  # vision-stage: the LLM sees the kept tokens only
        text = batch["input_ids"].shape[1] - f.baseline_vision_tokens
        assert out.past_key_values.get_seq_length() == text + f.llm_vision_tokens


@pytest.mark.slow
def test_cli_times_tiny_onevision_images(tmp_path):
    """``profile --arch tiny-llava-onevision --latency`` on image prompts: baseline and p-MoD rows timed (prefill and
    decode), a comparison method counted in the same run."""
    from pmod_bench.cli import main

    js = tmp_path / "ov.json"
    argv = ["profile", "--arch", "tiny-llava-onevision", "--latency", "--image-size", "190x190", "--shift", "0.5",
            "--method", "visionzip:dominant=4,contextual=2", "--repeats", "1", "--warmup", "0", "--gen-tokens", "3",
            "--json", str(js)]
    assert main(argv) == 0
    rows = json.loads(js.read_text())["rows"]
    timed = [r for r in rows if r["method"] in ("baseline", "pmod")]
    assert [r["variant"] for r in timed] == ["baseline", "p-MoD-0.5"]
    for r in timed:
        assert r["prefill_latency_ms"] > 0 and r["decode_latency_ms_per_token"] > 0 and r["latency_note"] is None
        assert r["flops_check_rel_err"] == 0 and r["latency_ratio"] is not None
    method = [r for r in rows if r["method"] == "visionzip"]
    assert len(method) == 1 and method[0]["flops_check_rel_err"] <= 0.01
