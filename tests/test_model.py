"""The p-MoD model: schedules, config validation, exactness against a plain masked reference,
KV cache, generation, batching, save/load, gradients, overflow guard, overrides, introspection."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import make_inputs
from pmod_bench import PMoDConfig, prd_ratios
from pmod_bench.model.cache import PMoDCacheLayer, output_cache
from pmod_bench.model.layer import PMoDLayerMixin
from pmod_bench.model.plan import PMoDOverflowError
from pmod_bench.model.modeling import to_pmod
from pmod_bench.model.presets import random_routers


# ----------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("delta", [0.3, 0.4, 0.5])
def test_prd_ratios_match_method(delta):
    L = 32
    got = prd_ratios(L, shift=delta)
    for l, r in enumerate(got):
        raw = delta + 0.5 * math.cos(math.pi * l / (L - 1))
        expected = 1.0 if raw > 0.85 else max(raw, 0.15)
        assert r == pytest.approx(expected, abs=1e-12)
    if delta == 0.5:
        assert got[:8] == [1.0] * 8 and all(r < 1.0 for r in got[8:])
    if delta == 0.3:
        assert got[0] < 1.0  # layer 0 is itself a p-MoD layer
    assert min(got) == 0.15


def test_schedules_and_matched_means():
    from pmod_bench.model.schedules import match_shift, mean_retention

    L = 32
    assert mean_retention(prd_ratios(L)) == pytest.approx(0.5375)
    lin = prd_ratios(L, "linear", 0.5)
    assert lin[0] == 1.0 and lin[-1] == 0.15 and all(a >= b for a, b in zip(lin, lin[1:]))
    assert set(prd_ratios(L, "constant", 0.54)) == {0.54}
    inter = prd_ratios(L, "interleaved", 0.08, min_ratio=0.05)
    assert inter[0::2] == [1.0] * 16 and inter[1::2] == [0.08] * 16
    stepped = prd_ratios(L, "stepped", 0.5)
    assert len(set(stepped)) <= 4 and mean_retention(stepped) == pytest.approx(mean_retention(prd_ratios(L)), abs=0.02)
    target = mean_retention(prd_ratios(L))
    for schedule in ("linear", "constant"):
        d = match_shift(schedule, L, target)
        assert mean_retention(prd_ratios(L, schedule, d)) == pytest.approx(target, abs=0.01)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(shift=0.0), "(0, 1.5]"),
        (dict(shift=1.6), "(0, 1.5]"),
        (dict(min_ratio=0.9, max_ratio=0.5), "must not exceed"),
        (dict(schedule="cosin"), "did you mean 'cosine'"),
        (dict(schedule="zigzag"), "Allowed: cosine, linear, constant, interleaved, stepped"),
        (dict(weight_norm="relu"), "Allowed: tanh, softmax"),
        (dict(ratios=[0.5, 1.2]), "(0, 1]"),
    ],
)
def test_config_validation_names_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=None) as err:
        PMoDConfig(**kwargs)
    assert message in str(err.value)


def test_config_roundtrip_and_reference_strings():
    cfg = PMoDConfig(shift=0.4, weight_norm="softmax")
    assert PMoDConfig.from_dict(cfg.to_dict()) == cfg
    assert (cfg.norm_scale, cfg.norm_bias) == (1.0, 1.0)
    ref = PMoDConfig.from_reference("shiftedcos_decay_0.85_0.15", 0.5, "tanh_0.2_1")
    assert ref == PMoDConfig()
    with pytest.raises(ValueError, match="unknown p-MoD config keys"):
        PMoDConfig.from_dict({"shfit": 0.5})


# ----------------------------------------------------------------- text forms (one parser each)
def test_one_parser_reads_every_ratio_form():
    from pmod_bench.model.config import format_ratios, parse_ratios

    want = [1.0, 1.0, 0.5]
    for form in ("1*2,0.5", "[1,1,0.5]", "1;1;0.5", "1 1 0.5", " [1, 1, 0.5] ", "1*2;0.5", [1, 1, 0.5], (1, "1", 0.5)):
        assert parse_ratios(form) == want, form
    ratios = [1.0] * 8 + [0.8, 0.7] + [0.15] * 22
    assert format_ratios(ratios) == "1*8,0.8,0.7,0.15*22" and parse_ratios(format_ratios(ratios)) == ratios
    assert parse_ratios(format_ratios(ratios, sep=";")) == ratios


@pytest.mark.parametrize(
    "value, message",
    [("1,abc", "'abc' is not a number"), ("1,1.2", "1.2 is outside (0, 1]"), ("0.5*0", "repeat count"),
     ("", "none given"), ("[]", "none given"), ("1,nan", "outside (0, 1]"), ([1, 0], "outside (0, 1]")],
)
def test_bad_ratios_are_one_line_naming_the_fix(value, message):
    from pmod_bench.model.config import SpecError, parse_ratios

    with pytest.raises(SpecError) as err:
        parse_ratios(value, what="--ratios")
    text = str(err.value)
    assert "\n" not in text and message in text
    assert text.startswith(f"--ratios {value!r}: expected one retention ratio in (0, 1] per layer, e.g. 1*8,0.5*24")


def test_one_parser_reads_every_variant_spec():
    from pmod_bench.model.config import parse_pmod_spec

    forms = {
        "p-MoD-0.4": PMoDConfig(shift=0.4),
        "p-mod-cosine-0.4": PMoDConfig(shift=0.4),
        "p-MoD-linear-0.4": PMoDConfig(schedule="linear", shift=0.4),
        "pmod-prd-0.3": PMoDConfig(shift=0.3),
        "p-MoD-0.5-max0.9-min0.1": PMoDConfig(max_ratio=0.9, min_ratio=0.1),
        "p-MoD-stepped-0.5-steps2": PMoDConfig(schedule="stepped", steps=2),
        "pmod": PMoDConfig(),
        "p-MoD": PMoDConfig(),
        "pmod:shift=0.4,schedule=linear": PMoDConfig(schedule="linear", shift=0.4),
        "p_mod:weight_norm=none,string=false": PMoDConfig(weight_norm="none", string=False),
        "pmod:ratios=1*2;0.5,norm_scale=1": PMoDConfig(ratios=[1.0, 1.0, 0.5], norm_scale=1.0),
        "ratios:1*8,0.5*24": PMoDConfig(ratios=[1.0] * 8 + [0.5] * 24),
        "ratios:[1,1,0.5]": PMoDConfig(ratios=[1.0, 1.0, 0.5]),
    }
    for text, cfg in forms.items():
        assert parse_pmod_spec(text) == cfg, text
    for other in ("baseline", "fastv:k=2,keep=0.5", "visionzip", "p-MoD-linear"):
        assert parse_pmod_spec(other) is None, other


def test_spec_reads_back_to_the_same_config():
    from pmod_bench.model.config import parse_pmod_spec

    configs = [PMoDConfig(), PMoDConfig(shift=0.3), PMoDConfig(schedule="linear", shift=0.57),
               PMoDConfig(schedule="stepped", steps=2), PMoDConfig(max_ratio=0.9, min_ratio=0.1),
               PMoDConfig(ratios=[1.0] * 8 + [0.5] * 24), PMoDConfig(weight_norm="none", string=False),
               PMoDConfig(schedule="constant", shift=0.54, weight_norm="shifted_softmax"),
               PMoDConfig(ratios=[1.0, 0.5], string=False, router_bias=False), PMoDConfig(norm_scale=1.0)]
    for cfg in configs:
        assert parse_pmod_spec(cfg.spec()) == cfg, cfg.spec()
    assert [c.spec() for c in configs[:7]] == [
        "p-MoD-0.5", "p-MoD-0.3", "p-MoD-linear-0.57", "p-MoD-stepped-0.5-steps2", "p-MoD-0.5-max0.9-min0.1",
        "ratios:1*8,0.5*24", "pmod:weight_norm=none,string=false"]
    assert PMoDConfig(overflow_guard=True).spec() == "p-MoD-0.5"  # a debugging switch, not part of the variant


@pytest.mark.parametrize(
    "text, message",
    [("p-MoD-2.5", "shift (delta) must be in (0, 1.5]"), ("p-MoD-zigzag-0.4", "unknown schedule 'zigzag'"),
     ("pmod:shfit=0.4", "Did you mean 'shift'?"), ("pmod:string=maybe", "must be true or false"),
     ("pmod:steps=2.5", "whole number"), ("pmod:shift=abc", "must be a number"),
     ("pmod:ratios=1,0.5", "separate ratios with ';'"), ("ratios:1,abc", "'abc' is not a number"),
     ("ratios:", "none given"), ("pmod:shift=0.4,shift=0.3", "option 'shift' is given twice"),
     ("pmod:=0.4", "bad option '=0.4'")],
)
def test_bad_variant_specs_are_one_line_naming_the_fix(text, message):
    from pmod_bench.model.config import SpecError, parse_pmod_spec

    with pytest.raises(SpecError) as err:
        parse_pmod_spec(text)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_one_parser_reads_the_reference_decay():
    from pmod_bench.model.config import parse_reference_decay
    from pmod_bench.model.convert import reference_layer_ratios

    assert parse_reference_decay("shiftedcos_decay_0.85_0.15") == ("shiftedcos", 0.85, 0.15)
    assert parse_reference_decay("shiftedlinear_decay_1_0.1") == ("shiftedlinear", 1.0, 0.1)
    assert parse_reference_decay("deep_all") is None and parse_reference_decay(None) is None
    for spec in ("shiftedcos_decay_0.85_0.15", "shiftedlinear_decay_0.85_0.15", "deep_all", "interleave"):
        cfg = {"mod_target_layers": spec, "mod_router_factor": 0.5}
        ref = PMoDConfig.from_reference(spec, 0.5, num_layers=32)
        assert ref.layer_ratios(32) == pytest.approx(reference_layer_ratios(cfg, 32)), spec


# ------------------------------------------------------------------------------ exactness
def _vanilla_logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_intact_at_insertion(host, host_vanilla):
    inputs = host.inputs()
    ref = _vanilla_logits(host_vanilla, inputs)
    L = host_vanilla.config.text_config.num_hidden_layers
    # every ratio 1: no layer routes
    same = to_pmod(host_vanilla, PMoDConfig(ratios=[1.0] * L))
    assert not same.pmod_layers
    assert (_vanilla_logits(same, inputs) - ref).abs().max() <= 1e-5
    # routers in place (zero-initialised) at ratio 1: TanhNorm weight is exactly 1, logits unchanged
    model = to_pmod(host_vanilla, PMoDConfig())
    model.set_pmod_ratios(ratios=[1.0] * L)
    assert model.pmod_layers
    target = host.vision(model, inputs["input_ids"])
    for layer in model.pmod_layers.values():
        r = layer.router(torch.randn(2, 5, 64)).squeeze(-1)
        assert torch.equal(layer.router.weights(r, torch.ones_like(r, dtype=torch.bool)), torch.ones_like(r))
    assert (_vanilla_logits(model, inputs) - ref).abs().max() <= 1e-5
    assert target.any()
    # the p-MoD model shares the vanilla tensors (no copy)
    assert model.lm_head.weight.data_ptr() == host_vanilla.lm_head.weight.data_ptr()


def masked_reference_logits(model, inputs, string=True):
    """METHOD.md written plainly: full-length tensors, skipped tokens masked out of attention."""
    captured = {}

    def grab(module, args, kwargs):
        captured.update(kwargs)

    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    x = captured["inputs_embeds"]
    B, N, _ = x.shape
    pos = captured.get("position_ids")
    if model.host.position_rows == 3:  # M-RoPE: the three rows the text model derives (Qwen2.5-VL)
        from pmod_bench.model.hosts.qwen2_5_vl import mrope_position_ids

        pos = mrope_position_ids(captured)
    elif pos is None:
        pos = torch.arange(N)[None].expand(B, N)
    pad = inputs["attention_mask"].bool()
    target = model.host.vision_mask(model.config, inputs["input_ids"])
    cos_sin = lm.rotary_emb(x, position_ids=pos)
    causal = torch.tril(torch.ones(N, N, dtype=torch.bool))
    eye = torch.eye(N, dtype=torch.bool)
    with torch.no_grad():
        for layer in lm.layers:
            routed = isinstance(layer, PMoDLayerMixin)
            if routed:
                r = layer.router(x).squeeze(-1)
                w = 0.2 * torch.tanh(r) + 1.0
                selected = torch.zeros(B, N, dtype=torch.bool)
                for b in range(B):
                    V = int(target[b].sum())
                    k = int(np.trunc(np.float32(V) * np.float32(layer.ratio)))
                    pos_t = target[b].nonzero().squeeze(-1)
                    top = r[b, pos_t].topk(k).indices
                    selected[b, pos_t[top]] = True
                P = selected | (~target & pad)
            else:
                P = pad.clone()
            allowed = (P[:, None, :] & causal[None]) | eye[None]  # (B, N, N); every row sees itself
            mask = torch.zeros(B, 1, N, N).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
            h, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), attention_mask=mask, position_embeddings=cos_sin)
            h = x + h
            u = layer.mlp(layer.post_attention_layernorm(h))
            if routed:
                out = torch.where(target[..., None], w[..., None] * x if string else x, x)  # skipped vision tokens
                out = torch.where((selected)[..., None], h + w[..., None] * u, out)
                out = torch.where((P & ~target)[..., None], h + u, out)
            else:
                out = h + u
            x = out
        return model.lm_head(lm.norm(x))


@pytest.mark.parametrize("shift, string", [(0.5, True), (0.3, True), (0.8, True), (0.5, False)])
def test_gather_scatter_equals_masked_reference(host, host_vanilla, shift, string):
    inputs = host.inputs(sizes=[(64, 48), (160, 160)])  # two images, different token counts
    assert (inputs["attention_mask"] == 0).any(), "batch must be left-padded"
    model = to_pmod(host_vanilla, PMoDConfig(shift=shift, string=string))
    random_routers(model, seed=1)
    got = _vanilla_logits(model, inputs)
    ref = masked_reference_logits(model, inputs, string=string)
    valid = inputs["attention_mask"].bool()
    assert (got - ref)[valid].abs().max() < 1e-4
    assert (got - _vanilla_logits(host_vanilla, inputs))[valid].abs().max() > 1e-3  # routing really changed something


def test_eager_equals_sdpa(host, host_vanilla):
    inputs = host.inputs(sizes=[(64, 48), (160, 160)])
    model = to_pmod(host_vanilla, PMoDConfig(shift=0.4))
    random_routers(model)
    sdpa = _vanilla_logits(model, inputs)
    model.set_attn_implementation("eager")
    try:
        eager = _vanilla_logits(model, inputs)
    finally:
        model.set_attn_implementation("sdpa")
    valid = inputs["attention_mask"].bool()
    assert (sdpa - eager)[valid].abs().max() < 1e-4


# ------------------------------------------------------------------------- cache and decode
@pytest.mark.parametrize("shift", [0.5, 0.3])
def test_cached_decode_equals_recompute(host, host_vanilla, shift):
    inputs = host.inputs(sizes=[(64, 48), (160, 160)])
    model = to_pmod(host_vanilla, PMoDConfig(shift=shift))
    random_routers(model, seed=2)
    if shift == 0.3:
        assert 0 in model.pmod_layers
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        full = model(**host.full_inputs(inputs, out.sequences), use_cache=False).logits
    for t, step_logits in enumerate(out.logits):
        assert (step_logits - full[:, n - 1 + t]).abs().max() < 1e-4, f"decode step {t}"


def test_kv_lengths_equal_tokens_processed(host, host_vanilla):
    inputs = host.inputs(sizes=[(64, 48), (160, 160)])
    model = to_pmod(host_vanilla, PMoDConfig(shift=0.3))
    random_routers(model)
    with torch.no_grad(), model.record_routing() as rec:
        out = model(**inputs, use_cache=True)
    cache = output_cache(out)
    pad = inputs["attention_mask"].bool()
    target = host.vision(model, inputs["input_ids"])
    n = inputs["input_ids"].shape[1]
    for i, layer in enumerate(cache.layers):
        if i in model.pmod_layers:
            assert isinstance(layer, PMoDCacheLayer)
            processed = (rec[i]["selected"] | (~target & pad)).sum(dim=1)  # (B,)
            per_sample = layer.valid.sum(dim=1) if layer.valid is not None else torch.full((2,), layer.stored_tokens)
            assert per_sample.tolist() == processed.tolist()
            assert layer.stored_tokens == int(processed.max()) < n
            assert layer.get_seq_length() == n  # full-sequence length for HF's position / mask bookkeeping
            V = target.sum(dim=1)
            k = [int(np.trunc(np.float32(v) * np.float32(model.pmod_layers[i].ratio))) for v in V.tolist()]
            assert rec[i]["selected"].sum(dim=1).tolist() == k
        else:
            assert layer.keys.shape[-2] == n
    vanilla_entries = 2 * n * len(cache.layers)  # batch of 2, every layer caches every position
    assert sum(model.kv_cache_entries(cache)) < vanilla_entries


def test_batched_equals_one_by_one(host, host_vanilla):
    model = to_pmod(host_vanilla, PMoDConfig(shift=0.4))
    random_routers(model, seed=3)
    sizes = [(64, 48), (40, 90), (160, 160)]
    batch = host.inputs(sizes=sizes)
    with torch.no_grad():
        together = model.generate(**batch, max_new_tokens=5, do_sample=False)[:, batch["input_ids"].shape[1]:]
    for i, size in enumerate(sizes):
        single = host.inputs(sizes=[size], questions=[["What is shown in the image?", "Is there a red circle? Answer yes or no."][i % 2]])
        with torch.no_grad():
            alone = model.generate(**single, max_new_tokens=5, do_sample=False)[:, single["input_ids"].shape[1]:]
        assert together[i].tolist() == alone[0].tolist()
    # first-step logits of the batch equal the single-sample ones
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True)
        for i, size in enumerate(sizes):
            single = host.inputs(sizes=[size], questions=[["What is shown in the image?", "Is there a red circle? Answer yes or no."][i % 2]])
            one = model.generate(**single, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True)
            assert (out.logits[0][i] - one.logits[0][0]).abs().max() < 1e-4


def test_sampling_generate(host, host_vanilla):
    model = to_pmod(host_vanilla, PMoDConfig(shift=0.3))
    random_routers(model)
    inputs = host.inputs(sizes=[(64, 48), (160, 160)])
    torch.manual_seed(0)
    with torch.no_grad():
        a = model.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=20, temperature=1.0)
    torch.manual_seed(0)
    with torch.no_grad():
        b = model.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=20, temperature=1.0)
    assert a.shape[1] == inputs["input_ids"].shape[1] + 6 and torch.equal(a, b)


def test_static_cache_is_refused_with_a_clear_error(host, host_vanilla):
    from transformers import StaticCache

    model = to_pmod(host_vanilla, PMoDConfig())
    inputs = host.inputs()
    cache = StaticCache(config=model.config.text_config, max_cache_len=512)
    with pytest.raises(TypeError, match="DynamicCache"), torch.no_grad():
        model(**inputs, past_key_values=cache, use_cache=True)


# --------------------------------------------------------------------------- save / load
def test_save_load_roundtrip(tmp_path, host, host_vanilla):
    import pmod_bench

    pmod_bench.register()
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    model = to_pmod(host_vanilla, PMoDConfig(shift=0.4, weight_norm="tanh"))
    random_routers(model, seed=4)
    model.save_pretrained(tmp_path)
    host.processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert cfg.model_type == "pmod_" + host.name and cfg.pmod_config.shift == 0.4
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(loaded).__name__ == model.host.pmod_class.__name__ == type(model).__name__
    assert all(isinstance(l.router, torch.nn.Linear) and l.router.out_features == 1 for l in loaded.pmod_layers.values())
    assert sorted(loaded.pmod_layers) == sorted(model.pmod_layers)
    for i, layer in model.pmod_layers.items():
        assert torch.equal(loaded.pmod_layers[i].router.weight, layer.router.weight)
    inputs = make_inputs(AutoProcessor.from_pretrained(tmp_path), sizes=[(64, 48), (160, 160)])
    valid = inputs["attention_mask"].bool()
    assert (_vanilla_logits(loaded, inputs) - _vanilla_logits(model, inputs))[valid].abs().max() < 1e-5


def test_vanilla_checkpoint_into_pmod_class_gets_zero_routers(tmp_path, host, host_vanilla):
    from pmod_bench.model.hosts import host_for
    from pmod_bench.model.modeling import pmod_config_from

    adapter = host_for(host_vanilla)
    host_vanilla.save_pretrained(tmp_path)
    cfg = pmod_config_from(host_vanilla.config, PMoDConfig())
    assert isinstance(cfg, adapter.pmod_config_class)
    model = adapter.pmod_class.from_pretrained(tmp_path, config=cfg)
    for layer in model.pmod_layers.values():
        assert torch.count_nonzero(layer.router.weight) == 0 and torch.count_nonzero(layer.router.bias) == 0


# --------------------------------------------------------------------------- training
def test_training_loss_and_router_gradients(host, host_vanilla):
    inputs = host.inputs(sizes=[(64, 48), (160, 160)])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    for string in (True, False):
        model = to_pmod(host_vanilla, PMoDConfig(shift=0.5, string=string))
        random_routers(model, seed=5)
        model.train()
        out = model(**inputs, labels=labels)
        assert torch.isfinite(out.loss) and out.loss.item() > 0
        model.zero_grad(set_to_none=True)
        out.loss.backward()
        assert all(l.router.weight.grad is not None and l.router.weight.grad.abs().sum() > 0 for l in model.pmod_layers.values())

        # gradient that reaches a router only through the skipped tokens of its layer
        idx = max(model.pmod_layers)
        layer = model.pmod_layers[idx]
        grabbed = {}
        h = layer.register_forward_hook(lambda m, a, kw_out: grabbed.setdefault("out", kw_out))
        with model.record_routing() as rec:
            model.zero_grad(set_to_none=True)
            model(**inputs)
        h.remove()
        skipped = rec[idx]["target"] & ~rec[idx]["selected"]
        assert skipped.any()
        grabbed["out"][skipped].sum().backward()
        g = layer.router.weight.grad
        if string:
            assert g is not None and g.abs().sum() > 0
        else:
            assert g is None or g.abs().sum() == 0
        model.zero_grad(set_to_none=True)
    host_vanilla.eval()


def test_overflow_guard_names_layer_and_tensor(host, host_vanilla):
    inputs = host.inputs()
    model = to_pmod(host_vanilla, PMoDConfig(overflow_guard=True))
    layer_idx = min(model.pmod_layers)
    layer = model.pmod_layers[layer_idx]
    saved = layer.mlp.down_proj.weight.detach().clone()
    try:
        with torch.no_grad():
            layer.mlp.down_proj.weight[0, 0] = float("inf")
            with pytest.raises(PMoDOverflowError, match=rf"layer {layer_idx} \(mlp output"):
                model(**inputs)
            model.set_pmod_ratios(overflow_guard=False)
            assert not torch.isfinite(model(**inputs).logits).all()  # guard off: nothing raised
    finally:
        with torch.no_grad():
            layer.mlp.down_proj.weight.copy_(saved)


# ---------------------------------------------------------------- overrides, introspection
def test_inference_time_overrides(host, host_vanilla):
    model = to_pmod(host_vanilla, PMoDConfig(shift=0.5))
    random_routers(model)
    trained = sorted(model.pmod_layers)
    ratios = model.set_pmod_ratios(shift=0.45)
    assert ratios == prd_ratios(8, shift=0.45) and model.layer_ratios() == ratios
    with pytest.raises(ValueError, match="no trained router"):
        model.set_pmod_ratios(shift=0.3)
    explicit = [1.0, 1.0, 0.5, 0.5, 0.3, 0.3, 0.2, 0.2]
    assert model.set_pmod_ratios(ratios=explicit) == explicit
    inputs = host.inputs()
    with torch.no_grad(), model.record_routing() as rec:
        model(**inputs)
    V = int(host.vision(model, inputs["input_ids"]).sum())
    assert {i: int(r["selected"].sum()) for i, r in rec.items()} == {
        i: int(np.trunc(np.float32(V) * np.float32(explicit[i]))) for i in trained
    }
    model.set_pmod_ratios(shift=0.3, allow_untrained_routers=True)
    assert 0 in model.pmod_layers


def test_llava15_and_other_llm_families(tiny_processor):
    """LLaVA-1.5 shape, and Mistral / Qwen2 language models behind LLaVA-NeXT."""
    from transformers import LlavaNextForConditionalGeneration

    from pmod_bench.model.presets import build_preset, preset_config

    model15, proc15 = build_preset("tiny-llava", pmod=PMoDConfig(shift=0.3))
    random_routers(model15)
    inputs = make_inputs(proc15)
    with torch.no_grad():
        assert model15.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 3
    for family in ("mistral", "qwen2"):
        cfg = preset_config("tiny")
        text = cfg.text_config.to_dict()
        text.update(model_type=family, sliding_window=None)
        cfg_dict = cfg.to_dict()
        cfg_dict["text_config"] = text
        cfg_dict.pop("model_type")
        torch.manual_seed(0)
        vanilla = LlavaNextForConditionalGeneration(type(cfg)(**cfg_dict)).eval()
        model = to_pmod(vanilla, PMoDConfig(shift=0.4))
        random_routers(model)
        batch = make_inputs(tiny_processor, sizes=[(64, 48), (96, 96)])
        ref = masked_reference_logits(model, batch)
        got = _vanilla_logits(model, batch)
        assert (got - ref)[batch["attention_mask"].bool()].abs().max() < 1e-4, family
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=3, do_sample=False)


def test_import_is_light():
    code = "import sys, pmod_bench; bad=[m for m in ('torch','transformers','lmms_eval','matplotlib','pandas','deepspeed','pynvml') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow  # four fresh interpreters importing transformers
@pytest.mark.parametrize(
    "imports",
    [
        "from transformers import LlavaNextConfig, AutoModelForImageTextToText\nimport pmod_bench",
        "import pmod_bench\npmod_bench.register()",
        "import pmod_bench\nfrom pmod_bench import to_pmod",  # importing the model module registers
        "import pmod_bench\nfrom transformers import AutoConfig",  # armed at import, registered on Auto
    ],
)
def test_registration_rule(imports):
    """Registered whatever the import order (pmod_bench/_autoregister.py); no UserWarning on the way."""
    code = imports + (
        "\nfrom transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
        "import sys; sys.exit(0 if ('pmod_llava_next' in CONFIG_MAPPING and 'pmod_llava' in CONFIG_MAPPING) else 3)\n"
    )
    out = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.slow
def test_demo_cli_prints_per_layer_table():
    out = subprocess.run([sys.executable, "-m", "pmod_bench.cli", "demo", "--max-new-tokens", "2"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "KV-cache entries" in out.stdout and "ratio" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "pmod_bench.cli", "demo", "--image-size", "12by5"], capture_output=True, text=True)
    assert bad.returncode == 2 and "WIDTHxHEIGHT" in bad.stderr


def test_beam_search_and_gradient_checkpointing(host, host_vanilla):
    model = to_pmod(host_vanilla, PMoDConfig(shift=0.3))
    random_routers(model)
    inputs = host.inputs(sizes=[(64, 48), (160, 160)])
    with torch.no_grad():  # beam search reorders the per-layer caches (and their validity masks)
        out = model.generate(**inputs, max_new_tokens=4, num_beams=3, do_sample=False)
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    assert len(hidden) == model.config.text_config.num_hidden_layers + 1  # p-MoD layers are captured too
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        model(**inputs, labels=labels).loss.backward()
        assert all(l.router.weight.grad.abs().sum() > 0 for l in model.pmod_layers.values())
    finally:
        model.gradient_checkpointing_disable()
        model.zero_grad(set_to_none=True)
        model.eval()


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_cuda_bf16_generate_is_finite(tiny_processor, attn):
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn")
    from pmod_bench.model.presets import build_preset

    vanilla, _ = build_preset("tiny", pmod=None, dtype=torch.bfloat16, attn_implementation=attn)
    model = to_pmod(vanilla.cuda(), PMoDConfig(shift=0.3))
    random_routers(model)
    inputs = {k: v.cuda() for k, v in make_inputs(tiny_processor, sizes=[(64, 48), (96, 96)]).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.isfinite(torch.stack(out.logits)).all()


def test_override_saved_and_reloaded(tmp_path, host, host_vanilla):
    from transformers import AutoModelForImageTextToText

    model = to_pmod(host_vanilla, PMoDConfig(shift=0.5))
    random_routers(model)
    ratios = model.set_pmod_ratios(shift=0.6)  # some trained router layers now keep every token
    assert 1.0 in [ratios[i] for i in model.pmod_layers]
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert sorted(loaded.pmod_layers) == sorted(model.pmod_layers) and loaded.layer_ratios() == ratios
    for i, layer in model.pmod_layers.items():
        assert torch.equal(loaded.pmod_layers[i].router.weight, layer.router.weight)
