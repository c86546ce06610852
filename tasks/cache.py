"""Per-request persistence of model responses (resume within a benchmark).

lmms-eval's ``--use_cache`` stores responses only after the model has answered a whole request
type, so a run killed mid-benchmark loses everything. The ``pmod_llava`` model writes each answered
batch here at once: an append-only JSON-lines file per rank (``responses.rank<R>.jsonl``), flushed
and fsynced per batch. A line is ``{"key": sha256, "task": ..., "doc_id": ..., "response": ...}``;
the key hashes (model identity, request type, task, split, doc_id, prompt, generation kwargs /
continuation, and for a local benchmark copy its data fingerprint, ``tasks/data.py``: an answer to a
document of one copy is never served for another copy or after an edit). A torn last line (killed
mid-write) is ignored on reading.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional


def request_key(*parts: Any) -> str:
    """Stable hash of JSON-serialisable request parts (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """Append-only response store in a directory (one file per rank, all files read)."""

    def __init__(self, directory: "str | os.PathLike", rank: int = 0) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"responses.rank{rank}.jsonl"
        self._data: dict[str, Any] = {}
        self._pending: list[str] = []
        self.hits = 0
        for f in sorted(self.dir.glob("responses.rank*.jsonl")):
            for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                    self._data[rec["key"]] = rec["response"]
                except (ValueError, KeyError, TypeError):
                    continue  # torn line of a killed run
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":  # start fresh after a torn last line
                    self._pending.append("")

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> Optional[Any]:
        value = self._data.get(key)
        if value is not None:
            self.hits += 1
        return value

    def put(self, key: str, response: Any, **meta: Any) -> None:
        self._data[key] = response
        self._pending.append(json.dumps({"key": key, **meta, "response": response}, ensure_ascii=False, default=str))

    def flush(self) -> None:
        if not self._pending:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write("\n".join(self._pending) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._pending = []
