"""Each vision-side method against crafted inputs (known kept / merged tokens) and against a reference written
here that recomputes the official algorithm step by step (the official code's own loops and layouts) on the
tiny LLaVA-NeXT model: same selected indices, same logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_inputs
from pmod_bench.methods import apply_method
from pmod_bench.methods.fastervlm import fastervlm_masks
from pmod_bench.methods.prumerge import iqr_outlier_ratio, prumerge_tile, spatial_step
from pmod_bench.methods.visionzip import visionzip_tiles

SIZE = ((64, 48),)  # a 2x2 tile grid + base tile


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _cls_attention(rows: torch.Tensor, heads: int = 2) -> torch.Tensor:
    """(T, n) [CLS] rows -> (T, heads, n, n) attention whose [CLS] row is ``rows`` in every head (others uniform)."""
    T, n = rows.shape
    attn = torch.full((T, heads, n, n), 1.0 / n)
    attn[:, :, 0, :] = rows[:, None, :]
    return attn


# ----------------------------------------------------------------------------------- crafted inputs
def test_visionzip_crafted_dominant_and_contextual():
    n, D = 9, 4                                     # [CLS] + 8 patches
    row = torch.tensor([0.0, 0.01, 0.5, 0.02, 0.03, 0.3, 0.04, 0.05, 0.05])
    hidden = torch.arange(n * D, dtype=torch.float32).view(1, n, D)
    # remaining tokens after dominant = {0 (CLS), 2, 5}: 1, 3, 4, 6, 7, 8 (R = 6); contextual 2 -> step 3 -> targets 1, 6
    metric = torch.zeros(1, n, 2)
    metric[0, [1, 3, 4], 0] = 1.0                    # 3 and 4 are like target 1
    metric[0, [6, 7, 8], 1] = 1.0                    # 7 and 8 are like target 6
    tokens, kept = visionzip_tiles(hidden, _cls_attention(row[None]), metric, dominant=3, contextual=2)
    assert kept[0].tolist() == [0, 2, 5]
    h = hidden[0]
    expect = torch.stack([h[0], h[2], h[5], h[1] + (h[3] + h[4]) / 2, h[6] + (h[7] + h[8]) / 2])
    torch.testing.assert_close(tokens[0], expect)


def test_fastervlm_crafted_head_mean():
    # head 0 prefers patch 0, head 1 prefers patch 3; the mean ranks 3 > 0 > 1 > 2 (0.4, 0.3, 0.175, 0.125)
    attn = torch.full((1, 2, 5, 5), 0.2)
    attn[0, 0, 0] = torch.tensor([0.0, 0.6, 0.25, 0.15, 0.0])
    attn[0, 1, 0] = torch.tensor([0.0, 0.0, 0.1, 0.1, 0.8])
    assert fastervlm_masks(attn, 2)[0].nonzero()[:, 0].tolist() == [0, 3]
    assert fastervlm_masks(attn, 3)[0].nonzero()[:, 0].tolist() == [0, 1, 3]


def test_prumerge_crafted_iqr_and_merge():
    scores = torch.tensor([1.0] * 14 + [20.0, 10.0])
    assert iqr_outlier_ratio(scores) == pytest.approx(2 / 16)          # Q1 = Q3 = 1: everything above 1
    vals = torch.rand(3, 50)
    ref = [np.mean(v.numpy() > np.percentile(v.numpy(), 75) + 1.5 * (np.percentile(v.numpy(), 75) - np.percentile(v.numpy(), 25)))
           for v in [vals.flatten()]]
    assert iqr_outlier_ratio(vals) == pytest.approx(float(ref[0]))      # numpy's percentiles, over all tiles jointly
    P, D = 8, 3
    x = torch.randn(P, D, generator=torch.Generator().manual_seed(0))
    attn = torch.tensor([0.05, 0.4, 0.05, 0.05, 0.3, 0.05, 0.05, 0.05])
    keys = torch.zeros(P, 2)
    keys[[1, 2, 3], 0] = 1.0                                            # 2, 3 are like 1
    keys[[4, 5, 6, 7], 1] = 1.0                                         # 5, 6, 7 are like 4
    keys[[0], :] = torch.tensor([0.6, 0.8])
    out, idx = prumerge_tile(x, keys, attn, ratio=2 / 8, cluster=2, plus=False)
    assert idx.tolist() == [1, 4]                                       # by attention, descending
    torch.testing.assert_close(out[0], x[1] + 0.05 * x[2] + 0.05 * x[3])
    nb = out[1] - x[4]                                                  # two of 5, 6, 7 (ties: any two), weights 0.05
    assert torch.allclose(nb, 0.05 * (x[5] + x[6])) or torch.allclose(nb, 0.05 * (x[5] + x[7])) or torch.allclose(nb, 0.05 * (x[6] + x[7]))
    rest = [0, 2, 3, 5, 6, 7]
    torch.testing.assert_close(out[2], (attn[rest][:, None] * x[rest]).sum(0))
    out_plus, idx_plus = prumerge_tile(x, keys, attn, ratio=2 / 8, cluster=2, plus=True)
    assert spatial_step(2 / 8) == 1 and idx_plus.tolist() == [1, 4, 0, 2, 3, 5, 6]   # arange(0, P - 1) minus kept
    assert out_plus.shape == (8, D)


# --------------------------------------------------------------------------- official references
def _model_and_inputs(tiny_processor):
    from pmod_bench.model.presets import build_preset

    model, _ = build_preset("tiny", pmod=None)
    return model, make_inputs(tiny_processor, sizes=SIZE)


def _tower(model, pixel_values, image_sizes):
    """Official: the CLIP tower over the image's tiles with hidden states + attentions (eager)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")
    n = image_size_to_num_patches(image_sizes[0], model.config.image_grid_pinpoints, model.config.vision_config.image_size)
    return tower(pixel_values[0, :n], output_hidden_states=True, output_attentions=True), n


def _layers(model):
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).encoder.layers


def _official_embeds(model, input_ids, image_features):
    """Official prepare_inputs_labels_for_multimodal (batch 1): text embeds with the image features spliced in."""
    ids = input_ids[0]
    where = (ids == model.config.image_token_id).nonzero()[:, 0]
    start, end = int(where[0]), int(where[-1]) + 1
    emb = model.get_input_embeddings()
    return torch.cat([emb(ids[:start]), image_features, emb(ids[end:])])[None]


def _grid(model, image_sizes):
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    cfg = model.config
    h, w = get_anyres_image_grid_shape(image_sizes[0].tolist(), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    return w, h  # official: num_patch_width, num_patch_height


def _compare(model, inputs, spec, ref_features, ref_selection):
    with torch.no_grad():
        ref_logits = model(inputs_embeds=_official_embeds(model, inputs["input_ids"], ref_features)).logits
        apply_method(model, spec)
        mi = model.method_inputs(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"], inputs["attention_mask"])
        logits = model(**inputs).logits
    assert [s.tolist() for s in mi.images[0].selection] == ref_selection
    torch.testing.assert_close(mi.images[0].features, ref_features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_visionzip_matches_official(tiny_processor):
    model, inputs = _model_and_inputs(tiny_processor)
    dominant, contextual = 6, 3
    with torch.no_grad():
        out, n_tiles = _tower(model, inputs["pixel_values"], inputs["image_sizes"])
        layer = _layers(model)[-2]
        hidden_states = out.hidden_states[-2]
        attn_weights = out.attentions[-2]
        # official metric: raw keys of layer -2 (before the attention scaling), mean over heads
        keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[-3]))
        B, N, C = keys.shape
        metric = keys.view(B, N, 2, C // 2).transpose(1, 2).mean(1)
        dn = dominant - 1
        cls_attention_sum = attn_weights[:, :, 0, 1:].sum(dim=1)
        topk_indices = cls_attention_sum.topk(dn, dim=1).indices + 1
        all_indices = torch.cat([torch.zeros((B, 1), dtype=topk_indices.dtype), topk_indices], dim=1)
        mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
        dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(B, dn + 1, C)
        metric_filtered = metric[mask].view(B, N - (dn + 1), metric.shape[2])
        hidden_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(B, N - (dn + 1), C)
        metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
        step = max(1, metric_normalized.shape[1] // contextual)
        target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual]
        target_tokens = metric_normalized[:, target_indices, :]
        others = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
        similarity = torch.bmm(metric_normalized[:, others, :], target_tokens.transpose(1, 2))
        assign = torch.zeros(B, int(others.sum()), contextual).scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
        counts = assign.sum(dim=1).clamp(min=1).unsqueeze(-1)
        aggregated = torch.bmm(assign.transpose(1, 2), hidden_filtered[:, others, :]) / counts
        contextual_tokens = hidden_filtered[:, target_indices, :] + aggregated
        image_feature = model.model.multi_modal_projector(torch.cat([dominant_tokens, contextual_tokens], dim=1))
        # official restore_image_features_sorted (24 -> g, 576 -> g*g) for the grid tiles
        g = 4
        feat, keep_idx = image_feature[1:], all_indices[1:]
        width, height = _grid(model, inputs["image_sizes"])
        num_img, _, fd = feat.shape
        restore = keep_idx.sort(dim=1)[0][:, 1:] - 1
        restored = torch.zeros((num_img, g * g, fd))
        m = torch.zeros(num_img, g * g, dtype=torch.bool).scatter_(1, restore, True)
        restored[m] = feat[:, 1:dn + 1, :].reshape(-1, fd)
        restored = restored.view(height, width, g, g, fd).permute(0, 2, 1, 3, 4).reshape(height * g, width * g, fd)
        m = m.view(height, width, g, g).permute(0, 2, 1, 3).reshape(height * g, width * g)
        grid = torch.cat([restored[m], feat[:, 0], feat[:, dn + 1:].reshape(-1, fd)])
        ref = torch.cat([image_feature[0], grid])
    _compare(model, inputs, f"visionzip:dominant={dominant},contextual={contextual}", ref,
             [(all_indices[t].sort()[0][1:] - 1).tolist() for t in range(n_tiles)])


def test_fastervlm_matches_official(tiny_processor):
    model, inputs = _model_and_inputs(tiny_processor)
    T = 6
    with torch.no_grad():
        out, n_tiles = _tower(model, inputs["pixel_values"], inputs["image_sizes"])
        image_features = out.hidden_states[-2][:, 1:]
        image_attentions = out.attentions[-2][:, :, 0, 1:].mean(dim=1)
        token_indices = torch.topk(image_attentions, k=T, dim=1)[1]
        index_masks = torch.zeros(n_tiles, 16, dtype=torch.bool).scatter_(1, token_indices, True)
        image_features = model.model.multi_modal_projector(image_features)
        width, height = _grid(model, inputs["image_sizes"])
        base, base_mask = image_features[0], index_masks[0]
        feat = image_features[1:].view(height, width, 4, 4, -1).permute(0, 2, 1, 3, 4).flatten(0, 3)
        mask = index_masks[1:].view(height, width, 4, 4).permute(0, 2, 1, 3).flatten(0, 3)
        ref = torch.cat([base[base_mask], feat[mask]])
    _compare(model, inputs, f"fastervlm:tokens={T}", ref, [index_masks[t].nonzero()[:, 0].tolist() for t in range(n_tiles)])


@pytest.mark.parametrize("plus", [False, True], ids=["prumerge", "prumerge_plus"])
def test_prumerge_matches_official(tiny_processor, plus):
    """The official token_prune_merge_advanced(_plus) loop, per tile (the official code runs one tile at a time)."""
    model, inputs = _model_and_inputs(tiny_processor)
    with torch.no_grad():
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = model.config
        n_tiles = image_size_to_num_patches(inputs["image_sizes"][0], cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        tower = model.model.vision_tower
        last = _layers(model)[-1]
        for proj in (last.self_attn.q_proj, last.self_attn.k_proj):  # peaky [CLS] attention (as a trained CLIP's): outliers
            proj.weight.mul_(6.0)
        got = {}
        hk = last.self_attn.k_proj.register_forward_hook(lambda m, i, o: got.__setitem__("k", o))
        hq = last.self_attn.q_proj.register_forward_hook(lambda m, i, o: got.__setitem__("q", o))
        outs = tower(inputs["pixel_values"][0, :n_tiles], output_hidden_states=True)
        hk.remove(), hq.remove()
        feats_all = outs.hidden_states[-2][:, 1:]
        B, N, C = feats_all.shape
        attn_all = F.softmax((got["q"] @ got["k"].transpose(-2, -1)) * C ** -0.5, dim=-1)[:, 0, 1:]
        a = attn_all.float().numpy().flatten()                           # outlier_dectection over the image's tiles
        q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
        ratio = len(np.where(a > q3 + 1.5 * (q3 - q1))[0]) / len(a)
        tiles, selection = [], []
        for t in range(n_tiles):
            image_features, cls_attn, k_all = feats_all[t:t + 1], attn_all[t:t + 1], got["k"][t:t + 1]
            _, idx = torch.topk(cls_attn, int(N * ratio), dim=1, largest=True)
            if plus:
                step_length = int(1 / ratio)
                seq = torch.arange(0, N - 1, max(1, int(step_length / 3)))
                filtered = torch.tensor([x for x in seq if x not in idx.flatten()], dtype=idx.dtype)
                idx = torch.cat((idx, filtered.unsqueeze(0)), dim=1)
            index = idx.unsqueeze(-1).expand(-1, -1, C)
            key_wo_cls = k_all[:, 1:]
            x_others = torch.gather(image_features, 1, index)
            x_others_attn = torch.gather(cls_attn, 1, idx)
            key_others_norm = F.normalize(torch.gather(key_wo_cls, 1, index), p=2, dim=-1)
            keep = torch.zeros(N, dtype=torch.bool)
            keep[idx[0]] = True
            compl = (~keep).nonzero()[:, 0][None]
            non_topk = torch.gather(image_features, 1, compl.unsqueeze(-1).expand(-1, -1, C))
            non_topk_key_norm = F.normalize(torch.gather(key_wo_cls, 1, compl.unsqueeze(-1).expand(-1, -1, C)), p=2, dim=-1)
            non_topk_attn = torch.gather(cls_attn, 1, compl)
            left = x_others.shape[1]
            updated = torch.zeros_like(x_others)
            for i in range(left):
                rest_x = torch.cat([x_others[0, :i], x_others[0, i + 1:], non_topk[0]])[None]
                rest_attn = torch.cat([x_others_attn[0, :i], x_others_attn[0, i + 1:], non_topk_attn[0]])[None]
                rest_keys = torch.cat([key_others_norm[0, :i], key_others_norm[0, i + 1:], non_topk_key_norm[0]])[None]
                cos = torch.bmm(key_others_norm[0, i][None, None], rest_keys.transpose(1, 2))
                _, cluster = torch.topk(cos, k=min(32, N - 1), dim=2, largest=True)
                weighted = torch.sum(rest_x[:, cluster.squeeze(), :] * rest_attn[:, cluster.squeeze()].unsqueeze(-1), dim=1)
                updated[0, i] = x_others[0, i] + weighted
            extra = torch.sum(non_topk * non_topk_attn.unsqueeze(-1), dim=1, keepdim=True)
            tiles.append(torch.cat([updated, extra], 1)[0])
            selection.append(idx[0].tolist())
        ref = model.model.multi_modal_projector(torch.cat(tiles))          # 'flat': every tile's tokens, base first
    assert int(N * ratio) >= 1  # at least one outlier per tile: the merge path runs
    _compare(model, inputs, "prumerge_plus" if plus else "prumerge", ref, selection)
