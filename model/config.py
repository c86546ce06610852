"""`PMoDConfig`: the typed, validated description of a p-MoD model (pure Python, no torch).

Every field is documented; the docstrings are what ``--help`` and the README show. The reference
implementation's string mini-languages (``shiftedcos_decay_0.85_0.15``, ``tanh_0.2_1``) are accepted
only by :meth:`PMoDConfig.from_reference` (the boundary where official checkpoints are read).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Optional

from .schedules import SCHEDULES, canonical_schedule, prd_ratios

WEIGHT_NORMS = ("tanh", "softmax", "shifted_softmax", "sigmoid", "none")

#: default (scale, bias) of ``w = scale * act(r) + bias`` for each weight normalisation.
#: tanh: TanhNorm, alpha = 0.2 (paper default). softmax / sigmoid / none: the reference's defaults
#: (scale 1, bias 1). shifted_softmax: softmax moved into TanhNorm's range [1 - 0.2, 1 + 0.2].
NORM_DEFAULTS = {
    "tanh": (0.2, 1.0),
    "softmax": (1.0, 1.0),
    "shifted_softmax": (0.4, 0.8),
    "sigmoid": (1.0, 1.0),
    "none": (1.0, 1.0),
}


@dataclass
class PMoDConfig:
    """p-MoD settings of a LLaVA model: which layers route, at which ratio, and how tokens are weighted."""

    schedule: str = "cosine"
    """Retention schedule over depth: cosine (= PRD), linear, constant, interleaved, stepped."""
    shift: float = 0.5
    """Shift factor delta of the schedule (the paper's p-MoD-0.3/0.4/0.5); in (0, 1.5]."""
    max_ratio: float = 0.85
    """A layer whose scheduled ratio exceeds this is an ordinary layer (no router, ratio 1)."""
    min_ratio: float = 0.15
    """Scheduled ratios below this are raised to it."""
    steps: int = 4
    """Number of steps of the `stepped` schedule."""
    ratios: Optional[list[float]] = None
    """Explicit per-layer retention ratios (overrides the schedule); 1.0 marks an ordinary layer."""
    weight_norm: str = "tanh"
    """Router weight normalisation w = scale * act(r) + bias: tanh (TanhNorm), softmax, shifted_softmax, sigmoid, none."""
    norm_scale: Optional[float] = None
    """scale of the weight normalisation (TanhNorm's alpha; default 0.2 for tanh, see NORM_DEFAULTS)."""
    norm_bias: Optional[float] = None
    """bias of the weight normalisation (default 1.0 for tanh, see NORM_DEFAULTS)."""
    string: bool = True
    """STRing: skipped target tokens become w * x (router learns from them); off = vanilla MoD (x)."""
    router_bias: bool = True
    """Give the router Linear(d, 1) a bias."""
    router_zero_init: bool = True
    """Initialise router weight and bias to zero, so w = 1 and the pretrained LLM is intact at insertion."""
    overflow_guard: bool = False
    """Raise an error naming the layer and tensor when a NaN/Inf appears (the paper's OVERFLOW rows)."""

    def __post_init__(self) -> None:
        self.schedule = canonical_schedule(self.schedule)
        if self.weight_norm not in WEIGHT_NORMS:
            raise ValueError(f"unknown weight_norm '{self.weight_norm}'. Allowed: {', '.join(WEIGHT_NORMS)}.")
        for name in ("shift", "max_ratio", "min_ratio"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            setattr(self, name, float(v))
        if not 0.0 < self.shift <= 1.5:
            raise ValueError(f"shift (delta) must be in (0, 1.5], got {self.shift}; the paper uses 0.3, 0.4 and 0.5.")
        if not 0.0 < self.min_ratio <= 1.0 or not 0.0 < self.max_ratio <= 1.0:
            raise ValueError(f"min_ratio and max_ratio must be in (0, 1], got {self.min_ratio} and {self.max_ratio}.")
        if self.min_ratio > self.max_ratio:
            raise ValueError(f"min_ratio ({self.min_ratio}) must not exceed max_ratio ({self.max_ratio}).")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if self.ratios is not None:
            ratios = [float(r) for r in self.ratios]
            bad = [(i, r) for i, r in enumerate(ratios) if not 0.0 < r <= 1.0]
            if bad:
                raise ValueError(f"explicit ratios must each be in (0, 1] (1.0 = ordinary layer); bad entries {bad}")
            self.ratios = ratios
        scale, bias = NORM_DEFAULTS[self.weight_norm]
        for name in ("norm_scale", "norm_bias"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        self.norm_scale = float(scale if self.norm_scale is None else self.norm_scale)
        self.norm_bias = float(bias if self.norm_bias is None else self.norm_bias)
        if self.norm_scale <= 0:
            raise ValueError(
                f"norm_scale must be positive, got {self.norm_scale}: w = scale * act(r) + bias ranks tokens by w, so a "
                f"negative scale inverts the ranking and zero removes it. TanhNorm's alpha is {NORM_DEFAULTS['tanh'][0]}."
            )

    # ------------------------------------------------------------------ derived
    def layer_ratios(self, num_layers: int) -> list[float]:
        """The retention ratio of each of ``num_layers`` layers; 1.0 = ordinary layer."""
        if self.ratios is not None:
            if len(self.ratios) != num_layers:
                raise ValueError(f"explicit ratios list has {len(self.ratios)} entries but the LLM has {num_layers} layers")
            return list(self.ratios)
        return prd_ratios(num_layers, self.schedule, self.shift, self.max_ratio, self.min_ratio, self.steps)

    def routed_layers(self, num_layers: int) -> list[int]:
        """Indices of the p-MoD (routed) layers."""
        return [i for i, r in enumerate(self.layer_ratios(num_layers)) if r < 1.0]

    @property
    def name(self) -> str:
        """A short variant name: p-MoD-0.5, p-MoD-linear-0.4, p-MoD-explicit, ..."""
        if self.ratios is not None:
            return "p-MoD-explicit"
        if self.schedule == "cosine":
            return f"p-MoD-{self.shift:g}"
        return f"p-MoD-{self.schedule}-{self.shift:g}"

    # ------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: "dict[str, Any] | PMoDConfig | None") -> "PMoDConfig":
        if d is None:
            return cls()
        if isinstance(d, PMoDConfig):
            return d
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown p-MoD config keys {unknown}. Known: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "PMoDConfig":
        """A copy with some fields changed (validated again).

        Defaults stay derived: changing ``weight_norm`` without giving ``norm_scale`` / ``norm_bias``
        gives the new normalisation its own defaults (NORM_DEFAULTS) where the old values were the old
        normalisation's defaults; values that were set explicitly are kept.
        """
        new_norm = changes.get("weight_norm", self.weight_norm)
        if new_norm != self.weight_norm and self.weight_norm in NORM_DEFAULTS:
            old_defaults = NORM_DEFAULTS[self.weight_norm]
            for i, name in enumerate(("norm_scale", "norm_bias")):
                if name not in changes and getattr(self, name) == old_defaults[i]:
                    changes[name] = None
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_reference(
        cls,
        mod_target_layers: str,
        mod_router_factor: float,
        mod_weight_norm: str = "tanh_0.2_1",
        mod_bias_enabled: bool = True,
        mod_special_init: bool = True,
        num_layers: Optional[int] = None,
        mod_target_layer_indices: Optional[list[int]] = None,
    ) -> "PMoDConfig":
        """Build from the reference implementation's config strings (official checkpoints)."""
        m = re.fullmatch(r"(\w+?)_decay_(\d+(?:\.\d+)?)_(\d+(?:\.\d+)?)", mod_target_layers or "")
        norm = re.fullmatch(r"([a-z_]+?)_(-?\d+(?:\.\d+)?)_(-?\d+(?:\.\d+)?)", mod_weight_norm or "")
        if norm:
            act, scale, bias = norm.group(1), float(norm.group(2)), float(norm.group(3))
        else:
            act, scale, bias = mod_weight_norm, 1.0, 1.0
        if act not in WEIGHT_NORMS:
            raise ValueError(f"unsupported mod_weight_norm '{mod_weight_norm}'; expected ACT_SCALE_BIAS with ACT in {WEIGHT_NORMS}")
        common = dict(weight_norm=act, norm_scale=scale, norm_bias=bias, router_bias=bool(mod_bias_enabled),
                      router_zero_init=bool(mod_special_init))
        if m:
            return cls(schedule=m.group(1), shift=float(mod_router_factor), max_ratio=float(m.group(2)),
                       min_ratio=float(m.group(3)), **common)
        # fixed-ratio layouts: every listed layer routes at mod_router_factor
        if num_layers is None:
            raise ValueError(f"mod_target_layers '{mod_target_layers}' needs num_layers to resolve")
        if mod_target_layers == "interleave":
            idx = list(range(1, num_layers, 2))
        elif mod_target_layers == "deep_all":
            idx = list(range(2, num_layers - 1))
        elif mod_target_layers == "deep_all_include_last":
            idx = list(range(2, num_layers))
        elif mod_target_layer_indices is not None:
            idx = list(mod_target_layer_indices)
        else:
            raise ValueError(
                f"unsupported mod_target_layers '{mod_target_layers}'; expected SCHEDULE_decay_MAX_MIN "
                "(e.g. shiftedcos_decay_0.85_0.15), interleave, deep_all or deep_all_include_last"
            )
        ratios = [float(mod_router_factor) if i in idx else 1.0 for i in range(num_layers)]
        return cls(ratios=ratios, shift=min(max(float(mod_router_factor), 1e-3), 1.5), **common)


__all__ = ["PMoDConfig", "WEIGHT_NORMS", "NORM_DEFAULTS", "SCHEDULES"]
