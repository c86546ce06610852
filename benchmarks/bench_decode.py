"""Decode throughput (tokens/s) of p-MoD vs the vanilla model, at batch 1 and 8, in one run.

    python benchmarks/bench_decode.py                       # CPU defaults: hidden 512, 32 layers
    python benchmarks/bench_decode.py --hidden 4096 --intermediate 11008 --heads 32 --device cuda --dtype bfloat16

The LLaVA-NeXT-shaped prompt of benchmarks/common.py (2,880 vision + 60 text tokens) is prefilled
once per model and batch size (not timed); then ``--steps`` greedy decode steps run against the
cache, timed per step (interleaved: vanilla and p-MoD alternate repeats). p-MoD decodes against
smaller per-layer caches (each layer holds only the tokens it processed), so each step reads less
KV; the printed KV ratio is the entries actually stored in the two caches after the prefill.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from common import add_model_args, build_pair, llava_inputs, sync


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import torch

    from pmod_bench.model.cache import kv_cache_entries, output_cache
    from pmod_bench.model.compat import cache_kwargs

    vanilla, pmod = build_pair(args)
    print(f"shape: {args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}, {args.vision_tokens} vision + "
          f"{args.text_tokens} text tokens, {args.device} {args.dtype} {args.attn}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, p-MoD delta={args.shift}, {args.steps} decode steps")
    print(f"{'batch':>5} {'vanilla tok/s':>14} {'p-MoD tok/s':>12} {'speed-up':>9} {'KV ratio':>9}")

    def decode(model, embeds, vision) -> tuple[float, int]:
        with torch.no_grad():
            extra = {"vision_token_mask": vision} if model is pmod else {}
            out = model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1, **extra)
            cache = output_cache(out)
            entries = sum(kv_cache_entries(cache))
            nxt = out.logits[:, -1:].argmax(-1)
            mask = torch.ones(embeds.shape[0], embeds.shape[1] + 1, dtype=torch.long, device=embeds.device)
            sync(args.device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                out = model(input_ids=nxt, attention_mask=mask, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
                cache = output_cache(out)
                nxt = out.logits[:, -1:].argmax(-1)
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            sync(args.device)
            return time.perf_counter() - t0, entries

    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        embeds, vision = llava_inputs(args, batch=bs, seed=bs)
        for m in (vanilla, pmod):  # warm-up
            decode(m, embeds[:, : args.text_tokens + 8], vision[:, : args.text_tokens + 8])
        times, kv = {"v": [], "p": []}, {}
        for _ in range(args.repeats):
            for key, m in (("v", vanilla), ("p", pmod)):
                t, kv[key] = decode(m, embeds, vision)
                times[key].append(t)
        tv, tp = statistics.median(times["v"]), statistics.median(times["p"])
        tok = bs * args.steps
        print(f"{bs:>5} {tok / tv:>14.1f} {tok / tp:>12.1f} {tv / tp:>8.2f}x {kv['p'] / kv['v']:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
