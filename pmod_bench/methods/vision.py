"""What the vision-side methods share: running the model's own vision tower and laying out tiles.

Everything goes through the HF model's public modules and outputs:

* the tiles of each image are taken from ``pixel_values`` as the model's host adapter lays them out
  (LLaVA-NeXT: as ``LlavaNextModel.get_image_features`` takes them); LLaVA-1.5 has one tile per image;
* the tower runs once over every tile of the batch (``vision_tower(pixels, output_hidden_states=True,
  output_attentions=...)``); hidden state ``h = vision_feature_layer`` (``-2``) is the feature LLaVA
  reads. The [CLS] attention the methods rank by is ``attentions[h - 1]``: the attention of the layer
  whose output is hidden state ``h`` (for ``h = -2`` this is ``attentions[-2]``, what the official
  VisionZip and FasterVLM code index). It needs eager attention in the tower (SDPA returns no
  weights); :func:`check_attention` fails loudly if the tensor is not the (tiles, heads, 1+P, 1+P)
  row-stochastic map with [CLS] first that the methods rely on;
* projections inside a layer (keys / queries of one attention layer) are read with forward hooks on
  that layer's ``k_proj`` / ``q_proj`` (PyTorch's public hook API; nothing is patched), for the
  duration of one call;
* :func:`pack_spatial_unpad` is LLaVA-NeXT's ``pack_image_features`` (transformers' own
  ``get_anyres_image_grid_shape`` and ``unpad_image``) for any per-tile grid ``gh x gw``: the
  downsampling baseline needs it at a smaller grid; at the full grid it is HF's packing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from pmod_bench.model.hosts.llava_next import grid_shape, unpadded_grid  # noqa: F401  (LLaVA-NeXT's geometry, re-exported)

from .base import MethodError, ModelGeometry


@dataclass
class CompressedImage:
    """One image after a vision-side method: the LLM-ready features and what was kept."""

    features: torch.Tensor
    """(n, d_text): projected features, in the order the LLM reads them."""
    selection: list[torch.Tensor] = field(default_factory=list)
    """Per tile (base first): indices 0..P-1 of the patch tokens kept / used as merge centres, in output order."""
    info: dict[str, Any] = field(default_factory=dict)
    """Method-specific facts (e.g. PruMerge's adaptive ratio), for tests and introspection."""


@dataclass
class TowerOutput:
    """The vision tower run over every tile of a batch (tiles of image 0 first)."""

    hidden: torch.Tensor
    """(tiles, 1+P, D): hidden state ``vision_feature_layer`` ([CLS] at index 0)."""
    attention: Optional[torch.Tensor] = None
    """(tiles, heads, 1+P, 1+P): attention of the layer that produced ``hidden``."""
    captured: dict[str, torch.Tensor] = field(default_factory=dict)
    """Forward-hook captures ``"k@LAYER"`` / ``"q@LAYER"``: (tiles, 1+P, D) projection outputs."""


def vision_modules(model) -> tuple[Any, Any, Optional[torch.Tensor]]:
    """(vision tower, projector, image_newline or None) of an HF LLaVA / LLaVA-NeXT model."""
    inner = getattr(model, "model", None)
    tower = getattr(inner, "vision_tower", None)
    projector = getattr(inner, "multi_modal_projector", None)
    if tower is None or projector is None:
        raise MethodError(f"{type(model).__name__} has no model.vision_tower / model.multi_modal_projector; the comparison "
                          "vision-stage methods run on models with a CLIP tower and a projector (LLaVA-1.5, LLaVA-NeXT).")
    return tower, projector, getattr(inner, "image_newline", None)


def encoder_layers(tower) -> Any:
    vm = getattr(tower, "vision_model", tower)
    try:
        return vm.encoder.layers
    except AttributeError:
        raise MethodError(f"the vision tower {type(tower).__name__} has no vision_model.encoder.layers (a CLIP-style "
                          "tower is expected: LLaVA's CLIP ViT-L/14).") from None


def split_tiles(model, pixel_values: torch.Tensor, image_sizes: Optional[torch.Tensor]) -> list[torch.Tensor]:
    """The tiles of each image, as the model's host adapter lays them out: LLaVA-NeXT (B, max_tiles, C, H, W) ->
    [(tiles_i, C, H, W)]; LLaVA-1.5 -> [(1, C, H, W)]."""
    from pmod_bench.model.hosts import HostError, host_for

    try:
        return host_for(model.config).split_tiles(model.config, pixel_values, image_sizes)
    except HostError as exc:
        raise MethodError(str(exc)) from None


@contextlib.contextmanager
def capture_projections(tower, wanted: dict[str, tuple[str, int]]) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks on ``layers[i].self_attn.<proj>``: ``{"k@22": ("k_proj", 22)}`` -> captured outputs."""
    layers = encoder_layers(tower)
    out: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for key, (proj, idx) in wanted.items():
            module = getattr(layers[idx].self_attn, proj, None)
            if module is None:
                raise MethodError(f"vision layer {idx} has no self_attn.{proj}; a CLIP attention (q_proj, k_proj) is expected.")

            def hook(_mod, _inp, output, key=key):
                out[key] = output

            handles.append(module.register_forward_hook(hook))
        yield out
    finally:
        for h in handles:
            h.remove()


def check_attention(attn: Any, tiles: int, tokens: int, layer: int) -> torch.Tensor:
    """The [CLS]-attention contract the methods rely on; raise if transformers changes it."""
    if attn is None:
        raise MethodError(f"the vision tower returned no attention weights for layer {layer}: it must run eager attention "
                          "(apply_method sets model.model.vision_tower.set_attn_implementation('eager')). Was it changed back?")
    if not isinstance(attn, torch.Tensor) or attn.dim() != 4 or attn.shape[0] != tiles or attn.shape[2:] != (tokens, tokens):
        shape = tuple(attn.shape) if isinstance(attn, torch.Tensor) else type(attn).__name__
        raise MethodError(f"vision attentions[{layer}] has shape {shape}, expected (tiles={tiles}, heads, {tokens}, {tokens}) "
                          "(transformers' CLIP output_attentions layout changed?).")
    rows = attn[:, :, 0, :].float().sum(-1)
    if not torch.allclose(rows, torch.ones_like(rows), atol=1e-2):
        raise MethodError(f"vision attentions[{layer}] rows do not sum to 1 ({rows.min().item():.3f}..{rows.max().item():.3f}): "
                          "not softmax probabilities over the keys; transformers' CLIP attention output changed.")
    return attn


def run_tower(model, geometry: ModelGeometry, pixels: torch.Tensor, *, attentions: bool = False,
              capture: Optional[dict[str, tuple[str, int]]] = None, interpolate: bool = False) -> TowerOutput:
    """Run the model's vision tower over ``pixels`` (tiles, C, H, W); see the module docstring."""
    tower, _, _ = vision_modules(model)
    pixels = pixels.to(device=next(tower.parameters()).device, dtype=next(tower.parameters()).dtype)
    h = geometry.feature_index
    if h == 0 and attentions:
        raise MethodError("vision_feature_layer selects the embeddings (no attention layer produced them); the [CLS]-attention "
                          "methods need a layer output (LLaVA: -2).")
    kwargs: dict[str, Any] = {"output_hidden_states": True}
    if attentions:
        kwargs["output_attentions"] = True
    if interpolate:
        kwargs["interpolate_pos_encoding"] = True
    with capture_projections(tower, capture or {}) as got:
        out = tower(pixels, **kwargs)
    hs = out.hidden_states
    if hs is None or len(hs) != geometry.vision_layers + 1:
        raise MethodError(f"the vision tower returned {0 if hs is None else len(hs)} hidden states, expected "
                          f"{geometry.vision_layers + 1} (embeddings + every layer).")
    hidden = hs[h]
    attn = None
    if attentions:
        att = out.attentions
        if att is None or len(att) != geometry.vision_layers:
            raise MethodError(f"the vision tower returned {0 if att is None else len(att)} attention maps, expected "
                              f"{geometry.vision_layers}: it must run eager attention.")
        attn = check_attention(att[h - 1], hidden.shape[0], hidden.shape[1], h - 1)
    for key in capture or {}:
        if key not in got:
            raise MethodError(f"the hook on vision {key} did not fire: the tower did not run that layer.")
    return TowerOutput(hidden=hidden, attention=attn, captured=dict(got))


def project(model, features: torch.Tensor) -> torch.Tensor:
    """The model's own multi-modal projector over (…, D) vision features."""
    _, projector, _ = vision_modules(model)
    return projector(features)


def stitch(grid_feats: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(rows*cols, gh, gw, ...) tile-major -> (rows*gh, cols*gw, ...): the tiles placed as in the image."""
    t, gh, gw = grid_feats.shape[:3]
    rest = grid_feats.shape[3:]
    x = grid_feats.reshape(rows, cols, gh, gw, *rest)          # (rows, cols, gh, gw, ...)
    x = x.permute(0, 2, 1, 3, *range(4, x.dim()))              # (rows, gh, cols, gw, ...)
    return x.reshape(rows * gh, cols * gw, *rest)


def pack_spatial_unpad(model, tile_feats: torch.Tensor, image_size, gh: int, gw: int) -> torch.Tensor:
    """LLaVA-NeXT's ``pack_image_features`` for one image at a per-tile grid ``gh x gw``.

    ``tile_feats``: (tiles, gh*gw, d) projected features, base tile first. Returns (n, d):
    the base tile's features, then the other tiles stitched, unpadded to the image's aspect ratio,
    with ``image_newline`` after every row. One tile: the features + one newline (as HF).
    """
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    _, _, newline = vision_modules(model)
    d = tile_feats.shape[-1]
    if tile_feats.shape[0] == 1:
        out = tile_feats[0]
        return torch.cat([out, newline[None].to(out)], 0) if newline is not None else out
    base = tile_feats[0]
    rows, cols = grid_shape(model.config, image_size)
    grid = stitch(tile_feats[1:].reshape(-1, gh, gw, d), rows, cols)   # (rows*gh, cols*gw, d)
    grid = unpad_image(grid.permute(2, 0, 1), image_size)               # (d, H', W')
    if newline is not None:
        grid = torch.cat([grid, newline[:, None, None].expand(d, grid.shape[1], 1).to(grid)], dim=-1)
    return torch.cat([base, grid.flatten(1, 2).transpose(0, 1)], 0)


def hf_image_tokens(config, image_size, gh: Optional[int] = None, gw: Optional[int] = None) -> int:
    """Image tokens of one image as the model lays them out (LLaVA-NeXT: base tile + unpadded grid + a newline per
    row), at ``gh x gw`` tokens per tile (default: the tile's full patch grid, what the HF processor writes); the
    host adapter's count."""
    from pmod_bench.model.hosts import host_for

    cfg = getattr(config, "config", config)
    return host_for(cfg).image_tokens(cfg, image_size, gh, gw)


def masked_spatial(config, feats: torch.Tensor, masks: torch.Tensor, image_size, geometry: ModelGeometry) -> torch.Tensor:
    """FasterVLM's LLaVA-NeXT layout ('spatial', its only mode): kept base-tile tokens in order, then the
    kept tokens of the other tiles read row by row over the stitched tile grid; no unpadding, no newline.

    feats (t, P, d), masks (t, P) bool -> (kept, d). One tile (LLaVA-1.5): its kept tokens in order.
    """
    if feats.shape[0] == 1 or not geometry.anyres:
        return feats.reshape(-1, feats.shape[-1])[masks.reshape(-1)]
    g, d = geometry.patches_per_side, feats.shape[-1]
    rows, cols = grid_shape(config, image_size)
    grid = stitch(feats[1:].reshape(-1, g, g, d), rows, cols).reshape(-1, d)
    gmask = stitch(masks[1:].reshape(-1, g, g), rows, cols).reshape(-1)
    return torch.cat([feats[0][masks[0]], grid[gmask]], 0)


def tokens_for(keep: Optional[float], tokens: Optional[int], patches: int) -> int:
    """Tokens kept per tile: ``tokens`` if given, else round(keep * patches) (FasterVLM's README: 576 x 0.25 = 144,
    576 x 0.1 = 58), at least 1, at most ``patches``."""
    n = tokens if tokens is not None else int(round(keep * patches))
    return max(1, min(int(n), patches))


__all__ = [
    "CompressedImage", "TowerOutput", "vision_modules", "encoder_layers", "split_tiles", "capture_projections",
    "check_attention", "run_tower", "project", "grid_shape", "unpadded_grid", "stitch", "pack_spatial_unpad", "hf_image_tokens",
    "masked_spatial", "tokens_for", "MethodInputs",
]


@dataclass
class MethodInputs:
    """The shortened prefill a vision-side method produces (left-padded)."""

    inputs_embeds: torch.Tensor
    """(B, N', d)"""
    attention_mask: torch.Tensor
    """(B, N') long: 1 = token, 0 = padding (on the left)"""
    position_ids: torch.Tensor
    """(B, N'): cumsum of the mask - 1 (padding 0), as ``generate`` computes them"""
    vision_token_mask: torch.Tensor
    """(B, N') bool: positions holding image features"""
    labels: Optional[torch.Tensor] = None
    """(B, N') with -100 on vision tokens and padding, when labels were given"""
    images: list[CompressedImage] = field(default_factory=list)
    """per image of the batch (in order): features and what was kept"""
