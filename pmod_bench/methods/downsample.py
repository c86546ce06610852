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

LLaVA-OneVision (SigLIP, no [CLS]): the same per-tile resize, SigLIP's own position-embedding interpolation, and
OneVision's packing at the ``gh x gw`` grid (:func:`pmod_bench.methods.onevision_vision.pack_onevision`: unpadding,
the anyres_max_9 shrink relative to the smaller tile, a newline per row).

Qwen2.5-VL (the community's way: a smaller pixel budget, so the tower itself sees fewer patches): each image is
resized to ``smart_resize(H, W, factor=28, min_pixels=28², max_pixels=B)`` (transformers' rule, the processor's own
at that ``max_pixels``) with ``B = max_pixels`` if given, else ``keep · H · W`` of the processed image; an image
already within the budget is kept. The rows of ``pixel_values`` are put back into an image, resized (bicubic,
antialiased) and patchified again in the processor's layout (:func:`pmod_bench.methods.qwen_vision.resample_images`);
the prompt's ``<|image_pad|>`` runs take the new count and the M-RoPE positions come from the new grid
(``get_rope_index``): the model then runs as on the smaller image. Deviation: the processor's already-resized image is
resized again (the original image is not at hand inside the model). ``grid_h`` / ``grid_w`` give the image size
directly, in merged tokens (28 px) per column / row (each at most the image's own). The equal-compute solver searches
``keep`` in steps of 1/1000 and, for a finer choice (both sides shrink together under a pixel budget, so 672x672 only
reaches square grids), every ``grid_h x grid_w`` within one merged token of the image's aspect ratio.
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
    """Patch rows per tile after resizing (with grid_w; overrides keep). Qwen2.5-VL: merged-token rows of the image."""
    grid_w: Optional[int] = param(None, low=1)
    """Patch columns per tile after resizing (with grid_h; overrides keep). Qwen2.5-VL: merged-token columns."""
    max_pixels: Optional[int] = param(None, low=784)
    """Qwen2.5-VL: the pixel budget of each image (smart_resize's max_pixels, 28 px multiples; overrides keep)."""

    def validate(self) -> None:
        if (self.grid_h is None) != (self.grid_w is None):
            raise MethodError("downsample: give both grid_h and grid_w (or neither, and keep).")

    def merged_size(self, height: int, width: int) -> tuple[int, int]:
        """Qwen2.5-VL: (height, width) in pixels of a processed image of ``height x width`` after downsampling
        (module docstring; at most the image's own size)."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        if self.grid_h is not None:
            return min(height, 28 * self.grid_h), min(width, 28 * self.grid_w)
        budget = self.max_pixels if self.max_pixels is not None else max(784, int(self.keep * height * width))
        if budget >= height * width:
            return height, width
        return tuple(smart_resize(height, width, factor=28, min_pixels=784, max_pixels=budget))

    def merged_resize(self, model, image_grid_thw: torch.Tensor) -> list[tuple[int, int]]:
        """Qwen2.5-VL: the new (height, width) of each image of the batch (:meth:`merged_size`)."""
        p = model.config.vision_config.patch_size
        return [self.merged_size(int(h) * p, int(w) * p) for _, h, w in image_grid_thw.tolist()]

    def compress_merged(self, model, geometry: ModelGeometry, pixel_values, image_grid_thw) -> list[CompressedImage]:
        """Qwen2.5-VL, on the resized images (``apply`` resized them with :meth:`merged_resize`): every merged token."""
        from .qwen_vision import image_features

        return [CompressedImage(f, [torch.arange(f.shape[0], device=f.device)], {"grid": [int(h), int(w)]})
                for f, (_, h, w) in zip(image_features(model, pixel_values, image_grid_thw), image_grid_thw.tolist())]

    def method_flops(self, arch: Any, image_size: tuple[int, int], text_tokens: int, logits_tokens: int = 1) -> Any:
        from .flops import resized_merged_flops
        from .geometry import checked_geometry

        if checked_geometry(self, arch.config).merge:
            return resized_merged_flops(self, arch, image_size, text_tokens, logits_tokens)
        return super().method_flops(arch, image_size, text_tokens, logits_tokens)

    def grid(self, geometry: ModelGeometry) -> tuple[int, int]:
        if self.grid_h is not None:
            return self.grid_h, self.grid_w
        g = max(1, min(geometry.patches_per_side, int(round(geometry.patches_per_side * math.sqrt(self.keep)))))
        return g, g

    def check_model(self, geometry: ModelGeometry) -> None:
        if geometry.merge:
            if self.grid_h is not None and self.max_pixels is not None:
                raise MethodError("downsample on Qwen2.5-VL: give max_pixels= (a pixel budget) or grid_h= and grid_w= (the "
                                  "size in merged tokens), not both.")
            return
        if self.max_pixels is not None:
            raise MethodError("downsample: max_pixels= is Qwen2.5-VL's pixel budget; on this model give keep= or "
                              "grid_h= and grid_w= (patches per tile).")
        G = geometry.patches_per_side
        gh, gw = self.grid(geometry)
        if gh > G or gw > G:
            raise MethodError(f"downsample: grid_h and grid_w must be in [1, {G}] (the tile's patch grid), got {gh} x {gw}.")

    def candidates(self, geometry: ModelGeometry) -> list["DownsampleConfig"]:
        if geometry.merge:  # Qwen2.5-VL: keep in steps of 1/1000 (the image's size is the profiler's)
            return [self.replace(keep=i / 1000, max_pixels=None) for i in range(1, 1001)]
        G = geometry.patches_per_side
        return [self.replace(grid_h=a, grid_w=b) for a in range(1, G + 1) for b in range(max(1, a - 1), min(G, a + 1) + 1)]

    def candidates_at(self, geometry: ModelGeometry, arch: Any, image_size: tuple[int, int]) -> list["DownsampleConfig"]:
        """Qwen2.5-VL: the ``keep`` steps and every merged grid ``a x b`` of the profiler's processed image (``R x C``
        merged tokens) with ``b`` within one of ``a·C/R``."""
        if not geometry.merge:
            return self.candidates(geometry)
        from pmod_bench.profiler.arch import vision_layout

        w, h = vision_layout(arch, image_size).resized
        R, C = h // 28, w // 28
        grids = sorted({(a, b) for a in range(1, R + 1) for b in range(round(a * C / R) - 1, round(a * C / R) + 2)
                        if 1 <= b <= C})
        return self.candidates(geometry) + [self.replace(grid_h=a, grid_w=b, max_pixels=None) for a, b in grids]

    def budget(self) -> dict[str, Any]:
        if self.max_pixels is not None:
            return {"max_pixels": self.max_pixels}
        return {"keep": self.keep, "grid_h": self.grid_h, "grid_w": self.grid_w}

    def account(self, geometry: ModelGeometry, tiles: int, image_size: Any, config: Any) -> VisionAccount:
        gh, gw = self.grid(geometry)
        llm = hf_image_tokens(config, image_size, gh, gw) if geometry.anyres and tiles > 1 else gh * gw + (1 if geometry.anyres else 0)
        return VisionAccount(llm_tokens=llm, tower_tokens=gh * gw + geometry.cls, tower_tiles=tiles,
                             projector_tokens=tiles * gh * gw)

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
        if out.hidden.shape[1] != gh * gw + geometry.cls:
            raise MethodError(f"downsample: the tower gave {out.hidden.shape[1] - geometry.cls} patch tokens for a "
                              f"{gh} x {gw} grid.")
        feats = project(model, out.hidden[:, 1:] if geometry.drop_cls else out.hidden)   # (T, gh*gw [+1], d)
        images, start = [], 0
        for t_img, size in zip(tiles, sizes):
            t = t_img.shape[0]
            f = feats[start:start + t]
            start += t
            if geometry.anyres and not geometry.cls_token:   # LLaVA-OneVision: its own packing at gh x gw
                from .onevision_vision import pack_onevision

                f = pack_onevision(model, f, size, gh, gw)
            elif geometry.anyres:
                if not geometry.drop_cls:
                    raise MethodError("downsample: LLaVA-NeXT packing needs vision_feature_select_strategy 'default'.")
                f = pack_spatial_unpad(model, f, size, gh, gw)
            else:
                f = f.reshape(-1, f.shape[-1])
            images.append(CompressedImage(f, [], {"grid": [gh, gw]}))
        return images
