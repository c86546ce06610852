"""What training needs to know about a host family, found through the model's host adapter.

``layout_for(model)`` asks :func:`pmod_bench.model.hosts.host_for` which family a model is (vanilla or p-MoD,
by ``model_type``) and returns that family's :class:`TrainLayout`: which parameters form each trainable group,
which processor outputs a sample carries and how a batch joins them, whether the image size is capped by
pixels, and what each stage trains when ``train.trainable`` is null. Nothing in training tests class names.

Parameter groups by family (the first matching prefix wins; ``.router.`` is always ``routers``)::

    LLaVA / LLaVA-NeXT   vision     model.vision_tower.*
                         connector  model.multi_modal_projector.*, model.image_newline
                         llm        model.language_model.*, lm_head.*
    Qwen2.5-VL           connector  model.visual.merger.*        (the 2x2 patch merger: Qwen's projector)
                         vision     model.visual.*               (patch embedding + window-attention blocks)
                         llm        model.language_model.*, lm_head.*

Batch layout of the image inputs (``n`` = images in the batch)::

    LLaVA        pixel_values (n, 3, H, W)  image_sizes (n, 2) for LLaVA-NeXT, (n, P, 3, H, W): P padded
    Qwen2.5-VL   pixel_values (sum_i t_i*h_i*w_i, C*T*P*P): each image's patches concatenated along dim 0,
                 image_grid_thw (n, 3): which rows belong to which image; mm_token_type_ids (B, N): per token
                 (1 on image tokens), padded with 0 like input_ids; M-RoPE positions are computed from it
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pmod_bench.train.config import STAGE_TRAINABLE, ConfigError


@dataclass(frozen=True)
class TrainLayout:
    """One family's training layout (module docstring)."""

    title: str
    groups: tuple
    """((group, (parameter-name prefixes, ...)), ...), first match wins."""
    image_keys: tuple = ("image_sizes",)
    """Per-image processor outputs of a sample, concatenated along dim 0 in a batch (besides pixel_values)."""
    token_keys: tuple = ()
    """Per-token processor outputs (1, N) of a sample, right-padded with 0 like input_ids in a batch."""
    pixel_caps: bool = False
    """The processor resizes each image to a pixel budget (data.min_pixels / data.max_pixels apply)."""
    stage_trainable: dict = field(default_factory=lambda: dict(STAGE_TRAINABLE))
    """What each stage trains when train.trainable is null."""
    templates: tuple = ("vicuna_v1", "plain", "chat")
    """The data.template values that render this family's prompts."""
    aspect_ratios: tuple = ("pad", "native")
    """The data.image_aspect_ratio values this family's processor is meant for."""

    def check_data(self, template: str, aspect_ratio: str) -> None:
        """ConfigError when data.template / data.image_aspect_ratio do not fit this family."""
        if template not in self.templates:
            raise ConfigError(f"data.template={template} does not render {self.title} prompts (its image tokens and turns "
                              f"are its chat template's); use data.template={self.templates[0]}.")
        if aspect_ratio not in self.aspect_ratios:
            raise ConfigError(f"data.image_aspect_ratio={aspect_ratio} is not for {self.title}, which reads each image "
                              f"at its own aspect ratio within the pixel budget; use data.image_aspect_ratio="
                              f"{self.aspect_ratios[0]}.")

    def param_group(self, name: str) -> str:
        """The module group of a parameter name (vision, connector, llm, routers, or other)."""
        if ".router." in name:
            return "routers"
        for group, prefixes in self.groups:
            if name.startswith(prefixes):
                return group
        return "other"


LLAVA = TrainLayout(
    title="LLaVA",
    groups=(("vision", ("model.vision_tower.",)),
            ("connector", ("model.multi_modal_projector.", "model.image_newline")),
            ("llm", ("model.language_model.", "lm_head."))),
)

QWEN2_5_VL = TrainLayout(
    title="Qwen2.5-VL",
    groups=(("connector", ("model.visual.merger.",)),
            ("vision", ("model.visual.",)),
            ("llm", ("model.language_model.", "lm_head."))),
    image_keys=("image_grid_thw",),
    token_keys=("mm_token_type_ids",),
    pixel_caps=True,
    # Qwen2.5-VL's SFT: the LLM (+ routers); the tower and the merger stay as released (the recipe says so too)
    stage_trainable={"pt": ["connector"], "sft": ["llm", "routers"]},
    templates=("chat",),
    aspect_ratios=("native",),
)

#: host adapter model_type -> layout (host_for maps a p-MoD model_type to its family's adapter)
LAYOUTS = {"llava": LLAVA, "llava_next": LLAVA, "qwen2_5_vl": QWEN2_5_VL}


def layout_for(model) -> TrainLayout:
    """The training layout of a model (or config) by its host adapter; ConfigError for a family not trained yet."""
    from pmod_bench.model.hosts import HostError, host_for

    try:
        host = host_for(model)
    except HostError as exc:
        raise ConfigError(str(exc)) from None
    layout = LAYOUTS.get(host.model_type)
    if layout is None:
        raise ConfigError(f"`pmod-bench train` has no training layout for {host.title} ({host.model_type}) yet; "
                          f"trainable families: {', '.join(sorted({l.title for l in LAYOUTS.values()}))}.")
    return layout


__all__ = ["LAYOUTS", "LLAVA", "QWEN2_5_VL", "TrainLayout", "layout_for"]
