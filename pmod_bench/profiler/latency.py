"""Latency of prefill (time to first token) and decode (per token), plus device telemetry.

Method: ``warmup`` untimed prefill + decode runs, then ``repeats`` timed runs. Each run times the
prefill (vision tower + projector + LLM over the prompt, logits of the last position: what a
user waits for before the first token) and then ``gen_tokens - 1`` decode steps one by one (each
feeds the previous greedy token, with the cache). On CUDA every phase is timed with CUDA events
between ``torch.cuda.synchronize()`` calls; on CPU with ``time.perf_counter``. Reported: median,
10th/90th percentiles, min, max, the spread (max - min) / median and the number of samples. Peak
memory (CUDA) is reset before the prefill and read after it and after the decode.

A model running a comparison method (``pmod_bench.methods.apply_method``) is timed the same way: its prefill is the
method's (vision tower, the method's selection or merge, the LLM on the tokens it keeps; :func:`_method_prefill`), its
decode steps read the shortened cache.

Several variants are timed **interleaved** (:func:`time_interleaved`): repeat 1 of every variant,
then repeat 2 of every variant, ...; a change of machine load (other processes on a shared CPU can
change CPU latency a hundredfold) then hits every variant alike instead of one, and the spread shows
it. A ratio whose rows have a spread above :data:`UNRELIABLE_SPREAD` is flagged as unreliable.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

#: (max - min) / median of the timed repeats above which a latency (and any ratio built from it) is unreliable
UNRELIABLE_SPREAD = 0.25


@dataclass(frozen=True)
class Stats:
    """Summary of a list of times, ms."""

    median: float
    p10: float
    p90: float
    min: float
    n: int
    max: float = 0.0

    @property
    def spread(self) -> float:
        """(max - min) / median: 0 for perfectly repeatable times."""
        return (self.max - self.min) / self.median if self.median > 0 else 0.0

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

        return cls(statistics.median(s), q(0.1), q(0.9), s[0], len(s), s[-1])


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
    from pmod_bench.model.hosts import host_for

    import torch

    host = host_for(model)
    t0 = timer.start() if timer else None
    batch = _method_prefill(model, batch)
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
        out = model(input_ids=nxt, attention_mask=mask, **cache_kwargs(model, cache), **host.decode_inputs(model, mask),
                    use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        if timer:
            decode_ms.append(timer.stop(t0))
        cache = output_cache(out)
    return prefill_ms, decode_ms


def _method_prefill(model, batch: dict[str, Any]) -> dict[str, Any]:
    """The prefill inputs of ``model``: ``batch`` itself, or, under a comparison method that shortens the prompt (its
    ``applied_method``, :mod:`pmod_bench.methods.apply`), the shortened inputs the model's own forward would build from
    it (what the method costs is timed with the prefill); the decode steps continue from their attention mask."""
    method = getattr(model, "applied_method", None)
    if method is None:
        return batch
    return method.prefill(model, dict(batch))  # a copy: the method takes the pixel inputs out of what it is given


def time_generation(model, batch: dict[str, Any], gen_tokens: int = 16, warmup: int = 2, repeats: int = 5, device: str = "cpu") -> Timing:
    """Time prefill and decode of ``model`` on ``batch`` (see the module docstring)."""
    return time_interleaved({"model": model}, batch, gen_tokens, warmup, repeats, device)["model"]


def time_interleaved(models: Mapping[str, Any], batch: dict[str, Any], gen_tokens: int = 16, warmup: int = 2,
                     repeats: int = 5, device: str = "cpu",
                     progress: Optional[Callable[[str], None]] = None) -> dict[str, Timing]:
    """Time every model of ``models`` on ``batch``, repeats interleaved across the models (module docstring).

    ``progress(message)`` is called before each warm-up and each timed run.
    """
    import torch

    steps = max(int(gen_tokens) - 1, 0)
    timer = _Timer(device)
    cuda = timer.cuda
    note = progress or (lambda msg: None)
    names = list(models)
    n_rep = max(int(repeats), 1)
    prefill: dict[str, list[float]] = {k: [] for k in names}
    decode: dict[str, list[float]] = {k: [] for k in names}
    peaks: dict[str, dict[str, Optional[int]]] = {k: {"prefill": None, "all": None} for k in names}

    def read_peak(name: str, key: str) -> None:
        if cuda:
            peaks[name][key] = max(peaks[name][key] or 0, int(torch.cuda.max_memory_allocated(device)))

    with torch.inference_mode():
        for name in names:
            for w in range(max(int(warmup), 0)):
                note(f"warm-up {w + 1}/{warmup} · {name}")
                _run(models[name], batch, steps, None)
        for r in range(n_rep):
            for name in names:
                note(f"timing {r + 1}/{n_rep} · {name}")
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                p, d = _run(models[name], batch, steps, timer, after_prefill=lambda name=name: read_peak(name, "prefill"))
                read_peak(name, "all")
                prefill[name].append(p)
                decode[name].extend(d)
    dev_name, tele = device_name(device), telemetry(device)
    return {k: Timing(Stats.of(prefill[k]), Stats.of(decode[k]), peaks[k]["prefill"], peaks[k]["all"], dev_name, tele)
            for k in names}


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


__all__ = ["Stats", "Timing", "time_generation", "time_interleaved", "telemetry", "device_name", "UNRELIABLE_SPREAD"]
