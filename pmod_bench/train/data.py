"""LLaVA conversation data for training: records, prompt templates, label masking, batching, sampling.

Data flow of one sample (lazy: nothing is read before ``__getitem__``)::

    record {"image": "coco/x.jpg", "conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}]}
      │ template (vicuna_v1 | plain | chat) -> text + char spans of the assistant turns (what is learned)
      │ tokenizer(text, offsets) -> ids0 (one <image> token per image), labels0 = id inside a span, else -100
      │ processor(text, images) -> input_ids with each <image> expanded to its feature count (anyres for
      │                            LLaVA-NeXT), pixel_values, image_sizes
      └ align ids0 with input_ids: image tokens get label -100; every other token must match ids0
    -> {"input_ids": (N,), "labels": (N,), "pixel_values": (n_img, [P,] 3, H, W), "image_sizes": (n_img, 2)}

Qwen2.5-VL (``template: chat``, its own chat template): each ``<image>`` becomes ``<|vision_start|><|image_pad|>
<|vision_end|>`` where the tag stands, the processor resizes each image within ``data.min_pixels .. max_pixels``
and expands ``<|image_pad|>`` to ``t*h*w/4`` tokens; the sample holds ``pixel_values`` (sum_i t_i*h_i*w_i, 1176),
``image_grid_thw`` (n_img, 3) and ``mm_token_type_ids`` (N,) instead of ``image_sizes``. What a batch joins is the
family's :class:`~pmod_bench.train.layouts.TrainLayout`.

LLaVA-OneVision (``template: qwen_1_5``, LLaVA-NeXT's training conversation, :func:`render_qwen_1_5`): the
``<image>`` tags stay where they stand and the processor expands each to the image's anyres feature count; a
sample's images go to the processor as one list, so a multi-image sample gets one square tile per image and
``batch_num_images`` (1,) says how many images its prompt has.

The learned span of a chat-template assistant turn is everything its message adds after the generation prompt:
with Qwen's template ``answer<|im_end|>\n`` (the header ``<|im_start|>assistant\n`` is not learned). ``<|im_end|>``
is learned because it is the model's end-of-turn (generation stops on it); the ``\n`` after it goes with it, as
in Qwen's own fine-tuning code (QwenLM/Qwen2.5-VL qwen-vl-finetune ``data_qwen.py`` masks only the 3 header tokens).

A record that cannot be used (missing or corrupt image, an image path leading outside ``data.image_folder``
(refused before anything opens it), malformed conversation, image tokens beyond
``max_length``, nothing to learn) is a *bad sample*: with ``on_bad_sample: fail`` it raises
:class:`BadSampleError` naming the record's index, id and image path; with ``skip`` a good record of
the same modality and the nearest length is used in its place (the batch stays single-modality, as
the sampler made it) and the bad one is reported with the batch (the trainer counts and logs it). A
record found bad is remembered (``known_bad``; the trainer shares what every process found through
:meth:`LlavaConversationDataset.mark_bad`), so its image is not read again in later epochs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"  # how LLaVA data marks the image in a human turn

#: Vicuna v1 (LLaVA's conv_vicuna_v1): SYSTEM + " " + "USER: q ASSISTANT: a</s>USER: ..."; the system prompt
#: is the evaluation chat template's (tests/test_train_data.py checks train and eval prompts agree)
from pmod_bench.model.presets import VICUNA_SYSTEM  # noqa: E402
ROLE_ALIASES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


class BadSampleError(RuntimeError):
    """A record that cannot become a training sample (raised under ``on_bad_sample: fail``)."""


class _Bad(Exception):
    def __init__(self, reason: str, path: str | None = None):
        super().__init__(reason)
        self.reason, self.path = reason, path


# ------------------------------------------------------------------------------------------ records
def read_records(paths: Sequence[str], max_samples: int | None = None) -> list:
    """All records of the JSON (list) / JSONL files, in order.

    A file that is missing, empty, not JSON (e.g. truncated), not a list, or holds no record raises
    ConfigError naming the file and the fix; a bad *line* of a .jsonl file becomes a malformed record
    (skipped and counted like any other bad record).
    """
    from pmod_bench.train.config import ConfigError

    out: list = []
    for p in paths:
        if not os.path.isfile(p):
            raise ConfigError(f"data.json file '{p}' does not exist; pass data.json=PATH (LLaVA conversation JSON).")
        with open(p, encoding="utf-8") as fh:
            text = fh.read()
        if not text.strip():
            raise ConfigError(f"data.json file '{p}' is empty; pass a JSON list of LLaVA records (or .jsonl, one per line).")
        n_before = len(out)
        if p.endswith(".jsonl"):
            for line_no, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        out.append({"__malformed__": f"{p}:{line_no}: not JSON ({exc.msg})"})
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"data.json file '{p}' is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}; "
                    "a truncated copy?); pass a JSON list of LLaVA records, or a .jsonl file with one record per line."
                ) from None
            if not isinstance(data, list):
                raise ConfigError(f"data.json file '{p}': expected a JSON list of records (LLaVA format), got a JSON "
                                  f"{type(data).__name__}; wrap the records in [...].")
            out.extend(data)
        if len(out) == n_before:
            raise ConfigError(f"data.json file '{p}' holds no records; pass a file with LLaVA conversation records.")
        if max_samples is not None and len(out) >= max_samples:
            return out[:max_samples]
    return out


@dataclass
class Record:
    """A validated record: its turns start with the human and alternate; images listed."""

    index: int
    id: str
    images: list
    turns: list  # [(role "human"|"gpt", text)]
    words: int


def normalize_record(rec: Any, index: int) -> Record:
    """Check a raw record's structure (no file access); raise _Bad with the reason."""
    if not isinstance(rec, dict):
        raise _Bad(f"record is a {type(rec).__name__}, not an object")
    if "__malformed__" in rec:
        raise _Bad(rec["__malformed__"])
    rid = str(rec.get("id", index))
    image = rec.get("image")
    images = [] if image in (None, "", []) else [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise _Bad(f"'image' must be a path or a list of paths, got {image!r}")
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise _Bad("'conversations' must be a non-empty list")
    turns = []
    for j, t in enumerate(conv):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str):
            raise _Bad(f"conversations[{j}] must be an object with a string 'value'")
        role = ROLE_ALIASES.get(str(t.get("from", "")).lower())
        if role is None:
            raise _Bad(f"conversations[{j}] has from={t.get('from')!r}; expected human or gpt")
        turns.append((role, t["value"]))
    while turns and turns[0][0] != "human":  # LLaVA skips a leading assistant turn
        turns = turns[1:]
    for j, (role, _) in enumerate(turns):
        if role != ("human" if j % 2 == 0 else "gpt"):
            raise _Bad("turns must alternate human, gpt, human, ...")
    if turns and turns[-1][0] == "human":  # a question without an answer teaches nothing
        turns = turns[:-1]
    if not turns:
        raise _Bad("no human/gpt turn pair")
    n_tags = sum(v.count(IMAGE_PLACEHOLDER) for _, v in turns)
    if not images and n_tags:
        raise _Bad(f"{n_tags} '<image>' tag(s) but no 'image' field")
    if len(images) == 1:
        # LLaVA (preprocess_multimodal): the image goes first in the first human turn
        turns = [(r, v.replace(IMAGE_PLACEHOLDER, "").strip()) for r, v in turns]
        turns[0] = ("human", IMAGE_PLACEHOLDER + "\n" + turns[0][1])
    elif len(images) > 1 and n_tags != len(images):
        raise _Bad(f"{len(images)} images but {n_tags} '<image>' tags")
    if any(v.count(IMAGE_PLACEHOLDER) for r, v in turns if r == "gpt"):
        raise _Bad("'<image>' tag in an assistant turn")
    words = sum(len(v.split()) for _, v in turns)
    return Record(index, rid, images, turns, words)


# ---------------------------------------------------------------------------------------- templates
def render_vicuna_v1(turns: list, image_token: str) -> tuple:
    """LLaVA's vicuna_v1 string and the char spans of the assistant answers (+ their ``</s>``)."""
    text = VICUNA_SYSTEM + " "
    spans = []
    for role, value in turns:
        value = value.replace(IMAGE_PLACEHOLDER, image_token)
        if role == "human":
            text += "USER: " + value + " "
        else:
            text += "ASSISTANT: "
            start = len(text)
            text += value + "</s>"
            spans.append((start, len(text)))
    return text, spans


#: LLaVA-NeXT's ``qwen_1_5`` conversation (``conv_qwen``), the system turn ``preprocess_qwen`` opens every sample with
QWEN_1_5_SYSTEM = "You are a helpful assistant."


def render_qwen_1_5(turns: list, image_token: str, system: str = QWEN_1_5_SYSTEM) -> tuple:
    """LLaVA-OneVision's training string (LLaVA-VL/LLaVA-NeXT@df179663 ``llava/train/train.py`` ``preprocess_qwen``
    with ``conv_qwen``): ``<|im_start|>system\n{system}<|im_end|>\n``, then ``<|im_start|>{user|assistant}\n{value}
    <|im_end|>\n`` per turn, the ``<image>`` tags where they stand, except that a turn with exactly one tag gets it
    first, ``<image>\n`` + the rest (``preprocess_multimodal``'s rule, per turn). The spans are the answers with
    their ``<|im_end|>\n``: what an assistant message adds after the generation prompt ``<|im_start|>assistant\n``,
    as for ``template: chat``.

    Learned tokens differ from ``preprocess_qwen``'s on purpose: it also learns each assistant header and every
    ``\n`` / ``<|im_start|>`` / ``<|im_end|>`` token of the system and user turns (its ``unmask_tokens_idx``); the
    header is the generation prompt at inference and the user turns are not the model's output, so only the
    assistant turns are learned here (the Qwen2.5-VL rule)."""
    text = f"<|im_start|>system\n{system}<|im_end|>\n"
    spans = []
    for role, value in turns:
        if value.count(IMAGE_PLACEHOLDER) == 1 and not value.startswith(IMAGE_PLACEHOLDER):
            value = IMAGE_PLACEHOLDER + "\n" + value.replace(IMAGE_PLACEHOLDER, "").strip()
        value = value.replace(IMAGE_PLACEHOLDER, image_token)
        if role == "human":
            text += f"<|im_start|>user\n{value}<|im_end|>\n"
        else:
            text += "<|im_start|>assistant\n"
            start = len(text)
            text += f"{value}<|im_end|>\n"
            spans.append((start, len(text)))
    return text, spans


def render_plain(turns: list, image_token: str, has_image: bool) -> tuple:
    """LLaVA's PT format: the image, then the first answer (the caption) and a newline; only the caption is learned."""
    caption = turns[1][1]
    prefix = image_token if has_image else ""
    return prefix + caption + "\n", [(len(prefix), len(prefix) + len(caption) + 1)]


def chat_content(value: str) -> list:
    """A human turn as chat-template content: an image item where each ``<image>`` tag stands, text between."""
    content: list = []
    for k, piece in enumerate(value.split(IMAGE_PLACEHOLDER)):
        if k:
            content.append({"type": "image"})
        if piece.strip():
            content.append({"type": "text", "text": piece.strip()})
    if not content or content[-1]["type"] != "text":
        content.append({"type": "text", "text": ""})
    return content


def render_chat(turns: list, render, image_token: str) -> tuple:
    """The chat template's string; an assistant turn's span is what its message adds after the generation prompt."""
    messages = []
    for role, value in turns:
        if role == "human":
            messages.append({"role": "user", "content": chat_content(value)})
        else:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": value}]})
    text = render(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], add_generation_prompt=True)
        upto = render(messages[: i + 1], add_generation_prompt=False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise _Bad("the chat template does not render conversations prefix by prefix; use data.template=vicuna_v1")
        spans.append((len(before), len(upto)))
    return text, spans


# ------------------------------------------------------------------------------------------ images
def expand_to_square(img, background: tuple):
    """LLaVA-1.5's ``expand2square``: pad the shorter side (centred) with the mean colour."""
    from PIL import Image

    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def load_image(path: str):
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise _Bad("image file not found", path)
    try:
        with Image.open(path) as im:
            im.load()
            img = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise _Bad(f"image cannot be decoded ({type(exc).__name__}: {exc})", path) from None
    if img.size[0] < 1 or img.size[1] < 1:
        raise _Bad("image is empty", path)
    return img


# ------------------------------------------------------------------------------------------ dataset
class LlavaConversationDataset(Dataset):
    """Lazy LLaVA conversation dataset (see the module docstring for one sample's data flow)."""

    def __init__(
        self,
        records: list,
        processor,
        image_folder: str | None = None,
        template: str = "vicuna_v1",
        max_length: int = 2048,
        image_aspect_ratio: str = "pad",
        on_bad_sample: str = "skip",
        max_consecutive_bad: int = 32,
        layout=None,
        pixel_budget: dict | None = None,
    ) -> None:
        from pmod_bench.train.config import ConfigError
        from pmod_bench.train.layouts import LLAVA

        self.layout = layout or LLAVA
        self.layout.check_data(template, image_aspect_ratio)
        if pixel_budget and not self.layout.pixel_caps:
            raise ConfigError(f"data.min_pixels / data.max_pixels apply to hosts with a pixel budget (Qwen2.5-VL); "
                              f"{self.layout.title} resizes to its tower's tiles: remove them.")
        self.pixel_budget = _full_budget(processor, pixel_budget) if pixel_budget else None
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        if not getattr(self.tokenizer, "is_fast", False):
            raise TypeError("training needs a fast tokenizer (offsets mapping for label masking); load the processor with use_fast=True")
        self.image_token = getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.image_folder = image_folder
        self.template, self.max_length = template, max_length
        self.image_aspect_ratio = image_aspect_ratio
        self.on_bad_sample, self.max_consecutive_bad = on_bad_sample, max_consecutive_bad
        mean = getattr(getattr(processor, "image_processor", None), "image_mean", None) or [0.5, 0.5, 0.5]
        self._background = tuple(int(round(255 * m)) for m in mean)
        self.records: list = []
        self.malformed: list = []  # [{"index", "id", "path", "reason"}] dropped at load
        for i, raw in enumerate(records):
            try:
                self.records.append(normalize_record(raw, i))
            except _Bad as bad:
                rid = raw.get("id") if isinstance(raw, dict) else None
                entry = {"index": i, "id": None if rid is None else str(rid), "path": None, "reason": bad.reason}
                if on_bad_sample == "fail":
                    raise BadSampleError(_describe(entry) + " (data.on_bad_sample=skip would skip and count it)") from None
                self.malformed.append(entry)
        if not self.records:
            raise BadSampleError(
                f"no usable record in the data: all {len(self.malformed)} records are malformed "
                f"(first: {_describe(self.malformed[0]) if self.malformed else 'none'}); fix data.json"
            )
        if image_folder is None and any(r.images for r in self.records):
            from pmod_bench.train.config import ConfigError

            raise ConfigError("the data has image records but data.image_folder is not set; pass data.image_folder=DIR.")
        self.known_bad: dict = {}  # dataset position -> bad-sample entry (found bad: never read again)
        self._position = {r.index: i for i, r in enumerate(self.records)}  # raw record index -> dataset position
        # substitutes: per modality, the positions ordered by length; a bad record's substitute is the good
        # one nearest to it in its modality's order (same modality, nearest length)
        lengths = self.modality_lengths
        self._order: dict = {}
        for modality in (True, False):
            self._order[modality] = sorted((i for i, l in enumerate(lengths) if (l > 0) == modality),
                                           key=lambda i: (abs(lengths[i]), i))
        self._rank = {i: k for order in self._order.values() for k, i in enumerate(order)}
        self._prebuilt: dict | None = None  # data.cache: position -> built sample (pmod_bench.train.cache)

    def use_prebuilt(self, samples: dict, bad: dict) -> None:
        """Serve samples built beforehand (``data.cache``, :mod:`pmod_bench.train.cache`) instead of building them
        per access; ``bad``: the records that could not be built, {position: bad-sample entry}."""
        self._prebuilt = samples
        for j, entry in bad.items():
            self.known_bad.setdefault(j, entry)

    def _sample(self, j: int) -> dict:
        """Record ``j`` as a training sample: the built one when cached (ids back to int64), else built now."""
        cached = None if self._prebuilt is None else self._prebuilt.get(j)
        if cached is None:
            return self.build(self.records[j])
        return {**cached, "input_ids": cached["input_ids"].long(), "labels": cached["labels"].long()}

    def __len__(self) -> int:
        return len(self.records)

    @property
    def modality_lengths(self) -> list:
        """Word count per record, negative for text-only records (LLaVA's convention; at least 1 word, as LLaVA asserts)."""
        return [max(r.words, 1) if r.images else -max(r.words, 1) for r in self.records]

    def mark_bad(self, entries: list) -> None:
        """Remember records found bad (by any process): they are substituted without being read again."""
        for e in entries:
            pos = self._position.get(e["index"])
            if pos is not None:
                self.known_bad.setdefault(pos, e)

    def _candidates(self, i: int) -> Iterator[int]:
        """Record ``i``, then its substitutes: same modality, alternately the next longer and the next shorter
        in the modality's length order (nearest length first)."""
        order = self._order[bool(self.records[i].images)]
        k = self._rank[i]
        yield i
        for t in range(1, len(order)):
            if k + t < len(order):
                yield order[k + t]
            if k - t >= 0:
                yield order[k - t]

    # ------------------------------------------------------------------------------------
    def __getitem__(self, i: int) -> dict:
        bad: list = []
        for j in self._candidates(i):
            if len(bad) > self.max_consecutive_bad:
                break
            entry = self.known_bad.get(j)
            if entry is None:
                rec = self.records[j]
                try:
                    sample = self._sample(j)
                except _Bad as exc:
                    entry = {"index": rec.index, "id": rec.id, "path": exc.path, "reason": exc.reason}
                    if self.on_bad_sample == "fail":
                        raise BadSampleError(_describe(entry) + " (data.on_bad_sample=skip would skip and count it)") from None
                    self.known_bad[j] = entry
                else:
                    sample["bad_samples"] = bad
                    return sample
            bad.append(entry)
        modality = "image" if self.records[i].images else "text-only"
        if len(bad) > self.max_consecutive_bad:
            raise BadSampleError(
                f"{len(bad)} bad samples in a row from record {self.records[i].index} (last: {_describe(bad[-1])}); "
                "check data.image_folder and data.json (data.max_consecutive_bad sets the limit)"
            )
        raise BadSampleError(f"every {modality} record is bad (last: {_describe(bad[-1])}); check data.image_folder and data.json")

    def _text_and_spans(self, rec: Record) -> tuple:
        has_image = bool(rec.images)
        if self.template == "vicuna_v1":
            return render_vicuna_v1(rec.turns, self.image_token)
        if self.template == "plain":
            return render_plain(rec.turns, self.image_token, has_image)
        if self.template == "qwen_1_5":
            return render_qwen_1_5(rec.turns, self.image_token)
        owner = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        if not getattr(owner, "chat_template", None):
            raise _Bad("data.template=chat but the processor has no chat template; use data.template=vicuna_v1")
        render = lambda msgs, add_generation_prompt: owner.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return render_chat(rec.turns, render, self.image_token)

    def image_path(self, rel: str) -> str:
        """The file of a record's image path ``rel``, resolved inside ``data.image_folder`` before anything opens it.

        ``..`` components, an absolute path and symbolic links are resolved first; a path that then lies outside
        the folder (``../../etc/passwd``, ``/etc/passwd``, a link pointing out) raises _Bad: a bad record, never read.
        """
        root = os.path.realpath(self.image_folder)
        full = os.path.realpath(os.path.join(root, rel))
        if full != root and os.path.commonpath([root, full]) == root:
            return full
        how = "an absolute path" if os.path.isabs(rel) else ".. components or a symbolic link"
        raise _Bad(f"image path {rel!r} leads outside data.image_folder ({how}); only files inside the folder are read", rel)

    def build(self, rec: Record) -> dict:
        """One sample from a validated record (raises _Bad)."""
        text, spans = self._text_and_spans(rec)
        add_special = self.template not in ("chat", "qwen_1_5")  # chat templates write their own BOS; Qwen2 has none
        enc = self.tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        ids0, offsets = enc["input_ids"], enc["offset_mapping"]
        labels0 = [
            tok if any(s < b and e > a for a, b in spans) and tok != self.image_token_id else IGNORE_INDEX
            for tok, (s, e) in zip(ids0, offsets)
        ]
        out: dict = {}
        if rec.images:
            images = []
            for rel in rec.images:
                img = load_image(self.image_path(rel))
                if self.image_aspect_ratio == "pad":
                    img = expand_to_square(img, self._background)
                images.append(img)
            kwargs = {"size": self.pixel_budget} if self.pixel_budget else {}
            if self.layout.nested_images:  # one list per prompt (OneVision: batch_num_images, tiles for one image only)
                images = [images]
            try:
                proc = self.processor(text=[text], images=images, return_tensors="pt", add_special_tokens=add_special,
                                      **kwargs)
            except Exception as exc:  # a processor error on one image must not end a 1-epoch run
                raise _Bad(f"processor failed ({type(exc).__name__}: {exc})", os.path.join(self.image_folder or "", rec.images[0])) from None
            ids = proc["input_ids"][0].tolist()
            labels = _expand_labels(ids0, labels0, ids, self.image_token_id)
            out["pixel_values"] = proc["pixel_values"]  # LLaVA (n_img, [P,] 3, H, W); Qwen (sum_i t*h*w, 1176)
            for key in self.layout.image_keys:  # image_sizes (n_img, 2) | image_grid_thw (n_img, 3) | batch_num_images (1,)
                if key in proc:
                    out[key] = proc[key]
            for key in self.layout.token_keys:  # mm_token_type_ids (1, N) -> (N,)
                if key in proc:
                    out[key] = proc[key][0]
        else:
            ids, labels = list(ids0), labels0
        if len(ids) > self.max_length:
            if self.image_token_id in ids[self.max_length:]:
                raise _Bad(f"{len(ids)} tokens with the image tokens; they do not fit data.max_length={self.max_length}")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            for key in self.layout.token_keys:
                if key in out:
                    out[key] = out[key][: self.max_length]
        if all(l == IGNORE_INDEX for l in labels[1:]):
            raise _Bad("no assistant token to learn within data.max_length")
        out["input_ids"] = torch.tensor(ids, dtype=torch.long)
        out["labels"] = torch.tensor(labels, dtype=torch.long)
        return out


def _full_budget(processor, budget: dict) -> dict:
    """``budget`` ({shortest_edge?, longest_edge?} in pixels) completed with the processor's own bounds (Qwen's image
    processor wants both), checked: min <= max."""
    from pmod_bench.train.config import ConfigError

    own = getattr(getattr(processor, "image_processor", None), "size", None) or {}
    full = {k: budget.get(k, own.get(k) if hasattr(own, "get") else getattr(own, k, None))
            for k in ("shortest_edge", "longest_edge")}
    if None in full.values():
        raise ConfigError(f"the processor has no pixel budget to complete {budget}; set both data.min_pixels and data.max_pixels.")
    if full["shortest_edge"] > full["longest_edge"]:
        raise ConfigError(f"pixel budget {full['shortest_edge']}..{full['longest_edge']} (data.min_pixels / data.max_pixels "
                          "with the processor's own bound) is empty; set both so that min_pixels <= max_pixels.")
    return full


def _expand_labels(ids0: list, labels0: list, ids: list, image_id: int) -> list:
    """Labels for the processor's ids: ids0 with each image token run expanded (label -100)."""
    labels: list = []
    j = 0
    for tok, lab in zip(ids0, labels0):
        if tok == image_id:
            n = 0
            while j < len(ids) and ids[j] == image_id:
                j, n = j + 1, n + 1
            if n == 0:
                raise _Bad("the processor dropped an image token")
            labels.extend([IGNORE_INDEX] * n)
            continue
        if j >= len(ids) or ids[j] != tok:
            raise _Bad("the processor tokenized the text differently from the tokenizer (label masking would be wrong)")
        labels.append(lab)
        j += 1
    if j != len(ids):
        raise _Bad("the processor added tokens that the tokenizer did not produce")
    return labels


def _describe(entry: dict) -> str:
    where = f", image {entry['path']}" if entry.get("path") else ""
    return f"bad sample: record {entry['index']} (id {entry.get('id')!r}{where}): {entry['reason']}"


# ----------------------------------------------------------------------------------------- collator
class DataCollator:
    """Right-pads a list of samples into a batch; concatenates images (LLaVA-NeXT: pads the tile axis; Qwen2.5-VL:
    the patches of every image along dim 0, ``image_grid_thw`` says which rows are whose).

    ``image_keys``: per-image outputs concatenated along dim 0; ``token_keys``: per-token outputs right-padded with 0
    (a sample without one, e.g. text-only, gets zeros). Both come from the family's TrainLayout.
    """

    def __init__(self, pad_token_id: int, image_keys: Sequence[str] = ("image_sizes",),
                 token_keys: Sequence[str] = ()) -> None:
        self.pad_token_id = int(pad_token_id)
        self.image_keys, self.token_keys = tuple(image_keys), tuple(token_keys)

    def __call__(self, samples: list) -> dict:
        n = max(s["input_ids"].numel() for s in samples)
        B = len(samples)
        input_ids = torch.full((B, n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, n), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((B, n), dtype=torch.long)
        for b, s in enumerate(samples):
            k = s["input_ids"].numel()
            input_ids[b, :k], labels[b, :k], attention_mask[b, :k] = s["input_ids"], s["labels"], 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        for key in self.token_keys:  # (B, n), 0 past each sample's end (and for samples without it)
            if any(key in s for s in samples):
                col = torch.zeros((B, n), dtype=next(s[key] for s in samples if key in s).dtype)
                for b, s in enumerate(samples):
                    if key in s:
                        col[b, : s[key].numel()] = s[key]
                batch[key] = col
        pix = [s["pixel_values"] for s in samples if "pixel_values" in s]
        if pix:
            if pix[0].dim() == 5:  # (n_img, P, 3, H, W): pad P (HF LLaVA-NeXT uses image_sizes to drop the padding)
                P = max(p.shape[1] for p in pix)
                pix = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, P - p.shape[1])) for p in pix]
            batch["pixel_values"] = torch.cat(pix, dim=0)  # Qwen (2-D): (sum of patches, 1176), sample order kept
            for key in self.image_keys:
                parts = [s[key] for s in samples if key in s]
                if parts:
                    batch[key] = torch.cat(parts, dim=0)
        bad = [e for s in samples for e in s.get("bad_samples", ())]
        if bad:
            batch["bad_samples"] = bad
        return batch


# ------------------------------------------------------------------------------------------ sampler
# LLaVA's sampler (haotian-liu/LLaVA, llava/train/llava_trainer.py: split_to_even_chunks,
# get_length_grouped_indices, get_modality_length_grouped_indices), written from its behaviour. One
# difference: every random draw comes from one seeded generator (seed + epoch), so the order is a
# function of (seed, epoch) and a resumed run sees the same batches; LLaVA draws from the global RNG.
#
#   lengths (+ image, - text-only) ──split by modality──> mm, lang
#     each: randperm -> megabatches of B x W (one global batch) -> sorted longest first
#           -> split_to_even_chunks(W): W micro-batches of B with even total length
#   full megabatches of both modalities, shuffled; the two last (partial) ones joined at the end
#   sorted by index  (single-modality data: the megabatches in their drawn order, partial one last)
#
# B = per-device batch, W = processes x gradient accumulation. accelerate then hands micro-batch c of a
# global batch to process c % processes at accumulation step c // processes.


def split_to_even_chunks(indices: list, lengths: Sequence[int], num_chunks: int) -> list:
    """Split one megabatch into ``num_chunks`` micro-batches of equal size and roughly equal total length.

    Greedy, as LLaVA's: each index (longest first) goes to the chunk with the smallest total so far;
    a full chunk takes no more. A megabatch that does not divide evenly is dealt out round-robin.
    """
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list = [[] for _ in range(num_chunks)]
    totals: list = [0.0] * num_chunks
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return chunks


def length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int, generator: torch.Generator) -> list:
    """LLaVA's ``get_length_grouped_indices``: random megabatches of ``batch_size x world_size``, each sorted
    by length (longest first) and split into ``world_size`` even chunks. The partial megabatch stays last."""
    indices = torch.randperm(len(lengths), generator=generator)
    mb = world_size * batch_size
    megabatches = [indices[i : i + mb].tolist() for i in range(0, len(lengths), mb)]
    megabatches = [sorted(m, key=lambda i: lengths[i], reverse=True) for m in megabatches]
    return [i for m in megabatches for chunk in split_to_even_chunks(m, lengths, world_size) for i in chunk]


def modality_length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int,
                                    generator: torch.Generator) -> list:
    """LLaVA's ``get_modality_length_grouped_indices``: every global batch (but the last one or two) holds
    one modality. Single-modality data goes through :func:`length_grouped_indices` with the signed lengths
    (as LLaVA: text-only data is then grouped by negative length)."""
    if any(l == 0 for l in lengths):
        raise ValueError("modality lengths must be non-zero (positive: has an image, negative: text-only)")
    if all(l > 0 for l in lengths) or all(l < 0 for l in lengths):
        return length_grouped_indices(lengths, batch_size, world_size, generator)
    mm_indices, mm_lengths = zip(*[(i, l) for i, l in enumerate(lengths) if l > 0])
    lang_indices, lang_lengths = zip(*[(i, -l) for i, l in enumerate(lengths) if l < 0])
    mm_shuffle = [mm_indices[i] for i in length_grouped_indices(mm_lengths, batch_size, world_size, generator)]
    lang_shuffle = [lang_indices[i] for i in length_grouped_indices(lang_lengths, batch_size, world_size, generator)]
    mb = world_size * batch_size
    mm_megabatches = [mm_shuffle[i : i + mb] for i in range(0, len(mm_shuffle), mb)]
    lang_megabatches = [lang_shuffle[i : i + mb] for i in range(0, len(lang_shuffle), mb)]
    additional = mm_megabatches[-1] + lang_megabatches[-1]
    megabatches = mm_megabatches[:-1] + lang_megabatches[:-1]
    order = torch.randperm(len(megabatches), generator=generator)
    megabatches = [megabatches[i] for i in order]
    if additional:
        megabatches.append(sorted(additional))
    return [i for m in megabatches for i in m]


class ModalityLengthGroupedSampler(Sampler):
    """LLaVA's ``LengthGroupedSampler(group_by_modality=True)`` (see the comment above), seeded per epoch.

    ``batch_size`` is the per-device batch, ``world_size`` the number of micro-batches in one global
    batch (processes x gradient accumulation), as LLaVA's trainer passes them.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, world_size: int, seed: int = 0) -> None:
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size}, {world_size}")
        self.lengths = list(lengths)
        self.batch_size, self.world_size = int(batch_size), int(world_size)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(modality_length_grouped_indices(self.lengths, self.batch_size, self.world_size, g))


def append_sample(batch: dict, sample: dict, pad_token_id: int, image_keys: Sequence[str] = ("image_sizes",),
                  token_keys: Sequence[str] = ()) -> dict:
    """``batch`` (collated) with one more row, ``sample``, right-padded like the rest (DataCollator's layout)."""
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    n = max(ids.shape[1], sample["input_ids"].numel())
    pad = lambda t, v: torch.nn.functional.pad(t, (0, n - t.shape[-1]), value=v)  # noqa: E731
    k = sample["input_ids"].numel()
    row_ids = pad(sample["input_ids"][None], pad_token_id)
    row_labels = pad(sample["labels"][None], IGNORE_INDEX)
    row_mask = pad(torch.ones(1, k, dtype=mask.dtype), 0)
    out = {**batch, "input_ids": torch.cat([pad(ids, pad_token_id), row_ids]),
           "labels": torch.cat([pad(labels, IGNORE_INDEX), row_labels]),
           "attention_mask": torch.cat([pad(mask, 0), row_mask])}
    for key in token_keys:
        if key in sample or key in batch:
            have = batch.get(key, torch.zeros_like(ids))
            row = sample.get(key, torch.zeros(k, dtype=have.dtype))
            out[key] = torch.cat([pad(have, 0), pad(row[None], 0)])
    if "pixel_values" in sample:
        pix = [p for p in (batch.get("pixel_values"), sample["pixel_values"]) if p is not None]
        if pix[0].dim() == 5 and len(pix) == 2:
            P = max(p.shape[1] for p in pix)
            pix = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, P - p.shape[1])) for p in pix]
        out["pixel_values"] = torch.cat(pix, dim=0)
        for key in image_keys:
            parts = [t for t in (batch.get(key), sample.get(key)) if t is not None]
            if parts:
                out[key] = torch.cat(parts, dim=0)
    return out


def count_tokens(batch: dict) -> int:
    """Non-padding input tokens (vision tokens included) of a collated batch."""
    return int(batch["attention_mask"].sum())


__all__ = [
    "IGNORE_INDEX",
    "append_sample",
    "BadSampleError",
    "DataCollator",
    "LlavaConversationDataset",
    "ModalityLengthGroupedSampler",
    "Record",
    "count_tokens",
    "expand_to_square",
    "length_grouped_indices",
    "modality_length_grouped_indices",
    "chat_content",
    "normalize_record",
    "read_records",
    "render_chat",
    "render_plain",
    "render_qwen_1_5",
    "render_vicuna_v1",
    "split_to_even_chunks",
]
