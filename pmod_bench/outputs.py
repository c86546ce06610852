"""Output paths: whether one can be written, and one line when writing it fails (stdlib only).

* :func:`check_output_path`: checked before a command writes anything: no component longer than the
  file system allows (ENAMETOOLONG), not an existing file where a directory is wanted (or the reverse), not
  under a file, the directory written into writable (:func:`read_only`: permissions, a read-only file system,
  a mode without write bits).
* :func:`output_errors` / :func:`describe_write_error`: an ``OSError`` of the environment met while writing
  anyway (read-only, disk full, name too long) becomes one line naming the path and the fix, instead of a
  traceback; :func:`disk_full` also recognises a full disk behind libraries that hide the errno (safetensors'
  "os error 28", torch.save's bare RuntimeError).

Which *run* owns a directory, and the lock that makes one process its owner, is :mod:`pmod_bench.rundir`.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Union

from pmod_bench.errors import UserError

#: errors of the environment, not of the program: reported as one line
WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG,
                errno.ENOTDIR}
PATH_MAX = 4096

PathLike = Union[str, "os.PathLike[str]"]


def _name_max(existing: Path) -> int:
    try:
        return os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (a dangling symbolic link counts as existing)."""
    p = path
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def read_only(path: Path) -> str | None:
    """Why ``path`` (an existing directory) cannot be written into, or None: no write permission, a read-only file
    system, or a mode without write bits (honoured for root as well, whom ``os.access`` lets write anywhere)."""
    if not os.access(path, os.W_OK | os.X_OK):
        try:
            ro_fs = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
        except OSError:
            ro_fs = False
        return "is on a read-only file system" if ro_fs else "is not writable by this user"
    mode = path.stat().st_mode
    if not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        return f"is read-only (mode {stat.S_IMODE(mode):o})"
    return None


def check_output_path(path: PathLike, option: str = "--output", want: str = "dir",
                      error: type[Exception] = UserError, sibling: bool = False) -> Path:
    """The absolute ``path`` once it can be written as a directory (``want="dir"``) or a file (``"file"``).

    Checked without writing anything: every name fits the file system (ENAMETOOLONG), the path is not a
    file where a directory is wanted (or a directory where a file is), nor under a file, and the directory
    written into is writable (:func:`read_only`). ``sibling``: the command writes beside ``path`` and renames
    (the parent must be writable too, even when ``path`` exists).
    """
    p = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    shown = os.fspath(path)
    anc = nearest_existing(p)
    limit = _name_max(anc if anc.is_dir() else anc.parent)
    for part in p.parts:
        if len(os.fsencode(part)) > limit:
            raise error(f"{option} {shown}: the name '{part[:32]}...' is {len(os.fsencode(part))} bytes, longer than "
                        f"the file system allows ({limit}); choose a shorter {option}.")
    if len(os.fsencode(str(p))) >= PATH_MAX:
        raise error(f"{option} {shown}: the path is {len(os.fsencode(str(p)))} bytes, longer than the system allows "
                    f"({PATH_MAX - 1}); choose a shorter {option}.")
    if anc == p:
        if want == "dir" and not p.is_dir():
            raise error(f"{option} {shown} is a file, not a directory; pass a new directory or one this command wrote.")
        if want == "file" and p.is_dir():
            raise error(f"{option} {shown} is a directory; pass a file name.")
    elif not anc.is_dir():
        raise error(f"{option} {shown}: {anc} is a file, so no directory can be made under it; choose another {option}.")
    writable = [p if anc == p and want == "dir" else (p.parent if anc == p else anc)]
    if sibling and anc == p:
        writable.append(p.parent)
    for d in writable:
        why = read_only(d)
        if why:
            where = f"{option} {shown}" if d == p else f"{option} {shown}: {d}"
            raise error(f"{where} {why}; choose a writable {option} directory.")
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
    elif exc.errno == errno.ENOTDIR:
        fix = "a part of the path is a file: pass a path in a directory"
    else:
        fix = "pass a writable directory"
    return f"{option} {path}: cannot write {target} ({reason}); {fix}."


#: how libraries that hide the errno say ENOSPC (safetensors: "... (os error 28)")
_NO_SPACE_TEXT = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
#: less room than this left on the output's filesystem after an error: the error was the full disk
LOW_SPACE_BYTES = 2**20


def disk_full(exc: BaseException, path: PathLike) -> str | None:
    """Why ``exc`` is a full disk (None: it is not). An OSError ENOSPC / EDQUOT anywhere in its chain says so, as
    does the text of a library that hides the errno (safetensors' ``SafetensorError ... (os error 28)``); torch.save
    says only ``RuntimeError: basic_ios::clear: iostream error``, so a RuntimeError with less than 1 MiB left on the
    filesystem of ``path`` (or its nearest existing parent) counts too. Interrupts never do."""
    if not isinstance(exc, Exception):
        return None
    seen, e, runtime = set(), exc, False
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e.strerror or os.strerror(e.errno)
        if any(t in str(e).lower() for t in _NO_SPACE_TEXT):
            return os.strerror(errno.ENOSPC)
        runtime = runtime or isinstance(e, RuntimeError)
        e = e.__cause__ or e.__context__
    if not runtime:
        return None
    try:
        free = shutil.disk_usage(nearest_existing(Path(os.path.abspath(os.fspath(path))))).free
    except OSError:
        return None
    return f"{free} bytes left on the device" if free < LOW_SPACE_BYTES else None


@contextmanager
def output_errors(option: str, path: PathLike, disk_full_fix: str = "", error: type[Exception] = UserError,
                  within: PathLike | None = None) -> Iterator[None]:
    """Turn an error of the environment while writing under ``path`` (or ``within``) into ``error`` with one line:
    an OSError (read-only, name too long, disk full), or any error of a full disk (:func:`disk_full`). Others propagate."""
    try:
        yield
    except OSError as exc:
        msg = describe_write_error(exc, option, path, disk_full_fix, within)
        if msg is None:
            raise
        raise error(msg) from None
    except Exception as exc:
        why = disk_full(exc, within if within is not None else path)
        if why is None:
            raise
        fix = disk_full_fix or f"free disk space, or pass another {option} on a disk with room"
        raise error(f"{option} {path}: cannot write (disk full: {why}; {type(exc).__name__}); {fix}.") from None


__all__ = ["LOW_SPACE_BYTES", "PATH_MAX", "WRITE_ERRNOS", "check_output_path", "describe_write_error", "disk_full",
           "nearest_existing", "output_errors", "read_only"]
