"""The processors of LLaVA / LLaVA-NeXT checkpoints: CLIP preprocessing and the image token, built once.

Used by the tiny presets (:mod:`.presets`), the conversion of original checkpoints (:mod:`.convert`)
and the training entrypoint. Light: transformers is imported when a processor is built.
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


__all__ = ["IMAGE_TOKEN", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "clip_image_processor", "llava_processor"]
