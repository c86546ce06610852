"""benchmarks/gpu_suite.py: the plumbing of the one-GPU suite, proven on CPU (``--smoke``) and in its parts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def suite(monkeypatch):
    """benchmarks/gpu_suite.py as a module (the benchmarks import their siblings by name)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_suite

    return gpu_suite


# ------------------------------------------------------------------------------------------ the parts
def test_search_batch_doubles_then_bisects(suite):
    fits = lambda limit: (lambda b: f"ran {b}" if b <= limit else None)  # noqa: E731
    tried = []

    def probe(b):
        tried.append(b)
        return fits(37)(b)

    b, res, fail, note = suite.search_batch(probe, 8, cap=128, refine=3, over_budget=lambda: False)
    assert tried == [16, 32, 64, 48, 40, 36] and (b, res, fail, note) == (36, "ran 36", 40, None)
    b, _, fail, _ = suite.search_batch(fits(37), 8, cap=128, refine=10, over_budget=lambda: False)
    assert (b, fail) == (37, 38)
    b, res, fail, note = suite.search_batch(fits(1000), 8, cap=100, refine=3, over_budget=lambda: False)
    assert (b, fail) == (64, None) and "cap (100" in note
    b, res, fail, _ = suite.search_batch(fits(10), 8, cap=128, refine=0, over_budget=lambda: False)
    assert (b, res, fail) == (8, None, 16)  # nothing above the known batch fits: no probe result
    b, _, _, note = suite.search_batch(fits(1000), 8, cap=128, refine=3, over_budget=lambda: True)
    assert b == 8 and "budget" in note


def test_sections_keep_their_own_status_and_the_budget_stops_the_rest(suite, tmp_path):
    from gpu_suite_render import render_markdown

    plan = suite.smoke_plan(suite.parse_args(["--smoke"]))
    doc = suite.new_document(plan, 50.0, ["prefill", "decode", "flash_vs_sdpa", "methods", "profile"], ["--smoke"])
    writes = []

    def write(d):
        suite.write_outputs(tmp_path, d)
        writes.append(json.loads((tmp_path / "gpu_suite.json").read_text()))

    clock = {"now": 0.0}

    def slow():  # the last section the budget lets start: it runs past the budget
        clock["now"] = 100.0
        return {"x": 1.0}

    def skip():
        raise suite.SectionSkipped("flash-attn is not installed")

    def fail():
        raise RuntimeError("boom")

    funcs = {"prefill": lambda: {"x": float("nan")}, "decode": fail, "flash_vs_sdpa": skip, "methods": slow,
             "profile": lambda: {"never": True}}
    suite.run_sections(doc, funcs, lambda: clock["now"], 50.0, write, log=lambda msg: None)
    sections = writes[-1]["sections"]
    assert [w["sections"]["prefill"]["status"] for w in writes] == ["ok"] * 5  # one write after each section
    assert writes[0]["sections"]["decode"]["status"] == "pending"  # a killed run still says what did not run
    assert sections["prefill"]["data"] == {"x": "NaN"}  # strict JSON: a non-finite number is visible, not lost
    assert sections["decode"]["status"] == "error" and sections["decode"]["error"] == "RuntimeError: boom"
    assert "Traceback" in sections["decode"]["traceback"]
    assert sections["flash_vs_sdpa"] == {**sections["flash_vs_sdpa"], "status": "skipped", "data": None,
                                         "reason": "flash-attn is not installed"}
    assert sections["methods"]["status"] == "ok"
    assert sections["profile"]["status"] == "skipped" and "budget" in sections["profile"]["reason"]
    assert sections["train_step"]["status"] == "skipped" and "--sections" in sections["train_step"]["reason"]
    md = render_markdown(doc)
    assert "## decode: error" in md and "RuntimeError: boom" in md and "flash-attn is not installed" in md
    assert "(not rendered: KeyError" in md and "## methods: ok" in md  # a section's odd data: the rest still renders


@pytest.mark.parametrize("argv, message", [
    (["--sections", "prefil"], "unknown section(s) prefil"),
    (["--budget-s", "0"], "--budget-s must be > 0"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--output", __file__], "is not a directory"),
])
def test_bad_arguments_exit_2_with_one_line(suite, capsys, argv, message):
    assert suite.main(["--smoke", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------------ the smoke run
def _numbers(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield path, x
    elif x in ("NaN", "Infinity", "-Infinity"):
        yield path, float(x.lower().replace("infinity", "inf"))


@pytest.mark.slow
def test_smoke_run_writes_every_section(suite, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # what main sets; restored afterwards
    out = tmp_path / "gpu"
    assert suite.main(["--smoke", "--output", str(out)]) == 0
    doc = json.loads((out / "gpu_suite.json").read_text())
    assert doc["schema_version"] == 1 and doc["smoke"] is True and doc["elapsed_s"] <= doc["budget_s"]
    assert doc["environment"]["torch"] and doc["environment"]["attention_implementations"]["sdpa"] == "available"
    assert list(doc["sections"]) == list(suite.SECTIONS)
    for name, entry in doc["sections"].items():
        assert entry["status"] == "ok", (name, entry.get("error"), entry.get("traceback"))
        assert entry["seconds"] > 0 and isinstance(entry["data"], dict)
    for path, value in _numbers(doc):
        assert math.isfinite(value), path
        if "ratio" in path.rsplit(".", 1)[-1]:
            assert value > 0, path
    s = {name: entry["data"] for name, entry in doc["sections"].items()}

    prefill = s["prefill"]["rows"]
    assert len(prefill) == 2 * 2 * 4  # sdpa + eager (flash's stand-in), ttft + llm, baseline + three p-MoD
    assert all(r["latency_ratio"] == 1.0 and r["flops_ratio"] == 1.0 for r in prefill if r["variant"] == "baseline")
    assert all(0 < r["flops_ratio"] < 1 for r in prefill if r["variant"] != "baseline")

    decode = s["decode"]
    assert sorted({(r["batch"], r["variant"]) for r in decode["rows"]}) == [
        (1, "baseline"), (1, "p-MoD-0.5"), (2, "baseline"), (2, "p-MoD-0.5")]
    assert all(r["kv_ratio"] < 1 and r["kv_bytes_measured"] > 0 for r in decode["rows"] if r["variant"] != "baseline")
    assert {k: v["batch"] for k, v in decode["largest_batch"].items()} == {"baseline": 4, "p-MoD-0.5": 4}

    flash = s["flash_vs_sdpa"]
    assert flash["candidate"] == "eager" and len(flash["cases"]) == 4
    assert {c["padding_tokens"] > 0 for c in flash["cases"]} == {False, True}
    assert flash["max_abs_delta"] < 1e-3 and all(c["argmax_agreement"] == 1.0 for c in flash["cases"])
    assert all(len(c["max_abs_delta_per_step"]) == 7 for c in flash["cases"])  # prefill + 6 decode steps

    train = s["train_step"]
    assert train["layers"] == 8 and train["layers_tried"] == [[8, "ok"]] and 0 < train["train_flops_ratio"] < 1

    profile = s["profile"]
    assert [r["variant"] for r in profile["rows"]] == ["baseline", "p-MoD-0.3", "p-MoD-0.4", "p-MoD-0.5"]
    assert all(r["ttft_ms"] > 0 and r["decode_ms_per_token"] > 0 for r in profile["rows"])
    assert (Path(profile["run_dir"]) / "run.json").is_file()

    methods = {r["spec"].split(":")[0]: r for r in s["methods"]["rows"]}
    assert set(methods) == {"vanilla", "p-MoD-0.5", "fastv", "pyramiddrop", "visionzip"}
    target = methods["p-MoD-0.5"]["llm_flops_ratio"]
    assert all(abs(r["llm_flops_ratio"] - target) / target < 0.1 for r in methods.values() if r["spec"] != "vanilla")

    md = (out / "gpu_suite.md").read_text()
    assert all(f"## {name}: ok" in md for name in suite.SECTIONS)


def _smoke_suite(suite, tmp_path):
    plan = suite.smoke_plan(suite.parse_args(["--smoke"]))
    return suite.Suite(plan, tmp_path, budget_s=600, log=lambda msg: None)


def test_out_of_memory_is_caught_per_batch_size(suite, tmp_path, monkeypatch):
    """The largest-batch search on a GPU that holds 5 samples: every larger batch raises CUDA's out-of-memory."""
    import torch

    from pmod_bench.profiler import latency
    from pmod_bench.profiler.latency import Stats, Timing

    def fake_generation(model, batch, gen_tokens, warmup, repeats, device):
        b = batch["input_ids"].shape[0]
        if b > 5:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {b} GiB")
        return Timing(Stats.of([10.0 * b]), Stats.of([2.0 * b] * 3), None, 123 * b)

    monkeypatch.setattr(latency, "time_generation", fake_generation)
    s = _smoke_suite(suite, tmp_path)
    s.plan = suite.Plan(**{**suite.asdict(s.plan), "max_batch": 64, "refine": 3})
    known = {"tokens_per_s": 1.0, "decode_ms_per_step": 1.0, "peak_memory_bytes": None}
    out = suite.largest_batch(s, "baseline", model=None, start=2, known=known)
    assert out["tried"] == [[4, "ok"], [8, "out of memory"], [6, "out of memory"], [5, "ok"]]
    assert (out["batch"], out["first_failing_batch"], out["peak_memory_bytes"]) == (5, 6, 615)
    assert out["tokens_per_s"] == pytest.approx(5 / 10e-3)  # 5 sequences per 10 ms step
    assert suite.is_oom(RuntimeError("CUDA error: out of memory")) and not suite.is_oom(ValueError("out of memory"))


def test_train_step_falls_back_to_fewer_layers_on_out_of_memory(suite, tmp_path, monkeypatch):
    import torch

    import bench_train

    def fake_measure(arch, shift, batch_size, text_tokens, repeats, warmup, device, dtype, image=None):
        if arch.text.layers > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        assert image == (64, 64) and batch_size == 1
        med = {"baseline": 2.0, "p-MoD": 1.5}
        return med, {k: [v] for k, v in med.items()}

    monkeypatch.setattr(bench_train, "measure", fake_measure)
    data = suite.section_train(_smoke_suite(suite, tmp_path))
    assert data["layers"] == 4 and data["layers_tried"] == [[8, "out of memory"], [4, "ok"]]
    assert data["step_time_ratio"] == 0.75 and 0 < data["train_flops_ratio"] < 1
