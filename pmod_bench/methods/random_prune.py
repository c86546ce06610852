"""Random pruning: the baseline that keeps a random subset of each tile's patch tokens at a keep ratio.

No official repository (VTC-Bench and the token-pruning papers use it as a sanity baseline). It is
FasterVLM's pipeline (:mod:`.fastervlm`: same token count per tile, same LLaVA-NeXT layout) with
the [CLS]-attention ranking replaced by a uniform random choice, so the two differ only in the
ranking. It needs no attention maps (SDPA stays on) and projects only the kept tokens.

Determinism: tile ``j`` of every image draws its subset from ``torch.Generator().manual_seed(seed + j)``
on the CPU, independent of the batch, the device and the image content: batched equals per-sample,
and every run is reproducible. The pattern is random over positions, fixed across images.

Qwen2.5-VL (no tiles, no [CLS]): the subset is drawn over each image's merged 2x2 tokens (the merger's output, raster
order) with ``seed``, and the LLM gets the kept ones at their full-grid M-RoPE positions (:mod:`.qwen_vision`).

LLaVA-OneVision (SigLIP, no [CLS]): the same per-tile subsets over every patch of a tile, laid out as on LLaVA-NeXT (base
tile's kept tokens, then the grid's row by row; no newline: :mod:`.onevision_vision`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from .base import MethodConfig, MethodError, ModelGeometry, VisionAccount, param, register_method
from .fastervlm import _images
from .vision import CompressedImage, project, run_tower, tokens_for


@register_method("random")
@dataclass
class RandomPruneConfig(MethodConfig):
    """Random pruning: per tile, keep a uniformly random subset of the patch tokens (before the LLM)."""

    keep: float = param(0.25, low=0.0, high=1.0, low_open=True)
    """Fraction of each tile's patch tokens kept (round(keep * patches)), as fastervlm's keep."""
    tokens: Optional[int] = param(None, low=1)
    """Patch tokens kept per tile; overrides keep."""
    seed: int = param(0, low=0)
    """Seed of the subsets (tile j of every image uses seed + j)."""

    def check_model(self, geometry: ModelGeometry) -> None:
        if geometry.merge:
            return  # Qwen2.5-VL: the image's merged tokens (image-dependent); tokens above them keep them all
        if self.tokens is not None and self.tokens > geometry.patches:
            raise MethodError(f"random: tokens must be in [1, {geometry.patches}] (the patches of a tile), got {self.tokens}.")
        if geometry.cls_token and not geometry.drop_cls:
            raise MethodError("random prunes patch features (vision_feature_select_strategy 'default'); this model keeps [CLS].")

    def per_tile(self, geometry: ModelGeometry) -> int:
        return tokens_for(self.keep, self.tokens, geometry.patches)

    def candidates(self, geometry: ModelGeometry) -> list["RandomPruneConfig"]:
        if geometry.merge:  # Qwen2.5-VL: the image's token count is the profiler's; keep in steps of 1/1000
            return [self.replace(keep=i / 1000, tokens=None) for i in range(1, 1001)]
        return [self.replace(tokens=n) for n in range(1, geometry.patches + 1)]

    def budget(self) -> dict[str, Any]:
        return {"tokens": self.tokens} if self.tokens is not None else {"keep": self.keep}

    def merged_tokens(self, V: int) -> int:
        return tokens_for(self.keep, self.tokens, V)

    def account(self, geometry: ModelGeometry, tiles: int, image_size: Any, config: Any) -> VisionAccount:
        if geometry.merge:
            raise MethodError("random: account() counts LLaVA tiles; Qwen2.5-VL is counted per image (merged_tokens).")
        k = self.per_tile(geometry)
        return VisionAccount(llm_tokens=tiles * k, tower_tokens=geometry.patches + geometry.cls, tower_tiles=tiles,
                             projector_tokens=tiles * k)

    def subset(self, tile: int, patches: int, k: int) -> torch.Tensor:
        """The kept patch indices of tile ``tile`` (sorted)."""
        g = torch.Generator().manual_seed(self.seed + tile)
        return torch.randperm(patches, generator=g)[:k].sort().values

    def compress_merged(self, model, geometry: ModelGeometry, pixel_values, image_grid_thw) -> list[CompressedImage]:
        """Qwen2.5-VL: per image, round(keep * V) (or ``tokens``, at most V) of its V merged tokens, the subset of
        ``seed`` (every image alike: batched equals per-sample), in raster order; the whole tower and merger run."""
        from .qwen_vision import image_features

        images = []
        for f in image_features(model, pixel_values, image_grid_thw):
            V = f.shape[0]
            idx = self.subset(0, V, tokens_for(self.keep, self.tokens, V)).to(f.device)
            images.append(CompressedImage(f[idx], [idx]))
        return images

    def compress(self, model, geometry: ModelGeometry, tiles: list[torch.Tensor], sizes: list[Any]) -> list[CompressedImage]:
        self.check_model(geometry)
        out = run_tower(model, geometry, torch.cat(tiles, 0))
        P, k = geometry.patches, self.per_tile(geometry)
        masks = torch.zeros(out.hidden.shape[0], P, dtype=torch.bool)
        j = 0
        for t_img in tiles:
            for t in range(t_img.shape[0]):
                masks[j, self.subset(t, P, k)] = True
                j += 1
        masks = masks.to(out.hidden.device)
        patches = out.hidden[:, geometry.cls:]                               # (T, P, D) (SigLIP: no [CLS] to skip)
        kept = patches[masks].view(-1, k, patches.shape[-1])                 # (T, k, D) in token order
        proj = project(model, kept)                                          # (T, k, d): kept tokens only
        feats = proj.new_zeros(masks.shape[0], P, proj.shape[-1])
        feats[masks] = proj.reshape(-1, proj.shape[-1])
        return _images(model, geometry, feats, masks, tiles, sizes)
