"""SparseVLM (Zhang et al., ICML 2025): text-guided, layer-wise sparsification of vision tokens with token recycling.

Follows Gumpest/SparseVLMs at commit 26a5f48813c46cd1c7364160354e7fdd3febaa67 (main; the default
``USE_VERSION=1_0`` path of ``llava/model/language_model/modelling_sparse_llama.py``, ``score.py``,
``utils.py``). Per sample, in the prefill:

1. **text raters** (from the LLM's input embeddings): ``m = softmax_text(v @ t^T).mean(vision)``
   over the vision tokens ``v`` and the text tokens ``t`` after the image; the raters are the text
   tokens with ``m > mean(m)``;
2. at each sparse layer (official ``pruning_loc = [2, 6, 15]``) the layer runs on every token
   present; its attention (softmax, averaged over heads) from the raters' rows to the vision tokens,
   averaged over the raters, is each vision token's relevance;
3. the top ``min(n_i, v - 1)`` vision tokens are kept (``v`` present now, ``n_i`` the schedule of
   ``retain``: 192 -> 300/200/110, 128 -> 303/110/36, 96 -> 238/48/26, 64 -> 66/30/17, official
   ``sparse_token_dict``);
4. **recycling**: of the pruned ones, the ``int(0.3 * pruned) + 1`` most relevant are clustered
   (density-peaks kNN, ``cluster_and_merge``) into ``int(recycled / 10) + 1`` tokens (means of the
   clusters' hidden states, from this layer's output), placed right after the kept vision tokens;
5. the later layers see only the kept + recycled vision tokens, **renumbered** (official
   ``position_ids[:, :len(select) + cluster_num]``; decode steps continue at the layer's cache
   length, official ``get_usable_length``), and cache only those.

Defaults: ``retain=192`` (the README's first setting and ``score.py``'s default), layers 2-6-15.

Where this deviates, and why:

* LLaVA-NeXT: the official main branch is LLaVA-1.5-only (``image_shape = 576``); the schedule is
  per 576 vision tokens, so it is scaled by ``V / 576`` (``V`` every image-feature position,
  newlines included); ``scale`` multiplies it further (1 = official; the equal-compute solver varies it);
* the official clustering adds ``rand * 1e-6`` to the densities to break ties; here ties are broken
  by position (earlier = denser), so results are deterministic;
* ranking ties by position; the attention rows are recomputed from the layer's own projections
  (any kernel; the official requires SDPA and materialises the whole map); batches (official: one
  sample); the raters are the text tokens after the first vision token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from pmod_bench.model.policy import stable_rank

from .base import MethodError, ModelGeometry, param, register_method
from .llm import DropState, LLMMethodConfig, keep_top, parse_layers, row_flops

#: official ``sparse_token_dict`` (USE_VERSION 1_0): kept vision tokens after each sparse layer, per 576
SCHEDULES = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
BASE_TOKENS = 576
RECYCLE = 0.3
CLUSTER_EVERY = 10


@register_method("sparsevlm")
@dataclass
class SparseVLMConfig(LLMMethodConfig):
    """SparseVLM: text raters rank the vision tokens at layers 2/6/15; the pruned are partly recycled into cluster tokens."""

    official: ClassVar[str] = "Gumpest/SparseVLMs@26a5f48813c46cd1c7364160354e7fdd3febaa67"
    renumbers: ClassVar[bool] = True

    retain: int = param(192, choices=(192, 128, 96, 64))
    """The official setting (RETAIN_TOKN): which schedule of kept tokens per sparse layer."""
    layers: str = "2-6-15"
    """The sparse layers (official pruning_loc), '-' separated; one per entry of the schedule."""
    scale: float = param(1.0, low=0.0, high=576.0, low_open=True)
    """Multiplies the schedule (1 = official; the equal-compute solver varies it)."""

    def validate(self) -> None:
        if len(parse_layers(self.layers, "sparsevlm: layers")) != len(SCHEDULES[self.retain]):
            raise MethodError(f"sparsevlm: layers needs {len(SCHEDULES[self.retain])} sparse layers (one per schedule entry), "
                              f"got '{self.layers}'.")

    @property
    def sparse_layers(self) -> tuple[int, ...]:
        return parse_layers(self.layers, "sparsevlm: layers")

    def first_layer(self) -> int:
        return 0  # the raters are computed from the input embeddings (layer 0's input)

    def check_model(self, geometry: ModelGeometry) -> None:
        if self.sparse_layers[-1] >= geometry.text_layers - 1:
            raise MethodError(f"sparsevlm: layers {self.layers} must be below the LLM's last layer "
                              f"({geometry.text_layers - 1}); tokens are pruned after a sparse layer.")

    def candidates(self, geometry: ModelGeometry) -> list["SparseVLMConfig"]:
        return [self.replace(scale=i / 200) for i in range(1, 200 * 4 + 1)]

    def budget(self) -> dict[str, Any]:
        return {"retain": self.retain, "scale": self.scale}

    def targets(self, V: int) -> list[int]:
        return [int(round(n * V / BASE_TOKENS * self.scale)) for n in SCHEDULES[self.retain]]

    def steps(self, V: int) -> list[tuple[int, int, int]]:
        """Per sparse layer: (kept, recycled, cluster tokens), host arithmetic as the official code."""
        out, v = [], V
        for n in self.targets(V):
            k = max(min(n, v - 1), 0)
            pruned = v - k
            rec = int(pruned * RECYCLE) + 1 if pruned > 0 else 0
            c = int(rec / CLUSTER_EVERY) + 1 if pruned > 0 else 0
            out.append((k, rec, c))
            v = k + c
        return out

    def layer_vision_tokens(self, num_layers: int, V: int) -> list[int]:
        counts, v, steps = [], V, dict(zip(self.sparse_layers, self.steps(V)))
        for l in range(num_layers):
            counts.append(v)
            if l in steps:
                k, _, c = steps[l]
                v = k + c
        return counts

    def extra_flops(self, text, text_tokens: int, V: int) -> int:
        total = 2 * V * text_tokens * text.hidden  # raters: v @ t^T (all text tokens: an upper bound)
        kept = self.layer_vision_tokens(text.layers, V)
        for l, (k, rec, c) in zip(self.sparse_layers, self.steps(V)):
            total += row_flops(text, text_tokens, text_tokens + kept[l])  # the text rows at the sparse layer
            total += 2 * rec * rec * text.hidden + 2 * rec * text.hidden  # cluster distances + merge
        return total

    def start(self, model, plan, kwargs: dict):
        return _SparseVLMState(self, plan)


def cluster_and_merge(x: torch.Tensor, cluster_num: int) -> torch.Tensor:
    """Density-peaks kNN clustering of ``x`` (n, C) into ``cluster_num`` tokens, the means of the clusters
    (official ``utils.cluster_and_merge``, with ties broken by position instead of random noise)."""
    n, C = x.shape
    xf = x.float()
    dist = torch.cdist(xf[None], xf[None])[0] / C ** 0.5  # (n, n)
    nearest = torch.sort(dist, dim=-1, stable=True).values[:, :cluster_num]
    density = (-(nearest ** 2).mean(-1)).exp()  # (n,)
    idx = torch.arange(n, device=x.device)
    # j is "denser" than i: higher density, or equal density and earlier (the official adds noise instead)
    denser = (density[None, :] > density[:, None]) | ((density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None]))
    dmax = dist.max()
    parent_dist = torch.where(denser, dist, dmax).min(-1).values  # (n,)
    score = parent_dist * density
    centres = torch.sort(score, descending=True, stable=True).indices[:cluster_num]  # (c,)
    assign = dist[centres].argmin(0)  # (n,) nearest centre
    assign[centres] = torch.arange(cluster_num, device=x.device)  # a centre belongs to itself
    sums = torch.zeros(cluster_num, C, dtype=torch.float32, device=x.device).index_add_(0, assign, xf)
    counts = torch.zeros(cluster_num, dtype=torch.float32, device=x.device).index_add_(0, assign, torch.ones(n, device=x.device))
    return (sums / (counts[:, None] + 1e-6)).to(x.dtype)


class _SparseVLMState(DropState):
    def __init__(self, cfg: SparseVLMConfig, plan) -> None:
        super().__init__(plan, renumber=True)
        self.cfg = cfg
        self.steps = [cfg.steps(v) for v in plan.V]  # per sample, per sparse layer
        self.at = {l: i for i, l in enumerate(cfg.sparse_layers)}
        B, N = plan.target.shape
        T = max(plan.T)
        # the text positions of each sample, in order (B, T) (left-padded batches: the first T_b are real)
        self.text_pos = torch.argsort((~plan.nontarget).to(torch.int8), dim=1, stable=True)[:, :T]
        self.text_ok = torch.arange(T, device=plan.target.device)[None, :] < torch.tensor(plan.T, device=plan.target.device)[:, None]
        V = max(plan.V)
        self.vis_pos = torch.argsort((~plan.target).to(torch.int8), dim=1, stable=True)[:, :V]  # (B, V) vision slots in order
        self.weights = None

    def prepare(self, ctx, x):
        plan = ctx.plan
        if ctx.layer_idx == 0:  # text raters from the input embeddings (official "Select Text Raters", 3.2)
            B, N, d = x.shape
            first = plan.target.to(torch.int8).argmax(1)  # (B,) first vision position
            after = self.text_ok & (self.text_pos > first[:, None])  # (B, T) text after the image
            vis_ok = torch.arange(self.vis_pos.shape[1], device=x.device)[None, :] < torch.tensor(plan.V, device=x.device)[:, None]
            v = x.gather(1, self.vis_pos[..., None].expand(-1, -1, d)).float()  # (B, V, d)
            t = x.gather(1, self.text_pos[..., None].expand(-1, -1, d)).float()  # (B, T, d)
            m = torch.softmax((v @ t.transpose(1, 2)).masked_fill(~after[:, None], float("-inf")), dim=2)  # (B, V, T)
            m = (m * vis_ok[..., None]).sum(1) / vis_ok.sum(1, keepdim=True)  # (B, T) mean over vision
            mean = (m * after).sum(1, keepdim=True) / after.sum(1, keepdim=True).clamp(min=1)
            raters = after & (m > mean)
            self.weights = raters.float() / raters.sum(1, keepdim=True).clamp(min=1)  # mean over the raters
        return x

    def queries(self, ctx):
        return (self.text_pos, self.weights) if ctx.layer_idx in self.at else None

    def observe(self, ctx, out, scores):
        plan = ctx.plan
        i = self.at.get(ctx.layer_idx)
        if i is None:
            return out
        alive = self.current.target
        B, N, d = out.shape
        steps = [s[i] for s in self.steps]
        ks = tuple(k for k, _, _ in steps)
        kept = keep_top(scores, alive, ks)  # (B, N)
        pruned = alive & ~kept
        k_pos = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)  # kept positions first, in order
        by_rel = stable_rank(scores, pruned)  # (B, N) the pruned first, most relevant first
        out = out.clone()
        counts = []
        for b, (k, rec, c) in enumerate(steps):  # per sample: sizes are host integers (no sync)
            new = out[b, k_pos[b, :k]]  # (k, d) kept, in order
            if rec:
                merged = cluster_and_merge(out[b, by_rel[b, :rec]], c)  # (c, d) recycled clusters
                new = torch.cat([new, merged], 0)
            out[b, self.vis_pos[b, :new.shape[0]]] = new  # the new vision sequence fills the first vision slots
            counts.append(new.shape[0])
        rank = (plan.target.long().cumsum(1) - 1)
        alive = plan.target & (rank < torch.tensor(counts, device=out.device)[:, None])
        self.keep(alive, tuple(counts))
        return out
