"""How sure a toy score is: per-document results, 95% bootstrap intervals, paired differences.

A toy benchmark has a few dozen documents a task (``--quick``: 30), so a score moves by several points
from one draw of documents to another. Every number the toy report shows comes with its ``n`` and the
suite average (AVG) with a 95% bootstrap interval; a difference between two models is claimed only when
its paired interval excludes zero.

Per-document results are read from an eval run directory's ``lmms_eval/<task>/samples_<leaf>.jsonl``
(lmms-eval's logged samples) and scored with lmms-eval's own definitions, so the point estimates are
exactly the run's summary values::

    Toy-Exist    POPE F1 per split (TP / FP / FN counted as pope_aggregate_precision / _recall do),
                 the mean of the random / popular / adversarial splits
    Toy-Attr, Toy-Count, Toy-Text   exact_match;  Toy-MC  accuracy
    Toy-Ground   refcoco Acc@0.5 (lmms-eval's compute_accuracy of the logged box and prediction)

Existence is also summarised as POPE's accuracy (``exist_accuracy``: a document is right when it is neither a false
positive nor a false negative, mean of the three splits): F1 counts only "yes" answers, so a model that rightly says
"no" to everything (the blanked-image control) scores F1 0 while its accuracy sits at the 50% chance level.

Bootstrap: ``B`` resamples; in each, every leaf task's documents are drawn with replacement (same size),
the benchmark scores and their mean (AVG) recomputed. The draws depend only on the task and its ``n``
(not on the model), so two models evaluated on the same documents are compared *paired*: the interval
of their difference is that of the per-resample differences.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

#: leaf task -> benchmark key (as tasks.benchmarks names them)
LEAVES = {
    "pmod_toy_exist_random": "Toy-Exist", "pmod_toy_exist_popular": "Toy-Exist", "pmod_toy_exist_adversarial": "Toy-Exist",
    "pmod_toy_attribute": "Toy-Attr", "pmod_toy_count": "Toy-Count", "pmod_toy_mc": "Toy-MC", "pmod_toy_text": "Toy-Text",
    "pmod_toy_ground": "Toy-Ground",
}
BENCHES = ("Toy-Exist", "Toy-Attr", "Toy-Count", "Toy-MC", "Toy-Text", "Toy-Ground")
RESAMPLES = 1000


def _ground_hit(row: dict) -> float:
    from lmms_eval.tasks.refcoco.utils_rec import compute_accuracy

    try:
        return float(compute_accuracy(row["bbox"], row["pred"], 0.5))
    except (TypeError, ValueError, IndexError, ZeroDivisionError):  # an unparsable prediction scores 0
        return 0.0


def sample_values(leaf: str, sample: dict) -> list:
    """One logged lmms-eval sample -> its per-document values: [tp, fp, fn] for existence, [score] otherwise."""
    bench = LEAVES[leaf]
    if bench == "Toy-Exist":
        r = sample["pope_f1_score"]
        pred, gt = r["prediction"], r["ground_truth"]
        return [float(gt == "yes" and pred == "yes"), float(gt == "no" and pred == "yes"), float(gt == "yes" and pred == "no")]
    if bench == "Toy-Ground":
        return [_ground_hit(sample["refcoco_ACC@0.5"])]
    return [float(sample["accuracy"] if bench == "Toy-MC" else sample["exact_match"])]


def logged_samples(run_dir: str | Path) -> dict:
    """{leaf task: [lmms-eval sample row, ...]} (sorted by doc_id) of an eval run directory."""
    out: dict = {}
    for path in sorted(Path(run_dir).glob("lmms_eval/*/samples_*.jsonl")):
        leaf = path.stem[len("samples_"):]
        if leaf in LEAVES:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            out[leaf] = sorted(rows, key=lambda r: int(r["doc_id"]))
    return out


def load_docs(run_dir: str | Path) -> dict:
    """{leaf task: [(doc_id, values), ...]} (sorted by doc_id) from an eval run directory's logged samples."""
    return {leaf: [(int(r["doc_id"]), sample_values(leaf, r)) for r in rows] for leaf, rows in logged_samples(run_dir).items()}


def _leaf_score(bench: str, values):
    """Score(s) of one leaf task from a (..., n, k) array of per-document values: a percentage per leading index."""
    import numpy as np

    if bench == "Toy-Exist":
        tp, fp, fn = (values[..., i].sum(-1) for i in range(3))
        denom = 2 * tp + fp + fn
        return 100.0 * np.where(denom > 0, 2 * tp / np.maximum(denom, 1e-12), 0.0)
    return 100.0 * values[..., 0].mean(-1)


def _draws(leaf: str, n: int, resamples: int):
    """The bootstrap indices of one leaf task: a function of (leaf, n, resamples) only, shared by every model."""
    import numpy as np

    seed = int.from_bytes(hashlib.sha256(f"{leaf}:{n}:{resamples}".encode()).digest()[:8], "little")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def exist_accuracy(docs: dict) -> Optional[float]:
    """POPE accuracy of the existence documents in ``docs`` (``load_docs`` layout), in %: per split the share of
    documents that are neither a false positive nor a false negative ([tp, fp, fn] values), averaged over the splits;
    None without existence documents."""
    splits = [[1.0 - v[1] - v[2] for _, v in rows] for leaf, rows in docs.items() if LEAVES[leaf] == "Toy-Exist" and rows]
    return 100.0 * sum(sum(s) / len(s) for s in splits) / len(splits) if splits else None


def summarise(docs: dict, resamples: int = RESAMPLES) -> dict:
    """Point scores, n and bootstrap replicates of every benchmark and of AVG.

    Returns {"scores": {bench: %}, "n": {bench: documents}, "avg": %, "boot": {bench: (B,) array}, "boot_avg": (B,),
    "exist_accuracy": %}; benchmarks without documents are left out, and AVG (the mean of all six) is None unless
    every one is there."""
    import numpy as np

    per_bench: dict = {}
    for leaf, rows in docs.items():
        if not rows:
            continue
        bench = LEAVES[leaf]
        values = np.asarray([v for _, v in rows], dtype=np.float64)
        point = float(_leaf_score(bench, values))
        boot = _leaf_score(bench, values[_draws(leaf, len(rows), resamples)])
        per_bench.setdefault(bench, []).append((point, boot, len(rows)))
    scores = {b: float(np.mean([p for p, _, _ in v])) for b, v in per_bench.items()}
    n = {b: int(sum(k for _, _, k in v)) for b, v in per_bench.items()}
    boot = {b: np.mean([bt for _, bt, _ in v], axis=0) for b, v in per_bench.items()}
    complete = all(b in scores for b in BENCHES)
    return {"scores": scores, "n": n, "boot": boot, "avg": float(np.mean([scores[b] for b in BENCHES])) if complete else None,
            "boot_avg": np.mean([boot[b] for b in BENCHES], axis=0) if complete else None, "exist_accuracy": exist_accuracy(docs)}


def interval(replicates, level: float = 0.95) -> Optional[tuple]:
    """The percentile interval of bootstrap replicates (None for none)."""
    import numpy as np

    if replicates is None:
        return None
    lo, hi = np.percentile(replicates, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def difference(a: dict, b: dict) -> Optional[dict]:
    """AVG(a) - AVG(b) with its paired 95% interval; ``distinguishable`` when the interval excludes 0. Both summaries
    must come from the same documents (same leaf tasks and n), else None."""
    if a.get("boot_avg") is None or b.get("boot_avg") is None or a["n"] != b["n"]:
        return None
    lo, hi = interval(a["boot_avg"] - b["boot_avg"])
    return {"diff": a["avg"] - b["avg"], "low": lo, "high": hi, "distinguishable": lo > 0 or hi < 0}


__all__ = ["BENCHES", "LEAVES", "RESAMPLES", "difference", "exist_accuracy", "interval", "load_docs", "logged_samples", "sample_values",
           "summarise"]
