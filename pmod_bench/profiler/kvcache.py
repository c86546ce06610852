"""KV-cache size: analytic (from the per-layer processed token counts) and measured (from the cache object).

Layer l caches keys and values of exactly the tokens it processed: ``T + kept_l`` per sample
(METHOD.md, "KV cache"), so storage = Σ_l 2 · (T + kept_l) · n_kv_heads · head_dim · bytes.

Two ratios to the baseline are reported:

* **vision** (the paper's convention, Tables 1, 5, 7, 11): Σ_l kept_l / (L · V), the mean over
  layers of the fraction of vision tokens a layer keeps; for PRD with δ = 0.5 at L = 32 this is
  0.5375 up to truncation (the paper's 53.7%);
* **all tokens**: Σ_l (T + kept_l) / (L · (T + V)), the ratio of the actual storage.

In a padded batch an ordinary layer stores B × N_max slots (padding included), a p-MoD layer
B × max_b |P_l,b| slots of which the real entries are marked by ``PMoDCacheLayer.valid``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from pmod_bench.model.dtypes import itemsize

from .arch import Arch, TextDims
from .errors import ProfileError
from .variants import Variant

def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of a dtype name ('bfloat16', 'fp16', 'fp8', ...) or torch dtype (:func:`pmod_bench.model.dtypes.itemsize`)."""
    try:
        return itemsize(dtype)
    except ValueError as exc:
        raise ProfileError(f"{exc.args[0].rstrip('.')} (or float8 for KV-cache bytes).") from None


def bytes_per_entry(text: TextDims, dtype: Any = "bfloat16") -> int:
    """Bytes of one token's keys + values in one layer."""
    return 2 * text.kv_heads * text.head_dim * dtype_bytes(dtype)


@dataclass(frozen=True)
class KVCache:
    """Analytic KV cache of one sample after prefill."""

    entries: tuple[int, ...]
    """cached tokens per layer"""
    kept_vision: tuple[int, ...]
    vision_tokens: int
    text_tokens: int
    bytes_per_entry: int

    @property
    def total_entries(self) -> int:
        return sum(self.entries)

    @property
    def bytes(self) -> int:
        return self.total_entries * self.bytes_per_entry

    @property
    def bytes_per_layer(self) -> list[int]:
        return [e * self.bytes_per_entry for e in self.entries]

    @property
    def vision_ratio(self) -> float:
        """Σ_l kept_l / (L·V): the paper's KV-cache percentage (vs the baseline, which keeps all V)."""
        L, V = len(self.entries), self.vision_tokens
        return sum(self.kept_vision) / (L * V) if V else 1.0

    @property
    def all_tokens_ratio(self) -> float:
        L, N = len(self.entries), self.vision_tokens + self.text_tokens
        return self.total_entries / (L * N) if N else 1.0

    def after_decode(self, fed_tokens: int) -> int:
        """Bytes after ``fed_tokens`` more tokens went through every layer."""
        return (self.total_entries + len(self.entries) * fed_tokens) * self.bytes_per_entry


def kv_cache(text: TextDims, variant: Variant, vision_tokens: int, text_tokens: int, dtype: Any = "bfloat16") -> KVCache:
    kept = variant.kept_vision_tokens(text.layers, vision_tokens)
    return KVCache(
        entries=tuple(text_tokens + k for k in kept), kept_vision=tuple(kept), vision_tokens=vision_tokens,
        text_tokens=text_tokens, bytes_per_entry=bytes_per_entry(text, dtype),
    )


@dataclass(frozen=True)
class BatchKV:
    """KV cache of a (possibly padded) batch, per layer: real entries and allocated slots."""

    real: tuple[int, ...]
    """entries of real tokens, summed over the batch"""
    slots: tuple[int, ...]
    """allocated slots (padding included)"""
    model_count: tuple[int, ...] = ()
    """what ``pmod_bench.model.layer.kv_cache_entries(cache)`` reports (ordinary layers: slots; p-MoD layers: real)"""
    bytes_allocated: Optional[int] = None


def kv_cache_batch(arch: Arch, variant: Variant, samples: Sequence[tuple[int, int]]) -> BatchKV:
    """Analytic per-layer KV of a left-padded batch; ``samples`` = [(vision tokens, text tokens), ...]."""
    L = arch.text.layers
    B = len(samples)
    n_max = max(v + t for v, t in samples)
    kept = [variant.kept_vision_tokens(L, v) for v, _ in samples]
    routed = set(variant.router_layers(L))
    real, slots, model_count = [], [], []
    for l in range(L):
        per = [t + kept[b][l] for b, (v, t) in enumerate(samples)]
        real.append(sum(per))
        padded = any(v + t != n_max for v, t in samples)
        if l in routed:
            # gather of the processed set: P = max count; no gather at all when every position is processed
            all_processed = not padded and all(kept[b][l] == v for b, (v, _) in enumerate(samples))
            slots.append(B * n_max if all_processed else B * max(per))
            model_count.append(real[-1])
        else:
            slots.append(B * n_max)
            model_count.append(B * n_max)
    return BatchKV(real=tuple(real), slots=tuple(slots), model_count=tuple(model_count))


def measure_kv(cache, attention_mask=None) -> BatchKV:
    """Per-layer KV entries of a real cache after prefill.

    slots: the K tensor's (batch x length); real: ``PMoDCacheLayer.valid`` where the layer keeps a
    validity mask, else all slots of a p-MoD layer, and for an ordinary layer the slots minus the
    batch's padding (known from ``attention_mask``). bytes: the K and V tensors' actual storage.
    """
    from pmod_bench.model.cache import PMoDCacheLayer, kv_cache_entries

    pad = 0
    if attention_mask is not None:
        pad = int((attention_mask == 0).sum())
    real, slots, nbytes = [], [], 0
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or keys.numel() == 0:
            real.append(0)
            slots.append(0)
            continue
        n = keys.shape[0] * keys.shape[-2]
        slots.append(n)
        nbytes += keys.numel() * keys.element_size() + values.numel() * values.element_size()
        if isinstance(layer, PMoDCacheLayer):
            real.append(int(layer.valid.sum()) if layer.valid is not None else n)
        else:
            real.append(n - pad)
    count = tuple(kv_cache_entries(cache))
    return BatchKV(real=tuple(real), slots=tuple(slots), model_count=count, bytes_allocated=nbytes)


def prefill_cache(model, batch: dict[str, Any]):
    """Run the prefill with a cache and return it (the model's own DynamicCache)."""
    from pmod_bench.model.cache import output_cache

    import torch

    with torch.no_grad():
        out = model(**batch, use_cache=True, logits_to_keep=1)
    return output_cache(out)


__all__ = ["KVCache", "BatchKV", "kv_cache", "kv_cache_batch", "measure_kv", "prefill_cache", "bytes_per_entry", "dtype_bytes"]
