"""Host adapters: everything pmod-bench asks about one model family, in one place per family.

A host adapter answers every "which model is this?" question, so nothing else tests class names or
config keys: where the decoder layers are, which positions hold vision tokens, the position layout
(1-D RoPE; Qwen's M-RoPE with three position rows and ``rope_deltas`` for decode), the vision
geometry (LLaVA-NeXT's anyres tiles + newline features; Qwen's merged patch grid), the class map
(vanilla HF class <-> the sparse class that runs the in-LLM methods <-> the p-MoD class, and the
p-MoD config class), the HF contract checks, and the Auto-class registration. One module per family,
registered by ``model_type`` (the vanilla and the p-MoD one) with one line::

    @HOSTS.register("qwen2_5_vl", "pmod_qwen2_5_vl")
    class Qwen2_5_VLHost(HostAdapter): ...

:func:`host_for` finds the adapter of a model, a config or a ``model_type`` (the modules of this
package are imported on the first lookup: adding a family is adding a module, no list to edit).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, ClassVar, Iterator, Optional

from ..compat import contract_error
from ..registry import Registry


class HostError(ValueError):
    """A model of a family pmod-bench has no adapter for; the message names the supported ones."""


class HostAdapter:
    """Base class of a family's adapter (see the module docstring). Class attributes describe the family; the
    methods have the answers most families share (decoder layers at ``model.model.language_model.layers``,
    1-D RoPE, the vision tokens at ``config.image_token_id``) and the hosts override what differs."""

    model_type: ClassVar[str] = ""
    """The vanilla HF ``model_type`` (``llava_next``)."""
    pmod_model_type: ClassVar[str] = ""
    """The p-MoD ``model_type`` (``pmod_llava_next``)."""
    title: ClassVar[str] = ""
    """How the docs name the family (``LLaVA-NeXT``)."""
    vanilla_class: ClassVar[type]
    """The HF model class (``LlavaNextForConditionalGeneration``)."""
    sparse_class: ClassVar[type]
    """The vanilla class with the routed forward: what a vanilla model becomes when a comparison method is applied."""
    pmod_class: ClassVar[type]
    """The p-MoD model class."""
    pmod_config_class: ClassVar[type]
    """The p-MoD config class (the vanilla config's fields plus ``pmod`` and ``pmod_router_layers``)."""
    anyres: ClassVar[bool] = False
    """LLaVA-NeXT's anyres tiling (several tower tiles per image, newline features)."""
    position_rows: ClassVar[int] = 1
    """Rows of position ids (1: 1-D RoPE; 3: M-RoPE's temporal / height / width)."""
    vision_stage_methods: ClassVar[Any] = True
    """Whether the vision-stage comparison methods (and iLLaVA's vision side) run on this family: True (all), False
    (none) or the names of the ported ones (Qwen2.5-VL: a frozenset)."""
    cls_token: ClassVar[bool] = True
    """Whether the vision tower has a [CLS] token (CLIP: yes; Qwen2.5-VL's window-attention ViT and SigLIP: no): the
    methods that rank patches by its attention (FasterVLM, PruMerge) need one."""

    # ------------------------------------------------------------------------------- structure
    def text_model(self, model) -> Any:
        """The LLM (decoder layers, ``rotary_emb``) of ``model``."""
        lm = getattr(getattr(model, "model", None), "language_model", None)
        if lm is None or not hasattr(lm, "layers"):
            raise contract_error(f"{type(model).__name__} has no model.language_model.layers: the {self.title} "
                                 "modeling file changed")
        return lm

    def decoder_layers(self, model) -> Any:
        """The decoder layers (an ``nn.ModuleList`` whose entries the sparse layers replace)."""
        return self.text_model(model).layers

    def vision_mask(self, config, input_ids):
        """(B, N) bool: the positions of ``input_ids`` that hold vision features."""
        return input_ids == config.image_token_id

    # ------------------------------------------------------------------------------- positions
    @contextlib.contextmanager
    def positions(self, model, plan) -> Iterator[None]:
        """For one forward: give ``plan`` the position layout, ``plan.renumber = (x, layer kwargs, shift) -> (cos,
        sin)`` (RoPE at positions - shift). 1-D RoPE: the LLM's ``rotary_emb`` at the layers' ``position_ids``."""
        from ..rope import renumbered_rope

        plan.renumber = functools.partial(renumbered_rope, self.text_model(model).rotary_emb)
        yield

    def decode_inputs(self, model, attention_mask) -> dict:
        """Extra inputs of a hand-made decode step (one new token per row after a prefill, ``attention_mask`` over
        everything so far): what ``generate`` would pass besides the cache. 1-D RoPE: none (positions from the cache)."""
        return {}

    # ------------------------------------------------------------------------------- class map
    def pmod_config(self, config, pmod: dict):
        """The p-MoD config of a vanilla ``config`` (same fields, ``pmod`` = a PMoDConfig dict)."""
        d = config.to_dict()
        for key in ("model_type", "architectures", "transformers_version", "pmod", "pmod_router_layers"):
            d.pop(key, None)
        new = self.pmod_config_class(**d, pmod=pmod)
        new._attn_implementation = config._attn_implementation
        return new

    def with_routing(self, model):
        """The class map, vanilla -> routed: ``model`` (the same object, weights untouched) takes the family's routed
        class when a comparison method is applied; a p-MoD or routed model is returned as it is."""
        if type(model) is self.vanilla_class:
            model.__class__ = self.sparse_class
        return model

    def without_routing(self, model):
        """The class map back: a model of the routed class (no method left) is the vanilla class again."""
        if type(model) is self.sparse_class:
            model.__class__ = self.vanilla_class
        return model

    def vanilla_config(self, config):
        """A fresh vanilla config (no p-MoD fields) of ``config``, vanilla or p-MoD."""
        d = config.to_dict()
        for key in ("model_type", "architectures", "transformers_version", "pmod", "pmod_router_layers"):
            d.pop(key, None)
        return self.vanilla_class.config_class(**d)

    def register_auto(self) -> None:
        """Register the p-MoD config and model classes with transformers' Auto classes (public API only)."""
        from transformers import AutoConfig, AutoModelForImageTextToText
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

        # save / load in the same key layout as HF's own checkpoints of the family
        if (get_checkpoint_conversion_mapping(self.pmod_model_type) is None
                and get_checkpoint_conversion_mapping(self.model_type) is not None):
            register_checkpoint_conversion_mapping(self.pmod_model_type, get_checkpoint_conversion_mapping(self.model_type))
        AutoConfig.register(self.pmod_model_type, self.pmod_config_class, exist_ok=True)
        AutoModelForImageTextToText.register(self.pmod_config_class, self.pmod_class, exist_ok=True)
        self.register_processor()

    def register_processor(self) -> None:
        """Register the family's processor for the p-MoD config (AutoProcessor)."""

    # ------------------------------------------------------------------------------- checks
    def check(self, model) -> None:
        """The HF details this family's adapter relies on; raises :class:`~pmod_bench.model.compat.HFContractError`."""
        self.decoder_layers(model)

    # ------------------------------------------------------------------------------- vision geometry
    def method_geometry(self, config) -> dict:
        """The fields of :class:`pmod_bench.methods.ModelGeometry` for ``config`` (what the methods' limits
        depend on)."""
        raise NotImplementedError

    def image_tokens(self, config, image_size, gh: Optional[int] = None, gw: Optional[int] = None) -> int:
        """LLM positions of one image of ``image_size`` (height, width) at ``gh x gw`` features per tile."""
        raise HostError(f"{self.title}: the vision tokens of an image are computed by its processor")

    def split_tiles(self, config, pixel_values, image_sizes) -> list:
        """The tower tiles of each image of a batch: [(tiles_i, C, H, W)]."""
        raise HostError(f"{self.title}: no tile layout (the vision-stage methods do not run on it)")

    def routing_grid(self, config, inputs, num_vision: int) -> Optional[list[int]]:
        """[rows, cols] the first ``rows * cols`` vision tokens of one prompt's image cover, row-major (the paper's Fig.
        5 map); None when they do not form one."""
        return None

    def paper_image_size(self, config) -> tuple[int, int]:
        """(width, height) of the image the paper's efficiency scenario uses on this family (``--match``)."""
        tile = int(config.vision_config.image_size)
        return (tile, tile)


HOSTS: Registry[type] = Registry("host family", base=HostAdapter, package=__name__)


@functools.lru_cache(maxsize=None)
def _instance(cls: type) -> HostAdapter:
    return cls()


def host_for(obj: Any) -> HostAdapter:
    """The adapter of a model (``PreTrainedModel``), a config, or a ``model_type`` string; :class:`HostError` names
    the supported families."""
    if isinstance(obj, str):
        model_type = obj
    else:
        config = getattr(obj, "config", obj)  # a model holds its config; a config is itself
        model_type = getattr(config, "model_type", None)
    cls = HOSTS.lookup(model_type) if model_type else None
    if cls is None:
        known = ", ".join(f"{c.model_type} ({c.title})" for c in supported_hosts())
        raise HostError(f"pmod-bench has no host adapter for model_type '{model_type}' ({type(obj).__name__}); "
                        f"supported: {known}. A new family is one module in pmod_bench/model/hosts (CONTRIBUTING.md, "
                        "'Add a host family').")
    return _instance(cls)


def family_of(obj: Any) -> Optional[str]:
    """The host family of a model, config or ``model_type``: its adapter's vanilla ``model_type`` (``pmod_qwen2_5_vl``
    -> ``qwen2_5_vl``), or, for a family without an adapter (LLaVA-OneVision), its own ``model_type``. The one place
    a p-MoD type maps to its base family: the profiler's geometry table and the eval request table key on it."""
    try:
        return host_for(obj).model_type
    except HostError:
        return obj if isinstance(obj, str) else getattr(getattr(obj, "config", obj), "model_type", None)


def supported_hosts() -> list[type]:
    """Every registered adapter class, once each, in model_type order."""
    seen: dict[str, type] = {}
    for _, cls in HOSTS.items():
        seen.setdefault(cls.model_type, cls)
    return [seen[k] for k in sorted(seen)]


def is_pmod_model_type(model_type: str) -> bool:
    cls = HOSTS.lookup(model_type)
    return cls is not None and cls.pmod_model_type == model_type


__all__ = ["HostAdapter", "HostError", "HOSTS", "host_for", "family_of", "supported_hosts", "is_pmod_model_type"]
