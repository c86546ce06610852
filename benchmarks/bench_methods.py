"""Every comparison method at the FLOPs of p-MoD-0.5: prefill latency ratio vs vanilla beside its FLOPs ratio.

    python benchmarks/bench_methods.py                                   # CPU: hidden 512, 32 layers, 672x672 image
    python benchmarks/bench_methods.py --repeats 2 --threads 1 --hidden 256 --intermediate 688 --heads 4
    python benchmarks/bench_methods.py --methods fastv,visionzip --device cuda --dtype bfloat16 --hidden 4096 \
        --intermediate 11008 --heads 32                                  # 7B-shaped LLM on a GPU

The model is the LLM of benchmarks/bench_prefill.py (the tiny preset's Vicuna layout resized by
``--hidden/--intermediate/--heads/--layers``, random weights, and its p-MoD twin on the same tensors with
routers randomised as after training), with one change so that the vision-side methods see real
images: the tiny CLIP tower (hidden 32, ``--vision-layers`` 24 layers as CLIP ViT-L) runs on LLaVA-NeXT's geometry, 336 px tiles of
14 px patches and LLaVA-NeXT's grid pinpoints, so a 672x672 image gives the paper's 5 tiles and 2,928
vision tokens (``--image-size`` changes it). Inputs are built by the tiny preset's processor at that
geometry (Vicuna-v1 prompt, one synthetic image), and every variant runs the same
``model(input_ids, pixel_values, image_sizes)`` prefill: vision tower, projector, method, LLM (logits on
the last position, KV cache on). The tower is put on eager attention for every variant (the [CLS]-attention
methods need its weights), so the vision side costs the same kernel everywhere.

Each method's budget is solved with the equal-compute solver (``pmod_bench.methods.solve``, the code
behind ``--match p-MoD-0.5``) on this architecture, image size and text length. Latency: median of
``--repeats`` interleaved repeats (repeat 1 of every variant, then repeat 2, ...) with min-max spread,
after one warm-up each. FLOPs: analytic (the profiler's formulas, ``pmod_bench.methods.accounting``), LLM
prefill (the solver's metric) and time-to-first-token (vision + method extra + LLM). KV: entries in the
real cache after prefill (``kv_cache_entries``), as the vision-token ratio (the paper's KV column:
text tokens subtracted per layer) and all tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from common import add_model_args, analytic, spread, sync

GRID_UNITS_NOTE = "LLaVA-NeXT pinpoints (1,2),(2,1),(2,2),(1,3),(3,1) tiles"


def build_models(args):
    """(vanilla, p-MoD, processor): bench_prefill's LLM with a 336 px / 14 px-patch tiny CLIP tower."""
    import torch
    from transformers import LlavaNextForConditionalGeneration

    from pmod_bench import PMoDConfig
    from pmod_bench.model.modeling import to_pmod
    from pmod_bench.model.presets import GRID_UNITS, VICUNA_V1_TEMPLATE, preset_config, random_routers, tiny_tokenizer
    from pmod_bench.model.processors import clip_image_processor, llava_processor

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = preset_config("tiny")
    d = cfg.to_dict()
    d.pop("model_type")
    d["text_config"].update(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                            num_attention_heads=args.heads, num_key_value_heads=args.heads, head_dim=args.hidden // args.heads,
                            max_position_embeddings=8192)
    d["vision_config"].update(image_size=args.tile, patch_size=args.patch, num_hidden_layers=args.vision_layers)
    d["image_grid_pinpoints"] = [[h * args.tile, w * args.tile] for h, w in GRID_UNITS]
    torch.manual_seed(0)
    config = type(cfg)(**d)
    config._attn_implementation = args.attn
    with torch.device(args.device):
        vanilla = LlavaNextForConditionalGeneration(config)
    vanilla = vanilla.to(dtype=getattr(torch, args.dtype)).eval()
    vanilla.model.vision_tower.set_attn_implementation("eager")
    pmod = to_pmod(vanilla, PMoDConfig(shift=args.shift))
    random_routers(pmod)
    if hasattr(pmod, "model") and hasattr(pmod.model, "vision_tower"):
        pmod.model.vision_tower.set_attn_implementation("eager")
    processor = llava_processor(clip_image_processor(args.tile, pinpoints=d["image_grid_pinpoints"]), tiny_tokenizer(),
                                patch_size=args.patch, chat_template=VICUNA_V1_TEMPLATE)
    return vanilla, pmod, processor


def make_inputs(args, processor):
    """One Vicuna-v1 prompt with one synthetic image of ``--image-size`` (W x H), on the device."""
    import numpy as np
    from PIL import Image

    w, h = args.image_size
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 // max(1, w - 1)), (yy * 255 // max(1, h - 1)), rng.integers(0, 255, (h, w))], -1)
    image = Image.fromarray(img.astype("uint8"), "RGB")
    question = " ".join(["describe"] * 8) + " the objects in the image and their colors."
    prompt = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
              f"detailed, and polite answers to the human's questions. USER: <image>\n{question} ASSISTANT:")
    enc = processor(images=[image], text=[prompt], return_tensors="pt")
    return {k: v.to(args.device) for k, v in enc.items()}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--image-size", default="672x672", help="WIDTHxHEIGHT of the input image (672x672: 2,928 vision tokens)")
    ap.add_argument("--tile", type=int, default=336, help="vision tile size in px (LLaVA-NeXT: 336)")
    ap.add_argument("--patch", type=int, default=14, help="vision patch size in px (CLIP ViT-L/14: 14)")
    ap.add_argument("--methods", default=None, help="comma list of registered methods (default: every registered method)")
    ap.add_argument("--match", default="p-MoD-0.5", help="the target the budgets are solved to (default p-MoD-0.5)")
    ap.add_argument("--match-tolerance", type=float, default=0.01,
                    help="relative tolerance of the solver (default 0.01); a method that cannot reach it is run at its "
                         "nearest setting within 10%% and marked ~")
    ap.add_argument("--vision-layers", type=int, default=24, help="layers of the tiny CLIP tower (CLIP ViT-L: 24)")
    return ap.parse_args(argv)


def solved_variants(args, arch, size, T: int) -> tuple[list, list[str]]:
    """(variants, skipped): (label, method config, solver result) of vanilla, the target and every method whose
    budget was solved to the target (within 10% when not within ``--match-tolerance``; ``skipped`` says so)."""
    from pmod_bench.methods import available_methods

    names = [m.strip() for m in args.methods.split(",")] if args.methods else sorted(available_methods())
    return solve_methods(names, arch, size, T, args.match, args.match_tolerance)


def solve_methods(specs, arch, size, T: int, match: str, tolerance: float) -> tuple[list, list[str]]:
    """:func:`solved_variants` for a list of method specs (each may hold its own options, ``visionzip:dominant=8,...``)."""
    from pmod_bench.methods import solve

    variants = [("vanilla", None, None), (match, None, None)]
    skipped = []
    for name in specs:
        try:
            res = solve(name, arch, size, match=match, text_tokens=T, tolerance=tolerance)
        except ValueError as exc:  # unreachable within the tolerance (coarse budget steps), or not applicable here
            try:
                res = solve(name, arch, size, match=match, text_tokens=T, tolerance=0.1)
                skipped.append(f"~ {name}: {' '.join(str(exc).split())} Run at its nearest setting, "
                               f"{res.rel_err:.1%} off the target.")
            except ValueError:
                skipped.append(f"{name}: {' '.join(str(exc).split())}")
                continue
        variants.append((name, res.config, res))
    return variants, skipped


def time_variants(args, variants, vanilla, pmod, inputs) -> tuple[dict, dict, float]:
    """(prefill seconds per repeat, KV cache entries per layer, seconds of timing), by variant label: one
    warm-up each, then ``--repeats`` interleaved repeats."""
    import torch

    from pmod_bench.methods import apply_method
    from pmod_bench.model.cache import kv_cache_entries, output_cache

    def run(label, cfg):
        model = pmod if label == args.match else vanilla
        if label not in ("vanilla", args.match):
            apply_method(vanilla, cfg)
        try:
            with torch.no_grad():
                t0 = time.perf_counter()
                out = model(**inputs, use_cache=True, logits_to_keep=1)
                sync(args.device)
                dt = time.perf_counter() - t0
        finally:
            if label not in ("vanilla", args.match):
                apply_method(vanilla, None)
        return dt, kv_cache_entries(output_cache(out))

    times = {v[0]: [] for v in variants}
    kv = {}
    for label, cfg, _ in variants:  # warm-up (and the KV cache: the same every repeat)
        _, kv[label] = run(label, cfg)
    t_start = time.time()
    for _ in range(args.repeats):
        for label, cfg, _ in variants:
            times[label].append(run(label, cfg)[0])
    return times, kv, time.time() - t_start


def target_flops(args, arch, size, T: int) -> dict[str, tuple[float, float]]:
    """(LLM prefill, TTFT) FLOPs of the baseline and of the target ``--match``, analytic."""
    from pmod_bench.methods.accounting import target_value

    return {target: tuple(target_value(target, arch, size, T, metric, "headline") for metric in ("prefill", "ttft"))
            for target in ("baseline", args.match)}


def print_table(args, arch, size, T: int, variants, flops: dict, times: dict, kv: dict) -> None:
    """The Markdown table: per variant its latency, FLOPs (LLM prefill, TTFT) and KV ratios to vanilla
    (``flops``: :func:`target_flops`)."""
    from pmod_bench.methods.accounting import method_flops

    (base_llm, base_ttft), (pmod_llm, pmod_ttft) = flops["baseline"], flops[args.match]
    tv = statistics.median(times["vanilla"])
    kv_v_all = sum(kv["vanilla"])
    kv_v_vis = sum(e - T for e in kv["vanilla"])
    print(f"| variant (solved to {args.match} LLM prefill FLOPs) | latency ratio (min-max) | LLM FLOPs ratio | TTFT FLOPs ratio "
          "| latency / LLM FLOPs | KV ratio, vision (cache) | KV ratio, all tokens | spread |")
    print("|---|---|---|---|---|---|---|---|")
    for label, cfg, res in variants:
        ts = times[label]
        lat = statistics.median(ts) / tv
        lo, hi = min(ts) / max(times["vanilla"]), max(ts) / min(times["vanilla"])
        if label == "vanilla":
            llm, ttft, name = 1.0, 1.0, "vanilla"
        elif label == args.match:
            llm, ttft, name = pmod_llm / base_llm, pmod_ttft / base_ttft, f"{args.match} (random routers)"
        else:
            f = method_flops(cfg, arch, size, T)
            llm, ttft, name = f.llm_prefill / base_llm, f.ttft / base_ttft, cfg.spec()
            name += f" ~{res.rel_err:.1%}" if res.rel_err > args.match_tolerance else ""
        kv_all = sum(kv[label]) / kv_v_all
        kv_vis = sum(e - T for e in kv[label]) / kv_v_vis
        sp = (max(ts) - min(ts)) / statistics.median(ts)
        print(f"| {name} | {lat:.3f} ({lo:.2f}-{hi:.2f}) | {llm:.3f} | {ttft:.3f} | {lat / llm:.2f} | {kv_vis:.3f} | "
              f"{kv_all:.3f} | {sp:.0%}{' !' if sp > 0.25 else ''} |")


def main(argv=None) -> int:
    args = parse_args(argv)

    import torch

    from pmod_bench.profiler.arch import arch_from_config, parse_image_size, vision_layout

    args.image_size = parse_image_size(args.image_size)
    vanilla, pmod, processor = build_models(args)
    inputs = make_inputs(args, processor)
    arch = arch_from_config("bench", vanilla.config)
    V = vision_layout(arch, args.image_size).vision_tokens
    N = int(inputs["input_ids"].shape[1])
    T = N - V
    args.vision_tokens, args.text_tokens = V, T  # common.analytic reads the shapes from args
    size = args.image_size

    variants, skipped = solved_variants(args, arch, size, T)
    flops = target_flops(args, arch, size, T)
    times, kv, wall = time_variants(args, variants, vanilla, pmod, inputs)

    print(f"shape: {args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}, heads {args.heads}; tiny CLIP tower "
          f"(hidden {arch.vision.hidden}, {arch.vision.layers} layers) on {args.tile} px tiles / {args.patch} px patches, "
          f"{GRID_UNITS_NOTE}; image {size[0]}x{size[1]} -> {V} vision + {T} text tokens; {args.device} {args.dtype} "
          f"{args.attn} (tower eager), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"vanilla prefill {spread(times['vanilla'])}; {args.repeats} interleaved repeats, {wall:.0f} s of timing")
    print(f"check: common.analytic p-MoD/vanilla LLM FLOPs {analytic(pmod, args, False) / analytic(vanilla, args, False):.3f}")
    print()
    print_table(args, arch, size, T, variants, flops, times, kv)
    for s in skipped:
        print(s if s.startswith("~") else f"skipped {s}")
    print("! = spread (max-min)/median over 25%: the latency ratio is not to be trusted (loaded machine); rerun with more "
          "--repeats or on an idle machine.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
