"""p-MoD models on HF transformers: ``to_pmod``, the p-MoD configs, registration with the Auto classes.

The model classes of each family (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL, LLaVA-OneVision) live with the family's host
adapter (:mod:`pmod_bench.model.hosts`) and subclass HF's own, adding only what differs: a ``pmod``
config field, decoder layers wrapped as sparse layers (:mod:`pmod_bench.model.layer`), and a forward
that tells the layers where the vision tokens are (:mod:`pmod_bench.model.routed`). After ``import
pmod_bench`` (and :func:`pmod_bench.register`) every family's p-MoD classes are registered with
``AutoConfig`` / ``AutoModelForImageTextToText`` / ``AutoProcessor``.
"""

from __future__ import annotations

from typing import Any, Union

import torch
from torch import nn

from .config import PMoDConfig
from .hf_config import PMoDLlavaConfig, PMoDLlavaNextConfig  # noqa: F401  (public names)
from .hosts import host_for, supported_hosts
from .hosts.llava import PMoDLlavaForConditionalGeneration  # noqa: F401  (public name)
from .hosts.llava_next import PMoDLlavaNextForConditionalGeneration  # noqa: F401  (public name)
from .hosts.llava_onevision import PMoDLlavaOnevisionConfig, PMoDLlavaOnevisionForConditionalGeneration  # noqa: F401  (public names)
from .hosts.qwen2_5_vl import PMoDQwen2_5_VLConfig, PMoDQwen2_5_VLForConditionalGeneration  # noqa: F401  (public names)
from .routed import PMoDModelMixin, RoutedForwardMixin, SparseModelMixin  # noqa: F401  (public names)


def pmod_config_from(config, pmod: Union[PMoDConfig, dict, None] = None):
    """The p-MoD HF config for a vanilla config of a supported family (same fields plus ``pmod``)."""
    return host_for(config).pmod_config(config, PMoDConfig.from_dict(pmod).to_dict())


def to_pmod(model: nn.Module, pmod: Union[PMoDConfig, dict, None] = None, **changes: Any) -> nn.Module:
    """Turn a vanilla HF model of a supported family (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL, LLaVA-OneVision) into its p-MoD counterpart.

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
    host = host_for(model)  # the model's family; HostError names the supported ones
    if not isinstance(model, host.vanilla_class):
        raise TypeError(f"to_pmod expects an HF {host.vanilla_class.__name__} (the {host.title} model), got "
                        f"{type(model).__name__}")
    host.check(model)
    new_config = pmod_config_from(model.config, cfg)
    with torch.device("meta"):
        new = host.pmod_class(new_config)
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
    """Register every family's p-MoD config, model and processor classes with transformers' Auto classes
    (idempotent). Called when this module is imported (see :func:`pmod_bench.register`); public ``Auto*.register``
    API only."""
    for cls in supported_hosts():
        host_for(cls.model_type).register_auto()


register_auto_classes()
