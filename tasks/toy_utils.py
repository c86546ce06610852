"""lmms-eval functions of the toy world's tasks (``tasks/lmms_tasks/toy/*.yaml``) and their task class.

The toy benchmark (``pmod_bench.toy``) is generated, never downloaded: :class:`ToyTask` reads it
from ``$PMOD_BENCH_DATA/pmod-bench/toy-world`` when that holds a copy (``pmod-bench reproduce --toy``
points it at its own), otherwise from a cache directory where it is generated once, deterministically.
Existence reuses lmms-eval's POPE functions (F1) and grounding its RefCOCO ones (Acc@0.5); the
short-answer and multiple-choice scorers are below.
"""

from __future__ import annotations

import re

from .lmms_task import PMoDTask

LETTERS = "ABCD"


class ToyTask(PMoDTask):
    """``PMoDTask`` whose dataset is the generated toy world (made on first use if no copy exists)."""

    def download(self, dataset_kwargs=None) -> None:
        from lmms_eval.api.task import ConfigurableTask

        from pmod_bench.toy.data import ensure_benchmark

        from .data import snapshot_cache_dir

        self.DATASET_PATH = str(ensure_benchmark())
        kwargs = dict(dataset_kwargs or {})
        kwargs.pop("token", None)
        kwargs["cache_dir"] = snapshot_cache_dir(self.DATASET_PATH)  # this copy's own tables (e.g. not a blanked copy's)
        return ConfigurableTask.download(self, kwargs)


def toy_doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def toy_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question'].strip()}{kw.get('post_prompt', '')}"


def toy_mc_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    from pmod_bench.toy.questions import mc_prompt

    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{mc_prompt(doc['question'].strip(), doc['options'])}{kw.get('post_prompt', '')}"


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", str(text).strip().lower()).strip(" .!")


def toy_exact_process_results(doc, results):
    """VQA-style exact match after lower-casing and stripping punctuation at the ends."""
    pred = results[0] if results else ""
    return {"exact_match": float(_norm(pred) == _norm(doc["answer"]))}


def toy_ground_process_results(doc, results):
    """lmms-eval's RefCOCO scoring, with a box that is not one (x1 < x0 or y1 < y0, or not four numbers) taken as no
    box, ``[0, 0, 0, 0]`` (what lmms-eval gives an unparsable answer): its IoU would divide by a zero or negative
    union (lmms-eval 0.7.3's compute_iou does not clamp) and fail the whole benchmark on one answer."""
    from lmms_eval.tasks.refcoco.utils_rec import refcoco_bbox_rec_process_result

    out = refcoco_bbox_rec_process_result(doc, results)
    pred = next(iter(out.values()))["pred"]
    ok = isinstance(pred, (list, tuple)) and len(pred) == 4 and pred[2] >= pred[0] and pred[3] >= pred[1]
    if not ok:
        for v in out.values():
            v["pred"] = [0, 0, 0, 0]
    return out


def parse_letter(response: str, options) -> str | None:
    """The chosen option letter: a leading/standalone letter A-D, else the one option whose text is answered."""
    text = str(response).strip()
    m = re.match(r"^\(?([A-D])(?:[\).:,\s]|$)", text)
    if m and m.group(1) in LETTERS[: len(options)]:
        return m.group(1)
    hits = [LETTERS[i] for i, o in enumerate(options) if re.search(rf"\b{re.escape(str(o).lower())}\b", text.lower())]
    return hits[0] if len(hits) == 1 else None


def toy_mc_process_results(doc, results):
    """Multiple choice (MMBench / SQA style): accuracy of the parsed letter; unparsable answers count wrong."""
    letter = parse_letter(results[0] if results else "", doc["options"])
    return {"accuracy": float(letter == doc["answer"]), "unparsed": float(letter is None)}


__all__ = ["ToyTask", "parse_letter", "toy_doc_to_text", "toy_doc_to_visual", "toy_exact_process_results",
           "toy_ground_process_results", "toy_mc_doc_to_text", "toy_mc_process_results"]
