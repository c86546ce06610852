"""LLaVA-PruMerge and PruMerge+ (Shang et al., ICCV 2025): IQR outliers of [CLS] attention, merged by key similarity.

Follows 42Shawn/LLaVA-PruMerge at commit 097c04116a58465e4bcb58cec44a94018a68ff1a
(``llava/model/multimodal_encoder/clip_encoder.py``: ``token_prune_merge_advanced`` = PruMerge,
``token_prune_merge_advanced_plus`` = PruMerge+, ``outlier_dectection``), per tile:

1. ``q``, ``k``: the outputs of ``q_proj`` / ``k_proj`` of the vision layer that **reads** LLaVA's
   feature (official: forward hooks on ``layers[23]``, whose input is ``hidden_states[-2]``); one
   full-width "head": ``a = softmax(q_cls · kᵀ / sqrt(D))[1:]`` (not the layer's multi-head
   attention; official);
2. the keep ratio is the fraction of IQR outliers of ``a``: values above ``Q3 + 1.5 (Q3 - Q1)``
   (``np.percentile``, linear interpolation); ``k = int(P * ratio)`` tokens with the largest ``a``
   (``topk`` order: by attention, descending). ``ratio=`` fixes it instead (the official
   ``if_adaptive=False`` path, default 1/8 there);
3. PruMerge+ adds spatially uniform tokens: ``arange(0, P - 1, int(int(1 / ratio) / 3))`` (official
   ``arange(0, 575, ...)``) minus those already kept, appended after them;
4. each kept token ``i`` (key ``k_i``, L2-normalised) finds its ``cluster = 32`` most similar tokens
   among all other patches (other kept ones included) and becomes
   ``x_i + sum_j a_j x_j`` (attention-weighted, **not** normalised: official);
5. one more token ``sum_{j not kept} a_j x_j`` is appended; the tile gives ``k (+ spatial) + 1``
   tokens, then the projector.

LLaVA-NeXT: the official repository is LLaVA-1.5 only; its ``prepare_inputs_labels_for_multimodal``
lays several tiles out 'flat' (``x.flatten(0, 1)``: every tile's tokens, base tile first, no
unpadding, no newline): followed here.

Deviations, each because the official code is undefined or batch-dependent there: the IQR ratio is
computed per image over all its tiles (official: over the whole batch of tiles it was given, i.e. one
image at batch size 1; per image keeps batched == per-sample); PruMerge+'s supplement is per tile
(the official code only runs for one tile); ``cluster`` is capped at P - 1 (official ``topk(32)``
fails below 33 patches); a spatial step of 0 (ratio > 1/3) becomes 1, and ratio 0 adds no spatial
tokens (official: ``arange`` with step 0 / division by zero). The [CLS] row is computed alone (the
official code computes the full (1+P)² map and reads row 0; same values, less work); the
similarities and merges are batched matrix products instead of a Python loop (same values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F

from .base import MethodConfig, MethodError, ModelGeometry, VisionAccount, param, register_method
from .vision import CompressedImage, project, run_tower

#: mean adaptive ratio the PruMerge paper reports (32 of 576 tokens, 5.5%): the analytic estimate
ADAPTIVE_MEAN_RATIO = 32 / 576


def iqr_outlier_ratio(scores: torch.Tensor, scale: float = 1.5) -> float:
    """Fraction of ``scores`` above Q3 + scale * IQR (numpy's default linear percentiles, float32 input)."""
    x = scores.detach().float().reshape(-1).double()
    q1, q3 = torch.quantile(x, torch.tensor([0.25, 0.75], dtype=x.dtype, device=x.device)).tolist()
    return float((x > q3 + scale * (q3 - q1)).sum().item()) / x.numel()


def spatial_step(ratio: float) -> Optional[int]:
    """PruMerge+'s stride of the spatial supplement: int(int(1 / ratio) / 3), at least 1; None for ratio 0."""
    if ratio <= 0:
        return None
    return max(1, int(int(1 / ratio) / 3))


@register_method("prumerge")
@dataclass
class PruMergeConfig(MethodConfig):
    """LLaVA-PruMerge: keep the IQR outliers of [CLS] attention, each merged with its most similar tokens."""

    official: ClassVar[str] = "42Shawn/LLaVA-PruMerge@097c04116a58465e4bcb58cec44a94018a68ff1a"
    needs_cls: ClassVar[bool] = True
    plus: ClassVar[bool] = False

    ratio: Optional[float] = param(None, low=0.0, high=1.0)
    """Fraction of each tile's patches kept; none = adaptive (IQR outliers of the [CLS] attention, official default)."""
    cluster: int = param(32, low=1)
    """Most similar tokens merged into each kept token (official 32)."""
    iqr_scale: float = param(1.5, low=0.0)
    """Outliers are above Q3 + iqr_scale * IQR (official 1.5)."""

    def check_model(self, geometry: ModelGeometry) -> None:
        if not 1 <= geometry.feature_index < geometry.vision_layers:
            raise MethodError(f"{self.name} reads q/k of the vision layer after LLaVA's feature layer; vision_feature_layer "
                              f"{geometry.feature_layer} has none (LLaVA: -2).")
        if not geometry.drop_cls:
            raise MethodError(f"{self.name} follows the official 'patch' feature selection (vision_feature_select_strategy 'default').")

    def candidates(self, geometry: ModelGeometry) -> list["PruMergeConfig"]:
        P = geometry.patches
        return [self.replace(ratio=(k + 0.5) / P) for k in range(0, P)]

    def budget(self) -> dict[str, Any]:
        return {"ratio": self.ratio}

    def kept_count(self, P: int, ratio: float) -> int:
        return int(P * ratio)

    def tokens_per_tile(self, P: int, ratio: float) -> int:
        k = self.kept_count(P, ratio)
        if self.plus:
            step = spatial_step(ratio)
            k += len(range(0, P - 1, step)) if step else 0  # supplement, counted without overlap (an upper bound)
        return k + 1

    def account(self, geometry: ModelGeometry, tiles: int, image_size: Any, config: Any) -> VisionAccount:
        P, D = geometry.patches, config.vision_config.hidden_size
        ratio = ADAPTIVE_MEAN_RATIO if self.ratio is None else self.ratio
        n_out = self.tokens_per_tile(P, ratio)
        kept, c = n_out - 1, min(self.cluster, P - 1)
        # per tile: [CLS] row 2nD; similarities 2 kept P D; merges 2 kept c D; the extra token 2 (P - kept) D
        extra = 2 * (P + 1) * D + 2 * kept * P * D + 2 * kept * c * D + 2 * max(P - kept, 0) * D
        exact = self.ratio is not None and not self.plus
        note = "" if exact else ("adaptive ratio estimated at the paper's mean 32/576" if self.ratio is None else "")
        if self.plus:
            note = (note + "; " if note else "") + "PruMerge+ spatial tokens counted without overlap (upper bound)"
        return VisionAccount(llm_tokens=tiles * n_out, tower_tokens=P + 1, tower_tiles=tiles, projector_tokens=tiles * n_out,
                             extra_flops=tiles * extra, exact=exact, note=note)

    # ---------------------------------------------------------------------------- algorithm
    def compress(self, model, geometry: ModelGeometry, tiles: list[torch.Tensor], sizes: list[Any]) -> list[CompressedImage]:
        self.check_model(geometry)
        h = geometry.feature_index                                        # the layer reading hidden_states[h] is layer h
        out = run_tower(model, geometry, torch.cat(tiles, 0), capture={"q": ("q_proj", h), "k": ("k_proj", h)})
        q, k, hidden = out.captured["q"], out.captured["k"], out.hidden   # (T, n, D) each
        D = hidden.shape[-1]
        logits = torch.bmm(q[:, :1], k.transpose(1, 2)) * D ** -0.5       # (T, 1, n): the [CLS] row only
        cls_attn = F.softmax(logits, dim=-1)[:, 0, 1:]                     # (T, P)
        feats = hidden[:, 1:]                                              # (T, P, D)
        keys = k[:, 1:]                                                    # (T, P, D)
        images, start = [], 0
        for t_img in tiles:
            t = t_img.shape[0]
            a = cls_attn[start:start + t]
            ratio = iqr_outlier_ratio(a, self.iqr_scale) if self.ratio is None else self.ratio
            toks, sel = [], []
            for j in range(start, start + t):
                x, idx = prumerge_tile(feats[j], keys[j], cls_attn[j], ratio, self.cluster, self.plus)
                toks.append(x)
                sel.append(idx)
            start += t
            images.append(CompressedImage(project(model, torch.cat(toks, 0)), sel, {"ratio": ratio}))
        return images


@register_method("prumerge_plus")
@dataclass
class PruMergePlusConfig(PruMergeConfig):
    """LLaVA-PruMerge+: PruMerge plus spatially uniform tokens (official ``token_prune_merge_advanced_plus``)."""

    plus: ClassVar[bool] = True


def prumerge_tile(x: torch.Tensor, keys: torch.Tensor, attn: torch.Tensor, ratio: float, cluster: int, plus: bool):
    """One tile (module docstring, steps 2-5): x (P, D) features, keys (P, D), attn (P,) -> ((k'+1, D), kept (k',))."""
    P, D = x.shape
    k = int(P * ratio)
    idx = attn.topk(k).indices                                             # (k,) by attention, descending
    if plus:
        step = spatial_step(ratio)
        if step is not None:
            spatial = torch.arange(0, P - 1, step, device=x.device)
            spatial = spatial[~torch.isin(spatial, idx)]
            idx = torch.cat([idx, spatial])
    rest = torch.ones(P, dtype=torch.bool, device=x.device)
    rest[idx] = False                                                      # the complement, in token order
    kn = F.normalize(keys, p=2, dim=-1)                                    # (P, D)
    if idx.numel():
        sim = kn[idx] @ kn.T                                               # (k', P) cosine to every patch
        sim[torch.arange(idx.numel(), device=x.device), idx] = float("-inf")  # not itself
        nbr = sim.topk(min(cluster, P - 1), dim=1).indices                 # (k', c)
        w = attn[nbr]                                                      # (k', c) attention weights
        merged = torch.bmm(w[:, None, :], x[nbr]).squeeze(1)               # (k', D): sum_j a_j x_j
        centres = x[idx] + merged
    else:
        centres = x.new_zeros(0, D)
    extra = attn[rest][None] @ x[rest]                                     # (1, D)
    return torch.cat([centres, extra], 0), idx
