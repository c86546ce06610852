"""LLaVA-1.5 (HF ``llava``): a CLIP tower, one tile per image, an MLP projector, a Llama-family LLM with 1-D RoPE.

The vision tokens are the positions holding ``config.image_token_id`` (the processor expands one
``<image>`` into the tile's features). The p-MoD classes subclass HF's own and add only what differs
(:mod:`pmod_bench.model.routed`); the config class is in :mod:`pmod_bench.model.hf_config`.
"""

from __future__ import annotations

from typing import Optional

from transformers.models.llava.modeling_llava import LlavaForConditionalGeneration

from ..compat import cache_argument, contract_error
from ..hf_config import PMoDLlavaConfig
from ..routed import PMoDModelMixin, SparseModelMixin, routed_forward
from . import HOSTS, HostAdapter, HostError


class RoutedLlavaForConditionalGeneration(SparseModelMixin, LlavaForConditionalGeneration):
    """LLaVA-1.5 with the routed forward: what a vanilla model is while a comparison method is applied."""

    _pmod_cache_arg = cache_argument(LlavaForConditionalGeneration.forward, "LlavaForConditionalGeneration.forward")
    forward = routed_forward(LlavaForConditionalGeneration)


class PMoDLlavaForConditionalGeneration(PMoDModelMixin, LlavaForConditionalGeneration):
    """p-MoD-LLaVA-1.5: HF ``LlavaForConditionalGeneration`` with p-MoD decoder layers."""

    config_class = PMoDLlavaConfig
    _pmod_cache_arg = cache_argument(LlavaForConditionalGeneration.forward, "LlavaForConditionalGeneration.forward")
    forward = routed_forward(LlavaForConditionalGeneration)

    def __init__(self, config: PMoDLlavaConfig):
        super().__init__(config)
        self._install_pmod_layers()


@HOSTS.register("llava", "pmod_llava")
class LlavaHost(HostAdapter):
    """LLaVA-1.5 (module docstring)."""

    model_type = "llava"
    pmod_model_type = "pmod_llava"
    title = "LLaVA-1.5"
    vanilla_class = LlavaForConditionalGeneration
    sparse_class = RoutedLlavaForConditionalGeneration
    pmod_class = PMoDLlavaForConditionalGeneration
    pmod_config_class = PMoDLlavaConfig

    def register_processor(self) -> None:
        from transformers import AutoImageProcessor, AutoProcessor, CLIPImageProcessor, LlavaProcessor

        AutoProcessor.register(self.pmod_config_class, LlavaProcessor, exist_ok=True)
        AutoImageProcessor.register(self.pmod_config_class, slow_image_processor_class=CLIPImageProcessor, exist_ok=True)

    def check(self, model) -> None:
        """Decoder layers at ``model.model.language_model.layers``; a ``rotary_emb(x, position_ids)`` (renumbered
        positions of the in-LLM methods)."""
        import inspect

        lm = self.text_model(model)
        rotary = getattr(lm, "rotary_emb", None)
        if rotary is None or "position_ids" not in inspect.signature(type(rotary).forward).parameters:
            raise contract_error(f"{type(lm).__name__} has no rotary_emb(x, position_ids): the in-LLM methods renumber "
                                 "positions with the LLM's own RoPE")

    # ------------------------------------------------------------------------------- geometry
    def method_geometry(self, config) -> dict:
        v, t = config.vision_config, config.text_config
        return dict(patches_per_side=v.image_size // v.patch_size, vision_layers=v.num_hidden_layers,
                    feature_layer=config.vision_feature_layer, text_layers=t.num_hidden_layers, anyres=self.anyres,
                    drop_cls=getattr(config, "vision_feature_select_strategy", "default") == "default")

    def tile_features(self, config, gh: Optional[int] = None, gw: Optional[int] = None) -> int:
        """Features of one tile at ``gh x gw`` patch tokens (default: the tile's full grid), [CLS] included unless
        the ``default`` feature strategy drops it."""
        g = config.vision_config.image_size // config.vision_config.patch_size
        gh, gw = gh or g, gw or g
        drop = getattr(config, "vision_feature_select_strategy", "default") == "default"
        return gh * gw if drop else gh * gw + 1

    def image_tokens(self, config, image_size, gh: Optional[int] = None, gw: Optional[int] = None) -> int:
        return self.tile_features(config, gh, gw)

    def routing_grid(self, config, inputs, num_vision: int) -> Optional[list[int]]:
        """[rows, cols] of the first ``rows * cols`` vision tokens on the image (the tile as the processor presents
        it; LLaVA-NeXT: the base view, the whole image resized to one tile), row-major; None if there are fewer."""
        side = config.vision_config.image_size // config.vision_config.patch_size
        return [side, side] if num_vision >= side * side else None

    def split_tiles(self, config, pixel_values, image_sizes) -> list:
        if pixel_values.dim() != 4:
            raise HostError(f"LLaVA-1.5 pixel_values of shape {tuple(pixel_values.shape)}: expected (B, C, H, W).")
        return [pv[None] for pv in pixel_values]


__all__ = ["LlavaHost", "PMoDLlavaForConditionalGeneration", "RoutedLlavaForConditionalGeneration"]
