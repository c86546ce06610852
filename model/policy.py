"""Token policies: which tokens a sparse decoder layer processes, with what gate, at which positions.

A :class:`~pmod_bench.model.layer.SparseLayerMixin` layer knows no method. Per forward it asks its
policy, in this order::

    x = policy.prepare(ctx, x)              may decide from this layer's own projections (PyramidDrop)
    sel = policy.select(ctx, x, sel)        narrows the plan's Selection (below)
    rows = policy.queries(ctx)              attention rows it wants from this layer (FastV, SparseVLM)
    out = policy.observe(ctx, out, scores)  may decide for the later layers and rewrite the output

A :class:`Selection` says which vision tokens are present at the layer (``tokens``: what a method
left), which of them the layer processes (``selected``; every non-vision, non-padding token is
always processed), the gate on the processed ones (p-MoD's TanhNorm weight ``w``; 1 for methods),
whether skipped vision tokens are gated too (p-MoD's STRing), and any position renumbering
(``tokens.shift``). p-MoD's router is one policy (:class:`~pmod_bench.model.layer.PMoDRouter`); the
in-LLM comparison methods are others (:mod:`pmod_bench.methods`); p-MoD with a method on top is their
:class:`Composed` policy: the method says which vision tokens are present, the router picks among them.

Every count is host arithmetic on the plan's per-sample ``V_b`` (no host sync inside a layer), and
every ranking is :func:`stable_top_k`: ties broken by position, the earlier token first, so a kept
set does not depend on batch composition, padding or device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch


@dataclass(frozen=True)
class LayerTokens:
    """The vision tokens present at one decoder layer (what the layer routes / processes).

    Without an in-LLM method every layer sees the plan's own vision tokens; a method (FastV,
    PyramidDrop, ...) removes some for the layers after its decision. Removed tokens are gone for
    those layers: they are neither processed (queries, keys, values, MLP) nor cached there, and their
    hidden state passes through unchanged (their logits are meaningless, as the official code, which
    cuts them out of the sequence, has none).
    """

    target: Optional[torch.Tensor]
    """(B, N) bool: the vision tokens present (None: none in this input)."""
    num_targets: Optional[torch.Tensor]
    """(B,) long on the device: how many per sample (= V)."""
    V: tuple[int, ...]
    """The same counts on the host (host arithmetic on the plan's V_b, never a transfer)."""
    shift: Optional[torch.Tensor] = None
    """(B, N) long: RoPE position = position id - shift, on every position row (1-D RoPE: one row; M-RoPE: all
    three); methods that renumber positions after dropping (PyramidDrop, SparseVLM). None = original positions."""
    final_shift: Optional[torch.Tensor] = None
    """(B,) long: the shift of tokens that come after this input (decode steps); the layer stores it in its cache
    layer, so later forwards rotate their keys/queries at the same renumbered positions."""


@dataclass(frozen=True)
class Selection:
    """What one layer processes in this forward (see the module docstring)."""

    tokens: LayerTokens
    """The vision tokens present at this layer."""
    selected: Optional[torch.Tensor] = None
    """(B, N) bool, a subset of ``tokens.target``: the vision tokens processed; None = every present one."""
    counts: Optional[tuple[int, ...]] = None
    """Host counts of ``selected`` per sample; None = ``tokens.V``."""
    gate: Optional[torch.Tensor] = None
    """(B, N): the weight of the MLP update of processed vision tokens (p-MoD's w); None = 1."""
    gate_skipped: bool = False
    """Skipped vision tokens become ``gate * x`` (p-MoD's STRing) instead of passing through as ``x``."""

    @property
    def vision(self) -> Optional[torch.Tensor]:
        """(B, N) bool: the vision tokens this layer processes."""
        return self.selected if self.selected is not None else self.tokens.target

    @property
    def k(self) -> tuple[int, ...]:
        """Processed vision tokens per sample (host)."""
        return self.counts if self.counts is not None else self.tokens.V

    def replace(self, **changes: Any) -> "Selection":
        return dataclasses.replace(self, **changes)


@dataclass
class LayerContext:
    """What a policy may read at one layer: the layer (its own modules, ``layer_idx``), the forward's
    :class:`~pmod_bench.model.plan.RoutingPlan` and the HF keyword arguments the layer received."""

    layer: Any
    plan: Any
    kwargs: dict

    @property
    def layer_idx(self) -> int:
        return self.layer.layer_idx


class TokenPolicy:
    """Base class of everything that selects the tokens a layer processes (module docstring). Every hook
    defaults to "no change"; a policy overrides the ones it needs. A per-forward method state holds its
    decisions in attributes; counts it derives must be host arithmetic (no host sync)."""

    def prepare(self, ctx: LayerContext, x: torch.Tensor) -> torch.Tensor:
        """Before the layer: may rank from the layer's own projections; returns the layer's input (B, N, d)."""
        return x

    def select(self, ctx: LayerContext, x: torch.Tensor, sel: Selection) -> Selection:
        """Narrow ``sel`` (what the layer processes)."""
        return sel

    def queries(self, ctx: LayerContext) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``(positions (B, R) long, weights (B, R) float)``: the layer reports ``score[b, n] = sum_r weights[b, r] *
        mean_heads softmax(q_r k^T)[n]`` over the keys of this input (:func:`pmod_bench.model.rows.attention_rows`);
        None = no attention wanted."""
        return None

    def observe(self, ctx: LayerContext, out: torch.Tensor, scores: Optional[torch.Tensor]) -> torch.Tensor:
        """After the layer: may decide for the later layers and rewrite its output (B, N, d)."""
        return out


class Composed(TokenPolicy):
    """Policies applied in order: each ``select`` narrows the previous one's selection (a method's present
    tokens, then p-MoD's router among them); the first that asks for attention rows gets them."""

    def __init__(self, policies: Sequence[Optional[TokenPolicy]]) -> None:
        self.policies = [p for p in policies if p is not None]

    def prepare(self, ctx, x):
        for p in self.policies:
            x = p.prepare(ctx, x)
        return x

    def select(self, ctx, x, sel):
        for p in self.policies:
            sel = p.select(ctx, x, sel)
        return sel

    def queries(self, ctx):
        return next((q for q in (p.queries(ctx) for p in self.policies) if q is not None), None)

    def observe(self, ctx, out, scores):
        for p in self.policies:
            out = p.observe(ctx, out, scores)
        return out


#: the policy of a layer with neither a router nor a method: it processes every token present
EVERYTHING = TokenPolicy()


def compose(*policies: Optional[TokenPolicy]) -> TokenPolicy:
    """The one policy of ``policies`` (None entries dropped): itself, their :class:`Composed`, or :data:`EVERYTHING`."""
    present = [p for p in policies if p is not None]
    if not present:
        return EVERYTHING
    return present[0] if len(present) == 1 else Composed(present)


# ----------------------------------------------------------------------------------- ranking
def stable_rank(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(B, N) long: positions by descending score, candidates first; ties in the original order (the earlier
    position first: a stable sort), so a ranking does not depend on the batch, padding or device."""
    s = scores.detach().float().masked_fill(~candidates, float("-inf"))
    return torch.sort(s, dim=1, descending=True, stable=True).indices


def stable_top_k(scores: torch.Tensor, candidates: torch.Tensor, k: Union[torch.Tensor, Sequence[int]],
                 k_max: Optional[int] = None) -> torch.Tensor:
    """(B, N) bool: per sample the ``k[b]`` candidates with the highest score (:func:`stable_rank` order).

    ``k``: (B,) long on the device (no transfer), or host counts; ``k_max`` >= max(k) (host; default max of the
    host counts) bounds the gather."""
    B, N = candidates.shape
    if not isinstance(k, torch.Tensor):
        k_max = max(k, default=0) if k_max is None else k_max
        k = torch.tensor(list(k), dtype=torch.long, device=candidates.device)
    ranked = stable_rank(scores, candidates)[:, :k_max]  # (B, k_max)
    keep = torch.arange(k_max, device=candidates.device)[None, :] < k[:, None]  # (B, k_max)
    return torch.zeros(B, N, dtype=torch.bool, device=candidates.device).scatter(1, ranked, keep)


__all__ = ["LayerTokens", "Selection", "LayerContext", "TokenPolicy", "Composed", "EVERYTHING", "compose",
           "stable_rank", "stable_top_k"]
