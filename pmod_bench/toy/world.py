"""The toy world: scenes of coloured shapes (and a rendered digit) drawn with PIL, and questions about them.

Everything is a pure function of a seed (``random.Random``), so every image, question and answer is
reproducible bit for bit on any machine with the same Pillow version. Geometry is in original-image
pixels; boxes are ``(x0, y0, x1, y1)`` with ``x1``/``y1`` exclusive.

Canvas sizes are picked so that LLaVA-NeXT's anyres (32 px tiles, grids (1,2), (2,1), (2,2), (1,3),
(3,1) at the tiny preset) chooses several different grids: 64x64 -> 2x2 tiles, 96x48 -> 1x3 (padded),
48x96 -> 3x1, 80x64 -> 2x2 (with padding removed by unpad), each plus the base tile and one newline
feature per row of patches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 75, 215),
    "yellow": (235, 205, 30),
    "purple": (140, 55, 175),
}
SHAPES = ("circle", "square", "triangle", "diamond")
DIGIT_COLOUR = (20, 20, 20)
#: (width, height) of the canvases, with their sampling weights
SIZES: tuple[tuple[int, int], ...] = ((64, 64), (96, 48), (48, 96), (80, 64))
SIZE_WEIGHTS = (3, 1, 1, 1)
GRID = 8  # shapes snap to an 8 px grid (one patch of the tiny CLIP at full resolution)


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    box: tuple[int, int, int, int]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    """One image: its size, background, shapes and optional digit (with its box)."""

    size: tuple[int, int]
    background: tuple[int, int, int]
    shapes: list[Shape] = field(default_factory=list)
    digit: str | None = None
    digit_box: tuple[int, int, int, int] | None = None

    def objects(self) -> set[str]:
        return {s.name for s in self.shapes}

    def coverage(self) -> float:
        """Fraction of the image area covered by the shapes' (and the digit's) boxes."""
        return float(self.mask().mean())

    def mask(self):
        """(H, W) bool numpy array: True where a shape or the digit is drawn (from the rendered pixels)."""
        import numpy as np

        img = np.asarray(render(self), dtype=np.int16)
        bg = np.asarray(self.background, dtype=np.int16)
        return np.abs(img - bg).sum(-1) > 60


def _free(box: tuple, taken: list, margin: int = 2) -> bool:
    x0, y0, x1, y1 = box
    return all(x1 + margin <= a or a1 + margin <= x0 or y1 + margin <= b or b1 + margin <= y0 for a, b, a1, b1 in taken)


def sample_scene(rng: random.Random, n_shapes: tuple[int, int] = (1, 4), digit: bool | None = None,
                 repeat_shape: str | None = None, repeats: int = 0) -> Scene:
    """A random scene: ``n_shapes`` distinct-looking shapes on a light background, optionally a digit.

    ``repeat_shape``/``repeats``: include that many copies of one shape kind (counting questions).
    """
    w, h = rng.choices(SIZES, weights=SIZE_WEIGHTS)[0]
    bg = tuple(rng.randint(205, 245) for _ in range(3))
    scene = Scene((w, h), bg)
    taken: list = []
    want_digit = rng.random() < 0.3 if digit is None else digit
    if want_digit:
        for _ in range(50):
            dw, dh = 16, 24
            x0 = rng.randrange(0, (w - dw) // GRID + 1) * GRID
            y0 = rng.randrange(0, (h - dh) // GRID + 1) * GRID
            box = (x0, y0, x0 + dw, y0 + dh)
            if _free(box, taken):
                scene.digit, scene.digit_box = str(rng.randrange(10)), box
                taken.append(box)
                break
    kinds: list = [repeat_shape] * repeats if repeat_shape else []
    n = max(rng.randint(*n_shapes), len(kinds))
    while len(kinds) < n:
        kind = rng.choice([s for s in SHAPES if s != repeat_shape]) if repeat_shape else rng.choice(SHAPES)
        kinds.append(kind)
    rng.shuffle(kinds)
    used: set = set()
    for kind in kinds:
        for _ in range(100):
            side = rng.choice((16, 24)) if min(w, h) >= 64 else 16
            x0 = rng.randrange(0, (w - side) // GRID + 1) * GRID
            y0 = rng.randrange(0, (h - side) // GRID + 1) * GRID
            box = (x0, y0, x0 + side, y0 + side)
            colour = rng.choice([c for c in COLOURS if f"{c} {kind}" not in used] or list(COLOURS))
            if _free(box, taken):
                scene.shapes.append(Shape(kind, colour, box))
                used.add(f"{colour} {kind}")
                taken.append(box)
                break
    return scene


def draw_shape(d, s: "Shape", fill) -> None:
    """Draw shape ``s`` inside its box with ``fill`` (an RGB colour, or a label id on a label map)."""
    x0, y0, x1, y1 = s.box
    x1, y1 = x1 - 1, y1 - 1
    if s.shape == "circle":
        d.ellipse([x0, y0, x1, y1], fill=fill)
    elif s.shape == "square":
        d.rectangle([x0 + 1, y0 + 1, x1 - 1, y1 - 1], fill=fill)
    elif s.shape == "triangle":
        d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # diamond
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        d.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)


def render(scene: Scene):
    """The scene as a PIL RGB image (deterministic)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", scene.size, scene.background)
    d = ImageDraw.Draw(img)
    for s in scene.shapes:
        draw_shape(d, s, COLOURS[s.colour])
    if scene.digit is not None:
        x0, y0, x1, y1 = scene.digit_box
        font = ImageFont.load_default(size=22)
        l, t, r, b = d.textbbox((0, 0), scene.digit, font=font)
        d.text((x0 + (x1 - x0 - (r - l)) / 2 - l, y0 + (y1 - y0 - (b - t)) / 2 - t), scene.digit, fill=DIGIT_COLOUR, font=font)
    return img


def describe(scene: Scene) -> str:
    """A caption (PT data): every shape with its rough position, and the digit."""
    w, h = scene.size
    parts = []
    for s in sorted(scene.shapes, key=lambda s: (s.box[1], s.box[0])):
        cx, cy = (s.box[0] + s.box[2]) / 2 / w, (s.box[1] + s.box[3]) / 2 / h
        v = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
        hz = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "center"
        parts.append(f"a {s.name} at the {v} {hz}")
    text = "The picture shows " + (", ".join(parts) if parts else "nothing") + "."
    if scene.digit is not None:
        text += f" The number {scene.digit} is written on it."
    return text


__all__ = ["COLOURS", "SHAPES", "SIZES", "Scene", "Shape", "describe", "render", "sample_scene"]
