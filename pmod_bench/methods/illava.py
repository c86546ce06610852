"""iLLaVA (Hu et al., 2024, arXiv 2412.06263): merge tokens inside the vision encoder and inside the LLM.

Follows hulianyuyy/iLLaVA at commit 4068149e2cce51d691fe08c0eab80c364c8fcdd9 (main):
``src/LLaVA-OneVision/llava/model/multimodal_encoder/siglip_encoder.py`` (``SigLipEncoderLayer.forward``,
``perform_self_selection``), ``src/LLaVA-OneVision/llava/model/language_model/llava_qwen_training_free.py``
(``prepare_inputs_labels_for_multimodal``: the layout of the merged tiles) and
``src/transformers-4.46.0/.../qwen2/modeling_qwen2.py`` (``Qwen2Model.forward_illava``).

**Vision side** (per tile, in each encoder layer ``i`` of ``vit_layers``, official ``illava_vit_k``):

1. the layer runs its own ``layer_norm1`` and ``self_attn`` on the tokens present, ``h = x + attn``;
2. its attention weights (softmax probabilities) are averaged over heads and then over the query
   rows: ``s[j]`` = the mean attention token ``j`` receives;
3. the ``r + 1`` tokens with the lowest ``s`` (``r = vit_r``, official ``illava_vit_r``), lowest first,
   are averaged with weights ``r+1, r, ..., 1`` (the least attended weighs most) into the ``(r+1)``-th
   lowest, which stays; the other ``r`` are removed (the rest keep their order);
4. the layer's ``layer_norm2`` + ``mlp`` run on what is left. Later layers see ``r`` fewer tokens.

(The official file also defines ToMe's ``bipartite_soft_matching``, but never calls it: the merge is
the attention-ranked weighted average above.) The LLM reads the selected hidden state (LLaVA: layer
-2) of the shortened tiles; each tile keeps ``P' = P - len(vit_layers) * vit_r`` patch tokens.

**Layout.** LLaVA-1.5 (one tile): the ``P'`` tokens in order. LLaVA-NeXT anyres: as the official
``spatial_unpad`` branch, each tile's ``P'`` tokens are read as a ``sqrt(P') x sqrt(P')`` grid (the
official ``new_h = new_w = int(sqrt(keep_tokens))`` with ``assert height * width == tokens``), the grid
tiles stitched, unpadded to the aspect ratio, one ``image_newline`` per row, the base tile first.

**LLM side** (at each layer ``k`` of ``llm_layers``, official ``illava_llm_k``, in the prefill):

1. the attention of layer ``k-1`` (softmax, averaged over heads), the row of the **last token**, at
   the vision tokens present, ranks them (highest first);
2. ``r = round(v * (1 - llm_keep))`` of the ``v`` present are dropped (official
   ``r = round(image_token_length * (1 - illava_llm_r))``): the ``r + 1`` lowest, highest first, are
   averaged with weights ``1, 2, ..., r+1`` (the least attended weighs most) into the highest of
   them, which stays (its hidden state = layer ``k``'s input becomes that average);
3. layers ``k..L-1`` neither attend to the dropped tokens nor process or cache them; kept tokens keep
   their original position ids (official ``position_ids = keep_indexs``); decode steps attend to each
   layer's cache (FastV's scheme, :mod:`.fastv`).

Defaults: ``vit_layers=5-6-7-8, llm_layers=8, llm_keep=0.7`` (the README's image-benchmark setting
``illava_vit_k=5-6-7-8, illava_llm_k=8, illava_llm_r=0.70``) and ``vit_r=80``, see below.

Where this deviates, and why:

* **vit_r = 80, not 92.** The official code is for SigLIP-384 (729 = 27² patches, no [CLS]): 4 layers
  x 92 leave 361 = 19², and every setting it lists leaves a square (169, 225, 361), because its anyres
  layout needs one. On CLIP ViT-L/14-336 (576 = 24² patches) 4 x 92 leave 208, not a square: the
  official layout cannot run. ``vit_r=80`` leaves 256 = 16², the square nearest the official kept
  fraction (361/729 = 49.5%). On LLaVA-NeXT a ``vit_r`` whose ``P'`` is not a square is refused (the
  error lists the valid values); on LLaVA-1.5 (one tile, no grid) any ``vit_r`` runs, 92 included;
* **[CLS]**: CLIP has one (SigLIP has not). It is never merged or removed (LLaVA drops it after the
  tower; ``vision_feature_select_strategy='default'``), but its row counts among the query rows;
* the merges are computed in float32 and cast to the model's dtype (the official casts to fp16 with
  ``.half()``, whatever the model's dtype); ties in a ranking are broken by position (earlier =
  higher attention; ``topk`` leaves them unspecified);
* the vision tower runs layer by layer from the model's own modules (``embeddings``, ``pre_layrnorm``,
  each layer's own ``forward``, and in a merge layer its ``layer_norm1`` / ``self_attn`` /
  ``layer_norm2`` / ``mlp``), eager attention in the tower for the weights; transformers is not
  patched (the official edits the SigLIP file). The tower runs all its layers, as HF's does;
* the LLM row is recomputed from layer ``k-1``'s own q/k projections (any kernel; the official
  needs eager attention in that layer); each sample ranks its own vision tokens, every image-feature
  position counted (newlines included, as the official ``image_token_length``), batches of any
  size (the official: sample 0 of the batch, one fixed image span);
* ``vit_r = 0`` turns the vision side off and ``llm_keep = 1`` the LLM side (the official
  ``enable_illava_vit`` / ``enable_illava_llm``); the official refuses those values.

Analytic FLOPs (:meth:`IlLaVAConfig.method_flops`, the profiler's conventions): the tower with its
per-layer token counts (attention on the tokens present, the MLP on what is left), the merges'
weighted sums (``2·(r+1)·D`` per merge and tile, in ``method_extra``), the projector on ``P'`` tokens
per tile, the LLM with the per-layer kept tokens, the last-token rows and the LLM merges in ``llm_extra``.

Equal compute (``--match``): the candidates are every valid ``vit_r`` x ``llm_keep`` on a 1/50 grid; of
the settings within tolerance the solver takes the one with ``llm_keep`` nearest the configured value,
then ``vit_r`` nearest (:meth:`IlLaVAConfig.prefer`). At p-MoD-0.5 on LLaVA-NeXT-7B, 672x672:
``vit_r=44`` (400 = 20² tokens per tile), ``llm_keep=0.72``; on LLaVA-1.5-7B: ``vit_r=44, llm_keep=0.7``.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from pmod_bench.model.policy import stable_rank

from .base import MethodError, ModelGeometry, param, register_method
from .llm import DropState, LLMMethodConfig, last_token_query, parse_layers, row_flops
from .vision import CompressedImage, check_attention, encoder_layers, hf_image_tokens, pack_spatial_unpad, project, vision_modules

#: the solver's grid of llm_keep (1/50 steps) for each valid vit_r
KEEP_GRID = tuple(i / 50 for i in range(1, 51))


def llm_removed(v: int, keep: float) -> int:
    """Vision tokens dropped at one LLM merge layer: round(v * (1 - keep)) (official), at most v - 1."""
    if v <= 0:
        return 0
    return max(0, min(round(v * (1 - keep)), v - 1))


def valid_vit_r(geometry: ModelGeometry, merges: int) -> list[int]:
    """Every vit_r this architecture runs: >= 1 patch left per tile; on anyres a square count left."""
    out = []
    for r in range(0, (geometry.patches - 1) // max(merges, 1) + 1):
        left = geometry.patches - merges * r
        if left >= 1 and (not geometry.anyres or math.isqrt(left) ** 2 == left):
            out.append(r)
    return out


@register_method("illava")
@dataclass
class IlLaVAConfig(LLMMethodConfig):
    """iLLaVA: merge vit_r tokens in each of the vision layers vit_layers, then at LLM layers llm_layers merge the
    least-attended vision tokens so that llm_keep of them stay."""

    official: ClassVar[str] = "hulianyuyy/iLLaVA@4068149e2cce51d691fe08c0eab80c364c8fcdd9"
    needs_attentions: ClassVar[bool] = True
    #: also shortens the image features before the LLM (methods/apply.py runs its compress())
    compresses_vision: ClassVar[bool] = True

    vit_layers: str = "5-6-7-8"
    """Vision encoder layers that merge, '-' separated, 0-based (official illava_vit_k)."""
    vit_r: int = param(80, low=0)
    """Tokens removed per tile in each of those layers (official illava_vit_r = 92 on SigLIP's 729 patches; 0 = off)."""
    llm_layers: str = "8"
    """LLM layers before which tokens are merged, ranked by the previous layer's attention (official illava_llm_k)."""
    llm_keep: float = param(0.7, low=0.0, high=1.0, low_open=True)
    """Fraction of the vision tokens present kept at each LLM merge layer (official illava_llm_r; 1 = off)."""

    def validate(self) -> None:
        parse_layers(self.vit_layers, "illava: vit_layers")
        if parse_layers(self.llm_layers, "illava: llm_layers")[0] < 1:
            raise MethodError("illava: llm_layers must be >= 1 (tokens are ranked by the previous layer's attention).")

    @property
    def vit(self) -> tuple[int, ...]:
        return parse_layers(self.vit_layers, "illava: vit_layers") if self.vit_r > 0 else ()

    @property
    def llm(self) -> tuple[int, ...]:
        return parse_layers(self.llm_layers, "illava: llm_layers")

    def tile_tokens(self, geometry: ModelGeometry) -> int:
        """Patch tokens per tile after the vision side (P')."""
        return geometry.patches - len(self.vit) * self.vit_r

    # -- model limits ----------------------------------------------------------------------------
    def first_layer(self) -> int:
        return self.llm[0] - 1

    def check_model(self, geometry: ModelGeometry) -> None:
        if self.llm[-1] >= geometry.text_layers:
            raise MethodError(f"illava: llm_layers {self.llm_layers} go beyond the LLM's {geometry.text_layers} layers "
                              f"(must be in [1, {geometry.text_layers - 1}]).")
        if not self.vit:
            return
        last = geometry.feature_index - 1  # the layer whose output LLaVA reads
        if self.vit[-1] > last:
            raise MethodError(f"illava: vit_layers {self.vit_layers} must be at most {last}, the vision layer whose output "
                              f"LLaVA reads (vision_feature_layer {geometry.feature_layer}); later merges would not reach the LLM.")
        left = self.tile_tokens(geometry)
        valid = valid_vit_r(geometry, len(self.vit))
        if left < 1:
            raise MethodError(f"illava: {len(self.vit)} merge layers x vit_r={self.vit_r} remove more than the "
                              f"{geometry.patches} patches of a tile; vit_r must be at most {max(valid)}.")
        if geometry.anyres:
            if not geometry.drop_cls:
                raise MethodError("illava on LLaVA-NeXT lays each tile out as a square grid of its patch tokens: it needs "
                                  "vision_feature_select_strategy 'default' (the [CLS] feature dropped).")
            if math.isqrt(left) ** 2 != left:
                near = sorted(valid, key=lambda r: abs(r - self.vit_r))[:4]
                raise MethodError(f"illava: {geometry.patches} - {len(self.vit)} x {self.vit_r} = {left} tokens per tile is not a "
                                  "square; LLaVA-NeXT's anyres layout (official: sqrt(keep_tokens) per side) needs one. "
                                  f"Nearest valid vit_r: {', '.join(map(str, sorted(near)))}.")

    # -- equal compute ---------------------------------------------------------------------------
    def candidates(self, geometry: ModelGeometry) -> list["IlLaVAConfig"]:
        """Every valid vit_r x llm_keep on a 1/50 grid (the solver then takes the :meth:`prefer`-red one within tolerance)."""
        rs = valid_vit_r(geometry, len(parse_layers(self.vit_layers, "illava: vit_layers")))
        out = []
        for r in rs:
            for k in KEEP_GRID:  # valid by construction: copies without re-running the field checks (14k configs)
                cand = copy.copy(self)
                cand.__dict__.update(vit_r=r, llm_keep=k)
                out.append(cand)
        return out

    def prefer(self, cand: "IlLaVAConfig") -> tuple[float, int]:
        """The solver's choice among settings within tolerance: llm_keep nearest this config's (the official 0.7
        carries over to any architecture), then vit_r nearest this config's."""
        return (round(abs(cand.llm_keep - self.llm_keep), 9), abs(cand.vit_r - self.vit_r))

    def budget(self) -> dict[str, Any]:
        return {"vit_layers": self.vit_layers, "vit_r": self.vit_r, "llm_layers": self.llm_layers, "llm_keep": self.llm_keep}

    # -- counts ----------------------------------------------------------------------------------
    def llm_steps(self, V: int) -> list[tuple[int, int]]:
        """Per LLM merge layer: (vision tokens present before it, tokens dropped)."""
        out, v = [], V
        for _ in self.llm:
            r = llm_removed(v, self.llm_keep)
            out.append((v, r))
            v -= r
        return out

    def layer_vision_tokens(self, num_layers: int, V: int) -> list[int]:
        steps = dict(zip(self.llm, self.llm_steps(V)))
        counts, v = [], V
        for l in range(num_layers):
            if l in steps:
                v = steps[l][0] - steps[l][1]
            counts.append(v)
        return counts

    def extra_flops(self, text, text_tokens: int, V: int) -> int:
        # per merge layer k: the last token's row at layer k-1 (over the tokens present there) + the weighted merge
        return sum(row_flops(text, 1, text_tokens + v) + 2 * (r + 1) * text.hidden for v, r in self.llm_steps(V))

    def llm_input_tokens(self, geometry: ModelGeometry, config: Any, image_size: Any) -> int:
        """Vision tokens the LLM receives for one image (image_size: (height, width))."""
        left = self.tile_tokens(geometry)
        if not geometry.anyres:
            return left + (0 if geometry.drop_cls else 1)
        g = math.isqrt(left)
        return hf_image_tokens(config, image_size, g, g)

    def method_flops(self, arch, image_size: tuple[int, int], text_tokens: int, logits_tokens: int = 1):
        """:class:`~pmod_bench.methods.accounting.MethodFlops` of one sample at (width, height) (module docstring)."""
        from pmod_bench.profiler.arch import vision_layout
        from pmod_bench.profiler.flops import llm_prefill_flops, paper_prefill_flops

        from .flops import MethodFlops

        from .geometry import checked_geometry

        geometry = checked_geometry(self, arch.config)  # the family first: Qwen2.5-VL / OneVision refuse in one line
        layout = vision_layout(arch, image_size)
        v, t = arch.vision, arch.text
        D, M = v.hidden, v.intermediate
        n = geometry.patches + 1  # tokens per tile in the tower: patches + [CLS]
        tower = 2 * v.channels * v.patch_size ** 2 * D * geometry.patches  # patch conv
        merges = 0
        vit = set(self.vit)
        for i in range(v.layers):
            r = self.vit_r if i in vit else 0
            tower += 2 * n * 4 * D * D + 4 * n * n * D + 2 * (n - r) * 2 * D * M  # q,k,v,o + attention on n; MLP on n - r
            if r:
                merges += 2 * (r + 1) * D  # the weighted average: (1, r+1) @ (r+1, D)
            n -= r
        tiles = layout.tiles
        per_tile = self.tile_tokens(geometry) + (0 if geometry.drop_cls else 1)
        projector = 2 * tiles * per_tile * (arch.projector_in * arch.projector_hidden + arch.projector_hidden ** 2)
        V = self.llm_input_tokens(geometry, arch.config, (int(image_size[1]), int(image_size[0])))
        kept = self.layer_vision_tokens(t.layers, V)
        extra = self.extra_flops(t, text_tokens, V)
        llm = llm_prefill_flops(t, text_tokens, V, kept, (), logits_tokens).total("full")
        paper = paper_prefill_flops(t, text_tokens, V, kept)
        return MethodFlops(vision_encoder=tiles * tower, projector=projector, method_extra=tiles * merges,
                           llm_prefill=llm + extra, llm_prefill_paper=paper + extra, llm_vision_tokens=min(kept),
                           baseline_vision_tokens=layout.vision_tokens, layer_vision_tokens=tuple(kept), llm_extra=extra,
                           note=f"iLLaVA: {V} vision tokens reach the LLM ({per_tile} per tile after the tower merges); "
                                f"its LLM rows and merges ({extra / 1e12:.4f} TFLOPs) are counted in llm_prefill")

    # -- the vision side ---------------------------------------------------------------------------
    def compress(self, model, geometry: ModelGeometry, tiles: list, sizes: list) -> list[CompressedImage]:
        self.check_model(geometry)
        pixels = torch.cat(tiles, 0)
        hidden, pos = merging_tower(model, geometry, pixels, self.vit, self.vit_r)  # (T, 1+P', D), (T, 1+P')
        if geometry.drop_cls:
            hidden = hidden[:, 1:]
        feats = project(model, hidden)  # (T, P' (+1), d)
        selection = list(pos[:, 1:] - 1)  # per tile: original patch indices kept, in order
        images, start = [], 0
        for t_img, size in zip(tiles, sizes):
            t = t_img.shape[0]
            f = feats[start:start + t]
            sel = selection[start:start + t]
            start += t
            if geometry.anyres:
                g = math.isqrt(self.tile_tokens(geometry))
                out = pack_spatial_unpad(model, f, size, g, g)
            else:
                out = f.reshape(-1, f.shape[-1])
            images.append(CompressedImage(out, sel, {"tile_tokens": self.tile_tokens(geometry)}))
        return images

    def start(self, model, plan, kwargs: dict):
        return _IlLaVAState(self, plan)


# ------------------------------------------------------------------------------------ vision tower
def _layer_call(layer, h: torch.Tensor) -> torch.Tensor:
    """An HF CLIP encoder layer's own forward on h (T, n, D), no mask (transformers 4.x returns a tuple)."""
    params = inspect.signature(type(layer).forward).parameters
    kwargs = {"causal_attention_mask": None} if "causal_attention_mask" in params else {}
    out = layer(h, None, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _attention_with_weights(attn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's own self_attn on x, with its attention weights (eager attention)."""
    params = inspect.signature(type(attn).forward).parameters
    kwargs: dict[str, Any] = {"hidden_states": x, "attention_mask": None}
    if "causal_attention_mask" in params:
        kwargs["causal_attention_mask"] = None
    if "output_attentions" in params:
        kwargs["output_attentions"] = True
    out = attn(**kwargs)
    if not isinstance(out, tuple) or len(out) < 2:
        raise MethodError(f"{type(attn).__name__} returned {type(out).__name__}, expected (output, attention weights).")
    return out[0], out[1]


def merge_tile_tokens(h: torch.Tensor, attn: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One iLLaVA vision merge over T tiles at once (module docstring, steps 2-3).

    h (T, n, D) the post-attention residual stream, attn (T, H, n, n) that layer's weights, [CLS] at 0.
    Returns (T, n - r, D) and the kept indices (T, n - r) into 0..n-1, in order.
    """
    T, n, D = h.shape
    s = attn.float().mean(1).mean(1)                         # (T, n): mean attention each token receives
    s[:, 0] = float("inf")                                   # [CLS] is never merged
    low = torch.sort(s, dim=1, stable=True).indices[:, :r + 1]   # (T, r+1): lowest first, ties by position
    w = torch.arange(r + 1, 0, -1, dtype=torch.float32, device=h.device)   # r+1, ..., 1 (official `size`)
    group = h.gather(1, low[..., None].expand(-1, -1, D)).float()          # (T, r+1, D)
    merged = torch.matmul(w[None, None, :].expand(T, 1, r + 1), group) / w.sum()   # (T, 1, D)
    h = h.scatter(1, low[:, r:r + 1, None].expand(-1, -1, D), merged.to(h.dtype))  # into the (r+1)-th lowest
    keep = torch.ones(T, n, dtype=torch.bool, device=h.device).scatter(1, low[:, :r], False)
    idx = keep.nonzero()[:, 1].view(T, n - r)                # (T, n - r) in order
    return h.gather(1, idx[..., None].expand(-1, -1, D)), idx


def merging_tower(model, geometry: ModelGeometry, pixels: torch.Tensor, merge_layers: tuple[int, ...], r: int):
    """The model's CLIP tower over ``pixels`` (T, C, H, W), layer by layer from its own modules, merging ``r``
    tokens in each of ``merge_layers``. Returns the hidden state LLaVA reads (T, 1+P', D) and, per token, its
    index in the tile's original token sequence (T, 1+P'; [CLS] = 0)."""
    tower, _, _ = vision_modules(model)
    vm = getattr(tower, "vision_model", tower)
    for name in ("embeddings", "pre_layrnorm"):
        if not isinstance(getattr(vm, name, None), torch.nn.Module):
            raise MethodError(f"the vision tower {type(tower).__name__} has no {name}; iLLaVA runs a CLIP tower "
                              "(embeddings, pre_layrnorm, encoder.layers) layer by layer.")
    layers = encoder_layers(tower)
    if len(layers) != geometry.vision_layers:
        raise MethodError(f"the vision tower has {len(layers)} layers, its config {geometry.vision_layers}.")
    ref = next(tower.parameters())
    h = vm.pre_layrnorm(vm.embeddings(pixels.to(device=ref.device, dtype=ref.dtype)))  # (T, 1+P, D): hidden_states[0]
    T, n, _ = h.shape
    pos = torch.arange(n, device=h.device).expand(T, n)
    want = geometry.feature_index
    states = [(h, pos)]  # hidden_states[i] and the tokens' original indices
    for i, layer in enumerate(layers):  # every layer, as HF's tower (the FLOPs compare with its full run)
        if i not in merge_layers:
            h = _layer_call(layer, h)
        else:
            for sub in ("layer_norm1", "self_attn", "layer_norm2", "mlp"):
                if not isinstance(getattr(layer, sub, None), torch.nn.Module):
                    raise MethodError(f"vision layer {i} ({type(layer).__name__}) has no {sub}; a CLIP encoder layer is expected.")
            a, weights = _attention_with_weights(layer.self_attn, layer.layer_norm1(h))
            check_attention(weights, T, h.shape[1], i)
            h = h + a                                                     # the residual after attention
            h, idx = merge_tile_tokens(h, weights, r)                     # (T, n - r, D)
            pos = pos.gather(1, idx)
            h = h + layer.mlp(layer.layer_norm2(h))
        states.append((h, pos))
    return states[want]


# ------------------------------------------------------------------------------------- the LLM side
class _IlLaVAState(DropState):
    def __init__(self, cfg: IlLaVAConfig, plan) -> None:
        super().__init__(plan, renumber=False)
        self.cfg = cfg
        self.at = {k - 1 for k in cfg.llm}  # ranked by the attention of the layer before each merge layer

    def queries(self, ctx):
        return last_token_query(ctx.plan) if ctx.layer_idx in self.at else None

    def observe(self, ctx, out, scores):
        if ctx.layer_idx not in self.at:
            return out
        alive = self.current.target                                  # (B, N) vision tokens present
        B, N, _ = out.shape
        ranked = stable_rank(scores, alive)  # (B, N) present tokens first, most attended first
        out = out.clone()
        keep = torch.zeros(B, N, dtype=torch.bool, device=out.device)
        counts = []
        for b, v in enumerate(self.current.V):                       # host integers: no sync
            r = llm_removed(v, self.cfg.llm_keep)
            counts.append(v - r)
            if v == 0:
                continue
            group = ranked[b, v - r - 1:v]                           # (r+1,): the lowest kept, then the r dropped
            w = torch.arange(1, r + 2, dtype=torch.float32, device=out.device)   # 1, ..., r+1 (official `size`)
            merged = torch.matmul(w[None], out[b, group].float()) / w.sum()     # (1, d)
            out[b, group[:1]] = merged.to(out.dtype)                 # layer k's input at the kept token
            keep[b, ranked[b, :v - r]] = True
        self.keep(keep, tuple(counts))
        return out


__all__ = ["IlLaVAConfig", "merge_tile_tokens", "merging_tower", "llm_removed", "valid_vit_r"]
