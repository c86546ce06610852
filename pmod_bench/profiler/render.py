"""Render profile rows: the console table (beside the paper's numbers), JSON, CSV, run directories.

Rows are built once (:func:`.core.profile`); every format here is a pure function of the row dicts,
except the writers, which write atomically (temporary file in the same directory, then
``os.replace``) as docs/RUN_DIRS.md requires.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from pmod_bench.atomic import atomic_write_text as atomic_write  # re-exported in __all__

from .paper import PAPER_EFFICIENCY, is_paper_scenario, paper_value

SCHEMA_VERSION = 1


def _rows(rows: Iterable[Any]) -> list[dict]:
    return [r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in rows]


def _fmt(x: Optional[float], spec: str, none: str = "–") -> str:
    return none if x is None else format(x, spec)


def _pct(x: Optional[float], digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def _unit(tflops: float) -> tuple[str, float]:
    """A readable FLOPs unit for values around ``tflops`` TFLOPs: (name, factor from TFLOPs)."""
    if tflops >= 0.1:
        return "TFLOPs", 1.0
    if tflops >= 1e-4:
        return "GFLOPs", 1e3
    return "MFLOPs", 1e6


def _align(table: list[list[str]], right: Sequence[bool]) -> list[str]:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    out = []
    for k, r in enumerate(table):
        cells = [c.rjust(w) if right[i] else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  ".join(cells).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def format_table(rows: Iterable[Any], paper: bool = True) -> str:
    """The efficiency half of the paper's Table 7, one block per (arch, scenario), paper numbers beside."""
    rows = _rows(rows)
    if not rows:
        return "(no rows)"
    blocks: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["arch"], tuple(r["image_size"]), r.get("images", 1), r.get("frames"), r.get("video_duration_s"), r["text_tokens"],
               r["gen_tokens"], r["batch_size"])
        blocks.setdefault(key, []).append(r)
    lines: list[str] = []
    for (arch, size, _, _, _, T, G, B), rs in blocks.items():
        r0 = rs[0]
        unit, scale = _unit(max(r["prefill_tflops"] for r in rs))
        lines.append(
            f"{arch} · {_image_phrase(r0)} -> {r0['vision_tokens']:,} vision tokens "
            f"+ {T} text tokens, {G} generated · batch {B} · vision tower + projector {r0['vision_tflops'] * scale:.2f} {unit}/sample"
        )
        # the paper's numbers describe one scenario (672x672, 58 text tokens; latency at batch 1): nowhere else
        in_scenario = r0.get("paper_scenario", is_paper_scenario(size, T) and r0.get("images", 1) == 1)
        has_paper = paper and in_scenario and any(paper_value(arch, r, "tflops") is not None for r in rs)
        paper_latency = has_paper and B == 1
        timed = [r for r in rs if r["prefill_latency_ms"] is not None]
        has_floor = any(r.get("prefill_floor_ms") is not None for r in rs)
        head = ["Variant", unit, "(causal)", "(paper conv.)"]
        right = [False, True, True, True]
        if has_paper:
            head.append("paper")
            right.append(True)
        head += ["ratio", "KV cache"]
        right += [True, True]
        if has_paper:
            head.append("paper")
            right.append(True)
        head += ["TTFT ms"]
        right += [True]
        if timed:
            head += ["(min-max)"]
            right += [True]
        head += ["decode ms/tok"]
        right += [True]
        if paper_latency:
            head.append("paper ms")
            right.append(True)
        if has_floor:
            head += [f"floor ms ({rs[0].get('hardware')})"]
            right += [True]
        head.append("GPU h est.")
        right.append(True)
        if has_paper:
            head.append("paper GPU h")
            right.append(True)
        table = [head]
        for r in rs:
            pv = lambda m, r=r: paper_value(arch, r, m)  # noqa: E731
            cells = [r["variant"], f"{r['prefill_tflops'] * scale:.2f}", f"{r['prefill_tflops_causal'] * scale:.2f}",
                     f"{r.get('prefill_tflops_paper', 0.0) * scale:.2f}"]
            if has_paper:
                cells.append(_fmt(pv("tflops"), ".2f"))
            cells += [_pct(r["tflops_ratio"]), _pct(r["kv_cache_ratio"])]
            if has_paper:
                cells.append(_pct(pv("kv_cache_ratio")))
            flag = " !" if r.get("latency_unreliable") else ""
            cells += [_fmt(r["prefill_latency_ms"], ".1f") + flag]
            if timed:
                lo, hi = r.get("prefill_latency_ms_min"), r.get("prefill_latency_ms_max")
                cells.append("–" if lo is None or hi is None else f"{lo:.1f}-{hi:.1f}")
            cells += [_fmt(r["decode_latency_ms_per_token"], ".2f")]
            if paper_latency:
                cells.append(_fmt(pv("latency_ms"), ".1f"))
            if has_floor:
                cells.append(_fmt(r.get("prefill_floor_ms"), ".1f"))
            cells.append(_fmt(r["train_gpu_hours"], ".0f"))
            if has_paper:
                cells.append(_fmt(pv("gpu_hours"), ".0f"))
            table.append(cells)
        lines += _align(table, right)
        lines += _notes(rs, has_paper, paper and not in_scenario and arch in PAPER_EFFICIENCY)
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _image_phrase(r: dict) -> str:
    """What the model does with the image(s): LLaVA-1.5 resizes it to one tile, LLaVA-NeXT / LLaVA-OneVision tile it
    (anyres; OneVision shrinks a large tiled feature map, and reads each of several images as one tile), Qwen2.5-VL
    resizes it to multiples of 28 px within its pixel range and merges 2x2 patches into a token."""
    if r.get("frames"):
        return _video_phrase(r)
    w, h = r["image_size"]
    n = r.get("images", 1)
    image = f"{w}x{h} image" if n == 1 else f"{n} x {w}x{h} images, each"
    if r.get("resized_image_size"):
        rw, rh = r["resized_image_size"]
        lo, hi = r.get("pixel_range") or (None, None)
        within = f" (pixels {lo:,}..{hi:,})" if lo else ""
        return f"{image} resized to {rw}x{rh}{within}, {rw // 28}x{rh // 28} merged 28 px patches"
    tiles, side = r.get("tiles", 1) // n, r.get("tile_size") or 0
    if tiles <= 1:
        if side and (w, h) != (side, side):
            return f"{image} resized to {side}x{side} (1 tile)"
        return f"{image} (1 tile)"
    tile = f" of {side}x{side}" if side else ""
    pooled = r.get("downsampled_grid")
    shrunk = f", its tiles' features downsampled to {pooled[0]}x{pooled[1]} (anyres_max_9)" if pooled else ""
    return f"{image} -> {tiles - 1} high-resolution tile(s){tile} + the base image resized to one tile{shrunk}"


def _video_phrase(r: dict) -> str:
    """A video row: the frames the model sees (of a clip: how they were sampled) and what each becomes."""
    w, h = r["image_size"]
    n, grid = r["frames"], r.get("video_grid") or [0, 0, 0]
    clip = ""
    if r.get("video_duration_s") is not None:
        read = r.get("frames_read")
        how = f"read at {r['video_fps']:g} fps: {read}, " if r.get("video_fps") is not None and read else ""
        clip = f" of a {r['video_duration_s']:g} s clip ({how}{n} kept)"
    video = f"{n} frames{clip} of {w}x{h}"
    if r.get("resized_image_size"):  # Qwen2.5-VL: frame pairs of merged 28 px patches
        rw, rh = r["resized_image_size"]
        return f"{video}, each resized to {rw}x{rh}: {grid[0]} frame pair(s) of {grid[1]}x{grid[2]} merged 28 px patches"
    side = r.get("tile_size") or 0
    return (f"{video}, each resized to {side}x{side} (1 tile), its features pooled to {grid[1]}x{grid[2]}, "
            "+ 1 newline after the video")


def _notes(rs: list[dict], has_paper: bool, off_scenario: bool = False) -> list[str]:
    r0 = rs[0]
    logits = "last position" if r0.get("lm_head_positions", "last") == "last" else "all positions"
    notes = [
        "FLOPs: LLM prefill per sample, 2 FLOPs per multiply-add, attention counted full ('causal': halved), "
        f"lm_head on the {logits}; ratio = TFLOPs / baseline's.",
        "paper conv.: decoder weights + routers + lm_head on all positions, no attention products, no vision tower "
        "(DeepSpeed profiler with flash attention): the convention of the paper's TFLOPs.",
    ]
    errs = [r["flops_check_rel_err"] for r in rs if r.get("flops_check_rel_err") is not None]
    if errs:
        notes.append(f"FLOPs check: FlopCounterMode on the meta device agrees with the analytic count (max |Δ| {100 * max(errs):.3f}%).")
    notes.append("KV cache: Σ_l kept vision tokens / (L·V), the paper's convention; all-token ratios and bytes are in the JSON.")
    lat = [r for r in rs if r["prefill_latency_ms"] is not None]
    if lat:
        r = lat[0]
        notes.append(
            f"Latency: median (min-max) of {r.get('latency_repeats')} runs per variant, interleaved across variants, on "
            f"{r['device']} ({r.get('latency_dtype')}, random weights); TTFT = vision + LLM prefill; decode = per token "
            "with the cache."
        )
        if r["device"] == "cpu":
            notes.append("CPU latency depends on what else the machine runs (it can vary a hundredfold between a loaded "
                         "and an idle machine): compare only rows of one run, and mind the spread.")
        flagged = [x["variant"] for x in lat if x.get("latency_unreliable")]
        if flagged:
            notes.append(f"! unreliable: spread (max - min) / median above 25% for {', '.join(flagged)} or its baseline; "
                         "its latency ratio is not a measurement (re-run on an idle machine or with more --repeats).")
    else:
        reason = next((r.get("latency_note") for r in rs if r.get("latency_note")), "not measured")
        notes.append(f"Latency: {reason}.")
    if any(r.get("prefill_floor_ms") is not None for r in rs):
        notes.append("floor: roofline lower bound of TTFT on that hardware (causal FLOPs / peak vs weights + KV bytes / bandwidth).")
    elif r0["device"] == "cpu":
        notes.append("Roofline floor: add --hardware A6000 (or H100-SXM, A100-80GB-SXM, ...).")
    if r0.get("train_recipe"):
        if r0.get("train_utilisation") is not None:
            constants = (f"effective utilisation {r0['train_utilisation']:g} of peak (not a measured MFU) + "
                         f"{r0['train_overhead_s_per_sample']:g} GPU-s/sample overhead, {r0.get('train_calibration')}")
        else:  # rows written before the constants were in them
            constants = "throughput constants fitted to the paper's baseline and p-MoD-0.5 GPU hours (not a measured MFU)"
        notes.append(
            f"GPU h est.: recipe {r0['train_recipe']} ({r0.get('train_samples'):,} samples of {r0.get('train_tokens_per_sample'):,} "
            f"tokens on {r0.get('train_hardware')}), {r0['train_tflops_per_sample']:.1f} train TFLOPs/sample for the first row; "
            f"{constants}."
        )
    if any(r.get("train_run") for r in rs):  # --train-run: which rows its measured throughput describes
        used = [r["variant"] for r in rs if r.get("train_run_match")]
        why = next((r.get("train_run_note") for r in rs if r.get("train_run_match") is False), None)
        measured = ", ".join(f"{r['variant']} {r['train_gpu_hours_measured']:.0f} GPU h"
                             for r in rs if r.get("train_run_match") and r.get("train_gpu_hours_measured") is not None)
        notes.append(f"train run: measured throughput used for {', '.join(used)}" + (f" ({measured})" if measured else "")
                     + (f"; other rows: {why}" if why else "") + "." if used else f"train run: {why}.")
    if has_paper:
        notes.append("paper: p-MoD paper Table 7 (LLaVA-NeXT-7B; latency on one RTX A6000, batch 1) / Table 1 (LLaVA-1.5-7B).")
    elif off_scenario:
        notes.append("paper: no paper column; the paper's numbers are for a 672x672 image with 58 text tokens only.")
    return ["  " + n for n in notes]


# ------------------------------------------------------------------------------------ JSON / CSV
def rows_to_csv(rows: Iterable[Any]) -> str:
    """CSV of the rows; list and dict values as JSON strings (docs/RUN_DIRS.md)."""
    rows = _rows(rows)
    if not rows:
        return ""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict, tuple)) else ("" if v is None else v)) for k, v in r.items()})
    return buf.getvalue()


def profile_document(rows: Iterable[Any], **extra: Any) -> dict[str, Any]:
    from .core import CONVENTIONS

    return {"rows": _rows(rows), "conventions": CONVENTIONS, **extra}


def write_json(path: "str | Path", rows: Iterable[Any], **extra: Any) -> None:
    atomic_write(path, json.dumps(profile_document(rows, **extra), indent=1, allow_nan=False) + "\n")


def write_run_dir(run_dir: "str | Path", rows: Iterable[Any], command: str, label: Optional[str] = None,
                  created: Optional[str] = None, hosts: Optional[dict] = None, **extra: Any) -> Path:
    """run.json + profile.json + profile.csv (docs/RUN_DIRS.md), each written atomically. ``hosts`` maps each row's
    ``arch`` to its host family (``pmod_bench.model.hosts.family_of``): run.json ``hosts``, and ``host`` when one."""
    from pmod_bench import __version__

    d = Path(run_dir)
    if d.exists() and not d.is_dir():
        raise FileExistsError(f"{d} exists and is not a directory; choose another --output.")
    d.mkdir(parents=True, exist_ok=True)
    rows = _rows(rows)
    meta: dict[str, Any] = {
        "kind": "profile", "schema_version": SCHEMA_VERSION,
        "created": created or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "pmod_bench_version": __version__, "command": command,
    }
    if hosts:
        families = sorted({str(h) for h in hosts.values()})
        meta["host"] = families[0] if len(families) == 1 else None
        meta["hosts"] = dict(hosts)
    if label:
        meta["label"] = label
    write_json(d / "profile.json", rows, **extra)
    atomic_write(d / "profile.csv", rows_to_csv(rows))
    atomic_write(d / "run.json", json.dumps(meta, indent=1) + "\n")  # last: a run.json means the run is complete
    return d


__all__ = ["format_table", "rows_to_csv", "profile_document", "write_json", "write_run_dir", "atomic_write"]
