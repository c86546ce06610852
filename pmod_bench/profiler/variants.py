"""Variants: what a method does to the vision tokens, layer by layer, as the profiler needs it.

A :class:`Variant` says, for an LLM of ``L`` layers and ``V`` vision tokens per sample, how many
vision tokens each layer processes (:meth:`Variant.kept_vision_tokens`) and which layers run an
extra router over all tokens (:meth:`Variant.router_layers`). That is all FLOPs and KV-cache
accounting needs: a layer processes its kept vision tokens plus every text token, and caches keys
and values of exactly the tokens it processed. Variants with a real implementation in this
package (baseline, p-MoD) also say how to build the model (:meth:`Variant.pmod_config`), so their
FLOPs, KV cache and latency can be measured on a real forward pass.

The comparison methods (FastV, PyramidDrop, VisionZip, ...) are the registry's
(:mod:`pmod_bench.methods`): ``--variant fastv:k=2,keep=0.5`` or ``--method fastv`` reach them
through :func:`pmod_bench.methods.variant.method_variant`, validated there. Another accounting-only
variant plugs in by subclassing :class:`Variant` and ``@register_variant("name")``.
"""

from __future__ import annotations

from .errors import ProfileError

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from pmod_bench.model import config as _spec
from pmod_bench.model.config import PMoDConfig
from pmod_bench.model.schedules import num_selected_host as num_selected  # k = trunc(V * rho), float32

#: method name -> Variant subclass (see :func:`register_variant`)
VARIANT_METHODS: dict[str, type["Variant"]] = {}


class VariantError(ProfileError):
    """A variant specification that cannot be used; the message names the fix."""


def register_variant(method: str):
    """Class decorator: make a Variant subclass available as ``--variant METHOD:OPTIONS``."""

    def deco(cls):
        cls.method = method
        VARIANT_METHODS[method] = cls
        return cls

    return deco


class Variant:
    """Base class: one way of treating the vision tokens inside the LLM."""

    method: ClassVar[str] = "?"
    name: str

    # -- what the accounting needs -----------------------------------------------------------
    def kept_vision_tokens(self, num_layers: int, vision_tokens: int) -> list[int]:
        """Vision tokens processed (and cached) by each layer, per sample."""
        raise NotImplementedError

    def router_layers(self, num_layers: int) -> list[int]:
        """Layers that run a router Linear(d, 1) over all N tokens of the prefill."""
        return []

    def layer_ratios(self, num_layers: int) -> list[float]:
        """Nominal retention of each layer (1.0 = every vision token)."""
        return [1.0] * num_layers

    # -- per architecture and image ------------------------------------------------------------
    #: a comparison method of the registry (its vision side and token budget depend on the architecture and image)
    is_method: ClassVar[bool] = False

    def bind(self, arch, image_size: tuple[int, int], text_tokens: int, logits_tokens: int = 1, video=None) -> "Variant":
        """This variant on ``arch`` at (width, height) (or a ``video`` of such frames); a p-MoD variant is the same
        everywhere."""
        return self

    def vision_side(self, arch, layout):
        """The vision FLOPs of one sample (the unmodified tower and projector)."""
        from .flops import vision_flops

        return vision_flops(arch, layout)

    def row_extras(self) -> dict[str, Any]:
        """Keys a profile row adds for this variant (a method's config and solved budget); none by default."""
        return {}

    # -- descriptive -------------------------------------------------------------------------
    @property
    def shift(self) -> Optional[float]:
        return None

    @property
    def schedule(self) -> Optional[str]:
        return None

    # -- real models ---------------------------------------------------------------------------
    @property
    def runnable(self) -> bool:
        """Whether this package can build a real model of this variant (for measurement)."""
        return False

    def pmod_config(self) -> Optional[PMoDConfig]:
        """The p-MoD settings of the real model; None = the vanilla (baseline) model."""
        raise NotImplementedError(f"variant {self.name} ({self.method}) has no real implementation in pmod-bench")

    def runnable_on(self, video: Any = None) -> bool:
        """Whether the profiler times a real model of this variant on a scenario's prompts (``video``: the scenario's
        video, None for images): :attr:`runnable` variants everywhere; a comparison method on video prompts
        (:meth:`applied_to` a vanilla model)."""
        return self.runnable

    def applied_to(self, model: Any) -> Any:
        """``model`` (a vanilla model of its own, weights shared with the baseline's) running this variant's method;
        only for variants that are :meth:`runnable_on` a scenario without being :attr:`runnable`."""
        raise NotImplementedError(f"variant {self.name} ({self.method}) is not applied to a model")

    @classmethod
    def from_options(cls, options: dict[str, str]) -> "Variant":
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The identity keys of this variant's profile rows: a display name, and the configuration as data
        (``pmod``: the real model's ``PMoDConfig.to_dict()``, None for the baseline and accounting-only variants)."""
        pmod = self.pmod_config() if self.runnable else None
        return {"variant": self.name, "method": self.method, "shift": self.shift, "schedule": self.schedule,
                "pmod": None if pmod is None else pmod.to_dict()}


@register_variant("baseline")
@dataclass(frozen=True)
class Baseline(Variant):
    """The unmodified model: every layer processes every vision token."""

    name: str = "baseline"

    def kept_vision_tokens(self, num_layers: int, vision_tokens: int) -> list[int]:
        return [vision_tokens] * num_layers

    @property
    def runnable(self) -> bool:
        return True

    def pmod_config(self) -> Optional[PMoDConfig]:
        return None

    @classmethod
    def from_options(cls, options: dict[str, str]) -> "Baseline":
        if options:
            raise VariantError(f"the baseline takes no options, got {sorted(options)}")
        return cls()


def parse_ratios(text: Any) -> list[float]:
    """Explicit per-layer ratios (:func:`pmod_bench.model.config.parse_ratios`, every form) as a VariantError."""
    return _as_variant_error(_spec.parse_ratios, text, "--ratios")


@register_variant("pmod")
@dataclass(frozen=True)
class PMoD(Variant):
    """p-MoD: each routed layer keeps the top trunc(V * rho_l) vision tokens (METHOD.md)."""

    config: PMoDConfig = field(default_factory=PMoDConfig)
    label: Optional[str] = None

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.label or self.config.spec()

    def layer_ratios(self, num_layers: int) -> list[float]:
        try:
            return self.config.layer_ratios(num_layers)
        except ValueError as exc:
            raise VariantError(f"{self.name}: {exc}") from None

    def kept_vision_tokens(self, num_layers: int, vision_tokens: int) -> list[int]:
        return [vision_tokens if r >= 1.0 else num_selected(vision_tokens, r) for r in self.layer_ratios(num_layers)]

    def router_layers(self, num_layers: int) -> list[int]:
        return [i for i, r in enumerate(self.layer_ratios(num_layers)) if r < 1.0]

    @property
    def shift(self) -> Optional[float]:
        return None if self.config.ratios is not None else self.config.shift

    @property
    def schedule(self) -> Optional[str]:
        return "explicit" if self.config.ratios is not None else self.config.schedule

    @property
    def runnable(self) -> bool:
        return True

    def pmod_config(self) -> Optional[PMoDConfig]:
        return self.config

    @classmethod
    def from_options(cls, options: dict[str, str]) -> "PMoD":
        """``pmod:KEY=VALUE,...``: any PMoDConfig field (:func:`pmod_bench.model.config.pmod_config_from_options`)."""
        return cls(_as_variant_error(_spec.pmod_config_from_options, options))


def _as_variant_error(fn, *args: Any, **kwargs: Any) -> Any:
    """``fn(...)`` with the model library's validation errors (they name the fix) as VariantError."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        if "shift" in msg and "(0, 1.5]" in msg:
            msg += " Pass δ with --shift, e.g. --shift 0.3 0.4 0.5."
        raise VariantError(msg) from None


def make_pmod_config(**kwargs: Any) -> PMoDConfig:
    """PMoDConfig(**kwargs) with its validation errors turned into VariantError (they name the fix)."""
    return _as_variant_error(PMoDConfig, **kwargs)


# ------------------------------------------------------------------------------------------ parsing
#: where :func:`parse_variant` looks up a name no variant is registered under: the comparison methods' variants.
#: A lazy ``"module:object"`` entry resolved on use (as lm-eval's registry entries): the methods package builds on
#: the profiler (its accounting), so the profiler names it instead of importing it.
METHOD_SOURCE = "pmod_bench.methods.variant:METHOD_VARIANTS"


def _method_source():
    import importlib

    module, _, name = METHOD_SOURCE.partition(":")
    return getattr(importlib.import_module(module), name)


#: the paper's Table 7 variants, the default of ``pmod-bench profile``
PAPER_SHIFTS = (0.3, 0.4, 0.5)


def default_variants() -> list[Variant]:
    return [Baseline()] + [PMoD(make_pmod_config(shift=s)) for s in PAPER_SHIFTS]


def parse_variant(spec: str) -> Variant:
    """A variant from text.

    ``baseline``; a p-MoD spec (:func:`pmod_bench.model.config.parse_pmod_spec`: ``p-MoD-0.4``,
    ``p-MoD-linear-0.4``, ``pmod:shift=0.4,schedule=linear``, ``ratios:1*8,0.5*24``); a registered variant
    (``NAME:KEY=VALUE,...``); any comparison method of the registry (``fastv:k=2,keep=0.5``, ``visionzip``, ...).
    """
    text = str(spec).strip()
    config = _as_variant_error(_spec.parse_pmod_spec, text)
    if config is not None:
        return PMoD(config)
    head = text.partition(":")[0]
    norm = lambda name: name.strip().lower().replace("-", "").replace("_", "")  # noqa: E731  (p-MoD = pmod = p_mod)
    cls = {norm(k): c for k, c in VARIANT_METHODS.items()}.get(norm(head))
    if cls is None:  # a comparison method of the registry (pmod_bench.methods): its spec, validated there
        methods = _method_source()
        mv = methods.resolve(text)
        if mv is not None:
            return mv
        import difflib

        known = sorted({*VARIANT_METHODS, *methods.names()})
        close = difflib.get_close_matches(norm(head), known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise VariantError(
            f"unknown variant '{spec}'.{hint} Use baseline, {_spec.SPEC_FORMS}, or METHOD:KEY=VALUE with METHOD in "
            f"{', '.join(known)}."
        )
    return cls.from_options(_as_variant_error(_spec.split_spec, text)[1])


__all__ = [
    "Variant", "Baseline", "PMoD", "VariantError", "VARIANT_METHODS", "register_variant",
    "parse_variant", "parse_ratios", "default_variants", "make_pmod_config", "num_selected", "PAPER_SHIFTS",
]
