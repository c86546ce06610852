"""Offline data: fixtures in the hub layout, `pmod-bench data check`, and errors that name the problem."""

from __future__ import annotations

import shutil

import pytest

from pmod_bench.tasks.benchmarks import BENCHMARKS
from pmod_bench.tasks.data import DataError, check_benchmark, local_dir, require_local
from pmod_bench.tasks.fixtures import generate


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate(root)
    return root


@pytest.fixture
def broken(fixture_root, tmp_path):
    """A private copy of the fixtures to damage."""
    root = tmp_path / "data"
    shutil.copytree(fixture_root, root)
    return root


def test_fixtures_follow_the_snapshot_layout_and_check_clean(fixture_root, capsys):
    assert (fixture_root / "lmms-lab-encoder/POPE/Full/adversarial-00000-of-00001.parquet").is_file()
    assert (fixture_root / "lmms-lab-encoder/DocVQA/InfographicVQA/validation-00000-of-00001.parquet").is_file()
    assert (fixture_root / "lmms-lab-encoder/MMBench/en/dev-00000-of-00001.parquet").is_file()
    readme = (fixture_root / "lmms-lab-encoder/DocVQA/README.md").read_text()
    assert "config_name: DocVQA" in readme and "config_name: InfographicVQA" in readme
    for b in BENCHMARKS.values():
        assert all(s.ok for s in check_benchmark(b, fixture_root)), b.key
    import datasets  # the local copy loads with datasets exactly as the hub one (configs, splits, Image features)

    pope = datasets.load_dataset(str(fixture_root / "lmms-lab-encoder/POPE"), "Full", cache_dir=str(fixture_root.parent / "c"))
    assert set(pope) == {"adversarial", "popular", "random"}
    assert pope["random"][0]["image"].size == (64, 48)

    from pmod_bench.cli import main

    assert main(["data", "check", "all", "--root", str(fixture_root)]) == 0
    out = capsys.readouterr().out
    assert "all present and valid" in out and "POPE" in out and "RefCOCOg" in out


def test_missing_copy_names_benchmark_and_path(broken, capsys):
    shutil.rmtree(broken / "lmms-lab-encoder/MME")
    (st,) = check_benchmark(BENCHMARKS["MME"], broken)
    assert not st.ok and st.error.startswith("MME: local copy of lmms-lab-encoder/MME not found")
    assert str(broken / "lmms-lab-encoder/MME") in st.error and "hf download" in st.error
    from pmod_bench.cli import main

    assert main(["data", "check", "MME,POPE", "--root", str(broken)]) == 1
    out = capsys.readouterr().out
    assert "MISSING" in out and "1 problem(s)" in out


def test_missing_split_and_missing_column(broken):
    (broken / "lmms-lab-encoder/POPE/Full/random-00000-of-00001.parquet").unlink()
    (st,) = check_benchmark(BENCHMARKS["POPE"], broken)
    assert not st.ok and "POPE" in st.error and "config 'Full': missing split(s) random" in st.error

    import pyarrow.parquet as pq

    f = broken / "lmms-lab-encoder/ChartQA/data/test-00000-of-00001.parquet"
    pq.write_table(pq.read_table(f).drop(["answer"]), f)
    (st,) = check_benchmark(BENCHMARKS["Chart"], broken)
    assert not st.ok and "Chart" in st.error and "lacks column(s) 'answer'" in st.error and str(f) in st.error

    readme = broken / "lmms-lab-encoder/MMBench/README.md"
    readme.write_text(readme.read_text().replace("config_name: en", "config_name: cn"))
    (st,) = check_benchmark(BENCHMARKS["MMB"], broken)
    assert not st.ok and "MMB" in st.error and "config 'en'" in st.error and "found: cn" in st.error


def test_errors_reach_the_task_loader(broken, monkeypatch):
    """What PMoDTask.download and the GQA image join call: same checks, raised as DataError."""
    monkeypatch.setenv("PMOD_BENCH_DATA", str(broken))
    assert require_local("lmms-lab-encoder/POPE", "Full", "adversarial", task="pmod_pope_adv") == local_dir("lmms-lab-encoder/POPE")
    shutil.rmtree(broken / "lmms-lab-encoder/GQA/testdev_balanced_images")
    with pytest.raises(DataError, match=r"GQA: .*config 'testdev_balanced_images': missing split\(s\) testdev"):
        require_local("lmms-lab-encoder/GQA", "testdev_balanced_images", "testdev", task="pmod_gqa")
    monkeypatch.delenv("PMOD_BENCH_DATA")
    assert require_local("lmms-lab-encoder/POPE", "Full", "adversarial") is None  # hub as lmms-eval does


def test_task_load_error_through_lmms_eval(broken, monkeypatch, tmp_path):
    """The adapter task raises the DataError inside lmms-eval's task construction."""
    pytest.importorskip("lmms_eval")
    from pmod_bench.tasks.runner import task_manager

    monkeypatch.setenv("PMOD_BENCH_DATA", str(broken))
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "cache"))
    f = broken / "lmms-lab-encoder/RealWorldQA/data/test-00000-of-00001.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(f).drop(["question"]), f)
    from lmms_eval.tasks import get_task_dict

    with pytest.raises(DataError, match="RWQA: .*lacks column\\(s\\) 'question'"):
        get_task_dict(["pmod_realworldqa"], task_manager())
    d = get_task_dict(["pmod_mme"], task_manager())  # an intact one loads offline
    assert len(d["pmod_mme"].test_docs()) == 8  # cognition rows first, as the hub split
