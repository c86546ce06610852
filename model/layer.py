"""The sparse decoder layer: one policy-free layer for p-MoD and every in-LLM method.

A sparse layer wraps an ordinary HF decoder layer (Llama / Vicuna, Mistral, Qwen2, Qwen2.5-VL, ...): it
takes over that layer's own ``input_layernorm``, ``self_attn``, ``post_attention_layernorm`` and ``mlp``
(same modules, same parameter names). Which tokens it processes is its *policy's* decision
(:mod:`pmod_bench.model.policy`): p-MoD's router (:class:`PMoDRouter`, a ``Linear(d, 1)`` named
``router``, the only parameters a p-MoD layer adds), an in-LLM comparison method, or both. Data flow
(METHOD.md, "One p-MoD layer")::

    x (B, N, d) ──policy.select──> Selection: processed vision tokens (p-MoD: top-k_b of w = scale*act(r) + bias,
        │                          k_b = trunc(V_b * rho)), gate w (1 for methods), renumbered positions
        │       processed set P = selected vision tokens ∪ non-vision, non-padding tokens (order kept)
        ├─gather P──> xp (B, P, d), cos/sin (B, P, hd)   [rows left-padded with unused slots]
        │             h = xp + Attn(LN1(xp))            queries/keys/values from P only; RoPE at the
        │             u = MLP(LN2(h))                   tokens' (original or renumbered) positions; causal in order
        │             out_P = h + w*u (selected vision) | h + u (text)
        └─scatter──> out (B, N, d); skipped vision tokens: w*x (STRing) or x

Skipped tokens take no part in attention (as queries, keys or values) nor in the MLP.  In a batch
whose samples process different numbers of tokens the gathered rows are left-padded; a padding slot
holds some unprocessed position, is masked out of every other query's keys, and its output is
discarded.  The layer's KV cache stores only ``P`` (see :class:`~pmod_bench.model.cache.PMoDCache`).

What a layer reads comes from the forward's :class:`~pmod_bench.model.plan.RoutingPlan` (vision
mask, per-layer shapes, the cache, the position layout), never from HF's keyword-argument names; it
touches HF only through its four submodules and the cache's ``update`` (see
:mod:`pmod_bench.model.compat`). Observers (``record_routing``, the overflow guard) hang off the plan.
Ranking is deterministic (:func:`~pmod_bench.model.policy.stable_top_k`): ties in the router weights
(zero routers; bf16 TanhNorm saturation) are broken by position, the earlier token first, so the kept
set does not depend on batch composition, padding or device.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from torch import nn

from .compat import check_attention, contract_error
from .config import PMoDConfig
from .plan import RoutingPlan, num_selected
from .policy import LayerContext, Selection, TokenPolicy, stable_top_k
from .rows import Rows, attention_rows, build_attention_mask, capture_qk, query_attention  # noqa: F401  (re-exported)
from .schedules import num_selected_host

REQUIRED_SUBMODULES = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
#: HF keyword arguments a sparse layer must not forward to the attention module (it passes its own)
_NOT_FORWARDED = frozenset({"cache", "past_key_values", "use_cache", "position_ids", "cache_position", "attention_mask",
                            "position_embeddings"})


class PMoDRouter(nn.Linear, TokenPolicy):
    """p-MoD's router, the policy of a p-MoD layer: r = W_r x + b_r, a Linear(d, 1), zero-initialised by default
    (w = 1: the LLM is intact). It selects, per sample, the top ``k_b = trunc(V_b * ratio)`` of the vision tokens
    present by the normalised weight ``w = scale * act(r) + bias`` and gates their MLP update with ``w``."""

    def __init__(self, hidden_size: int, bias: bool = True, zero_init: bool = True, ratio: float = 1.0,
                 pmod: Optional[PMoDConfig] = None) -> None:
        super().__init__(hidden_size, 1, bias=bias)
        self.zero_init = zero_init
        self.ratio = float(ratio)
        self.pmod = pmod if pmod is not None else PMoDConfig()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if getattr(self, "zero_init", False):
            nn.init.zeros_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)
        else:
            super().reset_parameters()

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, ratio={self.ratio:.4f}, weight_norm={self.pmod.weight_norm}, "
                f"string={self.pmod.string}")

    def weights(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """w = scale * act(r) + bias, (B, N); softmax runs over each sample's target tokens."""
        norm, scale, bias = self.pmod.weight_norm, self.pmod.norm_scale, self.pmod.norm_bias
        if norm == "tanh":
            act = torch.tanh(logits)
        elif norm in ("softmax", "shifted_softmax"):
            masked = logits.float().masked_fill(~target, torch.finfo(torch.float32).min)
            act = torch.softmax(masked, dim=-1).to(logits.dtype)
        elif norm == "sigmoid":
            act = torch.sigmoid(logits)
        else:
            act = logits
        return act * scale + bias

    def select(self, ctx: LayerContext, x: torch.Tensor, sel: Selection) -> Selection:
        toks = sel.tokens
        if toks.target is None:  # no vision tokens (text-only prompt, decode step)
            return sel
        w = self.weights(self(x).squeeze(-1), toks.target)  # (B, N)
        # rank by the normalised weight in the model's dtype, as the reference; ties by position
        k = tuple(num_selected_host(v, self.ratio) for v in toks.V)  # host counts
        selected = stable_top_k(w, toks.target, num_selected(toks.num_targets, self.ratio), max(k, default=0))
        gate = torch.where(toks.target, w, torch.ones_like(w))  # (B, N): w on vision tokens, 1 on text
        return sel.replace(selected=selected, counts=k, gate=gate, gate_skipped=self.pmod.string)


# ---------------------------------------------------------------------------------------------- layer
class SparseLayerMixin:
    """The sparse layer, mixed into a subclass of the wrapped HF decoder layer's class (module docstring).

    Use :func:`wrap_decoder_layer`; the instance reuses the original layer's submodules (no copies,
    no re-initialisation), so parameter names are unchanged plus ``router.weight`` / ``router.bias`` on a
    p-MoD layer. Being an instance of the wrapped class keeps HF's output capturing
    (``output_hidden_states``) and gradient checkpointing working.
    """

    layer_idx: int
    router: Optional[PMoDRouter]

    @property
    def ratio(self) -> float:
        """The p-MoD retention ratio (1.0: a layer without a router, for an in-LLM method only)."""
        return self.router.ratio if self.router is not None else 1.0

    @property
    def pmod(self) -> Optional[PMoDConfig]:
        return self.router.pmod if self.router is not None else None

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}" + ("" if self.router is not None else ", method layer (no router)")

    def forward(self, hidden_states: torch.Tensor, *args: Any, pmod_plan: Optional[RoutingPlan] = None,
                **kwargs: Any) -> torch.Tensor:
        plan = self._checked_plan(pmod_plan, kwargs)
        ctx, policy = LayerContext(self, plan, kwargs), plan.policy(self)  # router ∘ method, or neither
        x = policy.prepare(ctx, hidden_states)  # (B, N, d); a method may rank from this layer's own q/k here
        B, N, _ = x.shape
        # 1. select: which tokens this layer processes, their gate, their positions (host shapes, no sync)
        sel = policy.select(ctx, x, plan.selection(self.layer_idx))
        plan.note(self.layer_idx, sel)  # record_routing observes the plan
        shapes = plan.shapes(sel)
        rows = Rows.of(plan.processed(sel), shapes.processed, N, shapes.full, shapes.padded)
        cache = plan.cache.pmod_layer(self.layer_idx) if plan.cache is not None else None
        # 2. gather P (order kept): hidden states and RoPE at the tokens' original (or renumbered) positions
        rope = tuple(rows.take(t) for t in plan.rope(x, kwargs, self._shift(sel, cache)))  # (B, P, hd)
        xp = rows.take(x)  # (B, P, d)
        past_len, past_valid = self._cache_step(cache, rows, sel, xp.shape[1], N, B, x.device)
        mask = build_attention_mask(self.self_attn.config._attn_implementation or "sdpa", rows.valid, past_valid,
                                    past_len, xp.shape[1], B, x.dtype, x.device)  # over [this layer's cache | P]
        # 3. the wrapped layer's own modules, on P only
        queries = policy.queries(ctx)
        with capture_qk(self.self_attn, queries is not None) as qk:  # the layer's own q/k projections (hooks)
            a, _ = self.self_attn(hidden_states=self.input_layernorm(xp), attention_mask=mask, position_embeddings=rope,
                                  **self._attention_kwargs(plan, kwargs))
        h = xp + a  # (B, P, d)
        u = self.mlp(self.post_attention_layernorm(h))  # (B, P, d)
        scores = None
        if queries is not None:  # the attention rows a method ranks by, from this layer's own q and k
            past = cache.keys[:, :, :past_len] if cache is not None and past_len else None
            scores = attention_rows(self.self_attn, qk["q"], qk["k"], rope, rows, *queries, past, past_valid)
        # 4. gated scatter back: out_P = h + gate*u; skipped vision tokens x (or gate*x with STRing)
        out = rows.scatter(x, h, u, sel.gate, sel.gate_skipped)  # (B, N, d)
        return policy.observe(ctx, out, scores)  # a method may decide here for the later layers

    # ----------------------------------------------------------------------------- forward steps
    def _checked_plan(self, plan: Optional[RoutingPlan], kwargs: dict) -> RoutingPlan:
        if plan is None:
            raise contract_error(
                f"p-MoD layer {self.layer_idx} ran without its routing plan: the model's keyword arguments no longer "
                "reach the decoder layers, or the layer was called outside a p-MoD model's forward"
            )
        if kwargs.get("position_embeddings") is None:
            raise contract_error(f"p-MoD layer {self.layer_idx} received no position_embeddings (RoPE cos, sin)")
        return plan

    @staticmethod
    def _shift(sel: Selection, cache) -> Optional[torch.Tensor]:
        """The positions' renumbering: the selection's (prefill), else the one the cache layer stored (decode)."""
        if sel.tokens.shift is None and cache is not None and cache.position_shift is not None:
            return cache.position_shift[:, None]  # (B, 1)
        return sel.tokens.shift

    @staticmethod
    def _cache_step(cache, rows: Rows, sel: Selection, q_len: int, N: int, B: int, device) -> tuple:
        """(cached slots, their validity) before this step; notes this step's slots (the attention appends them)."""
        if cache is None:
            return 0, None
        past = cache.stored_tokens, cache.valid
        cache.record_step(rows.valid, q_len, N, B, device)
        if sel.tokens.final_shift is not None:
            cache.position_shift = sel.tokens.final_shift
        return past

    def _attention_kwargs(self, plan: RoutingPlan, kwargs: dict) -> dict:
        """HF's other keyword arguments, and the project's cache under the attention's own argument name. No
        position_ids: RoPE comes in (cos, sin), and gathered ids would look like packed sequences to
        flash-attention's varlen heuristic."""
        extra = {k: v for k, v in kwargs.items() if k not in _NOT_FORWARDED and v is not plan.cache}
        return {**extra, self._pmod_cache_arg: plan.cache}


#: the name this layer had while p-MoD was its only policy
PMoDLayerMixin = SparseLayerMixin


@functools.lru_cache(maxsize=None)
def sparse_layer_class(base: type) -> type:
    """``PMoD<Base>``: a subclass of an HF decoder-layer class with the sparse layer's forward."""
    return type(f"PMoD{base.__name__}", (SparseLayerMixin, base), {"__module__": __name__})


pmod_layer_class = sparse_layer_class


def _new_router(layer: nn.Module, ratio: float, pmod: PMoDConfig, hidden_size: int) -> PMoDRouter:
    ref = next(layer.parameters())
    router = PMoDRouter(hidden_size, bias=pmod.router_bias, zero_init=pmod.router_zero_init, ratio=ratio, pmod=pmod)
    return router.to(device=ref.device, dtype=ref.dtype)


def wrap_decoder_layer(layer: nn.Module, layer_idx: int, ratio: float, pmod: Optional[PMoDConfig], hidden_size: int) -> nn.Module:
    """A sparse layer that takes over ``layer``'s submodules (same tensors, same parameter names).

    ``pmod`` given: a p-MoD layer (a router at ``ratio``; an existing router keeps its weights and takes the new
    ratio and settings). ``pmod=None``: a layer without a router, that only reads the routing plan, for an in-LLM
    comparison method on a vanilla model or on a p-MoD model's ordinary layers (an existing router is kept).
    """
    if isinstance(layer, SparseLayerMixin):
        if pmod is not None and layer.router is None:  # a method layer becomes a p-MoD layer
            layer.router = _new_router(layer, ratio, pmod, hidden_size)
        elif pmod is not None:
            layer.router.ratio, layer.router.pmod = float(ratio), pmod
        return layer
    missing = [m for m in REQUIRED_SUBMODULES if not isinstance(getattr(layer, m, None), nn.Module)]
    if missing:
        raise TypeError(
            f"{type(layer).__name__} cannot be wrapped as a p-MoD layer: it lacks {missing}. Supported are "
            "pre-norm decoder layers with input_layernorm, self_attn, post_attention_layernorm and mlp "
            "(Llama/Vicuna, Mistral, Qwen2, Qwen2.5-VL)."
        )
    cls = sparse_layer_class(type(layer))
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for name, child in layer.named_children():
        new.add_module(name, child)
    for key, value in vars(layer).items():  # plain attributes (e.g. Qwen2's attention_type)
        if not key.startswith("_") and key not in new.__dict__:
            new.__dict__[key] = value
    new.train(layer.training)
    new._pmod_cache_arg = check_attention(layer.self_attn)  # 'cache' or 'past_key_values'; fails loudly
    new.layer_idx = layer_idx
    new.router = None if pmod is None else _new_router(layer, ratio, pmod, hidden_size)
    return new


def unwrap_method_layer(layer: nn.Module) -> nn.Module:
    """The plain HF layer back from a method-only sparse layer (no router); other layers unchanged."""
    if not isinstance(layer, SparseLayerMixin) or layer.router is not None:
        return layer
    base = type(layer).__mro__[2]
    old = base.__new__(base)
    nn.Module.__init__(old)
    for name, child in layer.named_children():
        old.add_module(name, child)
    for key, value in vars(layer).items():
        if not key.startswith("_") and key not in old.__dict__ and key != "router":
            old.__dict__[key] = value
    old.train(layer.training)
    return old
