"""Output directories: which run owns one, and whether a path can be written (docs/RUN_DIRS.md).

Stdlib only (``import pmod_bench`` stays light). Every command that writes a directory checks it here
*before* it writes anything, so that a refused command leaves the tree as it was:

* :func:`check_owner`: a directory whose ``run.json`` names another kind of run belongs to that run.
  Writing there would replace its ``run.json`` (an eval could no longer resume, a report would read a
  profile where an eval was); refused with one line that names the fix.
* :func:`check_output_path`: no component longer than the filesystem allows, not an existing file
  where a directory is wanted (or the reverse), the nearest existing directory writable.
* :func:`output_errors`: an ``OSError`` of the environment met while writing (read-only, disk full,
  name too long) becomes the same kind of one line instead of a traceback.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Union

from pmod_bench.errors import UserError

SCHEMA_VERSION = 1
RUN_FILE = "run.json"
#: every kind of run a ``run.json`` may name (``report`` reads the first three)
KINDS = ("profile", "eval", "train", "reproduce")
#: errors of the environment, not of the program: reported as one line
WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG}
PATH_MAX = 4096

PathLike = Union[str, "os.PathLike[str]"]


def run_kind(path: PathLike) -> str | None:
    """The kind ``path/run.json`` names; ``""`` for a run.json without a readable kind; None without one."""
    meta_path = Path(path) / RUN_FILE
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    kind = meta.get("kind") if isinstance(meta, dict) else None
    return kind if isinstance(kind, str) else ""


def check_owner(path: PathLike, kind: str, option: str = "--output", hint: str = "",
                error: type[Exception] = UserError, ignore: tuple = ()) -> None:
    """Refuse ``path`` unless it is new, empty, or a run directory of ``kind``: its run.json belongs to a run of
    another kind, or, without run.json, its files to someone else (entries named in ``ignore`` excepted).

    The message: ``OPTION PATH holds a 'eval' run; pass a new OPTION[HINT] for the KIND run.``
    """
    found = run_kind(path)
    if found == kind:
        return
    if found is None:
        p = Path(path)
        if p.is_dir() and any(e.name not in ignore for e in p.iterdir()):
            raise error(f"{option} {path} is not empty and holds no {RUN_FILE} (it is no {kind} run's); pass a new or "
                        f"empty {option}{hint}.")
        return
    what = f"a '{found}' run" if found else f"a run.json that is not a {kind} run's"
    raise error(f"{option} {path} holds {what}; pass a new {option}{hint} for the {kind} run.")


def refuse_run_dir(path: PathLike, option: str, error: type[Exception] = UserError) -> None:
    """Refuse ``path`` when it is any run directory (a report or a conversion does not go into a run)."""
    found = run_kind(path)
    if found is not None:
        what = f"a '{found}' run directory" if found else "a run directory (it holds run.json)"
        raise error(f"{option} {path} is {what}; writing there would mix files into that run: pass a new {option}.")


def _name_max(existing: Path) -> int:
    try:
        return os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _nearest_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_output_path(path: PathLike, option: str = "--output", want: str = "dir",
                      error: type[Exception] = UserError) -> Path:
    """The absolute ``path`` once it can be written as a directory (``want="dir"``) or a file (``"file"``).

    Checked without writing anything: every name fits the filesystem (ENAMETOOLONG), the path is not a
    file where a directory is wanted (or a directory where a file is), the nearest existing directory is
    a directory and writable.
    """
    p = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    shown = os.fspath(path)
    anc = _nearest_existing(p)
    limit = _name_max(anc if anc.is_dir() else anc.parent)
    for part in p.parts:
        if len(os.fsencode(part)) > limit:
            raise error(f"{option} {shown}: the name '{part[:32]}...' is {len(os.fsencode(part))} bytes, longer than "
                        f"the filesystem allows ({limit}); use a shorter name.")
    if len(os.fsencode(str(p))) >= PATH_MAX:
        raise error(f"{option} {shown}: the path is {len(os.fsencode(str(p)))} bytes, longer than the system allows "
                    f"({PATH_MAX - 1}); use a shorter path.")
    if anc == p:
        if want == "dir" and not p.is_dir():
            raise error(f"{option} {shown} is a file; pass a directory (a new one, or one this command wrote).")
        if want == "file" and p.is_dir():
            raise error(f"{option} {shown} is a directory; pass a file name.")
    elif not anc.is_dir():
        raise error(f"{option} {shown}: {anc} is a file, not a directory; pass a path in a directory.")
    writable = p if anc == p and want == "dir" else (p.parent if anc == p else anc)
    if not os.access(writable, os.W_OK | os.X_OK):
        raise error(f"{option} {shown}: {writable} is not writable (read-only); pass a writable directory.")
    return p


def describe_write_error(exc: OSError, option: str, path: PathLike, disk_full_fix: str = "",
                         within: PathLike | None = None) -> str | None:
    """One line for an OSError of the environment met while writing under ``path`` (None: not such an error).

    An error on a file outside ``within`` (default ``path``; a command that writes a temporary sibling passes the
    parent) is not described, disk full excepted: an unreadable input, say, is not the output's.
    ``disk_full_fix``: what to do when the disk is full (default: free space or pass another ``option``).
    """
    if exc.errno not in WRITE_ERRNOS:
        return None
    where = exc.filename
    root = os.path.abspath(os.fspath(within if within is not None else path))
    if where is not None:
        full = os.path.abspath(os.fspath(where))
        if full != root and not full.startswith(root.rstrip(os.sep) + os.sep) and exc.errno != errno.ENOSPC:
            return None
    target = f"{where}" if where is not None else f"under {path}"
    reason = exc.strerror or os.strerror(exc.errno)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = disk_full_fix or f"free disk space, or pass another {option} on a disk with room"
    elif exc.errno == errno.ENAMETOOLONG:
        fix = "use a shorter path"
    else:
        fix = "pass a writable directory"
    return f"{option} {path}: cannot write {target} ({reason}); {fix}."


@contextmanager
def output_errors(option: str, path: PathLike, disk_full_fix: str = "", error: type[Exception] = UserError,
                  within: PathLike | None = None) -> Iterator[None]:
    """Turn an OSError of the environment under ``path`` (or ``within``) into ``error`` with one line (others propagate)."""
    try:
        yield
    except OSError as exc:
        msg = describe_write_error(exc, option, path, disk_full_fix, within)
        if msg is None:
            raise
        raise error(msg) from None


__all__ = ["KINDS", "RUN_FILE", "SCHEMA_VERSION", "check_output_path", "check_owner", "describe_write_error",
           "output_errors", "refuse_run_dir", "run_kind"]
