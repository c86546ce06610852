"""Write the toy world's data: the benchmark (hub layout, for lmms-eval) and the training sets (LLaVA format).

Benchmark (``write_benchmark(ROOT)``): the dataset repository ``pmod-bench/toy-world`` laid out as a
snapshot download under ``ROOT/pmod-bench/toy-world`` -- a README.md whose ``configs:`` section maps
each config's splits to parquet files (HF ``Image`` features), exactly like ``push_to_hub`` output --
so ``PMOD_BENCH_DATA=ROOT`` makes the lmms-eval tasks read it offline like any real benchmark::

    config      splits                          columns
    exist       random, popular, adversarial    question_id, question, answer, category, image
    attribute   test                            question_id, question, answer, image
    count       test                            question_id, question, answer, image
    mc          test                            question_id, question, options, answer, image
    text        test                            question_id, question, answer, image
    ground      test                            question_id, answer (list of expressions), bbox (x, y, w, h px), image
    scenes      test                            the scenes of every row above (shapes, boxes, digit) as JSON

Training (``write_training(DIR)``): ``DIR/pt.json`` (captions), ``DIR/sft.json`` (multi-turn
conversations over every question kind) and ``DIR/images/*.png``. Evaluation and training scenes
come from disjoint seeds.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict
from pathlib import Path

from .questions import KINDS, MAKERS, NEGATIVES, conversation, exist_question, popularity, scene_for
from .world import Scene, describe, render, sample_scene

HUB_ID = "pmod-bench/toy-world"
#: bump when the generator changes: cached copies with another version are regenerated
DATA_VERSION = 1
EVAL_SEED = 1_000_003
TRAIN_SEED = 7


def _seed(base: int, *parts) -> int:
    h = base
    for p in parts:
        for ch in str(p):
            h = (h * 1_000_003 + ord(ch)) % (2**61 - 1)
    return h


def benchmark_docs(n: int = 60, seed: int = EVAL_SEED) -> dict:
    """{(config, split): [doc, ...]} with PIL images; ``n`` documents per split (exist: per negative kind)."""
    out: dict = {}
    # existence: POPE-style, half yes / half no per split; 'popular' ranks objects over the split's scenes
    for neg in NEGATIVES:
        rng = random.Random(_seed(seed, "exist", neg))
        scenes = [sample_scene(rng, (1, 4)) for _ in range((n + 1) // 2)]
        pop = popularity(scenes)
        docs = []
        for i, sc in enumerate(scenes):
            for answer in ("yes", "no"):
                if len(docs) == n:
                    break
                q = exist_question(sc, rng, answer, neg, pop)
                docs.append({"question_id": f"exist-{neg}-{len(docs)}", "question": q["question"], "answer": answer,
                             "category": neg, "image": render(sc), "_scene": sc})
        out[("exist", neg)] = docs
    for kind in KINDS[1:]:
        rng = random.Random(_seed(seed, kind))
        docs = []
        while len(docs) < n:
            sc = scene_for(kind, rng)
            q = MAKERS[kind](sc, rng)
            if q is None:
                continue
            qid = f"{kind}-{len(docs)}"
            if kind == "ground":
                docs.append({"question_id": qid, "answer": [q["expression"]], "bbox": q["bbox"], "image": render(sc), "_scene": sc})
            elif kind == "mc":
                docs.append({"question_id": qid, "question": q["question"], "options": q["options"], "answer": q["answer"],
                             "image": render(sc), "_scene": sc})
            else:
                docs.append({"question_id": qid, "question": q["question"], "answer": q["answer"], "image": render(sc), "_scene": sc})
        out[(kind, "test")] = docs
    return out


def _features(config: str):
    from datasets import Features, Image, List, Value

    s = Value("string")
    if config == "exist":
        return Features(question_id=s, question=s, answer=s, category=s, image=Image())
    if config == "mc":
        return Features(question_id=s, question=s, options=List(s), answer=s, image=Image())
    if config == "ground":
        return Features(question_id=s, answer=List(s), bbox=List(Value("float32")), image=Image())
    if config == "scenes":
        return Features(question_id=s, scene=s)
    return Features(question_id=s, question=s, answer=s, image=Image())


def scene_json(sc: Scene) -> str:
    return json.dumps(asdict(sc))


def scene_from_json(text: str) -> Scene:
    from .world import Shape

    d = json.loads(text)
    return Scene(tuple(d["size"]), tuple(d["background"]), [Shape(s["shape"], s["colour"], tuple(s["box"])) for s in d["shapes"]],
                 d["digit"], tuple(d["digit_box"]) if d["digit_box"] else None)


def _readme(configs: dict) -> str:
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        for split in splits:
            lines += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    lines += ["---", "", "# pmod-bench/toy-world", "",
              "The toy world benchmark of pmod-bench (`pmod_bench.toy`): generated scenes of coloured shapes and a",
              f"digit, with POPE-, VQA-, MMBench-, TextVQA- and RefCOCO-like questions. Data version {DATA_VERSION};",
              "regenerate with `pmod-bench reproduce --toy` or `pmod_bench.toy.data.write_benchmark(ROOT)`.", ""]
    return "\n".join(lines)


def write_benchmark(root: str | os.PathLike, n: int = 60, seed: int = EVAL_SEED) -> Path:
    """Write the benchmark under ``root/pmod-bench/toy-world`` (atomically: a temporary folder renamed); returns it."""
    import shutil
    import tempfile

    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    repo = Path(root) / HUB_ID
    repo.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".toy-world-", dir=repo.parent))
    bars = is_progress_bar_enabled()
    disable_progress_bar()
    try:
        docs = benchmark_docs(n, seed)
        configs: dict = {}
        scenes = []
        for (config, split), rows in docs.items():
            (tmp / config).mkdir(exist_ok=True)
            scenes += [{"question_id": r["question_id"], "scene": scene_json(r["_scene"])} for r in rows]
            clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
            Dataset.from_list(clean, features=_features(config)).to_parquet(str(tmp / config / f"{split}-00000-of-00001.parquet"))
            configs.setdefault(config, []).append(split)
        (tmp / "scenes").mkdir()
        Dataset.from_list(scenes, features=_features("scenes")).to_parquet(str(tmp / "scenes" / "test-00000-of-00001.parquet"))
        configs["scenes"] = ["test"]
        (tmp / "README.md").write_text(_readme(configs), encoding="utf-8")
        (tmp / "toy_world.json").write_text(json.dumps({"data_version": DATA_VERSION, "n": n, "seed": seed}) + "\n")
        if repo.exists():
            shutil.rmtree(repo)
        os.replace(tmp, repo)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if bars:
            enable_progress_bar()
    return repo


def benchmark_ok(root: str | os.PathLike, n: int | None = None, seed: int = EVAL_SEED) -> bool:
    """Whether ``root`` holds a complete toy benchmark of this data version (and size ``n``, if given)."""
    marker = Path(root) / HUB_ID / "toy_world.json"
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("data_version") == DATA_VERSION and meta.get("seed") == seed and (n is None or meta.get("n") == n)


def write_training(out: str | os.PathLike, n_images: int = 2000, turns: int = 3, seed: int = TRAIN_SEED,
                   rounds: int = 1) -> dict:
    """PT captions and SFT conversations over ``n_images`` training scenes; returns {"pt", "sft", "sft_pmod", "images"}.

    ``sft.json`` holds ``rounds`` conversations of ``turns`` questions per scene (each its own draw of questions:
    many question instances per rendered image, the image's tokens paid once a conversation); ``sft_pmod.json``
    one fresh conversation per scene, the data of the continuation stage that derives the baseline and the p-MoD
    models from the shared SFT (``pmod_bench.toy.models``)."""
    out = Path(out)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(_seed(seed, "train"))
    kinds = ("exist", "attribute", "count", "mc", "text", "ground")
    scenes = [scene_for(kinds[i % len(kinds)], rng) for i in range(n_images)]
    pop = popularity(scenes)
    pt, sft, sft_pmod = [], [], []
    rng2 = random.Random(_seed(seed, "pmod"))
    for i, sc in enumerate(scenes):
        rel = f"images/{i:05d}.png"
        path = out / rel
        if not path.exists():
            render(sc).save(path)
        pt.append({"id": f"pt-{i}", "image": rel, "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": describe(sc)}]})
        sft += [{"id": f"sft-{i}" + (f"-{r}" if r else ""), "image": rel, "conversations": conversation(sc, rng, turns, pop)}
                for r in range(rounds)]
        sft_pmod.append({"id": f"sft-pmod-{i}", "image": rel, "conversations": conversation(sc, rng2, turns, pop)})
    paths = {"pt": out / "pt.json", "sft": out / "sft.json", "sft_pmod": out / "sft_pmod.json", "images": out}
    for name, records in (("pt", pt), ("sft", sft), ("sft_pmod", sft_pmod)):
        tmp = paths[name].with_suffix(".json.tmp")
        tmp.write_text(json.dumps(records), encoding="utf-8")
        os.replace(tmp, paths[name])
    return paths


def training_scenes(n_images: int, seed: int = TRAIN_SEED) -> list:
    """The scenes of :func:`write_training` (same order), without writing anything."""
    rng = random.Random(_seed(seed, "train"))
    kinds = ("exist", "attribute", "count", "mc", "text", "ground")
    scenes = []
    for i in range(n_images):
        sc = scene_for(kinds[i % len(kinds)], rng)
        scenes.append(sc)
    return scenes


__all__ = ["DATA_VERSION", "HUB_ID", "benchmark_docs", "benchmark_ok", "scene_from_json", "scene_json", "training_scenes",
           "write_benchmark", "write_training"]


def default_cache_root() -> Path:
    """Where the toy benchmark is generated when no copy is configured: ``$PMOD_BENCH_CACHE/toy-world-vN``
    (default ``~/.cache/pmod_bench``)."""
    from pmod_bench.model.sources import default_cache_root as cache_root

    return cache_root() / f"toy-world-v{DATA_VERSION}"


def ensure_benchmark(root: str | os.PathLike | None = None) -> Path:
    """The toy benchmark's directory (``.../pmod-bench/toy-world``): ``root`` or ``$PMOD_BENCH_DATA`` when it holds
    a complete copy of this data version, else the cache (generated there on first use)."""
    from pmod_bench.model.sources import data_root

    for base in (Path(root) if root else None, data_root()):
        if base is not None and benchmark_ok(base):
            return base / HUB_ID
    cache = default_cache_root()
    if not benchmark_ok(cache):
        write_benchmark(cache)
    return cache / HUB_ID
