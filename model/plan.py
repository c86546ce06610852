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

import numpy as np
import torch


def num_selected(num_targets: torch.Tensor, ratio: float) -> torch.Tensor:
    """k_b = trunc(V_b * rho) on the device, in float32 exactly as the reference implementation."""
    return torch.trunc(num_targets.to(torch.float32) * torch.tensor(ratio, dtype=torch.float32)).long()


def num_selected_host(num_targets: int, ratio: float) -> int:
    """The same k = trunc(V * rho) in float32, on the host (IEEE single precision: identical)."""
    return int(np.trunc(np.float32(num_targets) * np.float32(ratio)))


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
    def layer(self, layer_idx: int, ratio: float) -> LayerPlan:
        """The static shapes of routed layer ``layer_idx`` at retention ``ratio`` (host arithmetic)."""
        key = (layer_idx, ratio)
        plan = self._layers.get(key)
        if plan is None:
            N = self.seq_len
            if self.target is None:  # no vision tokens: every real token is processed
                k_max, counts = 0, self.R
            else:
                ks = [num_selected_host(v, ratio) for v in self.V]
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
