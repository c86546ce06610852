"""The profiler on Qwen2.5-VL: vision tokens by Qwen's resize rule, the vision tower's window / full attention and
patch merger counted analytically and by FlopCounterMode, KV and training rows, the CLI."""

from __future__ import annotations

import json

import pytest

from conftest import check_forward_flops_are_analytic, check_profile_refuses
from pmod_bench.profiler.arch import load_arch, vision_layout
from pmod_bench.profiler.flops import llm_decode_flops, llm_prefill_flops, vision_flops
from pmod_bench.profiler.arch import with_pixels
from pmod_bench.profiler.qwen import LMMS_EVAL_MAX_PIXELS, LMMS_EVAL_MIN_PIXELS, QwenGrid, window_segments
from pmod_bench.profiler.variants import Baseline, PMoD, make_pmod_config

VARIANTS = (Baseline(), PMoD(make_pmod_config(shift=0.5)))


@pytest.fixture(scope="module")
def qwen7b():
    return load_arch("qwen2.5-vl-7b")


@pytest.mark.parametrize("size, resized, tokens", [
    ((1344, 1008), (1344, 1008), 1728),  # 48 x 36 merged patches, inside the pixel range: not rescaled
    ((672, 672), (672, 672), 576),
    ((640, 480), (644, 476), 391),  # rounded to multiples of 28
    ((224, 224), (448, 448), 256),  # below min_pixels = 256·28·28: scaled up to 256 tokens
    ((4000, 3000), (1456, 1092), 2028),  # above max_pixels = 1605632: scaled down (2048 tokens at most)
    ((1000, 700), (1008, 700), 900),
])
def test_vision_tokens_by_smart_resize(qwen7b, size, resized, tokens):
    layout = vision_layout(qwen7b, size)
    assert (layout.resized, layout.vision_tokens, layout.projector_tokens, layout.tiles) == (resized, tokens, tokens, 1)
    assert layout.patches == (resized[1] // 14, resized[0] // 14)
    assert tokens == (resized[0] // 28) * (resized[1] // 28) <= LMMS_EVAL_MAX_PIXELS // 28**2


def test_vision_tokens_match_qwens_processor(qwen7b):
    """The processor lmms-eval builds (its min/max pixels) gives the same grid as the profiler, image by image."""
    from PIL import Image
    from transformers import Qwen2VLImageProcessor

    proc = Qwen2VLImageProcessor(min_pixels=LMMS_EVAL_MIN_PIXELS, max_pixels=LMMS_EVAL_MAX_PIXELS)
    for size in ((1344, 1008), (224, 224), (4000, 3000), (1000, 700)):
        thw = proc(images=[Image.new("RGB", size)], return_tensors="pt")["image_grid_thw"].tolist()
        layout = vision_layout(qwen7b, size)
        assert thw == [[1, *layout.patches]]
        assert thw[0][1] * thw[0][2] // 4 == layout.vision_tokens


def test_pixel_range_flags_change_the_tokens(qwen7b):
    small = with_pixels(qwen7b, max_pixels=1280 * 28 * 28)  # Qwen's README setting
    assert vision_layout(small, (1344, 1008)).resized == (1148, 840)  # scaled down (floor) to 41 x 30 merged patches
    assert vision_layout(small, (1344, 1008)).vision_tokens == 1230 <= 1280
    # scaled up with ceil, as smart_resize does: 1288x1288 (46 x 46 = 2,116 tokens), a little above max_pixels
    assert vision_layout(with_pixels(qwen7b, min_pixels=2048 * 28 * 28), (224, 224)).vision_tokens == 2116
    assert with_pixels(qwen7b) is qwen7b
    with pytest.raises(ValueError, match="min <= max"):
        with_pixels(qwen7b, min_pixels=10**7)
    with pytest.raises(ValueError, match="Qwen2.5-VL"):
        with_pixels(load_arch("llava-next-7b"), min_pixels=1000)


@pytest.mark.parametrize("patches", [(72, 96), (50, 72), (8, 10), (16, 16), (2, 2), (36, 2)])
def test_window_partition_is_hfs(qwen7b, patches):
    """The analytic window segments are those of HF's get_vision_window_index (the tower's own partition)."""
    import torch
    from transformers.vision_utils import get_vision_window_index

    v = qwen7b.vision
    _, cu = get_vision_window_index(torch.tensor([[1, *patches]]), spatial_merge_size=2, window_size=112, patch_size=14)
    cu = cu.tolist()
    hf = [b - a for a, b in zip(cu, cu[1:]) if b > a]
    ours = window_segments(v, QwenGrid(resized=(patches[1] * 14, patches[0] * 14), patches=patches))
    assert ours == hf and sum(ours) == patches[0] * patches[1]


@pytest.mark.parametrize("size", [(1344, 1008), (1000, 700)])
def test_analytic_equals_flopcountermode_meta_7b(qwen7b, size):
    """Vision tower (window + full blocks, merger) and LLM prefill / decode of the 7B shape, exactly."""
    from pmod_bench.profiler.counters import count_flops_meta

    a, T = qwen7b, 58
    layout = vision_layout(a, size)
    V = layout.vision_tokens
    vis = vision_flops(a, layout)
    for v in VARIANTS:
        kept = v.kept_vision_tokens(a.text.layers, V)
        ana = llm_prefill_flops(a.text, T, V, kept, v.router_layers(a.text.layers), logits_tokens=1)
        meta = count_flops_meta(a, v, size, T, logits_tokens=1)
        assert (meta.prefill_llm, meta.vision_encoder, meta.projector) == (ana.total(), vis.encoder, vis.projector), v.name
        assert meta.decode_step == llm_decode_flops(a.text, [T + k for k in kept]).total()
    if size == (1344, 1008):
        assert vis.encoder / 1e12 == pytest.approx(9.771, abs=1e-3) and vis.projector / 1e12 == pytest.approx(0.154, abs=1e-3)


def test_analytic_equals_flopcountermode_meta_tiny_batch():
    from pmod_bench.profiler.counters import count_flops_meta

    a = load_arch("tiny-qwen2.5-vl")
    layout = vision_layout(a, (64, 48))
    V, T = layout.vision_tokens, 40
    assert (V, layout.patches) == (20, (8, 10))  # 4 x 5 merged patches in windows of 2 x 2: partial windows too
    vis = vision_flops(a, layout)
    for v in VARIANTS:
        kept = v.kept_vision_tokens(a.text.layers, V)
        ana = llm_prefill_flops(a.text, T, V, kept, v.router_layers(a.text.layers), logits_tokens=T + V)
        meta = count_flops_meta(a, v, (64, 48), T, batch_size=2, logits_tokens=T + V)  # counts are per sample
        assert (meta.prefill_llm, meta.vision) == (ana.total(), vis.total), v.name


def test_analytic_equals_a_real_forward_of_the_tiny_model():
    """FlopCounterMode over the real tiny model on a processed image + prompt: its tower (window permutation, HF's
    cu_seqlens, merger) and its LLM (M-RoPE, GQA, biases) do exactly the analytic count."""
    import torch

    from pmod_bench.model.presets import build_preset, demo_image
    from pmod_bench.profiler.counters import flop_counter

    model, processor = build_preset("tiny-qwen2.5-vl", pmod=None)
    a = load_arch("tiny-qwen2.5-vl")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    inputs = processor(images=[demo_image(90, 40)], text=[processor.apply_chat_template(msgs, add_generation_prompt=True)],
                       return_tensors="pt")
    layout = vision_layout(a, (90, 40))
    assert inputs["image_grid_thw"].tolist() == [[1, *layout.patches]]
    with torch.no_grad(), flop_counter() as fc:
        model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    assert fc.get_total_flops() == vision_flops(a, layout).total
    check_forward_flops_are_analytic(a, model, inputs, layout)


def test_params_kv_and_training_rows(qwen7b):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from pmod_bench.profiler.core import Scenario, profile

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(qwen7b.config)
    lm = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
    assert qwen7b.llm_params == lm  # q/k/v biases included
    assert qwen7b.vision.params + qwen7b.projector_params == sum(p.numel() for p in model.model.visual.parameters())
    rows = profile(qwen7b, ["baseline", "p-MoD-0.5"], [Scenario((1344, 1008))], latency="off", hardware="A6000", verify=False)
    base, pmod = rows
    assert (base.vision_tokens, base.resized_image_size, base.pixel_range, base.tile_size) == (
        1728, [1344, 1008], [LMMS_EVAL_MIN_PIXELS, LMMS_EVAL_MAX_PIXELS], 0)
    per_entry = 2 * 4 * 128 * 2  # K and V, 4 KV heads of 128, bf16
    assert base.kv_cache_bytes == 28 * (58 + 1728) * per_entry
    assert pmod.kv_cache_bytes == sum(58 + k for k in pmod.kept_vision_tokens) * per_entry
    assert pmod.kv_cache_ratio == pytest.approx(sum(pmod.kept_vision_tokens) / (28 * 1728))
    assert 0.5 < pmod.tflops_ratio < 0.6 and base.prefill_tflops == pytest.approx(24.59, abs=0.01)
    assert base.train_recipe == "llava-next-sft" and base.train_tokens_per_sample == 576 + 400  # the recipe's 672x672 image
    assert pmod.train_gpu_hours < base.train_gpu_hours
    assert base.prefill_floor_ms is not None and base.latency_note.startswith("not measured")


def test_local_config_dir_and_train_runs(qwen7b, tmp_path):
    """A local hub-layout config.json profiles as the preset does; a LLaVA train run is told apart, not crashed on."""
    from pmod_bench.model.presets import preset_config
    from pmod_bench.profiler.arch import arch_from_config
    from pmod_bench.profiler.training import TrainRun, train_run_mismatch

    preset_config("qwen2.5-vl-7b").save_pretrained(tmp_path)
    local = load_arch(str(tmp_path))
    assert (local.family, local.text, local.vision) == (qwen7b.family, qwen7b.text, qwen7b.vision)
    assert vision_layout(local, (1344, 1008)) == vision_layout(qwen7b, (1344, 1008))
    llava = arch_from_config("tiny", preset_config("tiny"))
    info = {"family": llava.family, "text": {"layers": 8, "hidden": 64}, "vision": {"layers": 2, "image_size": 32}}
    run = TrainRun(path="r", recipe="x", stage="sft", tokens_per_s=1.0, gpu_hours=1.0, world_size=1, steps=1, model_info=info)
    assert "another architecture" in train_run_mismatch(run, qwen7b)


def test_cli_prints_the_table(capsys):
    from pmod_bench.cli import main

    assert main(["profile", "--arch", "qwen2.5-vl-7b", "--image-size", "1344x1008", "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-vl-7b · 1344x1008 image resized to 1344x1008" in out and "1,728 vision tokens" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["baseline"], ["p-MoD-0.5"])}
    assert lines["baseline"][1] == "24.59" and lines["p-MoD-0.5"][1] == "13.41"
    assert "paper" not in out.splitlines()[1].split()  # no paper columns for Qwen (only the "(paper conv.)" convention)


@pytest.mark.slow
def test_cli_verified_run_writes_rows(tmp_path):
    from pmod_bench.cli import main

    js = tmp_path / "q.json"
    argv = ["profile", "--arch", "qwen2.5-vl-3b", "qwen2.5-vl-72b", "--image-size", "1344x1008", "640x480",
            "--max-pixels", "1003520", "--shift", "0.5", "--json", str(js)]
    assert main(argv) == 0
    rows = json.loads(js.read_text())["rows"]
    assert len(rows) == 2 * 2 * 2 and all(r["flops_check_rel_err"] == 0 for r in rows)
    assert {(r["arch"], r["vision_tokens"]) for r in rows} == {(a, t) for a in ("qwen2.5-vl-3b", "qwen2.5-vl-72b") for t in (1230, 391)}
    assert all(r["pixel_range"] == [LMMS_EVAL_MIN_PIXELS, 1003520] for r in rows)
    assert "--max-pixels 1003520" in json.loads(js.read_text())["command"]


@pytest.mark.parametrize("argv, needle", [
    (["--min-pixels", "0"], "--min-pixels must be a whole number of pixels >= 1"),
    (["--min-pixels", "2000000"], "min <= max"),
    (["--arch", "llava-next-7b", "--max-pixels", "1000000"], "Qwen2.5-VL's resize range"),
    (["--method", "illava"], "vision-stage methods come with the next issue"),
    (["--method", "downsample:grid_h=2,grid_w=2,max_pixels=5000"], "not both"),
    (["--method", "visionzip"], "visionzip on Qwen2.5-VL needs keep="),
    (["--method", "fastervlm"], "Qwen2.5-VL's tower has no [CLS] token"),
    (["--method", "prumerge"], "Qwen2.5-VL's tower has no [CLS] token"),
    (["--method", "fastv", "--latency"], "--device cuda"),
    (["--image-size", "30000x100"], "aspect ratio"),
    (["--arch", "qwen2.5-vl-7bb"], "Did you mean 'qwen2.5-vl-7b'"),
])
def test_cli_bad_flags_one_line(argv, needle, capsys):
    check_profile_refuses(argv, needle, capsys, "qwen2.5-vl-7b")


# ------------------------------------------------------------------------------ in-LLM methods and latency
IN_LLM = ("fastv", "pyramiddrop", "sparsevlm", "random_llm")


def test_in_llm_methods_match_pmod_05_on_7b(qwen7b):
    """``--match p-MoD-0.5`` solves every in-LLM method on Qwen2.5-VL-7B within 1%, from the profiler's own vision
    tokens (576 at 672x672, Qwen's merged grid, not a LLaVA tile); a vision-stage method refuses in one line."""
    from pmod_bench.methods import MethodError, parse_method_spec, solve
    from pmod_bench.methods.accounting import method_flops, target_value

    target = target_value("p-MoD-0.5", qwen7b, (672, 672), 58, "prefill", "headline")
    for spec in IN_LLM:
        res = solve(spec, qwen7b, (672, 672), match="p-MoD-0.5")
        assert res.rel_err <= 0.01 and res.target == target, (spec, res.rel_err)
        f = method_flops(res.config, qwen7b, (672, 672), 58)
        assert f.baseline_vision_tokens == 576 and len(f.layer_vision_tokens) == 28 and f.llm_prefill == res.achieved
    fastv = method_flops(parse_method_spec("fastv:k=2,keep=0.5"), qwen7b, (672, 672), 58)
    assert fastv.llm_extra == 2 * (58 + 576) * 3584  # the last token's attention row at layer 1 (28 heads x 128)
    assert fastv.layer_vision_tokens == tuple([576, 576] + [288] * 26)
    with pytest.raises(MethodError, match="vision-stage methods come with the next issue"):
        solve("illava", qwen7b, (672, 672), match="p-MoD-0.5")


@pytest.mark.parametrize("spec, rel", [("fastv:k=2,keep=0.5", 0), ("random_llm:k=2,keep=0.5", 0),
                                       ("pyramiddrop:layers=2-4-6", 0), ("sparsevlm:layers=2-4-6", 1e-3)])
def test_in_llm_method_analytic_equals_a_real_forward(spec, rel):
    """FlopCounterMode over a real forward of the tiny Qwen2.5-VL with the method applied == the method's analytic
    count (tower + merger + LLM at the kept lengths + the method's own products). SparseVLM's recycled-token merge
    depends on the scores, so its count is checked to 0.1%."""
    import torch

    from pmod_bench.methods import apply_method, parse_method_spec
    from pmod_bench.methods.accounting import method_flops
    from pmod_bench.model.presets import build_preset, demo_image
    from pmod_bench.profiler.counters import flop_counter

    model, processor = build_preset("tiny-qwen2.5-vl", pmod=None)
    a = load_arch("tiny-qwen2.5-vl")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    inputs = processor(images=[demo_image(90, 40)], text=[processor.apply_chat_template(msgs, add_generation_prompt=True)],
                       return_tensors="pt")
    V = int((inputs["input_ids"] == a.image_token_id).sum())
    T = inputs["input_ids"].shape[1] - V
    apply_method(model, spec)
    with torch.no_grad(), flop_counter() as fc:
        model(**inputs, logits_to_keep=1)
    f = method_flops(parse_method_spec(spec), a, (90, 40), T, 1)
    assert f.baseline_vision_tokens == V and min(f.layer_vision_tokens) < V
    assert abs(f.vision + f.llm_prefill - fc.get_total_flops()) <= rel * fc.get_total_flops()


def test_cli_match_table_and_meta_check(tmp_path, capsys):
    """``pmod-bench profile --arch qwen2.5-vl-7b --method M --match p-MoD-0.5``: the table prints every method row at
    the solved budget, each meta-counted by FlopCounterMode (kept lengths) within 1% of the analytic count."""
    from pmod_bench.cli import main

    js = tmp_path / "q.json"
    argv = ["profile", "--arch", "qwen2.5-vl-7b", "--match", "p-MoD-0.5", "--no-latency", "--recipe", "none", "--json", str(js)]
    for spec in IN_LLM:
        argv += ["--method", spec]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = {r["method"] or r["variant"]: r for r in json.loads(js.read_text())["rows"]}
    assert set(IN_LLM) <= set(rows)
    for spec in IN_LLM:
        r = rows[spec]
        assert r["flops_check_rel_err"] is not None and r["flops_check_rel_err"] <= 0.01
        assert r["vision_tokens"] == 576 and 0.55 < r["tflops_ratio"] < 0.6
        assert any(line.startswith(r["variant"] + " ") for line in out.splitlines()), r["variant"]


@pytest.mark.slow
def test_tiny_qwen_is_timed_on_cpu():
    """Latency on Qwen2.5-VL: the tiny arch's baseline and p-MoD rows are timed on CPU (synthetic M-RoPE batch, decode
    at the cached rope_deltas), the 7B is not (too large for the CPU), with the reason."""
    from pmod_bench.profiler.core import Scenario, profile

    rows = profile("tiny-qwen2.5-vl", ["baseline", "p-MoD-0.5"], [Scenario((64, 48), batch_size=2)], latency=True, device="cpu",
                   dtype="float32", recipe=None, warmup=1, repeats=1)
    assert all(r.prefill_latency_ms and r.prefill_latency_ms > 0 and r.decode_latency_ms_per_token for r in rows)
    assert rows[1].latency_ratio is not None


def test_one_family_key_for_the_geometry_and_request_tables():
    """The profiler's geometry and the eval request builders are found by the family the host adapter names: a p-MoD
    config finds its base family's entries; a family without an adapter (OneVision) keys on its own model_type."""
    from pmod_bench.model.hosts import family_of
    from pmod_bench.model.presets import preset_config
    from pmod_bench.profiler.geometry import geometry_for_config
    from pmod_bench.profiler.qwen import HOST
    from pmod_bench.tasks.requests import QwenChatRequests, requests_of_type

    pmod_cfg = preset_config("tiny-qwen2.5-vl", pmod={"shift": 0.5})
    assert pmod_cfg.model_type == "pmod_qwen2_5_vl" and family_of(pmod_cfg) == family_of("qwen2_5_vl") == "qwen2_5_vl"
    assert geometry_for_config(pmod_cfg) is HOST and requests_of_type(pmod_cfg.model_type)[1] is QwenChatRequests
    assert family_of(preset_config("tiny-llava-onevision")) == "llava_onevision"
    assert geometry_for_config(preset_config("tiny-llava-onevision")).label == "LLaVA-OneVision"
    assert geometry_for_config(preset_config("tiny")) is None and family_of("pmod_llava_next") == "llava_next"
    assert load_arch("tiny-qwen2.5-vl").family == "qwen2_5_vl"
