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

import contextlib
import functools
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .compat import check_attention, check_attention_rows, contract_error
from .config import PMoDConfig
from .plan import RoutingPlan, num_selected
from .rope import apply_rope

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

    def _init_pmod(self, layer_idx: int, ratio: float, pmod: Optional[PMoDConfig], hidden_size: int) -> None:
        self.layer_idx = layer_idx
        self.ratio = float(ratio)
        self.pmod = pmod
        # pmod None: a layer wrapped only so that an in-LLM comparison method can hand it its token set
        # (no router, no parameters added: it processes every vision token the method left)
        self.router = None if pmod is None else PMoDRouter(hidden_size, bias=pmod.router_bias, zero_init=pmod.router_zero_init)

    def extra_repr(self) -> str:
        if self.pmod is None:
            return f"layer_idx={self.layer_idx}, method layer (no router)"
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
        if not plan.guard or self.pmod is None:
            return
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
        method = plan.method  # an in-LLM comparison method's state (FastV, PyramidDrop, ...) or None
        if method is not None:  # a method may decide here from this layer's own projections (PyramidDrop)
            hidden_states = method.before_layer(self, plan, hidden_states, kwargs)
        x = hidden_states  # (B, N, d)
        B, N, d = x.shape
        toks = plan.layer_tokens(self.layer_idx)  # the vision tokens present at this layer (a method may have dropped some)
        lp = plan.layer(self.layer_idx, self.ratio)  # static shapes, host integers
        target = toks.target  # (B, N) bool or None (no vision tokens in this input)
        cache_layer = plan.cache.pmod_layer(self.layer_idx) if plan.cache is not None else None

        # 1-3. route: rank each sample's vision tokens by w, keep the first k_b ----------------------
        selected = w = None
        if target is not None and self.router is None:  # a method-only layer: every present vision token
            selected = target
            processed = target | plan.nontarget  # (B, N)
        elif target is not None:
            logits = self.router(x).squeeze(-1)  # (B, N)
            self._flag(plan, "router logits", logits)
            w = self._weights(logits, target)  # (B, N)
            # rank by the normalised weight in the model's dtype, as the reference; a stable sort breaks
            # ties by position (earlier first), so the kept set does not depend on the batch
            scores = w.detach().float().masked_fill(~target, float("-inf"))
            ranked = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, : lp.k_max]  # (B, k_max)
            k = num_selected(toks.num_targets, self.ratio)  # (B,) on the device, no transfer
            keep = torch.arange(lp.k_max, device=x.device)[None, :] < k[:, None]  # (B, k_max)
            selected = torch.zeros(B, N, dtype=torch.bool, device=x.device).scatter(1, ranked, keep)
            processed = selected | plan.nontarget  # (B, N)
            if plan.record is not None:
                plan.record[self.layer_idx] = {"selected": selected.detach().cpu(), "target": target.cpu()}
        else:
            processed = plan.tokens  # None = every position

        # RoPE positions: the original ones, or renumbered by a method (position id - shift); a later
        # forward (decode) continues with the shift its cache layer stored
        cos, sin = position_embeddings  # (1 or B, N, hd)
        shift = toks.shift
        if shift is None and cache_layer is not None and cache_layer.position_shift is not None:
            shift = cache_layer.position_shift[:, None]  # (B, 1)
        if shift is not None:
            position_ids = kwargs.get("position_ids")
            if position_ids is None or plan.rotary is None:
                raise contract_error(f"layer {self.layer_idx} renumbers positions but received no position_ids / rotary embedding")
            cos, sin = plan.rotary(x, (position_ids - shift).clamp(min=0))  # (B, N, hd)

        # 4a. gather the processed set P (order and positions kept) --------------------------------
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
        if cache_layer is not None:
            past_len, past_valid = cache_layer.stored_tokens, cache_layer.valid
            cache_layer.record_step(valid, q_len, N, B, x.device)
            if toks.final_shift is not None:
                cache_layer.position_shift = toks.final_shift
        mask = build_attention_mask(
            self.self_attn.config._attn_implementation or "sdpa", valid, past_valid, past_len, q_len, B, x.dtype, x.device
        )

        # 4c. the wrapped layer's own modules, on P only ------------------------------------------
        # No position_ids: RoPE comes in (cos, sin), and gathered ids would look like packed sequences
        # to flash-attention's varlen heuristic.
        extra = {k: v for k, v in kwargs.items() if k not in _NOT_FORWARDED and v is not plan.cache}
        queries = method.queries(plan, self.layer_idx) if method is not None else None
        residual = xp
        h = self.input_layernorm(xp)
        with capture_qk(self.self_attn, queries is not None) as qk:  # the layer's own q/k projections (hooks)
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
        scores = None
        if queries is not None:  # the attention rows a method ranks by, from this layer's own q and k
            past = cache_layer.keys[:, :, :past_len] if cache_layer is not None and past_len else None
            scores = query_attention(self.self_attn, qk["q"], qk["k"], (cos, sin), order, valid, N, queries[0], queries[1],
                                     past, past_valid)

        # 4d-5. weight and scatter back -------------------------------------------------------------
        if w is None:  # no vision tokens (text-only prompt, decode step) or a method-only layer
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
        if method is not None:  # a method may decide here for the later layers (FastV, SparseVLM, iLLaVA)
            out = method.after_layer(self, plan, out, scores)
        return out


    # ----------------------------------------------------------------------- for in-LLM methods
    def probe_attention(self, plan: RoutingPlan, x: torch.Tensor, queries: tuple[torch.Tensor, torch.Tensor],
                        kwargs: dict) -> torch.Tensor:
        """This layer's attention rows for ``queries`` over the tokens present now, computed from its own
        ``input_layernorm`` and q/k projections *before* it runs (PyramidDrop ranks this way), (B, N) float32.

        Only the query rows are projected to queries; keys for every present token (the method's extra
        work, counted in its FLOPs). RoPE at the positions this layer would use.
        """
        toks = plan.layer_tokens(self.layer_idx)
        B, N, d = x.shape
        present = plan.tokens if toks.target is None else (toks.target | plan.nontarget)
        counts = [v + t for v, t in zip(toks.V, plan.T)] if toks.target is not None else list(plan.R)
        P = max(counts)
        cos, sin = kwargs["position_embeddings"]
        shift = toks.shift
        if shift is not None:
            cos, sin = plan.rotary(x, (kwargs["position_ids"] - shift).clamp(min=0))
        order = valid = None
        if P < N or any(c != P for c in counts):
            order = torch.argsort(present.to(torch.int8), dim=1, stable=True)[:, N - P:]  # (B, P) present, in order
            valid = present.gather(1, order) if any(c != P for c in counts) else None
            xp = x.gather(1, order[..., None].expand(B, P, d))
            idx = order[..., None].expand(B, P, cos.shape[-1])
            cos, sin = cos.expand(B, -1, -1).gather(1, idx), sin.expand(B, -1, -1).gather(1, idx)
        else:
            xp = x
        h = self.input_layernorm(xp)  # (B, P, d)
        qpos, qw = queries
        slot = _slots(order, qpos, N)  # (B, R) slot of each query in the gathered rows
        hq = h.gather(1, slot[..., None].expand(-1, -1, d))  # (B, R, d): only the query rows are projected
        k = self.self_attn.k_proj(h)  # (B, P, kv)
        q = self.self_attn.q_proj(hq)  # (B, R, q)
        return query_attention(self.self_attn, q, k, (cos, sin), order, valid, N, qpos, qw, None, None, q_slot=slot)


def _slots(order: Optional[torch.Tensor], positions: torch.Tensor, N: int) -> torch.Tensor:
    """Slots in the gathered rows of original ``positions`` (B, R); order None = no gather."""
    if order is None:
        return positions
    B, P = order.shape
    inv = torch.zeros(B, N, dtype=torch.long, device=order.device)
    inv.scatter_(1, order, torch.arange(P, device=order.device).expand(B, P))
    return inv.gather(1, positions)


@contextlib.contextmanager
def capture_qk(attn: nn.Module, active: bool) -> Iterator[dict]:
    """Forward hooks on ``attn.q_proj`` / ``attn.k_proj`` for one call: the layer's own projections
    (B, P, q) / (B, P, kv), before RoPE (PyTorch's public hook API; nothing is patched)."""
    got: dict = {}
    if not active:
        yield got
        return
    handles = [getattr(attn, name).register_forward_hook(lambda _m, _i, out, key=key: got.__setitem__(key, out))
               for key, name in (("q", "q_proj"), ("k", "k_proj"))]
    try:
        yield got
    finally:
        for hd in handles:
            hd.remove()
    if "q" not in got or "k" not in got:
        raise contract_error(f"{type(attn).__name__} did not call q_proj / k_proj on its input")


def query_attention(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, rope: tuple, order: Optional[torch.Tensor],
                    valid: Optional[torch.Tensor], N: int, qpos: torch.Tensor, qw: torch.Tensor,
                    past: Optional[torch.Tensor], past_valid: Optional[torch.Tensor],
                    q_slot: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``score[b, n] = sum_r qw[b, r] * mean_heads softmax(q_r · K^T * scaling)[n]`` over this input's keys.

    The attention the official FastV / PyramidDrop / SparseVLM / iLLaVA code reads from HF's eager
    ``output_attentions`` (softmax of the scaled, causally masked scores, averaged over heads),
    computed for the ``R`` query rows only, from the layer's own projections::

        q (B, P or R, H*hd), k (B, P, Hkv*hd)  ->  RoPE (model/rope.py, the module's own convention)
        rows (B, H, R, S+P) = softmax over [cached keys (S) | keys of this input (P)], causal in order
        mean over heads, sum over rows with qw  ->  (B, P)  ->  scattered to positions (B, N)

    Softmax in float32 (HF eager upcasts too; it casts back to the model dtype, we do not). Keys a
    query cannot see (later positions, padding slots) get probability 0.
    """
    check_attention_rows(attn)
    hd = attn.head_dim
    B, P = k.shape[0], k.shape[1]
    cos, sin = rope
    cos, sin = cos.expand(B, -1, -1), sin.expand(B, -1, -1)  # (B, P, hd); no gather: P = N
    slot = q_slot if q_slot is not None else _slots(order, qpos, N)  # (B, R)
    R = slot.shape[1]
    if q.shape[1] != R:  # the layer's full q (B, P, H*hd): take the query rows
        q = q.gather(1, slot[..., None].expand(-1, -1, q.shape[-1]))
    qc = cos.gather(1, slot[..., None].expand(-1, -1, cos.shape[-1]))
    qs = sin.gather(1, slot[..., None].expand(-1, -1, sin.shape[-1]))
    q = q.view(B, R, -1, hd).transpose(1, 2)  # (B, H, R, hd)
    k = k.view(B, P, -1, hd).transpose(1, 2)  # (B, Hkv, P, hd)
    q = apply_rope(q, qc, qs)
    k = apply_rope(k, cos, sin)
    keys = k if past is None else torch.cat([past.to(k.dtype), k], dim=2)  # (B, Hkv, S+P, hd)
    S = keys.shape[2] - P
    groups = q.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(groups, dim=1) if groups > 1 else keys  # (B, H, S+P, hd), as HF's repeat_kv
    logits = torch.matmul(q.float(), keys.float().transpose(2, 3)) * attn.scaling  # (B, H, R, S+P)
    cur = torch.arange(P, device=k.device)[None, None, :] <= slot[:, :, None]  # (B, R, P) causal in order
    if valid is not None:
        cur = cur & valid[:, None, :]
    cur = cur | (torch.arange(P, device=k.device)[None, None, :] == slot[:, :, None])  # a row always sees itself (no NaN)
    seen = cur if S == 0 else torch.cat(
        [(past_valid if past_valid is not None else torch.ones(B, S, dtype=torch.bool, device=k.device))[:, None, :].expand(B, R, S), cur], 2)
    probs = torch.softmax(logits.masked_fill(~seen[:, None], float("-inf")), dim=-1).mean(1)[:, :, S:]  # (B, R, P)
    rows = (probs * qw.float()[..., None]).sum(1)  # (B, P)
    if order is None:
        return rows
    if valid is not None:
        rows = rows * valid
    return torch.zeros(B, N, dtype=rows.dtype, device=rows.device).scatter(1, order, rows)


@functools.lru_cache(maxsize=None)
def pmod_layer_class(base: type) -> type:
    """``PMoD<Base>``: a subclass of an HF decoder-layer class with p-MoD routing."""
    return type(f"PMoD{base.__name__}", (PMoDLayerMixin, base), {"__module__": __name__})


def wrap_decoder_layer(layer: nn.Module, layer_idx: int, ratio: float, pmod: Optional[PMoDConfig], hidden_size: int) -> nn.Module:
    """A p-MoD layer that takes over ``layer``'s submodules (same tensors, same parameter names).

    ``pmod=None`` (ratio 1): a layer without a router, that only reads the routing plan, for an in-LLM
    comparison method on a vanilla model or on a p-MoD model's ordinary layers.
    """
    if isinstance(layer, PMoDLayerMixin):
        if pmod is not None and layer.router is None:  # a method layer becomes a p-MoD layer
            ref = next(layer.parameters())
            layer.router = PMoDRouter(hidden_size, bias=pmod.router_bias, zero_init=pmod.router_zero_init).to(ref.device, ref.dtype)
        if pmod is not None or layer.router is None:
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
    if new.router is not None:
        new.router.to(device=ref.device, dtype=ref.dtype)
    return new


def unwrap_method_layer(layer: nn.Module) -> nn.Module:
    """The plain HF layer back from a method-only wrapped layer (no router); other layers unchanged."""
    if not isinstance(layer, PMoDLayerMixin) or layer.router is not None:
        return layer
    base = type(layer).__mro__[2]
    old = base.__new__(base)
    nn.Module.__init__(old)
    for name, child in layer.named_children():
        old.add_module(name, child)
    for key, value in vars(layer).items():
        if not key.startswith("_") and key not in old.__dict__ and key not in ("ratio", "pmod", "router"):
            old.__dict__[key] = value
    old.train(layer.training)
    return old

