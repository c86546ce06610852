"""DyCoke (Tao et al., CVPR 2025): token temporal merging (TTM) of a video's frames before the LLM.

Follows the official code, KD-TAO/DyCoke@dd7463498203479d0ff6f2d29c4e72928c0af244 (``llava/model/llava_arch.py``
``dycole_ttm``, called on LLaVA-OneVision's pooled video features before the closing ``image_newline``; its lmms-eval
model class's defaults ``dycoke_k=0.7``, ``dycoke_num_tokens_per_frame=196``), as ported by
ModelTC/LightCompress@9701d035b0aac5df97a2ebaadb30bcf0707616f5 (``llmc/compression/token_reduction/dycoke.py``:
the same TTM on the output of ``get_2dPool``, OneVision only, no decoding stage). With ``F`` frames of ``P`` tokens
each and ``n = int((1 - k) · P)``:

1. every frame pair ``(i, i+1)``, ``i`` even: frame ``i`` is kept whole, frame ``i+1`` keeps the ``n`` tokens whose
   cosine similarity to the token at the same position of frame ``i`` is lowest (``topk(n, largest=False)``: in that
   order, least similar first);
2. every window of four frames ``(i .. i+3)`` for ``i`` in ``range(0, F - 4, 4)``: frame ``i+2`` keeps instead the
   ``n`` tokens least similar to frame ``i`` (frames 2 and 4 of a window pruned against 1 and 3, then 3 against 1;
   the official range leaves the last window's frame ``i+2`` at step 1).

Two deviations, where the official code fails: an odd ``F`` keeps its last frame whole (the official loop over pairs
drops it), and ``F <= 4`` skips step 2 (the official ``torch.stack`` of no similarities raises).

Hosts (the video path is :mod:`.video`): LLaVA-OneVision (the official host; ``P`` = a frame's pooled features, 196
at 7B, the kept tokens in the official order, 1-D positions renumbered as the official code's sequence) and
Qwen2.5-VL (not covered by the official code or LightCompress; adapted in the obvious way: a "frame" is one temporal
slice of merged tokens, i.e. a frame pair the tower fused (``temporal_patch_size`` 2), ``P`` = its merged tokens;
the kept tokens keep the M-RoPE positions of the full grid, as :mod:`.qwen_vision`'s methods). Image prompts pass
unchanged (the official code prunes videos only).

Not implemented: DyCoke's second stage, dynamic pruning of the KV cache during decoding (``dycoke_l=3``,
``dycoke_p=0.8``; ``modeling_qwen2.py``, a copy of HF's Qwen2 with a custom ``Cache``): at every decode step the
last token's attention over the image tokens in layer ``l - 1`` (mean over heads) picks the ``1 - p`` of them that
layers ``l`` on read from the cache (the cache keeps every entry; layers below ``l`` read all of them), at the steps
where that attention's cosine to the previous step's is under 0.9 (the first step always; the other steps read every
entry). That needs each decode step's attention
weights and a per-layer gather of the cache at read time inside HF's decoder; the routed forward gives a method a
token policy on forwards with vision tokens only (decode steps run HF's layers unchanged), so it cannot be done
without patching the decoder: ``dp=true`` is refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .base import MethodConfig, MethodError, param, register_method

#: the hosts with a video path (:mod:`.video`): HF ``model_type`` -> how DyCoke sees a frame there
VIDEO_HOSTS = {"llava_onevision": "pooled frame features", "qwen2_5_vl": "temporal slices of merged tokens"}
OFFICIAL_COMMIT = "KD-TAO/DyCoke@dd7463498203479d0ff6f2d29c4e72928c0af244"


def ttm_plan(frames: int, per_frame: int, k: float) -> list[int]:
    """Tokens TTM keeps of each of ``frames`` frames of ``per_frame`` tokens at pruning ratio ``k`` (module docstring)."""
    n = min(per_frame, int((1 - k) * per_frame))   # the official ``int(merging_ratio * num_tokens_per_frame)``
    kept = [per_frame] * frames
    for i in range(0, frames - 1, 2):
        kept[i + 1] = n
    for i in range(0, frames - 4, 4):
        kept[i + 2] = n
    return kept


def ttm_keep(frames: Any, k: float) -> Any:
    """TTM of one video: ``frames`` (F, P, d) -> the kept token indices into the flattened (F·P) tokens, frame by frame,
    a pruned frame's tokens least similar first (the official order)."""
    import torch
    import torch.nn.functional as F_

    n_frames, P = frames.shape[:2]
    n = min(P, int((1 - k) * P))
    x = frames.float()
    sel = [torch.arange(P, device=frames.device) for _ in range(n_frames)]
    for i in range(0, n_frames - 1, 2):             # step 1: frame i+1 against frame i
        sim = F_.cosine_similarity(F_.normalize(x[i], dim=1), F_.normalize(x[i + 1], dim=1), dim=1)   # (P,)
        sel[i + 1] = sim.topk(n, largest=False).indices
    for i in range(0, n_frames - 4, 4):             # step 2: frame i+2 against frame i (overrides step 1's keep-all)
        sim = F_.cosine_similarity(x[i], x[i + 2], dim=1)
        sel[i + 2] = sim.topk(n, largest=False).indices
    return torch.cat([s + j * P for j, s in enumerate(sel)])


@register_method("dycoke")
@dataclass
class DyCokeConfig(MethodConfig):
    """DyCoke's token temporal merging on video prompts (module docstring)."""

    stage: ClassVar[str] = "vision"
    official: ClassVar[str] = OFFICIAL_COMMIT
    video_only: ClassVar[bool] = True

    k: float = param(0.7, low=0.0, high=1.0)
    """Pruning ratio of a pruned frame's tokens (the official dycoke_k): it keeps int((1 - k) * P) of its P"""
    dp: bool = False
    """DyCoke's dynamic KV-cache pruning during decoding (not implemented: refused)"""

    def validate(self) -> None:
        if self.dp:
            raise MethodError("dycoke: dp=true (dynamic KV-cache pruning while decoding) is not implemented: it needs "
                              "each decode step's attention and a per-layer gather of the cache inside HF's decoder, "
                              "which it gives only when patched; use dp=false (token temporal merging only).")

    def check_host(self, host: Any) -> None:
        if host.model_type not in VIDEO_HOSTS:
            raise MethodError(f"dycoke merges the frames of a video; {host.title} takes no video prompts here (it runs "
                              "on LLaVA-OneVision and Qwen2.5-VL).")

    def candidates(self, geometry: Any) -> list["DyCokeConfig"]:
        """k on a 0.005 grid (a step changes a pruned frame's kept tokens by under one at P <= 200)."""
        return [self.replace(k=i / 200) for i in range(201)]

    def budget(self) -> dict[str, Any]:
        return {"k": self.k}

    def video_keep(self, frames: Any) -> Any:
        """The video path's hook (:mod:`.video`): (F, P, d) frame tokens -> kept indices, in the order the LLM reads them."""
        return ttm_keep(frames, self.k)

    def video_tokens(self, frames: int, per_frame: int) -> int:
        """The analytic count of the same: tokens kept of ``frames`` frames of ``per_frame`` tokens."""
        return sum(ttm_plan(frames, per_frame, self.k))

    def method_flops(self, arch: Any, image_size: tuple[int, int], text_tokens: int, logits_tokens: int = 1) -> Any:
        raise MethodError("dycoke merges the frames of a video: its FLOPs are counted on a video prompt (profile "
                          "--frames N or --duration S), not on an image.")


__all__ = ["DyCokeConfig", "ttm_plan", "ttm_keep", "VIDEO_HOSTS", "OFFICIAL_COMMIT"]
