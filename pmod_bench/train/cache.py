"""``data.cache``: every training sample built once (tokenised, label-masked, images as pixel tensors) and kept.

For small models the step is cheap and the per-sample work (PIL decode and resize, the processor's anyres
tiling, tokenisation with offsets) costs as much as the step, every epoch and in every run over the same
data. With ``data.cache: true`` the dataset's samples are built once, before training, and kept in memory;
the built samples are also stored in ``$PMOD_BENCH_CACHE/train-samples/<key>.pt`` so the next run over
the same data (another epoch count, another model continuing from the same SFT) loads them instead::

    key = sha256(format version, every data.json file's bytes, every image's path + size + mtime_ns,
                 the processor (tokenizer, image processor, chat template), data.template, max_length,
                 image_aspect_ratio, the records' count)

so a changed data file, a touched image or another processor gets a new key: a stale cache is never served.
The samples are those :meth:`LlavaConversationDataset.build` makes (the same tensors, so training is bit
for bit the run without the cache); records that cannot be built are handled as without it (skipped and
counted under ``on_bad_sample: skip``, an error under ``fail``), only found before the first step. Pixel
tensors of records that share an image are stored once.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)

#: bump when the stored layout or the way samples are built changes
CACHE_VERSION = 1
CACHE_DIR = "train-samples"


def _processor_identity(dataset) -> bytes:
    proc = dataset.processor
    tok = dataset.tokenizer
    parts = [tok.backend_tokenizer.to_str() if hasattr(tok, "backend_tokenizer") else repr(sorted(tok.get_vocab().items()))]
    ip = getattr(proc, "image_processor", None)
    parts.append(ip.to_json_string() if ip is not None else "")
    parts.append(str(getattr(proc, "chat_template", None) or getattr(tok, "chat_template", None) or ""))
    return "\0".join(parts).encode()


def cache_key(dataset, files: list) -> str:
    """The key of ``dataset``'s built samples (see the module docstring)."""
    h = hashlib.sha256(f"pmod-bench train samples v{CACHE_VERSION}\0".encode())
    for f in files:
        h.update(os.path.abspath(f).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    h.update(_processor_identity(dataset))
    h.update(repr((dataset.template, dataset.max_length, dataset.image_aspect_ratio, len(dataset.records),
                   dataset.image_folder)).encode())
    seen: set = set()
    for rec in dataset.records:
        for rel in rec.images:
            if rel in seen:
                continue
            seen.add(rel)
            path = rel if os.path.isabs(rel) else os.path.join(dataset.image_folder or "", rel)
            try:
                st = os.stat(path)
                h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            except OSError:
                h.update(f"{rel}\0missing\0".encode())
    return h.hexdigest()[:24]


def _compact(sample: dict, pixels: dict, images: tuple) -> dict:
    """A built sample as stored: token ids as int32, one pixel tensor per distinct image list."""
    out = {k: v for k, v in sample.items() if k != "bad_samples"}
    out["input_ids"], out["labels"] = sample["input_ids"].to(torch.int32), sample["labels"].to(torch.int32)
    if "pixel_values" in sample and images:
        have = pixels.get(images)
        if have is not None and torch.equal(have[0], sample["pixel_values"]):
            out["pixel_values"] = have[0]
            if have[1] is not None:
                out["image_sizes"] = have[1]
        else:
            pixels[images] = (sample["pixel_values"], sample.get("image_sizes"))
    return out


def build_samples(dataset, progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """{"samples": {position: sample}, "bad": {position: bad-sample entry}} of every record of ``dataset``."""
    from pmod_bench.train.data import BadSampleError, _Bad, _describe

    samples, bad, pixels = {}, {}, {}
    n = len(dataset.records)
    for j, rec in enumerate(dataset.records):
        if j in dataset.known_bad:
            continue
        try:
            samples[j] = _compact(dataset.build(rec), pixels, tuple(rec.images))
        except _Bad as exc:
            entry = {"index": rec.index, "id": rec.id, "path": exc.path, "reason": exc.reason}
            if dataset.on_bad_sample == "fail":
                raise BadSampleError(_describe(entry) + " (data.on_bad_sample=skip would skip and count it)") from None
            bad[j] = entry
        if progress is not None and (j + 1) % 1000 == 0:
            progress(j + 1, n)
    return {"samples": samples, "bad": bad}


def attach_cache(dataset, files: list, cache_root: Optional[str | os.PathLike] = None) -> dict:
    """Give ``dataset`` its built samples: loaded from the cache file when one with this key exists, else built
    (and stored, atomically; a full disk or a read-only cache only costs the next run the build). Returns
    {"key", "path", "loaded" (bool), "samples", "bad"}."""
    from pmod_bench.model.sources import default_cache_root

    key = cache_key(dataset, files)
    path = Path(default_cache_root(cache_root)) / CACHE_DIR / f"{key}.pt"
    built, loaded = None, False
    if path.is_file():
        try:
            built = torch.load(path, weights_only=True)
            loaded = True
        except Exception as exc:  # noqa: BLE001 - a torn or foreign file: rebuilt below
            log.warning("train sample cache %s unreadable (%s: %s); building the samples again", path, type(exc).__name__, exc)
    if built is None:
        built = build_samples(dataset, lambda i, n: log.info("building training samples: %d/%d", i, n))
        _store(built, path)
    if dataset.on_bad_sample == "fail" and built["bad"]:
        from pmod_bench.train.data import BadSampleError, _describe

        entry = next(iter(built["bad"].values()))
        raise BadSampleError(_describe(entry) + " (data.on_bad_sample=skip would skip and count it)")
    dataset.use_prebuilt(built["samples"], built["bad"])
    return {"key": key, "path": str(path), "loaded": loaded, "samples": len(built["samples"]), "bad": len(built["bad"])}


def _store(built: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(built, tmp)
        os.replace(tmp, path)
    except OSError as exc:  # the cache is an optimisation: training goes on without the file
        log.warning("could not store the training sample cache at %s (%s); the next run builds the samples again", path, exc)
        try:
            tmp.unlink()
        except OSError:
            pass


__all__ = ["CACHE_DIR", "CACHE_VERSION", "attach_cache", "build_samples", "cache_key"]
