"""Evaluation: the ``pmod_llava`` lmms-eval model plugin, the adapter tasks of the paper's benchmarks
(``lmms_tasks/*.yaml``), offline data, fixtures and the ``pmod-bench eval`` / ``data`` runner.

Importing this package is light (no lmms-eval, torch or datasets import).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

#: the adapter tasks' sources. An adapter is ``include: ${LMMS_EVAL_TASKS}/<task dir>/<file>.yaml`` (the
#: installed built-in it reuses) plus the keys it pins; hand lmms-eval :func:`tasks_dir`, not this directory
TASKS_DIR = Path(__file__).resolve().parent / "lmms_tasks"

#: stands for the installed ``lmms_eval/tasks`` directory in the adapters' ``include:`` lines
LMMS_EVAL_TASKS = "${LMMS_EVAL_TASKS}"


def lmms_eval_tasks_root() -> Path:
    """The installed ``lmms_eval/tasks`` directory (found without importing lmms-eval)."""
    import importlib.util

    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("lmms-eval is not installed; `pip install -e .` installs the supported version (see pyproject.toml).")
    return Path(list(spec.submodule_search_locations)[0]).resolve() / "tasks"


def tasks_dir() -> Path:
    """The lmms-eval include path of the adapter tasks (``--include_path`` / ``TaskManager(include_path=...)``).

    lmms-eval reads ``include:`` as a file path, absolute or relative to the including YAML
    (``lmms_eval.utils.load_yaml_config``), never relative to its package, so the sources cannot name
    the installed built-ins portably. This is a copy of every YAML under :data:`TASKS_DIR` with
    :data:`LMMS_EVAL_TASKS` replaced by :func:`lmms_eval_tasks_root`, made once per (lmms-eval location,
    sources) under ``$PMOD_BENCH_CACHE/lmms_tasks/<hash>`` and reused. Only ``*.yaml`` files are copied:
    adapters name their functions by absolute import (``!function pmod_bench.tasks...`` /
    ``lmms_eval.tasks...``).
    """
    from pmod_bench.model.sources import default_cache_root

    root = str(lmms_eval_tasks_root())
    sources = sorted(p for p in TASKS_DIR.rglob("*.yaml") if "__pycache__" not in p.parts)
    texts = {p.relative_to(TASKS_DIR).as_posix(): p.read_text(encoding="utf-8") for p in sources}
    digest = hashlib.sha256(root.encode())
    for rel, text in texts.items():
        digest.update(f"\0{rel}\0{text}".encode())
    out = default_cache_root() / "lmms_tasks" / digest.hexdigest()[:16]
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    from pmod_bench.atomic import umask

    os.chmod(tmp, 0o777 & ~umask())  # the usual mode of a new directory, not mkdtemp's 0700
    for rel, text in texts.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(text.replace(LMMS_EVAL_TASKS, root), encoding="utf-8")
    try:
        os.rename(tmp, out)  # atomic: a reader sees no directory or a complete one
    except OSError:  # another process made it first (same content)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


__all__ = ["LMMS_EVAL_TASKS", "TASKS_DIR", "lmms_eval_tasks_root", "tasks_dir"]
