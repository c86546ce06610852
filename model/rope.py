"""Rotary position embeddings (RoFormer, Su et al. 2021, eq. 34), applied by the project itself.

The in-LLM comparison methods recompute attention rows from a layer's own ``q_proj`` / ``k_proj``
outputs, so they must rotate queries and keys exactly as the attention module does.  The math is
small enough to own (no dependence on a private helper of transformers' modeling files, whose
signature changed in 5.25); ``tests/test_core_contract.py`` checks it against the attention output of
Llama, Mistral and Qwen2 layers.

Convention (Llama / GPT-NeoX "rotate half", the one every supported family uses, Qwen2.5-VL's
M-RoPE included once its sections are recomposed into one ``(cos, sin)`` per token)::

    x (B, H, N, hd), cos/sin (B, N, hd)  ->  x * cos + rotate_half(x) * sin
    rotate_half([x1 | x2]) = [-x2 | x1]      (x1, x2: the two halves of the head dimension)
"""

from __future__ import annotations

import torch

from .compat import contract_error


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1 | x2] -> [-x2 | x1]`` over the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, N, hd) by ``cos`` / ``sin`` (B, N, hd), broadcast over the heads."""
    if cos.shape[-1] != x.shape[-1] or sin.shape != cos.shape:
        raise contract_error(
            f"RoPE embeddings of shape {tuple(cos.shape)} / {tuple(sin.shape)} do not span the head dimension "
            f"{x.shape[-1]}: partial-rotary attention is not supported by the in-LLM methods")
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, N, hd)
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


def renumbered_rope(rotary, x: torch.Tensor, kwargs: dict, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of 1-D RoPE at ``position_ids - shift`` (clamped at 0), from the LLM's own rotary embedding
    ``rotary(x, position_ids)`` and the ``position_ids`` its decoder layers receive."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise contract_error("a method renumbers positions but the decoder layer received no position_ids")
    return rotary(x, (position_ids - shift).clamp(min=0))
