"""Read run directories (docs/RUN_DIRS.md) strictly: only the documented files and keys.

Every problem raises :class:`RunDirError` whose message names the file and the fix; nothing is
guessed. Keys a reader does not use are ignored, so writers may add keys without breaking reports.
A ``pmod`` (the configuration as data: ``PMoDConfig.to_dict()`` or null) must validate as a PMoDConfig.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from pmod_bench.model.config import PMoDConfig

SCHEMA_VERSION = 1
KINDS = ("profile", "eval", "train")
#: the file each kind must hold besides run.json
KIND_FILES = {"profile": "profile.json", "eval": "summary.json", "train": "train_summary.json"}
INTROSPECTION_FILE = "introspection.json"

_DOC = "docs/RUN_DIRS.md"


class RunDirError(ValueError):
    """A run directory that does not follow docs/RUN_DIRS.md; the message says what to fix."""


@dataclass(frozen=True)
class Run:
    """One run directory, validated."""

    path: Path
    kind: str
    meta: Mapping[str, Any]  # run.json
    data: Mapping[str, Any]  # profile.json / summary.json / train_summary.json
    introspection: Optional[Mapping[str, Any]] = None
    warnings: tuple[str, ...] = field(default=())

    @property
    def label(self) -> Optional[str]:
        label = self.meta.get("label")
        return label.strip() if isinstance(label, str) and label.strip() else None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def rows(self) -> list[Mapping[str, Any]]:
        return list(self.data.get("rows", []))


def read_json(path: Path, what: str) -> Any:
    """Parse one JSON file; errors name the file, the position and what writes it."""
    if not path.is_file():
        raise RunDirError(f"{path}: not found. {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RunDirError(
            f"{path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno}). "
            f"Re-create the run (files are written atomically, so a broken file was edited by hand "
            f"or copied while being written) or fix the file per {_DOC}."
        ) from None
    except UnicodeDecodeError as e:
        raise RunDirError(f"{path}: not UTF-8 text ({e}). Re-create the run.") from None


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


_TYPES = {
    "str": (lambda x: isinstance(x, str), "a string"),
    "num": (_is_number, "a finite number"),
    "num?": (lambda x: x is None or _is_number(x), "a number or null"),
    "str?": (lambda x: x is None or isinstance(x, str), "a string or null"),
    "int": (lambda x: isinstance(x, int) and not isinstance(x, bool), "an integer"),
    "int?": (lambda x: x is None or (isinstance(x, int) and not isinstance(x, bool)), "an integer or null"),
    "list": (lambda x: isinstance(x, list), "a list"),
    "dict?": (lambda x: x is None or isinstance(x, dict), "an object or null"),
}

#: the profile-row keys reports read, and their documented types
PROFILE_KEYS = {
    "arch": "str", "variant": "str", "method": "str", "shift": "num?", "schedule": "str?", "ratios": "list",
    "batch_size": "int", "prefill_tflops": "num", "tflops_ratio": "num", "kv_cache_ratio": "num",
    "prefill_latency_ms": "num?", "latency_ratio": "num?", "train_gpu_hours": "num?",
}
EVAL_ROW_KEYS = {"benchmark": "str", "value": "num", "task": "str", "metric": "str", "n": "int?"}
TRAIN_SUMMARY_KEYS = {"gpu_hours": "num", "recipe": "str", "stage": "str"}


def _check(obj: Mapping, keys: Mapping[str, str], where: str, path: Path) -> None:
    for key, typ in keys.items():
        if key not in obj:
            raise RunDirError(
                f"{path}: {where} has no '{key}' key. The writer must follow {_DOC} "
                f"(update pmod-bench and re-create the run)."
            )
        ok, desc = _TYPES[typ]
        if not ok(obj[key]):
            raise RunDirError(f"{path}: {where} '{key}' must be {desc}, got {obj[key]!r} (see {_DOC}).")


def pmod_config(pmod: "Mapping[str, Any] | PMoDConfig") -> PMoDConfig:
    """A run's ``pmod`` (``PMoDConfig.to_dict()``) as a validated PMoDConfig; keys this version does not know are
    ignored (a newer writer's additions). ValueError for values that do not validate."""
    if isinstance(pmod, PMoDConfig):
        return pmod
    known = {f.name for f in dataclasses.fields(PMoDConfig)}
    return PMoDConfig.from_dict({k: v for k, v in pmod.items() if k in known})


def _check_pmod(obj: Mapping, where: str, path: Path, key: str = "pmod") -> None:
    """``pmod`` (or ``key``), where present, is null or a PMoDConfig's fields (keys this version does not know are
    ignored)."""
    if obj.get(key) is None:
        return
    try:
        if not isinstance(obj[key], dict):
            raise ValueError(f"must be an object or null, got {obj[key]!r}")
        pmod_config(obj[key])
    except (TypeError, ValueError) as exc:
        raise RunDirError(f"{path}: {where} '{key}' is not a p-MoD config ({exc}); it must be PMoDConfig.to_dict() "
                          f"or null (see {_DOC}).") from None


def _check_method_match(obj: Mapping, where: str, path: Path) -> None:
    """An eval row's / summary's ``method_match``, where present: its ``target_pmod`` a PMoDConfig's fields or null."""
    mm = obj.get("method_match")
    if isinstance(mm, Mapping):
        _check_pmod(mm, f"{where} method_match", path, key="target_pmod")


def _check_introspection(doc: Any, path: Path, run_dir: Path) -> Mapping[str, Any]:
    if not isinstance(doc, dict):
        raise RunDirError(f"{path}: must be a JSON object (see {_DOC}, 'introspection.json').")
    _check(doc, {"num_layers": "int", "vision_tokens": "int"}, "the object", path)
    layers = doc.get("layers")
    if not isinstance(layers, dict):
        raise RunDirError(f"{path}: 'layers' must be an object {{\"<layer index>\": [token indices]}} (see {_DOC}).")
    L, V = doc["num_layers"], doc["vision_tokens"]
    for k, idx in layers.items():
        if not (isinstance(k, str) and k.isdigit() and int(k) < L):
            raise RunDirError(f"{path}: layer key {k!r} must be a layer index 0..{L - 1} written as a string.")
        if not isinstance(idx, list) or not all(isinstance(i, int) and 0 <= i < V for i in idx):
            raise RunDirError(f"{path}: layers[{k!r}] must be a list of vision-token indices in 0..{V - 1}.")
    grid = doc.get("grid")
    if grid is not None and not (isinstance(grid, list) and len(grid) == 2 and all(isinstance(g, int) and g > 0 for g in grid)):
        raise RunDirError(f"{path}: 'grid' must be [rows, cols] of positive integers or null, got {grid!r}.")
    ratios = doc.get("ratios")
    if ratios is not None and not (isinstance(ratios, list) and len(ratios) == L and all(_is_number(r) for r in ratios)):
        raise RunDirError(f"{path}: 'ratios' must be a list of {L} numbers (one per layer) or null.")
    image = doc.get("image")
    if image is not None:
        if not isinstance(image, str):
            raise RunDirError(f"{path}: 'image' must be a path relative to the run directory, or null.")
        if not (run_dir / image).is_file():
            raise RunDirError(
                f"{path}: image '{image}' not found in {run_dir}; copy the input image there or set 'image' to null."
            )
    return doc


def load_run(run_dir: "str | Path") -> Run:
    """Read and validate one run directory (run.json + the kind's files)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RunDirError(f"{path}: not a directory. Pass run directories written by `pmod-bench profile|eval|train`.")
    meta = read_json(
        path / "run.json",
        f"Not a run directory: point `pmod-bench report` at directories written by `pmod-bench profile`, "
        f"`eval` or `train` (each holds run.json, see {_DOC}).",
    )
    rj = path / "run.json"
    if not isinstance(meta, dict):
        raise RunDirError(f"{rj}: must be a JSON object (see {_DOC}).")
    kind = meta.get("kind")
    if kind not in KINDS:
        raise RunDirError(f"{rj}: unknown kind {kind!r}; expected one of {', '.join(KINDS)} (see {_DOC}).")
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RunDirError(
            f"{rj}: schema_version {version!r} is not supported; this pmod-bench reads schema_version "
            f"{SCHEMA_VERSION}. Re-create the run with this pmod-bench, or upgrade pmod-bench to read it."
        )
    label = meta.get("label")
    if label is not None and not isinstance(label, str):
        raise RunDirError(f"{rj}: 'label' must be a string or absent, got {label!r}.")

    data_path = path / KIND_FILES[kind]
    data = read_json(data_path, f"A {kind} run must hold {KIND_FILES[kind]} (see {_DOC}); re-run `pmod-bench {kind}`.")
    if not isinstance(data, dict):
        raise RunDirError(f"{data_path}: must be a JSON object (see {_DOC}).")
    if kind == "profile":
        rows = data.get("rows")
        if not isinstance(rows, list):
            raise RunDirError(f"{data_path}: must be {{\"rows\": [ROW, ...]}} (see {_DOC}).")
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise RunDirError(f"{data_path}: rows[{i}] must be an object.")
            _check(row, PROFILE_KEYS, f"rows[{i}]", data_path)
            _check_pmod(row, f"rows[{i}]", data_path)
    elif kind == "eval":
        _check(data, {"model": "str", "pmod": "dict?", "rows": "list"}, "the summary", data_path)
        _check_pmod(data, "the summary", data_path)
        _check_method_match(data, "the summary", data_path)
        for i, row in enumerate(data["rows"]):
            if not isinstance(row, dict):
                raise RunDirError(f"{data_path}: rows[{i}] must be an object.")
            _check(row, EVAL_ROW_KEYS, f"rows[{i}]", data_path)
            _check_method_match(row, f"rows[{i}]", data_path)
    else:
        _check(data, TRAIN_SUMMARY_KEYS, "the summary", data_path)
        _check_pmod(data, "the summary", data_path)

    intro = None
    ipath = path / INTROSPECTION_FILE
    if ipath.exists():
        intro = _check_introspection(read_json(ipath, ""), ipath, path)
    return Run(path=path, kind=kind, meta=meta, data=data, introspection=intro)


def load_runs(run_dirs: Sequence["str | Path"], progress: bool = False) -> list[Run]:
    """Read every run directory; the first invalid one raises :class:`RunDirError`."""
    dirs = list(run_dirs)
    it: Sequence = dirs
    if progress and len(dirs) > 1:
        try:
            from tqdm.auto import tqdm

            it = tqdm(dirs, desc="reading runs", unit="run", leave=False)
        except ImportError:  # tqdm is optional here
            pass
    return [load_run(d) for d in it]


TRAIN_LOG = "train_log.jsonl"


def last_train_log_record(run_dir: "str | Path") -> Optional[Mapping[str, Any]]:
    """The last complete JSON object of a train run's ``train_log.jsonl`` (None: no log, or no readable line;
    a torn last line, as a killed writer leaves it, is skipped)."""
    log = Path(run_dir) / TRAIN_LOG
    if not log.is_file():
        return None
    for line in reversed(log.read_text(encoding="utf-8", errors="replace").splitlines()):
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                return rec
    return None


__all__ = ["Run", "RunDirError", "load_run", "pmod_config", "load_runs", "last_train_log_record", "read_json", "SCHEMA_VERSION", "KINDS",
           "INTROSPECTION_FILE", "TRAIN_LOG"]
