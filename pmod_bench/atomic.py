"""Atomic file writes (stdlib only): readers never see a torn or half-written file.

Every run-directory file (docs/RUN_DIRS.md) is written through these: a temporary file in the same
directory, flushed and fsynced, then ``os.replace``; on any error the temporary file is removed.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional


def atomic_write_bytes(path: "str | Path", data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: "str | Path", text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: "str | Path", obj: Any, indent: int = 2, default: Optional[Callable[[Any], Any]] = None) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, default=default) + "\n")
