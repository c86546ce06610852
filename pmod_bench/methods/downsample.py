"""Downsampling baseline: the image resized so that the vision tower yields fewer tokens.

VTC-Bench (Liao et al., 2025) found that simply downsampling the image beats many token-compression
methods at the same token budget. No official repository is followed; the construction is:

* every tile of the image (LLaVA-1.5: the one 336 px tile; LLaVA-NeXT: the base tile and each grid
  tile) is resized from ``G·p`` to ``gh·p x gw·p`` pixels (``p`` the patch size, ``G`` the tile's
  patch grid) with bicubic, antialiased interpolation; resizing every tile equals resizing the whole
  (padded) image by the same factor and tiling it with the smaller tile, so this *is* a smaller
  image. Resizing is linear, so doing it on the normalised ``pixel_values`` equals doing it on the
  pixels before normalisation (up to the clipping of PIL's 8-bit output);
* the model's own vision tower runs on the smaller tiles with ``interpolate_pos_encoding=True``
  (transformers' CLIP interpolates its position embeddings bicubically): ``gh·gw`` patch tokens per
  tile, less vision work too (counted);
* the features are laid out as the model lays out its own (LLaVA-NeXT's ``pack_image_features`` at
  a ``gh x gw`` grid per tile: base tile, stitched grid unpadded to the image's aspect ratio,
  ``image_newline`` after every row), so the LLM sees the usual layout, only coarser.

``keep`` sets a square grid ``g = round(G · sqrt(keep))``; ``grid_h`` / ``grid_w`` set it directly.
The equal-compute solver searches grids with ``|gh - gw| <= 1`` (at most one patch row of aspect
distortion) for a finer choice of token counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .base import MethodConfig, MethodError, ModelGeometry, VisionAccount, param, register_method
from .vision import CompressedImage, hf_image_tokens, pack_spatial_unpad, project, run_tower


@register_method("downsample")
@dataclass
class DownsampleConfig(MethodConfig):
    """Downsampling: resize the image so that each tile yields gh x gw instead of G x G patch tokens."""

    keep: float = param(0.25, low=0.0, high=1.0, low_open=True)
    """Fraction of each tile's patch tokens: a square grid round(G * sqrt(keep)) per side (0.25 = half the side)."""
    grid_h: Optional[int] = param(None, low=1)
    """Patch rows per tile after resizing (with grid_w; overrides keep)."""
    grid_w: Optional[int] = param(None, low=1)
    """Patch columns per tile after resizing (with grid_h; overrides keep)."""

    def validate(self) -> None:
        if (self.grid_h is None) != (self.grid_w is None):
            raise MethodError("downsample: give both grid_h and grid_w (or neither, and keep).")

    def grid(self, geometry: ModelGeometry) -> tuple[int, int]:
        if self.grid_h is not None:
            return self.grid_h, self.grid_w
        g = max(1, min(geometry.patches_per_side, int(round(geometry.patches_per_side * math.sqrt(self.keep)))))
        return g, g

    def check_model(self, geometry: ModelGeometry) -> None:
        G = geometry.patches_per_side
        gh, gw = self.grid(geometry)
        if gh > G or gw > G:
            raise MethodError(f"downsample: grid_h and grid_w must be in [1, {G}] (the tile's patch grid), got {gh} x {gw}.")

    def candidates(self, geometry: ModelGeometry) -> list["DownsampleConfig"]:
        G = geometry.patches_per_side
        return [self.replace(grid_h=a, grid_w=b) for a in range(1, G + 1) for b in range(max(1, a - 1), min(G, a + 1) + 1)]

    def budget(self) -> dict[str, Any]:
        return {"keep": self.keep, "grid_h": self.grid_h, "grid_w": self.grid_w}

    def account(self, geometry: ModelGeometry, tiles: int, image_size: Any, config: Any) -> VisionAccount:
        gh, gw = self.grid(geometry)
        llm = hf_image_tokens(config, image_size, gh, gw) if geometry.anyres and tiles > 1 else gh * gw + (1 if geometry.anyres else 0)
        return VisionAccount(llm_tokens=llm, tower_tokens=gh * gw + 1, tower_tiles=tiles, projector_tokens=tiles * gh * gw)

    def compress(self, model, geometry: ModelGeometry, tiles: list[torch.Tensor], sizes: list[Any]) -> list[CompressedImage]:
        self.check_model(geometry)
        gh, gw = self.grid(geometry)
        G = geometry.patches_per_side
        pixels = torch.cat(tiles, 0)
        p = pixels.shape[-1] // G
        if (gh, gw) != (G, G):
            pixels = F.interpolate(pixels.float(), size=(gh * p, gw * p), mode="bicubic", antialias=True,
                                   align_corners=False).to(pixels.dtype)
        out = run_tower(model, geometry, pixels, interpolate=(gh, gw) != (G, G))
        if out.hidden.shape[1] != gh * gw + 1:
            raise MethodError(f"downsample: the tower gave {out.hidden.shape[1] - 1} patch tokens for a {gh} x {gw} grid.")
        feats = project(model, out.hidden[:, 1:] if geometry.drop_cls else out.hidden)   # (T, gh*gw [+1], d)
        images, start = [], 0
        for t_img, size in zip(tiles, sizes):
            t = t_img.shape[0]
            f = feats[start:start + t]
            start += t
            if geometry.anyres:
                if not geometry.drop_cls:
                    raise MethodError("downsample: LLaVA-NeXT packing needs vision_feature_select_strategy 'default'.")
                f = pack_spatial_unpad(model, f, size, gh, gw)
            else:
                f = f.reshape(-1, f.shape[-1])
            images.append(CompressedImage(f, [], {"grid": [gh, gw]}))
        return images
