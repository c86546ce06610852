"""Training data: LLaVA prompts and label masking, anyres image tokens, bad samples, batching, sampling."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import demo_records
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


@pytest.fixture(scope="module")
def processor():
    from pmod_bench.model.presets import preset_processor

    return preset_processor("tiny")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return demo_records(tmp_path_factory, "demo", n_image=6, n_text=2, bad={"missing": 1, "corrupt": 1, "malformed": 1})


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
    # replaced by the good record of the same modality nearest in length (corrupt-0, as long, is bad too)
    s = ds[ids.index("missing-0")]
    assert [b["id"] for b in s["bad_samples"]] == ["missing-0", "corrupt-0"]
    assert s["bad_samples"][0]["reason"] == "image file not found" and s["bad_samples"][0]["path"].endswith("missing-0.png")
    assert "cannot be decoded" in s["bad_samples"][1]["reason"]
    assert "pixel_values" in s  # an image record: the batch stays single-modality
    lengths = ds.modality_lengths
    same = [i for i, r in enumerate(ds.records) if lengths[i] == lengths[ids.index("missing-0")] and r.images
            and not r.id.startswith(("missing", "corrupt"))]
    assert any(ds.build(ds.records[i])["input_ids"].tolist() == s["input_ids"].tolist()
               and torch.equal(ds.build(ds.records[i])["pixel_values"], s["pixel_values"]) for i in same)
    # a record found bad is not read again (later epochs): repairing the file does not change the answer
    from PIL import Image

    corrupt = root / "images" / "corrupt-0.png"
    data = corrupt.read_bytes()
    try:
        Image.new("RGB", (32, 32)).save(corrupt)
        again = ds[ids.index("corrupt-0")]
        assert [b["id"] for b in again["bad_samples"]] == ["corrupt-0"] and "cannot be decoded" in again["bad_samples"][0]["reason"]
        fresh = LlavaConversationDataset(records, processor, image_folder=str(root), image_aspect_ratio="native")
        fresh.mark_bad([{"index": ds.records[ids.index("corrupt-0")].index, "id": "corrupt-0", "path": None,
                         "reason": "found bad by another process"}])  # what the trainer shares between processes
        assert fresh[ids.index("corrupt-0")]["bad_samples"][0]["reason"] == "found bad by another process"
    finally:
        corrupt.write_bytes(data)
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


# ---- a reference of LLaVA's sampler (haotian-liu/LLaVA, llava/train/llava_trainer.py), written as LLaVA has it;
# the only change: the random draws take a generator (LLaVA's inner calls use the global torch RNG)
def _ref_split_to_even_chunks(indices, lengths, num_chunks):
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    num_indices_per_chunk = len(indices) // num_chunks
    chunks = [[] for _ in range(num_chunks)]
    chunks_lengths = [0 for _ in range(num_chunks)]
    for index in indices:
        shortest_chunk = chunks_lengths.index(min(chunks_lengths))
        chunks[shortest_chunk].append(index)
        chunks_lengths[shortest_chunk] += lengths[index]
        if len(chunks[shortest_chunk]) == num_indices_per_chunk:
            chunks_lengths[shortest_chunk] = float("inf")
    return chunks


def _ref_get_length_grouped_indices(lengths, batch_size, world_size, generator=None, merge=True):
    import torch

    indices = torch.randperm(len(lengths), generator=generator)
    megabatch_size = world_size * batch_size
    megabatches = [indices[i : i + megabatch_size].tolist() for i in range(0, len(lengths), megabatch_size)]
    megabatches = [sorted(megabatch, key=lambda i: lengths[i], reverse=True) for megabatch in megabatches]
    megabatches = [_ref_split_to_even_chunks(megabatch, lengths, world_size) for megabatch in megabatches]
    return [i for megabatch in megabatches for batch in megabatch for i in batch]


def _ref_get_modality_length_grouped_indices(lengths, batch_size, world_size, generator=None):
    import torch

    assert all(l != 0 for l in lengths), "Should not have zero length."
    if all(l > 0 for l in lengths) or all(l < 0 for l in lengths):
        return _ref_get_length_grouped_indices(lengths, batch_size, world_size, generator=generator)
    mm_indices, mm_lengths = zip(*[(i, l) for i, l in enumerate(lengths) if l > 0])
    lang_indices, lang_lengths = zip(*[(i, -l) for i, l in enumerate(lengths) if l < 0])
    mm_shuffle = [mm_indices[i] for i in _ref_get_length_grouped_indices(mm_lengths, batch_size, world_size, generator=generator)]
    lang_shuffle = [lang_indices[i] for i in _ref_get_length_grouped_indices(lang_lengths, batch_size, world_size, generator=generator)]
    megabatch_size = world_size * batch_size
    mm_megabatches = [mm_shuffle[i : i + megabatch_size] for i in range(0, len(mm_shuffle), megabatch_size)]
    lang_megabatches = [lang_shuffle[i : i + megabatch_size] for i in range(0, len(lang_shuffle), megabatch_size)]
    last_mm = mm_megabatches[-1]
    last_lang = lang_megabatches[-1]
    additional_batch = last_mm + last_lang
    megabatches = mm_megabatches[:-1] + lang_megabatches[:-1]
    megabatch_indices = torch.randperm(len(megabatches), generator=generator)
    megabatches = [megabatches[i] for i in megabatch_indices]
    if len(additional_batch) > 0:
        megabatches.append(sorted(additional_batch))
    return [i for megabatch in megabatches for i in megabatch]


def _random_case(rng):
    n_mm, n_lang = rng.choice([0, rng.randint(1, 60)]), rng.choice([0, rng.randint(1, 40)])
    n_mm = n_mm or (0 if n_lang else 5)
    lengths = [rng.randint(1, 300) for _ in range(n_mm)] + [-rng.randint(1, 300) for _ in range(n_lang)]
    rng.shuffle(lengths)
    return lengths, rng.choice([1, 2, 4]), rng.choice([1, 2, 3, 8])


def test_sampler_equals_llavas_reference():
    """300 random cases (single- and mixed-modality, several per-device batches and processes x accumulation)."""
    import random

    import torch

    rng = random.Random(0)
    for case in range(300):
        lengths, b, w = _random_case(rng)
        s = ModalityLengthGroupedSampler(lengths, b, w, seed=case)
        s.set_epoch(2)
        ref = _ref_get_modality_length_grouped_indices(lengths, b, w, generator=torch.Generator().manual_seed(case + 2))
        assert list(s) == ref, (case, lengths, b, w)


def test_sampler_global_batches_hold_one_modality():
    """Single-modality data: every global batch is full except the last (the defect: a shuffled partial group
    made later batches straddle groups). Mixed data: only the tail after the last full batches mixes."""
    import random

    rng = random.Random(1)
    for case in range(300):
        lengths, b, w = _random_case(rng)
        order = list(ModalityLengthGroupedSampler(lengths, b, w, seed=case))
        assert sorted(order) == list(range(len(lengths)))
        mb = b * w
        n_mm, n_lang = sum(l > 0 for l in lengths), sum(l < 0 for l in lengths)
        if not n_mm or not n_lang:  # the LLaVA megabatches in order: the partial one is the last
            boundaries = list(range(0, len(lengths), mb))
            groups = [order[k : k + mb] for k in boundaries]
            assert all(len(g) == mb for g in groups[:-1])
            continue
        full = (n_mm - 1) // mb + (n_lang - 1) // mb  # full megabatches of either modality, shuffled
        for k in range(full):
            g = order[k * mb : (k + 1) * mb]
            assert len({lengths[i] > 0 for i in g}) == 1, (case, k)


def test_sampler_splits_each_global_batch_into_even_micro_batches():
    """Rank 0 no longer gets the longest micro-batch: split_to_even_chunks balances the total length."""
    lengths = [1000, 900, 800, 700, 20, 10, 5, 1]  # one global batch of 8 = 4 micro-batches of 2
    order = list(ModalityLengthGroupedSampler(lengths, 2, 4, seed=0))
    micro = [order[k : k + 2] for k in range(0, 8, 2)]
    totals = [sum(lengths[i] for i in m) for m in micro]
    assert sorted(map(sorted, micro)) == sorted([[0, 7], [1, 6], [2, 5], [3, 4]])  # longest with shortest
    assert max(totals) - min(totals) < 300 and micro[0] != [0, 1]
    s = ModalityLengthGroupedSampler(lengths, 2, 4, seed=0)
    assert list(s) == order  # a function of (seed, epoch): a resumed run sees the same batches
    s.set_epoch(1)
    assert sorted(s) == list(range(8))
    with pytest.raises(ValueError, match="non-zero"):
        list(ModalityLengthGroupedSampler([3, 0, -2], 1, 1))


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
    with pytest.raises(ConfigError, match="JSON list.*wrap the records"):
        read_records([str(tmp_path / "obj.json")])
    # empty, truncated, and empty-list files: one line naming the file and the fix (no JSONDecodeError)
    (tmp_path / "empty.json").write_text("  \n")
    with pytest.raises(ConfigError, match="'.*empty.json' is empty"):
        read_records([str(tmp_path / "empty.json")])
    (tmp_path / "cut.json").write_text('[{"id": 1, "conversations": [{"from": "human", "val')
    with pytest.raises(ConfigError, match=r"'.*cut.json' is not valid JSON \(.* at line 1, column \d+; a truncated copy\?\)"):
        read_records([str(tmp_path / "cut.json")])
    (tmp_path / "none.json").write_text("[]")
    with pytest.raises(ConfigError, match="'.*none.json' holds no records"):
        read_records([str(tmp_path / "none.json")])
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ConfigError, match="is empty"):
        read_records([str(tmp_path / "blank.jsonl")])


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


def test_train_and_eval_prompts_are_identical(tiny_processor):
    """The vicuna_v1 prompt a model is trained on (train.data.render_vicuna_v1) is, up to the answer, exactly
    the prompt the lmms-eval plugin builds for the same question (tasks.plugin, the chat template)."""
    from pmod_bench.tasks.plugin import PMoDLlava
    from pmod_bench.train.data import IMAGE_PLACEHOLDER, render_vicuna_v1

    lm = PMoDLlava.from_loaded(None, tiny_processor, name="tiny", batch_size=1, device="cpu")
    for question, images in (("What colour is the circle?", 1), ("Is there a dog?\nAnswer yes or no.", 1), ("Say hi.", 0)):
        human = (IMAGE_PLACEHOLDER + "\n" if images else "") + question
        text, spans = render_vicuna_v1([("human", human), ("gpt", "Red.")], tiny_processor.image_token)
        assert text[: spans[0][0]] == lm.build_prompt(question, images) + " "
