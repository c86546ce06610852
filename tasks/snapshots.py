"""Where a local benchmark snapshot lives and what it is: ``<data root>/<ORG>/<NAME>`` for a hub id, its identity
(resolved path + every data file's size and mtime) and the ``datasets`` cache kept for that identity alone.

The lowest layer of the data code: :mod:`.data` (checks, loading) and :mod:`.video` (clips inside snapshots) build on
it; it imports neither.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

from pmod_bench.model.sources import data_root


def local_dir(hub_id: str, root: "str | os.PathLike | None" = None) -> Optional[Path]:
    """``<root>/<ORG>/<NAME>`` for hub id ``ORG/NAME`` (None when no local root is configured)."""
    base = data_root(root)
    return None if base is None else base / hub_id


# ------------------------------------------------------------------------------ snapshot identity
#: sub-directory of the datasets cache that holds one cache per local snapshot identity
SNAPSHOT_CACHE = "pmod_bench_snapshots"


def _data_files(root: Path) -> list[Path]:
    """The files of a snapshot, sorted: everything under ``root`` except hidden entries (``.cache/`` of
    ``hf download --local-dir``, ``.git``, editor litter). Directory symlinks are followed."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    return sorted(out)


def snapshot_identity(path: "str | os.PathLike") -> dict[str, Any]:
    """What a local snapshot's data is: ``{"path", "files", "bytes", "fingerprint"}``.

    ``fingerprint`` is the sha256 of the resolved path and every data file's (relative path, size,
    modification time in ns): two copies under different roots differ, and so does a copy after any
    file in it was rewritten (an edit that restores both size and mtime is not seen). Only ``stat``
    is called: no file is read, so it costs milliseconds even for a large benchmark.
    """
    root = Path(path).expanduser().resolve()
    entries = []
    for f in _data_files(root):
        st = f.stat()
        entries.append((f.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    blob = json.dumps([str(root), entries], separators=(",", ":"))
    return {"path": str(root), "files": len(entries), "bytes": sum(e[1] for e in entries),
            "fingerprint": hashlib.sha256(blob.encode("utf-8")).hexdigest()}


def datasets_cache_root() -> Path:
    """The datasets cache lmms-eval uses: ``$LMMS_EVAL_DATASETS_CACHE``, else ``datasets``' (``HF_DATASETS_CACHE``)."""
    explicit = os.environ.get("LMMS_EVAL_DATASETS_CACHE", "").strip()
    if explicit:
        return Path(explicit).expanduser()
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE)


def snapshot_cache_dir(path: "str | os.PathLike", identity: Optional[dict] = None) -> str:
    """The ``cache_dir`` for ``datasets.load_dataset`` of the local snapshot at ``path``: one per identity
    (``<datasets cache>/pmod_bench_snapshots/<fingerprint[:16]>``), so no other copy's tables are reused."""
    ident = identity or snapshot_identity(path)
    return str(datasets_cache_root() / SNAPSHOT_CACHE / ident["fingerprint"][:16])
