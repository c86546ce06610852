"""Prefill latency of p-MoD vs the vanilla model, beside the analytic FLOPs ratio of the same shapes.

    python benchmarks/bench_prefill.py                      # CPU defaults: hidden 512, 32 layers
    python benchmarks/bench_prefill.py --host qwen2.5-vl    # the same on Qwen2.5-VL's LLM (M-RoPE positions)
    python benchmarks/bench_prefill.py --hidden 4096 --intermediate 11008 --heads 32 --device cuda --dtype bfloat16

LLaVA-NeXT-shaped input: 2,880 vision tokens + 60 text tokens, 32 decoder layers (Vicuna layout),
hidden size as large as the machine allows (benchmarks/common.py). Both models share the same weights
(``to_pmod``), the p-MoD routers are randomised as after training, and both are measured in the same
run (interleaved repeats, median, spread shown). Printed: latency ratio, the analytic FLOPs ratio
(``pmod_bench.profiler.flops.llm_prefill_flops``, the profiler's own formula) and their quotient
(target <= 1.10; the paper's A6000 figure is 0.709 / 0.556 = 1.28). On a GPU also the achieved
TFLOP/s and the MFU against the detected GPU's dense BF16 peak.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from common import HOSTS, add_model_args, analytic, build_pair, llava_inputs, mrope_positions, spread, sync


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, hosts=tuple(HOSTS))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    import torch

    vanilla, pmod = build_pair(args)
    embeds, vision = llava_inputs(args)
    extra = {"position_ids": mrope_positions(args)} if HOSTS[args.host] == "qwen2_5_vl" else {}

    def run(model):
        with torch.no_grad():
            if model is pmod:
                model(inputs_embeds=embeds, vision_token_mask=vision, use_cache=True, logits_to_keep=1, **extra)
            else:
                model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1, **extra)
        sync(args.device)

    for m in (vanilla, pmod):  # warm-up
        run(m)
    times = {"vanilla": [], "pmod": []}
    for _ in range(args.repeats):
        for name, m in (("vanilla", vanilla), ("pmod", pmod)):
            t0 = time.perf_counter()
            run(m)
            times[name].append(time.perf_counter() - t0)
    tv, tp = statistics.median(times["vanilla"]), statistics.median(times["pmod"])
    lat = tp / tv
    flops = {(name, causal): analytic(m, args, causal) for name, m in (("vanilla", vanilla), ("pmod", pmod)) for causal in (True, False)}
    fc = flops[("pmod", True)] / flops[("vanilla", True)]
    ff = flops[("pmod", False)] / flops[("vanilla", False)]
    print(f"host: {args.host} ({type(pmod).__name__})")
    print(f"shape: {args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}, {args.vision_tokens} vision + "
          f"{args.text_tokens} text tokens, {args.device} {args.dtype} {args.attn}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, p-MoD delta={args.shift}")
    print(f"prefill latency  vanilla {spread(times['vanilla'])}   p-MoD {spread(times['pmod'])}   ({args.repeats} interleaved repeats)")
    print(f"latency ratio            {lat:.3f}")
    print(f"FLOPs ratio (causal attn, what the kernel runs) {fc:.3f}   -> latency/FLOPs = {lat / fc:.3f}  (target <= 1.10)")
    print(f"FLOPs ratio (full attn)                         {ff:.3f}   -> latency/FLOPs = {lat / ff:.3f}")
    if args.device.startswith("cuda"):
        from pmod_bench.profiler.hardware import detect_hardware

        hw = detect_hardware(torch.cuda.get_device_name())
        for name, t in (("vanilla", tv), ("pmod", tp)):
            achieved = flops[(name, True)] / t / 1e12
            mfu = f", MFU {achieved / hw.bf16_tflops:.1%} of {hw.name}'s {hw.bf16_tflops:g} TFLOP/s" if hw else ""
            print(f"{name:8s} achieved {achieved:.1f} TFLOP/s (causal count){mfu}")
    print("paper (A6000, LLaVA-NeXT-7B): 0.709 / 0.556 = 1.28")
    return 0


if __name__ == "__main__":
    sys.exit(main())
