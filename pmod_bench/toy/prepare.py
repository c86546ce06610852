"""Prepare the toy world's language model, vision tower and tokenizer (what LLaVA starts from).

The paper composes LLaVA from a pretrained LLM (Vicuna-7B) and a pretrained CLIP tower. The toy
world has neither, so this module makes both, at the tiny preset's shapes (Llama: 8 layers, hidden
64, 4 heads / 2 KV heads, MLP 128; CLIP: 32 px images, 8 px patches, hidden 32, 2 layers):

* **tokenizer**: byte-level BPE (as the tiny preset) trained in code on the toy world's prompts,
  answers and captions, so a prompt is a few dozen tokens;
* **vision tower**: a CLIP vision model pretrained for a few hundred steps to label every patch of
  toy images (colour, shape, digit) from the features LLaVA reads (layer -2), on crops at the
  scales anyres feeds it (full-resolution tiles and the downscaled base image). It stays frozen
  afterwards, as in the paper's SFT;
* **language model**: a Llama initialised from the seed and pretrained briefly on the toy world's
  text (captions and question/answer pairs without images), so it knows the answer vocabulary.

Everything is deterministic given the seed (one CPU thread; see :func:`deterministic`).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Callable, Optional

from .questions import ALL_OBJECTS, LETTER, REFCOCO_PROMPT, SHORT, box_text, plural
from .world import COLOURS, SHAPES, Scene, describe, draw_shape, render, sample_scene

#: 4 layers, LLaVA reads layer -2 (the output of the third): two layers (one read) left shape and digit identity
#: undecodable from the features (linear probe on foreground patches: shape 29%, digit 16%, below the majority class)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, image_size=32, patch_size=8,
              projection_dim=32)
LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
           max_position_embeddings=2048)
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
VOCAB_SIZE = 640
#: the toy tokenizer's pre-split (each match a piece of its own, BPE merges within the pieces between them)
SPLIT = r"USER:|\s?ASSISTANT:|\n"
#: init std of the toy Llama: ~1/sqrt(hidden) (HF's 0.02 is sized for hidden 4096; at 64 it leaves attention
#: near-uniform and the text embeddings ~70x smaller than the projected image features)
INIT_STD = 0.1
#: the toy chat template: Vicuna v1's turns without its system prompt, ``USER: <image>\nQ ASSISTANT: A</s>USER: ...``.
#: The system prompt's 55 tokens made text 38% of a toy prompt (LLaVA-NeXT-7B: ~2%), which kept p-MoD's FLOPs ratio
#: at 66%; without it the vision tokens are ~85% of an existence prompt, as in the paper's setting.
TOY_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT:' }}"
    "{% if message['content'] is string %}{{ ' ' + message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ ' ' + item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ '</s>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def deterministic(seed: int) -> None:
    """One thread, seeded: bit-for-bit repeatable CPU runs."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


# ----------------------------------------------------------------------------------- tokenizer
def corpus(seed: int = 0) -> list:
    from pmod_bench.model.presets import _CORPUS

    rng = random.Random(seed)
    from .questions import conversation, popularity, scene_for

    lines = ["USER: ASSISTANT:", _CORPUS, SHORT, LETTER, REFCOCO_PROMPT]
    for obj in ALL_OBJECTS:
        lines.append(f"Is there a {obj} in the image?{SHORT} ASSISTANT: yes")
        lines.append(REFCOCO_PROMPT + f"the {obj}")
    for s in SHAPES:
        lines += [f"What color is the {s}?{SHORT}", f"How many {plural(s)} are there?{SHORT} ASSISTANT: 0 1 2 3 4"]
    for c in COLOURS:
        lines += [f"What shape is the {c} object?{SHORT}", f"Which shape is {c}?\nA. circle\nB. square\nC. triangle\nD. diamond"]
    lines.append("What number is written in the image?" + SHORT + " ASSISTANT: 0 1 2 3 4 5 6 7 8 9")
    kinds = ("exist", "attribute", "count", "mc", "text", "ground")
    for i in range(300):  # conversations as the toy template writes them: the merges follow the prompts' frequencies
        sc = scene_for(kinds[i % len(kinds)], rng)
        lines.append(describe(sc))
        for s in sc.shapes:
            lines.append(box_text(s.box, sc.size))
        turns = conversation(sc, rng, 10, popularity([sc]))
        lines.append("".join(f"USER: {q['value']} ASSISTANT: {a['value']}</s>" for q, a in zip(turns[::2], turns[1::2])))
    return lines


def build_tokenizer(seed: int = 0):
    """The toy tokenizer: byte-level BPE on :func:`corpus` with the tiny preset's special tokens and :data:`TOY_TEMPLATE`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pmod_bench.model.presets import IMAGE_TOKEN, _special_tokens

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # merges may span words (no split at spaces), so a frequent question or instruction becomes a few tokens; the
    # roles and line breaks are pieces of their own, so no token joins a prompt to its answer
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=_special_tokens(),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN}, padding_side="left", model_max_length=2048,
        chat_template=TOY_TEMPLATE,
    )


# --------------------------------------------------------------------------------- label maps
def label_maps(scene: Scene):
    """Per-pixel classes of a scene, (3, H, W) uint8: colour (0 background, 1.. colours, 6 digit), shape (0 none,
    1.. shapes), digit (0 none, 1 + digit)."""
    import numpy as np
    from PIL import Image, ImageDraw

    w, h = scene.size
    maps = []
    colour_ids = {c: i + 1 for i, c in enumerate(COLOURS)}
    shape_ids = {s: i + 1 for i, s in enumerate(SHAPES)}
    img = np.asarray(render(scene), dtype=np.int16)
    for which in ("colour", "shape"):
        m = Image.new("L", (w, h), 0)
        d = ImageDraw.Draw(m)
        for s in scene.shapes:  # the same pixels render() paints, with label ids for colours
            draw_shape(d, s, colour_ids[s.colour] if which == "colour" else shape_ids[s.shape])
        maps.append(np.asarray(m, dtype=np.uint8).copy())
    digit = np.zeros((h, w), dtype=np.uint8)
    if scene.digit is not None:
        x0, y0, x1, y1 = scene.digit_box
        dark = np.abs(img - np.asarray(scene.background, dtype=np.int16)).sum(-1) > 150
        region = np.zeros_like(dark)
        region[y0:y1, x0:x1] = True
        digit[dark & region] = 1 + int(scene.digit)
        maps[0][dark & region] = len(COLOURS) + 1
    maps.append(digit)
    return np.stack(maps)


def _patch_labels(maps, patch: int):
    """(3, H, W) label maps of a 32x32 crop -> (3, P) patch labels: the majority non-zero class if it covers
    at least 1/8 of the patch, else 0."""
    import numpy as np

    c, H, W = maps.shape
    g = maps.reshape(c, H // patch, patch, W // patch, patch).transpose(0, 1, 3, 2, 4).reshape(c, -1, patch * patch)
    out = np.zeros(g.shape[:2], dtype=np.int64)
    for k in range(c):
        for p in range(g.shape[1]):
            vals = g[k, p][g[k, p] > 0]
            if vals.size >= patch * patch // 8:
                out[k, p] = np.bincount(vals).argmax()
    return out


def _crops(rng: random.Random, n_scenes: int, per_scene: int, tile: int = 32, patch: int = 8, digit_rate: float = 0.6):
    """Training crops for the vision tower: (pixels (N, 3, 32, 32) float, labels (N, 3, 16) long). Scenes carry a
    digit at ``digit_rate`` (twice the benchmark's rate: digit patches are few, and a digit's identity is the hardest
    label to read from 8 px fragments)."""
    import numpy as np
    from PIL import Image

    xs, ys = [], []
    for _ in range(n_scenes):
        sc = sample_scene(rng, (1, 4), digit=rng.random() < digit_rate)
        img = render(sc)
        maps = label_maps(sc)
        for _ in range(per_scene):
            w, h = sc.size
            scale = rng.choice((1.0, 1.0, 0.5, 2 / 3, 1 / 3))  # full-res tiles, downscaled grids and base images
            sw, sh = max(tile, round(w * scale)), max(tile, round(h * scale))
            im = img.resize((sw, sh), Image.BICUBIC) if (sw, sh) != (w, h) else img
            mp = np.stack([np.asarray(Image.fromarray(m).resize((sw, sh), Image.NEAREST)) for m in maps])
            x0, y0 = rng.randint(0, sw - tile), rng.randint(0, sh - tile)
            arr = (np.asarray(im, dtype=np.float32)[y0:y0 + tile, x0:x0 + tile] / 255.0 - MEAN) / STD
            xs.append(arr.transpose(2, 0, 1))
            ys.append(_patch_labels(mp[:, y0:y0 + tile, x0:x0 + tile], patch))
    return np.stack(xs).astype(np.float32), np.stack(ys)


def build_vision_tower(out: str | Path, seed: int = 0, steps: int = 5000, batch: int = 64, scenes: int = 3000,
                       log: Optional[Callable[[str], None]] = None) -> dict:
    """Pretrain the toy CLIP vision tower (patch labelling from layer -2) and save it to ``out``.

    Three linear heads read LLaVA's features (layer -2, CLS dropped) of every patch: colour (with background and
    digit ink as classes), shape and digit. The shape and digit losses count foreground patches only: with the
    background in them the majority class wins (the heads reach ~97% "accuracy" while a probe on the
    foreground reads shape and digit at chance), and the LLM then has nothing to read an answer from.
    ``toy_pretrain.json`` records the heads' accuracy on fresh crops, on the foreground patches of each label.
    """
    import numpy as np
    import torch
    from torch import nn
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    deterministic(seed)
    cfg = CLIPVisionConfig(**VISION)
    model = CLIPVisionModel(cfg)
    hidden = VISION["hidden_size"]
    heads = nn.ModuleList([nn.Linear(hidden, n) for n in (len(COLOURS) + 2, len(SHAPES) + 1, 11)])
    x, y = _crops(random.Random(seed), scenes, 8)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    warmup = max(1, steps // 100)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(seed)

    def features(pixels):
        return model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # (B, 16, hidden)

    def loss_of(hs, labels):
        loss = nn.functional.cross_entropy(heads[0](hs).flatten(0, 1), labels[:, 0].flatten())
        for k in (1, 2):  # shape and digit identity on the foreground (fg/bg is the colour head's job)
            target = labels[:, k].flatten().masked_fill(labels[:, k].flatten() == 0, -100)
            if bool((target >= 0).any()):
                loss = loss + nn.functional.cross_entropy(heads[k](hs).flatten(0, 1), target, ignore_index=-100)
        return loss

    model.train()
    losses = []
    every = max(1, steps // 10)
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        loss = loss_of(features(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log and (step + 1) % every == 0:
            log(f"vision tower step {step + 1}/{steps}: loss {np.mean(losses[-every:]):.3f}")
    model.eval()
    with torch.no_grad():  # the heads on fresh crops: colour on every patch, shape and digit on their foreground
        xv, yv = _crops(random.Random(seed + 1), 200, 4)
        hs, yv = features(torch.from_numpy(xv)), torch.from_numpy(yv)
        acc = {}
        for k, name in enumerate(("colour", "shape", "digit")):
            sel = torch.ones_like(yv[:, k], dtype=torch.bool) if k == 0 else yv[:, k] > 0
            acc[name] = float((heads[k](hs).argmax(-1) == yv[:, k])[sel].float().mean())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=MEAN,
                       image_std=STD).save_pretrained(out)
    info = {"steps": steps, "final_loss": float(np.mean(losses[-50:])), "head_accuracy": acc,
            "head_accuracy_on": "fresh crops; colour: every patch; shape, digit: the patches that hold one"}
    (out / "toy_pretrain.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


# ------------------------------------------------------------------------------ language model
def _lm_texts(rng: random.Random, n: int, turns: int = 4) -> list:
    """Text-only pretraining data in the SFT format (:data:`TOY_TEMPLATE`), with the scene's *caption where the image
    goes*::

        USER: The picture shows a red circle at the top left, ...\n<question> ASSISTANT: <answer></s>USER: ...

    Every answer follows from the caption in context, so the toy LM learns to look up colours, shapes, counts
    and digits in its context instead of a context-free answer prior (which SFT would then have to unlearn);
    PT then only has to teach the connector to write the image into those slots."""
    from .questions import conversation, popularity, scene_for

    out = []
    kinds = ("exist", "attribute", "count", "mc", "text", "ground")
    for i in range(n):
        sc = scene_for(kinds[i % len(kinds)], rng)
        conv = conversation(sc, rng, turns, popularity([sc]))
        text = ""
        for t in conv:
            if t["from"] == "human":
                text += "USER: " + t["value"].replace("<image>", describe(sc)) + " "
            else:
                text += "ASSISTANT: " + t["value"] + "</s>"
        out.append(text)
    return out


def build_language_model(out: str | Path, tokenizer, seed: int = 0, steps: int = 300, batch: int = 16,
                         log: Optional[Callable[[str], None]] = None) -> dict:
    """Initialise the toy Llama from ``seed``, pretrain it on toy text, save it with the tokenizer to ``out``."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    deterministic(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, initializer_range=INIT_STD, **LLM)
    model = LlamaForCausalLM(cfg)
    texts = _lm_texts(random.Random(seed), steps * batch // 2)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    rng = random.Random(seed + 1)
    model.train()
    tokenizer.padding_side = "right"
    losses = []
    for step in range(steps):
        chunk = [texts[rng.randrange(len(texts))] for _ in range(batch)]
        enc = tokenizer(chunk, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log and (step + 1) % 100 == 0:
            log(f"language model step {step + 1}/{steps}: loss {np.mean(losses[-100:]):.3f}")
    tokenizer.padding_side = "left"
    tokenizer.backend_tokenizer.no_padding()  # padding/truncation state would be saved into tokenizer.json
    tokenizer.backend_tokenizer.no_truncation()
    model.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {"steps": steps, "final_loss": float(np.mean(losses[-50:]))}
    (out / "toy_pretrain.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


__all__ = ["LLM", "VISION", "build_language_model", "build_tokenizer", "build_vision_tower", "corpus", "deterministic",
           "label_maps"]
