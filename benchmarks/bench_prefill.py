"""Prefill latency of p-MoD vs the vanilla model, beside the analytic FLOPs ratio of the same shapes.

    python benchmarks/bench_prefill.py                      # CPU defaults: hidden 512, 32 layers
    python benchmarks/bench_prefill.py --hidden 4096 --intermediate 11008 --heads 32 --device cuda --dtype bfloat16

LLaVA-NeXT-shaped input: 2,880 vision tokens + ~60 text tokens, 32 decoder layers (Vicuna layout),
hidden size as large as the machine allows. Both models share the same weights (``to_pmod``), the
p-MoD routers are randomised as after training, and both are measured in the same run (interleaved
repeats, median). Printed: latency ratio, FLOPs ratio, and their quotient (target <= 1.10; the
paper's A6000 figure is 0.709 / 0.556 = 1.28).

FLOPs (multiply-add = 2): per layer with n processed tokens, projections 2*n*(2*d*d + 2*d*d_kv) + MLP
2*n*3*d*m, attention scores + weighted sum 4*n^2*d (full) or 2*n*(n+1)*d (causal: what the sdpa kernel
runs), p-MoD router 2*N*d on routed layers, lm_head on the last token only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def analytic_flops(ratios, n_text, n_vision, d, d_kv, m, causal: bool) -> float:
    import numpy as np

    total = 0.0
    for r in ratios:
        kept = n_vision if r >= 1.0 else int(np.trunc(np.float32(n_vision) * np.float32(r)))
        n = n_text + kept
        total += 2 * n * (2 * d * d + 2 * d * d_kv) + 2 * n * 3 * d * m
        total += 2 * n * (n + 1) * d if causal else 4 * n * n * d
        if r < 1.0:
            total += 2 * (n_text + n_vision) * d
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--vision-tokens", type=int, default=2880)
    ap.add_argument("--text-tokens", type=int, default=60)
    ap.add_argument("--shift", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)

    import torch
    from transformers import LlavaNextForConditionalGeneration

    from pmod_bench import PMoDConfig
    from pmod_bench.model.modeling import to_pmod
    from pmod_bench.model.presets import preset_config, random_routers

    dtype = getattr(torch, args.dtype)
    cfg = preset_config("tiny")
    text = cfg.text_config.to_dict()
    text.update(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=8192)
    d = cfg.to_dict()
    d.pop("model_type")
    d["text_config"] = text
    torch.manual_seed(0)
    vanilla = LlavaNextForConditionalGeneration(type(cfg)(**d)).to(device=args.device, dtype=dtype).eval()
    pmod = to_pmod(vanilla, PMoDConfig(shift=args.shift))
    random_routers(pmod)

    B, V, T = 1, args.vision_tokens, args.text_tokens
    N = V + T
    embeds = torch.randn(B, N, args.hidden, device=args.device, dtype=dtype) * 0.02
    vision = torch.zeros(B, N, dtype=torch.bool, device=args.device)
    vision[:, 35 : 35 + V] = True  # system prompt, then the image, then the question (LLaVA layout)
    ids = torch.full((B, N), 5, dtype=torch.long, device=args.device)
    ids[vision] = cfg.image_token_id

    def run(model):
        with torch.no_grad():
            if model is pmod:
                model(inputs_embeds=embeds, vision_token_mask=vision, use_cache=True, logits_to_keep=1)
            else:
                model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    for m in (vanilla, pmod):  # warm-up
        run(m)
    times = {"vanilla": [], "pmod": []}
    for _ in range(args.repeats):
        for name, m in (("vanilla", vanilla), ("pmod", pmod)):
            t0 = time.perf_counter()
            run(m)
            times[name].append(time.perf_counter() - t0)
    tv, tp = statistics.median(times["vanilla"]), statistics.median(times["pmod"])
    ratios = pmod.layer_ratios()
    d_kv = args.hidden  # no GQA in the Vicuna layout
    fv_c = analytic_flops([1.0] * args.layers, T, V, args.hidden, d_kv, args.intermediate, causal=True)
    fp_c = analytic_flops(ratios, T, V, args.hidden, d_kv, args.intermediate, causal=True)
    fv_f = analytic_flops([1.0] * args.layers, T, V, args.hidden, d_kv, args.intermediate, causal=False)
    fp_f = analytic_flops(ratios, T, V, args.hidden, d_kv, args.intermediate, causal=False)
    lat = tp / tv
    print(f"shape: {args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}, {V} vision + {T} text tokens, "
          f"{args.device} {args.dtype}, torch threads {torch.get_num_threads()}, p-MoD delta={args.shift}")
    print(f"prefill latency  vanilla {tv * 1e3:9.1f} ms   p-MoD {tp * 1e3:9.1f} ms   "
          f"(median of {args.repeats}; spread vanilla {min(times['vanilla']) * 1e3:.0f}-{max(times['vanilla']) * 1e3:.0f} ms, "
          f"p-MoD {min(times['pmod']) * 1e3:.0f}-{max(times['pmod']) * 1e3:.0f} ms)")
    print(f"latency ratio            {lat:.3f}")
    print(f"FLOPs ratio (causal attn, what the kernel runs) {fp_c / fv_c:.3f}   -> latency/FLOPs = {lat / (fp_c / fv_c):.3f}  (target <= 1.10)")
    print(f"FLOPs ratio (full attn)                         {fp_f / fv_f:.3f}   -> latency/FLOPs = {lat / (fp_f / fv_f):.3f}")
    print("paper (A6000, LLaVA-NeXT-7B): 0.709 / 0.556 = 1.28")
    return 0


if __name__ == "__main__":
    sys.exit(main())
