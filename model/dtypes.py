"""Dtype names as command lines, ``--model_args`` and configs spell them: the one parser.

Pure Python (torch is imported only by :func:`torch_dtype`, to return a ``torch.dtype``).
"""

from __future__ import annotations

from typing import Any

#: accepted spelling (lower case, ``torch.`` prefix dropped) -> canonical name, a ``torch`` attribute
DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}
#: bytes per element of each canonical name and of the storage-only ``float8`` (KV-cache estimates)
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float8": 1}
_STORAGE_ONLY = {"float8": "float8", "fp8": "float8"}
CHOICES = "auto, bfloat16, float16 or float32"


def _key(dtype: Any) -> str:
    key = str(dtype).strip().lower()
    return key[len("torch."):] if key.startswith("torch.") else key


def is_dtype_name(dtype: Any, auto: bool = True) -> bool:
    """Whether ``dtype`` parses (a spelling of float32 / float16 / bfloat16, a torch dtype, or ``auto``)."""
    return (auto and dtype in (None, "auto")) or _key(dtype) in DTYPE_ALIASES


def dtype_name(dtype: Any) -> str:
    """Canonical name (``float32`` | ``float16`` | ``bfloat16``) of a spelling (``bf16``, ``half``,
    ``torch.float16``, ...) or a ``torch.dtype``; ValueError naming the choices otherwise."""
    key = _key(dtype)
    if key not in DTYPE_ALIASES:
        raise ValueError(f"unknown dtype '{dtype}'; use {CHOICES}.")
    return DTYPE_ALIASES[key]


def torch_dtype(dtype: Any):
    """The ``torch.dtype`` of a spelling (a ``torch.dtype`` is returned as it is); ``None`` / ``auto`` pass through."""
    if dtype is None or dtype == "auto":
        return dtype
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, dtype_name(dtype))


def itemsize(dtype: Any) -> int:
    """Bytes per element of a spelling, a ``torch.dtype`` (its ``itemsize``) or ``float8`` / ``fp8``."""
    if hasattr(dtype, "itemsize"):
        return int(dtype.itemsize)
    key = _key(dtype)
    return ITEMSIZE[_STORAGE_ONLY[key] if key in _STORAGE_ONLY else dtype_name(dtype)]


__all__ = ["CHOICES", "DTYPE_ALIASES", "ITEMSIZE", "dtype_name", "is_dtype_name", "itemsize", "torch_dtype"]
