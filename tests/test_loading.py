"""load_model: presets, HF-layout directories (p-MoD and vanilla), hub ids resolved offline from a
snapshot laid out exactly as the hub cache lays it out, and the errors for bad sources."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_inputs
from pmod_bench import PMoDConfig
from pmod_bench.model.loading import ModelSourceError, load_model
from pmod_bench.model.presets import build_preset, random_routers


@pytest.fixture(scope="module")
def saved_dirs(tmp_path_factory):
    """A trained-looking tiny p-MoD checkpoint and a vanilla tiny LLaVA-NeXT checkpoint, HF layout."""
    root = tmp_path_factory.mktemp("ckpt")
    pmod_model, processor = build_preset("tiny")
    random_routers(pmod_model)
    pmod_model.save_pretrained(root / "pmod")
    processor.save_pretrained(root / "pmod")
    vanilla, _ = build_preset("tiny", pmod=None)
    vanilla.save_pretrained(root / "vanilla")
    processor.save_pretrained(root / "vanilla")
    return root, pmod_model, vanilla


def _logits(model, processor):
    inputs = make_inputs(processor, sizes=((64, 48),))
    with torch.no_grad():
        return model(**inputs).logits


def test_presets_and_vanilla_variants():
    model, processor = load_model("tiny")
    assert type(model).__name__ == "PMoDLlavaNextForConditionalGeneration"
    assert model.layer_ratios() == PMoDConfig().layer_ratios(8)
    assert processor is not None and not model.training
    vanilla, _ = load_model("tiny:vanilla")
    assert type(vanilla).__name__ == "LlavaNextForConditionalGeneration"
    vanilla2, _ = load_model("tiny", vanilla=True)
    assert type(vanilla2) is type(vanilla)
    shifted, _ = load_model("tiny-llava", pmod={"shift": 0.3})
    assert type(shifted).__name__ == "PMoDLlavaForConditionalGeneration"
    assert shifted.layer_ratios() == PMoDConfig(shift=0.3).layer_ratios(8)
    with pytest.raises(ModelSourceError, match="only one"):
        load_model("tiny:vanilla", pmod={"shift": 0.3})


def test_local_pmod_dir_same_logits_and_override(saved_dirs):
    root, reference, _ = saved_dirs
    model, processor = load_model(str(root / "pmod"))
    assert type(model).__name__ == "PMoDLlavaNextForConditionalGeneration"
    torch.testing.assert_close(_logits(model, processor), _logits(reference, processor))
    for i, layer in reference.pmod_layers.items():
        torch.testing.assert_close(model.pmod_layers[i].router.weight, layer.router.weight)
    # override the schedule of a trained checkpoint (layers 0-1 have no router, so keep them ordinary)
    ratios = [1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    over, _ = load_model(str(root / "pmod"), pmod={"ratios": ratios})
    assert over.layer_ratios() == ratios
    with pytest.raises(ValueError, match="no trained router"):
        load_model(str(root / "pmod"), pmod={"shift": 0.3})  # routes layer 0


def test_local_vanilla_dir_baseline_and_to_pmod(saved_dirs):
    root, _, vanilla_ref = saved_dirs
    base, processor = load_model(str(root / "vanilla"), dtype="float32")
    assert type(base).__name__ == "LlavaNextForConditionalGeneration"
    expected = _logits(vanilla_ref, processor)
    torch.testing.assert_close(_logits(base, processor), expected)
    pmod, _ = load_model(str(root / "vanilla"), pmod=PMoDConfig(shift=0.5))
    assert type(pmod).__name__ == "PMoDLlavaNextForConditionalGeneration"
    assert pmod.layer_ratios() == PMoDConfig().layer_ratios(8)
    bf16, _ = load_model(str(root / "vanilla"), dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16


def _hub_snapshot(cache: Path, repo_id: str, src, revision="0123456789abcdef0123456789abcdef01234567"):
    """Lay ``src`` out as the HF hub cache does: models--ORG--NAME/{refs/main, snapshots/<rev>/...}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / revision
    shutil.copytree(src, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return snap


def test_hub_id_resolves_offline_from_hub_layout_snapshot(saved_dirs, tmp_path, monkeypatch):
    root, reference, _ = saved_dirs
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _hub_snapshot(tmp_path / "hub", "MCG-NJU/tiny-pmod", root / "pmod")
    model, processor = load_model("MCG-NJU/tiny-pmod", cache_dir=tmp_path / "hub")
    torch.testing.assert_close(_logits(model, processor), _logits(reference, processor))
    # the same through HF_HUB_CACHE (huggingface_hub reads it at import: patch its constant)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model2, _ = load_model("MCG-NJU/tiny-pmod")
    assert model2.layer_ratios() == model.layer_ratios()


def test_unreachable_hub_id_error_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="not a local directory.*local path"):
        load_model("liuhaotian/llava-v1.5-7b", cache_dir=tmp_path)


def test_bad_sources_name_the_fix(tmp_path):
    with pytest.raises(ModelSourceError, match="neither a preset"):
        load_model("./no/such/dir")
    with pytest.raises(ModelSourceError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelSourceError, match="model_type 'bert'"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_next"}))
    with pytest.raises(ModelSourceError, match="could not load"):
        load_model(str(tmp_path))


def test_incomplete_hf_checkpoint_names_missing_tensors(saved_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    root, _, _ = saved_dirs
    bad = tmp_path / "bad"
    shutil.copytree(root / "pmod", bad)
    weights = load_file(str(bad / "model.safetensors"))
    del weights[next(k for k in weights if k.endswith("layers.5.router.weight"))]  # (on-disk names are HF's)
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelSourceError, match=r"lack 1 tensor.*layers\.5\.router\.weight.*re-save"):
        load_model(str(bad))


# ------------------------------------------------------------------------------ registration, any import order
_ORDERS = {
    "pmod_bench first": "import pmod_bench\nfrom transformers import AutoModelForImageTextToText as A\n",
    "transformers first": "from transformers import AutoModelForImageTextToText as A\nimport pmod_bench\n",
    "transformers module, then pmod_bench": "import transformers\nimport pmod_bench\nA = transformers.AutoModelForImageTextToText\n",
    "a LLaVA class first": ("import pmod_bench\nfrom transformers import LlavaNextForConditionalGeneration\n"
                            "from transformers import AutoModelForImageTextToText as A\n"),
}


@pytest.mark.slow
@pytest.mark.parametrize("order", list(_ORDERS))
def test_from_pretrained_in_a_fresh_process_in_any_import_order(saved_dirs, order):
    """The README's one-line user path: ``import pmod_bench`` and transformers' Auto class, in either order, load a
    saved p-MoD checkpoint in a fresh process; ``import pmod_bench`` itself imports neither torch nor transformers."""
    import subprocess
    import sys

    root, _, _ = saved_dirs
    code = ("import sys\n" + _ORDERS[order] +
            f"m = A.from_pretrained({str(root / 'pmod')!r})\n"
            "print(type(m).__name__, type(m.config).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["PMoDLlavaNextForConditionalGeneration", "PMoDLlavaNextConfig"]


def test_import_pmod_bench_stays_light_and_arms_registration():
    import subprocess
    import sys

    code = ("import sys, pmod_bench\nfrom pmod_bench import _autoregister\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules, _autoregister._FINDER in sys.meta_path)\n"
            "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
            "print(_autoregister._FINDER is None, 'pmod_llava_next' in CONFIG_MAPPING)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False", "True", "True", "True"]


def test_a_preset_name_that_is_also_a_folder_here_is_refused_naming_both(tmp_path, monkeypatch):
    """`tiny` with a ./tiny folder: neither the preset (random weights) nor the folder wins silently."""
    from pmod_bench.model.loading import ModelSourceError, load_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    with pytest.raises(ModelSourceError, match=r"'tiny' names both the preset 'tiny' \(random weights\) and the directory "
                                               f"{tmp_path / 'tiny'} in the working directory; pass ./tiny"):
        load_model("tiny")
    with pytest.raises(ModelSourceError, match="config.json"):  # ./tiny is the folder: not a checkpoint
        load_model("./tiny")
    model, _ = load_model("tiny:vanilla")  # NAME:vanilla is always the preset
    assert not hasattr(model, "set_pmod_ratios")
