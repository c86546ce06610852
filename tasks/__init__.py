"""Evaluation: the ``pmod_llava`` lmms-eval model plugin, the adapter tasks of the paper's benchmarks
(``lmms_tasks/*.yaml``), offline data, fixtures and the ``pmod-bench eval`` / ``data`` runner.

Importing this package is light (no lmms-eval, torch or datasets import).
"""

from __future__ import annotations

from pathlib import Path

#: the lmms-eval include path holding the adapter tasks (``--include_path`` / ``TaskManager(include_path=...)``)
TASKS_DIR = Path(__file__).resolve().parent / "lmms_tasks"

__all__ = ["TASKS_DIR"]
