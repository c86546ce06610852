"""Qwen2.5-VL through its host adapter: what the parametrised model / core-contract / method tests do not cover
(registration and loading, several images per prompt, M-RoPE positions, the contract checks, the methods that
wait for the next issue). The shared behaviour (exactness, cache, batching, generate, save/load, in-LLM methods)
runs on all three tiny hosts in test_model.py, test_core_contract.py and test_methods_llm.py."""

from __future__ import annotations

import pytest
import torch

from conftest import (TinyHost, check_hub_directory_round_trip, check_in_llm_methods_batch_equals_alone,
                      check_pmod_classes, check_several_images_decode, check_vision_stage_methods_refuse)
from pmod_bench import PMoDConfig
from pmod_bench.methods import apply_method
from pmod_bench.model.compat import HFContractError
from pmod_bench.model.modeling import to_pmod
from pmod_bench.model.presets import demo_image, random_routers

QWEN = TinyHost("qwen2_5_vl")


@pytest.fixture(scope="module")
def vanilla():
    return QWEN.build()


def _two_image_batch():
    """Two prompts: one with two images (different sizes), one with one image; left-padded."""
    proc = QWEN.processor
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"}, {"type": "image"},
                                          {"type": "text", "text": "the two images."}]}],
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count the shapes."}]}]]
    prompts = [proc.apply_chat_template(m, add_generation_prompt=True) for m in msgs]
    images = [demo_image(64, 48, seed=1), demo_image(96, 40, seed=2), demo_image(48, 80, seed=3)]
    return proc(images=images, text=prompts, return_tensors="pt", padding=True)


def test_classes_registered_and_routers_are_linear(vanilla):
    from pmod_bench.model.hosts.qwen2_5_vl import PMoDQwen2_5_VLConfig, PMoDQwen2_5_VLForConditionalGeneration

    check_pmod_classes(vanilla, "qwen2_5_vl", PMoDQwen2_5_VLConfig, PMoDQwen2_5_VLForConditionalGeneration)


def test_load_model_on_a_local_hub_directory(tmp_path, vanilla):
    """A vanilla Qwen2.5-VL directory in HF layout (as `hf download` leaves it): load_model gives the vanilla model,
    or p-MoD with zero routers (at ratio 1 everywhere: the vanilla logits); a saved p-MoD model loads back with its
    routers and ratios."""
    vanilla.save_pretrained(tmp_path / "hub")
    QWEN.processor.save_pretrained(tmp_path / "hub")
    check_hub_directory_round_trip(tmp_path / "hub", tmp_path / "pmod", QWEN.inputs(sizes=[(64, 48), (96, 96)]),
                                   "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor")


def test_several_images_per_prompt_decode_and_batch(vanilla):
    """Cached decode == full recompute with M-RoPE positions from HF; all images of a prompt are one routing target."""
    model = to_pmod(vanilla, PMoDConfig(shift=0.3))
    random_routers(model, seed=6)
    batch = _two_image_batch()
    vision = QWEN.vision(model, batch["input_ids"])
    assert batch["image_grid_thw"].shape[0] == 3 and vision.sum(1).tolist()[0] > vision.sum(1).tolist()[1]
    check_several_images_decode(QWEN, model, batch)


def test_mrope_positions_are_the_ones_hf_uses(vanilla):
    """The (3, B, N) ids the adapter reads give exactly the (cos, sin) every decoder layer receives (prefill and a
    cached decode step): the renumbering methods rotate from the same positions HF does."""
    from pmod_bench.model.hosts.qwen2_5_vl import mrope_position_ids

    lm = vanilla.model.language_model
    seen = []

    def grab(_m, _a, kw):
        seen.append((mrope_position_ids(kw), kw["inputs_embeds"]))

    got = []
    hooks = [lm.register_forward_pre_hook(grab, with_kwargs=True),
             lm.layers[3].register_forward_pre_hook(lambda _m, _a, kw: got.append(kw["position_embeddings"]), with_kwargs=True)]
    try:
        with torch.no_grad():
            vanilla.generate(**QWEN.inputs(sizes=[(64, 48), (96, 96)]), max_new_tokens=2, do_sample=False)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == len(got) == 2 and seen[0][0].shape[0] == 3
    assert not torch.equal(seen[0][0][1], seen[0][0][2])  # the image's height and width rows differ
    for (ids, x), (cos, sin) in zip(seen, got):
        c, s = lm.rotary_emb(x, ids)
        assert torch.equal(c, cos) and torch.equal(s, sin)


def test_vision_stage_methods_refuse_in_one_line(vanilla):
    check_vision_stage_methods_refuse(vanilla, "come with the next issue", "Qwen2_5_VLForConditionalGeneration",
                                      ported=("random", "visionzip", "downsample"))


def test_in_llm_methods_on_several_images_and_on_pmod(vanilla):
    """In-LLM methods on a two-image prompt, vanilla and p-MoD: the batch equals each prompt alone."""
    check_in_llm_methods_batch_equals_alone(vanilla, _two_image_batch(), lambda b, i, _m: _prompt(b, i))


def _prompt(batch, i):
    """Sample ``i`` of :func:`_two_image_batch` alone (sample 0: images 0 and 1; sample 1: image 2), padding removed."""
    keep = batch["attention_mask"][i].bool()
    images = slice(0, 2) if i == 0 else slice(2, 3)
    patches = batch["image_grid_thw"].prod(-1).cumsum(0).tolist()
    start, end = ([0] + patches)[images.start], patches[images.stop - 1]
    return {"input_ids": batch["input_ids"][i:i + 1, keep], "attention_mask": batch["attention_mask"][i:i + 1, keep],
            "mm_token_type_ids": batch["mm_token_type_ids"][i:i + 1, keep],
            "pixel_values": batch["pixel_values"][start:end], "image_grid_thw": batch["image_grid_thw"][images]}


def test_contract_checks_fail_loudly(vanilla, monkeypatch):
    from pmod_bench.model.hosts import host_for

    host = host_for(vanilla)
    host.check(vanilla)
    rotary = vanilla.model.language_model.rotary_emb
    monkeypatch.setattr(rotary, "mrope_section", [2, 3])
    with pytest.raises(HFContractError, match="mrope_section"):
        to_pmod(vanilla, PMoDConfig())
    monkeypatch.undo()
    monkeypatch.setattr(vanilla.config.text_config, "layer_types", ["sliding_attention"] + ["full_attention"] * 7)
    with pytest.raises(HFContractError, match="full attention"):
        apply_method(vanilla, "fastv")


def test_routing_record_grid_is_the_merged_patch_grid(vanilla):
    from pmod_bench.model.introspect import routing_record

    model = to_pmod(vanilla, PMoDConfig(shift=0.5))
    random_routers(model, seed=2)
    rec = routing_record(model, QWEN.processor, demo_image(64, 48))
    # 48x64 px -> smart_resize to the min pixels (112x140) -> 8x10 patches of 14 px -> merged 4x5
    assert rec["grid"] == [4, 5] and rec["vision_tokens"] == 20
    assert set(rec["layers"]) == {str(i) for i in model.pmod_layers}


@pytest.mark.slow
def test_demo_on_the_qwen_preset(capsys):
    """`pmod-bench demo --preset tiny-qwen2.5-vl`: the per-layer table of the p-MoD Qwen, vision tokens as its adapter
    finds them (64x48 px -> 20 merged patches)."""
    from pmod_bench.cli import main

    assert main(["demo", "--preset", "tiny-qwen2.5-vl", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny-qwen2.5-vl: 8 layers;") and "(20 vision," in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert len(rows) == 8 and rows[0][2] == "20/20" and int(rows[-1][2].split("/")[0]) < 20
