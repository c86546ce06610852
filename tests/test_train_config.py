"""Training configuration: every shipped recipe loads and validates; overrides; errors that name the fix."""

from __future__ import annotations

import dataclasses
import json

import pytest
from pmod_bench.model.config import PMoDConfig
from pmod_bench.model.schedules import match_shift, mean_retention, prd_ratios

from pmod_bench.train.config import (
    DEEPSPEED_CONFIGS,
    RECIPE_DIR,
    SECTIONS,
    ConfigError,
    TrainConfig,
    config_from_dict,
    describe_keys,
    field_docs,
    list_recipes,
    load_recipe,
    read_recipe_dict,
    recipe_command,
)

RECIPES = list_recipes()
PRD_MEAN_32 = mean_retention(prd_ratios(32))  # 0.5375
ROOTS = {"llava-1.5-7b-pt", "llava-1.5-7b-sft", "demo-tiny", "qwen2.5-vl-7b-pmod-sft", "llava-onevision-7b-pmod-sft"}  # the only recipes without include:
#: recipes that start from a released model (model.source), not a composition of LLM + vision tower
FROM_SOURCE = {"qwen2.5-vl-7b-pmod-sft", "llava-onevision-7b-pmod-sft"}
#: recipes whose loop is their host's own (global batch, lr), not the paper's Table 12: OneVision's SI/OV stages
HOST_LOOP = {"llava-onevision-7b-pmod-sft": (256, 1e-5)}


def test_recipe_names_are_unique_and_expected():
    paths = sorted(RECIPE_DIR.rglob("*.yaml"))
    assert len(paths) == len(RECIPES), "two recipe files share a name"
    expected = {
        "llava-1.5-7b-pt", "llava-1.5-7b-sft", "llava-next-7b-pt", "llava-next-7b-sft",
        "pmod-llava-1.5-7b-pt", "pmod-llava-1.5-7b-sft", "pmod-llava-next-7b-pt", "pmod-llava-next-7b-sft",
        "pmod-llava-next-7b-sft-shift0.3", "pmod-llava-next-7b-sft-shift0.4", "pmod-llava-next-7b-sft-shift0.5",
        "t3-vanilla-mod", "t3-tanhnorm", "t3-string", "t3-prd",
        "t4-constant", "t4-interleaved", "t4-stepped", "t4-linear", "t4-cosine",
        "t6-norm-none", "t6-softmax", "t6-shifted-softmax", "t6-tanh-alpha1", "t6-tanh-alpha0.2", "demo-tiny",
        "demo-tiny-qwen2.5-vl", "qwen2.5-vl-7b-pmod-sft", "demo-tiny-llava-onevision", "llava-onevision-7b-pmod-sft",
    }
    assert expected <= set(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_loads_and_validates(name):
    path = RECIPES[name]
    cmd = recipe_command(path)
    assert cmd is not None and cmd.startswith(f"pmod-bench train --config {name} "), f"{path} must start with its command"
    raw = read_recipe_dict(path)
    assert "include" not in raw
    if name not in ROOTS:  # variants are a base plus a few keys, never a copy
        text = path.read_text()
        assert "\ninclude:" in text
        keys = [l for l in text.splitlines() if l.strip() and not l.lstrip().startswith("#")]
        assert len(keys) <= 16, f"{name}: a variant should override a few keys, not copy its base"
    cfg = load_recipe(name)
    assert isinstance(cfg, TrainConfig) and cfg.recipe == name
    demo = name.startswith("demo-")
    batch, lr = HOST_LOOP.get(name, ({"pt": 256, "sft": 128}[cfg.stage], {"pt": 1e-3, "sft": 2e-5}[cfg.stage]))
    assert cfg.train.global_batch_size == batch or demo
    if not demo:
        if name in FROM_SOURCE:
            assert cfg.model.source and not cfg.model.llm
        else:
            assert (cfg.model.source is None) and cfg.model.llm and cfg.model.vision_tower
        assert cfg.train.deepspeed in DEEPSPEED_CONFIGS and cfg.train.precision == "bf16"
        assert cfg.train.gradient_checkpointing and cfg.train.warmup_ratio == 0.03 and cfg.train.lr_scheduler == "cosine"
        assert cfg.train.lr == lr
        assert "vision" not in cfg.trainable
        pmod = cfg.resolved_pmod(32)  # the paper's LLMs have 32 layers
        if pmod is not None:
            assert pmod.overflow_guard
            ratios = pmod.layer_ratios(32)
            if cfg.match_mean_retention == "prd":
                assert abs(mean_retention(ratios) - PRD_MEAN_32) < 2e-3
        # the recipe's label lets `pmod-bench report` match the run (MODEL/VARIANT) or is free text for PT
        if cfg.stage == "sft" and name not in FROM_SOURCE:  # other hosts: free text (no paper model to name)
            assert "/" in cfg.label
    # round trip through the dict form
    again = config_from_dict(cfg.to_dict(), recipe=name)
    assert again.to_dict() == cfg.to_dict()


def test_table12_recipes():
    pt = load_recipe("llava-1.5-7b-pt")
    assert pt.stage == "pt" and pt.trainable == ["connector"] and pt.pmod is None and pt.data.template == "plain"
    for alias in ("llava-next-7b-pt", "pmod-llava-1.5-7b-pt", "pmod-llava-next-7b-pt"):  # one shared PT (App. D.1)
        a = load_recipe(alias).to_dict()
        assert {**a, "recipe": None} == {**pt.to_dict(), "recipe": None}
    base15, p15 = load_recipe("llava-1.5-7b-sft"), load_recipe("pmod-llava-1.5-7b-sft")
    assert base15.pmod is None and p15.pmod == PMoDConfig()
    assert p15.trainable == ["connector", "llm", "routers"] and p15.data.max_length == 2048 and p15.model.arch == "llava"
    nxt = load_recipe("pmod-llava-next-7b-sft")
    assert nxt.model.arch == "llava_next" and nxt.data.max_length == 4096 and nxt.data.image_aspect_ratio == "native"
    assert nxt.model.grid_pinpoints == [[2, 2], [1, 2], [2, 1], [1, 3], [3, 1]]
    assert nxt.pmod == PMoDConfig() and nxt.label == "llava-next-7b/p-MoD-0.5"
    assert load_recipe("llava-next-7b-sft").pmod is None
    for d in (0.3, 0.4, 0.5):
        c = load_recipe(f"pmod-llava-next-7b-sft-shift{d}")
        assert c.pmod == PMoDConfig(shift=d) and c.label == f"llava-next-7b/p-MoD-{d}"


def test_qwen_recipes():
    q = load_recipe("qwen2.5-vl-7b-pmod-sft")
    assert q.model.source == "Qwen/Qwen2.5-VL-7B-Instruct" and q.data.template == "chat"
    assert (q.data.min_pixels, q.data.max_pixels) == (256 * 28 * 28, 1605632)  # lmms-eval's qwen2_5_vl defaults
    assert q.data.image_aspect_ratio == "native" and q.trainable == ["llm", "routers"]  # tower + merger frozen
    assert q.pmod == PMoDConfig() and "/" not in q.label and q.train.deepspeed == "zero3"
    for ds in ("zero2", "zero3"):
        assert load_recipe("qwen2.5-vl-7b-pmod-sft", [f"train.deepspeed={ds}"]).train.deepspeed_path().endswith(f"{ds}.json")
    d = load_recipe("demo-tiny-qwen2.5-vl")
    assert d.model.source == "tiny-qwen2.5-vl" and d.data.template == "chat" and d.data.max_pixels == 25088


def test_pixel_budget_keys_are_validated():
    for bad, msg in (("data.max_pixels=0", "data.max_pixels must be a positive integer"),
                     ("data.min_pixels=1.5", "data.min_pixels must be a positive integer"),
                     ("data.max_pixels=true", "data.max_pixels must be a positive integer")):
        with pytest.raises(ConfigError, match=msg):
            load_recipe("demo-tiny-qwen2.5-vl", [bad])
    with pytest.raises(ConfigError, match=r"data.min_pixels \(50000\) must not exceed data.max_pixels \(25088\)"):
        load_recipe("demo-tiny-qwen2.5-vl", ["data.min_pixels=50000"])
    cfg = load_recipe("demo-tiny", ["data.max_pixels=1000"])
    assert cfg.data.pixel_budget() == {"longest_edge": 1000} and load_recipe("demo-tiny").data.pixel_budget() is None


def test_ablation_recipes():
    t3 = {n: load_recipe(n).resolved_pmod(32) for n in ("t3-vanilla-mod", "t3-tanhnorm", "t3-string", "t3-prd")}
    assert (t3["t3-vanilla-mod"].weight_norm, t3["t3-vanilla-mod"].string) == ("none", False)
    assert (t3["t3-tanhnorm"].weight_norm, t3["t3-tanhnorm"].norm_scale, t3["t3-tanhnorm"].string) == ("tanh", 0.2, False)
    assert (t3["t3-string"].weight_norm, t3["t3-string"].string) == ("tanh", True)
    assert t3["t3-prd"].schedule == "cosine" and t3["t3-prd"].shift == 0.5
    # Table 4: five schedules at the same mean retention (match_shift), all else the default p-MoD
    for sched in ("constant", "interleaved", "stepped", "linear", "cosine"):
        cfg = load_recipe(f"t4-{sched}")
        pm = cfg.resolved_pmod(32)
        assert pm.schedule == sched and pm.weight_norm == "tanh" and pm.string
        assert abs(mean_retention(pm.layer_ratios(32)) - PRD_MEAN_32) < 2e-3
        if cfg.match_mean_retention is not None:
            assert pm.shift == match_shift(sched, 32, PRD_MEAN_32, pm.max_ratio, pm.min_ratio, pm.steps)
    # Table 6: weight normalisations, with STRing and PRD
    norms = {n: load_recipe(n).resolved_pmod(32) for n in
             ("t6-norm-none", "t6-softmax", "t6-shifted-softmax", "t6-tanh-alpha1", "t6-tanh-alpha0.2")}
    assert [(p.weight_norm, p.norm_scale) for p in norms.values()] == [
        ("none", 1.0), ("softmax", 1.0), ("shifted_softmax", 0.4), ("tanh", 1.0), ("tanh", 0.2)]
    assert all(p.schedule == "cosine" and p.shift == 0.5 and p.string for p in norms.values())


def test_recipe_labels_match_the_report_tool():
    matching = pytest.importorskip("pmod_bench.reports.matching")
    for name in RECIPES:
        cfg = load_recipe(name)
        if cfg.label and "/" in cfg.label:
            assert matching.parse_label(cfg.label) is not None, f"{name}: label {cfg.label!r} is not MODEL/VARIANT"


def test_deepspeed_configs_ship():
    for short, fname in DEEPSPEED_CONFIGS.items():
        data = json.loads((RECIPE_DIR / fname).read_text())
        assert list(data)[0] == "_usage" and data["_usage"].startswith("pmod-bench train --config ")
        assert data["zero_optimization"]["stage"] == int(short[-1])
        assert data["bf16"]["enabled"] == "auto" and data["train_micro_batch_size_per_gpu"] == "auto"
        assert load_recipe("pmod-llava-next-7b-sft", [f"train.deepspeed={short}"]).train.deepspeed_path().endswith(fname)


def test_overrides_and_errors():
    cfg = load_recipe("pmod-llava-next-7b-sft", ["train.lr=1e-3", "pmod.shift=0.3", "data.json=a.json",
                                                 "train.trainable=[connector,routers]", "train.max_steps=5"])
    assert cfg.train.lr == 1e-3 and cfg.pmod.shift == 0.3 and cfg.data.json == ["a.json"]
    assert cfg.trainable == ["connector", "routers"] and cfg.train.max_steps == 5
    assert load_recipe("pmod-llava-next-7b-sft", ["pmod=null"]).pmod is None
    assert load_recipe("llava-next-7b-sft", ["pmod.shift=0.4"]).pmod == PMoDConfig(shift=0.4)
    with pytest.raises(ConfigError, match="Did you mean 'lr'"):
        load_recipe("pmod-llava-next-7b-sft", ["train.lrr=1"])
    with pytest.raises(ConfigError, match="did you mean 'cosine'"):
        load_recipe("pmod-llava-next-7b-sft", ["pmod.schedule=cosin"])
    with pytest.raises(ConfigError, match="multiple of train.per_device_batch_size"):
        load_recipe("pmod-llava-next-7b-sft", ["train.per_device_batch_size=7"])
    with pytest.raises(ConfigError, match="match_mean_retention needs p-MoD"):
        load_recipe("t4-linear", ["pmod=null"])
    with pytest.raises(ConfigError, match="not reachable"):
        load_recipe("t4-interleaved", ["pmod.min_ratio=0.15"]).resolved_pmod(32)
    with pytest.raises(ConfigError, match="exclusive"):
        load_recipe("pmod-llava-next-7b-sft", ["model.source=tiny"])
    with pytest.raises(ConfigError, match="shipped recipe.*Did you mean 'pmod-llava-next-7b-sft'"):
        load_recipe("pmod-llava-next-7b-stf")
    with pytest.raises(ConfigError, match="key=value"):
        load_recipe("demo-tiny", ["train.lr"])
    with pytest.raises(ConfigError, match="router_lr_scale"):
        load_recipe("demo-tiny", ["train.router_lr_scale=0"])


def test_include_cycle_and_relative_includes(tmp_path):
    (tmp_path / "a.yaml").write_text("# pmod-bench train --config a.yaml\ninclude: b.yaml\nstage: pt\n")
    (tmp_path / "b.yaml").write_text("# pmod-bench train --config b.yaml\ninclude: a.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("# pmod-bench train --config c.yaml\ninclude: pmod-llava-next-7b-sft.yaml\ntrain: {lr: 3.0e-5}\n")
    cfg = load_recipe(tmp_path / "c.yaml")
    assert cfg.train.lr == 3e-5 and cfg.pmod == PMoDConfig() and cfg.recipe == str(tmp_path / "c.yaml")


def test_every_field_is_documented():
    for name, cls in {**SECTIONS, "": TrainConfig}.items():
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
    text = describe_keys()
    assert "train.global_batch_size = 128" in text and "pmod.string = True" in text and "data.on_bad_sample" in text


def test_cli_lists_prints_and_rejects(capsys):
    from pmod_bench.cli import main

    assert main(["train", "--list-recipes"]) == 0
    out = capsys.readouterr().out
    assert "pmod-llava-next-7b-sft" in out and "llava-next-7b/p-MoD-0.5" in out
    assert main(["train", "--config", "t4-linear", "pmod.min_ratio=0.1", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "schedule: linear" in out and "min_ratio: 0.1" in out
    assert main(["train", "--config", "no-such-recipe"]) == 2
    assert "--list-recipes" in capsys.readouterr().err
    assert main(["train"]) == 2


def test_one_switch_for_the_overflow_guard(capsys):
    """train.overflow_guard is the only key: --print-config shows no pmod.overflow_guard, a recipe or override
    that sets pmod.overflow_guard is refused, and the printed config loads back to the same settings."""
    import yaml

    from pmod_bench.cli import main

    cfg = load_recipe("pmod-llava-next-7b-sft")
    assert cfg.train.overflow_guard is True and "overflow_guard" not in cfg.to_dict()["pmod"]
    assert cfg.resolved_pmod(32).overflow_guard is True  # what training runs with
    assert load_recipe("pmod-llava-next-7b-sft", ["train.overflow_guard=false"]).resolved_pmod(32).overflow_guard is False
    assert main(["train", "--config", "pmod-llava-next-7b-sft", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "overflow_guard" not in printed["pmod"] and printed["train"]["overflow_guard"] is True
    assert config_from_dict(printed).to_dict() == cfg.to_dict()
    with pytest.raises(ConfigError, match="pmod.overflow_guard is not a training key.*train.overflow_guard=true"):
        load_recipe("pmod-llava-next-7b-sft", ["pmod.overflow_guard=true"])
    assert main(["train", "--config", "pmod-llava-next-7b-sft", "pmod.overflow_guard=false", "--print-config"]) == 2
    assert "train.overflow_guard" in capsys.readouterr().err


def test_label_follows_pmod_overrides():
    from pmod_bench.train.config import variant_label

    assert load_recipe("pmod-llava-next-7b-sft", ["pmod.shift=0.4"]).label == "llava-next-7b/p-MoD-0.4"
    assert load_recipe("pmod-llava-next-7b-sft", ["pmod=null"]).label == "llava-next-7b/baseline"
    assert load_recipe("llava-1.5-7b-sft", ["pmod={shift: 0.3}"]).label == "llava-v1.5-7b/p-MoD-0.3"
    # the variant is the configuration's one display name, PMoDConfig.spec() (the report matches on pmod data)
    odd = load_recipe("pmod-llava-next-7b-sft", ["pmod.string=false"]).label
    assert odd == "llava-next-7b/pmod:string=false"
    assert load_recipe("pmod-llava-next-7b-sft", ["pmod.max_ratio=0.9"]).label == "llava-next-7b/p-MoD-0.5-max0.9"
    assert variant_label(None) == "baseline"
    for cfg in (PMoDConfig(string=False), PMoDConfig(ratios=[1.0] * 8 + [0.5] * 24), PMoDConfig(weight_norm="none")):
        assert variant_label(cfg) == cfg.spec()
    assert load_recipe("pmod-llava-next-7b-sft", ["pmod.shift=0.4", "label=mine"]).label == "mine"
    assert load_recipe("pmod-llava-next-7b-sft", ["train.lr=1e-5"]).label == "llava-next-7b/p-MoD-0.5"
    assert load_recipe("pmod-llava-next-7b-sft", ["pmod.shift=0.5"]).label == "llava-next-7b/p-MoD-0.5"  # unchanged
    assert variant_label(PMoDConfig(schedule="linear", shift=0.4)) == "p-MoD-linear-0.4"
    matching = pytest.importorskip("pmod_bench.reports.matching")
    assert matching.parse_label("llava-next-7b/p-MoD-0.4").variant == "p-MoD-0.4"


def test_batch_split_errors_name_a_value_that_works():
    from pmod_bench.train.config import valid_per_device_batch
    from pmod_bench.train.trainer import check_batch

    demo = load_recipe("demo-tiny")  # global 4, per device 4
    assert check_batch(demo, 1) == 1
    with pytest.raises(ConfigError, match=r"= 4 x 2; pass train.per_device_batch_size=2 \(gradient accumulation"):
        check_batch(demo, 2)
    with pytest.raises(ConfigError, match="cannot be split over 3 processes"):
        check_batch(demo, 3)
    sft = load_recipe("pmod-llava-next-7b-sft")  # 128 = 8 per device x 8 GPUs x 2
    assert check_batch(sft, 8) == 2 and valid_per_device_batch(128, 6, 8) is None
    assert valid_per_device_batch(128, 16, 16) == 8 and valid_per_device_batch(4, 2, 4) == 2
