"""DyCoke (pmod_bench/methods/dycoke.py) and the vision-stage methods on video prompts (pmod_bench/methods/video.py), on
the tiny LLaVA-OneVision and Qwen2.5-VL with generated clips: TTM against a transcription of the official code, crafted
clips (a token that changed is kept, the unchanged ones of a pruned frame dropped), cached decode == recompute, a batch
== each clip alone, analytic FLOPs == FlopCounterMode, ``--match p-MoD-0.5`` within 1%, the refusals in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TinyHost
from pmod_bench.methods import MethodError, apply_method, parse_method_spec
from pmod_bench.methods.dycoke import ttm_keep, ttm_plan
from pmod_bench.profiler.video import Video

OV, QW = TinyHost("llava_onevision"), TinyHost("qwen2_5_vl")
QUESTIONS = ("What happens?", "Which shape moves first, and where does it go?")


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def ov():
    return OV.build()


@pytest.fixture(scope="module")
def qw():
    return QW.build()


def _clip(n: int, size=(64, 48), seed: int = 0) -> np.ndarray:
    """(n, h, w, 3) uint8 frames of noise, each its own."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size[1], size[0], 3), dtype=np.uint8)


def _inputs(host: TinyHost, clips: list, questions=QUESTIONS):
    proc = host.processor
    prompts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": q}]}],
                                        add_generation_prompt=True) for q in questions[:len(clips)]]
    return proc(videos=clips, text=prompts, return_tensors="pt", padding=True)


def _method_inputs(model, inputs):
    """The shortened prefill the applied method builds of a video batch (methods/video.py)."""
    from pmod_bench.methods.video import video_method_inputs

    a = model.applied_method
    kwargs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    return video_method_inputs(a.config, a.geometry, model, inputs["input_ids"], kwargs, inputs["attention_mask"])


def _alone(host: TinyHost, batch, i: int) -> dict:
    """Sample ``i`` of a video batch on its own (its video, no padding)."""
    keep = batch["attention_mask"][i].bool()
    out = {"input_ids": batch["input_ids"][i:i + 1, keep], "attention_mask": batch["attention_mask"][i:i + 1, keep]}
    if host is OV:
        return {**out, "pixel_values_videos": batch["pixel_values_videos"][i:i + 1]}
    grid = batch["video_grid_thw"]
    start = int(grid[:i].prod(-1).sum())
    return {**out, "mm_token_type_ids": batch["mm_token_type_ids"][i:i + 1, keep], "video_grid_thw": grid[i:i + 1],
            "second_per_grid_ts": batch["second_per_grid_ts"][i:i + 1],
            "pixel_values_videos": batch["pixel_values_videos"][start:start + int(grid[i].prod())]}


# ------------------------------------------------------------------------------------------------- TTM itself
def _official_ttm(feature: torch.Tensor, P: int, k: float) -> torch.Tensor:
    """KD-TAO/DyCoke@dd746349 ``dycole_ttm`` transcribed (its loops as written; even frame counts > 4)."""
    F, keep_ratio = feature.shape[0] // P, 1 - k
    frames = [feature[i * P:(i + 1) * P] for i in range(F)]
    out = []
    for i in range(0, F - 1, 2):
        sim = torch.nn.functional.cosine_similarity(torch.nn.functional.normalize(frames[i], dim=1),
                                                    torch.nn.functional.normalize(frames[i + 1], dim=1), dim=1)
        out += [frames[i], frames[i + 1][sim.topk(int(keep_ratio * P), largest=False).indices]]
    for i in range(0, F - 4, 4):
        sim = torch.nn.functional.cosine_similarity(frames[i], frames[i + 2], dim=1)
        out[i], out[i + 2] = frames[i], frames[i + 2][sim.topk(int(keep_ratio * P), largest=False).indices]
    return torch.cat(out)


@pytest.mark.parametrize("F, P, k", [(8, 196, 0.7), (32, 49, 0.7), (12, 16, 0.3), (16, 20, 0.95), (6, 9, 0.0)])
def test_ttm_equals_the_official_code(F, P, k):
    x = torch.randn(F * P, 24, generator=torch.Generator().manual_seed(F + P))
    idx = ttm_keep(x.view(F, P, -1), k)
    assert torch.equal(x[idx], _official_ttm(x, P, k))
    assert idx.numel() == sum(ttm_plan(F, P, k))


@pytest.mark.parametrize("F, plan", [(1, "P"), (2, "Pn"), (3, "PnP"), (4, "PnPn"), (5, "PnnnP"), (7, "PnnnPnP"),
                                     (8, "PnnnPnPn"), (9, "PnnnPnnnP")])
def test_ttm_short_and_odd_clips(F, plan):
    """Where the official code fails (an odd count drops its last frame, <= 4 frames stack no similarities): the last
    odd frame kept whole, no second step; frame 6 of 8 whole (the official second step stops before the last window);
    the analytic plan counts what runs."""
    P, k = 10, 0.7
    assert ttm_plan(F, P, k) == [P if c == "P" else 3 for c in plan]
    assert len(ttm_keep(torch.randn(F, P, 8), k)) == sum(ttm_plan(F, P, k))


def test_ttm_keeps_what_changed():
    """Crafted tokens: frame 1 = frame 0 but tokens {2, 5}; frame 2 = frame 0 but {7, 1}; frame 3 = frame 2 but {4, 0}:
    with n = 2 each pruned frame keeps exactly its changed tokens, least similar first; frames 0 and 4 whole."""
    P, d = 10, 16
    g = torch.Generator().manual_seed(0)
    base, other = torch.randn(P, d, generator=g), torch.randn(P, d, generator=g)
    f1, f2 = base.clone(), base.clone()
    f1[[2, 5]] = torch.randn(2, d, generator=g)
    f2[[7, 1]] = torch.randn(2, d, generator=g)
    f3 = f2.clone()
    f3[[4, 0]] = -f2[[4, 0]]                       # similarity -1: the least similar, first
    frames = torch.stack([base, f1, f2, f3, other])
    idx = ttm_keep(frames, 0.75)                   # n = int(0.25 * 10) = 2 (k=0.8: int(1.9999...) = 1, as officially)
    assert ttm_plan(5, P, 0.8)[1] == 1
    per = [sorted((i % P) for i in idx.tolist() if i // P == f) for f in range(5)]
    assert per == [list(range(P)), [2, 5], [1, 7], [0, 4], list(range(P))]


# ------------------------------------------------------------------------------------------- the config
def test_config_refusals_in_one_line():
    cfg = parse_method_spec("dycoke")
    assert (cfg.k, cfg.dp, cfg.stage, cfg.video_only) == (0.7, False, "vision", True)
    assert cfg.official.startswith("KD-TAO/DyCoke@dd7463498203479d0ff6f2d29c4e72928c0af244")
    for spec, needle in [("dycoke:dp=true", "dp=true (dynamic KV-cache pruning while decoding) is not implemented"),
                         ("dycoke:k=1.5", "k must be in [0, 1]")]:
        with pytest.raises(MethodError) as err:
            parse_method_spec(spec)
        assert needle in str(err.value) and "\n" not in str(err.value)
    from pmod_bench.methods.accounting import method_flops
    from pmod_bench.profiler.arch import load_arch

    for call, needle in [(lambda: method_flops(cfg, load_arch("llava-next-7b"), (672, 672), 58, video=Video(frames=8)),
                          "LLaVA-NeXT takes no video prompts here"),
                         (lambda: method_flops(cfg, load_arch("qwen2.5-vl-7b"), (672, 672), 58), "on a video prompt")]:
        with pytest.raises(MethodError) as err:
            call()
        assert needle in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------- crafted clips
def _local_tower(model) -> None:
    """Zero the vision tower's attention outputs: every token's feature then depends on its own pixels only."""
    for name, mod in model.named_modules():
        if name.endswith(("self_attn.out_proj", "attn.proj")) and ("vision" in name or "visual" in name):
            torch.nn.init.zeros_(mod.weight)
            if mod.bias is not None:
                torch.nn.init.zeros_(mod.bias)


def _paint(frame: np.ndarray, block: int, side: int, cols: int, seed: int) -> np.ndarray:
    """``frame`` with the ``side`` px block ``block`` (row-major over ``cols`` columns) repainted with noise."""
    out = frame.copy()
    r, c = divmod(block, cols)
    out[r * side:(r + 1) * side, c * side:(c + 1) * side] = np.random.default_rng(seed).integers(0, 256, (side, side, 3))
    return out


def _crafted(blocks: dict, side: int, cols: int, size: tuple[int, int]) -> list[np.ndarray]:
    """Eight DyCoke frames: 0 and 4 fresh; frame f = (frame ``blocks[f][0]``) with the blocks ``blocks[f][1]`` repainted."""
    a, b = _clip(2, size, seed=5)
    frames = [a, None, None, None, b, None, None, None]
    for f, (src, changed) in blocks.items():
        frames[f] = frames[src]
        for j, blk in enumerate(changed):
            frames[f] = _paint(frames[f], blk, side, cols, seed=10 * f + j)
    return frames


#: frame -> (the frame it copies, the blocks repainted): 1 vs 0, 2 vs 0, 3 vs 2, 5 vs 4, 7 vs 6 are pruned (6 is not:
#: the official second step stops before the last window)
CRAFT = {1: (0, [1]), 2: (0, [3]), 3: (2, [2]), 5: (4, [0]), 6: (4, [1, 2]), 7: (6, [3])}


def test_crafted_clip_onevision_keeps_the_changed_tokens():
    """OneVision (2x2 pooled tokens per 32 px frame, one per 16 px quadrant), k=0.75 (one token of a pruned frame):
    a pruned frame keeps the quadrant that changed; frames 0, 4, 6 whole; the newline last."""
    model = OV.build()
    _local_tower(model)
    clip = np.stack(_crafted(CRAFT, 16, 2, (32, 32)))
    inputs = _inputs(OV, [clip])
    apply_method(model, "dycoke:k=0.75")
    with torch.no_grad():
        mi = _method_inputs(model, inputs)
    want = [0, 1, 2, 3, 4 + 1, 8 + 3, 12 + 2, 16, 17, 18, 19, 20 + 0, 24, 25, 26, 27, 28 + 3, 32]
    assert mi.images[0].selection[0].tolist() == want
    assert int(mi.vision_token_mask.sum()) == len(want)


def test_crafted_clip_qwen_keeps_the_changed_tokens():
    """Qwen2.5-VL: 16 frames of 140x112 -> 8 temporal slices (pairs of equal frames) of 4x5 merged 28 px tokens;
    k=0.95 keeps one token of a pruned slice: the block that changed, at its full-grid M-RoPE position."""
    model = QW.build()
    _local_tower(model)
    craft = {1: (0, [7]), 2: (0, [13]), 3: (2, [2]), 5: (4, [19]), 6: (4, [0, 5]), 7: (6, [11])}
    slices = _crafted(craft, 28, 5, (140, 112))
    inputs = _inputs(QW, [np.stack([f for f in slices for _ in range(2)])])
    assert inputs["video_grid_thw"].tolist() == [[8, 8, 10]]
    apply_method(model, "dycoke:k=0.95")
    with torch.no_grad():
        mi = _method_inputs(model, inputs)
    P = 20
    want = [*range(P), P + 7, 2 * P + 13, 3 * P + 2, *range(4 * P, 5 * P), 5 * P + 19, *range(6 * P, 7 * P), 7 * P + 11]
    assert mi.images[0].selection[0].tolist() == want
    full, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                         video_grid_thw=inputs["video_grid_thw"],
                                         second_per_grid_ts=inputs["second_per_grid_ts"])
    start = int((inputs["input_ids"][0] == model.config.video_token_id).nonzero()[0])
    kept = mi.position_ids[1:, 0][:, mi.vision_token_mask[0]]
    assert torch.equal(kept, full[:, 0, start + torch.tensor(want)])


# --------------------------------------------------------------------------- decode, batch, the model's own path
def _check_decode_and_batch(host: TinyHost, model, batch, spec: str) -> None:
    """Cached greedy decode == a recompute of the whole sequence; the batch == each clip alone."""
    apply_method(model, spec)
    try:
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
            full = host.full_inputs(batch, out.sequences)
            full.pop("position_ids", None)                 # the method's prefill numbers the shortened sequence
            logits = model(**full, use_cache=False).logits
            L = logits.shape[1]
            for t, step in enumerate(out.logits):          # the shortened recompute ends where the sequence ends
                assert (step - logits[:, L - 5 + t]).abs().max() < 1e-4, t
            for i in range(batch["input_ids"].shape[0]):
                alone = model.generate(**_alone(host, batch, i), max_new_tokens=4, do_sample=False, output_logits=True,
                                       return_dict_in_generate=True)
                for a, b in zip(out.logits, alone.logits):
                    assert (a[i] - b[0]).abs().max() < 1e-4, i
    finally:
        apply_method(model, None)


def test_onevision_decode_equals_recompute_and_batch_equals_alone(ov):
    _check_decode_and_batch(OV, ov, _inputs(OV, [_clip(8, seed=1), _clip(8, (40, 56), seed=2)]), "dycoke")


@pytest.mark.parametrize("spec", ["dycoke:k=0.5", "random:keep=0.5", "visionzip:keep=0.4,dominant=54,contextual=10"])
def test_qwen_decode_equals_recompute_and_batch_equals_alone(qw, spec):
    """Clips of 8 and 6 frames (4 and 3 temporal slices); the image methods run per temporal slice."""
    _check_decode_and_batch(QW, qw, _inputs(QW, [_clip(8, seed=1), _clip(6, (48, 64), seed=2)]), spec)


@pytest.mark.parametrize("host", [OV, QW], ids=["onevision", "qwen"])
def test_pmod_routes_the_kept_video_tokens(host):
    """p-MoD (shift 0.5, random routers) with dycoke: the routing target is the kept video tokens (OneVision 8 frames x 4
    tokens -> 18 with the newline; Qwen 4 slices x 20 -> 52), and cached decode equals a recompute."""
    from pmod_bench import PMoDConfig
    from pmod_bench.model.modeling import to_pmod
    from pmod_bench.model.presets import random_routers

    model = to_pmod(host.build(), PMoDConfig(shift=0.5))
    random_routers(model, seed=3)
    batch = _inputs(host, [_clip(8, seed=1), _clip(8, (40, 56), seed=2)])
    apply_method(model, "dycoke")
    with torch.no_grad(), model.record_routing() as rec:
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
        full = host.full_inputs(batch, out.sequences)
        full.pop("position_ids", None)
        logits = model(**full, use_cache=False).logits
    for t, step in enumerate(out.logits):
        assert (step - logits[:, logits.shape[1] - 4 + t]).abs().max() < 1e-4, t
    kept = 18 if host is OV else 52
    assert rec and all(int(r["target"].sum()) == 2 * kept for r in rec.values())


def test_image_methods_per_frame_on_qwen_video(qw):
    """random per temporal slice: round(keep * P) tokens of each slice, the slice's own subset (as on an image)."""
    batch = _inputs(QW, [_clip(8, seed=3)])
    T, h, w = batch["video_grid_thw"][0].tolist()
    P = h * w // 4
    apply_method(qw, "random:keep=0.3,seed=2")
    try:
        with torch.no_grad():
            mi = _method_inputs(qw, batch)
    finally:
        apply_method(qw, None)
    sel = mi.images[0].selection[0]
    subset = parse_method_spec("random:keep=0.3,seed=2").subset(0, P, round(0.3 * P))
    assert torch.equal(sel, torch.cat([subset + t * P for t in range(T)]))


def test_images_pass_unchanged_and_onevision_image_methods_refuse_on_video(ov, qw):
    """dycoke leaves an image prompt as it is (the model's own logits); a prompt with images and a video is refused."""
    from conftest import make_inputs

    inputs = make_inputs(QW.processor)
    with torch.no_grad():
        plain = qw(**inputs).logits
        apply_method(qw, "dycoke")
        try:
            assert torch.equal(qw(**inputs).logits, plain)
        finally:
            apply_method(qw, None)
    from pmod_bench.methods.video import video_method_inputs

    batch = _inputs(OV, [_clip(4, seed=1)])
    for cfg, kwargs, needle in [
            (parse_method_spec("random"), {"pixel_values_videos": batch["pixel_values_videos"]}, "not ported"),
            (parse_method_spec("dycoke"), {"pixel_values_videos": batch["pixel_values_videos"],
                                           "pixel_values": torch.zeros(1)}, "both images and a video")]:
        ids = batch["input_ids"].clone()
        if "pixel_values" in kwargs:
            ids[0, 0] = ov.config.image_token_id
        with pytest.raises(MethodError) as err:
            video_method_inputs(cfg, None, ov, ids, dict(kwargs))
        assert needle in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ FLOPs
@pytest.mark.parametrize("host, frames, size, spec", [(OV, 8, (64, 48), "dycoke"), (QW, 8, (64, 48), "dycoke:k=0.5"),
                                                      (QW, 8, (64, 48), "visionzip:keep=0.4,dominant=54,contextual=10"),
                                                      (QW, 8, (64, 48), "fastv:k=1,keep=0.25")])
def test_flops_analytic_equal_flop_counter(host, frames, size, spec):
    """FlopCounterMode over one real forward (tower, projector, the method, the LLM on the kept tokens, last logits) ==
    the analytic count of the profiler's video layout (an in-LLM method: its own products and per-layer counts)."""
    from pmod_bench.methods.accounting import method_flops
    from pmod_bench.profiler.arch import load_arch
    from pmod_bench.profiler.counters import flop_counter

    from pmod_bench.model.presets import build_preset

    model = build_preset(host.preset, pmod=None)[0].eval()        # the preset itself (the profiler's tiny arch)
    inputs = _inputs(host, [_clip(frames, size, seed=4)])
    V = int((inputs["input_ids"] == model.config.video_token_id).sum())
    T = inputs["input_ids"].shape[1] - V
    apply_method(model, spec)
    with torch.no_grad(), flop_counter() as fc:
        model(**inputs, logits_to_keep=1)
    cfg = parse_method_spec(spec)
    f = method_flops(cfg, load_arch(host.preset), size, T, logits_tokens=1, video=Video(frames=frames))
    if cfg.stage == "vision":
        with torch.no_grad():
            kept = int(_method_inputs(model, inputs).vision_token_mask.sum())
    else:  # an in-LLM method sees every video token, keeps its share from its layer on
        kept = round(0.25 * V)
        assert f.layer_vision_tokens == (V,) * 1 + (kept,) * (model.config.text_config.num_hidden_layers - 1)
    assert f.baseline_vision_tokens == V and f.llm_vision_tokens == kept < V
    assert fc.get_total_flops() == f.ttft


@pytest.mark.parametrize("arch_name, frames", [("qwen2.5-vl-7b", 32), ("qwen2.5-vl-7b", 8),
                                              pytest.param("llava-onevision-7b", 32, marks=pytest.mark.slow)])
def test_match_pmod_05_within_1pct(arch_name, frames):
    """``--match p-MoD-0.5`` solves k on the same clip: the LLM prefill within 1% of p-MoD-0.5's; the count is TTM's plan
    over the profiler's frames (Qwen: 16 frame pairs of 13x23 merged tokens at 640x360; OneVision: 32 x 196 + 1)."""
    from pmod_bench.methods import solve
    from pmod_bench.methods.accounting import method_flops
    from pmod_bench.profiler.arch import load_arch

    arch, video = load_arch(arch_name), Video(frames=frames)
    res = solve("dycoke", arch, (640, 360), match="p-MoD-0.5", video=video)
    assert res.rel_err <= 0.01 and res.solved == {"k": res.config.k}
    f = method_flops(res.config, arch, (640, 360), 58, video=video)
    F, P, extra = (frames // 2, 299, 0) if arch_name.startswith("qwen") else (frames, 196, 1)
    assert f.baseline_vision_tokens == F * P + extra
    assert f.llm_vision_tokens == sum(ttm_plan(F, P, res.config.k)) + extra and f.llm_prefill == res.achieved


@pytest.mark.slow
def test_cli_profile_dycoke_on_frames(tmp_path, capsys):
    """``profile --arch qwen2.5-vl-7b --frames 32 --method dycoke --match p-MoD-0.5``: one solved row beside p-MoD-0.5."""
    import json

    from pmod_bench.cli import main

    argv = ["profile", "--arch", "qwen2.5-vl-7b", "--frames", "32", "--method", "dycoke", "--method", "fastv",
            "--match", "p-MoD-0.5", "--variant", "p-MoD-0.5", "--no-latency", "-o", str(tmp_path / "p")]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "p" / "profile.json").read_text())["rows"]
    dy = next(r for r in rows if r["method"] == "dycoke")
    pm = next(r for r in rows if r["variant"] == "p-MoD-0.5")
    assert dy["frames"] == 32 and dy["method_match"]["rel_err"] <= 0.01
    assert abs(dy["prefill_tflops"] - pm["prefill_tflops"]) / pm["prefill_tflops"] <= 0.01
