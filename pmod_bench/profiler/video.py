"""A video in the prompt: how many frames a host sees of it, the way lmms-eval's model class for the host reads it.

A :class:`Video` is what the user asks for (``pmod-bench profile --frames N`` or ``--duration S [--fps F]
[--max-frames M]``, each frame ``--frame-size WxH``); each host turns it into the frames its model sees and their
vision tokens (:meth:`.geometry.HostGeometry.video_layout`):

* ``--frames N``: the model sees N frames, whatever read them (a frame list handed to the processor);
* ``--duration S``: the frames lmms-eval 0.7.3's own model class reads of an S-second clip.

  - Qwen2.5-VL (``lmms_eval/models/simple/qwen2_5_vl.py``): ``qwen_vl_utils.fetch_video`` reads the clip at ``fps``
    (2.0) frames per second (``smart_nframes``: at least 4, at most 768, an even count), sizes every frame for that
    count (its per-frame pixel budget, :func:`.qwen.video_frame_size`), then lmms-eval keeps at most ``max_num_frames``
    (32) of them (:func:`lmms_eval_frames`); the processor pairs frames (``temporal_patch_size`` 2).
  - LLaVA-OneVision (``llava_onevision.py`` / ``llava_hf.py``): ``np.linspace(0, total - 1, max_frames_num)``
    indices, duplicates kept: always ``max_frames_num`` (32) frames, whatever the length.

The clip's own frame rate enters only where qwen-vl-utils clamps to the clip's frame count (clips under 0.3 s):
:data:`CLIP_FPS` is assumed. This module imports nothing heavy at import time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .errors import ProfileError

#: qwen-vl-utils' default sampling rate (``qwen_vl_utils.vision_process.FPS``), the ``--fps`` default
QWEN_FPS = 2.0
#: lmms-eval 0.7.3's ``max_num_frames`` (``qwen2_5_vl``) and ``max_frames_num`` (``llava_onevision``, ``llava_hf``)
LMMS_EVAL_MAX_FRAMES = 32
#: the frame rate assumed of a ``--duration`` clip (only qwen-vl-utils' clamp to the clip's own frame count reads it)
CLIP_FPS = 30.0
#: the most frames (``--frames``, ``--max-frames``) and seconds (``--duration``) any command accepts
MAX_FRAMES = 2048
MAX_DURATION_S = 24 * 3600.0


@dataclass(frozen=True)
class Video:
    """One video in the prompt: ``frames`` the model sees, or a clip of ``duration_s`` seconds read as lmms-eval reads
    it (Qwen2.5-VL at ``fps``; at most ``max_frames`` kept)."""

    frames: Optional[int] = None
    """frames the model sees (``--frames``)"""
    duration_s: Optional[float] = None
    """a clip of this many seconds (``--duration``), sampled as lmms-eval's model class for the host samples it"""
    fps: float = QWEN_FPS
    """Qwen2.5-VL: frames per second qwen-vl-utils reads of a ``--duration`` clip (``--fps``)"""
    max_frames: int = LMMS_EVAL_MAX_FRAMES
    """frames lmms-eval keeps of a ``--duration`` clip at most (``--max-frames``: its max_num_frames / max_frames_num)"""

    def __post_init__(self) -> None:
        if (self.frames is None) == (self.duration_s is None):
            raise ProfileError("a video is --frames N or --duration SECONDS; give one of them.")
        if self.frames is not None and not _whole(self.frames, 1, MAX_FRAMES):
            raise ProfileError(f"bad frame count {self.frames!r}: --frames must be a whole number in 1..{MAX_FRAMES}, e.g. 32.")
        if self.duration_s is not None and not (_number(self.duration_s) and 0 < self.duration_s <= MAX_DURATION_S):
            raise ProfileError(f"bad duration {self.duration_s!r}: --duration must be seconds in (0, {MAX_DURATION_S:.0f}], e.g. 60.")
        if not (_number(self.fps) and 0 < self.fps <= 240):
            raise ProfileError(f"bad --fps {self.fps!r}: frames per second in (0, 240], e.g. 2 (qwen-vl-utils' default).")
        if not _whole(self.max_frames, 1, MAX_FRAMES):
            raise ProfileError(f"bad --max-frames {self.max_frames!r}: a whole number in 1..{MAX_FRAMES} (lmms-eval's: 32).")

    @property
    def label(self) -> str:
        return f"{self.frames} frames" if self.frames is not None else f"{self.duration_s:g} s clip"


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _whole(x, low: int, high: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and low <= x <= high


def lmms_eval_frames(read: int, max_frames: int) -> int:
    """Frames lmms-eval's ``qwen2_5_vl`` keeps of the ``read`` frames qwen-vl-utils returned: ``np.linspace(0, read - 1,
    max_num_frames, dtype=int)``, made unique, with the last frame appended if missing (``generate_until``)."""
    import numpy as np

    indices = np.unique(np.linspace(0, read - 1, max_frames, dtype=int))
    if read - 1 not in indices:
        indices = np.unique(np.append(indices, read - 1))
    return int(len(indices))


def qwen_frames(video: Video) -> tuple[int, int]:
    """(frames read, frames the model sees) of ``video`` on Qwen2.5-VL: ``--frames N`` -> (N, N); a ``--duration``
    clip -> qwen-vl-utils' ``smart_nframes`` at ``fps`` (the read count sizes each frame), then
    :func:`lmms_eval_frames`."""
    if video.frames is not None:
        return video.frames, video.frames
    from qwen_vl_utils.vision_process import smart_nframes

    total = max(int(round(video.duration_s * CLIP_FPS)), 1)
    try:
        read = int(smart_nframes({"fps": video.fps}, total_frames=total, video_fps=CLIP_FPS))
    except ValueError as exc:  # fewer than FRAME_FACTOR (2) frames
        raise ProfileError(f"a {video.duration_s:g} s clip: qwen-vl-utils reads too few frames of it ({exc}); "
                           "give a longer --duration or --frames N.") from None
    return read, lmms_eval_frames(read, video.max_frames)


def synthetic_video_batch(arch, layout, text_tokens: int, batch_size: int, device: str = "cpu", dtype=None,
                          seed: int = 0) -> dict:
    """Model inputs of ``batch_size`` prompts, each one video of ``layout`` (:meth:`.geometry.HostGeometry.video_layout`)
    amid ``text_tokens`` random text tokens (two thirds before it, as :func:`.models.synthetic_batch` places images):
    its ``layout.vision_tokens`` video placeholders (``video_token_id``) and the host's random video pixels
    (:meth:`~.geometry.HostGeometry.video_pixel_inputs`). What ``profile --frames N --latency`` times; the model checks
    that the placeholders match the features it computes, so a wrong count fails loudly. Random text holds no vision
    token id; every row has the same length (no padding)."""
    import torch

    from .geometry import geometry_of
    from .models import _VISION_ID_FIELDS

    own = geometry_of(arch.family)
    if own is None:
        raise ProfileError(f"{arch.name}: video prompts are timed on Qwen2.5-VL and LLaVA-OneVision.")
    g = torch.Generator().manual_seed(seed)
    cfg = arch.config
    reserved = torch.tensor(sorted({int(getattr(cfg, f)) for f in _VISION_ID_FIELDS if getattr(cfg, f, None) is not None}))
    text = torch.randint(3, arch.text.vocab, (batch_size, text_tokens), generator=g)
    text = torch.where(torch.isin(text, reserved), torch.full_like(text, 3), text)
    pre = (2 * text_tokens) // 3
    video = torch.full((batch_size, layout.vision_tokens), int(cfg.video_token_id), dtype=torch.long)
    ids = torch.cat([text[:, :pre], video, text[:, pre:]], dim=1)  # (B, T + V)
    pixels = own.video_pixel_inputs(arch, layout, ids, g, dtype or torch.float32)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **pixels}
    return {k: t.to(device) for k, t in batch.items()}


def onevision_frames(video: Video) -> int:
    """Frames LLaVA-OneVision sees of ``video``: N for ``--frames N``; lmms-eval's ``max_frames_num`` for any clip."""
    return video.frames if video.frames is not None else video.max_frames


__all__ = ["Video", "QWEN_FPS", "LMMS_EVAL_MAX_FRAMES", "CLIP_FPS", "MAX_FRAMES", "MAX_DURATION_S", "lmms_eval_frames",
           "qwen_frames", "onevision_frames", "synthetic_video_batch"]
