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
#: the tiny preset of each host family the model tests run on
PRESET_OF_HOST = {"llava": "tiny-llava", "llava_next": "tiny", "qwen2_5_vl": "tiny-qwen2.5-vl",
                  "llava_onevision": "tiny-llava-onevision"}


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

    @property
    def preset(self) -> str:
        """The tiny preset of the family (model/presets.py)."""
        return PRESET_OF_HOST[self.name]

    def build(self, seed: int = 0, attn_implementation: str = "sdpa"):
        """A fresh vanilla model (fp32, eval)."""
        if self.name == "llava_onevision":
            return tiny_onevision(seed, attn_implementation)
        from pmod_bench.model.presets import build_preset

        model, _ = build_preset(self.preset, pmod=None, seed=seed, attn_implementation=attn_implementation)
        return model

    @functools.cached_property
    def processor(self):
        from pmod_bench.model.presets import preset_processor

        return preset_processor(self.preset)

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
        """Extra inputs of a hand-made decode step (one new token, ``attention_mask`` over everything), as the host
        adapter gives them (Qwen2.5-VL: text position + the cached ``rope_deltas`` on the three rows)."""
        from pmod_bench.model.hosts import host_for

        return host_for(model).decode_inputs(model, attention_mask)

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
