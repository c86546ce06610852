"""Shared fixtures: tiny models and inputs built locally (no downloads, ever)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_processor():
    from pmod_bench.model.presets import preset_processor

    return preset_processor("tiny")


@pytest.fixture(scope="session")
def tiny_vanilla():
    """The vanilla (no p-MoD) tiny LLaVA-NeXT model, fp32, eval mode."""
    from pmod_bench.model.presets import build_preset

    model, _ = build_preset("tiny", pmod=None)
    return model


# ------------------------------------------------------------------------------------- three tiny hosts
#: the host families every model, core-contract and in-LLM method test runs on (parametrised, not copied)
TINY_HOSTS = ("llava", "llava_next", "qwen2_5_vl", "llava_onevision")

#: Qwen2.5-VL's chat template (its <|im_start|> turns; one <|vision_start|><|image_pad|><|vision_end|> per image)
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@functools.lru_cache(maxsize=1)
def tiny_qwen_processor():
    """A Qwen2.5-VL processor from local parts: a byte-level BPE trained in code with Qwen's special tokens, Qwen's
    image processor (PIL backend) at 8 px patches merged 2x2 (one LLM token per 16x16 px), its video processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from pmod_bench.model.presets import _CORPUS

    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([_CORPUS + " user assistant system"] * 4, trainer=trainers.BpeTrainer(
        vocab_size=512, min_frequency=1, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>",
                                        padding_side="left", extra_special_tokens={"image_token": "<|image_pad|>",
                                                                                  "video_token": "<|video_pad|>"})
    pixels = dict(patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16 * 4, max_pixels=128 * 128)
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil(**pixels), tokenizer=tokenizer,
                               video_processor=Qwen2VLVideoProcessor(**pixels), chat_template=QWEN_TEMPLATE)


def tiny_qwen(seed: int = 0, attn_implementation: str = "sdpa"):
    """A vanilla Qwen2.5-VL with random weights (seed), fp32, eval: text 64 wide, 8 layers, 4 heads / 2 KV heads,
    head 16 with M-RoPE sections (2, 3, 3); vision depth 2 (window attention in block 0, full in block 1), 32 wide."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    proc = tiny_qwen_processor()
    tok = proc.tokenizer
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=32, out_hidden_size=64, fullatt_block_indexes=[1]),
        image_token_id=proc.image_token_id, video_token_id=proc.video_token_id,
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def tiny_onevision(seed: int = 0, attn_implementation: str = "sdpa"):
    """A vanilla LLaVA-OneVision with random weights (seed), fp32, eval: the ``tiny-llava-onevision`` preset's config
    (SigLIP read in full, anyres_max_9 tiles, Qwen2 with GQA and q/k/v biases) with 8 text layers, so the in-LLM
    methods' test specs (layers up to 6) fit."""
    import torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from pmod_bench.model.presets import _tiny_onevision_config

    kwargs = _tiny_onevision_config()
    kwargs["text_config"] = dict(kwargs["text_config"], num_hidden_layers=8, max_window_layers=8)
    cfg = LlavaOnevisionConfig(**kwargs)
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration(cfg).eval()


@dataclass
class TinyHost:
    """One tiny host family of the tests: its vanilla model (seed 0) and processor, built locally."""

    name: str

    def build(self, seed: int = 0, attn_implementation: str = "sdpa"):
        """A fresh vanilla model (fp32, eval)."""
        if self.name == "llava_onevision":
            return tiny_onevision(seed, attn_implementation)
        if self.name == "qwen2_5_vl":
            return tiny_qwen(seed, attn_implementation)
        from pmod_bench.model.presets import build_preset

        model, _ = build_preset("tiny" if self.name == "llava_next" else "tiny-llava", pmod=None, seed=seed,
                                attn_implementation=attn_implementation)
        return model

    @functools.cached_property
    def processor(self):
        if self.name == "llava_onevision":
            from pmod_bench.model.presets import preset_processor

            return preset_processor("tiny-llava-onevision")
        if self.name == "qwen2_5_vl":
            return tiny_qwen_processor()
        from pmod_bench.model.presets import preset_processor

        return preset_processor("tiny" if self.name == "llava_next" else "tiny-llava")

    def inputs(self, sizes=((64, 48),), questions=None):
        return make_inputs(self.processor, sizes=sizes, questions=questions)

    @staticmethod
    def vision(model, input_ids):
        """(B, N) bool: the vision positions of ``input_ids``, as the model's host adapter says."""
        from pmod_bench.model.hosts import host_for

        return host_for(model).vision_mask(model.config, input_ids)

    def full_inputs(self, inputs, sequences) -> dict:
        """``inputs`` with the generated ``sequences`` as the prompt (a full recompute, no cache): the attention mask
        extended; positions as generate() gives them (LLaVA: mask cumsum; Qwen: M-RoPE from mm_token_type_ids)."""
        import torch

        n, B = inputs["input_ids"].shape[1], sequences.shape[0]
        new = sequences.shape[1] - n
        attn = torch.cat([inputs["attention_mask"], torch.ones(B, new, dtype=torch.long)], dim=1)
        out = dict(inputs, input_ids=sequences, attention_mask=attn)
        if self.name == "qwen2_5_vl":
            out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(B, new, dtype=torch.long)], 1)
        else:
            out["position_ids"] = (attn.cumsum(-1) - 1).clamp(min=0)
        return out

    def decode_kwargs(self, model, attention_mask) -> dict:
        """Extra inputs of a hand-made decode step (one new token, ``attention_mask`` over everything). Qwen2.5-VL:
        its positions, text position + the cached ``rope_deltas`` on the three rows, as generate() passes them
        (transformers 5.25's forward would compute them over the whole mask)."""
        if self.name != "qwen2_5_vl":
            return {}
        text = (attention_mask.long().cumsum(-1) - 1)[:, -1:]  # (B, 1)
        return {"position_ids": (text + model.model.rope_deltas)[None].expand(3, -1, -1)}

    def coords(self, model, inputs, sequences):
        """(R, N) original position ids of sample 0 of ``sequences`` (no padding): 1-D ``0..N-1`` or Qwen's three rows."""
        import torch

        if self.name != "qwen2_5_vl":
            return torch.arange(sequences.shape[1])[None]
        full = self.full_inputs(inputs, sequences)
        pos, _ = model.model.get_rope_index(full["input_ids"][:1], full["mm_token_type_ids"][:1],
                                            image_grid_thw=inputs["image_grid_thw"])
        return pos[:, 0]


@pytest.fixture(scope="session", params=TINY_HOSTS)
def host(request) -> TinyHost:
    """Each of the tiny host families in turn."""
    return TinyHost(request.param)


@pytest.fixture(scope="session")
def host_vanilla(host):
    """The host's vanilla tiny model (fp32, eval), shared by the session (p-MoD models share its tensors)."""
    return host.build()


def make_inputs(processor, sizes=((64, 48),), questions=None):
    """Processor inputs for one generated image per size (batched, left-padded)."""
    from pmod_bench.model.presets import demo_image

    questions = questions or ["What is shown in the image?", "Is there a red circle? Answer yes or no."]
    prompts, images = [], []
    for i, (w, h) in enumerate(sizes):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": questions[i % len(questions)]}]}]
        prompts.append(processor.apply_chat_template(msgs, add_generation_prompt=True))
        images.append(demo_image(w, h, seed=(7 * w + h) % 13))  # same image for the same size
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def method_forward_flops(model, inputs, spec: str):
    """Apply comparison method ``spec`` to ``model`` and count one real forward on ``inputs`` with the profiler's
    FlopCounterMode (CPU SDPA included): (the method's inputs as the model builds them, the measured FLOPs)."""
    import torch

    from pmod_bench.methods import apply_method
    from pmod_bench.profiler.counters import flop_counter

    apply_method(model, spec)
    mi = model.method_inputs(inputs["input_ids"], inputs["pixel_values"], inputs.get("image_sizes"), inputs["attention_mask"])
    with torch.no_grad(), flop_counter() as fc:
        model(**inputs)
    return mi, fc.get_total_flops()


@pytest.fixture
def recorded(monkeypatch):
    """Every kept set an LLM-side method decides: [(B, N) bool, ...] in order."""
    from pmod_bench.methods import llm as llm_mod

    got = []
    keep = llm_mod.DropState.keep
    monkeypatch.setattr(llm_mod.DropState, "keep", lambda self, alive, V: got.append(alive.clone()) or keep(self, alive, V))
    return got


@pytest.fixture
def one_thread():
    """Tiny ops on a shared 2-core machine: extra threads only contend."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def benchmark_data_env(tmp_path_factory, benchmarks=None):
    """Generator for module fixtures: benchmark fixtures (hub schema) under PMOD_BENCH_DATA, an isolated
    datasets cache, one torch thread; undone afterwards."""
    import torch

    from pmod_bench.tasks.fixtures import generate

    root = tmp_path_factory.mktemp("data")
    generate(root, benchmarks) if benchmarks is not None else generate(root)
    mp = pytest.MonkeyPatch()
    mp.setenv("PMOD_BENCH_DATA", str(root))
    mp.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield root
    torch.set_num_threads(before)
    mp.undo()


def train_workspace(tmp_path_factory, name: str, train_keys: str):
    """(root, recipe): a vanilla tiny checkpoint, demo data with bad records (1 missing, 1 corrupt image,
    1 malformed; 10 good image + 4 text-only records) and a recipe using both with ``train: {train_keys}``."""
    import torch

    from pmod_bench.model.presets import build_preset
    from pmod_bench.train.demo import make_demo_dataset

    root = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    model, processor = build_preset("tiny", pmod=None)
    model.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    make_demo_dataset(root / "data", n_image=10, n_text=4, bad={"missing": 1, "corrupt": 1, "malformed": 1})
    recipe = root / "recipe.yaml"
    recipe.write_text(
        f"# pmod-bench train --config {recipe}\n"
        "include: demo-tiny.yaml\n"
        f"model: {{source: {root / 'base'}}}\n"
        f"data: {{json: {root / 'data' / 'data.json'}, image_folder: {root / 'data'}}}\n"
        f"train: {{{train_keys}}}\n"
    )
    return root, recipe
