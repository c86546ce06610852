"""The project's contract with transformers, checked where it is relied on.

p-MoD touches transformers in few places, each listed here and checked at import or load time so
that a new transformers release that changes one of them fails loudly, naming the supported range,
instead of silently computing something else (transformers 5.24 renamed the cache argument of the
decoder layers from ``past_key_values`` to ``cache``; code that read the old name kept running and
cached the wrong tokens):

1. the name of the cache argument of the LLaVA forward and of the attention modules
   (:func:`cache_argument`): ``cache`` (5.24+) or ``past_key_values`` (earlier);
2. extra keyword arguments of the LLaVA forward reach the decoder layers (our routing plan travels
   that way; a routed layer that runs without it raises :class:`HFContractError`);
3. the decoder layers receive RoPE's ``position_embeddings`` (cos, sin) as a keyword argument;
4. the attention module calls ``cache.update(keys, values, layer_idx, cache_kwargs)`` and reads its
   kernel from ``self.config._attn_implementation``;
5. for the in-LLM comparison methods (FastV, PyramidDrop, SparseVLM, iLLaVA), which rank tokens by
   attention rows recomputed from a layer's own ``q_proj`` / ``k_proj`` outputs: those modules,
   ``head_dim`` and ``scaling`` (:func:`check_attention_rows`). RoPE itself is the project's own
   (:func:`pmod_bench.model.rope.apply_rope`, checked against each family's attention output in the tests), so a
   change to transformers' ``apply_rotary_pos_emb`` helper cannot reach it.

Everything else a p-MoD layer does goes through the wrapped layer's own four submodules.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

CACHE_ARGUMENTS = ("cache", "past_key_values")


class HFContractError(RuntimeError):
    """transformers no longer behaves the way the p-MoD layers rely on."""


@functools.lru_cache(maxsize=None)
def supported_range(package: str = "transformers") -> str:
    """The version range of ``package`` that pmod-bench declares (from its installed metadata)."""
    try:
        from importlib.metadata import requires

        for req in requires("pmod-bench") or ():
            name = req.split(";")[0].strip()
            base = name.split("[")[0]
            for i, ch in enumerate(base):
                if ch in "<>=!~ ":
                    if base[:i].strip().lower().replace("_", "-") == package:
                        specs = sorted(base[i:].replace(" ", "").split(","), key=lambda s: not s.startswith(">"))
                        return package + ",".join(specs)  # lower bound first: transformers>=5.17,<5.25
                    break
    except Exception:  # not installed as a distribution (running from a source tree)
        pass
    return f"{package} (see pmod-bench's pyproject.toml)"


def installed_version(package: str = "transformers") -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return "unknown"


def contract_error(detail: str) -> HFContractError:
    spec = supported_range("transformers")
    return HFContractError(
        f"{detail} (transformers {installed_version()} is installed; pmod-bench supports {spec}). "
        f"Install a supported version: pip install '{spec}'."
    )


def cache_argument(fn: Callable, where: str) -> str:
    """Which of ``cache`` / ``past_key_values`` the callable ``fn`` takes (its real signature)."""
    params = inspect.signature(fn).parameters
    for name in CACHE_ARGUMENTS:
        if name in params:
            return name
    raise contract_error(f"{where} takes none of the cache arguments {CACHE_ARGUMENTS}")


def check_attention(attn) -> str:
    """Check the attention module of a decoder layer; returns its cache argument name."""
    name = cache_argument(type(attn).forward, f"{type(attn).__name__}.forward")
    params = inspect.signature(type(attn).forward).parameters
    missing = [p for p in ("hidden_states", "position_embeddings", "attention_mask") if p not in params]
    if missing:
        raise contract_error(f"{type(attn).__name__}.forward no longer takes {missing}")
    if not hasattr(getattr(attn, "config", None), "_attn_implementation"):
        raise contract_error(f"{type(attn).__name__} has no config._attn_implementation")
    return name


def check_attention_rows(attn) -> None:
    """5. What recomputing an attention row from a layer's own projections relies on (the in-LLM
    comparison methods): ``q_proj`` / ``k_proj`` modules whose outputs are the pre-RoPE queries/keys
    (no q/k norms), ``head_dim``, ``scaling``, full (not sliding-window) attention. RoPE is applied by
    :func:`pmod_bench.model.rope.apply_rope`, which checks that ``cos``/``sin`` span the whole head."""
    name = type(attn).__name__
    missing = [a for a in ("q_proj", "k_proj", "head_dim", "scaling") if getattr(attn, a, None) is None]
    if missing:
        raise contract_error(f"{name} has no {missing}; the attention rows of the in-LLM methods are recomputed from them")
    normed = [a for a in ("q_norm", "k_norm") if getattr(attn, a, None) is not None]
    if normed:
        raise contract_error(f"{name} normalises queries/keys ({normed}) between projection and RoPE; the in-LLM methods "
                             "support Llama/Vicuna, Mistral and Qwen2 attention")
    if getattr(attn, "sliding_window", None):
        raise contract_error(f"{name} uses sliding-window attention; the in-LLM methods need full attention")


def cache_kwargs(module, cache) -> dict:
    """``{name: cache}`` under the cache argument name that ``module``'s forward takes."""
    fn = type(module).forward
    return {cache_argument(fn, f"{type(module).__name__}.forward"): cache}
