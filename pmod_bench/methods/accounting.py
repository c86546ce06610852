"""Analytic FLOPs and KV cache of a method, and the equal-compute solver (``--match``).

Conventions are the profiler's (:mod:`pmod_bench.profiler.flops`): 2 FLOPs per multiply-add,
matrix products only, attention counted full. For one sample (one image of ``tiles`` tiles and
``text_tokens`` prompt tokens) a vision-side method changes:

* the vision tower: ``tower_tiles`` tiles of ``tower_tokens`` tokens each (patch conv on
  ``tower_tokens - 1`` patches; per layer ``2·n·(4·D² + 2·D·M) + 4·n²·D``), as in ``vision_flops``;
* the projector: ``2·projector_tokens·(D_in·d + d·d)`` (FasterVLM projects every patch, the others
  only what they keep);
* the method's own products (``VisionAccount.extra_flops``: VisionZip's similarities and merge,
  PruMerge's [CLS] row, similarities and weighted sums);
* the LLM: every layer processes ``text_tokens + llm_tokens`` tokens (``llm_prefill_flops`` with
  ``kept = [llm_tokens] * L``), and caches as many entries.

The solver (:func:`solve`) evaluates every budget setting a method offers
(:meth:`MethodConfig.candidates`) and keeps the one whose metric is closest to the target (a method whose
budget has several axes overrides :meth:`MethodConfig.prefer`: then, of the settings within tolerance, the one it
ranks first, e.g. iLLaVA's nearest its configured split between the vision and the LLM side):
``prefill`` = the LLM prefill FLOPs (the profiler's headline ``prefill_tflops``, or the paper's
convention with ``convention="paper"``), ``ttft`` = vision side + LLM prefill, ``kv`` = the
vision-token KV-cache ratio vs the baseline (the paper's KV column). Targets: a p-MoD variant
(``p-MoD-0.5``: its value on the same architecture and image size), absolute TFLOPs, or a KV ratio.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from pmod_bench.profiler.scenario import PAPER_IMAGE_SIZE, PAPER_TEXT_TOKENS

from .base import MethodConfig, MethodError, parse_method_spec
from .geometry import checked_geometry
from .flops import MethodFlops, method_account, tower_flops  # noqa: F401  (re-exported)

#: the solver's default relative tolerance
MATCH_TOLERANCE = 0.01
METRICS = ("prefill", "ttft", "kv")


def method_flops(cfg: MethodConfig, arch, image_size: tuple[int, int], text_tokens: int, logits_tokens: int = 1,
                 video: Any = None) -> MethodFlops:
    """Analytic FLOPs of one sample with ``cfg`` on ``arch`` (:meth:`MethodConfig.method_flops`; module docstring); with
    ``video`` (a :class:`~pmod_bench.profiler.video.Video` of frames of ``image_size``): :func:`.video.video_method_flops`."""
    if video is not None:
        from .video import video_method_flops

        return video_method_flops(cfg, arch, image_size, video, text_tokens, logits_tokens)
    return cfg.method_flops(arch, image_size, text_tokens, logits_tokens)


# ------------------------------------------------------------------------------------------ solver
@dataclass
class MatchResult:
    """What ``--match`` solved: the config, its metric, the target, and the other candidates' spread."""

    config: MethodConfig
    metric: str
    target: float
    achieved: float
    rel_err: float
    target_label: str
    """the target as typed (``p-MoD-0.5``, ``pmod:shift=0.5``) or written (``21.94 TFLOPs``, ``kv=0.537``): display"""
    convention: str = "headline"
    solved: dict[str, Any] = field(default_factory=dict)
    target_pmod: Optional[dict[str, Any]] = None
    """the ``--match`` variant's configuration as data, ``PMoDConfig.to_dict()``; None for the baseline, a method,
    ``--match-tflops`` and ``--match-kv`` (reports recognise the target by it, never by ``target_label``)"""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.config.to_dict(), "metric": self.metric, "target": self.target, "achieved": self.achieved,
                "rel_err": self.rel_err, "target_label": self.target_label, "target_pmod": self.target_pmod,
                "convention": self.convention, "solved": dict(self.solved)}


def _value(f: MethodFlops, metric: str, convention: str) -> float:
    if metric == "kv":
        return f.kv_ratio
    llm = f.llm_prefill_paper if convention == "paper" else f.llm_prefill
    return float(llm + (f.vision if metric == "ttft" else 0))


def target_value(target: Any, arch, image_size: tuple[int, int], text_tokens: int, metric: str, convention: str,
                 logits_tokens: int = 1, video: Any = None) -> float:
    """The metric of a profiler variant (``p-MoD-0.5``, ``baseline``, ``ratios:...``, or a parsed ``Variant``) on the
    same arch and image (or ``video`` of frames of ``image_size``)."""
    from pmod_bench.profiler.arch import vision_layout
    from pmod_bench.profiler.flops import llm_prefill_flops, paper_prefill_flops, vision_flops
    from pmod_bench.profiler.variants import Variant, parse_variant

    v = target if isinstance(target, Variant) else parse_variant(target)
    layout = vision_layout(arch, image_size, 1, video)
    V, L = layout.vision_tokens, arch.text.layers
    kept, routers = v.kept_vision_tokens(L, V), v.router_layers(L)
    if metric == "kv":
        return sum(kept) / (L * V)
    if convention == "paper":
        llm = paper_prefill_flops(arch.text, text_tokens, V, kept, routers)
    else:
        llm = llm_prefill_flops(arch.text, text_tokens, V, kept, routers, logits_tokens).total("full")
    return float(llm + (vision_flops(arch, layout).total if metric == "ttft" else 0))


def _fmt(metric: str, x: float) -> str:
    return f"{x:.4g}" if metric == "kv" else f"{x / 1e12:.4g} TFLOPs"


def _unreachable(name: str, shown: str, where: str, target: float, baseline: float, values: list, metric: str,
                 tolerance: float) -> str:
    """Why no budget of method ``name`` reaches ``target`` within ``tolerance``, and the fix that applies."""
    what = "vision KV cache" if metric == "kv" else "prefill TFLOPs"
    if target > baseline * (1 + tolerance):  # a method only removes work: above the baseline nothing can match
        return (f"{name} cannot match {shown} {where}: the target exceeds the baseline's {what} "
                f"({_fmt(metric, baseline)}), and a method only removes work; give a target at or below the baseline's "
                "(e.g. --match p-MoD-0.5).")
    lo = max((v for v in values if v <= target), default=None)
    hi = min((v for v in values if v >= target), default=None)
    if lo is None:
        return (f"{name} cannot match {shown} {where}: the target is below the least its budgets reach "
                f"({_fmt(metric, min(values))}); give a larger target.")
    if hi is None:
        return (f"{name} cannot match {shown} {where}: the target is above the most its budgets reach "
                f"({_fmt(metric, max(values))}, short of the baseline's {_fmt(metric, baseline)}); give a smaller target.")
    return (f"{name} cannot match {shown} within {tolerance:.0%} {where}: its nearest settings give "
            f"{_fmt(metric, lo)}, {_fmt(metric, hi)}. Pass a larger tolerance (--match-tolerance) or another target.")


def solve(method: Union[str, dict, MethodConfig], arch, image_size: tuple[int, int] = PAPER_IMAGE_SIZE, *,
          match: Optional[str] = None, tflops: Optional[float] = None, kv: Optional[float] = None,
          text_tokens: int = PAPER_TEXT_TOKENS, metric: str = "prefill", convention: str = "headline", logits_tokens: int = 1,
          tolerance: float = MATCH_TOLERANCE, video: Any = None) -> MatchResult:
    """Solve ``method``'s token budget to a target (exactly one of ``match`` / ``tflops`` / ``kv``) within ``tolerance``.

    ``match="p-MoD-0.5"``: the p-MoD variant's metric (``prefill`` FLOPs by default, or ``kv``); ``tflops=21.94``:
    absolute TFLOPs of the ``metric`` (``prefill`` or ``ttft``) in ``convention`` (``headline`` or ``paper``);
    ``kv=0.537``: the vision KV-cache ratio. Raises :class:`MethodError` if no setting is within ``tolerance``
    (the message gives the two nearest achievable values). ``video``: a video prompt of frames of ``image_size``.
    """
    from pmod_bench.profiler.arch import load_arch

    arch = load_arch(arch) if isinstance(arch, str) else arch
    cfg = parse_method_spec(method)
    target_pmod: Optional[dict[str, Any]] = None
    given = [x is not None for x in (match, tflops, kv)]
    if sum(given) != 1:
        raise MethodError("give exactly one target: --match VARIANT (e.g. p-MoD-0.5), --match-tflops X or --match-kv Y.")
    if convention not in ("headline", "paper"):
        raise MethodError(f"convention must be headline or paper, got {convention!r}.")
    if kv is not None:
        metric = "kv"
        if not 0.0 < kv <= 1.0:
            raise MethodError(f"--match-kv must be in (0, 1] (a ratio to the baseline's KV cache, e.g. 0.537), got {kv}.")
        target, label = float(kv), f"kv={kv:g}"
    elif tflops is not None:
        if metric == "kv":
            raise MethodError("--match-tflops sets a FLOPs target; use metric prefill or ttft.")
        if not tflops > 0:
            raise MethodError(f"--match-tflops must be > 0, got {tflops}.")
        target, label = float(tflops) * 1e12, f"{tflops:g} TFLOPs"
    else:
        from pmod_bench.profiler.variants import parse_variant

        if metric not in METRICS:
            raise MethodError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}.")
        variant = parse_variant(match)
        target = target_value(variant, arch, image_size, text_tokens, metric, convention, logits_tokens, video)
        label, target_pmod = str(match), variant.describe()["pmod"]
    geometry = checked_geometry(cfg, arch.config)
    best: Optional[tuple[float, MethodConfig, float]] = None
    values = []
    scored = []
    for cand in cfg.candidates_at(geometry, arch, image_size):
        val = _value(method_flops(cand, arch, image_size, text_tokens, logits_tokens, video), metric, convention)
        values.append(val)
        err = abs(val - target) / target
        scored.append((err, cand, val))
        if best is None or err < best[0]:
            best = (err, cand, val)
    assert best is not None
    err, chosen, val = best
    if err > tolerance:
        shown = label if match is None else f"{label} ({_fmt(metric, target)})"
        where = f"on {arch.name} at {image_size[0]}x{image_size[1]}" + (f" ({video.label})" if video is not None else "")
        baseline = target_value("baseline", arch, image_size, text_tokens, metric, convention, logits_tokens, video)
        raise MethodError(_unreachable(cfg.name, shown, where, target, baseline, values, metric, tolerance))
    # of the settings within tolerance, the method's preferred one (a budget of several axes: iLLaVA), else the nearest
    err, chosen, val = min((s for s in scored if s[0] <= tolerance), key=lambda s: (cfg.prefer(s[1]), s[0]))
    return MatchResult(chosen, metric, target, val, err, label, convention, chosen.budget(), target_pmod)


__all__ = ["MethodFlops", "MatchResult", "method_account", "method_flops", "tower_flops", "solve", "target_value",
           "MATCH_TOLERANCE", "METRICS"]
