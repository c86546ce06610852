"""PyramidDrop (Xing et al., CVPR 2025), training-free inference form: drop vision tokens at stage boundaries.

Follows Cooperx521/PyramidDrop at commit 6444f304aee4b7edcb022839fb9e8cd07859704a
(``llava/model/modeling_llama_pdrop.py``: ``pdrop_forward``, ``pdrop_rank_drop``;
``llava/model/llava_arch.py``: ``prepare_inputs_labels_for_multimodal_pdrop``; the eval scripts
``scripts/v1_6/pdrop_eval/*.sh``). The LLM is split into stages at ``layers`` (official
``layer_list``); at the boundary layer ``l_s`` of stage ``s`` (``s = 1, 2, ...``), in the prefill:

1. before layer ``l_s`` runs, its **own** ``input_layernorm``, ``q_proj`` and ``k_proj`` are applied to
   the tokens present; the query of the **last instruction token** (the last token of the prompt)
   against every key gives a softmax row per head (scaled by 1/sqrt(head_dim), causal mask),
   averaged over heads;
2. of the vision tokens present, the top ``int(V * lambda^s)`` by that score are kept, ``V`` = the
   image's vision tokens at the start (official ``image_token_ratio_list = [1, λ, λ², λ³]``, counts
   ``int(image_tokens * ratio)``); the others are cut out of the sequence for layers ``l_s..L-1``;
3. the tokens left are **renumbered**: position ids ``0..n-1`` over what is left (official
   ``position_ids[i, :cur_len] = arange(cur_len)``), so the RoPE positions of later layers close the
   gaps; decode steps continue with the same shift per stage (official: ``position_ids -
   (cur_visual_length - next_visual_length)`` at each boundary).

Defaults: ``layers=8-16-24, lam=0.5`` (the official LLaVA-NeXT and LLaVA-1.5 settings:
``--layer_list '[8,16,24]' --image_token_ratio_list "[0.5,0.25,0.125]"``). ``V`` counts every
image-feature position, LLaVA-NeXT's newline features included (``image_features[i].shape[0]``).

Where this deviates, and why:

* ranking ties are broken by position (``topk`` leaves them unspecified); the softmax stays in float32
  (the official casts to the model dtype before averaging);
* only the query row is projected for the ranking (the official projects q, k and v of every token
  and uses one row); the extra k projection of the tokens present is counted in the FLOPs;
* batches with left padding (the official code supports right padding only): positions are
  renumbered per sample over its own real tokens, which is what the official code computes for
  each sample of a right-padded batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pmod_bench.model.rows import probe_attention

from .base import MethodError, ModelGeometry, param, register_method
from .llm import RATIO_GRID, DropState, LLMMethodConfig, keep_top, last_token_query, parse_layers, row_flops


@register_method("pyramiddrop")
@dataclass
class PyramidDropConfig(LLMMethodConfig):
    """PyramidDrop: at each stage boundary keep int(V * lam^s) vision tokens, ranked by the last instruction token's attention."""

    official: ClassVar[str] = "Cooperx521/PyramidDrop@6444f304aee4b7edcb022839fb9e8cd07859704a"
    renumbers: ClassVar[bool] = True

    layers: str = "8-16-24"
    """Stage boundaries: the layers before which rank & drop happens, '-' separated (official layer_list)."""
    lam: float = param(0.5, low=0.0, high=1.0, low_open=True)
    """lambda: the fraction of the image's vision tokens kept is lam^s after boundary s (official image_token_ratio_list)."""

    def validate(self) -> None:
        b = parse_layers(self.layers, "pyramiddrop: layers")
        if b[0] < 1:
            raise MethodError("pyramiddrop: the first boundary must be >= 1 (rank & drop happens after a layer).")

    @property
    def boundaries(self) -> tuple[int, ...]:
        return parse_layers(self.layers, "pyramiddrop: layers")

    def first_layer(self) -> int:
        return self.boundaries[0]

    def check_model(self, geometry: ModelGeometry) -> None:
        if self.boundaries[-1] >= geometry.text_layers:
            raise MethodError(f"pyramiddrop: layers {self.layers} go beyond the LLM's {geometry.text_layers} layers "
                              f"(boundaries must be in [1, {geometry.text_layers - 1}]).")

    def candidates(self, geometry: ModelGeometry) -> list["PyramidDropConfig"]:
        return [self.replace(lam=r) for r in RATIO_GRID]

    def budget(self) -> dict[str, Any]:
        return {"layers": self.layers, "lam": self.lam}

    def stage_count(self, V: int, stage: int) -> int:
        """int(V * lam^stage), as the official ``int(image_token * image_token_ratio_list[stage])``."""
        return int(V * self.lam ** stage)

    def layer_vision_tokens(self, num_layers: int, V: int) -> list[int]:
        out = []
        for l in range(num_layers):
            s = sum(1 for b in self.boundaries if l >= b)
            out.append(self.stage_count(V, s))
        return out

    def extra_flops(self, text, text_tokens: int, V: int) -> int:
        total = 0
        for s in range(len(self.boundaries)):
            present = text_tokens + self.stage_count(V, s)
            # k_proj of every token present + q_proj of the query row + its attention row
            total += 2 * present * text.hidden * text.kv_dim + 2 * text.hidden * text.q_dim + row_flops(text, 1, present)
        return total

    def start(self, model, plan, kwargs: dict):
        return _PyramidDropState(self, plan)


class _PyramidDropState(DropState):
    def __init__(self, cfg: PyramidDropConfig, plan) -> None:
        super().__init__(plan, renumber=True)
        self.cfg = cfg
        self.V0 = plan.V
        self.stage = {b: s + 1 for s, b in enumerate(cfg.boundaries)}

    def prepare(self, ctx, x):
        s = self.stage.get(ctx.layer_idx)
        if s is not None:  # rank by this layer's own attention over the tokens present, then drop
            scores = probe_attention(ctx.layer, ctx.plan, self.current, x, last_token_query(ctx.plan), ctx.kwargs)
            ks = tuple(self.cfg.stage_count(v, s) for v in self.V0)
            self.keep(keep_top(scores, self.current.target, ks), ks)
        return x
