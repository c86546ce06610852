"""The profiler's latency statistics (spread, interleaving, unreliable ratios) and what the table says.

Timing is checked with stand-in models whose forward sleeps for scripted times: interleaving and the
spread arithmetic are then exact, whatever the machine's load.
"""

from __future__ import annotations

import re
import time
from types import SimpleNamespace

import pytest
import torch

from pmod_bench.cli import main
from pmod_bench.profiler import Scenario, profile
from pmod_bench.profiler.latency import UNRELIABLE_SPREAD, Stats, time_interleaved
from pmod_bench.profiler.render import format_table


class Scripted(torch.nn.Module):
    """A 'model' whose prefill (the call with pixel_values) sleeps for the next scripted time (a LLaVA config, so its
    host adapter adds no decode inputs)."""

    def __init__(self, name: str, prefill_s: list[float], calls: list[str]):
        super().__init__()
        self.config = SimpleNamespace(model_type="llava")
        self.name, self.times, self.calls = name, list(prefill_s), calls

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, past_key_values=None, **kw):
        if pixel_values is not None:
            self.calls.append(self.name)
            time.sleep(self.times.pop(0) if self.times else 0.0)
        return SimpleNamespace(logits=torch.zeros(input_ids.shape[0], 1, 4), past_key_values=None)


def test_repeats_are_interleaved_and_spread_is_reported():
    calls: list[str] = []
    models = {"baseline": Scripted("baseline", [0.0, 0.010, 0.010, 0.010], calls),
              "p-MoD": Scripted("p-MoD", [0.0, 0.005, 0.050, 0.005], calls)}
    batch = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "pixel_values": torch.zeros(1)}
    seen: list[str] = []
    t = time_interleaved(models, batch, gen_tokens=1, warmup=1, repeats=3, device="cpu", progress=seen.append)
    assert calls == ["baseline", "p-MoD"] + ["baseline", "p-MoD"] * 3  # warm-ups, then repeat by repeat
    assert seen[:2] == ["warm-up 1/1 · baseline", "warm-up 1/1 · p-MoD"] and "timing 3/3 · p-MoD" in seen
    p = t["p-MoD"].prefill
    assert p.n == 3 and p.min < p.median < p.max and p.max >= 50
    assert p.spread > UNRELIABLE_SPREAD and t["baseline"].prefill.spread < UNRELIABLE_SPREAD
    assert Stats.of([10.0, 10.0]).spread == 0.0


def _rows(arch: str, sizes, **kw):
    return [r.to_dict() for r in profile(arch, None, [Scenario(s) for s in sizes], latency=False, verify=False,
                                         recipe=None, **kw)]


def test_paper_values_only_in_the_papers_scenario():
    rows = _rows("llava-next-7b", [(672, 672), (640, 480)])
    text = format_table(rows)
    first, second = text.split("\n\n")[:2]

    def header(block: str) -> list[str]:
        return re.split(r"\s{2,}", block.splitlines()[1].strip())

    assert "672x672 image" in first and "paper" in header(first) and "39.46" in first
    assert "640x480 image" in second and "paper" not in header(second) and "39.46" not in second
    assert "the paper's numbers are for a 672x672 image with 58 text tokens only" in second
    assert [r["paper_scenario"] for r in rows] == [True] * 4 + [False] * 4


def test_paper_values_are_looked_up_by_the_rows_configuration():
    """Table 7's numbers go to the row whose pmod data is the paper's configuration, not to a display name."""
    from pmod_bench.model.config import PMoDConfig
    from pmod_bench.profiler.paper import paper_value, paper_variant

    rows = {r["variant"]: r for r in _rows("llava-next-7b", [(672, 672)])}
    renamed = {**rows["p-MoD-0.4"], "variant": "my-run"}  # p-MoD-0.4's configuration under another name
    impostor = {**rows["p-MoD-0.3"], "pmod": PMoDConfig(shift=0.3, max_ratio=0.9).to_dict()}  # named p-MoD-0.3
    assert paper_variant(renamed) == "p-MoD-0.4" and paper_value("llava-next-7b", renamed, "tflops") == 19.56
    assert paper_value("llava-next-7b", impostor, "tflops") is None and paper_value("tiny", renamed, "tflops") is None
    assert paper_value("llava-next-7b", rows["baseline"], "latency_ms") == 519.1
    text = format_table([rows["baseline"], renamed, impostor])
    line = lambda name: next(ln for ln in text.splitlines() if ln.startswith(name))  # noqa: E731
    assert "19.56" in line("my-run") and "47.5%" in line("my-run")
    assert "17.78" not in line("p-MoD-0.3") and "42.3%" not in line("p-MoD-0.3")
    legacy = {k: v for k, v in rows["p-MoD-0.5"].items() if k != "pmod"}  # a row written before rows carried pmod
    assert paper_value("llava-next-7b", legacy, "tflops") == 21.94


def test_llava15_header_says_the_image_is_resized():
    text = format_table(_rows("llava-1.5-7b", [(672, 672)]))
    assert "672x672 image resized to 336x336 (1 tile) -> 576 vision tokens" in text
    nxt = format_table(_rows("llava-next-7b", [(672, 672)]))
    assert "672x672 image -> 4 high-resolution tile(s) of 336x336 + the base image resized to one tile -> 2,928" in nxt


def test_unreliable_latency_is_flagged_in_the_table():
    rows = _rows("tiny", [(64, 48)])
    for r, (med, lo, hi) in zip(rows, [(10.0, 9.0, 11.0), (5.0, 1.0, 300.0), (6.0, 5.9, 6.1), (7.0, 6.9, 7.1)]):
        r.update(prefill_latency_ms=med, prefill_latency_ms_min=lo, prefill_latency_ms_max=hi, latency_repeats=5,
                 latency_dtype="float32", device="cpu", latency_unreliable=(hi - lo) / med > UNRELIABLE_SPREAD)
    text = format_table(rows)
    assert "5.0 !" in text and "1.0-300.0" in text and "10.0 !" not in text
    assert "! unreliable: spread (max - min) / median above 25% for p-MoD-0.3" in text
    assert "CPU latency depends on what else the machine runs" in text


@pytest.mark.slow
def test_tiny_cpu_latency_rows_carry_the_spread(tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "prof"
    assert main(["profile", "--arch", "tiny", "--image-size", "64x48", "--shift", "0.5", "--repeats", "3", "--warmup", "1",
                 "--no-verify", "--output", str(out), "-q"]) == 0
    import json

    err = capsys.readouterr().err
    assert "timing 1/3 · baseline" in err and "timing 3/3 · p-MoD-0.5" in err  # progress where stderr is no terminal
    rows = json.loads((out / "profile.json").read_text())["rows"]
    base, pmod = rows
    for r in rows:
        assert r["prefill_latency_ms_min"] <= r["prefill_latency_ms"] <= r["prefill_latency_ms_max"]
        assert r["latency_spread"] >= 0 and isinstance(r["latency_unreliable"], bool) and r["latency_repeats"] == 3
    assert pmod["latency_ratio_min"] <= pmod["latency_ratio"] <= pmod["latency_ratio_max"]
    assert oct((out / "profile.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    from pmod_bench.atomic import umask

    return umask()
