"""Questions about toy scenes, one generator per benchmark kind, mirroring the paper's benchmark types.

============  =========================================  ======================  =====================
kind          question                                   answer                  scored like
============  =========================================  ======================  =====================
exist         Is there a red circle in the image?        yes / no                POPE (F1; random,
                                                                                 popular, adversarial
                                                                                 negatives)
attribute     What color is the circle? /                red / circle            VQA exact match
              What shape is the red object?
count         How many squares are there?                0 ... 4                 VQA exact match
mc            Which shape is blue? A. ... D. ...         A / B / C / D           MMBench / SQA letter
text          What number is written in the image?       0 ... 9                 TextVQA exact match
ground        (RefCOCO prompt) the red circle            [x0, y0, x1, y1]        RefCOCO Acc@0.5
============  =========================================  ======================  =====================

Prompts are exactly what the lmms-eval tasks of ``tasks/lmms_tasks/toy`` build from a document
(``pmod_bench.tasks.toy_utils``), so a model trained on :func:`conversation` turns sees at
evaluation the text it was trained on.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Iterable

from .world import COLOURS, SHAPES, Scene, sample_scene

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."
#: lmms-eval 0.7.3 refcoco_bbox_rec_doc_to_text's instruction (the expression follows it)
REFCOCO_PROMPT = (
    "Bounding box coordinates are specified in the format (top-left x, top-left y, bottom-right x, bottom-right y). "
    "All values are floating point numbers bounded between 0 and 1. Please provide the bounding box coordinate of the "
    "region this sentence describes: "
)
LETTERS = "ABCD"
KINDS = ("exist", "attribute", "count", "mc", "text", "ground")
NEGATIVES = ("random", "popular", "adversarial")
ALL_OBJECTS = [f"{c} {s}" for s in SHAPES for c in COLOURS]
#: the SFT mix: question kinds and their weights per turn. The loss is a mean over answer tokens and a grounding
#: answer is 17 tokens (+ a 57-token prompt) against 1 for every other kind, so at equal weight grounding would
#: take ~45% of the gradient; at 0.5 it takes ~25%, and existence (colour-shape binding) gets the most turns
TRAIN_KINDS = ("exist", "attribute", "count", "mc", "text", "ground")
TRAIN_WEIGHTS = (5, 3, 2, 2, 2, 0.5)


def plural(shape: str) -> str:
    return shape + "s"


def box_text(box: tuple, size: tuple) -> str:
    """A box as RefCOCO answers it: normalised ``[x0, y0, x1, y1]`` with two decimals."""
    w, h = size
    x0, y0, x1, y1 = box
    return "[" + ", ".join(f"{v:.2f}" for v in (x0 / w, y0 / h, x1 / w, y1 / h)) + "]"


# ----------------------------------------------------------------------------- scenes per kind
def scene_for(kind: str, rng: random.Random) -> Scene:
    """A scene suited to one kind (counting scenes repeat a shape, text scenes carry a digit)."""
    if kind == "count":
        shape = rng.choice(SHAPES)
        return sample_scene(rng, (1, 4), repeat_shape=shape, repeats=rng.choice((0, 1, 1, 2, 2, 3, 3, 4)))
    if kind == "text":
        return sample_scene(rng, (1, 2), digit=True)
    return sample_scene(rng, (1, 4))


# ---------------------------------------------------------------------------- question makers
def exist_question(scene: Scene, rng: random.Random, answer: str, negative: str, popularity: list) -> dict | None:
    present = sorted(scene.objects())
    if answer == "yes":
        obj = rng.choice(present)
    else:
        absent = [o for o in ALL_OBJECTS if o not in present]
        if negative == "random":
            obj = rng.choice(absent)
        elif negative == "popular":  # POPE: the most frequent objects of the dataset that are not in the image
            ranked = [o for o in popularity if o in absent]
            obj = rng.choice(ranked[:3])
        else:  # adversarial: shares the colour or the shape of an object in the image (binding, like co-occurrence)
            close = [o for o in absent if any(o.split()[0] == p.split()[0] or o.split()[1] == p.split()[1] for p in present)]
            obj = rng.choice(close or absent)
    return {"question": f"Is there a {obj} in the image?", "answer": answer, "object": obj}


def attribute_question(scene: Scene, rng: random.Random) -> dict | None:
    shapes = Counter(s.shape for s in scene.shapes)
    colours = Counter(s.colour for s in scene.shapes)
    options = [("colour", s) for s in scene.shapes if shapes[s.shape] == 1] + \
              [("shape", s) for s in scene.shapes if colours[s.colour] == 1]
    if not options:
        return None
    what, s = rng.choice(options)
    if what == "colour":
        return {"question": f"What color is the {s.shape}?", "answer": s.colour}
    return {"question": f"What shape is the {s.colour} object?", "answer": s.shape}


def count_question(scene: Scene, rng: random.Random) -> dict | None:
    counts = Counter(s.shape for s in scene.shapes)
    shape = max(counts, key=lambda k: (counts[k], k)) if counts and rng.random() < 0.8 else rng.choice(SHAPES)
    return {"question": f"How many {plural(shape)} are there?", "answer": str(counts.get(shape, 0))}


def mc_question(scene: Scene, rng: random.Random) -> dict | None:
    colours = Counter(s.colour for s in scene.shapes)
    shapes = Counter(s.shape for s in scene.shapes)
    if rng.random() < 0.5:
        cands = [s for s in scene.shapes if colours[s.colour] == 1]
        if cands:
            s = rng.choice(cands)
            options = list(SHAPES)
            rng.shuffle(options)
            return {"question": f"Which shape is {s.colour}?", "options": options, "answer": LETTERS[options.index(s.shape)]}
    cands = [s for s in scene.shapes if shapes[s.shape] == 1]
    if not cands:
        return None
    s = rng.choice(cands)
    options = [s.colour] + rng.sample([c for c in COLOURS if c != s.colour], 3)
    rng.shuffle(options)
    return {"question": f"What color is the {s.shape}?", "options": options, "answer": LETTERS[options.index(s.colour)]}


def text_question(scene: Scene, rng: random.Random) -> dict | None:
    if scene.digit is None:
        return None
    return {"question": "What number is written in the image?", "answer": scene.digit}


def ground_question(scene: Scene, rng: random.Random) -> dict | None:
    names = Counter(s.name for s in scene.shapes)
    cands = [s for s in scene.shapes if names[s.name] == 1]
    if not cands:
        return None
    s = rng.choice(cands)
    x0, y0, x1, y1 = s.box
    return {"expression": f"the {s.name}", "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
            "box": list(s.box), "answer_text": box_text(s.box, scene.size)}


MAKERS = {"attribute": attribute_question, "count": count_question, "mc": mc_question, "text": text_question,
          "ground": ground_question}


def mc_prompt(question: str, options: Iterable[str]) -> str:
    return question + "".join(f"\n{LETTERS[i]}. {o}" for i, o in enumerate(options))


def prompt_and_answer(kind: str, q: dict) -> tuple[str, str]:
    """The user text (what the lmms-eval task's doc_to_text builds) and the expected answer."""
    if kind == "exist":
        return q["question"] + SHORT, q["answer"]
    if kind in ("attribute", "count", "text"):
        return q["question"] + SHORT, q["answer"]
    if kind == "mc":
        return mc_prompt(q["question"], q["options"]) + LETTER, q["answer"]
    if kind == "ground":
        return REFCOCO_PROMPT + q["expression"], q["answer_text"]
    raise ValueError(f"unknown question kind {kind!r}; known: {', '.join(KINDS)}")


def popularity(scenes: Iterable[Scene]) -> list:
    """Objects ranked by how many scenes hold them (ties by name): POPE's 'popular' ranking."""
    c: Counter = Counter()
    for s in scenes:
        c.update(s.objects())
    return sorted(ALL_OBJECTS, key=lambda o: (-c[o], o))


def conversation(scene: Scene, rng: random.Random, turns: int, pop: list) -> list:
    """Training turns for one scene (LLaVA format): ``turns`` questions of random kinds, the image in the first."""
    conv: list = []
    tried = 0
    while len(conv) < 2 * turns and tried < 4 * turns:  # repeats are redrawn: a scene has few distinct questions of some kinds
        tried += 1
        kind = rng.choices(TRAIN_KINDS, weights=TRAIN_WEIGHTS)[0]
        if kind == "exist":
            q = exist_question(scene, rng, rng.choice(("yes", "no")), rng.choice(NEGATIVES), pop)
        else:
            q = MAKERS[kind](scene, rng)
        if q is None:
            continue
        text, answer = prompt_and_answer(kind, q)
        if any(text.removesuffix(SHORT) in t["value"] for t in conv[::2]):  # a repeat would be answered by copying
            continue
        if conv and text.endswith(SHORT):  # the instruction once per conversation (LLaVA's data does the same):
            text = text[: -len(SHORT)]      # 11 of a turn's ~26 tokens; evaluation asks single first turns
        conv += [{"from": "human", "value": ("<image>\n" if not conv else "") + text}, {"from": "gpt", "value": answer}]
    return conv


__all__ = ["ALL_OBJECTS", "KINDS", "LETTER", "NEGATIVES", "REFCOCO_PROMPT", "SHORT", "box_text", "conversation",
           "exist_question", "mc_prompt", "popularity", "prompt_and_answer", "scene_for"]
