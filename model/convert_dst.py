"""Where ``convert`` writes: DST checked before any work, written beside it, published by one rename.

What ``pmod-bench convert SRC DST [--overwrite]`` may touch is only what it writes itself:

* SRC and DST may not contain one another (paths resolved, symbolic links followed): DST = SRC, DST =
  SRC's parent or DST inside SRC are refused, with or without ``--overwrite``; so is a DST that is a
  symbolic link, and the same for ``--vision-tower``.
* every conversion lists the files it wrote in :data:`MANIFEST` inside DST. ``--overwrite`` replaces a
  DST only when each of its entries is in that list (the manifest, the files, their folders); anything
  else, or no manifest, is refused naming one such file. Without ``--overwrite`` a non-empty DST is refused.
* the conversion is written into a temporary sibling (``.pmod-convert-XXXXXXXX.tmp``) and renamed to DST
  when complete: a conversion killed midway leaves DST as it was. An error or a SIGTERM removes the
  sibling (and the parent folders the conversion created); only SIGKILL can leave it behind.
* the earlier conversion under ``--overwrite`` is moved aside by one rename, then only the files its
  manifest lists are removed.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from pathlib import Path

from pmod_bench.outputs import check_output_path

#: written into every converted DST: the files the conversion wrote (``--overwrite`` replaces only those)
MANIFEST = ".pmod_convert_manifest.json"


class DstError(ValueError):
    """A DST the conversion may not write (the converter raises it as its ConversionError)."""


def _relation(a: Path, b: Path) -> str | None:
    """How resolved path ``a`` relates to ``b``: "is", "contains", "is inside", or None."""
    if a == b:
        return "is"
    if a in b.parents:
        return "contains"
    if b in a.parents:
        return "is inside"
    return None


def manifest_files(dst: Path) -> list | None:
    """The files (relative paths) an earlier conversion wrote into ``dst``, from its manifest; None without one."""
    try:
        doc = json.loads((dst / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = doc.get("files") if isinstance(doc, dict) else None
    return [f for f in files if isinstance(f, str)] if isinstance(files, list) else None


def foreign_entries(dst: Path, written: list) -> list:
    """Entries of ``dst`` (relative paths) that are neither a written file, its folders, nor the manifest."""
    allowed = {MANIFEST, *written}
    for f in written:
        allowed.update(str(p) for p in Path(f).parents if str(p) != ".")
    found = []
    for root, dirs, files in os.walk(dst):
        rel_root = Path(root).relative_to(dst)
        for name in sorted(dirs) + sorted(files):
            rel = str(rel_root / name) if str(rel_root) != "." else name
            if rel not in allowed:
                found.append(rel)
    return sorted(found)


def check_dst(src_dir: Path, dst: Path, overwrite: bool, vision_tower: str | None = None) -> None:
    """Refuse a DST this conversion may not write, before anything is read or written (see the module docstring)."""
    check_output_path(dst, "DST", error=DstError, sibling=True)
    if dst.is_symlink():
        raise DstError(f"DST {dst} is a symbolic link (to {os.path.realpath(dst)}); pass the directory itself.")
    d = dst.resolve()
    others = [("SRC", src_dir)] + ([("--vision-tower", Path(vision_tower).expanduser())]
                                    if vision_tower and Path(vision_tower).expanduser().exists() else [])
    for what, other in others:
        how = _relation(d, other.resolve())
        if how:
            raise DstError(f"DST {dst} {how} {what} {other}; a conversion never writes into or over its input: pass a DST "
                           f"outside it, e.g. {other.resolve().parent / (other.resolve().name + '-hf')}.")
    check_contents(dst, overwrite)


def check_contents(dst: Path, overwrite: bool) -> None:
    """A non-empty DST: refused without ``overwrite``; with it, unless everything in it is an earlier conversion's."""
    if not dst.is_dir() or not any(dst.iterdir()):
        return
    written = manifest_files(dst)
    foreign = foreign_entries(dst, written) if written is not None else None
    if not overwrite:
        fix = ("pass --overwrite to replace that earlier conversion, or another DST" if written is not None and not foreign
               else "pass a new or empty DST")
        raise DstError(f"DST {dst} exists and is not empty; {fix}.")
    if written is None:
        raise DstError(f"DST {dst} was not written by `pmod-bench convert` (it has no {MANIFEST}); --overwrite replaces "
                       "only an earlier conversion's files: pass a new or empty DST.")
    if foreign:
        raise DstError(f"DST {dst} holds {foreign[0]}, which `pmod-bench convert` did not write; --overwrite replaces only "
                       f"an earlier conversion's files: move {foreign[0]} away, or pass another DST.")


def make_parents(dst: Path) -> list:
    """Create DST's missing parent folders; returns those created (deepest last) so a failure can remove them."""
    missing = []
    p = dst.parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        p.mkdir()
    return list(reversed(missing))


def remove_created(tmp: Path, parents: list) -> None:
    """After a failed conversion: the temporary sibling, then the parent folders it created when empty."""
    import shutil

    if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    for p in reversed(parents):
        try:
            p.rmdir()
        except OSError:
            break


def temp_sibling(dst: Path) -> Path:
    """A fresh name beside DST (short: a DST name near the filesystem's limit still gets one)."""
    return dst.parent / f".pmod-convert-{uuid.uuid4().hex[:8]}.tmp"


def write_manifest(tmp: Path, extra: dict) -> None:
    """List every file now in ``tmp`` (the finished conversion) in its manifest."""
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file() or p.is_symlink())
    (tmp / MANIFEST).write_text(json.dumps({**extra, "files": files}, indent=1) + "\n", encoding="utf-8")


def _remove_listed(old: Path, written: list) -> None:
    """Remove the files ``written`` from ``old`` (a moved-aside earlier conversion), then its emptied folders."""
    for rel in [*written, MANIFEST]:
        (old / rel).unlink(missing_ok=True)
    for root, dirs, _ in sorted(os.walk(old, topdown=False), key=lambda t: -len(t[0])):
        for name in dirs:
            try:
                (Path(root) / name).rmdir()
            except OSError:
                pass
    try:
        old.rmdir()
    except OSError:
        warnings.warn(f"{old} kept: it holds files the earlier conversion did not list (added while converting?)", stacklevel=3)


def publish(tmp: Path, dst: Path, overwrite: bool, marker: str) -> None:
    """Move the finished ``tmp`` to ``dst`` by one rename (an empty ``dst`` is replaced; see the module docstring)."""
    if dst.is_dir() and any(dst.iterdir()):
        if (dst / marker).is_file() and not overwrite:
            return  # a concurrent identical conversion (load_model's cache) finished first
        check_contents(dst, overwrite)  # again: DST may have changed while converting
        written = manifest_files(dst) or []
        old = dst.parent / f".pmod-convert-{uuid.uuid4().hex[:8]}.old"
        os.replace(dst, old)
        os.replace(tmp, dst)
        _remove_listed(old, written)
        return
    try:
        os.replace(tmp, dst)
    except OSError:
        if not (dst / marker).is_file():
            raise


__all__ = ["MANIFEST", "DstError", "check_contents", "check_dst", "foreign_entries", "make_parents", "manifest_files", "publish",
           "remove_created", "temp_sibling", "write_manifest"]
