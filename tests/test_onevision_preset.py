"""The tiny LLaVA-OneVision preset (random weights, local tokenizer and processor) and the LLaVA-OneVision arch presets."""

from __future__ import annotations

import json

import pytest

from conftest import assert_same_model, check_greedy_generate, check_save_pretrained_round_trip

QUESTION = "What is shown in the image?"


@pytest.fixture(scope="module")
def onevision():
    from pmod_bench.model.presets import build_preset

    return build_preset("tiny-llava-onevision", pmod=None)


def _inputs(processor, sizes=((64, 48),), per_prompt: int = 1):
    """One prompt per image size, or one prompt holding all ``sizes`` when ``per_prompt`` > 1."""
    from pmod_bench.model.presets import demo_image

    content = [{"type": "image"}] * per_prompt + [{"type": "text", "text": QUESTION}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = [demo_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    if per_prompt > 1:
        return processor(images=[images], text=[text], return_tensors="pt")
    return processor(images=images, text=[text] * len(sizes), return_tensors="pt", padding=True)


def test_tokenizer_has_onevisions_special_tokens_in_order():
    from pmod_bench.model.presets import tiny_onevision_tokenizer
    from pmod_bench.model.processors import ONEVISION_SPECIAL_TOKENS

    tok = tiny_onevision_tokenizer()
    ids = [tok.convert_tokens_to_ids(t) for t in ONEVISION_SPECIAL_TOKENS]
    assert ids == list(range(len(tok) - 5, len(tok)))  # consecutive and last, as 151643..151647 in the hub vocabulary
    assert (tok.eos_token, tok.pad_token, tok.bos_token, tok.padding_side) == ("<|im_end|>", "<|endoftext|>", None, "left")
    text = "<|im_start|>user\n<image>\n<image>\nIs there a red car?<|im_end|>\n"
    enc = tok(text).input_ids
    assert enc.count(tok.convert_tokens_to_ids("<image>")) == 2  # never split
    assert tok.decode(enc) == text


def test_chat_template_is_the_hubs(onevision):
    """llava-hf/llava-onevision-qwen2-7b-ov-hf's chat_template.json is 824 bytes; ours, written the way
    save_pretrained wrote it (indent 2), is the same size, and renders the hub's prompt format."""
    from pmod_bench.model.processors import ONEVISION_CHAT_TEMPLATE

    _, processor = onevision
    assert len((json.dumps({"chat_template": ONEVISION_CHAT_TEMPLATE}, indent=2) + "\n").encode()) == 824
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTION}]}]
    assert processor.apply_chat_template(msgs, add_generation_prompt=True) == (
        "<|im_start|>user\n<image>\n<image>\nWhat is shown in the image?<|im_end|>\n<|im_start|>assistant\n")
    turns = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}]
    assert processor.apply_chat_template(turns) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n")


def test_tiny_config_exercises_onevisions_features(onevision):
    model, processor = onevision
    cfg = model.config
    t, v = cfg.text_config, cfg.vision_config
    assert (cfg.vision_feature_select_strategy, cfg.vision_feature_layer, cfg.vision_aspect_ratio) == ("full", -1, "anyres_max_9")
    assert (v.model_type, v.vision_use_head) == ("siglip_vision_model", False)
    assert model.model.vision_tower.embeddings.num_positions == (v.image_size // v.patch_size) ** 2  # no [CLS] position
    assert max(max(p) for p in cfg.image_grid_pinpoints) == 6 * v.image_size and len(cfg.image_grid_pinpoints) == 36
    assert t.num_key_value_heads < t.num_attention_heads  # GQA
    assert model.model.language_model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's q/k/v biases
    assert processor.num_image_tokens == (v.image_size // v.patch_size) ** 2
    assert processor.image_processor.image_grid_pinpoints == cfg.image_grid_pinpoints


@pytest.mark.parametrize("size, tiles, tokens", [
    ((64, 48), 5, 16 + 6 * 9),  # 2x2 tiles, the 8x8 map unpadded to 6x8, one newline a row
    ((32, 32), 2, 16 + 4 * 5),
    ((190, 190), 37, 16 + 12 * 13),  # 6x6 tiles: a 24x24 map above 9 tiles' worth, bilinearly shrunk to 12x12
    ((150, 60), 11, 16 + 8 * 21),  # 2x5 tiles: an 8x20 map, 10 tiles' worth but within the 1.1 slack: kept
])
def test_processor_tiles_and_the_model_agrees(onevision, size, tiles, tokens):
    """The processor's <image> count is what the model's pack_image_features produces (it refuses a mismatch)."""
    import torch

    model, processor = onevision
    inputs = _inputs(processor, [size])
    assert int(inputs["pixel_values"].shape[1]) == tiles and inputs["image_sizes"].tolist() == [[size[1], size[0]]]
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == tokens
    with torch.no_grad():
        assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_several_images_in_one_prompt_are_one_tile_each(onevision):
    import torch

    model, processor = onevision
    inputs = _inputs(processor, [(64, 48), (190, 190), (150, 60)], per_prompt=3)
    assert inputs["batch_num_images"].tolist() == [3] and tuple(inputs["pixel_values"].shape[:2]) == (3, 1)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 3 * (16 + 1)  # base tile + a newline each
    with torch.no_grad():
        model(**inputs)


def test_generate_on_a_processed_image_prompt(onevision):
    model, processor = onevision
    inputs = _inputs(processor, [(64, 48), (150, 60)])  # different token counts, left-padded
    assert inputs["attention_mask"][0, 0] == 0 and inputs["attention_mask"][1].all()
    check_greedy_generate(model, inputs)


def test_save_pretrained_round_trip(onevision, tmp_path):
    model, processor = onevision
    check_save_pretrained_round_trip(model, processor, tmp_path, lambda proc: _inputs(proc, [(190, 190)]), "LlavaOnevisionForConditionalGeneration")


def test_hub_layout_round_trip(onevision, tmp_path):
    """The files llava-hf/llava-onevision-qwen2-7b-ov-hf ships (preprocessor_config.json with the pinpoints,
    processor_config.json with the image tokens per tile, chat_template.json) load offline."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pmod_bench.model.presets import save_onevision_hub_layout

    model, processor = onevision
    save_onevision_hub_layout(model, processor, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "chat_template.json", "config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json",
        "processor_config.json", "tokenizer.json", "tokenizer_config.json",
    ]
    pre = json.loads((tmp_path / "preprocessor_config.json").read_text())
    own = json.loads((tmp_path / "processor_config.json").read_text())
    assert (pre["image_processor_type"], pre["size"], pre["image_mean"]) == ("LlavaOnevisionImageProcessor", {"height": 32, "width": 32},
                                                                             [0.5, 0.5, 0.5])
    assert (own["num_image_tokens"], own["vision_feature_select_strategy"], own["processor_class"]) == (16, "full", "LlavaOnevisionProcessor")
    loaded_proc = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded_proc).__name__ == "LlavaOnevisionProcessor" and loaded_proc.chat_template == processor.chat_template
    assert (loaded_proc.num_image_tokens, loaded_proc.vision_feature_select_strategy) == (16, "full")
    assert loaded_proc.image_processor.image_grid_pinpoints == processor.image_processor.image_grid_pinpoints
    inputs = _inputs(loaded_proc, [(190, 190)])
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 16 + 12 * 13
    assert_same_model(model, AutoModelForImageTextToText.from_pretrained(tmp_path).eval(), inputs)


@pytest.mark.parametrize("name, params, vision, hub", [
    ("llava-onevision-0.5b", 893_675_552, 397_747_744, "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"),
    ("llava-onevision-7b", 8_030_807_584, 397_747_744, "llava-hf/llava-onevision-qwen2-7b-ov-hf"),
    ("llava-onevision-72b", 73_181_570_592, 397_747_744, "llava-hf/llava-onevision-qwen2-72b-ov-hf"),
])
def test_arch_presets_match_the_hub_models(name, params, vision, hub):
    """The transcribed configs build models of the hub's parameter counts (894M, 8.03B, 73.2B on the model cards; the
    7B's four bf16 shards hold 16.06 GB), counted on the meta device; SigLIP so400m without its last layer."""
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    from pmod_bench.model.presets import ONEVISION_HUB, preset_config

    assert ONEVISION_HUB[name][0] == hub
    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(preset_config(name))
    assert sum(p.numel() for p in model.parameters()) == params
    assert sum(p.numel() for p in model.model.vision_tower.parameters()) == vision


def test_pmod_on_the_onevision_preset_comes_with_the_host_adapter_and_vanilla_loads():
    from pmod_bench.model.loading import load_model
    from pmod_bench.model.presets import build_preset

    model, _ = build_preset("tiny-llava-onevision")
    assert type(model).__name__ == "PMoDLlavaOnevisionForConditionalGeneration" and model.pmod_layers
    assert model.config.model_type == "pmod_llava_onevision" and model.config.vision_feature_select_strategy == "full"
    model, processor = load_model("tiny-llava-onevision:vanilla")
    assert (type(model).__name__, type(processor).__name__) == ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionProcessor")
