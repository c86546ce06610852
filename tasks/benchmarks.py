"""The paper's benchmarks: which lmms-eval task fills each table cell, from which data, in which units.

Pure Python (no lmms-eval, datasets or torch import): the runner, ``pmod-bench data check``, the
fixture generator and the reports meet here.

Conventions (what a table cell means; see docs/RUN_DIRS.md and the README's evaluation section):

* Every benchmark is run by an *adapter task* (``pmod_*``, YAML in ``tasks/lmms_tasks/``) that
  ``include:``s the installed lmms-eval task and changes only the keys it pins (its name, its task
  class, its metric or generation settings where the paper's differ). Its prompts are those ``--model
  llava`` (the paper's ``conv_template=vicuna_v1`` runs, ``scripts/lmms-eval/eval.sh`` of the official
  repository) gets in lmms-eval 0.7.3, whatever the ``--model`` name; ``tests/test_tasks_builtins.py``
  fails when an lmms-eval release changes what an adapter inherits.
* ``value`` is in the paper's units: percent (0-100) for accuracies / ANLS / F1, the raw MME
  perception score (0-2000; tables average it as score / 20).
* POPE: F1 (x100) averaged over the three splits adversarial / popular / random (the paper ran
  ``pope_full``; LLaVA-1.5's published 85.9 is that average F1). Pooled F1 and accuracies are kept
  in the lmms-eval results.
* MME: the perception score (sum over the 10 perception categories of acc + acc+).
* MMBench: en dev with CircularEval, answers matched offline (``static``: option letter / option
  text / regex extraction) instead of the GPT-3.5 judge; answers no rule can parse count as wrong and
  are reported as ``n_unparsed``.
* MMMU: val accuracy; an unparsable multiple-choice answer gets lmms-eval's random choice (seeded)
  and is counted in ``n_unparsed``.
* RefCOCO / RefCOCO+ / RefCOCOg: accuracy at IoU >= 0.5 (``refcoco_ACC@0.5``) of the box on the val split, one
  sample per referring expression, in the image's own coordinates: LLaVA answers a normalised ``[x1, y1, x2, y2]``
  (read as lmms-eval reads it), Qwen2.5-VL pixels of its resized input, often as JSON (mapped back to the image,
  ``tasks/grounding.py``); answers with no box are reported as ``n_unparsed``.
* SEED-Bench: image questions only (``seed_image``; video questions are dropped before running).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class DataRef:
    """One hub dataset (config) a benchmark reads, and what must be in it."""

    hub_id: str
    """Hub repository as the lmms-eval YAML names it (``lmms-lab-encoder/POPE``)."""
    config: Optional[str]
    """Dataset config (``dataset_name``); None for the default config."""
    splits: tuple[str, ...]
    """Splits the task reads."""
    columns: tuple[str, ...]
    """Columns the adapter reads (prompt, visuals, answer parsing, metric)."""
    image_columns: tuple[str, ...] = ("image",)
    """Columns holding images (HF ``Image`` or a list of them)."""
    videos: Optional[str] = None
    """A video benchmark: the layout of its video files (``pmod_bench.tasks.video.LAYOUTS``: where a row's video is
    in the snapshot or its zip archives)."""


@dataclass(frozen=True)
class Benchmark:
    """A paper table column and how it is computed."""

    key: str
    """The paper's column name (``POPE``, ``MME``, ...); the ``benchmark`` of a summary row."""
    title: str
    """Human name with the convention (``POPE (F1, mean of 3 splits)``)."""
    run: tuple[str, ...]
    """What is handed to lmms-eval (task or group names)."""
    result: str
    """The results entry the value is read from (a task or a group with an aggregate)."""
    metric: str
    """lmms-eval results key (``pope_f1_score,none``)."""
    scale: float
    """value = lmms-eval number * scale (100 for 0-1 fractions, 1 when already in paper units)."""
    data: tuple[DataRef, ...]
    builtin: str
    """The built-in lmms-eval task(s) this adapts (for reference)."""
    unit: str = "%"
    components: tuple[str, ...] = ()
    """Sub-tasks whose metric is averaged into the value (POPE), reported alongside."""
    limit_multiple: int = 1
    """``--limit`` is rounded up to a multiple of this (MME scores question pairs)."""
    unparsed_metric: Optional[str] = None
    """Results key of the fraction of answers no rule could parse (MMBench, MMMU)."""
    note: str = ""

    @property
    def tasks(self) -> tuple[str, ...]:
        """Leaf adapter tasks (those holding samples)."""
        return self.components or self.run


ENC = "lmms-lab-encoder"

_VQA_COLS = ("question", "answers")
BENCHMARKS: dict[str, Benchmark] = {}


def _add(b: Benchmark) -> None:
    BENCHMARKS[b.key] = b


_add(Benchmark(
    key="VQAv2", title="VQAv2 val (VQA accuracy)", run=("pmod_vqav2_val",), result="pmod_vqav2_val",
    metric="exact_match,none", scale=100.0, builtin="vqav2_val",
    data=(DataRef(f"{ENC}/VQAv2", None, ("validation",), ("question_id", "question", "answers")),),
    note="lmms-eval's validation-split VQA accuracy (LLaVA-1.5-7B: 76.6); test-dev needs the EvalAI server.",
))
_add(Benchmark(
    key="GQA", title="GQA test-dev balanced (accuracy)", run=("pmod_gqa",), result="pmod_gqa",
    metric="exact_match,none", scale=100.0, builtin="gqa",
    data=(
        DataRef(f"{ENC}/GQA", "testdev_balanced_instructions", ("testdev",), ("id", "imageId", "question", "answer"), image_columns=()),
        DataRef(f"{ENC}/GQA", "testdev_balanced_images", ("testdev",), ("id", "image")),
    ),
))
_add(Benchmark(
    key="OKVQA", title="OK-VQA val2014 (VQA accuracy)", run=("pmod_ok_vqa_val2014",), result="pmod_ok_vqa_val2014",
    metric="exact_match,none", scale=100.0, builtin="ok_vqa_val2014",
    data=(DataRef(f"{ENC}/OK-VQA", None, ("val2014",), ("question_id", "question", "answers")),),
))
_add(Benchmark(
    key="AI2D", title="AI2D test (accuracy)", run=("pmod_ai2d",), result="pmod_ai2d",
    metric="exact_match,flexible-extract", scale=100.0, builtin="ai2d",
    data=(DataRef(f"{ENC}/ai2d", None, ("test",), ("question", "options", "answer")),),
))
_add(Benchmark(
    key="SQA", title="ScienceQA-IMG test (accuracy)", run=("pmod_scienceqa_img",), result="pmod_scienceqa_img",
    metric="exact_match,none", scale=100.0, builtin="scienceqa_img",
    data=(DataRef(f"{ENC}/ScienceQA", "ScienceQA-IMG", ("test",), ("question", "choices", "answer", "hint")),),
))
_add(Benchmark(
    key="Doc", title="DocVQA val (ANLS)", run=("pmod_docvqa_val",), result="pmod_docvqa_val",
    metric="anls,none", scale=100.0, builtin="docvqa_val",
    data=(DataRef(f"{ENC}/DocVQA", "DocVQA", ("validation",), ("questionId", "question", "answers")),),
))
_add(Benchmark(
    key="Text", title="TextVQA val (VQA accuracy)", run=("pmod_textvqa_val",), result="pmod_textvqa_val",
    metric="exact_match,none", scale=100.0, builtin="textvqa_val",
    data=(DataRef(f"{ENC}/textvqa", None, ("validation",), ("question_id", "question", "answers")),),
))
_add(Benchmark(
    key="Chart", title="ChartQA test (relaxed accuracy, human + augmented)", run=("pmod_chartqa",), result="pmod_chartqa",
    metric="relaxed_overall,none", scale=100.0, builtin="chartqa",
    data=(DataRef(f"{ENC}/ChartQA", None, ("test",), ("type", "question", "answer")),),
))
_add(Benchmark(
    key="Info", title="InfographicVQA val (ANLS)", run=("pmod_infovqa_val",), result="pmod_infovqa_val",
    metric="anls,none", scale=100.0, builtin="infovqa_val",
    data=(DataRef(f"{ENC}/DocVQA", "InfographicVQA", ("validation",), ("questionId", "question", "answers")),),
))
_add(Benchmark(
    key="POPE", title="POPE (F1, mean of adversarial / popular / random)", run=("pmod_pope_full",), result="pmod_pope_full",
    metric="pope_f1_score,none", scale=100.0, builtin="pope_full",
    components=("pmod_pope_adv", "pmod_pope_pop", "pmod_pope_random"),
    data=(DataRef(f"{ENC}/POPE", "Full", ("adversarial", "popular", "random"), ("question_id", "question", "answer")),),
    note="The paper ran pope_full (three splits); LLaVA-1.5 reports their mean F1.",
))
_add(Benchmark(
    key="SEED", title="SEED-Bench image (accuracy)", run=("pmod_seedbench_img",), result="pmod_seedbench_img",
    metric="seed_image,none", scale=100.0, builtin="seedbench",
    data=(DataRef(f"{ENC}/SEED-Bench", None, ("test",),
                  ("question_id", "question", "choice_a", "choice_b", "choice_c", "choice_d", "answer", "data_type")),),
    note="Video questions are dropped before running; seed_image is unchanged by that.",
))
_add(Benchmark(
    key="RWQA", title="RealWorldQA test (accuracy)", run=("pmod_realworldqa",), result="pmod_realworldqa",
    metric="exact_match,none", scale=100.0, builtin="realworldqa",
    data=(DataRef(f"{ENC}/RealWorldQA", None, ("test",), ("question", "answer")),),
))
_add(Benchmark(
    key="MME", title="MME perception score (0-2000)", run=("pmod_mme",), result="pmod_mme",
    metric="mme_perception_score,none", scale=1.0, unit="score", builtin="mme", limit_multiple=2,
    data=(DataRef(f"{ENC}/MME", None, ("test",), ("question_id", "question", "answer", "category")),),
    note="Averages use score / 20. --limit N takes N/2 question pairs dealt round-robin over the categories, "
         "perception first (adapter mme_docs): the real split starts with 40 cognition rows.",
))
_add(Benchmark(
    key="MMB", title="MMBench en dev (CircularEval accuracy, offline answer matching)", run=("pmod_mmbench_en_dev",),
    result="pmod_mmbench_en_dev", metric="gpt_eval_score,none", scale=1.0, builtin="mmbench_en_dev",
    unparsed_metric="unparsed,none",
    data=(DataRef(f"{ENC}/MMBench", "en", ("dev",),
                  ("index", "question", "hint", "answer", "A", "B", "C", "D", "category", "L2-category", "source", "split")),),
    note="Answers are matched like lmms-eval's mmbench_en_dev_static (no GPT judge); unparsable ones count as wrong.",
))
_add(Benchmark(
    key="MMMU", title="MMMU val (accuracy)", run=("pmod_mmmu_val",), result="pmod_mmmu_val",
    metric="mmmu_acc,none", scale=100.0, builtin="mmmu_val", unparsed_metric="unparsed,none",
    data=(DataRef(f"{ENC}/MMMU", None, ("validation",), ("id", "question", "options", "answer", "question_type"),
                  image_columns=("image_1",)),),
))
_add(Benchmark(
    key="RefCOCO", title="RefCOCO val (Acc@0.5)", run=("pmod_refcoco_val",), result="pmod_refcoco_val",
    metric="refcoco_ACC@0.5,none", scale=100.0, unparsed_metric="unparsed,none", builtin="refcoco_bbox_rec_val",
    data=(DataRef(f"{ENC}/RefCOCO", None, ("val",), ("question_id", "answer", "bbox")),),
))
_add(Benchmark(
    key="RefCOCO+", title="RefCOCO+ val (Acc@0.5)", run=("pmod_refcocoplus_val",), result="pmod_refcocoplus_val",
    metric="refcoco_ACC@0.5,none", scale=100.0, unparsed_metric="unparsed,none", builtin="refcoco+_bbox_rec_val",
    data=(DataRef(f"{ENC}/RefCOCOplus", None, ("val",), ("question_id", "answer", "bbox")),),
))
_add(Benchmark(
    key="RefCOCOg", title="RefCOCOg val (Acc@0.5)", run=("pmod_refcocog_val",), result="pmod_refcocog_val",
    metric="refcoco_ACC@0.5,none", scale=100.0, unparsed_metric="unparsed,none", builtin="refcocog_bbox_rec_val",
    data=(DataRef(f"{ENC}/RefCOCOg", None, ("val",), ("question_id", "answer", "bbox")),),
))

#: named suites: one per paper table (columns in the table's order)
SUITES: dict[str, tuple[str, ...]] = {
    "table1": ("Doc", "Chart", "Text", "Info", "RWQA", "GQA", "OKVQA", "POPE", "AI2D", "SEED"),
    "table2": ("SQA", "MMB", "MMMU", "VQAv2", "MME"),
    "ablation": ("Doc", "Chart", "Text", "GQA", "SEED", "MMB"),  # Tables 3, 4, 6, 7
    "table5": ("Doc", "Chart", "Text", "Info", "RWQA", "GQA", "SQA", "MMMU", "POPE", "AI2D", "VQAv2", "SEED"),
    "table8": ("Doc", "Chart", "SEED", "GQA"),  # Table 8 (LLaVA-NeXT-13B; its fifth column is unidentified)
    "table9": ("RefCOCO", "RefCOCO+", "RefCOCOg"),  # Table 9 (= grounding)
    "table10": ("Doc", "Chart", "SEED", "GQA"),  # Table 10 (its fifth column is unidentified)
    "grounding": ("RefCOCO", "RefCOCO+", "RefCOCOg"),  # Table 9
    "paper15": ("Doc", "Info", "Chart", "Text", "RWQA", "SEED", "POPE", "MMMU", "AI2D", "VQAv2", "OKVQA", "MME",
                "GQA", "SQA", "MMB"),  # Table 11
}
SUITES["all"] = SUITES["paper15"] + SUITES["grounding"]

# ------------------------------------------------------------------------------------ the toy world
# Generated benchmarks (pmod_bench.toy, tasks/lmms_tasks/toy/): the analogs of POPE, VQA (attribute and
# counting), MMBench/SQA, TextVQA and RefCOCO on scenes of coloured shapes; kept apart from the paper's
# BENCHMARKS (the `all` suite and paper tables never include them), selected with `--suite toy`.
TOY_HUB = "pmod-bench/toy-world"
TOY_BENCHMARKS: dict[str, Benchmark] = {}


def _add_toy(b: Benchmark) -> None:
    TOY_BENCHMARKS[b.key] = b


_add_toy(Benchmark(
    key="Toy-Exist", title="Toy existence (POPE-like F1, mean of random / popular / adversarial)", run=("pmod_toy_exist",),
    result="pmod_toy_exist", metric="pope_f1_score,none", scale=100.0, builtin="pope_full (functions)",
    components=("pmod_toy_exist_adversarial", "pmod_toy_exist_popular", "pmod_toy_exist_random"),
    data=(DataRef(TOY_HUB, "exist", ("random", "popular", "adversarial"), ("question_id", "question", "answer")),),
))
_add_toy(Benchmark(
    key="Toy-Attr", title="Toy attribute (colour / shape, exact match)", run=("pmod_toy_attribute",),
    result="pmod_toy_attribute", metric="exact_match,none", scale=100.0, builtin="-",
    data=(DataRef(TOY_HUB, "attribute", ("test",), ("question_id", "question", "answer")),),
))
_add_toy(Benchmark(
    key="Toy-Count", title="Toy counting (exact match)", run=("pmod_toy_count",), result="pmod_toy_count",
    metric="exact_match,none", scale=100.0, builtin="-",
    data=(DataRef(TOY_HUB, "count", ("test",), ("question_id", "question", "answer")),),
))
_add_toy(Benchmark(
    key="Toy-MC", title="Toy multiple choice (4 options, letter accuracy)", run=("pmod_toy_mc",), result="pmod_toy_mc",
    metric="accuracy,none", scale=100.0, builtin="-", unparsed_metric="unparsed,none",
    data=(DataRef(TOY_HUB, "mc", ("test",), ("question_id", "question", "options", "answer")),),
))
_add_toy(Benchmark(
    key="Toy-Text", title="Toy text reading (rendered digit, exact match)", run=("pmod_toy_text",), result="pmod_toy_text",
    metric="exact_match,none", scale=100.0, builtin="-",
    data=(DataRef(TOY_HUB, "text", ("test",), ("question_id", "question", "answer")),),
))
_add_toy(Benchmark(
    key="Toy-Ground", title="Toy grounding (RefCOCO-like Acc@0.5)", run=("pmod_toy_ground",), result="pmod_toy_ground",
    metric="refcoco_ACC@0.5,none", scale=100.0, builtin="refcoco_bbox_rec_val (functions)",
    data=(DataRef(TOY_HUB, "ground", ("test",), ("question_id", "answer", "bbox")),),
))
SUITES["toy"] = tuple(TOY_BENCHMARKS)

# ------------------------------------------------------------------------------------------- video
# lmms-eval 0.7.3's video tasks (tasks/lmms_tasks/pmod_videomme.yaml, pmod_mvbench*.yaml, pmod_egoschema_subset.yaml):
# not in the paper, kept apart from its suites, selected with `--suite video`. Their rows read the videos through
# pmod_bench.tasks.video (a local snapshot's zip archives unpacked once; pmod-bench data check --decode opens them).
VIDEO_BENCHMARKS: dict[str, Benchmark] = {}
#: MVBench's 20 sub-tasks in the order of lmms-eval's ``mvbench`` group (its hub configs, split ``train``)
MVBENCH_TASKS = (
    "action_sequence", "moving_count", "action_prediction", "episodic_reasoning", "action_antonym", "action_count",
    "scene_transition", "object_shuffle", "object_existence", "fine_grained_pose", "unexpected_action", "moving_direction",
    "state_change", "object_interaction", "character_order", "action_localization", "counterfactual_inference",
    "fine_grained_action", "moving_attribute", "egocentric_navigation",
)
VIDEO_BENCHMARKS["VideoMME"] = Benchmark(
    key="VideoMME", title="Video-MME, no subtitles (multiple-choice accuracy, short / medium / long)", run=("pmod_videomme",),
    result="pmod_videomme", metric="videomme_perception_score,none", scale=1.0, builtin="videomme",
    data=(DataRef("lmms-eval/Video-MME", None, ("test",), ("videoID", "question_id", "duration", "domain", "sub_category",
                                                          "task_type", "question", "options", "answer"),
                  image_columns=(), videos="videomme"),),
    note="900 videos of 11 s to 1 h, 2,700 questions; the snapshot's only config (videomme) is read.",
)
VIDEO_BENCHMARKS["MVBench"] = Benchmark(
    key="MVBench", title="MVBench (multiple-choice accuracy, mean of 20 temporal tasks)", run=("pmod_mvbench",),
    result="pmod_mvbench", metric="mvbench_accuracy,none", scale=1.0, builtin="mvbench",
    components=tuple(f"pmod_mvbench_{t}" for t in MVBENCH_TASKS),
    data=tuple(DataRef("OpenGVLab/MVBench", t, ("train",), ("video", "question", "candidates", "answer"), image_columns=(),
                       videos="mvbench") for t in MVBENCH_TASKS),
    note="Hub revision `video` (hf download OpenGVLab/MVBench --repo-type dataset --revision video); 200 questions a task.",
)
VIDEO_BENCHMARKS["EgoSchema"] = Benchmark(
    key="EgoSchema", title="EgoSchema subset (5-way multiple-choice accuracy, 3-minute egocentric clips)",
    run=("pmod_egoschema_subset",), result="pmod_egoschema_subset", metric="score,none", scale=100.0,
    builtin="egoschema_subset",
    data=(DataRef("lmms-eval/egoschema", "Subset", ("test",), ("question_idx", "question", "video_idx", "option", "answer"),
                  image_columns=(), videos="egoschema"),),
    note="The 500 questions with public answers (the full set scores only on the EgoSchema server).",
)
SUITES["video"] = tuple(VIDEO_BENCHMARKS)
#: every benchmark a suite can name: the paper's, the toy world's and the video ones
KNOWN_BENCHMARKS: dict[str, Benchmark] = {**BENCHMARKS, **TOY_BENCHMARKS, **VIDEO_BENCHMARKS}

_BY_TASK = {t: b for b in KNOWN_BENCHMARKS.values() for t in (*b.run, *b.components)}


def benchmark_for_task(task: str) -> Optional[Benchmark]:
    """The benchmark an adapter task (or group) belongs to, or None."""
    return _BY_TASK.get(task)


def resolve_suite(spec: str) -> list[Benchmark]:
    """Benchmarks for ``table1``, ``all``, ... or a comma list of benchmark keys / adapter task names.

    Raises ValueError naming the known suites and benchmarks when a name is unknown.
    """
    names: list[str] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if part in SUITES:
            names.extend(SUITES[part])
        elif part in KNOWN_BENCHMARKS:
            names.append(part)
        elif part in _BY_TASK:
            names.append(_BY_TASK[part].key)
        else:
            lower = {k.lower(): k for k in (*SUITES, *KNOWN_BENCHMARKS)}
            if part.lower() in lower:
                key = lower[part.lower()]
                names.extend(SUITES.get(key, (key,)))
                continue
            close = difflib.get_close_matches(part, [*SUITES, *KNOWN_BENCHMARKS, *_BY_TASK], n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(
                f"unknown suite or benchmark '{part}'.{hint} Suites: {', '.join(SUITES)}; "
                f"benchmarks: {', '.join(BENCHMARKS)}."
            )
    if not names:
        raise ValueError(f"empty suite '{spec}'. Suites: {', '.join(SUITES)}; benchmarks: {', '.join(BENCHMARKS)}.")
    seen: dict[str, Benchmark] = {}
    for n in names:
        seen.setdefault(n, KNOWN_BENCHMARKS[n])
    return list(seen.values())


def describe() -> str:
    """A plain-text listing of suites and benchmarks (for ``pmod-bench eval --list``)."""
    lines = ["Suites:"]
    for name, keys in SUITES.items():
        lines.append(f"  {name:<10} {', '.join(keys)}")
    lines.append("")
    lines.append("Benchmarks (paper column: adapter task -> metric):")
    for b in KNOWN_BENCHMARKS.values():
        lines.append(f"  {b.key:<9} {b.title}")
        lines.append(f"  {'':<9}   tasks {', '.join(b.run)} -> {b.metric} x{b.scale:g}; data "
                     + "; ".join(f"{d.hub_id}[{d.config or 'default'}]:{'/'.join(d.splits)}" for d in b.data))
    return "\n".join(lines)
