"""Every adapter task end to end through lmms-eval on its fixture, in one process.

1. The tiny random-weight p-MoD model on all 18 benchmarks (prompt building, batched generation,
   answer parsing, the metric, the summary row).
2. An oracle model that answers each question with its ground truth: every benchmark must score
   100 in paper units (MME: 200 per perception category present), which pins each adapter's
   metric, its results key and its scale.
3. Every shipped adapter YAML loads (TaskManager), and suites name known benchmarks.
"""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("lmms_eval")

from pmod_bench.tasks import TASKS_DIR, tasks_dir  # noqa: E402
from pmod_bench.tasks.benchmarks import BENCHMARKS, SUITES, VIDEO_BENCHMARKS, resolve_suite  # noqa: E402
from conftest import benchmark_data_env, oracle_lm  # noqa: E402
from pmod_bench.tasks.runner import EvalConfig, run_eval  # noqa: E402


@pytest.fixture(scope="module")
def data_env(tmp_path_factory):
    """Fixtures of all benchmarks + an isolated datasets cache, as environment for the module."""
    yield from benchmark_data_env(tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_lm():
    from pmod_bench.model.presets import build_preset, random_routers
    from pmod_bench.tasks.plugin import PMoDLlava

    model, processor = build_preset("tiny")
    random_routers(model)
    return PMoDLlava.from_loaded(model, processor, name="tiny", batch_size=8)


@pytest.mark.slow
def test_all_adapters_run_with_tiny_model(data_env, tiny_lm, tmp_path):
    cfg = EvalConfig(model="tiny", suite="all", output=str(tmp_path / "run"), batch_size=8, gen_kwargs="max_new_tokens=3")
    out = run_eval(cfg, lm=tiny_lm, log=lambda m: None)
    assert out.failures == {}
    rows = {r["benchmark"]: r for r in out.rows}
    assert list(rows) == list(SUITES["all"])  # the paper's order
    for key, bench in BENCHMARKS.items():
        r = rows[key]
        assert r["task"] == bench.result and r["metric"] == bench.metric
        assert math.isfinite(r["value"]) and 0 <= r["value"] <= (2000 if key == "MME" else 100)
        assert r["n"] > 0
    # fixture sizes after process_docs: SEED drops its video question, RefCOCO explodes expressions
    assert rows["SEED"]["n"] == 3 and rows["RefCOCO"]["n"] == 4 and rows["POPE"]["n"] == 6
    assert set(rows["POPE"]["components"]) == {"pmod_pope_adv", "pmod_pope_pop", "pmod_pope_random"}
    assert rows["MMB"]["n_unparsed"] is not None and rows["MMMU"]["n_unparsed"] is not None
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] and summary["model"] == "tiny" and len(summary["rows"]) == 18
    samples = (run / "lmms_eval" / "pmod_pope_full" / "samples_pmod_pope_adv.jsonl").read_text().splitlines()
    assert len(samples) == 2 and "resps" in json.loads(samples[0])
    assert tiny_lm.model_calls > 0


LETTERS = "ABCDEFGH"


def oracle_answer(task: str, doc: dict) -> str:
    if task == "pmod_vqav2_val":
        return doc["answers"][0]["answer"]
    if task in ("pmod_ok_vqa_val2014", "pmod_textvqa_val", "pmod_docvqa_val", "pmod_infovqa_val"):
        return doc["answers"][0]
    if task in ("pmod_ai2d", "pmod_scienceqa_img"):
        return LETTERS[int(doc["answer"])]
    if task.startswith("pmod_refcoco"):  # the normalised [x1, y1, x2, y2] box after process_docs
        return "[" + ", ".join(f"{x:.4f}" for x in doc["bbox"]) + "]"
    return str(doc["answer"])


@pytest.mark.slow
def test_oracle_scores_full_marks_in_paper_units(data_env, tmp_path):
    lm = oracle_lm(lambda task, doc, _request: oracle_answer(task, doc))
    out = run_eval(EvalConfig(model="oracle", suite="all", output=str(tmp_path / "oracle")), lm=lm, log=lambda m: None)
    assert out.failures == {}
    values = {r["benchmark"]: r["value"] for r in out.rows}
    expected = {k: 100.0 for k in BENCHMARKS}
    expected["MME"] = 400.0  # 2 perception categories in the fixture, 200 each (acc + acc+)
    assert values == pytest.approx(expected)
    unparsed = {r["benchmark"]: r["n_unparsed"] for r in out.rows if r["n_unparsed"] is not None}
    assert unparsed == {"MMB": 0, "MMMU": 0, "RefCOCO": 0, "RefCOCO+": 0, "RefCOCOg": 0}


def test_every_adapter_yaml_loads_and_suites_are_known():
    from lmms_eval.tasks import TaskManager

    from pmod_bench.tasks.benchmarks import benchmark_for_task
    from pmod_bench.tasks.lmms_task import PMoDTask

    tm = TaskManager(include_path=str(tasks_dir()), include_defaults=False)
    yamls = {p.stem: p for p in TASKS_DIR.rglob("*.yaml")}  # the adapters and the toy world's tasks (toy/)
    assert sorted(tm.all_tasks) == sorted(yamls)
    for name in tm.all_subtasks:
        cfg = tm._get_config(name)
        assert issubclass(cfg["class"], PMoDTask) and cfg["task"] == name
        assert benchmark_for_task(name) is not None, f"{name} is not part of any benchmark"
        first = yamls[name].read_text().splitlines()[0]
        model = "qwen2_5_vl" if benchmark_for_task(name).key in VIDEO_BENCHMARKS else "pmod_llava"  # pmod_llava: images
        assert first.startswith(f"# python -m lmms_eval --model {model}") and name in first
    for b in BENCHMARKS.values():
        assert all(t in tm.all_tasks for t in (*b.run, *b.components)), b.key
    assert [b.key for b in resolve_suite("ablation")] == ["Doc", "Chart", "Text", "GQA", "SEED", "MMB"]
    assert set(SUITES["all"]) == set(BENCHMARKS)
    with pytest.raises(ValueError, match="Did you mean 'table1'"):
        resolve_suite("tabel1")
