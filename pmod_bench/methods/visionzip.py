"""VisionZip (Yang et al., CVPR 2025): dominant tokens by [CLS] attention + merged contextual tokens.

Follows dvlab-research/VisionZip at commit 3151f6df4fca36a4cd1c985e5956e725b1f9ad02
(``visionzip/clip_encoder.py``, ``visionzip/utils.py``, ``visionzip/llava_arch.py``), per tile:

1. ``a = attentions[h-1][:, :, 0, 1:].sum(heads)``: the [CLS] row of the attention of the layer that
   produced LLaVA's feature ``h`` (``-2``), summed over heads (not averaged; the ranking is the same);
2. dominant: the [CLS] token itself plus the top ``dominant - 1`` patches by ``a``, in token order
   ([CLS] first): the official ``dominant`` argument counts the [CLS] token;
3. contextual: the remaining tokens' keys of that same layer, averaged over heads (the official
   ``metric``), L2-normalised; every ``step = max(1, R // contextual)``-th remaining token (in
   order) is a target, the others are assigned to their most similar target (argmax of the cosine);
   a target becomes ``target + mean(assigned)`` (not the mean including the target: official);
4. the tile's ``dominant + contextual`` hidden states go through the projector.

LLaVA-NeXT anyres (official ``restore_image_features_sorted`` + ``prepare_inputs_labels_for_multimodal``):
the base tile gives its ``dominant + contextual`` tokens in the order above; the other tiles give
their dominant patch tokens at their places in the stitched tile grid, read row by row over the
whole grid, then the [CLS] token of each tile, then the contextual tokens of each tile. There is no
unpadding and no ``image_newline`` (the official code computes the newline but does not insert it).

Deviations: the official code hard-codes 576 patches / 24 per side (generalised to the tile's
grid); ``contextual = 0`` is allowed (no contextual tokens; the official code divides by zero);
the equal-compute solver varies the tokens per tile, split between dominant and contextual
tokens in the README's 54 : 10 proportion. Keys are read with a forward hook on that layer's ``k_proj``
(the official code monkey-patches ``CLIPAttention.forward`` to return them).

Qwen2.5-VL (no [CLS], window attention, 2x2 merger), as ModelTC/LightCompress at commit
9701d035b0aac5df97a2ebaadb30bcf0707616f5 (``llmc/compression/token_reduction/visionzip.py``: ``merger_hook``,
``prune_qwenv25vl_hook``) ports it, per image (:mod:`.qwen_vision`): a token's score is the attention it receives in
the tower's last block, averaged over heads and summed over queries (no [CLS] row); scores and keys (heads averaged)
are averaged over each merged 2x2 group and put back in raster order (``argsort(window_index)``); the ``dominant``
merged tokens of highest score are kept, the others merge into ``contextual`` targets as above, on the merger's
output; a contextual token sits at its target's place, so the kept tokens are in raster order and each keeps its
M-RoPE position. Budget: ``keep`` (LightCompress: dominant and contextual as fractions of the image's tokens), split in
the ``dominant : contextual`` proportion. The official repository (3151f6d) has no Qwen path.

LLaVA-OneVision (SigLIP, no [CLS]; :mod:`.onevision_vision`): per tile, the ``dominant`` patches that receive the most
attention in the layer OneVision reads (averaged over heads, summed over queries: the authors' rule for towers without
[CLS], as LightCompress's Qwen port), the others merged into ``contextual`` targets as above; ``dominant`` counts
patches only. Laid out as the official LLaVA-NeXT code (base tile, then the grid's kept tokens row by row; no newline).

Defaults: ``dominant=191, contextual=30`` (``visionzip(model, dominant=191, contextual=30)``, the
function's defaults; the README's example uses 54 / 10, i.e. 64 tokens per tile).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from .base import MethodConfig, MethodError, ModelGeometry, VisionAccount, param, register_method
from .vision import CompressedImage, grid_shape, project, run_tower, stitch

#: README proportion of dominant to all kept tokens (54 of 64, 108 of 128, 162 of 192)
DOMINANT_SHARE = 54 / 64


@register_method("visionzip")
@dataclass
class VisionZipConfig(MethodConfig):
    """VisionZip: per tile, ``dominant`` tokens by [CLS] attention ([CLS] included) + ``contextual`` merged tokens."""

    official: ClassVar[str] = "dvlab-research/VisionZip@3151f6df4fca36a4cd1c985e5956e725b1f9ad02"
    needs_attentions: ClassVar[bool] = True

    dominant: int = param(191, low=1)
    """Dominant tokens per tile, the [CLS] token included (the official `dominant` argument; OneVision: patches)."""
    contextual: int = param(30, low=0)
    """Contextual tokens per tile: merges of the remaining tokens by key similarity."""
    keep: Optional[float] = param(None, low=0.0, high=1.0, low_open=True)
    """Qwen2.5-VL (required there): fraction of each image's merged tokens kept, split dominant : contextual."""

    def check_model(self, geometry: ModelGeometry) -> None:
        if geometry.merge:
            if self.keep is None:
                raise MethodError("visionzip on Qwen2.5-VL needs keep= (the fraction of each image's merged tokens kept, "
                                  "split in the dominant : contextual proportion), e.g. visionzip:keep=0.25.")
            return
        if self.keep is not None:
            raise MethodError("visionzip: keep= is the budget on Qwen2.5-VL; on this model give dominant= and contextual= "
                              "(tokens per tile).")
        n = geometry.patches + geometry.cls
        if self.dominant + self.contextual > n:
            what = f"the {geometry.patches} patches + [CLS]" if geometry.cls else f"the {geometry.patches} patches"
            raise MethodError(f"visionzip: dominant + contextual must be in [1, {n}] ({what} of a tile), got "
                              f"{self.dominant} + {self.contextual}.")
        if geometry.feature_index == 0:
            raise MethodError("visionzip needs vision_feature_layer to be a layer output (LLaVA: -2), not the embeddings.")

    def candidates(self, geometry: ModelGeometry) -> list["VisionZipConfig"]:
        if geometry.merge:  # Qwen2.5-VL: keep in steps of 1/1000 (the image's token count is the profiler's)
            return [self.replace(keep=i / 1000) for i in range(1, 1001)]
        return [self.replace(**split_tokens(n)) for n in range(1, geometry.patches + geometry.cls + 1)]

    def budget(self) -> dict[str, Any]:
        if self.keep is not None:
            return {"keep": self.keep}
        return {"dominant": self.dominant, "contextual": self.contextual}

    def merged_tokens(self, V: int) -> int:
        return sum(self.merged_counts(V))

    def merged_extra(self, arch: Any, V: int) -> int:
        """Qwen2.5-VL (qwen_vision.py): the last block's ``qkv`` again over the image's 4V patches and its ``q kᵀ``
        (one full-attention chunk per image), the cosines (R - c) x c over head_dim keys and the merge c x (R - c) x
        out_hidden."""
        v = arch.vision
        if v.depth - 1 not in v.fullatt_blocks:
            raise MethodError("visionzip on Qwen2.5-VL: the tower's last block uses window attention here; its analytic "
                              "FLOPs assume a full-attention last block (as every Qwen2.5-VL checkpoint has).")
        S, hd = V * v.merge_size ** 2, v.hidden // v.heads
        d, c = self.merged_counts(V)
        R = V - d
        return 2 * S * v.hidden * 3 * v.hidden + 2 * v.heads * S * S * hd + (2 * (R - c) * c * (hd + v.out_hidden) if c and R else 0)

    def account(self, geometry: ModelGeometry, tiles: int, image_size: Any, config: Any) -> VisionAccount:
        if geometry.merge:
            raise MethodError("visionzip: account() counts LLaVA tiles; Qwen2.5-VL is counted per image (merged_tokens, "
                              "merged_extra).")
        n, c = geometry.patches + geometry.cls, self.contextual
        R = n - self.dominant
        hd = config.vision_config.hidden_size // config.vision_config.num_attention_heads
        D = config.vision_config.hidden_size
        # per tile: cosine similarities (R-c) x c over head_dim keys, merge bmm c x (R-c) x D
        extra = 2 * (R - c) * c * hd + 2 * c * (R - c) * D if c else 0
        k = self.dominant + c
        return VisionAccount(llm_tokens=tiles * k, tower_tokens=n, tower_tiles=tiles, projector_tokens=tiles * k,
                             extra_flops=tiles * extra)

    # ---------------------------------------------------------------------------- algorithm
    def merged_counts(self, V: int) -> tuple[int, int]:
        """Qwen2.5-VL: (dominant, contextual) of an image of ``V`` merged tokens: round(keep * V) in all (at least 1),
        contextual its share contextual / (dominant + contextual), at least one dominant."""
        k = max(1, min(V, int(round(self.keep * V))))
        c = min(k - 1, int(round(k * self.contextual / (self.dominant + self.contextual))))
        return k - c, c

    def compress_merged(self, model, geometry: ModelGeometry, pixel_values, image_grid_thw) -> list[CompressedImage]:
        """Qwen2.5-VL (module docstring, 'Qwen2.5-VL'): per image, VisionZip over its merged tokens."""
        from .qwen_vision import last_block_scores, visionzip_merged

        self.check_model(geometry)
        images = []
        for feats, scores, keys in last_block_scores(model, pixel_values, image_grid_thw):
            d, c = self.merged_counts(feats.shape[0])
            idx, kept = visionzip_merged(feats, scores, keys, d, c)
            images.append(CompressedImage(kept, [idx], {"dominant": d, "contextual": c}))
        return images

    def compress(self, model, geometry: ModelGeometry, tiles: list[torch.Tensor], sizes: list[Any]) -> list[CompressedImage]:
        self.check_model(geometry)
        if not geometry.cls_token:  # LLaVA-OneVision (SigLIP): received attention, onevision_vision.py
            from .onevision_vision import visionzip_onevision

            return visionzip_onevision(self, model, geometry, tiles, sizes)
        h = geometry.feature_index
        pixels = torch.cat(tiles, 0)
        out = run_tower(model, geometry, pixels, attentions=True, capture={"k": ("k_proj", h - 1)})
        hidden, attn = out.hidden, out.attention                   # (T, 1+P, D), (T, H, 1+P, 1+P)
        T, n, D = hidden.shape
        heads = attn.shape[1]
        metric = out.captured["k"].view(T, n, heads, -1).mean(2)   # (T, 1+P, D/H): keys averaged over heads
        tokens, kept = visionzip_tiles(hidden, attn, metric, self.dominant, self.contextual)
        feats = project(model, tokens)                             # (T, dominant + contextual, d)
        images, start = [], 0
        for t_img, size in zip(tiles, sizes):
            t = t_img.shape[0]
            f, sel = feats[start:start + t], kept[start:start + t]
            start += t
            if t == 1 or not geometry.anyres:
                images.append(CompressedImage(f.reshape(-1, f.shape[-1]), [s - 1 for s in sel]))
                continue
            images.append(CompressedImage(_anyres_layout(model, geometry, f, sel, size, self.dominant),
                                          [s[1:] - 1 for s in sel]))
        return images


def split_tokens(total: int) -> dict[str, int]:
    """Tokens per tile -> dominant / contextual counts in the README's 54 : 10 proportion (64 -> 54 + 10)."""
    dominant = max(1, int(round(total * DOMINANT_SHARE)))
    return {"dominant": dominant, "contextual": total - dominant}


def visionzip_tiles(hidden: torch.Tensor, attn: torch.Tensor, metric: torch.Tensor, dominant: int, contextual: int):
    """The per-tile algorithm (module docstring, steps 1-3) over T tiles at once.

    hidden (T, n, D), attn (T, H, n, n), metric (T, n, c) -> tokens (T, dominant + contextual, D) and,
    per tile, the kept token indices 0..n-1 ([CLS] = 0, then the dominant patches in token order).
    """
    T, n, D = hidden.shape
    cls_att = attn[:, :, 0, 1:].sum(1)                                       # (T, P)
    top = cls_att.topk(dominant - 1, dim=1).indices + 1                      # (T, dominant-1), token indices
    keep_idx = torch.cat([torch.zeros(T, 1, dtype=top.dtype, device=top.device), top], 1).sort(1).values
    rest = torch.ones(T, n, dtype=torch.bool, device=hidden.device)
    rest.scatter_(1, keep_idx, False)                                        # True = not dominant
    dom = hidden.gather(1, keep_idx[..., None].expand(-1, -1, D))            # (T, dominant, D), token order
    if contextual == 0:
        return dom, list(keep_idx)
    R = n - dominant
    rest_idx = rest.nonzero()[:, 1].view(T, R)                               # (T, R) remaining, in order
    h_rest = hidden.gather(1, rest_idx[..., None].expand(-1, -1, D))         # (T, R, D)
    m_rest = metric.gather(1, rest_idx[..., None].expand(-1, -1, metric.shape[-1]))
    m_rest = m_rest / m_rest.norm(dim=-1, keepdim=True)
    step = max(1, R // contextual)
    targets = torch.arange(0, R, step, device=hidden.device)[:contextual]   # (c,)
    if targets.numel() < contextual:
        raise MethodError(f"visionzip: {R} remaining tokens cannot give {contextual} contextual tokens; lower contextual.")
    is_target = torch.zeros(R, dtype=torch.bool, device=hidden.device)
    is_target[targets] = True
    sim = torch.bmm(m_rest[:, ~is_target], m_rest[:, targets].transpose(1, 2))   # (T, R-c, c) cosine
    assign = torch.zeros_like(sim, dtype=hidden.dtype).scatter_(2, sim.argmax(2, keepdim=True), 1.0)
    counts = assign.sum(1).clamp(min=1).unsqueeze(-1)                        # (T, c, 1)
    merged = torch.bmm(assign.transpose(1, 2), h_rest[:, ~is_target]) / counts   # (T, c, D)
    ctx = h_rest[:, targets] + merged
    return torch.cat([dom, ctx], 1), list(keep_idx)


def _anyres_layout(model, geometry: ModelGeometry, feats: torch.Tensor, kept: list[torch.Tensor], size: Any,
                   dominant: int) -> torch.Tensor:
    """Official LLaVA-NeXT order: base tile's tokens | grid dominants (stitched raster) | tiles' [CLS] | tiles' contextual."""
    g, d = geometry.patches_per_side, feats.shape[-1]
    base, grid = feats[0], feats[1:]                                          # (k, d), (t-1, k, d)
    rows, cols = grid_shape(model.config, size)
    t = grid.shape[0]
    placed = torch.zeros(t, g * g, d, dtype=feats.dtype, device=feats.device)
    mask = torch.zeros(t, g * g, dtype=torch.bool, device=feats.device)
    for i in range(t):
        patch_idx = kept[i + 1][1:] - 1                                        # sorted patch indices (no [CLS])
        placed[i, patch_idx] = grid[i, 1:dominant]
        mask[i, patch_idx] = True
    placed = stitch(placed.view(t, g, g, d), rows, cols).reshape(-1, d)
    mask = stitch(mask.view(t, g, g), rows, cols).reshape(-1)
    return torch.cat([base, placed[mask], grid[:, 0], grid[:, dominant:].reshape(-1, d)], 0)
