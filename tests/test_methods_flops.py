"""Analytic FLOPs of every vision-side method == FlopCounterMode over the real forward of the tiny model (the
method's own similarities / merges included); the equal-compute solver matches its targets within 1%."""

from __future__ import annotations

import pytest
import torch

from conftest import make_inputs, method_forward_flops
from pmod_bench.methods import MethodError, solve
from pmod_bench.methods.accounting import method_flops


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.mark.parametrize("spec", ["visionzip:dominant=6,contextual=3", "fastervlm:tokens=5", "prumerge", "random:keep=0.5",
                                  "downsample:keep=0.25", "downsample:grid_h=2,grid_w=3"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-llava"])
def test_analytic_flops_equal_flop_counter(spec, preset):
    from pmod_bench.model.presets import build_preset, preset_processor
    from pmod_bench.profiler.arch import load_arch

    model, _ = build_preset(preset, pmod=None)
    if spec == "prumerge":  # peaky [CLS] attention so that the adaptive ratio keeps tokens
        last = model.model.vision_tower.vision_model.encoder.layers[-1] if hasattr(model.model.vision_tower, "vision_model") \
            else model.model.vision_tower.encoder.layers[-1]
        with torch.no_grad():
            last.self_attn.q_proj.weight.mul_(6.0), last.self_attn.k_proj.weight.mul_(6.0)
    inputs = make_inputs(preset_processor(preset), sizes=((64, 48),))
    mi, measured = method_forward_flops(model, inputs, spec)
    cfg = model.method_config
    if spec == "prumerge":  # the adaptive ratio of this image, fixed: the analytic count is then exact
        cfg = cfg.replace(ratio=mi.images[0].info["ratio"])
    text = int((inputs["input_ids"] != model.config.image_token_id).sum())
    n = mi.inputs_embeds.shape[1]
    f = method_flops(cfg, load_arch(preset), (64, 48), text_tokens=text, logits_tokens=n)
    assert f.llm_vision_tokens == n - text == int(mi.vision_token_mask.sum())
    analytic = f.vision + f.llm_prefill
    assert abs(analytic - measured) / measured < 1e-9, (analytic, measured)
    if "visionzip" in spec or "prumerge" in spec:
        assert f.method_extra > 0  # the similarities / merges are counted, not hidden


@pytest.mark.parametrize("spec", ["visionzip", "fastervlm", "random", "prumerge"])
def test_solver_matches_pmod_05_within_1pct(spec):
    from pmod_bench.profiler.arch import load_arch

    arch = load_arch("llava-next-7b")
    res = solve(spec, arch, (672, 672), match="p-MoD-0.5")
    assert res.rel_err <= 0.01 and res.metric == "prefill" and res.solved
    again = method_flops(res.config, arch, (672, 672), 58).llm_prefill
    assert again == res.achieved
    kv = solve(spec, arch, (672, 672), kv=0.537)
    assert abs(kv.achieved - 0.537) / 0.537 <= 0.01
    paper = solve(spec, arch, (672, 672), tflops=21.94, convention="paper")
    assert abs(method_flops(paper.config, arch, (672, 672), 58).llm_prefill_paper / 1e12 - 21.94) / 21.94 <= 0.01


def test_solver_discrete_downsample_and_errors():
    from pmod_bench.profiler.arch import load_arch

    arch = load_arch("llava-next-7b")
    # whole patch rows per tile: LLaVA-NeXT-7B's nearest token ratios around 0.537 are 0.511 (17x18) and 0.566 (18x18)
    with pytest.raises(MethodError, match="cannot match kv=0.537 .* nearest settings give 0.5109, 0.5656"):
        solve("downsample", arch, (672, 672), kv=0.537)
    res = solve("downsample", arch, (672, 672), kv=0.537, tolerance=0.06)
    assert abs(res.achieved - 0.537) / 0.537 <= 0.06 and res.solved["grid_h"] is not None
    with pytest.raises(MethodError, match="exactly one target"):
        solve("fastervlm", arch, match="p-MoD-0.5", kv=0.5)
    with pytest.raises(MethodError, match=r"--match-kv must be in \(0, 1\]"):
        solve("fastervlm", arch, kv=1.5)
