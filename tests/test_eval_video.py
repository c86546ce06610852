"""Video through ``pmod_llava`` on Qwen2.5-VL: its video requests are lmms-eval 0.7.3's ``qwen2_5_vl`` (chat class) ones.

1. Request equality: for one document of every video task's fixture (Video-MME, the 20 MVBench tasks, one of them a
   folder of frames, EgoSchema), the request ``pmod_llava`` builds for the tiny Qwen2.5-VL equals, byte for byte,
   the one lmms-eval's own ``lmms_eval.models.chat.qwen2_5_vl.Qwen2_5_VL`` builds from the same checkpoint in the
   hub's layout: the prompt, the processor (its video processor's settings), the processor call (the frames
   qwen-vl-utils read through decord, their metadata) and every tensor and keyword handed to ``generate``
   (``pixel_values_videos``, ``video_grid_thw``, ``second_per_grid_ts``). Only the model's ``generate`` is a stub.
2. The frame count rule (:mod:`pmod_bench.tasks.video_requests`) and the refusals.
3. End to end (slow): the video suite on fixtures through lmms-eval with the tiny p-MoD Qwen2.5-VL: the same answers
   at batch size 1 and 4.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lmms_eval")
pytest.importorskip("decord")

from conftest import benchmark_data_env  # noqa: E402
from conftest import lmms_eval_responses as responses  # noqa: E402
from lmms_capture import Recorder, recording_generate  # noqa: E402
from lmms_capture import same as _same  # noqa: E402
from pmod_bench.model.presets import TINY_QWEN_MAX_PIXELS, TINY_QWEN_MIN_PIXELS  # noqa: E402
from pmod_bench.tasks.benchmarks import VIDEO_BENCHMARKS  # noqa: E402

#: small frames and few of them: the tiny model's pixel range, 4 frames a clip (lmms-eval's model_args)
SMALL = {"min_pixels": TINY_QWEN_MIN_PIXELS, "max_pixels": TINY_QWEN_MAX_PIXELS, "max_num_frames": 4}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    yield from benchmark_data_env(tmp_path_factory, list(VIDEO_BENCHMARKS))


@pytest.fixture(scope="module")
def qwen():
    from pmod_bench.model.presets import build_preset

    return build_preset("tiny-qwen2.5-vl", pmod=None)


@pytest.fixture(scope="module")
def hub_dir(qwen, tmp_path_factory):
    from pmod_bench.model.presets import save_qwen_hub_layout

    return save_qwen_hub_layout(*qwen, tmp_path_factory.mktemp("qwen_hub"))


def video_requests(limit: int = 1):
    """(task objects, [(simple request, chat request)]) of every video task: the simple request is what pmod_llava
    receives, the chat one what lmms-eval's chat models receive."""
    from lmms_eval.api.task import ConfigurableMessagesTask
    from lmms_eval.tasks import get_task_dict

    from pmod_bench.tasks.runner import task_manager

    names = [t for b in VIDEO_BENCHMARKS.values() for t in (b.components or b.run)]
    tasks = get_task_dict(names, task_manager())
    pairs = []
    for name in names:
        task = tasks[name]
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        for inst in task.instances:
            meta = {"task": name, "doc_id": inst.doc_id, "repeats": 1, "split": inst.args[-1]}
            pairs.append((inst, ConfigurableMessagesTask.construct_requests(task, doc_id=inst.doc_id, ctx=inst.args[0],
                                                                            metadata=meta)))
    return tasks, pairs


@pytest.mark.slow
def test_video_requests_equal_lmms_evals_qwen2_5_vl(data_root, qwen, hub_dir, monkeypatch):
    from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL

    from pmod_bench.tasks.plugin import PMoDLlava

    ref = Qwen2_5_VL(pretrained=str(hub_dir), device="cpu", device_map="cpu", batch_size=1, **SMALL)
    ours = PMoDLlava.from_loaded(*qwen, name="tiny-qwen2.5-vl:vanilla", batch_size=1, device="cpu", **SMALL)
    assert ours.host.processor.video_processor.to_dict() == ref.processor.video_processor.to_dict()
    assert ours.host.processor.image_processor.to_dict() == ref.processor.image_processor.to_dict()
    tasks, pairs = video_requests()
    ref.task_dict = ours.task_dict = {name: task.dataset for name, task in tasks.items()}
    gen = {"ref": [], "ours": []}
    monkeypatch.setattr(ref._model, "generate", recording_generate(gen["ref"]))
    monkeypatch.setattr(ours._model, "generate", recording_generate(gen["ours"]))
    ref.processor, ours.host.processor = Recorder(ref.processor), Recorder(ours.host.processor)
    kinds = set()
    for simple, chat in pairs:
        where = f"{simple.task_name} doc {simple.doc_id}"
        theirs = ref.generate_until([chat])[0].text
        assert ours.generate_until([simple]) == [theirs], where
        p_ours, p_ref = ours.host.processor.calls[-1], ref.processor.calls[-1]
        _same(p_ours, p_ref, f"{where}: processor call")
        _same(gen["ours"][-1], gen["ref"][-1], f"{where}: generate")
        kinds.add("video" if p_ref["videos"] else "frames")
        if p_ref["videos"]:
            assert [v.shape[0] for v in p_ref["videos"]] == [4] and "pixel_values_videos" in gen["ref"][-1]
    assert len(pairs) == 22 and kinds == {"video", "frames"}  # episodic_reasoning: a folder of frames, as images


def test_frame_count_rule(tmp_path):
    """lmms-eval's nframes: min(max_num_frames, the clip's frames) floored to even, >= 2; the cap for what decord cannot
    open; fps instead when given; every video item carries the pixel bounds."""
    from pmod_bench.tasks.fixtures import write_clip
    from pmod_bench.tasks.video_requests import chat_nframes, chat_video_kwargs, clip_frames

    clip = str(write_clip(tmp_path / "c.mp4", seconds=0.7, fps=10))  # 7 frames
    assert clip_frames(clip) == 7
    assert [chat_nframes(clip, n) for n in (32, 7, 6, 5, 1)] == [6, 6, 6, 4, 2]
    assert chat_nframes(str(tmp_path / "missing.mp4"), 32) == 32
    assert chat_video_kwargs([clip], 10, 20, 32, None) == {"max_pixels": 20, "min_pixels": 10, "nframes": 6}
    assert chat_video_kwargs([clip], 10, 20, 32, 1.5) == {"max_pixels": 20, "min_pixels": 10, "fps": 1.5}


def test_video_options_and_refusals(qwen):
    """fps is a Qwen model_arg, part of the identity only when set; LLaVA hosts refuse a video in one line."""
    from pmod_bench.model.presets import build_preset
    from pmod_bench.tasks.plugin import PMoDLlava

    lm = PMoDLlava.from_loaded(*qwen, name="q", device="cpu")
    assert "fps" not in lm.identity["host_settings"] and lm.host.supports_video
    assert lm.host.processor.video_processor.size["shortest_edge"] == 200704  # lmms-eval's min_pixels, videos too
    assert qwen[1].video_processor.size["shortest_edge"] == 16 * 28 * 28  # the preset's own processor untouched
    at = PMoDLlava.from_loaded(*qwen, name="q", device="cpu", fps=1.0)
    assert at.identity["host_settings"]["fps"] == 1.0 and at.identity != lm.identity
    with pytest.raises(ValueError, match="fps > 0"):
        PMoDLlava.from_loaded(*qwen, name="q", device="cpu", fps=0)
    llava = PMoDLlava.from_loaded(*build_preset("tiny", pmod=None), name="tiny", device="cpu")
    llava.task_dict = {"t": {"test": [{"v": 1}]}}
    with pytest.raises(TypeError, match="handles images on llava_next models; task t gave a str '/x/clip.mp4'"):
        llava._visuals(lambda doc: ["/x/clip.mp4"], "t", "test", 0)


@pytest.mark.slow
def test_video_suite_answers_equal_at_batch_1_and_4(data_root, tmp_path):
    """The video suite (1 document a task: Video-MME, 20 MVBench tasks, EgoSchema) through lmms-eval with the tiny p-MoD
    Qwen2.5-VL (random routers): the same answers at batch size 1 and 4 (clips of different frame sizes and counts in
    one left-padded batch), every benchmark scored."""
    from pmod_bench import PMoDConfig
    from pmod_bench.model.presets import build_preset, random_routers
    from pmod_bench.tasks.plugin import PMoDLlava
    from pmod_bench.tasks.runner import EvalConfig, run_eval

    model, processor = build_preset("tiny-qwen2.5-vl", pmod=PMoDConfig(shift=0.5))
    random_routers(model, seed=3)
    runs, calls = {}, {}
    for bs in (1, 4):
        lm = PMoDLlava.from_loaded(model, processor, name="tiny-qwen2.5-vl", batch_size=bs, device="cpu", **SMALL)
        cfg = EvalConfig(model="tiny-qwen2.5-vl", suite="video", output=str(tmp_path / f"b{bs}"), batch_size=bs, limit=1,
                         gen_kwargs="max_new_tokens=3")
        out = run_eval(cfg, lm=lm, log=lambda m: None)
        assert out.failures == {} and [r["benchmark"] for r in out.rows] == list(VIDEO_BENCHMARKS)
        runs[bs], calls[bs] = responses(tmp_path / f"b{bs}"), lm.model_calls
    assert len(runs[1]) == 22 and runs[1] == runs[4] and calls[1] == 22 > calls[4]
    assert len({str(r) for r in runs[1].values()}) > 1  # the answers depend on the clip
    meta = json.loads((tmp_path / "b4" / "run.json").read_text())
    assert meta["host"] == "qwen2_5_vl" and meta["model_info"]["max_num_frames"] == 4


def test_a_damaged_video_is_named_with_its_row(qwen, tmp_path):
    """A video that does not decode fails its request in one line naming benchmark, task, row and `data check
    --decode` (qwen-vl-utils' reader errors, and its torchvision fallback's, would say neither)."""
    from types import SimpleNamespace

    from pmod_bench.tasks.data import DataError
    from pmod_bench.tasks.plugin import PMoDLlava

    bad = tmp_path / "data" / "fFjv93ACGo8.mp4"
    bad.parent.mkdir()
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))  # an mp4 header, no stream
    lm = PMoDLlava.from_loaded(*qwen, name="q", device="cpu", **SMALL)
    lm.task_dict = {"pmod_videomme": {"test": [{"videoID": "fFjv93ACGo8"}]}}
    request = SimpleNamespace(args=("Which option?", {"max_new_tokens": 2}, lambda doc: [str(bad)], 0, "pmod_videomme", "test"))
    with pytest.raises(DataError) as err:
        lm.generate_until([request])
    text = str(err.value)
    assert "\n" not in text and text.startswith("VideoMME (pmod_videomme, split 'test', row 0): the video does not decode")
    assert "pmod-bench data check VideoMME --decode" in text
