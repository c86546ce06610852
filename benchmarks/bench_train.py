"""Training cost, measured: one optimizer step (forward + backward + AdamW) of p-MoD vs the baseline.

    python benchmarks/bench_train.py                       # CPU, a wide LLaVA-1.5-shaped model (32 layers)
    python benchmarks/bench_train.py --arch llava-1.5-7b --device cuda --dtype bfloat16 --batch 1
    python benchmarks/bench_train.py --json runs/bench_train.json

The same random-weight model and the same synthetic batch for both: the baseline is the vanilla HF
LLaVA, the p-MoD model is ``to_pmod`` of it (it shares every weight; only the routers are extra), and
one AdamW holds the parameters of both. The steps are interleaved (baseline, p-MoD, p-MoD, baseline,
...) so a change of machine load hits both alike; the medians are compared. Beside the measured ratio
the analytic ratio of training FLOPs per sample (the profiler's :func:`train_flops`: forward + backward,
2 FLOPs per multiply-add, attention counted full, vision tower frozen = forward only) of the same
shapes. The profiler's GPU-hour estimate is calibrated on the paper's Table 7; this is a measurement.

Trained as in SFT: connector + LLM + routers; the vision tower is frozen (paper App. D.1).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def _arch(args):
    """The profiler's Arch of the benchmarked model (a preset, or the tiny-llava preset widened)."""
    from pmod_bench.model.presets import preset_config
    from pmod_bench.profiler.arch import arch_from_config, load_arch

    if args.arch:
        return load_arch(args.arch)
    cfg = preset_config("tiny-llava")
    t, v = cfg.text_config, cfg.vision_config
    t.num_hidden_layers, t.hidden_size, t.intermediate_size = args.layers, args.hidden, args.intermediate
    t.num_attention_heads = t.num_key_value_heads = args.heads
    t.head_dim = args.hidden // args.heads
    v.image_size, v.patch_size = args.image, args.patch
    v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads = 64, 128, 2, 2
    cfg.image_seq_length = (args.image // args.patch) ** 2
    return arch_from_config(f"bench-{args.layers}x{args.hidden}", cfg)


def analytic_ratio(arch, shift: float, image: tuple, text_tokens: int) -> tuple:
    """(baseline, p-MoD) training TFLOPs per sample and their ratio, from the profiler's analytic count."""
    from pmod_bench.profiler.core import Scenario, profile
    from pmod_bench.profiler.training import get_recipe

    recipe = get_recipe("llava-1.5-sft", text_tokens=text_tokens, image_size=image)

    rows = profile(arch, ["baseline", f"p-MoD-{shift:g}"], scenarios=[Scenario(image_size=image, text_tokens=text_tokens)],
                   latency=False, verify=False, recipe=recipe)
    base, pmod = (r.train_tflops_per_sample for r in rows)
    return base, pmod, pmod / base


def measure(arch, shift: float, batch_size: int, text_tokens: int, repeats: int, warmup: int, device: str, dtype: str,
            image=None):
    """Median step seconds {baseline, p-MoD}, interleaved; ``image`` (width, height) defaults to one tile's square."""
    import torch

    from pmod_bench.profiler.models import Sample, random_model, synthetic_batch
    from pmod_bench.profiler.core import resolve_variants

    dt = getattr(torch, dtype)
    base_v, pmod_v = resolve_variants(arch, ["baseline", f"p-MoD-{shift:g}"])
    base, _ = random_model(arch, base_v, device=device, dtype=dt)
    pmod, _ = random_model(arch, pmod_v, device=device, dtype=dt, base=base)  # shares base's weights
    models = {"baseline": base, "p-MoD": pmod}
    for m in models.values():
        m.train()
        for n, p in m.named_parameters():
            p.requires_grad_(not n.startswith("model.vision_tower."))
    params = {id(p): p for m in models.values() for p in m.parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(params.values()), lr=1e-5)
    image = image or (arch.vision.image_size, arch.vision.image_size)
    batch = synthetic_batch(arch, [Sample(image, text_tokens)] * batch_size, device=device, dtype=dt)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == arch.image_token_id, -100)
    labels = labels.masked_fill(batch["attention_mask"] == 0, -100)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def step(model) -> float:
        sync()
        t0 = time.perf_counter()
        loss = model(**batch, labels=labels, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} in the benchmark step")
        return time.perf_counter() - t0

    times: dict = {k: [] for k in models}
    for r in range(warmup + repeats):
        order = list(models) if r % 2 == 0 else list(models)[::-1]
        for name in order:
            s = step(models[name])
            if r >= warmup:
                times[name].append(s)
    return {k: statistics.median(v) for k, v in times.items()}, times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", help="a preset or HF config dir instead of the widened tiny model (e.g. llava-1.5-7b on a GPU)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--image", type=int, default=96, help="image side (px); vision tokens = (image / patch)^2")
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--shift", type=float, default=0.5, help="PRD shift factor delta")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, help="torch threads on CPU")
    p.add_argument("--json", help="also write the result here (atomically)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.batch < 1:
        print("bench_train: --repeats and --batch must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_train: --device cuda but no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    arch = _arch(args)
    image = (arch.vision.image_size, arch.vision.image_size)
    base_tf, pmod_tf, flops_ratio = analytic_ratio(arch, args.shift, image, args.text_tokens)
    med, times = measure(arch, args.shift, args.batch, args.text_tokens, args.repeats, args.warmup, args.device, args.dtype)
    ratio = med["p-MoD"] / med["baseline"]
    V = (arch.vision.image_size // arch.vision.patch_size) ** 2
    print(f"bench_train: {arch.name} ({arch.text.layers} layers, hidden {arch.text.hidden}), {V} vision + "
          f"{args.text_tokens} text tokens, batch {args.batch}, {args.device} {args.dtype}, "
          f"{args.repeats} interleaved repeats (+{args.warmup} warm-up)")
    print(f"  {'':10s} {'step s (median)':>16s} {'train TFLOPs/sample':>20s}")
    print(f"  {'baseline':10s} {med['baseline']:16.3f} {base_tf:20.4f}")
    print(f"  {'p-MoD':10s} {med['p-MoD']:16.3f} {pmod_tf:20.4f}")
    print(f"  p-MoD / baseline: step time {ratio:.3f} (measured), training FLOPs {flops_ratio:.3f} (analytic); "
          f"delta {args.shift:g}; the paper's GPU-hours ratio is 0.777 (435 / 560, 8x A6000, ZeRO-3)")
    if args.json:
        from pmod_bench.atomic import atomic_write_json

        atomic_write_json(Path(args.json), {
            "arch": arch.name, "layers": arch.text.layers, "hidden": arch.text.hidden, "vision_tokens": V,
            "text_tokens": args.text_tokens, "batch": args.batch, "device": args.device, "dtype": args.dtype,
            "shift": args.shift, "step_s_median": med, "step_s": times, "step_time_ratio": ratio,
            "train_tflops_per_sample": {"baseline": base_tf, "p-MoD": pmod_tf}, "train_flops_ratio": flops_ratio})
    return 0


if __name__ == "__main__":
    sys.exit(main())
