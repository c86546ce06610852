"""LLaVA-OneVision video through ``pmod_llava`` (lmms-eval 0.7.3's ``llava_hf`` video requests) and the frame-budget flags.

1. Request equality (slow): for one document of every video task's fixture (Video-MME, the 20 MVBench tasks, one a
   folder of frames, EgoSchema), the request ``pmod_llava`` builds for the tiny OneVision equals, byte for byte, the one
   lmms-eval's own ``lmms_eval.models.simple.llava_hf.LlavaHf`` builds from the same checkpoint in the hub's layout: the
   prompt, the frames decord read, every tensor and keyword handed to ``generate``; at batch size 4 each row's ids and
   ``pixel_values_videos`` equal lmms-eval's batch-1 request. Only the model's ``generate`` is a stub.
2. Frame sampling (:func:`pmod_bench.tasks.video_requests.uniform_frames`) against ``LlavaHf.load_video`` itself, a
   short clip repeating frames; the frame budgets reaching the built request on both hosts; ``--fps`` refused on
   OneVision; bad values one line, exit 2; a changed budget refused on resume.
3. ``paper_image_size`` on the tiny preset's tiles.
4. End to end (slow): the video suite on fixtures with the tiny p-MoD OneVision, the same answers at batch size 1 and 4.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

pytest.importorskip("lmms_eval")
#: the tests that read a clip (the ``video`` extra); the flags, refusals and image size need none
needs_decord = pytest.mark.skipif(importlib.util.find_spec("decord") is None, reason="decord (pip install -e '.[video]')")

from conftest import benchmark_data_env  # noqa: E402
from conftest import lmms_eval_responses as responses  # noqa: E402
from test_eval_onevision import hub_dir, onevision  # noqa: E402,F401  (the same module fixtures: tiny model, hub layout)
from lmms_capture import Recorder, recording_generate  # noqa: E402
from lmms_capture import same_call as _same_generate, tensor_bytes as _bytes  # noqa: E402
from pmod_bench.tasks.benchmarks import VIDEO_BENCHMARKS  # noqa: E402

FRAMES = 4  # frames a clip in the slow tests (lmms-eval's model_arg max_frames_num; its default is 32)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    yield from benchmark_data_env(tmp_path_factory, list(VIDEO_BENCHMARKS))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from pmod_bench.tasks.fixtures import write_clip

    return str(write_clip(tmp_path_factory.mktemp("clip") / "c.mp4", seconds=0.7, fps=10))  # 7 frames


def _media(call: dict) -> tuple:
    """(the images' pixels, the videos' frames) of one processor call, as bytes."""
    images = [(im.size, im.mode, im.tobytes()) for im in call.get("images") or []]
    videos = [(v.shape, v.dtype.str, v.tobytes()) for v in call.get("videos") or []]
    return images, videos


class FramesForPaths(Recorder):
    """lmms-eval's chat ``llava_hf`` cannot run a video request on this stack: it hands the processor ``images=[]``
    (HF's OneVision image processor fails on an empty list: IndexError) and each clip's *path*, which HF's OneVision
    video processor would decode in full (``do_sample_frames`` False) with torchcodec (not installed: it cannot decode
    at all). This stand-in records the call, then hands the processor ``images=None`` and the frames ``llava_hf``'s
    simple class reads of each path (what ``pmod_llava`` reads)."""

    def __call__(self, **kwargs):
        from lmms_eval.models.simple.llava_hf import LlavaHf

        self.calls.append(kwargs)
        videos = kwargs.get("videos")
        if videos:
            kwargs = {**kwargs, "images": kwargs.get("images") or None,
                      "videos": [LlavaHf.load_video(None, path, FRAMES) for path in videos]}
        return self.inner(**kwargs)


def video_pairs(chat: bool = False):
    """(task objects, [(our request, lmms-eval's request)]) for the first document of every video task: two request
    objects per document (``llava_hf`` pops ``until`` from its request's generation kwargs); ``chat``: lmms-eval's
    request for its chat models (the task's messages)."""
    from lmms_eval.api.task import ConfigurableMessagesTask
    from lmms_eval.tasks import get_task_dict

    from pmod_bench.tasks.runner import task_manager

    names = [t for b in VIDEO_BENCHMARKS.values() for t in (b.components or b.run)]
    tasks = get_task_dict(names, task_manager())
    pairs = []
    for name in names:
        task = tasks[name]
        task.build_all_requests(limit=1, rank=0, world_size=1)
        for inst in task.instances:
            meta = {"task": name, "doc_id": inst.doc_id, "repeats": 1, "split": inst.args[-1]}
            build = ConfigurableMessagesTask.construct_requests if chat else type(task).construct_requests
            pairs.append((inst, build(task, doc_id=inst.doc_id, ctx=inst.args[0], metadata=meta)))
    return tasks, pairs


def _recorded(onevision, hub_dir, monkeypatch, batch_size: int, chat: bool = False):
    from lmms_eval.models.chat.llava_hf import LlavaHf as Chat
    from lmms_eval.models.simple.llava_hf import LlavaHf as Simple

    from pmod_bench.tasks.plugin import PMoDLlava

    ref = (Chat if chat else Simple)(pretrained=str(hub_dir), device="cpu", device_map="cpu", batch_size=1,
                                     max_frames_num=FRAMES)
    ours = PMoDLlava.from_loaded(*onevision, name="tiny-llava-onevision:vanilla", batch_size=batch_size, device="cpu",
                                 max_frames_num=FRAMES, chat_template="processor" if chat else None)
    video = ("size", "image_mean", "image_std", "resample", "rescale_factor", "do_normalize", "do_sample_frames")
    assert all(getattr(ref._image_processor.video_processor, k) == getattr(ours.processor.video_processor, k) for k in video)
    tasks, pairs = video_pairs(chat)
    ref.task_dict = ours.task_dict = {name: task.dataset for name, task in tasks.items()}
    gen = {"ref": [], "ours": []}
    monkeypatch.setattr(ref._model, "generate", recording_generate(gen["ref"]))
    monkeypatch.setattr(ours._model, "generate", recording_generate(gen["ours"]))
    ref._image_processor = (FramesForPaths if chat else Recorder)(ref._image_processor)
    ours.host.processor = Recorder(ours.host.processor)
    return ref, ours, pairs, gen


@pytest.mark.slow
@needs_decord
def test_video_requests_equal_lmms_evals_llava_hf(data_root, onevision, hub_dir, monkeypatch):
    """Batch size 1: every video task's request equals lmms-eval's ``llava_hf`` (simple class) request."""
    ref, ours, pairs, gen = _recorded(onevision, hub_dir, monkeypatch, batch_size=1)
    kinds = set()
    for mine, theirs in pairs:
        where = f"{mine.task_name} doc {mine.doc_id}"
        assert ours.generate_until([mine]) == ref.generate_until([theirs]), where
        p_ours, p_ref = ours.host.processor.calls[-1], ref._image_processor.calls[-1]
        assert p_ours["text"] == [p_ref["text"]], where
        assert _media(p_ours) == _media(p_ref), where
        _same_generate(gen["ours"][-1], gen["ref"][-1], where)
        if p_ref.get("videos") is not None:
            kinds.add("video")
            assert p_ref["videos"][0].shape[0] == FRAMES and "\n<|im_start|>user\n<video>\n" in p_ref["text"], where
            assert gen["ref"][-1]["pixel_values_videos"].shape[:2] == (1, FRAMES), where
        else:
            kinds.add("frames")
    assert len(pairs) == len(gen["ref"]) == 22 and kinds == {"video", "frames"}  # episodic_reasoning: images


@pytest.mark.slow
@needs_decord
def test_processor_template_video_requests_equal_lmms_evals_llava_hf_chat(data_root, onevision, hub_dir, monkeypatch):
    """chat_template=processor: the chat class's prompt (the task's messages through the checkpoint's template,
    ``<video>\n`` before the text) and, given the frames ``pmod_llava`` reads (:class:`FramesForPaths`), the same
    tensors and keywords handed to ``generate``."""
    ref, ours, pairs, gen = _recorded(onevision, hub_dir, monkeypatch, batch_size=1, chat=True)
    for mine, theirs in pairs:
        where = f"{mine.task_name} doc {mine.doc_id}"
        assert ours.generate_until([mine]) == [ref.generate_until([theirs])[0].text], where
        p_ours, p_ref = ours.host.processor.calls[-1], ref._image_processor.calls[-1]
        assert p_ours["text"] == [p_ref["text"]], where
        if p_ref.get("videos"):
            assert p_ref["text"].startswith("<|im_start|>user\n<video>\n") and isinstance(p_ref["videos"][0], str)
            assert p_ours["videos"][0].shape[0] == FRAMES
        _same_generate(gen["ours"][-1], gen["ref"][-1], where)
    assert len(gen["ref"]) == 22 and sum(1 for c in ref._image_processor.calls if c.get("videos")) == 21


@pytest.mark.slow
@needs_decord
def test_batched_video_requests_equal_lmms_evals(data_root, onevision, hub_dir, monkeypatch):
    """Batch size 4 (left padding, clips of different sizes and lengths stacked): each row's ids and frames' pixels are
    those of lmms-eval's batch-1 request."""
    ref, ours, pairs, gen = _recorded(onevision, hub_dir, monkeypatch, batch_size=4)
    chosen = [p for p in pairs if p[0].task_name in ("pmod_videomme", "pmod_egoschema_subset", "pmod_mvbench_action_sequence",
                                                     "pmod_mvbench_object_shuffle")]
    assert len(chosen) == 4
    answers = ours.generate_until([mine for mine, _ in chosen])
    assert answers == [ref.generate_until([theirs])[0] for _, theirs in chosen]
    batched = gen["ours"][-1]
    ids, mask, pixels = batched["input_ids"], batched["attention_mask"], batched["pixel_values_videos"]
    assert ids.shape[0] == 4 and pixels.shape[:2] == (4, FRAMES) and mask[:, -1].all()
    ours_rows = sorted((ids[b][mask[b].bool()].tolist(), _bytes(pixels[b])) for b in range(4))
    ref_rows = sorted((g["input_ids"][0].tolist(), _bytes(g["pixel_values_videos"][0])) for g in gen["ref"][-4:])
    assert ours_rows == ref_rows
    plain = lambda d: {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}  # noqa: E731
    assert all(plain(batched) == plain(g) for g in gen["ref"][-4:])


@pytest.mark.slow  # importing lmms-eval's llava_hf module takes seconds
@needs_decord
def test_uniform_frames_are_llava_hfs_load_video(clip):
    """lmms-eval's own ``load_video`` (path or [path]) against ours: the same frames; a 7-frame clip at 32 gives 32
    frames, the indices floored (duplicates kept), so every clip of a batch has max_frames_num frames."""
    from lmms_eval.models.simple.llava_hf import LlavaHf

    from pmod_bench.tasks.video_requests import uniform_frames

    for n in (32, 4, 1):
        ours = uniform_frames(clip, n)
        theirs = LlavaHf.load_video(None, [clip], n)  # its method reads nothing of the instance
        assert ours.frames.shape == theirs.shape == (n, 54, 96, 3) and np.array_equal(ours.frames, theirs)
        assert list(ours.metadata) == np.linspace(0, 6, n, dtype=int).tolist()
    assert list(uniform_frames(clip, 32).metadata[:7]) == [0, 0, 0, 0, 0, 0, 1]
    assert np.array_equal(uniform_frames(clip, 4).frames, LlavaHf.load_video(None, clip, 4))


@needs_decord
def test_frame_budgets_reach_the_request(onevision, clip):
    """OneVision's max_frames_num (or its Qwen spelling max_num_frames, what --max-num-frames passes) is the frame
    count of the built request (frames read, pixel_values_videos, <video> tokens); Qwen2.5-VL's max_num_frames and fps
    are the frames qwen-vl-utils read; run.json's model_info shows them."""
    from pmod_bench.model.presets import TINY_QWEN_MAX_PIXELS, TINY_QWEN_MIN_PIXELS, build_preset
    from pmod_bench.tasks.plugin import PMoDLlava

    model, processor = onevision
    pool = (model.config.vision_config.image_size // model.config.vision_config.patch_size + 1) // 2  # 2x2 bilinear, ceil
    for args, n in (({}, 32), ({"max_num_frames": 5}, 5), ({"max_frames_num": 3}, 3)):
        lm = PMoDLlava.from_loaded(model, processor, name="ov", device="cpu", **args)
        text, shown = lm.host.prompt("What moves?", [clip], None)
        assert text.count("<video>") == 1 and shown[0].frames.shape[0] == n
        inputs = lm.host.encode([text], [shown], torch.device("cpu"), torch.float32, 1)
        assert inputs["pixel_values_videos"].shape[:2] == (1, n)
        assert int((inputs["input_ids"] == model.config.video_token_id).sum()) == n * pool * pool + 1  # + one newline
        assert lm.describe()["max_frames_num"] == n and lm.identity.get("host_settings", {}).get("max_frames_num") == \
            (None if n == 32 else n)  # lmms-eval's default: image runs keep their identity
    qwen = build_preset("tiny-qwen2.5-vl", pmod=None)
    small = {"min_pixels": TINY_QWEN_MIN_PIXELS, "max_pixels": TINY_QWEN_MAX_PIXELS}
    for args, n in (({"max_num_frames": 4}, 4), ({"max_num_frames": 32}, 6), ({"fps": 5.0}, 4)):  # 7 frames, 0.7 s at 10 fps
        lm = PMoDLlava.from_loaded(*qwen, name="q", device="cpu", **small, **args)
        _, shown = lm.host.prompt("What moves?", [clip], None)
        assert shown[0].frames.shape[0] == n, args
        assert all(lm.describe()[k] == v for k, v in args.items())


def test_frame_budget_refusals(onevision):
    from pmod_bench.tasks.plugin import PMoDLlava

    with pytest.raises(ValueError, match=r"fps \(model_args of qwen2_5_vl models\) do not apply to this llava_onevision"):
        PMoDLlava.from_loaded(*onevision, name="ov", device="cpu", fps=1.0)
    with pytest.raises(ValueError, match="max_frames_num=8 and max_num_frames=4 name the same setting"):
        PMoDLlava.from_loaded(*onevision, name="ov", device="cpu", max_frames_num=8, max_num_frames=4)
    with pytest.raises(ValueError, match="must be >= 1, got 0"):
        PMoDLlava.from_loaded(*onevision, name="ov", device="cpu", max_frames_num=0)
    lm = PMoDLlava.from_loaded(*onevision, name="ov", device="cpu")
    with pytest.raises(TypeError, match="reads one video per request"):
        lm.host.prompt("Compare.", ["/x/a.mp4", "/x/b.mp4"], None)


@pytest.mark.parametrize("argv, message", [
    (["--model", "tiny-llava-onevision", "--fps", "1"], "--fps is Qwen2.5-VL's video sampling rate; LLaVA-OneVision"),
    (["--model", "tiny-llava-onevision", "--max-num-frames", "0"], "--max-num-frames must be a positive integer"),
    (["--model", "tiny-qwen2.5-vl", "--fps", "-2"], "--fps must be a frame rate > 0"),
    (["--model", "tiny", "--max-num-frames", "8"], "--max-num-frames: frame budgets of video evaluation, which LLaVA-1.5"),
    (["--model", "tiny-qwen2.5-vl", "--max-num-frames", "eight"], "argument --max-num-frames: invalid int value"),
])
def test_cli_bad_frame_budgets_one_line_exit_2(argv, message, tmp_path, capsys):
    from pmod_bench.cli import main

    out = tmp_path / "run"
    try:
        code = main(["eval", *argv, "--suite", "video", "--output", str(out)])
    except SystemExit as exc:  # argparse's own type errors
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and not out.exists()
    assert len(err) == 1 or err[-1].startswith("pmod-bench eval: error: argument")  # argparse: usage, then one line


def test_frame_budgets_are_part_of_the_run_identity(tmp_path):
    """The flags reach the model's arguments and the identity (left out when unset: older run dirs resume); a changed
    budget is refused on resume, naming it."""
    from pmod_bench.tasks.benchmarks import resolve_suite
    from pmod_bench.tasks.runner import EvalConfig, RunDirMismatch, _run_meta, atomic_write_json, check_identity

    run = tmp_path / "run"
    base = dict(model="tiny-qwen2.5-vl", suite="video", output=str(run))
    cfg = EvalConfig(**base, max_num_frames=8, fps=2)
    assert cfg.identity()["max_num_frames"] == 8 and cfg.identity()["fps"] == 2
    assert cfg.model_args()["max_num_frames"] == 8 and cfg.model_args()["fps"] == 2
    assert "max_num_frames" not in EvalConfig(**base).identity() and "fps" not in EvalConfig(**base).identity()
    run.mkdir()
    atomic_write_json(run / "run.json", _run_meta(cfg, None, resolve_suite("video"), run))
    assert check_identity(run, EvalConfig(**base, max_num_frames=8, fps=2)) is not None
    with pytest.raises(RunDirMismatch, match="max_num_frames: 8 in the run dir vs 16 now"):
        check_identity(run, EvalConfig(**base, max_num_frames=16, fps=2))
    with pytest.raises(RunDirMismatch, match="fps: 2 in the run dir vs None"):
        check_identity(run, EvalConfig(**base, max_num_frames=8))


def test_cli_takes_onevisions_own_template_name(tmp_path):
    """``--chat-template qwen_1_5`` (the OneVision host's default, named in --help) passes the CLI's check; a name that
    is neither a template nor a file is refused naming the choices."""
    from pmod_bench.tasks.runner import EvalConfig

    base = dict(model="tiny-llava-onevision", suite="video", output=str(tmp_path / "r"))
    assert EvalConfig(**base, chat_template="qwen_1_5").identity()["chat_template"] == "qwen_1_5"
    with pytest.raises(ValueError, match="qwen_1_5 \\(LLaVA-OneVision's published runs\\)"):
        EvalConfig(**base, chat_template="qwen_15")


def test_paper_image_size_is_the_tiles_own_2x2_grid():
    """OneVision's --match image: 672x672 on the checkpoints' 384 px tiles, two tiles a side on the tiny preset's 32 px
    ones; both a 2x2 grid plus the base tile (672 px on 32 px tiles is a 21x21 grid)."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    from pmod_bench.model.hosts import host_for
    from pmod_bench.model.presets import preset_config

    for name, size in (("tiny-llava-onevision", (64, 64)), ("llava-onevision-7b", (672, 672))):
        cfg = preset_config(name, None)
        assert host_for(cfg).paper_image_size(cfg) == size, name
        assert image_size_to_num_patches(list(size), cfg.image_grid_pinpoints, cfg.vision_config.image_size) == 5, name
    tiny = preset_config("tiny-llava-onevision", None)
    assert image_size_to_num_patches([672, 672], tiny.image_grid_pinpoints, 32) > 9  # what the tiny preset got before


@pytest.mark.slow
def test_match_on_tiny_onevision_solves_a_real_budget():
    """--match on the tiny OneVision at its default image: FastV's keep well above the solver's floor (at 672x672 it
    was 0.001: the budget of a grid that anyres_max_9 shrinks)."""
    from pmod_bench.methods import solve
    from pmod_bench.tasks.runner import MATCH_TEXT_TOKENS, default_match_image_size, match_arch

    arch = match_arch("tiny-llava-onevision")
    res = solve("fastv", arch, default_match_image_size(arch), match="p-MoD-0.5", text_tokens=MATCH_TEXT_TOKENS)
    assert res.config.keep > 0.01 and res.to_dict()["rel_err"] <= 0.01


@pytest.mark.slow
@needs_decord
def test_video_suite_answers_equal_at_batch_1_and_4(data_root, tmp_path):
    """The video suite (1 document a task) through lmms-eval with the tiny p-MoD OneVision (random routers): the same
    answers at batch size 1 and 4 (clips of different sizes stacked, a folder-of-frames task among them), every
    benchmark scored, the frame budget in run.json."""
    from pmod_bench import PMoDConfig
    from pmod_bench.model.presets import build_preset, random_routers
    from pmod_bench.tasks.plugin import PMoDLlava
    from pmod_bench.tasks.runner import EvalConfig, run_eval

    model, processor = build_preset("tiny-llava-onevision", pmod=PMoDConfig(shift=0.5))
    random_routers(model, seed=3)
    runs, calls = {}, {}
    for bs in (1, 4):
        lm = PMoDLlava.from_loaded(model, processor, name="tiny-llava-onevision", batch_size=bs, device="cpu",
                                   max_num_frames=FRAMES)
        cfg = EvalConfig(model="tiny-llava-onevision", suite="video", output=str(tmp_path / f"b{bs}"), batch_size=bs,
                         limit=1, gen_kwargs="max_new_tokens=3", max_num_frames=FRAMES)
        out = run_eval(cfg, lm=lm, log=lambda m: None)
        assert out.failures == {} and [r["benchmark"] for r in out.rows] == list(VIDEO_BENCHMARKS)
        runs[bs], calls[bs] = responses(tmp_path / f"b{bs}"), lm.model_calls
    assert len(runs[1]) == 22 and runs[1] == runs[4] and calls[1] == 22 > calls[4]
    assert len({str(r) for r in runs[1].values()}) > 1  # the answers depend on the clip
    meta = json.loads((tmp_path / "b4" / "run.json").read_text())
    assert meta["host"] == "llava_onevision" and meta["model_info"]["max_frames_num"] == FRAMES
    assert meta["eval"]["identity"]["max_num_frames"] == FRAMES and min(meta["model_info"]["layer_ratios"]) < 1
