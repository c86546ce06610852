"""The routing plan: everything a p-MoD forward decides once, before the decoder layers run.

The model's forward builds one :class:`RoutingPlan` per call and hands it to every decoder layer as
the keyword argument ``pmod_plan`` (the project's own input, carried by HF's ``**kwargs``), together
with the project's cache (:class:`~pmod_bench.model.cache.PMoDCache`).  Every shape a routed layer
needs follows from three numbers per sample, so the plan moves them to the host **once**::

    V_b  vision (target) tokens of sample b        (LLaVA-NeXT newline features included)
    T_b  non-vision, non-padding tokens of sample b (text, system prompt, generated tokens)
    R_b  non-padding tokens of sample b             (= V_b + T_b unless a vision token is padding)

and derives, per routed layer with ratio rho (:meth:`RoutingPlan.layer`)::

    k_b = trunc(V_b * rho)   in float32, as the reference       selected vision tokens
    P_b = k_b + T_b                                              processed tokens of sample b
    P   = max_b P_b                                              gathered length (rows left-padded)

That is one device-to-host transfer per forward instead of several scalar syncs per routed layer.
With the overflow guard on, the layers only *record* non-finite flags on the device; the plan
checks them once, after the forward (:meth:`RoutingPlan.check_overflow`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .schedules import num_selected_host


def num_selected(num_targets: torch.Tensor, ratio: float) -> torch.Tensor:
    """k_b = trunc(V_b * rho) on the device, in float32 exactly as the reference implementation."""
    return torch.trunc(num_targets.to(torch.float32) * torch.tensor(ratio, dtype=torch.float32)).long()


@dataclass(frozen=True)
class LayerTokens:
    """The vision tokens present at one decoder layer (what the layer routes / processes).

    Without an in-LLM method every layer sees the plan's own vision tokens; a :class:`TokenMethod`
    (FastV, PyramidDrop, ...) removes some for the layers after its decision. Removed tokens are gone
    for those layers: they are neither processed (queries, keys, values, MLP) nor cached there, and
    their hidden state passes through unchanged (their logits are meaningless, as the official code,
    which cuts them out of the sequence, has none).
    """

    target: Optional[torch.Tensor]
    """(B, N) bool: the vision tokens present (None: none in this input)."""
    num_targets: Optional[torch.Tensor]
    """(B,) long on the device: how many per sample (= V)."""
    V: tuple[int, ...]
    """The same counts on the host (host arithmetic on the plan's V_b, never a transfer)."""
    shift: Optional[torch.Tensor] = None
    """(B, N) long: RoPE position = position id - shift (methods that renumber positions after dropping,
    as PyramidDrop's and SparseVLM's official code); None = original positions."""
    final_shift: Optional[torch.Tensor] = None
    """(B,) long: the shift of tokens that come after this input (decode steps); the layer stores it
    in its cache layer, so later forwards rotate their keys/queries at the same renumbered positions."""


class TokenMethod:
    """Per-forward state of a method that acts inside the LLM, carried by the plan (``plan.method``).

    A wrapped layer calls, in order: :meth:`before_layer` (may decide from the layer's own
    projections and return a rewritten ``x``), :meth:`tokens` (the vision tokens this layer sees),
    :meth:`queries` (whose attention rows it must report), then after its own computation
    :meth:`after_layer` with those rows (may decide for the later layers and rewrite the output).
    Every shape must follow from host arithmetic on the plan's ``V_b``: no host sync.
    """

    #: layers that must be wrapped (read the plan); the others run HF's own forward untouched
    layers: tuple[int, ...] = ()

    def before_layer(self, layer, plan: "RoutingPlan", x: torch.Tensor, kwargs: dict) -> torch.Tensor:
        return x

    def tokens(self, plan: "RoutingPlan", layer_idx: int) -> Optional[LayerTokens]:
        """None: the plan's own vision tokens."""
        return None

    def queries(self, plan: "RoutingPlan", layer_idx: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``(positions (B, R) long, weights (B, R) float)``: the layer reports
        ``score[b, n] = sum_r weights[b, r] * mean_heads softmax(q_r k^T)[n]`` over the keys of this
        input; None = no attention wanted."""
        return None

    def after_layer(self, layer, plan: "RoutingPlan", out: torch.Tensor, scores: Optional[torch.Tensor]) -> torch.Tensor:
        return out


class PMoDOverflowError(FloatingPointError):
    """A NaN or Inf appeared in a p-MoD layer (the paper's OVERFLOW rows)."""


@dataclass(frozen=True)
class LayerPlan:
    """Static shapes of one routed layer for one forward (host integers, no device sync)."""

    k_max: int
    """max_b k_b: how many ranked vision tokens are gathered per row."""
    processed: int
    """P = max_b P_b: length of the gathered rows."""
    full: bool
    """Every position of every row is processed: no gather at all."""
    padded: bool
    """Rows differ in length: the gathered rows carry padding slots (a validity mask)."""


@dataclass
class RoutingPlan:
    """One forward's routing inputs, shared by every decoder layer (see the module docstring)."""

    target: Optional[torch.Tensor]
    """(B, N) bool: positions holding an image feature; None when this input holds none."""
    tokens: Optional[torch.Tensor]
    """(B, N) bool: non-padding positions of the current input; None = all."""
    nontarget: Optional[torch.Tensor]
    """(B, N) bool: tokens & ~target, the positions every layer processes (None with target None)."""
    num_targets: Optional[torch.Tensor]
    """(B,) long on the device: V_b (for k_b on the device, no transfer)."""
    V: tuple[int, ...]
    T: tuple[int, ...]
    R: tuple[int, ...]
    seq_len: int
    cache: Optional[object] = None
    """The :class:`PMoDCache` of this forward (None: no caching, e.g. training)."""
    guard: bool = False
    record: Optional[dict] = None
    """Introspection sink: layer index -> {"selected": (B, N) bool, "target": (B, N) bool}."""
    method: Optional[TokenMethod] = None
    """The in-LLM method's state of this forward (None: none applied)."""
    rotary: Optional[object] = None
    """The LLM's rotary embedding ``(x, position_ids) -> (cos, sin)``, for renumbered positions."""
    _layers: dict = field(default_factory=dict, repr=False)
    _flags: list = field(default_factory=list, repr=False)
    visited: set = field(default_factory=set, repr=False)

    @classmethod
    def build(
        cls,
        target: Optional[torch.Tensor],
        attention_mask: Optional[torch.Tensor],
        seq_len: int,
        batch: int,
        device,
        cache=None,
        guard: bool = False,
        record: Optional[dict] = None,
    ) -> "RoutingPlan":
        tokens = None
        if attention_mask is not None and attention_mask.dim() == 2:
            tokens = attention_mask[:, -seq_len:].bool()
        t = target if target is not None else torch.zeros(batch, seq_len, dtype=torch.bool, device=device)
        tok = tokens if tokens is not None else torch.ones(batch, seq_len, dtype=torch.bool, device=device)
        num_targets = (t & tok).sum(dim=1)
        stats = torch.stack([num_targets, (~t & tok).sum(dim=1), tok.sum(dim=1)], dim=1)  # (B, 3)
        V, T, R = (tuple(col) for col in zip(*stats.tolist()))  # the one device-to-host transfer
        if all(r == seq_len for r in R):
            tokens = None
        if not any(V):
            target = None
        nontarget = None if target is None else (~target if tokens is None else (~target & tokens))
        return cls(target=target, tokens=tokens, nontarget=nontarget, num_targets=num_targets if target is not None else None,
                   V=V, T=T, R=R, seq_len=seq_len, cache=cache, guard=guard, record=record)

    # ------------------------------------------------------------------------------------
    def layer_tokens(self, layer_idx: int) -> LayerTokens:
        """The vision tokens present at layer ``layer_idx``: the method's choice, else the plan's own."""
        own = self.method.tokens(self, layer_idx) if self.method is not None and self.target is not None else None
        return own if own is not None else LayerTokens(self.target, self.num_targets, self.V)

    def layer(self, layer_idx: int, ratio: float) -> LayerPlan:
        """The static shapes of routed layer ``layer_idx`` at retention ``ratio`` (host arithmetic)."""
        toks = self.layer_tokens(layer_idx)
        key = (layer_idx, ratio, toks.V)
        plan = self._layers.get(key)
        if plan is None:
            N = self.seq_len
            if toks.target is None:  # no vision tokens: every real token is processed
                k_max, counts = 0, self.R
            else:
                ks = [num_selected_host(v, ratio) for v in toks.V]
                k_max, counts = max(ks), [k + t for k, t in zip(ks, self.T)]
            P = max(counts)
            full = all(c == N for c in counts)
            plan = LayerPlan(k_max=k_max, processed=P, full=full, padded=any(c != P for c in counts))
            self._layers[key] = plan
        self.visited.add(layer_idx)
        return plan

    # ------------------------------------------------------------------------- overflow guard
    def flag(self, layer_idx: int, name: str, t: torch.Tensor, ratio: float, detail: str) -> None:
        """Record (on the device, no sync) whether ``t`` holds a NaN or an Inf."""
        if self.guard:
            self._flags.append((layer_idx, name, tuple(t.shape), ratio, detail, torch.stack([t.isnan().any(), t.isinf().any()])))

    def check_overflow(self) -> None:
        """One host check for all the flags of this forward; raises :class:`PMoDOverflowError`."""
        if not self._flags:
            return
        flags = torch.stack([f[-1] for f in self._flags])  # (n, 2) bool
        if not bool(flags.any()):
            self._flags.clear()
            return
        first = int(flags.any(dim=1).nonzero()[0, 0])
        layer_idx, name, shape, ratio, detail, pair = self._flags[first]
        kind = "NaN" if bool(pair[0]) else "Inf"
        self._flags.clear()
        raise PMoDOverflowError(
            f"OVERFLOW: {kind} in p-MoD layer {layer_idx} ({name}, shape {shape}, ratio {ratio:.3f}, {detail}). "
            "Lower the learning rate, use TanhNorm with a small alpha (0.2), or bf16 instead of fp16."
        )
