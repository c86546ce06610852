"""Comparison methods on video: `eval --method M --match p-MoD-0.5` on a video suite, and their profiled latency.

1. ``--match`` on a video suite solves the budget on a clip of the evaluated frame budget (``--match-frames`` /
   ``--match-frame-size``, default 32 frames of 1280x720) and records it as image matches are; the solved spec is
   within 1% of p-MoD-0.5's prefill FLOPs on the 7B architectures (checked with the profiler on the same clip).
2. Wrong combinations (a mixed suite, image flags on a video suite, video flags or a video method on images) exit 2
   with one line and write nothing.
3. ``profile --frames N --latency`` times the method rows on real forwards of the tiny hosts (the method applied to
   a vanilla model sharing the baseline's weights; prefill with the method, decode on its shortened cache).
4. End to end (slow): dycoke at matched FLOPs through lmms-eval on the video fixtures with the tiny Qwen2.5-VL, the
   same answers at batch size 1 and 4.
"""

from __future__ import annotations

import json

import pytest

from pmod_bench.tasks.runner import MATCH_FRAME_SIZE, EvalConfig


def _profiled(arch: str, variants: list, frames: int, size=MATCH_FRAME_SIZE) -> dict:
    """Prefill TFLOPs of ``variants`` on one clip, as ``pmod-bench profile --frames`` counts them."""
    from pmod_bench.profiler.core import Scenario, profile
    from pmod_bench.profiler.video import Video

    rows = profile(arch, variants, [Scenario(size, 58, video=Video(frames=frames))], latency=False, recipe=None, verify=False)
    return {r.variant: r.prefill_tflops for r in rows}


def test_match_on_a_video_suite_solves_on_the_eval_clip(tmp_path):
    from pmod_bench.methods import solve
    from pmod_bench.profiler.video import Video

    cfg = EvalConfig(model="tiny-qwen2.5-vl", suite="video", output=str(tmp_path / "q"), method="fastv", match="p-MoD-0.5")
    mm = cfg.method_match
    assert mm["frames"] == 32 and mm["image_size"] == [1280, 720] and mm["text_tokens"] == 58
    assert mm["arch"] == "tiny-qwen2.5-vl" and mm["target_label"] == "p-MoD-0.5" and mm["rel_err"] <= 0.01
    ref = solve("fastv", "tiny-qwen2.5-vl", (1280, 720), match="p-MoD-0.5", text_tokens=58, video=Video(frames=32))
    assert cfg.method == ref.config.spec() == mm["method_spec"] and cfg.identity()["method"] == cfg.method
    tf = _profiled("tiny-qwen2.5-vl", ["p-MoD-0.5", cfg.method], 32)
    assert abs(tf[cfg.method] / tf["p-MoD-0.5"] - 1) <= 0.01
    # the image budget of the same method is another one (a clip's tokens are not an image's)
    image = EvalConfig(model="tiny-qwen2.5-vl", suite="POPE", output=str(tmp_path / "i"), method="fastv", match="p-MoD-0.5")
    assert "frames" not in image.method_match and image.method_match["method_spec"] != cfg.method
    # another frame budget, as given
    small = EvalConfig(model="tiny-qwen2.5-vl", suite="MVBench", output=str(tmp_path / "s"), method="dycoke",
                       match="p-MoD-0.5", match_frames=8, match_frame_size="640x360")
    assert small.method_match["frames"] == 8 and small.method_match["image_size"] == [640, 360]
    tf = _profiled("tiny-qwen2.5-vl", ["p-MoD-0.5", small.method], 8, (640, 360))
    assert abs(tf[small.method] / tf["p-MoD-0.5"] - 1) <= 0.01


@pytest.mark.slow
@pytest.mark.parametrize("arch, method", [("qwen2.5-vl-7b", "dycoke"), ("qwen2.5-vl-7b", "fastv"),
                                          ("llava-onevision-7b", "dycoke")])
def test_video_match_within_1pct_on_7b(tmp_path, arch, method):
    """Solved to p-MoD-0.5 at the eval clip (32 frames of 1280x720: 11,520 tokens on Qwen2.5-VL-7B, 6,273 on
    LLaVA-OneVision-7B) on both 7B hosts, checked with the profiler on the same clip."""
    cfg = EvalConfig(model=arch, suite="video", output=str(tmp_path / "d"), method=method, match="p-MoD-0.5")
    assert cfg.method.startswith(method + ":") and cfg.method_match["frames"] == 32 and cfg.method_match["rel_err"] <= 0.01
    tf = _profiled(arch, ["baseline", "p-MoD-0.5", cfg.method], 32)
    assert abs(tf[cfg.method] / tf["p-MoD-0.5"] - 1) <= 0.01 and tf[cfg.method] < 0.7 * tf["baseline"]


@pytest.mark.parametrize("extra, message", [
    (["--suite", "VideoMME,POPE", "--method", "fastv", "--match", "p-MoD-0.5"], "mixes video (VideoMME) and image"),
    (["--suite", "video", "--method", "fastv", "--match", "p-MoD-0.5", "--match-image-size", "640x480"],
     "drop --match-image-size"),
    (["--suite", "POPE", "--method", "fastv", "--match", "p-MoD-0.5", "--match-frames", "8"], "use --match-image-size"),
    (["--suite", "POPE", "--method", "dycoke", "--match", "p-MoD-0.5"], "evaluate it on a video suite"),
    (["--suite", "video", "--method", "dycoke", "--match", "p-MoD-0.5", "--match-frames", "0"], "--frames must be"),
    (["--suite", "video", "--method", "dycoke", "--match", "p-MoD-0.5", "--match-frame-size", "big"], "bad image size"),
    (["--suite", "video", "--match-frames", "8"], "add --method NAME"),
])
def test_bad_video_match_exits_2_with_one_line(tmp_path, capsys, extra, message):
    from pmod_bench.cli import main

    out = tmp_path / "run"
    rc = main(["eval", "--model", "tiny-qwen2.5-vl", "--output", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert not out.exists()


# ------------------------------------------------------------------------------------------ profile latency
@pytest.mark.parametrize("arch", ["tiny-qwen2.5-vl", "tiny-llava-onevision"])
def test_method_rows_on_video_are_timed(arch):
    """Every method row of a video scenario is timed (prefill with the method, decode steps on its shortened cache),
    beside the baseline (image rows of methods are timed the same way: tests/test_profiler.py)."""
    from pmod_bench.profiler.core import Scenario, profile
    from pmod_bench.profiler.video import Video

    rows = profile(arch, ["baseline", "dycoke:k=0.5", "fastv:keep=0.5"],
                   [Scenario((64, 48), 8, gen_tokens=3, video=Video(frames=4))], device="cpu", warmup=0, repeats=1)
    base, dycoke, fastv = rows
    assert dycoke.kept_vision_tokens[-1] < base.vision_tokens and fastv.kept_vision_tokens[-1] < base.vision_tokens
    for r in rows:
        assert r.prefill_latency_ms > 0 and r.decode_latency_ms_per_token > 0 and r.latency_repeats == 1
        assert r.latency_note is None and r.latency_ratio is not None and r.latency_dtype == "float32"
    assert base.latency_ratio == 1.0 and dycoke.method_config["method"] == "dycoke"


def test_a_method_model_shares_the_baselines_weights_and_leaves_it_alone():
    from pmod_bench.methods import apply_method
    from pmod_bench.model.presets import build_preset
    from pmod_bench.profiler.core import _sharing_weights

    base, _ = build_preset("tiny-qwen2.5-vl", pmod=None)
    layers = list(base.model.language_model.layers)
    copy = apply_method(_sharing_weights(base), "fastv:keep=0.5")
    assert type(copy) is not type(base) and getattr(base, "applied_method", None) is None
    assert list(base.model.language_model.layers) == layers  # the method wrapped the copy's layers, not these
    own = dict(base.named_parameters())
    shared = dict(copy.named_parameters())
    assert shared and all(any(p is q for q in own.values()) for p in shared.values())
    assert copy.model.language_model.rotary_emb.inv_freq is base.model.language_model.rotary_emb.inv_freq


@pytest.mark.slow
def test_cli_profile_prints_method_latency_on_video(tmp_path, capsys):
    """`profile --frames 4 --method dycoke --latency`: the dycoke row has a TTFT and a decode time (no dash), and its
    JSON row carries them."""
    from pmod_bench.cli import main

    out = tmp_path / "prof"
    rc = main(["profile", "--arch", "tiny-llava-onevision", "--frames", "4", "--method", "dycoke:k=0.5", "--latency",
               "--repeats", "1", "--warmup", "0", "--gen-tokens", "2", "--output", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    line = next(ln for ln in text.splitlines() if ln.startswith("dycoke:k=0.5"))
    assert "–" not in line.split("%")[-1].rsplit(None, 1)[0], line  # TTFT, its range and decode are numbers
    rows = {r["variant"]: r for r in json.loads((out / "profile.json").read_text())["rows"]}
    assert rows["dycoke:k=0.5"]["prefill_latency_ms"] > 0 and rows["dycoke:k=0.5"]["decode_latency_ms_per_token"] > 0


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_dycoke_at_matched_flops_on_video_fixtures_batch_1_equals_4(tmp_path, tmp_path_factory):
    """The tiny Qwen2.5-VL with dycoke solved to p-MoD-0.5 on the eval's 4-frame clips, through lmms-eval on the
    Video-MME and EgoSchema fixtures (2 documents each): the same answers at batch size 1 and 4, the match in run.json
    and every row."""
    pytest.importorskip("lmms_eval")
    pytest.importorskip("decord")
    from conftest import benchmark_data_env
    from conftest import lmms_eval_responses as responses

    from pmod_bench.model.presets import TINY_QWEN_MAX_PIXELS, TINY_QWEN_MIN_PIXELS, build_preset
    from pmod_bench.tasks.plugin import PMoDLlava
    from pmod_bench.tasks.runner import run_eval

    env = benchmark_data_env(tmp_path_factory, ["VideoMME", "EgoSchema"])
    next(env)
    try:
        model, processor = build_preset("tiny-qwen2.5-vl", pmod=None)
        runs, metas, calls = {}, {}, {}
        for bs in (1, 4):
            cfg = EvalConfig(model="tiny-qwen2.5-vl", suite="VideoMME,EgoSchema", output=str(tmp_path / f"b{bs}"), limit=2,
                             batch_size=bs, gen_kwargs="max_new_tokens=3", method="dycoke", match="p-MoD-0.5",
                             match_frames=4)
            lm = PMoDLlava.from_loaded(model, processor, name="tiny-qwen2.5-vl", batch_size=bs, device="cpu",
                                       method=cfg.method, min_pixels=TINY_QWEN_MIN_PIXELS,
                                       max_pixels=TINY_QWEN_MAX_PIXELS, max_num_frames=4)
            out = run_eval(cfg, lm=lm, log=lambda m: None)
            assert out.failures == {} and [r["benchmark"] for r in out.rows] == ["VideoMME", "EgoSchema"]
            runs[bs], calls[bs] = responses(tmp_path / f"b{bs}"), lm.model_calls
            metas[bs] = json.loads((tmp_path / f"b{bs}" / "run.json").read_text())
    finally:
        next(env, None)
    assert len(runs[1]) == 4 and runs[1] == runs[4] and calls[1] == 4 > calls[4]  # batches of two clips
    mm = metas[4]["eval"]["method_match"]
    assert mm["frames"] == 4 and mm["rel_err"] <= 0.01 and mm["method"]["method"] == "dycoke"
    assert metas[4]["eval"]["identity"]["method"] == mm["method_spec"] and mm["method_spec"] != "dycoke"
    summary = json.loads((tmp_path / "b4" / "summary.json").read_text())
    assert all(r["method_match"] == mm and r["method"] == mm["method"] for r in summary["rows"])
