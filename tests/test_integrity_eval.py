"""Nothing mixed, nothing lost: `pmod-bench eval` refuses what it cannot do in one line and writes nothing, owns its
run directory, reads every local benchmark copy from its own files, and touches nothing outside its output.

The table (``CASES``): each case is the exact command (argv, with ``{out}`` / ``{data}`` / ``{world}`` filled in),
what the world looks like before it (``setup``), the expected exit code (2: refused; 0: correct behaviour), a
substring of the one-line message (and one that must not appear), and an optional extra check. Every case hashes
the whole temporary tree before and after: a refused command changes nothing at all (its --output is not created,
or is unchanged), a successful one changes nothing outside its own --output (and the datasets cache). The CLI runs
in this process through ``pmod_bench.cli.main``; the cases that run lmms-eval are marked slow, and so are the
cross-process tests at the end (real ``pmod-bench eval`` subprocesses).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest

pytest.importorskip("lmms_eval")

from pmod_bench.cli import main  # noqa: E402

GEN = "max_new_tokens=2"


# ------------------------------------------------------------------------------------------- helpers
def tree_hash(root: Path, exclude: tuple = ()) -> dict[str, str]:
    """{relative path: kind, mode and content hash} of everything under ``root`` except the ``exclude`` paths."""
    out = {}
    skip = {Path(p).resolve() for p in exclude}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if (here / d).resolve() not in skip]
        for name in [*dirnames, *filenames]:
            p = here / name
            if p.resolve() in skip:
                continue
            st = p.lstat()
            body = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
            out[str(p.relative_to(root))] = f"{stat.S_IFMT(st.st_mode):o}:{stat.S_IMODE(st.st_mode):o}:{body}"
    return out


def one_error_line(err: str) -> str:
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(errors) == 1, err
    assert errors[0].startswith("pmod-bench eval: error: ") and "Traceback" not in err, err
    return errors[0]


def rewrite_parquet(path: Path, **columns: Callable[[list], list]) -> None:
    """Rewrite one parquet file of a snapshot in place (same schema and HF features): column -> new values."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    data = table.to_pydict()
    for name, fn in columns.items():
        data[name] = fn(data[name])
    pq.write_table(pa.Table.from_pydict(data, schema=table.schema), path)


def grey_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (128, 128, 128)).save(buf, format="PNG")
    return buf.getvalue()


POPE_FILES = [f"Full/{s}-00000-of-00001.parquet" for s in ("adversarial", "popular", "random")]


def edit_pope(repo: Path, answers: Optional[str] = None, question_prefix: str = "", blank: bool = False) -> None:
    """Change a POPE copy's content only: every answer, the questions' wording, or every image blanked grey."""
    for rel in POPE_FILES:
        cols: dict = {}
        if answers:
            cols["answer"] = lambda v: [answers] * len(v)
        if question_prefix:
            cols["question"] = lambda v: [question_prefix + q for q in v]
        if blank:
            png = grey_png()
            cols["image"] = lambda v: [{"bytes": png, "path": None} for _ in v]
        rewrite_parquet(repo / rel, **cols)


# -------------------------------------------------------------------------------------------- world
@pytest.fixture(scope="module")
def pope_fixture(tmp_path_factory):
    from pmod_bench.tasks.fixtures import generate

    root = tmp_path_factory.mktemp("pope")
    generate(root, ["POPE"])
    return root


@dataclass
class World:
    root: Path  # everything a case may touch lives under here
    data: Path  # a POPE copy (hub layout): PMOD_BENCH_DATA
    out: Path  # the case's --output
    caches: Path  # the datasets / pmod-bench caches (written by successful runs only)

    def fill(self, argv: list[str]) -> list[str]:
        return [a.format(out=self.out, data=self.data, world=self.root) for a in argv]


@pytest.fixture(autouse=True)
def loguru_to_current_stderr():
    """lmms-eval's loguru sink is the sys.stderr of its import (an earlier test's capture, closed since): write to
    whatever sys.stderr is now, so capsys sees lmms-eval's warnings instead of loguru's 'Traceback' about a closed file."""
    from loguru import logger

    logger.remove()
    logger.add(lambda msg: sys.stderr.write(msg), level="WARNING")
    yield


@pytest.fixture
def world(tmp_path, pope_fixture, monkeypatch):
    import torch

    root = tmp_path / "world"
    (root / "cwd").mkdir(parents=True)
    (root / "runs").mkdir()  # the parent of every --output
    shutil.copytree(pope_fixture, root / "data")
    caches = tmp_path / "caches"
    monkeypatch.setenv("PMOD_BENCH_DATA", str(root / "data"))
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(caches / "datasets"))
    monkeypatch.setenv("PMOD_BENCH_CACHE", str(caches / "pmod_bench"))
    monkeypatch.chdir(root / "cwd")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield World(root, root / "data", root / "runs" / "out", caches)
    torch.set_num_threads(threads)
    for p in root.rglob("*"):  # undo read-only modes so that pytest can clean up
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)


def eval_argv(*extra: str) -> list[str]:
    return ["eval", "--model", "tiny", "--suite", "POPE", "--output", "{out}", "--limit", "1", "--gen-kwargs", GEN,
            *extra]


# ------------------------------------------------------------------------------------------- setups
def _env(name: str, value: str) -> Callable:
    def setup(w: World, mp: pytest.MonkeyPatch) -> None:
        mp.setenv(name, value.format(world=w.root))
    return setup


def _file_at(rel: str) -> Callable:
    def setup(w: World, mp) -> None:
        p = w.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("not a directory\n")
    return setup


def _read_only_out(w: World, mp) -> None:
    w.out.mkdir(parents=True)
    w.out.chmod(0o555)


def _run_of(kind: str) -> Callable:
    """--output is a run directory of ``kind`` (its run.json and one result file)."""
    def setup(w: World, mp) -> None:
        w.out.mkdir(parents=True)
        (w.out / "run.json").write_text(json.dumps({"kind": kind, "schema_version": 1, "command": f"pmod-bench {kind}"}))
        (w.out / "result.json").write_text("{}")
    return setup


def _no_data_root(w: World, mp) -> None:
    """Neither --data nor PMOD_BENCH_DATA: the datasets come from the hub, which is out of reach (HF_HUB_OFFLINE=1,
    conftest: datasets raises the ConnectionError an unreachable hub gives)."""
    mp.delenv("PMOD_BENCH_DATA")
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def _tiny_folder(w: World, mp) -> None:
    (w.root / "cwd" / "tiny").mkdir()
    (w.root / "cwd" / "tiny" / "notes.txt").write_text("a folder that happens to be called tiny\n")


def _run_first(w: World, mp) -> None:
    """The same command has already run to completion once."""
    assert main(w.fill(eval_argv())) == 0


def _disk_full_on(name: str) -> Callable:
    """ENOSPC from the atomic writer when it writes a file called ``name`` (once): a disk that fills up mid-run."""
    def setup(w: World, mp: pytest.MonkeyPatch) -> None:
        import pmod_bench.atomic as atomic

        real = atomic.atomic_write_bytes
        hit: list = []

        def full(path, data):
            if Path(path).name == name and not hit:
                hit.append(path)
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real(path, data)

        mp.setattr(atomic, "atomic_write_bytes", full)
    return setup


def _disk_full_saving_answers(w: World, mp: pytest.MonkeyPatch) -> None:
    """ENOSPC when the first batch of answers is appended to responses/ (inside lmms-eval's call of the model)."""
    from pmod_bench.tasks.cache import ResponseCache

    real = ResponseCache.flush
    hit: list = []

    def full(self):
        if self._pending and not hit:
            hit.append(self.path)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self)

    mp.setattr(ResponseCache, "flush", full)


# ------------------------------------------------------------------------------------------- checks
def _resumes_with_data(w: World, err: str) -> None:
    assert "FAILED" not in err and "RetryError" not in err and not (w.out / "errors").exists()
    import io
    from contextlib import redirect_stderr

    with redirect_stderr(io.StringIO()):  # the fix the line names: the same command with --data resumes the run
        assert main(w.fill(eval_argv("--data", "{data}"))) == 0
    assert (w.out / "benchmarks" / "POPE.json").is_file()


def _methods_have_their_own_run_dirs(w: World, err: str) -> None:
    subs = sorted(p.name for p in w.out.iterdir())
    assert subs == ["random", "random-keep=0.5"], subs
    for name, keep in (("random", 0.25), ("random-keep=0.5", 0.5)):
        meta = json.loads((w.out / name / "run.json").read_text())
        assert meta["eval"]["identity"]["method"] == ("random" if keep == 0.25 else "random:keep=0.5")
        (row,) = json.loads((w.out / name / "summary.json").read_text())["rows"]
        assert row["method"]["method"] == "random" and row["method"]["keep"] == keep


def _rerun_changes_no_answers(w: World, err: str) -> None:
    assert f"resuming {w.out}: POPE already finished" in err and "computed" not in err
    lines = (w.out / "responses" / "responses.rank0.jsonl").read_text().splitlines()
    keys = [json.loads(ln)["key"] for ln in lines]
    assert len(keys) == len(set(keys)) == 3  # POPE --limit 1: one request per split, written once


def _disk_full_then_resume(w: World, err: str) -> None:
    assert not list(w.out.rglob("*.tmp")) and not (w.out / "benchmarks" / "POPE.json").exists()
    saved = (w.out / "responses" / "responses.rank0.jsonl").read_text().splitlines()
    assert len(saved) == 3  # every answer was persisted before the disk filled up
    import io
    from contextlib import redirect_stderr

    buf = io.StringIO()
    with redirect_stderr(buf):  # the disk has space again: the same command resumes and computes nothing
        assert main(w.fill(eval_argv())) == 0
    assert f"resumed {w.out}: 3 answer(s) from the saved responses, 0 computed" in buf.getvalue()
    assert (w.out / "benchmarks" / "POPE.json").is_file()


def _answers_lost_then_resume(w: World, err: str) -> None:
    assert "FAILED" not in err  # a full disk is not the benchmark's failure: the run stops
    assert not (w.out / "benchmarks").exists() and not (w.out / "errors").exists()
    import io
    from contextlib import redirect_stderr

    buf = io.StringIO()
    with redirect_stderr(buf):
        assert main(w.fill(eval_argv())) == 0
    lines = (w.out / "responses" / "responses.rank0.jsonl").read_text().splitlines()
    assert len(lines) == 3 and (w.out / "benchmarks" / "POPE.json").is_file()


@dataclass
class Case:
    argv: list[str]
    code: int
    message: str
    setup: Optional[Callable] = None
    absent: Optional[str] = None  # must not appear in the message
    check: Optional[Callable] = None
    marks: tuple = field(default=())
    wrote: bool = False  # a failure after the run wrote into its own --output (disk full): the rest is unchanged


CASES = {
    "PMOD_BENCH_DATA points nowhere": Case(
        eval_argv(), 2, "PMOD_BENCH_DATA={world}/nowhere: no such directory; point PMOD_BENCH_DATA (or --data)",
        _env("PMOD_BENCH_DATA", "{world}/nowhere")),
    "PMOD_BENCH_DATA is a file": Case(
        eval_argv(), 2, "PMOD_BENCH_DATA={world}/data.txt: a file, not a directory",
        lambda w, mp: (_file_at("data.txt")(w, mp), _env("PMOD_BENCH_DATA", "{world}/data.txt")(w, mp))),
    "--data is a file": Case(
        eval_argv("--data", "{world}/data.txt"), 2, "--data {world}/data.txt: a file; pass the data root",
        _file_at("data.txt")),
    "--output is read-only": Case(
        eval_argv(), 2, "--output {out} is read-only (mode 555); choose a writable --output directory", _read_only_out),
    "--output is a file": Case(
        eval_argv(), 2, "--output {out} is a file, not a directory", _file_at("runs/out")),
    "--output under a file": Case(
        ["eval", "--model", "tiny", "--suite", "POPE", "--output", "{world}/runs/out/sub"], 2,
        "is a file, so no directory can be made under it", _file_at("runs/out")),
    "--output name too long": Case(
        ["eval", "--model", "tiny", "--suite", "POPE", "--output", "{world}/runs/" + "x" * 300], 2,
        "bytes, longer than the file system allows (255); choose a shorter --output"),
    "--output is a train run": Case(
        eval_argv(), 2, "--output {out} holds a 'train' run; pass a new --output for the eval run", _run_of("train")),
    "--output is a profile run": Case(eval_argv(), 2, "--output {out} holds a 'profile' run", _run_of("profile")),
    "--output is a reproduction": Case(eval_argv(), 2, "--output {out} holds a 'reproduce' run", _run_of("reproduce")),
    "--output holds someone's files": Case(
        eval_argv(), 2, "--output {out} is not empty and holds no run.json (it is no eval run's); pass a new or empty "
        "--output", _file_at("runs/out/notes.txt")),
    "no data root, hub unreachable": Case(
        eval_argv(), 2, "lmms-lab-encoder/POPE: no local data root (--data / PMOD_BENCH_DATA) and the Hugging Face Hub "
        "is unreachable (Couldn't reach 'lmms-lab-encoder/POPE' on the Hub (OfflineModeIsEnabled)); pass --data DIR or "
        "set PMOD_BENCH_DATA=DIR, a root that holds ORG/NAME snapshots (`pmod-bench data fixtures DIR` writes",
        _no_data_root, check=_resumes_with_data, marks=(pytest.mark.slow,), wrote=True),
    "--match p-MoD-7": Case(
        eval_argv("--method", "fastv", "--match", "p-MoD-7"), 2,
        "--match p-MoD-7 is not a valid target: shift (delta) must be in (0, 1.5], got 7.0", absent="--shift"),
    "--match-tflops above the baseline": Case(
        eval_argv("--method", "fastv", "--match-tflops", "500"), 2,
        "the target exceeds the baseline's prefill TFLOPs (0.0001298 TFLOPs)", absent="tolerance"),
    "tiny/ in the working directory": Case(
        eval_argv(), 2, "'tiny' names both the preset 'tiny' (random weights) and the directory", _tiny_folder),
    "--method twice": Case(
        eval_argv("--method", "fastv", "--method", "fastv:k=2"), 2, "--method: fastv given twice"),
    "--output owned by another run": Case(
        eval_argv(), 2, "is in use by pid {pid} (pmod-bench eval --model tiny --suite POPE --output elsewhere, started"),
    "several --method": Case(
        eval_argv("--method", "random", "--method", "random:keep=0.5"), 0, "report: pmod-bench report {out}/*",
        check=_methods_have_their_own_run_dirs, marks=(pytest.mark.slow,)),
    "the same command again": Case(
        eval_argv(), 0, "results: {out}/summary.json", _run_first, check=_rerun_changes_no_answers,
        marks=(pytest.mark.slow,)),
    "disk full mid-run": Case(
        eval_argv(), 2, "--output {out}: cannot write {out}/benchmarks/POPE.json (No space left on device); free disk "
        "space and run the same command again: finished benchmarks and every saved answer are kept", _disk_full_on("POPE.json"), check=_disk_full_then_resume, marks=(pytest.mark.slow,),
        wrote=True),
    "disk full saving answers": Case(
        eval_argv(), 2, "--output {out}: cannot write under {out} (No space left on device); free disk space and run "
        "the same command again",
        _disk_full_saving_answers, check=_answers_lost_then_resume, marks=(pytest.mark.slow,), wrote=True),
}


@pytest.mark.parametrize("name", [pytest.param(k, marks=c.marks) for k, c in CASES.items()])
def test_eval_command(name, world, monkeypatch, capsys):
    from pmod_bench.rundir import run_lock

    case = CASES[name]
    if case.setup:
        case.setup(world, monkeypatch)
    owner = run_lock(world.out, command="pmod-bench eval --model tiny --suite POPE --output elsewhere") \
        if "owned by another" in name else None
    if owner:
        owner.__enter__()
    tmp, own = world.root.parent, (world.out, world.caches)  # a run's own files: its --output, the datasets cache
    before, before_outside = tree_hash(tmp), tree_hash(tmp, own)
    capsys.readouterr()
    try:
        rc = main(world.fill(case.argv))
        after, after_outside = tree_hash(tmp), tree_hash(tmp, own)
    finally:
        out, err = capsys.readouterr()
        if owner:
            owner.__exit__(None, None, None)
    assert rc == case.code, err[-3000:]
    text = one_error_line(err) if case.code == 2 else out + err
    if case.code == 2 and not case.wrote:
        assert after == before  # not one file or directory created or changed, anywhere
    else:
        assert after_outside == before_outside  # nothing outside its own files
    message = case.message.format(out=world.out, world=world.root, pid=os.getpid())
    assert message in text, text[-3000:]
    if case.absent:
        assert case.absent not in text, text
    if case.check:
        case.check(world, err)
    assert not list(tmp.rglob(".pmod-bench.lock"))  # the lock never outlives its run


# --------------------------------------------------------------------- every copy read from its own files
@pytest.fixture(scope="module")
def tiny():
    from pmod_bench.model.presets import build_preset

    return build_preset("tiny")


def probe_lm(tiny):
    """The tiny model's plugin, answering 'yes' to everything and noting the mean grey level of each image it is shown
    (what it was given), so that scores and images seen tell which copy of the data was read."""
    from pmod_bench.tasks.plugin import PMoDLlava

    class Probe(PMoDLlava):
        def _generate_batch(self, prompts, images, gen_kwargs):
            import numpy as np

            self.seen += [round(float(np.asarray(im[0].convert("L")).mean()), 3) for im in images]
            return ["yes"] * len(prompts)

    lm = Probe.from_loaded(*tiny, name="tiny", batch_size=4)
    lm.seen = []
    return lm


def evaluate(data: Path, out: Path, tiny, lm=None):
    """POPE of copy ``data`` into ``out`` in this process: (F1, images seen, questions logged, run.json's data)."""
    from pmod_bench.tasks.runner import EvalConfig, run_eval

    os.environ["PMOD_BENCH_DATA"] = str(data)
    lm = lm or probe_lm(tiny)
    outcome = run_eval(EvalConfig(model="tiny", suite="POPE", output=str(out), gen_kwargs=GEN), lm=lm, log=lambda m: None)
    assert not outcome.failures, outcome.failures
    (row,) = outcome.rows
    questions = [json.loads(ln)["doc"]["question"] for f in sorted((out / "lmms_eval").glob("*/samples_*.jsonl"))
                 for ln in f.read_text().splitlines()]
    data_ids = json.loads((out / "run.json").read_text())["eval"]["data"]["POPE"]
    return row["value"], sorted(lm.seen), questions, data_ids


@pytest.mark.slow
def test_copies_that_differ_only_in_content_give_their_own_results_in_one_process(world, tiny):
    """Three copies of POPE under one datasets cache: the fixture, a copy with every answer 'yes' and other
    questions, a copy with every image grey; then the second copy edited in place. Each run reads its own files."""
    repo = "lmms-lab-encoder/POPE"
    a, b, c = world.data, world.root / "b", world.root / "c"
    shutil.copytree(a, b)
    shutil.copytree(a, c)
    edit_pope(b / repo, answers="yes", question_prefix="[b] ")
    edit_pope(c / repo, blank=True)
    f1_a, seen_a, q_a, id_a = evaluate(a, world.root / "runs" / "a", tiny)
    f1_b, seen_b, q_b, id_b = evaluate(b, world.root / "runs" / "b", tiny)
    f1_c, seen_c, q_c, id_c = evaluate(c, world.root / "runs" / "c", tiny)
    assert (f1_a, f1_b) == (pytest.approx(200 / 3), 100.0)  # always 'yes': half the fixture's answers, all of b's
    assert all(q.startswith("[b] ") for q in q_b) and not any(q.startswith("[b] ") for q in q_a + q_c)
    assert seen_c == [128.0] * 6 and seen_a != seen_c and seen_a == seen_b
    assert [d["path"] for d in (id_a[0], id_b[0], id_c[0])] == [str((x / repo).resolve()) for x in (a, b, c)]
    assert len({d["fingerprint"] for d in (id_a[0], id_b[0], id_c[0])}) == 3
    caches = sorted(p.name for p in (world.caches / "datasets" / "pmod_bench_snapshots").iterdir())
    assert caches == sorted(d["fingerprint"][:16] for d in (id_a[0], id_b[0], id_c[0]))

    edit_pope(b / repo, answers="no", question_prefix="[edited] ")  # in place: same path, same file names
    f1_e, _, q_e, id_e = evaluate(b, world.root / "runs" / "b-edited", tiny)
    assert f1_e == 0.0 and all(q.startswith("[edited] [b] ") for q in q_e)
    assert id_e[0]["path"] == id_b[0]["path"] and id_e[0]["fingerprint"] != id_b[0]["fingerprint"]


@pytest.mark.slow
def test_saved_answers_are_never_reused_for_other_data(world, tiny):
    """The response cache of one run directory: answers to the fixture's documents are not served for another copy
    (same questions, grey images), and are again once the first copy is back; a finished benchmark evaluated on other
    data than there is now keeps its row and says so."""
    repo = "lmms-lab-encoder/POPE"
    grey = world.root / "grey"
    shutil.copytree(world.data, grey)
    edit_pope(grey / repo, blank=True)
    out = world.root / "runs" / "x"
    lm = probe_lm(tiny)
    evaluate(world.data, out, tiny, lm)
    assert lm.computed == 6
    for data, computed, hits in ((grey, 6, 0), (grey, 0, 6), (world.data, 0, 6)):
        (out / "benchmarks" / "POPE.json").unlink()  # as if the run had stopped before the benchmark finished
        lm = probe_lm(tiny)
        evaluate(data, out, tiny, lm)
        assert (lm.computed, lm.cache.hits) == (computed, hits), data
    assert len((out / "responses" / "responses.rank0.jsonl").read_text().splitlines()) == 12  # 6 answers per copy

    from pmod_bench.tasks.runner import EvalConfig, run_eval

    os.environ["PMOD_BENCH_DATA"] = str(grey)
    logged: list[str] = []
    again = run_eval(EvalConfig(model="tiny", suite="POPE", output=str(out), gen_kwargs=GEN), lm=probe_lm(tiny),
                     log=logged.append)
    assert again.skipped == ["POPE"] and again.ran == []
    (warning,) = [m for m in logged if m.startswith("warning:")]
    assert f"POPE was evaluated on {(world.data / repo).resolve()}; the data is now {(grey / repo).resolve()}" in warning


# ------------------------------------------------------------------------------------- across processes
def cli(*argv: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pmod_bench.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)


def cli_env(world: World, data: Path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PMOD_BENCH_DATA=str(data),
                LMMS_EVAL_DATASETS_CACHE=str(world.caches / "datasets"), PMOD_BENCH_CACHE=str(world.caches / "pmod_bench"))


def logged_questions(out: Path) -> list[str]:
    return [json.loads(ln)["doc"]["question"] for f in sorted((out / "lmms_eval").glob("*/samples_*.jsonl"))
            for ln in f.read_text().splitlines()]


@pytest.mark.slow
def test_two_copies_across_processes_each_read_from_their_own_files(world):
    """`pmod-bench eval` in one process on the fixture, then in another on a copy with other questions and answers
    (one datasets cache): the second logs its own copy's questions, and run.json names the data each one read."""
    b = world.root / "b"
    shutil.copytree(world.data, b)
    edit_pope(b / "lmms-lab-encoder" / "POPE", answers="yes", question_prefix="[b] ")
    runs = {}
    for name, data in (("a", world.data), ("b", b)):
        out = world.root / "runs" / name
        proc = cli(*[x.format(out=out) for x in eval_argv()], env=cli_env(world, data))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = (logged_questions(out), json.loads((out / "run.json").read_text())["eval"]["data"]["POPE"][0])
    (q_a, d_a), (q_b, d_b) = runs["a"], runs["b"]
    assert len(q_b) == 3 and all(q.startswith("[b] ") for q in q_b) and not any(q.startswith("[b] ") for q in q_a)
    assert d_b["path"] == str((b / "lmms-lab-encoder" / "POPE").resolve()) and d_a["fingerprint"] != d_b["fingerprint"]


def test_an_unreachable_hub_is_recognised_behind_lmms_eval_retries():
    """datasets' ConnectionError for an offline hub, as lmms-eval's tenacity retry raises it (the RetryError's cause),
    becomes the one line; other errors are left alone."""
    from tenacity import RetryError, Retrying, stop_after_attempt

    from pmod_bench.tasks.data import HubUnreachable, hub_unreachable

    def offline():
        raise ConnectionError("Couldn't reach 'lmms-lab-encoder/POPE' on the Hub (OfflineModeIsEnabled)")

    with pytest.raises(RetryError) as caught:
        Retrying(stop=stop_after_attempt(2))(offline)
    err = hub_unreachable(caught.value, "lmms-lab-encoder/POPE")
    assert isinstance(err, HubUnreachable) and isinstance(err, ValueError) and "\n" not in str(err)
    assert str(err).startswith("lmms-lab-encoder/POPE: no local data root (--data / PMOD_BENCH_DATA) and the Hugging "
                               "Face Hub is unreachable (Couldn't reach 'lmms-lab-encoder/POPE' on the Hub")
    assert "`pmod-bench data fixtures DIR`" in str(err) and "run the same command again: it resumes" in str(err)
    assert hub_unreachable(ValueError("bad split"), "x/y") is None
    with pytest.raises(RetryError) as other:
        Retrying(stop=stop_after_attempt(1))(lambda: int("x"))
    assert hub_unreachable(other.value, "x/y") is None


HOLDER = """
import sys, time
from pmod_bench.rundir import run_lock
with run_lock(sys.argv[1], command="pmod-bench eval --model tiny --suite POPE (the holder)"):
    open(sys.argv[2], "w").close()
    time.sleep(600)
"""


@pytest.mark.slow
def test_a_run_dir_is_owned_by_one_process_and_a_killed_owner_leaves_no_lock(world):
    import signal
    import time

    ready = world.root / "ready"
    env = cli_env(world, world.data)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(world.out), str(ready)], env=env)
    try:
        deadline = time.time() + 60
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.05)
        before = tree_hash(world.root)
        refused = cli(*[x.format(out=world.out) for x in eval_argv()], env=env)
        assert refused.returncode == 2, refused.stderr[-3000:]
        line = one_error_line(refused.stderr)
        assert (f"{world.out} is in use by pid {holder.pid} (pmod-bench eval --model tiny --suite POPE (the holder), "
                "started ") in line and line.endswith("; wait for it or choose another --output")
        assert tree_hash(world.root) == before
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the lock file stays, the OS releases the lock
        holder.wait()
    assert (world.out / ".pmod-bench.lock").exists()
    done = cli(*[x.format(out=world.out) for x in eval_argv()], env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (world.out / "summary.json").is_file() and not (world.out / ".pmod-bench.lock").exists()


@pytest.mark.slow
def test_two_evaluations_started_together_one_runs_one_is_refused(world):
    env = cli_env(world, world.data)
    argv = [sys.executable, "-m", "pmod_bench.cli", *[x.format(out=world.out) for x in eval_argv()]]
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], [err[-2000:] for _, err in results]
    refused = next(err for code, err in results if code == 2)
    assert "is in use by pid" in one_error_line(refused)
    lines = (world.out / "responses" / "responses.rank0.jsonl").read_text().splitlines()
    assert len(lines) == 3  # one writer: every answer once
