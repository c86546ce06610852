"""Tiny benchmark datasets in the hub schema, laid out as snapshots under ``ROOT/ORG/NAME``.

``pmod-bench data fixtures DIR`` (and the tests) write, for every benchmark, a few rows with the
same configs, splits and columns (PIL images as HF ``Image`` features) as the hub dataset its adapter
task reads, as parquet files at the snapshot's paths plus a README.md whose ``configs:`` section
maps them, exactly like ``push_to_hub`` output. With ``PMOD_BENCH_DATA=DIR`` the adapters then run
end to end offline: prompt building, generation, answer parsing and the metric.

The rows are built so that answering with the ground truth scores 100 (MME: 200 per perception
category present), which lets a test check each adapter's metric and units.

The video benchmarks (``--suite video``: Video-MME, MVBench, EgoSchema) get their tables in the hub's own files
(parquet; MVBench's JSON) and short generated clips (:func:`write_clip`) packed in zip archives the way each repository
ships them, at the paths lmms-eval's ``doc_to_visual`` expects after unzipping (``pmod_bench.tasks.video``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from .benchmarks import BENCHMARKS, MVBENCH_TASKS, VIDEO_BENCHMARKS

# (hub_id, config or None) -> {split: (features, rows)}
Tables = dict[tuple[str, Optional[str]], dict[str, tuple[Any, list[dict]]]]


def image(seed: int, width: int = 64, height: int = 48):
    """A small deterministic RGB image: gradient, a red disc and a blue box (positions vary by seed)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), ((seed * 37) % 256, 200, (seed * 91) % 256))
    d = ImageDraw.Draw(img)
    o = seed % 5
    d.ellipse([2 + o, 3, width // 2 + o, height // 2 + 3], fill=(220, 30, 30))
    d.rectangle([width // 2, height // 2 - o, width - 3, height - 3], fill=(30, 30, 220))
    return img


def write_clip(path: "str | os.PathLike", seconds: float = 2.0, size: tuple[int, int] = (96, 54), fps: float = 10.0,
               seed: int = 0) -> Path:
    """A short generated clip written with OpenCV (``cv2.VideoWriter``): a red disc crossing a coloured background left
    to right, a blue box in the corner, one frame every ``1 / fps`` s; MPEG-4 video (``mp4v``) in an ``.mp4`` container,
    the container the video benchmarks ship (their own files are H.264, which OpenCV's wheels do not write). Frame i's
    disc is at x = i / (frames - 1) of the width, so a decoder can be checked frame by frame."""
    import cv2
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    frames = max(int(round(seconds * fps)), 1)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path} (mp4v); its build lacks an MPEG-4 encoder.")
    try:
        for i in range(frames):
            frame = np.full((h, w, 3), ((seed * 37) % 200 + 30, 160, (seed * 91) % 200 + 30), np.uint8)  # BGR
            x = int(round(i * (w - 1) / max(frames - 1, 1)))
            cv2.circle(frame, (x, h // 2), max(h // 6, 2), (30, 30, 220), -1)
            cv2.rectangle(frame, (w - w // 5, 0), (w - 1, h // 5), (220, 30, 30), -1)
            writer.write(frame)
    finally:
        writer.release()
    return path


def _F(**spec):
    from datasets import Features

    return Features(spec)


def _v(dtype: str = "string"):
    from datasets import Value

    return Value(dtype)


def _img():
    from datasets import Image

    return Image()


def _list(feature):
    from datasets import List

    return List(feature)


# ----------------------------------------------------------------------------------- per benchmark
def _vqav2() -> Tables:
    f = _F(question_type=_v(), multiple_choice_answer=_v(), answers=_list({"answer": _v(), "answer_confidence": _v(),
                                                                            "answer_id": _v("int64")}),
           image_id=_v("int64"), answer_type=_v(), question_id=_v("int64"), question=_v(), image=_img())
    qa = [("what color is the disc", "red", "other"), ("is there a box", "yes", "yes/no"), ("how many shapes", "2", "number")]
    rows = [dict(question_type=q.split()[0], multiple_choice_answer=a, answer_type=t, image_id=100 + i, question_id=1000 + i,
                 question=q + "?", image=image(i),
                 answers=[{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)])
            for i, (q, a, t) in enumerate(qa)]
    return {("lmms-lab-encoder/VQAv2", None): {"validation": (f, rows)}}


def _gqa() -> Tables:
    fi = _F(id=_v(), imageId=_v(), question=_v(), answer=_v(), fullAnswer=_v(), isBalanced=_v("bool"),
            groups={"global": _v(), "local": _v()}, entailed=_list(_v()), equivalent=_list(_v()),
            types={"structural": _v(), "semantic": _v(), "detailed": _v()}, semanticStr=_v())
    qa = [("n1", "Is the disc red?", "yes"), ("n2", "What color is the box?", "blue"), ("n1", "Which shape is on the left?", "disc")]
    rows = [dict(id=f"20{i}", imageId=img, question=q, answer=a, fullAnswer=f"The answer is {a}.", isBalanced=True,
                 groups={"global": "", "local": f"q{i}"}, entailed=[], equivalent=[f"20{i}"],
                 types={"structural": "query", "semantic": "attr", "detailed": "color"}, semanticStr="select: disc")
            for i, (img, q, a) in enumerate(qa)]
    fim = _F(id=_v(), image=_img())
    images = [dict(id="n1", image=image(11)), dict(id="n2", image=image(12, 48, 64)), dict(id="n3", image=image(13))]
    return {("lmms-lab-encoder/GQA", "testdev_balanced_instructions"): {"testdev": (fi, rows)},
            ("lmms-lab-encoder/GQA", "testdev_balanced_images"): {"testdev": (fim, images)}}


def _okvqa() -> Tables:
    f = _F(question_type=_v(), answers=_list(_v()), answer_type=_v(), image_id=_v("int64"), question_id=_v("int64"),
           question=_v(), image=_img())
    qa = [("What fruit is red", "apple"), ("What sport uses this ball", "tennis"), ("Which season is shown", "winter")]
    rows = [dict(question_type="other", answers=[a] * 10, answer_type="other", image_id=200 + i, question_id=2000 + i,
                 question=q + "?", image=image(20 + i)) for i, (q, a) in enumerate(qa)]
    return {("lmms-lab-encoder/OK-VQA", None): {"val2014": (f, rows)}}


def _ai2d() -> Tables:
    f = _F(question=_v(), options=_list(_v()), answer=_v(), image=_img())
    rows = [dict(question="Which shape is red?", options=["box", "disc", "line", "none"], answer="1", image=image(30)),
            dict(question="What eats grass?", options=["lion", "cow", "hawk", "snake"], answer="1", image=image(31)),
            dict(question="Which stage comes first?", options=["egg", "larva", "pupa", "adult"], answer="0", image=image(32))]
    return {("lmms-lab-encoder/ai2d", None): {"test": (f, rows)}}


def _sqa() -> Tables:
    f = _F(image=_img(), question=_v(), choices=_list(_v()), answer=_v("int8"), hint=_v(), task=_v(), grade=_v(),
           subject=_v(), topic=_v(), category=_v(), skill=_v(), lecture=_v(), solution=_v())
    base = dict(task="closed choice", grade="grade4", subject="natural science", topic="physics", category="Magnets",
                skill="Identify magnets", lecture="Magnets attract.", solution="Look at the picture.")
    rows = [dict(base, image=image(40), question="Which is a solid?", choices=["milk", "rock"], answer=1, hint=""),
            dict(base, image=image(41), question="Which color is the disc?", choices=["red", "green", "blue"], answer=0,
                 hint="Look at the left shape."),
            dict(base, image=image(42), question="Will these magnets attract?", choices=["attract", "repel"], answer=1, hint="")]
    return {("lmms-lab-encoder/ScienceQA", "ScienceQA-IMG"): {"test": (f, rows)}}


def _docvqa_info() -> Tables:
    fd = _F(questionId=_v(), question=_v(), question_types=_list(_v()), image=_img(), docId=_v("int64"),
            ucsf_document_id=_v(), ucsf_document_page_no=_v(), answers=_list(_v()), data_split=_v())
    dq = [("What is the title?", ["annual report"]), ("What is the date?", ["may 5, 1998", "5/5/98"]), ("Who signed it?", ["j. smith"])]
    drows = [dict(questionId=str(300 + i), question=q, question_types=["layout"], image=image(50 + i, 48, 64), docId=7 + i,
                  ucsf_document_id=f"x{i}", ucsf_document_page_no="1", answers=a, data_split="val") for i, (q, a) in enumerate(dq)]
    fi = _F(questionId=_v(), question=_v(), answers=_list(_v()), answer_type=_list(_v()), image=_img(), image_url=_v(),
            **{"operation/reasoning": _list(_v())}, ocr=_v(), data_split=_v())
    iq = [("What percent use phones?", ["45%"]), ("Which country is shown?", ["france"]), ("How many icons?", ["6"])]
    irows = [dict(questionId=str(400 + i), question=q, answers=a, answer_type=["single span"], image=image(60 + i, 40, 72),
                  image_url="", **{"operation/reasoning": []}, ocr="", data_split="val") for i, (q, a) in enumerate(iq)]
    return {("lmms-lab-encoder/DocVQA", "DocVQA"): {"validation": (fd, drows)},
            ("lmms-lab-encoder/DocVQA", "InfographicVQA"): {"validation": (fi, irows)}}


def _textvqa() -> Tables:
    f = _F(image_id=_v(), question_id=_v("int64"), question=_v(), question_tokens=_list(_v()), image=_img(),
           image_width=_v("int64"), image_height=_v("int64"), flickr_original_url=_v(), flickr_300k_url=_v(),
           answers=_list(_v()), image_classes=_list(_v()), set_name=_v(), ocr_tokens=_list(_v()))
    qa = [("what brand is the bottle", "coke"), ("what number is on the shirt", "23"), ("what does the sign say", "stop")]
    rows = [dict(image_id=f"t{i}", question_id=500 + i, question=q + "?", question_tokens=q.split(), image=image(70 + i),
                 image_width=64, image_height=48, flickr_original_url="", flickr_300k_url="", answers=[a] * 10,
                 image_classes=["Sign"], set_name="val", ocr_tokens=[a]) for i, (q, a) in enumerate(qa)]
    return {("lmms-lab-encoder/textvqa", None): {"validation": (f, rows)}}


def _chartqa() -> Tables:
    f = _F(type=_v(), question=_v(), answer=_v(), image=_img())
    rows = [dict(type="human_test", question="What is the highest value?", answer="42", image=image(80, 72, 48)),
            dict(type="human_test", question="Which year is lowest?", answer="2015", image=image(81, 72, 48)),
            dict(type="augmented_test", question="What is the value of blue?", answer="7.5", image=image(82, 72, 48)),
            dict(type="augmented_test", question="Which color is largest?", answer="red", image=image(83, 72, 48))]
    return {("lmms-lab-encoder/ChartQA", None): {"test": (f, rows)}}


def _pope() -> Tables:
    f = _F(id=_v(), question_id=_v(), question=_v(), answer=_v(), image_source=_v(), image=_img(), category=_v())
    splits: dict[str, tuple[Any, list[dict]]] = {}
    everything = []
    for s, split in enumerate(("adversarial", "popular", "random")):
        rows = [dict(id=str(3 * s + k), question_id=str(600 + 3 * s + k), question=f"Is there a {obj} in the image?", answer=a,
                     image_source=f"COCO_val2014_{s}{k}", image=image(90 + 3 * s + k), category=split)
                for k, (obj, a) in enumerate((("disc", "yes"), ("dog", "no")))]
        splits[split] = (f, rows)
        everything += rows
    return {("lmms-lab-encoder/POPE", "Full"): splits, ("lmms-lab-encoder/POPE", None): {"test": (f, everything)}}


def _seed() -> Tables:
    f = _F(answer=_v(), choice_a=_v(), choice_b=_v(), choice_c=_v(), choice_d=_v(), data_id=_v(), data_type=_v(),
           question=_v(), question_id=_v(), question_type_id=_v("int64"), image=_list(_img()), segment=_v())
    rows = [dict(answer="A", choice_a="red", choice_b="green", choice_c="blue", choice_d="black", data_id="1.jpg",
                 data_type="image", question="What color is the disc?", question_id="101", question_type_id=1,
                 image=[image(110)], segment=""),
            dict(answer="C", choice_a="one", choice_b="two", choice_c="three", choice_d="four", data_id="2.jpg",
                 data_type="image", question="How many shapes?", question_id="102", question_type_id=2,
                 image=[image(111, 48, 64)], segment=""),
            dict(answer="B", choice_a="walking", choice_b="running", choice_c="sitting", choice_d="jumping",
                 data_id="v1.mp4", data_type="video", question="What is the person doing?", question_id="103",
                 question_type_id=10, image=[image(112), image(113)], segment="[0, 8]"),
            dict(answer="D", choice_a="top", choice_b="bottom", choice_c="left", choice_d="right", data_id="3.jpg",
                 data_type="image", question="Where is the box?", question_id="104", question_type_id=3,
                 image=[image(114)], segment="")]
    return {("lmms-lab-encoder/SEED-Bench", None): {"test": (f, rows)}}


def _rwqa() -> Tables:
    f = _F(image=_img(), question=_v(), answer=_v())
    mc = "\nPlease answer directly with only the letter of the correct option and nothing else."
    rows = [dict(image=image(120, 72, 40), question="Which lane is the car in?\nA. left\nB. middle\nC. right" + mc, answer="A"),
            dict(image=image(121, 72, 40), question="Is the light green?\nA. yes\nB. no" + mc, answer="B"),
            dict(image=image(122, 72, 40), question="How many cars are there? Please answer directly with a single word or number.",
                 answer="2")]
    return {("lmms-lab-encoder/RealWorldQA", None): {"test": (f, rows)}}


def _mme() -> Tables:
    """Rows in the real split's order: it starts with cognition (``code_reasoning``, 40 rows on the hub),
    perception categories follow; each image has a Yes and a No question (one ``question_id``)."""
    f = _F(question_id=_v(), image=_img(), question=_v(), answer=_v(), category=_v())
    rows = []
    items = (("code_reasoning", "Does this code print 3?"), ("code_reasoning", "Does this code print 7?"),
             ("existence", "Is there a red disc in this image?"), ("count", "Are there two shapes in this image?"))
    for i, (cat, q) in enumerate(items):
        qid = f"{cat}/{i:04d}.png"
        img = image(130 + i)
        rows.append(dict(question_id=qid, image=img, question=q + " Please answer yes or no.", answer="Yes", category=cat))
        rows.append(dict(question_id=qid, image=img, question=q.replace("red", "green").replace("two", "five")
                         .replace("3", "4").replace("7", "8") + " Please answer yes or no.", answer="No", category=cat))
    return {("lmms-lab-encoder/MME", None): {"test": (f, rows)}}


def _mmbench() -> Tables:
    f = _F(index=_v("int64"), question=_v(), hint=_v(), answer=_v(), A=_v(), B=_v(), C=_v(), D=_v(), category=_v(),
           image=_img(), source=_v(), **{"L2-category": _v()}, comment=_v(), split=_v())
    base = dict(category="attribute_recognition", source="fixture", comment="", split="dev", **{"L2-category": "Attribute"})
    rows = [dict(base, index=0, question="What color is the disc?", hint=None, answer="A", A="red", B="blue", C="green", D="white",
                 image=image(140)),
            dict(base, index=1, question="Which shape is on the right?", hint="Two shapes are drawn.", answer="B", A="disc",
                 B="box", C="line", D=None, image=image(141)),
            dict(base, index=2, question="Is the background plain?", hint=None, answer="A", A="yes", B="no", C=None, D=None,
                 image=image(142)),
            dict(base, index=1000000, question="What color is the disc?", hint=None, answer="D", A="blue", B="green", C="white",
                 D="red", image=image(140))]  # CircularEval copy of index 0
    return {("lmms-lab-encoder/MMBench", "en"): {"dev": (f, rows)}}


def _mmmu() -> Tables:
    spec = dict(id=_v(), question=_v(), options=_v(), explanation=_v(), **{f"image_{k}": _img() for k in range(1, 8)},
                img_type=_v(), answer=_v(), topic_difficulty=_v(), question_type=_v(), subfield=_v())
    f = _F(**spec)
    empty = {f"image_{k}": None for k in range(2, 8)}
    rows = [dict(id="validation_Art_1", question="<image 1> Which color dominates the left shape?",
                 options="['blue', 'red', 'green', 'yellow']", explanation="", image_1=image(150), **empty,
                 img_type="['Paintings']", answer="B", topic_difficulty="Easy", question_type="multiple-choice", subfield="Drawing"),
            dict(id="validation_Math_1", question="How many shapes are in <image 1>?", options="[]", explanation="",
                 image_1=image(151), **empty, img_type="['Diagrams']", answer="2", topic_difficulty="Easy",
                 question_type="open", subfield="Geometry"),
            dict(id="validation_Biology_1", question="<image 1> Which organelle is shown?",
                 options="['nucleus', 'ribosome', 'mitochondrion']", explanation="", image_1=image(152), **empty,
                 img_type="['Microscopic Images']", answer="C", topic_difficulty="Medium", question_type="multiple-choice",
                 subfield="Cell Biology"),
            # several images in one question, as MMMU has (<image 1> ... <image 2> in the text, image_1 and image_2)
            dict(id="validation_Design_1", question="Which of <image 1> and <image 2> has its box on the right?",
                 options="['the first', 'the second', 'both', 'neither']", explanation="", image_1=image(153),
                 image_2=image(154, 48, 64), **{f"image_{k}": None for k in range(3, 8)}, img_type="['Diagrams']",
                 answer="C", topic_difficulty="Easy", question_type="multiple-choice", subfield="Design")]
    return {("lmms-lab-encoder/MMMU", None): {"validation": (f, rows)}}


def _refcoco(hub: str, seed: int) -> Tables:
    f = _F(question_id=_v(), image=_img(), question=_v(), answer=_list(_v()), segmentation=_list(_v("float32")),
           bbox=_list(_v("float32")), iscrowd=_v("int8"), file_name=_v())
    rows = [dict(question_id=f"{seed}{i}", image=image(seed + i), question="Please carefully observe the area circled in the image",
                 answer=[f"the {obj} on the {side}", f"{obj}"], segmentation=[2.0, 3.0, 30.0, 3.0, 30.0, 26.0],
                 bbox=[float(x) for x in box], iscrowd=0, file_name=f"COCO_train2014_{seed}{i}.jpg")
            for i, (obj, side, box) in enumerate((("disc", "left", (4, 6, 32, 24)), ("box", "right", (32, 24, 28, 20))))]
    return {(f"lmms-lab-encoder/{hub}", None): {"val": (f, rows)}}


_GENERATORS: dict[str, Callable[[], Tables]] = {
    "VQAv2": _vqav2, "GQA": _gqa, "OKVQA": _okvqa, "AI2D": _ai2d, "SQA": _sqa, "Doc": _docvqa_info, "Info": _docvqa_info,
    "Text": _textvqa, "Chart": _chartqa, "POPE": _pope, "SEED": _seed, "RWQA": _rwqa, "MME": _mme, "MMB": _mmbench,
    "MMMU": _mmmu, "RefCOCO": lambda: _refcoco("RefCOCO", 160), "RefCOCO+": lambda: _refcoco("RefCOCOplus", 170),
    "RefCOCOg": lambda: _refcoco("RefCOCOg", 180),
}
assert set(_GENERATORS) == set(BENCHMARKS), "every benchmark needs a fixture generator"


# ------------------------------------------------------------------------------------------- video
def _zip(archive: Path, members: dict[str, Path]) -> None:
    """A zip archive of ``members`` (member path -> file), stored uncompressed (video is compressed already)."""
    import zipfile

    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as z:
        for name, path in members.items():
            z.write(path, name)


def _parquet(path: Path, features: Any, rows: list[dict]) -> None:
    from datasets import Dataset

    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows, features=features).to_parquet(str(path))


def _videomme(root: Path, clips: Path) -> tuple[str, Path]:
    """lmms-eval/Video-MME: config ``videomme`` (test, parquet), videos in ``videos_chunked_NN.zip`` as
    ``data/<videoID>.mp4`` (the second video as ``.MP4``, which lmms-eval also accepts). Rows in the hub's order
    (by video, three questions each) with the categories lmms-eval's aggregation keys on."""
    hub = "lmms-eval/Video-MME"
    repo = root / hub
    f = _F(video_id=_v(), duration=_v(), domain=_v(), sub_category=_v(), url=_v(), videoID=_v(), question_id=_v(),
           task_type=_v(), question=_v(), options=_list(_v()), answer=_v())
    videos = [("001", "fFjv93ACGo8", "short", "Knowledge", "Humanity & History", ".mp4"),
              ("002", "ZbY4kgA2tSE", "medium", "Sports Competition", "Football", ".MP4")]
    qa = [("Counting Problem", "How many discs cross the frame?", ["A. 1.", "B. 2.", "C. 3.", "D. 4."], "A"),
          ("Temporal Perception", "Where does the disc move?", ["A. Up.", "B. Down.", "C. Left to right.", "D. Right to left."], "C"),
          ("Object Recognition", "What is in the top right corner?", ["A. A blue box.", "B. A red disc.", "C. A star.", "D. Text."], "A")]
    rows, members = [], {}
    for n, (vid, yt, duration, domain, sub, ext) in enumerate(videos):
        clip = write_clip(clips / f"{yt}.mp4", seconds=3.0, size=(128, 72), fps=10.0, seed=n)
        members[f"data/{yt}{ext}"] = clip
        rows += [dict(video_id=vid, duration=duration, domain=domain, sub_category=sub, url=f"https://www.youtube.com/watch?v={yt}",
                      videoID=yt, question_id=f"{vid}-{k + 1}", task_type=t, question=q, options=o, answer=a)
                 for k, (t, q, o, a) in enumerate(qa)]
    _parquet(repo / "videomme" / "test-00000-of-00001.parquet", f, rows)
    for i, (name, clip) in enumerate(members.items()):
        _zip(repo / f"videos_chunked_{i + 1:02d}.zip", {name: clip})
    (repo / "README.md").write_text(_readme(hub, {"videomme": ["test"]}), encoding="utf-8")
    return hub, repo


def _egoschema(root: Path, clips: Path) -> tuple[str, Path]:
    """lmms-eval/egoschema: config ``Subset`` (test, parquet: the 500 questions with answers, ``answer`` the option's
    index as a string), videos in ``videos_chunked_NN.zip`` as ``videos/<video_idx>.mp4``."""
    hub = "lmms-eval/egoschema"
    repo = root / hub
    f = _F(question_idx=_v(), question=_v(), video_idx=_v(), option=_list(_v()), answer=_v())
    ids = ["001934bb-81bd-4cd8-a574-0472ef3f6678", "00b9a0de-c59e-49cb-a127-6081e2fb8c8e"]
    rows = [dict(question_idx=ids[0], question="Taking into account the whole video, what does c do with the disc?",
                 video_idx=ids[0], answer="2",
                 option=["A. c paints it.", "B. c hides it.", "C. c moves it across the table.", "D. c breaks it.",
                         "E. c eats it."]),
            dict(question_idx=ids[1], question="What stays in the same place throughout the video?", video_idx=ids[1],
                 answer="0", option=["A. the box in the corner.", "B. the disc.", "C. the camera wearer.", "D. the table.",
                                     "E. nothing."])]
    members = {f"videos/{v}.mp4": write_clip(clips / f"{v}.mp4", seconds=4.0, size=(96, 96), fps=8.0, seed=10 + i)
               for i, v in enumerate(ids)}
    _parquet(repo / "Subset" / "test-00000-of-00001.parquet", f, rows)
    _zip(repo / "videos_chunked_01.zip", members)
    (repo / "README.md").write_text(_readme(hub, {"Subset": ["test"]}), encoding="utf-8")
    return hub, repo


def _mvbench(root: Path, clips: Path) -> tuple[str, Path]:
    """OpenGVLab/MVBench (revision ``video``): one config per task, ``json/<task>.json`` (a JSON array of
    ``video`` / ``question`` / ``candidates`` / ``answer``), videos in ``video/<source>.zip`` at
    ``<DATA_LIST[task]>/<video>``; episodic_reasoning's ``video`` is a folder of JPEG frames."""
    import json

    import cv2

    from .video import MVBENCH_FOLDERS as folders

    hub = "OpenGVLab/MVBench"
    repo = root / hub
    by_zip: dict[str, dict[str, Path]] = {}
    for i, task in enumerate(MVBENCH_TASKS):
        folder = folders[task]
        if task == "episodic_reasoning":
            video = "castle_s01e02_seg02_clip_00"
            for k in range(6):
                frame = clips / task / f"{k:05d}.jpg"
                frame.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(frame), _frame(64, 48, k, 6))
                by_zip.setdefault(folder.split("/")[0], {})[f"{folder}/{video}/{frame.name}"] = frame
        else:
            video = f"{task}_{i:03d}.mp4"
            clip = write_clip(clips / task / video, seconds=2.0, size=(80, 48), fps=10.0, seed=20 + i)
            by_zip.setdefault(folder.split("/")[0], {})[f"{folder}/{video}"] = clip
        candidates = ["left to right", "right to left", "up", "down"]
        row = dict(video=video, question=f"[{task}] In which direction does the red disc move?", candidates=candidates,
                   answer=candidates[0])
        (repo / "json").mkdir(parents=True, exist_ok=True)
        (repo / "json" / f"{task}.json").write_text(json.dumps([row], indent=1) + "\n", encoding="utf-8")
    for top, members in by_zip.items():
        _zip(repo / "video" / f"{top}.zip", members)
    lines = ["---", "configs:"] + [line for t in MVBENCH_TASKS for line in (f"- config_name: {t}", f"  data_files: json/{t}.json")]
    lines += ["---", "", f"# {hub} (pmod-bench fixture)", "", "A few generated rows and clips in the hub's layout. Not real data.", ""]
    (repo / "README.md").write_text("\n".join(lines), encoding="utf-8")
    return hub, repo


def _frame(w: int, h: int, k: int, n: int):
    """Frame ``k`` of ``n`` of :func:`write_clip`'s motion as a BGR array (for frame folders)."""
    import cv2
    import numpy as np

    frame = np.full((h, w, 3), (60, 160, 90), np.uint8)
    cv2.circle(frame, (int(round(k * (w - 1) / max(n - 1, 1))), h // 2), max(h // 6, 2), (30, 30, 220), -1)
    return frame


#: video benchmark key -> writer of its whole snapshot (tables, README, zip archives) under a root
_VIDEO_GENERATORS: dict[str, Callable[[Path, Path], tuple[str, Path]]] = {
    "VideoMME": _videomme, "MVBench": _mvbench, "EgoSchema": _egoschema,
}
assert set(_VIDEO_GENERATORS) == set(VIDEO_BENCHMARKS), "every video benchmark needs a fixture generator"


def _readme(hub_id: str, configs: dict[Optional[str], list[str]]) -> str:
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        name = config or "default"
        folder = "data" if config is None else config
        lines.append(f"- config_name: {name}")
        lines.append("  data_files:")
        for split in splits:
            lines += [f"  - split: {split}", f"    path: {folder}/{split}-*"]
    lines += ["---", "", f"# {hub_id} (pmod-bench fixture)", "",
              "A few generated rows in the hub dataset's schema, written by `pmod-bench data fixtures`. Not real data.", ""]
    return "\n".join(lines)


def generate(root: "str | os.PathLike", benchmarks: Optional[Iterable[str]] = None) -> dict[str, Path]:
    """Write fixture snapshots under ``root`` for the given benchmark keys (default: all).

    Returns {hub_id: directory}. Existing fixture files are overwritten.
    """
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    keys = list(benchmarks) if benchmarks is not None else list(BENCHMARKS)
    unknown = [k for k in keys if k not in _GENERATORS and k not in _VIDEO_GENERATORS]
    if unknown:
        raise ValueError(f"no fixture for {', '.join(unknown)}; known: {', '.join([*_GENERATORS, *_VIDEO_GENERATORS])}")
    tables: Tables = {}
    for key in dict.fromkeys(k for k in keys if k in _GENERATORS):
        for ref, splits in _GENERATORS[key]().items():
            tables.setdefault(ref, {}).update(splits)
    by_repo: dict[str, dict[Optional[str], list[str]]] = {}
    out: dict[str, Path] = {}
    bars = is_progress_bar_enabled()
    disable_progress_bar()
    try:
        for (hub_id, config), splits in tables.items():
            repo = Path(root) / hub_id
            folder = repo / ("data" if config is None else config)
            folder.mkdir(parents=True, exist_ok=True)
            for split, (features, rows) in splits.items():
                Dataset.from_list(rows, features=features).to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
            by_repo.setdefault(hub_id, {})[config] = list(splits)
            out[hub_id] = repo
        videos = [k for k in dict.fromkeys(keys) if k in _VIDEO_GENERATORS]
        if videos:
            import tempfile

            with tempfile.TemporaryDirectory() as clips:
                for key in videos:
                    hub_id, repo = _VIDEO_GENERATORS[key](Path(root), Path(clips) / key)
                    out[hub_id] = repo
    finally:
        if bars:
            enable_progress_bar()
    for hub_id, configs in by_repo.items():
        (Path(root) / hub_id / "README.md").write_text(_readme(hub_id, configs), encoding="utf-8")
    return out
