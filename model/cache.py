"""The p-MoD KV cache: a ``DynamicCache`` whose routed layers keep only the tokens they processed.

Layer ``l`` caches keys and values for its processed set ``P_l`` only (METHOD.md, "KV cache"), so
the cache length differs from layer to layer.  :class:`PMoDCache` is the cache object the project
owns: the model creates it (or takes it over from ``generate()``'s empty default cache) and hands
it to the layers through the routing plan; ordinary layers use its plain ``DynamicLayer`` entries
through HF's own code, p-MoD layers their :class:`PMoDCacheLayer`.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class PMoDCacheLayer(DynamicLayer):
    """KV cache of one p-MoD layer: keys/values of the processed tokens only.

    ``get_seq_length()`` reports how many tokens of the full sequence went through the layer (what
    HF uses for position ids and the model-level mask), while :attr:`stored_tokens` is how many
    key/value slots are held.  Samples of a batch keep different numbers of tokens, so rows are
    left-padded; ``valid`` (B, S) marks the real entries (None: every slot is real).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.valid: Optional[torch.Tensor] = None
        self.seen_tokens = 0
        #: (B,) long: RoPE positions of later tokens = position id - shift (an in-LLM method that
        #: renumbers positions after dropping tokens, as PyramidDrop / SparseVLM); None = original positions
        self.position_shift: Optional[torch.Tensor] = None

    @property
    def stored_tokens(self) -> int:
        keys = getattr(self, "keys", None)
        return 0 if not self.is_initialized or keys is None or keys.numel() == 0 else keys.shape[-2]

    def get_seq_length(self, *args: Any) -> int:
        return self.seen_tokens

    def record_step(self, valid: Optional[torch.Tensor], new_slots: int, new_tokens: int, batch: int, device) -> None:
        """Note ``new_slots`` stored slots (validity ``valid``, None = all real) for ``new_tokens``
        sequence tokens; called just before the attention appends the keys/values."""
        past = self.stored_tokens
        if valid is not None or self.valid is not None:
            old = self.valid if self.valid is not None else torch.ones(batch, past, dtype=torch.bool, device=device)
            new = valid if valid is not None else torch.ones(batch, new_slots, dtype=torch.bool, device=device)
            self.valid = torch.cat([old, new], dim=1)
        self.seen_tokens += new_tokens

    # generate() reorders / expands / crops the batch: keep `valid` aligned with keys and values
    def reset(self) -> None:
        super().reset()
        self.valid = None
        self.seen_tokens = 0
        self.position_shift = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.valid is not None:
            self.valid = self.valid.index_select(0, beam_idx.to(self.valid.device))
        if self.position_shift is not None:
            self.position_shift = self.position_shift.index_select(0, beam_idx.to(self.position_shift.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.valid is not None:
            self.valid = self.valid.repeat_interleave(repeats, dim=0)
        if self.position_shift is not None:
            self.position_shift = self.position_shift.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.valid is not None:
            self.valid = self.valid[indices]
        if self.position_shift is not None:
            self.position_shift = self.position_shift[indices]

    def crop(self, tokens_to_remove: int) -> None:
        # Only decoded (always processed) tokens are ever cropped, so slots == tokens here.
        super().crop(tokens_to_remove)
        n = abs(tokens_to_remove)
        if n and self.valid is not None:
            self.valid = self.valid[:, :-n]
        self.seen_tokens = max(self.seen_tokens - n, 0)


class PMoDCache(DynamicCache):
    """The KV cache of a p-MoD model: ``PMoDCacheLayer`` at the routed layers, HF's own layers elsewhere."""

    def __init__(self, config=None, routed_layers: Iterable[int] = (), **kwargs: Any) -> None:
        super().__init__(config=config, **kwargs)
        self.routed_layers = tuple(sorted(int(i) for i in routed_layers))
        for i in self.routed_layers:
            self.pmod_layer(i)

    def pmod_layer(self, layer_idx: int) -> PMoDCacheLayer:
        """The :class:`PMoDCacheLayer` of ``layer_idx`` (an empty HF layer there is replaced)."""
        layers = self.layers
        while len(layers) <= layer_idx:
            layers.append(DynamicLayer())
        current = layers[layer_idx]
        if isinstance(current, PMoDCacheLayer):
            return current
        if getattr(current, "is_sliding", False):
            raise NotImplementedError(
                f"layer {layer_idx} uses sliding-window attention; p-MoD layers need full attention "
                "(set text_config.sliding_window=None / use_sliding_window=False)."
            )
        if current.get_seq_length() > 0:
            raise ValueError(
                f"the KV cache of layer {layer_idx} was filled while that layer was not a p-MoD layer; "
                "start generation with a fresh cache after changing the p-MoD ratios."
            )
        layers[layer_idx] = fresh = PMoDCacheLayer()
        return fresh

    @classmethod
    def take_over(cls, cache: Optional[Cache], config, routed_layers: Iterable[int]) -> "PMoDCache":
        """The cache a p-MoD forward uses for ``cache`` as the caller passed it.

        ``None`` or an empty ``DynamicCache`` (what ``generate()`` creates) becomes a new
        :class:`PMoDCache` (returned in the model output, where ``generate()`` picks it up); a
        :class:`PMoDCache` is used as it is; anything else is refused with the fix.
        """
        routed = tuple(sorted(routed_layers))
        if isinstance(cache, PMoDCache):
            for i in routed:
                cache.pmod_layer(i)
            return cache
        if cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0 and not any(
            getattr(layer, "is_initialized", False) for layer in cache.layers
        )):
            return cls(config=config, routed_layers=routed)
        if isinstance(cache, DynamicCache):
            raise ValueError(
                "this DynamicCache already holds keys and values written without p-MoD's per-layer bookkeeping; "
                "pass the cache that a p-MoD forward returned (a PMoDCache), or none."
            )
        raise TypeError(
            f"p-MoD layers keep variable-length per-layer KV caches and need a DynamicCache, got {type(cache).__name__}. "
            "Use the default cache (generate(..., cache_implementation=None) or 'dynamic')."
        )


def output_cache(outputs) -> Optional[Cache]:
    """The cache of a model output, whatever transformers calls the field (``cache`` / ``past_key_values``)."""
    for name in ("cache", "past_key_values"):
        value = outputs.get(name) if hasattr(outputs, "get") else getattr(outputs, name, None)
        if value is not None:
            return value
    return None


def kv_cache_entries(cache: Cache) -> list[int]:
    """Stored KV entries per layer of a dynamic cache, summed over the batch. A p-MoD layer's
    batch-alignment slots are excluded; ordinary layers hold every position of the input, left
    padding included, as in HF."""
    out = []
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is None or keys.numel() == 0:
            out.append(0)
            continue
        valid = getattr(layer, "valid", None)
        out.append(int(valid.sum()) if valid is not None else keys.shape[0] * keys.shape[-2])
    return out
