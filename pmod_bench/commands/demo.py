"""``pmod-bench demo``: one image through a p-MoD model beside its vanilla twin, layer by layer."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run one generated image through p-MoD and the vanilla model; print per-layer ratios, tokens and KV entries",
        description="Builds the tiny preset (random weights, routers randomised as after training), feeds one generated "
        "image plus a question, and prints each layer's retention ratio, tokens processed and KV-cache entries beside "
        "the vanilla model with the same weights.",
    )
    p.add_argument("--preset", default="tiny", choices=["tiny", "tiny-llava", "tiny-qwen2.5-vl"],
                   help="architecture preset: LLaVA-NeXT, LLaVA-1.5 or Qwen2.5-VL (default: tiny)")
    p.add_argument("--shift", type=float, default=0.5, help="shift factor delta of the schedule (default: 0.5)")
    p.add_argument("--schedule", default="cosine", help="cosine (PRD), linear, constant, interleaved, stepped")
    p.add_argument("--image-size", default="64x48", help="WIDTHxHEIGHT of the generated image (default: 64x48)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="tokens to generate (default: 8)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pmod_bench.cli import UserError
    from pmod_bench.model.config import PMoDConfig
    from pmod_bench.profiler.arch import parse_image_size

    try:
        pmod = PMoDConfig(schedule=args.schedule, shift=args.shift)
        w, h = parse_image_size(args.image_size)
    except ValueError as exc:  # ArchError is a ValueError
        raise UserError(str(exc)) from None

    import torch

    from pmod_bench.model.cache import kv_cache_entries, output_cache
    from pmod_bench.model.hosts import host_for
    from pmod_bench.model.modeling import to_pmod
    from pmod_bench.model.presets import build_preset, demo_image, random_routers

    vanilla, processor = build_preset(args.preset, pmod=None)
    model = to_pmod(vanilla, pmod)  # same tensors as the vanilla model
    random_routers(model)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown in the image?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=demo_image(w, h), text=prompt, return_tensors="pt")
    n_total = inputs["input_ids"].shape[1]
    n_vision = int(host_for(model).vision_mask(model.config, inputs["input_ids"]).sum())

    with torch.no_grad():
        base_out = vanilla(**inputs, use_cache=True)
        with model.record_routing() as record:
            out = model(**inputs, use_cache=True)
    base_kv = kv_cache_entries(output_cache(base_out))
    kv = kv_cache_entries(output_cache(out))
    ratios = model.layer_ratios()

    print(f"{args.preset}: {len(ratios)} layers; input {n_total} tokens ({n_vision} vision, {n_total - n_vision} text); "
          f"image {w}x{h}; {pmod.name} ({pmod.schedule}, delta={pmod.shift:g})")
    header = f"{'layer':>5}  {'ratio':>6}  {'vision kept':>11}  {'processed':>9}  {'vanilla':>7}  {'KV p-MoD':>8}  {'KV vanilla':>10}"
    print(header)
    print("-" * len(header))
    tot_p = tot_v = 0
    for i, r in enumerate(ratios):
        rec = record.get(i)
        kept = int(rec["selected"].sum()) if rec is not None else n_vision
        processed = n_total - n_vision + kept
        tot_p += processed
        tot_v += n_total
        print(f"{i:>5}  {r:>6.3f}  {kept:>5}/{n_vision:<5}  {processed:>9}  {n_total:>7}  {kv[i]:>8}  {base_kv[i]:>10}")
    print("-" * len(header))
    print(f"tokens processed: {tot_p} vs {tot_v} ({tot_p / tot_v:.1%});  KV-cache entries: {sum(kv)} vs {sum(base_kv)} "
          f"({sum(kv) / sum(base_kv):.1%});  vision KV kept: "
          f"{(sum(kv) - len(ratios) * (n_total - n_vision)) / (len(ratios) * n_vision):.1%}")

    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        gen_base = vanilla.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    tok = processor.tokenizer
    print(f"p-MoD generates  : {tok.decode(gen[0, n_total:], skip_special_tokens=True)!r}  (random weights)")
    print(f"vanilla generates: {tok.decode(gen_base[0, n_total:], skip_special_tokens=True)!r}")
    return 0
