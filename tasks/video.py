"""Video benchmarks offline: where each adapter's videos are, unpacked from a local hub snapshot, and what they hold.

lmms-eval 0.7.3 reads a video benchmark (``dataset_kwargs: {video: True, cache_dir: NAME}``) by downloading the hub
repository, unzipping every ``*.zip`` in it into ``$HF_HOME/NAME`` and pointing ``doc_to_visual`` there. With
``PMOD_BENCH_DATA`` set, the adapters read the same files from the local snapshot ``$PMOD_BENCH_DATA/ORG/NAME`` (laid out
as ``hf download ORG/NAME --repo-type dataset`` leaves it) instead:

* :func:`unpack` extracts the snapshot's zip archives, as lmms-eval does, into a directory of the snapshot's own
  identity (``<datasets cache>/pmod_bench_snapshots/<fingerprint[:16]>/videos``, beside the snapshot's tables:
  :func:`~pmod_bench.tasks.data.snapshot_cache_dir`), once, atomically; a copy that changes gets a new directory;
* the ``*_doc_to_visual`` functions here find each row's video where lmms-eval's would (the same relative paths,
  :data:`LAYOUTS`) in that directory or in the snapshot itself, and without a data root call lmms-eval's own.

Layouts (lmms-eval 0.7.3's ``tasks/<name>/utils.py``):

* Video-MME (``lmms-eval/Video-MME``, ``videos_chunked_NN.zip``): ``data/<videoID>.mp4`` (or ``.MP4``, ``.mkv``);
* MVBench (``OpenGVLab/MVBench`` at revision ``video``, ``video/*.zip``): ``<DATA_LIST[sub_task]>/<video>`` (for
  clevrer and star also under ``data0613/``); episodic_reasoning's ``video`` is a folder of JPEG frames;
* EgoSchema (``lmms-eval/egoschema``, ``videos_chunked_NN.zip``): ``videos/<video_idx>.mp4`` (or ``.MP4``).

:func:`probe` opens a video with OpenCV (``pmod-bench data check --decode``): frames, frame rate, duration, size, and
whether its first and last frames decode. Heavy imports (cv2, datasets, pyarrow) happen inside the functions.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

#: marks a complete unpacked directory (written last)
DONE = ".pmod-bench-unpacked"
#: image files of a frame folder (MVBench episodic_reasoning)
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")


#: MVBench task -> the folder of its videos once the archives are unpacked: lmms-eval 0.7.3's
#: ``lmms_eval.tasks.mvbench.utils.DATA_LIST`` (copied: importing lmms-eval's tasks takes seconds; a test compares them)
MVBENCH_FOLDERS = {
    "object_interaction": "star/Charades_segment", "action_sequence": "star/Charades_segment",
    "action_prediction": "star/Charades_segment", "action_localization": "sta/sta_video_segment",
    "moving_count": "clevrer/video_validation", "fine_grained_pose": "nturgbd_convert", "character_order": "perception/videos",
    "object_shuffle": "perception/videos", "egocentric_navigation": "vlnqa", "moving_direction": "clevrer/video_validation",
    "episodic_reasoning": "tvqa/video_fps3_hq_segment", "fine_grained_action": "Moments_in_Time_Raw/videos",
    "scene_transition": "scene_qa/video", "state_change": "perception/videos", "moving_attribute": "clevrer/video_validation",
    "action_antonym": "ssv2_video_mp4", "unexpected_action": "FunQA_test/test", "counterfactual_inference": "clevrer/video_validation",
    "object_existence": "clevrer/video_validation", "action_count": "perception/videos",
}


def _videomme(config: Optional[str], doc: dict) -> list[str]:
    stem = f"data/{doc['videoID']}"
    return [f"{stem}.mp4", f"{stem}.MP4", f"{stem}.mkv"]


def _egoschema(config: Optional[str], doc: dict) -> list[str]:
    stem = f"videos/{doc['video_idx']}"
    return [f"{stem}.mp4", f"{stem}.MP4"]


def _mvbench(config: Optional[str], doc: dict) -> list[str]:
    folder = MVBENCH_FOLDERS[config]
    paths = [f"{folder}/{doc['video']}"]
    if folder.split("/")[0] in ("clevrer", "star"):  # lmms-eval's data0613 fallback (its own test reads the basename,
        paths.append(f"data0613/{folder}/{doc['video']}")  # Charades_segment / video_validation, and never takes it)
    return paths


#: ``DataRef.videos`` -> (config, row) -> the row's video, relative paths in lmms-eval's order of preference
LAYOUTS: dict[str, Callable[[Optional[str], dict], list[str]]] = {
    "videomme": _videomme, "mvbench": _mvbench, "egoschema": _egoschema,
}
#: the columns each layout reads of a row
LAYOUT_COLUMNS = {"videomme": ("videoID",), "mvbench": ("video",), "egoschema": ("video_idx",)}


class VideoNotFound(FileNotFoundError):
    """A row's video is in neither the snapshot nor its unpacked archives; the message names both places."""


# ------------------------------------------------------------------------------------------ unpacking
def archives(snapshot: Path) -> list[Path]:
    """The zip archives of a snapshot (hidden entries such as ``.cache/`` left out), sorted."""
    from .snapshots import _data_files

    return [f for f in _data_files(snapshot) if f.suffix.lower() == ".zip"]


def unpacked_dir(snapshot: Path) -> Path:
    """Where :func:`unpack` puts a snapshot's archives: beside its tables, keyed on its identity."""
    from .snapshots import snapshot_cache_dir

    return Path(snapshot_cache_dir(snapshot)) / "videos"


def unpack(snapshot: "str | os.PathLike") -> Path:
    """Extract every zip archive of ``snapshot`` (members at their paths, as lmms-eval unzips into its cache dir) into
    :func:`unpacked_dir`, once: a complete directory is reused, a partial one (a killed extraction) never seen (the
    files go to a temporary directory renamed into place). Returns the directory (empty for a snapshot of plain files)."""
    snapshot = Path(snapshot).expanduser().resolve()
    out = unpacked_dir(snapshot)
    if (out / DONE).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=out.parent))
    try:
        for archive in archives(snapshot):
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():
                    target = (tmp / info.filename).resolve()
                    if not str(target).startswith(str(tmp.resolve()) + os.sep):
                        raise ValueError(f"{archive}: member {info.filename!r} would be written outside the directory")
                    if not target.exists():  # lmms-eval keeps the first copy of a path (its unzip skips existing files)
                        z.extract(info, tmp)
        (tmp / DONE).write_text(f"{snapshot}\n", encoding="utf-8")
        if out.exists():  # an earlier extraction that did not finish: never marked done
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if (out / DONE).is_file():  # another process finished first
            return out
        raise
    return out


def locate(snapshot: Path, layout: str, config: Optional[str], doc: dict, unpacked: Optional[Path] = None) -> Path:
    """The video of row ``doc`` (config ``config``) of a snapshot: the first of the layout's paths found in the
    snapshot itself, else among its unpacked archives (``unpacked``: :func:`unpack`'s directory)."""
    candidates = LAYOUTS[layout](config, doc)
    for base in [snapshot] + ([unpacked] if unpacked is not None else []):
        for rel in candidates:
            if (base / rel).exists():
                return base / rel
    where = f"{snapshot}" + (f" or {unpacked}" if unpacked is not None else "")
    raise VideoNotFound(f"video {candidates[0]} (row {_row_id(doc)}) is in neither {where}; the snapshot needs the "
                        "benchmark's video archives (hf download ... --repo-type dataset fetches them with the tables).")


def _row_id(doc: dict) -> str:
    for key in ("question_id", "question_idx", "video", "videoID", "video_idx"):
        if key in doc:
            return f"{key}={doc[key]!r}"
    return "?"


@functools.lru_cache(maxsize=16)
def _offline_root(hub_id: str, root: str) -> tuple[Path, Path]:
    """(snapshot, unpacked dir) of ``hub_id`` under the data root, unpacked once per process and identity."""
    from .snapshots import local_dir

    snapshot = local_dir(hub_id, root).resolve()
    return snapshot, unpack(snapshot)


def offline_video(hub_id: str, layout: str, config: Optional[str], doc: dict) -> Optional[Path]:
    """The local video of a row when a data root is set (:envvar:`PMOD_BENCH_DATA`), else None (lmms-eval's own)."""
    from pmod_bench.model.sources import data_root

    root = data_root()
    if root is None:
        return None
    snapshot, unpacked = _offline_root(hub_id, str(root))
    return locate(snapshot, layout, config, doc, unpacked)


# ------------------------------------------------------------------------------- adapter functions
def videomme_doc_to_visual(doc):
    """lmms-eval's ``videomme_doc_to_visual``, reading a local snapshot when ``PMOD_BENCH_DATA`` is set."""
    path = offline_video("lmms-eval/Video-MME", "videomme", None, doc)
    if path is None:
        from lmms_eval.tasks.videomme.utils import videomme_doc_to_visual as builtin

        return builtin(doc)
    return [str(path)]


def egoschema_doc_to_visual(doc):
    """lmms-eval's ``egoschema_doc_to_visual``, reading a local snapshot when ``PMOD_BENCH_DATA`` is set."""
    path = offline_video("lmms-eval/egoschema", "egoschema", "Subset", doc)
    if path is None:
        from lmms_eval.tasks.egoschema.utils import egoschema_doc_to_visual as builtin

        return builtin(doc)
    return [str(path)]


def mvbench_doc_to_visual(doc, lmms_eval_specific_kwargs=None):
    """lmms-eval's ``mvbench_doc_to_visual`` (the sub-task's folder of ``DATA_LIST``), reading a local snapshot when
    ``PMOD_BENCH_DATA`` is set."""
    sub = (lmms_eval_specific_kwargs or {})["sub_task"]
    path = offline_video("OpenGVLab/MVBench", "mvbench", sub, doc)
    if path is None:
        from lmms_eval.tasks.mvbench.utils import mvbench_doc_to_visual as builtin

        return builtin(doc, lmms_eval_specific_kwargs)
    return [str(path)]


def mvbench_frames_doc_to_visual(doc, lmms_eval_specific_kwargs=None):
    """lmms-eval's ``mvbench_frames_doc_to_visual`` (a folder of frames, as PIL images), reading a local snapshot when
    ``PMOD_BENCH_DATA`` is set; the frames in name order (lmms-eval's ``os.listdir`` order is the file system's)."""
    from PIL import Image

    sub = (lmms_eval_specific_kwargs or {})["sub_task"]
    path = offline_video("OpenGVLab/MVBench", "mvbench", sub, doc)
    if path is None:
        from lmms_eval.tasks.mvbench.utils import mvbench_frames_doc_to_visual as builtin

        return builtin(doc, lmms_eval_specific_kwargs)
    return [Image.open(f).convert("RGB") for f in frame_files(path)]


def frame_files(folder: Path) -> list[Path]:
    return sorted(f for f in Path(folder).iterdir() if f.suffix.lower() in FRAME_SUFFIXES)


# ------------------------------------------------------------------------------------------ probing
@dataclass(frozen=True)
class VideoInfo:
    """What OpenCV reads of one video (or frame folder)."""

    path: str
    frames: int
    fps: float
    """frames per second the container declares (0 for a frame folder)"""
    width: int
    height: int

    @property
    def duration_s(self) -> float:
        return self.frames / self.fps if self.fps > 0 else 0.0


def probe(path: "str | os.PathLike") -> VideoInfo:
    """Open ``path`` with OpenCV and decode its first and last frames (a frame folder: every frame); raises ValueError
    naming what failed (no stream, no frames, a frame that does not decode)."""
    import cv2

    path = Path(path)
    if path.is_dir():
        files = frame_files(path)
        if not files:
            raise ValueError(f"{path}: a frame folder without {', '.join(FRAME_SUFFIXES)} files")
        shapes = set()
        for f in files:
            img = cv2.imread(str(f))
            if img is None:
                raise ValueError(f"{f}: the frame does not decode")
            shapes.add(img.shape[:2])
        h, w = shapes.pop()
        return VideoInfo(str(path), len(files), 0.0, w, h)
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise ValueError(f"{path}: OpenCV finds no video stream in it")
        frames, fps = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), float(cap.get(cv2.CAP_PROP_FPS))
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if frames < 1:
            raise ValueError(f"{path}: the container declares no frames")
        for index in sorted({0, frames - 1}):
            cap.set(cv2.CAP_PROP_POS_FRAMES, index)
            ok, frame = cap.read()
            if not ok or frame is None:
                raise ValueError(f"{path}: frame {index} of {frames} does not decode")
        return VideoInfo(str(path), frames, fps, w, h)
    finally:
        cap.release()


def zip_members(snapshot: Path) -> set[str]:
    """Every member path of the snapshot's zip archives and every folder above one (read from their central
    directories: no extraction)."""
    names: set[str] = set()
    for archive in archives(snapshot):
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                parts = name.rstrip("/").split("/")
                names.update("/".join(parts[:k]) for k in range(1, len(parts) + 1))
    return names


def present(snapshot: Path, layout: str, config: Optional[str], doc: dict, members: set[str]) -> bool:
    """Whether a row's video is in the snapshot, as a file / folder or a zip member (:func:`zip_members`)."""
    return any((snapshot / rel).exists() or rel in members for rel in LAYOUTS[layout](config, doc))


__all__ = ["MVBENCH_FOLDERS", "LAYOUTS", "LAYOUT_COLUMNS", "VideoNotFound", "VideoInfo", "archives", "unpacked_dir", "unpack", "locate",
           "offline_video", "videomme_doc_to_visual", "egoschema_doc_to_visual", "mvbench_doc_to_visual",
           "mvbench_frames_doc_to_visual", "frame_files", "probe", "zip_members", "present"]
