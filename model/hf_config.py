"""HF config classes of the p-MoD models (light: no torch modeling code).

Subclasses of HF's ``LlavaConfig`` / ``LlavaNextConfig`` with one extra field, ``pmod`` (a
serialised :class:`~pmod_bench.PMoDConfig`), validated at construction. :class:`PMoDConfigMixin` is
what every family's p-MoD config adds (Qwen2.5-VL's is in :mod:`pmod_bench.model.hosts.qwen2_5_vl`).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.models.llava.configuration_llava import LlavaConfig
from transformers.models.llava_next.configuration_llava_next import LlavaNextConfig

from .config import PMoDConfig


class PMoDConfigMixin:
    """Adds the validated ``pmod`` dict (a serialised :class:`PMoDConfig`) to an HF config."""

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)  # the HF LLaVA config's own
        self._validate_pmod()

    def _validate_pmod(self) -> None:
        self.pmod = PMoDConfig.from_dict(self.pmod).to_dict()
        n = self.text_config.num_hidden_layers
        ratios = self.pmod_config.layer_ratios(n)
        if self.pmod_router_layers is None:
            self.pmod_router_layers = [i for i, r in enumerate(ratios) if r < 1.0]
        self.pmod_router_layers = sorted(int(i) for i in self.pmod_router_layers)
        bad = [i for i in self.pmod_router_layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"pmod_router_layers {bad} out of range for {n} decoder layers")
        untrained = [i for i, r in enumerate(ratios) if r < 1.0 and i not in self.pmod_router_layers]
        if untrained:
            raise ValueError(f"layers {untrained} have ratio < 1 but no router (pmod_router_layers={self.pmod_router_layers})")

    @property
    def pmod_config(self) -> PMoDConfig:
        return PMoDConfig.from_dict(self.pmod)

    def layer_ratios(self) -> list[float]:
        return self.pmod_config.layer_ratios(self.text_config.num_hidden_layers)


@strict
class PMoDLlavaConfig(PMoDConfigMixin, LlavaConfig):
    r"""LLaVA-1.5 with p-MoD layers. ``pmod``: a :class:`~pmod_bench.PMoDConfig` as a dict;
    ``pmod_router_layers``: the layers that carry a router (default: those with ratio < 1)."""

    model_type = "pmod_llava"
    pmod: dict | None = None
    pmod_router_layers: list[int] | None = None


@strict
class PMoDLlavaNextConfig(PMoDConfigMixin, LlavaNextConfig):
    r"""LLaVA-NeXT with p-MoD layers; fields as :class:`PMoDLlavaConfig`."""

    model_type = "pmod_llava_next"
    pmod: dict | None = None
    pmod_router_layers: list[int] | None = None


_PMoDConfigMixin = PMoDConfigMixin
