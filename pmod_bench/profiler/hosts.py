"""Host geometry: what the profiler asks of a host family other than LLaVA-1.5 / LLaVA-NeXT.

LLaVA's CLIP tiles and mlp2x_gelu projector are the profiler's own path (:mod:`.arch`, :mod:`.flops`,
:mod:`.counters`). Every other host family answers the same few questions through one :class:`Host` object,
found by :func:`host_of` (an architecture's family) or :func:`host_for_config` (an HF config), so no module tests
family names:

* :meth:`Host.arch`: the :class:`~.arch.Arch` of an HF config (its LLM as :class:`~.arch.TextDims`, its tower);
* :meth:`Host.layout`: how one image becomes vision tokens (the host's own transformers helpers);
* :meth:`Host.video_layout`: how one video (:class:`~.video.Video`) becomes frames and vision tokens;
* :meth:`Host.vision_flops` / :meth:`Host.vision_meta`: its vision tower and projector, analytic and counted by
  FlopCounterMode on the meta device (None: the tower is a plain ViT over square tiles, counted by the LLaVA path);
* :meth:`Host.pixel_inputs`: random pixels in the model's own input layout (latency timing);
* :meth:`Host.projector_params` / :meth:`Host.tied_embeddings`: where its parameter count differs from LLaVA's.

Hosts: Qwen2.5-VL (:mod:`.qwen`), LLaVA-OneVision (:mod:`.onevision`). Registered by ``"module:object"`` and
imported on first use; this module imports nothing else of the profiler.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Optional

from .errors import ProfileError

#: family (``Arch.family``, the HF model_type) -> "module:object" of its :class:`Host`
HOSTS = {
    "qwen2_5_vl": "pmod_bench.profiler.qwen:HOST",
    "llava_onevision": "pmod_bench.profiler.onevision:HOST",
}


class Host:
    """One host family's geometry (subclass per family; see the module docstring)."""

    family: str = ""
    label: str = ""
    """the family's name in messages (Qwen2.5-VL)"""
    config_class: str = ""
    """the transformers config class its checkpoints load as (subclasses count: a p-MoD config of the family)"""
    model_class: str = ""
    """the transformers class of its vanilla model (built on the meta device for counting)"""
    pending: Optional[str] = "its host adapter (issue 22)"
    """what brings its p-MoD model, which latency and comparison methods need (None: they run)"""

    def arch(self, name: str, cfg: Any):
        raise NotImplementedError

    def layout(self, arch: Any, image_size: tuple[int, int], images: int):
        """The :class:`~.arch.VisionLayout` of ONE image of ``image_size`` (w, h) in a prompt holding ``images``."""
        raise NotImplementedError

    def video_layout(self, arch: Any, frame_size: tuple[int, int], video: Any):
        """The :class:`~.arch.VisionLayout` of one :class:`~.video.Video` of frames of ``frame_size`` (w, h) in a prompt."""
        from .errors import ProfileError

        raise ProfileError(f"{arch.name}: {self.label} is profiled on images; video prompts are profiled on Qwen2.5-VL and "
                           "LLaVA-OneVision (--arch qwen2.5-vl-7b, llava-onevision-7b).")

    def vision_flops(self, arch: Any, layout: Any) -> Optional[tuple[int, int]]:
        """(encoder, projector) FLOPs of a sample (``layout``: all its images), or None for the LLaVA ViT path."""
        return None

    def vision_meta(self, model: Any, arch: Any, layout: Any, batch: int, counter: Callable[[], Any]) -> Optional[tuple[int, int]]:
        """(encoder, projector) FLOPs of ``batch`` samples counted on the meta model, or None for the LLaVA path."""
        return None

    def projector_params(self, arch: Any) -> Optional[int]:
        return None

    def pixel_inputs(self, arch: Any, images: list, input_ids: Any, generator: Any, dtype: Any) -> dict:
        """The model inputs besides input_ids / attention_mask for random pixels of ``images`` (one (w, h) per image,
        sample by sample) in ``input_ids`` (what latency timing feeds a random-weight model)."""
        raise ProfileError(f"{arch.name}: timing {self.label} needs its p-MoD model, which comes with {self.pending}; "
                           "use --no-latency (FLOPs, KV cache and --hardware roofline floors are counted).")

    def with_pixels(self, arch: Any, min_pixels: Any, max_pixels: Any) -> Any:
        """``arch`` with its processor's pixel range changed; only hosts that resize to a pixel budget have one."""
        raise ProfileError(f"--min-pixels / --max-pixels set Qwen2.5-VL's resize range; {arch.name} is a {arch.family} "
                           "architecture (its image size alone decides its vision tokens). Drop them or profile a Qwen arch.")

    def tied_embeddings(self, cfg: Any) -> Optional[bool]:
        """Whether lm_head shares the embedding matrix (None: read ``text_config.tie_word_embeddings``)."""
        return None

    def transformers_class(self, which: str = "model_class") -> Any:
        import transformers

        return getattr(transformers, getattr(self, which))


def _load(spec: str) -> Host:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def host_of(family: str) -> Optional[Host]:
    """The :class:`Host` of an architecture family, or None for LLaVA-1.5 / LLaVA-NeXT (the profiler's own path)."""
    spec = HOSTS.get(family)
    return _load(spec) if spec else None


def host_for_config(cfg: Any) -> Optional[Host]:
    """The :class:`Host` whose config class ``cfg`` is an instance of, or None."""
    for spec in HOSTS.values():
        host = _load(spec)
        if isinstance(cfg, host.transformers_class("config_class")):
            return host
    return None


__all__ = ["HOSTS", "Host", "host_of", "host_for_config"]
