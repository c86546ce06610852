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

Skipped tokens take no part in attention (as queries, keys or values) nor in the MLP: they are not
in the gathered tensor at all.  The layer's KV cache stores only ``P`` (see :class:`PMoDCacheLayer`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .config import PMoDConfig

REQUIRED_SUBMODULES = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


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


class PMoDOverflowError(FloatingPointError):
    """A NaN or Inf appeared in a p-MoD layer (the paper's OVERFLOW rows)."""


@dataclass
class PMoDInputs:
    """Routing inputs of one forward pass, handed to every layer through the HF ``**kwargs`` path."""

    target_mask: Optional[torch.Tensor]
    """(B, N) bool: positions holding an image feature (vision tokens incl. LLaVA-NeXT newlines)."""
    token_mask: Optional[torch.Tensor]
    """(B, N) bool: non-padding positions of the current input (None = all)."""
    record: Optional[dict] = None
    """Introspection sink: layer index -> {"selected": (B, N) bool, "target": (B, N) bool}."""


def num_selected(num_targets: torch.Tensor, ratio: float) -> torch.Tensor:
    """k_b = trunc(V_b * rho), computed in float32 exactly as the reference implementation does."""
    return torch.trunc(num_targets.to(torch.float32) * torch.tensor(ratio, dtype=torch.float32)).long()


# --------------------------------------------------------------------------------------------- cache
class PMoDCacheLayer(DynamicLayer):
    """KV cache of one p-MoD layer: keys/values of the processed tokens only.

    Its length differs from layer to layer.  ``get_seq_length()`` reports how many tokens of the full
    sequence went through the layer (what HF uses for position ids and the model-level mask), while
    :attr:`stored_tokens` is how many key/value entries are actually held.  Samples of a batch keep
    different numbers of tokens, so rows are left-padded; ``valid`` (B, S) marks the real entries.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.valid: Optional[torch.Tensor] = None  # None = every stored entry is real
        self.seen_tokens = 0

    # bookkeeping ---------------------------------------------------------------------------
    @property
    def stored_tokens(self) -> int:
        return 0 if not self.is_initialized or self.keys is None or self.keys.numel() == 0 else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def record_step(self, valid: Optional[torch.Tensor], new_entries: int, new_tokens: int, batch: int, device) -> None:
        """Note ``new_entries`` stored slots (validity ``valid``) for ``new_tokens`` sequence tokens."""
        past = self.stored_tokens
        if valid is not None or self.valid is not None:
            old = self.valid if self.valid is not None else torch.ones(batch, past, dtype=torch.bool, device=device)
            new = valid if valid is not None else torch.ones(batch, new_entries, dtype=torch.bool, device=device)
            self.valid = torch.cat([old, new], dim=1)
        self.seen_tokens += new_tokens

    # batch manipulation used by generate(): keep `valid` aligned with keys/values ------------
    def reset(self) -> None:
        super().reset()
        self.valid = None
        self.seen_tokens = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.valid is not None:
            self.valid = self.valid.index_select(0, beam_idx.to(self.valid.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.valid is not None:
            self.valid = self.valid.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.valid is not None:
            self.valid = self.valid[indices]

    def crop(self, tokens_to_remove: int) -> None:
        # Only decoded (always processed) tokens are ever cropped, so slots == tokens here.
        super().crop(tokens_to_remove)
        n = abs(tokens_to_remove)
        if n and self.valid is not None:
            self.valid = self.valid[:, :-n]
        self.seen_tokens = max(self.seen_tokens - n, 0)


def pmod_cache_layer(cache: Cache, layer_idx: int) -> PMoDCacheLayer:
    """The :class:`PMoDCacheLayer` of ``layer_idx`` in an HF dynamic cache (converting an empty one)."""
    if not isinstance(cache, DynamicCache):
        raise TypeError(
            f"p-MoD layers keep variable-length per-layer KV caches and need a DynamicCache, got {type(cache).__name__}. "
            "Use the default cache (generate(..., cache_implementation=None) or 'dynamic')."
        )
    layers = cache.layers
    while len(layers) <= layer_idx:
        layers.append(DynamicLayer())
    current = layers[layer_idx]
    if isinstance(current, PMoDCacheLayer):
        return current
    if getattr(current, "is_sliding", False):
        raise NotImplementedError(
            f"layer {layer_idx} uses sliding-window attention; p-MoD layers need full attention "
            "(set text_config.sliding_window=None / use_sliding_window=False)."
        )
    if current.get_seq_length() > 0:
        raise ValueError(
            f"the KV cache of layer {layer_idx} was filled by a model in which that layer is not a p-MoD layer; "
            "start generation with a fresh cache after changing the p-MoD ratios."
        )
    layers[layer_idx] = fresh = PMoDCacheLayer()
    return fresh


def kv_cache_entries(cache: Cache) -> list[int]:
    """Stored KV entries per layer of an HF dynamic cache, summed over the batch. A p-MoD layer's
    batch-alignment slots are excluded; ordinary layers hold every position of the input, left
    padding included, as in HF."""
    out = []
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is None or keys.numel() == 0:
            out.append(0)
            continue
        valid = getattr(layer, "valid", None)
        out.append(int(valid.sum()) if valid is not None else keys.shape[0] * keys.shape[-2])
    return out


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

    def _guard(self, name: str, t: torch.Tensor) -> None:
        if not torch.isfinite(t).all():
            kind = "NaN" if torch.isnan(t).any() else "Inf"
            raise PMoDOverflowError(
                f"OVERFLOW: {kind} in p-MoD layer {self.layer_idx} ({name}, shape {tuple(t.shape)}, ratio {self.ratio:.3f}, "
                f"weight_norm {self.pmod.weight_norm} scale {self.pmod.norm_scale}). Lower the learning rate, use "
                "TanhNorm with a small alpha (0.2), or bf16 instead of fp16."
            )

    def forward(  # noqa: C901  (one linear data flow, commented step by step)
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        use_cache: Optional[bool] = False,
        position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        pmod_inputs: Optional[PMoDInputs] = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        x = hidden_states  # (B, N, d)
        B, N, d = x.shape
        guard = self.pmod.overflow_guard
        target = pmod_inputs.target_mask if pmod_inputs is not None else None  # (B, N) bool
        tokens = pmod_inputs.token_mask if pmod_inputs is not None else None  # (B, N) bool
        if target is not None and not target.any():
            target = None

        # 1-3. route: choose the top-k_b vision tokens of each sample ----------------------------
        selected = w = None
        if target is not None:
            logits = self.router(x).squeeze(-1)  # (B, N)
            if guard:
                self._guard("router logits", logits)
            w = self._weights(logits, target)  # (B, N)
            k = num_selected(target.sum(dim=1), self.ratio)  # (B,)
            k_max = int(k.max())
            # rank by the normalised weight in the model's dtype, as the reference does (same order as
            # the logits, and the same ties where tanh saturates in bf16)
            scores = w.detach().float().masked_fill(~target, float("-inf"))
            top = scores.topk(k_max, dim=1).indices  # (B, k_max)
            keep = torch.arange(k_max, device=x.device)[None, :] < k[:, None]  # (B, k_max)
            selected = torch.zeros(B, N, dtype=torch.bool, device=x.device).scatter(1, top, keep)
            nontarget = ~target if tokens is None else (~target & tokens)
            processed = selected | nontarget  # (B, N)
            if pmod_inputs.record is not None:
                pmod_inputs.record[self.layer_idx] = {"selected": selected.detach().cpu(), "target": target.cpu()}
        else:
            processed = tokens

        # 4a. gather the processed set P (order and positions kept) ------------------------------
        cos, sin = position_embeddings
        if processed is None or bool(processed.all()):
            order = valid = None
            xp, pos_p = x, position_ids
        else:
            counts = processed.sum(dim=1)  # (B,)
            P = int(counts.max())
            # stable sort puts unprocessed positions first, processed ones last in original order:
            # the last P columns are each row's processed positions, left-padded with unused ones
            order = torch.argsort(processed.to(torch.int8), dim=1, stable=True)[:, N - P :]  # (B, P)
            valid = processed.gather(1, order)  # (B, P) False = padding slot
            if bool(valid.all()):
                valid = None
            xp = x.gather(1, order[..., None].expand(B, P, d))  # (B, P, d)
            hd = cos.shape[-1]
            idx = order[..., None].expand(B, P, hd)
            cos = cos.expand(B, -1, -1).gather(1, idx)  # (B, P, hd)
            sin = sin.expand(B, -1, -1).gather(1, idx)
            pos_p = position_ids.expand(B, -1).gather(1, order) if position_ids is not None and position_ids.dim() == 2 else None

        # 4b. attention mask over [this layer's cache | P] ----------------------------------------
        q_len = xp.shape[1]
        past_len, past_valid = 0, None
        cache_layer = None
        if past_key_values is not None and use_cache is not False:
            cache_layer = pmod_cache_layer(past_key_values, self.layer_idx)
            past_len, past_valid = cache_layer.stored_tokens, cache_layer.valid
            cache_layer.record_step(valid, q_len, N, B, x.device)
        else:
            past_key_values = None
        mask = build_attention_mask(
            self.self_attn.config._attn_implementation or "sdpa", valid, past_valid, past_len, q_len, B, x.dtype, x.device
        )

        # 4c. the wrapped layer's own modules, on P only ----------------------------------------
        residual = xp
        h = self.input_layernorm(xp)
        h, _ = self.self_attn(
            hidden_states=h,
            attention_mask=mask,
            position_ids=pos_p,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=(cos, sin),
            **kwargs,
        )
        h = residual + h  # (B, P, d)
        u = self.mlp(self.post_attention_layernorm(h))  # (B, P, d)
        if guard:
            self._guard("attention output", h)
            self._guard("mlp output", u)

        # 4d-5. weight and scatter back -----------------------------------------------------------
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
        if guard:
            self._guard("layer output", out)
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
    new._init_pmod(layer_idx, ratio, pmod, hidden_size)
    new.router.to(device=ref.device, dtype=ref.dtype)
    return new

