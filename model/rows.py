"""The gathered rows of a sparse layer, its attention mask, and the one attention-row routine.

:class:`Rows` is the processed set ``P`` of one layer in one forward: which positions are gathered
(in their original order), which gathered slots are padding, and the scatter back::

    processed (B, N) bool ──stable argsort──> order (B, P): each row's processed positions, in order,
                                              left-padded with unprocessed ones (valid (B, P) = False)
    x (B, N, d) ──take──> xp (B, P, d)        cos/sin (B, N, hd) ──take──> (B, P, hd)
    out_P (B, P, d) ──scatter──> out (B, N, d)  (padding slots write back what the position already holds)

:func:`attention_rows` recomputes attention rows from a layer's own q/k projections (what FastV,
PyramidDrop, SparseVLM and iLLaVA rank by); :func:`probe_attention` does it *before* the layer runs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from .compat import check_attention_rows, contract_error
from .rope import apply_rope


# ----------------------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Rows:
    """The processed set of one layer: ``order`` (B, P) long, None = every position (no gather); ``valid``
    (B, P) bool, None = no padding slot."""

    order: Optional[torch.Tensor]
    valid: Optional[torch.Tensor]
    N: int

    @classmethod
    def of(cls, processed: Optional[torch.Tensor], P: int, N: int, full: bool, padded: bool) -> "Rows":
        """The rows of ``processed`` (B, N) bool, whose rows hold at most ``P`` positions (host shapes)."""
        if full:
            return cls(None, None, N)
        # a stable sort puts unprocessed positions first and processed ones last in original order:
        # the last P columns are each row's processed positions, left-padded with unprocessed ones
        order = torch.argsort(processed.to(torch.int8), dim=1, stable=True)[:, N - P:]  # (B, P)
        return cls(order, processed.gather(1, order) if padded else None, N)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, c) -> (B, P, c); a (1, N, c) tensor (RoPE shared by the batch) is expanded first."""
        if self.order is None:
            return x
        B, P = self.order.shape
        return x.expand(B, -1, -1).gather(1, self.order[..., None].expand(B, P, x.shape[-1]))

    def slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Slots in the gathered rows of original ``positions`` (B, R)."""
        if self.order is None:
            return positions
        B, P = self.order.shape
        inv = torch.zeros(B, self.N, dtype=torch.long, device=self.order.device)
        inv.scatter_(1, self.order, torch.arange(P, device=self.order.device).expand(B, P))
        return inv.gather(1, positions)

    def scatter(self, x: torch.Tensor, h: torch.Tensor, u: torch.Tensor, gate: Optional[torch.Tensor],
                gate_skipped: bool) -> torch.Tensor:
        """out = h + gate*u on the processed positions (gate (B, N), None = 1), scattered into x (B, N, d); skipped
        positions keep x, or gate*x with ``gate_skipped`` (p-MoD's STRing)."""
        if gate is None:
            out_p, base = h + u, x
        else:
            base = x * gate[..., None] if gate_skipped else x
            out_p = h + self.take(gate[..., None]) * u
        if self.order is None:
            return out_p
        idx = self.order[..., None].expand(-1, -1, x.shape[-1])  # (B, P, d)
        if self.valid is not None:  # padding slots write back the value the position already has
            out_p = torch.where(self.valid[..., None], out_p, base.gather(1, idx))
        return base.scatter(1, idx, out_p)  # (B, N, d)


# ----------------------------------------------------------------------------------------- mask
def build_attention_mask(implementation: str, query_valid: Optional[torch.Tensor], past_valid: Optional[torch.Tensor],
                         past_len: int, q_len: int, batch: int, dtype: torch.dtype, device: torch.device):
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
    key_valid = torch.cat([past_valid if past_valid is not None else ones(past_len),
                           query_valid if query_valid is not None else ones(q_len)], dim=1)  # (B, K)
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


# ------------------------------------------------------------------------------- attention rows
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


def attention_rows(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, rope: tuple, rows: Rows, qpos: torch.Tensor,
                   qw: torch.Tensor, past: Optional[torch.Tensor] = None, past_valid: Optional[torch.Tensor] = None,
                   q_slot: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``score[b, n] = sum_r qw[b, r] * mean_heads softmax(q_r · K^T * scaling)[n]`` over this input's keys.

    The attention the official FastV / PyramidDrop / SparseVLM / iLLaVA code reads from HF's eager
    ``output_attentions`` (softmax of the scaled, causally masked scores, averaged over heads),
    computed for the ``R`` query rows only, from the layer's own projections::

        q (B, P or R, H*hd), k (B, P, Hkv*hd)  ->  RoPE (model/rope.py, the module's own convention)
        rows (B, H, R, S+P) = softmax over [cached keys (S) | keys of this input (P)], causal in order
        mean over heads, sum over rows with qw  ->  (B, P)  ->  scattered to positions (B, N)

    ``rope``: the gathered (cos, sin) (B, P, hd). Softmax in float32 (HF eager upcasts too; it casts back to the
    model dtype, we do not). Keys a query cannot see (later positions, padding slots) get probability 0.
    """
    check_attention_rows(attn)
    hd = attn.head_dim
    B, P = k.shape[0], k.shape[1]
    cos, sin = (t.expand(B, -1, -1) for t in rope)  # (B, P, hd)
    slot = q_slot if q_slot is not None else rows.slots(qpos)  # (B, R)
    R = slot.shape[1]
    if q.shape[1] != R:  # the layer's full q (B, P, H*hd): take the query rows
        q = q.gather(1, slot[..., None].expand(-1, -1, q.shape[-1]))
    qc, qs = (t.gather(1, slot[..., None].expand(-1, -1, t.shape[-1])) for t in (cos, sin))
    q = apply_rope(q.view(B, R, -1, hd).transpose(1, 2), qc, qs)  # (B, H, R, hd)
    k = apply_rope(k.view(B, P, -1, hd).transpose(1, 2), cos, sin)  # (B, Hkv, P, hd)
    keys = k if past is None else torch.cat([past.to(k.dtype), k], dim=2)  # (B, Hkv, S+P, hd)
    S = keys.shape[2] - P
    groups = q.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(groups, dim=1) if groups > 1 else keys  # (B, H, S+P, hd), as HF's repeat_kv
    logits = torch.matmul(q.float(), keys.float().transpose(2, 3)) * attn.scaling  # (B, H, R, S+P)
    cur = torch.arange(P, device=k.device)[None, None, :] <= slot[:, :, None]  # (B, R, P) causal in order
    if rows.valid is not None:
        cur = cur & rows.valid[:, None, :]
    cur = cur | (torch.arange(P, device=k.device)[None, None, :] == slot[:, :, None])  # a row always sees itself
    seen = cur if S == 0 else torch.cat(
        [(past_valid if past_valid is not None else torch.ones(B, S, dtype=torch.bool, device=k.device))[:, None, :].expand(B, R, S), cur], 2)
    probs = torch.softmax(logits.masked_fill(~seen[:, None], float("-inf")), dim=-1).mean(1)[:, :, S:]  # (B, R, P)
    scores = (probs * qw.float()[..., None]).sum(1)  # (B, P)
    if rows.order is None:
        return scores
    if rows.valid is not None:
        scores = scores * rows.valid
    return torch.zeros(B, rows.N, dtype=scores.dtype, device=scores.device).scatter(1, rows.order, scores)


def query_attention(attn, q, k, rope, order, valid, N, qpos, qw, past, past_valid, q_slot=None) -> torch.Tensor:
    """:func:`attention_rows` with the rows given as ``order`` / ``valid`` / ``N`` (the gathered layout)."""
    return attention_rows(attn, q, k, rope, Rows(order, valid, N), qpos, qw, past, past_valid, q_slot)


def probe_attention(layer: nn.Module, plan, tokens, x: torch.Tensor, queries: tuple[torch.Tensor, torch.Tensor],
                    kwargs: dict) -> torch.Tensor:
    """``layer``'s attention rows for ``queries`` over the tokens present now (``tokens``: a
    :class:`~pmod_bench.model.policy.LayerTokens`), from its own ``input_layernorm`` and q/k projections
    *before* it runs (PyramidDrop ranks this way), (B, N) float32.

    Only the query rows are projected to queries; keys for every present token (the method's extra
    work, counted in its FLOPs). RoPE at the positions this layer would use.
    """
    B, N, d = x.shape
    present = plan.tokens if tokens.target is None else (tokens.target | plan.nontarget)
    counts = [v + t for v, t in zip(tokens.V, plan.T)] if tokens.target is not None else list(plan.R)
    P = max(counts)
    rows = Rows.of(present, P, N, full=P == N and all(c == P for c in counts), padded=any(c != P for c in counts))
    rope = tuple(rows.take(t) for t in plan.rope(x, kwargs, tokens.shift))  # (B, P, hd)
    h = layer.input_layernorm(rows.take(x))  # (B, P, d)
    qpos, qw = queries
    slot = rows.slots(qpos)  # (B, R) slot of each query in the gathered rows
    hq = h.gather(1, slot[..., None].expand(-1, -1, d))  # (B, R, d): only the query rows are projected
    return attention_rows(layer.self_attn, layer.self_attn.q_proj(hq), layer.self_attn.k_proj(h), rope, rows, qpos, qw,
                          q_slot=slot)


__all__ = ["Rows", "build_attention_mask", "capture_qk", "attention_rows", "query_attention", "probe_attention"]
