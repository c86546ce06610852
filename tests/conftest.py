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
    datasets cache, one torch thread; undone afterwards. The video tasks' memo of the data root is cleared on both
    sides, since it follows PMOD_BENCH_DATA."""
    import torch

    from pmod_bench.tasks import video
    from pmod_bench.tasks.fixtures import generate

    root = tmp_path_factory.mktemp("data")
    generate(root, benchmarks) if benchmarks is not None else generate(root)
    mp = pytest.MonkeyPatch()
    mp.setenv("PMOD_BENCH_DATA", str(root))
    mp.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
    video._offline_root.cache_clear()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield root
    torch.set_num_threads(before)
    mp.undo()
    video._offline_root.cache_clear()


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


# ------------------------------------------------------------------------------------- host-specific test checks
#: the checks every host-specific test file (test_qwen.py, test_llava_onevision.py) runs on its own host's extras


def check_pmod_classes(vanilla, host_name: str, config_cls, model_cls):
    """to_pmod gives the host's registered p-MoD classes (Auto* included), linear routers on the LLM layers and no
    copy of the weights; returns the p-MoD model."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from pmod_bench import PMoDConfig
    from pmod_bench.model.hosts import host_for
    from pmod_bench.model.modeling import to_pmod

    model = to_pmod(vanilla, PMoDConfig(shift=0.5))
    assert type(model) is model_cls and model.host is host_for(host_name)
    assert isinstance(model.config, config_cls) and model.config.model_type == f"pmod_{host_name}"
    names = [n for n, _ in model.named_parameters() if ".router." in n]
    assert names and all(n.startswith("model.language_model.layers.") and n.split(".router.")[1] in ("weight", "bias")
                         for n in names)
    assert AutoConfig.for_model(f"pmod_{host_name}").__class__ is config_cls
    assert AutoModelForImageTextToText.from_config(model.config).__class__ is model_cls
    assert model.lm_head.weight.data_ptr() == vanilla.lm_head.weight.data_ptr()  # no copy
    return model


def check_hub_directory_round_trip(hub, out, inputs, vanilla_name: str, processor_name: str):
    """``hub``: a vanilla checkpoint directory. load_model gives the vanilla model, or p-MoD with zero routers (at
    ratio 1 everywhere: the vanilla logits); a p-MoD model saved to ``out`` loads back with its routers and ratios.
    Returns the loaded processor."""
    import torch

    from pmod_bench.model.loading import checkpoint_layout, load_model
    from pmod_bench.model.presets import random_routers

    assert checkpoint_layout(hub) == "vanilla"
    base, proc = load_model(str(hub))
    assert type(base).__name__ == vanilla_name and type(proc).__name__ == processor_name
    pmod, _ = load_model(str(hub), pmod={"shift": 0.5})
    assert pmod.pmod_layers and all(torch.count_nonzero(l.router.weight) == 0 for l in pmod.pmod_layers.values())
    valid = inputs["attention_mask"].bool()
    pmod.set_pmod_ratios(ratios=[1.0] * 8)
    with torch.no_grad():
        assert (pmod(**inputs).logits - base(**inputs).logits)[valid].abs().max() < 1e-5  # zero routers at ratio 1: intact
    random_routers(pmod, seed=1)
    pmod.set_pmod_ratios(shift=0.6)
    pmod.save_pretrained(out)
    proc.save_pretrained(out)
    assert checkpoint_layout(out) == "pmod"
    again, _ = load_model(str(out))
    assert again.layer_ratios() == pmod.layer_ratios() and sorted(again.pmod_layers) == sorted(pmod.pmod_layers)
    with torch.no_grad():
        assert (again(**inputs).logits - pmod(**inputs).logits)[valid].abs().max() < 1e-5
    return proc


def check_several_images_decode(host: TinyHost, model, batch):
    """On a batch whose sample 0 holds several images: cached decode == full recompute, and all images of sample 0
    are one routing target (k = trunc(V * rho) over all of them)."""
    import torch

    with torch.no_grad(), model.record_routing() as rec:
        out = model.generate(**batch, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        full = model(**host.full_inputs(batch, out.sequences), use_cache=False).logits
    n = batch["input_ids"].shape[1]
    for t, step in enumerate(out.logits):
        assert (step - full[:, n - 1 + t]).abs().max() < 1e-4, t
    for idx, r in rec.items():
        V = int(r["target"][0].sum())
        assert int(r["selected"][0].sum()) == int(torch.tensor(V, dtype=torch.float32) * torch.tensor(
            model.pmod_layers[idx].ratio, dtype=torch.float32))


def check_in_llm_methods_batch_equals_alone(vanilla, batch, prompt):
    """In-LLM methods on ``batch`` (two prompts), vanilla and p-MoD: the batch equals each prompt alone
    (``prompt(batch, i, model)``: sample ``i`` alone, padding removed)."""
    import torch

    from pmod_bench import PMoDConfig
    from pmod_bench.methods import apply_method
    from pmod_bench.model.modeling import to_pmod

    for model in (vanilla, to_pmod(vanilla, PMoDConfig(shift=0.5))):
        for spec in ("fastv:k=2,keep=0.5", "pyramiddrop:layers=2-4-6,lam=0.5"):
            apply_method(model, spec)
            try:
                with torch.no_grad():
                    together = model.generate(**batch, max_new_tokens=3, do_sample=False, output_logits=True,
                                              return_dict_in_generate=True)
                    for i in range(2):
                        alone = model.generate(**prompt(batch, i, model), max_new_tokens=3, do_sample=False,
                                               output_logits=True, return_dict_in_generate=True)
                        for a, b in zip(together.logits, alone.logits):
                            assert (a[i] - b[0]).abs().max() < 1e-4, (spec, i)
            finally:
                apply_method(model, None)


def check_vision_stage_methods_refuse(vanilla, says: str, vanilla_name: str, ported: tuple = ()):
    """Every vision-stage method refuses ``vanilla`` in one line that names fastv: the ones that rank by [CLS] attention
    (fastervlm, prumerge, prumerge_plus) say the tower has no [CLS] token, the others ``says`` why; the model is
    untouched (the [CLS] refusal also in the profiler's accounting, which starts at the same check). ``ported``: the
    vision-stage methods that run on the host (not checked here)."""
    from pmod_bench.methods import MethodError, apply_method, parse_method_spec
    from pmod_bench.methods.geometry import checked_geometry

    for spec in sorted({"visionzip", "fastervlm", "prumerge", "prumerge_plus", "downsample", "random", "illava"} - set(ported)):
        cls = spec in ("fastervlm", "prumerge", "prumerge_plus")
        for refuse in (lambda: apply_method(vanilla, spec), lambda: checked_geometry(parse_method_spec(spec), vanilla.config)):
            with pytest.raises(MethodError) as err:
                refuse()
            text = str(err.value)
            assert "\n" not in text and "fastv" in text, spec
            assert ("tower has no [CLS] token" in text) == cls and (cls or says in text), (spec, text)
    assert type(vanilla).__name__ == vanilla_name  # untouched


# ------------------------------------------------------------------------------------- preset test checks
#: shared by the tiny-preset test files (test_qwen_preset.py, test_onevision_preset.py)


def assert_same_model(a, b, inputs) -> None:
    """``a`` and ``b`` give identical logits and greedy generations on ``inputs``."""
    import torch

    with torch.no_grad():
        assert torch.equal(a(**inputs).logits, b(**inputs).logits)
        assert torch.equal(a.generate(**inputs, max_new_tokens=4, do_sample=False),
                           b.generate(**inputs, max_new_tokens=4, do_sample=False))


def check_greedy_generate(model, inputs) -> None:
    """Greedy generate on a processed prompt: 5 new tokens after the prompt, the same twice."""
    import torch

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        again = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + 5)
    assert torch.equal(out, again) and torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def check_save_pretrained_round_trip(model, processor, path, make, class_name: str) -> None:
    """save_pretrained + Auto*.from_pretrained in ``path`` give the class ``class_name``, a processor that makes the
    same inputs (``make(processor)``) and the same model."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model.save_pretrained(path)
    processor.save_pretrained(path)
    loaded, loaded_proc = AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path)
    assert type(loaded).__name__ == class_name
    inputs, again = make(processor), make(loaded_proc)
    assert all(k in again and (inputs[k] == again[k]).all() for k in inputs)
    assert_same_model(model, loaded.eval(), inputs)


def check_forward_flops_are_analytic(arch, model, inputs, layout) -> None:
    """The profiler's ``layout`` gives the vision tokens of the processed ``inputs``, and FlopCounterMode over one
    real forward of ``model`` (last logits only) counts exactly the analytic vision + LLM prefill FLOPs."""
    import torch

    from pmod_bench.profiler.counters import flop_counter
    from pmod_bench.profiler.flops import llm_prefill_flops, vision_flops

    V = int((inputs["input_ids"] == arch.image_token_id).sum())
    T = inputs["input_ids"].shape[1] - V
    assert V == layout.vision_tokens
    with torch.no_grad(), flop_counter() as fc:
        model(**inputs, logits_to_keep=1)
    llm = llm_prefill_flops(arch.text, T, V, [V] * arch.text.layers, logits_tokens=1).total()
    assert fc.get_total_flops() == vision_flops(arch, layout).total + llm


def lmms_eval_responses(run) -> dict:
    """{(samples file name, doc_id): resps} of every sample lmms-eval logged under ``run``/lmms_eval."""
    import json

    out = {}
    for f in sorted((run / "lmms_eval").glob("*/samples_*.jsonl")):
        for line in f.read_text().splitlines():
            s = json.loads(line)
            out[(f.name, s["doc_id"])] = s["resps"]
    return out


def oracle_lm(answer):
    """An lmms-eval model that answers every generate_until request with ``answer(task, doc, request)`` (the request's
    doc from the task_dict the runner sets); state is kept between benchmarks (clean does nothing)."""
    from lmms_eval.api.model import lmms

    class Oracle(lmms):
        def generate_until(self, requests):
            return [answer(r.args[4], self.task_dict[r.args[4]][r.args[5]][r.args[3]], r) for r in requests]

        def loglikelihood(self, requests):
            raise NotImplementedError

        def generate_until_multi_round(self, requests):
            raise NotImplementedError

        def clean(self):
            pass

    return Oracle()


def demo_records(tmp_path_factory, name: str, **demo):
    """(root, records): the demo training data (``make_demo_dataset(root, **demo)``) in a fresh ``name`` folder, read
    back as records."""
    from pmod_bench.train.data import read_records
    from pmod_bench.train.demo import make_demo_dataset

    root = tmp_path_factory.mktemp(name)
    return root, read_records([str(make_demo_dataset(root, **demo))])


def check_profile_refuses(argv, needle: str, capsys, arch: str) -> None:
    """``pmod-bench profile -q --no-verify [--arch arch] argv`` exits 2 with one error line that holds ``needle``
    (``--arch arch`` added unless ``argv`` names one)."""
    from pmod_bench.cli import main

    base = ["profile", "-q", "--no-verify"] + ([] if "--arch" in argv else ["--arch", arch])
    assert main(base + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pmod-bench profile: error:") and needle in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def zero3_against_one_process(tmp_path, include: str, *stops: list) -> tuple[dict, dict, list, list]:
    """A demo recipe over mixed records (single-image, two-image, text-only, one missing image), trained 3 steps in this
    process (``plain``) and under ZeRO-3 on two gloo processes at per-device batch 2 (``z3``), launched once per entry
    of ``stops`` (extra overrides; e.g. ``["train.stop_at_step=2"], []`` stops and resumes) or once:
    (plain summary, ZeRO-3 summary, plain losses, ZeRO-3 losses)."""
    import json
    import socket
    import subprocess
    import sys

    from pmod_bench.train.config import load_recipe
    from pmod_bench.train.demo import make_demo_dataset
    from pmod_bench.train.trainer import train

    make_demo_dataset(tmp_path / "data", n_image=8, n_text=4, n_multi=2, bad={"missing": 1})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"# pmod-bench train --config {recipe}\ninclude: {include}\n"
                      f"data: {{json: {tmp_path / 'data' / 'data.json'}, image_folder: {tmp_path / 'data'}}}\n"
                      "train: {max_steps: 3, save_steps: 10, progress_bar: false, device: cpu}\n")
    plain = train(load_recipe(recipe, [f"output_dir={tmp_path / 'plain'}"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    for extra in stops or ([],):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
               "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), "-m",
               "pmod_bench.cli", "train", "--config", str(recipe), "train.deepspeed=zero3", "train.per_device_batch_size=2",
               *extra, "-o", str(tmp_path / "z3")]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "z3" / "train_summary.json").read_text())
    a, b = ([json.loads(line)["loss"] for line in (tmp_path / k / "train_log.jsonl").read_text().splitlines()]
            for k in ("plain", "z3"))
    return plain, summary, a, b
