"""Training data: LLaVA prompts and label masking, anyres image tokens, bad samples, batching, sampling."""

from __future__ import annotations

import json

import pytest

from pmod_bench.train.data import (
    IGNORE_INDEX,
    VICUNA_SYSTEM,
    BadSampleError,
    DataCollator,
    LlavaConversationDataset,
    ModalityLengthGroupedSampler,
    expand_to_square,
    normalize_record,
    read_records,
    render_vicuna_v1,
)
from pmod_bench.train.demo import make_demo_dataset


@pytest.fixture(scope="module")
def processor():
    from pmod_bench.model.presets import preset_processor

    return preset_processor("tiny")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    path = make_demo_dataset(root, n_image=6, n_text=2, bad={"missing": 1, "corrupt": 1, "malformed": 1})
    return root, read_records([str(path)])


def _supervised_text(tok, ids, labels):
    return tok.decode([i for i, l in zip(ids.tolist(), labels.tolist()) if l != IGNORE_INDEX])


def test_vicuna_v1_string_is_llavas():
    rec = normalize_record({"image": "x.jpg", "conversations": [
        {"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Color?"}, {"from": "gpt", "value": "Black."}]}, 0)
    text, spans = render_vicuna_v1(rec.turns, "<image>")
    # conv_vicuna_v1.get_prompt(): system + " " + "USER: m ASSISTANT: m</s>" per round; <image> moved first
    assert text == (VICUNA_SYSTEM + " USER: <image>\nWhat is this? ASSISTANT: A cat.</s>"
                    "USER: Color? ASSISTANT: Black.</s>")
    assert [text[a:b] for a, b in spans] == ["A cat.</s>", "Black.</s>"]


def test_labels_mask_everything_but_the_answers(processor, demo):
    root, records = demo
    ds = LlavaConversationDataset(records, processor, image_folder=str(root), image_aspect_ratio="native")
    tok = processor.tokenizer
    two_turn = next(i for i, r in enumerate(ds.records) if len(r.turns) == 4)
    s = ds[two_turn]
    assert s["bad_samples"] == []
    n_img = int((s["input_ids"] == ds.image_token_id).sum())
    # the processor expanded <image> to the anyres feature count; all image tokens are masked
    direct = processor(text=[processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}])],
        images=[__import__("PIL.Image", fromlist=["Image"]).open(root / ds.records[two_turn].images[0]).convert("RGB")],
        return_tensors="pt")
    assert n_img == int((direct["input_ids"] == ds.image_token_id).sum()) > 16
    assert (s["labels"][s["input_ids"] == ds.image_token_id] == IGNORE_INDEX).all()
    answer = ds.records[two_turn].turns[1][1]
    assert _supervised_text(tok, s["input_ids"], s["labels"]).replace(" ", "") == f"{answer}</s>yes</s>"
    assert s["pixel_values"].shape[:2][0] == 1 and s["image_sizes"].shape == (1, 2)
    # text-only record: no image tensors
    t = ds[next(i for i, r in enumerate(ds.records) if not r.images)]
    assert "pixel_values" not in t and (t["input_ids"] != ds.image_token_id).all()


def test_plain_and_chat_templates(processor, demo):
    root, records = demo
    tok = processor.tokenizer
    plain = LlavaConversationDataset(records, processor, image_folder=str(root), template="plain", image_aspect_ratio="native")
    s = plain[0]
    assert _supervised_text(tok, s["input_ids"], s["labels"]) == plain.records[0].turns[1][1] + "\n"
    assert int((s["labels"] != IGNORE_INDEX).sum()) >= 1
    chat = LlavaConversationDataset(records, processor, image_folder=str(root), template="chat", image_aspect_ratio="native")
    c = chat[0]
    assert _supervised_text(tok, c["input_ids"], c["labels"]).strip() == chat.records[0].turns[1][1] + "</s>"


def test_pad_to_square_and_pixel_padding(processor, demo):
    from PIL import Image

    img = expand_to_square(Image.new("RGB", (40, 20), (255, 0, 0)), (1, 2, 3))
    assert img.size == (40, 40) and img.getpixel((0, 0)) == (1, 2, 3) and img.getpixel((20, 20)) == (255, 0, 0)
    root, records = demo
    ds = LlavaConversationDataset(records, processor, image_folder=str(root), image_aspect_ratio="native")
    imgs = [i for i, r in enumerate(ds.records) if r.images][:4]
    samples = [ds[i] for i in imgs]
    tiles = {s["pixel_values"].shape[1] for s in samples}
    batch = DataCollator(processor.tokenizer.pad_token_id)(samples)
    assert batch["pixel_values"].shape[:2] == (4, max(tiles)) and batch["image_sizes"].shape == (4, 2)
    n = batch["input_ids"].shape[1]
    for b, s in enumerate(samples):  # right padding, masked labels
        k = s["input_ids"].numel()
        assert batch["attention_mask"][b].sum() == k and (batch["labels"][b, k:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][b, k:] == processor.tokenizer.pad_token_id).all() and n >= k


def test_bad_samples_skip_and_fail(processor, demo):
    root, records = demo
    ds = LlavaConversationDataset(records, processor, image_folder=str(root), image_aspect_ratio="native")
    assert [m["id"] for m in ds.malformed] == ["malformed-0"] and len(ds) == len(records) - 1
    ids = [r.id for r in ds.records]
    s = ds[ids.index("missing-0")]  # replaced by the next usable record, reported with the sample
    assert [b["id"] for b in s["bad_samples"]] == ["missing-0", "corrupt-0"]
    assert s["bad_samples"][0]["reason"] == "image file not found" and s["bad_samples"][0]["path"].endswith("missing-0.png")
    assert "cannot be decoded" in s["bad_samples"][1]["reason"]
    with pytest.raises(BadSampleError, match=r"record \d+ \(id 'malformed-0'\).*from='robot'"):
        LlavaConversationDataset(records, processor, image_folder=str(root), on_bad_sample="fail")
    good = [r for r in records if r.get("id") != "malformed-0"]
    strict = LlavaConversationDataset(good, processor, image_folder=str(root), on_bad_sample="fail")
    with pytest.raises(BadSampleError, match=r"id 'missing-0', image .*missing-0\.png\): image file not found"):
        strict[[r.id for r in strict.records].index("missing-0")]
    with pytest.raises(BadSampleError, match="in a row"):  # a wrong image folder stops the run
        LlavaConversationDataset(good, processor, image_folder=str(root / "nowhere"), max_consecutive_bad=3)[0]


def test_malformed_records_are_named():
    bad = [
        ({"conversations": []}, "non-empty list"),
        ({"conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}, "no 'image' field"),
        ({"image": ["a.jpg", "b.jpg"], "conversations": [{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a"}]}, "2 images but 1"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}]}, "alternate|no human/gpt"),
        ({"conversations": [{"from": "human", "value": 3}]}, "string 'value'"),
    ]
    from pmod_bench.train.data import _Bad

    for rec, why in bad:
        with pytest.raises(_Bad, match=why):
            normalize_record(rec, 0)
    # LLaVA's tolerance: a leading assistant turn and a trailing question are dropped
    r = normalize_record({"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "q"},
                                            {"from": "gpt", "value": "a"}, {"from": "human", "value": "q2"}]}, 0)
    assert r.turns == [("human", "q"), ("gpt", "a")]


def test_truncation_policy(processor, demo):
    root, records = demo
    good = [r for r in records if str(r.get("id")).startswith(("img", "txt"))]
    short = LlavaConversationDataset(good, processor, image_folder=str(root), max_length=20, on_bad_sample="fail")
    with pytest.raises(BadSampleError, match="do not fit data.max_length=20"):
        short[0]
    txt = [i for i, r in enumerate(short.records) if not r.images][0]
    with pytest.raises(BadSampleError, match="no assistant token"):  # the answer lies beyond 20 tokens
        short[txt]
    full = LlavaConversationDataset(good, processor, image_folder=str(root))[txt]
    n = full["input_ids"].numel()
    cut = LlavaConversationDataset(good, processor, image_folder=str(root), max_length=n - 1)[txt]
    assert cut["input_ids"].tolist() == full["input_ids"][: n - 1].tolist()  # trailing text is truncated
    assert cut["labels"].tolist() == full["labels"][: n - 1].tolist()


def test_sampler_groups_by_modality_and_global_batch():
    lengths = [10 + i for i in range(12)] + [-(5 + i) for i in range(8)]  # 12 image, 8 text-only records
    s = ModalityLengthGroupedSampler(lengths, group_size=4, seed=0)
    order = list(s)
    assert sorted(order) == list(range(20))
    groups = [order[i : i + 4] for i in range(0, 20, 4)]
    for g in groups:  # every global batch has one modality, longest first
        assert len({lengths[i] > 0 for i in g}) == 1
        assert [abs(lengths[i]) for i in g] == sorted((abs(lengths[i]) for i in g), reverse=True)
    assert list(ModalityLengthGroupedSampler(lengths, 4, seed=0)) == order  # deterministic (resume)
    s.set_epoch(1)
    assert list(s) != order
    # leftovers of both modalities form one last mixed group
    odd = list(ModalityLengthGroupedSampler(lengths[:10] + lengths[12:17], 4, seed=0))
    assert sorted(odd) == list(range(15))


def test_read_records_jsonl_and_errors(tmp_path):
    from pmod_bench.train.config import ConfigError

    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"id": 1, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
                 + "\n{not json\n")
    recs = read_records([str(p)])
    assert len(recs) == 2 and "__malformed__" in recs[1]
    with pytest.raises(ConfigError, match="does not exist"):
        read_records([str(tmp_path / "missing.json")])
    (tmp_path / "obj.json").write_text("{}")
    with pytest.raises(ConfigError, match="JSON list"):
        read_records([str(tmp_path / "obj.json")])


def test_llava15_pad_to_square_single_tile(demo):
    """LLaVA-1.5 shape (tiny-llava): padded to square, one tile per image, a fixed image-token count."""
    from pmod_bench.model.presets import preset_processor

    proc = preset_processor("tiny-llava")
    root, records = demo
    ds = LlavaConversationDataset(records, proc, image_folder=str(root), image_aspect_ratio="pad")
    imgs = [i for i, r in enumerate(ds.records) if r.images and r.id.startswith("img")][:2]
    samples = [ds[i] for i in imgs]
    assert all(s["pixel_values"].shape == (1, 3, 32, 32) for s in samples)
    assert {int((s["input_ids"] == ds.image_token_id).sum()) for s in samples} == {16}
    batch = DataCollator(proc.tokenizer.pad_token_id)(samples)
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and "image_sizes" not in batch
