"""The p-MoD core's contract with transformers (issue: transformers 5.24 renamed the layers' cache
argument and p-MoD silently cached the wrong tokens): the routing plan and the project's own cache,
decode logits equal across batching and to full recompute, one host sync per forward, ties broken by
position, loud failures where HF changes, config defaults that stay derived."""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import make_inputs
from pmod_bench import PMoDConfig
from pmod_bench.model.cache import PMoDCache, PMoDCacheLayer, output_cache
from pmod_bench.model.compat import HFContractError, cache_argument, check_attention, supported_range
from pmod_bench.model.modeling import to_pmod
from pmod_bench.model.plan import PMoDOverflowError, RoutingPlan
from pmod_bench.model.presets import random_routers

QUESTIONS = ["What is shown in the image?", "Is there a red circle? Answer yes or no.", "Count the shapes."]
SIZES = [(64, 48), (40, 90), (160, 160)]


def _single(host, i):
    return host.inputs(sizes=[SIZES[i]], questions=[QUESTIONS[i]])


def _generate(model, inputs, steps=5):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True)


def _recompute(host, model, inputs, sequences):
    with torch.no_grad():
        return model(**host.full_inputs(inputs, sequences), use_cache=False).logits


# ------------------------------------------------------------------------------ decode logits
@pytest.mark.parametrize("shift", [0.5, 0.3])  # 0.3 routes layer 0 (HF's seq-length layer)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decode_logits_batched_single_and_recompute(host, host_vanilla, one_thread, shift, attn):
    model = to_pmod(host_vanilla, PMoDConfig(shift=shift))
    random_routers(model, seed=5)
    assert (0 in model.pmod_layers) == (shift == 0.3)
    model.set_attn_implementation(attn)
    try:
        batch = host.inputs(sizes=SIZES, questions=QUESTIONS)
        n = batch["input_ids"].shape[1]
        together = _generate(model, batch)
        assert isinstance(output_cache(together), PMoDCache)  # generate() carried the project's cache
        full = _recompute(host, model, batch, together.sequences)
        for t, step in enumerate(together.logits):  # every decode step, every sample: cached == recompute
            assert (step - full[:, n - 1 + t]).abs().max() < 1e-4, f"step {t}"
        for i in range(len(SIZES)):
            single = _single(host, i)
            alone = _generate(model, single)
            assert together.sequences[i, n:].tolist() == alone.sequences[0, single["input_ids"].shape[1]:].tolist()
            for t, (a, b) in enumerate(zip(together.logits, alone.logits)):  # logits, beyond the first step
                assert (a[i] - b[0]).abs().max() < 1e-4, f"sample {i} step {t}"
    finally:
        model.set_attn_implementation("sdpa")


def test_cache_passed_under_either_name(host, host_vanilla, one_thread):
    model = to_pmod(host_vanilla, PMoDConfig(shift=0.3))
    random_routers(model, seed=1)
    inputs = _single(host, 0)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        cache = output_cache(out)
        assert isinstance(cache, PMoDCache) and all(isinstance(cache.layers[i], PMoDCacheLayer) for i in model.pmod_layers)
        nxt = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], dim=1)
        results = []
        for name in ("cache", "past_key_values"):
            c = PMoDCache.take_over(None, model.config.text_config, model.config.pmod_router_layers)
            model(**inputs, **{name: c}, use_cache=True)
            results.append(model(input_ids=nxt, attention_mask=mask, **{name: c}, **host.decode_kwargs(model, mask),
                                 use_cache=True).logits)
        assert torch.equal(results[0], results[1])
        # a filled cache of another kind is refused, with the fix
        from transformers.cache_utils import DynamicCache

        foreign = DynamicCache()
        foreign.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
        with pytest.raises(ValueError, match="PMoDCache"):
            model(input_ids=nxt, attention_mask=mask, cache=foreign, **host.decode_kwargs(model, mask), use_cache=True)


def test_generated_vision_id_is_a_text_token_at_decode(host, host_vanilla, one_thread):
    """A decode step whose token is a generated ``<image>`` / ``<video>`` id carries no pixels, so HF embeds the id as
    text; p-MoD must route nothing there (it once counted the id as a vision token and a routed layer kept 0 tokens:
    ``cannot reshape tensor of 0 elements``). The step equals the same step fed as the id's embedding."""
    from pmod_bench.model.hosts import host_for

    model = to_pmod(host_vanilla, PMoDConfig(shift=0.3))
    random_routers(model, seed=2)
    inputs = _single(host, 0)
    ids = [i for i in (getattr(model.config, "image_token_id", None), getattr(model.config, "video_token_id", None))
           if i is not None]
    assert ids and host_for(model).vision_mask(model.config, torch.tensor([ids])).all()  # vision ids in a prompt
    for vid in ids:
        nxt = torch.tensor([[vid]])
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], dim=1)
        steps = []
        for feed in ({"input_ids": nxt}, {"inputs_embeds": model.get_input_embeddings()(nxt)}):
            cache = PMoDCache.take_over(None, model.config.text_config, model.config.pmod_router_layers)
            with torch.no_grad():
                model(**inputs, cache=cache, use_cache=True)
                steps.append(model(**feed, attention_mask=mask, cache=cache, **host.decode_kwargs(model, mask),
                                   use_cache=True).logits)
        assert torch.isfinite(steps[0]).all() and torch.equal(steps[0], steps[1]), vid


# ------------------------------------------------------------------------------- host syncs
class _CountSyncs(TorchDispatchMode):
    SYNC = {"aten._local_scalar_dense.default", "aten.item.default", "aten.is_nonzero.default", "aten.equal.default"}

    def __init__(self):
        super().__init__()
        self.count = 0
        self.active = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active and str(func) in self.SYNC:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def syncs_inside(layers):
    """Count host syncs made while any of ``layers`` runs (forward hooks switch the counter)."""
    mode = _CountSyncs()
    hooks = []
    for layer in layers:
        hooks.append(layer.register_forward_pre_hook(lambda m, a: setattr(mode, "active", True)))
        hooks.append(layer.register_forward_hook(lambda m, a, o: setattr(mode, "active", False)))
    try:
        with mode:
            yield mode
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("guard", [False, True])
def test_one_host_sync_per_forward(host, host_vanilla, one_thread, monkeypatch, guard):
    """The routed layers make no host sync at all; the plan makes its one transfer (``tolist``, which
    dispatches no scalar op, so it is counted separately); the overflow guard adds one check."""
    model = to_pmod(host_vanilla, PMoDConfig(shift=0.3, overflow_guard=guard))
    random_routers(model, seed=3)
    batch = host.inputs(sizes=SIZES, questions=QUESTIONS)  # padded batch, different images
    builds = []
    original = RoutingPlan.build.__func__
    monkeypatch.setattr(RoutingPlan, "build", classmethod(lambda cls, *a, **k: builds.append(1) or original(cls, *a, **k)))
    checks = []
    check = RoutingPlan.check_overflow
    monkeypatch.setattr(RoutingPlan, "check_overflow", lambda self: checks.append(len(self._flags)) or check(self))
    with torch.no_grad(), syncs_inside(model.pmod_layers.values()) as mode:  # inside the routed layers only
        model(**batch, use_cache=True)
    assert len(model.pmod_layers) >= 5
    assert mode.count == 0, f"{mode.count} host syncs inside {len(model.pmod_layers)} routed layers"
    assert builds == [1]
    assert checks == [4 * len(model.pmod_layers) if guard else 0]


def test_overflow_guard_one_check_names_layer(host, host_vanilla, one_thread):
    model = to_pmod(host_vanilla, PMoDConfig(shift=0.5, weight_norm="none", overflow_guard=True))
    first = min(model.pmod_layers)
    with torch.no_grad():
        model.pmod_layers[first].router.weight.fill_(float("inf"))
    with pytest.raises(PMoDOverflowError, match=rf"layer {first} \(router logits"):
        with torch.no_grad():
            model(**_single(host, 0))


# ------------------------------------------------------------------------------ determinism
def test_ties_break_by_position_alone_and_in_padded_batch(host, host_vanilla, one_thread):
    model = to_pmod(host_vanilla, PMoDConfig(shift=0.3))  # zero routers: every weight ties at 1
    batch = host.inputs(sizes=SIZES, questions=QUESTIONS)
    with torch.no_grad(), model.record_routing() as rec_batch:
        model(**batch)
    target = host.vision(model, batch["input_ids"])
    for i in range(len(SIZES)):
        single = _single(host, i)
        with torch.no_grad(), model.record_routing() as rec_one:
            model(**single)
        for layer, r in rec_one.items():
            sel_one = r["selected"][0][r["target"][0]]  # selection over this sample's vision tokens, in order
            sel_batch = rec_batch[layer]["selected"][i][target[i]]
            assert torch.equal(sel_one, sel_batch), (i, layer)
            k = int(sel_one.sum())
            assert sel_one[:k].all() and not sel_one[k:].any()  # ties: the earlier tokens are kept
    together = _generate(model, batch, steps=4).sequences[:, batch["input_ids"].shape[1]:]
    for i in range(len(SIZES)):
        single = _single(host, i)
        alone = _generate(model, single, steps=4).sequences[:, single["input_ids"].shape[1]:]
        assert together[i].tolist() == alone[0].tolist()
        assert host.processor.decode(together[i]) == host.processor.decode(alone[0])


# ------------------------------------------------------------------------------ HF contract
def test_contract_checks_fail_loudly_with_the_supported_range(host, host_vanilla):
    spec = supported_range("transformers")
    assert spec.startswith("transformers>=") and "<" in spec  # read from the installed metadata

    class NoCacheAttention(torch.nn.Module):
        config = type("C", (), {"_attn_implementation": "sdpa"})()

        def forward(self, hidden_states, position_embeddings, attention_mask, layer_past=None):
            return hidden_states, None

    with pytest.raises(HFContractError, match=r"pip install 'transformers>=") as err:
        check_attention(NoCacheAttention())
    assert "cache" in str(err.value)
    attn = host_vanilla.model.language_model.layers[0].self_attn
    assert check_attention(attn) in ("cache", "past_key_values")
    assert cache_argument(type(host_vanilla).forward, "forward") == check_attention(attn)
    model = to_pmod(host_vanilla, PMoDConfig(shift=0.5))
    layer = model.pmod_layers[max(model.pmod_layers)]
    with pytest.raises(HFContractError, match="routing plan"):
        layer(torch.zeros(1, 3, model.config.text_config.hidden_size))


def test_layer_forward_reads_no_hf_cache_keyword():
    """The wrapped layer takes the cache from the plan only; the names HF uses are not parameters."""
    from pmod_bench.model.layer import PMoDLayerMixin

    params = inspect.signature(PMoDLayerMixin.forward).parameters
    assert not {"cache", "past_key_values", "use_cache", "position_ids"} & set(params)


# ------------------------------------------------------------------------------ config
def test_config_defaults_stay_derived(host_vanilla):
    soft = PMoDConfig().replace(weight_norm="softmax")
    assert (soft.norm_scale, soft.norm_bias) == (1.0, 1.0)
    back = soft.replace(weight_norm="tanh")
    assert (back.norm_scale, back.norm_bias) == (0.2, 1.0)
    explicit = PMoDConfig(norm_scale=1.0).replace(weight_norm="softmax", norm_scale=0.5)
    assert explicit.norm_scale == 0.5
    kept = PMoDConfig(weight_norm="tanh", norm_scale=1.0).replace(weight_norm="sigmoid")
    assert kept.norm_scale == 1.0  # explicitly chosen values are kept
    for bad in (-0.2, 0.0):
        with pytest.raises(ValueError, match="norm_scale must be positive"):
            PMoDConfig(norm_scale=bad)
    model = to_pmod(host_vanilla, PMoDConfig(shift=0.5))
    model.set_pmod_ratios(weight_norm="softmax")
    layer = next(iter(model.pmod_layers.values()))
    assert (layer.pmod.norm_scale, layer.pmod.norm_bias) == (1.0, 1.0)


# ------------------------------------------------------------------------------ flash-attention
@pytest.mark.gpu
def test_flash_attention_equals_sdpa_prefill_and_decode(tiny_processor):
    pytest.importorskip("flash_attn")
    from pmod_bench.model.presets import build_preset

    outs = {}
    for attn in ("sdpa", "flash_attention_2"):
        vanilla, _ = build_preset("tiny", pmod=None, dtype=torch.bfloat16, attn_implementation=attn)
        model = to_pmod(vanilla.cuda(), PMoDConfig(shift=0.3))
        random_routers(model, seed=4)
        for i in (0, None):  # batch 1 (the packed-sequence trap) and a padded batch
            inputs = make_inputs(tiny_processor, sizes=SIZES[:1] if i == 0 else SIZES, questions=QUESTIONS)
            inputs = {k: v.cuda() for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
            outs[(attn, i)] = _generate(model, inputs, steps=6)
    for i in (0, None):
        a, b = outs[("sdpa", i)], outs[("flash_attention_2", i)]
        assert a.sequences.tolist() == b.sequences.tolist()
        for x, y in zip(a.logits, b.logits):
            assert (x.float() - y.float()).abs().max() < 5e-2


# ------------------------------------------------------------------------------ evaluation
@pytest.mark.parametrize("routers", ["zero", "random"])
def test_eval_answers_identical_at_batch_1_and_8(tiny_processor, one_thread, routers):
    """lmms-eval's request path of the plugin (length sort, padding, generate, stop strings): the same
    answers at batch size 1 and 8, for the zero-router tiny model (all router weights tie) and a
    randomised one. Transformers 5.24 broke exactly this (63 of 210 answers differed)."""
    from lmms_eval.api.instance import Instance

    from pmod_bench.model.presets import build_preset
    from pmod_bench.tasks.fixtures import image
    from pmod_bench.tasks.plugin import PMoDLlava

    model, _ = build_preset("tiny", pmod=PMoDConfig(shift=0.3))
    if routers == "random":
        random_routers(model, seed=7)
    objects = ["disc", "box", "dog", "car", "person", "chair", "cup", "tree"]
    docs = [{"q": f"Is there a {objects[i % 8]} in the image?" + " Look carefully." * (i % 3),
             "img": image(i, 40 + 8 * (i % 6), 32 + 8 * (i % 4))} for i in range(16)]
    gen = {"max_new_tokens": 6, "until": ["\n\n"], "temperature": 0, "do_sample": False}
    reqs = [Instance(request_type="generate_until", arguments=(d["q"], dict(gen), lambda d: [d["img"]], i, "t", "test"),
                     idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1}) for i, d in enumerate(docs)]
    answers = {}
    for bs in (1, 8):
        lm = PMoDLlava.from_loaded(model, tiny_processor, name="tiny", batch_size=bs, device="cpu")
        lm.task_dict = {"t": {"test": docs}}
        answers[bs] = lm.generate_until(reqs)
    assert len(answers[1]) == len(docs)
    assert answers[1] == answers[8], sum(a != b for a, b in zip(answers[1], answers[8]))


# ------------------------------------------------------------------------------ RoPE, owned
def _attention_and_rope(family):
    """(attention module, (cos, sin), x) of one family: GQA 4/2 heads, a real rope_theta, two position offsets;
    Qwen2.5-VL: M-RoPE's three rows (temporal row different from height/width), recomposed by its rotary."""
    import transformers

    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen2_5_vl": "Qwen2_5_VL"}[family]
    common = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32, num_hidden_layers=1,
                  vocab_size=32, max_position_embeddings=128)
    if family == "qwen2_5_vl":
        cfg = transformers.Qwen2_5_VLTextConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                           "mrope_section": [2, 3, 3]})
    else:
        cfg = getattr(transformers, f"{names}Config")(**common, rope_theta=10000.0)
    cfg._attn_implementation = "eager"
    module = __import__(f"transformers.models.{family}.modeling_{family}", fromlist=["x"])
    torch.manual_seed(0)
    attn = getattr(module, f"{names}Attention")(cfg, layer_idx=0).eval()
    if getattr(attn.q_proj, "bias", None) is not None:  # Qwen2: q/k/v biases, make them non-zero
        for p in (attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias):
            torch.nn.init.normal_(p)
    rotary = getattr(module, f"{names}RotaryEmbedding")(config=cfg)
    B, N = 2, 9
    x = torch.randn(B, N, 64)
    pos = torch.arange(N)[None].expand(B, -1) + torch.tensor([[0], [5]])  # two different offsets
    if family == "qwen2_5_vl":
        pos = torch.stack([pos, pos // 3, pos % 3 + 2])  # (3, B, N): distinct temporal / height / width rows
    return attn, rotary(x, pos), x


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen2_5_vl"])
def test_own_rope_reproduces_the_hf_attention_output(family):
    """model/rope.py rotates q/k as the family's attention module does: an eager attention rebuilt from the
    module's own projections and our RoPE equals the module's forward output (GQA, a real rope_theta; Qwen2.5-VL:
    the (cos, sin) its rotary recomposes from three M-RoPE rows, as every decoder layer receives them)."""
    from pmod_bench.model.rope import apply_rope

    attn, (cos, sin), x = _attention_and_rope(family)
    B, N, _ = x.shape
    H, hd = 4, attn.head_dim
    mask = torch.full((N, N), float("-inf")).triu(1)[None, None].expand(B, 1, N, N)
    with torch.no_grad():
        ref = attn(x, position_embeddings=(cos, sin), attention_mask=mask)[0]
        q = apply_rope(attn.q_proj(x).view(B, N, H, hd).transpose(1, 2), cos, sin)
        k = apply_rope(attn.k_proj(x).view(B, N, 2, hd).transpose(1, 2), cos, sin).repeat_interleave(2, dim=1)
        v = attn.v_proj(x).view(B, N, 2, hd).transpose(1, 2).repeat_interleave(2, dim=1)
        probs = torch.softmax(q @ k.transpose(2, 3) * attn.scaling + mask, dim=-1)
        ours = attn.o_proj((probs @ v).transpose(1, 2).reshape(B, N, H * hd))
    assert (ours - ref).abs().max() < 1e-5
    with pytest.raises(HFContractError, match="partial-rotary"):
        apply_rope(q, cos[..., : hd // 2], sin[..., : hd // 2])
