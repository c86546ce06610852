"""Architecture presets, all built locally (no download).

* ``tiny``: a random-init LLaVA-NeXT-shaped p-MoD model with its own tokenizer (byte-level BPE
  trained in code), image processor (anyres, grid pinpoints of 32 px tiles) and processor. Ready in
  about a second; tests, demos and CI use it.
* ``tiny-llava``: the same at LLaVA-1.5 shape (one 32 px tile, no anyres).
* ``tiny-qwen2.5-vl``: a random-init ``Qwen2_5_VLForConditionalGeneration`` (Qwen2 text model with
  GQA and M-RoPE, a 4-block ViT with window and full attention, the 2x2 patch merger) with a Qwen-style
  tokenizer (byte-level BPE trained in code, Qwen's special tokens), Qwen2.5-VL-Instruct's chat
  template and ``Qwen2VLImageProcessor`` sized so an image gives a few dozen tokens.
* ``llava-1.5-7b``, ``llava-next-7b``, ``llava-next-13b``: the paper's architectures (Vicuna-7B/13B +
  CLIP ViT-L/14-336 + mlp2x_gelu projector) as configs, for FLOPs / KV-cache accounting, meta-device
  counting, or random-weight latency runs. No weights.
* ``qwen2.5-vl-3b``, ``-7b``, ``-32b``, ``-72b``: Qwen/Qwen2.5-VL-{3B,7B,32B,72B}-Instruct's hub
  ``config.json`` (:data:`QWEN2_5_VL_HUB`), for the same accounting. No weights.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional

from .processors import IMAGE_TOKEN  # noqa: F401  (re-exported: the presets' prompts use it)

PRESETS = ("tiny", "tiny-llava", "tiny-qwen2.5-vl", "llava-1.5-7b", "llava-next-7b", "llava-next-13b",
           "qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen2.5-vl-32b", "qwen2.5-vl-72b")
#: the presets whose model is a Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``)
QWEN_PRESETS = ("tiny-qwen2.5-vl", "qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen2.5-vl-32b", "qwen2.5-vl-72b")

#: LLaVA-NeXT grid pinpoints in units of the base tile: (1,2),(2,1),(2,2),(1,3),(3,1)  (METHOD.md)
GRID_UNITS = [(1, 2), (2, 1), (2, 2), (1, 3), (3, 1)]

#: Vicuna v1's system prompt (LLaVA's conv_vicuna_v1); the one home of the string, for the chat template
#: below (evaluation) and ``pmod_bench.train.data.render_vicuna_v1`` (training).
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
#: Vicuna v1 conversation template (LLaVA-1.5 / LLaVA-NeXT-Vicuna), as a chat template.
VICUNA_V1_TEMPLATE = (
    "{% set system = '" + VICUNA_SYSTEM.replace("'", "\\'") + "' %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}{% set system = message['content'] %}{% endif %}{% endfor %}"
    "{{ system }}"
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{% if message['role'] == 'user' %}{{ ' USER: ' }}{% else %}{{ ' ASSISTANT: ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '</s>' }}{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
)

_CORPUS = """
A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful,
detailed, and polite answers to the human's questions. USER: ASSISTANT: Answer the question using a
single word or phrase. Answer with the option's letter from the given choices directly. Is there a
in the image? Please answer yes or no. yes no Yes No A B C D E What is the color of the object? red
green blue yellow black white gray orange purple brown pink. How many people are there? one two three
four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 10 100 1000. What is written on the sign? What is
the title of the chart? Which year has the highest value? Please provide the bounding box coordinate of
the region this sentence describes: the man on the left, the dog, the red car, the table, a cat.
Describe the image in detail. The picture shows a square, a circle and a triangle on a plain background.
chart document infographic diagram photo text question answer option choice value percent total left
right top bottom center middle large small big tall short above below next to between behind in front.
"""


def _special_tokens() -> list[str]:
    return ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, min_frequency=1, special_tokens=_special_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in code on a small prompt corpus (deterministic)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left", model_max_length=4096, chat_template=VICUNA_V1_TEMPLATE,
    )
    return tok


# ------------------------------------------------------------------------------------- configs
def _clip_vit_l_336() -> dict:
    return dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")


def _vicuna(size: str) -> dict:
    if size == "7b":
        dims = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)
    else:
        dims = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40)
    return dict(model_type="llama", vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                pad_token_id=0, **dims)


def preset_config(name: str, pmod: Any = None, attn_implementation: Optional[str] = None):
    """The HF config of a preset: p-MoD (``PMoDLlava*Config``) if ``pmod`` is given, else vanilla."""
    from transformers import LlavaConfig, LlavaNextConfig

    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown preset '{name}'.{hint} Known presets: {', '.join(PRESETS)}; or pass a local config directory.")
    if name in QWEN_PRESETS:
        return _qwen_preset_config(name, pmod, attn_implementation)
    if name.startswith("tiny"):
        vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32)
        text = dict(model_type="llama", vocab_size=len(tiny_tokenizer()), hidden_size=64, intermediate_size=128,
                    num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                    pad_token_id=tiny_tokenizer().pad_token_id, bos_token_id=1, eos_token_id=2)
        image_token = tiny_tokenizer().convert_tokens_to_ids(IMAGE_TOKEN)
        tile = 32
    else:
        vision = _clip_vit_l_336()
        text = _vicuna("13b" if name.endswith("13b") else "7b")
        image_token = 32000
        tile = 336
    common = dict(vision_config=vision, text_config=text, image_token_index=image_token, projector_hidden_act="gelu",
                  vision_feature_select_strategy="default", vision_feature_layer=-2)
    next_shape = name in ("tiny", "llava-next-7b", "llava-next-13b")
    if next_shape:
        common["image_grid_pinpoints"] = [[h * tile, w * tile] for h, w in GRID_UNITS]
    if pmod is not None:
        from .hf_config import PMoDLlavaConfig, PMoDLlavaNextConfig
        from .config import PMoDConfig

        cls = PMoDLlavaNextConfig if next_shape else PMoDLlavaConfig
        cfg = cls(**common, pmod=PMoDConfig.from_dict(pmod).to_dict())
    else:
        cfg = (LlavaNextConfig if next_shape else LlavaConfig)(**common)
    if not next_shape:
        cfg.image_seq_length = (tile // (8 if name.startswith("tiny") else 14)) ** 2
    if attn_implementation:
        cfg._attn_implementation = attn_implementation
    return cfg


def preset_processor(name: str = "tiny"):
    """Processor (tokenizer + image processor) of a tiny preset, built locally."""
    from .processors import clip_image_processor, llava_processor

    if not name.startswith("tiny"):
        raise ValueError(f"preset '{name}' has no local tokenizer; load its processor from a checkpoint")
    if name in QWEN_PRESETS:
        from .processors import qwen2_5_vl_processor

        return qwen2_5_vl_processor(tiny_qwen_tokenizer(), min_pixels=TINY_QWEN_MIN_PIXELS, max_pixels=TINY_QWEN_MAX_PIXELS)
    pinpoints = [[h * 32, w * 32] for h, w in GRID_UNITS] if name == "tiny" else None
    return llava_processor(clip_image_processor(32, pinpoints=pinpoints), tiny_tokenizer(), patch_size=8,
                           chat_template=VICUNA_V1_TEMPLATE)


# ------------------------------------------------------------------------------------- Qwen2.5-VL
#: what every Qwen2.5-VL-Instruct ``config.json`` on the hub shares (Qwen/Qwen2.5-VL-{3B,7B,32B,72B}-Instruct):
#: token ids, M-RoPE sections, and the vision tower (32 blocks of width 1280, 16 heads, 14 px patches over 2
#: frames, 112 px attention windows, full attention in blocks 7/15/23/31, 2x2 patch merger)
_QWEN2_5_VL_COMMON = dict(
    architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl", hidden_act="silu",
    bos_token_id=151643, eos_token_id=151645, vision_start_token_id=151652, vision_end_token_id=151653,
    vision_token_id=151654, image_token_id=151655, video_token_id=151656, max_position_embeddings=128000,
    rms_norm_eps=1e-06, rope_theta=1000000.0, sliding_window=32768, use_sliding_window=False, attention_dropout=0.0,
    initializer_range=0.02, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
)
_QWEN2_5_VL_VISION = dict(depth=32, hidden_act="silu", hidden_size=1280, num_heads=16, in_chans=3, patch_size=14,
                          spatial_merge_size=2, spatial_patch_size=14, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                          tokens_per_second=2, temporal_patch_size=2)
#: preset -> (hub repo id, what its ``config.json`` sets beyond :data:`_QWEN2_5_VL_COMMON`), transcribed from the hub
#: files (the vision MLP is 3420 wide in 3B/7B and 3456 in 32B/72B; 3B alone ties its embeddings)
QWEN2_5_VL_HUB = {
    "qwen2.5-vl-3b": ("Qwen/Qwen2.5-VL-3B-Instruct", dict(
        hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
        max_window_layers=70, vocab_size=151936, tie_word_embeddings=True, vision=dict(intermediate_size=3420, out_hidden_size=2048))),
    "qwen2.5-vl-7b": ("Qwen/Qwen2.5-VL-7B-Instruct", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        max_window_layers=28, vocab_size=152064, tie_word_embeddings=False, vision=dict(intermediate_size=3420, out_hidden_size=3584))),
    "qwen2.5-vl-32b": ("Qwen/Qwen2.5-VL-32B-Instruct", dict(
        hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
        max_window_layers=64, vocab_size=152064, tie_word_embeddings=False, vision=dict(intermediate_size=3456, out_hidden_size=5120))),
    "qwen2.5-vl-72b": ("Qwen/Qwen2.5-VL-72B-Instruct", dict(
        hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
        max_window_layers=80, vocab_size=152064, tie_word_embeddings=False, vision=dict(intermediate_size=3456, out_hidden_size=8192))),
}
#: the tiny preset's processor: images are resized to 16..64 merged 28 px patches (a few dozen LLM tokens)
TINY_QWEN_MIN_PIXELS = 16 * 28 * 28
TINY_QWEN_MAX_PIXELS = 64 * 28 * 28
#: the [min_pixels, max_pixels] of the Qwen presets whose processor is built here (the profiler's default for the
#: others is lmms-eval's, the range its evaluations run with)
QWEN_PIXEL_RANGE = {"tiny-qwen2.5-vl": (TINY_QWEN_MIN_PIXELS, TINY_QWEN_MAX_PIXELS)}
#: the words of Qwen's chat template, added to the tiny tokenizer's corpus
_QWEN_CORPUS = "system user assistant You are a helpful assistant. Picture 1: Video 1: \n"


def qwen2_5_vl_hub_config(name: str) -> dict:
    """The flat ``config.json`` dict of a Qwen2.5-VL arch preset (as the hub stores it; ``Qwen2_5_VLConfig(**d)``)."""
    _, own = QWEN2_5_VL_HUB[name]
    own = dict(own)
    vision = {**_QWEN2_5_VL_VISION, **own.pop("vision")}
    return {**_QWEN2_5_VL_COMMON, **own, "vision_config": vision}


@functools.lru_cache(maxsize=1)
def _tiny_qwen_vocab() -> tuple[dict, list]:
    """(vocab, merges) of a byte-level BPE trained in code with Qwen2's pre-tokenizer, Qwen's special tokens last."""
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from .processors import QWEN_SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, min_frequency=1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([_CORPUS + _QWEN_CORPUS] * 4, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(model["vocab"])
    for t in QWEN_SPECIAL_TOKENS:  # after the learned tokens, in Qwen's order (as ids 151643.. in the real vocab)
        vocab[t] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return vocab, merges


def tiny_qwen_tokenizer():
    """A ``Qwen2Tokenizer`` with a small BPE trained in code and Qwen's special tokens (deterministic), eos
    ``<|im_end|>`` and pad ``<|endoftext|>`` as in Qwen2.5-VL-Instruct, left padding for generation."""
    from transformers import Qwen2Tokenizer

    from .processors import QWEN_SPECIAL_TOKENS

    vocab, merges = _tiny_qwen_vocab()
    return Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), unk_token=None, eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", extra_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
                          padding_side="left", model_max_length=4096)


def _tiny_qwen_config() -> dict:
    """The tiny Qwen2.5-VL: text hidden 64 (4 layers, 4 heads / 2 KV heads, M-RoPE sections 2+3+3 = head_dim / 2),
    vision hidden 32 (4 blocks: window attention in 0 and 2, full in 1 and 3; 56 px windows = 2x2 merged patches)."""
    tok = tiny_qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                                                       "<|video_pad|>", "<|endoftext|>", "<|im_end|>")}
    return dict(
        model_type="qwen2_5_vl", hidden_act="silu", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, max_window_layers=4,
        rms_norm_eps=1e-06, rope_theta=1000000.0, use_sliding_window=False, tie_word_embeddings=False,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], vision_token_id=ids["<|vision_pad|>"], image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_config=dict(depth=4, hidden_act="silu", hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1, 3], out_hidden_size=64, tokens_per_second=2),
    )


def _qwen_preset_config(name: str, pmod: Any, attn_implementation: Optional[str]):
    from transformers import Qwen2_5_VLConfig

    if pmod is not None:
        raise ValueError(f"preset '{name}': p-MoD on Qwen2.5-VL comes with its host adapter (issue 22); build the vanilla "
                         f"model (pmod=None, or load_model('{name}:vanilla')), or profile the arch (pmod-bench profile --arch "
                         f"{name}).")
    cfg = Qwen2_5_VLConfig(**(_tiny_qwen_config() if name == "tiny-qwen2.5-vl" else qwen2_5_vl_hub_config(name)))
    if attn_implementation:
        cfg._attn_implementation = attn_implementation
    return cfg


def save_qwen_hub_layout(model, processor, directory) -> Path:
    """Write a Qwen2.5-VL ``model`` and ``processor`` the way the hub repos ship them (Qwen/Qwen2.5-VL-7B-Instruct):
    config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
    preprocessor_config.json (``min_pixels`` / ``max_pixels`` keys and ``processor_class``, as on the hub) and
    chat_template.json. ``processor.save_pretrained`` would write transformers 5's single processor_config.json
    and chat_template.jinja instead; ``from_pretrained`` reads both layouts."""
    import json

    d = Path(directory)
    model.save_pretrained(d)
    processor.tokenizer.save_pretrained(d)
    ip = processor.image_processor
    pre = dict(min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"], patch_size=ip.patch_size,
               temporal_patch_size=ip.temporal_patch_size, merge_size=ip.merge_size, image_mean=list(ip.image_mean),
               image_std=list(ip.image_std), image_processor_type=type(ip).__name__, processor_class=type(processor).__name__)
    (d / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    (d / "chat_template.json").write_text(json.dumps({"chat_template": processor.chat_template}, indent=2) + "\n")
    return d


def build_preset(name: str = "tiny", pmod: Any = "default", seed: int = 0, dtype=None, attn_implementation: str = "sdpa"):
    """(model, processor) of a tiny preset with random weights; ``pmod=None`` gives the vanilla model.

    Routers are zero-initialised (so the p-MoD model starts equal to the vanilla one); pass
    ``random_routers(model)`` to exercise routing as a trained model would.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    from . import modeling  # noqa: F401  (registers the p-MoD classes with the Auto classes)
    from .config import PMoDConfig

    pmod_cfg = PMoDConfig() if isinstance(pmod, str) and pmod == "default" else pmod
    config = preset_config(name, pmod_cfg, attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=dtype) if dtype else AutoModelForImageTextToText.from_config(config)
    model.eval()
    processor = preset_processor(name) if name.startswith("tiny") else None
    return model, processor


def random_routers(model, std: float = 1.0, seed: int = 0) -> None:
    """Give every router random non-zero weights (as after training), deterministically."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for layer in getattr(model, "pmod_layers", {}).values():
        w = layer.router.weight
        with torch.no_grad():
            w.copy_(torch.randn(w.shape, generator=g) * std / w.shape[1] ** 0.5)
            if layer.router.bias is not None:
                layer.router.bias.copy_(torch.randn(1, generator=g) * 0.1)


def demo_image(width: int = 64, height: int = 48, seed: int = 0):
    """A generated RGB test image (shapes on a gradient), no files needed."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height))
    px = img.load()
    for y in range(height):
        for x in range(width):
            px[x, y] = ((x * 255) // max(width - 1, 1), (y * 255) // max(height - 1, 1), (seed * 53) % 256)
    d = ImageDraw.Draw(img)
    d.ellipse([width * 0.1, height * 0.2, width * 0.45, height * 0.7], fill=(220, 30, 30))
    d.rectangle([width * 0.55, height * 0.3, width * 0.9, height * 0.85], fill=(30, 30, 220))
    return img
