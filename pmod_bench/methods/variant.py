"""A comparison method as a profiler variant: ``pmod-bench profile --method visionzip --match p-MoD-0.5``.

:class:`MethodVariant` adapts a vision-side :class:`MethodConfig` to the profiler's ``Variant``
contract. The vision tokens the LLM sees depend on the architecture and the image (tiles, anyres
layout), so the profiler binds the variant to each (architecture, image size) first
(:meth:`MethodVariant.bind`); with a ``match`` target the binding also runs the equal-compute solver
and records what it solved. The vision side (tower, projector, the method's own products) comes
from :func:`pmod_bench.methods.accounting.method_flops`.
"""

from __future__ import annotations

from typing import Any, Optional

from pmod_bench.profiler.variants import Variant, VariantError

from .base import METHODS, MethodConfig, MethodError, get_method, parse_method_spec


class MethodVariant(Variant):
    """Profiler variant of a vision-side method (optionally solved to a target at bind time)."""

    is_method = True

    def __init__(self, config: MethodConfig, match: Optional[dict[str, Any]] = None, *, _bound: Optional[tuple] = None):
        self.config = config
        self.match = dict(match) if match else None
        self.method = config.name
        self._bound = _bound  # (vision tokens of the LLM, MethodFlops, MatchResult or None)

    # ------------------------------------------------------------------------------- binding
    def bind(self, arch, image_size: tuple[int, int], text_tokens: int, logits_tokens: int = 1,
             video: Any = None) -> "MethodVariant":
        """This variant on ``arch`` at (width, height) (or on ``video``, frames of that size): solved (if ``match``), its
        token count and FLOPs fixed."""
        from .accounting import method_flops, solve

        try:
            result = None
            cfg = self.config
            if self.match:
                result = solve(cfg, arch, image_size, text_tokens=text_tokens, logits_tokens=logits_tokens, video=video,
                               **self.match)
                cfg = result.config
            flops = method_flops(cfg, arch, image_size, text_tokens, logits_tokens, video)
        except MethodError as exc:
            raise VariantError(str(exc)) from None
        return MethodVariant(cfg, self.match, _bound=(flops.llm_vision_tokens, flops, result))

    def _need(self) -> tuple:
        if self._bound is None:
            raise VariantError(f"{self.name}: the vision tokens of a method depend on the architecture and the image; "
                               "bind(arch, image_size, text_tokens) it first (the profiler does).")
        return self._bound

    # -------------------------------------------------------------------------- the contract
    @property
    def name(self) -> str:  # type: ignore[override]
        return self.config.spec()

    def kept_vision_tokens(self, num_layers: int, vision_tokens: int) -> list[int]:
        if self._bound is None:  # validation before binding (resolve_variants): nothing to check by layer count
            return [vision_tokens] * num_layers
        flops = self._bound[1]
        # in-LLM methods: each layer keeps its own count; vision-stage methods: the LLM gets the kept tokens throughout
        kept = list(flops.layer_vision_tokens) if flops.layer_vision_tokens else [self._bound[0]] * num_layers
        base = flops.baseline_vision_tokens
        if vision_tokens == base:
            return kept
        # another image than the bound one (the training recipe's sample): the same fraction of its vision tokens
        return [min(vision_tokens, round(k * vision_tokens / base)) for k in kept]

    def layer_ratios(self, num_layers: int) -> list[float]:
        if self._bound is None:
            return [1.0] * num_layers
        f = self._bound[1]
        return [f.llm_vision_tokens / f.baseline_vision_tokens] * num_layers

    def vision_side(self, arch, layout):
        """The vision FLOPs of one sample: encoder = tower + the method's own products, projector."""
        from pmod_bench.profiler.flops import VisionFlops

        f = self._need()[1]
        return VisionFlops(encoder=f.vision_encoder + f.method_extra, projector=f.projector)

    def row_extras(self) -> dict[str, Any]:
        """Keys a profile row adds for a method: its config as a dict, its extra work, what was solved."""
        _, f, result = self._need()
        return {"method_config": self.config.to_dict(), "method_extra_tflops": f.method_extra / 1e12,
                "method_match": result.to_dict() if result is not None else None,
                "method_note": f.note or None}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "method_config": self.config.to_dict()}

    # ------------------------------------------------------------------------------ real models
    def runnable_on(self, video: Any = None) -> bool:
        """Timed on image and video prompts (``profile --latency``): the method applied to a vanilla model that shares
        the baseline's weights (:meth:`applied_to`), its prefill the method's own work and its decode on the shortened
        cache."""
        return True

    def applied_to(self, model: Any) -> Any:
        """``model`` running this (bound, solved) method: :func:`pmod_bench.methods.apply.apply_method`."""
        from .apply import apply_method

        try:
            return apply_method(model, self.config)
        except MethodError as exc:
            raise VariantError(str(exc)) from None


def method_variant(spec: str, match: Optional[dict[str, Any]] = None) -> Optional[MethodVariant]:
    """A :class:`MethodVariant` if ``spec`` names a registered method (else None); errors as VariantError."""
    name = str(spec).partition(":")[0]
    try:
        get_method(name)
    except MethodError:
        return None
    try:
        return MethodVariant(parse_method_spec(spec), match)
    except MethodError as exc:
        raise VariantError(str(exc)) from None


class MethodVariants:
    """The profiler's lookup of the method variants (:data:`pmod_bench.profiler.variants.METHOD_SOURCE` names it)."""

    def resolve(self, spec: str) -> Optional[MethodVariant]:
        return method_variant(spec)

    def names(self) -> list[str]:
        return list(METHODS)


METHOD_VARIANTS = MethodVariants()

__all__ = ["MethodVariant", "method_variant", "MethodVariants", "METHOD_VARIANTS"]
