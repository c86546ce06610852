"""Converting checkpoints of the original LLaVA / p-MoD code (issue 7).

A fixture writes tiny checkpoints exactly in the original layout (config.json with mm_* / mod_* fields,
``model.layers.N.decoder_layer.*`` and ``model.layers.N.router.router.*`` weights, the CLIP tower under
``model.vision_tower.vision_tower.vision_model.*`` or only named by ``mm_vision_tower``). The converted
model is compared with an independent forward written here from the original layout's semantics:
CLIP hidden state -2 without CLS -> mm_projector -> (NeXT) anyres grid in the original's (width, height)
convention, unpad, newline column -> spliced into the text embeddings -> plain Llama layers with the
p-MoD routing of METHOD.md written with masks -> logits.
"""

from __future__ import annotations

import io
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pmod_bench.model.convert import (
    CONVERTED_MARKER,
    VISION_PREFIX,
    ConversionError,
    conversion_info,
    convert_checkpoint,
    reference_layer_ratios,
)
from pmod_bench.model.presets import _CORPUS, demo_image

TILE, PATCH = 32, 8  # CLIP image size and patch: 4 x 4 = 16 features per tile (CLS dropped)
#: the reference's grids for max_num_sub_images=4 (train.py), as [g0 * base, g1 * base] = (width, height)
GRIDS = [[1, 2], [2, 1], [2, 2], [3, 1], [1, 3]]


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIP vision tower saved as a local directory (what mm_vision_tower points to)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    d = tmp_path_factory.mktemp("clip")
    torch.manual_seed(1)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=TILE, patch_size=PATCH, projection_dim=32)
    CLIPVisionModel(cfg).save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}).save_pretrained(d)
    return d


def _bpe_tokenizer_without_image_token():
    """Byte-level BPE like the tiny preset's, but, as an original LLaVA vocabulary, without <image>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 2, trainer=trainer)
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   padding_side="right", model_max_length=2048)


def _sentencepiece_model() -> bytes:
    """A Llama-like sentencepiece BPE model (byte fallback, identity normalisation, dummy prefix)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.split("\n") * 4), model_writer=buf, vocab_size=400, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
    )
    return buf.getvalue()


def write_original(root, clip_dir, *, next_shape: bool, pmod: bool, save_vision: bool, sentencepiece: bool = False,
                   layers: int = 32, seed: int = 0, shards: int = 2):
    """Write a tiny checkpoint in the original LLaVA / p-MoD layout; returns (dir, config, state dict)."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionModel

    root.mkdir(parents=True, exist_ok=True)
    if sentencepiece:
        (root / "tokenizer.model").write_bytes(_sentencepiece_model())
        (root / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "pad_token": None, "legacy": False, "model_max_length": 2048, "padding_side": "right"}))
        vocab = 400
    else:
        tok = _bpe_tokenizer_without_image_token()
        tok.save_pretrained(root)
        vocab = len(tok)
    d, inter, heads, kv = 32, 64, 4, 2
    cfg = {
        "architectures": ["PmodLlavaLlamaForCausalLM" if pmod else "LlavaLlamaForCausalLM"],
        "model_type": "pmod_llava_llama" if pmod else "llava",  # released LLaVA configs say "llava"
        "vocab_size": vocab, "hidden_size": d, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "hidden_act": "silu", "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "pretraining_tp": 1, "torch_dtype": "float32",
        "use_cache": True, "freeze_mm_mlp_adapter": False, "tune_mm_mlp_adapter": False,
        "mm_vision_tower": str(clip_dir), "mm_hidden_size": 32, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "mm_patch_merge_type": "spatial_unpad" if next_shape else "flat",
        "image_aspect_ratio": "anyres" if next_shape else "pad",
        "tokenizer_model_max_length": 4096 if next_shape else 2048, "tokenizer_padding_side": "right",
    }
    if next_shape:
        cfg["image_grid_pinpoints"] = [[g[0] * TILE, g[1] * TILE] for g in GRIDS]
        cfg["max_num_patches"] = None
    if pmod:
        cfg.update(mod_target_layers="shiftedcos_decay_0.85_0.15", mod_router_factor=0.5, mod_weight_norm="tanh_0.2_1",
                   mod_target_token_type="vision_all", mod_bias_enabled=True, mod_special_init=True)
        ratios = reference_layer_ratios(cfg, layers)
        cfg["mod_target_layer_indices"] = [i for i, r in enumerate(ratios) if r < 1.0]
    routed = set(cfg.get("mod_target_layer_indices", []))
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, std=0.2: torch.randn(*shape, generator=g) * std  # noqa: E731
    sd = {"model.embed_tokens.weight": rnd(vocab, d, std=1.0), "model.norm.weight": 1 + rnd(d, std=0.1),
          "lm_head.weight": rnd(vocab, d)}
    hd = d // heads
    for i in range(layers):
        pre = f"model.layers.{i}.decoder_layer." if i in routed else f"model.layers.{i}."
        sd.update({
            pre + "self_attn.q_proj.weight": rnd(d, d), pre + "self_attn.k_proj.weight": rnd(kv * hd, d),
            pre + "self_attn.v_proj.weight": rnd(kv * hd, d), pre + "self_attn.o_proj.weight": rnd(d, d),
            pre + "mlp.gate_proj.weight": rnd(inter, d), pre + "mlp.up_proj.weight": rnd(inter, d),
            pre + "mlp.down_proj.weight": rnd(d, inter), pre + "input_layernorm.weight": 1 + rnd(d, std=0.1),
            pre + "post_attention_layernorm.weight": 1 + rnd(d, std=0.1),
            pre + "self_attn.rotary_emb.inv_freq": torch.ones(hd // 2),  # old transformers saved this buffer
        })
        if i in routed:  # trained routers: non-zero, logits O(1) so that tanh does not saturate into ties
            sd[f"model.layers.{i}.router.router.weight"] = rnd(1, d, std=0.1)
            sd[f"model.layers.{i}.router.router.bias"] = rnd(1, std=0.1)
    sd.update({"model.mm_projector.0.weight": rnd(d, 32), "model.mm_projector.0.bias": rnd(d),
               "model.mm_projector.2.weight": rnd(d, d), "model.mm_projector.2.bias": rnd(d)})
    if next_shape:
        sd["model.image_newline"] = rnd(d, std=1.0)
    if save_vision:  # a fine-tuned tower: perturbed, so it differs from mm_vision_tower's weights
        clip = CLIPVisionModel.from_pretrained(str(clip_dir)).state_dict()
        sd.update({VISION_PREFIX + k: v + rnd(*v.shape, std=0.01) for k, v in clip.items()})
    keys = sorted(sd)
    if shards > 1:
        parts = [keys[i::shards] for i in range(shards)]
        names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
        for part, name in zip(parts, names):
            save_file({k: sd[k].contiguous() for k in part}, str(root / name))
        (root / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: n for part, n in zip(parts, names) for k in part}}))
    else:
        torch.save(sd, root / "pytorch_model.bin")
    (root / "config.json").write_text(json.dumps(cfg, indent=1))
    (root / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}))
    return root, cfg, sd


@pytest.fixture(scope="module")
def next_pmod(tmp_path_factory, clip_dir):
    """p-MoD-LLaVA-NeXT, vision tower saved, converted."""
    root = tmp_path_factory.mktemp("orig")
    src, cfg, sd = write_original(root / "pmod-next", clip_dir, next_shape=True, pmod=True, save_vision=True)
    dst = convert_checkpoint(src, root / "pmod-next-hf", progress=False)
    return src, cfg, sd, dst


# ------------------------------------------------------------------------------ reference forward
def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta):  # x (N, H, hd), positions (N,)
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = pos[:, None].float() * inv[None]  # (N, hd/2)
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
    rot = torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], -1)
    return x * cos + rot * sin


def _select_best_resolution(w, h, pinpoints):  # the original's: sizes and pinpoints are (width, height)
    best, best_eff, best_waste = None, 0, float("inf")
    for pw, ph in pinpoints:
        scale = min(pw / w, ph / h)
        eff = min(int(w * scale) * int(h * scale), w * h)
        waste = pw * ph - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (pw, ph), eff, waste
    return best


def _unpad(t, w, h):  # t (d, H, W); the original's unpad_image with original_size = (width, height)
    cur_h, cur_w = t.shape[1:]
    if w / h > cur_w / cur_h:
        new_h = int(h * (cur_w / w))
        pad = (cur_h - new_h) // 2
        return t[:, pad: cur_h - pad, :]
    new_w = int(w * (cur_h / h))
    pad = (cur_w - new_w) // 2
    return t[:, :, pad: cur_w - pad]


def reference_logits(cfg, sd, clip_dir, input_ids, pixel_values, image_size_wh, image_token_id):
    """Logits of the original-layout checkpoint, computed from its state dict (batch of one)."""
    from transformers import CLIPVisionModel

    # vision: CLIP (the original runs HF's CLIPVisionModel too), hidden state -2, CLS dropped
    clip = CLIPVisionModel.from_pretrained(str(clip_dir)).eval()
    vis = {k[len(VISION_PREFIX):]: v for k, v in sd.items() if k.startswith(VISION_PREFIX)}
    if vis:
        clip.load_state_dict(vis)
    with torch.no_grad():
        feats = clip(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]  # (tiles, 16, 32)
    x = F.gelu(feats @ sd["model.mm_projector.0.weight"].T + sd["model.mm_projector.0.bias"])
    x = x @ sd["model.mm_projector.2.weight"].T + sd["model.mm_projector.2.bias"]  # (tiles, 16, d)
    side = TILE // PATCH
    if cfg["image_aspect_ratio"] == "anyres":  # base tile + grid, unpadded, newline column per row
        w, h = image_size_wh
        pw, ph = _select_best_resolution(w, h, cfg["image_grid_pinpoints"])
        nw, nh = pw // TILE, ph // TILE
        assert x.shape[0] == 1 + nw * nh, "the converted processor made a different number of tiles"
        grid = x[1:].view(nh, nw, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # (d, nh*s, nw*s)
        grid = _unpad(grid, w, h)
        nl = sd["model.image_newline"][:, None, None].expand(-1, grid.shape[1], 1)
        grid = torch.cat([grid, nl], -1).flatten(1, 2).T  # row-major, newline closes each row
        image = torch.cat([x[0], grid], 0)
    else:
        image = x[0]
    ids = input_ids[0]
    is_img = ids == image_token_id
    assert int(is_img.sum()) == image.shape[0], "number of vision tokens differs from the original's"
    emb = sd["model.embed_tokens.weight"][ids.clamp(max=cfg["vocab_size"] - 1)].clone()
    emb[is_img] = image
    h = emb  # (N, d)
    N, L = h.shape[0], cfg["num_hidden_layers"]
    pos = torch.arange(N)
    heads, kv, eps, theta = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["rms_norm_eps"], cfg["rope_theta"]
    ratios = reference_layer_ratios(cfg, L) if cfg.get("mod_target_layers") else [1.0] * L
    scale, bias = 0.2, 1.0  # tanh_0.2_1
    for i in range(L):
        routed = ratios[i] < 1.0
        p = f"model.layers.{i}.decoder_layer." if routed else f"model.layers.{i}."
        if routed:  # router -> TanhNorm -> top-k of the vision tokens by weight (as the reference sorts)
            r = h @ sd[f"model.layers.{i}.router.router.weight"][0] + sd[f"model.layers.{i}.router.router.bias"][0]
            wgt = scale * torch.tanh(r) + bias
            k = int(torch.trunc(torch.tensor(float(is_img.sum()), dtype=torch.float32) * torch.tensor(ratios[i], dtype=torch.float32)))
            top = wgt.masked_fill(~is_img, float("-inf")).topk(k).indices
            sel = torch.zeros(N, dtype=torch.bool)
            sel[top] = True
            processed = sel | ~is_img
        else:
            processed = torch.ones(N, dtype=torch.bool)
        # attention with masks: only processed tokens are keys; causal in the original order and positions
        a = _rms(h, sd[p + "input_layernorm.weight"], eps)
        hd = a.shape[-1] // heads
        q = _rope((a @ sd[p + "self_attn.q_proj.weight"].T).view(N, heads, hd), pos, theta)
        kk = _rope((a @ sd[p + "self_attn.k_proj.weight"].T).view(N, kv, hd), pos, theta)
        vv = (a @ sd[p + "self_attn.v_proj.weight"].T).view(N, kv, hd)
        kk, vv = kk.repeat_interleave(heads // kv, 1), vv.repeat_interleave(heads // kv, 1)
        scores = torch.einsum("qhd,khd->hqk", q, kk) / math.sqrt(hd)
        allowed = (pos[None, :] <= pos[:, None]) & processed[None, :]
        att = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        o = torch.einsum("hqk,khd->qhd", att, vv).reshape(N, -1) @ sd[p + "self_attn.o_proj.weight"].T
        hh = h + o
        m = _rms(hh, sd[p + "post_attention_layernorm.weight"], eps)
        u = (F.silu(m @ sd[p + "mlp.gate_proj.weight"].T) * (m @ sd[p + "mlp.up_proj.weight"].T)) @ sd[p + "mlp.down_proj.weight"].T
        if routed:  # selected vision: h + w*u; text: h + u; skipped vision (STRing): w*x
            out = torch.where(is_img[:, None], hh + wgt[:, None] * u, hh + u)
            h = torch.where(processed[:, None], out, wgt[:, None] * h)
        else:
            h = hh + u
    return (_rms(h, sd["model.norm.weight"], eps) @ sd["lm_head.weight"].T)[None]


def _inputs(processor, size_wh, question="What is shown in the image?"):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    return processor(images=[demo_image(*size_wh)], text=[prompt], return_tensors="pt")


def _converted_logits(dst, inputs):
    from transformers import AutoModelForImageTextToText

    import pmod_bench

    pmod_bench.register()

    model = AutoModelForImageTextToText.from_pretrained(str(dst)).eval()
    with torch.no_grad():
        return model, model(**inputs).logits


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.slow  # the fast loop's parity check against the original forward: test_llava15_baseline_matches_original_forward
@pytest.mark.parametrize("size_wh", [(64, 48), (40, 90)])  # wide -> (2,1) grid, tall -> unpadded columns
def test_pmod_next_matches_original_forward(next_pmod, clip_dir, size_wh):
    from transformers import AutoProcessor

    src, cfg, sd, dst = next_pmod
    processor = AutoProcessor.from_pretrained(str(dst))
    inputs = _inputs(processor, size_wh)
    model, got = _converted_logits(dst, inputs)
    image_token_id = model.config.image_token_id
    h, w = inputs["image_sizes"][0].tolist()
    assert (w, h) == size_wh
    expected = reference_logits(cfg, sd, clip_dir, inputs["input_ids"], inputs["pixel_values"][0], (w, h), image_token_id)
    V = cfg["vocab_size"]
    torch.testing.assert_close(got[..., :V], expected, atol=1e-4, rtol=1e-4)
    assert (got[..., V:] == 0).all()  # the appended <image> row of lm_head is zero ...
    assert model.generation_config.suppress_tokens == list(range(V, model.config.text_config.vocab_size))  # ... never generated


def test_pmod_next_config_routers_and_ratios(next_pmod):
    src, cfg, sd, dst = next_pmod
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(dst))
    L = cfg["num_hidden_layers"]
    ratios = [1.0 if math.cos(i * math.pi / 31) / 2 + 0.5 > 0.85 else max(math.cos(i * math.pi / 31) / 2 + 0.5, 0.15)
              for i in range(L)]
    assert model.layer_ratios() == ratios
    assert sorted(model.pmod_layers) == list(range(8, 32)) == cfg["mod_target_layer_indices"]
    pm = model.config.pmod_config
    assert (pm.schedule, pm.shift, pm.max_ratio, pm.min_ratio) == ("cosine", 0.5, 0.85, 0.15)
    assert (pm.weight_norm, pm.norm_scale, pm.norm_bias, pm.router_bias, pm.ratios) == ("tanh", 0.2, 1.0, True, None)
    for i, layer in model.pmod_layers.items():  # routers landed in their own layers
        torch.testing.assert_close(layer.router.weight, sd[f"model.layers.{i}.router.router.weight"])
        torch.testing.assert_close(layer.router.bias, sd[f"model.layers.{i}.router.router.bias"])
    # pinpoints: original (width, height) pairs swapped into HF's (height, width), order kept
    assert model.config.image_grid_pinpoints == [[h, w] for w, h in cfg["image_grid_pinpoints"]]
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    info = conversion_info(dst)
    assert info["kind"] == "pmod_llava_next" and info["vision_tower"]["saved_in_checkpoint"]
    assert len(info["dropped_tensors"]) == L  # the rotary inv_freq buffers
    assert not list(dst.parent.glob(f".{dst.name}.tmp-*"))  # atomic: no temp dir left behind


@pytest.mark.parametrize("save_vision", [False, True])
def test_llava15_baseline_matches_original_forward(tmp_path, clip_dir, save_vision):
    from transformers import AutoProcessor

    src, cfg, sd = write_original(tmp_path / "llava15", clip_dir, next_shape=False, pmod=False,
                                  save_vision=save_vision, layers=4, seed=3, shards=1)
    dst = convert_checkpoint(src, tmp_path / "llava15-hf", progress=False)
    processor = AutoProcessor.from_pretrained(str(dst))
    assert type(processor.image_processor).__name__.startswith("LlavaImageProcessor") and processor.image_processor.do_pad
    inputs = _inputs(processor, (64, 40))
    model, got = _converted_logits(dst, inputs)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    expected = reference_logits(cfg, sd, clip_dir, inputs["input_ids"], inputs["pixel_values"], (64, 40), model.config.image_token_id)
    torch.testing.assert_close(got[..., : cfg["vocab_size"]], expected, atol=1e-4, rtol=1e-4)
    assert conversion_info(dst)["vision_tower"]["saved_in_checkpoint"] is save_vision


def test_pad_preprocessing_is_expand2square_with_mean_colour(tmp_path, clip_dir):
    """LLaVA-1.5 'pad': expand to a square filled with the mean colour, CLIP resize, normalise."""
    from PIL import Image
    from transformers import AutoProcessor

    src, cfg, _ = write_original(tmp_path / "l15", clip_dir, next_shape=False, pmod=False, save_vision=False, layers=2, shards=1)
    dst = convert_checkpoint(src, tmp_path / "l15-hf", progress=False)
    ip = AutoProcessor.from_pretrained(str(dst)).image_processor
    mean, std = np.array(ip.image_mean), np.array(ip.image_std)
    for w, h in ((64, 40), (30, 70)):
        img = demo_image(w, h)
        side = max(w, h)
        square = Image.new("RGB", (side, side), tuple(int(m * 255) for m in mean))
        square.paste(img, ((side - w) // 2, (side - h) // 2))  # the original's expand2square
        ref = (np.asarray(square.resize((TILE, TILE), Image.BICUBIC), dtype=np.float32) / 255 - mean) / std
        got = ip(images=[img], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        assert np.abs(got - ref).max() < 0.05  # same pixels up to resampling rounding


def test_anyres_tiles_match_original_preprocessing(next_pmod):
    """anyres: best (width, height) pinpoint, aspect-preserving resize + black padding, tiles, squashed base."""
    from PIL import Image
    from transformers import AutoProcessor

    _, cfg, _, dst = next_pmod
    ip = AutoProcessor.from_pretrained(str(dst)).image_processor
    mean, std = np.array(ip.image_mean), np.array(ip.image_std)
    norm = lambda im: ((np.asarray(im, dtype=np.float32) / 255 - mean) / std).transpose(2, 0, 1)  # noqa: E731
    for w, h in ((64, 48), (40, 90), (100, 30)):
        img = demo_image(w, h)
        pw, ph = _select_best_resolution(w, h, cfg["image_grid_pinpoints"])
        sw, sh = pw / w, ph / h
        nw, nh = (pw, min(math.ceil(h * sw), ph)) if sw < sh else (min(math.ceil(w * sh), pw), ph)
        canvas = Image.new("RGB", (pw, ph), (0, 0, 0))
        canvas.paste(img.resize((nw, nh), Image.BICUBIC), ((pw - nw) // 2, (ph - nh) // 2))
        tiles = [img.resize((TILE, TILE), Image.BICUBIC)] + [
            canvas.crop((x, y, x + TILE, y + TILE)) for y in range(0, ph, TILE) for x in range(0, pw, TILE)]
        got = ip(images=[img], return_tensors="np")["pixel_values"][0]
        assert got.shape[0] == len(tiles), (w, h)
        assert max(np.abs(got[i] - norm(t)).max() for i, t in enumerate(tiles)) < 0.05


def test_sentencepiece_tokenizer_and_prompt_match_the_original(tmp_path, clip_dir):
    """tokenizer.model is converted; prompt ids equal the original's chunked tokenizer_image_token."""
    import sentencepiece as spm
    from transformers import AutoProcessor

    src, cfg, _ = write_original(tmp_path / "sp", clip_dir, next_shape=False, pmod=False, save_vision=False,
                                 sentencepiece=True, layers=2, shards=1)
    with _maybe_warns():
        dst = convert_checkpoint(src, tmp_path / "sp-hf", progress=False)
    processor = AutoProcessor.from_pretrained(str(dst))
    tok = processor.tokenizer
    img_id = tok.convert_tokens_to_ids("<image>")
    assert img_id == 400 and tok.pad_token == "<unk>" and tok.padding_side == "left"
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the color of the object?"}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    assert prompt == ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                      "helpful, detailed, and polite answers to the human's questions. USER: <image>\n"
                      "What is the color of the object? ASSISTANT:")  # vicuna_v1
    before, after = prompt.split("<image>")
    original = [1] + sp.encode(before) + [img_id] + sp.encode(after)  # tokenizer_image_token, -200 -> <image>
    assert tok(prompt).input_ids == original
    n = (TILE // PATCH) ** 2
    ids = processor(images=[demo_image()], text=[prompt], return_tensors="pt")["input_ids"][0].tolist()
    assert ids == original[: len(sp.encode(before)) + 1] + [img_id] * n + original[len(sp.encode(before)) + 2:]


class _maybe_warns:  # the sentencepiece fallback may or may not warn, depending on protobuf
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


@pytest.mark.slow
def test_load_model_converts_on_the_fly_and_reuses_cache(next_pmod, tmp_path, monkeypatch):
    from pmod_bench.model.loading import converted_cache_dir, load_model

    src, cfg, sd, dst = next_pmod
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = load_model(str(src), cache_dir=tmp_path / "cache")
    cached = converted_cache_dir(src, tmp_path / "cache")
    assert (cached / CONVERTED_MARKER).is_file() and cached.parent == tmp_path / "cache" / "converted"
    stamp = (cached / CONVERTED_MARKER).stat().st_mtime_ns
    again, _ = load_model(str(src), cache_dir=tmp_path / "cache", pmod={"shift": 0.6})  # p-MoD-0.6: routes 11-31
    assert (cached / CONVERTED_MARKER).stat().st_mtime_ns == stamp  # reused, not converted again
    from pmod_bench import PMoDConfig

    assert again.layer_ratios() == PMoDConfig(shift=0.6).layer_ratios(32)
    # the same checkpoint as a hub id, laid out as the hub cache lays it out, resolved offline
    rev = "f" * 40
    snap = tmp_path / "hub" / "models--MCG-NJU--p-MoD-LLaVA-NeXT-7B" / "snapshots" / rev
    shutil.copytree(src, snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(rev)
    hub_model, hub_proc = load_model("MCG-NJU/p-MoD-LLaVA-NeXT-7B", cache_dir=tmp_path / "hub")
    assert hub_model.layer_ratios() == model.layer_ratios()
    inputs = _inputs(processor, (64, 48))
    with torch.no_grad():
        torch.testing.assert_close(hub_model(**inputs).logits, model(**inputs).logits)


def test_cli_convert_and_errors(next_pmod, tmp_path, clip_dir, capsys):
    from pmod_bench.cli import main

    src, cfg, sd, _ = next_pmod
    out = tmp_path / "cli-out"
    assert main(["convert", str(src), str(out)]) == 0
    assert "pmod_llava_next" in capsys.readouterr().out and (out / CONVERTED_MARKER).is_file()
    assert main(["convert", str(src), str(out)]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    # a layer's MLP missing: the error names the key in the original layout
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    from safetensors.torch import load_file, save_file

    shard = sorted(bad.glob("model-*.safetensors"))[0]
    part = load_file(str(shard))
    victim = next(k for k in part if "decoder_layer.mlp.up_proj" in k)
    del part[victim]
    part["model.layers.3.extra.weight"] = torch.zeros(1)
    save_file(part, str(shard))
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    index["weight_map"].pop(victim)
    index["weight_map"]["model.layers.3.extra.weight"] = shard.name
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=r"unexpected weights.*model\.layers\.3\.extra\.weight"):
        convert_checkpoint(bad, tmp_path / "x1", progress=False)
    index["weight_map"].pop("model.layers.3.extra.weight")
    del part["model.layers.3.extra.weight"]
    save_file(part, str(shard))
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=r"missing \['" + victim.replace(".", r"\.")):
        convert_checkpoint(bad, tmp_path / "x2", progress=False)
    # routers inconsistent with the schedule string
    cfg2 = dict(cfg, mod_router_factor=0.4)
    cfg2.pop("mod_target_layer_indices")
    shutil.copytree(src, tmp_path / "bad2")
    (tmp_path / "bad2" / "config.json").write_text(json.dumps(cfg2))
    with pytest.raises(ConversionError, match="routes layers .* routers for layers"):
        convert_checkpoint(tmp_path / "bad2", tmp_path / "x3", progress=False)


def test_vision_tower_not_saved_and_not_available(tmp_path, clip_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src, cfg, _ = write_original(tmp_path / "novis", clip_dir, next_shape=False, pmod=False, save_vision=False, layers=2, shards=1)
    cfg["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="--vision-tower"):
        convert_checkpoint(src, tmp_path / "out", progress=False, cache_dir=tmp_path / "empty-hub")
    # --vision-tower: a local copy of the tower, here a full CLIPModel directory as openai/clip-* are
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    vision = CLIPVisionModel.from_pretrained(str(clip_dir)).config.to_dict()
    full = CLIPModel(CLIPConfig(vision_config=vision, projection_dim=16, text_config=dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
        bos_token_id=0, eos_token_id=1, pad_token_id=1)))
    full.save_pretrained(tmp_path / "clip-full")
    dst = convert_checkpoint(src, tmp_path / "out", progress=False, vision_tower=str(tmp_path / "clip-full"),
                             cache_dir=tmp_path / "empty-hub")
    assert conversion_info(dst)["vision_tower"]["source"] == str(tmp_path / "clip-full")
    from transformers import AutoModelForImageTextToText

    converted = AutoModelForImageTextToText.from_pretrained(str(dst))
    torch.testing.assert_close(converted.model.vision_tower.embeddings.patch_embedding.weight,
                               full.vision_model.embeddings.patch_embedding.weight)


def test_reference_ratios_for_other_depths_are_explicit():
    """The reference hard-codes cos(i*pi/31); for 40 layers (13B) its ratios differ from the paper's formula."""
    from pmod_bench.model.convert import pmod_config_from_original

    cfg = {"mod_target_layers": "shiftedcos_decay_0.85_0.15", "mod_router_factor": 0.5, "mod_weight_norm": "tanh_0.2_1",
           "mod_bias_enabled": True, "mod_special_init": True}
    pm32, notes32 = pmod_config_from_original(cfg, 32)
    assert pm32.ratios is None and not notes32
    pm40, notes40 = pmod_config_from_original(cfg, 40)
    expected = [1.0 if math.cos(i * math.pi / 31) / 2 + 0.5 > 0.85 else max(math.cos(i * math.pi / 31) / 2 + 0.5, 0.15)
                for i in range(40)]
    assert pm40.layer_ratios(40) == expected and notes40
    lin = dict(cfg, mod_target_layers="shiftedlinear_decay_0.85_0.15")
    assert pmod_config_from_original(lin, 32)[0].layer_ratios(32) == reference_layer_ratios(lin, 32)
    with pytest.raises(ConversionError, match="vision_all"):
        pmod_config_from_original(dict(cfg, mod_target_token_type="all"), 32)


def test_truncated_shard_is_one_line_and_files_get_umask_modes(next_pmod, tmp_path, capsys):
    """A shard cut short (an interrupted download): exit 2, one line naming the file and the fix, no DST;
    a finished conversion's files (model.safetensors included) get the usual 0666 & ~umask mode."""
    from pmod_bench.atomic import new_file_mode
    from pmod_bench.cli import main

    src, _, _, dst = next_pmod
    for f in dst.iterdir():
        if f.is_file():
            assert f.stat().st_mode & 0o777 == new_file_mode(), f"{f.name}: {oct(f.stat().st_mode & 0o777)}"
    bad = tmp_path / "cut"
    shutil.copytree(src, bad)
    shard = sorted(bad.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:200])
    out = tmp_path / "out"
    assert main(["convert", str(bad), str(out)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln.lower()]  # (tqdm lines aside)
    assert len(err) == 1 and err[0].startswith("pmod-bench convert: error:") and "Traceback" not in err[0], err
    assert shard.name in err[0] and "is truncated or corrupt" in err[0] and "hf download" in err[0]
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
