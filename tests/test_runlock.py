"""pmod_bench.rundir.run_lock: one process per run directory; a refused or failed run leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pmod_bench.errors import UserError
from pmod_bench.outputs import check_output_path
from pmod_bench.rundir import LOCK_NAME, RunDirInUse, check_owner, run_lock


def test_the_lock_file_names_its_owner_while_held_and_goes_with_it(tmp_path):
    run = tmp_path / "a" / "b" / "run"
    with run_lock(run, command="pmod-bench eval --model tiny") as lock:
        info = json.loads(lock.read_text())
        assert lock == run / LOCK_NAME and info["pid"] == os.getpid() and info["command"] == "pmod-bench eval --model tiny"
        assert info["started"].endswith("Z") and info["host"]
        (run / "run.json").write_text("{}")
    assert sorted(p.name for p in run.iterdir()) == ["run.json"]  # the lock file is gone, what the run wrote stays


def test_a_run_that_wrote_nothing_leaves_no_directory(tmp_path):
    run = tmp_path / "a" / "b" / "run"
    with pytest.raises(ValueError, match="bad model"):
        with run_lock(run):
            raise ValueError("bad model")
    assert list(tmp_path.iterdir()) == []  # every directory it made is removed again


def test_a_second_owner_is_refused_in_one_line_naming_the_first(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with run_lock(run, command="pmod-bench eval --model tiny --output run"):
        with pytest.raises(RunDirInUse) as exc:
            with run_lock(run, command="another"):
                pass  # pragma: no cover
        msg = str(exc.value)
        assert msg.startswith(f"{run} is in use by pid {os.getpid()} (pmod-bench eval --model tiny --output run, started ")
        assert msg.endswith("; wait for it or choose another --output") and "\n" not in msg
        assert (run / LOCK_NAME).exists()  # the refusal did not disturb the owner's lock
    with run_lock(run):  # free again
        pass
    assert list(run.iterdir()) == []  # existed before: kept, empty


def test_a_killed_owner_leaves_no_stuck_lock(tmp_path):
    run = tmp_path / "run"
    code = ("import sys, time\nfrom pmod_bench.rundir import run_lock\n"
            "with run_lock(sys.argv[1], command='holder'):\n    print('held', flush=True)\n    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirInUse, match=f"in use by pid {holder.pid} \\(holder, started"):
            with run_lock(run):
                pass  # pragma: no cover
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / LOCK_NAME).exists()  # killed: the file stays, the OS released the lock
    deadline = time.time() + 10
    while True:
        try:
            with run_lock(run, command="next") as lock:
                assert json.loads(lock.read_text())["command"] == "next"
            break
        except RunDirInUse:  # pragma: no cover  (the kernel frees the lock as the process is reaped)
            assert time.time() < deadline
            time.sleep(0.1)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("x"), "is a file, not a directory"),
    (lambda p: (p.parent / "f").write_text("x") or None, "so no directory can be made under it"),
    (lambda p: (p.mkdir(), p.chmod(0o555)), "is read-only (mode 555); choose a writable --output directory" if os.geteuid() == 0
     else "is not writable by this user; choose a writable --output directory"),
])
def test_paths_that_cannot_be_a_run_directory_are_refused_before_anything_is_written(tmp_path, make, message):
    run = tmp_path / "run"
    make(run)
    target = tmp_path / "f" / "run" if "under it" in message else run
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    try:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            with run_lock(target):
                pass  # pragma: no cover
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    finally:
        if run.is_dir():
            run.chmod(0o755)


def test_a_name_too_long_is_refused(tmp_path):
    with pytest.raises(UserError, match="longer than the file system allows"):
        check_output_path(tmp_path / ("x" * 300))
    with pytest.raises(UserError, match="longer than the file system allows"):
        with run_lock(tmp_path / ("x" * 300)):
            pass  # pragma: no cover
    assert list(tmp_path.iterdir()) == []


def test_the_ownership_check_ignores_the_lock_file(tmp_path):
    """A new directory holds only the lock file while its owner checks it: not someone else's files. Another kind's
    run directory is refused under the lock as without it."""
    run = tmp_path / "run"
    with run_lock(run):
        check_owner(run, "train")  # only the lock file there: a new directory
        (run / "notes.txt").write_text("mine")
        with pytest.raises(UserError, match="is not empty and holds no run.json"):
            check_owner(run, "train")
    other = tmp_path / "eval_run"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"kind": "eval"}))
    with run_lock(other):
        with pytest.raises(UserError, match="holds a 'eval' run; pass a new --output for the train run"):
            check_owner(other, "train")
    assert sorted(p.name for p in other.iterdir()) == ["run.json"]
