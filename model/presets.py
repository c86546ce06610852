"""Architecture presets, all built locally (no download).

* ``tiny``: a random-init LLaVA-NeXT-shaped p-MoD model with its own tokenizer (byte-level BPE
  trained in code), image processor (anyres, grid pinpoints of 32 px tiles) and processor. Ready in
  about a second; tests, demos and CI use it.
* ``tiny-llava``: the same at LLaVA-1.5 shape (one 32 px tile, no anyres).
* ``tiny-qwen2.5-vl``: a random-init ``Qwen2_5_VLForConditionalGeneration`` (Qwen2 text model with
  GQA and M-RoPE, a 4-block ViT with window and full attention, the 2x2 patch merger) with a Qwen-style
  tokenizer (byte-level BPE trained in code, Qwen's special tokens), Qwen2.5-VL-Instruct's chat
  template and ``Qwen2VLImageProcessor`` sized so an image gives a few dozen tokens.
* ``tiny-llava-onevision``: a random-init ``LlavaOnevisionForConditionalGeneration`` (Qwen2 text model with GQA and
  q/k/v biases, a 2-layer SigLIP tower without [CLS] read in full, anyres tiles on a 6x6 pinpoint grid of 32 px
  tiles with the ``anyres_max_9`` downsampling) with a Qwen2 tokenizer trained in code (Qwen2's special tokens,
  ``<image>``, ``<video>``), the OneVision chat template and ``LlavaOnevisionProcessor``.
* ``llava-1.5-7b``, ``llava-next-7b``, ``llava-next-13b``: the paper's architectures (Vicuna-7B/13B +
  CLIP ViT-L/14-336 + mlp2x_gelu projector) as configs, for FLOPs / KV-cache accounting, meta-device
  counting, or random-weight latency runs. No weights.
* ``qwen2.5-vl-3b``, ``-7b``, ``-32b``, ``-72b``: Qwen/Qwen2.5-VL-{3B,7B,32B,72B}-Instruct's hub
  ``config.json`` (:data:`QWEN2_5_VL_HUB`), for the same accounting. No weights.
* ``llava-onevision-0.5b``, ``-7b``, ``-72b``: llava-hf/llava-onevision-qwen2-{0.5b,7b,72b}-ov-hf's hub ``config.json``
  (:data:`ONEVISION_HUB`), for the same accounting. No weights.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional

from .processors import IMAGE_TOKEN  # noqa: F401  (re-exported: the presets' prompts use it)

PRESETS = ("tiny", "tiny-llava", "tiny-qwen2.5-vl", "tiny-llava-onevision", "llava-1.5-7b", "llava-next-7b", "llava-next-13b",
           "qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen2.5-vl-32b", "qwen2.5-vl-72b", "llava-onevision-0.5b", "llava-onevision-7b",
           "llava-onevision-72b")
#: the presets whose model is a Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``)
QWEN_PRESETS = ("tiny-qwen2.5-vl", "qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen2.5-vl-32b", "qwen2.5-vl-72b")
#: the presets whose model is a LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``)
ONEVISION_PRESETS = ("tiny-llava-onevision", "llava-onevision-0.5b", "llava-onevision-7b", "llava-onevision-72b")

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
    if name in ONEVISION_PRESETS:
        return _onevision_preset_config(name, pmod, attn_implementation)
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
    if name in ONEVISION_PRESETS:
        from .processors import llava_onevision_processor

        return llava_onevision_processor(tiny_onevision_tokenizer(), tile=TINY_ONEVISION_TILE, pinpoints=_onevision_pinpoints(TINY_ONEVISION_TILE),
                                         num_image_tokens=(TINY_ONEVISION_TILE // TINY_ONEVISION_PATCH) ** 2)
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


@functools.lru_cache(maxsize=4)
def _tiny_qwen2_vocab(special: tuple[str, ...]) -> tuple[dict, list]:
    """(vocab, merges) of a byte-level BPE trained in code with Qwen2's pre-tokenizer, ``special`` tokens last."""
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

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
    for t in special:  # after the learned tokens, in the checkpoint's order (as ids 151643.. in the real vocab)
        vocab[t] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return vocab, merges


def _tiny_qwen2_tokenizer(special: tuple[str, ...]):
    """A ``Qwen2Tokenizer`` with the small BPE and ``special`` (the first is end of text, the pad token), eos
    ``<|im_end|>`` as in the Qwen2 / Qwen2.5 Instruct checkpoints, left padding for generation."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _tiny_qwen2_vocab(tuple(special))
    return Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), unk_token=None, eos_token="<|im_end|>",
                          pad_token=special[0], extra_special_tokens=list(special[1:]), padding_side="left", model_max_length=4096)


def tiny_qwen_tokenizer():
    """A ``Qwen2Tokenizer`` with a small BPE trained in code and Qwen's special tokens (deterministic), eos
    ``<|im_end|>`` and pad ``<|endoftext|>`` as in Qwen2.5-VL-Instruct, left padding for generation."""
    from .processors import QWEN_SPECIAL_TOKENS

    return _tiny_qwen2_tokenizer(QWEN_SPECIAL_TOKENS)


def _special_ids(tok, tokens) -> dict[str, int]:
    return {t: tok.convert_tokens_to_ids(t) for t in tokens}


def _tiny_qwen_config() -> dict:
    """The tiny Qwen2.5-VL: text hidden 64 (4 layers, 4 heads / 2 KV heads, M-RoPE sections 2+3+3 = head_dim / 2),
    vision hidden 32 (4 blocks: window attention in 0 and 2, full in 1 and 3; 56 px windows = 2x2 merged patches)."""
    tok = tiny_qwen_tokenizer()
    ids = _special_ids(tok, ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<|endoftext|>",
                             "<|im_end|>"))
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


def _host_preset_config(name: str, pmod: Any, attn_implementation: Optional[str], config_class: Any, kwargs: dict, label: str):
    """The vanilla config of a preset of another host than LLaVA; p-MoD on it is refused in one line until its host
    adapter brings the p-MoD model."""
    if pmod is not None:
        raise ValueError(f"preset '{name}': p-MoD on {label} comes with its host adapter (issue 22); build the vanilla "
                         f"model (pmod=None, or load_model('{name}:vanilla')), or profile the arch (pmod-bench profile --arch "
                         f"{name}).")
    cfg = config_class(**kwargs)
    if attn_implementation:
        cfg._attn_implementation = attn_implementation
    return cfg


def _qwen_preset_config(name: str, pmod: Any, attn_implementation: Optional[str]):
    from transformers import Qwen2_5_VLConfig

    kwargs = _tiny_qwen_config() if name == "tiny-qwen2.5-vl" else qwen2_5_vl_hub_config(name)
    return _host_preset_config(name, pmod, attn_implementation, Qwen2_5_VLConfig, kwargs, "Qwen2.5-VL")


# -------------------------------------------------------------------------------- LLaVA-OneVision
def _onevision_pinpoints(tile: int) -> list[list[int]]:
    """OneVision's anyres grid: every (rows, cols) of 1..6 tiles, as [height, width] px, rows first (the hub configs'
    ``image_grid_pinpoints`` for 384 px tiles, also ``LlavaOnevisionConfig``'s default)."""
    return [[rows * tile, cols * tile] for rows in range(1, 7) for cols in range(1, 7)]


#: google/siglip-so400m-patch14-384 without its last layer and head, as ``convert_llava_onevision_weights_to_hf.py``
#: builds it (OneVision reads the 26th layer's output, ``vision_feature_layer`` -1): 27x27 patches of 14 px, no [CLS]
_SIGLIP_SO400M_26 = dict(model_type="siglip_vision_model", hidden_size=1152, image_size=384, intermediate_size=4304,
                         num_attention_heads=16, num_hidden_layers=26, patch_size=14, vision_use_head=False)
#: what the llava-hf/llava-onevision-qwen2-*-ov-hf ``config.json`` files share: token ids, the full-feature SigLIP
#: readout, the anyres_max_9 aspect-ratio rule on 384 px tiles, the mlp2x_gelu projector with biases
_ONEVISION_COMMON = dict(
    architectures=["LlavaOnevisionForConditionalGeneration"], model_type="llava_onevision", image_token_index=151646,
    video_token_index=151647, projector_hidden_act="gelu", vision_feature_select_strategy="full", vision_feature_layer=-1,
    vision_aspect_ratio="anyres_max_9", multimodal_projector_bias=True, image_grid_pinpoints=_onevision_pinpoints(384),
)
#: Qwen2-Instruct's settings shared by the three LLMs (rope, norms, special token ids)
_QWEN2_INSTRUCT = dict(model_type="qwen2", hidden_act="silu", bos_token_id=151643, eos_token_id=151645, max_position_embeddings=32768,
                       rms_norm_eps=1e-06, rope_theta=1000000.0, use_sliding_window=False, attention_dropout=0.0,
                       initializer_range=0.02)
#: preset -> (hub repo id, its ``text_config``'s own shapes): Qwen/Qwen2-{0.5B,7B,72B}-Instruct's config with the
#: vocabulary grown by ``<image>`` / ``<video>`` and padded to a multiple of 64 (151936 -> 152000, 152064 -> 152128),
#: as the conversion script resizes it; 0.5B ties its embeddings. Parameters: 894M, 8.03B, 73.2B (the model cards).
ONEVISION_HUB = {
    "llava-onevision-0.5b": ("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        max_window_layers=24, vocab_size=152000, tie_word_embeddings=True)),
    "llava-onevision-7b": ("llava-hf/llava-onevision-qwen2-7b-ov-hf", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        max_window_layers=28, vocab_size=152128, tie_word_embeddings=False)),
    "llava-onevision-72b": ("llava-hf/llava-onevision-qwen2-72b-ov-hf", dict(
        hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
        max_window_layers=80, vocab_size=152128, tie_word_embeddings=False)),
}
#: the tiny preset: 32 px tiles of 8 px patches (16 features a tile), pinpoints up to 6x6 tiles (192 px)
TINY_ONEVISION_TILE = 32
TINY_ONEVISION_PATCH = 8


def llava_onevision_hub_config(name: str) -> dict:
    """The ``config.json`` dict of a LLaVA-OneVision arch preset (``LlavaOnevisionConfig(**d)``)."""
    _, text = ONEVISION_HUB[name]
    return {**_ONEVISION_COMMON, "text_config": {**_QWEN2_INSTRUCT, **text}, "vision_config": dict(_SIGLIP_SO400M_26)}


def tiny_onevision_tokenizer():
    """The tiny ``Qwen2Tokenizer`` with LLaVA-OneVision's special tokens (Qwen2's, then ``<image>``, ``<video>``)."""
    from .processors import ONEVISION_SPECIAL_TOKENS

    return _tiny_qwen2_tokenizer(ONEVISION_SPECIAL_TOKENS)


def _tiny_onevision_config() -> dict:
    """The tiny LLaVA-OneVision: Qwen2 text hidden 64 (4 layers, 4 heads / 2 KV heads), SigLIP hidden 32 (2 layers,
    32 px tiles, 8 px patches: 16 features a tile, all read: no [CLS]), the hub's anyres_max_9 rule and 6x6 grid."""
    tok = tiny_onevision_tokenizer()
    ids = _special_ids(tok, ("<image>", "<video>", "<|endoftext|>", "<|im_end|>"))
    text = dict(_QWEN2_INSTRUCT, vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, max_window_layers=4,
                tie_word_embeddings=False, pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"])
    vision = dict(_SIGLIP_SO400M_26, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=TINY_ONEVISION_TILE, patch_size=TINY_ONEVISION_PATCH)
    return {**_ONEVISION_COMMON, "image_token_index": ids["<image>"], "video_token_index": ids["<video>"],
            "image_grid_pinpoints": _onevision_pinpoints(TINY_ONEVISION_TILE), "text_config": text, "vision_config": vision}


def _onevision_preset_config(name: str, pmod: Any, attn_implementation: Optional[str]):
    from transformers import LlavaOnevisionConfig

    kwargs = _tiny_onevision_config() if name == "tiny-llava-onevision" else llava_onevision_hub_config(name)
    if pmod is not None:  # the p-MoD config, through the host adapter (model/hosts/llava_onevision.py)
        from .config import PMoDConfig
        from .hosts import host_for

        cfg = host_for("llava_onevision").pmod_config(LlavaOnevisionConfig(**kwargs), PMoDConfig.from_dict(pmod).to_dict())
        if attn_implementation:
            cfg._attn_implementation = attn_implementation
        return cfg
    return _host_preset_config(name, None, attn_implementation, LlavaOnevisionConfig, kwargs, "LLaVA-OneVision")


# ------------------------------------------------------------------------------------- hub layouts
def save_hub_layout(model, processor, directory, preprocessor: dict, processor_config: Optional[dict] = None) -> Path:
    """Write ``model`` and ``processor`` the way the hub repos of Qwen2.5-VL and LLaVA-OneVision ship them:
    config.json, generation_config.json, model.safetensors, the tokenizer files, preprocessor_config.json
    (``preprocessor`` + the image processor's and processor's class names), processor_config.json (the processor's own
    settings, when given) and chat_template.json. ``processor.save_pretrained`` would write transformers 5's single
    processor_config.json and chat_template.jinja instead; ``from_pretrained`` reads both layouts."""
    import json

    d = Path(directory)
    model.save_pretrained(d)
    processor.tokenizer.save_pretrained(d)
    names = dict(image_processor_type=type(processor.image_processor).__name__, processor_class=type(processor).__name__)
    files = {"preprocessor_config.json": {**preprocessor, **names}, "chat_template.json": {"chat_template": processor.chat_template}}
    if processor_config is not None:
        files["processor_config.json"] = {**processor_config, "processor_class": names["processor_class"]}
    for file, content in files.items():
        (d / file).write_text(json.dumps(content, indent=2) + "\n")
    return d


def save_qwen_hub_layout(model, processor, directory) -> Path:
    """:func:`save_hub_layout` as Qwen/Qwen2.5-VL-7B-Instruct: its preprocessor_config.json holds ``min_pixels`` /
    ``max_pixels`` and the patch geometry; no processor_config.json."""
    ip = processor.image_processor
    pre = dict(min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"], patch_size=ip.patch_size,
               temporal_patch_size=ip.temporal_patch_size, merge_size=ip.merge_size, image_mean=list(ip.image_mean),
               image_std=list(ip.image_std))
    return save_hub_layout(model, processor, directory, pre)


def save_onevision_hub_layout(model, processor, directory) -> Path:
    """:func:`save_hub_layout` as llava-hf/llava-onevision-qwen2-7b-ov-hf: preprocessor_config.json with the tile size,
    grid pinpoints and SigLIP normalisation, processor_config.json with the image tokens per tile and the feature
    strategy."""
    ip = processor.image_processor
    pre = dict(size=dict(ip.size), image_grid_pinpoints=[list(p) for p in ip.image_grid_pinpoints], do_pad=ip.do_pad,
               do_convert_rgb=ip.do_convert_rgb, resample=int(ip.resample), image_mean=list(ip.image_mean), image_std=list(ip.image_std))
    own = dict(num_image_tokens=processor.num_image_tokens, vision_feature_select_strategy=processor.vision_feature_select_strategy,
               vision_aspect_ratio=processor.vision_aspect_ratio, image_token=processor.image_token, video_token=processor.video_token)
    return save_hub_layout(model, processor, directory, pre, own)


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

    from .routed import PMoDModelMixin

    g = torch.Generator().manual_seed(seed)
    for layer in (model.pmod_layers.values() if isinstance(model, PMoDModelMixin) else ()):
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
