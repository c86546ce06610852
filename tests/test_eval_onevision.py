"""LLaVA-OneVision through ``pmod_llava``: lmms-eval 0.7.3's ``llava_hf`` requests with ``llava_onevision``'s prompt.

1. Request equality (why these classes: :class:`pmod_bench.tasks.requests.OnevisionRequests`): for every document of
   several benchmarks' fixtures (multi-image MMMU questions among them), the request ``pmod_llava`` builds for the
   tiny OneVision preset equals, byte for byte, the one lmms-eval's own ``llava_hf`` builds for the same document
   from the same checkpoint saved in the hub's layout: the prompt text, the images handed to the processor, every
   tensor handed to ``generate`` (ids, mask, pixel values, ``image_sizes``, ``batch_num_images``) and every generate
   keyword; the default (``qwen_1_5``) against the simple class, ``chat_template=processor`` against the chat class;
   batch size 4 against lmms-eval's batch-1 requests (``llava_hf`` runs batch size 1 only). Only the *model*'s
   ``generate`` is replaced (a stub that records its arguments and returns two fixed tokens).
2. The ``qwen_1_5`` prompt against the literal text LLaVA-NeXT's conversation template writes.
3. Host dispatch, options, and grounding answers (normalised boxes) with crafted answers.
4. End to end: the whole suite on fixtures with the tiny p-MoD OneVision, answers identical at batch 1 and 8; the
   CLI (``pmod-bench eval --model tiny-llava-onevision``) and a method at matched FLOPs (``--method fastv --match
   p-MoD-0.5``), each run directory saying its host.

The hub checkpoints' tokenizer_config.json carries Qwen2-Instruct's chat template (the conversion script,
``convert_llava_onevision_weights_to_hf.py``, saves ``Qwen/Qwen2-*-Instruct``'s tokenizer); the tiny preset's
tokenizer has none, so the hub-layout copy here gets it written in, as on the hub.
"""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

pytest.importorskip("lmms_eval")

from conftest import benchmark_data_env  # noqa: E402
from conftest import lmms_eval_responses as responses  # noqa: E402
from lmms_capture import Recorder, mmmu_format, recording_generate  # noqa: E402,F401  (mmmu_format: autouse)
from lmms_capture import same_call as _same_generate, tensor_bytes as _bytes  # noqa: E402

BENCHES = ["MME", "MMMU", "RefCOCO", "SEED", "Chart", "MMB", "POPE"]
#: ``tokenizer_config.json``'s ``chat_template`` of Qwen/Qwen2-7B-Instruct (and so of llava-hf/llava-onevision-qwen2-7b-ov-hf)
QWEN2_INSTRUCT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are "
    "a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    yield from benchmark_data_env(tmp_path_factory)  # every benchmark's fixture


@pytest.fixture(scope="module")
def onevision():
    from pmod_bench.model.presets import build_preset

    return build_preset("tiny-llava-onevision", pmod=None)


@pytest.fixture(scope="module")
def hub_dir(onevision, tmp_path_factory):
    from pmod_bench.model.presets import save_onevision_hub_layout

    d = save_onevision_hub_layout(*onevision, tmp_path_factory.mktemp("onevision_hub"))
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": QWEN2_INSTRUCT_TEMPLATE}, indent=2))
    return d


@pytest.fixture(scope="module")
def llava_hf():
    """lmms-eval's ``llava_hf`` classes: {"simple": ..., "chat": ...} (the chat one is what ``--model llava_hf`` runs).
    Their module imports ``decord`` (a video reader lmms-eval does not install) at module level; where it is missing,
    a stand-in whose readers refuse stands in for the import (no video is decoded here)."""
    try:
        import decord  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("decord")

        def unavailable(*args, **kwargs):
            raise ImportError("decord is not installed")

        stand_in.VideoReader = stand_in.cpu = unavailable
        mp = pytest.MonkeyPatch()
        mp.setitem(sys.modules, "decord", stand_in)
        try:
            return _llava_hf_classes()
        finally:
            mp.undo()
    return _llava_hf_classes()


def _llava_hf_classes() -> dict:
    from lmms_eval.models.chat.llava_hf import LlavaHf as Chat
    from lmms_eval.models.simple.llava_hf import LlavaHf as Simple

    return {"simple": Simple, "chat": Chat}


def request_triples():
    """(task objects, [(ours, lmms-eval simple, lmms-eval chat)]) of the adapter tasks of BENCHES: three requests per
    document, built separately (``llava_hf`` changes its request's generation kwargs in place)."""
    from lmms_eval.api.task import ConfigurableMessagesTask
    from lmms_eval.tasks import get_task_dict

    from pmod_bench.tasks.benchmarks import BENCHMARKS
    from pmod_bench.tasks.runner import task_manager

    names = [t for b in BENCHES for t in BENCHMARKS[b].tasks]
    tasks = get_task_dict(names, task_manager())
    triples = []
    for name in names:
        task = tasks[name]
        task.build_all_requests(rank=0, world_size=1)
        for inst in task.instances:
            meta = {"task": name, "doc_id": inst.doc_id, "repeats": 1, "split": inst.args[-1]}
            simple = task.construct_requests(doc_id=inst.doc_id, ctx=inst.args[0], metadata=meta)
            chat = ConfigurableMessagesTask.construct_requests(task, doc_id=inst.doc_id, ctx=inst.args[0], metadata=meta)
            triples.append((inst, simple, chat))
    return tasks, triples


def _images(call: dict) -> list:
    images = call.get("images") or []
    return [(im.size, im.mode, im.tobytes()) for im in images]


def _recorded(onevision, hub_dir, reference, monkeypatch, batch_size: int, **ours_args):
    """(lmms-eval's ``reference`` class on ``hub_dir``, ours on the same weights, the request triples, the generate()
    calls of each {"ref": [...], "ours": [...]}); both processors record their calls."""
    from pmod_bench.tasks.plugin import PMoDLlava

    ref = reference(pretrained=str(hub_dir), device="cpu", device_map="cpu", batch_size=1)
    ours = PMoDLlava.from_loaded(*onevision, name="tiny-llava-onevision:vanilla", batch_size=batch_size, device="cpu",
                                 **ours_args)
    tasks, triples = request_triples()
    ref.task_dict = ours.task_dict = {name: task.dataset for name, task in tasks.items()}
    gen = {"ref": [], "ours": []}
    monkeypatch.setattr(ref._model, "generate", recording_generate(gen["ref"]))
    monkeypatch.setattr(ours._model, "generate", recording_generate(gen["ours"]))
    ref._image_processor, ours.host.processor = Recorder(ref._image_processor), Recorder(ours.host.processor)
    return ref, ours, triples, gen


def _check_one_by_one(ref, ours, triples, gen, pick) -> set:
    """Each document's request, ours against lmms-eval's (``pick`` chooses the simple or the chat request); the
    tasks whose prompts held several images."""
    multi = set()
    for mine, simple, chat in triples:
        where = f"{mine.task_name} doc {mine.doc_id}"
        theirs = ref.generate_until([pick(simple, chat)])[0]
        assert ours.generate_until([mine]) == [getattr(theirs, "text", theirs)], where
        p_ours, p_ref = ours.host.processor.calls[-1], ref._image_processor.calls[-1]
        assert p_ours["text"] == [p_ref["text"]], where  # the prompt string
        assert _images(p_ours) == _images(p_ref), where  # the images handed to the processor, in order
        _same_generate(gen["ours"][-1], gen["ref"][-1], where)
        if len(p_ref.get("images") or []) > 1:
            multi.add(mine.task_name)
    assert len(gen["ours"]) == len(gen["ref"]) == len(triples) > 30
    return multi


@pytest.mark.slow
def test_requests_equal_lmms_evals_llava_hf(data_root, onevision, hub_dir, llava_hf, monkeypatch):
    """Default (qwen_1_5): lmms-eval's ``llava_hf`` simple class on the hub-layout checkpoint."""
    ref, ours, triples, gen = _recorded(onevision, hub_dir, llava_hf["simple"], monkeypatch, batch_size=1)
    assert ours.host.template_name == "qwen_1_5" and ref.tokenizer.chat_template == QWEN2_INSTRUCT_TEMPLATE
    multi = _check_one_by_one(ref, ours, triples, gen, pick=lambda simple, chat: simple)
    assert "pmod_mmmu_val" in multi  # several images in one prompt: "<image> <image>\n..."
    texts = [c["text"][0] for c in ours.host.processor.calls]
    assert all(t.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n") for t in texts)
    assert all(t.endswith("<|im_end|>\n<|im_start|>assistant\n") for t in texts)
    kwargs = gen["ours"][0]
    assert kwargs["pad_token_id"] == kwargs["eos_token_id"] == ours.tokenizer.eos_token_id and kwargs["do_sample"] is False


@pytest.mark.slow
def test_processor_template_equals_lmms_evals_llava_hf_chat(data_root, onevision, hub_dir, llava_hf, monkeypatch):
    """chat_template=processor: lmms-eval's ``llava_hf`` chat class (``--model llava_hf``): the task's messages through
    the checkpoint's chat template (MMMU's interleaved images and text)."""
    ref, ours, triples, gen = _recorded(onevision, hub_dir, llava_hf["chat"], monkeypatch, batch_size=1,
                                        chat_template="processor")
    multi = _check_one_by_one(ref, ours, triples, gen, pick=lambda simple, chat: chat)
    assert "pmod_mmmu_val" in multi
    assert all(c["text"][0].startswith("<|im_start|>user\n<image>\n") for c in ours.host.processor.calls
               if c.get("images"))


def _rows(call: dict, generate: dict, grid_pinpoints, tile: int) -> list:
    """Per request of a batch: (prompt, ids without padding, each image's pixels (its own tiles) and size)."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    ids, mask, pixels, sizes = generate["input_ids"], generate["attention_mask"], generate["pixel_values"], generate["image_sizes"]
    rows, k = [], 0
    for b, text in enumerate(call["text"]):
        images = []
        for _ in range(text.count("<image>")):
            n = image_size_to_num_patches(sizes[k].tolist(), grid_pinpoints, tile)
            assert not pixels[k, n:].any()  # the processor's padding past this image's tiles
            images.append((_bytes(pixels[k, :n]), sizes[k].tolist()))
            k += 1
        rows.append((text, ids[b][mask[b].bool()].tolist(), images))
    assert k == len(sizes) and generate["batch_num_images"].tolist() == [1] * k  # a flat list of images, as llava_hf's
    return rows


@pytest.mark.slow
def test_batched_requests_equal_lmms_evals(data_root, onevision, hub_dir, llava_hf, monkeypatch):
    """Batch size 4 (left padding): each request's tokens, tiles and image sizes are those of lmms-eval's batch-1 request."""
    ref, ours, triples, gen = _recorded(onevision, hub_dir, llava_hf["simple"], monkeypatch, batch_size=4)
    for task in ("pmod_mme", "pmod_mmmu_val"):
        chosen = [t for t in triples if t[0].task_name == task][:4]
        answers = ours.generate_until([mine for mine, _, _ in chosen])
        assert answers == [ref.generate_until([simple])[0] for _, simple, _ in chosen], task
        call, batched = ours.host.processor.calls[-1], gen["ours"][-1]
        assert len(call["text"]) == 4 and batched["input_ids"].shape[0] == 4
        assert batched["attention_mask"][:, -1].all()  # left padding: every prompt ends at the last position
        config = ours.model.config
        ours_rows = _rows(call, batched, config.image_grid_pinpoints, config.vision_config.image_size)
        ref_rows = [row for c, g in zip(ref._image_processor.calls[-4:], gen["ref"][-4:])
                    for row in _rows({"text": [c["text"]]}, g, config.image_grid_pinpoints, config.vision_config.image_size)]
        assert sorted(ours_rows) == sorted(ref_rows), task
        plain = lambda d: {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}  # noqa: E731
        assert all(plain(batched) == plain(g) for g in gen["ref"][-4:])


def test_qwen_1_5_prompt_is_llava_next_conv_template_text(onevision):
    """The literal text ``conv_templates["qwen_1_5"].get_prompt()`` writes (LLaVA-VL/LLaVA-NeXT@b0eb4930,
    ``llava/conversation.py``: ``conv_qwen``, SeparatorStyle.CHATML) after lmms-eval's ``llava_onevision`` put the
    image tokens before the question."""
    from pmod_bench.tasks.fixtures import image
    from pmod_bench.tasks.plugin import PMoDLlava

    lm = PMoDLlava.from_loaded(*onevision, name="ov", device="cpu")
    one, two = [image(1, 40, 30)], [image(1, 40, 30), image(2, 50, 20)]
    head = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    tail = "<|im_end|>\n<|im_start|>assistant\n"
    assert lm.host.prompt("What is shown?", one, None) == (head + "<image>\nWhat is shown?" + tail, one)
    assert lm.host.prompt("Compare.", two, None)[0] == head + "<image> <image>\nCompare." + tail
    assert lm.host.prompt("See <image> here.", one, None)[0] == head + "See <image> here." + tail  # placed by the task
    assert lm.host.prompt("No image.", [], None)[0] == head + "No image." + tail


def test_host_dispatch_and_options(onevision):
    from pmod_bench.tasks.plugin import PMoDLlava, resolve_dtype
    from pmod_bench.tasks.requests import REQUESTS, OnevisionRequests, requests_of_type, source_model_type

    lm = PMoDLlava.from_loaded(*onevision, name="ov", device="cpu")
    assert isinstance(lm.host, OnevisionRequests) and lm.describe()["host"] == "llava_onevision"
    assert requests_of_type("pmod_llava_onevision") == requests_of_type("llava_onevision") == ("llava_onevision", OnevisionRequests)
    assert set(REQUESTS) == {"llava", "llava_next", "qwen2_5_vl", "llava_onevision"}
    assert lm.describe()["requests_as"].startswith("llava_hf") and "host_settings" not in lm.identity
    assert [source_model_type(s) for s in ("tiny-llava-onevision", "llava-onevision-7b")] == ["llava_onevision"] * 2
    assert resolve_dtype("auto", torch.device("cuda"), REQUESTS["llava_onevision"].gpu_dtype) == torch.float16
    mme = {"until": ["\n\n"], "max_new_tokens": 16, "temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False}
    cfg, until = lm.host.generation(mme)
    eos = onevision[1].tokenizer.eos_token_id
    assert until == [] and cfg == {"do_sample": False, "temperature": None, "top_p": 1.0, "num_beams": 1,
                                   "max_new_tokens": 16, "use_cache": True, "pad_token_id": eos, "eos_token_id": eos}
    assert lm.host.generation({})[0]["max_new_tokens"] == 1024 and lm.host.generation({})[0]["top_p"] is None
    sampled, _ = lm.host.generation({"temperature": 0.7, "top_p": 0.9})
    assert (sampled["do_sample"], sampled["temperature"], sampled["top_p"]) == (True, 0.7, 0.9)
    stopping = PMoDLlava.from_loaded(*onevision, name="ov", device="cpu", stop_at_until=True)
    cfg, until = stopping.host.generation({"until": ["\n\n"]})
    assert until == cfg["stop_strings"] == ["\n\n"] and stopping.identity != lm.identity
    chat = PMoDLlava.from_loaded(*onevision, name="ov", device="cpu", chat_template="processor")
    assert chat.identity["chat_template"] != lm.identity["chat_template"] and chat.host.template is None
    with pytest.raises(ValueError, match="vicuna_v1 is LLaVA-1.5's conversation template"):
        PMoDLlava.from_loaded(*onevision, name="ov", device="cpu", chat_template="vicuna_v1")
    with pytest.raises(ValueError, match="chat_template must be qwen_1_5, processor"):
        PMoDLlava.from_loaded(*onevision, name="ov", device="cpu", chat_template="chatml")
    with pytest.raises(ValueError, match=r"min_pixels \(model_args of qwen2_5_vl models\) do not apply to this llava_onevision"):
        PMoDLlava.from_loaded(*onevision, name="ov", device="cpu", min_pixels=3136)
    with pytest.raises(NotImplementedError, match="loglikelihood is not implemented for llava_onevision"):
        lm.loglikelihood([])


def test_grounding_answers_are_normalised_boxes(onevision):
    """OneVision's RefCOCO answers are read as lmms-eval reads them (normalised [x1, y1, x2, y2]) and scored against the
    ground truth normalised by the image's own size: crafted answers."""
    from lmms_eval.tasks.refcoco.utils_rec import refcoco_bbox_rec_acc05, refcoco_bbox_rec_process_result

    from pmod_bench.tasks import grounding
    from pmod_bench.tasks.plugin import PMoDLlava

    PMoDLlava.from_loaded(*onevision, name="ov", device="cpu")
    try:
        space = grounding.box_space()
        assert isinstance(space, grounding.NormalisedBoxes) and space.to_dict() == {"host": "llava_onevision", "kind": "normalised"}
        w, h = 64, 48
        doc = {"question_id": "q", "answer": "the disc", "bbox": [4 / w, 6 / h, 36 / w, 30 / h], "image_width": w, "image_height": h}
        cases = {"[0.0625, 0.125, 0.5625, 0.625]": (1.0, 0.0), "The box is [0.06, 0.13, 0.56, 0.62].": (1.0, 0.0),
                 "[0.5, 0.5, 0.9, 0.9]": (0.0, 0.0), "[4, 6, 36, 30]": (0.0, 0.0), "a disc": (0.0, 1.0)}
        for answer, expected in cases.items():
            out = grounding.refcoco_process_results(doc, [answer])
            assert {k: v for k, v in out.items() if k != "unparsed"} == refcoco_bbox_rec_process_result(doc, [answer])
            assert (refcoco_bbox_rec_acc05([out["refcoco_ACC@0.5"]]), out["unparsed"]) == expected, answer
    finally:
        grounding.set_box_space(None)


@pytest.mark.slow
def test_whole_suite_answers_equal_at_batch_1_and_8(data_root, tmp_path):
    """Every benchmark of the suite on its fixture through lmms-eval with the tiny p-MoD OneVision (routers random, so
    layers really route): the same answers at batch size 1 and 8 (left padding, images of different sizes)."""
    from pmod_bench.model.presets import build_preset, random_routers
    from pmod_bench.tasks.benchmarks import BENCHMARKS, SUITES
    from pmod_bench.tasks.plugin import PMoDLlava
    from pmod_bench.tasks.runner import EvalConfig, run_eval

    model, processor = build_preset("tiny-llava-onevision")
    random_routers(model, seed=1)
    runs = {}
    for bs in (1, 8):
        lm = PMoDLlava.from_loaded(model, processor, name="tiny-llava-onevision", batch_size=bs, device="cpu")
        cfg = EvalConfig(model="tiny-llava-onevision", suite="all", output=str(tmp_path / f"b{bs}"), batch_size=bs,
                         gen_kwargs="max_new_tokens=6")
        out = run_eval(cfg, lm=lm, log=lambda m: None)
        assert out.failures == {} and [r["benchmark"] for r in out.rows] == list(SUITES["all"])
        runs[bs] = responses(tmp_path / f"b{bs}")
    assert len(runs[1]) == 68 and runs[1] == runs[8]
    assert len({json.dumps(r) for r in runs[1].values()}) > 10  # real, varied answers
    meta = json.loads((tmp_path / "b8" / "run.json").read_text())
    assert meta["host"] == meta["model_info"]["host"] == "llava_onevision"
    assert meta["model_info"]["class"] == "PMoDLlavaOnevisionForConditionalGeneration" and min(meta["model_info"]["layer_ratios"]) < 1
    rows = json.loads((tmp_path / "b8" / "summary.json").read_text())["rows"]
    assert len(rows) == len(BENCHMARKS) and {r["benchmark"]: r["n_unparsed"] for r in rows}["RefCOCO"] is not None


@pytest.mark.slow
def test_cli_eval_onevision_and_a_method_at_matched_flops(data_root, tmp_path, capsys):
    """``pmod-bench eval --model tiny-llava-onevision`` (p-MoD) and ``--model tiny-llava-onevision:vanilla --method fastv
    --match p-MoD-0.5`` (FastV's budget solved on OneVision's architecture), then ``pmod-bench report`` over both."""
    from pmod_bench.cli import main
    from pmod_bench.methods import solve

    common = ["--suite", "Chart,GQA", "--limit", "2", "--data", str(data_root), "--threads", "1", "--gen-kwargs", "max_new_tokens=4"]
    pmod, fastv = tmp_path / "pmod", tmp_path / "fastv"
    assert main(["eval", "--model", "tiny-llava-onevision", "--output", str(pmod), *common]) == 0
    assert main(["eval", "--model", "tiny-llava-onevision:vanilla", "--method", "fastv", "--match", "p-MoD-0.5",
                 "--output", str(fastv), *common]) == 0, capsys.readouterr().err
    for run, cls in ((pmod, "PMoDLlavaOnevisionForConditionalGeneration"), (fastv, "RoutedLlavaOnevisionForConditionalGeneration")):
        meta = json.loads((run / "run.json").read_text())
        assert meta["host"] == meta["model_info"]["host"] == "llava_onevision", run
        assert meta["model_info"]["requests_as"].startswith("llava_hf") and meta["model_info"]["class"] == cls
        rows = json.loads((run / "summary.json").read_text())["rows"]
        assert [r["benchmark"] for r in rows] == ["Chart", "GQA"] and all(r["n"] == 2 for r in rows)
    mm = json.loads((fastv / "run.json").read_text())["eval"]["method_match"]
    meta = json.loads((fastv / "run.json").read_text())
    ref = solve("fastv", "tiny-llava-onevision", tuple(mm["image_size"]), match="p-MoD-0.5", text_tokens=mm["text_tokens"])
    assert mm["target_label"] == "p-MoD-0.5" and mm["rel_err"] <= 0.01 and meta["eval"]["identity"]["method"] == ref.config.spec()
    assert main(["report", str(pmod), str(fastv), "--output", str(tmp_path / "rep")]) == 0
    assert "tiny-llava-onevision" in (tmp_path / "rep" / "index.md").read_text()
