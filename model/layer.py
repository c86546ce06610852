"""The p-MoD decoder layer and its KV-cache layer.

A p-MoD layer wraps an ordinary HF decoder layer (Llama / Vicuna, Mistral, Qwen2, ...): it takes over
that layer's own ``input_layernorm``, ``self_attn``, ``post_attention_layernorm`` and ``mlp``
(same modules, same parameter names) and adds a router ``Linear(d, 1)``.  Data flow of one layer
(METHOD.md, "One p-MoD layer")::

    x (B, N, d) ──router──> r (B, N) ──norm──> w = scale*act(r) + bias           (targets only)
        │                   top-k_b over the V_b vision tokens of each sample, k_b = trunc(V_b * rho)
        │       processed set P = selected vision tokens ∪ non-vision, non-padding tokens (order kept)
        ├─gather P──> xp (B, P, d), positions (B, P)   [rows left-padded with unused slots]
        │             h = xp + Attn(LN1(xp))            queries/keys/values from P only; RoPE at the
        │             u = MLP(LN2(h))                   tokens' original positions; causal in order
        │             out_P = h + w*u (selected vision) | h + u (text)
        └─scatter──> out (B, N, d); skipped vision tokens: w*x (STRing) or x (vanilla MoD)

Skipped tokens take no part in attention (as queries, keys or values) nor in the MLP.  In a batch
whose samples process different numbers of tokens the gathered rows are left-padded; a padding slot
holds some unprocessed position, is masked out of every other query's keys, and its output is
discarded.  The layer's KV cache stores only ``P`` (see :class:`~pmod_bench.model.cache.PMoDCache`).

What a layer reads comes from the forward's :class:`~pmod_bench.model.plan.RoutingPlan` (vision
mask, per-layer shapes, the cache), never from HF's keyword-argument names; it touches HF only
through its four submodules and the cache's ``update`` (see :mod:`pmod_bench.model.compat`).
Ranking is deterministic: ties in the router weights (zero routers; bf16 TanhNorm saturation) are
broken by position, the earlier token first, so the kept set does not depend on batch
composition, padding or device.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from torch import nn

from .compat import check_attention, contract_error
from .config import PMoDConfig
from .plan import RoutingPlan, num_selected

REQUIRED_SUBMODULES = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
#: HF keyword arguments a p-MoD layer must not forward to the attention module (it passes its own)
_NOT_FORWARDED = frozenset({"cache", "past_key_values", "use_cache", "position_ids", "cache_position", "attention_mask", "position_embeddings"})


class PMoDRouter(nn.Linear):
    """r = W_r x + b_r, a Linear(d, 1); zero-initialised by default (w = 1: the LLM is intact)."""

    def __init__(self, hidden_size: int, bias: bool = True, zero_init: bool = True) -> None:
        super().__init__(hidden_size, 1, bias=bias)
        self.zero_init = zero_init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if getattr(self, "zero_init", False):
            nn.init.zeros_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)
        else:
            super().reset_parameters()


# ---------------------------------------------------------------------------------------------- masks
def build_attention_mask(
    implementation: str,
    query_valid: Optional[torch.Tensor],
    past_valid: Optional[torch.Tensor],
    past_len: int,
    q_len: int,
    batch: int,
    dtype: torch.dtype,
    device: torch.device,
):
    """Mask for ``q_len`` gathered queries attending to ``past_len`` cached + ``q_len`` new keys.

    Keys visible to query i: real entries j <= past_len + i (causal in original order, since the
    gathered order is the original order).  A padding query slot sees only itself, so no row of the
    softmax is empty (no NaN, no NaN gradients); its output is discarded.
    Returns None where the kernel's own causal handling is exact (no padding, and no cache or a
    single query), which keeps sdpa / flash-attention on their fastest path.
    """
    flash = "flash" in implementation
    if query_valid is None and past_valid is None:
        if past_len == 0 or q_len == 1:
            if implementation != "eager" or q_len == 1:
                return None
        if flash:
            return None  # flash-attention aligns the causal mask bottom-right: exact with a full cache
    k_len = past_len + q_len
    ones = lambda n: torch.ones(batch, n, dtype=torch.bool, device=device)  # noqa: E731
    key_valid = torch.cat(
        [past_valid if past_valid is not None else ones(past_len), query_valid if query_valid is not None else ones(q_len)],
        dim=1,
    )  # (B, K)
    if flash:
        return key_valid.to(torch.int32)
    qi = torch.arange(q_len, device=device)[:, None] + past_len  # (q, 1) absolute slot of each query
    kj = torch.arange(k_len, device=device)[None, :]  # (1, K)
    allowed = key_valid[:, None, :] & (kj <= qi)[None]  # (B, q, K)
    allowed = allowed | (kj == qi)[None]  # every query sees itself
    allowed = allowed[:, None]  # (B, 1, q, K)
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


# ---------------------------------------------------------------------------------------------- layer
class PMoDLayerMixin:
    """p-MoD behaviour, mixed into a subclass of the wrapped HF decoder layer's class.

    Use :func:`wrap_decoder_layer`; the instance reuses the original layer's submodules (no copies,
    no re-initialisation), so parameter names are unchanged plus ``router.weight`` / ``router.bias``.
    Being an instance of the wrapped class keeps HF's output capturing (``output_hidden_states``)
    and gradient checkpointing working.
    """

    layer_idx: int
    ratio: float
    pmod: PMoDConfig

    def _init_pmod(self, layer_idx: int, ratio: float, pmod: PMoDConfig, hidden_size: int) -> None:
        self.layer_idx = layer_idx
        self.ratio = float(ratio)
        self.pmod = pmod
        self.router = PMoDRouter(hidden_size, bias=pmod.router_bias, zero_init=pmod.router_zero_init)

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, ratio={self.ratio:.4f}, weight_norm={self.pmod.weight_norm}, string={self.pmod.string}"

    # ---------------------------------------------------------------------------------------
    def _weights(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
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

    def _flag(self, plan: RoutingPlan, name: str, t: torch.Tensor) -> None:
        plan.flag(self.layer_idx, name, t, self.ratio, f"weight_norm {self.pmod.weight_norm} scale {self.pmod.norm_scale}")

    def forward(  # one linear data flow, commented step by step
        self,
        hidden_states: torch.Tensor,
        *args: Any,
        pmod_plan: Optional[RoutingPlan] = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        plan = pmod_plan
        if plan is None:
            raise contract_error(
                f"p-MoD layer {self.layer_idx} ran without its routing plan: the model's keyword arguments no longer "
                "reach the decoder layers, or the layer was called outside a p-MoD model's forward"
            )
        position_embeddings = kwargs.get("position_embeddings")
        if position_embeddings is None:
            raise contract_error(f"p-MoD layer {self.layer_idx} received no position_embeddings (RoPE cos, sin)")
        x = hidden_states  # (B, N, d)
        B, N, d = x.shape
        lp = plan.layer(self.layer_idx, self.ratio)  # static shapes, host integers
        target = plan.target  # (B, N) bool or None (no vision tokens in this input)

        # 1-3. route: rank each sample's vision tokens by w, keep the first k_b ----------------------
        selected = w = None
        if target is not None:
            logits = self.router(x).squeeze(-1)  # (B, N)
            self._flag(plan, "router logits", logits)
            w = self._weights(logits, target)  # (B, N)
            # rank by the normalised weight in the model's dtype, as the reference; a stable sort breaks
            # ties by position (earlier first), so the kept set does not depend on the batch
            scores = w.detach().float().masked_fill(~target, float("-inf"))
            ranked = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, : lp.k_max]  # (B, k_max)
            k = num_selected(plan.num_targets, self.ratio)  # (B,) on the device, no transfer
            keep = torch.arange(lp.k_max, device=x.device)[None, :] < k[:, None]  # (B, k_max)
            selected = torch.zeros(B, N, dtype=torch.bool, device=x.device).scatter(1, ranked, keep)
            processed = selected | plan.nontarget  # (B, N)
            if plan.record is not None:
                plan.record[self.layer_idx] = {"selected": selected.detach().cpu(), "target": target.cpu()}
        else:
            processed = plan.tokens  # None = every position

        # 4a. gather the processed set P (order and positions kept) --------------------------------
        cos, sin = position_embeddings  # (1 or B, N, hd)
        order = valid = None
        if lp.full:
            xp = x
        else:
            P = lp.processed
            # a stable sort puts unprocessed positions first and processed ones last in original order:
            # the last P columns are each row's processed positions, left-padded with unprocessed ones
            order = torch.argsort(processed.to(torch.int8), dim=1, stable=True)[:, N - P :]  # (B, P)
            if lp.padded:
                valid = processed.gather(1, order)  # (B, P); False = padding slot
            xp = x.gather(1, order[..., None].expand(B, P, d))  # (B, P, d)
            idx = order[..., None].expand(B, P, cos.shape[-1])
            cos = cos.expand(B, -1, -1).gather(1, idx)  # (B, P, hd): RoPE at the original positions
            sin = sin.expand(B, -1, -1).gather(1, idx)

        # 4b. attention mask over [this layer's cache | P] ------------------------------------------
        q_len = xp.shape[1]
        past_len, past_valid = 0, None
        if plan.cache is not None:
            cache_layer = plan.cache.pmod_layer(self.layer_idx)
            past_len, past_valid = cache_layer.stored_tokens, cache_layer.valid
            cache_layer.record_step(valid, q_len, N, B, x.device)
        mask = build_attention_mask(
            self.self_attn.config._attn_implementation or "sdpa", valid, past_valid, past_len, q_len, B, x.dtype, x.device
        )

        # 4c. the wrapped layer's own modules, on P only ------------------------------------------
        # No position_ids: RoPE comes in (cos, sin), and gathered ids would look like packed sequences
        # to flash-attention's varlen heuristic.
        extra = {k: v for k, v in kwargs.items() if k not in _NOT_FORWARDED and v is not plan.cache}
        residual = xp
        h = self.input_layernorm(xp)
        h, _ = self.self_attn(
            hidden_states=h,
            attention_mask=mask,
            position_embeddings=(cos, sin),
            **{self._pmod_cache_arg: plan.cache},
            **extra,
        )
        h = residual + h  # (B, P, d)
        u = self.mlp(self.post_attention_layernorm(h))  # (B, P, d)
        self._flag(plan, "attention output", h)
        self._flag(plan, "mlp output", u)

        # 4d-5. weight and scatter back -------------------------------------------------------------
        if selected is None:  # no vision tokens in this input (text-only prompt or a decode step)
            out_p = h + u
            base = x
        else:
            gate = torch.where(target, w, torch.ones_like(w))  # (B, N): w on vision tokens, 1 on text
            base = x * gate[..., None] if self.pmod.string else x  # skipped: w*x (STRing) or x
            gate_p = gate if order is None else gate.gather(1, order)
            out_p = h + gate_p[..., None] * u
        if order is None:
            out = out_p
        else:
            idx = order[..., None].expand(B, order.shape[1], d)
            if valid is not None:  # padding slots write back the value the position already has
                out_p = torch.where(valid[..., None], out_p, base.gather(1, idx))
            out = base.scatter(1, idx, out_p)  # (B, N, d)
        self._flag(plan, "layer output", out)
        return out


@functools.lru_cache(maxsize=None)
def pmod_layer_class(base: type) -> type:
    """``PMoD<Base>``: a subclass of an HF decoder-layer class with p-MoD routing."""
    return type(f"PMoD{base.__name__}", (PMoDLayerMixin, base), {"__module__": __name__})


def wrap_decoder_layer(layer: nn.Module, layer_idx: int, ratio: float, pmod: PMoDConfig, hidden_size: int) -> nn.Module:
    """A p-MoD layer that takes over ``layer``'s submodules (same tensors, same parameter names)."""
    if isinstance(layer, PMoDLayerMixin):
        layer.ratio = float(ratio)
        layer.pmod = pmod
        return layer
    missing = [m for m in REQUIRED_SUBMODULES if not isinstance(getattr(layer, m, None), nn.Module)]
    if missing:
        raise TypeError(
            f"{type(layer).__name__} cannot be wrapped as a p-MoD layer: it lacks {missing}. Supported are "
            "pre-norm decoder layers with input_layernorm, self_attn, post_attention_layernorm and mlp "
            "(Llama/Vicuna, Mistral, Qwen2)."
        )
    cls = pmod_layer_class(type(layer))
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for name, child in layer.named_children():
        new.add_module(name, child)
    for key, value in vars(layer).items():  # plain attributes (e.g. Qwen2's attention_type)
        if not key.startswith("_") and key not in new.__dict__:
            new.__dict__[key] = value
    new.train(layer.training)
    ref = next(layer.parameters())
    new._pmod_cache_arg = check_attention(layer.self_attn)  # 'cache' or 'past_key_values'; fails loudly
    new._init_pmod(layer_idx, ratio, pmod, hidden_size)
    new.router.to(device=ref.device, dtype=ref.dtype)
    return new

