"""``pmod-bench convert SRC DST``: original LLaVA / p-MoD checkpoint -> this project's HF format."""

from __future__ import annotations

import argparse
import contextlib

EPILOG = """examples:
  pmod-bench convert /ckpt/p-MoD-LLaVA-NeXT-7B /models/pmod-llava-next-7b
  pmod-bench convert MCG-NJU/p-MoD-LLaVA-v1.5-7B /models/pmod-llava-1.5-7b --cache-dir /data/hf-hub
  pmod-bench convert /ckpt/llava-v1.5-7b /models/llava-1.5-7b --vision-tower /ckpt/clip-vit-large-patch14-336
then: AutoModelForImageTextToText.from_pretrained(DST) after `pmod_bench.register()`, or load_model(DST).
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert an original LLaVA / p-MoD checkpoint (released weights) into the HF format",
        description=(
            "Convert a checkpoint saved by the original LLaVA / p-MoD code (config.json with mm_vision_tower and "
            "mod_* fields, model.layers.N.decoder_layer.* / router.router.* weights) into a directory that "
            "AutoModelForImageTextToText and AutoProcessor load after `import pmod_bench`, with the same numerics."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="original-layout checkpoint: a local directory or a hub id ORG/NAME")
    p.add_argument("dst", metavar="DST", help="output directory (written to a temporary sibling, then renamed)")
    p.add_argument("--vision-tower", default=None, metavar="DIR",
                   help="local CLIP directory to use when SRC does not contain the vision tower's weights "
                        "(default: config.json's mm_vision_tower, a path or hub id)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="store the weights in this dtype (default: the checkpoint's own)")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="HF hub cache for hub ids (default HF_HUB_CACHE)")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST when it holds an earlier conversion, and nothing else (its .pmod_convert_manifest.json "
                        "lists every file in it); SRC and DST may never contain one another")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from pmod_bench.cli import UserError
    from pmod_bench.model.convert import ConversionError, conversion_info, convert_checkpoint
    from pmod_bench.model.sources import ModelSourceError

    try:
        with _terminate_as_exit():
            dst = convert_checkpoint(
                args.src, args.dst, vision_tower=args.vision_tower, dtype=args.dtype, overwrite=args.overwrite,
                cache_dir=args.cache_dir, max_shard_size=args.max_shard_size,
            )
    except (ConversionError, ModelSourceError) as exc:
        raise UserError(str(exc)) from exc
    info = conversion_info(dst) or {}
    summary = {k: info.get(k) for k in ("kind", "router_layers", "layer_ratios", "image_token_id", "vocab_size", "dtype", "notes")}
    print(f"converted {args.src} -> {dst}")
    print(json.dumps(summary, indent=1, default=str))
    return 0


@contextlib.contextmanager
def _terminate_as_exit():
    """SIGTERM (a job scheduler's stop) raises SystemExit here, so the conversion's clean-up runs: its temporary
    sibling is removed and DST is left as it was (only SIGKILL skips that)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
