"""Models for training: router gradients with and without STRing, module groups, composing LLM + vision tower."""

from __future__ import annotations

import pytest
import torch
from pmod_bench.model.config import PMoDConfig

from pmod_bench.train.build import (
    apply_trainable,
    build_model,
    load_projector,
    param_group,
)
from pmod_bench.train.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (conftest.one_thread)."""


def _inputs(processor):
    from pmod_bench.model.presets import demo_image

    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the color?"}]}],
        add_generation_prompt=True)
    return processor(images=demo_image(64, 48), text=prompt, return_tensors="pt")


@pytest.mark.parametrize("string", [True, False])
def test_router_gradient_comes_from_skipped_tokens_only_with_string(string):
    """A loss on the skipped vision tokens' outputs reaches the router only through STRing (out = w*x).

    Without STRing a skipped token leaves the layer as it came (out = x): the router's gradient then
    comes from the selected tokens alone (out = h + w*u).
    """
    from pmod_bench.model.presets import build_preset, random_routers

    model, processor = build_preset("tiny", pmod=PMoDConfig(string=string))
    random_routers(model, seed=1)
    idx = min(model.pmod_layers)
    layer = model.pmod_layers[idx]
    captured = {}
    handle = layer.register_forward_hook(lambda m, a, out: captured.__setitem__("out", out[0] if isinstance(out, tuple) else out))
    try:
        with model.record_routing() as rec:
            model(**_inputs(processor))
    finally:
        handle.remove()
    out = captured["out"]  # (B, N, d) this layer's output
    selected, target = rec[idx]["selected"], rec[idx]["target"]
    skipped = target & ~selected
    assert skipped.any() and selected.any()
    params = [layer.router.weight, layer.router.bias]
    g_skip = torch.autograd.grad(out[skipped].pow(2).sum(), params, retain_graph=True, allow_unused=True)
    g_sel = torch.autograd.grad(out[selected].pow(2).sum(), params, allow_unused=True)
    skip_norm = sum(0.0 if g is None else g.abs().sum().item() for g in g_skip)
    sel_norm = sum(0.0 if g is None else g.abs().sum().item() for g in g_sel)
    assert sel_norm > 0  # selected tokens always teach the router (out = h + w*u)
    if string:
        assert skip_norm > 0  # STRing: skipped tokens out = w*x teach it too
    else:
        assert skip_norm == 0  # vanilla MoD: skipped tokens carry no router gradient


def test_module_groups_and_freezing():
    from pmod_bench.model.presets import build_preset

    model, _ = build_preset("tiny")
    groups = {param_group(n) for n, _ in model.named_parameters()}
    assert groups == {"vision", "connector", "llm", "routers"}
    assert param_group("model.image_newline") == "connector"
    assert param_group("model.language_model.layers.5.router.weight") == "routers"
    s = apply_trainable(model, ["connector"])  # PT
    trainable = {param_group(n) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"connector"} and s["connector"]["trainable"] and not s["llm"]["trainable"]
    apply_trainable(model, ["connector", "llm", "routers"])  # SFT: the vision tower stays frozen
    frozen = {param_group(n) for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"vision"}
    vanilla, _ = build_preset("tiny", pmod=None)
    with pytest.raises(ConfigError, match="selects no parameter"):
        apply_trainable(vanilla, ["routers"])


def test_compose_llm_vision_tower_and_llava_projector(tmp_path):
    """model.llm + model.vision_tower + LLaVA's mm_projector.bin -> a LLaVA-NeXT (p-MoD) with those exact weights."""
    from pmod_bench.model.presets import preset_config, tiny_tokenizer
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from pmod_bench.train.data import DataCollator, LlavaConversationDataset

    cfg = preset_config("tiny")
    torch.manual_seed(3)
    llm = LlamaForCausalLM(cfg.text_config)
    llm.save_pretrained(tmp_path / "llm")
    tiny_tokenizer().save_pretrained(tmp_path / "llm")
    vis = CLIPVisionModel(cfg.vision_config)
    vis.save_pretrained(tmp_path / "vision")
    d_v, d_t = cfg.vision_config.hidden_size, cfg.text_config.hidden_size
    mm = {"model.mm_projector.0.weight": torch.randn(d_t, d_v), "model.mm_projector.0.bias": torch.randn(d_t),
          "model.mm_projector.2.weight": torch.randn(d_t, d_t), "model.mm_projector.2.bias": torch.randn(d_t)}
    torch.save(mm, tmp_path / "mm_projector.bin")
    tc = TrainConfig(
        model=ModelConfig(llm=str(tmp_path / "llm"), vision_tower=str(tmp_path / "vision"), arch="llava_next",
                          projector=str(tmp_path / "mm_projector.bin")),
        data=DataConfig(), train=OptimConfig(precision="fp32"), pmod=PMoDConfig())
    model, processor = build_model(tc, tc.resolved_pmod(cfg.text_config.num_hidden_layers))
    assert type(model).__name__ == "PMoDLlavaNextForConditionalGeneration" and len(model.pmod_layers) > 0
    sd = model.state_dict()
    assert torch.equal(sd["model.language_model.layers.3.mlp.up_proj.weight"], llm.model.layers[3].mlp.up_proj.weight)
    assert torch.equal(sd["lm_head.weight"], llm.lm_head.weight)
    assert all(torch.equal(sd[f"model.vision_tower.{k}"], v) for k, v in vis.state_dict().items())
    assert torch.equal(sd["model.multi_modal_projector.linear_1.weight"], mm["model.mm_projector.0.weight"])
    assert torch.equal(sd["model.multi_modal_projector.linear_2.bias"], mm["model.mm_projector.2.bias"])
    assert all(torch.count_nonzero(l.router.weight) == 0 for l in model.pmod_layers.values())
    # the composed processor expands <image> to what the model expects: a training forward works
    from pmod_bench.train.data import read_records
    from pmod_bench.train.demo import make_demo_dataset

    path = make_demo_dataset(tmp_path / "data", n_image=2, n_text=1)
    ds = LlavaConversationDataset(read_records([str(path)]), processor, image_folder=str(tmp_path / "data"),
                                  image_aspect_ratio="native")
    batch = DataCollator(processor.tokenizer.pad_token_id)([ds[0], ds[1]])
    batch.pop("bad_samples", None)
    loss = model(**batch, use_cache=False).loss
    assert torch.isfinite(loss)
    # an HF-named connector (a PT run's connector.safetensors) loads the same way
    from safetensors.torch import save_file

    save_file({"model.multi_modal_projector.linear_1.weight": torch.zeros(d_t, d_v),
               "model.multi_modal_projector.linear_1.bias": torch.zeros(d_t),
               "model.multi_modal_projector.linear_2.weight": torch.ones(d_t, d_t),
               "model.multi_modal_projector.linear_2.bias": torch.ones(d_t)}, str(tmp_path / "connector.safetensors"))
    load_projector(model, str(tmp_path))
    assert model.model.multi_modal_projector.linear_2.weight.eq(1).all()
    with pytest.raises(ConfigError, match="no connector weights"):
        load_projector(model, str(tmp_path / "vision" / "nothing"))
