"""The profiler on video prompts (Qwen2.5-VL, LLaVA-OneVision): frames and vision tokens against the real tiny
processors + models and lmms-eval's own Qwen path on a generated clip (qwen-vl-utils' frame budget, lmms-eval's
32-frame cap), analytic FLOPs against FlopCounterMode (meta device at 7B and tiny shapes, and a real forward), the rows
and the CLI."""

from __future__ import annotations

import json

import pytest

from conftest import check_profile_refuses
from pmod_bench.profiler.arch import load_arch, vision_layout
from pmod_bench.profiler.flops import llm_prefill_flops, vision_flops
from pmod_bench.profiler.variants import Baseline, PMoD, make_pmod_config
from pmod_bench.profiler.video import Video, lmms_eval_frames, qwen_frames

VARIANTS = (Baseline(), PMoD(make_pmod_config(shift=0.5)))
QUESTION = "What happens in the video?"


@pytest.fixture(scope="module")
def qwen7b():
    return load_arch("qwen2.5-vl-7b")


@pytest.fixture(scope="module")
def ov7b():
    return load_arch("llava-onevision-7b")


@pytest.mark.parametrize("frames, tokens", [(8, 4 * 299), (16, 8 * 299), (32, 16 * 299), (64, 32 * 299), (7, 4 * 299)])
def test_qwen_video_tokens_7b(qwen7b, frames, tokens):
    """640x360 frames -> 644x364 (13 x 23 merged patches), paired: an odd count is padded with its last frame."""
    layout = vision_layout(qwen7b, (640, 360), video=Video(frames=frames))
    assert (layout.frames, layout.temporal, layout.resized, layout.vision_tokens) == (frames, -(-frames // 2), (644, 364), tokens)
    assert vision_flops(qwen7b, layout).total == layout.temporal * vision_flops(qwen7b, vision_layout(qwen7b, (644, 364))).total


@pytest.mark.parametrize("video, size, read, frames, resized", [
    (Video(duration_s=10), (640, 360), 20, 20, (644, 364)),  # 2 fps, under lmms-eval's 32
    (Video(duration_s=60), (640, 360), 120, 32, (644, 364)),  # 120 read, 32 kept
    (Video(duration_s=60), (1280, 720), 120, 32, (1008, 560)),  # qwen-vl-utils' 768 tokens a frame at most
    (Video(duration_s=600), (1280, 720), 768, 32, (644, 336)),  # 768 read: each frame's share of the budget shrinks it
    (Video(duration_s=600, fps=0.5, max_frames=64), (1280, 720), 300, 64, (1008, 560)),
    (Video(frames=1200), (640, 360), 1200, 1200, (616, 364)),  # shrunk to 588x336 < min_pixels, scaled back up
    (Video(duration_s=1), (640, 360), 4, 4, (644, 364)),  # qwen-vl-utils reads 4 frames at least
])
def test_qwen_clip_sampling_7b(qwen7b, video, size, read, frames, resized):
    layout = vision_layout(qwen7b, size, video=video)
    assert (layout.frames_read, layout.frames, layout.resized) == (read, frames, resized)
    assert layout.vision_tokens == -(-frames // 2) * (resized[0] // 28) * (resized[1] // 28)


def test_lmms_eval_frame_cap():
    """lmms-eval's linspace / unique / last-frame rule keeps min(read, max_num_frames) frames."""
    assert [lmms_eval_frames(n, 32) for n in (4, 20, 31, 32, 33, 120, 768)] == [4, 20, 31, 32, 32, 32, 32]
    assert lmms_eval_frames(100, 7) == 7 and qwen_frames(Video(frames=9)) == (9, 9)


def _cv2_reader(ele):
    """qwen-vl-utils' reader contract (``_read_video_decord``: smart_nframes, rounded linspace indices) over OpenCV:
    this machine has neither decord nor torchcodec, and torchvision dropped ``read_video``."""
    import cv2
    import numpy as np
    import torch
    from qwen_vl_utils.vision_process import smart_nframes

    cap = cv2.VideoCapture(ele["video"])
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    fps = cap.get(cv2.CAP_PROP_FPS)
    cap.release()
    total = len(frames)
    nframes = smart_nframes(ele, total_frames=total, video_fps=fps)
    idx = torch.linspace(0, total - 1, nframes).round().long().tolist()
    video = torch.from_numpy(np.stack([frames[i] for i in idx])).permute(0, 3, 1, 2)
    return video, {"fps": fps, "frames_indices": idx, "total_num_frames": total}, nframes / total * fps


def _lmms_eval_qwen_inputs(processor, clip: str, min_pixels: int, max_pixels: int):
    """What lmms-eval 0.7.3's ``qwen2_5_vl.generate_until`` hands the model for one video: ``process_vision_info`` on
    its message (min / max pixels of the model), its 32-frame cap, then the processor."""
    import numpy as np
    from qwen_vl_utils import process_vision_info

    content = [{"type": "video", "video": clip, "max_pixels": max_pixels, "min_pixels": min_pixels},
               {"type": "text", "text": QUESTION}]
    messages = [[{"role": "user", "content": content}]]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    _, videos = process_vision_info(messages)
    total = videos[0].shape[0]
    indices = np.unique(np.linspace(0, total - 1, 32, dtype=int))
    if total - 1 not in indices:
        indices = np.unique(np.append(indices, total - 1))
    videos[0] = videos[0][indices]
    return processor(text=text, videos=videos, padding=True, return_tensors="pt")


@pytest.mark.slow
@pytest.mark.parametrize("seq_len, per_pair", [(128000, 6 * 10), (1000, 5 * 8)])
def test_qwen_tokens_and_flops_follow_lmms_evals_path(tmp_path, monkeypatch, seq_len, per_pair):
    """A 20 s clip at 30 fps through lmms-eval's own Qwen path: qwen-vl-utils reads 40 frames at 2 fps and sizes each
    for that count (its budget binds with a small MODEL_SEQ_LEN), lmms-eval keeps 32, the tiny processor pairs them:
    the <|video_pad|> count, the grid and the real model's FLOPs are the profiler's."""
    import qwen_vl_utils.vision_process as qvu
    import torch

    from pmod_bench.model.presets import TINY_QWEN_MAX_PIXELS, TINY_QWEN_MIN_PIXELS, build_preset
    from pmod_bench.profiler.counters import flop_counter
    from pmod_bench.tasks.fixtures import write_clip

    clip = write_clip(tmp_path / "clip.mp4", seconds=20, size=(320, 180), fps=30)
    monkeypatch.setitem(qvu.VIDEO_READER_BACKENDS, "cv2", _cv2_reader)
    monkeypatch.setattr(qvu, "get_video_reader_backend", lambda: "cv2")
    monkeypatch.setattr(qvu, "MODEL_SEQ_LEN", seq_len)
    model, processor = build_preset("tiny-qwen2.5-vl", pmod=None)
    arch = load_arch("tiny-qwen2.5-vl")
    inputs = _lmms_eval_qwen_inputs(processor, str(clip), TINY_QWEN_MIN_PIXELS, TINY_QWEN_MAX_PIXELS)
    layout = vision_layout(arch, (320, 180), video=Video(duration_s=20))
    V = int((inputs["input_ids"] == arch.config.video_token_id).sum())
    assert (layout.frames_read, layout.frames, layout.vision_tokens) == (40, 32, 16 * per_pair) and V == layout.vision_tokens
    assert inputs["video_grid_thw"].tolist() == [[16, *layout.patches]]
    T = inputs["input_ids"].shape[1] - V
    with torch.no_grad(), flop_counter() as fc:
        model(**inputs, logits_to_keep=1)
    llm = llm_prefill_flops(arch.text, T, V, [V] * arch.text.layers, logits_tokens=1).total()
    assert fc.get_total_flops() == vision_flops(arch, layout).total + llm


def _onevision_inputs(processor, frames: int, size: tuple[int, int]):
    import numpy as np

    from pmod_bench.model.presets import demo_image

    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}],
                                         add_generation_prompt=True)
    video = np.stack([np.asarray(demo_image(*size, seed=i)) for i in range(frames)])
    return processor(videos=[video], text=[text], return_tensors="pt")


@pytest.mark.parametrize("frames", [1, 4, 9])
def test_onevision_tokens_and_flops_match_the_real_tiny_model(frames):
    """Each frame one 32 px tile (4x4 features pooled to 2x2), one newline: the processor's <video> count, accepted by
    the real model's forward (which refuses a count unlike its features), and that forward's FLOPs are the profiler's."""
    import torch

    from pmod_bench.model.presets import build_preset
    from pmod_bench.profiler.counters import flop_counter

    model, processor = build_preset("tiny-llava-onevision", pmod=None)
    arch = load_arch("tiny-llava-onevision")
    inputs = _onevision_inputs(processor, frames, (90, 50))
    layout = vision_layout(arch, (90, 50), video=Video(frames=frames))
    V = int((inputs["input_ids"] == arch.config.video_token_id).sum())
    assert V == layout.vision_tokens == frames * 4 + 1 and layout.pooled == (2, 2) and layout.tiles == frames
    T = inputs["input_ids"].shape[1] - V
    with torch.no_grad(), flop_counter() as fc:
        model(**inputs, logits_to_keep=1)
    llm = llm_prefill_flops(arch.text, T, V, [V] * arch.text.layers, logits_tokens=1).total()
    assert fc.get_total_flops() == vision_flops(arch, layout).total + llm


def test_onevision_tokens_7b_match_the_hub_processor_geometry(ov7b):
    """196 pooled tokens a frame + 1 at 7B, as the processor at the hub's geometry counts them; any clip: 32 frames."""
    from pmod_bench.model.presets import tiny_onevision_tokenizer
    from pmod_bench.model.processors import llava_onevision_processor

    proc = llava_onevision_processor(tiny_onevision_tokenizer(), tile=384, pinpoints=ov7b.grid_pinpoints, num_image_tokens=729)
    counts = [8, 16, 32, 64]
    counted = proc._get_num_multimodal_tokens(video_sizes=[(n, 360, 640) for n in counts])["num_video_tokens"]
    assert counted == [vision_layout(ov7b, (640, 360), video=Video(frames=n)).vision_tokens for n in counts] == [
        196 * n + 1 for n in counts]
    assert vision_layout(ov7b, (1280, 720), video=Video(duration_s=600)).frames == 32


@pytest.mark.parametrize("arch_name, video", [("qwen2.5-vl-7b", Video(frames=8)), ("qwen2.5-vl-7b", Video(duration_s=600)),
                                              ("llava-onevision-7b", Video(frames=8))])
def test_analytic_equals_flopcountermode_meta_7b(arch_name, video):
    """Tower over every frame (pair), projector / merger and the LLM prefill of the 7B shapes, exactly."""
    from pmod_bench.profiler.counters import count_flops_meta

    a, T, size = load_arch(arch_name), 58, (1280, 720)
    layout = vision_layout(a, size, video=video)
    V = layout.vision_tokens
    vis = vision_flops(a, layout)
    for v in VARIANTS:
        kept = v.kept_vision_tokens(a.text.layers, V)
        ana = llm_prefill_flops(a.text, T, V, kept, v.router_layers(a.text.layers), logits_tokens=1)
        meta = count_flops_meta(a, v, size, T, logits_tokens=1, decode=False, video=video)
        assert (meta.prefill_llm, meta.vision_encoder, meta.projector) == (ana.total(), vis.encoder, vis.projector), v.name


@pytest.mark.parametrize("arch_name", ["tiny-qwen2.5-vl", "tiny-llava-onevision"])
def test_analytic_equals_flopcountermode_meta_tiny_batch(arch_name):
    from pmod_bench.profiler.counters import count_flops_meta

    a, T, video = load_arch(arch_name), 30, Video(frames=5)
    layout = vision_layout(a, (90, 50), video=video)
    vis = vision_flops(a, layout)
    for v in VARIANTS:
        kept = v.kept_vision_tokens(a.text.layers, layout.vision_tokens)
        ana = llm_prefill_flops(a.text, T, layout.vision_tokens, kept, v.router_layers(a.text.layers), logits_tokens=1)
        meta = count_flops_meta(a, v, (90, 50), T, batch_size=2, logits_tokens=1, decode=False, video=video)  # per sample
        assert (meta.prefill_llm, meta.vision) == (ana.total(), vis.total), v.name


def test_rows_kv_and_frames(qwen7b):
    from pmod_bench.profiler.core import Scenario, profile

    rows = profile(qwen7b, ["baseline", "p-MoD-0.5"], [Scenario((640, 360), video=Video(frames=32))], latency="off",
                   hardware="H100-SXM", verify=True, recipe=None)
    base, pmod = rows
    assert (base.frames, base.frames_read, base.video_grid, base.vision_tokens, base.images) == (32, 32, [16, 13, 23], 4784, 1)
    assert base.video_duration_s is None and base.video_fps is None and not base.paper_scenario
    per_entry = 2 * 4 * 128 * 2  # K and V, 4 KV heads of 128, bf16
    assert base.kv_cache_bytes == 28 * (58 + 4784) * per_entry
    assert pmod.kv_cache_bytes == sum(58 + k for k in pmod.kept_vision_tokens) * per_entry
    assert base.flops_check_rel_err == 0 == pmod.flops_check_rel_err and 0.5 < pmod.tflops_ratio < 0.55
    assert base.vision_tflops == pytest.approx(16 * vision_flops(qwen7b, vision_layout(qwen7b, (644, 364))).total / 1e12)
    assert base.prefill_floor_ms is not None


def test_cli_one_row_per_frame_count(tmp_path, capsys):
    from pmod_bench.cli import main

    js = tmp_path / "v.json"
    argv = ["profile", "--arch", "qwen2.5-vl-7b", "llava-onevision-7b", "--frames", "8", "16", "32", "64", "--frame-size",
            "640x360", "--shift", "0.3", "0.5", "--no-verify", "--no-latency", "--json", str(js)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-vl-7b · 32 frames of 640x360, each resized to 644x364: 16 frame pair(s) of 13x23 merged 28 px" in out
    assert "llava-onevision-7b · 64 frames of 640x360, each resized to 384x384 (1 tile), its features pooled to 14x14" in out
    doc = json.loads(js.read_text())
    rows = doc["rows"]
    assert len(rows) == 2 * 4 * 3 and "--frames 8 16 32 64 --frame-size 640x360" in doc["command"]
    tokens = {(r["arch"], r["frames"]): r["vision_tokens"] for r in rows}
    assert [tokens["qwen2.5-vl-7b", n] for n in (8, 16, 32, 64)] == [1196, 2392, 4784, 9568]
    assert [tokens["llava-onevision-7b", n] for n in (8, 16, 32, 64)] == [1569, 3137, 6273, 12545]
    assert all(r["image_size"] == [640, 360] for r in rows)


def test_cli_duration(tmp_path, capsys):
    from pmod_bench.cli import main

    js = tmp_path / "d.json"
    assert main(["profile", "--arch", "qwen2.5-vl-7b", "--duration", "60", "--frame-size", "1280x720", "--no-verify",
                 "--no-latency", "-q", "--shift", "0.5", "--json", str(js)]) == 0
    base = json.loads(js.read_text())["rows"][0]
    assert (base["video_duration_s"], base["video_fps"], base["frames_read"], base["frames"], base["vision_tokens"]) == (
        60.0, 2.0, 120, 32, 16 * 720)


@pytest.mark.parametrize("argv, needle", [
    (["--arch", "llava-next-7b", "--frames", "8"], "profiled on images; video prompts are profiled on Qwen2.5-VL"),
    (["--frames", "8", "--duration", "60"], "not both"),
    (["--fps", "1"], "--fps describes a video"),
    (["--frames", "8", "--fps", "1"], "drop them"),
    (["--frames", "8", "--images", "2"], "--images is for image prompts"),
    (["--frames", "8", "--image-size", "640x480"], "--image-size is for image prompts"),
    (["--frames", "0"], "--frames must be a whole number in 1..2048"),
    (["--duration", "-3"], "--duration must be seconds"),
    (["--frames", "8", "--method", "dycoke:dp=true"], "dp=true (dynamic KV-cache pruning while decoding) is not implemented"),
    (["--frames", "8", "--latency"], "on CPU would take minutes"),  # a 7B: video prompts are timed on a GPU
    (["--frames", "8", "--frame-size", "5000x10"], "less extreme --frame-size"),
])
def test_cli_bad_video_flags_one_line(argv, needle, capsys):
    check_profile_refuses(argv, needle, capsys, "qwen2.5-vl-7b")


@pytest.mark.slow
def test_report_draws_the_video_tradeoff(tmp_path):
    """`pmod-bench report` on a profile run with video rows: one series per (arch, variant), TFLOPs and KV per frame
    count from the rows, the figure written and linked; the image tables prefer image rows of the same configuration."""
    from pmod_bench.cli import main
    from pmod_bench.reports.figures import video_tradeoff_data
    from pmod_bench.reports.runs import load_runs

    run, out = tmp_path / "prof", tmp_path / "report"
    assert main(["profile", "--arch", "qwen2.5-vl-7b", "llava-onevision-7b", "--frames", "8", "32", "--shift", "0.5",
                 "--no-verify", "--no-latency", "-q", "--output", str(run)]) == 0
    data = video_tradeoff_data(load_runs([run]))
    series = {(s.arch, s.variant): s for s in data.series}
    assert sorted(series) == [(a, v) for a in ("llava-onevision-7b", "qwen2.5-vl-7b") for v in ("baseline", "p-MoD-0.5")]
    rows = {(r["arch"], r["variant"], r["frames"]): r for r in json.loads((run / "profile.json").read_text())["rows"]}
    base = series["qwen2.5-vl-7b", "baseline"]
    assert sorted(base.points) == [8, 32] and base.frame_size == (640, 360)
    assert base.points[32] == (rows["qwen2.5-vl-7b", "baseline", 32]["prefill_tflops"],
                               rows["qwen2.5-vl-7b", "baseline", 32]["kv_cache_bytes"] / 2**30)
    assert main(["report", str(run), "--output", str(out)]) == 0
    assert (out / "figures" / "video_tradeoff.png").stat().st_size > 10_000 and (out / "figures" / "video_tradeoff.pdf").is_file()
    assert "figures/video_tradeoff.png" in (out / "index.md").read_text()


def test_max_num_frames_is_the_max_frames_flag(tmp_path):
    """``profile --max-num-frames`` (pmod-bench eval's name for the budget) is ``--max-frames``: the same frames kept."""
    from pmod_bench.cli import main

    rows = []
    for flag in ("--max-frames", "--max-num-frames"):
        js = tmp_path / f"{flag}.json"
        assert main(["profile", "--arch", "qwen2.5-vl-7b", "--duration", "60", flag, "16", "--no-latency", "--quiet",
                     "--json", str(js)]) == 0
        rows.append(json.loads(js.read_text())["rows"][0])
    assert [(r["frames"], r["frames_read"], r["vision_tokens"]) for r in rows] == [(16, 120, 2392)] * 2
