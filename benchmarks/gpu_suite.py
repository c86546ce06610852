"""The GPU suite: every GPU fact the project claims, measured in one run on one GPU (at most ~8 minutes).

    python benchmarks/gpu_suite.py --output runs/gpu                      # one GPU: writes runs/gpu/gpu_suite.json + .md
    python benchmarks/gpu_suite.py --output runs/gpu --sections prefill,decode --budget-s 200
    python benchmarks/gpu_suite.py --smoke --output /tmp/gpu-smoke        # CPU, tiny shapes: the plumbing only (CI)

Sections (each records ``status`` ok / skipped (with ``reason``) / error (with ``error`` and ``traceback``), so one
failing section never loses the others; the JSON and the Markdown are rewritten atomically after every section, so a
run killed by a time limit still leaves the finished ones):

* ``prefill``: LLaVA-NeXT-7B with random bf16 weights (built as ``pmod-bench profile --device cuda`` builds it:
  ``pmod_bench.profiler.models.random_model``; the p-MoD models share the baseline's tensors), one 672x672 image
  (2,928 vision tokens) + 58 text tokens. Vanilla vs p-MoD delta 0.3/0.4/0.5, timed with CUDA events (warm-up,
  median of ``--repeats`` interleaved repeats), two paths: ``ttft`` (pixels -> vision tower -> LLM, logits of the
  last position: the time to first token) and ``llm`` (the LLM alone on ``inputs_embeds``). Beside each latency
  ratio the analytic FLOPs ratio of the same path (the profiler's counts; causal attention, what the kernels run),
  the achieved TFLOP/s and the MFU against the detected GPU's dense BF16 peak
  (``pmod_bench.profiler.hardware``). Attention: sdpa, and flash_attention_2 when flash-attn is installed.
* ``decode``: tokens/s of vanilla vs p-MoD-0.5 at batch 1 and 8 (``pmod_bench.profiler.latency.time_interleaved``:
  each step timed with CUDA events), the KV cache each keeps (bytes allocated in the project's cache after the
  prefill, ``measure_kv``; and the analytic bytes), and the largest batch that fits (doubling from 8 up to
  ``--max-batch``, then ``--refine`` bisection steps; an out-of-memory is caught per batch size).
* ``flash_vs_sdpa``: max |delta logits| of flash_attention_2 against sdpa over the prefill and 6 cached decode steps
  (the flash run is fed the sdpa run's greedy tokens, positions as ``generate()`` computes them), at batch 1 and on a
  left-padded batch of two different images and prompts, vanilla and p-MoD-0.5. Skipped, with the reason, when
  flash-attn is absent.
* ``train_step``: one optimizer step (forward + backward + AdamW, bf16) of p-MoD-0.5 vs the baseline at LLaVA-NeXT-7B's
  width with as many decoder layers as fit (stated; ``benchmarks/bench_train.py``'s ``measure``), beside the
  analytic training-FLOPs ratio of the same shapes (the profiler's training-cost model).
* ``profile``: ``pmod-bench profile --device cuda`` through its library function (``pmod_bench.profiler.profile``):
  TTFT, decode ms/token and peak memory per variant beside the paper's Table 7; also written as a profile run
  directory (``OUTPUT/profile``) for ``pmod-bench report``.
* ``methods``: FastV, PyramidDrop and VisionZip solved to p-MoD-0.5's prefill FLOPs (``pmod_bench.methods.solve``,
  the ``--match`` solver) and timed like the prefill: latency ratio beside the FLOPs ratio.

The run stops starting sections once ``--budget-s`` seconds have passed (the rest are recorded as skipped, with the
reason). ``--smoke`` runs every section on CPU at the tiny preset's shapes in fp32 with 1-2 repeats (time.perf_counter
timing), eager attention standing in for flash-attention, so CI proves the plumbing (tests/test_gpu_suite.py).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.util
import json
import math
import os
import shlex
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

#: the sections in the order of the JSON document
SECTIONS = ("prefill", "decode", "flash_vs_sdpa", "train_step", "profile", "methods")
#: the order they run in: the sections sharing the 7B model first, then the two that build their own
RUN_ORDER = ("prefill", "decode", "flash_vs_sdpa", "methods", "profile", "train_step")
SCHEMA_VERSION = 1
GPU_TRAIN_LAYERS = (32, 28, 24, 20, 16, 12, 8, 4)


def log(message: str) -> None:
    """Progress on stdout, flushed at once (a run killed by a time limit keeps every line it printed)."""
    print(message, flush=True)


class SectionSkipped(Exception):
    """Raised by a section that cannot run here (the message is the reason)."""


@dataclass(frozen=True)
class Plan:
    """Shapes and repeats of one run: :func:`gpu_plan` (7B, bf16, CUDA) or :func:`smoke_plan` (tiny, fp32, CPU)."""

    smoke: bool
    device: str
    dtype: str
    arch: str
    image_size: tuple[int, int]
    text_tokens: int
    padded_sample: tuple[tuple[int, int], int]
    """the second sample of the left-padded batch: (image size, text tokens)"""
    methods: tuple[str, ...]
    attn: tuple[str, ...]
    """attention implementations the prefill is timed with"""
    candidate_attn: Optional[str]
    """compared against sdpa in flash_vs_sdpa (None: section skipped, ``attn_note`` says why)"""
    attn_note: Optional[str]
    train_layers: tuple[int, ...]
    warmup: int = 3
    repeats: int = 10
    gen_tokens: int = 16
    decode_batches: tuple[int, ...] = (1, 8)
    max_batch: int = 128
    refine: int = 3
    flash_steps: int = 6
    shifts: tuple[float, ...] = (0.3, 0.4, 0.5)
    match: str = "p-MoD-0.5"
    train_shift: float = 0.5

    @property
    def variants(self) -> list[str]:
        return ["baseline"] + [f"p-MoD-{s:g}" for s in self.shifts]


def flash_unavailable(device: str) -> Optional[str]:
    """Why flash_attention_2 cannot run here, or None when it can."""
    if not device.startswith("cuda"):
        return "flash-attn needs a CUDA GPU"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed (pip install flash-attn)"
    try:
        from transformers.utils import is_flash_attn_2_available
    except ImportError:  # pragma: no cover - older transformers: trust the package
        return None
    if not is_flash_attn_2_available():
        return "flash-attn is installed but transformers cannot use it here (is_flash_attn_2_available() is False)"
    return None


def gpu_plan(args: argparse.Namespace) -> Plan:
    reason = flash_unavailable("cuda")
    flash = () if reason else ("flash_attention_2",)
    return Plan(smoke=False, device="cuda", dtype="bfloat16", arch="llava-next-7b", image_size=(672, 672), text_tokens=58,
                padded_sample=((640, 480), 40), methods=("fastv", "pyramiddrop", "visionzip"), attn=("sdpa",) + flash,
                candidate_attn=None if reason else "flash_attention_2", attn_note=reason, train_layers=GPU_TRAIN_LAYERS,
                warmup=args.warmup if args.warmup is not None else 3, repeats=args.repeats or 10,
                max_batch=args.max_batch or 128, refine=args.refine if args.refine is not None else 3)


def smoke_plan(args: argparse.Namespace) -> Plan:
    """The tiny preset (8 layers, 32 px tiles), method budgets that fit its geometry, eager standing in for flash.
    40 text tokens: the LLM-only path puts the image after a 35-token system prompt (benchmarks/common.py)."""
    return Plan(smoke=True, device="cpu", dtype="float32", arch="tiny", image_size=(64, 64), text_tokens=40,
                padded_sample=((96, 64), 12), methods=("fastv", "pyramiddrop:layers=2-4-6", "visionzip:dominant=8,contextual=2"),
                attn=("sdpa", "eager"), candidate_attn="eager",
                attn_note="smoke run on CPU: eager attention stands in for flash_attention_2", train_layers=(8, 4),
                warmup=args.warmup if args.warmup is not None else 1, repeats=args.repeats or 2, gen_tokens=4,
                decode_batches=(1, 2), max_batch=args.max_batch or 4, refine=args.refine if args.refine is not None else 1)


# ------------------------------------------------------------------------------------------ the run state
class Suite:
    """One run: the plan, the clock, and the models the first sections share (built once, released before the
    sections that build their own)."""

    def __init__(self, plan: Plan, out_dir: Path, budget_s: float, log: Callable[[str], None] = log):
        self.plan, self.out, self.budget_s, self._log = plan, Path(out_dir), float(budget_s), log
        self.t0 = time.monotonic()
        self._models: Optional[dict] = None
        self._analytic: Optional[dict] = None
        self.hw = None
        if plan.device.startswith("cuda"):
            import torch

            from pmod_bench.profiler.hardware import detect_hardware

            self.hw = detect_hardware(torch.cuda.get_device_name())

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def over_budget(self) -> bool:
        return self.elapsed() > self.budget_s

    def note(self, message: str) -> None:
        self._log(f"[gpu_suite {self.elapsed():6.1f}s] {message}")

    @functools.cached_property
    def arch(self):
        from pmod_bench.profiler.arch import load_arch

        return load_arch(self.plan.arch)

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.plan.dtype)

    def models(self) -> dict[str, Any]:
        """variant name -> random-weight model (the baseline first; p-MoD models share its tensors)."""
        if self._models is None:
            from pmod_bench.profiler.core import resolve_variants
            from pmod_bench.profiler.models import random_model

            self.note(f"building {self.plan.arch} ({', '.join(self.plan.variants)}) on {self.plan.device} {self.plan.dtype}")
            models, base = {}, None
            for v in resolve_variants(self.arch, self.plan.variants):
                models[v.name], base = random_model(self.arch, v, device=self.plan.device, dtype=self.torch_dtype, base=base)
            self._models = models
        return self._models

    def analytic(self) -> dict[str, Any]:
        """variant name -> the profiler's analytic row (FLOPs, KV cache) of the plan's scenario."""
        if self._analytic is None:
            from pmod_bench.profiler.core import profile

            rows = profile(self.arch, self.plan.variants, [self.scenario()], latency=False, verify=False, recipe=None,
                           dtype=self.plan.dtype)
            self._analytic = {r.variant: r for r in rows}
        return self._analytic

    def scenario(self, batch_size: int = 1):
        from pmod_bench.profiler.core import Scenario

        return Scenario(self.plan.image_size, self.plan.text_tokens, self.plan.gen_tokens, batch_size)

    def batch(self, samples: list) -> dict:
        from pmod_bench.profiler.models import synthetic_batch

        return synthetic_batch(self.arch, samples, device=self.plan.device, dtype=self.torch_dtype)

    def sample(self):
        from pmod_bench.profiler.models import Sample

        return Sample(self.plan.image_size, self.plan.text_tokens)

    def paper(self, variant: str, metric: str) -> Optional[float]:
        """The paper's ``metric`` for ``variant`` (Table 7), only on its architecture and scenario."""
        from pmod_bench.profiler.paper import paper_value

        row = self.analytic()[variant]
        return paper_value(self.plan.arch, row.to_dict(), metric) if row.paper_scenario else None

    def release(self) -> None:
        self._models = None
        free_memory()


def free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory of the GPU (torch's OutOfMemoryError, or a cuBLAS / cuDNN allocation failure)."""
    import torch

    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "ALLOC_FAILED" in text)


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(device: str) -> Optional[int]:
    import torch

    return int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None


def is_pmod(model) -> bool:
    return getattr(model, "pmod_layers", None) is not None


# ------------------------------------------------------------------------------------------ timing helpers
def time_calls(calls: dict[str, Callable[[], Any]], device: str, warmup: int, repeats: int,
               around: Optional[Callable[[str], Any]] = None) -> dict[str, Any]:
    """Latency Stats (ms) of every call: ``warmup`` untimed runs each, then ``repeats`` repeats interleaved across the
    calls; CUDA events between synchronisations on a GPU, time.perf_counter on CPU (the profiler's timer).
    ``around(name)``: a context manager entered (untimed) around each run of ``name``."""
    import torch

    from pmod_bench.profiler.latency import Stats, _Timer

    timer = _Timer(device)
    ctx = around or (lambda name: contextlib.nullcontext())
    for name, fn in calls.items():
        for _ in range(warmup):
            with ctx(name), torch.inference_mode():
                fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            with ctx(name), torch.inference_mode():
                t0 = timer.start()
                fn()
                times[name].append(timer.stop(t0))
    return {name: Stats.of(ts) for name, ts in times.items()}


def stats_dict(st, prefix: str = "latency_ms") -> dict[str, Any]:
    return {prefix: st.median, f"{prefix}_min": st.min, f"{prefix}_max": st.max, f"{prefix}_p10": st.p10,
            f"{prefix}_p90": st.p90, "repeats": st.n, "spread": st.spread}


@contextlib.contextmanager
def attention(models: Iterable[Any], impl: str):
    """The language models of ``models`` run ``impl`` (sdpa, eager, flash_attention_2); the vision towers keep
    theirs. Restored on exit."""
    models = list(models)
    before = [m.config.text_config._attn_implementation for m in models]
    try:
        for m in models:
            m.set_attn_implementation({"text_config": impl})
        yield
    finally:
        for m, impl_before in zip(models, before):
            m.set_attn_implementation({"text_config": impl_before})


@contextlib.contextmanager
def eager_towers(models: Iterable[Any]):
    """Vision towers on eager attention (the [CLS]-attention methods need its weights; every variant alike)."""
    towers = [m.model.vision_tower for m in models]
    before = [t.config._attn_implementation for t in towers]
    try:
        for t in towers:
            t.set_attn_implementation("eager")
        yield
    finally:
        for t, impl in zip(towers, before):
            t.set_attn_implementation(impl)


def prefill(model, batch: dict):
    return model(**batch, use_cache=True, logits_to_keep=1)


def prefill_embeds(model, embeds, vision):
    extra = {"vision_token_mask": vision} if is_pmod(model) else {}
    return model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1, **extra)


# ------------------------------------------------------------------------------------------ prefill
def section_prefill(s: Suite) -> dict:
    from common import llava_inputs

    p, models, analytic = s.plan, s.models(), s.analytic()
    V = analytic["baseline"].vision_tokens
    batch = s.batch([s.sample()])
    shapes = argparse.Namespace(vision_tokens=V, text_tokens=p.text_tokens, hidden=s.arch.text.hidden, device=p.device,
                                dtype=p.dtype)
    embeds, vision = llava_inputs(shapes)
    rows, unavailable = [], {}
    if p.candidate_attn is None and p.attn_note:
        unavailable["flash_attention_2"] = p.attn_note
    for attn in p.attn:
        s.note(f"prefill: {attn}, {len(models)} variants x ({p.warmup} warm-up + {p.repeats} repeats) x 2 paths")
        try:
            with attention(models.values(), attn):
                ttft = time_calls({n: functools.partial(prefill, m, batch) for n, m in models.items()}, p.device,
                                  p.warmup, p.repeats)
                llm = time_calls({n: functools.partial(prefill_embeds, m, embeds, vision) for n, m in models.items()},
                                 p.device, p.warmup, p.repeats)
        except Exception as exc:  # a second implementation failing must not lose sdpa's rows
            if attn == "sdpa":
                raise
            unavailable[attn] = f"{type(exc).__name__}: {exc}"
            free_memory()
            continue
        rows += prefill_rows(s, attn, "ttft", ttft) + prefill_rows(s, attn, "llm", llm)
    return {"arch": p.arch, "image_size": list(p.image_size), "vision_tokens": V, "text_tokens": p.text_tokens,
            "batch_size": 1, "dtype": p.dtype, "warmup": p.warmup, "repeats": p.repeats, "timing": timing_note(p.device),
            "hardware": hardware_dict(s.hw), "attention_unavailable": unavailable, "rows": rows,
            "paths": {"ttft": "pixels -> vision tower -> projector -> LLM, logits of the last position (time to first token)",
                      "llm": "the LLM alone on inputs_embeds (vision_token_mask for p-MoD)"},
            "flops": "the profiler's analytic counts (2 FLOPs per multiply-add), attention causal (what the kernels "
                     "compute); flops_ratio_full_attention: the profiler's headline convention"}


def prefill_rows(s: Suite, attn: str, path: str, stats: dict) -> list[dict]:
    """One row per variant: latency, its ratio to the baseline's beside the analytic FLOPs ratio, TFLOP/s, MFU."""
    analytic = s.analytic()

    def tflops(name: str, attention_count: str) -> float:
        a = analytic[name]
        llm = a.prefill_tflops_causal if attention_count == "causal" else a.prefill_tflops
        return llm + (a.vision_tflops if path == "ttft" else 0.0)

    base = stats["baseline"].median
    paper_base = s.paper("baseline", "latency_ms")
    rows = []
    for name, st in stats.items():
        lat = st.median / base
        fr = tflops(name, "causal") / tflops("baseline", "causal")
        achieved = tflops(name, "causal") / (st.median / 1e3)
        paper = s.paper(name, "latency_ms") if path == "ttft" else None
        rows.append({"attn": attn, "path": path, "variant": name, **stats_dict(st), "latency_ratio": lat,
                     "flops_ratio": fr, "flops_ratio_full_attention": tflops(name, "full") / tflops("baseline", "full"),
                     "latency_over_flops": lat / fr, "tflops": tflops(name, "causal"), "achieved_tflops_per_s": achieved,
                     "mfu": achieved / s.hw.bf16_tflops if s.hw else None,
                     "paper_latency_ms": paper, "paper_latency_ratio": paper / paper_base if paper and paper_base else None})
    return rows


def timing_note(device: str) -> str:
    if device.startswith("cuda"):
        return "CUDA events between torch.cuda.synchronize() calls (pmod_bench.profiler.latency)"
    return "time.perf_counter (CPU)"


def hardware_dict(hw) -> Optional[dict]:
    return None if hw is None else {"name": hw.name, "bf16_tflops": hw.bf16_tflops, "mem_bw_gbs": hw.mem_bw_gbs,
                                    "source": hw.source}


# ------------------------------------------------------------------------------------------ decode
def section_decode(s: Suite) -> dict:
    from pmod_bench.profiler.latency import time_interleaved

    p = s.plan
    names = ["baseline", p.match]
    models = {n: s.models()[n] for n in names}
    repeats = max(1, p.repeats // 3)  # each run times gen_tokens - 1 steps: samples enough
    rows = []
    for bs in p.decode_batches:
        s.note(f"decode: batch {bs}, {repeats} interleaved runs of {p.gen_tokens - 1} decode steps")
        batch = s.batch([s.sample()] * bs)
        kv = {n: measured_kv(m, batch) for n, m in models.items()}
        timings = time_interleaved(models, batch, gen_tokens=p.gen_tokens, warmup=1, repeats=repeats, device=p.device)
        rows += decode_rows(s, bs, timings, kv)
        del batch
        free_memory()
    largest = {}
    for n, m in models.items():
        start = max(p.decode_batches)
        known = next(r for r in rows if r["variant"] == n and r["batch"] == start)
        largest[n] = largest_batch(s, n, m, start, known)
    return {"variants": names, "gen_tokens": p.gen_tokens, "decode_steps_per_run": p.gen_tokens - 1, "runs": repeats,
            "timing": timing_note(p.device), "rows": rows, "largest_batch": largest,
            "kv": "kv_bytes_measured: the K and V tensors the project's cache holds after the prefill (measure_kv); "
                  "kv_bytes_analytic: the profiler's count (per sample x batch)"}


def measured_kv(model, batch: dict) -> dict:
    from pmod_bench.profiler.kvcache import measure_kv, prefill_cache

    kv = measure_kv(prefill_cache(model, batch), batch["attention_mask"])
    return {"bytes": kv.bytes_allocated, "entries": sum(kv.real)}


def decode_rows(s: Suite, bs: int, timings: dict, kv: dict) -> list[dict]:
    base = timings["baseline"].decode.median
    rows = []
    for name, tm in timings.items():
        ms = tm.decode.median
        rows.append({"batch": bs, "variant": name, **stats_dict(tm.decode, "decode_ms_per_step"),
                     "tokens_per_s": bs / (ms / 1e3), "speedup_vs_baseline": base / ms, "ttft_ms": tm.prefill.median,
                     "kv_bytes_measured": kv[name]["bytes"], "kv_entries": kv[name]["entries"],
                     "kv_bytes_analytic": s.analytic()[name].kv_cache_bytes * bs,
                     "kv_ratio": kv[name]["bytes"] / kv["baseline"]["bytes"], "peak_memory_bytes": tm.peak_memory_bytes})
    return rows


def search_batch(probe: Callable[[int], Any], start_ok: int, cap: int, refine: int,
                 over_budget: Callable[[], bool]) -> tuple[int, Any, Optional[int], Optional[str]]:
    """The largest batch ``probe`` runs (it returns None when a batch does not fit): doubling from ``start_ok`` (known
    to fit) up to ``cap``, then ``refine`` bisection steps. (batch, its probe result or None, first batch seen not to
    fit or None, note)."""
    ok_b, ok_res, fail_b, note = start_ok, None, None, None
    b = start_ok * 2
    while b <= cap:
        if over_budget():
            return ok_b, ok_res, fail_b, "search stopped: the global time budget was exceeded"
        res = probe(b)
        if res is None:
            fail_b = b
            break
        ok_b, ok_res, b = b, res, b * 2
    else:
        note = f"every batch tried up to the cap ({cap}, --max-batch) fits"
    for _ in range(refine):
        if fail_b is None or fail_b - ok_b <= 1:
            break
        if over_budget():
            return ok_b, ok_res, fail_b, "search stopped: the global time budget was exceeded"
        mid = (ok_b + fail_b) // 2
        res = probe(mid)
        if res is None:
            fail_b = mid
        else:
            ok_b, ok_res = mid, res
    return ok_b, ok_res, fail_b, note


def largest_batch(s: Suite, name: str, model, start: int, known: dict) -> dict:
    """The largest decode batch of ``model`` that fits (prefill + gen_tokens - 1 decode steps) and its tokens/s."""
    from pmod_bench.profiler.latency import time_generation

    p, tried = s.plan, []

    def probe(b: int):
        s.note(f"decode: {name}, does batch {b} fit?")
        timing = None
        try:
            reset_peak(p.device)
            batch = s.batch([s.sample()] * b)
            timing = time_generation(model, batch, gen_tokens=p.gen_tokens, warmup=0, repeats=1, device=p.device)
        except Exception as exc:
            if not is_oom(exc):
                raise
        batch = None  # the inputs go before the memory is returned to the GPU
        free_memory()
        tried.append([b, "ok" if timing is not None else "out of memory"])
        return timing

    b, timing, fail_b, note = search_batch(probe, start, p.max_batch, p.refine, s.over_budget)
    if timing is None:  # nothing above the fixed batch fitted: report the fixed batch's measurement
        out = {"batch": b, "tokens_per_s": known["tokens_per_s"], "decode_ms_per_step": known["decode_ms_per_step"],
               "peak_memory_bytes": known["peak_memory_bytes"]}
    else:
        ms = timing.decode.median
        out = {"batch": b, "tokens_per_s": b / (ms / 1e3), "decode_ms_per_step": ms, "peak_memory_bytes": timing.peak_memory_bytes}
    return {**out, "first_failing_batch": fail_b, "tried": tried, "note": note}


# ------------------------------------------------------------------------------------------ flash vs sdpa
def greedy_logits(model, batch: dict, steps: int, forced=None) -> tuple[list, Any]:
    """Prefill + ``steps`` cached decode steps with generate()'s position ids; feeds ``forced`` (B, steps) tokens when
    given, else the greedy ones. ([(B, vocab) float32 logits on the CPU] * (steps + 1), tokens (B, steps))."""
    import torch

    from pmod_bench.model.cache import output_cache
    from pmod_bench.model.compat import cache_kwargs

    mask = batch["attention_mask"]
    with torch.inference_mode():
        out = model(**batch, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True, logits_to_keep=1)
        logits, tokens = [out.logits[:, -1].float().cpu()], []
        for t in range(steps):
            nxt = forced[:, t:t + 1].to(mask.device) if forced is not None else out.logits[:, -1:].argmax(-1)
            tokens.append(nxt.cpu())
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = model(input_ids=nxt, attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                        **cache_kwargs(model, output_cache(out)), use_cache=True, logits_to_keep=1)
            logits.append(out.logits[:, -1].float().cpu())
    return logits, torch.cat(tokens, dim=1)


def section_flash(s: Suite) -> dict:
    p = s.plan
    if p.candidate_attn is None:
        raise SectionSkipped(p.attn_note or "no second attention implementation to compare")
    from pmod_bench.profiler.models import Sample

    models = s.models()
    cases = {"batch 1": [s.sample()], "left-padded batch 2": [s.sample(), Sample(*p.padded_sample)]}
    out = []
    for label, samples in cases.items():
        batch = s.batch(samples)
        padding = int((batch["attention_mask"] == 0).sum())
        for name in ("baseline", p.match):
            s.note(f"flash_vs_sdpa: {name}, {label}")
            ref, tokens = greedy_logits(models[name], batch, p.flash_steps)
            with attention([models[name]], p.candidate_attn):
                cand, _ = greedy_logits(models[name], batch, p.flash_steps, forced=tokens)
            out.append({"variant": name, "case": label, "batch_size": len(samples), "padding_tokens": padding,
                        **compare_logits(ref, cand)})
    return {"reference": "sdpa", "candidate": p.candidate_attn, "note": p.attn_note if p.smoke else None,
            "decode_steps": p.flash_steps, "cases": out, "max_abs_delta": max(c["max_abs_delta"] for c in out),
            "method": "the candidate is fed the reference's greedy tokens; position ids as generate() computes them"}


def compare_logits(ref: list, cand: list) -> dict:
    """max |delta| per step (prefill first), overall, the logits' scale and how often the argmax agrees."""
    deltas = [float((a - b).abs().max()) for a, b in zip(ref, cand)]
    scale = max(float(a.abs().max()) for a in ref)
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ref, cand))
    total = sum(a.shape[0] for a in ref)
    return {"max_abs_delta_per_step": deltas, "max_abs_delta": max(deltas), "logit_scale": scale,
            "relative_delta": max(deltas) / scale if scale else None, "argmax_agreement": agree / total}


# ------------------------------------------------------------------------------------------ methods
def section_methods(s: Suite) -> dict:
    from bench_methods import solve_methods, target_flops

    from pmod_bench.methods import apply_method

    p, arch = s.plan, s.arch
    size, T = p.image_size, p.text_tokens
    s.note(f"methods: solving {', '.join(p.methods)} to {p.match}'s prefill FLOPs")
    variants, notes = solve_methods(p.methods, arch, size, T, p.match, 0.01)
    flops = target_flops(argparse.Namespace(match=p.match), arch, size, T)
    models = s.models()
    vanilla, pmod = models["baseline"], models[p.match]
    batch = s.batch([s.sample()])
    configs = {label: cfg for label, cfg, _ in variants}

    @contextlib.contextmanager
    def applied(label: str):
        if configs[label] is None:
            yield
            return
        apply_method(vanilla, configs[label])
        try:
            yield
        finally:
            apply_method(vanilla, None)

    calls = {label: functools.partial(prefill, pmod if label == p.match else vanilla, batch) for label in configs}
    s.note(f"methods: {len(calls)} variants x ({p.warmup} warm-up + {p.repeats} repeats)")
    with eager_towers([vanilla, pmod]):
        stats = time_calls(calls, p.device, p.warmup, p.repeats, around=applied)
    return {"match": p.match, "image_size": list(size), "text_tokens": T, "rows": method_rows(s, variants, flops, stats),
            "notes": notes, "timing": timing_note(p.device),
            "latency": "time to first token (vision tower on eager attention for every variant, as the [CLS]-attention "
                       "methods need), median of interleaved repeats"}


def method_rows(s: Suite, variants: list, flops: dict, stats: dict) -> list[dict]:
    from pmod_bench.methods.accounting import method_flops

    p = s.plan
    (base_llm, base_ttft), (match_llm, match_ttft) = flops["baseline"], flops[p.match]
    base = stats["vanilla"].median
    rows = []
    for label, cfg, res in variants:
        if cfg is None:
            llm, ttft = (1.0, 1.0) if label == "vanilla" else (match_llm / base_llm, match_ttft / base_ttft)
            spec, err = label, None
        else:
            f = method_flops(cfg, s.arch, p.image_size, p.text_tokens)
            llm, ttft, spec, err = f.llm_prefill / base_llm, f.ttft / base_ttft, cfg.spec(), res.rel_err
        lat = stats[label].median / base
        rows.append({"variant": label, "spec": spec, **stats_dict(stats[label]), "latency_ratio": lat,
                     "llm_flops_ratio": llm, "ttft_flops_ratio": ttft, "latency_over_ttft_flops": lat / ttft,
                     "latency_over_llm_flops": lat / llm, "solver_rel_err": err})
    return rows


# ------------------------------------------------------------------------------------------ profile
def section_profile(s: Suite) -> dict:
    from pmod_bench.profiler.core import profile
    from pmod_bench.profiler.render import format_table, write_run_dir

    s.release()  # the profiler builds its own models
    p = s.plan
    warmup = min(p.warmup, 2)
    command = f"pmod-bench profile --device {p.device} --repeats {p.repeats} --warmup {warmup}"
    if p.smoke:
        command += (f" --arch {p.arch} --dtype fp32 --image-size {p.image_size[0]}x{p.image_size[1]} "
                    f"--text-tokens {p.text_tokens} --gen-tokens {p.gen_tokens}")
    rows = profile(p.arch, None, [s.scenario()], latency=True, device=p.device, dtype=p.dtype, warmup=warmup,
                   repeats=p.repeats, progress=lambda msg, new_row: s.note(f"profile: {msg}"))
    run_dir = write_run_dir(s.out / "profile", rows, command + " (run by benchmarks/gpu_suite.py)", label="gpu_suite")
    base = next((r for r in rows if r.method == "baseline"), None)
    paper_base = s.paper("baseline", "latency_ms") if base is not None else None
    out = []
    for r in rows:
        paper = {m: s.paper(r.variant, m) for m in ("tflops", "kv_cache_ratio", "latency_ms", "gpu_hours")}
        out.append({"variant": r.variant, "ttft_ms": r.prefill_latency_ms, "ttft_ms_min": r.prefill_latency_ms_min,
                    "ttft_ms_max": r.prefill_latency_ms_max, "decode_ms_per_token": r.decode_latency_ms_per_token,
                    "peak_memory_bytes": r.peak_memory_bytes, "peak_memory_prefill_bytes": r.peak_memory_prefill_bytes,
                    "latency_ratio": r.latency_ratio, "latency_unreliable": r.latency_unreliable,
                    "prefill_tflops": r.prefill_tflops, "tflops_ratio": r.tflops_ratio, "kv_cache_ratio": r.kv_cache_ratio,
                    "kv_cache_bytes": r.kv_cache_bytes, "achieved_tflops_per_s": r.achieved_tflops_per_s, "mfu": r.mfu,
                    "train_gpu_hours": r.train_gpu_hours, "device": r.device, "paper": paper,
                    "paper_latency_ratio": paper["latency_ms"] / paper_base if paper["latency_ms"] and paper_base else None})
    return {"command": command, "run_dir": str(run_dir), "rows": out, "table": format_table(rows),
            "paper": "p-MoD paper Table 7: LLaVA-NeXT-7B, latency on one RTX A6000 at batch 1, GPU hours on 8 x A6000"}


# ------------------------------------------------------------------------------------------ train step
def train_arch(preset: str, layers: int):
    """The preset's architecture with ``layers`` decoder layers (its width kept)."""
    from pmod_bench.model.presets import preset_config
    from pmod_bench.profiler.arch import arch_from_config

    cfg = preset_config(preset)
    cfg.text_config.num_hidden_layers = layers
    return arch_from_config(f"{preset}-{layers}-layers", cfg)


def train_memory_bytes(arch, tokens: int) -> int:
    """A rough bf16 estimate of one training step's peak memory: the trained parameters x 8 bytes (weight, gradient,
    AdamW's two states, all bf16), the frozen vision tower x 2, ~(12 d + 4 m) saved activations per token and layer,
    and the logits over every position (bf16, their fp32 upcast in the loss, the gradient)."""
    t = arch.text
    per_layer = 8 * t.layer_params + 2 * tokens * (12 * t.hidden + 4 * t.intermediate)
    return (t.layers * per_layer + 8 * 2 * t.vocab * t.hidden + 12 * tokens * t.vocab
            + 2 * arch.vision.params + 8 * arch.projector_params)


def train_candidates(s: Suite, tokens: int) -> tuple[list[int], dict]:
    """Layer counts to try, largest first: on a GPU from the largest whose estimate is within 120% of the free memory
    (the estimate is rough; an out-of-memory costs a few seconds and falls back to the next)."""
    p = s.plan
    estimates = {L: train_memory_bytes(train_arch(p.arch, L), tokens) for L in p.train_layers}
    if not p.device.startswith("cuda"):
        return list(p.train_layers), estimates
    import torch

    free = torch.cuda.mem_get_info()[0]
    fitting = [L for L in p.train_layers if estimates[L] <= 1.2 * free]
    start = p.train_layers.index(fitting[0]) if fitting else len(p.train_layers) - 1
    return list(p.train_layers[start:]), estimates


def section_train(s: Suite) -> dict:
    from bench_train import analytic_ratio, measure

    s.release()
    p = s.plan
    T, shift = p.text_tokens, p.train_shift
    layers, estimates = train_candidates(s, vision_tokens(s) + T)
    repeats, warmup = max(1, p.repeats // 3), 1
    tried = []
    for L in layers:
        if s.over_budget():
            raise SectionSkipped(f"the global time budget ran out during the layer search (tried {tried})")
        s.note(f"train_step: {L} layers at {s.arch.text.hidden} wide, {warmup} warm-up + {repeats} interleaved steps each")
        arch = train_arch(p.arch, L)
        reset_peak(p.device)
        try:
            med, times = measure(arch, shift, 1, T, repeats, warmup, p.device, p.dtype, image=p.image_size)
        except Exception as exc:
            if not is_oom(exc):
                raise
            med = None
        free_memory()
        tried.append([L, "ok" if med else "out of memory"])
        if med:
            return train_result(s, arch, med, times, tried, estimates, peak_bytes(p.device), analytic_ratio(arch, shift, p.image_size, T))
    raise RuntimeError(f"no layer count fits in memory: tried {tried}")


def train_result(s: Suite, arch, med: dict, times: dict, tried: list, estimates: dict, peak: Optional[int], analytic) -> dict:
    p = s.plan
    base_tf, pmod_tf, flops_ratio = analytic
    tf = {"baseline": base_tf, "p-MoD": pmod_tf}
    achieved = {k: tf[k] / med[k] for k in med}
    return {"layers": arch.text.layers, "layers_of_the_full_model": s.arch.text.layers, "layers_tried": tried,
            "memory_estimate_bytes": {str(k): v for k, v in estimates.items()}, "hidden": arch.text.hidden,
            "intermediate": arch.text.intermediate, "heads": arch.text.heads,
            "image_size": list(p.image_size), "vision_tokens": vision_tokens(s), "text_tokens": p.text_tokens,
            "batch": 1, "dtype": p.dtype, "shift": p.train_shift, "step_s": med, "step_s_all": times,
            "step_time_ratio": med["p-MoD"] / med["baseline"], "train_flops_ratio": flops_ratio,
            "train_tflops_per_sample": tf, "achieved_tflops_per_s": achieved,
            "mfu": {k: v / s.hw.bf16_tflops for k, v in achieved.items()} if s.hw else None,
            "peak_memory_bytes": peak,
            "what": "forward + backward + AdamW over connector + LLM + routers (vision tower frozen), bench_train.measure; "
                    "FLOPs: the profiler's train_flops (backward = 2 x forward for trained parts)"}


def vision_tokens(s: Suite) -> int:
    from pmod_bench.profiler.arch import vision_layout

    return vision_layout(s.arch, s.plan.image_size).vision_tokens


# ------------------------------------------------------------------------------------------ environment
def environment(plan: Plan, hw) -> dict:
    import platform

    import torch
    import transformers

    import pmod_bench

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "pmod_bench": pmod_bench.__version__,
                           "flash_attn": package_version("flash-attn"), "cuda_runtime": torch.version.cuda,
                           "device": plan.device, "cpu_threads": torch.get_num_threads(),
                           "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    env["attention_implementations"] = {"sdpa": "available", "eager": "available",
                                        "flash_attention_2": flash_unavailable(plan.device) or "available"}
    if not plan.device.startswith("cuda"):
        return env
    props = torch.cuda.get_device_properties(0)
    name = torch.cuda.get_device_name()
    env.update(gpu_name=name, gpu_count=torch.cuda.device_count(), gpu_capability=list(torch.cuda.get_device_capability()),
               gpu_memory_bytes=int(props.total_memory), cudnn=torch.backends.cudnn.version(),
               driver_version=driver_version(), hardware=hardware_dict(hw))
    if "MIG" in name.upper():
        env["mig_note"] = "a MIG slice: the MFU is against the whole GPU's peak"
    return env


def package_version(name: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def driver_version() -> Optional[str]:
    """The NVIDIA driver (NVML through the profiler's telemetry, else nvidia-smi), or None."""
    from pmod_bench.profiler.latency import telemetry

    version = telemetry("cuda").get("driver_version")
    if version:
        return str(version)
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


# ------------------------------------------------------------------------------------------ the document
def new_document(plan: Plan, budget_s: float, selected: Iterable[str], argv: list[str]) -> dict:
    selected = set(selected)
    sections = {}
    for name in SECTIONS:
        chosen = name in selected
        sections[name] = {"status": "pending" if chosen else "skipped", "seconds": None, "data": None, "error": None,
                          "reason": "not run yet" if chosen else "not selected (--sections)"}
    return {"schema_version": SCHEMA_VERSION, "suite": "pmod-bench benchmarks/gpu_suite.py", "smoke": plan.smoke,
            "command": shlex.join(["python", "benchmarks/gpu_suite.py", *argv]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "updated": None, "elapsed_s": 0.0,
            "budget_s": budget_s, "plan": asdict(plan), "environment": None, "sections": sections}


def run_sections(doc: dict, funcs: dict[str, Callable[[], dict]], elapsed: Callable[[], float], budget_s: float,
                 write: Callable[[dict], None], log: Callable[[str], None] = log,
                 cleanup: Callable[[], None] = lambda: None) -> None:
    """Run every selected (pending) section in RUN_ORDER, each under its own status; ``write(doc)`` after each."""
    for name in RUN_ORDER:
        entry = doc["sections"][name]
        if entry["status"] != "pending":
            continue
        if elapsed() > budget_s:
            entry.update(status="skipped", reason=f"the global time budget (--budget-s {budget_s:g}) was exceeded "
                                                  f"({elapsed():.0f} s) before this section started")
        else:
            log(f"[gpu_suite {elapsed():6.1f}s] {name}: start")
            t0 = time.monotonic()
            try:
                entry.update(status="ok", data=funcs[name](), reason=None)
            except SectionSkipped as exc:
                entry.update(status="skipped", reason=str(exc))
            except Exception as exc:  # one failing section never loses the others
                entry.update(status="error", reason=None, error=f"{type(exc).__name__}: {exc}",
                             traceback=traceback.format_exc(limit=12))
                log(entry["traceback"])
            finally:
                cleanup()
            entry["seconds"] = round(time.monotonic() - t0, 2)
            log(f"[gpu_suite {elapsed():6.1f}s] {name}: {entry['status']} in {entry['seconds']:.1f} s"
                + (f" ({entry['error'] or entry['reason']})" if entry["status"] != "ok" else ""))
        doc["elapsed_s"] = round(elapsed(), 2)
        doc["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write(doc)


def jsonable(x: Any) -> Any:
    """The document as strict JSON: non-finite floats become the strings 'NaN' / 'Infinity' / '-Infinity'."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    if hasattr(x, "item"):  # a numpy / torch scalar
        return jsonable(x.item())
    return str(x)


def write_outputs(out_dir: Path, doc: dict) -> None:
    """OUTPUT/gpu_suite.json, then OUTPUT/gpu_suite.md (each atomic; a renderer bug never costs the JSON)."""
    from pmod_bench.atomic import atomic_write_text

    atomic_write_text(out_dir / "gpu_suite.json", json.dumps(jsonable(doc), indent=1, allow_nan=False) + "\n")
    from gpu_suite_render import render_markdown

    try:
        text = render_markdown(doc)
    except Exception as exc:  # pragma: no cover - a renderer bug
        text = f"# pmod-bench GPU suite\n\nThe summary could not be rendered ({type(exc).__name__}: {exc}); see gpu_suite.json.\n"
    atomic_write_text(out_dir / "gpu_suite.md", text)


# ------------------------------------------------------------------------------------------ CLI
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", "-o", default="runs/gpu", help="output directory (default: runs/gpu)")
    ap.add_argument("--sections", default="all", help=f"comma list of sections to run (default: all): {','.join(SECTIONS)}")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="no section starts after this many seconds (default: 420; the rest are recorded as skipped)")
    ap.add_argument("--smoke", action="store_true", help="every section on CPU at the tiny preset's shapes (CI plumbing)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default: 10; --smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed warm-up runs (default: 3; --smoke 1)")
    ap.add_argument("--max-batch", type=int, default=None, help="cap of the largest-batch search (default: 128; --smoke 4)")
    ap.add_argument("--refine", type=int, default=None, help="bisection steps of the largest-batch search (default: 3)")
    return ap.parse_args(argv)


def selected_sections(text: str) -> list[str]:
    if text.strip().lower() == "all":
        return list(SECTIONS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise ValueError(f"unknown section(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(SECTIONS)} or all")
    return names


def check_args(args: argparse.Namespace) -> Optional[str]:
    """The one-line error of bad input, or None."""
    try:
        selected_sections(args.sections)
    except ValueError as exc:
        return f"--sections: {exc}"
    if not args.budget_s > 0:
        return f"--budget-s must be > 0, got {args.budget_s:g}"
    if Path(args.output).exists() and not Path(args.output).is_dir():
        return f"--output {args.output} exists and is not a directory; choose another"
    for flag, value, low in (("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0), ("--max-batch", args.max_batch, 1),
                             ("--refine", args.refine, 0)):
        if value is not None and value < low:
            return f"{flag} must be >= {low}, got {value}"
    return None


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    error = check_args(args)
    if error:
        print(f"gpu_suite: error: {error}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: never reach for the hub (or its kernels)
    # before the first CUDA allocation: the largest-batch search frees and reallocates very different sizes
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("gpu_suite: error: no CUDA device; run it on one GPU, or pass --smoke for the CPU plumbing run", file=sys.stderr)
        return 2
    plan = smoke_plan(args) if args.smoke else gpu_plan(args)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    suite = Suite(plan, out, args.budget_s)
    doc = new_document(plan, args.budget_s, selected_sections(args.sections), argv)
    try:
        doc["environment"] = environment(plan, suite.hw)
    except Exception as exc:  # a driver query failing must not stop the measurements
        doc["environment"] = {"error": f"{type(exc).__name__}: {exc}", "device": plan.device}
    suite.note(f"{doc['environment'].get('gpu_name', 'cpu')}; writing {out}/gpu_suite.json and .md after every section")
    write_outputs(out, doc)
    funcs = {"prefill": lambda: section_prefill(suite), "decode": lambda: section_decode(suite),
             "flash_vs_sdpa": lambda: section_flash(suite), "train_step": lambda: section_train(suite),
             "profile": lambda: section_profile(suite), "methods": lambda: section_methods(suite)}
    run_sections(doc, funcs, suite.elapsed, args.budget_s, lambda d: write_outputs(out, d), cleanup=free_memory)
    statuses = {n: e["status"] for n, e in doc["sections"].items()}
    print((out / "gpu_suite.md").read_text(), flush=True)  # the summary, also where only the output is kept
    suite.note(f"done: {statuses}; {out}/gpu_suite.json, {out}/gpu_suite.md")
    return 1 if "error" in statuses.values() else 0


if __name__ == "__main__":
    sys.exit(main())
