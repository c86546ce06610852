"""`PMoDConfig`: the typed, validated description of a p-MoD model (pure Python, no torch).

Every field is documented; the docstrings are what ``--help`` and the README show. The reference
implementation's string mini-languages (``shiftedcos_decay_0.85_0.15``, ``tanh_0.2_1``) are accepted
only by :meth:`PMoDConfig.from_reference` (the boundary where official checkpoints are read).

Text forms of a config at the CLI boundary are read here and nowhere else (one parser each):

* :func:`parse_pmod_spec` -- a variant spec: ``p-MoD-0.4``, ``p-MoD-linear-0.4``, ``p-MoD-0.5-max0.9-min0.1``
  (:meth:`PMoDConfig.spec` writes these), ``pmod:shift=0.4,schedule=linear,weight_norm=none``,
  ``ratios:1*8,0.5*24``;
* :func:`parse_ratios` -- explicit per-layer ratios: ``1*8,0.5*24`` (VALUE*COUNT repeats), ``[1,1,0.5]``,
  ``1;1;0.5``, ``1 1 0.5`` or a list;
* :func:`parse_reference_decay` -- the reference's ``SCHEDULE_decay_MAX_MIN``.

Everything past the boundary (run directories, reports) carries :meth:`PMoDConfig.to_dict`, never a name.
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
        """A short display name of the schedule: p-MoD-0.5, p-MoD-linear-0.4, p-MoD-explicit (see also :meth:`spec`)."""
        if self.ratios is not None:
            return "p-MoD-explicit"
        if self.schedule == "cosine":
            return f"p-MoD-{self.shift:g}"
        return f"p-MoD-{self.schedule}-{self.shift:g}"

    def acting_fields(self) -> dict[str, Any]:
        """The fields that act on the model and differ from the defaults (those of this ``weight_norm`` for
        ``norm_scale`` / ``norm_bias``): the schedule's fields only where they shape the ratios (none with
        explicit ``ratios``; ``steps`` only for ``stepped``); ``overflow_guard`` is a debugging switch, left out."""
        scale, bias = NORM_DEFAULTS[self.weight_norm]
        default = {**PMoDConfig().to_dict(), "norm_scale": scale, "norm_bias": bias}
        shaping = {"ratios"} if self.ratios is not None else {"schedule", "shift", "max_ratio", "min_ratio"} | (
            {"steps"} if self.schedule == "stepped" else set())
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if (f.name in shaping or f.name not in _SCHEDULE_FIELDS) and f.name != "overflow_guard"
                and getattr(self, f.name) != default[f.name]}

    def spec(self) -> str:
        """The variant spec of this config, read back by :func:`parse_pmod_spec` (display names of the profiler).

        ``p-MoD-0.5``, ``p-MoD-linear-0.4``, ``p-MoD-stepped-0.5-steps2``, ``p-MoD-0.5-max0.9-min0.1``,
        ``ratios:1*8,0.5*24``; with a field beyond the schedule changed (weight normalisation, STRing,
        router), ``pmod:KEY=VALUE,...`` of every changed field (:meth:`acting_fields`).

        >>> PMoDConfig(shift=0.4, schedule="linear").spec(), PMoDConfig(weight_norm="none", string=False).spec()
        ('p-MoD-linear-0.4', 'pmod:weight_norm=none,string=false')
        """
        changed = self.acting_fields()
        if set(changed) - _SCHEDULE_FIELDS:
            return "pmod:" + ",".join(f"{k}={_format_value(v)}" for k, v in changed.items())
        if self.ratios is not None:
            return "ratios:" + format_ratios(self.ratios)
        extra = "".join(f"-{tag}{changed[key]:g}" for key, tag in (("max_ratio", "max"), ("min_ratio", "min"), ("steps", "steps"))
                        if key in changed)
        return self.name + extra

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
        decay = parse_reference_decay(mod_target_layers)
        norm = re.fullmatch(r"([a-z_]+?)_(-?\d+(?:\.\d+)?)_(-?\d+(?:\.\d+)?)", mod_weight_norm or "")
        if norm:
            act, scale, bias = norm.group(1), float(norm.group(2)), float(norm.group(3))
        else:
            act, scale, bias = mod_weight_norm, 1.0, 1.0
        if act not in WEIGHT_NORMS:
            raise ValueError(f"unsupported mod_weight_norm '{mod_weight_norm}'; expected ACT_SCALE_BIAS with ACT in {WEIGHT_NORMS}")
        common = dict(weight_norm=act, norm_scale=scale, norm_bias=bias, router_bias=bool(mod_bias_enabled),
                      router_zero_init=bool(mod_special_init))
        if decay:
            schedule, max_ratio, min_ratio = decay
            return cls(schedule=schedule, shift=float(mod_router_factor), max_ratio=max_ratio, min_ratio=min_ratio, **common)
        # fixed-ratio layouts: every listed layer routes at mod_router_factor
        if num_layers is None:
            raise ValueError(f"mod_target_layers '{mod_target_layers}' needs num_layers to resolve")
        if mod_target_layers in REFERENCE_LAYOUTS:
            idx = list(REFERENCE_LAYOUTS[mod_target_layers](num_layers))
        elif mod_target_layer_indices is not None:
            idx = list(mod_target_layer_indices)
        else:
            raise ValueError(
                f"unsupported mod_target_layers '{mod_target_layers}'; expected SCHEDULE_decay_MAX_MIN "
                f"(e.g. shiftedcos_decay_0.85_0.15), {', '.join(REFERENCE_LAYOUTS)}"
            )
        ratios = [float(mod_router_factor) if i in idx else 1.0 for i in range(num_layers)]
        return cls(ratios=ratios, shift=min(max(float(mod_router_factor), 1e-3), 1.5), **common)


# ------------------------------------------------------------------------------------------ text forms
#: the fields that shape the per-layer ratios (written in a spec's name part; the others need ``pmod:``)
_SCHEDULE_FIELDS = {"schedule", "shift", "max_ratio", "min_ratio", "steps", "ratios"}

#: the reference's fixed-ratio layouts of ``mod_target_layers``: layer indices routing at ``mod_router_factor``
REFERENCE_LAYOUTS = {
    "interleave": lambda num_layers: range(1, num_layers, 2),
    "deep_all": lambda num_layers: range(2, num_layers - 1),
    "deep_all_include_last": lambda num_layers: range(2, num_layers),
}

_NUMBER = r"\d+(?:\.\d+)?"
_REFERENCE_DECAY = re.compile(rf"(\w+?)_decay_({_NUMBER})_({_NUMBER})")
#: PMoDConfig.name plus the extras spec() writes: p-MoD[-SCHEDULE]-SHIFT[-maxX][-minY][-stepsN]
_SPEC_NAME = re.compile(
    r"p[-_]?mod(?:-(?P<schedule>[a-z]+))?-(?P<shift>\d*\.?\d+)"
    r"(?:-max(?P<max_ratio>\d*\.?\d+))?(?:-min(?P<min_ratio>\d*\.?\d+))?(?:-steps(?P<steps>\d+))?",
    re.IGNORECASE,
)
#: the accepted forms of explicit ratios (:func:`parse_ratios`), for errors and every ``--ratios`` / ``ratios`` help text
RATIOS_FORMS = "e.g. 1*8,0.5*24 (VALUE*COUNT repeats a value), [1,1,0.5] or 1;1;0.5"
SPEC_FORMS = ("p-MoD-0.5, p-MoD-linear-0.4, p-MoD-0.5-max0.9-min0.1, pmod:shift=0.4,schedule=linear,weight_norm=none "
              "or ratios:1*8,0.5*24")


class SpecError(ValueError):
    """A p-MoD text form that does not read; the message names the fix in one line."""


def parse_ratios(value: Any, what: str = "ratios") -> list[float]:
    """Explicit per-layer retention ratios from any of their text forms (or a list of numbers).

    ``1*8,0.5*24`` (VALUE*COUNT repeats a value), ``[1,1,0.5]``, ``1;1;0.5``, ``1 1 0.5``: items are separated
    by commas, semicolons or spaces, brackets are optional. Each ratio must be in (0, 1]; 1.0 marks an
    ordinary layer. ``what`` names the option in the error (``--ratios``).

    >>> parse_ratios("1*2,0.5") == parse_ratios("[1,1,0.5]") == parse_ratios("1;1;0.5") == [1.0, 1.0, 0.5]
    True
    """
    fix = f"expected one retention ratio in (0, 1] per layer, {RATIOS_FORMS}"
    if isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        text = str(value).strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        parts = [p for p in re.split(r"[,;\s]+", text) if p]
    out: list[float] = []
    for part in parts:
        val, star, count = str(part).partition("*")
        try:
            ratio, n = float(val), (int(count) if star else 1)
        except ValueError:
            raise SpecError(f"{what} {value!r}: {fix}; '{part}' is not a number.") from None
        if n < 1:
            raise SpecError(f"{what} {value!r}: {fix}; the repeat count in '{part}' must be >= 1.")
        if not (math.isfinite(ratio) and 0.0 < ratio <= 1.0):
            raise SpecError(f"{what} {value!r}: {fix}; {part} is outside (0, 1].")
        out.extend([ratio] * n)
    if not out:
        raise SpecError(f"{what} {value!r}: {fix}; none given.")
    return out


def format_ratios(ratios: list[float], sep: str = ",") -> str:
    """Compact and exact: runs of equal values as VALUE*COUNT (:func:`parse_ratios` reads it back)."""
    out, i = [], 0
    while i < len(ratios):
        j = i
        while j + 1 < len(ratios) and ratios[j + 1] == ratios[i]:
            j += 1
        out.append(f"{ratios[i]:g}" + (f"*{j - i + 1}" if j > i else ""))
        i = j + 1
    return sep.join(out)


def parse_reference_decay(spec: Optional[str]) -> Optional[tuple[str, float, float]]:
    """The reference's ``SCHEDULE_decay_MAX_MIN`` (``mod_target_layers``, e.g. ``shiftedcos_decay_0.85_0.15``) ->
    (SCHEDULE as written, MAX, MIN); None for any other form (a fixed layout, :data:`REFERENCE_LAYOUTS`)."""
    m = _REFERENCE_DECAY.fullmatch(str(spec or ""))
    return (m.group(1), float(m.group(2)), float(m.group(3))) if m else None


def split_spec(text: str, example: Optional[str] = None) -> tuple[str, dict[str, str]]:
    """``HEAD:KEY=VALUE,...`` -> (HEAD, {key: value}) (keys lower case, values stripped): the form every spec
    shares, p-MoD variant specs and the comparison methods' (``pmod_bench.methods.parse_method_spec``) alike.

    An item without ``=`` or with an empty key, and a key given twice, are :class:`SpecError`; ``example``
    (``fastv:k=...``) is shown in the error of a bad item.

    >>> split_spec("fastv:k=2, Keep=0.5")
    ('fastv', {'k': '2', 'keep': '0.5'})
    """
    head, _, rest = str(text).strip().partition(":")
    options: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not eq or not key:
            hint = " (inside pmod: separate ratios with ';', e.g. pmod:ratios=1*8;0.5*24)" if "ratios" in options else ""
            msg = f"bad option '{item}' in '{text}': expected key=value" + (f", e.g. {example}" if example else "") + hint
            raise SpecError(msg if msg.endswith(".") else msg + ".")
        if key in options:
            raise SpecError(f"option '{key}' is given twice in '{text}'.")
        options[key] = value.strip()
    return head.strip(), options


def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return format_ratios(v, sep=";")
    return str(v)


def _read_value(key: str, text: str, default: Any) -> Any:
    """One ``pmod:`` option's text as its field's type (the default's type; ``ratios`` is a list)."""
    if key == "ratios":
        return parse_ratios(text, what="pmod option ratios")
    if isinstance(default, bool):
        flag = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}.get(text.lower())
        if flag is None:
            raise SpecError(f"pmod option {key}={text!r}: must be true or false.")
        return flag
    if isinstance(default, (int, float)) or default is None:  # norm_scale / norm_bias default to None
        try:
            v = float(text)
        except ValueError:
            raise SpecError(f"pmod option {key}={text!r}: must be a number.") from None
        if isinstance(default, int) and not isinstance(default, bool):
            if v != int(v):
                raise SpecError(f"pmod option {key}={text!r}: must be a whole number.")
            return int(v)
        return v
    return text


def pmod_config_from_options(options: dict[str, str]) -> "PMoDConfig":
    """A PMoDConfig from ``pmod:`` options (text values, any field); errors are :class:`SpecError` naming the fix."""
    fields = {f.name: f.default for f in dataclasses.fields(PMoDConfig)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], fields, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise SpecError(f"unknown p-MoD option(s) {unknown}.{hint} Known: {', '.join(fields)}.")
    kwargs = {k: _read_value(k, v, fields[k]) for k, v in options.items()}
    try:
        return PMoDConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise SpecError(str(exc)) from None


def parse_pmod_spec(text: str) -> Optional["PMoDConfig"]:
    """The PMoDConfig a variant spec describes; None when ``text`` is not a p-MoD spec (``baseline``, a method).

    Forms: ``p-MoD-0.4`` / ``p-MoD-linear-0.4`` / ``p-MoD-0.5-max0.9-min0.1`` / ``p-MoD-stepped-0.5-steps2``
    (what :meth:`PMoDConfig.spec` writes), ``pmod`` (the defaults), ``pmod:KEY=VALUE,...`` (any field, e.g.
    ``pmod:shift=0.4,schedule=linear,weight_norm=none,string=false``), ``ratios:1*8,0.5*24`` (see
    :func:`parse_ratios`). A p-MoD spec that does not read raises :class:`SpecError` naming the fix.

    >>> parse_pmod_spec("p-MoD-linear-0.4") == PMoDConfig(schedule="linear", shift=0.4)
    True
    >>> parse_pmod_spec("fastv:k=2") is None
    True
    """
    raw = str(text).strip()
    m = _SPEC_NAME.fullmatch(raw)
    if m:
        options = {k: v for k, v in m.groupdict().items() if v is not None}
        return pmod_config_from_options(options)
    head = raw.partition(":")[0].strip().lower().replace("-", "").replace("_", "")  # p-MoD = pmod = p_mod
    if head == "ratios":
        ratios = parse_ratios(raw.partition(":")[2], what="ratios")
        return PMoDConfig(ratios=ratios)
    if head != "pmod":
        return None
    return pmod_config_from_options(split_spec(raw)[1])


__all__ = ["PMoDConfig", "WEIGHT_NORMS", "NORM_DEFAULTS", "SCHEDULES", "SpecError", "parse_pmod_spec", "parse_ratios",
           "format_ratios", "parse_reference_decay", "pmod_config_from_options", "split_spec", "REFERENCE_LAYOUTS",
           "SPEC_FORMS", "RATIOS_FORMS"]
