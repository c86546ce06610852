"""Models and inputs for measurement: meta-device architectures, random-weight models, synthetic batches.

No weights are ever downloaded. FLOPs and KV cache depend only on shapes and on how many tokens a
layer keeps (trunc(V * rho), not which ones), so random weights measure them exactly; latency
depends on shapes and kernels, not on weight values.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

from .arch import Arch, vision_layout
from .geometry import geometry_of
from .variants import Variant


# ---------------------------------------------------------------------------------------- building
def _model_class(arch: Arch):
    """The vanilla HF class of ``arch``'s family."""
    own = geometry_of(arch.family)
    return own.transformers_class() if own is not None else arch.host.vanilla_class


@functools.lru_cache(maxsize=8)
def meta_model(arch: Arch):
    """The vanilla HF model of ``arch`` on the meta device (no memory, built in well under a second)."""
    import torch

    cfg = arch.vanilla_config()
    cls = _model_class(arch)
    with torch.device("meta"):
        model = cls(cfg)
    return model.eval()


def random_model(arch: Arch, variant: Variant, device: str = "cpu", dtype=None, seed: int = 0, base=None):
    """A model of ``variant`` with random weights (routers random too, as after training).

    ``base``: a vanilla model of the same arch to share weights with (p-MoD variants are made from
    it with ``to_pmod``, so several variants cost one set of weights). Returns (model, base).
    """
    import torch

    from pmod_bench.model.modeling import to_pmod
    from pmod_bench.model.presets import random_routers

    if not variant.runnable:
        raise NotImplementedError(f"{variant.name}: no real model for method '{variant.method}' (accounting only)")
    if base is None:
        cfg = arch.vanilla_config()
        cls = _model_class(arch)
        torch.manual_seed(seed)
        with torch.device(device):  # built in place, directly in ``dtype`` (a 7B in bf16 needs 14 GB, not 28)
            base = cls._from_config(cfg, dtype=dtype) if dtype is not None else cls(cfg)
        base.eval()
    pmod = variant.pmod_config()
    if pmod is None:
        return base, base
    model = to_pmod(base, pmod)
    random_routers(model, seed=seed)
    model.eval()
    return model, base


# ------------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class Sample:
    """One synthetic prompt: ``text_tokens`` text tokens around ``images`` images of ``image_size`` (w, h)."""

    image_size: tuple[int, int]
    text_tokens: int
    images: int = 1


def sample_layout(arch: Arch, sample: Sample) -> tuple[int, int]:
    """(vision tokens, sequence length) of one sample."""
    v = vision_layout(arch, sample.image_size, sample.images).vision_tokens
    return v, v + sample.text_tokens


#: config fields of token ids that random text must not hold (they mark vision inputs)
_VISION_ID_FIELDS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index", "vision_start_token_id",
                     "vision_end_token_id")


def _llava_pixels(arch: Arch, each: list, g, dtype) -> dict[str, Any]:
    """LLaVA-1.5 (one tile each) / LLaVA-NeXT (anyres tiles + image_sizes) pixel inputs of images ``each``."""
    import torch

    size = arch.vision.image_size
    if arch.anyres:
        tiles = [vision_layout(arch, s).tiles for s in each]
        pixel_values = torch.randn((len(each), max(tiles), arch.vision.channels, size, size), generator=g).to(dtype)
        image_sizes = torch.tensor([[s[1], s[0]] for s in each], dtype=torch.long)  # (H, W)
        return {"pixel_values": pixel_values, "image_sizes": image_sizes}
    return {"pixel_values": torch.randn((len(each), arch.vision.channels, size, size), generator=g).to(dtype)}


def synthetic_batch(arch: Arch, samples: Sequence[Sample], device: str = "cpu", dtype=None, seed: int = 0) -> dict[str, Any]:
    """Model inputs for ``samples``: input_ids with the image placeholders and the host's pixel inputs.

    The images sit after two thirds of the text (system prompt + "USER:"), one placeholder block each, the
    rest follows them (the question + "ASSISTANT:"), as in the Vicuna-v1 template. Rows are left-padded
    (pad id 0, mask 0); the pixel inputs hold every image of every sample, in order, in the host's layout
    (LLaVA: pixel_values [+ image_sizes]; other families: :meth:`.geometry.HostGeometry.pixel_inputs`: Qwen2.5-VL's
    patches + image_grid_thw, LLaVA-OneVision's anyres tiles + image_sizes + batch_num_images). Random text holds no
    vision token id. The model checks that the placeholders match the features it computes, so a wrong
    vision-token count fails loudly here.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    cfg = arch.config
    img = arch.image_token_id
    reserved = torch.tensor(sorted({int(getattr(cfg, f)) for f in _VISION_ID_FIELDS if getattr(cfg, f, None) is not None}))
    pad = getattr(cfg.text_config, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    rows = []
    for s in samples:
        v = vision_layout(arch, s.image_size, s.images).vision_tokens  # every image's placeholders (OneVision: 1 tile each)
        pre = (2 * s.text_tokens) // 3
        text = torch.randint(3, arch.text.vocab, (s.text_tokens,), generator=g)
        text = torch.where(torch.isin(text, reserved), torch.full_like(text, 3), text)
        rows.append(torch.cat([text[:pre], torch.full((v,), img, dtype=torch.long), text[pre:]]))
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = r
        mask[i, n - len(r):] = 1
    fdtype = dtype or torch.float32
    each = [s.image_size for s in samples for _ in range(s.images)]  # one entry per image, sample by sample
    own = geometry_of(arch.family)
    pixels = own.pixel_inputs(arch, each, ids, g, fdtype) if own is not None else _llava_pixels(arch, each, g, fdtype)
    batch = {"input_ids": ids, "attention_mask": mask, **pixels}
    return {k: t.to(device) for k, t in batch.items()}


__all__ = ["meta_model", "random_model", "Sample", "sample_layout", "synthetic_batch"]
