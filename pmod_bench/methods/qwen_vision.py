"""Vision-stage methods on Qwen2.5-VL: the kept merged tokens go to the LLM at the M-RoPE positions of the full image.

Qwen2.5-VL writes one ``<|image_pad|>`` per merged 2x2 patch (``image_grid_thw.prod() / 4`` per image) and its
M-RoPE positions come from ``image_grid_thw`` (``Qwen2_5_VLModel.get_rope_index``). A method that keeps ``k`` of an
image's ``V`` merged tokens (in raster order) gives the LLM the prompt with the other ``V - k`` pad tokens dropped,
each kept token at the three position rows it has in the full prompt and the text after the image where it is
without a method (what ModelTC/LightCompress@9701d035 does for Qwen2.5-VL, ``visionzip.py``'s
``prune_qwenv25vl_hook``: drop the pad positions from the positions HF computed over the whole grid). The prompt is
then ``inputs_embeds`` + (4, B, N') ``position_ids`` (the text row, then the three M-RoPE rows: ``generate`` extends
all four by one per new token, which continues after the image's largest position as HF's own decode does), and
``model.model.rope_deltas`` = largest position + 1 - kept length per row, so a hand-made decode step
(:meth:`~pmod_bench.model.hosts.qwen2_5_vl.Qwen2_5_VLHost.decode_inputs`) lands where ``generate``'s does.
"""

from __future__ import annotations

from typing import Optional

import torch

from .geometry import MethodError
from .vision import CompressedImage

IGNORE_INDEX = -100


def image_features(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[torch.Tensor]:
    """The merger's output of every image, (V_i, d) each, merged tokens in raster order (HF's own image features)."""
    out = model.model.get_image_features(pixel_values, image_grid_thw)
    feats = getattr(out, "pooler_output", out)
    return list(feats)


def _runs(is_img: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of every run of True in a 1-D bool tensor."""
    x = torch.cat([is_img.new_zeros(1), is_img.to(torch.int8), is_img.new_zeros(1)])
    d = x[1:].to(torch.int8) - x[:-1].to(torch.int8)
    return list(zip(d.eq(1).nonzero()[:, 0].tolist(), d.eq(-1).nonzero()[:, 0].tolist()))


def qwen_method_inputs(model, images: list[CompressedImage], input_ids: torch.Tensor, image_grid_thw: torch.Tensor,
                       attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None):
    """The shortened, left-padded prefill (:class:`~pmod_bench.methods.apply.MethodInputs`, ``position_ids`` (4, B,
    N')) of a batch whose images became ``images`` (``selection[0]``: the kept merged-token indices, raster order)."""
    token = model.config.image_token_id
    B = input_ids.shape[0]
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    mm = (input_ids == token).long()
    pos, _ = model.model.get_rope_index(input_ids, mm, image_grid_thw=image_grid_thw,
                                        attention_mask=None if attention_mask is None else attention_mask)
    embed = model.get_input_embeddings()
    seqs, poss, vis, labs, k = [], [], [], [], 0
    for b in range(B):
        ids, p = input_ids[b][mask[b]], pos[:, b][:, mask[b]]
        is_img = ids == token
        keep = ~is_img
        feats = []
        for start, end in _runs(is_img):
            if k >= len(images):
                raise MethodError(f"sample {b} has more image-token runs than the batch has images ({len(images)}).")
            V = int(image_grid_thw[k].prod()) // model.config.vision_config.spatial_merge_size ** 2
            if end - start != V:
                raise MethodError(f"sample {b}: image {k} should fill {V} image tokens (image_grid_thw / 4), found a run "
                                  f"of {end - start}; the input_ids do not match the images given.")
            keep[start + images[k].selection[0].to(ids.device)] = True
            feats.append(images[k].features)
            k += 1
        emb = embed(ids.masked_fill(is_img, 0))[keep]
        v = is_img[keep]
        if feats:
            emb[v] = torch.cat(feats, 0).to(emb)
        seqs.append(emb)
        poss.append(p[:, keep])
        vis.append(v)
        if labels is not None:
            labs.append(labels[b][mask[b]][keep].masked_fill(v, IGNORE_INDEX))
    if k != len(images):
        raise MethodError(f"{len(images)} images were given but the prompts hold {k} image-token runs.")
    return _left_pad(model, seqs, poss, vis, labs if labels is not None else None, images)


def _left_pad(model, seqs, poss, vis, labs, images):
    from .vision import MethodInputs

    B, L, d = len(seqs), max(s.shape[0] for s in seqs), seqs[0].shape[1]
    dev = seqs[0].device
    embeds = seqs[0].new_zeros(B, L, d)
    am = torch.zeros(B, L, dtype=torch.long, device=dev)
    vm = torch.zeros(B, L, dtype=torch.bool, device=dev)
    mrope = torch.ones(3, B, L, dtype=torch.long, device=dev)   # padding at 1, as get_rope_index
    lb = None if labs is None else torch.full((B, L), IGNORE_INDEX, dtype=labs[0].dtype, device=dev)
    deltas = torch.zeros(B, 1, dtype=torch.long, device=dev)
    for b, s in enumerate(seqs):
        n = s.shape[0]
        embeds[b, L - n:], am[b, L - n:], vm[b, L - n:] = s, 1, vis[b]
        mrope[:, b, L - n:] = poss[b]
        deltas[b] = int(poss[b].max()) + 1 - n
        if lb is not None:
            lb[b, L - n:] = labs[b]
    text = (am.cumsum(-1) - 1).masked_fill(am == 0, 0)
    model.model.rope_deltas = deltas
    return MethodInputs(embeds, am, torch.cat([text[None], mrope], 0), vm, lb, images)





def window_reverse(visual, image_grid_thw: torch.Tensor) -> torch.Tensor:
    """The merged groups' window order undone: ``argsort(window_index)`` of HF's ``get_vision_window_index`` (what
    ``Qwen2_5_VisionTransformerPretrainedModel.forward`` applies to the merger's output)."""
    from transformers.vision_utils import get_vision_window_index

    window_index, _ = get_vision_window_index(image_grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                              window_size=visual.window_size, patch_size=visual.patch_size)
    return torch.argsort(window_index)


def last_block_scores(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
    """Run the tower once; per image: (merged features (V, d), received attention per merged token (V,), keys per
    merged token (V, head_dim)), all in raster order.

    The last block's attention is recomputed from its input (a forward pre-hook on ``blocks[-1].attn``: its
    ``hidden_states``, ``cu_seqlens``, ``position_embeddings``) as that module computes it (``qkv``, HF's
    ``apply_rotary_pos_emb_vision``, ``softmax(q kᵀ · scaling)`` over each ``cu_seqlens`` chunk): a token's score is
    the attention it receives, averaged over heads, summed over queries; its key is averaged over heads. Both are
    averaged over each merged 2x2 group (4 consecutive tokens there) and the window order is undone with
    ``argsort(window_index)``, as the merger's output (LightCompress's ``merger_hook``)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    visual = model.model.visual
    attn, seen = visual.blocks[-1].attn, {}
    handle = attn.register_forward_pre_hook(lambda _m, args, kw: seen.update(kw, hidden_states=(args or (kw["hidden_states"],))[0]),
                                            with_kwargs=True)
    try:
        feats = image_features(model, pixel_values, image_grid_thw)
    finally:
        handle.remove()
    hs, cu = seen["hidden_states"], seen["cu_seqlens"]
    S, H = hs.shape[0], attn.num_heads
    q, k, _ = attn.qkv(hs).reshape(S, 3, H, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *seen["position_embeddings"])
    received = torch.empty(S, dtype=torch.float32, device=hs.device)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        w = torch.softmax(torch.einsum("qhd,khd->hqk", q[a:b].float(), k[a:b].float()) * attn.scaling, dim=-1)
        received[a:b] = w.mean(0).sum(0)
    unit = visual.spatial_merge_size ** 2
    reverse = window_reverse(visual, image_grid_thw).to(hs.device)
    scores = received.view(-1, unit).mean(1)[reverse]
    keys = k.float().mean(1).view(-1, unit, k.shape[-1]).mean(1)[reverse]
    sizes = [f.shape[0] for f in feats]
    return list(zip(feats, scores.split(sizes), keys.split(sizes)))


def visionzip_merged(feats: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int):
    """VisionZip on one image's merged tokens (raster order): the ``dominant`` tokens of highest score, and
    ``contextual`` targets (every ``max(1, R // contextual)``-th of the R others, in order), each the target + the mean
    of the others whose key (L2-normalised) is most similar to its own. -> (kept indices, raster order; features)."""
    V = feats.shape[0]
    top = scores.topk(dominant).indices
    keep = torch.zeros(V, dtype=torch.bool, device=feats.device)
    keep[top] = True
    out = feats.clone()
    rest = (~keep).nonzero()[:, 0]                                  # (R,) raster order
    if contextual and rest.numel():
        m = keys[rest] / keys[rest].norm(dim=-1, keepdim=True)
        step = max(1, rest.numel() // contextual)
        targets = torch.arange(0, rest.numel(), step, device=feats.device)[:contextual]
        is_t = torch.zeros(rest.numel(), dtype=torch.bool, device=feats.device)
        is_t[targets] = True
        assign = (m[~is_t] @ m[targets].T).argmax(1)                 # (R - c,) target of each other token
        one_hot = torch.zeros(targets.numel(), int((~is_t).sum()), dtype=feats.dtype, device=feats.device)
        one_hot[assign, torch.arange(assign.numel(), device=feats.device)] = 1
        merged = one_hot @ feats[rest[~is_t]] / one_hot.sum(1, keepdim=True).clamp(min=1)
        out[rest[targets]] = feats[rest[targets]] + merged
        keep[rest[targets]] = True
    idx = keep.nonzero()[:, 0]
    return idx, out[idx]


# ------------------------------------------------------------------------------------------ downsampling
def unpatchify(visual, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """One image's ``pixel_values`` rows (gh*gw, C*T*p*p) -> its normalised pixels (C, gh*p, gw*p): the inverse of the
    processor's ``patchify`` (rows in merged-group order (gh/m, gw/m, m, m), each (C, T, p, p) with the T frames of an
    image equal; frame 0 is read)."""
    m, p, T = visual.spatial_merge_size, visual.patch_size, visual.config.temporal_patch_size
    gh, gw = grid
    x = patches.view(gh // m, gw // m, m, m, -1, T, p, p)[:, :, :, :, :, 0]      # (gh/m, gw/m, m, m, C, p, p)
    return x.permute(4, 0, 2, 5, 1, 3, 6).reshape(x.shape[4], gh * p, gw * p)


def patchify(visual, image: torch.Tensor) -> torch.Tensor:
    """(C, H, W) normalised pixels, H and W multiples of ``merge·patch`` -> (gh*gw, C*T*p*p) rows in the processor's
    layout (:func:`unpatchify`'s inverse; the image repeated over the T frames, as the processor does)."""
    m, p, T = visual.spatial_merge_size, visual.patch_size, visual.config.temporal_patch_size
    C, H, W = image.shape
    gh, gw = H // p, W // p
    x = image.reshape(C, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)   # (gh/m, gw/m, m, m, C, p, p)
    x = x.unsqueeze(5).expand(*x.shape[:5], T, p, p)
    return x.reshape(gh * gw, C * T * p * p)


def resample_images(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, sizes: list[tuple[int, int]]):
    """Every image of a batch at a new (height, width) in pixels (multiples of 28; ``None``: kept): bicubic,
    antialiased, on the normalised pixels (resizing is linear, so it equals resizing before normalisation up to the
    processor's 8-bit clipping). -> (pixel_values, image_grid_thw) as the processor would give for those sizes."""
    import torch.nn.functional as F

    visual = model.model.visual
    p = visual.patch_size
    rows, grids, start = [], [], 0
    for thw, size in zip(image_grid_thw.tolist(), sizes):
        t, gh, gw = thw
        n = t * gh * gw
        chunk = pixel_values[start:start + n]
        start += n
        if t != 1:
            raise MethodError("downsample on Qwen2.5-VL resizes images; image_grid_thw with a temporal size above 1 is a "
                              "video (pixel_values_videos), which the vision-stage methods do not take.")
        if size is None or tuple(size) == (gh * p, gw * p):
            rows.append(chunk)
            grids.append([1, gh, gw])
            continue
        img = unpatchify(visual, chunk, (gh, gw)).float()[None]
        img = F.interpolate(img, size=tuple(size), mode="bicubic", antialias=True, align_corners=False)[0]
        rows.append(patchify(visual, img.to(chunk.dtype)))
        grids.append([1, size[0] // p, size[1] // p])
    return torch.cat(rows, 0), torch.tensor(grids, dtype=image_grid_thw.dtype, device=image_grid_thw.device)


def regrid_prompt(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                  token: int, counts: list[int]):
    """The prompts with image ``k``'s run of ``<|image_pad|>`` tokens resized to ``counts[k]`` (the processor's
    expansion at the new grid), left-padded again -> (input_ids, attention_mask, labels)."""
    B = input_ids.shape[0]
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    seqs, labs, k = [], [], 0
    for b in range(B):
        ids = input_ids[b][mask[b]]
        lab = None if labels is None else labels[b][mask[b]]
        pieces, lpieces, pos = [], [], 0
        for start, end in _runs(ids == token):
            if k >= len(counts):
                raise MethodError(f"sample {b} has more image-token runs than the batch has images ({len(counts)}).")
            pieces += [ids[pos:start], ids.new_full((counts[k],), token)]
            if lab is not None:
                lpieces += [lab[pos:start], lab.new_full((counts[k],), IGNORE_INDEX)]
            pos, k = end, k + 1
        seqs.append(torch.cat(pieces + [ids[pos:]]))
        if lab is not None:
            labs.append(torch.cat(lpieces + [lab[pos:]]))
    if k != len(counts):
        raise MethodError(f"{len(counts)} images were given but the prompts hold {k} image-token runs.")
    L = max(s.shape[0] for s in seqs)
    ids_out = input_ids.new_zeros(B, L)
    am = torch.zeros(B, L, dtype=torch.long, device=input_ids.device)
    lb = None if labels is None else labels.new_full((B, L), IGNORE_INDEX)
    for b, s in enumerate(seqs):
        ids_out[b, L - s.shape[0]:], am[b, L - s.shape[0]:] = s, 1
        if lb is not None:
            lb[b, L - s.shape[0]:] = labs[b]
    return ids_out, am, lb


__all__ = ["image_features", "qwen_method_inputs", "window_reverse", "last_block_scores", "visionzip_merged", "unpatchify",
           "patchify", "resample_images", "regrid_prompt"]
