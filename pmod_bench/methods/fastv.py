"""FastV (Chen et al., ECCV 2024): prune vision tokens at LLM layer K by the attention the last token pays them in layer K-1.

Follows pkunlp-icler/FastV at commit d1659729b5bf1be225e99ee15783deeea80f63b1: the KV-cache
implementation ``src/FastV/lmms-eval/fastv_kvcache.py`` (what lmms-eval runs) and the in-place
token-dropping branch of ``src/transformers/.../modeling_llama.py`` / ``llava-hf`` (``fastv_k``,
``fastv_r``). Per sample, in the prefill:

1. layer ``K-1`` runs as usual; its attention weights (softmax of the causally masked, scaled
   q·k over every token of the input) are averaged over heads, and the row of the **last token** is
   read at the vision tokens' columns;
2. the top ``round(V * (1 - R))`` vision tokens by that score are kept (``keep = 1 - R``), the
   others are removed from the sequence: layers ``K..L-1`` neither attend to them nor process or
   cache them; every other token is kept;
3. kept tokens keep their **original** position ids (``position_ids = keep_indexs``);
4. decode steps (one token) attend to each layer's cache: all tokens below layer K, the kept ones
   from K on (``fastv_kvcache.py``).

Defaults: ``k=2, keep=0.5`` (the paper's K=2, R=50%, also the README's LLaVA setting).

Where this deviates, and why:

* the official code reads ``output_attentions`` (eager attention for the whole model, and runs
  layer K-1 twice in the KV-cache version, caching it twice); here the one row that FastV reads is
  recomputed from layer K-1's own q/k projection outputs (forward hooks) and RoPE, so any attention
  kernel works and layer K-1 runs once. It equals HF's eager weights (tested);
* the official code takes batch sample 0's ranking for the whole batch and a fixed image span
  (``image_token_start_index``, ``image_token_length = 576``); here each sample ranks its own vision
  tokens, wherever they are: every image-feature position, LLaVA-NeXT's newline features included
  (the official code for LLaVA-NeXT, e.g. in lmms-eval, counts the whole feature span);
* ties in the score are broken by position (earlier first; ``topk`` leaves them unspecified); the
  softmax stays in float32 (HF eager casts it to the model dtype before averaging);
* ``K = 0`` is refused, as the official in-place code does (``assert K > 0``; its mask variant
  picks random tokens then, which is :mod:`.random_llm`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import param, register_method
from .llm import DropState, LLMMethodConfig, PruneFromLayerK, keep_top, kept_count, last_token_query, row_flops


@register_method("fastv")
@dataclass
class FastVConfig(PruneFromLayerK, LLMMethodConfig):
    """FastV: at LLM layer ``k`` keep the ``keep`` fraction of vision tokens the last token attends to most in layer k-1."""

    official: ClassVar[str] = "pkunlp-icler/FastV@d1659729b5bf1be225e99ee15783deeea80f63b1"

    min_k: ClassVar[int] = 1
    k: int = param(2, low=1)
    """The layer from which vision tokens are pruned (official fastv_k; ranked by layer k-1's attention)."""
    keep: float = param(0.5, low=0.0, high=1.0)
    """Fraction of vision tokens kept from layer k on (1 - the official fastv_r)."""

    def first_layer(self) -> int:
        return self.k - 1


    def extra_flops(self, text, text_tokens: int, V: int) -> int:
        return row_flops(text, 1, text_tokens + V)  # the last token's row at layer k-1 (q, k are the layer's own)

    def start(self, model, plan, kwargs: dict):
        return _FastVState(self, plan)


class _FastVState(DropState):
    def __init__(self, cfg: FastVConfig, plan) -> None:
        super().__init__(plan, renumber=False)
        self.cfg = cfg
        self.decide_at = cfg.k - 1

    def queries(self, ctx):
        return last_token_query(ctx.plan) if ctx.layer_idx == self.decide_at else None

    def observe(self, ctx, out, scores):
        if ctx.layer_idx == self.decide_at:
            ks = tuple(kept_count(v, self.cfg.keep) for v in self.current.V)
            self.keep(keep_top(scores, self.current.target, ks), ks)
        return out
