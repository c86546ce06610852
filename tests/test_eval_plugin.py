"""The pmod_llava lmms-eval model: batching, stop strings, loglikelihood, response cache, model_args.

Tiny random-weight p-MoD model (routers randomised, so routing is exercised), built inline; no
lmms-eval evaluator run here (see test_tasks_adapters.py / test_eval_runner.py for those).
"""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance  # noqa: E402

from pmod_bench.tasks.fixtures import image  # noqa: E402
from pmod_bench.tasks.plugin import PMoDLlava, parse_ratios  # noqa: E402

QUESTIONS = ["Is there a red disc?", "What color is the box on the right side of the picture?", "How many shapes?",
             "Describe the image.", "Is the background plain or is it a gradient of many colors?", "Which shape is left?"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread: several times faster for tiny models on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    from pmod_bench.model.presets import build_preset, random_routers

    model, processor = build_preset("tiny")
    random_routers(model, seed=1)
    return model, processor


@pytest.fixture(scope="module")
def docs():
    # different image sizes -> different anyres tile counts and prompt lengths within a batch
    return {"t": {"test": [{"q": q, "img": image(i, 48 + 12 * i, 40 + 6 * (i % 3))} for i, q in enumerate(QUESTIONS)]}}


def make_lm(tiny, docs, **kw):
    lm = PMoDLlava.from_loaded(*tiny, name="tiny", **kw)
    lm.task_dict = docs
    return lm


def gen_requests(docs, gen_kwargs):
    return [Instance(request_type="generate_until", arguments=(d["q"], dict(gen_kwargs), lambda d: [d["img"]], i, "t", "test"),
                     idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1})
            for i, d in enumerate(docs["t"]["test"])]


def ll_requests(docs, continuation=" yes"):
    return [Instance(request_type="loglikelihood", arguments=(d["q"], continuation, lambda d: [d["img"]], i, "t", "test"),
                     idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1})
            for i, d in enumerate(docs["t"]["test"])]


def test_batched_generation_equals_batch_size_one(tiny, docs):
    kw = {"max_new_tokens": 6, "until": ["\n\n"]}
    one = make_lm(tiny, docs, batch_size=1)
    a = one.generate_until(gen_requests(docs, kw))
    four = make_lm(tiny, docs, batch_size=4)
    b = four.generate_until(gen_requests(docs, kw))
    assert one.model_calls == 6 and four.model_calls == 2
    assert a == b
    assert all(isinstance(x, str) for x in a)


def test_until_ignored_like_llava_unless_asked_and_max_new_tokens(tiny, docs, monkeypatch):
    """lmms-eval's `llava` model (the paper's runs) ignores `until`; stop_at_until=True cuts there."""
    lm = make_lm(tiny, docs, batch_size=3, stop_at_until=True)
    free = lm.generate_until(gen_requests(docs, {"max_new_tokens": 8, "until": []}))
    i, text = next((i, t) for i, t in enumerate(free) if len(t.strip()) >= 3)
    stop = text.strip()[1:3]  # a string the model does produce
    cut = lm.generate_until(gen_requests(docs, {"max_new_tokens": 8, "until": [stop]}))
    assert stop not in cut[i] and text.startswith(cut[i])
    default = make_lm(tiny, docs, batch_size=3)  # the paper's setup: the answer is not cut
    assert default.generate_until(gen_requests(docs, {"max_new_tokens": 8, "until": [stop]})) == free
    assert default.identity != lm.identity  # the two modes never share cached responses
    new_tokens = []
    generate = tiny[0].generate

    def spy(**kwargs):
        out = generate(**kwargs)
        new_tokens.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    monkeypatch.setattr(tiny[0], "generate", spy)
    lm.generate_until(gen_requests(docs, {"max_new_tokens": 2, "until": []}))
    assert new_tokens == [2, 2]


def test_prompt_is_vicuna_v1_with_image_token(tiny, docs):
    lm = make_lm(tiny, docs)
    prompt = lm.build_prompt("What is it?", 1)
    assert prompt.startswith("A chat between a curious human and an artificial intelligence assistant.")
    assert prompt.endswith(" USER: <image>\nWhat is it? ASSISTANT:")
    assert lm.build_prompt("<image> inline", 1).count("<image>") == 1  # the task placed it
    assert "<image>" not in lm.build_prompt("text only", 0)
    # several images: joined by spaces, as lmms-eval's llava model writes them (" ".join(tokens) + "\n")
    assert lm.build_prompt("Compare them.", 2).endswith(" USER: <image> <image>\nCompare them. ASSISTANT:")


def test_loglikelihood_matches_manual_computation(tiny, docs):
    lm1 = make_lm(tiny, docs, batch_size=1)
    lm3 = make_lm(tiny, docs, batch_size=3)
    a = lm1.loglikelihood(ll_requests(docs))
    b = lm3.loglikelihood(ll_requests(docs))
    for (la, ga), (lb, gb) in zip(a, b):
        assert la == pytest.approx(lb, abs=1e-4) and ga == gb and la < 0
    # manual: sum log p(continuation tokens) of the unpadded full sequence
    model, processor = tiny
    d = docs["t"]["test"][1]
    ctx = lm1.build_prompt(d["q"], 1)
    full = lm1.build_prompt(d["q"], 1, continuation="yes")
    assert full == ctx + " yes"
    enc = processor(text=[full], images=[d["img"]], return_tensors="pt")
    n = len(processor.tokenizer(full, add_special_tokens=False)["input_ids"]) - len(
        processor.tokenizer(ctx, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = model(**enc).logits[0].float()
    ids = enc["input_ids"][0]
    logp = torch.log_softmax(logits[:-1], -1)[-n:].gather(-1, ids[-n:, None]).sum().item()
    assert a[1][0] == pytest.approx(logp, abs=1e-4)
    # greedy: continuing with the model's own greedy token is greedy
    nxt = logits[-n - 1].argmax().item()  # token predicted after the prompt
    greedy_text = processor.tokenizer.decode([nxt])
    if processor.tokenizer(ctx + greedy_text, add_special_tokens=False)["input_ids"][-1] == nxt:
        (_, g), = make_lm(tiny, docs).loglikelihood(ll_requests({"t": {"test": [d]}}, continuation=greedy_text))
        assert g is True


def test_response_cache_resumes_without_model_calls(tiny, docs, tmp_path):
    kw = {"max_new_tokens": 4}
    lm = make_lm(tiny, docs, batch_size=2, response_cache=str(tmp_path))
    first = lm.generate_until(gen_requests(docs, kw)[:4])  # as if killed after 4 of 6
    assert lm.model_calls == 2
    with open(tmp_path / "responses.rank0.jsonl", "a") as fh:
        fh.write('{"key": "torn')  # a line cut by a kill
    lm2 = make_lm(tiny, docs, batch_size=4, response_cache=str(tmp_path))
    again = lm2.generate_until(gen_requests(docs, kw))
    assert again[:4] == first and lm2.cache.hits == 4 and lm2.model_calls == 1
    lm3 = make_lm(tiny, docs, batch_size=4, response_cache=str(tmp_path))
    assert lm3.generate_until(gen_requests(docs, kw)) == again and lm3.model_calls == 0
    # another generation setting is another request
    lm3.generate_until(gen_requests(docs, {"max_new_tokens": 5})[:1])
    assert lm3.model_calls == 1


def test_model_args(tiny, docs):
    with pytest.raises(ValueError, match="unknown model_args bogus.*Known: pretrained"):
        PMoDLlava(pretrained="tiny", bogus=1)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        PMoDLlava(pretrained="tiny", batch_size="auto")
    with pytest.raises(ValueError, match="vanilla"):
        PMoDLlava(pretrained="tiny:vanilla", shift=0.3)
    with pytest.raises(ValueError, match="no trained router"):
        PMoDLlava(pretrained="tiny", shift=0.3)
    lm = PMoDLlava(pretrained="tiny", shift=0.3, allow_untrained_routers=True, batch_size="2")  # lmms-eval passes strings
    assert lm.batch_size == 2 and lm.identity["layer_ratios"] == lm.model.layer_ratios()
    base = PMoDLlava(pretrained="tiny")
    assert sum(lm.identity["layer_ratios"]) < sum(base.identity["layer_ratios"])
    lm = PMoDLlava.create_from_arg_string("pretrained=tiny,batch_size=3,ratios=[1,1,1,1,1,1,1,0.5]",
                                          {"batch_size": "1", "max_batch_size": None, "device": None})
    assert lm.batch_size == 3 and lm.model.layer_ratios()[-1] == 0.5
    assert parse_ratios("[1,1,0.5]") == parse_ratios("1;1;0.5") == parse_ratios([1, 1, 0.5]) == [1.0, 1.0, 0.5]
    with pytest.raises(ValueError, match="chat_template"):
        PMoDLlava.from_loaded(*tiny, chat_template="nope")


def test_ratios_forms_in_model_args_and_help():
    """The documented ``ratios`` forms read through lmms-eval's --model_args splitting; the help is parse_ratios' own."""
    from lmms_eval.utils import simple_parse_args_string

    from pmod_bench.model.config import RATIOS_FORMS
    from pmod_bench.tasks import plugin

    want = [1.0] * 8 + [0.5] * 24
    for text in ("pretrained=tiny,ratios=[1*8,0.5*24]", "pretrained=tiny,ratios=1*8;0.5*24,batch_size=2"):
        assert parse_ratios(simple_parse_args_string(text)["ratios"]) == want, text
    assert RATIOS_FORMS in plugin.__doc__ and "{RATIOS_FORMS}" not in plugin.__doc__


def test_entry_point_is_a_manifest_not_the_class():
    eps = [ep for ep in importlib.metadata.entry_points(group="lmms_eval.models") if ep.name == "pmod_llava"]
    assert eps, "run `pip install -e . --no-deps` to register the lmms_eval.models entry point"
    from lmms_eval.models.registry_v2 import ModelManifest, ModelRegistryV2

    manifests = eps[0].load()()
    assert all(isinstance(m, ModelManifest) for m in manifests)
    registry = ModelRegistryV2()
    registry.load_entrypoint_manifests()
    assert registry.get_model_class("pmod_llava") is PMoDLlava
