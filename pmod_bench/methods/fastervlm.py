"""FasterVLM (Zhang et al., 2024, "[CLS] Attention is All You Need for Training-Free Visual Token Pruning").

Follows Theia-4869/FasterVLM at commit f5d5f12037e105a51865ecb4b28a73cd86eb4921
(``llava/model/multimodal_encoder/clip_encoder.py``, ``llava/model/llava_arch.py``), per tile:

1. ``a = attentions[-2][:, :, 0, 1:].mean(heads)``: the [CLS] row of the attention of the layer whose
   output LLaVA reads (``feature_select``: ``attentions[select_layer]`` with ``select_layer = -2``),
   averaged over heads, patches only;
2. keep the top ``T`` patches by ``a`` (``torch.topk``), kept in token order (an index mask);
3. the projector runs over **all** patch features, then the mask is applied (``encode_images``
   projects before ``prepare_inputs_labels_for_multimodal`` prunes): counted so.

LLaVA-NeXT: the official code forces ``mm_patch_merge_type = 'spatial'`` (its comment: only
'spatial' and 'spatial_unpad' are supported, and it sets the former): the base tile's kept tokens,
then the other tiles' kept tokens read row by row over the stitched grid, no unpadding, no
``image_newline``; ``T`` tokens per tile (the README: "29 * 5 = 145" for a 2x2 grid).

Defaults: the official scripts take the token count ``T`` as an argument and have no default; here
``keep = 0.25`` (``T = 144`` of 576: the README's first example, 75% reduction), or ``tokens=T``.
Deviation: ``attentions[h-1]`` for the feature layer ``h`` (identical to ``attentions[-2]`` for
LLaVA's ``-2``; the official index would be off by one for a non-negative feature layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from .base import MethodConfig, MethodError, ModelGeometry, VisionAccount, param, register_method
from .vision import CompressedImage, masked_spatial, project, run_tower, tokens_for


@register_method("fastervlm")
@dataclass
class FasterVLMConfig(MethodConfig):
    """FasterVLM: per tile, keep the patches the [CLS] token attends to most (before the LLM)."""

    official: ClassVar[str] = "Theia-4869/FasterVLM@f5d5f12037e105a51865ecb4b28a73cd86eb4921"
    needs_cls: ClassVar[bool] = True
    needs_attentions: ClassVar[bool] = True

    keep: float = param(0.25, low=0.0, high=1.0, low_open=True)
    """Fraction of each tile's patch tokens kept (round(keep * patches); 0.25 = 144 of 576)."""
    tokens: Optional[int] = param(None, low=1)
    """Patch tokens kept per tile (the official --visual-token-num); overrides keep."""

    def check_model(self, geometry: ModelGeometry) -> None:
        if self.tokens is not None and self.tokens > geometry.patches:
            raise MethodError(f"fastervlm: tokens must be in [1, {geometry.patches}] (the patches of a tile), got {self.tokens}.")
        if not geometry.drop_cls:
            raise MethodError("fastervlm follows the official 'patch' feature selection (vision_feature_select_strategy "
                              "'default'); this model keeps the [CLS] feature ('full').")
        if geometry.feature_index == 0:
            raise MethodError("fastervlm needs vision_feature_layer to be a layer output (LLaVA: -2), not the embeddings.")

    def per_tile(self, geometry: ModelGeometry) -> int:
        return tokens_for(self.keep, self.tokens, geometry.patches)

    def candidates(self, geometry: ModelGeometry) -> list["FasterVLMConfig"]:
        return [self.replace(tokens=n) for n in range(1, geometry.patches + 1)]

    def budget(self) -> dict[str, Any]:
        return {"tokens": self.tokens} if self.tokens is not None else {"keep": self.keep}

    def account(self, geometry: ModelGeometry, tiles: int, image_size: Any, config: Any) -> VisionAccount:
        k = self.per_tile(geometry)
        return VisionAccount(llm_tokens=tiles * k, tower_tokens=geometry.patches + 1, tower_tiles=tiles,
                             projector_tokens=tiles * geometry.patches)

    def compress(self, model, geometry: ModelGeometry, tiles: list[torch.Tensor], sizes: list[Any]) -> list[CompressedImage]:
        self.check_model(geometry)
        out = run_tower(model, geometry, torch.cat(tiles, 0), attentions=True)
        masks = fastervlm_masks(out.attention, self.per_tile(geometry))  # (T, P)
        feats = project(model, out.hidden[:, 1:])                       # (T, P, d): all patches, as the official code
        return _images(model, geometry, feats, masks, tiles, sizes)


def fastervlm_masks(attn: torch.Tensor, k: int) -> torch.Tensor:
    """(T, H, 1+P, 1+P) attention -> (T, P) bool: the top-k patches by [CLS] attention averaged over heads."""
    scores = attn[:, :, 0, 1:].mean(1)                                  # (T, P)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(k, dim=1).indices, True)


def _images(model, geometry, feats, masks, tiles, sizes) -> list[CompressedImage]:
    images, start = [], 0
    for t_img, size in zip(tiles, sizes):
        t = t_img.shape[0]
        f, m = feats[start:start + t], masks[start:start + t]
        start += t
        images.append(CompressedImage(masked_spatial(model.config, f, m, size, geometry), [mm.nonzero()[:, 0] for mm in m]))
    return images
