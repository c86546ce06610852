"""p-MoD on video prompts, on the tiny Qwen2.5-VL and LLaVA-OneVision hosts, with generated clips (a few frames of
numpy pixels through each host's own processor).

What must hold (issue 25): the video's tokens are the routing target exactly as an image's are (Qwen: the
``<|video_pad|>`` positions, ``video_grid_thw.prod() / 4`` per clip; OneVision: the ``<video>`` positions, every
frame's pooled map and one newline); cached decode == a full recompute (Qwen's M-RoPE temporal rows, from
``video_grid_thw`` and ``second_per_grid_ts``, reach the sparse layers at prefill and through ``rope_deltas`` at
decode); a batch of clips == each clip alone (Qwen: clips of different lengths and sizes; OneVision: HF's model stacks
``pixel_values_videos`` as (B, frames, ...), so one batch holds clips of one frame count, as lmms-eval's 32-frame
sampling gives it); and the prefill FLOPs of a real p-MoD forward (FlopCounterMode) are the profiler's analytic
count for the video layout (:mod:`pmod_bench.profiler.video`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TinyHost, check_several_images_decode
from pmod_bench import PMoDConfig
from pmod_bench.model.modeling import to_pmod
from pmod_bench.model.presets import demo_image, random_routers

QWEN, OV = TinyHost("qwen2_5_vl"), TinyHost("llava_onevision")
QUESTIONS = ("What happens in the video?", "Which way does the red disc move, left or right? Answer in one word.")


def clip(frames: int, size=(64, 48), seed: int = 0) -> np.ndarray:
    """(frames, H, W, 3) uint8: a generated clip (each frame one of the demo images)."""
    return np.stack([np.asarray(demo_image(*size, seed=seed + i)) for i in range(frames)])


def video_batch(host: TinyHost, clips: list, questions=QUESTIONS, padding_side: str = "left"):
    """One prompt per clip (a video, then a question), through the host's processor; left-padded."""
    proc = host.processor
    prompts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": q}]}],
                                        add_generation_prompt=True) for q in questions[:len(clips)]]
    return proc(videos=list(clips), text=prompts, return_tensors="pt", padding=True, padding_side=padding_side)


def pmod_model(vanilla, shift: float = 0.3, seed: int = 5):
    model = to_pmod(vanilla, PMoDConfig(shift=shift))
    random_routers(model, seed=seed)
    return model


def qwen_alone(batch, i: int) -> dict:
    """Sample ``i`` of a Qwen video batch alone: padding removed, its clip's patches and grid only."""
    keep = batch["attention_mask"][i].bool()
    per_clip = batch["video_grid_thw"].prod(-1).tolist()
    start = sum(per_clip[:i])
    return {"input_ids": batch["input_ids"][i:i + 1, keep], "attention_mask": batch["attention_mask"][i:i + 1, keep],
            "mm_token_type_ids": batch["mm_token_type_ids"][i:i + 1, keep],
            "pixel_values_videos": batch["pixel_values_videos"][start:start + per_clip[i]],
            "video_grid_thw": batch["video_grid_thw"][i:i + 1], "second_per_grid_ts": batch["second_per_grid_ts"][i:i + 1]}


def onevision_alone(batch, i: int) -> dict:
    keep = batch["attention_mask"][i].bool()
    return {"input_ids": batch["input_ids"][i:i + 1, keep], "attention_mask": batch["attention_mask"][i:i + 1, keep],
            "pixel_values_videos": batch["pixel_values_videos"][i:i + 1]}


def check_batch_equals_alone(model, batch, alone, n: int) -> None:
    """Greedy generate on the batch: every step's logits of sample i equal those of sample i alone."""
    with torch.no_grad():
        together = model.generate(**batch, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
        for i in range(n):
            single = model.generate(**alone(batch, i), max_new_tokens=3, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True)
            for t, (a, b) in enumerate(zip(together.logits, single.logits)):
                assert (a[i] - b[0]).abs().max() < 1e-4, (i, t)


def check_routing_target(model, batch, V: list) -> None:
    """One prefill: every p-MoD layer's target is each sample's V video tokens, and it keeps trunc(V * ratio) of them."""
    with torch.no_grad(), model.record_routing() as rec:
        model(**batch)
    assert sorted(int(k) for k in rec) == sorted(model.pmod_layers)
    for idx, r in rec.items():
        ratio = torch.tensor(model.pmod_layers[int(idx)].ratio, dtype=torch.float32)
        assert r["target"].sum(1).tolist() == V
        assert r["selected"].sum(1).tolist() == [int(torch.tensor(v, dtype=torch.float32) * ratio) for v in V], idx


# ------------------------------------------------------------------------------------------- Qwen2.5-VL
@pytest.fixture(scope="module")
def qwen():
    return QWEN.build()


@pytest.fixture(scope="module")
def qwen_clips():
    """Two clips of different lengths and frame sizes: 4 frames of 64x48 and 7 frames of 80x40 (an odd count: the
    processor pads the last pair with its last frame)."""
    return video_batch(QWEN, [clip(4), clip(7, (80, 40), seed=3)])


def test_qwen_video_tokens_are_the_routing_target(qwen, qwen_clips, one_thread):
    cfg = qwen.config
    grids = qwen_clips["video_grid_thw"].tolist()
    assert grids == [[2, 8, 10], [4, 6, 12]]  # frame pairs x patches (smart_resize to the tiny min_pixels)
    V = [t * h * w // 4 for t, h, w in grids]
    ids = qwen_clips["input_ids"]
    assert (ids == cfg.video_token_id).sum(1).tolist() == V and not (ids == cfg.image_token_id).any()
    assert ((qwen_clips["mm_token_type_ids"] == 2) == (ids == cfg.video_token_id)).all()  # video = modality 2 in M-RoPE
    model = pmod_model(qwen)
    assert QWEN.vision(model, ids).sum(1).tolist() == V
    check_routing_target(model, qwen_clips, V)


def test_qwen_video_decode_equals_recompute(qwen, qwen_clips, one_thread):
    """Cached decode (rope_deltas from the video's M-RoPE rows) == a full recompute over the generated sequence."""
    check_several_images_decode(QWEN, pmod_model(qwen), qwen_clips)


def test_qwen_clips_of_different_lengths_batch_equals_alone(qwen, qwen_clips, one_thread):
    check_batch_equals_alone(pmod_model(qwen), qwen_clips, qwen_alone, 2)


def test_qwen_temporal_positions_reach_the_sparse_layers(qwen, one_thread):
    """The video's temporal M-RoPE row steps by ``tokens_per_second * second_per_grid_t`` per frame pair (HF's
    get_rope_index); a p-MoD model at ratio 1 everywhere with zero routers gives the vanilla logits at those positions,
    and another frame interval (``second_per_grid_ts``) changes the routed model's logits. (The processor's own default
    for a bare frame array, 24 fps, gives 2/24 s a pair: every pair at one temporal position on the tiny config.)"""
    batch = video_batch(QWEN, [clip(6)], questions=QUESTIONS[:1])
    batch["second_per_grid_ts"] = torch.tensor([1.0])  # frames read at 2 fps (qwen-vl-utils' default), paired
    model = pmod_model(qwen, shift=0.5)
    pos, _ = qwen.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                       video_grid_thw=batch["video_grid_thw"], second_per_grid_ts=batch["second_per_grid_ts"])
    video = batch["input_ids"][0] == qwen.config.video_token_id
    t_rows = pos[0, 0, video].view(3, -1)  # (pairs, tokens of one pair): one temporal position per pair
    step = qwen.config.vision_config.tokens_per_second * float(batch["second_per_grid_ts"][0])
    assert (t_rows == t_rows[:, :1]).all()
    assert (t_rows[1:, 0] - t_rows[:-1, 0]).tolist() == [int(step)] * 2 and int(step) > 0
    with torch.no_grad():
        routed = model(**batch).logits
        slower = model(**dict(batch, second_per_grid_ts=batch["second_per_grid_ts"] * 4)).logits
        intact = to_pmod(qwen, PMoDConfig(shift=0.5))  # zero routers
        intact.set_pmod_ratios(ratios=[1.0] * len(intact.layer_ratios()))
        assert (intact(**batch).logits - qwen(**batch).logits).abs().max() < 1e-5
    assert (routed - slower).abs().max() > 1e-4


def test_qwen_image_and_video_in_one_prompt_are_one_target(qwen, one_thread):
    """A prompt holding an image and a clip: p-MoD routes the image's and the video's tokens as one target (k =
    trunc((V_image + V_video) * ratio)), and cached decode == recompute with both M-RoPE blocks."""
    proc = QWEN.processor
    content = [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Is the disc of the image in the video?"}]
    prompt = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    batch = proc(images=[demo_image(64, 48, seed=9)], videos=[clip(4, (80, 40))], text=[prompt], return_tensors="pt")
    ids, cfg = batch["input_ids"], qwen.config
    V_image, V_video = int((ids == cfg.image_token_id).sum()), int((ids == cfg.video_token_id).sum())
    assert (V_image, V_video) == (20, 2 * 6 * 12 // 4)
    model = pmod_model(qwen)
    check_routing_target(model, batch, [V_image + V_video])
    check_several_images_decode(QWEN, model, batch)


@pytest.mark.parametrize("frames, size", [(4, (64, 48)), (5, (90, 50))])
def test_qwen_video_prefill_flops_are_analytic(qwen, one_thread, frames, size):
    """FlopCounterMode over one real forward (tower over every frame pair, merger, the LLM) of the vanilla and the p-MoD
    model on frames sized as the profiler sizes them (:func:`pmod_bench.profiler.qwen.video_frame_size`) == the
    profiler's analytic count for ``--frames N --frame-size WxH``."""
    from pmod_bench.profiler.arch import load_arch, vision_layout
    from pmod_bench.profiler.video import Video

    arch = load_arch("tiny-qwen2.5-vl")
    layout = vision_layout(arch, size, video=Video(frames=frames))
    batch = video_batch(QWEN, [clip(frames, layout.resized)], questions=QUESTIONS[:1])
    assert batch["video_grid_thw"].tolist() == [[layout.temporal, *layout.patches]]
    check_prefill_flops(arch, layout, batch, qwen, arch.config.video_token_id)


def check_prefill_flops(arch, layout, batch, vanilla, video_token_id: int) -> None:
    """The vanilla and a p-MoD-0.5 forward of ``batch`` (one prompt) count the analytic vision + LLM prefill FLOPs."""
    from pmod_bench.profiler.counters import flop_counter
    from pmod_bench.profiler.flops import llm_prefill_flops, vision_flops
    from pmod_bench.profiler.variants import Baseline, PMoD, make_pmod_config

    V = int((batch["input_ids"] == video_token_id).sum())
    T = batch["input_ids"].shape[1] - V
    assert V == layout.vision_tokens
    L, vis = arch.text.layers, vision_flops(arch, layout).total
    for variant, model in ((Baseline(), vanilla), (PMoD(make_pmod_config(shift=0.5)), pmod_model(vanilla, shift=0.5))):
        with torch.no_grad(), flop_counter() as fc:
            model(**batch, logits_to_keep=1)
        llm = llm_prefill_flops(arch.text, T, V, variant.kept_vision_tokens(L, V), variant.router_layers(L), logits_tokens=1)
        assert fc.get_total_flops() == vis + llm.total(), variant.name


# -------------------------------------------------------------------------------------- LLaVA-OneVision
@pytest.fixture(scope="module")
def onevision():
    return OV.build()


@pytest.fixture(scope="module")
def ov_clips():
    """Two 4-frame clips (frame sizes differ; each frame becomes one tile) behind questions of different lengths."""
    return video_batch(OV, [clip(4), clip(4, (80, 40), seed=3)])


def test_onevision_video_tokens_are_the_routing_target(onevision, ov_clips, one_thread):
    """4 frames of 4x4 SigLIP features pooled 2x2, then one newline: 17 ``<video>`` tokens a clip, all routed."""
    ids = ov_clips["input_ids"]
    V = [4 * 2 * 2 + 1] * 2
    assert (ids == onevision.config.video_token_id).sum(1).tolist() == V
    assert not (ids == onevision.config.image_token_id).any()
    model = pmod_model(onevision)
    assert OV.vision(model, ids).sum(1).tolist() == V
    check_routing_target(model, ov_clips, V)


def test_onevision_video_decode_equals_recompute(onevision, ov_clips, one_thread):
    check_several_images_decode(OV, pmod_model(onevision), ov_clips)


def test_onevision_clips_batch_equals_alone(onevision, ov_clips, one_thread):
    check_batch_equals_alone(pmod_model(onevision), ov_clips, onevision_alone, 2)


@pytest.mark.parametrize("frames", [2, 6])
def test_onevision_video_prefill_flops_are_analytic(one_thread, frames):
    """SigLIP over every frame's tile, the projector, the pooling (no products) and the LLM, vanilla and p-MoD (the
    ``tiny-llava-onevision`` preset, the profiler's tiny arch)."""
    from pmod_bench.model.presets import build_preset
    from pmod_bench.profiler.arch import load_arch, vision_layout
    from pmod_bench.profiler.video import Video

    arch = load_arch("tiny-llava-onevision")
    layout = vision_layout(arch, (90, 50), video=Video(frames=frames))
    batch = video_batch(OV, [clip(frames, (90, 50))], questions=QUESTIONS[:1])
    check_prefill_flops(arch, layout, batch, build_preset(OV.preset, pmod=None)[0], arch.config.video_token_id)


# ------------------------------------------------------------------------------------------- video latency
@pytest.mark.parametrize("arch_name, pixels", [
    # 60x40 frames -> 140x112 (the tiny min_pixels): 8x10 patches, 2 pairs of frames, 2 x 4x5 merged tokens
    ("tiny-qwen2.5-vl", {"pixel_values_videos": (2 * 2 * 8 * 10, 3 * 2 * 14 * 14), "video_grid_thw": (2, 3),
                         "second_per_grid_ts": (2,), "mm_token_type_ids": (2, 20 + 2 * 4 * 5)}),
    ("tiny-llava-onevision", {"pixel_values_videos": (2, 4, 3, 32, 32)}),
])
def test_synthetic_video_batch_is_what_the_model_takes(arch_name, pixels, one_thread):
    """``profile --frames N --latency`` feeds each model B clips of its video layout: the host's video pixel inputs (the
    processor's shapes) and exactly ``vision_tokens`` placeholders a row, which the real model's forward accepts (it
    refuses a count unlike the features it computes)."""
    from pmod_bench.model.presets import build_preset
    from pmod_bench.profiler.arch import load_arch, vision_layout
    from pmod_bench.profiler.video import Video, synthetic_video_batch

    arch = load_arch(arch_name)
    layout = vision_layout(arch, (60, 40), video=Video(frames=4))
    batch = synthetic_video_batch(arch, layout, text_tokens=20, batch_size=2)
    assert {k: tuple(v.shape) for k, v in batch.items() if k not in ("input_ids", "attention_mask")} == pixels
    ids = batch["input_ids"]
    assert ids.shape == (2, 20 + layout.vision_tokens) and batch["attention_mask"].all()
    assert (ids == arch.config.video_token_id).sum(1).tolist() == [layout.vision_tokens] * 2
    if "video_grid_thw" in batch:
        assert batch["video_grid_thw"].tolist() == [[layout.temporal, *layout.patches]] * 2
    model, _ = build_preset(arch_name, pmod=None)
    with torch.no_grad():
        assert model(**batch, logits_to_keep=1).logits.shape[:2] == (2, 1)


@pytest.mark.slow
def test_profile_times_video_rows_on_both_hosts(tmp_path, one_thread):
    """`pmod-bench profile --arch tiny-qwen2.5-vl tiny-llava-onevision --frames 2 6 --latency`: every row (host x frame
    count x variant) timed on real tiny forwards of its video batch, prefill and decode, with its latency ratio against
    the baseline of the same frame count; FLOPs still checked."""
    import json

    from pmod_bench.cli import main

    js = tmp_path / "video.json"
    assert main(["profile", "--arch", "tiny-qwen2.5-vl", "tiny-llava-onevision", "--frames", "2", "6", "--frame-size",
                 "60x40", "--shift", "0.5", "--latency", "--warmup", "0", "--repeats", "1", "--gen-tokens", "3",
                 "--text-tokens", "12", "-q", "--json", str(js)]) == 0
    rows = json.loads(js.read_text())["rows"]
    assert sorted((r["arch"], r["frames"], r["variant"]) for r in rows) == sorted(
        (a, n, v) for a in ("tiny-qwen2.5-vl", "tiny-llava-onevision") for n in (2, 6) for v in ("baseline", "p-MoD-0.5"))
    for r in rows:
        assert r["prefill_latency_ms"] > 0 and r["decode_latency_ms_per_token"] > 0 and r["latency_note"] is None, r
        assert r["latency_repeats"] == 1 and r["latency_dtype"] == "float32" and r["flops_check_rel_err"] == 0
        assert r["latency_ratio"] == (1.0 if r["variant"] == "baseline" else r["latency_ratio"]) and r["latency_ratio"] > 0
    tokens = {(r["arch"], r["frames"]): r["vision_tokens"] for r in rows}
    assert tokens["tiny-llava-onevision", 6] == 6 * 4 + 1 and tokens["tiny-qwen2.5-vl", 6] == 3 * tokens["tiny-qwen2.5-vl", 2]
