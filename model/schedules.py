"""Per-layer retention-ratio schedules (pure Python, no torch).

The paper's progressive ratio decay (PRD) is a shifted cosine over the depth of the LLM
(METHOD.md, "Progressive ratio decay"; reference: ``shiftedcos_decay_0.85_0.15``)::

    rho_l = delta + 1/2 * cos(pi * l / (L - 1))          l = 0 .. L-1

then clamped: ``rho_l > max_ratio`` -> the layer is an ordinary layer (ratio 1.0, no router);
``rho_l < min_ratio`` -> ``rho_l = min_ratio``.  For L = 32, delta = 0.5 layers 0-7 are ordinary and
the mean retention over all layers is 0.5375 (the paper's "about 54%").

The other schedules of the paper's Table 4 are defined here so that each can be matched to the
same mean retention (:func:`match_shift`):

* ``linear``      rho_l = delta + 1/2 - l / (L - 1), same clamping (the reference's ``shiftedlinear``).
* ``constant``    rho_l = delta for every layer (no decay).
* ``interleaved`` even layers ordinary, odd layers rho = delta (the original MoD paper's layout).
* ``stepped``     the cosine schedule averaged over ``steps`` equal groups of layers: it decays, but
                  in steps rather than progressively, with the same mean retention as PRD.
"""

from __future__ import annotations

import math
import struct
from typing import Sequence

SCHEDULES = ("cosine", "linear", "constant", "interleaved", "stepped")
#: accepted spellings -> canonical schedule name
SCHEDULE_ALIASES = {"prd": "cosine", "shiftedcos": "cosine", "shiftedlinear": "linear", "interleave": "interleaved"}


def canonical_schedule(name: str) -> str:
    key = str(name).strip().lower()
    key = SCHEDULE_ALIASES.get(key, key)
    if key not in SCHEDULES:
        import difflib

        close = difflib.get_close_matches(key, SCHEDULES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else "."
        raise ValueError(f"unknown schedule '{name}'{hint} Allowed: {', '.join(SCHEDULES)} (or explicit per-layer ratios).")
    return key


def _clamp(raw: float, max_ratio: float, min_ratio: float) -> float:
    if raw > max_ratio:
        return 1.0
    return max(raw, min_ratio)


def prd_ratios(
    num_layers: int,
    schedule: str = "cosine",
    shift: float = 0.5,
    max_ratio: float = 0.85,
    min_ratio: float = 0.15,
    steps: int = 4,
) -> list[float]:
    """Retention ratio of every decoder layer; 1.0 marks an ordinary layer (no router).

    >>> r = prd_ratios(32, shift=0.5)
    >>> r[:8] == [1.0] * 8, round(r[8], 3), r[-1]
    (True, 0.844, 0.15)
    """
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
    schedule = canonical_schedule(schedule)
    L = num_layers
    denom = max(L - 1, 1)
    if schedule == "cosine":
        return [_clamp(shift + 0.5 * math.cos(math.pi * l / denom), max_ratio, min_ratio) for l in range(L)]
    if schedule == "linear":
        return [_clamp(shift + 0.5 - l / denom, max_ratio, min_ratio) for l in range(L)]
    if schedule == "constant":
        return [_clamp(shift, max_ratio, min_ratio) for _ in range(L)]
    if schedule == "interleaved":
        return [1.0 if l % 2 == 0 else _clamp(shift, max_ratio, min_ratio) for l in range(L)]
    # stepped: piecewise-constant average of the cosine schedule over `steps` groups
    if steps < 1 or steps > L:
        raise ValueError(f"stepped schedule needs 1 <= steps <= num_layers ({L}), got {steps}")
    cos = prd_ratios(L, "cosine", shift, max_ratio, min_ratio)
    bounds = [round(i * L / steps) for i in range(steps + 1)]
    out: list[float] = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        group = cos[a:b]
        if all(r == 1.0 for r in group):
            out.extend([1.0] * len(group))
        else:
            mean = sum(group) / len(group)
            out.extend([_clamp(mean, max_ratio, min_ratio) if mean < 1.0 else 1.0] * len(group))
    return out


def mean_retention(ratios: Sequence[float]) -> float:
    """Mean retention over all layers (ordinary layers count as 1.0): the paper's "average ratio"."""
    return sum(ratios) / len(ratios)


def match_shift(
    schedule: str,
    num_layers: int,
    target_mean: float,
    max_ratio: float = 0.85,
    min_ratio: float = 0.15,
    steps: int = 4,
    tol: float = 1e-4,
) -> float:
    """The shift of ``schedule`` whose mean retention is closest to ``target_mean`` (bisection).

    Table 4 compares schedules "at an average retention of about 54%": ``match_shift("linear", 32,
    mean_retention(prd_ratios(32)))`` gives the linear schedule's shift for the same compute.
    """
    lo, hi = 1e-3, 1.5
    f = lambda d: mean_retention(prd_ratios(num_layers, schedule, d, max_ratio, min_ratio, steps))  # noqa: E731
    if not f(lo) <= target_mean <= f(hi):
        raise ValueError(f"mean retention {target_mean} is not reachable with schedule '{schedule}'")
    for _ in range(100):
        mid = (lo + hi) / 2
        if f(mid) < target_mean:
            lo = mid
        else:
            hi = mid
        if hi - lo < tol:
            break
    return round((lo + hi) / 2, 6)


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def num_selected_host(num_targets: int, ratio: float) -> int:
    """k = trunc(V * rho) in float32 arithmetic, exactly as the model computes it on the device
    (:func:`pmod_bench.model.plan.num_selected`) and as the reference implementation does.

    The product of two float32 values is exact in float64, so rounding it once to float32 gives the
    IEEE float32 product that torch computes. Pure Python: the analytic profiler needs no torch.
    """
    return math.trunc(_f32(_f32(float(num_targets)) * _f32(float(ratio))))
