"""Run directories: which run owns a directory (docs/RUN_DIRS.md). Stdlib only.

Every command that writes a run directory checks it here *before* it writes anything, so that a refused
command leaves the tree as it was (the path itself: :mod:`pmod_bench.outputs`):

* :func:`check_owner`: a directory whose ``run.json`` names another kind of run belongs to that run.
  Writing there would replace its ``run.json`` (an eval could no longer resume, a report would read a
  profile where an eval was); a non-empty directory without ``run.json`` holds someone else's files.
  Refused with one line that names the fix.
* :func:`refuse_run_dir`: for what is not a run (a report): any run directory is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

from pmod_bench.errors import UserError

SCHEMA_VERSION = 1
RUN_FILE = "run.json"
#: every kind of run a ``run.json`` may name (``report`` reads the first three)
KINDS = ("profile", "eval", "train", "reproduce")

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


__all__ = ["KINDS", "RUN_FILE", "SCHEMA_VERSION", "check_owner", "refuse_run_dir", "run_kind"]
