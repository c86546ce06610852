"""The model side of the sparse layers: one forward that builds the routing plan, for every host family.

:class:`SparseModelMixin` is put in front of a host's HF model class (the host adapter's class map,
:mod:`pmod_bench.model.hosts`): its forward tells the decoder layers where the vision tokens are
(one :class:`~pmod_bench.model.plan.RoutingPlan` per call) and owns the KV cache
(:class:`~pmod_bench.model.cache.PMoDCache`). It also runs a comparison method applied with
:func:`pmod_bench.methods.apply_method` (``method_config``): a vision-stage method shortens the prompt
before the LLM (``method_config.prefill``), an in-LLM method gives each forward its token policy
(``method_config.start``). :class:`PMoDModelMixin` adds p-MoD: routers, ratios, introspection.

Every family-specific question (decoder layers, vision tokens, position layout) goes to the model's
host adapter; nothing here tests a class name or a config key.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

from .cache import PMoDCache, kv_cache_entries
from .compat import CACHE_ARGUMENTS, check_attention_rows, contract_error
from .config import PMoDConfig
from .hosts import HostAdapter, host_for
from .layer import PMoDRouter, SparseLayerMixin, unwrap_method_layer, wrap_decoder_layer
from .plan import RoutingPlan


#: the forward arguments that put vision features into the sequence (every host's HF forward names them so). A
#: forward on a filled cache without any of them is a decode step: its tokens are text even when one is a generated
#: ``<image>`` / ``<video>`` id (HF inserts features only where it is given pixels, so the id is a text embedding)
VISION_INPUTS = ("pixel_values", "pixel_values_videos")


class SparseModelMixin:
    """The routed forward (module docstring), in front of a host's HF class."""

    _pmod_guard = False
    _pmod_record: Optional[dict] = None
    #: the comparison method applied (``pmod_bench.methods.apply.AppliedMethod``, by ``apply_method``); None: none.
    #: What the forward calls on it: ``first_layer()`` (None: no in-LLM part), ``start(model, plan, kwargs)`` (the
    #: in-LLM token policy of one forward), ``prefill(model, kwargs)`` (a vision-stage method's shorter prompt),
    #: ``generate(model, parent_generate, inputs, args, kwargs)`` and ``method_inputs(model, ...)``.
    applied_method = None
    #: the parent forward's cache argument ('cache' from transformers 5.24, 'past_key_values' before)
    _pmod_cache_arg: str

    @property
    def method_config(self):
        """The config of the comparison method applied (a :class:`pmod_bench.methods.MethodConfig`), or None."""
        return self.applied_method.config if self.applied_method is not None else None

    @property
    def host(self) -> HostAdapter:
        """This model's family adapter."""
        return host_for(self.config)

    def routed_layer_indices(self) -> list[int]:
        """Indices of the decoder layers that read the routing plan (p-MoD layers, method layers)."""
        return [i for i, l in enumerate(self.host.decoder_layers(self)) if isinstance(l, SparseLayerMixin)]

    def _cache_layers(self) -> set[int]:
        """Layers whose KV cache keeps only the tokens they process (a :class:`PMoDCacheLayer`)."""
        return set(self.routed_layer_indices())

    def _guarded_layers(self) -> dict:
        """The layers the overflow guard watches (p-MoD layers; none without p-MoD)."""
        return {}

    # -------------------------------------------------------------------------------- methods
    def use_method(self, method) -> None:
        """Run ``method`` (an applied method, see :attr:`applied_method`; checked against this model by
        ``apply_method``) in this model's forward, or none (None). The decoder layers from the method's
        ``first_layer()`` on become sparse layers (a p-MoD layer stays as it is); a previous method's layers go."""
        layers = self.host.decoder_layers(self)
        for i, layer in enumerate(layers):
            layers[i] = unwrap_method_layer(layer)
        self.__dict__.pop("applied_method", None)
        first = method.first_layer() if method is not None else None
        if first is not None:
            hidden = self.config.text_config.hidden_size
            for i in range(first, len(layers)):
                layers[i] = wrap_decoder_layer(layers[i], i, 1.0, None, hidden)
                check_attention_rows(layers[i].self_attn)
        if method is not None:
            self.applied_method = method

    def method_inputs(self, *args: Any, **kwargs: Any):
        """The shortened prefill of the vision-stage method applied (``pmod_bench.methods.apply.MethodInputs``)."""
        if self.applied_method is None:
            raise ValueError("no comparison method is applied; use pmod_bench.methods.apply_method(model, METHOD) first.")
        return self.applied_method.method_inputs(self, *args, **kwargs)

    def generate(self, inputs: Optional[torch.Tensor] = None, *args: Any, **kwargs: Any):
        if self.applied_method is None:
            return super().generate(inputs, *args, **kwargs)
        return self.applied_method.generate(self, super().generate, inputs, args, kwargs)

    # -------------------------------------------------------------------------------- forward
    def _vision_mask(self, input_ids, inputs_embeds, vision_token_mask) -> Optional[torch.Tensor]:
        ref = input_ids if input_ids is not None else inputs_embeds
        if vision_token_mask is not None and vision_token_mask.shape[:2] == ref.shape[:2]:
            return vision_token_mask.bool()
        if input_ids is not None:
            return self.host.vision_mask(self.config, input_ids)
        if self.training or ref.shape[1] > 1:
            warnings.warn(
                "p-MoD forward with inputs_embeds and no vision_token_mask: no vision tokens are known, so every "
                "token is processed. Pass input_ids or vision_token_mask=(B, N) bool.",
                stacklevel=5,
            )
        return None

    def _take_cache(self, kwargs: dict) -> Optional[PMoDCache]:
        """The project's cache for this forward, from whichever of ``cache`` / ``past_key_values`` the caller used:
        ``None`` or generate()'s empty default cache becomes a :class:`PMoDCache`. Training uses no cache."""
        given = [kwargs.pop(name) for name in CACHE_ARGUMENTS if name in kwargs]
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
            return PMoDCache.take_over(cache, self.config.text_config, self._cache_layers())
        if cache is not None:
            raise ValueError("a cache was passed with use_cache=False; pass use_cache=True or no cache.")
        return None

    def _pmod_forward(self, parent_forward, args: tuple, kwargs: dict):
        """Build the routing plan and the p-MoD cache, then run HF's own forward with both.

        The cache goes on under the parent's argument name; the output carries it back to generate().
        """
        if args:  # positional arguments in the parent's order
            names = [n for n in inspect.signature(parent_forward).parameters if n != "self"]
            kwargs.update(zip(names, args))
        method = self.applied_method
        if method is not None:  # a vision-stage method shortens the prompt first
            kwargs = method.prefill(self, kwargs)
        vision_token_mask = kwargs.pop("vision_token_mask", None)
        cache = self._take_cache(kwargs)
        input_ids, inputs_embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        ref = input_ids if input_ids is not None else inputs_embeds
        decoding = cache is not None and cache.get_seq_length() > 0 and not any(
            kwargs.get(name) is not None for name in VISION_INPUTS)
        target = None if decoding and vision_token_mask is None else self._vision_mask(input_ids, inputs_embeds,
                                                                                        vision_token_mask)
        plan = RoutingPlan.build(target, kwargs.get("attention_mask"),
                                 seq_len=ref.shape[1], batch=ref.shape[0], device=ref.device, cache=cache,
                                 guard=self._pmod_guard, record=self._pmod_record)
        in_llm = method is not None and method.first_layer() is not None
        if in_llm and plan.target is not None:  # the method's token policy of this forward
            plan.method = method.start(self, plan, kwargs)
        kwargs[self._pmod_cache_arg] = cache
        kwargs["pmod_plan"] = plan
        positions = self.host.positions(self, plan) if in_llm else contextlib.nullcontext()
        with positions, plan.guarding(self._guarded_layers()):
            out = parent_forward(**kwargs)
        plan.check_overflow()  # one host check for the whole forward (overflow guard on only)
        missing = sorted(set(self.routed_layer_indices()) - plan.visited)
        if missing:
            raise contract_error(f"routed layers {missing} did not receive the routing plan")
        return out


#: the name the routed forward had before the host adapters
RoutedForwardMixin = SparseModelMixin


class PMoDModelMixin(SparseModelMixin):
    """p-MoD on a host's model: routers in the layers the schedule routes, ratios, introspection."""

    def _install_pmod_layers(self) -> None:
        layers = self.host.decoder_layers(self)
        ratios = self.config.layer_ratios()
        pmod = self.config.pmod_config
        hidden = self.config.text_config.hidden_size
        for i in self.config.pmod_router_layers:
            layers[i] = wrap_decoder_layer(layers[i], i, ratios[i], pmod, hidden)
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
        return {i: l for i, l in enumerate(self.host.decoder_layers(self))
                if isinstance(l, SparseLayerMixin) and l.router is not None}

    def _cache_layers(self) -> set[int]:
        return set(self.config.pmod_router_layers) | set(super()._cache_layers())

    def layer_ratios(self) -> list[float]:
        """Retention ratio of every decoder layer as the model runs now (1.0 = every token processed)."""
        return [l.ratio if isinstance(l, SparseLayerMixin) else 1.0 for l in self.host.decoder_layers(self)]

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
    def set_pmod_ratios(self, pmod: Union[PMoDConfig, dict, None] = None, allow_untrained_routers: bool = False,
                        **changes: Any) -> list[float]:
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
        layers = self.host.decoder_layers(self)
        ratios = new.layer_ratios(len(layers))
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
                layers[i] = wrap_decoder_layer(layers[i], i, r, new, hidden)
                routers.add(i)
        self.config.pmod = new.to_dict()
        self.config.pmod_router_layers = sorted(routers)  # router layers at ratio 1.0 stay routed on reload
        return ratios

    # --------------------------------------------------------------------------- accounting
    def kv_cache_entries(self, cache) -> list[int]:
        """Stored KV entries per layer (see :func:`pmod_bench.model.cache.kv_cache_entries`)."""
        return kv_cache_entries(cache)


def routed_forward(base: type):
    """The forward of a class ``(SparseModelMixin or PMoDModelMixin, base)``: ``base.forward`` run by
    :meth:`SparseModelMixin._pmod_forward`, with ``base.forward``'s signature plus ``vision_token_mask`` (generate()
    inspects it) and its docstring."""
    parent = base.forward
    sig = inspect.signature(parent)
    params = list(sig.parameters.values())
    extra = inspect.Parameter("vision_token_mask", inspect.Parameter.KEYWORD_ONLY, default=None)
    var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    params = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD] + [extra] + var_kw

    def forward(self, *args, **kwargs):
        return self._pmod_forward(functools.partial(parent, self), args, kwargs)

    forward.__signature__ = sig.replace(parameters=params)
    forward.__doc__ = ("HF forward, plus ``vision_token_mask`` (B, N) bool marking the vision tokens for callers that pass "
                       "``inputs_embeds`` instead of ``input_ids``.\n\n" + (parent.__doc__ or ""))
    return forward


__all__ = ["SparseModelMixin", "RoutedForwardMixin", "PMoDModelMixin", "routed_forward"]
