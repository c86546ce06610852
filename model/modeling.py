"""p-MoD LLaVA-1.5 and LLaVA-NeXT on HF transformers: configs, models, ``to_pmod``, registration.

The classes subclass HF's own (``LlavaConfig`` / ``LlavaForConditionalGeneration`` and the NeXT
pair) and add only what differs: a ``pmod`` config field, decoder layers wrapped as p-MoD layers
(:mod:`pmod_bench.model.layer`), and a forward that tells the layers where the vision tokens are.
After ``import pmod_bench`` they are registered with ``AutoConfig`` / ``AutoModelForImageTextToText``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn
from transformers.models.llava.modeling_llava import LlavaForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import LlavaNextForConditionalGeneration

from .cache import PMoDCache, kv_cache_entries
from .compat import cache_argument
from .config import PMoDConfig
from .hf_config import PMoDLlavaConfig, PMoDLlavaNextConfig
from .layer import PMoDLayerMixin, PMoDRouter, wrap_decoder_layer
from .plan import RoutingPlan
from .rope import renumbered_rope


# ------------------------------------------------------------------------------------------- models
class RoutedForwardMixin:
    """What every model whose decoder layers read a :class:`RoutingPlan` shares: the vision mask, the
    plan (one per forward) and the project's cache. The p-MoD models use it, and so does a vanilla
    model run with an in-LLM comparison method (:mod:`pmod_bench.methods`), whose wrapped layers are
    the same :class:`PMoDLayerMixin` layers without a router."""

    _pmod_guard = False
    _pmod_record: Optional[dict] = None

    def routed_layer_indices(self) -> list[int]:
        """Indices of the decoder layers that read the routing plan (p-MoD layers, method layers)."""
        return [i for i, l in enumerate(self.model.language_model.layers) if isinstance(l, PMoDLayerMixin)]

    def _cache_layers(self) -> set[int]:
        """Layers whose KV cache keeps only the tokens they process (a :class:`PMoDCacheLayer`)."""
        return set(self.routed_layer_indices())

    def _guarded_layers(self) -> dict:
        """The layers the overflow guard watches (p-MoD layers; none without p-MoD)."""
        return {}

    # -------------------------------------------------------------------------------- forward
    #: the parent forward's cache argument ('cache' from transformers 5.24, 'past_key_values' before)
    _pmod_cache_arg: str

    def _vision_mask(self, input_ids, inputs_embeds, vision_token_mask) -> Optional[torch.Tensor]:
        ref = input_ids if input_ids is not None else inputs_embeds
        if vision_token_mask is not None and vision_token_mask.shape[:2] == ref.shape[:2]:
            return vision_token_mask.bool()
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        if self.training or ref.shape[1] > 1:
            warnings.warn(
                "p-MoD forward with inputs_embeds and no vision_token_mask: no vision tokens are known, so every "
                "token is processed. Pass input_ids or vision_token_mask=(B, N) bool.",
                stacklevel=4,
            )
        return None

    def _pmod_forward(self, parent_forward, args: tuple, kwargs: dict):
        """Build the routing plan and the p-MoD cache, then run HF's own forward with both.

        The cache arrives under whichever name the caller used (``cache`` or ``past_key_values``) and
        goes on under the parent's name. ``None`` or generate()'s empty default cache becomes a
        :class:`PMoDCache`, which the output carries back to generate(). Training uses no cache.
        """
        if args:  # positional arguments in the parent's order
            names = [n for n in inspect.signature(parent_forward).parameters if n != "self"]
            kwargs.update(zip(names, args))
        vision_token_mask = kwargs.pop("vision_token_mask", None)
        given = [kwargs.pop(name) for name in ("cache", "past_key_values") if name in kwargs]
        cache = next((c for c in given if c is not None), None)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", None)
            if use_cache is None:
                use_cache = getattr(self.config.text_config, "use_cache", True)
        if self.training and torch.is_grad_enabled():
            use_cache, cache = False, None
            kwargs["use_cache"] = False
        if use_cache:
            cache = PMoDCache.take_over(cache, self.config.text_config, self._cache_layers())
        elif cache is not None:
            raise ValueError("a cache was passed with use_cache=False; pass use_cache=True or no cache.")
        input_ids, inputs_embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        ref = input_ids if input_ids is not None else inputs_embeds
        plan = RoutingPlan.build(
            self._vision_mask(input_ids, inputs_embeds, vision_token_mask),
            kwargs.get("attention_mask"),
            seq_len=ref.shape[1],
            batch=ref.shape[0],
            device=ref.device,
            cache=cache,
            guard=self._pmod_guard,
            record=self._pmod_record,
        )
        llm_method = getattr(self, "llm_method", None)
        if llm_method is not None:  # an in-LLM comparison method (pmod_bench.methods): its policy of this forward
            plan.renumber = functools.partial(renumbered_rope, self.model.language_model.rotary_emb)
            if plan.target is not None:
                plan.method = llm_method.start(self, plan, kwargs)
        kwargs[self._pmod_cache_arg] = cache
        kwargs["pmod_plan"] = plan
        with plan.guarding(self._guarded_layers()):
            out = parent_forward(**kwargs)
        plan.check_overflow()  # one host check for the whole forward (overflow guard on only)
        missing = sorted(set(self.routed_layer_indices()) - plan.visited)
        if missing:
            from .compat import contract_error

            raise contract_error(f"routed layers {missing} did not receive the routing plan")
        return out


class PMoDModelMixin(RoutedForwardMixin):
    """Routing behaviour shared by the p-MoD LLaVA and LLaVA-NeXT models."""

    config: Union[PMoDLlavaConfig, PMoDLlavaNextConfig]

    def _install_pmod_layers(self) -> None:
        lm = self.model.language_model
        ratios = self.config.layer_ratios()
        pmod = self.config.pmod_config
        hidden = self.config.text_config.hidden_size
        for i in self.config.pmod_router_layers:
            lm.layers[i] = wrap_decoder_layer(lm.layers[i], i, ratios[i], pmod, hidden)
        self._pmod_record: Optional[dict] = None

    def initialize_weights(self):
        # HF dispatches each sub-model's own `_init_weights` (the routers sit inside the LLM, whose
        # init would draw them from a normal distribution); re-initialise them with ours afterwards.
        # transformers.initialization skips tensors that were loaded from a checkpoint.
        super().initialize_weights()
        for layer in self.pmod_layers.values():
            self._init_weights(layer.router)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, PMoDRouter):  # routers missing from a checkpoint (e.g. a vanilla LLaVA one)
            from transformers import initialization as init

            if module.zero_init:
                init.zeros_(module.weight)
            else:
                init.normal_(module.weight, mean=0.0, std=self.config.text_config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
            return
        super()._init_weights(module)

    # ---------------------------------------------------------------------------- inspection
    def _guarded_layers(self) -> dict:
        return self.pmod_layers

    @property
    def pmod_layers(self) -> dict[int, nn.Module]:
        """The p-MoD (routed) decoder layers by index (layers wrapped for a comparison method only, without
        a router, are not p-MoD layers)."""
        return {i: l for i, l in enumerate(self.model.language_model.layers)
                if isinstance(l, PMoDLayerMixin) and l.router is not None}

    def _cache_layers(self) -> set[int]:
        return set(self.config.pmod_router_layers) | set(super()._cache_layers())

    def layer_ratios(self) -> list[float]:
        """Retention ratio of every decoder layer as the model runs now (1.0 = every token processed)."""
        return [getattr(l, "ratio", 1.0) for l in self.model.language_model.layers]

    @property
    def _pmod_guard(self) -> bool:
        """The overflow guard's one switch: ``config.pmod["overflow_guard"]``."""
        return bool((self.config.pmod or {}).get("overflow_guard", False))

    @contextlib.contextmanager
    def record_routing(self) -> Iterator[dict]:
        """Opt-in introspection: within the block, each forward with vision tokens records, per p-MoD
        layer, ``{"selected": (B, N) bool, "target": (B, N) bool}`` (the paper's Fig. 5/6)."""
        record: dict = {}
        previous, self._pmod_record = self._pmod_record, record
        try:
            yield record
        finally:
            self._pmod_record = previous

    # ------------------------------------------------------------------------------ overrides
    def set_pmod_ratios(
        self,
        pmod: Union[PMoDConfig, dict, None] = None,
        allow_untrained_routers: bool = False,
        **changes: Any,
    ) -> list[float]:
        """Run a trained model at other retention ratios, without retraining.

        ``model.set_pmod_ratios(shift=0.3)``, ``set_pmod_ratios(schedule="linear")`` or
        ``set_pmod_ratios(ratios=[...])``. Layers with a router take the new ratio (a ratio of 1.0
        processes every token and keeps the learned weighting). A layer without a trained router
        that the new schedule would route raises an error, unless ``allow_untrained_routers`` (the
        new router is zero-initialised: every token weighs 1 and ties are broken by position).
        Returns the new per-layer ratios.
        """
        base = PMoDConfig.from_dict(pmod) if pmod is not None else self.config.pmod_config
        if "ratios" not in changes and ("shift" in changes or "schedule" in changes):
            changes["ratios"] = None
        new = base.replace(**changes) if changes else base
        lm = self.model.language_model
        ratios = new.layer_ratios(len(lm.layers))
        routers = set(self.config.pmod_router_layers)
        need = [i for i, r in enumerate(ratios) if r < 1.0 and i not in routers]
        if need and not allow_untrained_routers:
            raise ValueError(
                f"the new ratios route layers {need}, which have no trained router (trained routers: {sorted(routers)}). "
                "Choose a schedule that keeps those layers ordinary, or pass allow_untrained_routers=True."
            )
        hidden = self.config.text_config.hidden_size
        for i, r in enumerate(ratios):
            if i in routers or r < 1.0:
                lm.layers[i] = wrap_decoder_layer(lm.layers[i], i, r, new, hidden)
                routers.add(i)
        self.config.pmod = new.to_dict()
        self.config.pmod_router_layers = sorted(routers)  # router layers at ratio 1.0 stay routed on reload
        return ratios

    # --------------------------------------------------------------------------- accounting
    def kv_cache_entries(self, cache) -> list[int]:
        """Stored KV entries per layer (see :func:`pmod_bench.model.layer.kv_cache_entries`)."""
        return kv_cache_entries(cache)


def _signature_of(parent):
    """Give a forward the parent's signature plus ``vision_token_mask`` (generate() inspects it)."""
    sig = inspect.signature(parent)
    params = list(sig.parameters.values())
    extra = inspect.Parameter("vision_token_mask", inspect.Parameter.KEYWORD_ONLY, default=None)
    var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    params = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD] + [extra] + var_kw

    def decorate(fn):
        fn.__signature__ = sig.replace(parameters=params)
        fn.__doc__ = (
            "HF forward, plus ``vision_token_mask`` (B, N) bool marking the vision tokens for callers that pass "
            "``inputs_embeds`` instead of ``input_ids``.\n\n" + (parent.__doc__ or "")
        )
        return fn

    return decorate


class PMoDLlavaForConditionalGeneration(PMoDModelMixin, LlavaForConditionalGeneration):
    """p-MoD-LLaVA-1.5: HF ``LlavaForConditionalGeneration`` with p-MoD decoder layers."""

    config_class = PMoDLlavaConfig

    def __init__(self, config: PMoDLlavaConfig):
        super().__init__(config)
        self._install_pmod_layers()

    _pmod_cache_arg = cache_argument(LlavaForConditionalGeneration.forward, "LlavaForConditionalGeneration.forward")

    @_signature_of(LlavaForConditionalGeneration.forward)
    def forward(self, *args, **kwargs):
        return self._pmod_forward(super().forward, args, kwargs)


class PMoDLlavaNextForConditionalGeneration(PMoDModelMixin, LlavaNextForConditionalGeneration):
    """p-MoD-LLaVA-NeXT: HF ``LlavaNextForConditionalGeneration`` with p-MoD decoder layers."""

    config_class = PMoDLlavaNextConfig

    def __init__(self, config: PMoDLlavaNextConfig):
        super().__init__(config)
        self._install_pmod_layers()

    _pmod_cache_arg = cache_argument(LlavaNextForConditionalGeneration.forward, "LlavaNextForConditionalGeneration.forward")

    @_signature_of(LlavaNextForConditionalGeneration.forward)
    def forward(self, *args, **kwargs):
        return self._pmod_forward(super().forward, args, kwargs)


#: vanilla HF class -> (p-MoD model class, p-MoD config class)
PMOD_COUNTERPARTS = {
    LlavaNextForConditionalGeneration: (PMoDLlavaNextForConditionalGeneration, PMoDLlavaNextConfig),
    LlavaForConditionalGeneration: (PMoDLlavaForConditionalGeneration, PMoDLlavaConfig),
}


def pmod_config_from(config, pmod: Union[PMoDConfig, dict, None] = None):
    """The p-MoD HF config for a vanilla LLaVA / LLaVA-NeXT config (same fields plus ``pmod``)."""
    for vanilla_cls, (_, cfg_cls) in PMOD_COUNTERPARTS.items():
        if isinstance(config, vanilla_cls.config_class):
            d = config.to_dict()
            for key in ("model_type", "architectures", "transformers_version", "pmod", "pmod_router_layers"):
                d.pop(key, None)
            new = cfg_cls(**d, pmod=PMoDConfig.from_dict(pmod).to_dict())
            new._attn_implementation = config._attn_implementation
            return new
    raise TypeError(f"expected a LlavaConfig or LlavaNextConfig, got {type(config).__name__}")


def to_pmod(model: nn.Module, pmod: Union[PMoDConfig, dict, None] = None, **changes: Any) -> nn.Module:
    """Turn a vanilla HF LLaVA / LLaVA-NeXT model into its p-MoD counterpart.

    The decoder layers that the schedule routes become p-MoD layers; every weight is the vanilla
    model's own tensor (no copy) and the routers are zero-initialised, so the model computes what
    it computed before until its routers are trained.  Returns the p-MoD model (the input model's
    tensors are shared with it; keep using the returned object).
    """
    cfg = PMoDConfig.from_dict(pmod)
    if changes:
        cfg = cfg.replace(**changes)
    if isinstance(model, PMoDModelMixin):
        model.set_pmod_ratios(cfg)
        return model
    for vanilla_cls, (pmod_cls, _) in PMOD_COUNTERPARTS.items():
        if isinstance(model, vanilla_cls):
            break
    else:
        raise TypeError(
            f"to_pmod expects an HF LlavaForConditionalGeneration or LlavaNextForConditionalGeneration, got {type(model).__name__}"
        )
    new_config = pmod_config_from(model.config, cfg)
    with torch.device("meta"):
        new = pmod_cls(new_config)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False, assign=True)
    not_router = [k for k in missing if ".router." not in k]
    if not_router or unexpected:
        raise RuntimeError(f"to_pmod: weights did not map one to one (missing {not_router[:5]}, unexpected {unexpected[:5]})")
    # tensors outside the state dict (non-persistent buffers such as RoPE's inv_freq) come over as-is
    old_modules = dict(model.named_modules())
    for name, module in new.named_modules():
        old = old_modules.get(name)
        if old is None:
            continue
        for key, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta and old._buffers.get(key) is not None:
                module._buffers[key] = old._buffers[key]
        for key, val in list(vars(module).items()):
            if isinstance(val, torch.Tensor) and val.is_meta and isinstance(getattr(old, key, None), torch.Tensor):
                setattr(module, key, getattr(old, key))
    ref = next(model.parameters())
    for layer in new.pmod_layers.values():
        layer.router.to_empty(device=ref.device)
        layer.router.to(dtype=ref.dtype)
        layer.router.reset_parameters()
    leftover = [n for n, t in list(new.named_parameters()) + list(new.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"to_pmod left tensors on the meta device: {leftover[:5]}")
    new.generation_config = model.generation_config
    new.train(model.training)
    return new


def register_auto_classes() -> None:
    """Register the p-MoD configs, models and processors with transformers' Auto classes (idempotent).

    Called when this module is imported (see :func:`pmod_bench.register`); public ``Auto*.register``
    API only."""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForImageTextToText,
        AutoProcessor,
        CLIPImageProcessor,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
    )
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

    # save / load in the same key layout as HF's own LLaVA checkpoints (language_model.model.layers.N...)
    for model_type, base in ((PMoDLlavaConfig.model_type, "llava"), (PMoDLlavaNextConfig.model_type, "llava_next")):
        if get_checkpoint_conversion_mapping(model_type) is None and get_checkpoint_conversion_mapping(base) is not None:
            register_checkpoint_conversion_mapping(model_type, get_checkpoint_conversion_mapping(base))
    AutoConfig.register(PMoDLlavaConfig.model_type, PMoDLlavaConfig, exist_ok=True)
    AutoConfig.register(PMoDLlavaNextConfig.model_type, PMoDLlavaNextConfig, exist_ok=True)
    AutoModelForImageTextToText.register(PMoDLlavaConfig, PMoDLlavaForConditionalGeneration, exist_ok=True)
    AutoModelForImageTextToText.register(PMoDLlavaNextConfig, PMoDLlavaNextForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(PMoDLlavaConfig, LlavaProcessor, exist_ok=True)
    AutoProcessor.register(PMoDLlavaNextConfig, LlavaNextProcessor, exist_ok=True)
    AutoImageProcessor.register(PMoDLlavaConfig, slow_image_processor_class=CLIPImageProcessor, exist_ok=True)
    AutoImageProcessor.register(PMoDLlavaNextConfig, slow_image_processor_class=LlavaNextImageProcessor, exist_ok=True)


register_auto_classes()
