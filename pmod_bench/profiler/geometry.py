"""Host geometry: what the profiler asks of a host family other than LLaVA-1.5 / LLaVA-NeXT (vision tokens, tower FLOPs).

Not the model's host adapter (:mod:`pmod_bench.model.hosts`: layers, positions, p-MoD classes) nor the eval request
builders (:mod:`pmod_bench.tasks.requests`); all three are keyed by the family the adapter names
(:func:`pmod_bench.model.hosts.family_of`: a ``pmod_*`` model_type is its base family).

LLaVA's CLIP tiles and mlp2x_gelu projector are the profiler's own path (:mod:`.arch`, :mod:`.flops`,
:mod:`.counters`). Every other host family answers the same few questions through one :class:`HostGeometry` object,
found by :func:`geometry_of` (an architecture's family) or :func:`geometry_for_config` (an HF config), so no module tests
family names:

* :meth:`HostGeometry.arch`: the :class:`~.arch.Arch` of an HF config (its LLM as :class:`~.arch.TextDims`, its tower);
* :meth:`HostGeometry.layout`: how one image becomes vision tokens (the host's own transformers helpers);
* :meth:`HostGeometry.video_layout`: how one video (:class:`~.video.Video`) becomes frames and vision tokens;
* :meth:`HostGeometry.vision_flops` / :meth:`HostGeometry.vision_meta`: its vision tower and projector, analytic and counted by
  FlopCounterMode on the meta device (None: the tower is a plain ViT over square tiles, counted by the LLaVA path);
* :meth:`HostGeometry.pixel_inputs`: random pixels in the model's own input layout (latency timing);
* :meth:`HostGeometry.projector_params` / :meth:`HostGeometry.tied_embeddings`: where its parameter count differs from LLaVA's.

Hosts: Qwen2.5-VL (:mod:`.qwen`), LLaVA-OneVision (:mod:`.onevision`). Registered by ``"module:object"`` and
imported on first use; this module imports nothing else of the profiler.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Optional

from .errors import ProfileError

#: family (``Arch.family``: the host adapter's vanilla model_type) -> "module:object" of its :class:`HostGeometry`
GEOMETRIES = {
    "qwen2_5_vl": "pmod_bench.profiler.qwen:HOST",
    "llava_onevision": "pmod_bench.profiler.onevision:HOST",
}


class HostGeometry:
    """One host family's geometry (subclass per family; see the module docstring)."""

    family: str = ""
    label: str = ""
    """the family's name in messages (Qwen2.5-VL)"""
    model_class: str = ""
    """the transformers class of its vanilla model (built on the meta device for counting)"""
    pending: Optional[str] = "its synthetic image inputs (HostGeometry.pixel_inputs), which the profiler does not build yet"
    """what brings its image timing and comparison methods (None: they run; Qwen2.5-VL and LLaVA-OneVision have none). A
    new family needs its host adapter (pmod_bench/model/hosts) and :meth:`pixel_inputs` before it clears this"""
    videos_timed: bool = False
    """whether video prompts are timed on it although :attr:`pending` holds its image timing back (its p-MoD model runs
    and :meth:`video_pixel_inputs` builds its video batches)"""

    @property
    def methods_pending(self) -> Optional[str]:
        """what brings the comparison methods' accounting on this family (None: they run); by default :attr:`pending`"""
        return self.pending

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

    def video_pixel_inputs(self, arch: Any, layout: Any, input_ids: Any, generator: Any, dtype: Any) -> dict:
        """The model inputs besides input_ids / attention_mask for random pixels of one video of ``layout`` in every row
        of ``input_ids`` (what video latency timing feeds a random-weight model, :func:`.video.synthetic_video_batch`)."""
        raise ProfileError(f"{arch.name}: {self.label} has no video inputs; video prompts are timed on Qwen2.5-VL and "
                           "LLaVA-OneVision.")

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


def _load(spec: str) -> HostGeometry:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def geometry_of(family: str) -> Optional[HostGeometry]:
    """The :class:`HostGeometry` of an architecture family, or None for LLaVA-1.5 / LLaVA-NeXT (the profiler's own path)."""
    spec = GEOMETRIES.get(family)
    return _load(spec) if spec else None


def geometry_for_config(cfg: Any) -> Optional[HostGeometry]:
    """The :class:`HostGeometry` of an HF config's family (vanilla or p-MoD, as the host adapter names it), or None."""
    from pmod_bench.model.hosts import family_of

    spec = GEOMETRIES.get(family_of(cfg))
    return _load(spec) if spec else None


__all__ = ["GEOMETRIES", "HostGeometry", "geometry_of", "geometry_for_config"]
