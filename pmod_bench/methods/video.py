"""Vision-stage methods on video prompts: the kept video tokens reach the LLM, as :mod:`.apply` does for images.

A prompt with a video (``pixel_values_videos`` and the host's video tokens in ``input_ids``) under a method that
shortens the prompt is built here (:func:`video_method_inputs`, called by
:meth:`~pmod_bench.methods.apply.AppliedMethod`'s entry points). Per video, the host's own features:

* LLaVA-OneVision: ``get_video_features`` (tower, projector, 2x2 pooling, one ``image_newline`` after the video),
  (F·P + 1, d) for F frames of P pooled tokens;
* Qwen2.5-VL: ``get_video_features`` (tower and merger), (T·P, d) for T temporal slices (frame pairs) of P merged
  tokens, raster order within a slice; the M-RoPE positions of the whole video (``get_rope_index`` with
  ``video_grid_thw`` and ``second_per_grid_ts``).

Which tokens stay:

* a video method (``video_keep(frames)``: DyCoke, :mod:`.dycoke`): the indices it returns over (F, P, d), in its
  order (OneVision's newline stays last);
* an image method on Qwen2.5-VL, per frame: each temporal slice is one image of grid ``(1, h, w)`` to its
  ``compress_merged`` (the tower attends within a temporal slice, ``cu_seqlens`` per slice, so a slice's features
  are those of that image alone); kept indices offset by the slice. On OneVision video the image methods are not
  ported (a frame's tokens are pooled after the projector) and refuse in one line.

The sequence is then the original with each video's run of tokens replaced by its kept tokens (text where it was),
left-padded; positions: OneVision the mask's cumulative sum (the kept tokens renumbered in the order they are read,
as the official code's shortened sequence), Qwen2.5-VL each kept token at its position in the full video and
``rope_deltas`` as :mod:`.qwen_vision`. A prompt holding images and a video is refused (one line).

Analytic FLOPs (:func:`video_method_flops`): the whole tower and projector of the video (the profiler's count), the
LLM on the kept tokens; the in-LLM methods at the counts they keep per layer.
"""

from __future__ import annotations

from typing import Any, Optional

from .geometry import MethodError

IGNORE_INDEX = -100


def has_video(model, input_ids: Any, kwargs: dict) -> bool:
    """Whether the call carries a video: ``pixel_values_videos`` and video tokens in ``input_ids``."""
    pv = kwargs.get("pixel_values_videos")
    token = getattr(model.config, "video_token_id", None)
    return (pv is not None and input_ids is not None and token is not None and pv.numel() > 0
            and bool((input_ids == token).any()))


def _qwen(model) -> bool:
    from pmod_bench.model.hosts import host_for

    return host_for(model).position_rows == 3


def video_method_inputs(cfg, geometry, model, input_ids, kwargs: dict, attention_mask=None, labels=None):
    """The shortened, left-padded prefill (:class:`~.vision.MethodInputs`) of a batch with one video per prompt
    (module docstring); the video inputs are taken out of ``kwargs``."""
    if kwargs.get("pixel_values") is not None and bool((input_ids == model.config.image_token_id).any()):
        raise MethodError(f"{cfg.name}: a prompt with both images and a video is not supported under a method; give "
                          "the video on its own (or the images).")
    pv = kwargs.pop("pixel_values_videos")
    kwargs.pop("pixel_values", None)
    if not _qwen(model):
        kwargs.pop("image_sizes_videos", None)
        return _gather(model, _onevision_videos(cfg, model, pv), input_ids, attention_mask, labels, None)
    grid, seconds = kwargs.pop("video_grid_thw", None), kwargs.pop("second_per_grid_ts", None)
    kwargs.pop("mm_token_type_ids", None)
    if grid is None:
        raise MethodError("Qwen2.5-VL: pixel_values_videos need the processor's video_grid_thw (pass the processor's output).")
    mm = (input_ids == model.config.video_token_id).long() * 2        # token types: 2 = video (get_rope_index)
    pos, _ = model.model.get_rope_index(input_ids, mm, video_grid_thw=grid, second_per_grid_ts=seconds,
                                        attention_mask=attention_mask)
    videos = _qwen_videos(cfg, geometry, model, pv, grid)
    return _gather(model, videos, input_ids, attention_mask, labels, pos)


def _onevision_videos(cfg, model, pv) -> list:
    """Per video: (kept indices into its F·P + 1 tokens, in order; its full features)."""
    import torch

    keep = getattr(cfg, "video_keep", None)
    if keep is None:
        raise MethodError(f"{cfg.name} on LLaVA-OneVision video is not ported (a frame's tokens are pooled after the "
                          "projector); on video run dycoke, or the in-LLM methods (fastv, ...).")
    c = model.config
    out = model.model.get_video_features(pv, vision_feature_layer=c.vision_feature_layer,
                                         vision_feature_select_strategy=c.vision_feature_select_strategy, return_dict=True)
    videos = []
    F = pv.shape[1]
    for feats in out.pooler_output:                                    # (F·P + 1, d): frames, then the newline
        P = (feats.shape[0] - 1) // F
        idx = keep(feats[:-1].view(F, P, -1))
        videos.append((torch.cat([idx, idx.new_tensor([F * P])]), feats))
    return videos


def _qwen_videos(cfg, geometry, model, pv, grid) -> list:
    """Per video: (kept indices into its T·P merged tokens, in order; its full features)."""
    import torch

    keep = getattr(cfg, "video_keep", None)
    unit = model.config.vision_config.spatial_merge_size ** 2
    rows = grid.prod(-1).tolist()
    videos = []
    for g, px in zip(grid, pv.split(rows)):
        T, h, w = (int(x) for x in g)
        P = h * w // unit
        if keep is not None:
            feats = model.model.get_video_features(px, g[None]).pooler_output[0]           # (T·P, d)
            videos.append((keep(feats.view(T, P, -1)), feats))
            continue
        frames = torch.tensor([[1, h, w]] * T, dtype=grid.dtype, device=grid.device)
        images = cfg.compress_merged(model, geometry, px, frames)      # one per temporal slice
        feats = torch.cat([im.features for im in images]).new_zeros(T * P, images[0].features.shape[-1])
        idx = torch.cat([im.selection[0].to(feats.device) + t * P for t, im in enumerate(images)])
        feats[idx] = torch.cat([im.features for im in images]).to(feats)
        videos.append((idx, feats))
    return videos


def _gather(model, videos: list, input_ids, attention_mask, labels, positions):
    """Each video's run of tokens -> its kept tokens in order; text unchanged; left-padded ``MethodInputs``."""
    import torch

    from .qwen_vision import _runs
    from .vision import CompressedImage

    token = model.config.video_token_id
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    embed = model.get_input_embeddings()
    seqs, poss, vis, labs, k = [], [], [], [], 0
    for b in range(input_ids.shape[0]):
        ids = input_ids[b][mask[b]]
        is_vid = ids == token
        emb = embed(ids.masked_fill(is_vid, 0))                       # (n_b, d)
        order, v, start = [], [], 0
        for a, e in _runs(is_vid):
            if k >= len(videos):
                raise MethodError(f"sample {b} has more video-token runs than the batch has videos ({len(videos)}).")
            idx, feats = videos[k]
            if e - a != feats.shape[0]:
                raise MethodError(f"sample {b}: video {k} should fill {feats.shape[0]} video tokens, found a run of "
                                  f"{e - a}; the input_ids do not match the videos given.")
            emb[a:e] = feats.to(emb)
            order += [torch.arange(start, a, device=ids.device), a + idx.to(ids.device)]
            v += [torch.zeros(a - start, dtype=torch.bool), torch.ones(idx.numel(), dtype=torch.bool)]
            start, k = e, k + 1
        order.append(torch.arange(start, ids.shape[0], device=ids.device))
        v.append(torch.zeros(ids.shape[0] - start, dtype=torch.bool))
        order = torch.cat(order)
        seqs.append(emb[order])
        vis.append(torch.cat(v).to(ids.device))
        poss.append(None if positions is None else positions[:, b][:, mask[b]][:, order])
        if labels is not None:
            labs.append(labels[b][mask[b]][order].masked_fill(vis[-1], IGNORE_INDEX))
    if k != len(videos):
        raise MethodError(f"{len(videos)} videos were given but the prompts hold {k} video-token runs.")
    images = [CompressedImage(feats[idx.to(feats.device)], [idx]) for idx, feats in videos]
    return _left_pad(model, seqs, poss, vis, labs if labels is not None else None, images)


def _left_pad(model, seqs, poss, vis, labs, images):
    """Left-pad the samples: (B, N') embeddings, mask, vision mask, labels; positions 1-D (the mask's cumulative sum)
    or, with M-RoPE ``poss``, (4, B, N') (the text row, then the three rows; padding at 1) and ``rope_deltas``."""
    import torch

    from .vision import MethodInputs

    B, L, d = len(seqs), max(s.shape[0] for s in seqs), seqs[0].shape[1]
    dev = seqs[0].device
    embeds = seqs[0].new_zeros(B, L, d)
    am = torch.zeros(B, L, dtype=torch.long, device=dev)
    vm = torch.zeros(B, L, dtype=torch.bool, device=dev)
    lb = None if labs is None else torch.full((B, L), IGNORE_INDEX, dtype=labs[0].dtype, device=dev)
    mrope = torch.ones(3, B, L, dtype=torch.long, device=dev) if poss[0] is not None else None
    deltas = torch.zeros(B, 1, dtype=torch.long, device=dev)
    for b, s in enumerate(seqs):
        n = s.shape[0]
        embeds[b, L - n:], am[b, L - n:], vm[b, L - n:] = s, 1, vis[b]
        if lb is not None:
            lb[b, L - n:] = labs[b]
        if mrope is not None:
            mrope[:, b, L - n:] = poss[b]
            deltas[b] = int(poss[b].max()) + 1 - n
    text = (am.cumsum(-1) - 1).masked_fill(am == 0, 0)
    if mrope is None:
        return MethodInputs(embeds, am, text, vm, lb, images)
    model.model.rope_deltas = deltas
    return MethodInputs(embeds, am, torch.cat([text[None], mrope], 0), vm, lb, images)


# ------------------------------------------------------------------------------------------ analytic FLOPs
def video_method_flops(cfg, arch, frame_size: tuple[int, int], video: Any, text_tokens: int, logits_tokens: int = 1):
    """:class:`~.flops.MethodFlops` of one prompt with ``video`` (a :class:`~pmod_bench.profiler.video.Video`) of
    frames of ``frame_size`` under ``cfg`` on ``arch`` (module docstring)."""
    from pmod_bench.profiler.arch import vision_layout
    from pmod_bench.profiler.flops import llm_prefill_flops, paper_prefill_flops, vision_flops

    from .flops import MethodFlops
    from .geometry import checked_geometry

    checked_geometry(cfg, arch.config)
    layout = vision_layout(arch, frame_size, 1, video)
    V, t = layout.vision_tokens, arch.text
    vis = vision_flops(arch, layout)
    kept, extra, llm_extra = _video_kept(cfg, arch, layout, text_tokens)
    llm = llm_prefill_flops(t, text_tokens, V if llm_extra is not None else kept[0], kept, (), logits_tokens).total("full")
    paper = paper_prefill_flops(t, text_tokens, V if llm_extra is not None else kept[0], kept)
    inside = llm_extra or 0
    return MethodFlops(vision_encoder=vis.encoder, projector=vis.projector, method_extra=extra, llm_prefill=llm + inside,
                       llm_prefill_paper=paper + inside, llm_vision_tokens=min(kept), baseline_vision_tokens=V,
                       layer_vision_tokens=tuple(kept) if llm_extra is not None else (), llm_extra=inside)


def _video_kept(cfg, arch, layout, text_tokens: int) -> tuple[list[int], int, Optional[int]]:
    """(vision tokens per LLM layer, the method's own products before the LLM, its products inside the LLM or None
    for a vision-stage method) of a video ``layout``."""
    L, V = arch.text.layers, layout.vision_tokens
    if cfg.stage == "llm" and not cfg.compresses_vision:
        return list(cfg.layer_vision_tokens(L, V)), 0, cfg.extra_flops(arch.text, text_tokens, V)
    onevision = layout.pooled is not None
    frames = layout.frames if onevision else layout.temporal
    P = (V - 1) // frames if onevision else V // frames
    if hasattr(cfg, "video_tokens"):
        return [cfg.video_tokens(frames, P) + int(onevision)] * L, 0, None
    if onevision or cfg.compresses_vision:
        raise MethodError(f"{cfg.name} on video is counted on Qwen2.5-VL (per frame); on LLaVA-OneVision video run "
                          "dycoke or an in-LLM method.")
    return [frames * cfg.merged_tokens(P)] * L, frames * cfg.merged_extra(arch, P), None


__all__ = ["has_video", "video_method_inputs", "video_method_flops"]
