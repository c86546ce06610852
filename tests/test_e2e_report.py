"""End to end through the real CLI: profile + eval run directories from the tiny model, then report."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from pmod_bench.cli import main


@pytest.mark.slow
def test_profile_eval_report_end_to_end(tmp_path):
    data, prof, out = tmp_path / "data", tmp_path / "profile", tmp_path / "report"
    assert main(["data", "fixtures", str(data), "--suite", "ablation"]) == 0
    assert main(["profile", "--arch", "tiny", "--shift", "0.3", "0.4", "0.5", "--image-size", "64x48",
                 "--no-latency", "--output", str(prof), "--quiet"]) == 0
    evals = {"baseline": tmp_path / "eval-base", "p-MoD-0.5": tmp_path / "eval-pmod"}
    for variant, model in (("baseline", "tiny:vanilla"), ("p-MoD-0.5", "tiny")):
        rc = main(["eval", "--model", model, "--suite", "ablation", "--output", str(evals[variant]), "--limit", "2",
                   "--batch-size", "4", "--data", str(data), "--gen-kwargs", "max_new_tokens=4", "--introspect"])
        assert rc == 0
    assert main(["report", str(prof), *map(str, evals.values()), "--output", str(out)]) == 0

    # every expected file exists, and index.md links them
    index = (out / "index.md").read_text()
    for n in range(1, 13):
        for ext in ("md", "tex", "csv"):
            assert (out / "tables" / f"table{n}.{ext}").is_file()
        assert f"table{n}.md" in index
    pngs = sorted((out / "figures").glob("*.png"))
    stems = {p.stem for p in pngs}
    assert stems >= {"tradeoff", "fig4_retention_schedules"}
    assert any(s.startswith("fig5_token_selection") for s in stems) and any(s.startswith("fig6_selection_map") for s in stems)
    assert not (evals["baseline"] / "introspection.json").exists()  # the vanilla model has no routing
    intro = json.loads((evals["p-MoD-0.5"] / "introspection.json").read_text())
    assert intro["grid"] == [4, 4] and set(intro["layers"]) == {"2", "3", "4", "5", "6", "7"}
    for png in pngs:
        with Image.open(png) as im:
            im.verify()
        assert png.with_suffix(".pdf").is_file()

    # Table 7: the tiny runs are not the paper's model, so they get their own "measured" lines (never a paper row's)
    rows = json.loads((prof / "profile.json").read_text())["rows"]
    by_variant = {r["variant"]: r for r in rows}
    with open(out / "tables" / "table7.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert not [r for r in table if r["line"] in ("reproduced", "diff")], table
    measured = {r["key"]: r for r in table if r["line"] == "measured"}
    assert set(measured) >= {"tiny/baseline", "tiny/p-MoD-0.5"}, table
    pmod_row = measured["tiny/p-MoD-0.5"]
    assert pmod_row["Model"] == "tiny · p-MoD-0.5"
    assert float(pmod_row["TFLOPs"]) == pytest.approx(by_variant["p-MoD-0.5"]["prefill_tflops_paper"], rel=1e-2, abs=5e-3)
    assert float(pmod_row["KV cache"]) == pytest.approx(100 * by_variant["p-MoD-0.5"]["kv_cache_ratio"], abs=0.051)
    summary = json.loads((evals["p-MoD-0.5"] / "summary.json").read_text())["rows"]
    doc = next(r for r in summary if r["benchmark"] == "Doc")
    assert float(pmod_row["Doc"]) == pytest.approx(doc["value"], abs=0.051)
    assert "not a paper model" in index and "llava-next-7b (--default-model)" not in index
