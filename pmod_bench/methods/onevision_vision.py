"""Vision-stage methods on LLaVA-OneVision: SigLIP tiles without [CLS], anyres_max_9 packing, ``image_newline``.

OneVision runs SigLIP (no [CLS]; every patch is read, ``vision_feature_select_strategy`` "full") over the base image
and the anyres tiles of one image, projects every patch, then ``LlavaOnevisionModel.pack_image_features`` lays them
out: the base tile's features, then the stitched tile grid unpadded to the image's aspect ratio, shrunk bilinearly
when it holds more than ``anyres_max_9``'s nine tiles' worth, with one ``image_newline`` per row. (The 2x2 bilinear
pooling is the video path's only; the methods act on images.) Per method:

* ``random`` and ``visionzip`` select per tile (base tile and each grid tile, the same budget on each, as on
  LLaVA-NeXT) and lay the kept tokens out as the official LLaVA-NeXT code of VisionZip / FasterVLM does: the base
  tile's kept tokens, then the grid tiles' kept tokens read row by row over the stitched grid; no unpadding, no
  bilinear shrink (a pruned map has no grid to interpolate) and no newline (dvlab-research/VisionZip@3151f6d's
  ``restore_image_features_sorted`` computes the newline and does not insert it). The LLM gets ``tiles x kept``
  tokens.
* ``visionzip`` ranks a tile's patches by the attention they *receive* in the layer that produced the feature
  OneVision reads (``vision_feature_layer`` -1: the last layer's attention, eager), averaged over heads and summed
  over the queries (summing or averaging over the queries ranks alike): the rule VisionZip's authors give for towers
  without [CLS] (Yang et al., CVPR 2025, arXiv 2412.04467: the attention a token receives from all tokens) and what ModelTC/LightCompress@9701d035b0aac5df97a2ebaadb30bcf0707616f5 (``visionzip.py``,
  ``merger_hook``) computes for Qwen2.5-VL's [CLS]-less tower. Neither the official repository (3151f6d: CLIP only)
  nor LightCompress (its OneVision model has no VisionZip path) adapts it to SigLIP; this follows that published
  rule. The ``dominant`` patches of highest score are kept, the other patches merge into ``contextual`` targets by
  their keys of that layer (averaged over heads, L2-normalised; every ``step``-th remaining patch a target, a target
  = itself + the mean of the patches assigned to it, as the official code), on the tower's hidden states, which then
  go through the projector (the official order). A contextual token sits at its target's place, so a tile's kept
  tokens stay in raster order (:func:`pmod_bench.methods.qwen_vision.visionzip_merged`, the Qwen port's per-image
  algorithm, here per tile).
* ``downsample`` resizes every tile to ``gh·p x gw·p`` pixels, runs SigLIP with ``interpolate_pos_encoding`` and
  packs the ``gh x gw`` features exactly as OneVision packs its own (:func:`pack_onevision`: unpadding, the
  anyres_max_9 shrink relative to the smaller tile, a newline per row): the same image at a smaller size.

One image per prompt: a prompt of several images reads each as its base tile only (``batch_num_images`` > 1), which
the methods refuse in one line.
"""

from __future__ import annotations

from typing import Any

import torch

from pmod_bench.model.hosts.llava_onevision import packed_map

from .base import MethodError, ModelGeometry
from .vision import CompressedImage, grid_shape, masked_spatial, project, run_tower, stitch


def pack_onevision(model, tile_feats: torch.Tensor, image_size, gh: int, gw: int) -> torch.Tensor:
    """``LlavaOnevisionModel.pack_image_features`` for one image at ``gh x gw`` features per tile.

    ``tile_feats``: (tiles, gh*gw, d) projected, base tile first -> (n, d): the base tile's features, then the grid's
    stitched map (d, rows*gh, cols*gw) unpadded (transformers' ``unpad_image``), shrunk bilinearly to
    :func:`~pmod_bench.model.hosts.llava_onevision.packed_map`'s size when the rule asks, ``image_newline`` after each
    row. One tile: its features + one newline (HF). At the full grid this is HF's packing (tested)."""
    from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image

    newline = model.model.image_newline
    d = tile_feats.shape[-1]
    if tile_feats.shape[0] == 1:
        return torch.cat([tile_feats[0], newline[None].to(tile_feats)], 0)
    rows, cols = grid_shape(model.config, image_size)
    grid = stitch(tile_feats[1:].reshape(-1, gh, gw, d), rows, cols)     # (rows*gh, cols*gw, d)
    grid = unpad_image(grid.permute(2, 0, 1), list(image_size))         # (d, h, w)
    h, w = packed_map(model.config, image_size, gh, gw)
    if (h, w) != tuple(grid.shape[1:]):
        grid = torch.nn.functional.interpolate(grid[None], [h, w], mode="bilinear")[0]
    grid = torch.cat([grid, newline[:, None, None].expand(d, h, 1).to(grid)], dim=-1)   # (d, h, w + 1)
    return torch.cat([tile_feats[0], grid.flatten(1, 2).transpose(0, 1)], 0)


def received_attention(attn: torch.Tensor) -> torch.Tensor:
    """(T, heads, P, P) attention -> (T, P): the attention each patch receives, averaged over heads, summed over the
    queries (every row sums to one, so the scores of a tile sum to P)."""
    return attn.float().mean(1).sum(1)


def visionzip_onevision(cfg, model, geometry: ModelGeometry, tiles: list[torch.Tensor], sizes: list[Any]) -> list[CompressedImage]:
    """VisionZip on OneVision's tiles (module docstring): per tile ``dominant`` patches by received attention and
    ``contextual`` merged ones, projected, laid out as the official LLaVA-NeXT code."""
    from .qwen_vision import visionzip_merged

    h = geometry.feature_index
    out = run_tower(model, geometry, torch.cat(tiles, 0), attentions=True, capture={"k": ("k_proj", h - 1)})
    hidden, attn = out.hidden, out.attention                            # (T, P, D), (T, H, P, P)
    T, P, D = hidden.shape
    keys = out.captured["k"].view(T, P, attn.shape[1], -1).float().mean(2)   # (T, P, D/H): keys averaged over heads
    scores = received_attention(attn)                                   # (T, P)
    kept, idx = [], []
    for t in range(T):
        i, f = visionzip_merged(hidden[t], scores[t], keys[t], cfg.dominant, cfg.contextual)
        kept.append(f)
        idx.append(i)
    proj = project(model, torch.stack(kept))                            # (T, k, d): kept tokens only
    return _laid_out(model, geometry, proj, torch.stack(idx), tiles, sizes, {"dominant": cfg.dominant,
                                                                            "contextual": cfg.contextual})


def _laid_out(model, geometry: ModelGeometry, proj: torch.Tensor, idx: torch.Tensor, tiles, sizes, info) -> list[CompressedImage]:
    """(T, k, d) kept features at patch indices ``idx`` (T, k), raster order -> one image each, the official layout."""
    T, k, d = proj.shape
    feats = proj.new_zeros(T, geometry.patches, d)
    masks = torch.zeros(T, geometry.patches, dtype=torch.bool, device=proj.device)
    rows = torch.arange(T, device=proj.device)[:, None].expand(T, k)
    feats[rows, idx] = proj
    masks[rows, idx] = True
    images, start = [], 0
    for t_img, size in zip(tiles, sizes):
        t = t_img.shape[0]
        f, m = feats[start:start + t], masks[start:start + t]
        images.append(CompressedImage(masked_spatial(model.config, f, m, size, geometry), list(idx[start:start + t]),
                                      dict(info)))
        start += t
    return images


def check_one_image_per_prompt(batch_num_images) -> None:
    """OneVision reads each of several images in one prompt as its base tile only; the methods take one per prompt."""
    if batch_num_images is not None and any(int(n) > 1 for n in batch_num_images):
        raise MethodError("LLaVA-OneVision reads each of several images in one prompt as one base tile; the vision-stage "
                          "methods take one image per prompt (give each image its own prompt).")


__all__ = ["pack_onevision", "received_attention", "visionzip_onevision", "check_one_image_per_prompt"]
