"""Analytic FLOPs of LLaVA / LLaVA-NeXT / Qwen2.5-VL with any variant (p-MoD, baseline, token pruning).

Conventions (the same as torch's ``FlopCounterMode``, DeepSpeed's profiler and calflops):

* a multiply-add is **2 FLOPs**; fvcore counts it as 1 (its numbers are doubled before comparing);
* only matrix products are counted: weight GEMMs, the two attention products (Q·Kᵀ and P·V) and the
  patch-embedding convolution. Norms, activations, softmax, RoPE, residual adds and the router's
  top-k are left out (< 0.1% of the total for a 7B LLaVA);
* attention is counted **full** by default (every query against every key of its sequence, as
  FlopCounterMode counts ``scaled_dot_product_attention`` and as ``4·n_ctx·d`` in Kaplan et al.);
  the **causal** count (query i sees i+1 keys: ``P(P+1)/2`` pairs instead of ``P²``) is reported
  beside it. The headline is full attention.

Formulas, per sample, for a decoder layer that processes ``P`` tokens (``P = T + kept vision``),
hidden ``d``, query width ``q = H·h``, key/value width ``k = H_kv·h``, MLP width ``m`` (gated):

* weights: ``2·P·(d·q + 2·d·k + q·d + 3·d·m)`` -- Kaplan et al. 2020, "Scaling Laws for Neural
  Language Models", Table 1 (C_forward ≈ 2N per token, N = non-embedding parameters); GQA and the
  gated MLP as in the Llama architecture;
* attention, prefill: ``4·P·S·q`` with ``S = P`` keys (full) or ``2·P·(P+1)·q`` (causal) -- the
  ``2·n_layer·n_ctx·d_attn`` term of Kaplan et al. Table 1, counted for both products;
* attention, decode step: one query against ``S`` cached keys plus itself: ``4·(S+1)·q``;
* p-MoD router (routed layers, prefill only): ``2·N·d`` (a Linear(d, 1) over all N tokens);
* lm_head: ``2·d·vocab`` per position whose logits are computed (the last one in generation;
  all N in a plain forward, the convention of the paper's numbers, see :func:`paper_prefill_flops`);
* CLIP ViT tower, per tile of ``n = patches + 1`` tokens: patch conv ``2·(3·p²)·D·patches``, then per
  layer ``2·n·(4·D² + 2·D·M) + 4·n²·D`` (bidirectional: no causal halving); every layer of the tower
  runs (LLaVA reads layer -2, but HF runs the whole tower);
* projector (mlp2x_gelu): ``2·tokens·(D_in·d + d·d)`` over all tiles' features (before unpadding);
* Qwen2.5-VL's vision tower (patch Conv3d, window and full attention blocks with SwiGLU MLPs) and its patch
  merger (the projector's part): :mod:`.qwen`. Its LLM is a Qwen2 decoder: the formulas above with GQA; its q/k/v
  biases are additions, not matrix products (FlopCounterMode counts ``addmm`` as the product alone);
* LLaVA-OneVision: the CLIP formulas with SigLIP's ``n = patches`` tokens a tile (no [CLS]) and a Qwen2 LLM
  (:mod:`.onevision`);
* several images in one prompt: the vision side of each image, summed; the LLM sees all their tokens.

Training (PaLM, Chowdhery et al. 2022, Appendix B; Narayanan et al. 2021, "Efficient Large-Scale
Language Model Training on GPU Clusters", §5.1): backward = 2 × forward for trained matrices
(input and weight gradients), 1 × forward for frozen matrices that gradients must pass through, 0
for frozen modules with nothing trainable upstream (LLaVA's frozen vision encoder).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable, Optional, Sequence

from .arch import Arch, TextDims, VisionLayout
from .geometry import geometry_of


@dataclass(frozen=True)
class LLMFlops:
    """FLOPs of one LLM forward (prefill or one decode step), per sample, by component."""

    linear: int = 0
    attention_full: int = 0
    attention_causal: int = 0
    router: int = 0
    lm_head: int = 0

    def total(self, attention: str = "full") -> int:
        attn = {"full": self.attention_full, "causal": self.attention_causal, "none": 0}[attention]
        return self.linear + attn + self.router + self.lm_head

    def __add__(self, other: "LLMFlops") -> "LLMFlops":
        return LLMFlops(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def scaled(self, k: float) -> "LLMFlops":
        return LLMFlops(**{f.name: int(round(getattr(self, f.name) * k)) for f in fields(self)})


@dataclass(frozen=True)
class VisionFlops:
    """FLOPs of the vision side of one sample: encoder (all tiles) and projector."""

    encoder: int
    projector: int

    @property
    def total(self) -> int:
        return self.encoder + self.projector


def layer_flops(text: TextDims, processed: int, keys: Optional[int] = None, causal_prefill: bool = True) -> tuple[int, int, int]:
    """(weights, attention full, attention causal) FLOPs of one layer for ``processed`` query tokens.

    ``keys`` = keys each query sees in the full count (default: ``processed``, a prefill without
    cache). The causal count of a prefill sums 1..P keys; a decode step (``keys`` given) is already
    exact, so both counts agree.
    """
    P = processed
    weights = 2 * P * text.linear_macs_per_token
    if keys is None:
        full = 4 * P * P * text.q_dim
        causal = 2 * P * (P + 1) * text.q_dim if causal_prefill else full
    else:
        full = causal = 4 * P * keys * text.q_dim
    return weights, full, causal


def llm_prefill_flops(
    text: TextDims,
    text_tokens: int,
    vision_tokens: int,
    kept: Sequence[int],
    router_layers: Iterable[int] = (),
    logits_tokens: int = 1,
) -> LLMFlops:
    """Prefill of one sample: layer l processes ``text_tokens + kept[l]`` tokens."""
    if len(kept) != text.layers:
        raise ValueError(f"kept has {len(kept)} entries for {text.layers} layers")
    N = text_tokens + vision_tokens
    lin = full = causal = 0
    for k in kept:
        w, f, c = layer_flops(text, text_tokens + k)
        lin, full, causal = lin + w, full + f, causal + c
    router = 2 * N * text.hidden * len(list(router_layers))
    lm_head = 2 * text.hidden * text.vocab * logits_tokens
    return LLMFlops(linear=lin, attention_full=full, attention_causal=causal, router=router, lm_head=lm_head)


def llm_decode_flops(text: TextDims, past: Sequence[int]) -> LLMFlops:
    """One decode step of one sample: one new token per layer, attending to ``past[l]`` cached entries + itself."""
    lin = attn = 0
    for s in past:
        w, f, _ = layer_flops(text, 1, keys=s + 1)
        lin, attn = lin + w, attn + f
    return LLMFlops(linear=lin, attention_full=attn, attention_causal=attn, router=0, lm_head=2 * text.hidden * text.vocab)


def llm_decode_mean(text: TextDims, prefill_entries: Sequence[int], steps: int) -> LLMFlops:
    """Mean decode-step FLOPs over ``steps`` steps; step t attends to ``prefill_entries[l] + t`` entries."""
    steps = max(int(steps), 1)
    first = llm_decode_flops(text, prefill_entries)
    # attention grows linearly with t: the mean step sees (steps - 1) / 2 extra keys per layer
    extra = 4 * text.q_dim * text.layers * (steps - 1) / 2
    return LLMFlops(
        linear=first.linear, attention_full=int(round(first.attention_full + extra)),
        attention_causal=int(round(first.attention_causal + extra)), router=0, lm_head=first.lm_head,
    )


def vision_flops(arch: Arch, layout: VisionLayout) -> VisionFlops:
    """CLIP tower over every tile + the mlp2x_gelu projector, per sample (all its images; another host's own tower:
    :meth:`.geometry.HostGeometry.vision_flops`, e.g. :func:`.qwen.vision_tower_flops`)."""
    v = arch.vision
    host = geometry_of(arch.family)
    own = host.vision_flops(arch, layout) if host else None
    if own is not None:
        return VisionFlops(*own)
    n = v.seq_len
    conv = 2 * v.channels * v.patch_size**2 * v.hidden * v.patches
    per_layer = 2 * n * (4 * v.hidden * v.hidden + 2 * v.hidden * v.intermediate) + 4 * n * n * v.hidden
    encoder = layout.tiles * (conv + v.layers * per_layer)
    projector = 2 * layout.projector_tokens * (arch.projector_in * arch.projector_hidden + arch.projector_hidden**2)
    return VisionFlops(encoder=encoder, projector=projector)


def paper_prefill_flops(text: TextDims, text_tokens: int, vision_tokens: int, kept: Sequence[int], router_layers: Iterable[int] = ()) -> int:
    """The convention that reproduces the paper's TFLOPs (Tables 1, 5, 7).

    Weights of the decoder layers for the processed tokens + routers + lm_head over **all** N
    positions; attention products and the vision tower **not** counted. This is what DeepSpeed's
    FLOPs profiler reports for a plain forward when attention runs in flash-attention kernels it
    cannot see. With 58 text tokens it gives 39.46 TFLOPs for LLaVA-NeXT-7B at 2,928 vision tokens
    and 8.38 for LLaVA-1.5-7B at 576: the paper's baselines.
    """
    f = llm_prefill_flops(text, text_tokens, vision_tokens, kept, router_layers, logits_tokens=text_tokens + vision_tokens)
    return f.total("none")


# ------------------------------------------------------------------------------------------ training
@dataclass(frozen=True)
class TrainFlops:
    """Model FLOPs of one training sample (forward + backward, no recomputation)."""

    forward: int
    backward: int

    @property
    def total(self) -> int:
        return self.forward + self.backward


def train_flops(
    llm: LLMFlops,
    vision: VisionFlops,
    train_llm: bool = True,
    train_projector: bool = True,
    train_vision: bool = False,
    attention: str = "full",
) -> TrainFlops:
    """Forward + backward FLOPs of one sample from its forward FLOPs (logits over all tokens).

    backward = 2 x forward for trained parts, 1 x for frozen parts that gradients pass through (the
    LLM when only the projector trains), 0 for frozen parts with nothing trainable upstream.
    """
    llm_fwd = llm.total(attention)
    fwd = llm_fwd + vision.total
    if train_llm:
        bwd_llm = 2 * llm_fwd
    elif train_projector or train_vision:
        bwd_llm = llm_fwd  # input gradients only, to reach the projector
    else:
        bwd_llm = 0
    bwd_proj = 2 * vision.projector if train_projector else (vision.projector if train_vision else 0)
    bwd_vis = 2 * vision.encoder if train_vision else 0
    return TrainFlops(forward=fwd, backward=bwd_llm + bwd_proj + bwd_vis)


__all__ = [
    "LLMFlops", "VisionFlops", "TrainFlops", "layer_flops", "llm_prefill_flops", "llm_decode_flops",
    "llm_decode_mean", "vision_flops", "paper_prefill_flops", "train_flops",
]
