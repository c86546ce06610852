"""What the in-LLM comparison methods share (FastV, PyramidDrop, SparseVLM, in-LLM random pruning).

These methods act *inside* the LLM: at a decision layer they rank the vision tokens (by attention
rows the layer's own queries and keys give), and the later layers process only the tokens kept.
They run on the project's core, not on a copy of the decoder layer:

* ``apply_method`` wraps the decoder layers from the method's first decision layer on as
  :class:`~pmod_bench.model.layer.SparseLayerMixin` layers *without a router* (a p-MoD model's routed
  layers stay as they are), and puts :class:`RoutedModelMixin` under a vanilla model's class so
  that its forward builds the one :class:`~pmod_bench.model.plan.RoutingPlan` per call and the
  project's :class:`~pmod_bench.model.cache.PMoDCache`, as a p-MoD model's forward does;
* per forward with vision tokens, the method's :meth:`LLMMethodConfig.start` returns its policy (a
  :class:`~pmod_bench.model.policy.TokenPolicy`, composed with a p-MoD layer's router), carried by the plan.
  The sparse layers gather the
  tokens it leaves, run their own norms / attention / MLP on them at their RoPE positions, scatter
  back, and cache only those: a dropped token is gone for the later layers (never a query, key,
  value or MLP input there; not in their KV cache). Decode steps attend to each layer's own cache;
* every count is host arithmetic on the plan's ``V_b`` (one transfer per forward, made by the plan):
  the layers make no host sync. Ranking ties are broken by position (earlier first), so batched
  equals per-sample;
* attention rows are recomputed from the layer's own ``q_proj`` / ``k_proj`` outputs (forward hooks)
  and the project's RoPE (:func:`pmod_bench.model.rows.attention_rows`, the one attention-row routine), with any attention
  kernel (eager or SDPA); :func:`pmod_bench.model.compat.check_attention_rows` checks what that
  relies on when the method is applied and fails loudly.

Analytic FLOPs (:func:`llm_method_flops`): the baseline's vision side, the LLM with ``kept[l]``
vision tokens at layer ``l`` (:meth:`LLMMethodConfig.layer_vision_tokens`), plus the method's own
products (:meth:`LLMMethodConfig.extra_flops`: attention rows, extra projections, clustering); the
KV cache holds ``kept[l]`` vision entries at layer ``l``.
"""

from __future__ import annotations

import inspect
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
        raise NotImplementedError

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


# ------------------------------------------------------------------------------ model integration
class RoutedModelMixin:
    """Under a *vanilla* HF LLaVA class when an in-LLM method is applied: its forward builds the routing
    plan and the project's cache (:class:`~pmod_bench.model.modeling.RoutedForwardMixin`), as a p-MoD
    model's forward does; every other behaviour is the HF class's own."""


_ROUTED: dict[type, type] = {}


def routed_class(base: type) -> type:
    """``<Base>Routed``: ``base`` with the routed forward (cached per class)."""
    from pmod_bench.model.compat import cache_argument
    from pmod_bench.model.modeling import RoutedForwardMixin, _signature_of

    if base not in _ROUTED:
        @_signature_of(base.forward)
        def forward(self, *args, **kwargs):
            return self._pmod_forward(super(cls, self).forward, args, kwargs)

        cls = type(f"{base.__name__}Routed", (RoutedModelMixin, RoutedForwardMixin, base),
                   {"__module__": __name__, "forward": forward,
                    "_pmod_cache_arg": cache_argument(base.forward, f"{base.__name__}.forward")})
        _ROUTED[base] = cls
    return _ROUTED[base]


def install(model, cfg: LLMMethodConfig, geometry: ModelGeometry, base: type) -> type:
    """Wrap the layers ``cfg`` needs, check the attention contract, and return the class to run under
    the method mixin (``base`` itself for a p-MoD model, its routed subclass for a vanilla one)."""
    from pmod_bench.model.compat import check_attention_rows
    from pmod_bench.model.layer import wrap_decoder_layer

    cfg.check_model(geometry)
    lm = model.model.language_model
    rotary = getattr(lm, "rotary_emb", None)
    if rotary is None or "position_ids" not in inspect.signature(type(rotary).forward).parameters:
        raise MethodError(f"{type(lm).__name__} has no rotary_emb(x, position_ids); the in-LLM methods need the LLM's RoPE "
                          "(Llama/Vicuna, Mistral, Qwen2).")
    hidden = model.config.text_config.hidden_size
    for i in range(cfg.first_layer(), len(lm.layers)):
        lm.layers[i] = wrap_decoder_layer(lm.layers[i], i, getattr(lm.layers[i], "ratio", 1.0), getattr(lm.layers[i], "pmod", None), hidden)
        check_attention_rows(lm.layers[i].self_attn)
    model.llm_method = cfg
    if hasattr(model, "pmod_layers"):  # a p-MoD model's forward already builds the plan
        return base
    return routed_class(base)


def uninstall(model) -> None:
    """Undo :func:`install`: method-only layers back to HF's own, no method state."""
    from pmod_bench.model.layer import unwrap_method_layer

    lm = model.model.language_model
    for i, layer in enumerate(lm.layers):
        lm.layers[i] = unwrap_method_layer(layer)
    model.__dict__.pop("llm_method", None)


def original_class(cls: type) -> type:
    """The HF (or p-MoD) class under the method and routed mixins."""
    from transformers.models.llava.modeling_llava import LlavaForConditionalGeneration
    from transformers.models.llava_next.modeling_llava_next import LlavaNextForConditionalGeneration

    from .apply import MethodModelMixin

    for klass in cls.__mro__:
        if (issubclass(klass, (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration))
                and not issubclass(klass, (MethodModelMixin, RoutedModelMixin))):
            return klass
    return cls


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
def llm_method_flops(cfg: LLMMethodConfig, arch, image_size: tuple[int, int], text_tokens: int, logits_tokens: int = 1):
    """:class:`~pmod_bench.methods.accounting.MethodFlops` of one sample under an in-LLM method."""
    from pmod_bench.profiler.arch import vision_layout
    from pmod_bench.profiler.flops import llm_prefill_flops, paper_prefill_flops, vision_flops

    from .accounting import MethodFlops

    cfg.check_model(ModelGeometry.from_config(arch.config))
    layout = vision_layout(arch, image_size)
    V, t = layout.vision_tokens, arch.text
    kept = cfg.layer_vision_tokens(t.layers, V)
    extra = cfg.extra_flops(t, text_tokens, V)
    llm = llm_prefill_flops(t, text_tokens, V, kept, (), logits_tokens).total("full")
    paper = paper_prefill_flops(t, text_tokens, V, kept)
    vis = vision_flops(arch, layout)
    return MethodFlops(vision_encoder=vis.encoder, projector=vis.projector, method_extra=0, llm_prefill=llm + extra,
                       llm_prefill_paper=paper + extra, llm_vision_tokens=min(kept), baseline_vision_tokens=V,
                       layer_vision_tokens=tuple(kept), llm_extra=extra,
                       note=f"in-LLM method: its own products ({extra / 1e12:.4f} TFLOPs) are counted in llm_prefill")


def row_flops(text, queries: int, keys: int) -> int:
    """``queries`` attention rows over ``keys`` keys, every head: q·K^T (the method's own; P·V is not needed)."""
    return 2 * queries * keys * text.q_dim


__all__ = ["LLMMethodConfig", "DropState", "keep_top", "last_token_query", "RATIO_GRID", "parse_layers", "install", "uninstall", "original_class", "routed_class",
           "llm_method_flops", "row_flops"]
