"""The profiler on LLaVA-OneVision (anyres_max_9 tiles, SigLIP without [CLS], a Qwen2 LLM) and several images per
prompt on every host: vision tokens against the real tiny processor + model, analytic FLOPs against FlopCounterMode
(meta device and a real forward), KV and training rows, the CLI."""

from __future__ import annotations

import json

import pytest

from conftest import check_forward_flops_are_analytic, check_profile_refuses
from pmod_bench.profiler.arch import load_arch, vision_layout
from pmod_bench.profiler.flops import llm_decode_flops, llm_prefill_flops, vision_flops
from pmod_bench.profiler.variants import Baseline, PMoD, make_pmod_config

VARIANTS = (Baseline(), PMoD(make_pmod_config(shift=0.5)))
QUESTION = "What is shown?"


@pytest.fixture(scope="module")
def ov7b():
    return load_arch("llava-onevision-7b")


@pytest.fixture(scope="module")
def tiny():
    from pmod_bench.model.presets import build_preset

    model, processor = build_preset("tiny-llava-onevision", pmod=None)
    return load_arch("tiny-llava-onevision"), model, processor


def _processed(processor, sizes, per_prompt: bool):
    """The processor's inputs for ``sizes``: all in one prompt (``per_prompt``), else one image alone."""
    from pmod_bench.model.presets import demo_image

    content = [{"type": "image"}] * len(sizes) + [{"type": "text", "text": QUESTION}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = [demo_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    return processor(images=[images] if per_prompt else images, text=[text], return_tensors="pt")


@pytest.mark.parametrize("size, tiles, grid, unpadded, downsampled, tokens", [
    ((672, 672), 5, (2, 2), (54, 54), None, 729 + 54 * 55),
    ((1344, 1008), 13, (3, 4), (81, 108), (70, 93), 729 + 70 * 94),  # 12 tiles > 9 tiles' worth: shrunk bilinearly
    ((640, 480), 5, (2, 2), (40, 54), None, 729 + 40 * 55),
    ((1000, 700), 7, (2, 3), (54, 77), None, 729 + 54 * 78),
    ((384, 384), 2, (1, 1), (27, 27), None, 729 + 27 * 28),
    ((4000, 3000), 31, (5, 6), (121, 162), (70, 93), 729 + 70 * 94),  # any 4:3 image past 9 tiles' worth: 70x93
])
def test_vision_tokens_7b(ov7b, size, tiles, grid, unpadded, downsampled, tokens):
    layout = vision_layout(ov7b, size)
    assert (layout.tiles, layout.grid, layout.unpadded, layout.downsampled, layout.vision_tokens) == (
        tiles, grid, unpadded, downsampled, tokens)
    assert layout.projector_tokens == 729 * tiles and layout.tile_size == 384


def test_vision_tokens_match_the_hub_processor_geometry(ov7b):
    """The processor at the hub's geometry (384 px tiles, 729 tokens a tile: what lmms-eval and vLLM count with)
    gives the profiler's tokens, image by image; several images in a prompt are 730 tokens each."""
    from pmod_bench.model.presets import tiny_onevision_tokenizer
    from pmod_bench.model.processors import llava_onevision_processor

    proc = llava_onevision_processor(tiny_onevision_tokenizer(), tile=384, pinpoints=ov7b.grid_pinpoints, num_image_tokens=729)
    sizes = [(672, 672), (1344, 1008), (640, 480), (1000, 700), (4000, 3000), (300, 2000)]
    counted = proc._get_num_multimodal_tokens(image_sizes=[(h, w) for w, h in sizes])["num_image_tokens"]
    assert counted == [vision_layout(ov7b, s).vision_tokens for s in sizes]
    assert vision_layout(ov7b, (1344, 1008), images=3).vision_tokens == 3 * 730
    assert vision_layout(ov7b, (1344, 1008), images=3).tiles == 3


@pytest.mark.parametrize("sizes", [[(64, 48)], [(32, 32)], [(190, 190)], [(150, 60)], [(20, 300)], [(1000, 700)]])
def test_vision_tokens_match_the_real_tiny_model(tiny, sizes):
    """The <image> tokens of the real tiny processor, accepted by the real model's forward (which refuses a count
    that differs from its features), are the profiler's."""
    import torch

    arch, model, processor = tiny
    inputs = _processed(processor, sizes, per_prompt=False)
    counted = int((inputs["input_ids"] == arch.image_token_id).sum())
    with torch.no_grad():
        model(**inputs)
    layout = vision_layout(arch, sizes[0])
    assert counted == layout.vision_tokens and int(inputs["pixel_values"].shape[1]) == layout.tiles


def test_several_images_match_the_real_tiny_model(tiny):
    import torch

    arch, model, processor = tiny
    inputs = _processed(processor, [(190, 190)] * 3, per_prompt=True)
    counted = int((inputs["input_ids"] == arch.image_token_id).sum())
    with torch.no_grad():
        model(**inputs)
    assert counted == vision_layout(arch, (190, 190), images=3).vision_tokens == 3 * (16 + 1)


@pytest.mark.parametrize("size, images", [((672, 672), 1), ((1344, 1008), 1), ((1344, 1008), 2)])
def test_analytic_equals_flopcountermode_meta_7b(ov7b, size, images):
    """SigLIP tower over every tile, the projector and the Qwen2 LLM prefill / first decode step of the 7B, exactly."""
    from pmod_bench.profiler.counters import count_flops_meta

    a, T = ov7b, 58
    layout = vision_layout(a, size, images)
    V = layout.vision_tokens
    vis = vision_flops(a, layout)
    for v in VARIANTS:
        kept = v.kept_vision_tokens(a.text.layers, V)
        ana = llm_prefill_flops(a.text, T, V, kept, v.router_layers(a.text.layers), logits_tokens=1)
        meta = count_flops_meta(a, v, size, T, logits_tokens=1, images=images)
        assert (meta.prefill_llm, meta.vision_encoder, meta.projector) == (ana.total(), vis.encoder, vis.projector), v.name
        assert meta.decode_step == llm_decode_flops(a.text, [T + k for k in kept]).total()
    if (size, images) == ((1344, 1008), 1):
        assert vis.encoder / 1e12 == pytest.approx(8.343, abs=1e-3) and vis.projector / 1e12 == pytest.approx(0.322, abs=1e-3)


def test_analytic_equals_flopcountermode_meta_tiny_batch(tiny):
    from pmod_bench.profiler.counters import count_flops_meta

    a = tiny[0]
    for size, images in (((190, 190), 1), ((64, 48), 3)):
        layout = vision_layout(a, size, images)
        V, T = layout.vision_tokens, 40
        vis = vision_flops(a, layout)
        for v in VARIANTS:
            kept = v.kept_vision_tokens(a.text.layers, V)
            ana = llm_prefill_flops(a.text, T, V, kept, v.router_layers(a.text.layers), logits_tokens=T + V)
            meta = count_flops_meta(a, v, size, T, batch_size=2, logits_tokens=T + V, images=images)  # per sample
            assert (meta.prefill_llm, meta.vision) == (ana.total(), vis.total), (size, v.name)


@pytest.mark.parametrize("sizes, per_prompt", [([(190, 190)], False), ([(150, 60)] * 2, True)])
def test_analytic_equals_a_real_forward_of_the_tiny_model(tiny, sizes, per_prompt):
    """FlopCounterMode over the real tiny model on processed images + prompt: tower, projector (unpad, bilinear
    downsampling and newlines cost no products) and LLM do exactly the analytic count."""
    arch, model, processor = tiny
    layout = vision_layout(arch, sizes[0], len(sizes) if per_prompt else 1)
    check_forward_flops_are_analytic(arch, model, _processed(processor, sizes, per_prompt), layout)


def test_params_kv_and_training_rows(ov7b):
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    from pmod_bench.profiler.core import Scenario, profile

    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(ov7b.config)
    lm = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
    assert ov7b.llm_params == lm  # q/k/v biases included
    assert ov7b.vision.params == sum(p.numel() for p in model.model.vision_tower.parameters())
    assert ov7b.projector_params == sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    rows = profile(ov7b, ["baseline", "p-MoD-0.5"], [Scenario((1344, 1008))], hardware="A6000", verify=False,
                   device="cpu")
    base, pmod = rows
    assert (base.vision_tokens, base.tiles, base.tile_size, base.downsampled_grid, base.images) == (7309, 13, 384, [70, 93], 1)
    per_entry = 2 * 4 * 128 * 2  # K and V, 4 KV heads of 128, bf16
    assert base.kv_cache_bytes == 28 * (58 + 7309) * per_entry
    assert pmod.kv_cache_bytes == sum(58 + k for k in pmod.kept_vision_tokens) * per_entry
    assert 0.5 < pmod.tflops_ratio < 0.55 and base.prefill_tflops == pytest.approx(117.93, abs=0.01)
    assert base.train_recipe == "llava-next-sft" and base.train_tokens_per_sample == 3699 + 400  # the recipe's 672x672 image
    assert pmod.train_gpu_hours < base.train_gpu_hours and not base.paper_scenario
    assert base.prefill_floor_ms is not None and base.latency_note == "not measured: llava-onevision-7b is not timed on CPU (use --device cuda on a GPU, or --arch tiny)"


def test_local_hub_config_profiles_as_the_preset(ov7b, tmp_path):
    from pmod_bench.model.presets import preset_config

    preset_config("llava-onevision-7b").save_pretrained(tmp_path)
    local = load_arch(str(tmp_path))
    assert (local.family, local.text, local.vision, local.grid_pinpoints) == (ov7b.family, ov7b.text, ov7b.vision, ov7b.grid_pinpoints)
    assert vision_layout(local, (1344, 1008)) == vision_layout(ov7b, (1344, 1008))


@pytest.mark.parametrize("arch, size, one", [("llava-next-7b", (672, 672), 2928), ("llava-1.5-7b", (640, 480), 576),
                                             ("qwen2.5-vl-7b", (1344, 1008), 1728)])
def test_several_images_on_every_host(arch, size, one):
    """N images: N times the tokens, tiles and vision FLOPs of one, counted exactly by FlopCounterMode on meta too."""
    from pmod_bench.profiler.counters import count_flops_meta

    a = load_arch(arch)
    single, triple = vision_layout(a, size), vision_layout(a, size, images=3)
    assert (single.vision_tokens, triple.vision_tokens, triple.tiles) == (one, 3 * one, 3 * single.tiles)
    vis = vision_flops(a, triple)
    assert vis.total == 3 * vision_flops(a, single).total
    meta = count_flops_meta(a, Baseline(), size, 58, images=3, decode=False)
    assert meta.vision == vis.total and meta.prefill_llm == llm_prefill_flops(a.text, 58, 3 * one, [3 * one] * a.text.layers).total()


def test_several_images_through_real_tiny_forwards():
    """A real tiny Qwen2.5-VL forward on two images (attention within each image) and a timed tiny LLaVA-NeXT p-MoD
    model on a prompt of three: the counts and the synthetic batch hold."""
    import torch

    from pmod_bench.model.presets import build_preset, demo_image
    from pmod_bench.profiler.core import Scenario, profile
    from pmod_bench.profiler.counters import flop_counter

    model, processor = build_preset("tiny-qwen2.5-vl", pmod=None)
    a = load_arch("tiny-qwen2.5-vl")
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTION}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=[demo_image(90, 40), demo_image(90, 40, seed=1)], text=[text], return_tensors="pt")
    layout = vision_layout(a, (90, 40), images=2)
    V = int((inputs["input_ids"] == a.image_token_id).sum())
    assert V == layout.vision_tokens
    with torch.no_grad(), flop_counter() as fc:
        model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    assert fc.get_total_flops() == vision_flops(a, layout).total
    rows = profile("tiny", ["baseline", "p-MoD-0.5"], [Scenario((64, 48), text_tokens=20, images=3)], latency="on",
                   repeats=1, warmup=0, recipe=None)
    assert all(r.prefill_latency_ms and r.flops_check_rel_err == 0 and r.images == 3 for r in rows)
    assert rows[0].vision_tokens == 3 * vision_layout(load_arch("tiny"), (64, 48)).vision_tokens


def test_cli_prints_the_table(capsys):
    from pmod_bench.cli import main

    assert main(["profile", "--arch", "llava-onevision-7b", "--image-size", "672x672", "1344x1008", "--images", "1", "2",
                 "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert "llava-onevision-7b · 672x672 image -> 4 high-resolution tile(s) of 384x384" in out and "3,699 vision tokens" in out
    assert "downsampled to 70x93 (anyres_max_9) -> 7,309 vision tokens" in out
    assert "2 x 1344x1008 images, each resized to 384x384 (1 tile) -> 1,460 vision tokens" in out
    table = [line.split() for line in out.splitlines() if line.split()[:1] in (["baseline"], ["p-MoD-0.5"])]
    assert [cells[1] for cells in table] == ["54.70", "29.02", "20.74", "11.38", "117.93", "60.89", "20.74", "11.38"]


@pytest.mark.slow
def test_cli_verified_run_writes_rows(tmp_path):
    from pmod_bench.cli import main

    js = tmp_path / "ov.json"
    argv = ["profile", "--arch", "llava-onevision-0.5b", "llava-onevision-72b", "--image-size", "1344x1008", "640x480",
            "--images", "1", "3", "--shift", "0.5", "--json", str(js)]
    assert main(argv) == 0
    doc = json.loads(js.read_text())
    rows = doc["rows"]
    assert len(rows) == 2 * 2 * 2 * 2 and all(r["flops_check_rel_err"] == 0 for r in rows)
    assert {(r["image_size"][0], r["images"], r["vision_tokens"]) for r in rows} == {
        (1344, 1, 7309), (640, 1, 2929), (1344, 3, 2190), (640, 3, 2190)}
    assert "--images 1 3" in doc["command"]


@pytest.mark.parametrize("argv, needle", [
    (["--images", "0"], "--images must be a whole number in 1..64"),
    (["--arch", "llava-next-7b", "--images", "2", "--method", "fastv"], "one image per prompt; drop --images 2"),
    (["--method", "fastervlm"], "LLaVA-OneVision's tower has no [CLS] token"),
    (["--latency"], "on CPU would take minutes per forward"),  # a 7B: image prompts are timed on a GPU
    (["--max-pixels", "1000000"], "Qwen2.5-VL's resize range"),
    (["--arch", "llava-onevision-7bb"], "Did you mean 'llava-onevision-7b'"),
])
def test_cli_bad_flags_one_line(argv, needle, capsys):
    check_profile_refuses(argv, needle, capsys, "llava-onevision-7b")


def test_auto_latency_on_cpu_times_only_the_tiny_archs():
    """``--latency auto`` on CPU times the tiny archs but not a 0.5B LLM over thousands of vision tokens (minutes a
    forward: it once held a profile of llava-onevision-0.5b for many minutes); ``--latency`` still times it when asked."""
    from pmod_bench.profiler.arch import load_arch
    from pmod_bench.profiler.core import _want_latency

    assert _want_latency("auto", load_arch("tiny-llava-onevision"), "cpu", []) == (True, None)
    timed, note = _want_latency("auto", load_arch("llava-onevision-0.5b"), "cpu", [])
    assert not timed and "unless asked (--latency" in note
    assert _want_latency(True, load_arch("llava-onevision-0.5b"), "cpu", []) == (True, None)
    assert _want_latency("auto", load_arch("llava-onevision-0.5b"), "cuda:0", []) == (True, None)
