"""Tests of pmod_bench.profiler: vision tokens, the three FLOP counts, KV cache, latency, the CLI.

Everything runs on CPU from presets or configs built inline: no weights, no downloads. The 7B/13B
architectures are only ever built on the meta device.
"""

from __future__ import annotations

import json

import pytest
import torch

from pmod_bench.cli import main
from pmod_bench.profiler import (
    REQUIRED_KEYS,
    Scenario,
    count_flops_fvcore,
    count_flops_meta,
    count_flops_model,
    kv_cache,
    kv_cache_batch,
    llm_decode_flops,
    llm_prefill_flops,
    load_arch,
    measure_kv,
    paper_prefill_flops,
    profile,
    vision_flops,
    vision_layout,
)
from pmod_bench.profiler.arch import ArchError, parse_image_size
from pmod_bench.profiler.hardware import HardwareError, detect_hardware, get_hardware
from pmod_bench.profiler.kvcache import prefill_cache
from pmod_bench.profiler.models import Sample, random_model, sample_layout, synthetic_batch
from pmod_bench.profiler.render import format_table, rows_to_csv
from pmod_bench.profiler.variants import (
    Baseline,
    PMoD,
    Variant,
    VariantError,
    default_variants,
    make_pmod_config,
    num_selected,
    parse_variant,
    register_variant,
)

REL = 0.01  # the acceptance tolerance: three counts agree within 1%
TINY_SIZE = (64, 48)  # -> 70 vision tokens on the tiny preset (2x2 grid + base, unpadded 6x8)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1)


def _tiny_variants():
    return [Baseline(), PMoD(make_pmod_config(shift=0.3)), PMoD(make_pmod_config(shift=0.5)),
            parse_variant("ratios:1,0.5,1,0.3,0.2,1,0.9,0.15")]


# ------------------------------------------------------------------------------------- vision tokens
@pytest.mark.parametrize(
    "arch,size,tokens",
    [("llava-next-7b", (672, 672), 2928), ("llava-next-7b", (640, 480), 2340), ("llava-next-13b", (672, 672), 2928),
     ("llava-1.5-7b", (672, 672), 576), ("llava-1.5-7b", (640, 480), 576)],
)
def test_vision_tokens(arch, size, tokens):
    assert vision_layout(load_arch(arch), size).vision_tokens == tokens


def test_vision_tokens_match_the_processor_and_the_model():
    """The tiny preset's real processor expands <image> into as many placeholders as we compute."""
    from pmod_bench.model.presets import demo_image, preset_processor

    arch = load_arch("tiny")
    proc = preset_processor("tiny")
    for w, h in [(64, 48), (48, 64), (96, 32), (30, 100), (64, 64)]:
        ids = proc(images=demo_image(w, h), text="USER: <image>\nWhat? ASSISTANT:", return_tensors="pt")["input_ids"]
        assert int((ids == arch.image_token_id).sum()) == vision_layout(arch, (w, h)).vision_tokens, (w, h)


def test_bad_image_sizes():
    assert parse_image_size("640x480") == (640, 480)
    for bad in ("672", "672by672", "0x10", "-5x5", "axb", "1x1x1"):
        with pytest.raises(ArchError, match="WIDTHxHEIGHT|whole pixels"):
            parse_image_size(bad)


# ---------------------------------------------------------------------------------------- variants
def test_num_selected_matches_the_model():
    from pmod_bench.model.plan import num_selected as model_num_selected

    for V in [1, 7, 70, 576, 1000, 2340, 2928, 4096]:
        for r in [0.15, 0.2, 0.3, 0.35, 0.45, 0.5375, 0.7, 0.8443, 0.1 + V % 7 / 10]:
            assert num_selected(V, r) == int(model_num_selected(torch.tensor([V]), r)), (V, r)


def test_variant_parsing_and_plugins():
    assert parse_variant("baseline") == Baseline()
    assert parse_variant("p-MoD-0.4").name == "p-MoD-0.4"
    v = parse_variant("pmod:shift=0.4,schedule=linear")
    assert (v.name, v.schedule, v.shift) == ("p-MoD-linear-0.4", "linear", 0.4)
    r = parse_variant("ratios:1*8,0.5*24")
    assert r.layer_ratios(32) == [1.0] * 8 + [0.5] * 24 and r.name == "ratios:1*8,0.5*24" and r.schedule == "explicit"
    assert parse_variant(r.name).layer_ratios(32) == r.layer_ratios(32)
    f = parse_variant("fastv:k=2,keep=0.5")  # the registry's FastV (pmod_bench.methods), validated there
    assert f.config.to_dict() == {"method": "fastv", "k": 2, "keep": 0.5}
    with pytest.raises(VariantError, match="did you mean|Did you mean"):
        parse_variant("fastvv:k=2")
    with pytest.raises(VariantError, match="shift"):
        parse_variant("p-MoD-2.5")

    @register_variant("halve-test")
    class Halve(Variant):
        name = "halve"

        def kept_vision_tokens(self, num_layers, vision_tokens):
            return [vision_tokens // 2] * num_layers

        @classmethod
        def from_options(cls, options):
            return cls()

    rows = profile("llava-next-7b", ["baseline", "halve-test"], verify=False, latency=False, recipe=None)
    assert rows[1].variant == "halve" and rows[1].method == "halve-test" and rows[1].kv_cache_ratio == pytest.approx(0.5, abs=1e-3)
    assert rows[1].prefill_latency_ms is None


def test_rows_carry_the_model_config_as_data():
    """Every row holds its model's PMoDConfig.to_dict() under ``pmod`` (None: the vanilla model); names are display."""
    from pmod_bench.model.config import PMoDConfig

    specs = ["baseline", "p-MoD-0.5", "pmod:weight_norm=none,string=false", "p-MoD-linear-0.4", "ratios:1*8,0.5*24",
             "fastv:k=2,keep=0.5"]
    rows = [r.to_dict() for r in profile("llava-next-7b", specs, verify=False, latency=False, recipe=None)]
    base, pmod, vanilla_mod, linear, explicit, fastv = rows
    assert base["pmod"] is None and fastv["pmod"] is None and fastv["method_config"] == {"method": "fastv", "k": 2, "keep": 0.5}
    assert pmod["pmod"] == PMoDConfig().to_dict() and linear["pmod"] == PMoDConfig(schedule="linear", shift=0.4).to_dict()
    assert explicit["pmod"] == PMoDConfig(ratios=[1.0] * 8 + [0.5] * 24).to_dict() and explicit["schedule"] == "explicit"
    # vanilla MoD and p-MoD-0.5 do the same work; only the data (and the display name) tells them apart
    assert vanilla_mod["pmod"] == PMoDConfig(weight_norm="none", string=False).to_dict() != pmod["pmod"]
    assert vanilla_mod["variant"] == "pmod:weight_norm=none,string=false" and pmod["variant"] == "p-MoD-0.5"
    assert (vanilla_mod["prefill_tflops"], vanilla_mod["shift"], vanilla_mod["schedule"]) == \
        (pmod["prefill_tflops"], pmod["shift"], pmod["schedule"])
    for r in rows:  # the display name reads back to the same configuration
        if r["pmod"] is not None:
            assert PMoDConfig.from_dict(r["pmod"]) == parse_variant(r["variant"]).pmod_config()
    import csv
    import io

    table = list(csv.DictReader(io.StringIO(rows_to_csv(rows))))  # profile.csv: the config as a JSON string
    assert table[0]["pmod"] == "" and json.loads(table[2]["pmod"]) == vanilla_mod["pmod"]


# ------------------------------------------------------------------------------------- FLOPs: tiny
@pytest.fixture(scope="module")
def tiny():
    return load_arch("tiny")


@pytest.mark.slow
def test_three_flop_counts_agree_on_tiny(tiny):
    """Analytic == FlopCounterMode(real forward, real routing) == fvcore x2 == FlopCounterMode(meta), within 1%."""
    samples = [Sample(TINY_SIZE, 16)] * 2  # batch of 2: counts are per sample
    layout = vision_layout(tiny, TINY_SIZE)
    V, T = layout.vision_tokens, 16
    vis = vision_flops(tiny, layout)
    base = None
    for v in _tiny_variants():
        model, base = random_model(tiny, v, base=base)
        batch = synthetic_batch(tiny, samples)
        kept = v.kept_vision_tokens(tiny.text.layers, V)
        ana = llm_prefill_flops(tiny.text, T, V, kept, v.router_layers(tiny.text.layers), logits_tokens=T + V)
        ana_decode = llm_decode_flops(tiny.text, [T + k for k in kept]).total()
        real = count_flops_model(model, batch)  # all logits: the plain forward
        fv = count_flops_fvcore(model, tiny, batch)
        meta = count_flops_meta(tiny, v, TINY_SIZE, T, batch_size=2, logits_tokens=T + V)
        for measured in (real, fv, meta):
            assert _rel(measured.prefill_llm, ana.total()) < REL, (v.name, measured)
            assert _rel(measured.vision, vis.total) < REL, (v.name, measured)
            assert measured.prefill_llm == ana.total() and measured.vision == vis.total  # in fact exact
        assert real.decode_step == meta.decode_step == ana_decode, v.name


def test_flop_counts_agree_on_llava_next_7b_meta():
    arch = load_arch("llava-next-7b")
    layout = vision_layout(arch, (672, 672))
    V, T = layout.vision_tokens, 58
    for v in (Baseline(), PMoD(make_pmod_config(shift=0.5))):
        kept = v.kept_vision_tokens(32, V)
        ana = llm_prefill_flops(arch.text, T, V, kept, v.router_layers(32), logits_tokens=1)
        meta = count_flops_meta(arch, v, (672, 672), T, logits_tokens=1)
        assert _rel(meta.prefill_llm, ana.total()) < REL and meta.prefill_llm == ana.total()
        assert meta.decode_step == llm_decode_flops(arch.text, [T + k for k in kept]).total()
        assert meta.vision == vision_flops(arch, layout).total
    assert meta.vision_encoder / 1e12 == pytest.approx(1.91, abs=0.01)  # CLIP-L/336 on 5 tiles, all 24 layers


def test_paper_convention_reproduces_the_paper():
    """Decoder weights + lm_head on all tokens, no attention, 58 text tokens: Tables 1 and 7."""
    for arch_name, size, expected in (
        ("llava-next-7b", (672, 672), {"baseline": 39.46, "p-MoD-0.4": 19.56, "p-MoD-0.5": 21.94}),
        ("llava-1.5-7b", (336, 336), {"baseline": 8.38, "p-MoD-0.5": 4.92}),
    ):
        arch = load_arch(arch_name)
        V = vision_layout(arch, size).vision_tokens
        for v in default_variants():
            if v.name in expected:
                got = paper_prefill_flops(arch.text, 58, V, v.kept_vision_tokens(32, V), v.router_layers(32)) / 1e12
                assert got == pytest.approx(expected[v.name], rel=0.005), (arch_name, v.name, got)


# ------------------------------------------------------------------------------------------ KV cache
def test_kv_measured_equals_analytic(tiny):
    """Real cache after prefill (random non-zero routers) == analytic, per layer; also a padded batch of 2 sizes."""
    base = None
    for v in _tiny_variants():
        model, base = random_model(tiny, v, base=base)
        for samples in ([Sample(TINY_SIZE, 16)], [Sample(TINY_SIZE, 16), Sample((96, 32), 12)]):
            batch = synthetic_batch(tiny, samples)
            cache = prefill_cache(model, batch)
            got = measure_kv(cache, batch["attention_mask"])
            want = kv_cache_batch(tiny, v, [(sample_layout(tiny, s)[0], s.text_tokens) for s in samples])
            assert got.real == want.real and got.slots == want.slots and got.model_count == want.model_count, v.name
            per_entry = 2 * tiny.text.kv_heads * tiny.text.head_dim * 4  # float32 model
            assert got.bytes_allocated == sum(want.slots) * per_entry
            if len(samples) == 1:
                single = kv_cache(tiny.text, v, vision_layout(tiny, TINY_SIZE).vision_tokens, 16, "float32")
                assert list(single.entries) == list(got.real) and single.bytes == sum(got.real) * per_entry


def test_kv_ratio_conventions():
    arch = load_arch("llava-next-7b")
    rows = profile(arch, verify=False, latency=False, recipe=None)
    by = {r.variant: r for r in rows}
    assert by["baseline"].kv_cache_ratio == by["baseline"].kv_cache_ratio_all_tokens == 1.0
    assert round(100 * by["p-MoD-0.5"].kv_cache_ratio, 1) == 53.7  # the paper's 53.7%
    assert round(100 * by["p-MoD-0.4"].kv_cache_ratio, 1) == 47.5
    assert by["p-MoD-0.5"].mean_retention == pytest.approx(0.5375)
    r = by["p-MoD-0.5"]
    assert r.kv_cache_ratio_all_tokens > r.kv_cache_ratio  # text tokens are never skipped
    assert r.kv_cache_bytes == sum(58 + k for k in r.kept_vision_tokens) * 2 * 32 * 128 * 2


# --------------------------------------------------------------------------------- latency, hardware
def test_tiny_latency_and_roofline(tiny):
    rows = profile(tiny, ["baseline", "p-MoD-0.5", "fastv:k=2,keep=0.5"], [Scenario(TINY_SIZE, 8, gen_tokens=3)],
                   device="cpu", hardware="A6000", warmup=0, repeats=1)
    base, pmod, fastv = rows
    for r in (base, pmod):
        assert r.prefill_latency_ms > 0 and r.decode_latency_ms_per_token > 0 and r.device == "cpu"
        assert r.prefill_floor_ms > 0 and r.hardware == "A6000" and r.mfu is None  # no MFU for a CPU timing
    assert base.latency_ratio == 1.0 and pmod.latency_ratio > 0
    assert fastv.prefill_latency_ms > 0 and fastv.decode_latency_ms_per_token > 0 and fastv.latency_ratio > 0  # timed too
    assert base.train_gpu_hours is None  # no recipe for a tiny arch unless asked


def test_7b_not_timed_on_cpu():
    rows = profile("llava-next-7b", ["baseline"], verify=False, device="cpu", recipe=None)
    assert rows[0].prefill_latency_ms is None and "not timed on CPU" in rows[0].latency_note
    from pmod_bench.profiler.errors import ProfileError

    with pytest.raises(ProfileError, match="GPU"):
        profile("llava-next-7b", ["baseline"], verify=False, device="cpu", latency=True)


def test_hardware_table():
    assert get_hardware("a6000").bf16_tflops == 154.8 and get_hardware("H100 SXM").mem_bw_gbs == 3350
    assert get_hardware("h100-pcie").bf16_tflops == 756 and get_hardware("A100-80GB-SXM").mem_bw_gbs == 2039
    assert detect_hardware("NVIDIA H100 80GB HBM3").name == "H100-SXM"
    assert detect_hardware("NVIDIA RTX A6000").name == "A6000"
    assert detect_hardware("NVIDIA A100-SXM4-80GB").name == "A100-80GB-SXM"
    assert detect_hardware("cpu") is None
    # the GPUs the suite runs on (benchmarks/gpu_suite.py): every H100 / H200 form factor has its own dense peak
    names = {"NVIDIA H100 PCIe": ("H100-PCIe", 756), "NVIDIA H100 NVL": ("H100-NVL", 835), "NVIDIA H200": ("H200", 989),
             "NVIDIA H200 NVL": ("H200-NVL", 835), "NVIDIA GH200 480GB": ("GH200", 989),
             "NVIDIA H100 80GB HBM3 MIG 7g.80gb": ("H100-SXM", 989)}
    for device_name, (key, peak) in names.items():
        hw = detect_hardware(device_name)
        assert (hw.name, hw.bf16_tflops) == (key, peak), device_name
    assert get_hardware("H200 NVL").name == "H200-NVL" and get_hardware("h200-sxm").name == "H200"
    with pytest.raises(HardwareError, match="Known"):
        get_hardware("TPU-v5")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_latency_llava_next_7b():
    rows = profile("llava-next-7b", ["baseline", "p-MoD-0.5"], [Scenario(gen_tokens=4)], device="cuda", warmup=1, repeats=3)
    base, pmod = rows
    assert base.prefill_latency_ms > 0 and pmod.prefill_latency_ms > 0 and base.peak_memory_bytes > 13e9
    assert pmod.latency_ratio < 1.0  # p-MoD-0.5 prefills fewer tokens
    assert base.hardware is not None and 0 < base.mfu < 1


# ------------------------------------------------------------------------------------------- training
def test_recipe_calibration_and_train_run(tmp_path):
    rows = profile("llava-next-7b", verify=False, latency=False)
    gpu_h = {r.variant: r.train_gpu_hours for r in rows}
    assert gpu_h["baseline"] == pytest.approx(560, rel=0.01) and gpu_h["p-MoD-0.5"] == pytest.approx(435, rel=0.01)
    assert gpu_h["p-MoD-0.4"] == pytest.approx(415, rel=0.03)  # a prediction, not calibrated
    base = rows[0]
    assert base.train_tflops_per_sample > 3 * base.prefill_tflops  # backward of the LLM is 2x its forward
    run = tmp_path / "train-run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"kind": "train", "schema_version": 1}))
    (run / "train_summary.json").write_text(json.dumps({"recipe": "llava-next-sft", "stage": "sft", "steps": 10,
                                                        "final_loss": 1.0, "gpu_hours": 0.5, "tokens_per_s": 20000.0}))
    (run / "train_log.jsonl").write_text(json.dumps({"step": 10, "world_size": 8}) + "\n")
    rows = profile("llava-next-7b", ["baseline"], verify=False, latency=False, train_run=str(run))
    r = rows[0]  # a run without model_info cannot be matched to the 7B row: nothing measured is attached
    assert r.train_tokens_per_s_measured is None and r.train_run_match is False and r.train_run_note
    # (a matching run's measured throughput: tests/test_train_profile.py)


def test_fitted_utilisation_recomputes_from_table_7():
    """The llava-next-sft throughput constants are a fit to the paper's GPU hours, not a measured MFU: solve the
    two rows of Table 7 (baseline, p-MoD-0.5) again, 3600 H / S = F / (P u) + o, and find the shipped constants."""
    from pmod_bench.profiler import training
    from pmod_bench.reports.paper import paper_table

    rec = training.RECIPES["llava-next-sft"]
    hours = {r.variant: r.cells["Training GPU hours"] for r in paper_table(7).rows if r.model == "llava-next-7b"}
    flops = {r.variant: r.train_tflops_per_sample * 1e12
             for r in profile("llava-next-7b", ["baseline", "p-MoD-0.5"], verify=False, latency=False)}
    (f_b, f_p), (h_b, h_p) = (flops["baseline"], flops["p-MoD-0.5"]), (hours["baseline"], hours["p-MoD-0.5"])
    peak, samples = get_hardware("A6000").bf16_tflops * 1e12, 779_000
    assert (rec.hardware, rec.samples, rec.image_size, rec.text_tokens) == ("A6000", samples, (672, 672), 400)
    u = (f_b - f_p) * samples / (peak * 3600 * (h_b - h_p))
    o = 3600 * h_b / samples - f_b / (peak * u)
    fit = f"re-fitted: utilisation {u:.4f}, overhead {o:.4f} s (see the training module's docstring)"
    assert round(u, 4) == training._NEXT_SFT_FITTED_UTILISATION == rec.utilisation, fit
    assert round(o, 4) == training._NEXT_SFT_FITTED_OVERHEAD_S == rec.overhead_s_per_sample, fit
    assert all(r.utilisation == rec.utilisation and "fitted" in r.calibration for r in training.RECIPES.values())


def test_recipe_constants_in_rows_say_where_they_come_from(capsys):
    row = profile("llava-next-7b", ["baseline"], verify=False, latency=False)[0]
    assert row.train_utilisation == 0.6974 and row.train_calibration.startswith("fitted to the paper's")
    assert main(["profile", "--variant", "baseline", "--no-verify", "--mfu", "0.5"]) == 0  # --mfu: --utilisation's old name
    note = next(line for line in capsys.readouterr().out.splitlines() if "GPU h est.:" in line)
    assert "effective utilisation 0.5 of peak (not a measured MFU)" in note
    assert "utilisation given; overhead_s_per_sample fitted to the paper's" in note


# ------------------------------------------------------------------------------------ archs from dirs
def test_local_config_dirs(tmp_path):
    from pmod_bench.model.presets import preset_config

    vanilla = tmp_path / "tiny-vanilla"
    preset_config("tiny").save_pretrained(vanilla)
    arch = load_arch(str(vanilla))
    tiny = load_arch("tiny")
    assert arch.text == tiny.text and arch.vision == tiny.vision and arch.anyres
    pmod = tmp_path / "tiny-pmod"
    preset_config("tiny", pmod=make_pmod_config(shift=0.4)).save_pretrained(pmod)
    rows = profile(str(pmod / "config.json"), ["baseline", "config"], [Scenario(TINY_SIZE)], latency=False)
    assert rows[1].shift == 0.4 and rows[1].kv_cache_ratio < 1.0
    with pytest.raises(ArchError, match="no config.json"):
        load_arch(str(tmp_path))


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_default_run_writes_documented_rows(tmp_path, capsys):
    from pmod_bench.reports.runs import load_run

    out, js = tmp_path / "run", tmp_path / "rows.json"
    # the default profile (--device cpu only keeps a GPU test machine from timing the 7B here)
    assert main(["profile", "--device", "cpu", "--json", str(js), "--output", str(out), "--label", "llava-next-7b"]) == 0
    table = capsys.readouterr().out
    assert "39.46" in table and "p-MoD-0.5" in table and "519.1" in table  # paper numbers beside ours
    doc = json.loads(js.read_text())
    rows = doc["rows"]
    assert [r["variant"] for r in rows] == ["baseline", "p-MoD-0.3", "p-MoD-0.4", "p-MoD-0.5"]
    for r in rows:
        assert all(k in r for k in REQUIRED_KEYS)
        assert r["vision_tokens"] == 2928 and r["text_tokens"] == 58 and r["image_size"] == [672, 672]
        assert r["flops_check_rel_err"] < REL
        assert all(isinstance(r[k], float) for k in ("prefill_tflops", "tflops_ratio", "kv_cache_ratio"))
    assert rows[0]["prefill_tflops_paper"] == pytest.approx(39.46, rel=1e-3)
    run = load_run(out)  # the report reader validates run.json and the documented keys
    assert run.kind == "profile" and run.meta["command"].startswith("pmod-bench profile") and len(run.rows) == 4
    assert run.meta["host"] == "llava_next" and run.meta["hosts"] == {"llava-next-7b": "llava_next"}  # the arch's family
    csv_text = (out / "profile.csv").read_text()
    assert csv_text == rows_to_csv(json.loads((out / "profile.json").read_text())["rows"])
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--arch", "llava-next-7bb"], "Did you mean 'llava-next-7b'"),
        (["--arch", "nobody/nothing"], "unreachable"),
        (["--shift", "2.0"], "shift (delta) must be in (0, 1.5]"),
        (["--shift", "0"], "--shift"),
        (["--image-size", "672by672"], "WIDTHxHEIGHT"),
        (["--image-size", "0x480"], "whole pixels"),
        (["--ratios", "0.5*31"], "32 layers"),
        (["--variant", "fastvv"], "Did you mean 'fastv'"),
        (["--hardware", "A7000"], "Known:"),
        (["--schedule", "cosin"], "did you mean 'cosine'"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    ],
)
def test_cli_errors_name_the_fix(argv, needle, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["profile", "--no-verify", "-q", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert err.startswith("pmod-bench profile: error:")


def test_cli_sweep_and_table(tmp_path):
    js = tmp_path / "sweep.json"
    argv = ["profile", "-q", "--no-verify", "--no-latency", "--recipe", "none", "--arch", "llava-next-7b", "llava-1.5-7b", "--shift", "0.4", "0.5",
            "--schedule", "cosine", "linear", "--image-size", "672x672", "640x480", "--batch-size", "1", "2", "--json", str(js)]
    assert main(argv) == 0
    rows = json.loads(js.read_text())["rows"]
    assert len(rows) == 2 * 2 * 2 * (1 + 2 * 2)  # archs x sizes x batches x (baseline + schedules x shifts)
    assert {r["variant"] for r in rows} >= {"p-MoD-linear-0.4", "p-MoD-0.5", "baseline"}
    assert {r["vision_tokens"] for r in rows} == {2928, 2340, 576}
    text = format_table(rows)
    assert "llava-1.5-7b" in text and "8.38" in text  # Table 1's LLaVA-1.5 baseline beside ours
