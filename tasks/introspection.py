"""``introspection.json`` of a run directory (docs/RUN_DIRS.md): the token selection of one image.

The record itself (which vision tokens each p-MoD layer processed) is
:func:`pmod_bench.model.introspect.routing_record`; this module writes it with its input image into a
run directory (``pmod-bench eval --introspect``, the toy world's pipeline) and reads the ``--introspect``
image argument.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

from pmod_bench.atomic import atomic_write_bytes, atomic_write_json
from pmod_bench.model.introspect import DEFAULT_QUESTION, routing_record

IMAGE_FILE = "introspection_input.png"
RECORD_FILE = "introspection.json"


def write_introspection(run_dir, model, processor, image, question: str = DEFAULT_QUESTION) -> Path:
    """Write ``introspection.json`` + the input image into ``run_dir`` (each file atomically)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = routing_record(model, processor, image, question)
    record["image"] = IMAGE_FILE
    png = io.BytesIO()
    image.convert("RGB").save(png, format="PNG")
    atomic_write_bytes(run_dir / IMAGE_FILE, png.getvalue())
    atomic_write_json(run_dir / RECORD_FILE, record, indent=1)
    return run_dir / RECORD_FILE


def load_image(spec: Optional[str]):
    """A PIL image from a path, or the built-in generated test image for ``None`` / ``"demo"``."""
    if spec in (None, "", "demo"):
        from pmod_bench.model.presets import demo_image

        from pmod_bench.profiler.scenario import PAPER_IMAGE_SIZE

        return demo_image(*PAPER_IMAGE_SIZE)
    from PIL import Image, UnidentifiedImageError

    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"introspection image '{spec}' does not exist; pass an image file or 'demo'")
    from .data import strict_image_decoding

    try:
        with strict_image_decoding(), Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"introspection image '{spec}' is not a readable image ({exc}); pass a PNG/JPEG file") from None


__all__ = ["IMAGE_FILE", "RECORD_FILE", "load_image", "write_introspection"]
