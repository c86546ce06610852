"""LLaVA-OneVision in the profiler: vision tokens by transformers' own OneVision code, its SigLIP tower without [CLS].

Vision tokens (:meth:`OneVisionHost.layout`) come from the functions ``LlavaOnevisionModel.get_image_features``
runs, never re-derived: ``image_size_to_num_patches`` (the tiles of the best ``image_grid_pinpoints`` resolution +
the base image), ``get_anyres_image_grid_shape`` and ``unpad_image``, then ``LlavaOnevisionModel.pack_image_features``
itself (on a one-channel feature map: it reads only the config), which unpads the grid's feature map, shrinks it by
bilinear interpolation when it holds more than ``anyres_max_9``'s 9 tiles' worth (ratio
``sqrt(h·w / (9·27²)) > 1.1``: to ``int(h // ratio) x int(w // ratio)``), adds one ``image_newline`` per row and puts
the base image's features first. 7B (384 px tiles of 27x27 patches): 672x672 -> 2x2 tiles + base, 729 + 54·55 =
3,699 tokens; 1344x1008 -> 3x4 tiles + base, the 81x108 map shrunk to 70x93, 729 + 70·94 = 7,309 tokens.

Several images in one prompt: as ``get_image_features`` with ``batch_num_images`` > 1 (and the processor, which
pads each image to a square), every image is one tile (the base image, no anyres grid) plus one newline: 730 tokens
at 7B, whatever the image size.

FLOPs (2 per multiply-add, matrix products only, as :mod:`.flops`): the SigLIP tower is a plain ViT over every tile,
``n = (384/14)² = 729`` tokens a tile (no [CLS]; the patch conv's bias is no product): ``2·3·p²·D·n`` + per layer
``2·n·(4·D² + 2·D·M) + 4·n²·D``, all 26 layers (the hub checkpoints already dropped SigLIP's 27th; the 26th's
output is read in full, ``vision_feature_layer`` -1, ``vision_feature_select_strategy`` full); the mlp2x_gelu
projector ``2·tiles·n·(D·d + d·d)`` before unpadding; the bilinear downsampling and the newlines cost no products.
These are the LLaVA path's formulas (:func:`.flops.vision_flops`) with :class:`SiglipDims`; FlopCounterMode on the
meta model counts the same (:func:`.counters.count_flops_meta`). The LLM is a Qwen2 decoder (GQA, q/k/v biases).

Videos (:meth:`OneVisionHost.video_layout`): every frame is one 384 px tile through SigLIP and the projector (729
features), pooled 2x2 bilinearly to 14x14 (``apply_pooling``: no products), one newline after the video: 32 frames ->
6,273 tokens; FLOPs are the tile formulas over the frames.

Latency (``--latency``): :meth:`OneVisionHost.pixel_inputs` gives :func:`.models.synthetic_batch` random pixels in the
image processor's layout (anyres tiles padded to the most any image has, ``image_sizes``, ``batch_num_images``) for
the vanilla, p-MoD and method-applied models; :meth:`OneVisionHost.video_pixel_inputs` one tile a frame for videos.

Hub configs: ``pmod_bench.model.presets.ONEVISION_HUB`` (llava-hf/llava-onevision-qwen2-{0.5b,7b,72b}-ov-hf).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

from .arch import GATED_MLP_TEXT_MODELS, Arch, ArchError, TextDims, VisionDims, VisionLayout
from .geometry import HostGeometry

#: ``Arch.family`` of LLaVA-OneVision architectures (the HF ``model_type``)
ONEVISION_FAMILY = "llava_onevision"


@dataclass(frozen=True)
class SiglipDims(VisionDims):
    """SigLIP's ViT (so400m without its last layer: 26 layers of width 1152, MLP 4304, 16 heads, 384 px, 14 px
    patches): no [CLS] token, a patch conv with a bias, no pre-LayerNorm, no pooling head."""

    @property
    def seq_len(self) -> int:
        return self.patches

    @property
    def params(self) -> int:
        d, m = self.hidden, self.intermediate
        per_layer = 4 * d * d + 4 * d + 2 * d * m + m + d + 4 * d  # q,k,v,o (+bias), fc1, fc2 (+bias), 2 LayerNorms
        embed = self.channels * self.patch_size**2 * d + d + self.patches * d  # patch conv (+bias), position embedding
        return self.layers * per_layer + embed + 2 * d  # + post LayerNorm


class OneVisionHost(HostGeometry):
    family = ONEVISION_FAMILY
    label = "LLaVA-OneVision"
    model_class = "LlavaOnevisionForConditionalGeneration"
    pending = None  # image prompts: pixel_inputs (anyres tiles); videos: video_pixel_inputs (one tile a frame)

    def arch(self, name: str, cfg: Any) -> Arch:
        """A Qwen2 decoder (GQA, q/k/v biases) over a SigLIP tower read in full, anyres tiles on the config's pinpoints."""
        tc, vc = cfg.text_config, cfg.vision_config
        if tc.model_type not in GATED_MLP_TEXT_MODELS:
            raise ArchError(f"{name}: text model '{tc.model_type}' is not supported; supported are {', '.join(GATED_MLP_TEXT_MODELS)}.")
        if vc.model_type != "siglip_vision_model" or getattr(vc, "vision_use_head", False):
            raise ArchError(f"{name}: LLaVA-OneVision's tower must be SigLIP without its pooling head (as the hub checkpoints); "
                            f"got '{vc.model_type}' (vision_use_head={getattr(vc, 'vision_use_head', None)}).")
        if cfg.vision_feature_select_strategy != "full":
            raise ArchError(f"{name}: vision_feature_select_strategy '{cfg.vision_feature_select_strategy}' drops a SigLIP "
                            "patch (SigLIP has no [CLS]); the profiler follows the hub checkpoints' 'full'.")
        heads, layer = tc.num_attention_heads, cfg.vision_feature_layer
        text = TextDims(layers=tc.num_hidden_layers, hidden=tc.hidden_size, intermediate=tc.intermediate_size, heads=heads,
                        kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
                        head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads, vocab=tc.vocab_size,
                        qkv_bias=tc.model_type == "qwen2")
        vision = SiglipDims(layers=vc.num_hidden_layers, hidden=vc.hidden_size, intermediate=vc.intermediate_size,
                            heads=vc.num_attention_heads, image_size=vc.image_size, patch_size=vc.patch_size,
                            channels=getattr(vc, "num_channels", 3),
                            feature_layers=len(layer) if isinstance(layer, (list, tuple)) else 1, drop_cls=False)
        return Arch(name=name, family=self.family, text=text, vision=vision, projector_hidden=tc.hidden_size,
                    image_token_id=int(cfg.image_token_id), grid_pinpoints=tuple(tuple(int(x) for x in p) for p in cfg.image_grid_pinpoints),
                    pmod=getattr(cfg, "pmod", None), config=cfg)

    def layout(self, arch: Arch, image_size: tuple[int, int], images: int) -> VisionLayout:
        """One image of a prompt holding ``images``: anyres tiles when alone, else the base image only (module docstring)."""
        import torch
        from transformers.models.llava_onevision.modeling_llava_onevision import (
            get_anyres_image_grid_shape,
            image_size_to_num_patches,
            unpad_image,
        )

        v, (w, h) = arch.vision, image_size
        pinpoints = [list(p) for p in arch.grid_pinpoints]
        tiles = 1 if images > 1 else int(image_size_to_num_patches(image_size=[h, w], grid_pinpoints=pinpoints, patch_size=v.image_size))
        tokens, rows_cols = _packed(arch, tiles, (h, w))
        common = dict(image_size=(w, h), tiles=tiles, projector_tokens=tiles * v.features_per_tile, vision_tokens=tokens,
                      tile_size=v.image_size)
        if tiles == 1:
            return VisionLayout(**common)
        rows, cols = get_anyres_image_grid_shape([h, w], pinpoints, v.image_size)
        uh, uw = unpad_image(torch.empty((1, rows * v.grid, cols * v.grid), device="meta"), [h, w]).shape[1:]
        return VisionLayout(**common, grid=(int(rows), int(cols)), unpadded=(int(uh), int(uw)),
                            downsampled=rows_cols if rows_cols != (uh, uw) else None)


    def pixel_inputs(self, arch: Arch, images: list, input_ids: Any, generator: Any, dtype: Any) -> dict:
        """OneVision's processor layout (``LlavaOnevisionImageProcessor``) for ``images`` (one (w, h) each, the same
        count in every row of ``input_ids``): ``pixel_values`` (images, tiles, C, tile, tile), every image's tiles
        padded to the most any image has (``_pad_for_batching``; the model reads the first ``image_size_to_num_patches``
        of them), ``image_sizes`` (H, W) and ``batch_num_images`` (images per prompt: several images are one tile each).
        The tiles per image are :meth:`layout`'s, so the placeholders ``synthetic_batch`` writes are the features the
        model packs."""
        import torch

        v, B = arch.vision, input_ids.shape[0]
        per_prompt = len(images) // B
        tiles = [self.layout(arch, size, per_prompt).tiles for size in images]
        shape = (len(images), max(tiles), v.channels, v.image_size, v.image_size)
        return {"pixel_values": torch.randn(shape, generator=generator).to(dtype),
                "image_sizes": torch.tensor([[h, w] for w, h in images], dtype=torch.long),
                "batch_num_images": torch.tensor([per_prompt] * B, dtype=torch.long)}

    def video_layout(self, arch: Arch, frame_size: tuple[int, int], video: Any) -> VisionLayout:
        """A video: :func:`.video.onevision_frames` frames, each resized to one tile (``LlavaOnevisionVideoProcessor``),
        its features pooled by ``LlavaOnevisionModel.apply_pooling`` (2x2 bilinear: 27x27 -> 14x14 at 7B), one
        ``image_newline`` after the whole video (``get_video_features``): ``frames · 196 + 1`` tokens at 7B."""
        from .video import onevision_frames

        v, frames = arch.vision, onevision_frames(video)
        pooled = _pooled(arch)
        return VisionLayout(image_size=tuple(frame_size), tiles=frames, projector_tokens=frames * v.features_per_tile,
                            vision_tokens=frames * pooled[0] * pooled[1] + 1, tile_size=v.image_size, frames=frames,
                            frames_read=frames, pooled=pooled)

    def video_pixel_inputs(self, arch: Arch, layout: VisionLayout, input_ids: Any, generator: Any, dtype: Any) -> dict:
        """OneVision's video processor layout, one clip a row: ``pixel_values_videos`` (B, frames, C, tile, tile)."""
        import torch

        v, B = arch.vision, input_ids.shape[0]
        shape = (B, layout.frames, v.channels, v.image_size, v.image_size)
        return {"pixel_values_videos": torch.randn(shape, generator=generator).to(dtype)}


def _pooled(arch: Arch) -> tuple[int, int]:
    """(rows, cols) of one frame's features after ``LlavaOnevisionModel.apply_pooling`` (run on a meta tensor: it reads
    only ``self.config``)."""
    import torch
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    owner, v = types.SimpleNamespace(config=arch.config), arch.vision
    n = LlavaOnevisionModel.apply_pooling(owner, torch.empty(1, v.features_per_tile, 1, device="meta")).shape[1]
    side = int(round(n ** 0.5))
    return (side, n // side)


def _packed(arch: Arch, tiles: int, hw: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    """(LLM tokens, (rows, cols) of the packed grid's feature map) of one image of ``tiles`` tiles, by
    ``LlavaOnevisionModel.pack_image_features`` on one-channel features (it reads only ``self.config``)."""
    import torch
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    owner = types.SimpleNamespace(config=arch.config)
    cfg, per_tile = arch.config, arch.vision.features_per_tile
    features, sizes = [torch.zeros(tiles, per_tile, 1)], torch.tensor([list(hw)])
    counts = [int(LlavaOnevisionModel.pack_image_features(owner, features, sizes, image_newline=newline,
                                                          vision_aspect_ratio=cfg.vision_aspect_ratio)[1][0])
              for newline in (torch.zeros(1), None)]
    rows = counts[0] - counts[1]  # one newline per row of the grid's map (the base image has none when tiled)
    return counts[0], ((rows, (counts[1] - per_tile) // rows) if tiles > 1 else (0, 0))


HOST = OneVisionHost()

__all__ = ["ONEVISION_FAMILY", "SiglipDims", "OneVisionHost", "HOST"]
