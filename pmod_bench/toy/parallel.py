"""Independent steps of ``reproduce --toy`` run side by side, one CPU thread each.

The toy models' SFT continuations are independent of each other (each starts from the shared SFT), and so are
their evaluations and the vision tower's pretraining (it needs no data but its own crops). Each job runs in a
worker process (spawned, so nothing of the parent's torch state leaks in) with one thread and deterministic
algorithms: exactly the conditions of a one-job run, so the weights come out bit for bit the same whatever
``jobs`` is. A job's own output (the trainer's log lines, lmms-eval's prints) goes to its log file; the
pipeline prints one line when a job starts and one when it ends.

With ``jobs=1`` the jobs run one after another in this process (no workers), through the same functions.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional


def default_jobs() -> int:
    """The CPUs this process may use, at most 4 (each job is single-threaded; more would contend for memory bandwidth)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(4, n))


@contextlib.contextmanager
def _output_to(log_path: Optional[str]):
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C-level and subprocess output too) to
    ``log_path`` (appended) for the duration."""
    if log_path is None:
        yield
        return
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _single_thread() -> None:
    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)


def train_job(args: list, log_path: Optional[str]) -> dict:
    """``pmod-bench train ARGS``; returns {"rc", "wall_s"}."""
    from pmod_bench.cli import main as cli_main

    _single_thread()
    t = time.time()
    with _output_to(log_path):
        rc = cli_main(list(args))
    return {"rc": rc, "wall_s": round(time.time() - t, 2)}


def eval_job(cfg: dict, bench_root: str, log_path: Optional[str]) -> dict:
    """``run_eval(EvalConfig(**cfg))`` on the toy benchmark at ``bench_root``; returns {"rows", "failures", "wall_s"}."""
    from pmod_bench.tasks.runner import EvalConfig, run_eval

    _single_thread()
    os.environ["PMOD_BENCH_DATA"] = bench_root  # the tasks read this run's benchmark copy
    t = time.time()
    with _output_to(log_path):
        outcome = run_eval(EvalConfig(**cfg), log=lambda m: print(m, file=sys.stderr, flush=True))
    return {"rows": outcome.rows, "failures": dict(outcome.failures), "wall_s": round(time.time() - t, 2)}


def log_line(msg: str) -> None:
    """A job's progress line (to its log: stderr is redirected there)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def call_job(fn: Callable[..., Any], kwargs: dict, log_path: Optional[str]) -> Any:
    """``fn(**kwargs)`` with one thread and deterministic algorithms, its output to ``log_path``."""
    _single_thread()
    with _output_to(log_path):
        return fn(**kwargs)


class Jobs:
    """``submit(fn, *args)`` -> Future: a pool of ``n`` spawned worker processes, or inline when ``n == 1``."""

    def __init__(self, n: int) -> None:
        self.n = max(1, int(n))
        self._pool: Optional[ProcessPoolExecutor] = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self.n == 1:
            fut: Future = Future()
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 (handed to the caller through the future, as a pool would)
                if isinstance(exc, KeyboardInterrupt):
                    raise
                fut.set_exception(exc)
            return fut
        if self._pool is None:
            import multiprocessing

            self._pool = ProcessPoolExecutor(max_workers=self.n, mp_context=multiprocessing.get_context("spawn"))
        return self._pool.submit(fn, *args)

    def close(self, cancel: bool = False) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=cancel)
            self._pool = None

    def __enter__(self) -> "Jobs":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(cancel=exc_type is not None)


def tail(path: str | os.PathLike, lines: int = 5) -> str:
    """The last ``lines`` lines of a job's log (for an error message)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace").rstrip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


__all__ = ["Jobs", "call_job", "default_jobs", "eval_job", "log_line", "tail", "train_job"]
