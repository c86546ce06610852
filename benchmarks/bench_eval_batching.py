"""Evaluation throughput of the pmod_llava lmms-eval model at batch size 1 vs 8 (same model, same answers).

    python benchmarks/bench_eval_batching.py                          # tiny p-MoD model, 32 requests, CPU
    python benchmarks/bench_eval_batching.py --hidden 256 --layers 8  # the tiny architecture scaled up
    python benchmarks/bench_eval_batching.py --device cuda --requests 256 --batch-sizes 1,8,32

What is timed is lmms-eval's request path of the model, ``PMoDLlava.generate_until`` (length sort
with ``lmms_eval.utils.Collator``, prompt building, processor, left-padded ``generate``, decoding,
stop-string cut), on POPE-style requests built from fixture images of varying size (anyres tile
counts differ, so batches are padded as in a real run). Every batch size must give the same
answers as batch size 1 (checked). Printed: samples/s per batch size and the ratio to batch size 1
(target >= 2x at batch size 8). One warm-up batch is run first. Two models are measured: p-MoD with
zero routers (as at insertion: every router weight ties, so selection rests on the tie-break by
position) and with randomised routers (as after training); both must answer identically at every
batch size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def build_model(hidden: int, layers: int, heads: int, intermediate: int, routers: str = "random"):
    """The tiny preset (CLIP 32 px tiles, anyres, Vicuna template) with a resized language model."""
    from transformers import AutoModelForImageTextToText

    from pmod_bench import PMoDConfig
    from pmod_bench.model import modeling  # noqa: F401  (registers the p-MoD classes with the Auto classes)
    from pmod_bench.model.presets import preset_config, preset_processor, random_routers

    cfg = preset_config("tiny", PMoDConfig())
    t = cfg.text_config
    if (hidden, layers, heads, intermediate) != (t.hidden_size, t.num_hidden_layers, t.num_attention_heads,
                                                 t.intermediate_size):
        text = dict(t.to_dict(), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                    num_key_value_heads=max(1, heads // 2), intermediate_size=intermediate, head_dim=hidden // heads)
        text.pop("model_type", None)
        d = cfg.to_dict()
        d["text_config"] = dict(text, model_type="llama")
        for key in ("model_type", "architectures", "transformers_version", "pmod_router_layers"):
            d.pop(key, None)
        cfg = type(cfg)(**d)
    import torch

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg).eval()
    if routers == "random":  # as after training; "zero": as at insertion (every weight ties at 1)
        random_routers(model)
    return model, preset_processor("tiny")


def requests(n: int):
    from lmms_eval.api.instance import Instance

    from pmod_bench.tasks.fixtures import image

    objects = ["disc", "box", "dog", "car", "person", "chair", "cup", "tree"]
    docs = [{"q": f"Is there a {objects[i % 8]} in the image?" + " Look carefully." * (i % 3),
             "img": image(i, 40 + 8 * (i % 6), 32 + 8 * (i % 4))} for i in range(n)]
    gen = {"max_new_tokens": 16, "until": ["\n\n"], "temperature": 0, "do_sample": False}
    reqs = [Instance(request_type="generate_until", arguments=(d["q"], dict(gen), lambda d: [d["img"]], i, "bench", "test"),
                     idx=0, metadata={"task": "bench", "doc_id": i, "repeats": 1}) for i, d in enumerate(docs)]
    return {"bench": {"test": docs}}, reqs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--hidden", type=int, default=64, help="language model hidden size (tiny: 64)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    ap.add_argument("--routers", default="zero,random", help="router initialisations to measure (zero, random)")
    ap.add_argument("--json", default=None, help="also write the measurements here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from pmod_bench.tasks.plugin import PMoDLlava

    docs, reqs = requests(args.requests)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    report, all_same = {}, True
    for routers in args.routers.split(","):
        model, processor = build_model(args.hidden, args.layers, args.heads, args.intermediate, routers)
        rows, answers = [], {}
        for bs in sizes:
            lm = PMoDLlava.from_loaded(model, processor, name="bench", batch_size=bs, device=args.device)
            lm.task_dict = docs
            lm.generate_until(reqs[:bs])  # warm-up
            start = time.perf_counter()
            answers[bs] = lm.generate_until(reqs)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            rows.append({"batch_size": bs, "requests": len(reqs), "seconds": seconds, "samples_per_s": len(reqs) / seconds})
        base = rows[0]["samples_per_s"]
        n_params = sum(p.numel() for p in model.parameters())
        print(f"pmod_llava generate_until, {routers} routers, {len(reqs)} requests, LM hidden {args.hidden} x {args.layers} "
              f"layers ({n_params / 1e6:.2f} M params), {args.device}, {args.threads} thread(s)")
        print(f"{'batch':>5} {'seconds':>8} {'samples/s':>10} {'vs bs ' + str(sizes[0]):>9}")
        for r in rows:
            r["ratio"] = r["samples_per_s"] / base
            print(f"{r['batch_size']:>5} {r['seconds']:>8.2f} {r['samples_per_s']:>10.2f} {r['ratio']:>8.2f}x")
        same = all(answers[b] == answers[sizes[0]] for b in sizes)
        differing = sum(a != b for b in sizes for a, b in zip(answers[b], answers[sizes[0]]))
        print(f"answers identical across batch sizes: {same} ({differing} of {len(reqs) * len(sizes)} differ)\n")
        report[routers] = {"rows": rows, "same_answers": same, "params": n_params}
        all_same &= same
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"models": report, "args": vars(args)}, fh, indent=2)
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
