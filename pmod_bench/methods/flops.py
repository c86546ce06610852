"""Analytic FLOPs of one sample under a comparison method (see :mod:`.accounting` for the conventions).

Light at import (the profiler and torch load on use). Works on any method config through the
:class:`~pmod_bench.methods.base.MethodConfig` interface (``check_model``, ``account``,
``layer_vision_tokens``, ``extra_flops``): :meth:`MethodConfig.method_flops` picks the function.
"""

from __future__ import annotations

from dataclasses import dataclass

from .geometry import ModelGeometry, VisionAccount, checked_geometry


@dataclass(frozen=True)
class MethodFlops:
    """Analytic FLOPs of one sample under a method (2 per multiply-add)."""

    vision_encoder: int
    projector: int
    method_extra: int
    llm_prefill: int
    """LLM prefill, the profiler's headline (attention full, lm_head on ``logits_tokens`` positions)"""
    llm_prefill_paper: int
    """the paper's convention (decoder weights + lm_head on all positions, no attention products)"""
    llm_vision_tokens: int
    baseline_vision_tokens: int
    exact: bool = True
    note: str = ""
    layer_vision_tokens: tuple = ()
    """In-LLM methods: vision tokens each LLM layer processes and caches (empty: ``llm_vision_tokens`` at every layer)."""
    llm_extra: int = 0
    """In-LLM methods: their own products inside the LLM (attention rows, extra projections, clustering),
    already included in ``llm_prefill`` / ``llm_prefill_paper``."""

    @property
    def vision(self) -> int:
        return self.vision_encoder + self.projector + self.method_extra

    @property
    def ttft(self) -> int:
        return self.vision + self.llm_prefill

    @property
    def kv_ratio(self) -> float:
        if self.layer_vision_tokens:
            return sum(self.layer_vision_tokens) / (len(self.layer_vision_tokens) * self.baseline_vision_tokens)
        return self.llm_vision_tokens / self.baseline_vision_tokens


def _image_hw(image_size: tuple[int, int]) -> tuple[int, int]:
    """The profiler's (width, height) -> the processor's (height, width)."""
    return int(image_size[1]), int(image_size[0])


def method_account(cfg, arch, image_size: tuple[int, int]) -> tuple[ModelGeometry, VisionAccount, int]:
    """(geometry, the method's account of one image, the baseline's vision tokens) on ``arch`` at (width, height)."""
    from pmod_bench.profiler.arch import vision_layout

    geometry = checked_geometry(cfg, arch.config)
    layout = vision_layout(arch, image_size)
    acc = cfg.account(geometry, layout.tiles, _image_hw(image_size), arch.config)
    return geometry, acc, layout.vision_tokens


def tower_flops(arch, tokens: int, tiles: int) -> int:
    """CLIP / SigLIP tower over ``tiles`` tiles of ``tokens`` tokens (patches, + [CLS] on CLIP): patch conv + every layer."""
    v = arch.vision
    conv = 2 * v.channels * v.patch_size ** 2 * v.hidden * (tokens - (v.seq_len - v.patches))  # patches ([CLS] or not)
    per_layer = 2 * tokens * (4 * v.hidden * v.hidden + 2 * v.hidden * v.intermediate) + 4 * tokens * tokens * v.hidden
    return tiles * (conv + v.layers * per_layer)


def vision_method_flops(cfg, arch, image_size: tuple[int, int], text_tokens: int, logits_tokens: int = 1) -> MethodFlops:
    """A vision-stage method: its vision side (:meth:`MethodConfig.account`), the LLM on the tokens it leaves."""
    from pmod_bench.profiler.flops import llm_prefill_flops, paper_prefill_flops

    if checked_geometry(cfg, arch.config).merge:
        return _merged_method_flops(cfg, arch, image_size, text_tokens, logits_tokens)
    _, acc, base_v = method_account(cfg, arch, image_size)
    t = arch.text
    V = acc.llm_tokens
    kept = [V] * t.layers
    llm = llm_prefill_flops(t, text_tokens, V, kept, (), logits_tokens).total("full")
    paper = paper_prefill_flops(t, text_tokens, V, kept)
    projector = 2 * acc.projector_tokens * (arch.projector_in * arch.projector_hidden + arch.projector_hidden ** 2)
    return MethodFlops(vision_encoder=tower_flops(arch, acc.tower_tokens, acc.tower_tiles), projector=projector,
                       method_extra=acc.extra_flops, llm_prefill=llm, llm_prefill_paper=paper, llm_vision_tokens=V,
                       baseline_vision_tokens=base_v, exact=acc.exact, note=acc.note)


def _merged_method_flops(cfg, arch, image_size: tuple[int, int], text_tokens: int, logits_tokens: int) -> MethodFlops:
    """Qwen2.5-VL: the whole tower and merger (the profiler's count of the image), the LLM on the merged tokens the
    method keeps (``cfg.merged_tokens(V)``), the method's own products (``cfg.merged_extra(arch, V)``)."""
    from pmod_bench.profiler.arch import vision_layout
    from pmod_bench.profiler.flops import llm_prefill_flops, paper_prefill_flops, vision_flops

    layout = vision_layout(arch, image_size)
    V, t = layout.images * cfg.merged_tokens(layout.vision_tokens // layout.images), arch.text
    vis = vision_flops(arch, layout)
    llm = llm_prefill_flops(t, text_tokens, V, [V] * t.layers, (), logits_tokens).total("full")
    return MethodFlops(vision_encoder=vis.encoder, projector=vis.projector,
                       method_extra=layout.images * cfg.merged_extra(arch, layout.vision_tokens // layout.images), llm_prefill=llm,
                       llm_prefill_paper=paper_prefill_flops(t, text_tokens, V, [V] * t.layers), llm_vision_tokens=V,
                       baseline_vision_tokens=layout.vision_tokens)


def resized_merged_flops(cfg, arch, image_size: tuple[int, int], text_tokens: int, logits_tokens: int = 1) -> MethodFlops:
    """Qwen2.5-VL, downsampling: the profiler's processed image (``smart_resize`` within its pixel range) resized by
    ``cfg.merged_size``; the tower + merger on that grid (the profiler's own count of a grid) and the LLM on its merged
    tokens."""
    import dataclasses

    from pmod_bench.profiler.arch import vision_layout
    from pmod_bench.profiler.flops import llm_prefill_flops, paper_prefill_flops, vision_flops
    from pmod_bench.profiler.qwen import QwenGrid, merged_tokens

    layout = vision_layout(arch, image_size)
    rw, rh = layout.resized
    h, w = cfg.merged_size(rh, rw)
    grid = QwenGrid(resized=(w, h), patches=(h // arch.vision.patch_size, w // arch.vision.patch_size))
    V = merged_tokens(arch.vision, grid) * layout.images
    small = dataclasses.replace(layout, resized=grid.resized, patches=grid.patches, vision_tokens=V, projector_tokens=V)
    vis, t = vision_flops(arch, small), arch.text
    return MethodFlops(vision_encoder=vis.encoder, projector=vis.projector, method_extra=0,
                       llm_prefill=llm_prefill_flops(t, text_tokens, V, [V] * t.layers, (), logits_tokens).total("full"),
                       llm_prefill_paper=paper_prefill_flops(t, text_tokens, V, [V] * t.layers), llm_vision_tokens=V,
                       baseline_vision_tokens=layout.vision_tokens, note=f"image resized to {w}x{h} px")


def llm_method_flops(cfg, arch, image_size: tuple[int, int], text_tokens: int, logits_tokens: int = 1):
    """:class:`MethodFlops` of one sample under an in-LLM method: the baseline's vision side, the LLM with
    ``cfg.layer_vision_tokens`` vision tokens per layer, plus the method's own products (``cfg.extra_flops``)."""
    from pmod_bench.profiler.arch import vision_layout
    from pmod_bench.profiler.flops import llm_prefill_flops, paper_prefill_flops, vision_flops

    checked_geometry(cfg, arch.config)
    layout = vision_layout(arch, image_size)  # the profiler's vision tokens of the host (LLaVA tiles, Qwen's merged grid)
    V, t = layout.vision_tokens, arch.text
    kept = cfg.layer_vision_tokens(t.layers, V)
    extra = cfg.extra_flops(t, text_tokens, V)
    llm = llm_prefill_flops(t, text_tokens, V, kept, (), logits_tokens).total("full")
    paper = paper_prefill_flops(t, text_tokens, V, kept)
    vis = vision_flops(arch, layout)
    return MethodFlops(vision_encoder=vis.encoder, projector=vis.projector, method_extra=0, llm_prefill=llm + extra,
                       llm_prefill_paper=paper + extra, llm_vision_tokens=min(kept), baseline_vision_tokens=V,
                       layer_vision_tokens=tuple(kept), llm_extra=extra,
                       note=f"in-LLM method: its own products ({extra / 1e12:.4f} TFLOPs) are counted in llm_prefill")


__all__ = ["MethodFlops", "method_account", "tower_flops", "vision_method_flops", "resized_merged_flops", "llm_method_flops"]
