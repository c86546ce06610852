"""Video in ``pmod_llava``'s requests: a video document as lmms-eval 0.7.3's model class for the host reads it.

**LLaVA-OneVision** (:class:`pmod_bench.tasks.requests.OnevisionRequests`; :func:`uniform_frames`): as
``LlavaHf.load_video`` in ``lmms_eval/models/simple/llava_hf.py`` (and ``Llava_OneVision.load_video``, the same lines, at
EvolvingLMMs-Lab/lmms-eval@75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3): ``decord.VideoReader`` on the request's first
video, frame indices ``np.linspace(0, total - 1, max_frames_num, dtype=int)`` (``max_frames_num`` 32), read with
``get_batch`` as one (T, H, W, C) uint8 array. A clip shorter than ``max_frames_num`` frames repeats frames (the
indices are floored, duplicates kept): every clip gives exactly ``max_frames_num`` frames, so the clips of a batch
stack into one ``pixel_values_videos`` tensor as HF's OneVision needs.

**Qwen2.5-VL**: as lmms-eval 0.7.3's chat ``qwen2_5_vl`` reads it.

What ``lmms_eval/models/chat/qwen2_5_vl.py`` (``Qwen2_5_VL.generate_until``, lmms-eval 0.7.3) does with the videos of
a request, reproduced by :class:`pmod_bench.tasks.requests.QwenChatRequests` through the functions here:

1. the frames to read (:func:`chat_video_kwargs`): with the model_arg ``fps`` set, ``fps`` (qwen-vl-utils samples the
   clip at that rate); else ``nframes`` = ``min(max_num_frames, frames of the clip)``, the clip's frame count read
   with ``decord.VideoReader``, floored to an even number and at least 2 (qwen-vl-utils' ``FRAME_FACTOR``); a clip that
   decord cannot open, or no decord, gives ``nframes = max_num_frames``. Every video item of the messages also carries
   the model's ``min_pixels`` / ``max_pixels`` (``ChatMessages.to_hf_messages(video_kwargs=...)``);
2. ``qwen_vl_utils.process_vision_info(messages, return_video_kwargs=True, return_video_metadata=True)`` reads them
   (``fetch_video``: the decord backend where torchcodec is missing, as ``torchvision.io.read_video`` is gone; the
   frames resized within the per-frame budget) and returns ``(frames, metadata)`` per video (:class:`VideoFrames`);
3. the processor gets ``videos=[frames ...]`` and ``video_metadata=[metadata ...]`` (None without videos) beside the
   images; its video processor has the model's ``min_pixels`` / ``max_pixels`` as its size, as
   ``AutoProcessor.from_pretrained(..., min_pixels, max_pixels)`` sets it.

One difference, on purpose: lmms-eval probes only the *first* video of a batch ("Assume batch size 1 for videos") and
samples every video of the batch at that count, so its answers at batch size > 1 depend on which clips share a batch.
Here each request's own clip is probed: every request is read as lmms-eval reads it at batch size 1, and answers are
the same at any batch size. ``tests/test_eval_video.py`` proves the requests byte-identical to lmms-eval's class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

#: qwen-vl-utils' ``FRAME_FACTOR``: frames are read in pairs (the Conv3d's temporal patch)
FRAME_FACTOR = 2


@dataclass(frozen=True)
class VideoFrames:
    """One video of a request as read for its host. Qwen2.5-VL: the ``frames`` qwen-vl-utils sampled ((T, C, H, W)
    tensor, resized) and the ``metadata`` it returns with them (fps, the frame indices read, ...), which the processor
    turns into ``second_per_grid_ts`` (the M-RoPE temporal step). LLaVA-OneVision (:func:`uniform_frames`): a (T, H, W,
    C) uint8 array and the frame indices read (not handed to the processor)."""

    frames: Any
    metadata: Any


def clip_frames(path: str) -> Optional[int]:
    """Frames of the clip at ``path`` as ``decord.VideoReader`` counts them; None when decord is missing or cannot
    open it (lmms-eval then samples ``max_num_frames``)."""
    try:
        import decord
    except ImportError:
        return None
    try:
        return len(decord.VideoReader(path))
    except Exception:  # lmms-eval catches every failure of the probe alike
        return None


def chat_nframes(path: Any, max_num_frames: int) -> int:
    """lmms-eval's frame count for one clip: ``min(max_num_frames, its frames)`` floored to even, at least 2; its
    ``max_num_frames`` when the clip cannot be probed."""
    total = clip_frames(path) if isinstance(path, str) else None
    if total is None:
        return max_num_frames
    return max(FRAME_FACTOR, (min(max_num_frames, total) // FRAME_FACTOR) * FRAME_FACTOR)


def chat_video_kwargs(videos: Sequence[Any], min_pixels: int, max_pixels: int, max_num_frames: int,
                      fps: Optional[float]) -> dict:
    """The keys lmms-eval adds to every video item of one request's messages (module docstring, step 1)."""
    kwargs: dict[str, Any] = {"max_pixels": max_pixels, "min_pixels": min_pixels}
    if fps is not None:
        kwargs["fps"] = fps
    elif videos:
        kwargs["nframes"] = chat_nframes(videos[0], max_num_frames)
    else:
        kwargs["nframes"] = max_num_frames
    return kwargs


def uniform_frames(path: str, max_frames_num: int) -> VideoFrames:
    """The clip at ``path`` as lmms-eval's ``llava_hf`` / ``llava_onevision`` read it (module docstring): ``frames`` a
    (max_frames_num, H, W, C) uint8 array, ``metadata`` the frame indices read. Needs decord (the ``video`` extra)."""
    import numpy as np

    try:
        from decord import VideoReader, cpu
    except ImportError:
        raise ImportError("LLaVA-OneVision reads videos with decord, as lmms-eval's llava_hf: pip install -e \".[video]\"") \
            from None
    reader = VideoReader(path, ctx=cpu(0))
    indices = np.linspace(0, len(reader) - 1, max_frames_num, dtype=int).tolist()  # floored: duplicates when short
    return VideoFrames(frames=reader.get_batch(indices).asnumpy(), metadata=tuple(indices))


def read_vision(hf_messages: list) -> list:
    """The images (PIL) and videos (:class:`VideoFrames`) of one request's HF messages, in their order of kind (images
    first, as ``process_vision_info`` returns them), read by qwen-vl-utils as lmms-eval calls it."""
    from qwen_vl_utils import process_vision_info  # what lmms-eval's qwen2_5_vl imports (optional_import)

    images, videos, _ = process_vision_info([hf_messages], return_video_kwargs=True, return_video_metadata=True)
    return list(images or []) + [VideoFrames(frames, meta) for frames, meta in (videos or [])]


def processor_media(shown: Sequence[Sequence[Any]]) -> dict:
    """The processor's media keywords for a batch (``shown``: each request's :func:`read_vision` list): ``images``,
    ``videos`` and ``video_metadata``, each None when the batch has none (as lmms-eval passes them)."""
    flat = [item for items in shown for item in items]
    images = [im for im in flat if not isinstance(im, VideoFrames)]
    videos = [v for v in flat if isinstance(v, VideoFrames)]
    return {"images": images or None, "videos": [v.frames for v in videos] or None,
            "video_metadata": [v.metadata for v in videos] or None}


def video_processor_size(processor: Any, min_pixels: int, max_pixels: int) -> Any:
    """``processor`` (a copy) whose video processor has ``min_pixels`` / ``max_pixels`` as its size, as lmms-eval's
    ``AutoProcessor.from_pretrained(pretrained, max_pixels=..., min_pixels=...)`` gives it; the original is untouched."""
    import copy

    from transformers.image_utils import SizeDict

    video = getattr(processor, "video_processor", None)
    if video is None:
        return processor
    processor = copy.copy(processor)
    processor.video_processor = copy.deepcopy(video)
    processor.video_processor.size = SizeDict(shortest_edge=min_pixels, longest_edge=max_pixels)
    return processor


__all__ = ["FRAME_FACTOR", "VideoFrames", "clip_frames", "chat_nframes", "chat_video_kwargs", "read_vision",
           "processor_media", "uniform_frames", "video_processor_size"]
