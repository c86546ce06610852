"""One entry point that turns any model *source* into ``(model, processor)``: :func:`load_model`.

Sources, tried in this order::

    tiny | tiny-llava | llava-1.5-7b | ...     a preset (random weights, seed 0); "NAME:vanilla" = no p-MoD
    ./dir  (config.json model_type pmod_llava / pmod_llava_next /  a p-MoD checkpoint in HF layout
            pmod_qwen2_5_vl / pmod_llava_onevision)
    ./dir  (model_type llava / llava_next / qwen2_5_vl /           a vanilla HF checkpoint of a supported family
            llava_onevision)
    ./dir  (config.json with mm_vision_tower / mm_projector_type)  the original LLaVA / p-MoD layout:
                                                                  converted once into the cache (below)
    ORG/NAME                                                       a hub id: resolved with
                                                                  huggingface_hub.snapshot_download (any of
                                                                  the layouts above), offline from the cache

The conversion cache is ``$PMOD_BENCH_CACHE/converted/<hash>`` (default ``~/.cache/pmod_bench``), or
``<cache_dir>/converted/<hash>`` when ``cache_dir`` is given; ``cache_dir`` is also the HF hub cache in
which hub ids are looked up (as ``cache_dir`` of ``from_pretrained``; default ``HF_HUB_CACHE``).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Union

from .config import PMoDConfig
from .dtypes import torch_dtype as parse_dtype
from .sources import (  # noqa: F401  (re-exported: part of this module's API)
    ModelSourceError,
    default_cache_root,
    preset_shadowed,
    read_config_json,
    resolve_hub_id,
    resolve_source_dir,
)

VANILLA_SUFFIX = ":vanilla"


# ------------------------------------------------------------------------------------- helpers
def checkpoint_layout(directory: Union[str, os.PathLike]) -> str:
    """``"pmod"`` (HF p-MoD), ``"vanilla"`` (an HF model of a supported family) or ``"original"`` (LLaVA repo layout);
    the families are the host adapters' (:mod:`pmod_bench.model.hosts`)."""
    cfg = read_config_json(directory)
    from .convert import is_original_layout
    from .hosts import HOSTS, is_pmod_model_type, supported_hosts

    if is_original_layout(cfg):
        return "original"
    model_type = cfg.get("model_type")
    if model_type and model_type in HOSTS:
        return "pmod" if is_pmod_model_type(model_type) else "vanilla"
    known = [t for h in supported_hosts() for t in (h.pmod_model_type, h.model_type)]
    raise ModelSourceError(
        f"{Path(directory) / 'config.json'} has model_type '{model_type}', which pmod-bench cannot load. Supported: "
        f"{', '.join(known)} (HF layout), or the original LLaVA / p-MoD layout "
        "(model_type llava_llama / pmod_llava_llama with mm_vision_tower, mm_projector_type)."
    )


def converted_cache_dir(src: Path, cache_dir=None) -> Path:
    """Where the conversion of original-layout ``src`` is cached: keyed by its path, config and weight files."""
    from .convert import CONVERTER_VERSION

    h = hashlib.sha256()
    h.update(f"v{CONVERTER_VERSION}\0{src.resolve()}\0".encode())
    for f in sorted(src.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}\0{st.st_size}\0{int(st.st_mtime)}\0".encode())
    h.update((src / "config.json").read_bytes())
    return default_cache_root(cache_dir) / "converted" / h.hexdigest()[:20]


def ensure_converted(src: Path, cache_dir=None, **convert_kwargs: Any) -> Path:
    """Convert an original-layout checkpoint into the cache once; later calls reuse it."""
    from .convert import CONVERTED_MARKER, convert_checkpoint

    dst = converted_cache_dir(src, cache_dir)
    if (dst / CONVERTED_MARKER).is_file():
        return dst
    convert_checkpoint(src, dst, **convert_kwargs)
    return dst


def _load_processor(directory: Path):
    names = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")
    if not any((directory / n).is_file() for n in names):
        warnings.warn(f"{directory} holds no processor / tokenizer files; returning processor=None.", stacklevel=3)
        return None
    from transformers import AutoProcessor

    from . import modeling  # noqa: F401  (registers the p-MoD processors)

    try:
        return AutoProcessor.from_pretrained(str(directory))
    except Exception as exc:  # a checkpoint saved without a complete processor
        warnings.warn(f"could not load a processor from {directory} ({type(exc).__name__}: {exc}); processor=None.", stacklevel=3)
        return None


def _apply_pmod(model, pmod, layout: str, vanilla: bool):
    """Vanilla model + pmod -> to_pmod; p-MoD model + pmod -> set_pmod_ratios (override)."""
    if pmod is None:
        return model
    if vanilla:
        raise ModelSourceError("vanilla=True (or ':vanilla') and a p-MoD config were both given; pass only one.")
    if layout == "pmod":
        if isinstance(pmod, PMoDConfig):
            model.set_pmod_ratios(pmod)
        else:
            changes = dict(pmod)
            allow = bool(changes.pop("allow_untrained_routers", False))
            model.set_pmod_ratios(allow_untrained_routers=allow, **changes)
        return model
    from .modeling import to_pmod

    return to_pmod(model, PMoDConfig.from_dict(pmod))


# ------------------------------------------------------------------------------------- the API
def load_model(
    source: str,
    pmod: Union[PMoDConfig, dict, None] = None,
    dtype=None,
    device=None,
    attn_implementation: str = "sdpa",
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    vanilla: bool = False,
    revision: Optional[str] = None,
    method: Any = None,
    method_args: Optional[dict] = None,
):
    """Load ``(model, processor)`` from a preset name, a local checkpoint directory or a hub id.

    * ``source``: ``tiny`` / ``tiny-llava`` / another preset (random weights, seed 0; ``"tiny:vanilla"``
      or ``vanilla=True`` gives the model without p-MoD); a directory in HF layout (p-MoD or vanilla
      LLaVA / LLaVA-NeXT); a directory or hub id in the original LLaVA / p-MoD repository layout
      (converted on the fly into the cache, reused afterwards); an HF hub id (``ORG/NAME``). A bare preset
      name that is also a file or directory in the working directory is refused (ModelSourceError naming
      both: ``./NAME`` for the directory); see :func:`.sources.preset_shadowed`.
    * ``pmod``: a :class:`PMoDConfig` or dict. Preset: its p-MoD config (None = the default one).
      p-MoD checkpoint: overrides its schedule (``{"shift": 0.3}``, ``{"ratios": [...]}``;
      ``set_pmod_ratios``). Vanilla checkpoint: turns it into p-MoD with zero-init routers (``to_pmod``);
      None keeps the vanilla baseline.
    * ``dtype``: torch dtype or name (``bfloat16``, ``float16``, ``float32``, ``auto``); default float32.
    * ``device``: where to put the model (``cuda``, ``cpu``, ...); default: where it loads (CPU).
    * ``cache_dir``: cache root for conversions (``<cache_dir>/converted/<hash>``) and the HF hub cache
      for hub ids; default ``$PMOD_BENCH_CACHE`` (``~/.cache/pmod_bench``) and ``HF_HUB_CACHE``.
    * ``method`` / ``method_args``: a comparison method (``pmod_bench.methods``): a spec
      (``"visionzip"``, ``"fastervlm:keep=0.25"``), a dict or a config; ``method_args`` override its
      options (``method="fastervlm", method_args={"tokens": 144}``). Applied with ``apply_method``.
    """
    if method is not None or method_args:
        model, processor = load_model(source, pmod=pmod, dtype=dtype, device=device, attn_implementation=attn_implementation,
                                      cache_dir=cache_dir, vanilla=vanilla, revision=revision)
        from pmod_bench.methods import MethodError, apply_method

        if method is None:
            raise MethodError(f"method_args {sorted(method_args)} given without a method; pass method='NAME'.")
        return apply_method(model, method, **(method_args or {})), processor
    from .presets import PRESETS

    try:
        torch_dtype = parse_dtype(dtype)
    except ValueError as exc:
        raise ModelSourceError(str(exc)) from None
    name = source[: -len(VANILLA_SUFFIX)] if source.endswith(VANILLA_SUFFIX) else source
    shadowed = preset_shadowed(source)
    if shadowed:
        raise ModelSourceError(shadowed)
    if name in PRESETS and not Path(source).expanduser().is_dir():
        model, processor = _load_preset(source, name, pmod, torch_dtype, attn_implementation, vanilla)
        return _finish(model, device), processor
    if source.endswith(VANILLA_SUFFIX):
        raise ModelSourceError(f"the ':vanilla' suffix is for presets ({', '.join(PRESETS)}); for '{name}' use vanilla=True.")

    directory = resolve_source_dir(source, cache_dir=cache_dir, revision=revision, presets_hint=True)
    layout = checkpoint_layout(directory)
    if layout == "original":
        directory = ensure_converted(directory, cache_dir=cache_dir)
        layout = checkpoint_layout(directory)
    if vanilla and layout == "pmod":
        raise ModelSourceError(
            f"{directory} is a p-MoD checkpoint; vanilla=True needs a vanilla LLaVA checkpoint (or use "
            "pmod={'ratios': [1.0] * num_layers} to process every token with the trained weights)."
        )
    model = _from_pretrained(directory, layout, torch_dtype, attn_implementation)
    model.eval()
    model = _apply_pmod(model, None if vanilla else pmod, layout, vanilla)
    processor = _load_processor(directory)
    return _finish(model, device), processor


def _load_preset(source: str, name: str, pmod, torch_dtype, attn_implementation: str, vanilla: bool):
    """(model, processor) of a preset: random weights, seed 0; p-MoD unless ``vanilla`` or ``source`` ends in ':vanilla'."""
    from .presets import build_preset, preset_processor

    vanilla = vanilla or source.endswith(VANILLA_SUFFIX)
    if vanilla and pmod is not None:
        raise ModelSourceError(f"'{source}' asks for the vanilla model but a p-MoD config was given; pass only one.")
    cfg = None if vanilla else PMoDConfig.from_dict(pmod)
    model, processor = build_preset(
        name, pmod=cfg, seed=0, dtype=torch_dtype if torch_dtype != "auto" else None,
        attn_implementation=attn_implementation,
    )
    if processor is None and name.startswith("tiny"):
        processor = preset_processor(name)
    return model, processor


def _from_pretrained(directory: Path, layout: str, torch_dtype, attn_implementation: str):
    """The HF-layout checkpoint in ``directory``, every tensor its config needs present (errors name the fix)."""
    from transformers import AutoModelForImageTextToText

    from . import modeling  # noqa: F401  (registers the p-MoD classes with the Auto classes)

    kwargs: dict[str, Any] = {"attn_implementation": attn_implementation}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    from safetensors import SafetensorError

    try:
        model, info = AutoModelForImageTextToText.from_pretrained(str(directory), output_loading_info=True, **kwargs)
    except SafetensorError as exc:  # truncated / corrupt weight file: not an Exception subclass we list below
        raise ModelSourceError(damaged_weights_message(directory, exc)) from exc
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        has_weights = any(Path(directory).glob("*.safetensors")) or any(Path(directory).glob("*.bin"))
        if has_weights and ("safetensors" in str(exc).lower() or "deserializ" in str(exc).lower()):
            raise ModelSourceError(damaged_weights_message(directory, exc)) from exc
        raise ModelSourceError(
            f"could not load the model in {directory}: {type(exc).__name__}: {' '.join(str(exc).split())}. If it is in "
            "the original LLaVA layout, convert it with `pmod-bench convert SRC DST` (the error then names the missing keys)."
        ) from exc
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # from_pretrained would silently random-initialise them
        raise ModelSourceError(
            f"the weights in {directory} lack {len(missing)} tensor(s) that its config.json ({layout} layout) needs: "
            f"{missing[:8]}{' ...' if len(missing) > 8 else ''}. The checkpoint is incomplete or its config.json "
            "describes another architecture: re-download / re-save it (model.save_pretrained), or fix config.json."
        )
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:  # stacklevel: the caller of load_model
        warnings.warn(f"{directory}: {len(unexpected)} tensor(s) not used by the model, e.g. {unexpected[:5]}", stacklevel=3)
    return model


def damaged_weights_message(directory: Union[str, os.PathLike], exc: BaseException) -> str:
    """One line for a weight file that does not read (a download or copy cut short)."""
    files = sorted(p.name for p in Path(directory).glob("*.safetensors")) or ["the weight files"]
    return (f"the weights in {directory} ({', '.join(files[:4])}{' ...' if len(files) > 4 else ''}) are truncated or "
            f"corrupt ({type(exc).__name__}: {' '.join(str(exc).split())}). Re-download or re-copy the checkpoint "
            "(`hf download ORG/NAME --local-dir DIR`), or re-save it with save_pretrained.")


def _finish(model, device):
    model.eval()
    if device is not None:
        model = model.to(device)
    return model


__all__ = [
    "load_model",
    "ModelSourceError",
    "checkpoint_layout",
    "resolve_hub_id",
    "resolve_source_dir",
    "converted_cache_dir",
    "ensure_converted",
    "default_cache_root",
]
