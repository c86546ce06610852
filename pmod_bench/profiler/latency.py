"""Latency of prefill (time to first token) and decode (per token), plus device telemetry.

Method: ``warmup`` untimed prefill + decode runs, then ``repeats`` timed runs. Each run times the
prefill (vision tower + projector + LLM over the prompt, logits of the last position: what a
user waits for before the first token) and then ``gen_tokens - 1`` decode steps one by one (each
feeds the previous greedy token, with the cache). On CUDA every phase is timed with CUDA events
between ``torch.cuda.synchronize()`` calls; on CPU with ``time.perf_counter``. Reported: median,
10th/90th percentiles, min and the number of samples. Peak memory (CUDA) is reset before the
prefill and read after it and after the decode.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class Stats:
    """Summary of a list of times, ms."""

    median: float
    p10: float
    p90: float
    min: float
    n: int

    @classmethod
    def of(cls, xs: list[float]) -> Optional["Stats"]:
        if not xs:
            return None
        s = sorted(xs)

        def q(p: float) -> float:
            if len(s) == 1:
                return s[0]
            k = p * (len(s) - 1)
            lo = int(k)
            hi = min(lo + 1, len(s) - 1)
            return s[lo] + (s[hi] - s[lo]) * (k - lo)

        return cls(statistics.median(s), q(0.1), q(0.9), s[0], len(s))


@dataclass(frozen=True)
class Timing:
    prefill: Stats
    decode: Optional[Stats]
    peak_memory_prefill_bytes: Optional[int] = None
    peak_memory_bytes: Optional[int] = None
    device: str = "cpu"
    telemetry: dict = field(default_factory=dict)


class _Timer:
    def __init__(self, device: str):
        import torch

        self.cuda = str(device).startswith("cuda")
        self.torch = torch

    def start(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            ev = self.torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, start) -> float:
        if self.cuda:
            end = self.torch.cuda.Event(enable_timing=True)
            end.record()
            self.torch.cuda.synchronize()
            return float(start.elapsed_time(end))
        return (time.perf_counter() - start) * 1e3


def _run(model, batch: dict[str, Any], steps: int, timer: Optional[_Timer], after_prefill=None):
    """One prefill + ``steps`` decode steps; returns (prefill ms, [decode ms])."""
    from pmod_bench.model.cache import output_cache
    from pmod_bench.model.compat import cache_kwargs

    import torch

    t0 = timer.start() if timer else None
    out = model(**batch, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1:].argmax(-1)
    prefill_ms = timer.stop(t0) if timer else 0.0
    if after_prefill is not None:
        after_prefill()
    cache, mask = output_cache(out), batch["attention_mask"]
    decode_ms = []
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        t0 = timer.start() if timer else None
        out = model(input_ids=nxt, attention_mask=mask, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        if timer:
            decode_ms.append(timer.stop(t0))
        cache = output_cache(out)
    return prefill_ms, decode_ms


def time_generation(model, batch: dict[str, Any], gen_tokens: int = 16, warmup: int = 2, repeats: int = 5, device: str = "cpu") -> Timing:
    """Time prefill and decode of ``model`` on ``batch`` (see the module docstring)."""
    import torch

    steps = max(int(gen_tokens) - 1, 0)
    timer = _Timer(device)
    cuda = timer.cuda
    with torch.inference_mode():
        for _ in range(max(int(warmup), 0)):
            _run(model, batch, steps, None)
        prefill, decode = [], []
        peaks = {"prefill": None, "all": None}

        def read_peak(key: str) -> None:
            if cuda:
                peaks[key] = max(peaks[key] or 0, int(torch.cuda.max_memory_allocated(device)))

        for _ in range(max(int(repeats), 1)):
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            p, d = _run(model, batch, steps, timer, after_prefill=lambda: read_peak("prefill"))
            read_peak("all")
            prefill.append(p)
            decode.extend(d)
        peak_prefill, peak = peaks["prefill"], peaks["all"]
    return Timing(Stats.of(prefill), Stats.of(decode), peak_prefill, peak, device_name(device), telemetry(device))


def device_name(device: str) -> str:
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def telemetry(device: str) -> dict[str, Any]:
    """Device facts at the time of the call; keys absent where unavailable (CPU, no NVML)."""
    out: dict[str, Any] = {}
    if not str(device).startswith("cuda"):
        try:
            import resource

            out["cpu_max_rss_bytes"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        except (ImportError, OSError):
            pass
        return out
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
    except Exception:  # no driver / library: telemetry is optional
        return out
    try:
        import torch

        idx = torch.device(device).index
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device() if idx is None else idx)
        probes = {
            "gpu_name": lambda: pynvml.nvmlDeviceGetName(handle),
            "gpu_memory_used_bytes": lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used),
            "gpu_memory_total_bytes": lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
            "gpu_power_w": lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            "gpu_power_limit_w": lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0,
            "gpu_sm_clock_mhz": lambda: int(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)),
            "gpu_mem_clock_mhz": lambda: int(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM)),
            "gpu_max_sm_clock_mhz": lambda: int(pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)),
            "gpu_temperature_c": lambda: int(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)),
            "driver_version": lambda: pynvml.nvmlSystemGetDriverVersion(),
        }
        for key, probe in probes.items():
            try:
                value = probe()
                out[key] = value.decode() if isinstance(value, bytes) else value
            except Exception:  # a probe the device does not support
                pass
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return out


__all__ = ["Stats", "Timing", "time_generation", "telemetry", "device_name"]
