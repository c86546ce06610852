"""``apply_method(model, cfg)``: run an HF LLaVA / LLaVA-NeXT model (vanilla or p-MoD) with a method.

The model's class becomes a subclass of its own class with :class:`MethodModelMixin` in front (one
class per base class, cached; every weight, buffer and config stays the model's own). The mixin
adds only what differs, in the model's own entry points:

* ``forward`` / ``generate`` with ``pixel_values`` and image tokens in ``input_ids``: the method
  turns each image into its (shorter) features (:meth:`MethodModelMixin.method_inputs`), the prompt
  becomes ``inputs_embeds`` with those features where the image tokens were, left-padded, with its
  attention mask and position ids; the parent's ``forward`` / ``generate`` then runs the LLM on it.
  A p-MoD parent also gets ``vision_token_mask`` (the positions of the new vision features), so its
  routing targets exactly them;
* everything else (text-only prompts, decode steps with the cache) goes to the parent unchanged.

The flow of one prefill (B samples, image ``i`` with ``t_i`` tiles, ``P`` patches per tile)::

    pixel_values ─ split_tiles ─► [(t_i, C, H, W)] ─ method.compress ─► [(n_i, d)] per image
    input_ids (B, N) ─ embed ─► text pieces; image-token runs replaced by (n_i, d)
                     ─ left pad ─► inputs_embeds (B, N'), attention_mask (B, N'), position_ids (B, N')

``generate`` returns ``input_ids`` followed by the new tokens (the same layout as without a
method); ``forward`` returns logits over the shortened sequence (B, N', V): it ends where the
prompt ends, so the last ``k`` positions are the last ``k`` prompt tokens. To continue decoding by
hand, use the ``attention_mask`` / ``position_ids`` of :meth:`method_inputs` (a mask in the
original layout does not match the cache and is refused with that advice).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from .base import MethodConfig, MethodError, ModelGeometry, parse_method_spec
from .vision import CompressedImage, hf_image_tokens, split_tiles

IGNORE_INDEX = -100


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


class MethodModelMixin:
    """Put in front of an HF LLaVA(-NeXT) class by :func:`apply_method`; see the module docstring."""

    method_config: MethodConfig
    method_geometry: ModelGeometry

    # ------------------------------------------------------------------------------- the inputs
    def method_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_sizes: Optional[torch.Tensor] = None,
                      attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None) -> MethodInputs:
        """Compress every image of the batch and build the shortened, left-padded LLM inputs."""
        cfg = self.method_config
        image_token = self.config.image_token_id
        tiles = split_tiles(self, pixel_values, image_sizes)
        sizes = [None] * len(tiles) if image_sizes is None else [tuple(int(x) for x in s) for s in image_sizes.tolist()]
        images = cfg.compress(self, self.method_geometry, tiles, sizes)
        embed = self.get_input_embeddings()
        B, N = input_ids.shape
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        seqs: list[torch.Tensor] = []
        vis: list[torch.Tensor] = []
        labs: list[torch.Tensor] = []
        k = 0  # next image of the batch (images fill image-token runs in batch order, as HF's masked_scatter)
        for b in range(B):
            ids = input_ids[b][mask[b]]                                     # (n_b,) real tokens
            lab = labels[b][mask[b]] if labels is not None else None
            is_img = ids == image_token
            text_emb = embed(ids.masked_fill(is_img, 0))                   # (n_b, d)
            pieces, vpieces, lpieces = [], [], []
            pos, n_b = 0, ids.shape[0]
            while pos < n_b:
                if not bool(is_img[pos]):
                    end = pos
                    while end < n_b and not bool(is_img[end]):
                        end += 1
                    pieces.append(text_emb[pos:end])
                    vpieces.append(torch.zeros(end - pos, dtype=torch.bool, device=ids.device))
                    if lab is not None:
                        lpieces.append(lab[pos:end])
                    pos = end
                    continue
                if k >= len(images):
                    raise MethodError(f"sample {b} has more image-token runs than the batch has images ({len(images)}); "
                                      "pass one image per <image> token.")
                expect = hf_image_tokens(self.config, sizes[k])
                if pos + expect > n_b or not bool(is_img[pos:pos + expect].all()):
                    raise MethodError(f"sample {b}: image {k} should fill {expect} image tokens from position {pos} (the "
                                      "processor's expansion of <image>); the input_ids do not match the images given.")
                feats = images[k].features.to(text_emb.dtype)
                pieces.append(feats)
                vpieces.append(torch.ones(feats.shape[0], dtype=torch.bool, device=ids.device))
                if lab is not None:
                    lpieces.append(torch.full((feats.shape[0],), IGNORE_INDEX, dtype=lab.dtype, device=lab.device))
                pos += expect
                k += 1
            seqs.append(torch.cat(pieces, 0))
            vis.append(torch.cat(vpieces, 0))
            if lab is not None:
                labs.append(torch.cat(lpieces, 0))
        if k != len(images):
            raise MethodError(f"{len(images)} images were given but the prompts hold {k} image-token runs; pass one image per <image>.")
        L = max(s.shape[0] for s in seqs)
        d = seqs[0].shape[1]
        dev = seqs[0].device
        embeds = torch.zeros(B, L, d, dtype=seqs[0].dtype, device=dev)
        am = torch.zeros(B, L, dtype=torch.long, device=dev)
        vm = torch.zeros(B, L, dtype=torch.bool, device=dev)
        lb = torch.full((B, L), IGNORE_INDEX, dtype=labels.dtype, device=dev) if labels is not None else None
        for b, s in enumerate(seqs):                                        # left padding
            n = s.shape[0]
            embeds[b, L - n:] = s
            am[b, L - n:] = 1
            vm[b, L - n:] = vis[b]
            if lb is not None:
                lb[b, L - n:] = labs[b]
        pos_ids = (am.cumsum(-1) - 1).masked_fill(am == 0, 0)
        return MethodInputs(embeds, am, pos_ids, vm, lb, images)

    # ------------------------------------------------------------------------------ entry points
    def _is_pmod(self) -> bool:
        return hasattr(self, "pmod_layers")

    def _reads_plan(self) -> bool:
        """The parent's forward builds a routing plan (p-MoD, or an in-LLM method's routed class): it takes vision_token_mask."""
        return self._is_pmod() or getattr(self, "llm_method", None) is not None

    def _has_images(self, input_ids, pixel_values) -> bool:
        cfg = self.method_config
        if cfg.stage != "vision" and not getattr(cfg, "compresses_vision", False):
            return False  # in-LLM methods: the LLM gets every image feature (methods/llm.py); iLLaVA acts on both sides
        return (pixel_values is not None and input_ids is not None and pixel_values.numel() > 0
                and bool((input_ids == self.config.image_token_id).any()))

    def forward(self, *args, **kwargs):
        parent = super().forward
        if args:
            names = [n for n in inspect.signature(parent).parameters if n != "self"]
            kwargs.update(zip(names, args))
        input_ids, pixel_values = kwargs.get("input_ids"), kwargs.get("pixel_values")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if not self._has_images(input_ids, pixel_values):
            self._check_decode_mask(kwargs, cache)
            return parent(**kwargs)
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            raise MethodError("images given with a non-empty cache: a method compresses the whole prompt at once; "
                              "start from an empty cache (or use generate()).")
        mi = self.method_inputs(input_ids, pixel_values, kwargs.pop("image_sizes", None), kwargs.get("attention_mask"),
                                kwargs.get("labels"))
        kwargs.update(input_ids=None, pixel_values=None, inputs_embeds=mi.inputs_embeds, attention_mask=mi.attention_mask)
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = mi.position_ids
        if kwargs.get("labels") is not None:
            kwargs["labels"] = mi.labels
        if self._reads_plan():
            kwargs["vision_token_mask"] = mi.vision_token_mask
        return parent(**kwargs)

    def _check_decode_mask(self, kwargs: dict, cache: Any) -> None:
        mask = kwargs.get("attention_mask")
        ref = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if cache is None or mask is None or ref is None or not hasattr(cache, "get_seq_length") or mask.dim() != 2:
            return
        if self._is_pmod() and self.layer_ratios()[0] < 1.0:
            return  # layer 0 routes: its cache length is not the sequence length
        want = cache.get_seq_length() + ref.shape[1]
        if mask.shape[1] > want:
            raise MethodError(f"attention_mask has {mask.shape[1]} columns but the cache holds {want - ref.shape[1]} entries "
                              f"(+{ref.shape[1]} new): the prompt was shortened by {self.method_config.name}. Continue with "
                              "the attention_mask of model.method_inputs(...) (or use generate()).")

    def generate(self, inputs: Optional[torch.Tensor] = None, *args, **kwargs):
        input_ids = kwargs.pop("input_ids", inputs)
        pixel_values = kwargs.get("pixel_values")
        if not self._has_images(input_ids, pixel_values):
            return super().generate(input_ids, *args, **kwargs)
        if args:
            raise MethodError("pass generate()'s options by keyword (generation_config=..., ...) when a method is applied.")
        kwargs.pop("pixel_values")
        mi = self.method_inputs(input_ids, pixel_values, kwargs.pop("image_sizes", None), kwargs.pop("attention_mask", None))
        if self._reads_plan():
            kwargs["vision_token_mask"] = mi.vision_token_mask
        out = super().generate(inputs_embeds=mi.inputs_embeds, attention_mask=mi.attention_mask, **kwargs)
        # with inputs_embeds only, HF returns just the new tokens: put the prompt in front (the usual layout)
        if isinstance(out, torch.Tensor):
            return torch.cat([input_ids, out.to(input_ids.device)], dim=1)
        out.sequences = torch.cat([input_ids, out.sequences.to(input_ids.device)], dim=1)
        return out


_CLASSES: dict[type, type] = {}


def _method_class(base: type) -> type:
    if base not in _CLASSES:
        def forward(self, *args, **kwargs):
            return MethodModelMixin.forward(self, *args, **kwargs)

        # generate() validates its model kwargs against forward's signature: keep the parent's (p-MoD: + vision_token_mask)
        forward.__signature__ = inspect.signature(base.forward)
        forward.__doc__ = base.forward.__doc__
        _CLASSES[base] = type(f"{base.__name__}WithMethod", (MethodModelMixin, base),
                              {"__module__": __name__, "forward": forward,
                               "__doc__": f"{base.__name__} run with a comparison method (apply_method)."})
    return _CLASSES[base]


def apply_method(model, method: Union[str, dict, MethodConfig, None], **method_args: Any):
    """Run ``model`` (an HF LLaVA / LLaVA-NeXT model, vanilla or p-MoD) with ``method``; returns the model.

    ``method``: a spec (``"visionzip:dominant=54,contextual=10"``), a dict (``to_dict`` form) or a
    config; ``method_args`` override its options (typed values). ``None`` removes a method applied
    before. Methods that rank by [CLS] attention switch the vision tower to eager attention (SDPA
    returns no weights; the official code runs eager attention too). Validated against the model.
    """
    from transformers.models.llava.modeling_llava import LlavaForConditionalGeneration
    from transformers.models.llava_next.modeling_llava_next import LlavaNextForConditionalGeneration

    cls = type(model)
    base = cls.__mro__[2] if issubclass(cls, MethodModelMixin) else cls
    if getattr(model, "llm_method", None) is not None:  # an in-LLM method applied before: undo it first
        from .llm import original_class, uninstall

        uninstall(model)
        base = original_class(cls)
    if method is None:
        if issubclass(cls, MethodModelMixin):
            model.__class__ = base
            for attr in ("method_config", "method_geometry"):
                model.__dict__.pop(attr, None)
        return model
    if not issubclass(base, (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration)):
        raise MethodError(f"comparison methods apply to HF LlavaForConditionalGeneration / LlavaNextForConditionalGeneration "
                          f"models (vanilla or p-MoD, as load_model returns them), got {cls.__name__}.")
    cfg = parse_method_spec(method, **method_args)
    geometry = ModelGeometry.from_config(model.config)
    cfg.check_model(geometry)
    if cfg.stage == "llm":  # wrap the layers it needs; a vanilla model gets the routed forward (methods/llm.py)
        from .llm import install

        base = install(model, cfg, geometry, base)
    if cfg.needs_attentions:
        tower = model.model.vision_tower
        tower.set_attn_implementation("eager")
        if tower.config._attn_implementation != "eager":
            raise MethodError(f"could not switch the vision tower to eager attention (it runs "
                              f"{tower.config._attn_implementation}); {cfg.name} needs its attention weights.")
    model.__class__ = _method_class(base)
    model.method_config = cfg
    model.method_geometry = geometry
    return model


__all__ = ["apply_method", "MethodModelMixin", "MethodInputs"]
