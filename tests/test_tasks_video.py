"""Video benchmarks offline (``--suite video``): fixtures in each hub repository's layout (tables + generated clips in
zip archives), found by the adapters' ``doc_to_visual`` through lmms-eval's own task loading, scored by lmms-eval's
functions, and opened by ``pmod-bench data check --decode``; damaged copies named in one line."""

from __future__ import annotations

import inspect
import shutil
import zipfile

import pytest

pytest.importorskip("lmms_eval")

from conftest import oracle_lm  # noqa: E402
from pmod_bench.tasks.benchmarks import MVBENCH_TASKS, SUITES, VIDEO_BENCHMARKS, resolve_suite  # noqa: E402
from pmod_bench.tasks.data import check_benchmark  # noqa: E402
from pmod_bench.tasks.fixtures import generate  # noqa: E402

VIDEO = tuple(VIDEO_BENCHMARKS)


@pytest.fixture(scope="module")
def video_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("video-data")
    generate(root, VIDEO)
    return root


@pytest.fixture
def offline(video_root, tmp_path, monkeypatch):
    """PMOD_BENCH_DATA on the fixtures, a datasets cache of this test's own (the unpacked videos go beside it)."""
    from pmod_bench.tasks import video

    monkeypatch.setenv("PMOD_BENCH_DATA", str(video_root))
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "cache"))
    video._offline_root.cache_clear()
    yield video_root
    video._offline_root.cache_clear()


@pytest.fixture
def broken(video_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(video_root, root)
    return root


def test_mvbench_folders_are_lmms_evals():
    from lmms_eval.tasks.mvbench.utils import DATA_LIST

    from pmod_bench.tasks.video import MVBENCH_FOLDERS

    assert MVBENCH_FOLDERS == DATA_LIST and set(MVBENCH_FOLDERS) == set(MVBENCH_TASKS)


def test_video_suite_is_apart_from_the_papers():
    assert [b.key for b in resolve_suite("video")] == ["VideoMME", "MVBench", "EgoSchema"] == list(SUITES["video"])
    assert not set(SUITES["video"]) & set(SUITES["all"])
    assert VIDEO_BENCHMARKS["MVBench"].components == tuple(f"pmod_mvbench_{t}" for t in MVBENCH_TASKS)


def test_fixtures_follow_the_hub_layouts_and_check_clean(video_root):
    mme = video_root / "lmms-eval/Video-MME"
    assert (mme / "videomme/test-00000-of-00001.parquet").is_file()
    assert zipfile.ZipFile(mme / "videos_chunked_01.zip").namelist() == ["data/fFjv93ACGo8.mp4"]
    assert zipfile.ZipFile(mme / "videos_chunked_02.zip").namelist() == ["data/ZbY4kgA2tSE.MP4"]  # lmms-eval's .MP4 fallback
    ego = video_root / "lmms-eval/egoschema"
    assert (ego / "Subset/test-00000-of-00001.parquet").is_file()
    assert all(n.startswith("videos/") and n.endswith(".mp4") for n in zipfile.ZipFile(ego / "videos_chunked_01.zip").namelist())
    mv = video_root / "OpenGVLab/MVBench"
    assert sorted(p.stem for p in (mv / "json").glob("*.json")) == sorted(MVBENCH_TASKS)
    assert "star/Charades_segment/action_sequence_000.mp4" in zipfile.ZipFile(mv / "video/star.zip").namelist()
    for key in VIDEO:
        statuses = check_benchmark(VIDEO_BENCHMARKS[key], video_root)
        assert all(s.ok for s in statuses), [s.error for s in statuses if not s.ok]
    import datasets

    rows = datasets.load_dataset(str(mme), split="test", cache_dir=str(video_root.parent / "c"))  # its sole config
    assert rows.column_names == ["video_id", "duration", "domain", "sub_category", "url", "videoID", "question_id",
                                 "task_type", "question", "options", "answer"]
    assert [r["question_id"] for r in rows] == ["001-1", "001-2", "001-3", "002-1", "002-2", "002-3"]


def _tasks(names):
    from lmms_eval.tasks import get_task_dict

    from pmod_bench.tasks.runner import task_manager

    out = {}

    def leaves(d):
        for k, v in d.items():
            if isinstance(v, dict):
                leaves(v)
            else:
                out[getattr(k, "group_name", k) if not isinstance(k, str) else k] = v

    leaves(get_task_dict(list(names), task_manager()))
    return out


def test_adapters_find_the_videos_and_score_the_ground_truth(offline, tmp_path):
    """Through lmms-eval's own task loading: every row's doc_to_visual is a clip OpenCV opens (MVBench
    episodic_reasoning: its frames in order), and lmms-eval's metrics give the ground truth 100."""
    from pmod_bench.tasks.video import probe

    tasks = _tasks(["pmod_videomme", "pmod_egoschema_subset", "pmod_mvbench"])
    assert sorted(tasks) == sorted(["pmod_videomme", "pmod_egoschema_subset", *VIDEO_BENCHMARKS["MVBench"].components])
    letters = {}
    for name, task in tasks.items():
        docs = list(task.test_docs())
        assert docs, name
        for doc in docs:
            visual = task.doc_to_visual(doc)
            if name == "pmod_mvbench_episodic_reasoning":
                xs = [_disc_x(img) for img in visual]
                assert len(visual) == 6 and xs == sorted(xs) and xs[0] < xs[-1]
                continue
            (path,) = visual
            assert str(path).startswith(str(tmp_path / "cache" / "pmod_bench_snapshots")), path  # unpacked beside the tables
            assert probe(path).frames >= 20
            assert doc["question"] in task.doc_to_text(doc)
        letters[name] = docs
    scores = {}
    for name, docs in letters.items():
        task = tasks[name]
        results = [task.process_results(doc, [_truth(name, doc)]) for doc in docs]
        (metric,) = [m for m in task.aggregation() if m in results[0]]  # the YAML's metric (EgoSchema: score)
        agg = task.aggregation()[metric]
        extra = (None,) if "args" in inspect.signature(agg).parameters else ()  # lmms-eval hands some its CLI args
        scores[name] = agg([r[metric] for r in results], *extra)
    assert scores["pmod_videomme"] == 100.0 and scores["pmod_egoschema_subset"] == 1.0
    assert all(scores[t] == 100.0 for t in VIDEO_BENCHMARKS["MVBench"].components if t in scores)


def _truth(task: str, doc: dict) -> str:
    """The ground-truth answer as a model would write it (the option letter)."""
    if task == "pmod_videomme":
        return doc["answer"]
    if task == "pmod_egoschema_subset":
        return "ABCDE"[int(doc["answer"])]
    return f"({'ABCDE'[doc['candidates'].index(doc['answer'])]}) {doc['answer']}"


def _disc_x(img) -> int:
    """Column of the red disc (the reddest column) in a PIL frame."""
    import numpy as np

    a = np.asarray(img).astype(int)
    return int((a[..., 0] - a[..., 2]).sum(axis=0).argmax())


def test_without_a_data_root_lmms_evals_own_function_runs(monkeypatch):
    from lmms_eval.tasks.mvbench.utils import mvbench_doc_to_visual as builtin

    from pmod_bench.tasks.video import mvbench_doc_to_visual

    monkeypatch.delenv("PMOD_BENCH_DATA", raising=False)
    doc, kwargs = {"video": "x.mp4"}, {"sub_task": "moving_count"}
    assert mvbench_doc_to_visual(doc, kwargs) == builtin(doc, kwargs)


def test_unpacked_once_per_identity(video_root, tmp_path, monkeypatch):
    from pmod_bench.tasks.video import DONE, unpack

    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "cache"))
    snap = tmp_path / "copy"
    shutil.copytree(video_root / "lmms-eval/egoschema", snap)
    first = unpack(snap)
    marker = (first / DONE).stat().st_mtime_ns
    assert unpack(snap) == first and (first / DONE).stat().st_mtime_ns == marker  # reused, not extracted again
    assert sorted(p.name for p in (first / "videos").iterdir()) == sorted(
        n.split("/")[1] for n in zipfile.ZipFile(snap / "videos_chunked_01.zip").namelist())
    (snap / "README.md").write_text((snap / "README.md").read_text() + "\nedited\n")
    assert unpack(snap) != first  # another identity, another directory


def test_data_check_decode_opens_every_video(video_root, tmp_path, monkeypatch, capsys):
    from pmod_bench.cli import main

    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "cache"))
    assert main(["data", "check", "video", "--root", str(video_root), "--decode"]) == 0
    out = capsys.readouterr().out
    assert "default: 2 video(s) open, 30-30 frames, 3.0-3.0 s, 128x72" in out  # Video-MME
    assert "Subset: 2 video(s) open, 32-32 frames, 4.0-4.0 s, 96x96" in out  # EgoSchema
    assert "episodic_reasoning: 1 frame folder(s) open, 6-6 frames, 64x48" in out
    assert out.count("1 video(s) open, 20-20 frames, 2.0-2.0 s, 80x48") == 19
    assert "all present and valid, every image and video decodes" in out


def test_damaged_videos_are_named(broken, tmp_path, monkeypatch, capsys):
    from pmod_bench.cli import main

    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "cache"))
    (broken / "lmms-lab" / "x").mkdir(parents=True)  # unrelated directories are ignored
    (broken / "lmms-eval/Video-MME/videos_chunked_02.zip").unlink()
    (st,) = check_benchmark(VIDEO_BENCHMARKS["VideoMME"], broken)
    assert not st.ok and "3 row(s) have no video in the snapshot or its zip archives" in st.error
    assert "data/ZbY4kgA2tSE.mp4" in st.error and "hf download" in st.error
    archive = broken / "lmms-eval/egoschema/videos_chunked_01.zip"
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
        data = {n: z.read(n) for n in names}
    with zipfile.ZipFile(archive, "w") as z:  # the first clip cut to a header: it no longer decodes
        for n in names:
            z.writestr(n, data[n][:200] if n == names[0] else data[n])
    assert main(["data", "check", "EgoSchema", "--root", str(broken), "--decode"]) == 1
    out = capsys.readouterr().out
    assert "EgoSchema: lmms-eval/egoschema [Subset]: 1 video(s) do not open: split 'test' row 0" in out
    assert "1 problem(s)" in out


@pytest.mark.slow
def test_video_suite_end_to_end_through_the_runner(offline, tmp_path):
    """`pmod-bench eval --suite video`'s runner with an oracle model: lmms-eval builds every request offline, each
    request's doc_to_visual opens with OpenCV (frame folders as PIL frames), and the ground truth scores 100 in each
    benchmark's units (MVBench: the mean of its 20 tasks, reported per task)."""
    from pmod_bench.tasks.runner import EvalConfig, run_eval
    from pmod_bench.tasks.video import probe

    opened = []

    def answer(task, doc, request):
        for v in request.args[2](doc):  # the request's doc_to_visual
            opened.append(probe(v).frames if isinstance(v, str) else v.size)
        return _truth(task, doc)

    out = run_eval(EvalConfig(model="oracle", suite="video", output=str(tmp_path / "run")), lm=oracle_lm(answer), log=lambda m: None)
    assert out.failures == {}
    rows = {r["benchmark"]: r for r in out.rows}
    assert {k: r["value"] for k, r in rows.items()} == {"VideoMME": 100.0, "MVBench": 100.0, "EgoSchema": 100.0}
    assert (rows["VideoMME"]["n"], rows["MVBench"]["n"], rows["EgoSchema"]["n"]) == (6, 20, 2)
    assert set(rows["MVBench"]["components"]) == set(VIDEO_BENCHMARKS["MVBench"].components)
    assert len(opened) == 6 + 19 + 6 + 2  # every clip (episodic_reasoning: 6 frames) opened
