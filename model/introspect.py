"""Which vision tokens each p-MoD layer processed, for one image: the data of the paper's Fig. 5 / 6.

:func:`routing_record` is the record of ``introspection.json`` (docs/RUN_DIRS.md, read by ``pmod-bench
report``; written into a run directory by :mod:`pmod_bench.tasks.introspection`):
vision-token indices ``0..V-1`` in the order the model holds them. For LLaVA-NeXT the first
``(S/p)^2`` tokens are the base view (the whole image resized to one tile) and ``grid`` maps them onto
the image row-major; the high-resolution tokens after them are shown in the layer x token map only.
For LLaVA-1.5 the grid covers the image as the processor presents it (centre crop or pad to square).
"""

from __future__ import annotations

from typing import Any

DEFAULT_QUESTION = "Describe the image in detail."


def routing_record(model, processor, image, question: str = DEFAULT_QUESTION) -> dict[str, Any]:
    """Run one forward on ``image`` + ``question`` and return the introspection record (no image path)."""
    import torch

    from .routed import PMoDModelMixin

    if not isinstance(model, PMoDModelMixin):
        raise TypeError(f"{type(model).__name__} is not a p-MoD model: it has no routing to record")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image.convert("RGB"), text=prompt, return_tensors="pt").to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.no_grad(), model.record_routing() as rec:
        model(**inputs)
    target = model.host.vision_mask(model.config, inputs["input_ids"])[0].cpu()
    layers = {}
    for idx, r in sorted(rec.items()):
        selected = r["selected"][0][target]  # (V,) in vision-token order
        layers[str(idx)] = selected.nonzero().squeeze(-1).tolist()
    num_vision = int(target.sum())
    return {
        "grid": model.host.routing_grid(model.config, inputs, num_vision),
        "num_layers": model.config.text_config.num_hidden_layers,
        "vision_tokens": num_vision,
        "layers": layers,
        "ratios": model.layer_ratios(),
        "question": question,
        "image_size": list(image.size),
    }


__all__ = ["DEFAULT_QUESTION", "routing_record"]
