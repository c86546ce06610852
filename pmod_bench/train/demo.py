"""A tiny generated LLaVA-format dataset (JSON + PNG images) for tests, demos and smoke runs.

``make_demo_dataset(DIR)`` writes ``DIR/data.json`` and ``DIR/images/*.png``: image records whose
answer is the colour of the drawn shape (learnable by the tiny preset in a few dozen steps), a few
text-only records (LLaVA's mix has them) and a two-turn conversation. The content is a function of
the arguments and every file is written atomically, so several processes may write the same dataset
at once (``accelerate launch ... train --demo``): a reader sees either no file or a whole one.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from pmod_bench.atomic import atomic_write_bytes, atomic_write_text

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 40)}
SIZES = [(64, 48), (48, 64), (64, 64), (96, 32)]  # landscape, portrait, square, wide: several anyres grids


def _image(colour: tuple, size: tuple, seed: int):
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", (w, h), (200 - (seed * 7) % 60, 200, 200 - (seed * 13) % 60))
    d = ImageDraw.Draw(img)
    x0 = (seed * 5) % max(w // 3, 1)
    d.rectangle([x0, h // 4, x0 + w // 2, h // 4 + h // 2], fill=colour)
    return img


def make_demo_dataset(
    root: str | os.PathLike,
    n_image: int = 12,
    n_text: int = 4,
    bad: dict | None = None,
    n_multi: int = 0,
    seed: int = 0,
) -> Path:
    """Write a tiny dataset under ``root``; returns the JSON path.

    ``bad`` adds broken records for tests: ``{"missing": k, "corrupt": k, "malformed": k}``. ``n_multi`` adds
    records with two images each, one ``<image>`` tag in the text for each (the answer: whether the colours match).
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    records = []
    for i in range(n_image):
        colour = names[(i + seed) % len(names)]
        rel = f"images/{i:04d}.png"
        buf = io.BytesIO()
        _image(COLOURS[colour], SIZES[i % len(SIZES)], i + seed).save(buf, format="PNG")
        atomic_write_bytes(root / rel, buf.getvalue())
        conv = [{"from": "human", "value": "<image>\nWhat is the color of the object?"},
                {"from": "gpt", "value": colour}]
        if i % 5 == 4:  # a two-turn conversation
            conv += [{"from": "human", "value": "Is there a square in the image? Please answer yes or no."},
                     {"from": "gpt", "value": "yes"}]
        records.append({"id": f"img-{i}", "image": rel, "conversations": conv})
    for i in range(n_multi):  # two of the images above, tags where they stand in the question
        a, b = i % max(n_image, 1), (i + 1 + i % 2) % max(n_image, 1)
        same = names[(a + seed) % len(names)] == names[(b + seed) % len(names)]
        records.append({"id": f"multi-{i}", "image": [f"images/{a:04d}.png", f"images/{b:04d}.png"], "conversations": [
            {"from": "human", "value": "First: <image>\nSecond: <image>\nDo the objects have the same color?"},
            {"from": "gpt", "value": "yes" if same else "no"}]})
    answers = ["one", "two", "three", "four", "five"]
    for i in range(n_text):
        records.append({"id": f"txt-{i}", "conversations": [
            {"from": "human", "value": f"How many people are there? {answers[i % 5]}"},
            {"from": "gpt", "value": answers[i % 5]}]})
    bad = bad or {}
    for i in range(bad.get("missing", 0)):
        records.append({"id": f"missing-{i}", "image": f"images/missing-{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is the color of the object?"}, {"from": "gpt", "value": "red"}]})
    for i in range(bad.get("corrupt", 0)):
        rel = f"images/corrupt-{i}.png"
        atomic_write_bytes(root / rel, b"\x89PNG\r\n\x1a\n this is not an image")
        records.append({"id": f"corrupt-{i}", "image": rel, "conversations": [
            {"from": "human", "value": "<image>\nWhat is the color of the object?"}, {"from": "gpt", "value": "red"}]})
    for i in range(bad.get("malformed", 0)):
        records.append({"id": f"malformed-{i}", "conversations": [{"from": "robot", "value": "hello"}]})
    path = root / "data.json"
    atomic_write_text(path, json.dumps(records, indent=1))
    return path


__all__ = ["COLOURS", "make_demo_dataset"]
