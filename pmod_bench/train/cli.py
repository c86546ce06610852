"""``pmod-bench train``: one stage of the paper's LLaVA recipe with p-MoD, on one process or many.

    pmod-bench train --config pmod-llava-next-7b-sft data.json=D.json data.image_folder=IMGS
    accelerate launch --num_processes 8 -m pmod_bench.cli train --config pmod-llava-next-7b-sft ...
    pmod-bench train --demo                   # generated data + the tiny preset, a minute on a CPU
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a (p-MoD) LLaVA model: a recipe (PT or SFT) on LLaVA conversation data",
        description=(
            "Runs one stage of the paper's two-stage recipe (Table 12) on HF Trainer / accelerate; DeepSpeed ZeRO-2/3 "
            "with train.deepspeed=zero2|zero3. Several processes: `accelerate launch [--num_processes N | --config_file F] "
            "-m pmod_bench.cli train --config ...` (on a machine without GPUs add --multi_gpu: accelerate then starts N CPU "
            "processes on gloo). Re-running a command is idempotent (a finished run changes nothing; anything else "
            "resumes from the newest complete checkpoint). Writes a run directory (run.json, train_log.jsonl, "
            "train_summary.json, checkpoints, the final model loadable with from_pretrained)."
        ),
        epilog=(
            "examples:\n"
            "  pmod-bench train --list-recipes\n"
            "  pmod-bench train --config pmod-llava-next-7b-sft data.json=llava_next.json data.image_folder=imgs\n"
            "  pmod-bench train --config t4-linear train.deepspeed=zero2 output_dir=runs/t4-linear\n"
            "  pmod-bench train --config my_recipe.yaml pmod.shift=0.3 train.lr=1e-5 --print-config\n"
            "  pmod-bench train --demo -o runs/demo\n"
            "keys: pmod-bench train --help-config"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", "-c", metavar="RECIPE", help="a shipped recipe name (see --list-recipes) or a recipe YAML path")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override recipe keys: train.lr=1e-3 pmod.shift=0.3 pmod=null data.max_samples=100 (see --help-config)")
    p.add_argument("--output-dir", "-o", help="run directory (same as output_dir=...)")
    p.add_argument("--list-recipes", action="store_true", help="list the shipped recipes and exit")
    p.add_argument("--help-config", action="store_true", help="print every configuration key with its default and meaning")
    p.add_argument("--print-config", action="store_true", help="print the validated configuration (YAML) and exit")
    p.add_argument("--demo", action="store_true",
                   help="generate a tiny dataset in OUTPUT_DIR/demo_data and train the tiny preset on it (recipe demo-tiny)")
    p.add_argument("--model", metavar="PRESET",
                   help="with --demo: the tiny preset to train (tiny, tiny-llava, tiny-qwen2.5-vl, tiny-llava-onevision); "
                        "its recipe is demo-PRESET when one ships (demo-tiny-qwen2.5-vl, demo-tiny-llava-onevision), else "
                        "demo-tiny with model.source=PRESET")
    p.set_defaults(func=run)


def _list_recipes() -> int:
    from pmod_bench.train.config import list_recipes, load_recipe

    rows = []
    for name in list_recipes():
        try:
            cfg = load_recipe(name)
            desc = f"{cfg.stage:3s}  {cfg.label or ''}"
        except Exception as exc:  # pragma: no cover - every recipe is validated by a test
            desc = f"INVALID: {exc}"
        rows.append((name, desc))
    width = max(len(n) for n, _ in rows)
    for name, desc in rows:
        print(f"{name:{width}s}  {desc}")
    return 0


def _close_process_group() -> None:
    """Close the process group accelerate opened (gloo aborts at exit when one is left open), all ranks together: a rank
    that tears its gloo pairs down while another still finishes its summary can abort ("terminate called without an
    active exception", seen on 2-process CPU runs), so they meet at a barrier first."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _leave_without_finalizers() -> None:
    """End a non-main rank of a multi-process launch once its work is done and its process group is closed.

    Its share of the run directory is written and flushed; what is left is the interpreter's teardown, in which gloo /
    DeepSpeed native threads intermittently abort the process ("terminate called without an active exception",
    SIGABRT: about 1 run in 6 of the 2-process CPU tests on a loaded machine), and the launcher then reports a completed
    run as failed. The main rank exits normally (it releases the run lock and prints the summary)."""
    import logging

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


def _demo_overrides(recipe: str, overrides: list, given_overrides: list) -> list:
    """``--demo``: the generated dataset in OUTPUT_DIR/demo_data (written once the output directory is checked), and
    with several processes a per-device batch that splits the demo's global batch."""
    from pathlib import Path

    from pmod_bench.outputs import output_errors
    from pmod_bench.train.config import load_recipe, valid_per_device_batch
    from pmod_bench.train.demo import make_demo_dataset
    from pmod_bench.train.trainer import check_run_dir

    first = load_recipe(recipe, overrides)
    check_run_dir(Path(first.output_dir))  # before the demo data goes in
    data_dir = Path(first.output_dir) / "demo_data"
    data_json = data_dir / "data.json"
    if not data_json.exists():  # every process may write it: same content, atomic files
        with output_errors("output_dir", first.output_dir):
            make_demo_dataset(data_dir)
    overrides = [f"data.json={data_json}", f"data.image_folder={data_dir}", *overrides]
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    given = any(o.split("=", 1)[0].strip() == "train.per_device_batch_size" for o in given_overrides)
    if world > 1 and not given:  # the demo's global batch split over the processes
        b = valid_per_device_batch(first.train.global_batch_size, world, first.train.per_device_batch_size)
        if b is not None and b != first.train.per_device_batch_size:
            overrides.append(f"train.per_device_batch_size={b}")
            if int(os.environ.get("RANK", "0") or 0) == 0:
                print(f"pmod-bench train --demo: {world} processes, train.per_device_batch_size={b} "
                      f"(global batch {first.train.global_batch_size})", file=sys.stderr)
    return overrides


def _recipe_and_overrides(args: argparse.Namespace) -> tuple:
    """(recipe, overrides) of the command line; ``--demo --model PRESET`` picks the preset's demo recipe."""
    from pmod_bench.cli import UserError
    from pmod_bench.train.config import list_recipes

    overrides = list(args.overrides)
    if not args.model:
        return args.config or "demo-tiny", overrides
    if not args.demo:
        raise UserError(f"--model is for --demo; for a recipe pass model.source={args.model}")
    from pmod_bench.model.presets import PRESETS

    tiny = [p for p in PRESETS if p.startswith("tiny")]
    if args.model not in tiny:
        raise UserError(f"--model {args.model!r}: --demo trains a tiny preset; use one of {', '.join(tiny)}")
    if f"demo-{args.model}" in list_recipes() and not args.config:
        return f"demo-{args.model}", overrides
    return args.config or "demo-tiny", [f"model.source={args.model}", *overrides]


def run(args: argparse.Namespace) -> int:
    import contextlib

    from pmod_bench.cli import UserError
    from pmod_bench.rundir import run_lock
    from pmod_bench.train.config import ConfigError, describe_keys, load_recipe

    if args.list_recipes:
        return _list_recipes()
    if args.help_config:
        print(describe_keys())
        return 0
    if not args.config and not args.demo:
        raise UserError("pass --config RECIPE (a shipped recipe name or a YAML path; see --list-recipes), or --demo")
    recipe, overrides = _recipe_and_overrides(args)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    command = "pmod-bench train " + " ".join(
        shlex.quote(a) for a in ([f"--config={args.config}"] if args.config else []) + (["--demo"] if args.demo else [])
        + ([f"--model={args.model}"] if args.model else [])
        + list(args.overrides) + ([f"--output-dir={args.output_dir}"] if args.output_dir else [])
    )
    try:
        output_dir = load_recipe(recipe, overrides).output_dir
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    # the main process owns output_dir (--demo's data included) until the run ends; the other processes of the same
    # launch write only what the trainer gives each of them; --print-config trains nothing
    main_process = int(os.environ.get("RANK", "0") or 0) == 0
    owner = run_lock(output_dir, command=command, option="output_dir") if main_process and not args.print_config \
        else contextlib.nullcontext()
    with owner:
        return _run_owned(args, recipe, overrides, command)


def _run_owned(args: argparse.Namespace, recipe: str, overrides: list, command: str) -> int:
    """The training of ``run`` once its output_dir is owned: --demo's data, the config, the run, its summary line."""
    from pmod_bench.cli import UserError
    from pmod_bench.train.config import ConfigError, load_recipe

    try:
        if args.demo:
            overrides = _demo_overrides(recipe, overrides, args.overrides)
        cfg = load_recipe(recipe, overrides)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None).rstrip())
        return 0

    from pmod_bench.model.plan import PMoDOverflowError
    from pmod_bench.outputs import output_errors
    from pmod_bench.train.data import BadSampleError
    from pmod_bench.train.trainer import train

    resume = "free disk space and run the same command again: it resumes from the last complete checkpoint"
    try:
        with output_errors("output_dir", cfg.output_dir, disk_full_fix=resume):
            summary = train(cfg, command=command)
        _close_process_group()
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    except BadSampleError as exc:
        raise UserError(f"{exc}. Fix the data, or set data.on_bad_sample=skip to skip and count such records.") from None
    except PMoDOverflowError as exc:
        print(f"pmod-bench train: OVERFLOW at {exc}\n  (recorded in {cfg.output_dir}/train_summary.json)", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", "0") or 0) != 0:
        _leave_without_finalizers()
    if summary.get("unchanged"):
        print(f"{summary.get('status')}: {summary['note']} -> {summary.get('output_dir', cfg.output_dir)}")
        return 0
    loss = summary["final_loss"]
    print(
        f"{summary['status']}: {summary['steps']}/{summary['max_steps']} steps, final loss "
        f"{'n/a' if loss is None else f'{loss:.4f}'}, {summary['gpu_hours']:.4f} GPU-hours, "
        f"{summary['bad_samples']} bad samples -> {summary['output_dir']}"
    )
    return 0

