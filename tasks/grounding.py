"""Grounding answers (RefCOCO / RefCOCO+ / RefCOCOg): each host's box format, scored in the image's own coordinates.

RefCOCO's ground truth, after lmms-eval's ``refcoco_bbox_rec_preprocess_dataset``, is the box normalised by the
image's own width and height, ``[x1/W, y1/H, x2/W, y2/H]``; Acc@0.5 is IoU >= 0.5 between that and the answer's
box (lmms-eval's aggregations, ``lmms_eval/tasks/refcoco/utils_rec.py``). What an answer's numbers mean depends
on the host that wrote them, so the answer is read by the host's :class:`BoxSpace`:

* :class:`NormalisedBoxes` (LLaVA-1.5 / LLaVA-NeXT, the paper's runs; LLaVA-OneVision): lmms-eval's own parser,
  unchanged: the first ``[x1, y1, x2, y2]`` of four numbers, already normalised to [0, 1]. OneVision has no box
  format of its own (neither its model card nor LLaVA-NeXT's training mixes name one): it answers RefCOCO's prompt,
  which asks for floats between 0 and 1, as LLaVA does, and lmms-eval scores its runs (``--model llava_onevision``
  and ``llava_hf``) with this parser, against the ground truth normalised by the image's own ``W x H``.
* :class:`ResizedPixelBoxes` (Qwen2.5-VL): absolute pixels of the image *as the vision tower saw it*, i.e. after
  the resizes the request went through (for lmms-eval's ``qwen2_5_vl``: qwen_vl_utils' ``fetch_image``, then
  the processor's ``smart_resize`` within ``[min_pixels, max_pixels]``). Qwen writes them as JSON
  (``[{"bbox_2d": [x1, y1, x2, y2], "label": "..."}]``, often in a ```json fence), a single object, or a bare
  list. The box is clipped to the resized image, mapped back to the original image by the resize's own scale
  (``x * W / W'``, ``y * H / H'``, with ``W' x H'`` computed by the same ``smart_resize`` functions the
  request used) and normalised by ``W x H`` like the ground truth. Four values all within [0, 1], at least one
  of them fractional, are taken as an already normalised box (RefCOCO's prompt asks for one, and no box of
  absolute pixels fits within one pixel).

An answer with no readable box is scored as lmms-eval scores it (the box ``[0, 0, 0, 0]``, IoU 0) and
counted as ``unparsed``.

The space in use is the evaluated model's: ``pmod_llava`` sets it when it is built (one model per process:
:func:`set_box_space`); without it (another lmms-eval model on the adapter tasks) answers are read as
lmms-eval reads them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Optional

Box = list[float]
NO_BOX: Box = [0.0, 0.0, 0.0, 0.0]  # what lmms-eval's parser returns when it finds none


class BoxSpace:
    """How a host writes boxes; :meth:`normalised_box` turns an answer into RefCOCO's normalised box."""

    host: str = ""
    kind: str = ""

    def normalised_box(self, answer: str, width: int, height: int) -> tuple[Box, bool]:
        """(the answer's box normalised by the original ``width x height``, whether a box was read)."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"host": self.host, "kind": self.kind}


@dataclass(frozen=True)
class NormalisedBoxes(BoxSpace):
    """LLaVA: lmms-eval's ``parse_float_sequence_within`` (the first bracketed four numbers, taken as normalised)."""

    host: str = "llava"
    kind: str = "normalised"

    def normalised_box(self, answer: str, width: int, height: int) -> tuple[Box, bool]:
        from lmms_eval.tasks.refcoco.utils_rec import parse_float_sequence_within

        box = [float(x) for x in parse_float_sequence_within(answer)]
        return box, box != NO_BOX  # lmms-eval's "no match" (a literal [0, 0, 0, 0] box is degenerate: IoU 0 either way)


#: one resize an image goes through before the vision tower: (library, factor, min_pixels, max_pixels);
#: library "qwen_vl_utils" (``qwen_vl_utils.smart_resize``) or "transformers" (Qwen2-VL image processor's)
ResizeStep = tuple[str, int, int, int]


def _smart_resize(step: ResizeStep, height: int, width: int) -> tuple[int, int]:
    library, factor, min_pixels, max_pixels = step
    if library == "qwen_vl_utils":
        from qwen_vl_utils.vision_process import smart_resize
    elif library == "transformers":
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    else:
        raise ValueError(f"unknown resize step {library!r}; known: qwen_vl_utils, transformers")
    h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return int(h), int(w)


@dataclass(frozen=True)
class ResizedPixelBoxes(BoxSpace):
    """Qwen2.5-VL: absolute pixels of the resized input (see the module docstring)."""

    steps: tuple[ResizeStep, ...] = ()
    host: str = "qwen2_5_vl"
    kind: str = "resized_pixels"

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(W', H'): the image size the vision tower saw for an original ``width x height`` image."""
        h, w = int(height), int(width)
        for step in self.steps:
            h, w = _smart_resize(step, h, w)
        return w, h

    def normalised_box(self, answer: str, width: int, height: int) -> tuple[Box, bool]:
        box = first_box(answer)
        if box is None:
            return list(NO_BOX), False
        x1, y1, x2, y2 = min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])
        if all(0.0 <= v <= 1.0 for v in box) and any(v != math.floor(v) for v in box):
            return [x1, y1, x2, y2], True  # already normalised, as RefCOCO's prompt asks
        rw, rh = self.resized_size(width, height)
        clip = lambda v, hi: min(max(v, 0.0), float(hi))  # noqa: E731
        # resized pixels -> the original image's pixels (x * W / W') -> normalised by W, as the ground truth
        px = [clip(x1, rw) * width / rw, clip(y1, rh) * height / rh, clip(x2, rw) * width / rw, clip(y2, rh) * height / rh]
        return [px[0] / width, px[1] / height, px[2] / width, px[3] / height], True

    def to_dict(self) -> dict:
        return {**super().to_dict(), "resize": [list(s) for s in self.steps]}


# ----------------------------------------------------------------------------------------- parsing
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)
_BOX_KEYS = ("bbox_2d", "bbox", "box")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _box_in(value: Any) -> Optional[Box]:
    """The first box in a decoded JSON value: a dict's ``bbox_2d`` (or ``bbox`` / ``box``), a list of four
    numbers, or the first such in a list."""
    if isinstance(value, dict):
        for key in _BOX_KEYS:
            if key in value:
                return _box_in(value[key])
        return None
    if isinstance(value, list):
        if len(value) == 4 and all(_is_number(v) for v in value):
            return [float(v) for v in value]
        for item in value:
            if isinstance(item, (dict, list)):
                box = _box_in(item)
                if box is not None:
                    return box
    return None


def first_box(answer: str) -> Optional[Box]:
    """The first box of a Qwen-style answer (JSON list of ``{"bbox_2d": ...}``, one object, a bare
    ``[x1, y1, x2, y2]``; inside a ```json fence or not), or None."""
    text = str(answer or "")
    fenced = _FENCE.findall(text)
    decoder = json.JSONDecoder()
    for chunk in [*fenced, text]:
        for i, ch in enumerate(chunk):
            if ch not in "[{":
                continue
            try:
                value, _ = decoder.raw_decode(chunk, i)
            except ValueError:
                continue
            box = _box_in(value)
            if box is not None:
                return box
    return None


# ------------------------------------------------------------------------------- the active space
_ACTIVE: list[BoxSpace] = [NormalisedBoxes()]


def set_box_space(space: Optional[BoxSpace]) -> None:
    """The box space of the model evaluated in this process (None: lmms-eval's normalised reading)."""
    _ACTIVE[0] = space if space is not None else NormalisedBoxes()


def box_space() -> BoxSpace:
    return _ACTIVE[0]


def refcoco_process_results(doc: dict, results: list) -> dict:
    """lmms-eval's RefCOCO per-sample record with the box read in the evaluated host's space, + ``unparsed``."""
    from lmms_eval.tasks.refcoco.utils_rec import refcoco_bbox_rec_process_result

    out = refcoco_bbox_rec_process_result(doc, results)
    answer = results[0] if len(results) > 0 else ""
    box, parsed = box_space().normalised_box(answer, int(doc["image_width"]), int(doc["image_height"]))
    for record in {id(v): v for v in out.values()}.values():  # lmms-eval shares one record among its metrics
        record["pred"] = box
    return {**out, "unparsed": 0.0 if parsed else 1.0}


__all__ = ["Box", "BoxSpace", "NO_BOX", "NormalisedBoxes", "ResizeStep", "ResizedPixelBoxes", "box_space", "first_box",
           "refcoco_process_results", "set_box_space"]
