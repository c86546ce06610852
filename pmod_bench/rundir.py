"""Run directories: which run owns a directory, and the lock that makes one process its owner (docs/RUN_DIRS.md).
Stdlib only.

Every command that writes a run directory (``eval``, ``profile --output``, ``train``, ``reproduce --toy``) takes
it with :func:`run_lock` and checks it here *before* it writes anything, so that a refused command leaves the
tree as it was (the path itself: :mod:`pmod_bench.outputs`)::

    with run_lock(run_dir, command="pmod-bench eval ..."):   # RunDirInUse if another process holds it
        check_owner(run_dir, "eval")                         # another kind's run directory: refused
        ...                                                  # write run.json, results, ...

* :func:`run_lock`: one process at a time. ``fcntl.flock`` on ``RUN_DIR/.pmod-bench.lock`` (:data:`LOCK_NAME`),
  taken without waiting. The OS releases it when the holder ends however it ends (exit, exception, ``kill -9``),
  so a killed run never leaves a stuck lock: a leftover lock file is simply locked again. While held, the file
  holds the owner's pid, host, command and start time (JSON), which a second process reads to refuse in one line::

      RUN_DIR is in use by pid 4242 (pmod-bench eval --model ..., started 2026-12-01T10:00:00Z); wait for it or
      choose another --output

  Locks are per open file description (Linux ``flock``): a second ``run_lock`` on the same directory in the same
  process is refused too. Programs the owner starts (subprocesses, spawned workers) do not inherit it (the
  descriptor is not inheritable): the workers of ``reproduce --toy --jobs N`` run under their parent's ownership
  and lock only the run directories they write themselves.
* :func:`check_owner`: a directory whose ``run.json`` names another kind of run belongs to that run. Writing
  there would replace its ``run.json`` (an eval could no longer resume, a report would read a profile where an
  eval was); a non-empty directory without ``run.json`` holds someone else's files (the lock file aside).
  Refused with one line that names the fix.
* :func:`refuse_run_dir`: for what is not a run (a report): any run directory is refused.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional, Union

from pmod_bench.errors import UserError

SCHEMA_VERSION = 1
RUN_FILE = "run.json"
#: every kind of run a ``run.json`` may name (``report`` reads the first three)
KINDS = ("profile", "eval", "train", "reproduce")
#: the lock file's name inside a run directory (held only while a process owns the directory; see run_lock)
LOCK_NAME = ".pmod-bench.lock"

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
    another kind, or, without run.json, its files to someone else (the lock file and the entries named in
    ``ignore`` excepted).

    The message: ``OPTION PATH holds a 'eval' run; pass a new OPTION[HINT] for the KIND run.``
    """
    found = run_kind(path)
    if found == kind:
        return
    if found is None:
        p = Path(path)
        if p.is_dir() and any(e.name not in ignore and e.name != LOCK_NAME for e in p.iterdir()):
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



class RunDirInUse(UserError):
    """Another process owns RUN_DIR; the message names its pid, command and start time."""


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
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(d)) from None
    return list(reversed(missing))


def _remove_empty(created: list[Path]) -> None:
    """Remove the directories :func:`run_lock` created (outermost first in ``created``) that nothing else filled."""
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:  # not empty (the run wrote something), or gone: keep going outwards only while empty
            return


def _describe_owner(run_dir: Path, fd: int, option: str) -> str:
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
            f"another {option}")


def _open_locked(lock_path: Path, run_dir: Path, option: str) -> int:
    """An fd holding the exclusive lock on ``lock_path`` (the file that is at that path now)."""
    import fcntl

    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            msg = _describe_owner(run_dir, fd, option)
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


def _lock(run_dir: Path, option: str, error: type[Exception]) -> tuple[int, list[Path]]:
    """Create ``run_dir`` if needed and lock it: (the lock's fd, the directories created). On failure nothing stays."""
    from pmod_bench.outputs import output_errors

    created: list[Path] = []
    try:
        with output_errors(option, run_dir, error=error):  # read-only, name too long, disk full: one line
            created = _make_dirs(run_dir)
            return _open_locked(run_dir / LOCK_NAME, run_dir, option), created
    except BaseException:
        _remove_empty(created)
        raise


@contextlib.contextmanager
def run_lock(run_dir: PathLike, command: Optional[str] = None, option: str = "--output",
             error: type[Exception] = UserError) -> Iterator[Path]:
    """Own ``run_dir`` for the block: its path checked (:func:`pmod_bench.outputs.check_output_path`, ``error``),
    created if needed, locked (refused with :class:`RunDirInUse` if another process owns it). Yields the lock file's
    path. On exit the lock file goes, and so do the directories created here if they are still empty: a refused or
    failed run leaves no trace. The caller checks the owner's kind inside the block (:func:`check_owner`)."""
    from pmod_bench.outputs import check_output_path

    run_dir = Path(run_dir)
    check_output_path(run_dir, option, error=error)
    fd, created = _lock(run_dir, option, error)
    lock_path = run_dir / LOCK_NAME
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


__all__ = ["KINDS", "LOCK_NAME", "RUN_FILE", "RunDirInUse", "SCHEMA_VERSION", "check_owner", "refuse_run_dir", "run_kind",
           "run_lock"]
