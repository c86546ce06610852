"""The routing plan: everything a p-MoD forward decides once, before the decoder layers run.

The model's forward builds one :class:`RoutingPlan` per call and hands it to every decoder layer as
the keyword argument ``pmod_plan`` (the project's own input, carried by HF's ``**kwargs``), together
with the project's cache (:class:`~pmod_bench.model.cache.PMoDCache`).  Every shape a routed layer
needs follows from three numbers per sample, so the plan moves them to the host **once**::

    V_b  vision (target) tokens of sample b        (LLaVA-NeXT newline features included)
    T_b  non-vision, non-padding tokens of sample b (text, system prompt, generated tokens)
    R_b  non-padding tokens of sample b             (= V_b + T_b unless a vision token is padding)

and derives, per layer, from the :class:`~pmod_bench.model.policy.Selection` of its policy
(:meth:`RoutingPlan.shapes`; p-MoD's router at ratio rho selects ``k_b = trunc(V_b * rho)``)::

    k_b                      selected vision tokens of sample b (host arithmetic on V_b)
    P_b = k_b + T_b          processed tokens of sample b
    P   = max_b P_b          gathered length (rows left-padded)

That is one device-to-host transfer per forward instead of several scalar syncs per routed layer.
Observers hang off the plan, not the layers: ``record_routing`` reads the selections the layers
note (:meth:`RoutingPlan.note`); the overflow guard's forward hooks (:meth:`RoutingPlan.guarding`)
only *record* non-finite flags on the device, and the plan checks them once, after the forward
(:meth:`RoutingPlan.check_overflow`).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from .compat import contract_error
from .policy import EVERYTHING, LayerTokens, Selection, TokenPolicy, compose


def num_selected(num_targets: torch.Tensor, ratio: float) -> torch.Tensor:
    """k_b = trunc(V_b * rho) on the device, in float32 exactly as the reference implementation."""
    return torch.trunc(num_targets.to(torch.float32) * torch.tensor(ratio, dtype=torch.float32)).long()


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
    method: Optional[TokenPolicy] = None
    """The in-LLM method's policy of this forward (None: none applied); composed with each layer's router."""
    renumber: Optional[object] = None
    """``(x, layer kwargs, shift) -> (cos, sin)``: RoPE at positions - shift on every position row (the host's
    position layout, :meth:`pmod_bench.model.hosts.HostAdapter.renumbered_rope`); None: nothing renumbers."""
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
    def policy(self, layer) -> TokenPolicy:
        """The policy of ``layer`` in this forward: the method's (which vision tokens are present), then the layer's
        own router (which of them it processes), :data:`~pmod_bench.model.policy.EVERYTHING` without either."""
        method = self.method if self.target is not None else None
        return compose(method, layer.router) if method is not None else (layer.router or EVERYTHING)

    def selection(self, layer_idx: int) -> Selection:
        """The selection a layer starts from: the plan's own vision tokens, every one processed."""
        self.visited.add(layer_idx)
        return Selection(LayerTokens(self.target, self.num_targets, self.V))

    def shapes(self, sel: Selection) -> LayerPlan:
        """The static shapes of a layer that processes ``sel`` (host arithmetic, cached per forward)."""
        key = None if sel.tokens.target is None else sel.k
        plan = self._layers.get(key)
        if plan is None:
            N = self.seq_len
            k_max, counts = (0, self.R) if key is None else (max(key), [k + t for k, t in zip(key, self.T)])
            P = max(counts)
            plan = LayerPlan(k_max=k_max, processed=P, full=all(c == N for c in counts), padded=any(c != P for c in counts))
            self._layers[key] = plan
        return plan

    def processed(self, sel: Selection) -> Optional[torch.Tensor]:
        """(B, N) bool: the positions a layer processes (its vision tokens and every other real token); None = all."""
        return self.tokens if sel.tokens.target is None else (sel.vision | self.nontarget)

    def note(self, layer_idx: int, sel: Selection) -> None:
        """Record a router's choice for :meth:`~pmod_bench.model.routed.PMoDModelMixin.record_routing` (if recording)."""
        if self.record is not None and sel.selected is not None:
            self.record[layer_idx] = {"selected": sel.selected.detach().cpu(), "target": sel.tokens.target.cpu()}

    def rope(self, x: torch.Tensor, kwargs: dict, shift: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) (1 or B, N, hd) of a layer's input: HF's ``position_embeddings``, or at the renumbered positions."""
        if shift is None:
            return kwargs["position_embeddings"]
        if self.renumber is None:
            raise contract_error("positions are renumbered but the model gave the plan no position layout")
        return self.renumber(x, kwargs, shift)

    # ------------------------------------------------------------------------- overflow guard
    def flag(self, layer_idx: int, name: str, t: torch.Tensor, ratio: float, detail: str) -> None:
        """Record (on the device, no sync) whether ``t`` holds a NaN or an Inf."""
        if self.guard:
            self._flags.append((layer_idx, name, tuple(t.shape), ratio, detail, torch.stack([t.isnan().any(), t.isinf().any()])))

    @contextlib.contextmanager
    def guarding(self, layers: dict) -> Iterator[None]:
        """With the guard on, watch the p-MoD ``layers`` ({index: layer}) for this forward: forward hooks on each
        layer's router, attention, MLP and the layer itself flag their outputs (:meth:`flag`); nothing in the layers."""
        handles = []
        try:
            for idx, layer in (layers.items() if self.guard else ()):
                detail = f"weight_norm {layer.pmod.weight_norm} scale {layer.pmod.norm_scale}"
                for name, module in (("router logits", layer.router), ("attention output", layer.self_attn),
                                     ("mlp output", layer.mlp), ("layer output", layer)):
                    hook = functools.partial(self._watch, idx, name, layer.ratio, detail)
                    handles.append(module.register_forward_hook(hook))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _watch(self, idx: int, name: str, ratio: float, detail: str, _module, _args, output) -> None:
        self.flag(idx, name, output[0] if isinstance(output, tuple) else output, ratio, detail)

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
