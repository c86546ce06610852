"""Where a model comes from: a local checkpoint directory or a hub id, and its ``config.json``.

Shared by :mod:`.loading` (which turns a source into a model) and :mod:`.convert` (which converts the
original layout), so that neither imports the other's helpers. Light: ``huggingface_hub`` is imported
only to fetch a hub id.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union


class ModelSourceError(ValueError):
    """A model source that cannot be resolved or loaded; the message names the fix."""


def default_cache_root(cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Root of pmod-bench's own cache: ``cache_dir``, else $PMOD_BENCH_CACHE, else ~/.cache/pmod_bench."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("PMOD_BENCH_CACHE", "").strip()  # blank = unset
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pmod_bench"


#: the environment variable naming the local benchmark data root (``--data`` overrides it)
DATA_ENV_VAR = "PMOD_BENCH_DATA"


def data_root(root: "str | os.PathLike | None" = None) -> Optional[Path]:
    """The local benchmark data root: ``root`` if given, else ``$PMOD_BENCH_DATA``, else None (use the hub)."""
    value = root if root is not None else os.environ.get(DATA_ENV_VAR, "").strip()
    return Path(value).expanduser() if value else None


def read_config_json(directory: Union[str, os.PathLike]) -> dict:
    """A checkpoint directory's ``config.json`` as a dict (ModelSourceError naming the fix otherwise)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ModelSourceError(
            f"'{directory}' has no config.json, so it is no model checkpoint. Expected an HF checkpoint "
            "(config.json + *.safetensors) or the original LLaVA layout (config.json with mm_vision_tower + weights)."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelSourceError(f"{path} is not valid JSON ({exc}); re-download or re-save the checkpoint.") from exc


def looks_like_hub_id(source: str) -> bool:
    """``ORG/NAME`` (two non-empty parts, not a relative or absolute path): the one hub-id check."""
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


def resolve_hub_id(repo_id: str, cache_dir=None, revision: Optional[str] = None) -> Path:
    """Local snapshot directory of a hub repo: downloaded, or taken from the HF cache when offline.

    The HF cache layout is ``<cache>/models--ORG--NAME/snapshots/<commit>/...`` with ``refs/<revision>``
    naming the commit; a snapshot laid out that way by hand (or copied from another machine) works.
    """
    from huggingface_hub import snapshot_download

    hub_cache = str(Path(cache_dir).expanduser()) if cache_dir is not None else None
    errors = []
    for local_only in (False, True):
        try:
            return Path(snapshot_download(repo_id, revision=revision, cache_dir=hub_cache, local_files_only=local_only))
        except Exception as exc:  # offline mode, no network, missing repo, gated repo, ...
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    from huggingface_hub import constants

    where = hub_cache or constants.HF_HUB_CACHE
    why = errors[0] if len(errors[0]) <= 240 else errors[0][:240] + "..."
    raise ModelSourceError(
        f"'{repo_id}' is not a local directory and could not be fetched from the Hugging Face Hub "
        f"({why}), nor found in the HF cache '{where}'. The hub may be unreachable from "
        f"this machine: download it elsewhere (`hf download {repo_id} --local-dir DIR`), copy it here "
        f"and pass the local path, or place a hub-layout snapshot under {where}/models--{repo_id.replace('/', '--')}/"
        "snapshots/<rev>/ (with refs/main naming <rev>), or point HF_HUB_CACHE at the cache that holds it."
    )


def preset_shadowed(source: str) -> Optional[str]:
    """The one-line error when a bare preset name (``tiny``, ``llava-next-7b``) is also a directory here, else None.

    Neither reading may win silently: the preset would evaluate random weights where a checkpoint directory
    named like a preset was meant (``./llava-next-7b``), the directory a checkpoint where the preset was meant
    (a run directory ``./tiny``). A path (``./tiny``, ``runs/tiny``) always means the directory; ``NAME:vanilla``
    always the preset.
    """
    from .presets import PRESETS

    path = Path(source).expanduser()
    if source not in PRESETS or not path.exists():
        return None
    kind = "directory" if path.is_dir() else "file"
    return (f"'{source}' names both the preset '{source}' (random weights) and the {kind} {path.resolve()} in the "
            f"working directory; pass ./{source} for the {kind}, or run from a directory without it for the preset")


def resolve_source_dir(source: str, cache_dir=None, revision: Optional[str] = None, presets_hint: bool = False) -> Path:
    """A local directory for ``source`` (a path, or a hub id resolved to its snapshot)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelSourceError(f"'{source}' is a file; pass the checkpoint directory that contains config.json.")
    if not looks_like_hub_id(source):
        from .presets import PRESETS

        preset = f"a preset ({', '.join(PRESETS)}; add ':vanilla' for no p-MoD), " if presets_hint else ""
        raise ModelSourceError(f"'{source}' is neither {preset}an existing directory, nor a hub id ORG/NAME. Check the path.")
    return resolve_hub_id(source, cache_dir=cache_dir, revision=revision)


__all__ = ["ModelSourceError", "default_cache_root", "looks_like_hub_id", "preset_shadowed", "read_config_json", "resolve_hub_id",
           "resolve_source_dir"]
