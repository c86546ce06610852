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
    LLaVA-OneVision      as LLaVA (SigLIP tower, mlp2x_gelu projector + image_newline, Qwen2 LLM)

Batch layout of the image inputs (``n`` = images in the batch)::

    LLaVA        pixel_values (n, 3, H, W)  image_sizes (n, 2) for LLaVA-NeXT, (n, P, 3, H, W): P padded
    Qwen2.5-VL   pixel_values (sum_i t_i*h_i*w_i, C*T*P*P): each image's patches concatenated along dim 0,
                 image_grid_thw (n, 3): which rows belong to which image; mm_token_type_ids (B, N): per token
                 (1 on image tokens), padded with 0 like input_ids; M-RoPE positions are computed from it
    OneVision    pixel_values (n, P, 3, S, S): each image's tiles (base image first), P padded; image_sizes (n, 2);
                 batch_num_images (b,): images per prompt of the b samples with images, in batch order. HF's
                 model tiles an image only when its prompt has one image (``need_patching``); an image of a
                 multi-image prompt is one square tile (+ one newline feature), so the processor gets each
                 sample's images as one list (``nested_images``) and says so in ``batch_num_images``

LLaVA-OneVision's training format is LLaVA-NeXT's ``qwen_1_5`` conversation (``data.template: qwen_1_5``,
:func:`pmod_bench.train.data.render_qwen_1_5`), its resolution cap ``data.max_tiles`` (:func:`restrict_tiles`).
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
    nested_images: bool = False
    """The processor gets a sample's images as one list (OneVision: its batch_num_images marks multi-image prompts)."""
    tile_cap: bool = False
    """The anyres grids can be capped by data.max_tiles (:func:`restrict_tiles`)."""

    def check_data(self, template: str, aspect_ratio: str) -> None:
        """ConfigError when data.template / data.image_aspect_ratio do not fit this family."""
        if template not in self.templates:
            raise ConfigError(f"data.template={template} does not render {self.title} prompts (its image tokens and turns "
                              f"are its training format's); use data.template={self.templates[0]}.")
        if aspect_ratio not in self.aspect_ratios:
            raise ConfigError(f"data.image_aspect_ratio={aspect_ratio} is not for {self.title}, whose processor reads "
                              f"each image at its own aspect ratio; use data.image_aspect_ratio="
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

LLAVA_ONEVISION = TrainLayout(
    title="LLaVA-OneVision",
    groups=LLAVA.groups,
    image_keys=("image_sizes", "batch_num_images"),
    # the OneVision paper trains the projector and the LLM at every stage after the first (the tower too, at a fifth
    # of the LLM's rate: ours keeps it frozen); train.trainable=[llm, routers] freezes the projector as well
    stage_trainable={"pt": ["connector"], "sft": ["connector", "llm", "routers"]},
    templates=("qwen_1_5",),
    aspect_ratios=("native",),
    nested_images=True,
    tile_cap=True,
)

#: host adapter model_type -> layout (host_for maps a p-MoD model_type to its family's adapter)
LAYOUTS = {"llava": LLAVA, "llava_next": LLAVA, "qwen2_5_vl": QWEN2_5_VL, "llava_onevision": LLAVA_ONEVISION}


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


def restrict_tiles(model, processor, max_tiles: int) -> list:
    """Cap the anyres resolution: keep only the grids (``image_grid_pinpoints``, ``[height, width]`` px in whole tiles)
    of at most ``max_tiles`` tiles, in the processor's image processor and the model's config alike (the processor
    counts an image's tokens and the model splits its tiles by the same list, so they must agree; both are saved with
    the run, so evaluation reads images as training did). Returns the kept pinpoints; ConfigError when the layout has
    no tile cap, the two lists differ, or no grid is left."""
    layout = layout_for(model)
    if not layout.tile_cap:
        raise ConfigError(f"data.max_tiles caps LLaVA-OneVision's anyres grids; {layout.title} has no such cap: remove it.")
    ip = processor.image_processor
    own = [list(p) for p in ip.image_grid_pinpoints]
    if own != [list(p) for p in model.config.image_grid_pinpoints]:
        raise ConfigError("the checkpoint's processor and config.json list different image_grid_pinpoints; fix the "
                          "checkpoint's preprocessor_config.json before capping its tiles with data.max_tiles.")
    tile = ip.size["height"]
    kept = [p for p in own if (p[0] // tile) * (p[1] // tile) <= max_tiles]
    if not kept:
        raise ConfigError(f"data.max_tiles={max_tiles} leaves none of the checkpoint's grids (the smallest has "
                          f"{min((p[0] // tile) * (p[1] // tile) for p in own)} tiles); raise it.")
    ip.image_grid_pinpoints = kept
    model.config.image_grid_pinpoints = [list(p) for p in kept]
    return kept


__all__ = ["LAYOUTS", "LLAVA", "LLAVA_ONEVISION", "QWEN2_5_VL", "TrainLayout", "layout_for", "restrict_tiles"]
