"""Training on Qwen2.5-VL: chat-template rendering and label masking against the template's own token boundaries,
dynamic resolution within the pixel budget, collation of images of different sizes, the freeze policy by the host
adapter, bad records, and (slow) the demo run end to end with resume."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import demo_records, zero3_against_one_process
from pmod_bench.train.data import IGNORE_INDEX, DataCollator, LlavaConversationDataset
from pmod_bench.train.layouts import LLAVA, QWEN2_5_VL, layout_for


@pytest.fixture(scope="module")
def qwen():
    from pmod_bench.model.loading import load_model

    return load_model("tiny-qwen2.5-vl:vanilla")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return demo_records(tmp_path_factory, "qwen_demo", n_image=6, n_text=2, n_multi=2, bad={"missing": 1, "malformed": 1})


def _dataset(processor, root, records, **kw):
    kw = {"template": "chat", "image_aspect_ratio": "native", "layout": QWEN2_5_VL, **kw}
    return LlavaConversationDataset(records, processor, image_folder=str(root), **kw)


def _messages(rec) -> list:
    """The record as chat messages, written out by hand (images where the tags stand)."""
    out = []
    for role, value in rec.turns:
        if role == "gpt":
            out.append({"role": "assistant", "content": [{"type": "text", "text": value}]})
            continue
        content = []
        for k, piece in enumerate(value.split("<image>")):
            if k:
                content.append({"type": "image"})
            if piece.strip():
                content.append({"type": "text", "text": piece.strip()})
        out.append({"role": "user", "content": content})
    return out


def _template_ids(processor, messages, gen: bool) -> list:
    """The tokens of ``processor.apply_chat_template``'s rendering of ``messages`` (one pad token per image)."""
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def _expected_labels(processor, rec, grid_thw) -> tuple:
    """(ids, labels) from the chat template's own tokenisation: assistant turn i's learned tokens are those between
    the template's tokens of messages[:i] + generation prompt and of messages[:i+1]; each image pad token then
    expands to t*h*w/4 tokens (label -100)."""
    msgs = _messages(rec)
    full = _template_ids(processor, msgs, gen=False)
    learned = set()
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            a, b = len(_template_ids(processor, msgs[:i], gen=True)), len(_template_ids(processor, msgs[: i + 1], gen=False))
            assert full[:b] == _template_ids(processor, msgs[: i + 1], gen=False)
            learned.update(range(a, b))
    pad_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    counts = iter([int(g.prod()) // 4 for g in grid_thw])
    ids, labels = [], []
    for j, tok in enumerate(full):
        n = next(counts) if tok == pad_id else 1
        ids += [tok] * n
        labels += [tok if j in learned and tok != pad_id else IGNORE_INDEX] * n
    return ids, labels


def test_labels_are_the_assistant_turns_by_the_chat_templates_token_boundaries(qwen, demo):
    _, processor = qwen
    root, records = demo
    ds = _dataset(processor, root, records)
    tok = processor.tokenizer
    checked = 0
    for pos, rec in enumerate(ds.records):
        if rec.images and any(p.startswith("images/missing") for p in rec.images):
            continue
        s = ds.build(rec)
        grid = s.get("image_grid_thw", torch.zeros(0, 3, dtype=torch.long))
        ids, labels = _expected_labels(processor, rec, grid)
        assert s["input_ids"].tolist() == ids
        assert s["labels"].tolist() == labels  # -100 exactly outside the assistant spans
        learned = [t for t, l in zip(ids, labels) if l != IGNORE_INDEX]
        answers = [v for r, v in rec.turns if r == "gpt"]
        # <|im_end|> (the end of turn the model must learn to stop on) and its "\n" are learned, the header is not
        assert tok.decode(learned) == "".join(a + "<|im_end|>\n" for a in answers)
        assert "<|im_start|>" not in tok.decode(learned) and "assistant" not in tok.decode(learned)
        checked += 1
    assert checked >= 9  # 6 single-image (one two-turn), 2 two-image, 2 text-only


def test_images_stand_where_their_tags_are(qwen, demo):
    _, processor = qwen
    root, records = demo
    ds = _dataset(processor, root, records)
    rec = next(r for r in ds.records if len(r.images) == 2)
    text, spans = ds._text_and_spans(rec)
    assert "First:<|vision_start|><|image_pad|><|vision_end|>Second:<|vision_start|><|image_pad|><|vision_end|>Do" \
        in text.replace("\n", "")
    s = ds.build(rec)
    assert s["image_grid_thw"].shape == (2, 3)
    assert int((s["input_ids"] == ds.image_token_id).sum()) == int(s["image_grid_thw"].prod(-1).sum()) // 4
    assert s["mm_token_type_ids"].tolist() == (s["input_ids"] == ds.image_token_id).long().tolist()


def test_pixel_budget_caps_each_image(qwen, tmp_path):
    from PIL import Image

    _, processor = qwen
    Image.new("RGB", (640, 320), (10, 200, 30)).save(tmp_path / "big.png")
    rec = [{"id": "big", "image": "big.png", "conversations": [
        {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "green"}]}]
    tokens = {}
    for cap in (12544, 25088, 50176):
        s = _dataset(processor, tmp_path, rec, pixel_budget={"longest_edge": cap})[0]
        t, h, w = s["image_grid_thw"][0].tolist()
        assert h * w * 14 * 14 <= cap and s["pixel_values"].shape[0] == t * h * w
        tokens[cap] = int((s["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())
    assert tokens[12544] < tokens[25088] < tokens[50176]
    from pmod_bench.train.config import ConfigError

    with pytest.raises(ConfigError, match="min_pixels <= max_pixels"):
        _dataset(processor, tmp_path, rec, pixel_budget={"longest_edge": 1000})  # below the processor's own minimum
    with pytest.raises(ConfigError, match="LLaVA resizes to its tower's tiles: remove them"):
        _dataset(processor, tmp_path, rec, layout=LLAVA, pixel_budget={"longest_edge": 1000})


def _mixed_samples(processor, demo) -> list:
    root, records = demo
    ds = _dataset(processor, root, records)
    picks = [r for r in ds.records if r.images and "missing" not in r.images[0]]
    return [ds.build(r) for r in (picks[0], picks[1], next(r for r in picks if len(r.images) == 2))]


def test_templates_and_aspect_ratios_that_do_not_fit_are_refused(qwen, demo):
    from pmod_bench.train.config import ConfigError

    _, processor = qwen
    root, records = demo
    with pytest.raises(ConfigError, match="data.template=vicuna_v1 does not render Qwen2.5-VL prompts.*use data.template=chat"):
        _dataset(processor, root, records, template="vicuna_v1")
    with pytest.raises(ConfigError, match="data.image_aspect_ratio=pad is not for Qwen2.5-VL.*=native"):
        _dataset(processor, root, records, image_aspect_ratio="pad")


def test_collation_concatenates_patches_along_dim0(qwen, demo):
    """Images of different sizes (and two per record) in one batch: pixel_values are the samples' patches concatenated
    along dim 0, image_grid_thw one row per image, mm_token_type_ids padded with 0 like input_ids."""
    _, processor = qwen
    samples = _mixed_samples(processor, demo)
    assert len({tuple(s["image_grid_thw"][0].tolist()) for s in samples}) > 1  # different sizes
    batch = DataCollator(0, QWEN2_5_VL.image_keys, QWEN2_5_VL.token_keys)(samples)
    assert torch.equal(batch["pixel_values"], torch.cat([s["pixel_values"] for s in samples]))
    assert batch["image_grid_thw"].shape == (4, 3)
    assert int(batch["image_grid_thw"].prod(-1).sum()) == batch["pixel_values"].shape[0]
    for b, s in enumerate(samples):
        n = s["input_ids"].numel()
        assert batch["mm_token_type_ids"][b, :n].tolist() == s["mm_token_type_ids"].tolist()
        assert batch["mm_token_type_ids"][b, n:].eq(0).all() and batch["attention_mask"][b, n:].eq(0).all()
    text = {k: v for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
    mixed = DataCollator(0, QWEN2_5_VL.image_keys, QWEN2_5_VL.token_keys)(
        [samples[0], {"input_ids": torch.tensor([5, 6]), "labels": torch.tensor([5, 6])}])
    assert mixed["mm_token_type_ids"][1].eq(0).all() and mixed["image_grid_thw"].shape == (1, 3)
    assert set(text) == {"input_ids", "attention_mask", "labels", "mm_token_type_ids"}


def test_a_collated_batch_computes_what_each_sample_does_alone(qwen, demo):
    """The batch's logits (patches of 4 images of 3 sizes concatenated, right padding, M-RoPE from
    mm_token_type_ids) equal each sample's own forward on its valid positions."""
    model, processor = qwen
    samples = _mixed_samples(processor, demo)
    batch = DataCollator(0, QWEN2_5_VL.image_keys, QWEN2_5_VL.token_keys)(samples)
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        for b, s in enumerate(samples):
            one = DataCollator(0, QWEN2_5_VL.image_keys, QWEN2_5_VL.token_keys)([s])
            ref = model(**{k: v for k, v in one.items() if k != "labels"}, use_cache=False).logits[0]
            n = s["input_ids"].numel()
            torch.testing.assert_close(out[b, :n], ref, atol=2e-4, rtol=1e-4)


def test_freeze_policy_comes_from_the_host_adapter(qwen):
    from pmod_bench import PMoDConfig
    from pmod_bench.model.modeling import to_pmod
    from pmod_bench.model.presets import build_preset
    from pmod_bench.train.build import apply_trainable

    model, _ = qwen
    assert layout_for(model) is QWEN2_5_VL and layout_for(model.config) is QWEN2_5_VL
    assert layout_for(build_preset("tiny", pmod=None)[0]) is LLAVA
    pmod = to_pmod(build_preset("tiny-qwen2.5-vl", pmod=None)[0], PMoDConfig())
    assert layout_for(pmod) is QWEN2_5_VL  # p-MoD model_type -> the same family
    summary = apply_trainable(pmod, QWEN2_5_VL.stage_trainable["sft"])
    assert {g: v["trainable"] for g, v in summary.items()} == {
        "vision": False, "connector": False, "llm": True, "routers": True}
    for name, p in pmod.named_parameters():
        assert p.requires_grad == (not name.startswith("model.visual.")), name  # tower and merger frozen
    merger = {n for n, _ in pmod.named_parameters() if QWEN2_5_VL.param_group(n) == "connector"}
    assert merger and all(n.startswith("model.visual.merger.") for n in merger)


def test_bad_records_skip_and_fail(qwen, demo):
    from pmod_bench.train.data import BadSampleError

    _, processor = qwen
    root, records = demo
    ds = _dataset(processor, root, records)
    assert [e["id"] for e in ds.malformed] == ["malformed-0"]
    i = next(k for k, r in enumerate(ds.records) if r.id == "missing-0")
    s = ds[i]
    assert [e["id"] for e in s["bad_samples"]] == ["missing-0"] and "image_grid_thw" in s  # same modality
    with pytest.raises(BadSampleError, match=r"record \d+ \(id 'missing-0', image .*missing-0.png\): image file not found"):
        _dataset(processor, root, records[:-1], on_bad_sample="fail")[i]


@pytest.mark.slow
def test_demo_trains_resumes_and_loads(tmp_path, one_thread):
    """`pmod-bench train --demo --model tiny-qwen2.5-vl`: stopped at step 6 and resumed, the losses equal an
    uninterrupted run's; the run directory loads with load_model and generates."""
    from pmod_bench.cli import main
    from pmod_bench.model.loading import load_model

    args = ["train", "--demo", "--model", "tiny-qwen2.5-vl", "train.max_steps=12", "train.save_steps=6",
            "train.progress_bar=false"]
    assert main([*args, "-o", str(tmp_path / "A")]) == 0
    assert main([*args, "train.stop_at_step=6", "-o", str(tmp_path / "B")]) == 0
    assert json.loads((tmp_path / "B" / "train_summary.json").read_text())["status"] == "stopped"
    assert main([*args, "-o", str(tmp_path / "B")]) == 0
    rows = {k: [json.loads(l) for l in (tmp_path / k / "train_log.jsonl").read_text().splitlines()] for k in "AB"}
    summary = json.loads((tmp_path / "B" / "train_summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from"].endswith("checkpoint-6")
    assert summary["trainable"] == ["llm", "routers"] and summary["model_info"]["family"] == "qwen2_5_vl"
    assert [r["step"] for r in rows["B"]] == list(range(1, 13))
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(rows["A"], rows["B"])]
    assert max(diffs) <= 1e-5 * max(r["loss"] for r in rows["A"]), diffs
    assert rows["A"][-1]["loss"] < rows["A"][0]["loss"]
    model, processor = load_model(str(tmp_path / "B"))
    assert type(model).__name__ == "PMoDQwen2_5_VLForConditionalGeneration" and model.config.pmod["overflow_guard"] is False
    from pmod_bench.model.presets import build_preset

    start, _ = build_preset("tiny-qwen2.5-vl", pmod=None, seed=42)  # the run's starting weights (train.seed)
    trained = dict(model.named_parameters())
    for name, p in start.named_parameters():  # the vision tower and merger are the preset's, the LLM moved
        if name.startswith("model.visual."):
            torch.testing.assert_close(trained[name], p, atol=0, rtol=0)
    assert not torch.equal(trained["lm_head.weight"], dict(start.named_parameters())["lm_head.weight"])
    from PIL import Image

    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
                                         tokenize=False, add_generation_prompt=True)
    enc = processor(text=[text], images=[Image.new("RGB", (64, 48), (220, 30, 30))], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]


@pytest.mark.slow
def test_zero3_on_two_processes_stops_resumes_and_equals_one_process(tmp_path, one_thread):
    """ZeRO-3 on two gloo processes (per-device batch 2), stopped at step 2 and resumed, gives the losses of one
    process with the whole global batch of 4: the loss is the mean over the global batch's labelled tokens (Qwen's
    HF class opts out of num_items_in_batch; the trainer opts it back in, as for LLaVA). The third global batch mixes
    image and text-only records (the ZeRO-3 filler row)."""
    pytest.importorskip("deepspeed")
    plain, s, a, b = zero3_against_one_process(tmp_path, "demo-tiny-qwen2.5-vl.yaml", ["train.stop_at_step=2"], [])
    assert s["status"] == "completed" and s["resumed_from"].endswith("checkpoint-2") and s["world_size"] == 2
    assert s["params"] == plain["params"] and s["bad_sample_skips"] == plain["bad_sample_skips"]
    assert len(a) == len(b) == 3 and max(abs(x - y) / x for x, y in zip(a, b)) < 1e-5, (a, b)


def test_demo_model_option(capsys, tmp_path):
    from pmod_bench.cli import main

    assert main(["train", "--model", "tiny-qwen2.5-vl", "--config", "demo-tiny"]) == 2
    assert "--model is for --demo; for a recipe pass model.source=tiny-qwen2.5-vl" in capsys.readouterr().err
    assert main(["train", "--demo", "--model", "qwen2.5-vl-7b"]) == 2
    assert "--demo trains a tiny preset; use one of tiny, tiny-llava, tiny-qwen2.5-vl" in capsys.readouterr().err
    assert main(["train", "--demo", "--model", "tiny-qwen2.5-vl", "--print-config", "-o", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert "source: tiny-qwen2.5-vl" in out and "template: chat" in out and "max_pixels: 25088" in out
    assert main(["train", "--demo", "--model", "tiny-llava", "--print-config", "-o", str(tmp_path / "l")]) == 0
    assert "source: tiny-llava" in capsys.readouterr().out  # no demo recipe of its own: demo-tiny + model.source
