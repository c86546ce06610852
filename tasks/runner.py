"""``pmod-bench eval``: run benchmark suites through lmms-eval and write an eval run directory.

Layout of ``RUN_DIR`` (documented in docs/RUN_DIRS.md)::

    run.json                      kind "eval", the command, the evaluation identity, model facts
    summary.json / summary.csv    one row per finished benchmark (paper metric, paper units, n)
    benchmarks/<KEY>.json         per-benchmark completion record (row + lmms-eval results), atomic
    lmms_eval/<task>/results.json lmms-eval's results of that benchmark's call (samples excluded)
    lmms_eval/<task>/samples_<leaf task>.jsonl   lmms-eval's logged samples (no documents / images)
    lmms_eval/submissions/        files some aggregations write (MMBench details)
    responses/responses.rank<R>.jsonl   per-request model responses (resume mid-benchmark)
    errors/<KEY>.txt              traceback of a failed benchmark (removed when it succeeds)

Each benchmark is one ``lmms_eval.evaluator.simple_evaluate`` call with the same model object and
one ``TaskManager`` (lmms-eval is imported and the model loaded once per process). A benchmark is
finished when ``benchmarks/<KEY>.json`` exists; a second invocation on the same directory skips
finished benchmarks and answers already-persisted requests from ``responses/``, so it recomputes
nothing and ends with the results of an uninterrupted run (seeds are reset per call). A run
directory belongs to one evaluation identity (model, p-MoD overrides, dtype, prompt template, limit,
generation overrides); batch size, device and suites may change between invocations.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from pmod_bench.atomic import atomic_write_text

from .benchmarks import SUITES, Benchmark, resolve_suite

SCHEMA_VERSION = 1
CSV_COLUMNS = ("benchmark", "task", "metric", "value", "n", "unit", "n_unparsed", "limit", "components", "title")


class RunDirMismatch(ValueError):
    """RUN_DIR holds another evaluation; the message says what differs."""


@dataclass
class EvalConfig:
    """One ``pmod-bench eval`` invocation."""

    model: str
    """Checkpoint directory, hub id or preset name (``tiny``)."""
    suite: str
    """Suite name(s) or benchmark keys, comma separated (``table1``, ``POPE,MME``)."""
    output: str
    """The run directory."""
    limit: Optional[int] = None
    """Evaluate only the first N samples of each benchmark task (smoke runs; MME rounds up to pairs)."""
    batch_size: int = 1
    pmod: Optional[str] = None
    """Convert a vanilla checkpoint to p-MoD (``default`` or a PMoDConfig JSON; routers untrained)."""
    shift: Optional[float] = None
    schedule: Optional[str] = None
    ratios: Optional[str] = None
    allow_untrained_routers: bool = False
    dtype: str = "auto"
    device: Optional[str] = None
    attn_implementation: str = "sdpa"
    chat_template: str = "vicuna_v1"
    gen_kwargs: Optional[str] = None
    """lmms-eval generation overrides for every task (``max_new_tokens=8``); part of the identity."""
    label: Optional[str] = None
    command: Optional[str] = None
    introspect: Optional[str] = None
    """Also record which vision tokens each p-MoD layer keeps for one image (an image path, or ``demo``):
    ``introspection.json`` for the report's Fig. 5 / 6."""

    def __post_init__(self) -> None:
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"limit must be a positive integer, got {self.limit!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        resolve_suite(self.suite)  # raises with the known names

    #: fields that define what a run directory holds (the rest may change on resume)
    IDENTITY = ("model", "pmod", "shift", "schedule", "ratios", "allow_untrained_routers", "dtype",
                "attn_implementation", "chat_template", "limit", "gen_kwargs")

    def identity(self) -> dict:
        return {k: getattr(self, k) for k in self.IDENTITY}

    def model_args(self) -> dict:
        return dict(pretrained=self.model, pmod=self.pmod, shift=self.shift, schedule=self.schedule, ratios=self.ratios,
                    allow_untrained_routers=self.allow_untrained_routers, dtype=self.dtype, device=self.device,
                    attn_implementation=self.attn_implementation, batch_size=self.batch_size,
                    chat_template=self.chat_template)


@dataclass
class EvalOutcome:
    rows: list[dict]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------- file helpers
def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def _clean(o: Any) -> Any:
    """JSON-safe copy: non-finite floats become null (strict JSON)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_clean(json.loads(json.dumps(obj, default=_json_default))), indent=2) + "\n")


def _slug(key: str) -> str:
    return key.replace("+", "plus").replace("/", "_")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------------------- summary
def summarize(bench: Benchmark, results: dict, limit: Optional[int] = None) -> dict:
    """The summary row of one benchmark from lmms-eval's results dict (raises KeyError if incomplete)."""
    res = results["results"]
    if bench.result not in res:
        raise KeyError(f"lmms-eval returned no results for '{bench.result}' (got: {', '.join(res) or 'none'})")
    entry = res[bench.result]
    if bench.metric not in entry or not isinstance(entry[bench.metric], (int, float)):
        raise KeyError(f"lmms-eval results of '{bench.result}' lack metric '{bench.metric}' (got: {', '.join(entry)})")
    n_samples = results.get("n-samples", {})
    n = sum(int(n_samples.get(t, {}).get("effective", 0)) for t in bench.tasks)
    row: dict[str, Any] = {"benchmark": bench.key, "task": bench.result, "metric": bench.metric,
                           "value": float(entry[bench.metric]) * bench.scale, "n": n, "unit": bench.unit,
                           "n_unparsed": None, "limit": limit, "components": None, "title": bench.title}
    if bench.components:
        row["components"] = {t: float(res[t][bench.metric]) * bench.scale for t in bench.components if t in res}
    if bench.unparsed_metric and isinstance(entry.get(bench.unparsed_metric), (int, float)):
        row["n_unparsed"] = int(round(float(entry[bench.unparsed_metric]) * n))
    return row


def _bench_file(run_dir: Path, key: str) -> Path:
    return run_dir / "benchmarks" / f"{_slug(key)}.json"


def finished_rows(run_dir: Path) -> list[dict]:
    """Rows of every finished benchmark in ``run_dir``, in the paper's order (Table 11's columns, then grounding)."""
    rows = []
    for key in SUITES["all"]:
        f = _bench_file(run_dir, key)
        if f.is_file():
            rows.append(json.loads(f.read_text(encoding="utf-8"))["row"])
    return rows


def write_summary(run_dir: Path, model: str, pmod: Optional[dict], extra: Optional[dict] = None) -> list[dict]:
    rows = finished_rows(run_dir)
    atomic_write_json(run_dir / "summary.json", {"model": model, "pmod": pmod, "rows": rows, **(extra or {})})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (json.dumps(r[k]) if isinstance(r.get(k), (dict, list)) else r.get(k)) for k in CSV_COLUMNS})
    atomic_write_text(run_dir / "summary.csv", buf.getvalue())
    return rows


def format_rows(rows: list[dict]) -> str:
    """A small plain-text table of summary rows."""
    lines = [f"{'benchmark':<10} {'value':>9}  {'n':>7}  metric"]
    for r in rows:
        extra = f"  ({r['n_unparsed']} unparsed)" if r.get("n_unparsed") else ""
        lines.append(f"{r['benchmark']:<10} {r['value']:>9.2f}  {r['n']:>7}  {r['task']}:{r['metric']}{extra}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- lmms-eval
_TASK_MANAGERS: dict[str, Any] = {}


def task_manager():
    """One lmms-eval ``TaskManager`` per process over the adapter tasks only (indexing the ~2,000
    built-in YAMLs is skipped: the adapters reuse the built-ins' functions, not their files)."""
    from . import TASKS_DIR

    key = str(TASKS_DIR)
    if key not in _TASK_MANAGERS:
        from lmms_eval.tasks import TaskManager

        _TASK_MANAGERS[key] = TaskManager(verbosity="WARNING", include_path=key, include_defaults=False,
                                          model_name="pmod_llava")
    return _TASK_MANAGERS[key]


def _write_lmms_outputs(run_dir: Path, bench: Benchmark, results: dict) -> None:
    out = run_dir / "lmms_eval" / bench.result
    samples = results.get("samples") or {}
    body = {k: v for k, v in results.items() if k != "samples"}
    atomic_write_json(out / "results.json", body)
    for task, rows in samples.items():
        text = "".join(json.dumps(_clean(json.loads(json.dumps(s, default=_json_default))), ensure_ascii=False) + "\n"
                       for s in rows)
        atomic_write_text(out / f"samples_{task}.jsonl", text)


def _limit_for(bench: Benchmark, limit: Optional[int]) -> Optional[int]:
    if limit is None:
        return None
    m = bench.limit_multiple
    return int(math.ceil(limit / m) * m)


def _check_run_dir(run_dir: Path, cfg: EvalConfig) -> Optional[dict]:
    meta_path = run_dir / "run.json"
    if not meta_path.exists():
        if run_dir.exists() and any(p.name not in (".", "..") for p in run_dir.iterdir()):
            raise RunDirMismatch(f"{run_dir} is not empty and has no run.json; pass a new or empty --output directory")
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise RunDirMismatch(f"{meta_path} is not valid JSON ({exc}); pass a new --output directory") from None
    if meta.get("kind") != "eval":
        raise RunDirMismatch(f"{run_dir} holds a '{meta.get('kind')}' run, not an eval run; pass a new --output directory")
    old = meta.get("eval", {}).get("identity", {})
    diff = {k: (old.get(k), v) for k, v in cfg.identity().items() if old.get(k) != v}
    if diff:
        what = "; ".join(f"{k}: {a!r} in the run dir vs {b!r} now" for k, (a, b) in diff.items())
        raise RunDirMismatch(f"{run_dir} holds an evaluation with other settings ({what}). Resume with the same "
                             f"settings or pass a new --output directory.")
    return meta


def run_eval(cfg: EvalConfig, lm: Any = None, log: Optional[Callable[[str], None]] = None) -> EvalOutcome:
    """Evaluate ``cfg.suite`` into ``cfg.output`` (resuming what a previous invocation left).

    ``lm``: an already constructed lmms-eval model (tests, benchmarks); default: ``pmod_llava`` built
    from ``cfg``. Failures of single benchmarks are collected in the outcome (and errors/<KEY>.txt);
    the caller decides the exit code.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    run_dir = Path(cfg.output)
    benches = resolve_suite(cfg.suite)
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    meta = _check_run_dir(run_dir, cfg) if rank == 0 else None
    pending = [b for b in benches if not _bench_file(run_dir, b.key).is_file()]
    outcome = EvalOutcome(rows=[], skipped=[b.key for b in benches if b not in pending])

    from pmod_bench import __version__

    requested = list(dict.fromkeys([*(meta or {}).get("eval", {}).get("benchmarks", []), *[b.key for b in benches]]))
    run_meta = {
        "kind": "eval", "schema_version": SCHEMA_VERSION, "created": (meta or {}).get("created", _now()),
        "updated": _now(), "pmod_bench_version": __version__,
        "command": cfg.command or (meta or {}).get("command") or f"pmod_bench.tasks.runner.run_eval({cfg.suite!r})",
        "label": cfg.label if cfg.label is not None else (meta or {}).get("label"),
        "eval": {"identity": cfg.identity(), "benchmarks": requested, "batch_size": cfg.batch_size,
                 "data_root": os.environ.get("PMOD_BENCH_DATA") or None},
        "model_info": (meta or {}).get("model_info"),
    }
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "run.json", run_meta)
    if outcome.skipped:
        log(f"resuming {run_dir}: {', '.join(outcome.skipped)} already finished")

    if pending:
        t_import = time.time()
        from lmms_eval import evaluator

        tm = task_manager()
        if lm is None:
            from .plugin import PMoDLlava

            lm = PMoDLlava(**cfg.model_args(), response_cache=str(run_dir / "responses"))
        elif getattr(lm, "cache", None) is None and hasattr(lm, "cache"):
            from .cache import ResponseCache

            lm.cache = ResponseCache(run_dir / "responses", rank=getattr(lm, "rank", 0))
        log(f"lmms-eval and model ready in {time.time() - t_import:.1f} s")
        if rank == 0 and hasattr(lm, "describe"):
            run_meta["model_info"] = lm.describe()
            atomic_write_json(run_dir / "run.json", run_meta)
        # what lmms-eval's evaluator and tasks read from CLI args (documents reach process_results without media)
        cli_args = argparse.Namespace(output_path=str(run_dir / "lmms_eval"), verbosity="WARNING", process_with_media=False)
        for k, bench in enumerate(pending, 1):
            limit = _limit_for(bench, cfg.limit)
            log(f"[{k}/{len(pending)}] {bench.key}: {bench.title} ({', '.join(bench.run)}"
                + (f", limit {limit}" if limit else "") + ")")
            t0 = time.time()
            err_file = run_dir / "errors" / f"{_slug(bench.key)}.txt"
            try:
                results = evaluator.simple_evaluate(
                    model=lm, tasks=list(bench.run), limit=limit, task_manager=tm, log_samples=True,
                    gen_kwargs=cfg.gen_kwargs, cli_args=cli_args, process_docs_parallel=1, verbosity="WARNING",
                    batch_size=cfg.batch_size, datetime_str=_now(),
                )
                if rank != 0:
                    continue
                if not results:
                    raise RuntimeError("lmms-eval returned no results")
                row = summarize(bench, results, limit)
            except Exception as exc:  # one benchmark failing must not lose the others
                msg = f"{type(exc).__name__}: {exc}"
                outcome.failures[bench.key] = msg.splitlines()[0][:500]
                if rank == 0:
                    atomic_write_text(err_file, traceback.format_exc())
                log(f"[{k}/{len(pending)}] {bench.key} FAILED: {outcome.failures[bench.key]}")
                continue
            _write_lmms_outputs(run_dir, bench, results)
            elapsed = time.time() - t0
            atomic_write_json(_bench_file(run_dir, bench.key), {
                "row": row, "finished": _now(), "elapsed_s": elapsed,
                "results": {t: results["results"].get(t) for t in (*bench.run, *bench.components)},
                "n_samples": {t: results.get("n-samples", {}).get(t) for t in bench.tasks},
            })
            if err_file.exists():
                err_file.unlink()
            outcome.ran.append(bench.key)
            log(f"[{k}/{len(pending)}] {bench.key} = {row['value']:.2f} {row['unit']} (n={row['n']}) in {elapsed:.1f} s")
            _summary(run_dir, cfg, run_meta, benches, outcome)

    if cfg.introspect and rank == 0:
        _introspect(run_dir, cfg, lm, log)
    if lm is not None and getattr(lm, "world_size", 1) > 1 and hasattr(lm, "accelerator"):
        lm.accelerator.wait_for_everyone()  # rank 0 has written every finished benchmark
    outcome.rows = _summary(run_dir, cfg, run_meta, benches, outcome) if rank == 0 else finished_rows(run_dir)
    outcome.pending = [b.key for b in benches if not _bench_file(run_dir, b.key).is_file()]
    return outcome


def _introspect(run_dir: Path, cfg: EvalConfig, lm: Any, log: Callable[[str], None]) -> None:
    from pmod_bench.model.introspect import RECORD_FILE, load_image, write_introspection

    if (run_dir / RECORD_FILE).is_file():
        return
    if lm is None:  # every benchmark finished in an earlier invocation
        from .plugin import PMoDLlava

        lm = PMoDLlava(**cfg.model_args())
    model = getattr(lm, "_model", None)
    if not hasattr(model, "record_routing"):
        log(f"introspection skipped: {cfg.model} is not a p-MoD model")
        return
    path = write_introspection(run_dir, model, lm.processor, load_image(cfg.introspect))
    log(f"token selection of each p-MoD layer: {path}")


def _summary(run_dir: Path, cfg: EvalConfig, run_meta: dict, benches: list, outcome: EvalOutcome) -> list[dict]:
    info = run_meta.get("model_info") or {}
    pmod = info.get("pmod") if isinstance(info.get("pmod"), dict) else None
    done = {b.key for b in benches if _bench_file(run_dir, b.key).is_file()}
    extra = {"suite": cfg.suite, "limit": cfg.limit, "complete": done == {b.key for b in benches},
             "failures": dict(outcome.failures), "model_info": info}
    return write_summary(run_dir, cfg.model, pmod, extra)


__all__ = ["EvalConfig", "EvalOutcome", "RunDirMismatch", "run_eval", "summarize", "finished_rows", "write_summary",
           "format_rows", "task_manager", "atomic_write_json", "atomic_write_text"]
