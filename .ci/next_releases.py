"""CI's "next releases" probe: do the releases just past our supported ranges break us?

For every dependency that pyproject.toml bounds from above, asks the package index for its newest release; where
that release lies outside the range, installs it into a copy of an environment that passed (hard links: the copy
costs nothing and the original is never modified) and runs the model, core-contract, methods and eval-plugin tests
there.  It reports which tests break, in the log and in ``--report``; it never fails CI (exit 0 whatever happens),
so a maintainer sees upcoming drift before users do.

    python .ci/next_releases.py --base-venv .ci-newest --report .ci-next-releases.txt
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_model.py", "tests/test_core_contract.py", "tests/test_methods.py", "tests/test_methods_llm.py",
         "tests/test_methods_algorithms.py", "tests/test_methods_illava.py", "tests/test_methods_flops.py",
         "tests/test_eval_plugin.py"]
#: real lmms-eval runs (marked slow, so named here): the plugin through `python -m lmms_eval` and `pmod-bench eval`;
#: the fast eval-plugin tests never enter lmms-eval's `simple_evaluate` (where filelock 4 breaks lmms-eval 0.7.3)
LMMS_EVAL_RUNS = ["tests/test_eval_runner.py::test_plugin_through_python_m_lmms_eval",
                  "tests/test_eval_runner.py::test_cli_eval_writes_a_report_readable_run_dir"]


def bounded_requirements(pyproject: Path) -> list:
    """The ``Requirement`` objects of pyproject.toml's dependencies that have an upper bound."""
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps]
    return [r for r in reqs if any(s.operator in ("<", "<=", "==", "~=") for s in r.specifier)]


def newest_release(python: str, name: str) -> str | None:
    """The newest final release of ``name`` the configured package index serves (pip's own view of the index)."""
    out = subprocess.run([python, "-m", "pip", "index", "versions", name], capture_output=True, text=True,
                         env=_pip_env(), timeout=120)
    m = re.search(r"Available versions:\s*(.+)", out.stdout)
    if not m:
        return None
    from packaging.version import InvalidVersion, Version

    versions = []
    for v in m.group(1).split(","):
        try:
            parsed = Version(v.strip())
        except InvalidVersion:
            continue
        if not parsed.is_prerelease and not parsed.local:
            versions.append(parsed)
    return str(max(versions)) if versions else None


def _pip_env() -> dict:
    # the probe deliberately installs outside the supported ranges: no machine-wide constraint file applies
    return dict(os.environ, PIP_CONSTRAINT=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")


def beyond_ranges(python: str) -> list[tuple[str, str, str]]:
    """``(name, newest, range)`` for every bounded dependency whose newest release is outside its range."""
    found = []
    for req in bounded_requirements(ROOT / "pyproject.toml"):
        newest = newest_release(python, req.name)
        if newest is not None and not req.specifier.contains(newest, prereleases=False):
            found.append((req.name, newest, str(req.specifier)))
    return found


def failed_tests(junit: Path) -> list[str]:
    if not junit.exists():
        return []
    bad = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        failure = case.find("failure") if case.find("failure") is not None else case.find("error")
        if failure is not None:
            why = re.sub(r"(#x1B|\x1b)\[[0-9;]*m", "", failure.get("message") or "")  # colour codes, as junit escapes them
            why = " ".join(why.split())[:160]
            bad.append(f"{case.get('classname')}::{case.get('name')}: {why}")
    return bad


def probe(base_venv: Path, work: Path, install_timeout: int, test_timeout: int) -> list[str]:
    lines = []
    python = str(base_venv / "bin" / "python")
    found = beyond_ranges(python)
    if not found:
        return ["next releases: every bounded dependency's newest release is inside its range; nothing to probe"]
    lines += [f"next releases: {n} {v} (supported {r})" for n, v, r in found]
    venv = work / "venv"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    subprocess.run(["cp", "-al", str(base_venv), str(venv)], check=True)  # hard links: pip unlinks, never edits
    py = str(venv / "bin" / "python")
    t0 = time.time()
    try:
        inst = subprocess.run([py, "-m", "pip", "install", "-q", *[f"{n}=={v}" for n, v, _ in found]],
                              capture_output=True, text=True, env=_pip_env(), timeout=install_timeout)
    except subprocess.TimeoutExpired:
        return lines + [f"next releases: install did not finish in {install_timeout} s; nothing tested"]
    if inst.returncode != 0:
        tail = (inst.stderr or inst.stdout).strip().splitlines()[-3:]
        return lines + ["next releases: install failed: " + " | ".join(tail)]
    lines.append(f"next releases: installed in {time.time() - t0:.0f} s")
    env = dict(os.environ, PMOD_BENCH_CACHE=str(work / "cache"), HF_HOME=str(work / "hf"))
    bad = []
    for i, (label, selection) in enumerate((("model/contract/methods/plugin", ["-m", "not slow", *TESTS]),
                                            ("lmms-eval runs", LMMS_EVAL_RUNS))):
        junit = work / f"junit-{i}.xml"
        try:
            run = subprocess.run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={work / 'tmp'}",
                                  f"--junitxml={junit}", *selection],
                                 capture_output=True, text=True, env=env, cwd=ROOT, timeout=test_timeout)
            summary = (run.stdout.strip().splitlines() or ["(no output)"])[-1]
        except subprocess.TimeoutExpired:
            summary = f"did not finish in {test_timeout} s"
        lines.append(f"next releases: {label}: {summary}")
        bad += failed_tests(junit)
    lines += [f"  breaks: {t}" for t in bad] or ["  nothing breaks in the probed tests"]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-venv", type=Path, required=True, help="an environment that passed (copied, never modified)")
    ap.add_argument("--work", type=Path, default=ROOT / ".ci-next")
    ap.add_argument("--report", type=Path, default=ROOT / ".ci-next-releases.txt")
    ap.add_argument("--install-timeout", type=int, default=420)
    ap.add_argument("--test-timeout", type=int, default=300)
    args = ap.parse_args()
    try:
        lines = probe(args.base_venv, args.work, args.install_timeout, args.test_timeout)
    except Exception as exc:  # a report, never a CI failure
        lines = [f"next releases: the probe itself failed: {type(exc).__name__}: {exc}"]
    text = "\n".join(lines) + "\n"
    args.report.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
