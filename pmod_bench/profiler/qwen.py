"""Qwen2.5-VL in the profiler: vision tokens by Qwen's own resize rule, the vision tower's FLOPs (analytic and
FlopCounterMode on the meta device). The LLM side is the shared :class:`~.arch.TextDims` accounting (a Qwen2 decoder:
GQA, q/k/v biases, gated MLP); p-MoD's kept vision tokens per layer do not depend on the host.

Vision tokens (``Qwen2VLImageProcessor``): the image is resized with transformers' own ``smart_resize`` to a
multiple of ``factor = patch_size x spatial_merge_size = 28`` px on each side, its area brought into
``[min_pixels, max_pixels]`` (defaults: lmms-eval 0.7.3's ``qwen2_5_vl`` model, ``256·28·28`` and ``1605632``);
the tower sees ``(h/14)·(w/14)`` patches and the merger hands the LLM ``(h/28)·(w/28)`` tokens: 1344x1008 ->
1,728 (under the default max_pixels, so not rescaled).

Vision tower FLOPs per image of ``n = (h/14)·(w/14)`` patches, width ``D``, MLP width ``M``, out width ``d``
(2 FLOPs per multiply-add, matrix products only, as :mod:`.flops`; ``Qwen2_5_VisionTransformerPretrainedModel``):

* patch embedding, a Conv3d over ``temporal_patch_size`` (2) frames of ``p x p`` px: ``2·n·(3·2·p²)·D``;
* each of the ``depth`` blocks: ``2·n·(4·D² + 3·D·M)`` (qkv, proj, the SwiGLU gate/up/down) plus attention
  ``4·D·Σ s²`` over its attention segments ``s``: one segment of ``n`` patches in the full-attention blocks
  (``fullatt_block_indexes``), else HF's window partition (``get_vision_window_index``): the merged grid
  ``(h/28) x (w/28)`` cut into windows of ``window_size / 28`` (4) merged patches a side from the top-left, the
  last row / column of windows smaller; a window of ``r x c`` merged patches is a segment of ``4·r·c`` patches,
  so ``Σ s² = 16·(Σ r²)·(Σ c²)``. Bidirectional: no causal halving;
* the patch merger (RMSNorm, Linear(4D, 4D), GELU, Linear(4D, d)) on the ``n / 4`` merged tokens:
  ``2·(n/4)·(16·D² + 4·D·d)``. It plays the projector's part (trained with the LLM, the tower frozen).

Videos (:meth:`QwenHost.video_layout`, the frames as :mod:`.video` counts them): every frame resized as lmms-eval's
``qwen2_5_vl`` resizes it (:func:`video_frame_size`), frames paired by the Conv3d (``temporal_patch_size`` 2), each pair
one grid through the tower (attention within the pair; windows within it): tokens = ``ceil(T/2)·(h/28)·(w/28)``,
tower and merger FLOPs = pairs x one image's of the resized frame. 32 frames of 640x360: 16 x 13x23 = 4,784 tokens.

Hub configs: ``pmod_bench.model.presets.QWEN2_5_VL_HUB`` (Qwen/Qwen2.5-VL-{3B,7B,32B,72B}-Instruct). This module
imports only :mod:`.errors` and :mod:`.geometry` at import time (and :mod:`.arch` inside its methods); the profiler reaches it through
its :class:`~.geometry.HostGeometry`, :data:`HOST`. Several images in one prompt: each is resized on its own and its patches attend
within the image (HF's ``cu_seqlens`` per image), so tokens and vision FLOPs add up image by image.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from .errors import ProfileError
from .geometry import HostGeometry

#: ``Arch.family`` of Qwen2.5-VL architectures (the HF ``model_type``)
QWEN_FAMILY = "qwen2_5_vl"
#: lmms-eval 0.7.3 ``lmms_eval/models/simple/qwen2_5_vl.py`` defaults (what its evaluations resize with)
LMMS_EVAL_MIN_PIXELS = 256 * 28 * 28
LMMS_EVAL_MAX_PIXELS = 1605632


@dataclass(frozen=True)
class QwenVisionDims:
    """Qwen2.5-VL's ViT (7B: 32 blocks of width 1280, MLP 3420, 16 heads, 14 px patches over 2 frames, 112 px windows,
    full attention in blocks 7/15/23/31, 2x2 merger to 3584) and the processor's pixel range."""

    depth: int
    hidden: int
    intermediate: int
    heads: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    window_size: int
    fullatt_blocks: tuple[int, ...]
    out_hidden: int
    channels: int = 3
    min_pixels: int = LMMS_EVAL_MIN_PIXELS
    max_pixels: int = LMMS_EVAL_MAX_PIXELS

    def __post_init__(self) -> None:
        for name in ("min_pixels", "max_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ProfileError(f"--{name.replace('_', '-')} must be a whole number of pixels >= 1, got {value!r}.")
        if self.min_pixels > self.max_pixels:
            raise ProfileError(f"--min-pixels {self.min_pixels} is above --max-pixels {self.max_pixels}; give min <= max "
                               f"(lmms-eval's defaults: {LMMS_EVAL_MIN_PIXELS} and {LMMS_EVAL_MAX_PIXELS}).")

    @property
    def layers(self) -> int:
        return self.depth

    @property
    def factor(self) -> int:
        """Pixels per side of one merged patch (LLM token): 28."""
        return self.patch_size * self.merge_size

    @property
    def window_units(self) -> int:
        """Merged patches per side of an attention window (``window_size // merge // patch``, HF's integer division)."""
        return self.window_size // self.merge_size // self.patch_size

    @property
    def full_blocks(self) -> int:
        return len({i for i in self.fullatt_blocks if 0 <= i < self.depth})

    @property
    def patch_dim(self) -> int:
        return self.channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merger_in(self) -> int:
        return self.hidden * self.merge_size**2

    @property
    def params(self) -> int:
        """Patch embedding (no bias) + blocks (qkv, proj, SwiGLU MLP, all with biases; two RMSNorms)."""
        d, m = self.hidden, self.intermediate
        block = 4 * d * d + 4 * d + 3 * d * m + 2 * m + d + 2 * d
        return self.patch_dim * d + self.depth * block

    @property
    def merger_params(self) -> int:
        return self.hidden + self.merger_in * self.merger_in + self.merger_in + self.merger_in * self.out_hidden + self.out_hidden


def vision_dims_from_config(vc: Any) -> QwenVisionDims:
    """:class:`QwenVisionDims` of an HF ``Qwen2_5_VLVisionConfig`` (lmms-eval's pixel range)."""
    return QwenVisionDims(
        depth=vc.depth, hidden=vc.hidden_size, intermediate=vc.intermediate_size, heads=vc.num_heads,
        patch_size=int(vc.patch_size), temporal_patch_size=int(vc.temporal_patch_size), merge_size=vc.spatial_merge_size,
        window_size=vc.window_size, fullatt_blocks=tuple(vc.fullatt_block_indexes), out_hidden=vc.out_hidden_size,
        channels=getattr(vc, "in_channels", 3),
    )


@dataclass(frozen=True)
class QwenGrid:
    """One image through Qwen2.5-VL's processor."""

    resized: tuple[int, int]
    """(width, height) after ``smart_resize``: multiples of 28 px"""
    patches: tuple[int, int]
    """(rows, cols) of vision-tower patches"""

    @property
    def num_patches(self) -> int:
        return self.patches[0] * self.patches[1]


def resize(v: QwenVisionDims, image_size: tuple[int, int]) -> QwenGrid:
    """The processor's geometry for an image of ``image_size`` (width, height): transformers' ``smart_resize``."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    w, h = image_size
    try:
        rh, rw = smart_resize(h, w, factor=v.factor, min_pixels=v.min_pixels, max_pixels=v.max_pixels)
    except ValueError as exc:  # an aspect ratio above 200
        raise ProfileError(f"image {w}x{h}: Qwen2.5-VL's processor refuses it ({exc}); use a less extreme --image-size.") from None
    return QwenGrid(resized=(rw, rh), patches=(rh // v.patch_size, rw // v.patch_size))


def video_frame_size(v: QwenVisionDims, frame_size: tuple[int, int], read: int) -> QwenGrid:
    """Every frame of a video of ``frame_size`` (width, height) of which ``read`` frames were read, as lmms-eval's
    ``qwen2_5_vl`` sizes it (the geometry of each frame; the frame count is the caller's):

    1. ``qwen_vl_utils.fetch_video`` (0.0.14): a per-frame budget ``max_pixels = max(min(VIDEO_MAX_TOKEN_NUM·28²,
       total_pixels / read · FRAME_FACTOR), int(min_pixels · 1.05))`` with ``total_pixels = MODEL_SEQ_LEN · 28² · 0.9``
       (128000 tokens: 90,316,800 px), capped by the ``max_pixels`` lmms-eval passes, then qwen-vl-utils' own
       ``smart_resize`` within ``[min_pixels, max_pixels]``: 1280x720 -> 1008x560 (720 tokens a frame pair) up to 300
       frames read, 644x336 (276) at 768 (qwen-vl-utils' most: a clip of 6.4 minutes or more at 2 fps); 640x360 ->
       644x364 (299) up to 768 frames read;
    2. the processor's ``Qwen2VLVideoProcessor`` (``cap_pixels_per_frame`` unset: no budget of its own) resizes the
       frames again with transformers' ``smart_resize`` within the processor's ``[min_pixels, max_pixels]``: a frame
       the budget shrank below ``min_pixels`` is scaled back up (``--frames 1200`` of 640x360: 588x336 -> 616x364).
    """
    import qwen_vl_utils.vision_process as qvu
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize

    w, h = frame_size
    factor = v.factor
    total_pixels = qvu.MODEL_SEQ_LEN * factor * factor * 0.9
    budget = max(min(qvu.VIDEO_MAX_TOKEN_NUM * factor * factor, total_pixels / read * qvu.FRAME_FACTOR), int(v.min_pixels * 1.05))
    budget = min(v.max_pixels, budget)
    try:
        rh, rw = qvu.smart_resize(h, w, factor=factor, min_pixels=v.min_pixels, max_pixels=budget)
        rh, rw = smart_resize(rh, rw, factor=factor, min_pixels=v.min_pixels, max_pixels=v.max_pixels)
    except ValueError as exc:  # an aspect ratio above 200
        raise ProfileError(f"frames of {w}x{h}: Qwen2.5-VL's processor refuses them ({exc}); use a less extreme --frame-size.") from None
    except ZeroDivisionError:  # qwen-vl-utils floored a side to 0 px
        raise ProfileError(f"frames of {w}x{h}: qwen-vl-utils shrinks a side to 0 px; use a less extreme --frame-size.") from None
    return QwenGrid(resized=(rw, rh), patches=(rh // v.patch_size, rw // v.patch_size))


def merged_tokens(v: QwenVisionDims, grid: QwenGrid) -> int:
    """LLM tokens of one image: ``(h/28)·(w/28)``, the merger's output rows (``image_grid_thw.prod() // 4``)."""
    return grid.num_patches // v.merge_size**2


def _chunks(n: int, size: int) -> list[int]:
    return [size] * (n // size) + ([n % size] if n % size else [])


def window_segments(v: QwenVisionDims, grid: QwenGrid) -> list[int]:
    """Patches per attention window of one image, in HF's window order (see the module docstring)."""
    rows, cols = (p // v.merge_size for p in grid.patches)
    units = v.merge_size**2
    return [r * c * units for r in _chunks(rows, v.window_units) for c in _chunks(cols, v.window_units)]


def vision_tower_flops(v: QwenVisionDims, grid: QwenGrid) -> tuple[int, int]:
    """(tower, merger) FLOPs of one image (the module docstring's formulas)."""
    n, d, m = grid.num_patches, v.hidden, v.intermediate
    embed = 2 * n * v.patch_dim * d
    linear = 2 * n * (4 * d * d + 3 * d * m)
    full = 4 * d * n * n
    windowed = 4 * d * sum(s * s for s in window_segments(v, grid))
    tower = embed + v.depth * linear + v.full_blocks * full + (v.depth - v.full_blocks) * windowed
    merger = 2 * (n // v.merge_size**2) * (v.merger_in * v.merger_in + v.merger_in * v.out_hidden)
    return tower, merger


def vision_tower_meta(visual: Any, v: QwenVisionDims, grid: QwenGrid, images: int, counter: Callable[[], Any],
                      temporal: int = 1) -> tuple[int, int]:
    """(tower, merger) FLOPs of ``images`` copies of the image (a video: ``temporal`` frame pairs of ``grid``, HF's
    ``grid_thw`` ``[temporal, rows, cols]``), counted by ``counter()`` (a FlopCounterMode) around
    the HF tower's own modules on meta tensors: ``patch_embed``, every block with the attention segments HF's
    ``get_vision_cu_seqlens`` / ``get_vision_window_index`` give (full or windowed; blocks of one kind have identical
    shapes and are counted once), and ``merger``, as ``Qwen2_5_VisionTransformerPretrainedModel.forward`` runs them.
    The window permutation and the rotary tables cost no matrix products and are left out (meta tensors of their
    shape stand in)."""
    import torch
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_window_index

    grid_thw = torch.tensor([[temporal, *grid.patches]] * images)
    full_cu = get_vision_cu_seqlens(grid_thw)
    _, window_cu = get_vision_window_index(grid_thw, spatial_merge_size=v.merge_size, window_size=v.window_size,
                                           patch_size=v.patch_size)
    n = images * temporal * grid.num_patches
    with torch.no_grad():
        pixels = torch.empty(n, v.patch_dim, device="meta")
        with counter() as fc:
            h = visual.patch_embed(pixels)
        tower = fc.get_total_flops()
        rope = torch.empty(n, v.hidden // v.heads, device="meta")
        per_kind: dict[bool, int] = {}
        for i, block in enumerate(visual.blocks):
            full = i in visual.fullatt_block_indexes
            if full not in per_kind:
                with counter() as fc:
                    block(h, cu_seqlens=full_cu if full else window_cu, position_embeddings=(rope, rope))
                per_kind[full] = fc.get_total_flops()
            tower += per_kind[full]
        with counter() as fc:
            visual.merger(h)
    return tower, fc.get_total_flops()


class QwenHost(HostGeometry):
    family = QWEN_FAMILY
    label = "Qwen2.5-VL"
    config_class = "Qwen2_5_VLConfig"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    pending = None

    def arch(self, name: str, cfg: Any):
        """A Qwen2 decoder (GQA, q/k/v biases; its attention's head_dim is hidden / heads) and this module's tower."""
        from .arch import Arch, TextDims

        tc = cfg.text_config
        text = TextDims(layers=tc.num_hidden_layers, hidden=tc.hidden_size, intermediate=tc.intermediate_size,
                        heads=tc.num_attention_heads, kv_heads=tc.num_key_value_heads,
                        head_dim=tc.hidden_size // tc.num_attention_heads, vocab=tc.vocab_size, qkv_bias=True)
        vision = vision_dims_from_config(cfg.vision_config)
        return Arch(name=name, family=QWEN_FAMILY, text=text, vision=vision, projector_hidden=vision.out_hidden,
                    image_token_id=int(cfg.image_token_id), pmod=getattr(cfg, "pmod", None), config=cfg)

    def layout(self, arch: Any, image_size: tuple[int, int], images: int):
        """One image: the tower sees it whole after :func:`resize`; the merger hands the LLM :func:`merged_tokens`."""
        from .arch import VisionLayout

        grid = resize(arch.vision, image_size)
        tokens = merged_tokens(arch.vision, grid)
        return VisionLayout(image_size=tuple(image_size), tiles=1, projector_tokens=tokens, vision_tokens=tokens,
                            resized=grid.resized, patches=grid.patches)

    def with_pixels(self, arch: Any, min_pixels: Any, max_pixels: Any) -> Any:
        v = arch.vision
        vision = dataclasses.replace(v, min_pixels=v.min_pixels if min_pixels is None else min_pixels,
                                     max_pixels=v.max_pixels if max_pixels is None else max_pixels)
        return dataclasses.replace(arch, vision=vision)

    def video_layout(self, arch: Any, frame_size: tuple[int, int], video: Any):
        """A video: :func:`.video.qwen_frames` frames, each sized by :func:`video_frame_size`; the processor pairs them
        (``temporal_patch_size`` 2, an odd count padded with the last frame), and each pair is one grid of
        :func:`merged_tokens` (its patches attend within the pair: HF's ``cu_seqlens`` per temporal slice)."""
        from .arch import VisionLayout
        from .video import qwen_frames

        read, frames = qwen_frames(video)
        v = arch.vision
        grid = video_frame_size(v, frame_size, read)
        pairs = -(-frames // v.temporal_patch_size)
        tokens = pairs * merged_tokens(v, grid)
        return VisionLayout(image_size=tuple(frame_size), tiles=1, projector_tokens=tokens, vision_tokens=tokens,
                            resized=grid.resized, patches=grid.patches, frames=frames, frames_read=read, temporal=pairs)

    def vision_flops(self, arch: Any, layout: Any) -> tuple[int, int]:
        """Per image, or per frame pair of a video: the same tower over one grid (attention within the grid)."""
        tower, merger = vision_tower_flops(arch.vision, QwenGrid(resized=layout.resized, patches=layout.patches))
        return tower * layout.images * layout.temporal, merger * layout.images * layout.temporal

    def vision_meta(self, model: Any, arch: Any, layout: Any, batch: int, counter: Callable[[], Any]) -> tuple[int, int]:
        """The tower sees each resized image (video: each frame pair) whole; its merger is the projector."""
        grid = QwenGrid(resized=layout.resized, patches=layout.patches)
        return vision_tower_meta(model.model.visual, arch.vision, grid, batch * layout.images, counter, layout.temporal)

    def projector_params(self, arch: Any) -> int:
        return arch.vision.merger_params

    def pixel_inputs(self, arch: Any, images: list, input_ids: Any, generator: Any, dtype: Any) -> dict:
        """Qwen's processor layout: ``pixel_values`` (patches of all images, C x temporal x patch x patch each),
        ``image_grid_thw`` ([1, h, w] patches per image) and ``mm_token_type_ids`` (1 on the image tokens: M-RoPE)."""
        import torch

        v = arch.vision
        grids = [resize(v, size).patches for size in images]
        per_patch = v.channels * v.temporal_patch_size * v.patch_size ** 2
        pixels = torch.randn((sum(h * w for h, w in grids), per_patch), generator=generator).to(dtype)
        thw = torch.tensor([[1, h, w] for h, w in grids], dtype=torch.long)
        mm = (input_ids == arch.image_token_id).long()
        return {"pixel_values": pixels, "image_grid_thw": thw, "mm_token_type_ids": mm}

    def video_pixel_inputs(self, arch: Any, layout: Any, input_ids: Any, generator: Any, dtype: Any) -> dict:
        """Qwen's video processor layout, one clip a row: ``pixel_values_videos`` (``temporal x rows x cols`` patches of
        C x 2 frames x patch x patch each), ``video_grid_thw`` [pairs, rows, cols], ``second_per_grid_ts`` (2 frames
        read at qwen-vl-utils' 2 fps: 1 s a pair) and ``mm_token_type_ids`` (2 on the video tokens: M-RoPE)."""
        import torch

        from .video import QWEN_FPS

        v, (h, w), B = arch.vision, layout.patches, input_ids.shape[0]
        per_patch = v.channels * v.temporal_patch_size * v.patch_size ** 2
        pixels = torch.randn((B * layout.temporal * h * w, per_patch), generator=generator).to(dtype)
        return {"pixel_values_videos": pixels, "video_grid_thw": torch.tensor([[layout.temporal, h, w]] * B),
                "second_per_grid_ts": torch.full((B,), v.temporal_patch_size / QWEN_FPS),
                "mm_token_type_ids": 2 * (input_ids == arch.config.video_token_id).long()}

    def tied_embeddings(self, cfg: Any) -> bool:
        return bool(getattr(cfg, "tie_word_embeddings", False))  # at the top level (3B)


HOST = QwenHost()

__all__ = [
    "QWEN_FAMILY", "LMMS_EVAL_MIN_PIXELS", "LMMS_EVAL_MAX_PIXELS", "QwenVisionDims", "QwenGrid", "vision_dims_from_config",
    "resize", "video_frame_size", "merged_tokens", "window_segments", "vision_tower_flops", "vision_tower_meta",
    "QwenHost", "HOST",
]
