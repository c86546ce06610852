"""Architectures the profiler measures, and how an image becomes vision tokens.

An :class:`Arch` holds the shapes that FLOPs and KV-cache accounting need (taken from an HF
``LlavaConfig`` / ``LlavaNextConfig``, or their p-MoD subclasses, or another host's config through its
:class:`~.geometry.HostGeometry`: ``Qwen2_5_VLConfig`` (:mod:`.qwen`), ``LlavaOnevisionConfig`` (:mod:`.onevision`))
plus the HF config itself, so the
same architecture can be built on the meta device (FLOP counting without weights) or with random
weights (latency). Sources (:func:`load_arch`): a preset name (``pmod_bench.model.presets``), a
local HF model directory or its ``config.json``, or a hub id (needs the network).

Vision tokens (:func:`vision_layout`) are computed with transformers' own LLaVA-NeXT helpers
(``image_size_to_num_patches``, ``get_anyres_image_grid_shape``, ``unpad_image``: the functions
``LlavaNextModel.get_image_features`` / ``pack_image_features`` call), never re-derived:
672x672 -> 2,928 tokens, 640x480 -> 2,340 (LLaVA-NeXT-7B); LLaVA-1.5 -> 576 for any image; Qwen2.5-VL
with transformers' ``smart_resize`` (:mod:`.qwen`): 1344x1008 -> 1,728; LLaVA-OneVision with its own anyres,
unpad and anyres_max_9 code (:mod:`.onevision`): 672x672 -> 3,699. A prompt of several images holds the sum.
"""

from __future__ import annotations

from .errors import ProfileError
from .geometry import HostGeometry, geometry_for_config, geometry_of

import dataclasses
import difflib
import functools
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

#: text models whose decoder layer is pre-norm attention + gated MLP (gate, up, down): the
#: shapes the analytic model assumes (and the layers a p-MoD layer can wrap).
GATED_MLP_TEXT_MODELS = ("llama", "mistral", "qwen2")
#: vision towers the analytic model knows (the meta-device counter runs any HF tower)
VISION_MODELS = ("clip_vision_model",)


class ArchError(ProfileError):
    """An architecture that cannot be loaded or profiled; the message names the fix."""


@dataclass(frozen=True)
class TextDims:
    """Decoder-only LLM shapes (Vicuna-7B: 32 layers, d 4096, MLP 11008, 32 heads, no GQA)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    qkv_bias: bool = False
    """q, k, v projections with biases (Qwen2); biases are parameters, not FLOPs (matrix products only)"""

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def linear_macs_per_token(self) -> int:
        """Multiply-adds of one token through one layer's weight matrices: q, k, v, o, gate, up, down."""
        d = self.hidden
        return d * self.q_dim + 2 * d * self.kv_dim + self.q_dim * d + 3 * d * self.intermediate

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer (weights + the two RMSNorm scales + q/k/v biases if any)."""
        return self.linear_macs_per_token + 2 * self.hidden + (self.q_dim + 2 * self.kv_dim if self.qkv_bias else 0)

    def params(self, tied_embeddings: bool = False) -> int:
        """Parameters of the LLM: layers + final norm + embedding + lm_head."""
        emb = self.vocab * self.hidden
        return self.layers * self.layer_params + self.hidden + emb * (1 if tied_embeddings else 2)


@dataclass(frozen=True)
class VisionDims:
    """ViT vision tower (CLIP ViT-L/14-336: 24 layers, d 1024, MLP 4096, 336 px, patch 14)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    image_size: int
    patch_size: int
    channels: int = 3
    feature_layers: int = 1
    """Number of hidden-state layers concatenated into the projector input (LLaVA: 1, layer -2)."""
    drop_cls: bool = True
    """vision_feature_select_strategy 'default': the CLS feature is dropped before the projector."""

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def patches(self) -> int:
        return self.grid * self.grid

    @property
    def seq_len(self) -> int:
        """Tokens per tile inside the tower: the patches plus CLS."""
        return self.patches + 1

    @property
    def features_per_tile(self) -> int:
        return self.patches if self.drop_cls else self.seq_len

    @property
    def params(self) -> int:
        d, m = self.hidden, self.intermediate
        per_layer = 4 * d * d + 4 * d + 2 * d * m + m + d + 4 * d  # q,k,v,o (+bias), fc1, fc2 (+bias), 2 LayerNorms
        embed = self.channels * self.patch_size**2 * d + (self.seq_len + 1) * d
        return self.layers * per_layer + embed + 4 * d  # + pre/post LayerNorm


@dataclass(frozen=True)
class Arch:
    """One LLaVA-family architecture: shapes for accounting plus the HF config it came from."""

    name: str
    family: str  # the host's model_type: "llava" (LLaVA-1.5 shape), "llava_next" (anyres), "qwen2_5_vl", "llava_onevision"
    text: TextDims
    vision: VisionDims  # Qwen2.5-VL: qwen.QwenVisionDims; LLaVA-OneVision: onevision.SiglipDims
    projector_hidden: int
    image_token_id: int
    grid_pinpoints: Optional[tuple[tuple[int, int], ...]] = None  # (height, width) pairs, px
    pmod: Optional[dict] = field(default=None, compare=False)  # the config's own p-MoD settings, if any
    config: Any = field(default=None, compare=False, repr=False)

    @property
    def projector_in(self) -> int:
        return self.vision.hidden * self.vision.feature_layers

    @property
    def projector_params(self) -> int:
        host = geometry_of(self.family)
        own = host.projector_params(self) if host else None
        if own is not None:
            return own
        return self.projector_in * self.projector_hidden + self.projector_hidden * self.projector_hidden + 2 * self.projector_hidden

    @property
    def llm_params(self) -> int:
        host = geometry_of(self.family)
        tied = host.tied_embeddings(self.config) if host else None
        if tied is None:
            tied = getattr(getattr(self.config, "text_config", None), "tie_word_embeddings", False)
        return self.text.params(bool(tied))

    @property
    def host(self):
        """The family's host adapter (:mod:`pmod_bench.model.hosts`)."""
        from pmod_bench.model.hosts import host_for

        return host_for(self.family)

    @property
    def anyres(self) -> bool:
        """LLaVA-NeXT's anyres tiling (hosts with their own geometry, :mod:`.geometry`, lay their images out themselves)."""
        return geometry_of(self.family) is None and self.host.anyres

    def vanilla_config(self):
        """The HF config without p-MoD fields (a fresh copy)."""
        cfg = self.host.vanilla_config(self.config)
        cfg._attn_implementation = "sdpa"
        return cfg


# ------------------------------------------------------------------------------------------ loading
def _presets() -> tuple[str, ...]:
    from pmod_bench.model.presets import PRESETS

    return PRESETS


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _unknown(source: str) -> ArchError:
    presets = _presets()
    close = difflib.get_close_matches(source, presets, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ArchError(
        f"unknown architecture '{source}'.{hint} Pass a preset ({', '.join(presets)}), a local HF model "
        "directory holding config.json, or a hub id such as llava-hf/llava-v1.6-vicuna-7b-hf."
    )


def ensure_registered() -> None:
    """Make sure the Auto classes know the p-MoD model types (idempotent; see ``pmod_bench.register``)."""
    import pmod_bench

    pmod_bench.register()


def load_arch(source: str) -> Arch:
    """The :class:`Arch` of a preset name, a local HF directory / config.json, or a hub id. A preset name that is also
    a file or directory in the working directory is refused, as ``pmod-bench eval`` refuses it
    (:func:`pmod_bench.model.sources.preset_shadowed`: ``./NAME`` for the directory); checked on every call, since
    the working directory may change between calls (the architectures are cached)."""
    from pmod_bench.model.sources import preset_shadowed

    source = str(source).strip()
    shadowed = preset_shadowed(source)
    if shadowed:
        raise ArchError(shadowed)
    return _load_arch(source)


@functools.lru_cache(maxsize=32)
def _load_arch(source: str) -> Arch:
    ensure_registered()
    if source in _presets():
        from pmod_bench.model.presets import QWEN_PIXEL_RANGE, preset_config

        # a tiny Qwen preset's own processor range (lmms-eval's for the others)
        return with_pixels(arch_from_config(source, preset_config(source)), *QWEN_PIXEL_RANGE.get(source, (None, None)))
    path = Path(source).expanduser()
    if path.exists():
        directory = path.parent if path.is_file() else path
        if not (directory / "config.json").is_file():
            raise ArchError(f"{directory} holds no config.json; pass an HF model directory (config.json is enough, no weights needed).")
        _check_config_json(source, directory / "config.json")
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.from_pretrained(str(directory))
        except Exception as exc:  # noqa: BLE001 - transformers / huggingface_hub validation errors have no common base
            last = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else type(exc).__name__
            raise ArchError(f"{directory}/config.json could not be read as an HF config: {last}") from None
        return arch_from_config(source, cfg)
    from pmod_bench.model.sources import looks_like_hub_id

    if not looks_like_hub_id(source):
        raise _unknown(source)
    from transformers import AutoConfig

    try:  # the local HF cache first: no network needed if the config was downloaded before
        cfg = AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        if not _hub_reachable():
            raise ArchError(
                f"'{source}' is neither a preset nor a local directory, and the Hugging Face Hub is unreachable from "
                "this machine (offline?). Download the model's config.json into a directory and pass that directory, "
                f"or use a preset: {', '.join(_presets())}."
            ) from None
        try:
            cfg = AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise ArchError(f"could not load the config of hub id '{source}': {exc}") from None
    return arch_from_config(source, cfg)


def _whole(name: str, key: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ArchError(f"{name}: {key} is {value!r}; it must be a whole number >= {low}. Fix the config (config.json).")


def check_dims(name: str, text: dict, vision: dict, feature_layer: Any = None) -> None:
    """Refuse an inconsistent LLaVA config before anything divides by its numbers; the message names the field.

    ``text`` / ``vision``: the text and vision config as dicts (keys absent: the model type's defaults, not checked).
    """
    for prefix, d in (("text_config", text), ("vision_config", vision)):
        for key in ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size", "num_key_value_heads",
                    "vocab_size", "patch_size", "image_size"):
            if d.get(key) is not None:
                _whole(name, f"{prefix}.{key}", d[key], 1)
        heads, hidden = d.get("num_attention_heads"), d.get("hidden_size")
        if heads and hidden and hidden % heads:
            raise ArchError(f"{name}: {prefix}.hidden_size ({hidden}) is not a multiple of {prefix}.num_attention_heads "
                            f"({heads}); fix the config (config.json): hidden_size = num_attention_heads x head_dim.")
        kv = d.get("num_key_value_heads")
        if heads and kv and heads % kv:
            raise ArchError(f"{name}: {prefix}.num_attention_heads ({heads}) is not a multiple of {prefix}.num_key_value_heads "
                            f"({kv}); fix the config (config.json): each key/value head serves a whole number of query heads.")
    if vision.get("patch_size") and vision.get("image_size") and vision["image_size"] < vision["patch_size"]:
        raise ArchError(f"{name}: vision_config.image_size ({vision['image_size']}) is smaller than vision_config.patch_size "
                        f"({vision['patch_size']}); fix the config (config.json).")
    layers = vision.get("num_hidden_layers")
    for layer in feature_layer if isinstance(feature_layer, (list, tuple)) else [feature_layer]:
        if layers and isinstance(layer, int) and not -(layers + 1) <= layer <= layers:
            raise ArchError(f"{name}: vision_feature_layer {layer} is not a layer of a {layers}-layer vision tower "
                            f"(-{layers + 1}..{layers}); fix the config (config.json).")


def _check_config_json(name: str, path: Path) -> None:
    """:func:`check_dims` on the raw config.json (before transformers reads it: its own checks raise tracebacks)."""
    import json

    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArchError(f"{path} is not readable JSON ({exc}); pass an HF model directory with a valid config.json.") from None
    if not isinstance(raw, dict):
        raise ArchError(f"{path} must hold a JSON object (an HF config).")
    sub = lambda key: raw.get(key) if isinstance(raw.get(key), dict) else {}  # noqa: E731
    check_dims(name, sub("text_config"), sub("vision_config"), raw.get("vision_feature_layer"))


def arch_from_config(name: str, cfg: Any) -> Arch:
    """Read the shapes the profiler needs from a host's config (p-MoD or vanilla): LLaVA-1.5 / LLaVA-NeXT through their
    host adapters (:mod:`pmod_bench.model.hosts`), Qwen2.5-VL and LLaVA-OneVision through their geometry (:mod:`.geometry`)."""
    from pmod_bench.model.hosts import HostError, host_for

    own = geometry_for_config(cfg)
    if own is not None:
        return own.arch(name, cfg)
    try:
        host = host_for(cfg)  # the family, as its host adapter names it
    except HostError as exc:
        raise ArchError(f"{name}: {exc}") from None
    family = host.model_type
    tc, vc = cfg.text_config, cfg.vision_config
    if tc.model_type not in GATED_MLP_TEXT_MODELS:
        raise ArchError(
            f"{name}: text model '{tc.model_type}' is not supported; supported are {', '.join(GATED_MLP_TEXT_MODELS)} "
            "(pre-norm attention + gated MLP decoder layers)."
        )
    if vc.model_type not in VISION_MODELS:
        raise ArchError(f"{name}: vision tower '{vc.model_type}' is not supported; supported: {', '.join(VISION_MODELS)}.")
    check_dims(name, tc.to_dict(), vc.to_dict(), cfg.vision_feature_layer)
    heads = tc.num_attention_heads
    text = TextDims(
        layers=tc.num_hidden_layers,
        hidden=tc.hidden_size,
        intermediate=tc.intermediate_size,
        heads=heads,
        kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
        head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads,
        vocab=tc.vocab_size,
    )
    layer = cfg.vision_feature_layer
    vision = VisionDims(
        layers=vc.num_hidden_layers,
        hidden=vc.hidden_size,
        intermediate=vc.intermediate_size,
        heads=vc.num_attention_heads,
        image_size=vc.image_size,
        patch_size=vc.patch_size,
        channels=getattr(vc, "num_channels", 3),
        feature_layers=len(layer) if isinstance(layer, (list, tuple)) else 1,
        drop_cls=cfg.vision_feature_select_strategy == "default",
    )
    pinpoints = None
    if host.anyres:
        pinpoints = tuple(tuple(int(v) for v in p) for p in cfg.image_grid_pinpoints)
    return Arch(
        name=name,
        family=family,
        text=text,
        vision=vision,
        projector_hidden=tc.hidden_size,
        image_token_id=int(cfg.image_token_id),
        grid_pinpoints=pinpoints,
        pmod=getattr(cfg, "pmod", None),
        config=cfg,
    )


# ------------------------------------------------------------------------------------ vision tokens
@dataclass(frozen=True)
class VisionLayout:
    """How the ``images`` images of ``image_size`` (width, height) of one prompt reach the LLM. ``tiles``,
    ``projector_tokens`` and ``vision_tokens`` count all of them; the other fields describe one image."""

    image_size: tuple[int, int]
    tiles: int
    """Vision-encoder passes (anyres: grid tiles + the base image; LLaVA-1.5: 1), all images."""
    projector_tokens: int
    """Features through the projector (tiles x features per tile; before unpadding), all images."""
    vision_tokens: int
    """LLM positions holding image features (base tile + unpadded grid + one newline per row), all images."""
    grid: Optional[tuple[int, int]] = None
    """anyres tile grid (rows, cols)."""
    unpadded: Optional[tuple[int, int]] = None
    """feature map (rows, cols) after unpad_image, before the newline column."""
    tile_size: int = 0
    """side in pixels of each square tile the encoder sees (0: Qwen2.5-VL sees the resized image whole)"""
    resized: Optional[tuple[int, int]] = None
    """Qwen2.5-VL: (width, height) after ``smart_resize`` (multiples of 28 px)"""
    patches: Optional[tuple[int, int]] = None
    """Qwen2.5-VL: (rows, cols) of vision-tower patches (resized / 14)"""
    downsampled: Optional[tuple[int, int]] = None
    """LLaVA-OneVision: the unpadded feature map (rows, cols) after anyres_max_9's bilinear downsampling (None: kept)"""
    images: int = 1
    """images of this size in the prompt"""
    frames: int = 0
    """a video: frames the model sees (0: images); ``image_size`` is the frame size"""
    frames_read: int = 0
    """a video on Qwen2.5-VL: frames qwen-vl-utils read before lmms-eval kept ``frames`` (they size each frame)"""
    temporal: int = 1
    """Qwen2.5-VL video: frame pairs (``temporal_patch_size`` 2), each one grid of ``patches`` through the tower"""
    pooled: Optional[tuple[int, int]] = None
    """LLaVA-OneVision video: (rows, cols) of a frame's features after its 2x2 bilinear pooling"""


#: the largest image width / height any command accepts (px): 48x the 672 px LLaVA-NeXT tile
MAX_IMAGE_SIDE = 32768
#: the most images of one prompt any command accepts
MAX_IMAGES = 64


def parse_image_size(text: str) -> tuple[int, int]:
    """'672x672' -> (672, 672): WIDTHxHEIGHT in pixels, each in 1..MAX_IMAGE_SIDE; the one parser of
    ``--image-size`` (profile, demo); errors (:class:`ArchError`) name the fix."""
    raw = str(text).strip().lower().replace("×", "x")
    parts = raw.split("x")
    try:
        if len(parts) != 2:
            raise ValueError
        w, h = int(parts[0]), int(parts[1])
    except ValueError:
        raise ArchError(f"bad image size '{text}': expected WIDTHxHEIGHT in pixels, e.g. 672x672 or 640x480.") from None
    check_image_size((w, h))
    return w, h


def check_image_size(size: tuple[int, int]) -> None:
    w, h = size
    if not (isinstance(w, int) and isinstance(h, int)) or not (1 <= w <= MAX_IMAGE_SIDE and 1 <= h <= MAX_IMAGE_SIDE):
        raise ArchError(f"bad image size {w}x{h}: width and height must be whole pixels in 1..{MAX_IMAGE_SIDE}, e.g. 672x672.")


def with_pixels(arch: Arch, min_pixels: Any = None, max_pixels: Any = None) -> Arch:
    """``arch`` with its processor's pixel range changed (``--min-pixels`` / ``--max-pixels``: Qwen2.5-VL's resize)."""
    if min_pixels is None and max_pixels is None:
        return arch
    own = geometry_of(arch.family)
    if own is None:
        return HostGeometry().with_pixels(arch, min_pixels, max_pixels)  # refuses in one line
    return own.with_pixels(arch, min_pixels, max_pixels)


def check_images(images: int) -> None:
    if not isinstance(images, int) or isinstance(images, bool) or not 1 <= images <= MAX_IMAGES:
        raise ArchError(f"bad image count {images!r}: --images must be a whole number in 1..{MAX_IMAGES}, e.g. 2.")


def vision_layout(arch: Arch, image_size: tuple[int, int], images: int = 1, video: Any = None) -> VisionLayout:
    """Vision tokens of ``images`` images of ``image_size`` in one prompt (:func:`image_layout` for each, or the
    host's own rule, :meth:`.geometry.HostGeometry.layout`: LLaVA-OneVision reads each of several images as one tile), or of one
    ``video`` (a :class:`~.video.Video`) of frames of ``image_size`` (:meth:`.geometry.HostGeometry.video_layout`)."""
    check_image_size(image_size)
    check_images(images)
    host = geometry_of(arch.family)
    if video is not None:
        if images != 1:
            raise ArchError(f"a prompt holds one video here; drop --images {images} (or profile the images on their own).")
        if host is None:
            raise ArchError(f"{arch.name}: LLaVA-1.5 / LLaVA-NeXT are profiled on images; video prompts are profiled on "
                            "Qwen2.5-VL and LLaVA-OneVision (--arch qwen2.5-vl-7b, llava-onevision-7b).")
        return host.video_layout(arch, tuple(image_size), video)
    one = host.layout(arch, tuple(image_size), images) if host else image_layout(arch, tuple(image_size))
    if images == 1:
        return one
    return dataclasses.replace(one, images=images, tiles=one.tiles * images, projector_tokens=one.projector_tokens * images,
                               vision_tokens=one.vision_tokens * images)


def image_layout(arch: Arch, image_size: tuple[int, int]) -> VisionLayout:
    """Vision tokens of one image on LLaVA-1.5 / LLaVA-NeXT, by the same transformers functions the model runs.

    LLaVA-NeXT (``LlavaNextModel.get_image_features`` then ``pack_image_features``): the image is
    tiled on the best grid pinpoint (``image_size_to_num_patches`` counts the tiles plus the base
    image), each tile gives ``features_per_tile`` features, the grid's feature map is cropped back
    to the image's aspect ratio (``unpad_image``) and gets one ``image_newline`` per row; the base
    image's features come first. LLaVA-1.5: one 336 px tile, 576 features. A prompt of several images
    tiles each of them so (HF LLaVA-NeXT has no separate multi-image rule).
    """
    w, h = image_size
    v = arch.vision
    if not arch.anyres:
        return VisionLayout(image_size=(w, h), tiles=1, projector_tokens=v.features_per_tile, vision_tokens=v.features_per_tile,
                            tile_size=v.image_size)
    import torch
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
        unpad_image,
    )

    pinpoints = [list(p) for p in arch.grid_pinpoints]
    hw = [h, w]  # transformers takes image sizes as (height, width)
    tiles = image_size_to_num_patches(image_size=hw, grid_pinpoints=pinpoints, patch_size=v.image_size)
    rows, cols = get_anyres_image_grid_shape(hw, pinpoints, v.image_size)
    feature_map = torch.empty((1, rows * v.grid, cols * v.grid), device="meta")  # (C, H, W) as pack_image_features
    uh, uw = unpad_image(feature_map, hw).shape[1:]
    vision_tokens = v.features_per_tile + uh * (uw + 1)  # base image + unpadded grid with a newline per row
    return VisionLayout(
        image_size=(w, h), tiles=int(tiles), projector_tokens=int(tiles) * v.features_per_tile,
        vision_tokens=int(vision_tokens), grid=(int(rows), int(cols)), unpadded=(int(uh), int(uw)), tile_size=v.image_size,
    )


__all__ = [
    "Arch", "ArchError", "TextDims", "VisionDims", "VisionLayout", "load_arch", "arch_from_config",
    "vision_layout", "image_layout", "parse_image_size", "check_image_size", "check_images", "MAX_IMAGE_SIDE", "MAX_IMAGES",
]
