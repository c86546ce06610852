"""What the in-LLM comparison methods share (FastV, PyramidDrop, SparseVLM, in-LLM random pruning).

These methods act *inside* the LLM: at a decision layer they rank the vision tokens (by attention
rows the layer's own queries and keys give), and the later layers process only the tokens kept.
They run on the project's core, not on a copy of the decoder layer:

* ``apply_method`` wraps the decoder layers from the method's first decision layer on as
  :class:`~pmod_bench.model.layer.SparseLayerMixin` layers *without a router* (a p-MoD model's routed
  layers stay as they are); a vanilla model takes its host's routed class (the host adapter's class
  map, :mod:`pmod_bench.model.hosts`), whose forward builds the one
  :class:`~pmod_bench.model.plan.RoutingPlan` per call and the project's
  :class:`~pmod_bench.model.cache.PMoDCache`, as a p-MoD model's forward does;
* per forward with vision tokens, the method's :meth:`LLMMethodConfig.start` returns its policy (a
  :class:`~pmod_bench.model.policy.TokenPolicy`, composed with a p-MoD layer's router), carried by
  the plan. The sparse layers gather the tokens it leaves, run their own norms / attention / MLP on them at their RoPE positions, scatter
  back, and cache only those: a dropped token is gone for the later layers (never a query, key,
  value or MLP input there; not in their KV cache). Decode steps attend to each layer's own cache;
* every count is host arithmetic on the plan's ``V_b`` (one transfer per forward, made by the plan):
  the layers make no host sync. Ranking ties are broken by position (earlier first), so batched
  equals per-sample;
* attention rows are recomputed from the layer's own ``q_proj`` / ``k_proj`` outputs (forward hooks)
  and the project's RoPE (:func:`pmod_bench.model.rows.attention_rows`, the one attention-row routine), with any attention
  kernel (eager or SDPA); :func:`pmod_bench.model.compat.check_attention_rows` checks what that
  relies on when the method is applied and fails loudly.

Analytic FLOPs (:func:`pmod_bench.methods.flops.llm_method_flops`): the baseline's vision side, the LLM with ``kept[l]``
vision tokens at layer ``l`` (:meth:`LLMMethodConfig.layer_vision_tokens`), plus the method's own
products (:meth:`LLMMethodConfig.extra_flops`: attention rows, extra projections, clustering); the
KV cache holds ``kept[l]`` vision entries at layer ``l``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pmod_bench.model.policy import LayerTokens, TokenPolicy, stable_top_k

from .base import MethodConfig, MethodError, ModelGeometry, VisionAccount

#: the solver's grid of keep ratios (1/1000 steps: finer than 1% of the prefill FLOPs on every LLaVA)
RATIO_GRID = tuple(i / 1000 for i in range(1, 1001))


def parse_layers(text: str, what: str) -> tuple[int, ...]:
    """``"8-16-24"`` -> (8, 16, 24) (the official iLLaVA/PyramidDrop-style list, ``-`` separated so it
    fits in a spec ``name:key=value,...``)."""
    try:
        layers = tuple(int(p) for p in str(text).replace(" ", "").split("-") if p != "")
    except ValueError:
        raise MethodError(f"{what} must be layer indices separated by '-', e.g. 8-16-24; got '{text}'.") from None
    if not layers or list(layers) != sorted(set(layers)) or layers[0] < 0:
        raise MethodError(f"{what} must be increasing, distinct, non-negative layer indices (e.g. 8-16-24); got '{text}'.")
    return layers


@dataclass
class LLMMethodConfig(MethodConfig):
    """Base of the in-LLM methods (``stage = "llm"``): see the module docstring."""

    stage: ClassVar[str] = "llm"
    #: the method renumbers RoPE positions after dropping (PyramidDrop / SparseVLM official code)
    renumbers: ClassVar[bool] = False

    # -- what a subclass defines -----------------------------------------------------------------
    def first_layer(self) -> int:
        """The first decoder layer that must read the plan (a decision layer, or the layer that computes
        the method's inputs); every later layer reads it too."""
        raise NotImplementedError(f"{type(self).__name__} must define first_layer()")

    def layer_vision_tokens(self, num_layers: int, V: int) -> list[int]:
        """Vision tokens processed (and cached) by each layer for an image of ``V`` vision tokens."""
        raise NotImplementedError

    def extra_flops(self, text, text_tokens: int, V: int) -> int:
        """The method's own matrix products in the LLM (2 FLOPs per multiply-add), per sample."""
        return 0

    def start(self, model, plan, kwargs: dict):
        """The method's policy for one forward (a :class:`~pmod_bench.model.policy.TokenPolicy`)."""
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------------
    def check_model(self, geometry: ModelGeometry) -> None:
        if self.first_layer() >= geometry.text_layers:
            raise MethodError(f"{self.name}: layer {self.first_layer()} is beyond the LLM's {geometry.text_layers} layers "
                              f"(0..{geometry.text_layers - 1}); choose a smaller layer.")

    def account(self, geometry: ModelGeometry, tiles: int, image_size: Any, config: Any) -> VisionAccount:
        raise MethodError(f"{self.name} acts inside the LLM; its FLOPs come from llm_method_flops.")

    def method_flops(self, arch: Any, image_size: tuple[int, int], text_tokens: int, logits_tokens: int = 1):
        from .flops import llm_method_flops

        return llm_method_flops(self, arch, image_size, text_tokens, logits_tokens)


class PruneFromLayerK:
    """Shared by the methods that drop vision tokens once, before layer ``k``, keeping ``keep`` of them
    (FastV, in-LLM random pruning): a ``k`` field, a ``keep`` field and ``min_k``."""

    min_k: ClassVar[int] = 0

    def check_model(self, geometry: ModelGeometry) -> None:
        if self.k >= geometry.text_layers:
            raise MethodError(f"{self.name}: k must be in [{self.min_k}, {geometry.text_layers - 1}] for an LLM of "
                              f"{geometry.text_layers} layers, got {self.k}.")

    def candidates(self, geometry: ModelGeometry) -> list:
        return [self.replace(keep=r) for r in RATIO_GRID]

    def budget(self) -> dict[str, Any]:
        return {"k": self.k, "keep": self.keep}

    def layer_vision_tokens(self, num_layers: int, V: int) -> list[int]:
        n = kept_count(V, self.keep)
        return [V if l < self.k else n for l in range(num_layers)]


def kept_count(V: int, keep: float) -> int:
    """round(V * keep), as FastV's official ``round(image_token_length * (1 - fastv_r))``."""
    return int(round(V * keep))


# ---------------------------------------------------------------------------------- per-forward state
class DropState(TokenPolicy):
    """A forward's kept vision tokens, updated at decision layers (the policy of an in-LLM method).

    ``current.target`` (B, N) bool are the vision tokens still present, ``current.V`` their per-sample counts
    (host); every layer from the method's first one on processes exactly those (:meth:`select`).
    With ``renumber`` the RoPE position of a token is its index among the tokens still present
    (position id - the dropped tokens before it), as PyramidDrop's / SparseVLM's official code,
    which cut the dropped tokens out and renumber what is left; otherwise the original positions.
    """

    def __init__(self, plan, renumber: bool) -> None:
        self.renumber = renumber
        self.target = plan.target  # (B, N) bool: the input's vision tokens
        self.current = LayerTokens(plan.target, plan.num_targets, plan.V)

    def select(self, ctx, x, sel):
        return sel.replace(tokens=self.current)

    def keep(self, alive, V: tuple[int, ...]) -> None:
        """The vision tokens of every later layer: ``alive`` (B, N) bool, ``V`` host counts."""
        import torch

        shift = final = None
        if self.renumber:
            dead = (self.target & ~alive).long()  # (B, N) dropped so far
            shift = dead.cumsum(1) - dead  # dropped tokens before each position
            final = dead.sum(1)  # (B,): what later tokens (decode) are shifted by
        num = torch.tensor(V, dtype=torch.long, device=alive.device)  # host -> device copy, no sync
        self.current = LayerTokens(alive, num, tuple(V), shift, final)


def last_token_query(plan):
    """The query of FastV / PyramidDrop / iLLaVA: the last token of each sample (left padding: position N-1)."""
    import torch

    B, N = plan.target.shape
    dev = plan.target.device
    return torch.full((B, 1), N - 1, dtype=torch.long, device=dev), torch.ones(B, 1, device=dev)


def keep_top(scores, alive, ks: tuple[int, ...]):
    """(B, N) bool: per sample the ``ks[b]`` present tokens with the highest score; ties by position
    (:func:`~pmod_bench.model.policy.stable_top_k`)."""
    return stable_top_k(scores, alive, ks)


# ------------------------------------------------------------------------------------ accounting
def row_flops(text, queries: int, keys: int) -> int:
    """``queries`` attention rows over ``keys`` keys, every head: q·K^T (the method's own; P·V is not needed)."""
    return 2 * queries * keys * text.q_dim


__all__ = ["LLMMethodConfig", "PruneFromLayerK", "DropState", "keep_top", "kept_count", "last_token_query", "RATIO_GRID",
           "parse_layers", "row_flops"]
