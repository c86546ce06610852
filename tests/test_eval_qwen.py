"""Qwen2.5-VL through ``pmod_llava``: its requests are lmms-eval 0.7.3's ``qwen2_5_vl`` (chat class) requests.

1. Request equality: for every document of several benchmarks' fixtures (a multi-image MMMU question among
   them), the request ``pmod_llava`` builds for the tiny Qwen2.5-VL preset equals, byte for byte, the one
   lmms-eval's own ``lmms_eval.models.chat.qwen2_5_vl.Qwen2_5_VL`` builds for the same document from the same
   checkpoint saved in the hub's layout: the prompt text after the chat template, the processor call (its
   keyword arguments, the images handed to it, the image processor's settings), every tensor handed to
   ``generate`` (ids, mask, pixel values, ``image_grid_thw``) and every generate keyword. Both sides run
   unchanged; only the *model*'s ``generate`` is replaced (a test-local stub that records its arguments and
   returns two fixed tokens), and the processors are wrapped to record their calls.
2. Host dispatch and options (the table in ``tasks/requests.py``, keyed by the host adapter's family).
3. End to end: the whole suite on fixtures with the real tiny model, answers identical at batch 1 and 8; the
   real CLI (``pmod-bench eval --model tiny-qwen2.5-vl:vanilla``) writes a run directory that says its host
   and that ``pmod-bench report`` reads.

lmms-eval's qwen2_5_vl module imports ``decord`` (a video reader) at module level, which lmms-eval does not
install; where it is missing, an empty module stands in for it (videos are never decoded here).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import pytest
import torch

pytest.importorskip("lmms_eval")

from conftest import benchmark_data_env  # noqa: E402
from conftest import lmms_eval_responses as responses  # noqa: E402
from lmms_capture import Recorder, mmmu_format, recording_generate  # noqa: E402,F401  (mmmu_format: autouse)
from lmms_capture import same_call as _same_call  # noqa: E402

BENCHES = ["MME", "MMMU", "RefCOCO", "SEED", "Chart", "MMB", "POPE"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    yield from benchmark_data_env(tmp_path_factory)  # every benchmark's fixture


@pytest.fixture(scope="module")
def qwen():
    from pmod_bench.model.presets import build_preset

    return build_preset("tiny-qwen2.5-vl", pmod=None)


@pytest.fixture(scope="module")
def reference_cls():
    """lmms-eval's own chat class (``--model qwen2_5_vl``)."""
    if importlib.util.find_spec("decord") is None:
        mp = pytest.MonkeyPatch()
        mp.setitem(sys.modules, "decord", types.ModuleType("decord"))
        from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL

        mp.undo()
        return Qwen2_5_VL
    from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL

    return Qwen2_5_VL


@pytest.fixture(scope="module")
def hub_dir(qwen, tmp_path_factory):
    from pmod_bench.model.presets import save_qwen_hub_layout

    return save_qwen_hub_layout(*qwen, tmp_path_factory.mktemp("qwen_hub"))


def tasks_and_requests(limit=None):
    """(task objects, [(simple request, chat request)]) of the adapter tasks of BENCHES: the simple request is what
    pmod_llava receives, the chat one what lmms-eval's chat models receive (ConfigurableMessagesTask's)."""
    from lmms_eval.api.task import ConfigurableMessagesTask
    from lmms_eval.tasks import get_task_dict

    from pmod_bench.tasks.benchmarks import BENCHMARKS
    from pmod_bench.tasks.runner import task_manager

    names = [t for b in BENCHES for t in BENCHMARKS[b].tasks]
    tasks = get_task_dict(names, task_manager())
    pairs = []
    for name in names:
        task = tasks[name]
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        for inst in task.instances:
            meta = {"task": name, "doc_id": inst.doc_id, "repeats": 1, "split": inst.args[-1]}
            chat = ConfigurableMessagesTask.construct_requests(task, doc_id=inst.doc_id, ctx=inst.args[0], metadata=meta)
            pairs.append((inst, chat))
    return tasks, pairs


def _recorded_pair(qwen, hub_dir, reference_cls, monkeypatch, batch_size: int):
    """(lmms-eval's reference model on ``hub_dir``, ours on the same weights, the (ours, chat) request pairs, the
    generate() calls each made: {"ref": [...], "ours": [...]}); both processors are Recorders."""
    from pmod_bench.tasks.plugin import PMoDLlava

    ref = reference_cls(pretrained=str(hub_dir), device="cpu", device_map="cpu", batch_size=batch_size)
    ours = PMoDLlava.from_loaded(*qwen, name="tiny-qwen2.5-vl:vanilla", batch_size=batch_size, device="cpu")
    tasks, pairs = tasks_and_requests()
    ref.task_dict = ours.task_dict = {name: task.dataset for name, task in tasks.items()}
    gen = {"ref": [], "ours": []}
    monkeypatch.setattr(ref._model, "generate", recording_generate(gen["ref"]))
    monkeypatch.setattr(ours._model, "generate", recording_generate(gen["ours"]))
    ref.processor, ours.host.processor = Recorder(ref.processor), Recorder(ours.host.processor)
    return ref, ours, pairs, gen


@pytest.mark.slow
def test_requests_equal_lmms_evals_qwen2_5_vl(data_root, qwen, hub_dir, reference_cls, monkeypatch):
    ref, ours, pairs, gen = _recorded_pair(qwen, hub_dir, reference_cls, monkeypatch, batch_size=1)
    # the image processor as lmms-eval builds it: AutoProcessor.from_pretrained(hub dir, min_pixels, max_pixels)
    assert ours.host.processor.image_processor.to_dict() == ref.processor.image_processor.to_dict()
    assert dict(ref.processor.image_processor.size)["shortest_edge"] == 256 * 28 * 28
    assert dict(ref.processor.image_processor.size)["longest_edge"] == 1605632

    seen_multi = set()
    for simple, chat in pairs:
        where = f"{simple.task_name} doc {simple.doc_id}"
        theirs = ref.generate_until([chat])[0].text
        assert ours.generate_until([simple]) == [theirs], where
        p_ours, p_ref = ours.host.processor.calls[-1], ref.processor.calls[-1]
        _same_call(p_ours, p_ref, f"{where}: processor call")
        _same_call(gen["ours"][-1], gen["ref"][-1], f"{where}: generate")
        if len(p_ref["images"] or []) > 1:
            seen_multi.add(simple.task_name)
    assert len(gen["ours"]) == len(gen["ref"]) == len(pairs) > 30
    assert "pmod_mmmu_val" in seen_multi  # several images in one prompt, interleaved by MMMU's doc_to_messages
    texts = [c["text"][0] for c in ours.host.processor.calls]
    assert all(t.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n") for t in texts)
    assert all(t.endswith("<|im_end|>\n<|im_start|>assistant\n") for t in texts)


def _rows(processor_call: dict, generate_call: dict) -> list:
    """Per request of a batch: (prompt, its ids / mask without padding, its images' pixels, their grid)."""
    ids, mask = generate_call["input_ids"], generate_call["attention_mask"]
    grid, pixels = generate_call["image_grid_thw"], generate_call["pixel_values"]
    per_image = grid.prod(-1).tolist()  # patches of each image, in the order of the prompts
    starts = [sum(per_image[:i]) for i in range(len(per_image))]
    rows, k = [], 0
    for b, text in enumerate(processor_call["text"]):
        n = text.count("<|vision_start|>")  # this prompt's images
        keep = mask[b].bool()
        pix = [pixels[starts[k + i]: starts[k + i] + per_image[k + i]] for i in range(n)]
        rows.append((text, ids[b][keep].tolist(), [p.numpy().tobytes() for p in pix], grid[k:k + n].tolist()))
        k += n
    return sorted(rows, key=lambda r: r[0])


@pytest.mark.slow
def test_batched_requests_equal_lmms_evals(data_root, qwen, hub_dir, reference_cls, monkeypatch):
    """Batch size 4: left padding on both sides, and each request's tokens and pixels are those of lmms-eval's batch."""
    ref, ours, pairs, gen = _recorded_pair(qwen, hub_dir, reference_cls, monkeypatch, batch_size=4)
    mme = [(s, c) for s, c in pairs if s.task_name == "pmod_mme"][:4]
    assert [r.text for r in ref.generate_until([c for _, c in mme])] == ours.generate_until([s for s, _ in mme])
    (p_ours,), (p_ref,) = ours.host.processor.calls, ref.processor.calls
    assert p_ours["padding_side"] == p_ref["padding_side"] == "left"
    assert {k: v for k, v in p_ours.items() if k not in ("text", "images")} == \
        {k: v for k, v in p_ref.items() if k not in ("text", "images")}
    assert _rows(p_ours, gen["ours"][0]) == _rows(p_ref, gen["ref"][0])
    same_keys = {k: v for k, v in gen["ours"][0].items() if not isinstance(v, torch.Tensor)}
    assert same_keys == {k: v for k, v in gen["ref"][0].items() if not isinstance(v, torch.Tensor)}


def test_host_dispatch_and_options(qwen):
    """One table picks the request builder from model_type; host options and templates are checked per host."""
    from pmod_bench.model.presets import build_preset
    from pmod_bench.tasks.requests import REQUESTS, LlavaRequests, QwenChatRequests, requests_of_type
    from pmod_bench.tasks.plugin import PMoDLlava

    lm = PMoDLlava.from_loaded(*qwen, name="q", device="cpu")
    assert isinstance(lm.host, QwenChatRequests) and lm.host.name == "qwen2_5_vl"
    assert lm.describe()["host"] == "qwen2_5_vl" and lm.identity["host_settings"]["min_pixels"] == 200704
    assert (lm.host.max_new_tokens, lm.host.template) == (128, None)  # lmms-eval's default; the checkpoint's template
    assert qwen[1].image_processor.size["shortest_edge"] == 16 * 28 * 28  # the preset's own processor is untouched
    assert requests_of_type("pmod_qwen2_5_vl") == requests_of_type("qwen2_5_vl") == ("qwen2_5_vl", QwenChatRequests)
    assert requests_of_type("pmod_llava_next") == ("llava_next", LlavaRequests) and set(REQUESTS) >= {"llava", "llava_next", "qwen2_5_vl"}
    cfg, until = lm.host.generation({"until": ["\n\n", "ASSISTANT:"], "max_new_tokens": 9, "top_p": 1.0, "do_sample": False})
    assert until == [] and cfg["max_new_tokens"] == 9 and cfg["top_p"] is None and "stop_strings" not in cfg
    sampled, _ = lm.host.generation({"temperature": 0.7, "top_p": 0.9})
    assert (sampled["do_sample"], sampled["temperature"], sampled["top_p"], sampled["top_k"]) == (True, 0.7, 0.9, None)
    stopping = PMoDLlava.from_loaded(*qwen, name="q", device="cpu", stop_at_until=True)
    cfg, until = stopping.host.generation({"until": ["ASSISTANT:"]})
    assert until == cfg["stop_strings"] == ["ASSISTANT:"] and stopping.host.cut(["a ASSISTANT: b"], until) == ["a "]
    small = PMoDLlava.from_loaded(*qwen, name="q", device="cpu", min_pixels=3136, max_pixels=12544, max_new_tokens=5)
    assert small.identity != lm.identity and small.host.max_new_tokens == 5
    with pytest.raises(ValueError, match="vicuna_v1 is LLaVA's conversation template"):
        PMoDLlava.from_loaded(*qwen, name="q", device="cpu", chat_template="vicuna_v1")
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        PMoDLlava.from_loaded(*qwen, name="q", device="cpu", min_pixels=9000, max_pixels=100)
    with pytest.raises(NotImplementedError, match="loglikelihood"):
        lm.loglikelihood([])
    with pytest.raises(ValueError, match="build_prompt is the LLaVA hosts'"):
        lm.build_prompt("x", 1)
    tiny = build_preset("tiny", pmod=None)
    llava = PMoDLlava.from_loaded(*tiny, name="tiny", device="cpu")
    assert isinstance(llava.host, LlavaRequests) and llava.host.name == "llava_next" and "host_settings" not in llava.identity
    with pytest.raises(ValueError, match=r"min_pixels \(model_args of qwen2_5_vl models\) do not apply to this llava_next"):
        PMoDLlava.from_loaded(*tiny, name="tiny", device="cpu", min_pixels=3136)
    with pytest.raises(ValueError, match="evaluates LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL and LLaVA-OneVision models"):
        requests_of_type("idefics3")


def test_auto_dtype_on_a_gpu_is_the_hosts(hub_dir):
    """dtype=auto: bfloat16 for Qwen2.5-VL on a GPU (lmms-eval's qwen2_5_vl), float16 for LLaVA (the paper's), read from
    the source before loading; float32 on CPU."""
    from pmod_bench.tasks.requests import REQUESTS, source_model_type
    from pmod_bench.tasks.plugin import resolve_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [source_model_type(s) for s in ("tiny-qwen2.5-vl:vanilla", "qwen2.5-vl-7b", "tiny", str(hub_dir))] == \
        ["qwen2_5_vl", "qwen2_5_vl", "llava_next", "qwen2_5_vl"]
    assert source_model_type("/no/such/dir") is None
    gpu = {t: resolve_dtype("auto", cuda, REQUESTS[t].gpu_dtype) for t in ("qwen2_5_vl", "llava_next")}
    assert gpu == {"qwen2_5_vl": torch.bfloat16, "llava_next": torch.float16}
    assert resolve_dtype("auto", cpu, "bfloat16") == torch.float32 and resolve_dtype("float16", cuda, "bfloat16") == torch.float16


@pytest.mark.slow
def test_whole_suite_answers_equal_at_batch_1_and_8(data_root, qwen, tmp_path):
    """Every benchmark of the paper's suite on its fixture through lmms-eval with the tiny Qwen2.5-VL: the same
    answers at batch size 1 and 8 (left padding, images of different sizes in one batch)."""
    from pmod_bench.tasks.benchmarks import BENCHMARKS, SUITES
    from pmod_bench.tasks.plugin import PMoDLlava
    from pmod_bench.tasks.runner import EvalConfig, run_eval

    runs = {}
    for bs in (1, 8):
        lm = PMoDLlava.from_loaded(*qwen, name="tiny-qwen2.5-vl:vanilla", batch_size=bs, device="cpu")
        cfg = EvalConfig(model="tiny-qwen2.5-vl:vanilla", suite="all", output=str(tmp_path / f"b{bs}"), batch_size=bs,
                         gen_kwargs="max_new_tokens=6")
        out = run_eval(cfg, lm=lm, log=lambda m: None)
        assert out.failures == {} and [r["benchmark"] for r in out.rows] == list(SUITES["all"])
        runs[bs] = responses(tmp_path / f"b{bs}")
    assert len(runs[1]) == 68 and runs[1] == runs[8]
    meta = json.loads((tmp_path / "b8" / "run.json").read_text())
    assert meta["host"] == meta["model_info"]["host"] == "qwen2_5_vl"
    assert meta["model_info"]["max_pixels"] == 1605632 and "chat_template" not in meta["eval"]["identity"]
    rows = json.loads((tmp_path / "b8" / "summary.json").read_text())["rows"]
    assert len(rows) == len(BENCHMARKS) and {r["benchmark"]: r["n_unparsed"] for r in rows}["RefCOCO"] is not None


@pytest.mark.slow
@pytest.mark.parametrize("model, cls", [("tiny-qwen2.5-vl:vanilla", "Qwen2_5_VLForConditionalGeneration"),
                                        ("tiny-qwen2.5-vl", "PMoDQwen2_5_VLForConditionalGeneration")])
def test_cli_eval_qwen_then_report(data_root, tmp_path, capsys, model, cls):
    """`pmod-bench eval --model tiny-qwen2.5-vl[:vanilla] --suite ablation --limit 2 --data FIXTURES` (the vanilla and
    the p-MoD Qwen, whose requests are found through its host adapter's family), then `pmod-bench report`."""
    from pmod_bench.cli import main
    from pmod_bench.tasks.benchmarks import SUITES

    run = tmp_path / "run"
    argv = ["eval", "--model", model, "--suite", "ablation", "--limit", "2", "--data", str(data_root),
            "--output", str(run), "--threads", "1", "--gen-kwargs", "max_new_tokens=4"]
    assert main(argv) == 0
    rows = json.loads((run / "summary.json").read_text())["rows"]
    assert sorted(r["benchmark"] for r in rows) == sorted(SUITES["ablation"]) and all(r["n"] == 2 for r in rows)
    meta = json.loads((run / "run.json").read_text())
    assert meta["host"] == "qwen2_5_vl" and meta["model_info"]["requests_as"].startswith("qwen2_5_vl")
    assert meta["model_info"]["class"] == cls and (min(meta["model_info"].get("layer_ratios") or [1.0]) < 1.0) == ("PMoD" in cls)
    assert main(argv) == 0 and "already finished" in capsys.readouterr().err  # resumes: nothing recomputed
    assert main(["report", str(run), "--output", str(tmp_path / "rep")]) == 0
    assert "tiny-qwen2.5-vl" in (tmp_path / "rep" / "index.md").read_text()
