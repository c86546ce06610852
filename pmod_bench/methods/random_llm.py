"""In-LLM random pruning: from LLM layer ``k`` on, keep a random subset of the vision tokens (FastV's placement).

No official repository: it is the control for the in-LLM methods (FastV's own ablation drops random
tokens; VTC-Bench uses random pruning as a baseline), as :mod:`.random_prune` is for the methods
before the LLM. It is FastV (:mod:`.fastv`) with the attention ranking replaced by a uniform random
choice: same layer, same ``round(V * keep)`` count, original positions, the same KV-cache behaviour.
It needs no attention rows.

Determinism: sample ``b``'s subset is ``torch.randperm(V_b, generator=manual_seed(seed))[:n]`` on
the CPU over its vision tokens in order, independent of the batch, the device and the image
content: batched equals per-sample, and every run is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import param, register_method
from .llm import DropState, LLMMethodConfig, PruneFromLayerK, kept_count


@register_method("random_llm")
@dataclass
class RandomLLMConfig(PruneFromLayerK, LLMMethodConfig):
    """In-LLM random pruning: from layer ``k`` on keep a random ``keep`` fraction of the vision tokens."""

    k: int = param(2, low=0)
    """The first layer that no longer sees the dropped tokens (FastV's K)."""
    keep: float = param(0.5, low=0.0, high=1.0)
    """Fraction of vision tokens kept from layer k on (round(V * keep))."""
    seed: int = param(0, low=0)
    """Seed of the subsets."""

    def first_layer(self) -> int:
        return self.k


    def subset(self, V: int, n: int) -> torch.Tensor:
        """(V,) bool over a sample's vision tokens in order: the ``n`` kept."""
        g = torch.Generator().manual_seed(self.seed)
        mask = torch.zeros(V, dtype=torch.bool)
        mask[torch.randperm(V, generator=g)[:n]] = True
        return mask

    def start(self, model, plan, kwargs: dict):
        return _RandomState(self, plan)


class _RandomState(DropState):
    def __init__(self, cfg: RandomLLMConfig, plan) -> None:
        super().__init__(plan, renumber=False)
        self.cfg = cfg

    def prepare(self, ctx, x):
        if ctx.layer_idx == self.cfg.k:
            V = self.current.V
            ks = tuple(kept_count(v, self.cfg.keep) for v in V)
            by_rank = torch.zeros(len(V), max(max(V), 1), dtype=torch.bool)
            for b, (v, n) in enumerate(zip(V, ks)):
                by_rank[b, :v] = self.cfg.subset(v, n)
            target = self.current.target
            rank = (target.long().cumsum(1) - 1).clamp(min=0)  # (B, N) index among the sample's vision tokens
            alive = target & by_rank.to(target.device).gather(1, rank.clamp(max=by_rank.shape[1] - 1))
            self.keep(alive, ks)
        return x
