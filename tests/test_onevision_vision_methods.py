"""Vision-stage methods on LLaVA-OneVision (pmod_bench/methods/onevision_vision.py): random, visionzip (patches ranked
by the attention they receive: SigLIP has no [CLS]) and downsample (OneVision's own packing at a smaller grid). The
packing equals HF's, the selection is the expected one, cached decode equals a recompute, a batch equals its samples
alone, the analytic FLOPs equal FlopCounterMode, ``--match p-MoD-0.5`` lands within 1% on the 7B; FasterVLM / PruMerge
refuse in one line."""

import json

import pytest
import torch

from conftest import TinyHost, make_inputs, method_forward_flops
from pmod_bench.methods import MethodError, apply_method, parse_method_spec
from pmod_bench.model.presets import demo_image

OV = TinyHost("llava_onevision")
#: a 64x48 and a 100x40 image (width x height); test_packing adds a 190x150 one, which needs the anyres_max_9 shrink
SIZES = ((64, 48), (100, 40))
SPECS = ("random:tokens=5,seed=3", "visionzip:dominant=4,contextual=2", "downsample:grid_h=2,grid_w=3")


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def vanilla():
    return OV.build()


@pytest.fixture(scope="module")
def batch():
    return make_inputs(OV.processor, sizes=SIZES)


def _tiles_and_features(model, inputs):
    from pmod_bench.methods.base import ModelGeometry
    from pmod_bench.methods.vision import project, run_tower, split_tiles

    geometry = ModelGeometry.from_config(model.config)
    tiles = split_tiles(model, inputs["pixel_values"], inputs["image_sizes"])
    return geometry, tiles, [project(model, run_tower(model, geometry, t).hidden) for t in tiles]


def test_packing_is_hfs_and_counts_are_the_processors(vanilla):
    """At the full grid pack_onevision == LlavaOnevisionModel.pack_image_features (an image that needs the anyres_max_9
    shrink too), and the host's image_tokens == the processor's expansion of <image>."""
    from pmod_bench.methods.onevision_vision import pack_onevision
    from pmod_bench.model.hosts import host_for
    from pmod_bench.model.hosts.llava_next import unpadded_grid
    from pmod_bench.model.hosts.llava_onevision import packed_map

    inputs = make_inputs(OV.processor, sizes=SIZES + ((190, 150),))
    g = vanilla.config.vision_config.image_size // vanilla.config.vision_config.patch_size
    with torch.no_grad():
        ref = vanilla.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                               batch_num_images=inputs["batch_num_images"]).pooler_output
        _, _, feats = _tiles_and_features(vanilla, inputs)
    counts = (inputs["input_ids"] == vanilla.config.image_token_id).sum(1).tolist()
    for f, r, size, n in zip(feats, ref, inputs["image_sizes"].tolist(), counts):
        assert torch.equal(pack_onevision(vanilla, f, size, g, g), r)
        assert host_for(vanilla).image_tokens(vanilla.config, size) == n == r.shape[0]
    size = inputs["image_sizes"][2].tolist()                           # 150 x 190: an 18 x 24 map, shrunk to 10 x 13
    assert unpadded_grid(vanilla.config, size, g, g) == (18, 24) and packed_map(vanilla.config, size, g, g) == (10, 13)


def test_visionzip_keeps_the_patches_that_receive_most_attention(vanilla, batch):
    """Per tile: the dominant patches are the top of (attention received, heads averaged, queries summed) of the
    layer OneVision reads, computed here from the tower's own eager attention output; + the contextual targets; the
    kept tokens are in raster order; the LLM gets tiles x (dominant + contextual) tokens, no newline."""
    from pmod_bench.methods.onevision_vision import received_attention

    apply_method(vanilla, "visionzip:dominant=4,contextual=2")
    try:
        with torch.no_grad():
            mi = vanilla.method_inputs(batch["input_ids"], batch["pixel_values"], batch["image_sizes"],
                                       batch["attention_mask"])
            _, tiles, _ = _tiles_and_features(vanilla, batch)
            att = vanilla.model.vision_tower(torch.cat(tiles), output_attentions=True).attentions[-1]
    finally:
        apply_method(vanilla, None)
    scores = att.mean(1).sum(1)                                         # (T, P)
    assert torch.allclose(scores.sum(1), torch.full((scores.shape[0],), 16.0))
    assert torch.equal(received_attention(att), scores)
    sel = [s for im in mi.images for s in im.selection]
    assert len(sel) == scores.shape[0] == sum(t.shape[0] for t in tiles)
    for s, sc in zip(sel, scores):
        top = set(sc.topk(4).indices.tolist())
        assert top <= set(s.tolist()) and s.numel() == 6 and torch.equal(s, s.sort().values)
    assert [im.features.shape[0] for im in mi.images] == [6 * t.shape[0] for t in tiles]


def test_visionzip_on_crafted_attention_picks_the_attended_patches():
    """A crafted map: every query attends to patches 5 and 11 (heads alike) -> those two are dominant; the four
    contextual targets are every 3rd of the others, each + the mean of the patches whose key points its way."""
    from pmod_bench.methods.onevision_vision import received_attention
    from pmod_bench.methods.qwen_vision import visionzip_merged

    P = 16
    att = torch.full((1, 2, P, P), 0.1 / (P - 2))
    att[..., [5, 11]] = 0.45
    scores = received_attention(att)[0]
    assert set(scores.topk(2).indices.tolist()) == {5, 11}
    hidden = torch.arange(P, dtype=torch.float32)[:, None].repeat(1, 3)
    keys = torch.zeros(P, 2)
    keys[:, 0] = 1.0                                                    # every key alike: all merge into target 0
    idx, out = visionzip_merged(hidden, scores, keys, dominant=2, contextual=4)
    rest = [i for i in range(P) if i not in (5, 11)]                    # 14 others, step 14 // 4 = 3: targets 0, 3, 6, 9
    targets = [rest[i] for i in (0, 3, 6, 9)]
    assert idx.tolist() == sorted([5, 11] + targets)
    merged = [rest[i] for i in range(14) if i not in (0, 3, 6, 9)]
    assert out[idx.tolist().index(targets[0]), 0] == targets[0] + sum(merged) / len(merged)


def test_random_keeps_the_seeded_subset_of_every_tile(vanilla, batch):
    from pmod_bench.methods.random_prune import RandomPruneConfig

    cfg = parse_method_spec("random:tokens=5,seed=3")
    apply_method(vanilla, cfg)
    try:
        with torch.no_grad():
            mi = vanilla.method_inputs(batch["input_ids"], batch["pixel_values"], batch["image_sizes"],
                                       batch["attention_mask"])
    finally:
        apply_method(vanilla, None)
    assert isinstance(cfg, RandomPruneConfig)
    for im in mi.images:
        assert [s.tolist() for s in im.selection] == [cfg.subset(t, 16, 5).tolist() for t in range(len(im.selection))]
        assert im.features.shape[0] == 5 * len(im.selection)


def test_downsample_at_the_full_grid_is_the_model_and_smaller_counts_as_the_host(vanilla, batch):
    """grid 4x4 (the tile's own) == the model without a method; 2x3 -> the host's image_tokens at that grid."""
    from pmod_bench.model.hosts import host_for

    with torch.no_grad():
        ref = vanilla(**batch).logits
        apply_method(vanilla, "downsample:grid_h=4,grid_w=4")
        try:
            got = vanilla(**batch).logits
        finally:
            apply_method(vanilla, None)
        apply_method(vanilla, "downsample:grid_h=2,grid_w=3")
        try:
            mi = vanilla.method_inputs(batch["input_ids"], batch["pixel_values"], batch["image_sizes"],
                                       batch["attention_mask"])
        finally:
            apply_method(vanilla, None)
    real = batch["attention_mask"].bool()
    assert (got - ref)[real].abs().max() < 1e-4
    sizes = batch["image_sizes"].tolist()
    assert [im.features.shape[0] for im in mi.images] == [host_for(vanilla).image_tokens(vanilla.config, s, 2, 3)
                                                          for s in sizes]


@pytest.mark.parametrize("spec", SPECS)
def test_cached_decode_equals_recompute_and_batch_equals_alone(vanilla, batch, spec):
    n_prompt = batch["input_ids"].shape[1]
    apply_method(vanilla, spec)
    try:
        with torch.no_grad():
            gen = vanilla.generate(**batch, max_new_tokens=3, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
            new = gen.sequences[:, n_prompt:]
            full = dict(batch, input_ids=gen.sequences[:, :-1],
                        attention_mask=torch.cat([batch["attention_mask"], torch.ones_like(new[:, :-1])], 1))
            logits = vanilla(**full, use_cache=False).logits
            steps = torch.stack(gen.logits, 1)
            torch.testing.assert_close(logits[:, -3:], steps, atol=2e-4, rtol=1e-4)
            for b in range(2):
                one = make_inputs(OV.processor, sizes=SIZES[b:b + 1], questions=None if b == 0 else
                                  ["Is there a red circle? Answer yes or no."])
                g1 = vanilla.generate(**one, max_new_tokens=3, do_sample=False, output_logits=True,
                                      return_dict_in_generate=True)
                assert torch.equal(g1.sequences[0, one["input_ids"].shape[1]:], new[b])
                torch.testing.assert_close(torch.stack(g1.logits, 1)[0], steps[b], atol=2e-4, rtol=1e-4)
    finally:
        apply_method(vanilla, None)


def test_pmod_onevision_routes_exactly_the_compressed_vision_tokens():
    """On the p-MoD OneVision (the tiny preset) a vision-stage method's kept tokens are the vision tokens p-MoD routes;
    generate() runs with them."""
    from pmod_bench.model.presets import build_preset, preset_processor

    model, _ = build_preset("tiny-llava-onevision")
    inputs = make_inputs(preset_processor("tiny-llava-onevision"), sizes=SIZES[:1])
    apply_method(model, "visionzip:dominant=4,contextual=2")
    try:
        with torch.no_grad():
            mi = model.method_inputs(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"],
                                     inputs["attention_mask"])
            with model.record_routing() as rec:
                model(**inputs)
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    finally:
        apply_method(model, None)
    layer = next(iter(rec.values()))
    assert torch.equal(layer["target"], mi.vision_token_mask)
    assert int(mi.vision_token_mask.sum()) == 6 * len(mi.images[0].selection)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


@pytest.mark.parametrize("spec", SPECS + ("downsample:keep=0.25",))
def test_flops_analytic_equal_counted(spec):
    """FlopCounterMode over a real forward of tiny-llava-onevision == the analytic count (SigLIP over every tile at its
    grid, the projector on what is kept, visionzip's similarities and merge, the LLM on the shortened prompt)."""
    from pmod_bench.methods.accounting import method_flops
    from pmod_bench.model.presets import build_preset, preset_processor
    from pmod_bench.profiler.arch import load_arch

    model, _ = build_preset("tiny-llava-onevision", pmod=None)
    inputs = make_inputs(preset_processor("tiny-llava-onevision"), sizes=((64, 48),))
    mi, measured = method_forward_flops(model, inputs, spec)
    text = int((inputs["input_ids"] != model.config.image_token_id).sum())
    n = mi.inputs_embeds.shape[1]
    f = method_flops(model.method_config, load_arch("tiny-llava-onevision"), (64, 48), text_tokens=text, logits_tokens=n)
    assert f.llm_vision_tokens == n - text == int(mi.vision_token_mask.sum())
    assert f.vision + f.llm_prefill == measured
    assert (f.method_extra > 0) == spec.startswith("visionzip")


@pytest.mark.parametrize("spec", ["random", "visionzip", "downsample"])
def test_matches_pmod_05_on_onevision_7b(spec):
    """``--match p-MoD-0.5`` on llava-onevision-7b at 672x672 (5 tiles, 3,699 vision tokens) within 1%."""
    from pmod_bench.methods import solve
    from pmod_bench.methods.accounting import method_flops
    from pmod_bench.profiler.arch import load_arch

    arch = load_arch("llava-onevision-7b")
    res = solve(spec, arch, (672, 672), match="p-MoD-0.5")
    assert res.rel_err <= 0.01
    f = method_flops(res.config, arch, (672, 672), 58)
    assert f.baseline_vision_tokens == 3699 and f.llm_prefill == res.achieved and f.llm_vision_tokens < 3699


def test_cls_methods_and_several_images_refuse_in_one_line(vanilla):
    for spec in ("fastervlm", "prumerge", "prumerge_plus"):
        with pytest.raises(MethodError) as err:
            apply_method(vanilla, spec)
        assert "tower has no [CLS] token" in str(err.value) and "\n" not in str(err.value)
    proc = OV.processor
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}]
    two = proc(images=[[demo_image(64, 48, seed=1), demo_image(40, 40, seed=2)]],
               text=[proc.apply_chat_template(msgs, add_generation_prompt=True)], return_tensors="pt")
    apply_method(vanilla, "random:keep=0.5")
    try:
        with pytest.raises(MethodError) as err, torch.no_grad():
            vanilla(**two)
    finally:
        apply_method(vanilla, None)
    assert "one image per prompt" in str(err.value) and "\n" not in str(err.value)
    assert type(vanilla).__name__ == "LlavaOnevisionForConditionalGeneration"


@pytest.mark.slow
def test_profile_rows_on_onevision_7b(tmp_path):
    """``pmod-bench profile --arch llava-onevision-7b --method ... --match p-MoD-0.5``: one row per method, each within
    1% of the p-MoD-0.5 row's prefill TFLOPs."""
    from pmod_bench.cli import main

    out = tmp_path / "prof"
    argv = ["profile", "--arch", "llava-onevision-7b", "--variant", "p-MoD-0.5", "--method", "random", "--method",
            "visionzip", "--method", "downsample", "--match", "p-MoD-0.5", "--no-latency", "--no-verify", "--out", str(out)]
    assert main(argv) == 0
    rows = json.loads((out / "profile.json").read_text())["rows"]
    by = {r["variant"].split(":")[0]: r for r in rows}
    assert {"random", "visionzip", "downsample"} <= set(by)
    target = next(r for r in rows if r["variant"].startswith("p-MoD"))["prefill_tflops"]
    for name in ("random", "visionzip", "downsample"):
        assert abs(by[name]["prefill_tflops"] - target) / target <= 0.01, name
