"""Regenerate the checkpoints shipped in ``pmod_bench/toy/checkpoints`` (what ``reproduce --toy --quick`` uses).

    python -m pmod_bench.toy.ship [--work DIR]

Trains the --quick models (baseline, p-MoD-0.5, p-MoD-0.3) from nothing exactly as ``reproduce --toy``
does (same data, seeds and recipes, one CPU thread: prepared LM and tower, PT, the shared SFT, then one
continuation per model), then stores each final model with its weights in
float16 safetensors (about 0.85 MB a model) plus its config, processor and train summary. Training is
deterministic on one thread, so the files come out bit for bit the same on the same software stack
(torch, transformers, Pillow versions); ``checkpoints/MANIFEST.json`` records their SHA-256 (all but
``train_summary.json``, the run's log with its wall times). Check a regeneration with
``python -m pmod_bench.toy.ship --dest /tmp/again`` and ``cmp pmod_bench/toy/checkpoints/MANIFEST.json
/tmp/again/MANIFEST.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from .models import QUICK
from .parallel import Jobs, default_jobs
from .pipeline import FULL, SHIPPED, Reproduction

KEEP = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
        "processor_config.json", "preprocessor_config.json", "special_tokens_map.json", "train_summary.json")


def to_float16(src: Path, dst: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src))
    save_file({k: v.half().contiguous() if v.is_floating_point() else v for k, v in sorted(tensors.items())}, str(dst),
              metadata={"format": "pt"})


#: files of a run's log rather than of the model (wall times, timestamps, paths): shipped, not hashed
LOGS = ("train_summary.json",)


def normalise_config(path: Path, work: Path) -> None:
    """Replace the working directory in ``config.json`` (``_name_or_path`` of the composed LLM and tower) by
    ``<work>``, so the file does not depend on where the checkpoints were trained."""
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace(str(work.resolve()), "<work>").replace(str(work), "<work>"), encoding="utf-8")


def normalise_tokenizer_config(path: Path) -> None:
    """Drop ``local_files_only`` from ``tokenizer_config.json``: transformers records how the tokenizer was loaded
    (offline or not, from the environment), which is not a property of the model and would make the file differ
    between two regenerations."""
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if cfg.pop("local_files_only", None) is not None:
        path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_manifest(dest: Path, key: str) -> dict:
    """``dest/MANIFEST.json``: SHA-256 of every shipped file but the run logs (those are listed)."""
    files = {}
    for d in sorted(p for p in dest.iterdir() if p.is_dir()):
        files[d.name] = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())
                         if f.name not in LOGS}
    (dest / "MANIFEST.json").write_text(json.dumps({"checkpoint_key": key, "files": files, "logs": list(LOGS)}, indent=1)
                                        + "\n")
    return files


def ship(work: Path, dest: Path = SHIPPED) -> dict:
    rep = Reproduction(work, FULL, retrain=True)
    rep.plan = type(FULL)(**{**rep.plan_dict(), "models": QUICK})
    rep.data()
    with Jobs(default_jobs()) as jobs:
        rep.train(jobs)
    dest.mkdir(parents=True, exist_ok=True)
    for name in QUICK:
        src, dst = rep.model_dir(name), dest / name
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in KEEP:
            if (src / f).is_file():
                shutil.copy2(src / f, tmp / f)
        to_float16(src / "model.safetensors", tmp / "model.safetensors")
        normalise_config(tmp / "config.json", work)
        normalise_tokenizer_config(tmp / "tokenizer_config.json")
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)
    return write_manifest(dest, rep.plan.key())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", help="working directory (default: a temporary one)")
    ap.add_argument("--dest", default=str(SHIPPED), help="where to write the checkpoints (default: the package's; "
                    "another folder to check that a second run reproduces them bit for bit)")
    args = ap.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="toy-ship-"))
    manifest = ship(work, Path(args.dest))
    print(json.dumps(manifest, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
