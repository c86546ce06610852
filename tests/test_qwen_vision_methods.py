"""Vision-stage methods on Qwen2.5-VL (pmod_bench/methods/qwen_vision.py): the kept merged tokens reach the LLM at the
M-RoPE positions of the full grid, cached decode equals a recompute, a batch equals its samples alone; the ones not
ported refuse in one line."""

import pytest
import torch

from conftest import TinyHost
from pmod_bench.methods import MethodError, apply_method, parse_method_spec
from pmod_bench.methods.geometry import checked_geometry
from pmod_bench.model.presets import demo_image

QWEN = TinyHost("qwen2_5_vl")


@pytest.fixture(scope="module")
def vanilla():
    return QWEN.build()


@pytest.fixture(scope="module")
def batch():
    """Two prompts, left-padded: two images (8x10 and 10x8 patches) in the first, one (10x12) in the second."""
    proc = QWEN.processor
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"}, {"type": "image"},
                                          {"type": "text", "text": "the two images."}]}],
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count the shapes."}]}]]
    prompts = [proc.apply_chat_template(m, add_generation_prompt=True) for m in msgs]
    images = [demo_image(64, 48, seed=1), demo_image(48, 64, seed=2), demo_image(84, 64, seed=3)]
    return proc(images=images, text=prompts, return_tensors="pt", padding=True)


def _sample(batch, i):
    """Sample ``i`` of ``batch`` alone (its images, no padding)."""
    counts = [int((batch["input_ids"][b] == QWEN.processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")).sum())
              for b in range(batch["input_ids"].shape[0])]
    first = sum(counts[:i])
    grid = batch["image_grid_thw"][first:first + counts[i]]
    start = int(batch["image_grid_thw"][:first].prod(-1).sum())
    keep = batch["attention_mask"][i].bool()
    return {"input_ids": batch["input_ids"][i:i + 1, keep], "attention_mask": batch["attention_mask"][i:i + 1, keep],
            "mm_token_type_ids": batch["mm_token_type_ids"][i:i + 1, keep], "image_grid_thw": grid,
            "pixel_values": batch["pixel_values"][start:start + int(grid.prod(-1).sum())]}


def test_random_keeps_its_budget_in_raster_order_at_full_grid_positions(vanilla, batch):
    """round(keep * V) merged tokens per image, in raster order, each at the three M-RoPE rows it has without a method;
    the text after an image where it is without a method; rope_deltas = largest position + 1 - kept length."""
    apply_method(vanilla, "random:keep=0.3,seed=4")
    try:
        with torch.no_grad():
            mi = vanilla.method_inputs(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
                                       batch["attention_mask"])
        full, _ = vanilla.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                               image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])
    finally:
        apply_method(vanilla, None)
    V = (batch["image_grid_thw"].prod(-1) // 4).tolist()
    assert [im.features.shape[0] for im in mi.images] == [round(0.3 * v) for v in V]
    for im in mi.images:
        sel = im.selection[0]
        assert torch.equal(sel, sel.sort().values) and len(set(sel.tolist())) == sel.numel()
    assert mi.position_ids.shape[0] == 4 and mi.vision_token_mask.sum(1).tolist() == [
        round(0.3 * V[0]) + round(0.3 * V[1]), round(0.3 * V[2])]
    k = 0
    for b in range(2):
        real = batch["attention_mask"][b].bool()
        ids, pos = batch["input_ids"][b][real], full[:, b][:, real]
        is_img = ids == vanilla.config.image_token_id
        keep = ~is_img
        starts = [j for j in range(ids.shape[0]) if is_img[j] and (j == 0 or not is_img[j - 1])]
        for s in starts:
            keep[s + mi.images[k].selection[0]] = True
            k += 1
        got = mi.position_ids[1:, b][:, mi.attention_mask[b].bool()]
        assert torch.equal(got, pos[:, keep])
        assert int(vanilla.model.rope_deltas[b]) == int(pos.max()) + 1 - int(keep.sum())


def test_random_keeping_everything_is_the_model_itself(vanilla, batch):
    """keep=1: every token at its own position, so logits and greedy tokens equal the model without a method."""
    with torch.no_grad():
        ref = vanilla(**batch).logits
        ref_gen = vanilla.generate(**batch, max_new_tokens=3, do_sample=False)
        apply_method(vanilla, "random:keep=1.0")
        try:
            got = vanilla(**batch).logits
            gen = vanilla.generate(**batch, max_new_tokens=3, do_sample=False)
        finally:
            apply_method(vanilla, None)
    real = batch["attention_mask"].bool()
    assert (got - ref)[real].abs().max() < 1e-4
    assert torch.equal(gen, ref_gen)


def test_random_cached_decode_equals_recompute_and_batch_equals_alone(vanilla, batch):
    apply_method(vanilla, "random:keep=0.5")
    try:
        with torch.no_grad():
            out = vanilla.generate(**batch, max_new_tokens=4, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
            full = vanilla(**QWEN.full_inputs(batch, out.sequences), use_cache=False).logits
            L = full.shape[1]
            for t, step in enumerate(out.logits):       # the shortened recompute ends where the sequence ends
                assert (step - full[:, L - 5 + t]).abs().max() < 1e-4, t
            for i in range(2):
                alone = vanilla.generate(**_sample(batch, i), max_new_tokens=4, do_sample=False, output_logits=True,
                                         return_dict_in_generate=True)
                for a, b in zip(out.logits, alone.logits):
                    assert (a[i] - b[0]).abs().max() < 1e-4, i
            # a hand-made decode step: the shortened mask + the host's decode positions (the rope_deltas set)
            pre = vanilla(**batch, use_cache=True)
            mi = vanilla.method_inputs(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
                                       batch["attention_mask"])
            nxt = pre.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mi.attention_mask, torch.ones_like(nxt)], 1)
            step = vanilla(input_ids=nxt, attention_mask=mask, past_key_values=pre.past_key_values,
                           **QWEN.decode_kwargs(vanilla, mask)).logits[:, -1]
            assert (step - out.logits[1]).abs().max() < 1e-4
    finally:
        apply_method(vanilla, None)


def test_not_ported_methods_refuse_on_qwen_in_one_line(vanilla):
    """illava: the next issue; fastervlm / prumerge: no [CLS] token; the per-tile account of LLaVA is not the
    one of Qwen; each one line."""
    cases = {"illava": "come with the next issue", "downsample:grid_h=3,grid_w=3,max_pixels=5000": "not both",
             "fastervlm": "has no [CLS] token", "prumerge": "has no [CLS] token"}
    for spec, says in cases.items():
        with pytest.raises(MethodError, match=None) as err:
            apply_method(vanilla, spec)
        assert says in str(err.value) and "\n" not in str(err.value), spec
    geometry = checked_geometry(parse_method_spec("visionzip:keep=0.3"), vanilla.config)
    with pytest.raises(MethodError) as err:
        parse_method_spec("visionzip:keep=0.3").account(geometry, 1, (672, 672), vanilla.config)
    assert "Qwen2.5-VL is counted per image" in str(err.value) and "\n" not in str(err.value)
    assert type(vanilla).__name__ == "Qwen2_5_VLForConditionalGeneration"


def test_visionzip_selection_on_crafted_scores():
    """Dominant = the groups the scores favour, in raster order; contextual targets = every step-th of the others, each
    its own feature + the mean of the others whose key points its way."""
    from pmod_bench.methods.qwen_vision import visionzip_merged

    V = 12
    feats = torch.arange(V, dtype=torch.float32)[:, None].repeat(1, 3)
    scores = torch.zeros(V)
    scores[[9, 2, 5]] = torch.tensor([3.0, 2.0, 1.0])
    keys = torch.zeros(V, 2)
    rest = [0, 1, 3, 4, 6, 7, 8, 10, 11]          # targets (step 9 // 3 = 3): 0, 4, 8
    for i in rest:
        keys[i] = torch.tensor([1.0, 0.0]) if i < 4 else (torch.tensor([0.0, 1.0]) if i < 8 else torch.tensor([-1.0, -1.0]))
    idx, out = visionzip_merged(feats, scores, keys, dominant=3, contextual=3)
    assert idx.tolist() == [0, 2, 4, 5, 8, 9]
    by = dict(zip(idx.tolist(), out[:, 0].tolist()))
    assert by[2] == 2 and by[5] == 5 and by[9] == 9                     # dominant: as they are
    assert by[0] == 0 + (1 + 3) / 2 and by[4] == 4 + (6 + 7) / 2 and by[8] == 8 + (10 + 11) / 2


def test_visionzip_scores_are_the_last_blocks_received_attention(vanilla, batch):
    """Per image: V scores and keys; the last block (full attention, one chunk per image) gives every query row a sum
    of 1, so 4 x the group means sum to the image's patch count."""
    from pmod_bench.methods.qwen_vision import last_block_scores

    assert vanilla.config.vision_config.depth - 1 in vanilla.config.vision_config.fullatt_block_indexes
    with torch.no_grad():
        per = last_block_scores(vanilla, batch["pixel_values"], batch["image_grid_thw"])
        ref = vanilla.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
    V = (batch["image_grid_thw"].prod(-1) // 4).tolist()
    assert [f.shape[0] for f, _, _ in per] == V
    for (f, s, k), r, v in zip(per, ref, V):
        assert torch.equal(f, r) and s.shape == (v,) and k.shape[0] == v
        assert abs(float(s.sum()) * 4 - 4 * v) < 1e-3


def test_visionzip_on_qwen_budget_order_decode_and_batch(vanilla, batch):
    """keep=0.4: round(0.4 V) tokens per image, dominant : contextual as 54 : 10, raster order; cached decode ==
    recompute; the batch == each sample alone."""
    apply_method(vanilla, "visionzip:keep=0.4,dominant=54,contextual=10")
    try:
        with torch.no_grad():
            mi = vanilla.method_inputs(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
                                       batch["attention_mask"])
            out = vanilla.generate(**batch, max_new_tokens=4, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
            full = vanilla(**QWEN.full_inputs(batch, out.sequences), use_cache=False).logits
            for t, step in enumerate(out.logits):
                assert (step - full[:, full.shape[1] - 5 + t]).abs().max() < 1e-4, t
            for i in range(2):
                alone = vanilla.generate(**_sample(batch, i), max_new_tokens=4, do_sample=False, output_logits=True,
                                         return_dict_in_generate=True)
                for a, b in zip(out.logits, alone.logits):
                    assert (a[i] - b[0]).abs().max() < 1e-4, i
    finally:
        apply_method(vanilla, None)
    V = (batch["image_grid_thw"].prod(-1) // 4).tolist()
    for im, v in zip(mi.images, V):
        k = round(0.4 * v)
        c = round(k * 10 / 64)
        assert im.features.shape[0] == k and im.info == {"dominant": k - c, "contextual": c}
        assert torch.equal(im.selection[0], im.selection[0].sort().values)
    with pytest.raises(MethodError, match="needs keep="):
        apply_method(vanilla, "visionzip")
    assert type(vanilla).__name__ == "Qwen2_5_VLForConditionalGeneration"


def test_visionzip_match_on_qwen_needs_keep_in_one_line():
    from pmod_bench.methods import solve
    from pmod_bench.profiler.arch import load_arch

    with pytest.raises(MethodError) as err:
        solve("visionzip", load_arch("qwen2.5-vl-7b"), (672, 672), match="p-MoD-0.5")
    assert "needs keep=" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("spec", ["random", "visionzip:keep=0.3,dominant=54,contextual=10"])
def test_matches_pmod_05_on_qwen_7b(spec):
    """``--match p-MoD-0.5`` solves keep on Qwen2.5-VL-7B at 672x672 (576 merged tokens) within 1%: the whole tower +
    merger (+ visionzip's own products), the LLM on round(keep * 576) tokens."""
    from pmod_bench.methods import solve
    from pmod_bench.methods.accounting import method_flops
    from pmod_bench.profiler.arch import load_arch, vision_layout
    from pmod_bench.profiler.flops import vision_flops

    arch = load_arch("qwen2.5-vl-7b")
    res = solve(spec, arch, (672, 672), match="p-MoD-0.5")
    assert res.rel_err <= 0.01
    f = method_flops(res.config, arch, (672, 672), 58)
    assert f.baseline_vision_tokens == 576 and f.llm_vision_tokens == round(res.config.keep * 576)
    assert f.vision - f.method_extra == vision_flops(arch, vision_layout(arch, (672, 672))).total
    assert f.llm_prefill == res.achieved and (f.method_extra > 0) == spec.startswith("visionzip")


@pytest.mark.parametrize("spec", ["random:keep=0.4", "visionzip:keep=0.4,dominant=54,contextual=10"])
def test_flops_analytic_equal_counted_on_tiny_qwen(vanilla, spec):
    """FlopCounterMode over one real forward == the analytic count (tower + merger, visionzip's own products, the LLM
    on the kept tokens, last logits only)."""
    inputs, V, counted, f = _counted_and_analytic(vanilla, spec, (90, 40))
    assert f.baseline_vision_tokens == V and f.llm_vision_tokens == round(0.4 * V)
    assert counted == f.ttft


def test_window_order_undone_is_the_towers_own(vanilla, batch):
    """The reverse index the scores are put back in raster order with is the one the tower applies to its merger's
    output (and it is not the identity on these images: window attention reorders them)."""
    from pmod_bench.methods.qwen_vision import window_reverse

    visual = vanilla.model.visual
    seen = {}
    handle = visual.blocks[-1].register_forward_hook(lambda _m, _a, out: seen.__setitem__("out", out))
    try:
        with torch.no_grad():
            feats = vanilla.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
            reverse = window_reverse(visual, batch["image_grid_thw"])
            merged = visual.merger(seen["out"])
    finally:
        handle.remove()
    assert not torch.equal(reverse, torch.arange(reverse.numel()))
    assert torch.equal(merged[reverse], torch.cat(list(feats), 0))


# ------------------------------------------------------------------------------------------ downsampling
def _counted_and_analytic(model, spec, size):
    """One image of ``size`` with a short question: (processor inputs, its vision tokens, FlopCounterMode's FLOPs of
    one forward under ``spec`` (last logits only), the analytic ``method_flops`` of the same prompt)."""
    from pmod_bench.methods.accounting import method_flops
    from pmod_bench.profiler.arch import load_arch
    from pmod_bench.profiler.counters import flop_counter

    proc = QWEN.processor
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    inputs = proc(images=[demo_image(*size)], text=[proc.apply_chat_template(msgs, add_generation_prompt=True)],
                  return_tensors="pt")
    V = int((inputs["input_ids"] == model.config.image_token_id).sum())
    apply_method(model, spec)
    try:
        with torch.no_grad(), flop_counter() as fc:
            model(**inputs, logits_to_keep=1)
    finally:
        apply_method(model, None)
    f = method_flops(parse_method_spec(spec), load_arch("tiny-qwen2.5-vl"), size, inputs["input_ids"].shape[1] - V,
                     logits_tokens=1)
    return inputs, V, fc.get_total_flops(), f


def _regridded(model, batch, spec):
    """``batch`` as the processor would give it at the method's smaller sizes (the images resized from the pixel
    values, the <|image_pad|> runs re-counted, mm_token_type_ids rebuilt): what the model sees under ``spec``."""
    from pmod_bench.methods.qwen_vision import regrid_prompt, resample_images

    cfg = parse_method_spec(spec)
    pv, grid = resample_images(model, batch["pixel_values"], batch["image_grid_thw"],
                               cfg.merged_resize(model, batch["image_grid_thw"]))
    ids, mask, _ = regrid_prompt(batch["input_ids"], batch["attention_mask"], None, model.config.image_token_id,
                                 (grid.prod(-1) // 4).tolist())
    mm = (ids == model.config.image_token_id).long()
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": mm, "pixel_values": pv, "image_grid_thw": grid}


def test_patchify_inverts_the_processors_layout(vanilla, batch):
    from pmod_bench.methods.qwen_vision import patchify, unpatchify

    visual, start = vanilla.model.visual, 0
    for _, h, w in batch["image_grid_thw"].tolist():
        rows = batch["pixel_values"][start:start + h * w]
        start += h * w
        img = unpatchify(visual, rows, (h, w))
        assert img.shape == (3, h * 14, w * 14) and torch.equal(patchify(visual, img), rows)


def test_downsample_sizes_follow_smart_resize():
    """keep -> a pixel budget keep·H·W through smart_resize (28 px multiples); max_pixels directly; grid_h x grid_w in
    merged tokens; an image already within the budget is kept."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    assert parse_method_spec("downsample:keep=0.25").merged_size(672, 1344) == smart_resize(672, 1344, 28, 784, 672 * 336)
    assert parse_method_spec("downsample:keep=0.25").merged_size(672, 1344) == (336, 672)
    assert parse_method_spec("downsample:max_pixels=200000").merged_size(672, 672) == (420, 420)
    assert parse_method_spec("downsample:max_pixels=900000").merged_size(672, 672) == (672, 672)
    assert parse_method_spec("downsample:grid_h=5,grid_w=40").merged_size(672, 672) == (140, 672)


def test_downsample_is_the_model_on_the_smaller_image(vanilla, batch):
    """downsample:keep=0.4 == the model without a method on the resized images (M-RoPE from the new grid): greedy
    tokens and every step's logits; cached decode == a recompute without cache; the batch == each sample alone."""
    spec = "downsample:keep=0.4"
    small = _regridded(vanilla, batch, spec)
    assert small["input_ids"].shape[1] < batch["input_ids"].shape[1]
    kw = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = vanilla.generate(**small, **kw)
        full = vanilla(**QWEN.full_inputs(small, ref.sequences), use_cache=False).logits
        apply_method(vanilla, spec)
        try:
            gen = vanilla.generate(**batch, **kw)
            alone = [vanilla.generate(**_sample(batch, i), **kw) for i in range(2)]
        finally:
            apply_method(vanilla, None)
    n, m = batch["input_ids"].shape[1], small["input_ids"].shape[1]
    assert torch.equal(gen.sequences[:, n:], ref.sequences[:, m:])
    for t, step in enumerate(gen.logits):
        assert (step - ref.logits[t]).abs().max() < 1e-4, t
        assert (step - full[:, full.shape[1] - 4 + t]).abs().max() < 1e-4, t
        for i in range(2):
            assert (step[i] - alone[i].logits[t][0]).abs().max() < 1e-4, i


@pytest.mark.parametrize("spec", ["downsample:keep=0.4", "downsample:grid_h=2,grid_w=3"])
def test_downsample_flops_analytic_equal_counted(vanilla, spec):
    """FlopCounterMode over one real forward == the analytic count: the tower + merger on the resized image, the LLM
    on its merged tokens."""
    inputs, V, counted, f = _counted_and_analytic(vanilla, spec, (160, 112))
    small = _regridded(vanilla, inputs, spec)
    assert f.baseline_vision_tokens == V and f.llm_vision_tokens == int(small["image_grid_thw"].prod() // 4) < V
    assert counted == f.ttft


def test_downsample_match_on_qwen_7b():
    """--match p-MoD-0.5 on Qwen2.5-VL-7B: at 1344x1008 (48x36 merged tokens) a merged grid within 1%; at 672x672 the
    28 px granularity leaves the nearest settings 1.2% / 3.7% away: one line naming --match-tolerance."""
    from pmod_bench.methods import solve
    from pmod_bench.methods.accounting import method_flops
    from pmod_bench.profiler.arch import load_arch

    arch = load_arch("qwen2.5-vl-7b")
    res = solve("downsample", arch, (1344, 1008), match="p-MoD-0.5")
    assert res.rel_err <= 0.01 and method_flops(res.config, arch, (1344, 1008), 58).llm_prefill == res.achieved
    with pytest.raises(MethodError) as err:
        solve("downsample", arch, (672, 672), match="p-MoD-0.5")
    assert "--match-tolerance" in str(err.value) and "\n" not in str(err.value)
    loose = solve("downsample", arch, (672, 672), match="p-MoD-0.5", tolerance=0.015)
    assert loose.config.budget()["grid_h"] * loose.config.budget()["grid_w"] == 17 * 18


@pytest.mark.slow
def test_cli_eval_visionzip_at_matched_flops_batch_1_equals_4(tmp_path, tmp_path_factory):
    """`pmod-bench eval --model tiny-qwen2.5-vl:vanilla --method visionzip:keep=... --match p-MoD-0.5` through lmms-eval
    on two fixture benchmarks: the solved budget is recorded, and the answers are the same at batch size 1 and 4."""
    pytest.importorskip("lmms_eval")
    from conftest import benchmark_data_env, lmms_eval_responses

    from pmod_bench.cli import main

    env = benchmark_data_env(tmp_path_factory, ["POPE", "RWQA"])
    next(env)
    answers = {}
    try:
        for bs in (1, 4):
            run = tmp_path / f"b{bs}"
            assert main(["eval", "--model", "tiny-qwen2.5-vl:vanilla", "--suite", "POPE,RWQA", "--output", str(run),
                         "--limit", "4", "--batch-size", str(bs), "--method", "visionzip:keep=0.5,dominant=54,contextual=10",
                         "--match", "p-MoD-0.5", "--gen-kwargs", "max_new_tokens=4", "--threads", "1"]) == 0
            answers[bs] = lmms_eval_responses(run)
    finally:
        next(env, None)
    assert len(answers[1]) == 9 and answers[1] == answers[4]  # POPE: 3 splits x 2 documents; RWQA: 3
    import json

    meta = json.loads((tmp_path / "b4" / "run.json").read_text())
    mm = meta["eval"]["method_match"]
    assert mm["rel_err"] <= 0.01 and mm["method"]["method"] == "visionzip" and mm["solved"]["keep"] < 1
    assert meta["model_info"]["method"] == mm["method"]  # the model ran with the solved budget


def test_a_bound_method_keeps_its_fraction_on_another_image():
    """A method bound at 1344x1008 (1,728 tokens) keeps its 936 there and the same fraction of the training recipe's
    sample (576 tokens: 312), so its training-cost row is below the baseline's like p-MoD's (it was priced at 936)."""
    from pmod_bench.methods.variant import method_variant
    from pmod_bench.profiler.arch import load_arch

    arch = load_arch("qwen2.5-vl-7b")
    L = arch.text.layers
    v = method_variant("downsample:grid_h=26,grid_w=36").bind(arch, (1344, 1008), 58)
    assert v.kept_vision_tokens(L, 1728) == [936] * L and v.kept_vision_tokens(L, 576) == [312] * L
    fastv = method_variant("fastv:k=2,keep=0.5").bind(arch, (1344, 1008), 58)
    assert fastv.kept_vision_tokens(L, 576) == [576, 576] + [288] * (L - 2)
