"""The method registry: typed, validated configs of the comparison methods, and their one spec syntax.

A comparison method is a dataclass subclass of :class:`MethodConfig`, registered by name::

    @register_method("fastervlm")
    @dataclass
    class FasterVLMConfig(MethodConfig):
        stage: ClassVar[str] = "vision"
        keep: float = param(0.25, low=0.0, high=1.0, low_open=True)
        \"\"\"Fraction of each tile's patch tokens kept.\"\"\"

Fields declared with :func:`param` carry their valid range; ``__post_init__`` checks types and ranges
and says, in one line, what range is valid. Field docstrings (the string under a field) are read
from the source (:func:`field_docs`) and shown in the errors that list a method's keys.

One text form everywhere (CLI, lmms-eval model args, profiler): ``NAME`` or ``NAME:key=value,...``
(:func:`parse_method_spec`), e.g. ``visionzip:dominant=54,contextual=10``, read by the splitter every spec
shares (:func:`pmod_bench.model.config.split_spec`, as the p-MoD variant specs). A config turns into a plain
dict (``to_dict``: ``{"method": NAME, **fields}``) and back (``from_dict``); result rows carry that dict.

``stage`` says where a method acts: ``"vision"`` = on the vision features, before the LLM (the LLM
then runs on a shorter sequence); ``"llm"`` = inside the LLM's layers (FastV, PyramidDrop, ...).
Model-dependent limits (a token count above the tile's patches, a layer beyond the LLM depth) are
checked by :meth:`MethodConfig.check_model` against a :class:`ModelGeometry`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union, get_args, get_origin, get_type_hints

from pmod_bench.fielddocs import field_docs
from pmod_bench.model.config import SpecError, split_spec
from pmod_bench.model.registry import Registry

from .geometry import MethodError, ModelGeometry, VisionAccount

def _norm(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


#: registered name -> MethodConfig subclass; every module of this package is imported on the first lookup
#: (:class:`pmod_bench.model.registry.Registry`): a new method is one module, no list to edit
METHODS: Registry[type["MethodConfig"]] = Registry("comparison method", package="pmod_bench.methods", normalise=_norm)

STAGES = ("vision", "llm")


# ------------------------------------------------------------------------------------- fields
def param(default: Any, *, low: Optional[float] = None, high: Optional[float] = None,
          low_open: bool = False, high_open: bool = False, choices: Optional[tuple] = None) -> Any:
    """A dataclass field with a valid range ``[low, high]`` (``low_open``/``high_open``: exclusive end)."""
    meta = {"low": low, "high": high, "low_open": low_open, "high_open": high_open, "choices": choices}
    return dataclasses.field(default=default, metadata=meta)


def _range_text(meta: dict) -> str:
    low, high = meta.get("low"), meta.get("high")
    if meta.get("choices"):
        return "one of " + ", ".join(map(str, meta["choices"]))
    left = "(" if meta.get("low_open") else "["
    right = ")" if meta.get("high_open") else "]"
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    return f"in {left}{lo}, {hi}{right}"


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the non-None type of an annotation, whether None is allowed)."""
    if get_origin(tp) is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def _convert(text: str, tp: Any, what: str) -> Any:
    """A CLI string -> a value of the field's type (None/none for an Optional field)."""
    base, optional = _base_type(tp)
    s = text.strip()
    if optional and s.lower() in ("none", "null", ""):
        return None
    try:
        if base is bool:
            low = s.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is int:
            f = float(s)
            if not f.is_integer():
                raise ValueError
            return int(f)
        if base is float:
            return float(s)
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a number"}[base]
        raise MethodError(f"{what} must be {kind}, got '{text}'.") from None
    return s


# ------------------------------------------------------------------------------------- configs
@dataclass
class MethodConfig:
    """Base class of a comparison method's config (subclass + :func:`register_method`)."""

    name: ClassVar[str] = "?"
    stage: ClassVar[str] = "vision"
    """``vision``: acts on the vision features before the LLM; ``llm``: inside the LLM's layers."""
    official: ClassVar[str] = ""
    """The official repository and commit the implementation follows."""
    needs_attentions: ClassVar[bool] = False
    """Needs the vision tower's attention maps (HF ``output_attentions``; eager attention in the tower)."""
    compresses_vision: ClassVar[bool] = False
    """An ``llm`` method that also shortens the image features before the LLM (iLLaVA)."""
    video_only: ClassVar[bool] = False
    """A vision-stage method that acts on videos only (DyCoke): image prompts reach the model unchanged."""
    needs_cls: ClassVar[bool] = False
    """Ranks the patches by the vision tower's [CLS] attention (FasterVLM, PruMerge): refused on a tower without one."""

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            base, optional = _base_type(hints[f.name])
            what = f"{self.name}: {f.name}"
            if value is None:
                if not optional:
                    raise MethodError(f"{what} must be given (got None).")
                continue
            if base is int and isinstance(value, float) and value.is_integer():
                value = int(value)
                object.__setattr__(self, f.name, value)
            if base is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                object.__setattr__(self, f.name, value)
            if base in (int, float) and (isinstance(value, bool) or not isinstance(value, base)):
                raise MethodError(f"{what} must be {'an integer' if base is int else 'a number'}, got {value!r}.")
            if base is bool and not isinstance(value, bool):
                raise MethodError(f"{what} must be true or false, got {value!r}.")
            if base is float and not math.isfinite(value):
                raise MethodError(f"{what} must be finite, got {value!r}.")
            meta = f.metadata
            if meta.get("choices") and value not in meta["choices"]:
                raise MethodError(f"{what} must be {_range_text(meta)}, got {value!r}.")
            low, high = meta.get("low"), meta.get("high")
            bad_low = low is not None and (value <= low if meta.get("low_open") else value < low)
            bad_high = high is not None and (value >= high if meta.get("high_open") else value > high)
            if bad_low or bad_high:
                raise MethodError(f"{what} must be {_range_text(meta)}, got {value!r}.")
        self.validate()

    # -- hooks for subclasses -------------------------------------------------------------------
    def validate(self) -> None:
        """Checks across fields (ranges of single fields are declared with :func:`param`)."""

    def check_model(self, geometry: ModelGeometry) -> None:
        """Raise :class:`MethodError` if this config cannot run on that architecture."""

    def candidates(self, geometry: ModelGeometry) -> list["MethodConfig"]:
        """Every setting of this method's budget (its other options unchanged), for the equal-compute solver."""
        raise MethodError(f"{self.name} has no token budget to solve for.")

    def candidates_at(self, geometry: ModelGeometry, arch: Any, image_size: tuple[int, int]) -> list["MethodConfig"]:
        """The solver's settings for one image of ``image_size`` (width, height) on ``arch``: :meth:`candidates`, unless
        a method's budget depends on the image (Qwen2.5-VL's downsampling to a merged grid)."""
        return self.candidates(geometry)

    def budget(self) -> dict[str, Any]:
        """The hyperparameters the solver varies, as solved (recorded in the run)."""
        return {}

    def account(self, geometry: ModelGeometry, tiles: int, image_size: Any, config: Any) -> "VisionAccount":
        """What the method computes for one image of ``tiles`` tiles (analytic FLOPs; see accounting.py)."""
        raise MethodError(f"{self.name} has no analytic accounting.")

    def compress(self, model: Any, geometry: ModelGeometry, tiles: list, sizes: list) -> list:
        """Vision-side methods: the images' tiles -> one CompressedImage per image (see vision.py)."""
        raise NotImplementedError(f"{self.name} does not act on the vision features")

    def compress_merged(self, model, geometry: ModelGeometry, pixel_values: Any, image_grid_thw: Any) -> list:
        """Vision-side methods on Qwen2.5-VL: the batch's images -> one CompressedImage per image, ``selection[0]`` the
        kept merged-token indices in raster order (see qwen_vision.py)."""
        raise MethodError(f"{self.name} has no Qwen2.5-VL port.")

    def merged_resize(self, model, image_grid_thw: Any) -> Optional[list]:
        """Qwen2.5-VL: the (height, width) in pixels each image of the batch is resized to before the tower (the
        downsampling baseline), or None: the images as given."""
        return None

    def merged_tokens(self, V: int) -> int:
        """Qwen2.5-VL: the merged tokens the LLM gets of an image of ``V`` (the analytic FLOPs, ``--match``)."""
        from .geometry import merged_accounting_error

        raise merged_accounting_error(self.name)

    def merged_extra(self, arch: Any, V: int) -> int:
        """Qwen2.5-VL: the method's own matrix products for an image of ``V`` merged tokens (analytic FLOPs)."""
        return 0

    @property
    def shortens_prompt(self) -> bool:
        """Whether the method turns the image features into fewer before the LLM (the vision stage)."""
        return self.stage == "vision" or self.compresses_vision

    def first_layer(self) -> Optional[int]:
        """The first decoder layer that reads the routing plan (in-LLM methods; every later layer reads it too);
        None: the method acts before the LLM only."""
        return None

    def start(self, model: Any, plan: Any, kwargs: dict) -> Any:
        """In-LLM methods: the method's :class:`~pmod_bench.model.policy.TokenPolicy` for one forward."""
        return None

    def check_host(self, host: Any) -> None:
        """Raise :class:`MethodError` if the method cannot run on the model family of ``host`` (a
        :class:`~pmod_bench.model.hosts.HostAdapter`). A method that ranks by [CLS] attention is refused on a tower
        without a [CLS] token for good: no published adaptation exists (ModelTC/LightCompress@9701d035 runs FasterVLM on
        LLaVA only and has no PruMerge; the official repositories are LLaVA-only)."""
        llm = ", ".join(n for n, c in METHODS.items() if c.stage == "llm" and not c.compresses_vision)
        if self.needs_cls and not host.cls_token:
            raise MethodError(f"{self.name} ranks the patches by the vision tower's [CLS] attention, and {host.title}'s "
                              "tower has no [CLS] token (no published adaptation to such a tower exists); the in-LLM "
                              f"methods run on it: {llm}.")
        ported = host.vision_stage_methods
        if self.shortens_prompt and not (ported is True or (ported and self.name in ported)):
            raise MethodError(f"{self.name} acts on the vision tower's features; on {host.title} the vision-stage "
                              f"methods come with the next issue (the in-LLM methods run now: {llm}).")

    def method_flops(self, arch: Any, image_size: tuple[int, int], text_tokens: int, logits_tokens: int = 1) -> Any:
        """Analytic :class:`~pmod_bench.methods.flops.MethodFlops` of one sample at (width, height) on ``arch``."""
        from .flops import vision_method_flops

        return vision_method_flops(self, arch, image_size, text_tokens, logits_tokens)

    def prefer(self, candidate: "MethodConfig") -> tuple:
        """The equal-compute solver's order among settings within tolerance (smallest first; ties: nearest the
        target). A budget of one axis needs none; iLLaVA (two axes) prefers its configured values."""
        return ()

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``{"method": NAME, **fields}``: plain JSON values, read back by :meth:`from_dict`."""
        return {"method": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodConfig":
        """A config from :meth:`to_dict`'s output (on the base class: the class named by ``method``)."""
        d = dict(data)
        name = d.pop("method", None)
        klass = cls
        if cls is MethodConfig or (name is not None and name != cls.name):
            if name is None:
                raise MethodError(f"a method dict needs a 'method' key naming the method; known: {', '.join(sorted(METHODS))}.")
            klass = get_method(name)
        known = {f.name for f in dataclasses.fields(klass)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MethodError(_unknown_keys_message(klass, unknown))
        return klass(**d)

    def replace(self, **changes: Any) -> "MethodConfig":
        return dataclasses.replace(self, **changes)

    def spec(self) -> str:
        """The spec text of this config (non-default fields only): ``visionzip:dominant=54,contextual=10``."""
        default = type(self)()
        parts = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                 if getattr(self, f.name) != getattr(default, f.name)]
        return self.name + (":" + ",".join(parts) if parts else "")

    @classmethod
    def describe_keys(cls) -> str:
        docs = field_docs(cls)
        out = []
        for f in dataclasses.fields(cls):
            rng = _range_text(f.metadata) if f.metadata else ""
            out.append(f"{f.name} (default {f.default!r}{', ' + rng if rng else ''}): {docs.get(f.name, '').rstrip('.')}".rstrip(": "))
        return "; ".join(out) or "no options"


METHODS.base = MethodConfig


def _unknown_keys_message(klass: type[MethodConfig], unknown: list[str]) -> str:
    known = [f.name for f in dataclasses.fields(klass)]
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return f"{klass.name}: unknown option {', '.join(hints)}. Options: {klass.describe_keys()}."


def register_method(name: str):
    """Class decorator: register a :class:`MethodConfig` subclass under ``name`` (lowercase)."""

    def deco(cls: type[MethodConfig]) -> type[MethodConfig]:
        if not (isinstance(cls, type) and issubclass(cls, MethodConfig)):
            raise TypeError(f"@register_method('{name}') needs a MethodConfig subclass, got {cls!r}")
        if cls.stage not in STAGES:
            raise TypeError(f"{cls.__name__}.stage must be one of {STAGES}, got {cls.stage!r}")
        cls.name = name
        return METHODS.register(name)(cls)

    return deco


def get_method(name: str) -> type[MethodConfig]:
    """The registered config class of ``name`` (case-insensitive; ``-`` = ``_``); the error suggests a name."""
    key = _norm(name)
    found = METHODS.lookup(key)
    if found is not None:
        return found
    squash = {k.replace("_", ""): k for k in METHODS}
    if key.replace("_", "") in squash:
        return METHODS.lookup(squash[key.replace("_", "")])
    close = difflib.get_close_matches(key, list(METHODS), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise MethodError(f"unknown method '{name}'.{hint} Known methods: {', '.join(sorted(METHODS))}.")


def parse_method_spec(spec: Union[str, dict, MethodConfig], **overrides: Any) -> MethodConfig:
    """``NAME`` / ``NAME:key=value,key=value`` (or a dict / config) -> a validated config.

    ``overrides`` (typed values, e.g. from ``method_args``) win over the spec's options.
    """
    if isinstance(spec, MethodConfig):
        return spec.replace(**overrides) if overrides else spec
    if isinstance(spec, dict):
        return MethodConfig.from_dict({**spec, **overrides})
    text = str(spec).strip()
    if not text:
        raise MethodError(f"empty method spec; give NAME or NAME:key=value,... with NAME in {', '.join(sorted(METHODS))}.")
    klass = get_method(text.partition(":")[0])  # the name first: an unknown method is the error to report
    hints = get_type_hints(klass)
    fields = {f.name: f for f in dataclasses.fields(klass)}
    try:
        _, options = split_spec(text, example=f"{klass.name}:{next(iter(fields), 'key')}=...")
    except SpecError as exc:
        raise MethodError(str(exc)) from None
    values: dict[str, Any] = {}
    for key, value in options.items():
        if key not in fields:
            raise MethodError(_unknown_keys_message(klass, [key]))
        values[key] = _convert(value, hints[key], f"{klass.name}: {key}")
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise MethodError(_unknown_keys_message(klass, unknown))
    values.update(overrides)
    return klass(**values)


def method_dict(method: Union[None, str, dict, MethodConfig]) -> Optional[dict[str, Any]]:
    """The dict a result row carries for ``method`` (None for no method)."""
    if method is None:
        return None
    return parse_method_spec(method).to_dict()


__all__ = [
    "METHODS", "STAGES", "MethodError", "MethodConfig", "VisionAccount", "ModelGeometry", "param", "field_docs", "register_method",
    "get_method", "parse_method_spec", "method_dict",
]
