"""One process at a time per run directory: an OS lock file inside it, and the checks before the first write.

::

    from pmod_bench.runlock import run_lock

    with run_lock(run_dir, command="pmod-bench eval ..."):   # RunDirInUse if another process holds it
        ...                                                  # write run.json, results, ...

The lock is ``fcntl.flock`` on ``RUN_DIR/.pmod-bench.lock`` (stdlib; POSIX), taken without waiting. The
OS releases it when the holding process ends however it ends (exit, exception, ``kill -9``), so a
killed run never leaves a stuck lock: a leftover lock file is simply locked again. While held, the file
holds the owner's pid, host, command and start time (JSON), which a second process reads to refuse in
one line::

    RUN_DIR is in use by pid 4242 on host1 (pmod-bench eval --model ..., started 2026-12-01T10:00:00Z); wait for
    it or choose another --output

Before anything is created, :func:`check_run_dir` refuses, in one line, an output that cannot be a
run directory: an existing file (or a file in its path), a read-only directory (no write permission, a
read-only file system, or a mode without write bits, which is honoured for root as well), a name too
long for the file system. On leaving the block the lock file is removed, and so are the directories
the lock itself created if nothing else was written into them: a refused or failed run leaves no
trace. Locks are per open file description (Linux ``flock``): a second ``run_lock`` on the same
directory in the same process is refused too.

Every error is a :class:`~pmod_bench.errors.UserError` (exit code 2 in the CLI).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

from pmod_bench.errors import UserError

#: the lock file's name inside a run directory (present only while a process owns the directory)
LOCK_NAME = ".pmod-bench.lock"


class RunDirError(UserError):
    """RUN_DIR cannot be used as a run directory (a file, read-only, a name too long); nothing was written."""


class RunDirInUse(RunDirError):
    """Another process owns RUN_DIR; the message names its pid, command and start time."""


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _read_only(path: Path) -> Optional[str]:
    """Why ``path`` (an existing directory) cannot be written into, or None."""
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


def check_run_dir(run_dir: "str | os.PathLike", flag: str = "--output") -> None:
    """Refuse (:class:`RunDirError`, one line) a path that cannot become or be a run directory; writes nothing."""
    path = Path(run_dir).expanduser()
    what = f"{flag} {run_dir}"
    try:
        limit = os.pathconf(_nearest_existing(path.absolute()), "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for part in path.parts:
        if len(os.fsencode(part)) > limit:
            raise RunDirError(f"{what}: the name '{part[:40]}...' is {len(os.fsencode(part))} bytes, longer than this "
                              f"file system allows ({limit}); choose a shorter --output")
    if len(os.fsencode(str(path.absolute()))) >= 4096:
        raise RunDirError(f"{what}: the path is longer than the system allows (4096 bytes); choose a shorter {flag}")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{what} is a file, not a directory; pass a new or existing directory as {flag}")
    base = _nearest_existing(path.absolute())
    if not base.is_dir():
        raise RunDirError(f"{what}: {base} is a file, so no directory can be made under it; choose another {flag}")
    why = _read_only(base)
    if why:
        where = "" if base == path.absolute() else f" (its nearest existing parent {base})"
        raise RunDirError(f"{what}{where} {why}; choose a writable {flag} directory")


def _one_line_os_error(exc: OSError, run_dir: "str | os.PathLike", flag: str) -> RunDirError:
    reasons = {errno.ENAMETOOLONG: "a name in the path is too long for the file system",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted", errno.ENOSPC: "no space left on the device",
               errno.EDQUOT: "the disk quota is exceeded", errno.ENOTDIR: "a part of the path is a file",
               errno.EEXIST: "a file is in the way"}
    why = reasons.get(exc.errno, exc.strerror or type(exc).__name__)
    return RunDirError(f"{flag} {run_dir}: cannot create or lock the run directory ({why}); choose another {flag}")


def _make_dirs(path: Path) -> list[Path]:
    """``mkdir -p``; returns the directories it created, outermost first."""
    missing = []
    p = path.absolute()
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:  # made by another process meanwhile
            if not d.is_dir():
                raise
    return list(reversed(missing))


def _describe_owner(run_dir: Path, fd: int, flag: str) -> str:
    """The one-line refusal, from what the owner wrote into the lock file (read for up to 1 s: it may be writing)."""
    info: dict = {}
    for _ in range(10):
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            info = json.loads(os.read(fd, 65536).decode("utf-8") or "{}")
            break
        except (OSError, ValueError):
            time.sleep(0.1)
    pid = info.get("pid", "?")
    host = info.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    command = " ".join(str(info.get("command") or "another command").split())
    if len(command) > 200:
        command = command[:200] + " ..."
    started = info.get("started", "at an unknown time")
    return (f"{run_dir} is in use by pid {pid}{where} ({command}, started {started}); wait for it or choose "
            f"another {flag}")


def _open_locked(lock_path: Path, run_dir: Path, flag: str) -> int:
    """An fd holding the exclusive lock on ``lock_path`` (the file that is at that path now)."""
    import fcntl

    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            msg = _describe_owner(run_dir, fd, flag)
            os.close(fd)
            raise RunDirInUse(msg) from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the owner before us may have removed the file between our open and our lock: lock the new one
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def run_lock(run_dir: "str | os.PathLike", command: Optional[str] = None, flag: str = "--output") -> Iterator[Path]:
    """Own ``run_dir`` for the block: checked (:func:`check_run_dir`), created if needed, locked (refused with
    :class:`RunDirInUse` if another process owns it). Yields the lock file's path. On exit the lock file goes, and
    so do the directories created here if they are still empty."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir, flag)
    try:
        created = _make_dirs(run_dir)
    except OSError as exc:
        raise _one_line_os_error(exc, run_dir, flag) from None
    lock_path = run_dir / LOCK_NAME
    try:
        fd = _open_locked(lock_path, run_dir, flag)
    except OSError as exc:
        _remove_empty(created)
        raise _one_line_os_error(exc, run_dir, flag) from None
    except BaseException:
        _remove_empty(created)
        raise
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "command": command or " ".join(["pmod-bench", *sys.argv[1:]]),
                "started": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
        yield lock_path
    finally:
        with contextlib.suppress(OSError):
            lock_path.unlink()  # still ours: nobody else can hold it while we do
        os.close(fd)  # releases the lock
        _remove_empty(created)


def _remove_empty(created: list[Path]) -> None:
    """Remove the directories this module created (outermost first in ``created``) that nothing else filled."""
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:  # not empty (the run wrote something), or gone: keep going outwards only while empty
            return


__all__ = ["LOCK_NAME", "RunDirError", "RunDirInUse", "check_run_dir", "run_lock"]
