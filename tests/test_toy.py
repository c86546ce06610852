"""The toy world: generator determinism and schema, scorers, the token -> region map, and the whole
pipeline end to end (`pmod-bench reproduce --toy --quick`) asserting real numbers."""

from __future__ import annotations

import json
import random

import pytest


def test_scenes_and_questions_are_deterministic():
    from pmod_bench.toy.data import benchmark_docs
    from pmod_bench.toy.world import render, sample_scene

    a, b = sample_scene(random.Random(3)), sample_scene(random.Random(3))
    assert a == b and render(a).tobytes() == render(b).tobytes()
    d1, d2 = benchmark_docs(n=6), benchmark_docs(n=6)
    assert set(d1) == {("exist", "random"), ("exist", "popular"), ("exist", "adversarial"), ("attribute", "test"),
                       ("count", "test"), ("mc", "test"), ("text", "test"), ("ground", "test")}
    for key in d1:
        assert len(d1[key]) == 6
        for x, y in zip(d1[key], d2[key]):
            assert {k: v for k, v in x.items() if k not in ("image", "_scene")} == \
                   {k: v for k, v in y.items() if k not in ("image", "_scene")}
            assert x["image"].tobytes() == y["image"].tobytes()
    exist = d1[("exist", "adversarial")]
    assert [d["answer"] for d in exist].count("yes") == 3  # balanced like POPE
    for d in exist:  # adversarial negatives share the colour or shape of an object in the image
        if d["answer"] == "no":
            obj = d["question"].split("Is there a ")[1].split(" in the")[0]
            assert obj not in d["_scene"].objects()
            assert any(obj.split()[0] == o.split()[0] or obj.split()[1] == o.split()[1] for o in d["_scene"].objects())


def test_benchmark_hub_layout_loads_with_datasets(tmp_path):
    import datasets

    from pmod_bench.toy.data import HUB_ID, benchmark_ok, write_benchmark

    repo = write_benchmark(tmp_path, n=4)
    assert benchmark_ok(tmp_path, 4) and repo == tmp_path / HUB_ID
    assert "config_name: exist" in (repo / "README.md").read_text()
    ds = datasets.load_dataset(str(repo), "exist", cache_dir=str(tmp_path / "c"))
    assert set(ds) == {"random", "popular", "adversarial"} and ds["random"][0]["image"].size[0] in (48, 64, 80, 96)
    ground = datasets.load_dataset(str(repo), "ground", split="test", cache_dir=str(tmp_path / "c"))
    assert len(ground[0]["bbox"]) == 4 and ground[0]["answer"][0].startswith("the ")


def test_suite_and_scorers():
    from pmod_bench.tasks.benchmarks import BENCHMARKS, SUITES, resolve_suite
    from pmod_bench.tasks.toy_utils import parse_letter, toy_exact_process_results, toy_mc_process_results

    assert [b.key for b in resolve_suite("toy")] == list(SUITES["toy"])
    assert not set(SUITES["toy"]) & set(BENCHMARKS) and not set(SUITES["toy"]) & set(SUITES["all"])
    opts = ["circle", "square", "triangle", "diamond"]
    assert parse_letter("B", opts) == "B" and parse_letter("(C) triangle", opts) == "C"
    assert parse_letter("the square", opts) == "B" and parse_letter("no idea", opts) is None
    assert toy_mc_process_results({"options": opts, "answer": "D"}, [" D"]) == {"accuracy": 1.0, "unparsed": 0.0}
    assert toy_exact_process_results({"answer": "red"}, [" Red."])["exact_match"] == 1.0
    from lmms_eval.tasks.refcoco.utils_rec import refcoco_bbox_rec_acc05, refcoco_bbox_rec_iou

    from pmod_bench.tasks.toy_utils import toy_ground_process_results

    doc = {"answer": ["the red circle"], "question_id": "g", "bbox": [0.5, 0.5, 0.75, 0.75]}
    rows = [toy_ground_process_results(doc, [r]) for r in (" [0.75, 0.75, 1.00, 0.50]", " [0.5, 0.5, 0.75, 0.75]", "no box")]
    assert rows[0]["refcoco_IoU"]["pred"] == [0, 0, 0, 0]  # an inverted box is no box (its union would be 0)
    assert refcoco_bbox_rec_iou([r["refcoco_IoU"] for r in rows]) == pytest.approx(1 / 3)
    assert refcoco_bbox_rec_acc05([r["refcoco_ACC@0.5"] for r in rows]) == pytest.approx(1 / 3)


def test_token_regions_match_the_models_vision_tokens():
    import torch

    from pmod_bench import load_model
    from pmod_bench.toy.routing import token_regions
    from pmod_bench.toy.world import SIZES, Scene, render

    import pmod_bench

    pmod_bench.register()
    model, processor = load_model("tiny")
    for size in SIZES:
        image = render(Scene(size, (220, 220, 220)))
        inputs = processor(images=image, text="<image>\nhi", return_tensors="pt")
        n = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
        regions = token_regions(model, processor, size)
        assert len(regions) == n, size
        boxes = [r for r in regions[16:] if r is not None]
        assert max(r[2] for r in boxes) == pytest.approx(size[0]) and max(r[3] for r in boxes) == pytest.approx(size[1])
        assert torch.is_tensor(inputs["pixel_values"])


def test_every_toy_recipe_loads_and_chains_the_stages():
    from pmod_bench.toy.models import MODELS, PT, SFT
    from pmod_bench.train.config import load_recipe, recipe_command

    for m in (PT, SFT, *MODELS.values()):
        src = ["model.source=/x/models/sft"] if m.derived else ["model.llm=/x/lm", "model.vision_tower=/x/vision"]
        cfg = load_recipe(m.recipe_path, src + ["data.json=/x/d.json"])
        assert cfg.stage == ("pt" if m is PT else "sft") and recipe_command(m.recipe_path).startswith("pmod-bench train")
        assert (cfg.pmod is None) == (m.name in ("pt", "sft", "baseline")), m.name
        if m.derived:  # every model continues the shared SFT with the same data, steps and learning rate
            assert cfg.train.lr == load_recipe(MODELS["baseline"].recipe_path, src).train.lr


def test_training_conversations_ask_distinct_questions():
    from pmod_bench.toy.questions import SHORT, conversation, popularity
    from pmod_bench.toy.world import sample_scene

    rng = random.Random(5)
    for _ in range(20):
        sc = sample_scene(rng)
        conv = conversation(sc, rng, 10, popularity([sc]))
        asked = [t["value"] for t in conv[::2]]
        assert asked[0].startswith("<image>\n") and len(set(asked)) == len(asked)
        assert not any(q.endswith(SHORT) for q in asked[1:])  # the instruction once per conversation


#: chance level of each toy benchmark (always "yes"; uniform over options; the most frequent answer)
CHANCE = {"Toy-Exist": 66.7, "Toy-Attr": 22.0, "Toy-Count": 43.0, "Toy-MC": 25.0, "Toy-Text": 23.0, "Toy-Ground": 0.0}


def test_shipped_checkpoints_are_those_of_the_current_recipes_and_code():
    """The shipped checkpoints' key is the checkpoint key of today's recipes, data generator and prepare code: a change
    to any of them without ``python -m pmod_bench.toy.ship`` would ship weights the code no longer produces. Every
    shipped file is listed with the hash it has."""
    import hashlib

    from pmod_bench.toy.models import QUICK
    from pmod_bench.toy.pipeline import FULL, SHIPPED

    manifest = json.loads((SHIPPED / "MANIFEST.json").read_text())
    assert manifest["checkpoint_key"] == FULL.key(), "recipes or toy code changed: run python -m pmod_bench.toy.ship"
    assert set(manifest["files"]) == set(QUICK)
    for name, files in manifest["files"].items():
        for f, digest in files.items():
            assert hashlib.sha256((SHIPPED / name / f).read_bytes()).hexdigest() == digest, (name, f)


def test_the_last_routed_layers_router_gets_no_gradient_and_stays_zero():
    """What the README says of the trained routers: the last p-MoD layer's vision outputs feed no later layer and no
    loss, so its router never moves from its zero initialisation, while every earlier router trains."""
    from safetensors.torch import load_file

    from pmod_bench.toy.pipeline import SHIPPED

    for name in ("p-MoD-0.5", "p-MoD-0.3"):
        t = load_file(str(SHIPPED / name / "model.safetensors"))
        layers = sorted({int(k.split(".layers.")[1].split(".")[0]) for k in t if ".router." in k})
        assert len(layers) >= 6, (name, layers)
        last = [k for k in t if f".layers.{layers[-1]}.router." in k]
        assert len(last) == 2 and all(float(t[k].abs().max()) == 0.0 for k in last), name
        for l in layers[:-1]:
            assert float(t[next(k for k in t if f".layers.{l}.router.weight" in k)].abs().max()) > 0.1, (name, l)


def test_probe_reads_colour_shape_and_their_pair_from_the_shipped_tower():
    """The shipped baseline's (frozen) tower, probed as ``python -m pmod_bench.toy.probe`` does: colour, shape and the
    (colour, shape) pair are read linearly from LLaVA's features of shape patches (measured on the shipped checkpoint,
    150 scenes: 99.8%, 98.4%, 98.5%). Where the patch is in its crop is read at 15% (chance 6%): the tower is
    pretrained on labels, not places (a position head raises it to 100% but did not move grounding; README)."""
    from pmod_bench.toy.pipeline import SHIPPED
    from pmod_bench.toy.probe import main, pair_probe

    acc = pair_probe(str(SHIPPED / "baseline"), scenes=150, steps=300)
    assert acc["patches"] > 2000 and min(acc["colour"], acc["shape"], acc["pair"]) > 0.95, acc
    assert 1 / 16 < acc["position"] < 0.5, acc
    assert main([str(SHIPPED)]) == 2  # not a checkpoint: one line, exit 2


@pytest.mark.slow
def test_reproduce_toy_quick_gives_real_numbers(tmp_path, monkeypatch):
    """The toolkit's own end-to-end test: shipped checkpoints -> lmms-eval -> profile -> routers -> report.

    Thresholds are calibrated on the shipped checkpoints (``python -m pmod_bench.toy.ship``) with --quick's 30
    documents per task; the measured values are in the comments (greedy decoding: they repeat exactly on the same
    software stack; the margins are for other versions)."""
    from pmod_bench.cli import main
    from pmod_bench.toy.pipeline import SHIPPED
    from pmod_bench.toy.report import average

    if not (SHIPPED / "MANIFEST.json").is_file():
        pytest.skip("no shipped toy checkpoints (python -m pmod_bench.toy.ship writes them); --quick would train for ~25 min")
    monkeypatch.setenv("PMOD_BENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "toy"
    assert main(["reproduce", "--toy", "--quick", "--quiet", "--output", str(out)]) == 0
    state = json.loads((out / "reproduce.json").read_text())
    assert set(state["sources"].values()) == {str(SHIPPED / m) for m in ("baseline", "p-MoD-0.5", "p-MoD-0.3")}
    data = json.loads((out / "report" / "data.json").read_text())
    scores = data["scores"]
    assert set(scores) == {"baseline", "p-MoD-0.5", "p-MoD-0.3"}
    base, pmod05, pmod03 = (average(scores[m]) for m in ("baseline", "p-MoD-0.5", "p-MoD-0.3"))
    for m, v in scores.items():  # every benchmark scored from a run, as a percentage
        assert set(v) == set(CHANCE) and all(0.0 <= x <= 100.0 for x in v.values()), (m, v)
    # Measured on the shipped checkpoints (--quick, 30 documents a task; AVG with its 95% bootstrap interval):
    # baseline Exist 93.5 Attr 96.7 Count 93.3 MC 73.3 Text 93.3 Ground 6.7, AVG 76.1 [71.9, 80.0];
    # p-MoD-0.5 93.5 83.3 93.3 73.3 90.0 13.3, AVG 74.5 [69.5, 78.6]; p-MoD-0.3 89.1 76.7 96.7 76.7 90.0 6.7, AVG 72.6
    # [67.9, 76.8]. The baseline answers existence, attributes, counts, multiple choice and digits from the image (the
    # LM pretrained for 1500 steps); grounding stays near chance; the p-MoD models keep every skill but grounding.
    b = scores["baseline"]
    assert b["Toy-Exist"] > 85 and b["Toy-Attr"] > 85 and b["Toy-Count"] > 85 and b["Toy-Text"] > 85, b
    assert b["Toy-MC"] > 63, b  # the letter, not a constant answer (best constant: 43.3)
    assert base > 70 and pmod05 > 68 and pmod03 > 66 and scores["p-MoD-0.5"]["Toy-Text"] > 80, (base, pmod05, pmod03)
    for m, iv in data["intervals"].items():  # AVG's 95% bootstrap interval holds it; n is 30 a task (90: existence)
        assert iv["avg_low"] < iv["avg"] < iv["avg_high"] and iv["avg_high"] - iv["avg_low"] > 3, (m, iv)
        assert iv["n"] == {"Toy-Exist": 90, "Toy-Attr": 30, "Toy-Count": 30, "Toy-MC": 30, "Toy-Text": 30, "Toy-Ground": 30}
    diffs = {(d["model"], d["reference"]): d for d in data["differences"]}
    d05 = diffs[("p-MoD-0.5", "baseline")]  # measured -1.7 [-5.9, +2.0]: not claimed (full run: -1.0 [-3.5, +1.4])
    assert d05["low"] <= d05["diff"] <= d05["high"] and d05["distinguishable"] == (d05["high"] < 0 or d05["low"] > 0)
    assert -5 < d05["diff"] < 1 and d05["high"] - d05["low"] > 3 and not d05["distinguishable"], d05
    # the control: on blanked images the baseline answers "no" / "0" / no digit: measured Exist F1 0.0 (accuracy 50.0)
    # Attr 26.7 Count 20.0 MC 46.7 Text 6.7 Ground 3.3 (AVG 17.2); chance (best constant answer) 66.7 (accuracy 50.0)
    # 20.0 43.3 43.3 23.3 10.0. F1 counts only "yes": the blanked images' right "no" is judged by existence accuracy.
    # At 30 documents one answer is 3.3 points: each task within 10 of its chance level (full run, 60 a split: Attr
    # 18.3 against 20.0, MC 36.7 against 38.3)
    blank, chance = data["controls"]["baseline, blanked images"], data["controls"]["chance (best constant answer)"]
    assert blank["avg"] < 22 and base - blank["avg"] > 50, (blank, base)
    for bench, v in blank["scores"].items():
        assert v <= chance["scores"][bench] + 10, (bench, v, chance["scores"][bench])
    assert abs(blank["exist_accuracy"] - 50.0) <= 5 and chance["exist_accuracy"] == pytest.approx(50.0), blank
    assert data["intervals"]["baseline"]["exist_accuracy"] > 85  # measured 93.3
    assert "text only (question prior)" in data["controls"] and "Control" in (out / "report" / "controls.md").read_text()
    prof = data["profile"]
    # measured: 54.6% (p-MoD-0.5) and 41.2% (p-MoD-0.3) of the baseline's prefill FLOPs with 10 text and 88 vision
    # tokens (the toy template, no system prompt); KV cache 53.4% / 39.8%
    assert prof["baseline"]["text_tokens"] <= 12 and prof["baseline"]["vision_tokens"] == 88
    assert 0.52 < prof["p-MoD-0.5"]["tflops_ratio"] < 0.6 and prof["p-MoD-0.3"]["tflops_ratio"] < prof["p-MoD-0.5"]["tflops_ratio"]
    t1 = (out / "report" / "table1.md").read_text()
    assert "–" not in t1.split("\n", 4)[-1]  # every cell of Table 1 filled from runs
    for f in ("tradeoff.png", "tradeoff.pdf", "routing.png", "fig5_p-MoD-0_5.png", "fig6_p-MoD-0_5.png", "index.md"):
        assert (out / "report" / f).stat().st_size > 0, f
    r5, r3 = data["routing"]["p-MoD-0.5"], data["routing"]["p-MoD-0.3"]
    for r in (r5, r3):
        assert 0.0 < r["shape_area"] < r["tokens_on_shapes"] < 1.0 and 0.0 < r["kept_on_shapes"] < 1.0
    # measured keep rate of shape / background tokens over the p-MoD layers (8 images): p-MoD-0.3 46.0% / 38.4%, 1.20x;
    # p-MoD-0.5 37.6% / 38.8%, 0.97x: its layers disagree (layer 2 keeps the background, 56% / 96%; layer 3 the shapes,
    # 80% / 46%; layer 6 36% / 5%). Each model has layers whose router keeps shape tokens at > 1.5x background ones
    assert r3["keep_rate_shape_tokens"] > 1.1 * r3["keep_rate_background_tokens"], r3
    for r in (r5, r3):
        assert 0.0 < r["keep_rate_background_tokens"] < 1.0 and 0.0 < r["keep_rate_shape_tokens"] < 1.0, r
        shape_layers = [k for k, x in r["layers"].items() if x["keep_rate_shape_tokens"] > 1.5 * x["keep_rate_background_tokens"]]
        assert len(shape_layers) >= 2, r["layers"]
    # resume: a second invocation recomputes nothing and gives the same report
    assert main(["reproduce", "--toy", "--quick", "--quiet", "--output", str(out)]) == 0
    assert json.loads((out / "report" / "data.json").read_text())["scores"] == scores


def test_jobs_run_side_by_side_with_their_output_in_their_logs(tmp_path):
    """pmod_bench.toy.parallel: a job's output (also what a subprocess of it writes to the file descriptors) goes to
    its log; results come back through futures, from worker processes or inline (jobs=1); a failing job fails
    its future only."""
    import os
    import subprocess
    import sys
    import textwrap

    from pmod_bench.toy.parallel import Jobs, call_job, default_jobs, tail

    assert 1 <= default_jobs() <= 4
    for n in (1, 2):
        with Jobs(n) as jobs:
            echo = jobs.submit(call_job, subprocess.call, {"args": [sys.executable, "-c", "print('from the job')"]},
                               str(tmp_path / f"echo{n}.log"))
            short = jobs.submit(call_job, textwrap.shorten, {"text": "one two three", "width": 9}, None)
            bad = jobs.submit(call_job, os.rmdir, {"path": str(tmp_path / "not-there")}, str(tmp_path / f"bad{n}.log"))
            assert echo.result() == 0 and short.result() == "one [...]"
            with pytest.raises(FileNotFoundError):
                bad.result()
        assert tail(tmp_path / f"echo{n}.log") == "from the job"
    assert tail(tmp_path / "missing.log") == ""


def test_a_failing_model_does_not_stop_the_others(tmp_path):
    """Reproduction._collect: every job is waited for and finished; the first failure is raised after them."""
    from concurrent.futures import Future

    from pmod_bench.toy.pipeline import FULL, Reproduction

    rep = Reproduction(tmp_path, FULL)
    futures = {}
    for name, value in (("a", 1), ("b", None), ("c", 3)):
        f: Future = Future()
        if value is None:
            f.set_exception(RuntimeError("training b failed (exit code 1)"))
        else:
            f.set_result(value)
        futures[f] = name
    done = []
    with pytest.raises(RuntimeError, match="training b failed"):
        rep._collect(futures, lambda name, result: done.append((name, result)))
    assert sorted(done) == [("a", 1), ("c", 3)]


def test_reproduce_refuses_a_bad_jobs_count_before_writing(tmp_path, capsys):
    from pmod_bench.cli import main

    assert main(["reproduce", "--toy", "--jobs", "0", "--output", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert "--jobs 0" in err and ">= 1" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def _pope_sample(pred: str, gt: str) -> dict:
    r = {"question_id": "q", "score": float(pred == gt), "prediction": pred, "ground_truth": gt}
    return {m: r for m in ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score")}


def test_bootstrap_scores_match_lmms_eval_and_claim_only_clear_differences():
    """pmod_bench.toy.stats: point scores are lmms-eval's own aggregates (POPE F1 here); AVG's interval holds it; a
    model compared with itself differs by an interval of exactly 0 (not claimed), a clearly better one is claimed."""
    from lmms_eval.tasks.pope.utils import pope_aggregate_f1_score

    from pmod_bench.toy.stats import BENCHES, LEAVES, difference, interval, sample_values, summarise

    rng = random.Random(0)
    truth = [rng.choice(("yes", "no")) for _ in range(40)]
    preds = [t if rng.random() < 0.7 else rng.choice(("yes", "no", "maybe")) for t in truth]
    samples = [_pope_sample(p, t) for p, t in zip(preds, truth)]
    docs = {leaf: [(i, sample_values(leaf, s)) for i, s in enumerate(samples)] for leaf in LEAVES if "exist" in leaf}
    exact = [float(rng.random() < 0.6) for _ in range(40)]
    for leaf in ("pmod_toy_attribute", "pmod_toy_count", "pmod_toy_text"):
        docs[leaf] = [(i, sample_values(leaf, {"exact_match": v})) for i, v in enumerate(exact)]
    docs["pmod_toy_mc"] = [(i, sample_values("pmod_toy_mc", {"accuracy": v})) for i, v in enumerate(exact)]
    box = {"bbox": [0.0, 0.0, 0.5, 0.5], "pred": [0.0, 0.0, 0.5, 0.45], "answer": "the red circle", "ann_id": "g"}
    miss = {**box, "pred": [0.6, 0.6, 1.0, 1.0]}
    docs["pmod_toy_ground"] = [(i, sample_values("pmod_toy_ground", {"refcoco_ACC@0.5": box if i % 4 == 0 else miss}))
                               for i in range(40)]
    s = summarise(docs)
    assert s["scores"]["Toy-Exist"] == pytest.approx(100 * pope_aggregate_f1_score([x["pope_f1_score"] for x in samples]))
    assert s["scores"]["Toy-Ground"] == pytest.approx(25.0) and s["n"]["Toy-Exist"] == 120 and s["n"]["Toy-MC"] == 40
    lo, hi = interval(s["boot_avg"])
    assert s["avg"] == pytest.approx(sum(s["scores"][b] for b in BENCHES) / 6)
    assert lo < s["avg"] < hi and hi - lo > 2
    same = difference(s, summarise(docs))
    assert same["diff"] == 0 and same["low"] == same["high"] == 0 and not same["distinguishable"]
    better = {k: [(i, [1.0]) for i, _ in v] if "exist" not in k else v for k, v in docs.items()}
    d = difference(summarise(better), s)
    assert d["distinguishable"] and d["low"] > 0


def test_existence_accuracy_puts_an_all_no_answerer_at_chance_where_f1_gives_zero():
    """A blank image rightly answered "no" every time: POPE F1 0 (it counts "yes" answers only), POPE accuracy 50;
    the accuracy is lmms-eval's own, and the controls table shows it beside F1."""
    from lmms_eval.tasks.pope.utils import pope_aggregate_accuracy

    from pmod_bench.toy.report import build_tables
    from pmod_bench.toy.stats import LEAVES, exist_accuracy, sample_values, summarise

    rng = random.Random(1)
    truth = ["yes", "no"] * 20
    preds = [t if rng.random() < 0.8 else ("no" if t == "yes" else "yes") for t in truth]
    samples = [_pope_sample(p, t) for p, t in zip(preds, truth)]
    leaves = [leaf for leaf in LEAVES if "exist" in leaf]
    docs = {leaf: [(i, sample_values(leaf, x)) for i, x in enumerate(samples)] for leaf in leaves}
    assert exist_accuracy(docs) == pytest.approx(100 * pope_aggregate_accuracy([x["pope_accuracy"] for x in samples]))
    blank = {leaf: [(i, sample_values(leaf, _pope_sample("no", t))) for i, t in enumerate(truth)] for leaf in leaves}
    b = summarise(blank)
    assert b["scores"]["Toy-Exist"] == 0.0 and b["exist_accuracy"] == pytest.approx(50.0)
    assert exist_accuracy({"pmod_toy_count": [(0, [1.0])]}) is None
    pub = {"scores": {"Toy-Exist": 0.0}, "n": {"Toy-Exist": 120}, "avg": None, "avg_low": None, "avg_high": None,
           "exist_accuracy": 50.0}
    data = {"scores": {"baseline": {"Toy-Exist": 90.0}}, "n": {}, "profile": {}, "train": {},
            "intervals": {"baseline": {**pub, "exist_accuracy": 91.5}}, "controls": {"baseline, blanked images": pub}}
    t = build_tables(data)["controls"]
    col = t["columns"].index("Exist acc")
    assert t["columns"][-1].startswith("AVG") and [r[col] for r in t["rows"]] == [91.5, 50.0]


def test_blanked_benchmark_keeps_questions_and_sizes_and_has_its_own_datasets_cache(tmp_path):
    """pmod_bench.toy.controls: the blanked copy holds the same documents with images of one colour (the scene's
    background, same size); the toy task reads each copy through a datasets cache of its own (datasets would
    otherwise serve the first copy's cached images for the second)."""
    import datasets

    from pmod_bench.tasks.snapshots import snapshot_cache_dir as _datasets_cache
    from pmod_bench.toy.controls import blank_benchmark_ok, write_blank_benchmark
    from pmod_bench.toy.data import HUB_ID, write_benchmark

    repo = write_benchmark(tmp_path / "bench", n=4)
    blank = write_blank_benchmark(repo, tmp_path / "blank" / HUB_ID)
    assert blank_benchmark_ok(blank, repo) and not blank_benchmark_ok(repo, blank)
    assert _datasets_cache(repo) != _datasets_cache(blank)
    for config, split in (("exist", "adversarial"), ("text", "test"), ("ground", "test")):
        a = datasets.load_dataset(str(repo), config, split=split, cache_dir=_datasets_cache(repo))
        b = datasets.load_dataset(str(blank), config, split=split, cache_dir=_datasets_cache(blank))
        assert a.remove_columns("image").to_list() == b.remove_columns("image").to_list()
        for x, y in zip(a["image"], b["image"]):
            assert x.size == y.size and len(x.getcolors()) > 1 and len(y.getcolors()) == 1


def test_no_model_controls_score_like_the_tasks():
    """The chance control answers "yes" to every existence question (F1 66.7 on balanced splits) and the best constant
    otherwise; the text-only control answers each question with its most frequent training answer."""
    from collections import Counter

    from pmod_bench.toy.controls import chance_docs, text_only_docs
    from pmod_bench.toy.stats import summarise

    exist = [{"doc_id": i, "doc": {"question_id": f"e{i}", "question": "Is there a red circle in the image?",
                                   "answer": "yes" if i % 2 else "no"}, "target": "yes" if i % 2 else "no"} for i in range(10)]
    count = [{"doc_id": i, "doc": {"question_id": f"c{i}", "question": "How many squares are there?", "answer": a},
              "target": a} for i, a in enumerate("1112203112")]
    samples = {"pmod_toy_exist_random": exist, "pmod_toy_count": count}
    chance = summarise(chance_docs(samples))["scores"]
    assert chance["Toy-Exist"] == pytest.approx(200 / 3) and chance["Toy-Count"] == pytest.approx(50.0)
    prior = {"Is there a red circle in the image?": Counter(yes=3, no=1), "How many squares are there?": Counter({"2": 5, "1": 2})}
    text = summarise(text_only_docs(samples, prior))["scores"]
    assert text["Toy-Exist"] == pytest.approx(200 / 3) and text["Toy-Count"] == pytest.approx(30.0)


def test_toy_template_prompts_are_short_and_train_as_they_are_evaluated():
    """The toy chat template has no system prompt: an existence prompt is ~10 text tokens beside 88 vision tokens
    (>= 85% vision, as the paper's prompts are mostly image); the training text of a conversation (data.template=chat)
    starts with exactly the evaluation prompt, and no token joins a prompt to its answer (each answer is learned
    from the tokens the evaluation prompt ends with)."""
    from pmod_bench.toy.prepare import TOY_TEMPLATE, build_tokenizer
    from pmod_bench.toy.questions import SHORT, conversation, popularity
    from pmod_bench.toy.world import sample_scene
    from pmod_bench.train.data import render_chat

    tok = build_tokenizer(0)
    assert tok.chat_template == TOY_TEMPLATE
    render = lambda msgs, add_generation_prompt: tok.apply_chat_template(  # noqa: E731
        msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    question = "Is there a red circle in the image?" + SHORT
    prompt = render([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}], True)
    assert prompt == "USER: <image>\n" + question + " ASSISTANT:"
    text_tokens = len(tok(prompt)["input_ids"]) - 1
    assert text_tokens <= 12 and 88 / (88 + text_tokens) >= 0.85, text_tokens
    rng = random.Random(1)
    sc = sample_scene(rng)
    conv = conversation(sc, rng, 20, popularity([sc]))
    assert len(conv) == 40  # twenty distinct questions about one scene
    turns = [("human" if i % 2 == 0 else "gpt", t["value"]) for i, t in enumerate(conv)]
    text, spans = render_chat(turns, render, "<image>")
    first = render([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": turns[0][1].removeprefix("<image>\n")}]}], True)
    assert text.startswith(first) and len(spans) == 20
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    for s, e in spans:  # every token is inside an answer span or outside all of them
        for a, b in enc["offset_mapping"]:
            assert b <= s or a >= s, (text[a:b], text[s:e])


def test_ship_writes_the_same_tokenizer_config_online_and_offline(tmp_path):
    """transformers records how a tokenizer was loaded (``local_files_only``, from the environment) in the config it
    saves; the shipped files drop it, so two regenerations in different environments hash the same."""
    from pmod_bench.toy.ship import normalise_tokenizer_config

    texts = []
    for offline in (True, False):
        path = tmp_path / f"{offline}.json"
        path.write_text(json.dumps({"is_local": True, "local_files_only": offline, "model_max_length": 2048}, indent=2))
        normalise_tokenizer_config(path)
        texts.append(path.read_text())
    assert texts[0] == texts[1] and "local_files_only" not in texts[0] and json.loads(texts[0])["model_max_length"] == 2048
