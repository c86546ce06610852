"""FLOPs measured by counting tools, to check the analytic model (:mod:`.flops`).

* :func:`count_flops_meta` -- torch's ``FlopCounterMode`` on the **meta device**: no weights, no
  memory, so a 7B/13B architecture is counted on a laptop CPU in about a second. The p-MoD layer
  itself cannot run on meta tensors (its top-k count ``int(k.max())`` and ``.all()`` need data), so
  each decoder layer's own HF modules (``input_layernorm``, ``self_attn``,
  ``post_attention_layernorm``, ``mlp``: exactly what the p-MoD layer calls on its processed set)
  run on a meta input of the processed length ``|P_l|`` that routing yields, plus a router
  Linear(d, 1) over all N tokens on routed layers, the vision tower and projector on the image's
  tiles (another host's own tower: :meth:`.geometry.HostGeometry.vision_meta`, e.g. Qwen2.5-VL's blocks on HF's own full /
  window attention segments and its patch merger, :func:`.qwen.vision_tower_meta`), and the lm_head on the positions
  whose logits are computed.
* :func:`count_flops_model` -- ``FlopCounterMode`` over a **real forward** of a (small) model with
  real tensors and real routing: the p-MoD model's own forward, gathers and all.
* :func:`count_flops_fvcore` -- fvcore's ``FlopCountAnalysis`` (JIT trace). fvcore counts a
  multiply-add as **1** FLOP and has no handle for ``aten::scaled_dot_product_attention`` (it skips
  it with a warning); here its total is **doubled**, SDPA gets a handle (Q·Kᵀ + P·V multiply-adds)
  and its normalisation handles are switched off, so the three counts share one convention.
  fvcore's JIT trace also drops work whose result is unused (CLIP's last layer, which LLaVA
  computes but never reads): the traced vision wrapper returns that layer's output too.

On CPU, PyTorch runs SDPA as ``aten._scaled_dot_product_flash_attention_for_cpu``, which
``FlopCounterMode`` does not know (it would count 0 attention FLOPs); :func:`flop_counter`
registers torch's own SDPA formula for it. All counts use full (not causal-halved) attention,
as both tools do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from .arch import Arch, vision_layout
from .geometry import geometry_of
from .variants import Variant


@dataclass(frozen=True)
class MeasuredFlops:
    """Counted FLOPs of one sample (2 FLOPs per multiply-add, full attention)."""

    vision_encoder: int
    projector: int
    llm: int
    """decoder layers of the prefill, routers included, lm_head excluded"""
    lm_head: int
    decode_step: Optional[int] = None
    """first decode step: decoder layers + lm_head"""
    tool: str = ""

    @property
    def prefill_llm(self) -> int:
        return self.llm + self.lm_head

    @property
    def vision(self) -> int:
        return self.vision_encoder + self.projector


def _sdpa_formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter():
    """``FlopCounterMode(display=False)`` that also counts the CPU SDPA kernel."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable"):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            mapping[op] = _sdpa_formula
    return FlopCounterMode(display=False, custom_mapping=mapping)


def _module_total(counter, suffix: str) -> int:
    total = 0
    for name, ops in counter.get_flop_counts().items():
        if name.endswith(suffix) and name.count(".") == suffix.count("."):
            total += sum(ops.values())
    return total


# ------------------------------------------------------------------------------------------- meta
# Counts of identical work are reused: every decoder layer of an LLM has the same module shapes,
# so layer l at length P counts what layer 0 at length P counts (meta ops run in Python and cost
# about a millisecond each; the cache keeps a 7B profile within seconds). Entries hold a reference
# to their (meta) module, so the id() in the key cannot be reused by another model.
_VISION_CACHE: dict = {}
_LAYER_CACHE: dict = {}


def _layer_prefill_meta(lm, l: int, P: int, B: int) -> int:
    """FLOPs of decoder layer ``l``'s own modules on a meta input of P tokens (causal, no cache)."""
    import torch

    key = (id(lm), "prefill", P, B)
    if key not in _LAYER_CACHE:
        layer = lm.layers[l]
        x = torch.empty(B, P, lm.config.hidden_size, device="meta")
        cos_sin = lm.rotary_emb(x, torch.arange(P, device="meta")[None].expand(B, P))
        with flop_counter() as fc:
            h = x + layer.self_attn(hidden_states=layer.input_layernorm(x), attention_mask=None, position_embeddings=cos_sin)[0]
            layer.mlp(layer.post_attention_layernorm(h))
        _LAYER_CACHE[key] = (fc.get_total_flops(), lm)
    return _LAYER_CACHE[key][0]


def _vision_tower_meta(tower, images: int) -> int:
    """FLOPs of the HF vision tower on ``images`` tiles: embeddings, then every encoder layer's own
    module (identical shapes: counted once and reused), as ``CLIPVisionTransformer.forward`` runs them."""
    import torch

    cfg = tower.config
    vm = getattr(tower, "vision_model", tower)
    pixels = torch.empty(images, cfg.num_channels, cfg.image_size, cfg.image_size, device="meta")
    if not all(hasattr(vm, name) for name in ("embeddings", "pre_layrnorm", "encoder", "post_layernorm")):
        with flop_counter() as fc:  # another tower layout: run it whole
            tower(pixels, output_hidden_states=True)
        return fc.get_total_flops()
    with flop_counter() as fc:
        h = vm.pre_layrnorm(vm.embeddings(pixels))
    total = fc.get_total_flops()
    for layer in vm.encoder.layers:
        key = (id(tower), "vision", images, tuple(h.shape))
        if key not in _LAYER_CACHE:
            with flop_counter() as fc:
                out = layer(h, attention_mask=None)
            out = out[0] if isinstance(out, tuple) else out
            _LAYER_CACHE[key] = (fc.get_total_flops(), tower)
        total += _LAYER_CACHE[key][0]
    with flop_counter() as fc:
        vm.post_layernorm(h[:, 0, :])
    return total + fc.get_total_flops()


def _layer_decode_meta(lm, l: int, past: int, B: int) -> int:
    """FLOPs of layer ``l`` for one new token attending to ``past`` cached entries + itself."""
    import torch
    from transformers.cache_utils import DynamicCache, DynamicLayer

    from pmod_bench.model.compat import cache_kwargs

    key = (id(lm), "decode", past, B)
    if key not in _LAYER_CACHE:
        layer = lm.layers[l]
        cfg = lm.config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        cache = DynamicCache()
        while len(cache.layers) <= layer.self_attn.layer_idx:
            cache.layers.append(DynamicLayer())
        kv = torch.empty(B, kv_heads, past, head_dim, device="meta")
        cache.update(kv, kv, layer.self_attn.layer_idx)
        x = torch.empty(B, 1, cfg.hidden_size, device="meta")
        cos_sin = lm.rotary_emb(x, torch.full((B, 1), past, device="meta"))
        with flop_counter() as fc:
            h = x + layer.self_attn(hidden_states=layer.input_layernorm(x), attention_mask=None,
                                    position_embeddings=cos_sin, **cache_kwargs(layer.self_attn, cache))[0]
            layer.mlp(layer.post_attention_layernorm(h))
        _LAYER_CACHE[key] = (fc.get_total_flops(), lm)
    return _LAYER_CACHE[key][0]


def count_flops_meta(
    arch: Arch,
    variant: Variant,
    image_size: tuple[int, int],
    text_tokens: int,
    batch_size: int = 1,
    logits_tokens: int = 1,
    decode: bool = True,
    images: int = 1,
    video: Any = None,
) -> MeasuredFlops:
    """FlopCounterMode on the meta device, per layer at the routed lengths (see the module docstring); ``images``
    images of ``image_size`` in each prompt, or one ``video`` (:class:`~.video.Video`) of frames of ``image_size``."""
    import torch

    from pmod_bench.model.layer import PMoDRouter

    from .models import meta_model

    model = meta_model(arch)
    lm = model.model.language_model
    t, v = arch.text, arch.vision
    layout = vision_layout(arch, image_size, images, video)
    V, T, B = layout.vision_tokens, int(text_tokens), int(batch_size)
    N = T + V
    kept = variant.kept_vision_tokens(t.layers, V)
    routed = set(variant.router_layers(t.layers))
    meta = dict(device="meta", dtype=torch.float32)
    with torch.device("meta"):
        router = PMoDRouter(t.hidden)

    with torch.no_grad():
        key = (id(model), layout.tiles, layout.patches, layout.images, layout.temporal, B)
        if key not in _VISION_CACHE:
            host = geometry_of(arch.family)
            own = host.vision_meta(model, arch, layout, B, flop_counter) if host else None
            if own is not None:
                encoder, projector = own
            else:
                encoder = _vision_tower_meta(model.model.vision_tower, B * layout.tiles)
                with flop_counter() as fc:
                    model.model.multi_modal_projector(torch.empty(B * layout.tiles, v.features_per_tile, arch.projector_in, **meta))
                projector = fc.get_total_flops()
            _VISION_CACHE[key] = (encoder, projector, model)
        encoder, projector, _ = _VISION_CACHE[key]

        llm = 0
        decode_flops = 0
        for l in range(len(lm.layers)):
            P = T + kept[l]  # |P_l|: text tokens + the vision tokens this layer keeps
            llm += _layer_prefill_meta(lm, l, P, B)
            if l in routed:
                with flop_counter() as fc:
                    router(torch.empty(B, N, t.hidden, **meta))  # routers score all N tokens
                llm += fc.get_total_flops()
            if decode:  # first decode step: one new token against this layer's P cached entries
                decode_flops += _layer_decode_meta(lm, l, P, B)
        with flop_counter() as fc:
            model.lm_head(torch.empty(B, logits_tokens, t.hidden, **meta))
        lm_head = fc.get_total_flops()
        if decode:
            with flop_counter() as fc:
                model.lm_head(torch.empty(B, 1, t.hidden, **meta))
            decode_flops += fc.get_total_flops()
    per = lambda x: x // B  # noqa: E731
    return MeasuredFlops(per(encoder), per(projector), per(llm), per(lm_head), per(decode_flops) if decode else None, tool="FlopCounterMode(meta)")


# -------------------------------------------------------------------------------------- real model
def count_flops_model(model, batch: dict[str, Any], logits_tokens: Optional[int] = None, decode: bool = True) -> MeasuredFlops:
    """FlopCounterMode over a real forward (and one decode step) of ``model`` on ``batch``; per sample.

    ``logits_tokens``: positions whose logits are computed (``logits_to_keep``); None = all.
    """
    from pmod_bench.model.cache import output_cache
    from pmod_bench.model.compat import cache_kwargs

    import torch

    B = batch["input_ids"].shape[0]
    keep = 0 if logits_tokens is None else int(logits_tokens)
    with torch.no_grad():
        with flop_counter() as fc:
            out = model(**batch, use_cache=True, logits_to_keep=keep)
        enc = _module_total(fc, ".model.vision_tower")
        proj = _module_total(fc, ".model.multi_modal_projector")
        llm = _module_total(fc, ".model.language_model")
        head = _module_total(fc, ".lm_head")
        total = fc.get_total_flops()
        if enc + proj + llm + head != total:
            raise RuntimeError(f"FLOPs outside the known modules: {total - enc - proj - llm - head}")
        step = None
        if decode:
            nxt = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([batch["attention_mask"], torch.ones_like(nxt)], dim=1)
            with flop_counter() as fc:
                model(input_ids=nxt, attention_mask=mask, **cache_kwargs(model, output_cache(out)), use_cache=True, logits_to_keep=1)
            step = fc.get_total_flops() // B
    return MeasuredFlops(enc // B, proj // B, llm // B, head // B, step, tool="FlopCounterMode(model)")


# ------------------------------------------------------------------------------------------ fvcore
def _fvcore_sdpa(inputs, outputs) -> int:
    """fvcore handle for aten::scaled_dot_product_attention: multiply-adds of Q·Kᵀ and P·V."""
    from fvcore.nn.jit_handles import get_shape

    q, k = get_shape(inputs[0]), get_shape(inputs[1])
    return 2 * math.prod(q[:-1]) * k[-2] * q[-1]


def _zero(inputs, outputs) -> int:
    # (fvcore's set_op_handle(op, None) does not drop its default handles: count 0 instead)
    return 0


def count_flops_fvcore(model, arch: Arch, batch: dict[str, Any], logits_tokens: Optional[int] = None) -> MeasuredFlops:
    """fvcore FlopCountAnalysis of the vision side and the LLM prefill; doubled to 2 FLOPs per multiply-add.

    The LLM is traced from ``inputs_embeds`` (+ the p-MoD ``vision_token_mask``): fvcore's JIT trace
    cannot follow LLaVA-NeXT's unpadding (Python arithmetic on image sizes), and the embeddings'
    values do not change the FLOPs. Tracing freezes the routing's data-dependent counts, which is
    what a trace of one input should count.
    """
    import warnings

    import torch
    from fvcore.nn import FlopCountAnalysis

    ids = batch["input_ids"]
    B, N = ids.shape
    keep = 0 if logits_tokens is None else int(logits_tokens)
    from pmod_bench.model.routed import PMoDModelMixin

    is_pmod = isinstance(model, PMoDModelMixin)
    layer = arch.config.vision_feature_layer
    drop_cls = arch.vision.drop_cls

    class Vision(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, pv):
            hs = self.m.model.vision_tower(pv, output_hidden_states=True).hidden_states
            feats = torch.cat([hs[i] for i in layer], -1) if isinstance(layer, (list, tuple)) else hs[layer]
            # return the last layer too: the model computes it, a trace would drop it as dead code
            return self.m.model.multi_modal_projector(feats[:, 1:] if drop_cls else feats), hs[-1]

    class LLM(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, embeds, mask, vmask):
            extra = {"vision_token_mask": vmask} if is_pmod else {}
            return self.m(inputs_embeds=embeds, attention_mask=mask, use_cache=False, logits_to_keep=keep, **extra).logits

    pv = batch["pixel_values"]
    if pv.dim() == 5:  # (B, tiles, C, H, W): the model runs every sample's own tiles
        tiles = [vision_layout(arch, (int(w), int(h))).tiles for h, w in batch["image_sizes"].tolist()]
        pv = torch.cat([pv[i, :n] for i, n in enumerate(tiles)])
    embeds = torch.randn(B, N, arch.text.hidden, dtype=next(model.parameters()).dtype, device=ids.device)
    vmask = ids == arch.image_token_id
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key, mod, inputs in (("vision", Vision(model), (pv,)), ("llm", LLM(model), (embeds, batch["attention_mask"], vmask))):
            fa = FlopCountAnalysis(mod, inputs)
            fa.set_op_handle("aten::scaled_dot_product_attention", _fvcore_sdpa)
            for op in ("aten::layer_norm", "aten::group_norm", "aten::batch_norm", "aten::upsample_nearest2d", "aten::upsample_bilinear2d", "aten::adaptive_avg_pool2d", "aten::grid_sampler"):
                fa.set_op_handle(op, _zero)  # matrix products only, the convention of the other counts
            fa.unsupported_ops_warnings(False)
            fa.uncalled_modules_warnings(False)
            fa.tracer_warnings("none")
            by_module = fa.by_module()
            out[key] = (fa.total(), by_module)
    vis_total, vis_mod = out["vision"]
    llm_total, llm_mod = out["llm"]
    enc = 2 * vis_mod.get("m.model.vision_tower", 0)
    proj = 2 * vis_mod.get("m.model.multi_modal_projector", 0)
    head = 2 * llm_mod.get("m.lm_head", 0)
    llm = 2 * llm_total - head
    return MeasuredFlops(enc // B, proj // B, llm // B, head // B, None, tool="fvcore x2 (+SDPA handle)")


__all__ = ["MeasuredFlops", "flop_counter", "count_flops_meta", "count_flops_model", "count_flops_fvcore"]
