"""The training path of a small model, measured: samples/s of ``pmod-bench train`` with and without ``data.cache``.

    python benchmarks/bench_train_data.py                          # toy SFT continuation, 40 steps each way
    python benchmarks/bench_train_data.py --steps 80 --json runs/bench_train_data.json
    python benchmarks/bench_train_data.py --recipe pmod_bench/toy/recipes/toy-sft.yaml --set model.llm=... ...

Runs the real trainer (``pmod_bench.train.train``: HF Trainer, the LLaVA sampler, the run directory) on toy
world conversations (``pmod_bench.toy.data.write_training``) from the shipped toy baseline checkpoint, one CPU
thread, three times over the same data and steps:

    lazy        data.cache=false: every sample built when the loader asks (PIL decode, anyres tiling, tokenising)
    cold cache  data.cache=true, no cache file yet: all samples built first, stored, then trained on
    warm cache  data.cache=true again: the samples loaded from the cache file

(in the order cold, warm, lazy: the lazy run gets the warmed-up process) and reports the training loop's samples/s (the trainer's own count over its wall time) and the wall time of the
whole ``train()`` call (model load, cache build or load, loop, save). The weights of the three runs are compared:
the cache must not change them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def _weights_digest(run_dir: Path) -> str:
    return hashlib.sha256((run_dir / "model.safetensors").read_bytes()).hexdigest()[:16]


def run_once(recipe: str, overrides: list, out: Path) -> dict:
    from pmod_bench.train import load_recipe, train

    cfg = load_recipe(recipe, [*overrides, f"output_dir={out}"])
    t0 = time.perf_counter()
    summary = train(cfg)
    wall = time.perf_counter() - t0
    return {"samples": summary["samples"], "loop_s": summary["wall_s"], "samples_per_s": summary["samples"] / summary["wall_s"],
            "call_s": wall, "weights": _weights_digest(out)}


def main(argv=None) -> int:
    from pmod_bench.toy.pipeline import SHIPPED

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(Path(__file__).resolve().parents[1] / "pmod_bench/toy/recipes/toy-baseline.yaml"))
    p.add_argument("--model", default=str(SHIPPED / "baseline"), help="model.source of the run (default: the shipped toy baseline)")
    p.add_argument("--images", type=int, default=200, help="toy training scenes to generate")
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--set", action="append", default=[], help="extra KEY=VALUE recipe overrides")
    p.add_argument("--work", help="working directory (default: a temporary one)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.images < 1:
        print("bench_train_data: --steps and --images must be >= 1", file=sys.stderr)
        return 2
    import torch

    from pmod_bench.toy.data import write_training

    torch.set_num_threads(1)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-train-data-"))
    os.environ["PMOD_BENCH_CACHE"] = str(work / "cache")  # a cold cache to start from
    data = write_training(work / "data", n_images=args.images, turns=args.turns)
    common = [f"model.source={args.model}", f"data.json={data['sft']}", f"data.image_folder={work / 'data'}",
              f"train.max_steps={args.steps}", "train.save_steps=100000", *args.set]
    results = {}
    # the lazy run last: it gets the warmed-up process (imports, allocator), so the comparison favours it
    for name, extra in (("cold cache", ["data.cache=true"]), ("warm cache", ["data.cache=true"]), ("lazy", ["data.cache=false"])):
        results[name] = run_once(args.recipe, [*common, *extra], work / name.replace(" ", "-"))
    print(f"bench_train_data: {args.steps} steps of {Path(args.recipe).name} on {args.images} toy scenes x {args.turns} turns, "
          f"1 CPU thread ({args.model})")
    print(f"  {'':12s} {'samples/s (loop)':>17s} {'train() s':>10s}  weights")
    for name, r in results.items():
        print(f"  {name:12s} {r['samples_per_s']:17.1f} {r['call_s']:10.1f}  {r['weights']}")
    same = len({r["weights"] for r in results.values()}) == 1
    print(f"  speed-up of the loop (warm cache / lazy): {results['warm cache']['samples_per_s'] / results['lazy']['samples_per_s']:.2f}x; "
          f"weights {'identical' if same else 'DIFFER'}")
    if args.json:
        from pmod_bench.atomic import atomic_write_json

        atomic_write_json(Path(args.json), {"recipe": args.recipe, "steps": args.steps, "images": args.images,
                                            "turns": args.turns, "runs": results, "same_weights": same})
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
