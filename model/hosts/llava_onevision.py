"""LLaVA-OneVision (HF ``llava_onevision``): a SigLIP tower read in full, anyres-max tiles, a Qwen2 LLM with 1-D RoPE.

What p-MoD and the in-LLM methods rely on, each checked in :meth:`LlavaOnevisionHost.check` (transformers
5.24/5.25, ``modeling_llava_onevision.py``), failing with :class:`~pmod_bench.model.compat.HFContractError`
when it changes:

* the vision tokens are the positions holding ``image_token_id`` (``<image>``) or ``video_token_id``
  (``<video>``): ``LlavaOnevisionModel.get_placeholder_mask`` scatters every packed feature of an image there,
  so ``image_newline`` features (one per row of the unpadded, possibly ``anyres_max_9``-shrunk tile grid; one
  after a single-tile image of a multi-image prompt; one after a video's pooled frames) are vision tokens, as
  on LLaVA-NeXT;
* SigLIP has no [CLS]: the hub checkpoints read the tower with ``vision_feature_select_strategy`` "full"
  (every patch; "default" would drop the first patch, which ``pack_image_features`` then refuses for a tiled
  image), so the base tile's ``side x side`` features open each tiled image, row-major;
* the Qwen2 LLM (``model.model.language_model``) takes 1-D ``position_ids`` (generate(): the attention mask's
  cumulative sum) and computes ``position_embeddings = rotary_emb(x, position_ids)`` once for every layer, so a
  sparse layer gathers those ``(cos, sin)`` rows and a renumbering method calls ``rotary_emb`` at
  ``position_ids - shift`` (:func:`pmod_bench.model.rope.renumbered_rope`, as on LLaVA);
* every decoder layer is full attention (``text_config.layer_types``; the hub configs set
  ``use_sliding_window`` False): p-MoD's cache keeps whole rows per layer.

The vision-stage comparison methods (random, visionzip, downsample: :mod:`pmod_bench.methods.onevision_vision`) read
the tiles of each image as ``get_image_features`` does (:meth:`LlavaOnevisionHost.split_tiles`) and count an image's
LLM positions at any per-tile grid by ``pack_image_features``' rule (:func:`packed_map`); FasterVLM and PruMerge
refuse (no [CLS]).
"""

from __future__ import annotations

import inspect
from typing import Optional

from huggingface_hub.dataclasses import strict
from transformers.models.llava_onevision.configuration_llava_onevision import LlavaOnevisionConfig
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionForConditionalGeneration

from ..compat import cache_argument, contract_error
from ..hf_config import PMoDConfigMixin
from ..routed import PMoDModelMixin, SparseModelMixin, routed_forward
from . import HOSTS, HostAdapter


@strict
class PMoDLlavaOnevisionConfig(PMoDConfigMixin, LlavaOnevisionConfig):
    r"""LLaVA-OneVision with p-MoD layers. ``pmod``: a :class:`~pmod_bench.PMoDConfig` as a dict; ``pmod_router_layers``:
    the layers that carry a router (default: those with ratio < 1)."""

    model_type = "pmod_llava_onevision"
    pmod: dict | None = None
    pmod_router_layers: list[int] | None = None


_FORWARD = "LlavaOnevisionForConditionalGeneration.forward"
#: the llava-hf OneVision checkpoints' tile (SigLIP so400m-patch14-384), on which the paper's 672x672 is a 2x2 grid
SIGLIP_TILE = 384


class RoutedLlavaOnevisionForConditionalGeneration(SparseModelMixin, LlavaOnevisionForConditionalGeneration):
    """LLaVA-OneVision with the routed forward: what a vanilla model is while an in-LLM comparison method is applied."""

    _pmod_cache_arg = cache_argument(LlavaOnevisionForConditionalGeneration.forward, _FORWARD)
    forward = routed_forward(LlavaOnevisionForConditionalGeneration)


class PMoDLlavaOnevisionForConditionalGeneration(PMoDModelMixin, LlavaOnevisionForConditionalGeneration):
    """p-MoD-LLaVA-OneVision: HF ``LlavaOnevisionForConditionalGeneration`` with p-MoD decoder layers."""

    config_class = PMoDLlavaOnevisionConfig
    _pmod_cache_arg = cache_argument(LlavaOnevisionForConditionalGeneration.forward, _FORWARD)
    forward = routed_forward(LlavaOnevisionForConditionalGeneration)

    def __init__(self, config: PMoDLlavaOnevisionConfig):
        super().__init__(config)
        self._install_pmod_layers()


def packed_map(config, image_size, gh: int, gw: int) -> tuple[int, int]:
    """(rows, cols) of one tiled image's packed feature map at ``gh x gw`` features per tile, newlines not counted:
    ``LlavaOnevisionModel.pack_image_features``' rule (the stitched tile grid unpadded by transformers'
    ``unpad_image``, then shrunk to ``int(h // r) x int(w // r)`` when ``r = sqrt(h·w / (N·gh·gw)) > 1.1``, ``N`` of
    ``anyres_max_N``; at the full grid ``gh·gw`` is HF's ``height**2``). ``image_size`` is (height, width)."""
    import math

    import torch
    from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape, unpad_image

    rows, cols = get_anyres_image_grid_shape(list(image_size), config.image_grid_pinpoints, config.vision_config.image_size)
    h, w = unpad_image(torch.empty(0, rows * gh, cols * gw), list(image_size)).shape[1:]
    ratio = math.sqrt(h * w / (int(config.vision_aspect_ratio.strip("anyres_max_")) * gh * gw))
    return (int(h // ratio), int(w // ratio)) if ratio > 1.1 else (int(h), int(w))


@HOSTS.register("llava_onevision", "pmod_llava_onevision")
class LlavaOnevisionHost(HostAdapter):
    """LLaVA-OneVision (module docstring)."""

    model_type = "llava_onevision"
    pmod_model_type = "pmod_llava_onevision"
    title = "LLaVA-OneVision"
    vanilla_class = LlavaOnevisionForConditionalGeneration
    sparse_class = RoutedLlavaOnevisionForConditionalGeneration
    pmod_class = PMoDLlavaOnevisionForConditionalGeneration
    pmod_config_class = PMoDLlavaOnevisionConfig
    anyres = True
    vision_stage_methods = frozenset({"random", "visionzip", "downsample"})  # methods/onevision_vision.py
    cls_token = False

    def vision_mask(self, config, input_ids):
        """Image and video positions (newline features included: they sit on ``<image>`` / ``<video>`` positions)."""
        return (input_ids == config.image_token_id) | (input_ids == config.video_token_id)

    def register_processor(self) -> None:
        from transformers import (AutoImageProcessor, AutoProcessor, AutoVideoProcessor, LlavaOnevisionImageProcessor,
                                  LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor)
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

        AutoProcessor.register(self.pmod_config_class, LlavaOnevisionProcessor, exist_ok=True)
        AutoImageProcessor.register(self.pmod_config_class, image_processor_classes={
            "pil": LlavaOnevisionImageProcessorPil, "torchvision": LlavaOnevisionImageProcessor}, exist_ok=True)
        AutoVideoProcessor.register(self.pmod_config_class, LlavaOnevisionVideoProcessor, exist_ok=True)

    def check(self, model) -> None:
        """The details the sparse layers and the renumbering methods rely on (module docstring)."""
        lm = self.text_model(model)
        rotary = getattr(lm, "rotary_emb", None)
        if rotary is None or "position_ids" not in inspect.signature(type(rotary).forward).parameters:
            raise contract_error(f"{type(lm).__name__} has no rotary_emb(x, position_ids): the in-LLM methods renumber "
                                 "positions with the LLM's own RoPE")
        if "position_ids" not in inspect.signature(type(lm).forward).parameters:
            raise contract_error(f"{type(lm).__name__}.forward no longer takes position_ids (1-D RoPE positions)")
        inner = getattr(model, "model", None)
        mask = getattr(inner, "get_placeholder_mask", None)
        if getattr(inner, "image_newline", None) is None or mask is None or \
                "input_ids" not in inspect.signature(mask).parameters:
            raise contract_error(f"{type(inner).__name__} has no image_newline / get_placeholder_mask(input_ids, ...): "
                                 "OneVision's vision features (newlines included) are no longer the <image> / <video> "
                                 "positions")
        kinds = set(getattr(model.config.text_config, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            raise contract_error(f"LLaVA-OneVision layer types {sorted(kinds)}: p-MoD layers need full attention "
                                 "(text_config.use_sliding_window=False)")

    # ------------------------------------------------------------------------------- geometry
    def method_geometry(self, config) -> dict:
        v, t = config.vision_config, config.text_config
        return dict(patches_per_side=v.image_size // v.patch_size, vision_layers=v.num_hidden_layers,
                    feature_layer=config.vision_feature_layer, text_layers=t.num_hidden_layers, anyres=True,
                    drop_cls=config.vision_feature_select_strategy == "default", cls_token=False)

    def image_tokens(self, config, image_size, gh: Optional[int] = None, gw: Optional[int] = None) -> int:
        """One image alone in its prompt (anyres tiles): the base tile's ``gh·gw`` features + the packed map of the
        grid with a newline per row (:func:`packed_map`); default: the tile's full patch grid, the processor's count."""
        g = config.vision_config.image_size // config.vision_config.patch_size
        gh, gw = gh or g, gw or g
        rows, cols = packed_map(config, image_size, gh, gw)
        return gh * gw + rows * (cols + 1)

    def split_tiles(self, config, pixel_values, image_sizes) -> list:
        """(B, max_tiles, C, H, W) (or the tiles concatenated, 4-D) -> [(tiles_i, C, H, W)], as
        ``LlavaOnevisionModel.get_image_features`` takes them for one image per prompt (``image_size_to_num_patches``)."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        from .llava_next import split_anyres_tiles

        return split_anyres_tiles(config, pixel_values, image_sizes, "LLaVA-OneVision", image_size_to_num_patches)

    def routing_grid(self, config, inputs, num_vision: int) -> Optional[list[int]]:
        """[side, side]: a prompt's first image opens with its base tile's features, row-major (strategy "full"; with
        "default" the first patch is gone and the features form no grid: None)."""
        if config.vision_feature_select_strategy != "full":
            return None
        side = config.vision_config.image_size // config.vision_config.patch_size
        return [side, side] if num_vision >= side * side else None

    def paper_image_size(self, config) -> tuple[int, int]:
        """The paper's 672x672 on OneVision's 384 px tiles (SigLIP-384: a 2x2 grid plus the base tile, the grid
        LLaVA-NeXT's 336 px tiles give it); on other tiles (the tiny preset's 32 px) the image of that same grid, two
        tiles a side, as the LLaVA-NeXT host's ``2 * tile``. 672 px on 32 px tiles would be a 21x21 grid that
        ``anyres_max_9`` shrinks, thousands of vision tokens against which ``--match`` solved a near-zero budget."""
        from pmod_bench.profiler.scenario import PAPER_IMAGE_SIZE

        tile = int(config.vision_config.image_size)
        return PAPER_IMAGE_SIZE if tile == SIGLIP_TILE else (2 * tile, 2 * tile)


__all__ = ["LlavaOnevisionHost", "packed_map", "PMoDLlavaOnevisionConfig", "PMoDLlavaOnevisionForConditionalGeneration",
           "RoutedLlavaOnevisionForConditionalGeneration"]
