"""iLLaVA (merges in the vision encoder and in the LLM): crafted inputs with known merges, a reference written here
that recomputes the official algorithm step by step (the official per-tile loop in the encoder layers, its
``spatial_unpad`` layout at sqrt(kept) per side, the LLM merge on a really cut-out sequence with HF's eager
attention weights) on the tiny models, cached decode == full recompute, batched == per-sample, KV entries ==
the analytic count, analytic FLOPs == FlopCounterMode, and the equal-compute solver."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, method_forward_flops
from pmod_bench.model.cache import PMoDCacheLayer, output_cache
from pmod_bench.model.presets import build_preset, preset_processor

from pmod_bench.methods import MethodError, apply_method, parse_method_spec, solve
from pmod_bench.methods.accounting import method_flops
from pmod_bench.methods.base import ModelGeometry
from pmod_bench.methods.illava import llm_removed, merge_tile_tokens, merging_tower, valid_vit_r

SIZES = [(64, 48), (40, 90), (96, 96)]
QUESTIONS = ["What is shown in the image?", "Is there a red circle? Answer yes or no.", "Count the shapes."]
#: (preset, spec, vision_feature_layer): the tiny tower has 2 layers; with -1 both can merge
CASES = [("tiny", "illava:vit_layers=0,vit_r=7,llm_layers=2,llm_keep=0.5", -2),          # 16 - 7 = 9 = 3x3 per tile
         ("tiny", "illava:vit_layers=0-1,vit_r=6,llm_layers=2-5,llm_keep=0.7", -1),      # 16 - 12 = 4 = 2x2
         ("tiny-llava", "illava:vit_layers=0-1,vit_r=3,llm_layers=3,llm_keep=0.6", -1)]  # 10 tokens, flat


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def pairs():
    """preset -> (method model, eager reference model): two copies of the same tiny vanilla model."""
    out = {}
    for preset in ("tiny", "tiny-llava"):
        model, _ = build_preset(preset, pmod=None, seed=0)
        ref, _ = build_preset(preset, pmod=None, seed=0, attn_implementation="eager")
        out[preset] = (model, ref, preset_processor(preset))
    return out


def _feature_layer(model, layer):
    model.config.vision_feature_layer = layer


# ----------------------------------------------------------------------------------- crafted inputs
def test_vision_merge_crafted():
    # [CLS] + 6 patches; received attention (mean over queries): token 0 lowest but it is [CLS] (never merged)
    n, D = 7, 3
    received = torch.tensor([0.0, 0.30, 0.05, 0.20, 0.01, 0.30, 0.14])
    attn = received.expand(1, 2, n, n).clone()        # every query row = received -> its mean over rows is received
    h = torch.arange(n * D, dtype=torch.float32).view(1, n, D)
    out, idx = merge_tile_tokens(h, attn, r=2)
    # lowest patches: 4 (0.01), 2 (0.05), 6 (0.14): 4 and 2 go, 6 keeps (4*3 + 2*2 + 6*1) / 6
    assert idx[0].tolist() == [0, 1, 3, 5, 6]
    torch.testing.assert_close(out[0, -1], (3 * h[0, 4] + 2 * h[0, 2] + 1 * h[0, 6]) / 6)
    torch.testing.assert_close(out[0, :4], h[0, [0, 1, 3, 5]])
    # ties: equal attention everywhere -> the earliest patches are the lowest (1, 2 go, 3 takes the merge)
    out, idx = merge_tile_tokens(h, torch.full((1, 2, n, n), 1 / n), r=2)
    assert idx[0].tolist() == [0, 3, 4, 5, 6]
    torch.testing.assert_close(out[0, 1], (3 * h[0, 1] + 2 * h[0, 2] + h[0, 3]) / 6)


def test_counts_and_valid_settings():
    assert [llm_removed(v, 0.7) for v in (0, 1, 10, 576)] == [0, 0, 3, 173]  # round(576 * 0.3) = 173
    cfg = parse_method_spec("illava:llm_layers=2-4,llm_keep=0.5")
    assert cfg.llm_steps(100) == [(100, 50), (50, 25)]
    assert cfg.layer_vision_tokens(6, 100) == [100, 100, 50, 50, 25, 25]
    clip336 = ModelGeometry(24, 24, -2, 32, anyres=True)
    assert 80 in valid_vit_r(clip336, 4) and 92 not in valid_vit_r(clip336, 4)
    parse_method_spec("illava").check_model(clip336)                      # 576 - 4 x 80 = 256 = 16^2
    with pytest.raises(MethodError, match=r"208 tokens per tile is not a square.*Nearest valid vit_r: .*95"):
        parse_method_spec("illava:vit_r=92").check_model(clip336)
    parse_method_spec("illava:vit_r=92").check_model(ModelGeometry(24, 24, -2, 32, anyres=False))  # LLaVA-1.5: 208, flat
    with pytest.raises(MethodError, match="must be at most 22"):
        parse_method_spec("illava:vit_layers=5-23").check_model(clip336)
    with pytest.raises(MethodError, match="beyond the LLM"):
        parse_method_spec("illava:llm_layers=40").check_model(clip336)
    with pytest.raises(MethodError, match=">= 1"):
        parse_method_spec("illava:llm_layers=0")
    assert parse_method_spec("illava").to_dict() == {"method": "illava", "vit_layers": "5-6-7-8", "vit_r": 80,
                                                     "llm_layers": "8", "llm_keep": 0.7}


def test_tower_loop_equals_hf_tower(pairs):
    model, _, proc = pairs["tiny"]
    inputs = make_inputs(proc, sizes=[SIZES[0]])
    pixels = inputs["pixel_values"][0]
    geometry = ModelGeometry.from_config(model.config)
    with torch.no_grad():
        want = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[geometry.feature_index]
        got, pos = merging_tower(model, geometry, pixels, (), 0)
    torch.testing.assert_close(got, want)
    assert pos[0].tolist() == list(range(17))


# --------------------------------------------------------------------------- official reference
def _official_tower(model, pixels, vit_layers, r, feature_index):
    """Official SigLipEncoderLayer.forward with perform_self_selection, per tile (the [CLS] column left out)."""
    tower = model.model.vision_tower
    vm = getattr(tower, "vision_model", tower)
    h = vm.pre_layrnorm(vm.embeddings(pixels))
    src = [torch.arange(h.shape[1]) for _ in range(len(h))]
    states = [h]
    for i, layer in enumerate(vm.encoder.layers):
        residual = h
        a, attn_weights = layer.self_attn(hidden_states=layer.layer_norm1(h), attention_mask=None)
        h = residual + a
        if i in vit_layers:
            n = attn_weights.shape[-1]
            attn_weights_mean = attn_weights.mean(1)
            new = []
            for t in range(len(h)):
                indice = attn_weights_mean[t].mean(0)[1:].topk(r + 1, largest=False)[1] + 1
                values = h[t][indice]
                size = torch.arange(r + 1, 0, -1)
                ht = h[t].clone()
                ht[indice[-1]] = size.float() @ values.float() / size.float().sum()
                selected = sorted(set(range(n)) - set(indice[:-1].tolist()))
                new.append(ht[selected])
                src[t] = src[t][selected]
            h = torch.stack(new)
        h = h + layer.mlp(layer.layer_norm2(h))
        states.append(h)
    return states[feature_index], src


def _official_layout(model, feats, image_size):
    """Official spatial_unpad at new_h = new_w = sqrt(keep_tokens), base tile first."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    cfg = model.config
    g = int(feats.shape[1] ** 0.5)
    assert g * g == feats.shape[1]
    h, w = get_anyres_image_grid_shape(image_size.tolist(), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    num_patch_width, num_patch_height = w, h
    image_feature = feats[1:].view(num_patch_height, num_patch_width, g, g, -1)
    image_feature = image_feature.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
    image_feature = unpad_image(image_feature, image_size)
    newline = model.model.image_newline
    image_feature = torch.cat((image_feature, newline[:, None, None].expand(*image_feature.shape[:-1], 1)), dim=-1)
    return torch.cat([feats[0], image_feature.flatten(1, 2).transpose(0, 1)])


def _official_llm(ref, emb, vis, cfg, query):
    """Official forward_illava on one sample: emb (1, N, d); returns logits per surviving position and the
    kept vision positions after each merge layer."""
    lm = ref.model.language_model
    N = emb.shape[1]
    seq = list(range(N))
    h = {p: emb[0, p] for p in seq}
    decisions, rows = [], None
    for l, layer in enumerate(lm.layers):
        if l in cfg.llm:
            vis_now = [p for p in seq if vis[p]]
            att = rows.float().mean(0)[seq.index(query)]                       # (n,) the last token's row
            score = {p: float(att[seq.index(p)]) for p in vis_now}
            indices = sorted(vis_now, key=lambda p: (-score[p], p))           # topk(image_token_length): highest first
            V = len(vis_now)
            r = round(V * (1 - cfg.llm_keep))
            values = torch.stack([h[p] for p in indices[V - (r + 1):]])
            size = torch.arange(1, r + 2)
            h[indices[V - (r + 1)]] = size.double() @ values.double() / size.double().sum()
            kept = set(indices[:V - r])
            seq = [p for p in seq if not vis[p] or p in kept]
            mark = torch.zeros(N, dtype=torch.bool)
            mark[sorted(kept)] = True
            decisions.append(mark)
        x = torch.stack([h[p] for p in seq])[None].float()
        pos = torch.tensor([seq])
        cos, sin = lm.rotary_emb(x, pos)
        n = x.shape[1]
        mask = torch.full((n, n), torch.finfo(x.dtype).min).triu(1)[None, None]
        if l + 1 in cfg.llm:
            _, rows = layer.self_attn(hidden_states=layer.input_layernorm(x), position_embeddings=(cos, sin), attention_mask=mask)
            rows = rows[0]
        out = layer(x, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos)
        out = out[0] if isinstance(out, tuple) else out
        for i, p in enumerate(seq):
            h[p] = out[0, i] if out.dim() == 3 else out[i]
    x = torch.stack([h[p] for p in seq])[None]
    logits = ref.lm_head(lm.norm(x))[0]
    return {p: logits[i] for i, p in enumerate(seq)}, decisions


@pytest.mark.parametrize("preset,spec,feature_layer", CASES, ids=["next-1layer", "next-2layers", "llava15-2layers"])
def test_matches_official_reference_prefill_and_cached_decode(pairs, recorded, preset, spec, feature_layer):
    model, ref, proc = pairs[preset]
    for m in (model, ref):
        _feature_layer(m, feature_layer)
    try:
        cfg = parse_method_spec(spec)
        inputs = make_inputs(proc, sizes=[SIZES[1]], questions=[QUESTIONS[1]])
        apply_method(model, spec)
        ref.model.vision_tower.set_attn_implementation("eager")
        geometry = ModelGeometry.from_config(model.config)
        with torch.no_grad():
            # vision side: the official encoder loop, projector, layout
            pixels = inputs["pixel_values"][0] if geometry.anyres else inputs["pixel_values"]
            if geometry.anyres:
                from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

                t = image_size_to_num_patches(inputs["image_sizes"][0], model.config.image_grid_pinpoints, 32)
                pixels = pixels[:t]
            hidden, src = _official_tower(ref, pixels, cfg.vit, cfg.vit_r, geometry.feature_index)
            feats = ref.model.multi_modal_projector(hidden[:, 1:])
            image = _official_layout(ref, feats, inputs["image_sizes"][0]) if geometry.anyres else feats[0]
            mi = model.method_inputs(inputs["input_ids"], inputs["pixel_values"], inputs.get("image_sizes"), inputs["attention_mask"])
            assert [s.tolist() for s in mi.images[0].selection] == [(s[1:] - 1).tolist() for s in src]
            torch.testing.assert_close(mi.images[0].features, image, atol=1e-5, rtol=1e-5)
            # LLM side: generate with the cache, against the official forward recomputed over prompt + new tokens
            recorded.clear()
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
            ids = inputs["input_ids"][0]
            where = (ids == model.config.image_token_id).nonzero()[:, 0]
            emb = ref.get_input_embeddings()
            N0 = ids.shape[0]
            new = out.sequences[0, N0:]
            full = torch.cat([emb(ids[:int(where[0])]), image, emb(ids[int(where[-1]) + 1:]), emb(new)])[None]
            n = full.shape[1] - len(new)                                       # the shortened prompt
            vis = torch.zeros(full.shape[1], dtype=torch.bool)
            vis[int(where[0]):int(where[0]) + image.shape[0]] = True
            logits, decisions = _official_llm(ref, full, vis, cfg, query=n - 1)
        assert len(recorded) == len(decisions) == len(cfg.llm)
        for mine, theirs in zip(recorded, decisions):
            assert torch.equal(mine[0], theirs[:n])
        for t, step in enumerate(out.logits):
            assert (step[0] - logits[n - 1 + t]).abs().max() < 1e-4, (spec, t)
    finally:
        apply_method(model, None)
        for m in (model, ref):
            _feature_layer(m, -2)


def test_llm_merge_crafted_ties(pairs, recorded):
    """Zero queries at layer k-1: equal attention -> ties by position: the first V - r vision tokens kept, the last
    r + 1 merged into the last kept one with weights 1..r+1 (the least attended weighs most)."""
    model, _, proc = pairs["tiny"]
    inputs = make_inputs(proc, sizes=[SIZES[0]])
    q = model.model.language_model.layers[2].self_attn.q_proj
    saved = q.weight.detach().clone()
    got = []

    def layer3_input(keep):
        apply_method(model, f"illava:vit_r=0,llm_layers=3,llm_keep={keep}")
        hook = model.model.language_model.layers[3].register_forward_pre_hook(
            lambda m, a, kw: got.append((a[0] if a else kw["hidden_states"]).detach().clone()), with_kwargs=True)
        try:
            model(**inputs)
        finally:
            hook.remove()
        return got[-1][0]

    try:
        with torch.no_grad():
            q.weight.zero_()
            raw = layer3_input(1.0)      # llm_keep 1: nothing merged, layer 3's input = layer 2's output
            merged = layer3_input(0.5)
    finally:
        with torch.no_grad():
            q.weight.copy_(saved)
        apply_method(model, None)
    ids = inputs["input_ids"][0]
    V = int((ids == model.config.image_token_id).sum())
    r = llm_removed(V, 0.5)
    first = int((ids == model.config.image_token_id).nonzero()[0, 0])
    assert recorded[-1][0].nonzero()[:, 0].tolist() == list(range(first, first + V - r))
    group = list(range(first + V - r - 1, first + V))
    w = torch.arange(1, r + 2, dtype=torch.float32)
    torch.testing.assert_close(merged[group[0]], (w[:, None] * raw[group]).sum(0) / w.sum(), atol=1e-5, rtol=1e-5)
    others = [p for p in range(raw.shape[0]) if p != group[0]]
    torch.testing.assert_close(merged[others], raw[others])


@pytest.mark.parametrize("preset,spec", [("tiny", CASES[0][1]), ("tiny-llava", "illava:vit_layers=0,vit_r=5,llm_layers=2-4,llm_keep=0.7")])
def test_batched_equals_single_and_cache_holds_kept_only(pairs, preset, spec):
    model, _, proc = pairs[preset]
    apply_method(model, spec)
    cfg = parse_method_spec(spec)
    try:
        batch = make_inputs(proc, sizes=SIZES, questions=QUESTIONS)
        n = batch["input_ids"].shape[1]
        with torch.no_grad():
            together = model.generate(**batch, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
        L = len(model.model.language_model.layers)
        for i in range(len(SIZES)):
            single = make_inputs(proc, sizes=[SIZES[i]], questions=[QUESTIONS[i]])
            with torch.no_grad():
                alone = model.generate(**single, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
                mi = model.method_inputs(single["input_ids"], single["pixel_values"], single.get("image_sizes"), single["attention_mask"])
            assert together.sequences[i, n:].tolist() == alone.sequences[0, single["input_ids"].shape[1]:].tolist()
            for a, b in zip(together.logits, alone.logits):
                assert (a[i] - b[0]).abs().max() < 1e-4, (spec, i)
            V = int(mi.vision_token_mask.sum())
            T = mi.inputs_embeds.shape[1] - V
            want = [T + v + 2 for v in cfg.layer_vision_tokens(L, V)]          # 3 steps: 2 decoded tokens cached
            layers = output_cache(alone).layers
            got = [int(l.valid.sum()) if isinstance(l, PMoDCacheLayer) and l.valid is not None else l.keys.shape[-2] for l in layers]
            assert got == want, (got, want)
    finally:
        apply_method(model, None)


def test_on_pmod_model(tiny_vanilla, tiny_processor):
    from pmod_bench.model.modeling import to_pmod
    from pmod_bench.model.presets import random_routers

    from pmod_bench import PMoDConfig

    model = to_pmod(tiny_vanilla, PMoDConfig(shift=0.5))
    random_routers(model, seed=2)
    apply_method(model, CASES[0][1])
    with torch.no_grad():
        out = model.generate(**make_inputs(tiny_processor, sizes=SIZES[:2], questions=QUESTIONS[:2]), max_new_tokens=2, do_sample=False)
    assert out.shape[0] == 2
    apply_method(model, None)


# ------------------------------------------------------------------------------------ FLOPs, solver
@pytest.mark.parametrize("preset,spec", [("tiny", CASES[0][1]), ("tiny-llava", "illava:vit_layers=0,vit_r=5,llm_layers=2-4,llm_keep=0.7")])
def test_analytic_flops_equal_flop_counter(preset, spec):
    from pmod_bench.profiler.arch import load_arch

    model, _ = build_preset(preset, pmod=None)
    inputs = make_inputs(preset_processor(preset), sizes=((64, 48),))
    mi, measured = method_forward_flops(model, inputs, spec)
    text = int((inputs["input_ids"] != model.config.image_token_id).sum())
    n = mi.inputs_embeds.shape[1]
    f = method_flops(model.method_config, load_arch(preset), (64, 48), text_tokens=text, logits_tokens=n)
    assert f.layer_vision_tokens[0] == n - text == int(mi.vision_token_mask.sum())
    assert f.method_extra > 0 and f.llm_extra > 0  # the merges and the LLM rows are counted, not hidden
    analytic = f.vision + f.llm_prefill
    assert abs(analytic - measured) / measured < 1e-9, (analytic, measured)


def test_solver_matches_pmod_05_within_1pct():
    from pmod_bench.profiler.arch import load_arch

    arch = load_arch("llava-next-7b")
    res = solve("illava", arch, (672, 672), match="p-MoD-0.5")
    assert res.rel_err <= 0.01 and set(res.solved) == {"vit_layers", "vit_r", "llm_layers", "llm_keep"}
    assert res.solved["vit_r"] == 44 and abs(res.solved["llm_keep"] - 0.7) <= 0.04  # the official LLM keep, nearly
    assert method_flops(res.config, arch, (672, 672), 58).llm_prefill == res.achieved
    kv = solve("illava", arch, (672, 672), kv=0.537)
    assert abs(kv.achieved - 0.537) / 0.537 <= 0.01
    paper = solve("illava", arch, (672, 672), tflops=21.94, convention="paper")
    assert abs(method_flops(paper.config, arch, (672, 672), 58).llm_prefill_paper / 1e12 - 21.94) / 21.94 <= 0.01
    f = method_flops(parse_method_spec("illava"), arch, (672, 672), 58)
    assert f.layer_vision_tokens[0] == 256 + 16 * 2 * 33  # base 16x16 + 2x2 grid of 16x16, unpadded 32x32 + newlines
    assert f.method_extra == 5 * 4 * 2 * 81 * 1024   # 5 tiles x 4 merges x (1, 81) @ (81, 1024)
