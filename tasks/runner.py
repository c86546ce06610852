"""``pmod-bench eval``: run benchmark suites through lmms-eval and write an eval run directory.

Layout of ``RUN_DIR`` (documented in docs/RUN_DIRS.md)::

    run.json                      kind "eval", the command, the evaluation identity, model facts
    summary.json / summary.csv    one row per finished benchmark (paper metric, paper units, n)
    benchmarks/<KEY>.json         per-benchmark completion record (row + lmms-eval results), atomic
    lmms_eval/<task>/results.json lmms-eval's results of that benchmark's call (samples excluded)
    lmms_eval/<task>/samples_<leaf task>.jsonl   lmms-eval's logged samples (no documents / images)
    lmms_eval/submissions/        files some aggregations write (MMBench details)
    responses/responses.rank<R>.jsonl   per-request model responses (resume mid-benchmark)
    errors/<KEY>.txt              traceback of a failed benchmark (removed when it succeeds)

Each benchmark is one ``lmms_eval.evaluator.simple_evaluate`` call with the same model object and
one ``TaskManager`` (lmms-eval is imported and the model loaded once per process). A benchmark is
finished when ``benchmarks/<KEY>.json`` exists; a second invocation on the same directory skips
finished benchmarks and answers already-persisted requests from ``responses/``, so it recomputes
nothing and ends with the results of an uninterrupted run (seeds are reset per call). A run
directory belongs to one evaluation identity (model, p-MoD overrides, dtype, prompt template, limit,
generation overrides); batch size, device and suites may change between invocations.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime as _dt
import io
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from pmod_bench.atomic import atomic_write_json as _write_json, atomic_write_text
from pmod_bench.model.dtypes import CHOICES as DTYPE_CHOICES, is_dtype_name
from pmod_bench.profiler.scenario import PAPER_TEXT_TOKENS

from .benchmarks import SUITES, Benchmark, resolve_suite
from .launch import CPU_LAUNCH_RECIPE, check_launch, parse_ratios  # noqa: F401  (re-exported: the runner's API)
from .data import DataError

SCHEMA_VERSION = 1
CSV_COLUMNS = ("benchmark", "task", "metric", "value", "n", "unit", "n_unparsed", "limit", "components", "title")


class RunDirMismatch(ValueError):
    """RUN_DIR holds another evaluation; the message says what differs."""


#: ``--gen-kwargs`` keys and how each value must read (the plugin's generation settings)
GEN_KWARGS = {"max_new_tokens": "a positive integer", "temperature": "a number >= 0", "top_p": "a number in (0, 1]",
              "num_beams": "a positive integer", "do_sample": "true or false", "until": "a stop string"}


def parse_gen_kwargs(text: Optional[str]) -> dict:
    """``max_new_tokens=8,temperature=0`` -> typed dict; a bad item raises ValueError naming ``--gen-kwargs``."""
    if text is None or not str(text).strip():
        return {}
    out: dict[str, Any] = {}
    example = "e.g. --gen-kwargs max_new_tokens=8,temperature=0"
    for item in [i.strip() for i in str(text).split(",") if i.strip()]:
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key:
            raise ValueError(f"--gen-kwargs {text!r}: '{item}' is not KEY=VALUE; {example} (keys: {', '.join(GEN_KWARGS)})")
        if key not in GEN_KWARGS:
            raise ValueError(f"--gen-kwargs: unknown key '{key}'; known: {', '.join(GEN_KWARGS)} ({example})")
        try:
            if key in ("max_new_tokens", "num_beams"):
                value: Any = int(raw)
                ok = value >= 1
            elif key == "temperature":
                value = float(raw)
                ok = math.isfinite(value) and value >= 0
            elif key == "top_p":
                value = float(raw)
                ok = 0 < value <= 1
            elif key == "do_sample":
                value = {"true": True, "false": False, "1": True, "0": False}[raw.lower()]
                ok = True
            else:
                value, ok = raw, bool(raw)
        except (ValueError, KeyError):
            ok = False
        if not ok:
            raise ValueError(f"--gen-kwargs: {key}={raw!r} must be {GEN_KWARGS[key]} ({example})")
        out[key] = value
    return out


#: text tokens of the scenario ``--match`` solves at (the paper's default scenario, as the profiler's)
MATCH_TEXT_TOKENS = PAPER_TEXT_TOKENS


def match_arch(model: str):
    """The profiler's :class:`~pmod_bench.profiler.arch.Arch` of an eval ``--model`` (preset, HF directory, hub id,
    or an original-layout checkpoint already converted into the cache), for ``--match``; ValueError names the fix."""
    from pmod_bench.profiler.arch import ArchError, load_arch

    name = str(model).removesuffix(":vanilla")
    try:
        return load_arch(name)
    except ArchError as exc:
        path = Path(name).expanduser()
        if path.is_dir():
            try:
                from pmod_bench.model.loading import checkpoint_layout, converted_cache_dir

                if checkpoint_layout(path) == "original":
                    conv = converted_cache_dir(path)
                    if (conv / "config.json").is_file():
                        return load_arch(str(conv))
            except (ArchError, OSError, ValueError):
                pass
        raise ValueError(f"--match needs the architecture of --model {model}: {' '.join(str(exc).split())} (an original-"
                         "layout checkpoint: convert it first with `pmod-bench convert`, or pass --method with an "
                         "explicit budget instead of --match)") from None


def default_match_image_size(arch) -> tuple[int, int]:
    """The paper's image size for ``--match`` on ``arch``'s family (its host adapter's): 2x2 tiles for LLaVA-NeXT
    (672x672), one tile for LLaVA-1.5 (336x336)."""
    return arch.host.paper_image_size(arch.config)


#: the frame size ``--match`` solves a video suite's budget at: a 720p frame, which Qwen2.5-VL's per-frame pixel budget
#: caps (qwen-vl-utils as lmms-eval reads a clip: 1008x560 at 7B, the most a frame gets at 32 frames; any larger 16:9
#: frame gives the same tokens); LLaVA-OneVision resizes every frame to one tile, whatever its size
MATCH_FRAME_SIZE = (1280, 720)


def video_suite(suite: str) -> bool:
    """Whether ``suite`` holds only video benchmarks (True) or only image ones (False); ValueError for a mix, which no one
    ``--match`` budget fits (a clip's tokens are not an image's)."""
    from .benchmarks import VIDEO_BENCHMARKS

    keys = [b.key for b in resolve_suite(suite)]
    video = [k for k in keys if k in VIDEO_BENCHMARKS]
    if video and len(video) != len(keys):
        raise ValueError(f"--match solves one budget, on a clip or on an image: suite {suite!r} mixes video ({', '.join(video)}) "
                         "and image benchmarks; evaluate them in two runs (--suite video, and the image suite)")
    return bool(video)


@dataclass
class EvalConfig:
    """One ``pmod-bench eval`` invocation. Every field is checked here, before anything is written."""

    model: str
    """Checkpoint directory, hub id or preset name (``tiny``)."""
    suite: str
    """Suite name(s) or benchmark keys, comma separated (``table1``, ``POPE,MME``)."""
    output: str
    """The run directory."""
    limit: Optional[int] = None
    """Evaluate only the first N samples of each benchmark task (smoke runs; MME takes N/2 question pairs spread
    over its categories, perception first, so any limit gives a perception score)."""
    batch_size: int = 1
    pmod: Optional[str] = None
    """Convert a vanilla checkpoint to p-MoD (``default`` or a PMoDConfig JSON; routers untrained)."""
    shift: Optional[float] = None
    schedule: Optional[str] = None
    ratios: Optional[str] = None
    allow_untrained_routers: bool = False
    dtype: str = "auto"
    device: Optional[str] = None
    attn_implementation: str = "sdpa"
    chat_template: Optional[str] = None
    """The prompt template; None: the host's own (LLaVA: vicuna_v1, the paper's; Qwen2.5-VL: the checkpoint's, as
    lmms-eval's qwen2_5_vl). Left out of the identity when None (a run dir from before it existed resumes)."""
    gen_kwargs: Optional[str] = None
    """lmms-eval generation overrides for every task (``max_new_tokens=8``); part of the identity."""
    stop_at_until: bool = False
    """Cut answers at the tasks' ``until`` stop strings. Off by default, as lmms-eval's ``llava`` model (the
    paper's runs) generates to EOS / max_new_tokens and ignores ``until``; part of the identity."""
    max_num_frames: Optional[int] = None
    """Frames read of each video (the video suite): Qwen2.5-VL's ``max_num_frames`` (at most N, as lmms-eval's chat
    qwen2_5_vl), LLaVA-OneVision's ``max_frames_num`` (exactly N spread uniformly, as lmms-eval's llava_hf); None:
    lmms-eval's 32. Part of the identity when set."""
    fps: Optional[float] = None
    """Qwen2.5-VL only: read each video at F frames a second (qwen-vl-utils) instead of by frame count; refused on
    LLaVA-OneVision, whose lmms-eval classes sample by count only. Part of the identity when set."""
    label: Optional[str] = None
    command: Optional[str] = None
    introspect: Optional[str] = None
    """Also record which vision tokens each p-MoD layer keeps for one image (an image path, or ``demo``):
    ``introspection.json`` for the report's Fig. 5 / 6."""
    method: Optional[str] = None
    """A comparison method (``pmod_bench.methods`` spec, e.g. ``visionzip:dominant=54,contextual=10``); every row
    carries its config as a dict; part of the identity."""
    match: Optional[str] = None
    """Solve --method's token budget to this profiler variant's prefill FLOPs (``p-MoD-0.5``) on the evaluated
    model's architecture before evaluating (equal compute, as the paper's Table 5)."""
    match_tflops: Optional[float] = None
    """Solve --method's token budget to X prefill TFLOPs (--match-convention) instead."""
    match_kv: Optional[float] = None
    """Solve --method's token budget to a vision KV-cache ratio Y (e.g. 0.537) instead."""
    match_image_size: Optional[str] = None
    """Image size WIDTHxHEIGHT the budget is solved at (default: the paper's, 672x672 for LLaVA-NeXT and 336x336 for
    LLaVA-1.5, i.e. 2x2 / 1x1 vision tiles), with 58 text tokens."""
    match_frames: Optional[int] = None
    """A video suite: frames of the clip the budget is solved on (default: the host's eval frame budget, 32: lmms-eval's
    max_num_frames for Qwen2.5-VL, max_frames_num for LLaVA-OneVision)."""
    match_frame_size: Optional[str] = None
    """A video suite: frame size WIDTHxHEIGHT of that clip (default 1280x720, a 720p frame: Qwen2.5-VL's per-frame pixel
    budget caps it, 1008x560 at 7B; LLaVA-OneVision resizes every frame to one tile)."""
    match_convention: str = "headline"
    """FLOPs convention of --match / --match-tflops: headline (prefill_tflops) or paper (prefill_tflops_paper)."""
    match_tolerance: float = 0.01
    """Relative tolerance of --match* (default 0.01)."""
    method_match: Optional[dict] = field(default=None, init=False)
    """What --match* solved (set in __post_init__): target, achieved, rel_err, the solved hyperparameters, the
    architecture, image size and text tokens; recorded in run.json and in every summary row."""

    def __post_init__(self) -> None:
        from pmod_bench.model.sources import preset_shadowed

        shadowed = preset_shadowed(str(self.model))
        if shadowed:
            raise ValueError(f"--model {shadowed}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"--limit must be a positive integer, got {self.limit!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"--batch-size must be a positive integer, got {self.batch_size!r}")
        resolve_suite(self.suite)  # raises with the known names
        if not is_dtype_name(self.dtype):
            raise ValueError(f"--dtype {self.dtype!r} is unknown; use {DTYPE_CHOICES}")
        if self.shift is not None and not (isinstance(self.shift, (int, float)) and 0.0 < float(self.shift) <= 1.5):
            raise ValueError(f"--shift must be a shift factor delta in (0, 1.5] (the paper's: 0.3, 0.4, 0.5), got {self.shift!r}")
        parse_ratios(self.ratios)
        parse_gen_kwargs(self.gen_kwargs)
        self._check_frame_budget()
        if self.attn_implementation not in ("sdpa", "eager", "flash_attention_2"):
            raise ValueError(f"--attn {self.attn_implementation!r} is unknown; use sdpa, eager or flash_attention_2")
        template = str(self.chat_template)
        if self.chat_template is not None and template not in ("vicuna_v1", "qwen_1_5", "processor") and "{%" not in template \
                and "{{" not in template and not Path(template).expanduser().is_file():
            raise ValueError(f"--chat-template {template!r}: no such file; use vicuna_v1 (the paper's), processor (the "
                             "checkpoint's own), qwen_1_5 (LLaVA-OneVision's published runs) or a .jinja file")
        if self.device:
            import torch

            try:
                dev = torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(f"--device {self.device!r} is not a device; use cpu, cuda or cuda:N") from None
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"--device {self.device}: CUDA is not available on this machine; use --device cpu "
                                 "(or leave --device out: the GPU if there is one, else the CPU)")
        if self.introspect not in (None, "", "demo"):
            self.introspect_image()
        if self.method:
            from pmod_bench.methods import parse_method_spec

            self.method = parse_method_spec(self.method).spec()  # validated, canonical (defaults left out)
        if any(x is not None for x in (self.match, self.match_tflops, self.match_kv, self.match_frames)) or \
                self.match_image_size or self.match_frame_size:
            self.method_match = self._solve_match()
            self.method = self.method_match["method_spec"]

    def _check_frame_budget(self) -> None:
        """--max-num-frames / --fps: their values, and the host when the model's config can be read without loading it
        (else the model's host refuses them when it is loaded, before anything is written)."""
        n, fps = self.max_num_frames, self.fps
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"--max-num-frames must be a positive integer (frames read of each video; lmms-eval's "
                             f"default 32), got {n!r}")
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < math.inf):
            raise ValueError(f"--fps must be a frame rate > 0 (frames read per second of video, e.g. 1 or 2), got {fps!r}")
        if n is None and fps is None:
            return
        from pmod_bench.model.hosts import family_of

        from .requests import source_model_type

        model_type = source_model_type(self.model)
        family = family_of(model_type) if model_type else None
        if family == "llava_onevision" and fps is not None:
            raise ValueError(f"--fps is Qwen2.5-VL's video sampling rate; LLaVA-OneVision ({self.model}) reads "
                             "--max-num-frames frames spread uniformly over each clip, as lmms-eval's llava_hf and "
                             "llava_onevision: leave --fps out")
        if family in ("llava", "llava_next"):
            flags = " and ".join(f for f, v in (("--max-num-frames", n), ("--fps", fps)) if v is not None)
            raise ValueError(f"{flags}: frame budgets of video evaluation, which LLaVA-1.5 / LLaVA-NeXT models "
                             f"({self.model}) do not run (Qwen2.5-VL and LLaVA-OneVision do); leave {flags} out")

    def _solve_match(self) -> dict:
        """--match / --match-tflops / --match-kv: the method's budget solved on the model's architecture (ValueError names the fix)."""
        targets = {"--match": self.match, "--match-tflops": self.match_tflops, "--match-kv": self.match_kv}
        given = [k for k, v in targets.items() if v is not None]
        where = "--match-image-size" if self.match_image_size else "--match-frames / --match-frame-size"
        if not self.method:
            raise ValueError(f"{', '.join(given) or where} solves a comparison method's token budget; add "
                             "--method NAME, e.g. --method fastv --match p-MoD-0.5")
        if len(given) != 1:
            raise ValueError("give exactly one of --match VARIANT (e.g. p-MoD-0.5), --match-tflops X, --match-kv Y"
                             + (f" (got {', '.join(given)})" if given else f" with {where}"))
        if self.match_convention not in ("headline", "paper"):
            raise ValueError(f"--match-convention must be headline or paper, got {self.match_convention!r}")
        if not (isinstance(self.match_tolerance, (int, float)) and 0.0 < float(self.match_tolerance) < 1.0):
            raise ValueError(f"--match-tolerance must be a relative tolerance in (0, 1), e.g. 0.01, got {self.match_tolerance!r}")
        from pmod_bench.methods import solve
        from pmod_bench.profiler.arch import parse_image_size

        if self.match is not None:
            self._check_match_target()
        arch = match_arch(self.model)
        video = self._match_video()
        if video is not None:
            size = parse_image_size(self.match_frame_size) if self.match_frame_size else MATCH_FRAME_SIZE
        else:
            size = parse_image_size(self.match_image_size) if self.match_image_size else default_match_image_size(arch)
        res = solve(self.method, arch, size, match=self.match, tflops=self.match_tflops, kv=self.match_kv,
                    text_tokens=MATCH_TEXT_TOKENS, convention=self.match_convention, tolerance=float(self.match_tolerance),
                    video=video)
        out = res.to_dict()
        out.update(arch=arch.name, image_size=[int(size[0]), int(size[1])], text_tokens=MATCH_TEXT_TOKENS,
                   method_spec=res.config.spec())
        if video is not None:  # image_size is the clip's frame size, as in a profile row of a video prompt
            out["frames"] = video.frames
        return out

    def _match_video(self):
        """The clip a video suite's ``--match`` solves on (:class:`~pmod_bench.profiler.video.Video`), None for an image
        suite; the flags of the other kind refused (ValueError naming the fix)."""
        from pmod_bench.methods import get_method
        from pmod_bench.profiler.video import LMMS_EVAL_MAX_FRAMES, Video

        if not video_suite(self.suite):
            if self.match_frames is not None or self.match_frame_size:
                raise ValueError(f"--match-frames / --match-frame-size solve the budget on a clip, for a video suite; suite "
                                 f"{self.suite!r} has images: use --match-image-size WxH (or --suite video)")
            name = str(self.method).partition(":")[0]
            if getattr(get_method(name), "video_only", False):
                raise ValueError(f"{name} reduces the tokens of a video: evaluate it on a video suite (--suite video, or "
                                 "VideoMME, MVBench, EgoSchema), where --match solves its budget on a clip")
            return None
        if self.match_image_size:
            raise ValueError(f"suite {self.suite!r} is video: the budget is solved on a clip, --match-frames N and "
                             f"--match-frame-size WxH (default {LMMS_EVAL_MAX_FRAMES} frames of "
                             f"{MATCH_FRAME_SIZE[0]}x{MATCH_FRAME_SIZE[1]}); drop --match-image-size")
        frames = self.match_frames if self.match_frames is not None else \
            self.max_num_frames or LMMS_EVAL_MAX_FRAMES   # the eval's own frame budget, where it sets one
        if isinstance(frames, bool) or not isinstance(frames, int):
            raise ValueError(f"--match-frames must be a whole number of frames, e.g. 32, got {frames!r}")
        return Video(frames=frames)   # ProfileError (a ValueError) names the range

    def _check_match_target(self) -> None:
        """--match names a configuration to equal: a malformed p-MoD spec is refused with what targets look like
        (the model library's reason, without the profiler's advice to pass --shift, which eval reads otherwise)."""
        from pmod_bench.model.config import SPEC_FORMS, parse_pmod_spec

        try:
            parse_pmod_spec(str(self.match))
        except ValueError as exc:
            reason = " ".join(str(exc).split()).rstrip(".")
            raise ValueError(f"--match {self.match} is not a valid target: {reason}. Valid targets look like {SPEC_FORMS}, "
                             "baseline, or a method spec (fastv:keep=0.5); or give --match-tflops X / --match-kv Y") from None

    def introspect_image(self):
        """The ``--introspect`` image (PIL), decoded now: a missing or corrupt file fails before the evaluation."""
        from .introspection import load_image

        try:
            return load_image(self.introspect)
        except ValueError as exc:
            raise ValueError(f"--introspect: {exc}") from None

    #: fields that define what a run directory holds (the rest may change on resume)
    IDENTITY = ("model", "pmod", "shift", "schedule", "ratios", "allow_untrained_routers", "dtype",
                "attn_implementation", "chat_template", "limit", "gen_kwargs", "stop_at_until", "method",
                "max_num_frames", "fps")
    #: identity fields left out while unset (a run directory from before they existed resumes)
    _UNSET_LEFT_OUT = ("chat_template", "max_num_frames", "fps")

    def identity(self) -> dict:
        return {k: getattr(self, k) for k in self.IDENTITY if not (k in self._UNSET_LEFT_OUT and getattr(self, k) is None)}

    def model_args(self) -> dict:
        return dict(pretrained=self.model, pmod=self.pmod, shift=self.shift, schedule=self.schedule, ratios=self.ratios,
                    allow_untrained_routers=self.allow_untrained_routers, dtype=self.dtype, device=self.device,
                    attn_implementation=self.attn_implementation, batch_size=self.batch_size,
                    chat_template=self.chat_template, stop_at_until=self.stop_at_until, method=self.method,
                    max_num_frames=self.max_num_frames, fps=self.fps)


@dataclass
class EvalOutcome:
    rows: list[dict]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    resumed_answers: int = 0
    """answers taken from the saved responses of an earlier invocation (``responses/``)"""
    computed_answers: int = 0


# ------------------------------------------------------------------------------------- file helpers
def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def _clean(o: Any) -> Any:
    """JSON-safe copy: non-finite floats become null (strict JSON)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def _strict(obj: Any) -> Any:
    """Plain JSON data (numpy / torch scalars, paths converted; non-finite floats -> null)."""
    return _clean(json.loads(json.dumps(obj, default=_json_default)))


def atomic_write_json(path: Path, obj: Any) -> None:
    """:func:`pmod_bench.atomic.atomic_write_json` of strict JSON (:func:`_strict`)."""
    _write_json(path, _strict(obj))


def _slug(key: str) -> str:
    return key.replace("+", "plus").replace("/", "_")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------------------- summary
def summarize(bench: Benchmark, results: dict, limit: Optional[int] = None) -> dict:
    """The summary row of one benchmark from lmms-eval's results dict (raises KeyError if incomplete)."""
    res = results["results"]
    if bench.result not in res:
        raise KeyError(f"lmms-eval returned no results for '{bench.result}' (got: {', '.join(res) or 'none'})")
    entry = res[bench.result]
    if bench.metric not in entry or not isinstance(entry[bench.metric], (int, float)):
        raise KeyError(f"lmms-eval results of '{bench.result}' lack metric '{bench.metric}' (got: {', '.join(entry)})")
    n_samples = results.get("n-samples", {})
    n = sum(int(n_samples.get(t, {}).get("effective", 0)) for t in bench.tasks)
    row: dict[str, Any] = {"benchmark": bench.key, "task": bench.result, "metric": bench.metric,
                           "value": float(entry[bench.metric]) * bench.scale, "n": n, "unit": bench.unit,
                           "n_unparsed": None, "limit": limit, "components": None, "title": bench.title}
    if bench.components:
        row["components"] = {t: float(res[t][bench.metric]) * bench.scale for t in bench.components if t in res}
    if bench.unparsed_metric and isinstance(entry.get(bench.unparsed_metric), (int, float)):
        row["n_unparsed"] = int(round(float(entry[bench.unparsed_metric]) * n))
    return row


def _bench_file(run_dir: Path, key: str) -> Path:
    return run_dir / "benchmarks" / f"{_slug(key)}.json"


def finished_rows(run_dir: Path) -> list[dict]:
    """Rows of every finished benchmark in ``run_dir``, in the paper's order (Table 11's columns, then grounding), then
    the toy world's and the video suite's."""
    rows = []
    for key in (*SUITES["all"], *SUITES.get("toy", ()), *SUITES.get("video", ())):
        f = _bench_file(run_dir, key)
        if f.is_file():
            rows.append(json.loads(f.read_text(encoding="utf-8"))["row"])
    return rows


def write_summary(run_dir: Path, model: str, pmod: Optional[dict], extra: Optional[dict] = None) -> list[dict]:
    rows = finished_rows(run_dir)
    atomic_write_json(run_dir / "summary.json", {"model": model, "pmod": pmod, "rows": rows, **(extra or {})})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (json.dumps(r[k]) if isinstance(r.get(k), (dict, list)) else r.get(k)) for k in CSV_COLUMNS})
    atomic_write_text(run_dir / "summary.csv", buf.getvalue())
    return rows


def format_rows(rows: list[dict]) -> str:
    """A small plain-text table of summary rows."""
    lines = [f"{'benchmark':<10} {'value':>9}  {'n':>7}  metric"]
    for r in rows:
        extra = f"  ({r['n_unparsed']} unparsed)" if r.get("n_unparsed") else ""
        lines.append(f"{r['benchmark']:<10} {r['value']:>9.2f}  {r['n']:>7}  {r['task']}:{r['metric']}{extra}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- lmms-eval
_TASK_MANAGERS: dict[str, Any] = {}


def task_manager():
    """One lmms-eval ``TaskManager`` per process over the adapter tasks only (indexing the ~2,000
    built-in YAMLs is skipped: an adapter ``include:``s its built-in's file by path, not by name)."""
    from . import tasks_dir

    key = str(tasks_dir())
    if key not in _TASK_MANAGERS:
        from lmms_eval.tasks import TaskManager

        _TASK_MANAGERS[key] = TaskManager(verbosity="WARNING", include_path=key, include_defaults=False,
                                          model_name="pmod_llava")
    return _TASK_MANAGERS[key]


def _write_lmms_outputs(run_dir: Path, bench: Benchmark, results: dict) -> None:
    out = run_dir / "lmms_eval" / bench.result
    samples = results.get("samples") or {}
    body = {k: v for k, v in results.items() if k != "samples"}
    atomic_write_json(out / "results.json", body)
    for task, rows in samples.items():
        text = "".join(json.dumps(_strict(s), ensure_ascii=False) + "\n"
                       for s in rows)
        atomic_write_text(out / f"samples_{task}.jsonl", text)


def _limit_for(bench: Benchmark, limit: Optional[int]) -> Optional[int]:
    if limit is None:
        return None
    m = bench.limit_multiple
    return int(math.ceil(limit / m) * m)


@contextlib.contextmanager
def _deferred_sigint():
    """Hold a Ctrl-C that arrives inside the block and raise it (KeyboardInterrupt) when the block ends.

    Importing lmms-eval runs third-party ``try: import ... except: ...`` blocks that would swallow a
    KeyboardInterrupt raised inside them, so the run would go on as if nothing happened.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hit: list = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: hit.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if hit:
        raise KeyboardInterrupt


def check_identity(run_dir: Path, cfg: EvalConfig) -> Optional[dict]:
    """run.json of ``run_dir`` when it holds this evaluation (None: a new or empty directory); RunDirMismatch names
    what differs (another kind of run or files without a run.json: :func:`pmod_bench.rundir.check_owner`, as every
    command that writes a run directory checks it; other settings). Reads only."""
    from pmod_bench.rundir import RUN_FILE, check_owner

    check_owner(run_dir, "eval", "--output", error=RunDirMismatch)
    meta_path = run_dir / RUN_FILE
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))  # parses: check_owner read kind "eval" from it
    old = meta.get("eval", {}).get("identity", {})
    # a key the run directory predates (added to IDENTITY later) counts as that setting's default
    defaults = {f.name: f.default for f in dataclasses.fields(EvalConfig) if f.default is not dataclasses.MISSING}
    now = cfg.identity()
    # also a setting the run dir recorded that is now unset (left out of the identity: e.g. --fps dropped on resume)
    keys = [*now, *(k for k in old if k not in now and k in EvalConfig.IDENTITY)]
    diff = {k: (old.get(k, defaults.get(k)), now.get(k, getattr(cfg, k))) for k in keys
            if old.get(k, defaults.get(k)) != now.get(k, getattr(cfg, k))}
    if diff:
        what = "; ".join(f"{k}: {a!r} in the run dir vs {b!r} now" for k, (a, b) in diff.items())
        raise RunDirMismatch(f"{run_dir} holds an evaluation with other settings ({what}). Resume with the same "
                             f"settings or pass a new --output directory.")
    return meta


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 600 else text[:600] + " ..."


def load_lm(cfg: EvalConfig) -> Any:
    """The ``pmod_llava`` model of ``cfg`` (no response cache yet); a bad model source or option raises
    ValueError with one line naming the fix (truncated weights, unknown dtype, vanilla + --shift, ...)."""
    from .plugin import PMoDLlava

    try:
        return PMoDLlava(**cfg.model_args())
    except ValueError as exc:
        raise ValueError(_one_line(exc)) from None
    except (OSError, RuntimeError) as exc:  # files / devices below us (programming errors keep their traceback)
        raise ValueError(f"--model {cfg.model}: cannot load it ({type(exc).__name__}: {_one_line(exc)})") from None


def run_eval(cfg: EvalConfig, lm: Any = None, log: Optional[Callable[[str], None]] = None) -> EvalOutcome:
    """Evaluate ``cfg.suite`` into ``cfg.output`` (resuming what a previous invocation left).

    ``lm``: an already constructed lmms-eval model (tests, benchmarks); default: ``pmod_llava`` built
    from ``cfg``. The run directory is owned by this process for the whole call
    (:func:`pmod_bench.rundir.run_lock`: another process on the same ``--output`` is refused with
    :class:`~pmod_bench.rundir.RunDirInUse`, one line naming this one). Everything that can be checked
    is checked before the first file is written (the output path, the run directory's identity, the model,
    the introspection image): a rejected command leaves no ``run.json`` (and no directory it created)
    behind. Failures of single benchmarks are collected in the outcome (and errors/<KEY>.txt); the caller
    decides the exit code. lmms-eval's own stdout prints go to stderr, so stdout carries only the caller's
    result table.
    """
    from pmod_bench.rundir import run_lock

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    # rank 0 owns the directory; the other ranks of the same launch write only their own responses file
    owner = run_lock(cfg.output, command=cfg.command) if rank == 0 else contextlib.nullcontext()
    with owner:
        return _run_eval(cfg, lm, log, rank)


def _run_eval(cfg: EvalConfig, lm: Any, log: Callable[[str], None], rank: int) -> EvalOutcome:
    run_dir = Path(cfg.output)
    benches = resolve_suite(cfg.suite)
    meta = check_identity(run_dir, cfg) if rank == 0 else None
    pending = [b for b in benches if not _bench_file(run_dir, b.key).is_file()]
    outcome = EvalOutcome(rows=[], skipped=[b.key for b in benches if b not in pending])

    from .introspection import RECORD_FILE

    intro_image = cfg.introspect_image() if cfg.introspect and not (run_dir / RECORD_FILE).is_file() else None
    t_import = time.time()
    with contextlib.redirect_stdout(sys.stderr):
        if (pending or intro_image is not None) and lm is None:
            lm = load_lm(cfg)
    if intro_image is not None and not hasattr(getattr(lm, "_model", None), "record_routing"):
        log(f"introspection skipped: {cfg.model} is not a p-MoD model (no routing to record; --pmod default converts it)")
        intro_image = None

    run_meta = _run_meta(cfg, meta, benches, run_dir)
    if cfg.method_match is not None:  # the budget --match* solved, before anything was loaded or written
        _log_match(cfg, log)
    if rank == 0:
        if lm is not None and hasattr(lm, "describe"):
            run_meta["model_info"] = lm.describe()
            run_meta["host"] = run_meta["model_info"].get("host")
        atomic_write_json(run_dir / "run.json", run_meta)
    if outcome.skipped:
        log(f"resuming {run_dir}: {', '.join(outcome.skipped)} already finished")
        _warn_changed_data(run_dir, [b for b in benches if b not in pending], log)

    if pending:
        _run_pending(cfg, run_dir, lm, pending, (run_meta, benches, outcome), rank, log, t_import)

    if intro_image is not None and rank == 0:
        _introspect(run_dir, lm, intro_image, log)
    if lm is not None and getattr(lm, "world_size", 1) > 1 and hasattr(lm, "accelerator"):
        lm.accelerator.wait_for_everyone()  # rank 0 has written every finished benchmark
    outcome.rows = _summary(run_dir, cfg, run_meta, benches, outcome) if rank == 0 else finished_rows(run_dir)
    outcome.pending = [b.key for b in benches if not _bench_file(run_dir, b.key).is_file()]
    return outcome


def _log_match(cfg: EvalConfig, log: Callable[[str], None]) -> None:
    mm = cfg.method_match
    scale = 1 if mm["metric"] == "kv" else 1e12
    log(f"--match: {cfg.method} ({mm['metric']} {mm['achieved'] / scale:.4g} vs {mm['target_label']} "
        f"{mm['target'] / scale:.4g}{'' if mm['metric'] == 'kv' else ' TFLOPs'}, rel_err {mm['rel_err']:.2%}) on "
        f"{mm['arch']} at {'' if mm.get('frames') is None else str(mm['frames']) + ' frames of '}"
        f"{mm['image_size'][0]}x{mm['image_size'][1]}, {mm['text_tokens']} text tokens")


def _run_pending(cfg: EvalConfig, run_dir: Path, lm: Any, pending: list, run: tuple, rank: int,
                 log: Callable[[str], None], t_import: float) -> None:
    """The benchmarks not finished yet, one lmms-eval call each (``run``: run.json's dict, the suite, the outcome)."""
    if hasattr(lm, "cache") and lm.cache is None:
        from .cache import ResponseCache

        lm.cache = ResponseCache(run_dir / "responses", rank=getattr(lm, "rank", 0))
    with contextlib.redirect_stdout(sys.stderr), _deferred_sigint():  # third-party imports swallow Ctrl-C
        from lmms_eval import evaluator

        tm = task_manager()
    saved = len(lm.cache) if getattr(lm, "cache", None) is not None else 0
    log(f"lmms-eval and model ready in {time.time() - t_import:.1f} s"
        + (f"; {saved} saved response(s) in {run_dir / 'responses'} will be reused" if saved else ""))
    # what lmms-eval's evaluator and tasks read from CLI args (documents reach process_results without media)
    cli_args = argparse.Namespace(output_path=str(run_dir / "lmms_eval"), verbosity="WARNING", process_with_media=False)
    for k, bench in enumerate(pending, 1):
        _run_benchmark(cfg, run_dir, lm, bench, f"[{k}/{len(pending)}]", (evaluator, tm, cli_args), run, rank, log)


def _recorded_data(run_dir: Path, key: str) -> Optional[list]:
    """The data identity a finished benchmark was evaluated on (None: unfinished, or finished before it was recorded)."""
    try:
        return json.loads(_bench_file(run_dir, key).read_text(encoding="utf-8")).get("data")
    except (OSError, ValueError, AttributeError):
        return None


def _warn_changed_data(run_dir: Path, finished: list, log: Callable[[str], None]) -> None:
    """One line per finished benchmark whose data is no longer what it was evaluated on (its row is kept)."""
    from .data import benchmark_data, data_fingerprint

    def where(entries: list) -> str:
        return ", ".join(e.get("path") or f"the hub ({e['hub_id']})" for e in entries) or "?"

    for b in finished:
        old = _recorded_data(run_dir, b.key)
        if old is None:
            continue
        now = benchmark_data(b)
        if data_fingerprint(old) != data_fingerprint(now):
            log(f"warning: {b.key} was evaluated on {where(old)}; the data is now {where(now)} (other files or file "
                f"times). Its row is kept (run.json records the data it used); evaluate the current data into a "
                f"new --output.")


def _run_meta(cfg: EvalConfig, meta: Optional[dict], benches: list, run_dir: Path) -> dict:
    """run.json of this invocation: what an earlier one recorded (created, command, label, benchmarks) kept;
    ``eval.data``: each finished benchmark's data identity (``tasks/data.py`` ``benchmark_data``)."""
    requested = list(dict.fromkeys([*(meta or {}).get("eval", {}).get("benchmarks", []), *[b.key for b in benches]]))
    data = {key: d for key in requested if (d := _recorded_data(run_dir, key)) is not None}
    from pmod_bench import __version__

    run_meta = {
        "kind": "eval", "schema_version": SCHEMA_VERSION, "created": (meta or {}).get("created", _now()),
        "updated": _now(), "pmod_bench_version": __version__,
        "command": cfg.command or (meta or {}).get("command") or f"pmod_bench.tasks.runner.run_eval({cfg.suite!r})",
        "label": cfg.label if cfg.label is not None else (meta or {}).get("label"),
        "eval": {"identity": cfg.identity(), "benchmarks": requested, "batch_size": cfg.batch_size,
                 "data_root": os.environ.get("PMOD_BENCH_DATA") or None, "data": data},
        "model_info": (meta or {}).get("model_info"), "host": (meta or {}).get("host"),
    }
    if cfg.method_match is not None:
        run_meta["eval"]["method_match"] = dict(cfg.method_match)
    return run_meta


def _run_benchmark(cfg: EvalConfig, run_dir: Path, lm: Any, bench: Benchmark, tag: str, harness: tuple, run: tuple,
                   rank: int, log: Callable[[str], None]) -> None:
    """One benchmark through lmms-eval (``harness``: its evaluator, task manager and CLI args). Rank 0 writes its
    row file and the summary (``run``: run.json's dict, the suite's benchmarks, the outcome); a failure goes to the
    outcome and errors/<KEY>.txt instead, and the other benchmarks go on. A full disk is not a benchmark's failure:
    it ends the run (:func:`pmod_bench.outputs.disk_full`), and the same command resumes once there is space; so
    does a hub out of reach without a local data root (:class:`~.data.HubUnreachable`)."""
    from pmod_bench.outputs import disk_full

    from .data import HubUnreachable, benchmark_data

    evaluator, tm, cli_args = harness
    run_meta, benches, outcome = run
    limit = _limit_for(bench, cfg.limit)
    log(f"{tag} {bench.key}: {bench.title} ({', '.join(bench.run)}" + (f", limit {limit}" if limit else "") + ")")
    t0 = time.time()
    hits0 = getattr(getattr(lm, "cache", None), "hits", 0)
    computed0 = getattr(lm, "computed", 0)
    err_file = run_dir / "errors" / f"{_slug(bench.key)}.txt"
    try:
        data = benchmark_data(bench)  # what the tasks are about to read (tasks/data.py)
        with contextlib.redirect_stdout(sys.stderr):
            results = evaluator.simple_evaluate(
                model=lm, tasks=list(bench.run), limit=limit, task_manager=tm, log_samples=True,
                gen_kwargs=cfg.gen_kwargs, cli_args=cli_args, process_docs_parallel=1, verbosity="WARNING",
                batch_size=cfg.batch_size, datetime_str=_now(),
            )
        resumed = getattr(getattr(lm, "cache", None), "hits", 0) - hits0
        computed = getattr(lm, "computed", 0) - computed0
        outcome.resumed_answers += resumed
        outcome.computed_answers += computed
        if resumed:
            log(f"{tag} {bench.key}: {resumed} answer(s) from the saved responses, {computed} computed")
        if rank != 0:
            return
        if not results:
            raise RuntimeError("lmms-eval returned no results")
        data = _same_data(bench, data, benchmark_data(bench))
        row = summarize(bench, results, limit)
        row["pmod"] = _model_pmod(run_meta)  # the evaluated model's PMoDConfig as data (None: vanilla)
        if cfg.method:
            from pmod_bench.methods import method_dict

            row["method"] = method_dict(cfg.method)  # the method's config as a dict, not a name to parse again
            if cfg.method_match is not None:  # --match*: what was solved (target, achieved, rel_err, ...)
                row["method_match"] = dict(cfg.method_match)
    except Exception as exc:  # one benchmark failing must not lose the others
        if disk_full(exc, run_dir) or isinstance(exc, HubUnreachable):  # the environment's, not the benchmark's
            raise  # failure: the run stops (one line), and the same command resumes once it is fixed
        msg = f"{type(exc).__name__}: {_one_line(exc)}" if not isinstance(exc, (DataError, KeyError)) else _one_line(exc)
        outcome.failures[bench.key] = msg[:600]
        if rank == 0:
            atomic_write_text(err_file, traceback.format_exc())
        log(f"{tag} {bench.key} FAILED: {outcome.failures[bench.key]}")
        return
    _write_lmms_outputs(run_dir, bench, results)
    elapsed = time.time() - t0
    atomic_write_json(_bench_file(run_dir, bench.key), {
        "row": row, "finished": _now(), "elapsed_s": elapsed, "resumed_answers": resumed,
        "results": {t: results["results"].get(t) for t in (*bench.run, *bench.components)},
        "n_samples": {t: results.get("n-samples", {}).get(t) for t in bench.tasks}, "data": data,
    })
    run_meta["eval"]["data"][bench.key] = data
    atomic_write_json(run_dir / "run.json", run_meta)
    if err_file.exists():
        err_file.unlink()
    outcome.ran.append(bench.key)
    log(f"{tag} {bench.key} = {row['value']:.2f} {row['unit']} (n={row['n']}) in {elapsed:.1f} s")
    _summary(run_dir, cfg, run_meta, benches, outcome)


def _same_data(bench: Benchmark, before: list, after: list) -> list:
    """The data identity a benchmark was evaluated on: ``after`` (a generated toy copy exists only then); ValueError
    when a local copy changed while it was being read (answers of two versions would be mixed)."""
    from .data import data_fingerprint

    if not any(e.get("missing") for e in before) and data_fingerprint(before) != data_fingerprint(after):
        paths = ", ".join(sorted({e["path"] for e in after if e.get("path")}))
        raise ValueError(f"{bench.key}: the data under {paths} changed while it was evaluated (answers to two versions "
                         "would be mixed); re-run the same command once nothing writes there")
    return after


def _introspect(run_dir: Path, lm: Any, image: Any, log: Callable[[str], None]) -> None:
    from .introspection import write_introspection

    path = write_introspection(run_dir, lm._model, lm.processor, image)
    log(f"token selection of each p-MoD layer: {path}")


def _model_pmod(run_meta: dict) -> Optional[dict]:
    """The evaluated model's p-MoD config (``PMoDConfig.to_dict()``: the checkpoint's, after any override), or None."""
    pmod = (run_meta.get("model_info") or {}).get("pmod")
    return dict(pmod) if isinstance(pmod, dict) else None


def _summary(run_dir: Path, cfg: EvalConfig, run_meta: dict, benches: list, outcome: EvalOutcome) -> list[dict]:
    info = run_meta.get("model_info") or {}
    pmod = _model_pmod(run_meta)
    done = {b.key for b in benches if _bench_file(run_dir, b.key).is_file()}
    extra = {"suite": cfg.suite, "limit": cfg.limit, "complete": done == {b.key for b in benches},
             "failures": dict(outcome.failures), "model_info": info}
    if cfg.method:
        from pmod_bench.methods import method_dict

        extra["method"] = method_dict(cfg.method)
        if cfg.method_match is not None:
            extra["method_match"] = dict(cfg.method_match)
    return write_summary(run_dir, cfg.model, pmod, extra)


__all__ = ["EvalConfig", "EvalOutcome", "RunDirMismatch", "check_identity", "run_eval", "load_lm", "check_launch",
           "parse_gen_kwargs", "parse_ratios", "summarize", "finished_rows", "write_summary",
           "format_rows", "task_manager", "atomic_write_json", "atomic_write_text"]
