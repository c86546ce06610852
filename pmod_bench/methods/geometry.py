"""What a comparison method's limits and accounting depend on (light: no torch): the model's geometry, one image's
vision-side account, and the methods' one error type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class MethodError(ValueError):
    """A method spec or config that cannot be used; the message names the fix."""


@dataclass(frozen=True)
class ModelGeometry:
    """What a method's limits depend on: the vision tile and the LLM depth of one architecture."""

    patches_per_side: int
    """Patch grid of one tile (CLIP ViT-L/14-336: 24)."""
    vision_layers: int
    """Encoder layers of the vision tower (24)."""
    feature_layer: int
    """Index into the vision tower's hidden states that LLaVA reads (-2 = the penultimate layer's output)."""
    text_layers: int
    """Decoder layers of the LLM (Vicuna-7B: 32)."""
    anyres: bool
    """Several tower tiles per image (LLaVA-NeXT's anyres tiles + image_newline) rather than one (LLaVA-1.5)."""
    drop_cls: bool = True
    """vision_feature_select_strategy 'default' (the CLS feature is not given to the LLM)."""
    merge: int = 0
    """Qwen2.5-VL: the patch merger's side (2: one LLM token per 2x2 patches; the token count depends on the image);
    0: LLaVA's fixed tiles."""
    cls_token: bool = True
    """The tower's sequence opens with a [CLS] token (CLIP); False: patches only (SigLIP, LLaVA-OneVision)."""

    @property
    def patches(self) -> int:
        return self.patches_per_side ** 2

    @property
    def cls(self) -> int:
        """[CLS] tokens in front of a tile's patches inside the tower (1 or 0)."""
        return int(self.cls_token)

    @property
    def feature_index(self) -> int:
        """Non-negative index of the selected hidden state (0 = embeddings, L = last layer's output)."""
        return self.feature_layer % (self.vision_layers + 1)

    @classmethod
    def from_config(cls, config: Any) -> "ModelGeometry":
        """From an HF config of a supported family (vanilla or p-MoD), as its host adapter reads it."""
        from pmod_bench.model.hosts import HostError, host_for

        try:
            fields = host_for(config).method_geometry(config)
        except HostError as exc:
            raise MethodError(str(exc)) from None
        layer = fields["feature_layer"]
        if isinstance(layer, (list, tuple)):
            raise MethodError(f"vision_feature_layer {list(layer)} concatenates several layers; the comparison methods "
                              "follow the official code, which reads one layer (-2). Use a model that reads one layer.")
        return cls(**{**fields, "feature_layer": int(layer)})


def merged_accounting_error(name: str) -> MethodError:
    """The one-line refusal of a vision-stage method's analytic FLOPs on Qwen2.5-VL (ported at runtime, not yet counted)."""
    return MethodError(f"{name} on Qwen2.5-VL runs with its budget given (keep= / tokens=); its analytic FLOPs "
                       "(profile --method, --match) come with the next issue.")


def checked_geometry(cfg: Any, config: Any) -> ModelGeometry:
    """The :class:`ModelGeometry` of an HF ``config`` after method ``cfg`` has checked it can run there: on the family
    (``cfg.check_host``, read through the config's host adapter: a vision-stage method on Qwen2.5-VL refuses in one
    line) and on the geometry (``cfg.check_model``). The accounting and the ``--match`` solver start here, as
    ``apply_method`` does on a model."""
    from pmod_bench.model.hosts import HostError, host_for

    try:
        host = host_for(config)
    except HostError as exc:
        raise MethodError(str(exc)) from None
    cfg.check_host(host)
    geometry = ModelGeometry.from_config(config)
    cfg.check_model(geometry)
    return geometry


@dataclass(frozen=True)
class VisionAccount:
    """The vision side of one image under a method, for the analytic FLOPs (2 per multiply-add, matmuls only)."""

    llm_tokens: int
    """Vision tokens the LLM receives for this image."""
    tower_tokens: int
    """Tokens per tile inside the vision tower (patches + [CLS]; fewer for the downsampling baseline)."""
    tower_tiles: int
    """Tiles the tower runs on."""
    projector_tokens: int
    """Tokens the projector runs on (all tiles)."""
    extra_flops: int = 0
    """The method's own matrix products (similarities, merges, [CLS]-row attention), all tiles."""
    exact: bool = True
    """False where the count depends on the image (PruMerge's adaptive ratio): then an estimate."""
    note: str = ""



__all__ = ["MethodError", "ModelGeometry", "VisionAccount", "checked_geometry", "merged_accounting_error"]
