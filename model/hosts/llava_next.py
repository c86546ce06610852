"""LLaVA-NeXT (HF ``llava_next``): LLaVA-1.5 with anyres tiling.

An image is tiled on the best grid pinpoint, plus one base tile (the whole image resized); the grid's
feature map is cropped back to the image's aspect ratio (``unpad_image``) and gets one
``image_newline`` feature per row. Every one of those positions holds ``config.image_token_id``, so
the vision tokens are those positions, newline features included. The geometry comes from
transformers' own helpers (``image_size_to_num_patches``, ``get_anyres_image_grid_shape``,
``unpad_image``: what ``LlavaNextModel.get_image_features`` / ``pack_image_features`` call).
"""

from __future__ import annotations

from typing import Optional

from transformers.models.llava_next.modeling_llava_next import LlavaNextForConditionalGeneration

from ..compat import cache_argument
from ..hf_config import PMoDLlavaNextConfig
from ..routed import PMoDModelMixin, SparseModelMixin, routed_forward
from . import HOSTS, HostError
from .llava import LlavaHost


class RoutedLlavaNextForConditionalGeneration(SparseModelMixin, LlavaNextForConditionalGeneration):
    """LLaVA-NeXT with the routed forward: what a vanilla model is while a comparison method is applied."""

    _pmod_cache_arg = cache_argument(LlavaNextForConditionalGeneration.forward, "LlavaNextForConditionalGeneration.forward")
    forward = routed_forward(LlavaNextForConditionalGeneration)


class PMoDLlavaNextForConditionalGeneration(PMoDModelMixin, LlavaNextForConditionalGeneration):
    """p-MoD-LLaVA-NeXT: HF ``LlavaNextForConditionalGeneration`` with p-MoD decoder layers."""

    config_class = PMoDLlavaNextConfig
    _pmod_cache_arg = cache_argument(LlavaNextForConditionalGeneration.forward, "LlavaNextForConditionalGeneration.forward")
    forward = routed_forward(LlavaNextForConditionalGeneration)

    def __init__(self, config: PMoDLlavaNextConfig):
        super().__init__(config)
        self._install_pmod_layers()


def grid_shape(config, image_size) -> tuple[int, int]:
    """(rows, cols) of the anyres tile grid for one image (HF's ``get_anyres_image_grid_shape``); ``image_size`` is
    (height, width), as the processor's ``image_sizes``."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    return get_anyres_image_grid_shape(list(image_size), config.image_grid_pinpoints, config.vision_config.image_size)


def unpadded_grid(config, image_size, gh: int, gw: int) -> tuple[int, int]:
    """(rows, cols) of the stitched tile grid after unpadding, at ``gh x gw`` tokens per tile."""
    import torch
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    rows, cols = grid_shape(config, image_size)
    return tuple(unpad_image(torch.empty(0, rows * gh, cols * gw), list(image_size)).shape[1:])


def split_anyres_tiles(config, pixel_values, image_sizes, label: str, num_patches) -> list:
    """(B, max_tiles, C, H, W) (or the tiles concatenated, 4-D) -> [(tiles_i, C, H, W)], each image's tiles as the
    anyres models (LLaVA-NeXT, LLaVA-OneVision) count them: ``num_patches`` is the family's own HF
    ``image_size_to_num_patches``."""
    import torch

    if image_sizes is None:
        raise HostError(f"{label} inputs need image_sizes (the processor returns them with pixel_values).")
    counts = [num_patches(image_size=s, grid_pinpoints=config.image_grid_pinpoints,
                          patch_size=config.vision_config.image_size) for s in image_sizes]
    if pixel_values.dim() == 5:
        return [pv[:n] for pv, n in zip(pixel_values, counts)]
    if pixel_values.dim() == 4:
        return list(torch.split(pixel_values, counts, dim=0))
    raise HostError(f"pixel_values of shape {tuple(pixel_values.shape)}: expected 4 or 5 dimensions.")


@HOSTS.register("llava_next", "pmod_llava_next")
class LlavaNextHost(LlavaHost):
    """LLaVA-NeXT (module docstring)."""

    model_type = "llava_next"
    pmod_model_type = "pmod_llava_next"
    title = "LLaVA-NeXT"
    vanilla_class = LlavaNextForConditionalGeneration
    sparse_class = RoutedLlavaNextForConditionalGeneration
    pmod_class = PMoDLlavaNextForConditionalGeneration
    pmod_config_class = PMoDLlavaNextConfig
    anyres = True

    def register_processor(self) -> None:
        from transformers import AutoImageProcessor, AutoProcessor, LlavaNextImageProcessor, LlavaNextProcessor

        AutoProcessor.register(self.pmod_config_class, LlavaNextProcessor, exist_ok=True)
        AutoImageProcessor.register(self.pmod_config_class, slow_image_processor_class=LlavaNextImageProcessor,
                                    exist_ok=True)

    def image_tokens(self, config, image_size, gh: Optional[int] = None, gw: Optional[int] = None) -> int:
        """Base tile + unpadded grid + a newline per row (LLaVA-NeXT always has ``image_newline``)."""
        g = config.vision_config.image_size // config.vision_config.patch_size
        h, w = unpadded_grid(config, image_size, gh or g, gw or g)
        return self.tile_features(config, gh, gw) + h * (w + 1)

    def split_tiles(self, config, pixel_values, image_sizes) -> list:
        """(B, max_tiles, C, H, W) (or the tiles concatenated, 4-D) -> [(tiles_i, C, H, W)], as
        ``LlavaNextModel.get_image_features`` takes them (``image_size_to_num_patches``)."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return split_anyres_tiles(config, pixel_values, image_sizes, "LLaVA-NeXT", image_size_to_num_patches)

    def paper_image_size(self, config) -> tuple[int, int]:
        """The paper's 672x672 on LLaVA-NeXT-7B: 2x2 grid tiles (5 tower tiles, 2,928 vision tokens)."""
        tile = int(config.vision_config.image_size)
        return (2 * tile, 2 * tile)


__all__ = ["LlavaNextHost", "PMoDLlavaNextForConditionalGeneration", "RoutedLlavaNextForConditionalGeneration",
           "grid_shape", "unpadded_grid"]
