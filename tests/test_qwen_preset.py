"""The tiny Qwen2.5-VL preset (random weights, local tokenizer and processor) and the Qwen2.5-VL arch presets."""

from __future__ import annotations

import json

import pytest

from conftest import assert_same_model, check_greedy_generate, check_save_pretrained_round_trip

QUESTION = "What is shown in the image?"


@pytest.fixture(scope="module")
def qwen():
    from pmod_bench.model.presets import build_preset

    return build_preset("tiny-qwen2.5-vl", pmod=None)


def _inputs(processor, sizes=((64, 48),)):
    from pmod_bench.model.presets import demo_image

    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    images = [demo_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    return processor(images=images, text=[text] * len(sizes), return_tensors="pt", padding=True)


def test_tokenizer_has_qwens_special_tokens_in_order():
    from pmod_bench.model.presets import tiny_qwen_tokenizer
    from pmod_bench.model.processors import QWEN_SPECIAL_TOKENS

    tok = tiny_qwen_tokenizer()
    ids = [tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # consecutive, after the learned vocabulary, as in Qwen's
    assert ids[-1] == len(tok) - 1
    assert (tok.eos_token, tok.pad_token, tok.bos_token, tok.padding_side) == ("<|im_end|>", "<|endoftext|>", None, "left")
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>Is there a red car?<|im_end|>\n"
    enc = tok(text).input_ids
    assert enc.count(tok.convert_tokens_to_ids("<|image_pad|>")) == 2  # special tokens are never split
    assert tok.decode(enc) == text


def test_chat_template_renders_like_qwen2_5_vl_instruct(qwen):
    _, processor = qwen
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    assert processor.apply_chat_template(msgs, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is shown in the image?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    own_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello"}]
    assert processor.apply_chat_template(own_system) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    )


@pytest.mark.parametrize("size, grid", [((64, 48), (8, 10)), ((28, 28), (8, 8)), ((1000, 400), (10, 24))])
def test_processor_resizes_by_smart_resize(qwen, size, grid):
    """Image tokens = merged 2x2 patches of the image smart_resize'd into [min_pixels, max_pixels] (16..64 tokens)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    from pmod_bench.model.presets import TINY_QWEN_MAX_PIXELS, TINY_QWEN_MIN_PIXELS

    model, processor = qwen
    inputs = _inputs(processor, [size])
    h, w = smart_resize(size[1], size[0], 28, TINY_QWEN_MIN_PIXELS, TINY_QWEN_MAX_PIXELS)
    assert (h // 14, w // 14) == grid
    assert inputs["image_grid_thw"].tolist() == [[1, *grid]]
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == grid[0] * grid[1] // 4
    assert tuple(inputs["pixel_values"].shape) == (grid[0] * grid[1], 3 * 2 * 14 * 14)


def test_tiny_config_exercises_qwens_features(qwen):
    model, _ = qwen
    cfg = model.config
    t, v = cfg.text_config, cfg.vision_config
    head_dim = t.hidden_size // t.num_attention_heads
    assert sum(t.rope_parameters["mrope_section"]) == head_dim // 2
    assert t.num_key_value_heads < t.num_attention_heads  # GQA
    assert model.model.language_model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's q/k/v biases
    window_blocks = [i for i in range(v.depth) if i not in v.fullatt_block_indexes]
    assert window_blocks and v.fullatt_block_indexes  # both kinds of vision attention run
    assert v.window_size // v.spatial_merge_size // v.patch_size == 2  # windows of 2x2 merged patches
    assert v.out_hidden_size == t.hidden_size


def test_generate_on_a_processed_image_prompt(qwen):
    model, processor = qwen
    inputs = _inputs(processor, [(64, 48), (90, 40)])  # two image sizes, left-padded
    assert inputs["attention_mask"][:, 0].tolist().count(0) == 1
    check_greedy_generate(model, inputs)


def test_save_pretrained_round_trip(qwen, tmp_path):
    model, processor = qwen
    check_save_pretrained_round_trip(model, processor, tmp_path, _inputs, "Qwen2_5_VLForConditionalGeneration")


def test_hub_layout_round_trip(qwen, tmp_path):
    """The files Qwen/Qwen2.5-VL-7B-Instruct ships (preprocessor_config.json, chat_template.json) load offline."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pmod_bench.model.presets import TINY_QWEN_MAX_PIXELS, TINY_QWEN_MIN_PIXELS, save_qwen_hub_layout

    model, processor = qwen
    save_qwen_hub_layout(model, processor, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "chat_template.json", "config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json",
        "tokenizer.json", "tokenizer_config.json",
    ]
    pre = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert (pre["min_pixels"], pre["max_pixels"], pre["processor_class"]) == (TINY_QWEN_MIN_PIXELS, TINY_QWEN_MAX_PIXELS, "Qwen2_5_VLProcessor")
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    loaded_proc = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded_proc).__name__ == "Qwen2_5_VLProcessor"
    assert loaded_proc.chat_template == processor.chat_template
    assert loaded_proc.image_processor.size["longest_edge"] == TINY_QWEN_MAX_PIXELS
    inputs = _inputs(loaded_proc, [(64, 48)])
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 10]]
    assert_same_model(model, AutoModelForImageTextToText.from_pretrained(tmp_path).eval(), inputs)


@pytest.mark.parametrize("name, params, vision, hub", [
    ("qwen2.5-vl-3b", 3_754_622_976, 668_684_288, "Qwen/Qwen2.5-VL-3B-Instruct"),
    ("qwen2.5-vl-7b", 8_292_166_656, 676_550_144, "Qwen/Qwen2.5-VL-7B-Instruct"),
    ("qwen2.5-vl-32b", 33_452_718_336, 688_841_984, "Qwen/Qwen2.5-VL-32B-Instruct"),
    ("qwen2.5-vl-72b", 73_410_777_344, 704_573_696, "Qwen/Qwen2.5-VL-72B-Instruct"),
])
def test_arch_presets_match_the_hub_models(name, params, vision, hub):
    """The transcribed configs build models of the hub's parameter counts (3.75B, 8.29B, 33.5B, 73.4B on the model
    cards), counted on the meta device."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from pmod_bench.model.presets import QWEN2_5_VL_HUB, preset_config

    assert QWEN2_5_VL_HUB[name][0] == hub
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(preset_config(name))
    assert sum(p.numel() for p in model.parameters()) == params
    assert sum(p.numel() for p in model.model.visual.parameters()) == vision


@pytest.fixture(scope="module")
def pmod_qwen():
    from pmod_bench.model.loading import load_model
    from pmod_bench.model.presets import random_routers

    model, processor = load_model("tiny-qwen2.5-vl")
    random_routers(model)  # routing that differs from the vanilla model, so the round trips compare real routing
    return model, processor


def test_load_model_gives_the_pmod_qwen_model(pmod_qwen):
    """``load_model('tiny-qwen2.5-vl')`` is p-MoD (its default schedule: routers on the layers with ratio < 1)."""
    model, processor = pmod_qwen
    assert type(model).__name__ == "PMoDQwen2_5_VLForConditionalGeneration"
    assert model.config.model_type == "pmod_qwen2_5_vl"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    ratios = model.config.layer_ratios()
    assert len(ratios) == model.config.text_config.num_hidden_layers and min(ratios) < 1.0
    assert sorted(model.pmod_layers) == [i for i, r in enumerate(ratios) if r < 1.0]


@pytest.mark.parametrize("hub", [False, True], ids=["save_pretrained", "hub_layout"])
def test_pmod_qwen_round_trips(pmod_qwen, tmp_path, hub):
    """save_pretrained (or Qwen's hub layout) + from_pretrained / load_model give the same p-MoD model: class,
    routers, logits and greedy generations identical."""
    import torch
    from transformers import AutoModelForImageTextToText

    from pmod_bench.model.loading import load_model
    from pmod_bench.model.presets import save_qwen_hub_layout

    model, processor = pmod_qwen
    if hub:
        save_qwen_hub_layout(model, processor, tmp_path)
    else:
        model.save_pretrained(tmp_path)
        processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "pmod_qwen2_5_vl"
    auto = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    loaded, loaded_proc = load_model(str(tmp_path))
    inputs = _inputs(loaded_proc)
    for other in (auto, loaded):
        assert type(other).__name__ == "PMoDQwen2_5_VLForConditionalGeneration"
        assert other.config.layer_ratios() == model.config.layer_ratios()
        for i, layer in model.pmod_layers.items():
            assert torch.equal(layer.router.weight, other.pmod_layers[i].router.weight)
        assert_same_model(model, other, inputs)
