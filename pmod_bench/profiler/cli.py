"""The ``pmod-bench profile`` subcommand (argparse only at import time; the work is imported lazily)."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any, Optional

from pmod_bench.model.dtypes import DTYPE_ALIASES, dtype_name

EPILOG = """\
examples:
  pmod-bench profile                                   # LLaVA-NeXT-7B: baseline, p-MoD-0.3/0.4/0.5 beside Table 7
  pmod-bench profile --hardware A6000                  # + roofline floor of the time to first token on an A6000
  pmod-bench profile --arch llava-1.5-7b llava-next-13b --shift 0.5
  pmod-bench profile --shift 0.3 0.4 0.5 0.6 --schedule cosine linear --image-size 672x672 640x480 336x1008
  pmod-bench profile --ratios 1*8,0.5*24 --variant fastv:k=2,keep=0.5 --no-baseline
  pmod-bench profile --arch tiny --batch-size 1 4      # small arch: latency measured on CPU too
  pmod-bench profile --device cuda --repeats 20        # on a GPU: the 7B is built with random bf16 weights and timed
  pmod-bench profile --arch path/to/hf_model_dir --variant config   # a local config.json (no weights needed)
  pmod-bench profile --arch qwen2.5-vl-7b --image-size 1344x1008 --max-pixels 1003520   # Qwen's own resize rule
  pmod-bench profile --arch llava-onevision-7b --image-size 672x672 1344x1008   # anyres_max_9 tiles (LLaVA-OneVision)
  pmod-bench profile --arch llava-next-7b llava-onevision-7b --images 1 4   # four images in one prompt too
  pmod-bench profile --arch qwen2.5-vl-7b llava-onevision-7b --frames 8 16 32 64 --frame-size 640x360 --shift 0.3 0.5
  pmod-bench profile --arch qwen2.5-vl-7b --duration 60 600 --fps 2   # clips read as lmms-eval's qwen2_5_vl reads them
  pmod-bench profile --train-run runs/train-pmod05 --json profile.json --output runs/profile-next

Variants: baseline | p-MoD-0.5 | p-MoD-linear-0.4 | pmod:shift=0.4,schedule=stepped,steps=4 |
ratios:1*8,0.5*24 (one ratio per LLM layer, VALUE*COUNT repeats) | fastv:k=2,keep=0.5 | config (the
config's own p-MoD settings). Conventions: docs in pmod_bench/profiler/flops.py; row keys: docs/RUN_DIRS.md.
"""



def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "profile",
        help="FLOPs, KV cache, latency, memory and training cost of p-MoD and baseline variants",
        description="Profile LLaVA / LLaVA-NeXT / Qwen2.5-VL / LLaVA-OneVision architectures under the baseline, p-MoD at any δ or schedule, explicit "
        "per-layer ratios and comparison methods: FLOPs (analytic, checked with FlopCounterMode), KV cache, latency "
        "(GPU, or small models on CPU), memory, roofline floors and training GPU hours, beside the paper's Table 7.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    w = p.add_argument_group("what to profile")
    w.add_argument("--arch", nargs="+", action="extend", metavar="ARCH",
                   help="preset (llava-next-7b, llava-1.5-7b, llava-next-13b, qwen2.5-vl-3b|7b|32b|72b, "
                   "llava-onevision-0.5b|7b|72b, tiny, tiny-llava, tiny-qwen2.5-vl, tiny-llava-onevision), local HF dir / "
                   "config.json, or hub id (default: llava-next-7b)")
    w.add_argument("--variant", action="append", default=[], metavar="SPEC", help="a variant (repeatable; see below)")
    w.add_argument("--method", action="append", default=[], metavar="SPEC",
                   help="a comparison method (repeatable), NAME or NAME:key=value,...: fastv:k=2,keep=0.5, pyramiddrop, "
                   "sparsevlm, illava, random_llm (inside the LLM); visionzip, fastervlm:keep=0.25, prumerge, prumerge_plus, "
                   "downsample, random (before it); see pmod_bench.methods")
    w.add_argument("--match", metavar="VARIANT", help="solve each --method's token budget to this variant's prefill FLOPs "
                   "(e.g. p-MoD-0.5) on the same arch and image size, within 1%%")
    w.add_argument("--match-tflops", type=float, metavar="X", help="solve each --method to X prefill TFLOPs (--match-convention)")
    w.add_argument("--match-kv", type=float, metavar="Y", help="solve each --method to a vision KV-cache ratio Y (e.g. 0.537)")
    w.add_argument("--match-convention", choices=("headline", "paper"), default="headline",
                   help="FLOPs convention of --match / --match-tflops: headline (prefill_tflops) or paper (prefill_tflops_paper)")
    w.add_argument("--match-tolerance", type=float, default=0.01, metavar="R", help="relative tolerance of --match* (default 0.01)")
    w.add_argument("--shift", nargs="+", type=float, metavar="DELTA", help="p-MoD shift factors δ (sweep)")
    w.add_argument("--schedule", nargs="+", metavar="NAME", help="p-MoD schedules: cosine (PRD), linear, constant, interleaved, stepped")
    w.add_argument("--ratios", action="append", default=[], metavar="R,R,...",
                   help="explicit per-layer retention ratios, one per LLM layer (VALUE*COUNT repeats), repeatable")
    w.add_argument("--no-baseline", action="store_true", help="leave out the baseline row (ratios still refer to it)")
    s = p.add_argument_group("scenario")
    s.add_argument("--image-size", nargs="+", metavar="WxH", help="image sizes in pixels (default: 672x672)")
    s.add_argument("--images", nargs="+", type=int, metavar="N", help="images of that size in one prompt (default: 1): vision "
                   "tokens and vision FLOPs add up, the LLM sees them all; LLaVA-OneVision reads each of several images as "
                   "one tile, as HF does")
    _add_video_arguments(s)
    s.add_argument("--min-pixels", type=int, metavar="N", help="Qwen2.5-VL: least image area after its resize to multiples of "
                   "28 px (default: lmms-eval's 200704 = 256x28x28)")
    s.add_argument("--max-pixels", type=int, metavar="N", help="Qwen2.5-VL: largest image area after the resize (default: "
                   "lmms-eval's 1605632 = 2048x28x28)")
    s.add_argument("--text-tokens", type=int, default=58, metavar="N", help="prompt text tokens (default: %(default)s, the paper's)")
    s.add_argument("--gen-tokens", type=int, default=16, metavar="N", help="generated tokens (default: %(default)s)")
    s.add_argument("--batch-size", nargs="+", type=int, metavar="B", help="batch sizes (default: 1)")
    s.add_argument("--logits", choices=("last", "all"), default="last",
                   help="positions whose logits the prefill computes: last (generation, default) or all")
    m = p.add_argument_group("measurement")
    lat = m.add_mutually_exclusive_group()
    lat.add_argument("--latency", dest="latency", action="store_const", const="on", default="auto",
                     help="time prefill and decode (default: on a GPU, or for small archs on CPU)")
    lat.add_argument("--no-latency", dest="latency", action="store_const", const="off", help="do not time anything")
    m.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    m.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_ALIASES), help="KV-cache bytes, weights and GPU timing dtype (default: bf16)")
    m.add_argument("--warmup", type=int, default=2, metavar="N", help="untimed runs first (default: %(default)s)")
    m.add_argument("--repeats", type=int, default=5, metavar="N", help="timed runs (default: %(default)s)")
    m.add_argument("--hardware", default=None, metavar="NAME",
                   help="A6000, H100-SXM, H100-PCIe, A100-80GB-SXM, ...: roofline floor and MFU (auto-detected on a GPU)")
    m.add_argument("--no-verify", action="store_true", help="skip the FlopCounterMode (meta device) check of the FLOPs")
    t = p.add_argument_group("training cost")
    t.add_argument("--recipe", default="auto", metavar="NAME",
                   help="llava-next-sft, llava-1.5-sft, llava-next-pt, llava-1.5-pt, or none (default: the paper's SFT recipe of the "
                   "architecture's family, for LLMs of 1B+ parameters)")
    t.add_argument("--train-samples", type=int, metavar="N", help="override the recipe's number of samples")
    t.add_argument("--train-text-tokens", type=int, metavar="N", help="override the recipe's mean text tokens per sample")
    t.add_argument("--utilisation", "--mfu", dest="utilisation", type=float, metavar="X",
                   help="override the recipe's effective utilisation of the peak: not a measured MFU; the shipped recipes' "
                   "is fitted, with their overhead, to the paper's LLaVA-NeXT-7B SFT GPU hours (--mfu: its former name)")
    t.add_argument("--overhead-s", type=float, metavar="S",
                   help="override the recipe's GPU-seconds of overhead per sample (the shipped recipes': fitted with the utilisation)")
    t.add_argument("--train-run", metavar="RUN_DIR", help="a `pmod-bench train` run: measured tokens/s -> GPU hours and MFU")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="FILE", help="write the rows as JSON ({\"rows\": [...]})")
    o.add_argument("--output", "-o", metavar="RUN_DIR", help="write a run directory: run.json + profile.json + profile.csv")
    o.add_argument("--label", metavar="TEXT", help="run.json label (e.g. llava-next-7b)")
    o.add_argument("--quiet", "-q", action="store_true", help="do not print the table")
    p.set_defaults(func=run, handler=run)
    return p


def _add_video_arguments(s) -> None:
    """The scenario flags of a video prompt (:mod:`.video`)."""
    s.add_argument("--frames", nargs="+", type=int, metavar="N", help="a video of N frames instead of an image (one row per "
                   "count; Qwen2.5-VL pairs frames, LLaVA-OneVision pools each to 14x14 at 7B): Qwen2.5-VL and LLaVA-OneVision")
    s.add_argument("--frame-size", metavar="WxH", help="the video's frame size in pixels (default: 640x360)")
    s.add_argument("--duration", nargs="+", type=float, metavar="S", help="a clip of S seconds, read as lmms-eval 0.7.3 reads "
                   "it: Qwen2.5-VL at --fps through qwen-vl-utils (each frame sized for the frames read), then at most "
                   "--max-frames kept; LLaVA-OneVision always --max-frames frames")
    s.add_argument("--fps", type=float, metavar="F", help="Qwen2.5-VL: frames per second read of a --duration clip (default: "
                   "qwen-vl-utils' 2.0)")
    s.add_argument("--max-frames", "--max-num-frames", dest="max_frames", type=int, metavar="N",
                   help="frames lmms-eval keeps of a --duration clip (default: its max_num_frames / max_frames_num, 32; "
                   "--max-num-frames is the same flag under pmod-bench eval's name)")


def _command(args: argparse.Namespace) -> str:
    parts = ["pmod-bench", "profile"]
    flags = [
        ("arch", "--arch"), ("variant", "--variant"), ("method", "--method"), ("match", "--match"),
        ("match_tflops", "--match-tflops"), ("match_kv", "--match-kv"), ("shift", "--shift"), ("schedule", "--schedule"), ("ratios", "--ratios"),
        ("image_size", "--image-size"), ("images", "--images"), ("frames", "--frames"), ("frame_size", "--frame-size"),
        ("duration", "--duration"), ("fps", "--fps"), ("max_frames", "--max-frames"), ("min_pixels", "--min-pixels"), ("max_pixels", "--max-pixels"), ("batch_size", "--batch-size"), ("device", "--device"), ("hardware", "--hardware"),
        ("train_samples", "--train-samples"), ("train_text_tokens", "--train-text-tokens"), ("utilisation", "--utilisation"),
        ("overhead_s", "--overhead-s"), ("train_run", "--train-run"), ("json", "--json"), ("output", "--output"), ("label", "--label"),
    ]
    for dest, flag in flags:
        value = getattr(args, dest, None)
        if value in (None, [], ""):
            continue
        if dest in ("variant", "ratios", "method"):
            for v in value:
                parts += [flag, str(v)]
        elif isinstance(value, list):
            parts += [flag] + [str(v) for v in value]
        else:
            parts += [flag, str(value)]
    defaults = {"text_tokens": 58, "gen_tokens": 16, "logits": "last", "dtype": "bf16", "warmup": 2, "repeats": 5, "recipe": "auto"}
    for dest, default in defaults.items():
        value = getattr(args, dest, default)
        if value != default:
            parts += ["--" + dest.replace("_", "-"), str(value)]
    if args.latency != "auto":
        parts.append("--latency" if args.latency == "on" else "--no-latency")
    for dest in ("no_baseline", "no_verify"):
        if getattr(args, dest, False):
            parts.append("--" + dest.replace("_", "-"))
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    """Handler of ``pmod-bench profile``: 0 on success; bad input raises UserError (exit 2)."""
    from pmod_bench.cli import UserError

    from .errors import ProfileError

    try:
        return _run(args)
    except ProfileError as exc:
        raise UserError(str(exc)) from None


def _variants(args: argparse.Namespace) -> Optional[list[Any]]:
    from .variants import Baseline, PMoD, make_pmod_config, parse_ratios, parse_variant

    explicit = bool(args.variant or args.shift or args.schedule or args.ratios or getattr(args, "method", None))
    if not explicit:
        if args.no_baseline:
            from .variants import PAPER_SHIFTS

            return [PMoD(make_pmod_config(shift=s)) for s in PAPER_SHIFTS]
        return None  # the default set
    out: list[Any] = [] if args.no_baseline else [Baseline()]
    if args.shift or args.schedule:
        for schedule in args.schedule or ["cosine"]:
            for shift in args.shift or [0.5]:
                out.append(PMoD(make_pmod_config(shift=shift, schedule=schedule)))
    for r in args.ratios:
        out.append(PMoD(make_pmod_config(ratios=parse_ratios(r))))
    match = _match(args)
    for spec in getattr(args, "method", []):
        v = parse_variant(spec)
        if match and v.is_method:
            v.match = match
        elif match:
            from .errors import ProfileError

            raise ProfileError(f"--match solves a registry method's token budget; '{spec}' has none (use its own options).")
        out.append(v)
    for spec in args.variant:
        v = spec if spec.strip().lower() == "config" else parse_variant(spec)
        if isinstance(v, Baseline) and not args.no_baseline:
            continue  # already there
        out.append(v)
    if not out:
        from .errors import ProfileError

        raise ProfileError("nothing to profile: --no-baseline and no variant; add --shift, --ratios or --variant.")
    return out


def _match(args: argparse.Namespace) -> Optional[dict]:
    """--match / --match-tflops / --match-kv -> keyword arguments of pmod_bench.methods.solve (None: no target)."""
    targets = {"match": getattr(args, "match", None), "tflops": getattr(args, "match_tflops", None),
               "kv": getattr(args, "match_kv", None)}
    given = {k: v for k, v in targets.items() if v is not None}
    if not given:
        return None
    if len(given) > 1:
        from .errors import ProfileError

        raise ProfileError("give one of --match, --match-tflops, --match-kv.")
    return {**given, "convention": args.match_convention, "tolerance": args.match_tolerance}


def _run(args: argparse.Namespace) -> int:
    import contextlib
    import time

    from .errors import ProfileError

    t0 = time.perf_counter()
    from pmod_bench.rundir import run_lock

    from .arch import parse_image_size
    from .core import scenarios_from
    from .render import format_table

    _check_outputs(args)
    archs = args.arch or ["llava-next-7b"]
    videos = _videos(args)
    if videos:
        sizes = [parse_image_size(args.frame_size or "640x360")]
    else:
        sizes = [parse_image_size(s) for s in (args.image_size or ["672x672"])]
    batches = args.batch_size or [1]
    for name, value, low in (("--batch-size", min(batches), 1), ("--text-tokens", args.text_tokens, 0),
                             ("--gen-tokens", args.gen_tokens, 1), ("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0)):
        if value < low:
            raise ProfileError(f"{name} must be >= {low}, got {value}.")
    if args.utilisation is not None and not 0 < args.utilisation <= 1:
        raise ProfileError(f"--utilisation must be in (0, 1], got {args.utilisation}.")
    device = args.device
    if device and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ProfileError(f"--device {device}: CUDA is not available on this machine; use --device cpu (or run on a GPU).")
    elif device and device != "cpu":
        raise ProfileError(f"--device {device}: expected cpu, cuda or cuda:N.")
    scenarios = scenarios_from(sizes, batches, args.text_tokens, args.gen_tokens, args.logits, args.images or [1], videos or [None])
    variants = _variants(args)

    command = _command(args)
    # --output: this process owns the run directory from before the first row is measured to its last file
    owner = run_lock(args.output, command=command, error=ProfileError) if args.output else contextlib.nullcontext()
    with owner:
        if args.output:
            _check_owner(args)  # as its owner: no other pmod-bench command can write there meanwhile
        rows = _profile_rows(args, archs, scenarios, variants, device)
        if not args.quiet:
            print(format_table(rows), end="")
        _write_outputs(args, rows, command)
    if not args.quiet:
        print(f"profiled {len(rows)} row(s) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def _profile_rows(args: argparse.Namespace, archs: list, scenarios: list, variants: Optional[list], device: Optional[str]) -> list:
    """Every row: each of ``archs`` under each variant and scenario."""
    from .arch import load_arch
    from .core import profile
    from .training import default_recipe, get_recipe

    rows = []
    args.hosts = {}  # row arch -> its host family (run.json `hosts`, docs/RUN_DIRS.md)
    for arch_name in archs:
        arch = load_arch(arch_name)
        args.hosts[arch.name] = arch.family
        overrides = (args.train_samples, args.train_text_tokens, args.utilisation, args.overhead_s)
        if args.recipe == "none" or (args.recipe == "auto" and all(o is None for o in overrides)):
            recipe = None if args.recipe == "none" else "auto"
        else:
            base = default_recipe(arch.family) if args.recipe == "auto" else get_recipe(args.recipe)
            recipe = get_recipe(base.name, samples=args.train_samples, text_tokens=args.train_text_tokens, utilisation=args.utilisation,
                                overhead_s_per_sample=args.overhead_s)
        bar = _progress_bar(arch.name, len(scenarios) * len(variants or [0, 0, 0, 0]))
        try:
            rows += profile(
                arch, variants, scenarios, latency=args.latency, device=device, dtype=dtype_name(args.dtype), hardware=args.hardware,
                recipe=recipe, train_run=args.train_run, verify=not args.no_verify, warmup=args.warmup, repeats=args.repeats,
                progress=bar, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
            )
        finally:
            bar.close()
    return rows


def _write_outputs(args: argparse.Namespace, rows: list, command: str) -> None:
    """--json and the --output run directory (owned by this process: see _run)."""
    from pmod_bench.outputs import output_errors

    from .errors import ProfileError
    from .render import write_json, write_run_dir

    if args.json:
        with output_errors("--json", args.json, error=ProfileError):
            write_json(args.json, rows, command=command)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.output:
        try:
            with output_errors("--output", args.output, error=ProfileError):
                d = write_run_dir(args.output, rows, command, label=args.label, hosts=getattr(args, "hosts", None))
        except FileExistsError as exc:
            raise ProfileError(str(exc)) from None
        print(f"wrote {d}/run.json, profile.json, profile.csv", file=sys.stderr)


def _check_owner(args: argparse.Namespace) -> None:
    """--output is new, empty or a profile run's: another run's run.json would become a profile's (an eval could no
    longer resume); --json inside it is the profile's own file."""
    import os

    from pmod_bench.rundir import check_owner

    from .errors import ProfileError

    out = os.path.abspath(args.output)
    own_json = (os.path.basename(args.json),) if args.json and os.path.abspath(os.path.dirname(args.json)) == out else ()
    check_owner(args.output, "profile", "--output", error=ProfileError, ignore=own_json)


def _videos(args: argparse.Namespace) -> list[Any]:
    """--frames / --duration (+ --fps, --max-frames) -> profiler.video.Video objects, one per row; [] for image rows."""
    from .errors import ProfileError
    from .video import LMMS_EVAL_MAX_FRAMES, QWEN_FPS, Video

    frames, durations = getattr(args, "frames", None), getattr(args, "duration", None)
    if frames and durations:
        raise ProfileError("give --frames N (frames the model sees) or --duration S (a clip read as lmms-eval reads it), not both.")
    if not (frames or durations):
        for flag, value in (("--frame-size", args.frame_size), ("--fps", args.fps), ("--max-frames", args.max_frames)):
            if value is not None:
                raise ProfileError(f"{flag} describes a video; add --frames N or --duration S (or drop {flag}).")
        return []
    if frames and (args.fps is not None or args.max_frames is not None):
        raise ProfileError("--fps / --max-frames sample a --duration clip; with --frames N the model sees N frames: drop them.")
    for flag, value in (("--image-size", args.image_size), ("--images", args.images)):
        if value:
            raise ProfileError(f"{flag} is for image prompts; a video's frames are --frame-size WxH: drop {flag}.")
    if frames:
        return [Video(frames=n) for n in frames]
    fps = QWEN_FPS if args.fps is None else args.fps
    most = LMMS_EVAL_MAX_FRAMES if args.max_frames is None else args.max_frames
    return [Video(duration_s=d, fps=fps, max_frames=most) for d in durations]


def _check_outputs(args: argparse.Namespace) -> None:
    """--output and --json can be written, before anything is measured: --output is not a file, not read-only (whose
    it is: :func:`_check_owner`, once _run owns it); --json is not a directory and not a file inside a run directory
    of another kind."""
    from pmod_bench.outputs import check_output_path
    from pmod_bench.rundir import run_kind

    from .errors import ProfileError

    if args.output:
        check_output_path(args.output, "--output", error=ProfileError)
    if args.json:
        path = check_output_path(args.json, "--json", want="file", error=ProfileError)
        owner = run_kind(path.parent)
        if owner not in (None, "profile") or (owner and path.name == "run.json"):
            raise ProfileError(f"--json {args.json}: {path.parent} is a '{owner or 'unknown'}' run directory; writing into it "
                               "would mix a profile into that run: pass a --json path outside it.")


class _progress_bar:
    """tqdm on stderr; called by profile() before each row and each timed run. Where stderr is not a
    terminal (logs, CI) the timing steps are printed as plain lines instead (``plain``)."""

    def __init__(self, name: str, total: int, plain: bool = True):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=name, unit="row", leave=False, file=sys.stderr, disable=None)
        self.plain = plain and self.bar.disable
        self.started = False

    def __call__(self, message: str, new_row: bool) -> None:
        if new_row:
            if self.started:
                self.bar.update(1)
            self.started = True
        if self.plain and not new_row:
            print(message, file=sys.stderr, flush=True)
        self.bar.set_description_str(message[:70])

    def close(self) -> None:
        self.bar.update(self.bar.total - self.bar.n)
        self.bar.close()

