"""The readable summary of benchmarks/gpu_suite.py: ``render_markdown(doc)`` turns its JSON document into Markdown.

Pure functions of the document (no torch, nothing measured here); a section that did not run shows its status and
reason or error.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from pmod_bench.profiler.latency import UNRELIABLE_SPREAD  # the module imports torch only inside its functions


def fmt(x: Any, spec: str = ".3f", none: str = "–") -> str:
    if x is None:
        return none
    if isinstance(x, str):
        return x
    return format(x, spec)


def pct(x: Optional[float]) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def size(x: Optional[int]) -> str:
    """Bytes in binary units (GiB, MiB, KiB)."""
    if x is None:
        return "–"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x} B"


def spread_flag(spread: Optional[float]) -> str:
    """The spread (max - min) / median, marked ! above the profiler's limit (the ratio is then not to be trusted)."""
    return "–" if spread is None else f"{spread:.0%}" + (" !" if spread > UNRELIABLE_SPREAD else "")


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return out + ["| " + " | ".join(r) + " |" for r in rows] + [""]


def render_environment(doc: dict) -> list[str]:
    env = doc.get("environment") or {}
    hw = env.get("hardware") or {}
    attn = env.get("attention_implementations") or {}
    lines = [f"- device: {env.get('gpu_name', env.get('device', '?'))}"
             + (f" (driver {env.get('driver_version') or '?'}, CUDA {env.get('cuda_runtime') or '?'}, "
                f"compute capability {'.'.join(str(c) for c in env.get('gpu_capability') or []) or '?'}, "
                f"{size(env.get('gpu_memory_bytes'))})" if env.get("gpu_name") else ""),
             f"- torch {env.get('torch')}, transformers {env.get('transformers')}, flash-attn {env.get('flash_attn') or 'absent'}, "
             f"pmod-bench {env.get('pmod_bench')}, Python {env.get('python')}",
             "- attention: " + ", ".join(f"{k} ({v})" for k, v in attn.items())]
    if hw:
        lines.append(f"- peak for MFU: {hw['name']}, {hw['bf16_tflops']:g} dense BF16 TFLOP/s ({hw['source']})")
    if env.get("mig_note"):
        lines.append(f"- {env['mig_note']}")
    return lines + [""]


def render_prefill(d: dict) -> list[str]:
    lines = [f"{d['arch']}, {d['vision_tokens']} vision + {d['text_tokens']} text tokens, batch 1, {d['dtype']}; "
             f"median of {d['repeats']} interleaved repeats after {d['warmup']} warm-up ({d['timing']}). "
             f"FLOPs: {d['flops']}.", ""]
    for attn, why in (d.get("attention_unavailable") or {}).items():
        lines += [f"{attn}: not timed ({why}).", ""]
    rows = [[r["attn"], r["path"], r["variant"], f"{r['latency_ms']:.2f} ({r['latency_ms_min']:.2f}-{r['latency_ms_max']:.2f})",
             spread_flag(r["spread"]), fmt(r["latency_ratio"]), fmt(r["flops_ratio"]), fmt(r["latency_over_flops"], ".2f"),
             fmt(r["achieved_tflops_per_s"], ".3g"), pct(r["mfu"]), fmt(r["paper_latency_ratio"])] for r in d["rows"]]
    return lines + table(["attention", "path", "variant", "ms (min-max)", "spread", "latency ratio", "FLOPs ratio",
                          "latency / FLOPs", "TFLOP/s", "MFU", "paper latency ratio (A6000)"], rows) + [
        "! = spread above 25%: that latency ratio is not to be trusted.", ""]


def render_decode(d: dict) -> list[str]:
    lines = [f"{d['runs']} interleaved run(s) of {d['decode_steps_per_run']} decode steps after the prefill; median step "
             f"({d['timing']}). {d['kv']}.", ""]
    rows = [[str(r["batch"]), r["variant"], fmt(r["decode_ms_per_step"], ".2f"), fmt(r["tokens_per_s"], ".1f"),
             fmt(r["speedup_vs_baseline"], ".2f") + "x", size(r["kv_bytes_measured"]), size(r["kv_bytes_analytic"]),
             fmt(r["kv_ratio"]), size(r["peak_memory_bytes"])] for r in d["rows"]]
    lines += table(["batch", "variant", "ms / step", "tokens/s", "speed-up", "KV (cache)", "KV (analytic)", "KV ratio",
                    "peak memory"], rows)
    rows = [[name, str(x["batch"]), fmt(x["tokens_per_s"], ".1f"), fmt(x["decode_ms_per_step"], ".2f"),
             size(x["peak_memory_bytes"]), fmt(x["first_failing_batch"], "d"),
             ", ".join(f"{b}: {s}" for b, s in x["tried"]) or "–", x.get("note") or ""]
            for name, x in d["largest_batch"].items()]
    return lines + ["Largest batch that fits:", ""] + table(
        ["variant", "batch", "tokens/s", "ms / step", "peak memory", "first failing", "tried", "note"], rows)


def render_flash(d: dict) -> list[str]:
    lines = [f"{d['candidate']} vs {d['reference']}: prefill + {d['decode_steps']} cached decode steps; {d['method']}."]
    if d.get("note"):
        lines.append(f"Note: {d['note']}.")
    rows = [[c["variant"], c["case"], str(c["padding_tokens"]), ", ".join(f"{x:.3g}" for x in c["max_abs_delta_per_step"]),
             fmt(c["max_abs_delta"], ".4g"), fmt(c["logit_scale"], ".3g"), fmt(c["relative_delta"], ".3g"),
             pct(c["argmax_agreement"])] for c in d["cases"]]
    return lines + [""] + table(["variant", "batch", "padding", "max |Δ logits| per step", "max", "max |logit|", "relative",
                                 "argmax agrees"], rows)


def render_train(d: dict) -> list[str]:
    mfu = d.get("mfu") or {}
    lines = [f"{d['layers']} decoder layers (of the full model's {d['layers_of_the_full_model']}) at width {d['hidden']} "
             f"(MLP {d['intermediate']}, {d['heads']} heads), {d['vision_tokens']} vision + {d['text_tokens']} text tokens, "
             f"batch {d['batch']}, {d['dtype']}; layer counts tried: "
             + ", ".join(f"{L} ({s})" for L, s in d["layers_tried"]) + f"; peak memory {size(d['peak_memory_bytes'])}.",
             f"What: {d['what']}.", ""]
    rows = [[k, fmt(d["step_s"][k], ".3f"), fmt(d["train_tflops_per_sample"][k], ".4g"),
             fmt(d["achieved_tflops_per_s"][k], ".3g"), pct(mfu.get(k))] for k in ("baseline", "p-MoD")]
    lines += table(["model", "step s (median)", "train TFLOPs / sample", "TFLOP/s", "MFU"], rows)
    return lines + [f"p-MoD-{d['shift']:g} / baseline: step time {d['step_time_ratio']:.3f} (measured), training FLOPs "
                    f"{d['train_flops_ratio']:.3f} (analytic); the paper's GPU-hours ratio is 0.777 (435 / 560).", ""]


def render_profile(d: dict) -> list[str]:
    rows = []
    for r in d["rows"]:
        p = r["paper"]
        rows.append([r["variant"], fmt(r["ttft_ms"], ".1f"), fmt(p.get("latency_ms"), ".1f"), fmt(r["latency_ratio"]),
                     fmt(r["paper_latency_ratio"]), fmt(r["decode_ms_per_token"], ".2f"), size(r["peak_memory_bytes"]),
                     fmt(r["prefill_tflops"], ".4g"), fmt(p.get("tflops"), ".4g"), pct(r["kv_cache_ratio"]),
                     pct(p.get("kv_cache_ratio")), pct(r["mfu"])])
    lines = [f"`{d['command']}` (library call; run directory {d['run_dir']}). Paper: {d['paper']}.", ""]
    lines += table(["variant", "TTFT ms", "paper ms", "latency ratio", "paper ratio", "decode ms/token", "peak memory",
                    "TFLOPs", "paper TFLOPs", "KV", "paper KV", "MFU"], rows)
    return lines + ["The profiler's own table:", "", "```", d["table"].rstrip("\n"), "```", ""]


def render_methods(d: dict) -> list[str]:
    rows = [[r["spec"], f"{r['latency_ms']:.2f}", spread_flag(r["spread"]), fmt(r["latency_ratio"]), fmt(r["ttft_flops_ratio"]),
             fmt(r["llm_flops_ratio"]), fmt(r["latency_over_ttft_flops"], ".2f"), pct(r["solver_rel_err"])]
            for r in d["rows"]]
    lines = [f"Budgets solved to {d['match']}'s LLM prefill FLOPs; latency: {d['latency']} ({d['timing']}).", ""]
    lines += table(["variant", "TTFT ms", "spread", "latency ratio", "TTFT FLOPs ratio", "LLM FLOPs ratio", "latency / TTFT FLOPs",
                    "solver error"], rows)
    return lines + [n for n in d.get("notes") or []] + [""]


RENDERERS: dict[str, Callable[[dict], list[str]]] = {
    "prefill": render_prefill, "decode": render_decode, "flash_vs_sdpa": render_flash, "train_step": render_train,
    "profile": render_profile, "methods": render_methods,
}


def render_markdown(doc: dict) -> str:
    """The whole summary: environment, then one part per section (its table, or its status and reason)."""
    lines = ["# pmod-bench GPU suite" + (" (smoke run: tiny shapes on CPU, plumbing only)" if doc.get("smoke") else ""), "",
             f"`{doc['command']}`, started {doc['started']}, {doc['elapsed_s']:.0f} s of the {doc['budget_s']:g} s budget "
             f"(updated {doc.get('updated') or '–'}).", ""]
    lines += render_environment(doc)
    for name, entry in doc["sections"].items():
        took = f", {entry['seconds']:.1f} s" if entry.get("seconds") is not None else ""
        lines += [f"## {name}: {entry['status']}{took}", ""]
        if entry["status"] == "ok" and entry.get("data") is not None:
            try:
                lines += RENDERERS[name](entry["data"])
            except Exception as exc:  # one section's unexpected data never costs the others' summary
                lines += [f"(not rendered: {type(exc).__name__}: {exc}; the numbers are in gpu_suite.json)", ""]
        else:
            lines += [entry.get("error") or entry.get("reason") or "", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


__all__ = ["render_markdown", "RENDERERS"]
