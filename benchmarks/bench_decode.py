"""Decode throughput (tokens/s) of p-MoD vs the vanilla model, at batch 1 and 8, in one run.

    python benchmarks/bench_decode.py                       # CPU defaults: hidden 512, 32 layers
    python benchmarks/bench_decode.py --hidden 4096 --intermediate 11008 --heads 32 --device cuda --dtype bfloat16

The LLaVA-NeXT-shaped prompt of benchmarks/common.py (2,880 vision + 60 text tokens) is prefilled
once per model and batch size (not timed); then ``--steps`` greedy decode steps run against a copy
of that cache, timed as a whole (interleaved: vanilla and p-MoD alternate repeats, median). p-MoD decodes against
smaller per-layer caches (each layer holds only the tokens it processed), so each step reads less
KV; the printed KV ratio is the entries actually stored in the two caches after the prefill.
"""

from __future__ import annotations

import argparse
import copy
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

    def prefill(model, embeds, vision):
        with torch.no_grad():
            extra = {"vision_token_mask": vision} if model is pmod else {}
            out = model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1, **extra)
        return output_cache(out), out.logits[:, -1:].argmax(-1)

    def decode(model, cache, nxt, n_prompt) -> float:
        cache = copy.deepcopy(cache)  # every repeat decodes from the same prefilled cache
        mask = torch.ones(nxt.shape[0], n_prompt + 1, dtype=torch.long, device=nxt.device)
        with torch.no_grad():
            sync(args.device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                out = model(input_ids=nxt, attention_mask=mask, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
                cache = output_cache(out)
                nxt = out.logits[:, -1:].argmax(-1)
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            sync(args.device)
        return time.perf_counter() - t0

    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        embeds, vision = llava_inputs(args, batch=bs, seed=bs)
        state = {key: prefill(m, embeds, vision) for key, m in (("v", vanilla), ("p", pmod))}  # not timed
        kv = {key: sum(kv_cache_entries(c)) for key, (c, _) in state.items()}
        for key, m in (("v", vanilla), ("p", pmod)):  # warm-up
            decode(m, *state[key], embeds.shape[1])
        times = {"v": [], "p": []}
        for _ in range(args.repeats):
            for key, m in (("v", vanilla), ("p", pmod)):
                times[key].append(decode(m, *state[key], embeds.shape[1]))
        tv, tp = statistics.median(times["v"]), statistics.median(times["p"])
        tok = bs * args.steps
        print(f"{bs:>5} {tok / tv:>14.1f} {tok / tp:>12.1f} {tv / tp:>8.2f}x {kv['p'] / kv['v']:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
