"""Run any supported model (vanilla or p-MoD) with a comparison method: :func:`apply_method`.

The method is *applied*, not patched in: an :class:`AppliedMethod` (the method's config and the
model's geometry) is handed to the model's routed forward (:class:`pmod_bench.model.routed.SparseModelMixin`,
which a p-MoD model has and a vanilla model gets from its host adapter's class map, the only class
change). The forward calls it at its own entry points:

* ``forward`` / ``generate`` with ``pixel_values`` and image tokens in ``input_ids``, under a method
  that acts on the vision features (``shortens_prompt``): the method turns each image into its
  (shorter) features (:meth:`AppliedMethod.method_inputs`), the prompt becomes ``inputs_embeds`` with
  those features where the image tokens were, left-padded, with its attention mask, position ids and
  ``vision_token_mask`` (the positions of the new vision features, which p-MoD's routing targets);
  the model's own ``forward`` / ``generate`` then runs the LLM on it;
* the same with a video (``pixel_values_videos`` and video tokens): each video's tokens become those the method keeps
  (:mod:`.video`: DyCoke, or an image method per frame on Qwen2.5-VL); a video-only method (``video_only``) leaves
  image prompts unchanged;
* an in-LLM method (``first_layer()``): the decoder layers from that layer on read the routing plan,
  and each forward with vision tokens gets the method's token policy (``start``);
* everything else (text-only prompts, decode steps with the cache) runs unchanged.

The flow of one prefill (B samples, image ``i`` with ``t_i`` tiles, ``P`` patches per tile)::

    pixel_values ─ split_tiles ─► [(t_i, C, H, W)] ─ method.compress ─► [(n_i, d)] per image
    input_ids (B, N) ─ embed ─► text pieces; image-token runs replaced by (n_i, d)
                     ─ left pad ─► inputs_embeds (B, N'), attention_mask (B, N'), position_ids (B, N')

``generate`` returns ``input_ids`` followed by the new tokens (the same layout as without a
method); ``forward`` returns logits over the shortened sequence (B, N', V): it ends where the
prompt ends, so the last ``k`` positions are the last ``k`` prompt tokens. To continue decoding by
hand, use the ``attention_mask`` / ``position_ids`` of :meth:`AppliedMethod.method_inputs` (a mask in
the original layout does not match the cache and is refused with that advice).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from pmod_bench.model.compat import CACHE_ARGUMENTS

from .base import MethodConfig, MethodError, ModelGeometry, parse_method_spec
from .vision import MethodInputs, hf_image_tokens, split_tiles  # noqa: F401  (MethodInputs re-exported)
from .video import has_video, video_method_inputs

IGNORE_INDEX = -100


class AppliedMethod:
    """A method applied to a model (module docstring): what the model's routed forward calls."""

    def __init__(self, config: MethodConfig, geometry: ModelGeometry) -> None:
        self.config = config
        self.geometry = geometry

    def first_layer(self) -> Optional[int]:
        return self.config.first_layer()

    def start(self, model, plan, kwargs: dict):
        return self.config.start(model, plan, kwargs)

    def method_inputs(self, model, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                      image_sizes: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                      labels: Optional[torch.Tensor] = None) -> MethodInputs:
        """Compress every image of the batch and build the shortened, left-padded LLM inputs (Qwen2.5-VL: pass
        ``image_grid_thw`` as ``image_sizes``; ``position_ids`` are then (4, B, N'), :mod:`.qwen_vision`)."""
        if _host(model).position_rows == 3:
            return self._merged_inputs(model, input_ids, pixel_values, image_sizes, attention_mask, labels)
        cfg = self.config
        image_token = model.config.image_token_id
        tiles = split_tiles(model, pixel_values, image_sizes)
        sizes = [None] * len(tiles) if image_sizes is None else [tuple(int(x) for x in s) for s in image_sizes.tolist()]
        images = cfg.compress(model, self.geometry, tiles, sizes)
        embed = model.get_input_embeddings()
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
                expect = hf_image_tokens(model.config, sizes[k])
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

    def _shorten(self, model, input_ids, pixel_values, kwargs: dict, attention_mask, labels=None) -> MethodInputs:
        """The shortened prefill, the image inputs taken out of ``kwargs``: LLaVA's tiles (``image_sizes``) or Qwen2.5-VL's
        merged grids (``image_grid_thw``; positions kept from the full grid, :mod:`.qwen_vision`); a video: :mod:`.video`."""
        if has_video(model, input_ids, kwargs):
            return video_method_inputs(self.config, self.geometry, model, input_ids, kwargs, attention_mask, labels)
        if _host(model).position_rows != 3:
            from .onevision_vision import check_one_image_per_prompt

            check_one_image_per_prompt(kwargs.pop("batch_num_images", None))
            return self.method_inputs(model, input_ids, pixel_values, kwargs.pop("image_sizes", None), attention_mask, labels)
        kwargs.pop("mm_token_type_ids", None)
        return self._merged_inputs(model, input_ids, pixel_values, kwargs.pop("image_grid_thw", None), attention_mask, labels)

    def _merged_inputs(self, model, input_ids, pixel_values, grid, attention_mask, labels) -> MethodInputs:
        from .qwen_vision import qwen_method_inputs

        if grid is None:
            raise MethodError("Qwen2.5-VL: pixel_values need the processor's image_grid_thw (pass the processor's output).")
        sizes = self.config.merged_resize(model, grid)
        if sizes is not None:  # downsample: the images resized, each image-token run re-counted, positions from the new grid
            from .qwen_vision import regrid_prompt, resample_images

            pixel_values, grid = resample_images(model, pixel_values, grid, sizes)
            unit = model.config.vision_config.spatial_merge_size ** 2
            input_ids, attention_mask, labels = regrid_prompt(input_ids, attention_mask, labels, model.config.image_token_id,
                                                              [int(g) // unit for g in grid.prod(-1).tolist()])
        images = self.config.compress_merged(model, self.geometry, pixel_values, grid)
        return qwen_method_inputs(model, images, input_ids, grid, attention_mask, labels)

    # ------------------------------------------------------------------------------ entry points
    def _has_images(self, model, input_ids, pixel_values, kwargs: dict) -> bool:
        if not self.config.shortens_prompt:
            return False  # in-LLM methods: the LLM gets every image feature (methods/llm.py)
        if has_video(model, input_ids, kwargs):
            return True   # a video prompt (methods/video.py)
        if self.config.video_only:
            return False  # a video method (DyCoke): images reach the model unchanged
        return (pixel_values is not None and input_ids is not None and pixel_values.numel() > 0
                and bool((input_ids == model.config.image_token_id).any()))

    def prefill(self, model, kwargs: dict) -> dict:
        """The forward's keyword arguments with the prompt shortened (images present), else as given."""
        input_ids, pixel_values = kwargs.get("input_ids"), kwargs.get("pixel_values")
        cache = next((kwargs[n] for n in CACHE_ARGUMENTS if kwargs.get(n) is not None), None)
        if not self._has_images(model, input_ids, pixel_values, kwargs):
            self._check_decode_mask(model, kwargs, cache)
            return kwargs
        if cache is not None and cache.get_seq_length() > 0:
            raise MethodError("images given with a non-empty cache: a method compresses the whole prompt at once; "
                              "start from an empty cache (or use generate()).")
        mi = self._shorten(model, input_ids, pixel_values, kwargs, kwargs.get("attention_mask"), kwargs.get("labels"))
        kwargs.update(input_ids=None, pixel_values=None, inputs_embeds=mi.inputs_embeds, attention_mask=mi.attention_mask,
                      vision_token_mask=mi.vision_token_mask)
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = mi.position_ids
        if kwargs.get("labels") is not None:
            kwargs["labels"] = mi.labels
        return kwargs

    def _check_decode_mask(self, model, kwargs: dict, cache: Any) -> None:
        from pmod_bench.model.routed import PMoDModelMixin

        mask = kwargs.get("attention_mask")
        ref = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if cache is None or mask is None or ref is None or not self.config.shortens_prompt or mask.dim() != 2:
            return
        if isinstance(model, PMoDModelMixin) and model.layer_ratios()[0] < 1.0:
            return  # layer 0 routes: its cache length is not the sequence length
        want = cache.get_seq_length() + ref.shape[1]
        if mask.shape[1] > want:
            raise MethodError(f"attention_mask has {mask.shape[1]} columns but the cache holds {want - ref.shape[1]} entries "
                              f"(+{ref.shape[1]} new): the prompt was shortened by {self.config.name}. Continue with "
                              "the attention_mask of model.method_inputs(...) (or use generate()).")

    def generate(self, model, parent_generate, inputs: Optional[torch.Tensor], args: tuple, kwargs: dict):
        """``model.generate`` with the prompt shortened (images present); the output starts with ``input_ids``."""
        input_ids = kwargs.pop("input_ids", inputs)
        pixel_values = kwargs.get("pixel_values")
        if not self._has_images(model, input_ids, pixel_values, kwargs):
            return parent_generate(input_ids, *args, **kwargs)
        if args:
            raise MethodError("pass generate()'s options by keyword (generation_config=..., ...) when a method is applied.")
        kwargs.pop("pixel_values", None)
        mi = self._shorten(model, input_ids, pixel_values, kwargs, kwargs.pop("attention_mask", None))
        if mi.position_ids.dim() == 3:  # M-RoPE: the kept tokens' positions; generate extends every row by one a step
            kwargs["position_ids"] = mi.position_ids
        out = parent_generate(inputs_embeds=mi.inputs_embeds, attention_mask=mi.attention_mask,
                              vision_token_mask=mi.vision_token_mask, **kwargs)
        # with inputs_embeds only, HF returns just the new tokens: put the prompt in front (the usual layout)
        if isinstance(out, torch.Tensor):
            return torch.cat([input_ids, out.to(input_ids.device)], dim=1)
        out.sequences = torch.cat([input_ids, out.sequences.to(input_ids.device)], dim=1)
        return out


def _host(model):
    """The host adapter of ``model``; MethodError names the supported model classes."""
    from pmod_bench.model.hosts import HostError, host_for, supported_hosts

    try:
        return host_for(model)
    except HostError:
        names = ", ".join(h.vanilla_class.__name__ for h in supported_hosts())
        raise MethodError(f"comparison methods apply to HF models of a supported family ({names}; vanilla or p-MoD, as "
                          f"load_model returns them), got {type(model).__name__}.") from None


def apply_method(model, method: Union[str, dict, MethodConfig, None], **method_args: Any):
    """Run ``model`` (a supported HF model, vanilla or p-MoD) with ``method``; returns the model (the same object).

    ``method``: a spec (``"visionzip:dominant=54,contextual=10"``), a dict (``to_dict`` form) or a
    config; ``method_args`` override its options (typed values). ``None`` removes a method applied
    before. Methods that rank by [CLS] attention switch the vision tower to eager attention (SDPA
    returns no weights; the official code runs eager attention too). Validated against the model
    (its family, its geometry) before anything changes.
    """
    from pmod_bench.model.routed import SparseModelMixin

    host = _host(model)
    if method is None:
        if isinstance(model, SparseModelMixin):
            model.use_method(None)
        host.without_routing(model)
        return model
    cfg = parse_method_spec(method, **method_args)
    cfg.check_host(host)
    geometry = ModelGeometry.from_config(model.config)
    cfg.check_model(geometry)
    host.check(model)
    if cfg.needs_attentions and not geometry.merge:  # Qwen2.5-VL: visionzip recomputes its last block's attention
        tower = model.model.vision_tower
        tower.set_attn_implementation("eager")
        if tower.config._attn_implementation != "eager":
            raise MethodError(f"could not switch the vision tower to eager attention (it runs "
                              f"{tower.config._attn_implementation}); {cfg.name} needs its attention weights.")
    host.with_routing(model).use_method(AppliedMethod(cfg, geometry))
    return model


__all__ = ["apply_method", "AppliedMethod", "MethodInputs"]
