"""The processors of LLaVA / LLaVA-NeXT, Qwen2.5-VL and LLaVA-OneVision checkpoints, built once.

LLaVA: CLIP preprocessing and the image token. Qwen2.5-VL: Qwen's special tokens, its chat template
and ``Qwen2VLImageProcessor`` / ``Qwen2VLVideoProcessor`` (dynamic resolution: ``smart_resize`` to a
multiple of ``patch_size x merge_size`` within ``[min_pixels, max_pixels]``). LLaVA-OneVision: Qwen2's special
tokens plus ``<image>`` / ``<video>``, its chat template and ``LlavaOnevisionImageProcessor`` (anyres tiles on
``image_grid_pinpoints`` + the base image; several images in one prompt: each padded to a square, one tile).
Used by the tiny presets
(:mod:`.presets`), the conversion of original checkpoints (:mod:`.convert`) and the training
entrypoint. Light: transformers is imported when a processor is built.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

#: the image placeholder token of LLaVA's prompts (one per image, expanded by the processor)
IMAGE_TOKEN = "<image>"
#: OpenAI CLIP's normalisation (``openai/clip-vit-large-patch14(-336)`` ``preprocessor_config.json``)
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def clip_image_processor(tile: int, *, pinpoints: Optional[Sequence[Sequence[int]]] = None, pad: bool = False,
                         mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
    """CLIP preprocessing for square tiles of ``tile`` px (bicubic resize of the shortest edge, centre crop, RGB).

    ``pinpoints`` (``[[h, w], ...]`` px): LLaVA-NeXT's anyres tiling (``LlavaNextImageProcessor``);
    ``pad``: LLaVA-1.5's expand-to-square with the mean colour first (``LlavaImageProcessor``); neither:
    plain ``CLIPImageProcessor``. ``mean`` / ``std`` default to OpenAI CLIP's.
    """
    from transformers import CLIPImageProcessor, LlavaImageProcessor, LlavaNextImageProcessor

    common = dict(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                  image_mean=list(mean or OPENAI_CLIP_MEAN), image_std=list(std or OPENAI_CLIP_STD),
                  resample=3, do_convert_rgb=True)
    if pinpoints is not None:
        return LlavaNextImageProcessor(image_grid_pinpoints=[list(p) for p in pinpoints], do_pad=True, **common)
    if pad:
        return LlavaImageProcessor(do_pad=True, **common)
    return CLIPImageProcessor(**common)


def llava_processor(image_processor: Any, tokenizer: Any, *, patch_size: int, chat_template: Optional[str],
                    vision_feature_select_strategy: str = "default"):
    """``LlavaNextProcessor`` for an anyres image processor, else ``LlavaProcessor``; :data:`IMAGE_TOKEN`,
    one additional image token (CLIP's CLS position, dropped by the ``default`` feature strategy)."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor, LlavaProcessor

    cls = LlavaNextProcessor if isinstance(image_processor, LlavaNextImageProcessor) else LlavaProcessor
    return cls(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
               vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
               image_token=IMAGE_TOKEN, num_additional_image_tokens=1)


# ------------------------------------------------------------------------------------- Qwen2.5-VL
#: Qwen2/Qwen2.5's special tokens in the order of their ids (151643 ... 151656 in ``Qwen/Qwen2.5-VL-7B-Instruct``'s
#: ``tokenizer.json``): end of text, the chat turns, grounding markers, and the vision markers and placeholders
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)
#: the placeholder the processor repeats once per merged 2x2 patch of an image
QWEN_IMAGE_TOKEN = "<|image_pad|>"
QWEN_VIDEO_TOKEN = "<|video_pad|>"
#: ``Qwen/Qwen2.5-VL-7B-Instruct``'s ``chat_template.json`` (the same for 3B, 32B, 72B): a default system turn,
#: ``<|im_start|>role\n ... <|im_end|>\n`` turns, each image as ``<|vision_start|><|image_pad|><|vision_end|>``
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen2_5_vl_processor(tokenizer: Any, *, min_pixels: int, max_pixels: int, patch_size: int = 14, merge_size: int = 2,
                         temporal_patch_size: int = 2, chat_template: Optional[str] = QWEN2_5_VL_CHAT_TEMPLATE):
    """``Qwen2_5_VLProcessor``: ``Qwen2VLImageProcessor`` and ``Qwen2VLVideoProcessor`` resizing to a multiple of
    ``patch_size x merge_size`` px within ``[min_pixels, max_pixels]`` (OpenAI CLIP normalisation, bicubic), and
    ``tokenizer``, which must know :data:`QWEN_SPECIAL_TOKENS`."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    _require_tokens(tokenizer, QWEN_SPECIAL_TOKENS, "Qwen's special tokens")
    geometry = dict(min_pixels=int(min_pixels), max_pixels=int(max_pixels), patch_size=patch_size, merge_size=merge_size,
                    temporal_patch_size=temporal_patch_size, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**geometry), tokenizer=tokenizer,
                               video_processor=Qwen2VLVideoProcessor(**geometry), chat_template=chat_template)


def _require_tokens(tokenizer: Any, tokens: Sequence[str], what: str) -> None:
    """Refuse a tokenizer that would split any of ``tokens`` (the processor counts each as one id)."""
    missing = [t for t in tokens if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        raise ValueError(f"the tokenizer lacks {what} {missing}; add them before building the processor.")


# -------------------------------------------------------------------------------- LLaVA-OneVision
#: the special tokens of llava-hf/llava-onevision-qwen2-{0.5b,7b,72b}-ov-hf, in the order of their ids (151643 ...
#: 151647): Qwen2-Instruct's three, then the ``<image>`` / ``<video>`` placeholders the conversion added
ONEVISION_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN, "<video>")
#: SigLIP's normalisation (``google/siglip-so400m-patch14-384``, whose preprocessor the OneVision conversion reads)
SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]
#: ``llava-hf/llava-onevision-qwen2-7b-ov-hf``'s ``chat_template.json`` (824 bytes; the same template the conversion
#: script ``convert_llava_onevision_weights_to_hf.py`` ships): no default system turn, images then videos then text,
#: each placeholder on its own line, the assistant's text in a ``generation`` block
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def llava_onevision_processor(tokenizer: Any, *, tile: int, pinpoints: Sequence[Sequence[int]], num_image_tokens: int,
                              vision_aspect_ratio: str = "anyres_max_9", chat_template: Optional[str] = ONEVISION_CHAT_TEMPLATE):
    """``LlavaOnevisionProcessor``: ``LlavaOnevisionImageProcessor`` (``tile`` px tiles on ``pinpoints`` ``[[h, w],
    ...]`` + the base image, SigLIP normalisation, bicubic), ``LlavaOnevisionVideoProcessor`` at the tile size, the
    ``full`` feature strategy (SigLIP has no [CLS]: ``num_image_tokens`` = (tile / patch)² per tile) and ``tokenizer``,
    which must know :data:`ONEVISION_SPECIAL_TOKENS`."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    _require_tokens(tokenizer, ONEVISION_SPECIAL_TOKENS, "LLaVA-OneVision's special tokens")
    geometry = dict(size={"height": tile, "width": tile}, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)
    image = LlavaOnevisionImageProcessor(image_grid_pinpoints=[list(p) for p in pinpoints], do_pad=True, **geometry)
    return LlavaOnevisionProcessor(image_processor=image, tokenizer=tokenizer, video_processor=LlavaOnevisionVideoProcessor(**geometry),
                                   num_image_tokens=int(num_image_tokens), vision_feature_select_strategy="full",
                                   chat_template=chat_template, vision_aspect_ratio=vision_aspect_ratio)


__all__ = ["IMAGE_TOKEN", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "clip_image_processor", "llava_processor",
           "QWEN_SPECIAL_TOKENS", "QWEN_IMAGE_TOKEN", "QWEN_VIDEO_TOKEN", "QWEN2_5_VL_CHAT_TEMPLATE", "qwen2_5_vl_processor",
           "ONEVISION_SPECIAL_TOKENS", "ONEVISION_CHAT_TEMPLATE", "SIGLIP_MEAN", "SIGLIP_STD", "llava_onevision_processor"]
