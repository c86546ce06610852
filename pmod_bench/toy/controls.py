"""Controls of the toy world: what a score is worth without the image, or without a model.

=========================  ==========================================================================
control                    what it answers
=========================  ==========================================================================
baseline, blanked images   the baseline evaluated on a copy of the benchmark whose images show only their
                           scene's background (same sizes, questions and answers): what it scores without
                           seeing anything. Near each task's chance level if the scores come from the image
text only (question prior) the answer a question gets most often in the training conversations (the
                           same generator and scenes as the SFT data), per question: the best any model
                           that reads only the question can learn from the training data
chance (constant answer)   the best single answer per task on the evaluated documents ("yes" for
                           existence: F1 66.7); the level the blanked-image control is compared with
=========================  ==========================================================================

The text-only and chance controls need no model: they are scored from the documents an eval run logged
(``lmms_eval/*/samples_*.jsonl``), with the tasks' own ``process_results`` functions, so they are read
exactly like a model's answers (:mod:`pmod_bench.toy.stats`).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

from .stats import LEAVES, logged_samples, sample_values

BLANK_MARKER = "blank"


# ------------------------------------------------------------------------------------ blanked images
def _blank_png(size: tuple, background: tuple) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, background).save(buf, format="PNG")
    return buf.getvalue()


def _blanked_table(table, backgrounds: dict):
    """A parquet table with every image replaced by its scene's background (same size)."""
    import pyarrow as pa
    from PIL import Image

    col = table.schema.get_field_index("image")
    rows = table.column("image").to_pylist()
    qids = table.column("question_id").to_pylist()
    new = []
    for qid, img in zip(qids, rows):
        with Image.open(io.BytesIO(img["bytes"])) as im:
            size = im.size
        new.append({"bytes": _blank_png(size, backgrounds[qid]), "path": img.get("path")})
    return table.set_column(col, table.schema.field(col), pa.array(new, type=table.schema.field(col).type))


def write_blank_benchmark(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """A copy of the toy benchmark repository ``src`` (``.../pmod-bench/toy-world``) at ``dst`` (same layout) whose
    images hold only their scene's background; written to a temporary folder and renamed. Returns ``dst``."""
    import pyarrow.parquet as pq

    src, dst = Path(src), Path(dst)
    scenes = pq.read_table(str(next((src / "scenes").glob("test-*.parquet")))).to_pylist()
    backgrounds = {r["question_id"]: tuple(json.loads(r["scene"])["background"]) for r in scenes}
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".toy-world-blank-", dir=dst.parent))
    try:
        for f in sorted(src.rglob("*")):
            rel = f.relative_to(src)
            if f.is_dir():
                (tmp / rel).mkdir(parents=True, exist_ok=True)
            elif f.suffix == ".parquet" and rel.parts[0] != "scenes":
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(_blanked_table(pq.read_table(str(f)), backgrounds), str(tmp / rel))
            elif f.name == "toy_world.json":
                meta = json.loads(f.read_text())
                (tmp / rel).write_text(json.dumps({**meta, BLANK_MARKER: True}) + "\n")
            else:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, tmp / rel)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def blank_benchmark_ok(dst: str | os.PathLike, src: str | os.PathLike) -> bool:
    """Whether ``dst`` is a complete blanked copy of the benchmark ``src`` (same version, size and seed)."""
    try:
        a = json.loads((Path(src) / "toy_world.json").read_text())
        b = json.loads((Path(dst) / "toy_world.json").read_text())
    except (OSError, ValueError):
        return False
    return b.pop(BLANK_MARKER, False) is True and a == b


# --------------------------------------------------------------------------------- no-model controls
def _key(leaf: str, doc: dict) -> str:
    """The question a model sees, without the instruction (how training conversations and documents are matched)."""
    from .questions import mc_prompt

    if LEAVES[leaf] == "Toy-Ground":
        return doc["answer"]  # the referring expression (process_docs keeps it under "answer")
    if LEAVES[leaf] == "Toy-MC":
        return mc_prompt(doc["question"].strip(), doc["options"])
    return doc["question"].strip()


def training_prior(n_scenes: int = 3000, turns: int = 10) -> dict:
    """{question: Counter(answer)} over conversations drawn like the SFT data (same scene and question generators)."""
    import random

    from .data import TRAIN_SEED, _seed, training_scenes
    from .questions import LETTER, REFCOCO_PROMPT, SHORT, conversation, popularity

    scenes = training_scenes(n_scenes)
    pop = popularity(scenes)
    rng = random.Random(_seed(TRAIN_SEED, "text-only control"))
    prior: dict = defaultdict(Counter)
    for sc in scenes:
        conv = conversation(sc, rng, turns, pop)
        for q, a in zip(conv[::2], conv[1::2]):
            text = q["value"].removeprefix("<image>\n").removesuffix(SHORT).removesuffix(LETTER).removeprefix(REFCOCO_PROMPT)
            prior[text][a["value"]] += 1
    return prior


def _score(leaf: str, doc: dict, pred: str) -> list:
    """Per-document values of answer ``pred`` to ``doc``, through the task's own process_results."""
    from lmms_eval.tasks.pope.utils import pope_process_results

    from pmod_bench.tasks.toy_utils import toy_exact_process_results, toy_ground_process_results, toy_mc_process_results

    bench = LEAVES[leaf]
    if bench == "Toy-Exist":
        result = pope_process_results(doc, [pred])
    elif bench == "Toy-Ground":
        result = toy_ground_process_results(doc, [pred])
    elif bench == "Toy-MC":
        result = toy_mc_process_results(doc, [pred])
    else:
        result = toy_exact_process_results(doc, [pred])
    return sample_values(leaf, result)


def _target_text(leaf: str, row: dict) -> str:
    from .questions import box_text

    if LEAVES[leaf] == "Toy-Ground":
        x0, y0, x1, y1 = row["doc"]["bbox"]  # already normalised x0, y0, x1, y1 (refcoco process_docs)
        return box_text((x0, y0, x1, y1), (1, 1))
    return str(row["target"])


def text_only_docs(samples: dict, prior: dict) -> dict:
    """Per-document values (``stats.load_docs`` layout) of answering each logged document with its question's most
    frequent training answer (the task's most frequent training answer for a question never seen in training)."""
    by_kind: dict = defaultdict(Counter)
    for leaf, rows in samples.items():
        for r in rows:
            by_kind[LEAVES[leaf]].update(prior.get(_key(leaf, r["doc"]), Counter()))
    out = {}
    for leaf, rows in samples.items():
        out[leaf] = []
        for r in rows:
            counts = prior.get(_key(leaf, r["doc"])) or by_kind[LEAVES[leaf]]
            pred = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0] if counts else ""
            out[leaf].append((int(r["doc_id"]), _score(leaf, r["doc"], pred)))
    return out


def chance_docs(samples: dict) -> dict:
    """Per-document values of the best single answer per task (among the documents' own answers) on these documents."""
    from .stats import _leaf_score

    import numpy as np

    out = {}
    for leaf, rows in samples.items():
        candidates = sorted({_target_text(leaf, r) for r in rows} | ({"yes"} if LEAVES[leaf] == "Toy-Exist" else set()))
        best = None
        for c in candidates:
            vals = [(int(r["doc_id"]), _score(leaf, r["doc"], c)) for r in rows]
            score = float(_leaf_score(LEAVES[leaf], np.asarray([v for _, v in vals])))
            if best is None or score > best[0]:
                best = (score, vals)
        out[leaf] = best[1] if best else []
    return out


def no_model_controls(run_dir: str | os.PathLike) -> dict:
    """{"text-only": docs, "chance": docs} on the documents the eval run ``run_dir`` logged."""
    samples = logged_samples(run_dir)
    return {"text-only": text_only_docs(samples, training_prior()), "chance": chance_docs(samples)}


__all__ = ["blank_benchmark_ok", "chance_docs", "no_model_controls", "text_only_docs", "training_prior",
           "write_blank_benchmark"]
