"""Where the trained routers look: the kept-token statistic and the token -> image-region map.

LLaVA-NeXT's vision tokens for one image (HF ``pack_image_features``), in order::

    base view   (S/p)^2 tokens: the whole image squashed to one tile, row-major
    high-res    rows x (cols + 1): the anyres grid after unpad, row-major, one image_newline per row

so every token but the newlines covers a known rectangle of the original image. A token "overlaps a
shape" when any drawn pixel of a shape (or the digit) falls in its rectangle. For each routed layer:

    kept_on_shapes   = (kept tokens overlapping a shape) / (kept tokens)
    tokens_on_shapes = (all tokens overlapping a shape) / (all tokens)      what random selection keeps
    shape_area       = (pixels covered by the shapes) / (image pixels)

Routers that prefer the shapes give ``kept_on_shapes`` clearly above ``tokens_on_shapes``.
"""

from __future__ import annotations

from typing import Any, Iterable


def token_regions(model, processor, image_size: tuple[int, int]) -> list:
    """For one image size (W, H): a list over the vision tokens of ``(x0, y0, x1, y1)`` in original pixels, or
    None for a newline token. Uses transformers' own anyres helpers, so it matches the model's layout."""
    import torch
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    cfg = model.config
    W, H = image_size
    tile = cfg.vision_config.image_size
    side = tile // cfg.vision_config.patch_size
    regions: list = []
    for i in range(side * side):  # base view: the image squashed to one tile
        r, c = divmod(i, side)
        regions.append((c * W / side, r * H / side, (c + 1) * W / side, (r + 1) * H / side))
    gh, gw = get_anyres_image_grid_shape((H, W), cfg.image_grid_pinpoints, tile)
    feat = torch.zeros(1, gh * side, gw * side)
    rows, cols = unpad_image(feat, torch.tensor([H, W])).shape[1:]
    for r in range(rows):
        for c in range(cols):
            regions.append((c * W / cols, r * H / rows, (c + 1) * W / cols, (r + 1) * H / rows))
        regions.append(None)  # image_newline
    return regions


#: the question of the profile scenario and of the routing statistic (a toy existence question, the instruction included)
EXIST_QUESTION = "Is there a red circle in the image?\nAnswer the question using a single word or phrase."


def toy_prompt(processor, question: str) -> str:
    """One toy question about one image (first) in the checkpoint's own chat template: the toy template it was
    trained with (``pmod_bench.toy.prepare.TOY_TEMPLATE``; Vicuna v1 for checkpoints made before it)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prompt_text_tokens(checkpoint: str, question: str = EXIST_QUESTION) -> int:
    """Text tokens of :func:`toy_prompt` (the image placeholder not counted) for the checkpoint's processor."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    ids = processor.tokenizer(toy_prompt(processor, question))["input_ids"]
    return len(ids) - ids.count(processor.tokenizer.convert_tokens_to_ids(processor.image_token))


def _overlaps(mask, region) -> bool:
    import math

    x0, y0, x1, y1 = region
    return bool(mask[int(y0):max(int(math.ceil(y1)), int(y0) + 1), int(x0):max(int(math.ceil(x1)), int(x0) + 1)].any())


def kept_token_statistic(model, processor, scenes: Iterable[Any], question: str) -> dict:
    """The statistic above over ``scenes`` (toy world Scenes), per routed layer and pooled over layers."""
    import torch

    from .world import render

    per_layer: dict = {}
    area, n_images = 0.0, 0
    newline_kept = newline_total = 0
    for scene in scenes:
        image = render(scene)
        mask = scene.mask()
        area += float(mask.mean())
        n_images += 1
        regions = token_regions(model, processor, scene.size)
        on_shape = [None if reg is None else _overlaps(mask, reg) for reg in regions]
        inputs = processor(images=image, text=toy_prompt(processor, question), return_tensors="pt")
        with torch.no_grad(), model.record_routing() as rec:
            model(**inputs)
        target = inputs["input_ids"][0] == model.config.image_token_id
        if int(target.sum()) != len(regions):
            raise RuntimeError(f"{int(target.sum())} vision tokens but {len(regions)} regions for size {scene.size}")
        for layer, r in rec.items():
            sel = r["selected"][0][target].tolist()
            s = per_layer.setdefault(int(layer), {"kept": 0, "kept_on_shapes": 0, "tokens": 0, "tokens_on_shapes": 0})
            for keep, shape in zip(sel, on_shape):
                if shape is None:
                    newline_total += 1
                    newline_kept += int(keep)
                    continue
                s["tokens"] += 1
                s["tokens_on_shapes"] += int(shape)
                s["kept"] += int(keep)
                s["kept_on_shapes"] += int(keep and shape)
    layers = {}
    for layer, s in sorted(per_layer.items()):
        layers[str(layer)] = {
            "kept_on_shapes": s["kept_on_shapes"] / max(s["kept"], 1),
            "tokens_on_shapes": s["tokens_on_shapes"] / max(s["tokens"], 1),
            "keep_rate_shape_tokens": s["kept_on_shapes"] / max(s["tokens_on_shapes"], 1),
            "keep_rate_background_tokens": (s["kept"] - s["kept_on_shapes"]) / max(s["tokens"] - s["tokens_on_shapes"], 1),
            "kept": s["kept"], "tokens": s["tokens"],
        }
    tot = {k: sum(s[k] for s in per_layer.values()) for k in ("kept", "kept_on_shapes", "tokens", "tokens_on_shapes")}
    return {
        "images": n_images,
        "question": question,
        "shape_area": area / max(n_images, 1),
        "kept_on_shapes": tot["kept_on_shapes"] / max(tot["kept"], 1),
        "tokens_on_shapes": tot["tokens_on_shapes"] / max(tot["tokens"], 1),
        "keep_rate_shape_tokens": tot["kept_on_shapes"] / max(tot["tokens_on_shapes"], 1),
        "keep_rate_background_tokens": (tot["kept"] - tot["kept_on_shapes"]) / max(tot["tokens"] - tot["tokens_on_shapes"], 1),
        "newline_keep_rate": newline_kept / max(newline_total, 1),
        "layers": layers,
        "definition": "kept_on_shapes = kept vision tokens whose image region holds a shape/digit pixel / kept tokens "
                      "(routed layers pooled); tokens_on_shapes = the same over all tokens (random selection); shape_area = "
                      "drawn pixels / image pixels; newline tokens excluded",
    }


__all__ = ["EXIST_QUESTION", "kept_token_statistic", "prompt_text_tokens", "toy_prompt", "token_regions"]
