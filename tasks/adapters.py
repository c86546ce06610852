"""Adapter-side functions of the ``pmod_*`` tasks, where lmms-eval's own cannot be used as they are.

Everything else in the adapter YAMLs is lmms-eval 0.7.3's own functions
(``!function lmms_eval.tasks.<task>.utils.<fn>``). Here:

* ``gqa_process_docs``: GQA joins a second dataset config (images); lmms-eval's version always
  fetches it from the hub, this one goes through :func:`pmod_bench.tasks.data.load_split`
  (local snapshot under ``PMOD_BENCH_DATA``, else the hub) and decodes only the images it needs.
* ``seed_image_docs``: SEED-Bench image questions only (the paper's "SEED-Bench (image)").
* ``mme_docs``: MME's question pairs reordered round-robin over the categories, perception first, so
  that ``--limit N`` (the first N documents) samples every category it can instead of the real
  split's first rows (40 cognition rows, ``code_reasoning``): any limit yields a perception score.
  The score of the full split is unchanged (it is a sum over categories of per-pair terms).
* ``mmbench_process_results`` / ``mmmu_process_results``: lmms-eval's, plus an ``unparsed`` 0/1
  per sample: the answer matched no parsing rule (MMBench then counts it wrong, MMMU draws a random
  option). The runner reports the count.
"""

from __future__ import annotations

import math
from typing import Any


def gqa_process_docs(dataset):
    """Attach each question's image (``testdev_balanced_images`` config, joined on ``imageId``)."""
    from .data import load_split

    needed = set(dataset["imageId"])
    images = load_split("lmms-lab-encoder/GQA", "testdev_balanced_images", "testdev", task="pmod_gqa")
    ids = images["id"]
    keep = [i for i, x in enumerate(ids) if x in needed]
    id2image = {ids[i]: images[i]["image"].convert("RGB") for i in keep}
    missing = sorted(needed - set(id2image))
    if missing:
        from .data import DataError

        raise DataError(f"GQA: {len(missing)} imageId(s) of testdev_balanced_instructions have no row in "
                        f"testdev_balanced_images (first: {missing[0]}); the two configs must come from the same snapshot.")
    return dataset.map(lambda doc: {"image": id2image[doc["imageId"]]})


def seed_image_docs(dataset):
    """Keep SEED-Bench's image questions (``data_type == "image"``)."""
    return dataset.filter(lambda t: t == "image", input_columns="data_type")


#: MME's categories in lmms-eval's order (``lmms_eval.tasks.mme.utils.eval_type_dict``): perception, then cognition
def _mme_category_order() -> list[str]:
    from lmms_eval.tasks.mme.utils import eval_type_dict

    return [*eval_type_dict["Perception"], *eval_type_dict["Cognition"]]


def mme_docs(dataset):
    """Question pairs (rows sharing ``question_id``, kept together) dealt round-robin over the categories.

    Round r holds the r-th pair of every category, categories in lmms-eval's order (perception
    first). Unknown categories follow, in first-seen order.
    """
    order = _mme_category_order()
    pairs: dict[str, dict[str, list[int]]] = {}
    for i, (cat, qid) in enumerate(zip(dataset["category"], dataset["question_id"])):
        pairs.setdefault(cat, {}).setdefault(qid, []).append(i)
    cats = [c for c in order if c in pairs] + [c for c in pairs if c not in order]
    queues = [list(pairs[c].values()) for c in cats]
    indices: list[int] = []
    for r in range(max((len(q) for q in queues), default=0)):
        for q in queues:
            if r < len(q):
                indices.extend(q[r])
    return dataset.select(indices)


def _is_missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x)) or (isinstance(x, str) and x.strip().lower() in ("", "nan"))


def mmbench_process_results(doc, results):
    """lmms-eval's MMBench (en) per-sample result + ``unparsed``; the submission entry is dropped."""
    from lmms_eval.tasks._task_utils.mcq_extract import extract_mcq_answer
    from lmms_eval.tasks.mmbench.en_utils import mmbench_evaluator
    from lmms_eval.tasks.mmbench.en_utils import mmbench_process_results as base

    out = base(doc, results)
    out.pop("submission", None)
    pred = results[0].strip()
    choices = {c: doc[c] for c in "ABCD" if c in doc and not _is_missing(doc[c])}
    # the same two steps as MMBench_Evaluator.eval_sub_data(static_only=True)
    parsed = mmbench_evaluator.can_infer(pred, dict(choices)) or extract_mcq_answer(pred, choices=sorted(choices))
    out["unparsed"] = 0.0 if parsed else 1.0
    return out


def _mmmu_has_candidate(response: str, all_choices: list, index2ans: dict) -> bool:
    """Whether lmms-eval's ``parse_mmmu_multi_choice_response`` finds a candidate (else it draws at random).

    Mirrors its four candidate rules (``lmms_eval/tasks/_task_utils/mmmu_mcq_utils.py``) without
    consuming the random state.
    """
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = " " + response + " "
    if any(f"({c})" in response for c in all_choices) or any(f"{c} " in response for c in all_choices):
        return True
    if any(f"{c}." in response for c in all_choices):
        return True
    if len(response.split()) > 5 and any(str(a).lower() in response.lower() for a in index2ans.values()):
        return True
    return False


def mmmu_process_results(doc, results):
    """lmms-eval's MMMU per-sample result (``mmmu_acc``) + ``unparsed`` for multiple-choice answers."""
    import ast

    from lmms_eval.tasks.mmmu.utils import get_multi_choice_info
    from lmms_eval.tasks.mmmu.utils import mmmu_process_results as base

    out = base(doc, results)
    unparsed = 0.0
    if doc["question_type"] == "multiple-choice":
        index2ans, all_choices = get_multi_choice_info(ast.literal_eval(doc["options"]))
        unparsed = 0.0 if _mmmu_has_candidate(results[0], all_choices, index2ans) else 1.0
    return {"mmmu_acc": out["mmmu_acc"], "unparsed": unparsed}
