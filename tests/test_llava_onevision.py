"""LLaVA-OneVision through its host adapter: what the parametrised model / core-contract / method tests do not cover
(registration and loading from a hub-layout directory, the preset, newline features as vision tokens, several images
and a video per prompt, the contract checks, the vision-stage methods that refuse). The shared behaviour (exactness,
cache, batching, generate, save/load, in-LLM methods with their official references) runs on every tiny host in
test_model.py, test_core_contract.py and test_methods_llm.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import (TinyHost, check_hub_directory_round_trip, check_in_llm_methods_batch_equals_alone,
                      check_pmod_classes, check_several_images_decode, check_vision_stage_methods_refuse)
from pmod_bench import PMoDConfig
from pmod_bench.methods import apply_method
from pmod_bench.model.compat import HFContractError
from pmod_bench.model.modeling import to_pmod
from pmod_bench.model.presets import demo_image, random_routers

OV = TinyHost("llava_onevision")


@pytest.fixture(scope="module")
def vanilla():
    torch.set_num_threads(1)
    return OV.build()


def _messages(*content):
    return [{"role": "user", "content": list(content)}]


def _two_image_batch():
    """Two prompts: one with two images (different sizes: one base tile + a newline each), one with one image (anyres
    tiles); left-padded."""
    proc = OV.processor
    msgs = [_messages({"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare the two images."}),
            _messages({"type": "image"}, {"type": "text", "text": "Count the shapes."})]
    prompts = [proc.apply_chat_template(m, add_generation_prompt=True) for m in msgs]
    images = [[demo_image(64, 48, seed=1), demo_image(96, 40, seed=2)], [demo_image(48, 80, seed=3)]]
    return proc(images=images, text=prompts, return_tensors="pt", padding=True)


def _prompt(batch, i, config):
    """Sample ``i`` of :func:`_two_image_batch` alone (sample 0: images 0 and 1; sample 1: image 2), padding removed."""
    keep = batch["attention_mask"][i].bool()
    images = slice(0, 2) if i == 0 else slice(2, 3)
    out = {"input_ids": batch["input_ids"][i:i + 1, keep], "attention_mask": batch["attention_mask"][i:i + 1, keep],
           "pixel_values": batch["pixel_values"][images], "image_sizes": batch["image_sizes"][images],
           "batch_num_images": batch["batch_num_images"][i:i + 1]}
    if i == 1:  # one image: its own anyres tiles only (the batch pads every image to the most tiles)
        out["pixel_values"] = out["pixel_values"][:, :_tiles(config, batch["image_sizes"][2])]
    return out


def _tiles(config, image_size) -> int:
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    return image_size_to_num_patches(image_size.tolist(), config.image_grid_pinpoints, config.vision_config.image_size)


def test_classes_registered_and_routers_are_linear(vanilla):
    from pmod_bench.model.hosts.llava_onevision import PMoDLlavaOnevisionConfig, PMoDLlavaOnevisionForConditionalGeneration

    model = check_pmod_classes(vanilla, "llava_onevision", PMoDLlavaOnevisionConfig,
                               PMoDLlavaOnevisionForConditionalGeneration)
    assert model.config.vision_feature_select_strategy == "full" and model.config.vision_aspect_ratio == "anyres_max_9"
    assert model.model.image_newline.data_ptr() == vanilla.model.image_newline.data_ptr()


def test_preset_gives_the_pmod_model():
    """load_model('tiny-llava-onevision') is p-MoD now (the refusal is lifted), ':vanilla' the HF model."""
    from pmod_bench.model.loading import load_model

    model, proc = load_model("tiny-llava-onevision")
    assert type(model).__name__ == "PMoDLlavaOnevisionForConditionalGeneration"
    assert type(proc).__name__ == "LlavaOnevisionProcessor" and model.pmod_layers
    assert model.layer_ratios() == PMoDConfig().layer_ratios(model.config.text_config.num_hidden_layers)
    base, _ = load_model("tiny-llava-onevision:vanilla")
    assert type(base).__name__ == "LlavaOnevisionForConditionalGeneration"


def test_load_model_on_a_local_hub_directory(tmp_path, vanilla):
    """A vanilla OneVision directory as llava-hf ships it (hub layout): load_model gives the vanilla model, or p-MoD
    with zero routers (at ratio 1 everywhere: the vanilla logits); a saved p-MoD model loads back (AutoProcessor
    included) with its routers and ratios."""
    from transformers import AutoProcessor

    from pmod_bench.model.presets import save_onevision_hub_layout

    save_onevision_hub_layout(vanilla, OV.processor, tmp_path / "hub")
    check_hub_directory_round_trip(tmp_path / "hub", tmp_path / "pmod", OV.inputs(sizes=[(64, 48), (96, 96)]),
                                   "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionProcessor")
    assert type(AutoProcessor.from_pretrained(tmp_path / "pmod")).__name__ == "LlavaOnevisionProcessor"


def test_newline_features_are_vision_tokens_and_routed(vanilla):
    """The <image> positions hold every packed feature: the base tile (4x4), the unpadded 6x8 grid and one newline a
    row (16 + 6 * 9 = 70 for 64x48 px). The routing target is all 70, so p-MoD can skip newline features too."""
    model = to_pmod(vanilla, PMoDConfig(shift=0.3))
    random_routers(model, seed=4)
    inputs = OV.inputs(sizes=[(64, 48)])
    target = OV.vision(model, inputs["input_ids"])[0]
    assert int(target.sum()) == 16 + 6 * 9
    captured = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda _m, _a, kw: captured.append(kw["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad(), model.record_routing() as rec:
            model(**inputs)
    finally:
        hook.remove()
    emb = captured[0][0]
    newline = (emb - model.model.image_newline.to(emb)).abs().amax(-1) == 0  # (N,) positions holding image_newline
    assert int(newline.sum()) == 6 and bool((newline <= target).all())  # one per grid row, all on <image> positions
    for idx, r in rec.items():
        assert torch.equal(r["target"][0], target)
        assert int(r["selected"][0].sum()) == int(70 * model.pmod_layers[idx].ratio)
    assert any(bool((r["selected"][0] ^ target)[newline].any()) for r in rec.values())  # some newline skipped somewhere


def test_several_images_per_prompt_decode_and_batch(vanilla):
    model = to_pmod(vanilla, PMoDConfig(shift=0.3))
    random_routers(model, seed=6)
    batch = _two_image_batch()
    vision = OV.vision(model, batch["input_ids"])
    assert batch["batch_num_images"].tolist() == [2, 1] and vision.sum(1).tolist()[0] == 2 * (16 + 1)
    check_several_images_decode(OV, model, batch)


def test_in_llm_methods_on_several_images_and_on_pmod(vanilla):
    """In-LLM methods on a two-image prompt, vanilla and p-MoD: the batch equals each prompt alone."""
    check_in_llm_methods_batch_equals_alone(vanilla, _two_image_batch(), lambda b, i, m: _prompt(b, i, m.config))


def test_video_tokens_are_vision_tokens(vanilla):
    """A video's pooled frame features and its closing newline sit on <video> positions: the routing target."""
    model = to_pmod(vanilla, PMoDConfig(shift=0.5))
    random_routers(model, seed=3)
    proc = OV.processor
    prompt = proc.apply_chat_template(_messages({"type": "video"}, {"type": "text", "text": "What happens?"}),
                                      add_generation_prompt=True)
    frames = np.stack([np.asarray(demo_image(64, 48, seed=s)) for s in range(4)])
    inputs = proc(videos=[frames], text=[prompt], return_tensors="pt")
    V = int((inputs["input_ids"] == model.config.video_token_id).sum())
    assert V == 4 * 2 * 2 + 1  # 4 frames of 4x4 patches pooled 2x2, one newline
    with torch.no_grad(), model.record_routing() as rec:
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    assert rec and all(int(r["target"].sum()) == V for r in rec.values())


def test_vision_stage_methods_refuse_in_one_line(vanilla):
    check_vision_stage_methods_refuse(vanilla, "LLaVA-OneVision", "LlavaOnevisionForConditionalGeneration",
                                      ported=("random", "visionzip", "downsample"))


def test_contract_checks_fail_loudly(vanilla, monkeypatch):
    from pmod_bench.model.hosts import host_for

    host_for(vanilla).check(vanilla)
    newline = vanilla.model.image_newline
    vanilla.model.image_newline = None
    try:
        with pytest.raises(HFContractError, match="image_newline"):
            to_pmod(vanilla, PMoDConfig())
    finally:
        vanilla.model.image_newline = newline
    monkeypatch.setattr(vanilla.config.text_config, "layer_types", ["sliding_attention"] + ["full_attention"] * 7)
    with pytest.raises(HFContractError, match="full attention"):
        apply_method(vanilla, "fastv")
    monkeypatch.undo()
    host_for(vanilla).check(vanilla)


def test_routing_record_grid_is_the_base_tile(vanilla):
    from pmod_bench.model.introspect import routing_record

    model = to_pmod(vanilla, PMoDConfig(shift=0.5))
    random_routers(model, seed=2)
    rec = routing_record(model, OV.processor, demo_image(64, 48))
    assert rec["grid"] == [4, 4] and rec["vision_tokens"] == 16 + 6 * 9  # the 32 px base tile of 8 px patches first
    assert set(rec["layers"]) == {str(i) for i in model.pmod_layers}
