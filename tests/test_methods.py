"""Method registry: spec parsing and validation, apply_method on tiny LLaVA-NeXT / LLaVA-1.5 (vanilla and p-MoD),
generate() with the KV cache, batching with different images per sample, load_model(method=...)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pmod_bench.model.cache import output_cache
from pmod_bench.model.compat import cache_kwargs

from conftest import make_inputs
from pmod_bench.methods import (MethodConfig, MethodError, ModelGeometry, apply_method, available_methods, get_method,
                                method_dict, parse_method_spec)

SPECS = ["visionzip:dominant=6,contextual=3", "fastervlm:keep=0.5", "prumerge", "prumerge_plus",
         "downsample:keep=0.25", "random:keep=0.5"]
SIZES = ((64, 48), (40, 70))  # two aspect ratios: 2x1 and 1x2 tile grids -> different token counts per sample


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _tiny(pmod=False):
    import pmod_bench.model.modeling  # noqa: F401  (registers the p-MoD classes)
    from pmod_bench.model.presets import build_preset, random_routers

    model, _ = build_preset("tiny", pmod="default" if pmod else None)
    if pmod:
        random_routers(model)
    return model


# ------------------------------------------------------------------------------------- registry
def test_registry_names_stages_and_roundtrip():
    methods = available_methods()
    vision = {"visionzip", "fastervlm", "prumerge", "prumerge_plus", "downsample", "random"}
    llm = {"fastv", "pyramiddrop", "sparsevlm", "random_llm", "vtw"}
    assert vision | llm <= set(methods)
    for name, cls in methods.items():
        assert cls.name == name and cls.stage in ("vision", "llm")
        assert cls.stage == "vision" if name in vision else (cls.stage == "llm" if name in llm else True)
        cfg = cls()
        d = cfg.to_dict()
        assert d["method"] == name and MethodConfig.from_dict(d) == cfg and cls.from_dict(d) == cfg
        assert parse_method_spec(cfg.spec()) == cfg
        for f in dataclasses.fields(cls):  # every option is documented
            assert f.name in cls.describe_keys()
    assert get_method("PruMerge-Plus") is methods["prumerge_plus"]


def test_spec_parser_types_and_overrides():
    cfg = parse_method_spec("visionzip:dominant=54,contextual=10")
    assert (cfg.dominant, cfg.contextual) == (54, 10)
    assert parse_method_spec("fastervlm", tokens=29).tokens == 29
    assert parse_method_spec("prumerge:ratio=none").ratio is None
    assert parse_method_spec({"method": "random", "keep": 0.5}).keep == 0.5
    assert method_dict("downsample:grid_h=2,grid_w=3") == {"method": "downsample", "keep": 0.25, "grid_h": 2, "grid_w": 3,
                                                           "max_pixels": None}
    assert method_dict(None) is None


@pytest.mark.parametrize("spec, message", [
    ("visionzp", "unknown method 'visionzp'. Did you mean 'visionzip'?"),
    ("visionzip:dominnat=3", "unknown option 'dominnat' (did you mean 'dominant'?)"),
    ("fastervlm:keep=1.5", "fastervlm: keep must be in (0, 1], got 1.5."),
    ("fastervlm:keep=0", "fastervlm: keep must be in (0, 1], got 0.0."),
    ("visionzip:dominant=2.5", "visionzip: dominant must be an integer, got '2.5'."),
    ("prumerge:ratio=abc", "prumerge: ratio must be a number, got 'abc'."),
    ("random:keep", "bad option 'keep'"),
    ("random:keep=0.5,keep=0.4", "option 'keep' is given twice"),
    ("downsample:grid_h=3", "give both grid_h and grid_w"),
    ("", "empty method spec"),
])
def test_spec_parser_errors(spec, message):
    with pytest.raises(MethodError) as exc:
        parse_method_spec(spec)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_method_specs_and_pmod_specs_share_one_splitter(monkeypatch):
    """parse_method_spec reads NAME:key=value,... with the model library's split_spec (no splitter of its own)."""
    from pmod_bench.methods import base
    from pmod_bench.model import config as spec

    assert spec.split_spec(" FastV: K = 2 ,, keep=0.5 ") == ("FastV", {"k": "2", "keep": "0.5"})
    assert parse_method_spec(" FastV: K = 2 ,, keep=0.5 ").to_dict() == {"method": "fastv", "k": 2, "keep": 0.5}
    seen = []
    monkeypatch.setattr(base, "split_spec", lambda text, **kw: seen.append(text) or spec.split_spec(text, **kw))
    assert parse_method_spec("fastv:k=3").k == 3 and seen == ["fastv:k=3"]
    with pytest.raises(MethodError, match=r"expected key=value, e.g. fastv:k=\.\.\.$"):
        parse_method_spec("fastv:k")  # the splitter's SpecError, as a MethodError with the method's example


def test_model_limits_checked_on_apply():
    model = _tiny()
    geometry = ModelGeometry.from_config(model.config)
    assert (geometry.patches, geometry.feature_index, geometry.anyres) == (16, 1, True)
    for spec, message in [("visionzip:dominant=15,contextual=5", "dominant + contextual must be in [1, 17]"),
                          ("fastervlm:tokens=17", "tokens must be in [1, 16]"),
                          ("downsample:grid_h=5,grid_w=4", "grid_h and grid_w must be in [1, 4]")]:
        with pytest.raises(MethodError, match=__import__("re").escape(message)):
            apply_method(model, spec)
    assert type(model).__name__ == "LlavaNextForConditionalGeneration"  # a refused method leaves the model as it was
    with pytest.raises(MethodError, match="LlavaForConditionalGeneration"):
        apply_method(torch.nn.Linear(2, 2), "random")


def test_apply_and_remove_keeps_weights_and_class():
    model = _tiny()
    before = {k: v for k, v in model.state_dict().items()}
    apply_method(model, "fastervlm")
    assert isinstance(model, __import__("transformers").LlavaNextForConditionalGeneration)
    assert model.model.vision_tower.config._attn_implementation == "eager"
    assert model.method_config.to_dict() == {"method": "fastervlm", "keep": 0.25, "tokens": None}
    assert all(v is before[k] or torch.equal(v, before[k]) for k, v in model.state_dict().items())
    apply_method(model, None)
    assert type(model).__name__ == "LlavaNextForConditionalGeneration" and not hasattr(model, "method_config")


# ------------------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("pmod", [False, True], ids=["vanilla", "pmod"])
def test_generate_cache_batch(spec, pmod, tiny_processor):
    """generate() == greedy full recompute without cache; batch of 2 (different images) == each alone."""
    model = apply_method(_tiny(pmod), spec)
    inputs = make_inputs(tiny_processor, sizes=SIZES)
    n_prompt = inputs["input_ids"].shape[1]
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
        assert torch.equal(gen.sequences[:, :n_prompt], inputs["input_ids"])
        new = gen.sequences[:, n_prompt:]
        # full recompute: the prompt + generated tokens, one forward without a cache
        full = dict(inputs, input_ids=gen.sequences[:, :-1],
                    attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(new[:, :-1])], 1))
        logits = model(**full, use_cache=False).logits
        step_logits = torch.stack(gen.logits, 1)                              # (B, 3, V)
        torch.testing.assert_close(logits[:, -3:], step_logits, atol=2e-4, rtol=1e-4)
        assert torch.equal(logits[:, -3:].argmax(-1), new)
        for b in range(2):  # batched == per-sample
            one = make_inputs(tiny_processor, sizes=SIZES[b:b + 1], questions=None if b == 0 else
                              ["Is there a red circle? Answer yes or no."])
            g1 = model.generate(**one, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
            assert torch.equal(g1.sequences[0, one["input_ids"].shape[1]:], new[b])
            torch.testing.assert_close(torch.stack(g1.logits, 1)[0], step_logits[b], atol=2e-4, rtol=1e-4)


def test_pmod_routes_exactly_the_compressed_vision_tokens(tiny_processor):
    model = apply_method(_tiny(pmod=True), "visionzip:dominant=6,contextual=3")
    inputs = make_inputs(tiny_processor, sizes=SIZES[:1])
    mi = model.method_inputs(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"], inputs["attention_mask"])
    with torch.no_grad(), model.record_routing() as rec:
        model(**inputs)
    layer = next(iter(rec.values()))
    assert torch.equal(layer["target"], mi.vision_token_mask)
    tiles = len(mi.images[0].selection)
    assert tiles == 5 and int(mi.vision_token_mask.sum()) == tiles * 9  # 5 tiles x (6 + 3)


def test_manual_decode_with_original_mask_is_refused(tiny_processor):
    model = apply_method(_tiny(), "fastervlm:keep=0.5")
    inputs = make_inputs(tiny_processor, sizes=SIZES[:1])
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        with pytest.raises(MethodError, match="method_inputs"):
            model(input_ids=nxt, **cache_kwargs(model, output_cache(out)),
                  attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], 1))
        mi = model.method_inputs(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"], inputs["attention_mask"])
        step = model(input_ids=nxt, **cache_kwargs(model, output_cache(out)), position_ids=mi.position_ids[:, -1:] + 1,
                     attention_mask=torch.cat([mi.attention_mask, torch.ones_like(nxt)], 1))
        ref = model(**dict(inputs, input_ids=torch.cat([inputs["input_ids"], nxt], 1),
                           attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], 1)))
    torch.testing.assert_close(step.logits[:, -1], ref.logits[:, -1], atol=2e-4, rtol=1e-4)


def test_labels_follow_the_shortened_sequence(tiny_processor):
    model = apply_method(_tiny(), "random:keep=0.25")
    inputs = make_inputs(tiny_processor, sizes=SIZES)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    mi = model.method_inputs(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"], inputs["attention_mask"], labels)
    assert torch.isfinite(out.loss)
    assert int((mi.labels != -100).sum()) == int((labels != -100).sum())   # every text label kept, in order
    assert bool((mi.labels[mi.vision_token_mask] == -100).all())


def test_downsample_at_full_grid_equals_the_vanilla_model(tiny_processor):
    model = _tiny()
    inputs = make_inputs(tiny_processor, sizes=SIZES[:1])
    with torch.no_grad():
        ref = model(**inputs).logits
        apply_method(model, "downsample:keep=1")
        out = model(**inputs).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_llava15_shape(one_thread):
    from pmod_bench.model.presets import build_preset, preset_processor

    model, _ = build_preset("tiny-llava", pmod=None)
    proc = preset_processor("tiny-llava")
    inputs = make_inputs(proc, sizes=SIZES)
    assert ModelGeometry.from_config(model.config).anyres is False
    for spec, n in [("fastervlm:tokens=5", 5), ("visionzip:dominant=4,contextual=2", 6), ("downsample:grid_h=2,grid_w=3", 6)]:
        apply_method(model, spec)
        mi = model.method_inputs(inputs["input_ids"], inputs["pixel_values"], None, inputs["attention_mask"])
        assert [im.features.shape[0] for im in mi.images] == [n, n]
        with torch.no_grad():
            g = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert g.shape == (2, inputs["input_ids"].shape[1] + 2)


def test_load_model_with_method():
    import pmod_bench.model.modeling  # noqa: F401  (registers the p-MoD classes)
    from pmod_bench.model.loading import load_model

    model, _ = load_model("tiny:vanilla", method="fastervlm", method_args={"tokens": 3})
    assert model.method_config.to_dict() == {"method": "fastervlm", "keep": 0.25, "tokens": 3}
    model, _ = load_model("tiny", method="visionzip:dominant=4,contextual=2")
    assert hasattr(model, "pmod_layers") and model.method_config.dominant == 4
    with pytest.raises(MethodError, match="did you mean 'tokens'"):
        load_model("tiny:vanilla", method="fastervlm", method_args={"token": 3})


# ------------------------------------------------------------------------------------- integration
def test_lmms_eval_plugin_method_arg(tiny_processor):
    """model_args method=...: generation and loglikelihood with the shortened prompt; batch 2 == batch 1."""
    from lmms_eval.api.instance import Instance

    from pmod_bench.model.presets import demo_image
    from pmod_bench.tasks.plugin import PMoDLlava

    docs = {"t": {"test": [{"q": "What is shown?", "img": demo_image(64, 48, 1)}, {"q": "Red?", "img": demo_image(40, 70, 2)}]}}

    def lm(batch):
        out = PMoDLlava.from_loaded(_tiny(), tiny_processor, name="tiny", method="fastervlm:tokens=4", batch_size=batch,
                                    device="cpu", max_new_tokens=3)
        out.task_dict = docs
        return out

    def reqs(kind, arg):
        return [Instance(request_type=kind, arguments=(d["q"], arg, lambda d: [d["img"]], i, "t", "test"), idx=0,
                         metadata={"task": "t", "doc_id": i, "repeats": 1}) for i, d in enumerate(docs["t"]["test"])]

    one, two = lm(1), lm(2)
    assert one.describe()["method"] == {"method": "fastervlm", "keep": 0.25, "tokens": 4}
    assert one.identity["method"] == one.describe()["method"]
    assert one.generate_until(reqs("generate_until", {"max_new_tokens": 3})) == two.generate_until(reqs("generate_until", {"max_new_tokens": 3}))
    a, b = one.loglikelihood(reqs("loglikelihood", " yes")), two.loglikelihood(reqs("loglikelihood", " yes"))
    assert [g for _, g in a] == [g for _, g in b]
    assert all(abs(x - y) < 1e-3 for (x, _), (y, _) in zip(a, b))


def test_profile_cli_method_match(tmp_path, capsys):
    import json

    from pmod_bench.cli import main

    out = tmp_path / "p.json"
    rc = main(["profile", "--arch", "llava-next-7b", "--method", "fastervlm", "--method", "visionzip", "--match", "p-MoD-0.5",
               "--no-latency", "--no-verify", "--recipe", "none", "-q", "--json", str(out)])
    assert rc in (0, None)
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    for name in ("fastervlm", "visionzip"):
        r = rows[name]
        assert r["method_config"]["method"] == name and r["method_match"]["rel_err"] <= 0.01
        assert r["method_match"]["target_label"] == "p-MoD-0.5" and r["method_match"]["target_pmod"]["shift"] == 0.5
        assert 0.5 < r["tflops_ratio"] < 0.56 and len(set(r["kept_vision_tokens"])) == 1
    assert rows["visionzip"]["method_extra_tflops"] > 0
    assert main(["profile", "--arch", "llava-next-7b", "--variant", "fastv:k=99", "--no-latency", "-q"]) == 2
    assert "fastv: k must be in [1, 31] for an LLM of 32 layers, got 99." in capsys.readouterr().err


def test_eval_config_method_is_validated_and_in_the_identity(tmp_path):
    from pmod_bench.tasks.runner import EvalConfig

    cfg = EvalConfig(model="tiny", suite="POPE", output=str(tmp_path / "run"), method="fastervlm:keep=0.25,tokens=29")
    assert cfg.method == "fastervlm:tokens=29" and cfg.identity()["method"] == cfg.method
    assert cfg.model_args()["method"] == cfg.method
    with pytest.raises(ValueError, match="did you mean 'keep'"):
        EvalConfig(model="tiny", suite="POPE", output=str(tmp_path / "run"), method="random:kep=0.5")


def test_profile_meta_flop_check_covers_method_rows(tmp_path):
    """FlopCounterMode on the meta device counts a method row's LLM at the method's kept lengths (7B, no
    weights) and agrees with the analytic count; its own products are checked on the tiny models."""
    import json

    from pmod_bench.cli import main

    out = tmp_path / "p.json"
    rc = main(["profile", "--arch", "llava-next-7b", "--method", "fastv", "--method", "visionzip", "--match", "p-MoD-0.5",
               "--no-latency", "--recipe", "none", "-q", "--json", str(out)])
    assert rc in (0, None)
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    for name in ("fastv", "visionzip"):
        assert rows[name]["flops_check_rel_err"] is not None and rows[name]["flops_check_rel_err"] <= 0.01
        assert "kept lengths" in rows[name]["flops_check_tool"]
