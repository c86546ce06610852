"""Offline benchmark data: ``PMOD_BENCH_DATA=/root`` reads hub dataset ``ORG/NAME`` from ``/root/ORG/NAME/``.

The local copy is laid out exactly as a snapshot download of the dataset repository
(``hf download ORG/NAME --repo-type dataset --local-dir /root/ORG/NAME``): the README's
``configs:`` section and the parquet files under the same paths. ``datasets`` resolves configs and
splits from it exactly as it does on the hub, so the adapter tasks see the same splits and columns.

Checks are cheap (config/split resolution by ``datasets.load_dataset_builder``, columns from the
parquet schema, row counts from parquet metadata): nothing is decoded or copied, except by
:func:`decode_check` (``pmod-bench data check --decode``), which opens every image. Every problem is a
:class:`DataError` naming the benchmark, the expected path and the missing config, split or column.
Heavy imports (datasets, pyarrow) happen inside the functions.

**Every local snapshot is read from its own files.** ``datasets`` (5.2) caches a local directory's
arrow tables under ``<cache>/<directory name>/<config>/0.0.0/<hash of the README's file patterns>``:
neither the directory's path nor its files' contents enter the key, so two copies of one benchmark
(say ``/a/lmms-lab-encoder/POPE`` and a blanked ``/b/lmms-lab-encoder/POPE``), or a copy edited in
place, would be served the first copy's cached tables. Here a snapshot has an identity
(:func:`snapshot_identity`: its resolved path and every data file's relative path, size and
modification time, hashed), and every load of a local snapshot (the adapter tasks' ``download``,
:func:`load_split`) passes ``datasets`` a ``cache_dir`` of its own derived from that identity
(:func:`snapshot_cache_dir`). The eval runner records each benchmark's data identity in run.json, and
the ``pmod_llava`` response cache keys answers on it (:func:`task_data_key`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pmod_bench.model.sources import DATA_ENV_VAR, data_root  # noqa: F401  (data_root re-exported)

from .snapshots import local_dir, snapshot_cache_dir, snapshot_identity  # noqa: F401  (snapshot_cache_dir re-exported)

from .benchmarks import BENCHMARKS, Benchmark, DataRef, benchmark_for_task

ENV_VAR = DATA_ENV_VAR


class DataError(ValueError):
    """A missing or malformed local benchmark copy; the message names benchmark, path and fix."""


def _download_hint(ref: DataRef, path: Path) -> str:
    return (f"Put a snapshot of the hub dataset there (`hf download {ref.hub_id} --repo-type dataset "
            f"--local-dir {path}`), or unset {ENV_VAR} to read from the hub.")


class HubUnreachable(DataError):
    """No local data root was given and the hub could not be reached for a benchmark's dataset: not the benchmark's
    failure but the environment's; the eval run stops (one line, exit 2) and the same command with ``--data``
    resumes."""


def hub_unreachable(exc: BaseException, hub_id: str) -> Optional[HubUnreachable]:
    """The one-line :class:`HubUnreachable` when ``exc`` (raised loading ``hub_id`` from the hub) is a connection
    failure: ``datasets`` raises ``ConnectionError("Couldn't reach ... on the Hub (OfflineModeIsEnabled)")`` for an
    offline or unreachable hub, which lmms-eval's retries wrap in a ``tenacity.RetryError`` (its cause). None for any
    other error."""
    seen: set = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen and not isinstance(e, ConnectionError):
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    if not isinstance(e, ConnectionError):
        return None
    why = " ".join(str(e).split())[:200] or type(e).__name__
    return HubUnreachable(
        f"{hub_id}: no local data root (--data / {ENV_VAR}) and the Hugging Face Hub is unreachable ({why}); pass "
        f"--data DIR or set {ENV_VAR}=DIR, a root that holds ORG/NAME snapshots (`pmod-bench data fixtures DIR` writes "
        f"tiny test copies; `hf download {hub_id} --repo-type dataset --local-dir DIR/{hub_id}` on a machine online "
        "fetches the real one), then run the same command again: it resumes")


@dataclass
class RefStatus:
    """Result of checking one (dataset, config) of a benchmark."""

    ref: DataRef
    path: Optional[Path]
    ok: bool
    rows: dict[str, int] = field(default_factory=dict)
    error: Optional[str] = None


def readme_configs(path: Path) -> Optional[dict[str, dict[str, list[str]]]]:
    """{config: {split: [path patterns]}} from a snapshot's README.md ``configs:`` section (None if absent)."""
    readme = path / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    import yaml

    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return None
    configs = meta.get("configs") if isinstance(meta, dict) else None
    if not isinstance(configs, list):
        return None
    out: dict[str, dict[str, list[str]]] = {}
    for c in configs:
        if not isinstance(c, dict) or "config_name" not in c:
            continue
        files = c.get("data_files") or []
        splits: dict[str, list[str]] = {}
        if isinstance(files, (str, list)) and not (isinstance(files, list) and files and isinstance(files[0], dict)):
            splits["train"] = [files] if isinstance(files, str) else list(files)
        elif isinstance(files, dict):
            splits = {k: ([v] if isinstance(v, str) else list(v)) for k, v in files.items()}
        else:
            for entry in files:
                pth = entry.get("path")
                splits[str(entry.get("split", "train"))] = [pth] if isinstance(pth, str) else list(pth or [])
        out[str(c["config_name"])] = splits
    return out


def split_files(path: Path, config: Optional[str]) -> dict[str, list[str]]:
    """{split: [data files]} of a local dataset repository copy, resolved as ``datasets`` does.

    A README ``configs:`` section is read directly (so a missing split or file is named); without
    one, ``datasets.load_dataset_builder`` infers the layout.
    """
    configs = readme_configs(path)
    if configs is not None:
        name = config or "default"
        if config is None and name not in configs and len(configs) == 1:  # datasets loads a sole config by default
            name = next(iter(configs))
        if name not in configs:
            raise ValueError(f"config '{name}' is not in README.md's configs (found: {', '.join(configs) or 'none'})")
        return {split: sorted(str(f) for pat in pats for f in path.glob(pat) if f.is_file())
                for split, pats in configs[name].items()}
    import datasets

    builder = datasets.load_dataset_builder(str(path), config)
    files = builder.config.data_files or {}
    return {str(split): [str(f) for f in fs] for split, fs in files.items()}


def check_ref(benchmark: Benchmark, ref: DataRef, root: "str | os.PathLike | None" = None) -> RefStatus:
    """Check one local dataset copy: directory, config, splits, columns. Never raises for bad data."""
    path = local_dir(ref.hub_id, root)
    if path is None:
        return RefStatus(ref, None, False, error=f"{ENV_VAR} is not set (data would come from the hub)")
    config = ref.config or "default"
    where = f"{benchmark.key}: local copy of {ref.hub_id}"
    if not path.is_dir():
        return RefStatus(ref, path, False, error=f"{where} not found: expected directory {path}. {_download_hint(ref, path)}")
    try:
        files = split_files(path, ref.config)
    except Exception as exc:  # datasets raises ValueError / FileNotFoundError / DataFilesNotFoundError
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return RefStatus(ref, path, False, error=(
            f"{where} at {path} has no usable config '{config}' ({msg}). The directory must be a snapshot of the "
            f"dataset repository (README.md with its `configs:` section and the parquet files). {_download_hint(ref, path)}"))
    missing = [s for s in ref.splits if not files.get(s)]
    if missing:
        found = ", ".join(sorted(s for s, fs in files.items() if fs)) or "none"
        return RefStatus(ref, path, False, error=(
            f"{where} at {path}, config '{config}': missing split(s) {', '.join(missing)} (no data files; splits "
            f"with files: {found}). {_download_hint(ref, path)}"))
    rows: dict[str, int] = {}
    for split in ref.splits:
        paths = files[split]
        try:
            names, rows[split] = _table_shape(paths)
        except Exception as exc:
            return RefStatus(ref, path, False, rows, error=(
                f"{where}: {paths[0]} (config '{config}', split '{split}') is not a readable parquet / JSON file ({exc}). "
                f"{_download_hint(ref, path)}"))
        need = [c for c in (*ref.columns, *ref.image_columns) if c not in names]
        if need:
            return RefStatus(ref, path, False, rows, error=(
                f"{where}: config '{config}', split '{split}' lacks column(s) {', '.join(repr(c) for c in need)} "
                f"in {paths[0]} (has: {', '.join(names)}). The adapter task reads them; "
                f"{_download_hint(ref, path)}"))
        if rows[split] == 0:
            return RefStatus(ref, path, False, rows, error=f"{where}: config '{config}', split '{split}' is empty ({paths[0]}).")
    if ref.videos:
        missing = _missing_videos(ref, path, files)
        if missing:
            return RefStatus(ref, path, False, rows, error=(
                f"{where}, config '{config}': {len(missing)} row(s) have no video in the snapshot or its zip archives "
                f"(first: {missing[0]}). {_download_hint(ref, path)}"))
    return RefStatus(ref, path, True, rows)


def _table_shape(paths: list[str]) -> tuple[list[str], int]:
    """(column names, rows) of a split's data files: parquet from its metadata; JSON (an array of objects, as MVBench
    ships) or JSON Lines parsed."""
    if all(str(p).endswith(".parquet") for p in paths):
        import pyarrow.parquet as pq

        return list(pq.read_schema(paths[0]).names), sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
    records = [r for p in paths for r in _json_records(p)]
    names = list(dict.fromkeys(k for r in records[:100] for k in r))
    return names, len(records)


def _json_records(path: "str | os.PathLike") -> list[dict]:
    text = Path(path).read_text(encoding="utf-8")
    if str(path).endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError("expected a JSON array of objects")
    return data


def split_rows(paths: list[str], columns: tuple[str, ...]) -> list[dict]:
    """The rows of a split's data files, only ``columns`` (parquet: read column-wise; JSON: parsed)."""
    if all(str(p).endswith(".parquet") for p in paths):
        import pyarrow.parquet as pq

        out: list[dict] = []
        for p in paths:
            out += pq.read_table(p, columns=list(columns)).to_pylist()
        return out
    return [{c: r.get(c) for c in columns} for p in paths for r in _json_records(p)]


def _missing_videos(ref: DataRef, path: Path, files: dict[str, list[str]]) -> list[str]:
    """Rows of a video benchmark whose video is neither a file of the snapshot nor a member of its zip archives."""
    from .video import LAYOUT_COLUMNS, LAYOUTS, present, zip_members

    members = zip_members(path)
    missing = []
    for split in ref.splits:
        for i, doc in enumerate(split_rows(files[split], LAYOUT_COLUMNS[ref.videos])):
            if not present(path, ref.videos, ref.config, doc, members):
                missing.append(f"split '{split}' row {i}: {LAYOUTS[ref.videos](ref.config, doc)[0]}")
    return missing


def _decode_value(value: Any) -> None:
    """Decode one HF ``Image`` cell as stored in parquet ({"bytes": ..., "path": ...}); raises on damage."""
    import io

    from PIL import Image

    if value is None:
        return
    if isinstance(value, list):
        for v in value:
            _decode_value(v)
        return
    data = value.get("bytes") if isinstance(value, dict) else None
    if data is None:
        path = value.get("path") if isinstance(value, dict) else None
        if not path:
            return
        with Image.open(path) as im:
            im.load()
        return
    with Image.open(io.BytesIO(data)) as im:
        im.load()


def decode_check(benchmark: Benchmark, status: RefStatus, max_report: int = 5, notes: Optional[list[str]] = None) -> list[str]:
    """Open every image of a checked (ok) local copy; one message per row that does not decode.

    Rows are numbered within the split as ``datasets`` loads it (parquet files in order). At most
    ``max_report`` rows are named per split, then a count. A truncated image counts as damaged even
    where lmms-eval would load it partially. A video benchmark: every row's video opened with OpenCV
    (:func:`decode_videos`); ``notes`` (when given) gets what they hold (frames, duration, sizes).
    """
    ref, path = status.ref, status.path
    if status.ok and path is not None and ref.videos:
        return decode_videos(benchmark, status, max_report, notes)
    if not status.ok or path is None or not ref.image_columns:
        return []
    with strict_image_decoding():
        return _decode_check(benchmark, ref, path, max_report)


@contextlib.contextmanager
def strict_image_decoding():
    """Within the block a cut-off image is an error, not a partly grey picture: lmms-eval sets PIL's
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` at import; the documented switch is restored afterwards."""
    from PIL import ImageFile

    lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient


def _decode_check(benchmark: Benchmark, ref: DataRef, path: Path, max_report: int) -> list[str]:
    import pyarrow.parquet as pq

    files = split_files(path, ref.config)
    out: list[str] = []
    for split in ref.splits:
        bad: list[str] = []
        row = 0
        for f in files.get(split, []):
            pf = pq.ParquetFile(f)
            cols = [c for c in ref.image_columns if c in pf.schema_arrow.names]
            for batch in pf.iter_batches(columns=cols, batch_size=64):
                table = batch.to_pydict()
                for i in range(batch.num_rows):
                    for col in cols:
                        try:
                            _decode_value(table[col][i])
                        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ...
                            bad.append(f"row {row + i} (column '{col}', {Path(f).name}): {type(exc).__name__}: {exc}")
                row += batch.num_rows
        if bad:
            shown = "; ".join(bad[:max_report]) + (f"; and {len(bad) - max_report} more" if len(bad) > max_report else "")
            out.append(f"{benchmark.key}: {ref.hub_id} [{ref.config or 'default'}] split '{split}': {len(bad)} image(s) do "
                       f"not decode: {shown}. {_download_hint(ref, path)}")
    return out


def decode_videos(benchmark: Benchmark, status: RefStatus, max_report: int = 5, notes: Optional[list[str]] = None) -> list[str]:
    """Open the video of every row of a checked (ok) video benchmark copy with OpenCV (its zip archives unpacked
    first, once: :func:`pmod_bench.tasks.video.unpack`) and decode its first and last frames; a message per video that
    does not, and in ``notes`` one line of what the videos hold: count, frames, duration and frame sizes."""
    from .video import LAYOUT_COLUMNS, VideoNotFound, locate, probe, unpack

    ref, path = status.ref, status.path
    unpacked = unpack(path)
    files = split_files(path, ref.config)
    seen: dict[str, Any] = {}
    bad: list[str] = []
    for split in ref.splits:
        for i, doc in enumerate(split_rows(files[split], LAYOUT_COLUMNS[ref.videos])):
            try:
                video = str(locate(path, ref.videos, ref.config, doc, unpacked))
                if video not in seen:
                    seen[video] = probe(video)
            except (VideoNotFound, ValueError) as exc:
                bad.append(f"split '{split}' row {i}: {exc}")
    out = []
    if bad:
        shown = "; ".join(bad[:max_report]) + (f"; and {len(bad) - max_report} more" if len(bad) > max_report else "")
        out.append(f"{benchmark.key}: {ref.hub_id} [{ref.config or 'default'}]: {len(bad)} video(s) do not open: {shown}. "
                   f"{_download_hint(ref, path)}")
    if notes is not None and seen:
        infos = list(seen.values())
        frames, secs = [v.frames for v in infos], [v.duration_s for v in infos if v.fps > 0]
        sizes = sorted({f"{v.width}x{v.height}" for v in infos})
        what = "frame folder(s)" if not secs else "video(s)"
        span = f"{min(secs):.1f}-{max(secs):.1f} s, " if secs else ""
        notes.append(f"{ref.config or 'default'}: {len(infos)} {what} open, {min(frames)}-{max(frames)} frames, {span}"
                     f"{', '.join(sizes[:4])}{' ...' if len(sizes) > 4 else ''} (unpacked in {unpacked})")
    return out


def check_benchmark(benchmark: Benchmark, root: "str | os.PathLike | None" = None) -> list[RefStatus]:
    return [check_ref(benchmark, ref, root) for ref in benchmark.data]


def require_local(hub_id: str, config: Optional[str], split: Optional[str], task: Optional[str] = None,
                  root: "str | os.PathLike | None" = None) -> Optional[Path]:
    """The checked local directory for a hub dataset, or None when no local root is configured.

    Raises :class:`DataError` when the copy is missing or malformed. The benchmark (for the message
    and the required columns) is found from the adapter ``task`` name or the hub id / config.
    """
    path = local_dir(hub_id, root)
    if path is None:
        return None
    bench = benchmark_for_task(task) if task else None
    candidates = [bench] if bench else list(BENCHMARKS.values())
    ref = None
    for b in candidates:
        for r in b.data:
            if r.hub_id == hub_id and r.config == config:
                bench, ref = b, r
                break
        if ref is not None:
            break
    if ref is None:  # not one of ours: check presence of the split only
        ref = DataRef(hub_id, config, (split,) if split else (), (), image_columns=())
        bench = bench or Benchmark(key=task or hub_id, title="", run=(), result="", metric="", scale=1.0, data=(ref,), builtin="")
    elif split and split not in ref.splits:
        ref = DataRef(ref.hub_id, ref.config, (split,), ref.columns, ref.image_columns)
    status = check_ref(bench, ref, root)
    if not status.ok:
        raise DataError(status.error)
    return path


def load_split(hub_id: str, config: Optional[str], split: str, task: Optional[str] = None, **kwargs: Any):
    """``datasets.load_dataset(hub_id, config, split=split)``, from the checked local copy if configured (cached
    under the copy's identity: :func:`snapshot_cache_dir`)."""
    import datasets

    path = require_local(hub_id, config, split, task)
    if path is None:
        kwargs.setdefault("token", True)
        return datasets.load_dataset(hub_id, config, split=split, **kwargs)
    kwargs.pop("token", None)
    kwargs.setdefault("cache_dir", snapshot_cache_dir(path))  # this copy's own tables, never another's
    return datasets.load_dataset(str(path), config, split=split, **kwargs)


def snapshot_dir(hub_id: str, root: "str | os.PathLike | None" = None) -> Optional[Path]:
    """Where the tasks read hub dataset ``hub_id`` from: the local copy under the data root, or None (the hub).

    The toy world (``pmod-bench/toy-world``) is never fetched: its copy under the data root when that holds a
    complete one, else the generated copy in the cache (as :func:`pmod_bench.toy.data.ensure_benchmark` picks).
    """
    from .benchmarks import TOY_HUB

    if hub_id == TOY_HUB:
        from pmod_bench.toy.data import benchmark_ok, default_cache_root

        base = data_root(root)
        return (base if base is not None and benchmark_ok(base) else default_cache_root()) / TOY_HUB
    return local_dir(hub_id, root)


def benchmark_data(benchmark: Benchmark, root: "str | os.PathLike | None" = None) -> list[dict[str, Any]]:
    """The data identity of each dataset (config) ``benchmark`` reads: ``{"hub_id", "config", "source"}`` plus,
    for a local copy (``source: "local"``), :func:`snapshot_identity`'s keys; ``"missing": true`` when the copy
    is absent. Hub data (no data root) is ``source: "hub"`` (``datasets`` keys its cache on the hub commit)."""
    out, seen = [], {}
    for ref in benchmark.data:
        entry: dict[str, Any] = {"hub_id": ref.hub_id, "config": ref.config}
        path = snapshot_dir(ref.hub_id, root)
        if path is None:
            entry["source"] = "hub"
        elif not path.is_dir():
            entry.update(source="local", path=str(path), missing=True)
        else:
            if path not in seen:
                seen[path] = snapshot_identity(path)
            entry.update(source="local", **seen[path])
        out.append(entry)
    return out


def data_fingerprint(entries: list[dict[str, Any]]) -> Optional[str]:
    """One hash of :func:`benchmark_data`'s local entries (None when every dataset comes from the hub)."""
    local = [(e["hub_id"], e["config"], e.get("fingerprint")) for e in entries if e.get("source") == "local"]
    if not local:
        return None
    return hashlib.sha256(json.dumps(local).encode("utf-8")).hexdigest()


def task_data_key(task: str, root: "str | os.PathLike | None" = None) -> Optional[str]:
    """The data fingerprint of the benchmark an lmms-eval task belongs to (None: not one of ours, or hub data):
    part of the response cache's key, so an answer is never reused for another copy's (or an edited) document."""
    bench = benchmark_for_task(task)
    return None if bench is None else data_fingerprint(benchmark_data(bench, root))
