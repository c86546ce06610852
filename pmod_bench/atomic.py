"""Atomic file writes (stdlib only): readers never see a torn or half-written file.

Every run-directory file (docs/RUN_DIRS.md) is written through these: a temporary file in the same
directory, flushed and fsynced, then ``os.replace``; on any error the temporary file is removed.
Written files get the usual mode of a new file (``0o666`` less the process umask, 0644 typically),
not the 0600 of ``tempfile.mkstemp``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional


def umask() -> int:
    """The process umask (read without changing it where /proc allows; else set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: 0o666 less the umask."""
    return 0o666 & ~umask()


def apply_default_modes(root: "str | Path") -> None:
    """Give every file under ``root`` (or ``root`` itself) the usual new-file mode.

    For files other writers create 0600 (``safetensors`` ``save_file``, ``tempfile``), before they
    are published: ``model.safetensors`` of a converted checkpoint must be readable like its
    ``config.json``.
    """
    root = Path(root)
    mode = new_file_mode()
    for p in ([root] if root.is_file() else root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            os.chmod(p, mode)


def atomic_write_bytes(path: "str | Path", data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        os.fchmod(fd, new_file_mode())
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
