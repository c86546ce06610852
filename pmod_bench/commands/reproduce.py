"""``pmod-bench reproduce --toy``: the whole paper pipeline on the toy world (data, train, eval, profile, report).

    pmod-bench reproduce --toy --output runs/toy           # full: every model of Tables 1/3/4/7 (trains; see README)
    pmod-bench reproduce --toy --output runs/toy-q --quick # baseline, p-MoD-0.5, p-MoD-0.3 from shipped checkpoints (CI)

Training: prepared toy LM + CLIP tower, PT (connector), one shared SFT, then one SFT continuation per
model (the baseline without, the p-MoD models with p-MoD layers); see pmod_bench.toy.models.
"""

from __future__ import annotations

import argparse
import shlex


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "reproduce",
        help="run the paper's pipeline end to end on the toy world (generated data, trained tiny models, real numbers)",
        description=(
            "Generates the toy world (scenes of coloured shapes: existence, attribute, counting, multiple choice, digit "
            "reading, grounding), prepares a toy LM and CLIP tower, trains the baseline, p-MoD delta 0.3/0.4/0.5 and the "
            "Table 3/4 ablations with `pmod-bench train`, evaluates each through lmms-eval (`--suite toy`), profiles "
            "them, measures where the routers keep tokens, and writes the report (OUTPUT/report/index.md). Rerun the same "
            "command to resume after an interruption; trained checkpoints are cached and reused."
        ),
        epilog="examples:\n  pmod-bench reproduce --toy --output runs/toy\n  pmod-bench reproduce --toy --output /tmp/toy --quick",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--toy", action="store_true", help="the toy world (the only reproduction that runs offline on a CPU)")
    p.add_argument("--output", "-o", required=True, help="output directory (resumable)")
    p.add_argument("--quick", action="store_true",
                   help="baseline, p-MoD-0.5 and p-MoD-0.3 only (the shipped checkpoints), at most 30 documents per task: a smoke-test size (CI; ~1 min)")
    p.add_argument("--retrain", action="store_true", help="train every model here, ignoring cached and shipped checkpoints")
    p.add_argument("--jobs", "-j", type=int, default=None, metavar="N",
                   help="independent steps (the models' trainings, their evaluations, the tower beside the LM) run N at a "
                        "time, one CPU thread each; the weights do not depend on N (default: the CPUs, at most 4)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from pmod_bench.cli import UserError

    if not args.toy:
        raise UserError("only the toy world can be reproduced by one command: pass --toy (the paper's own models need "
                        "`pmod-bench train` on LLaVA data, `pmod-bench eval` and `pmod-bench report`)")
    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: pass a number of jobs >= 1 (1 runs every step in this process, one after another)")
    from pmod_bench.outputs import output_errors
    from pmod_bench.rundir import run_lock
    from pmod_bench.toy.pipeline import reproduce

    t0 = time.time()
    command = shlex.join(["pmod-bench", "reproduce", "--toy", "--output", args.output]
                         + ["--quick"] * args.quick + ["--retrain"] * args.retrain)
    # this process owns OUTPUT for the whole pipeline; its worker processes (--jobs) run under that ownership and
    # take only the locks of the run directories they write (OUTPUT/models/NAME, ...)
    with run_lock(args.output, command=command):
        out = _output_dir(args.output)
        try:
            with output_errors("--output", args.output, disk_full_fix="free disk space and run the same command again: it resumes"):
                state = reproduce(out, quick=args.quick, retrain=args.retrain, quiet=args.quiet, jobs=args.jobs, command=command)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    size = " (a smoke-test size: 30 documents a task, wide intervals)" if args.quick else ""
    print(f"reproduce --toy{' --quick' if args.quick else ''}: done in {time.time() - t0:.0f} s -> {out}/report/index.md{size}")
    return 0 if state else 1


def _output_dir(given: str) -> str:
    """The absolute --output once reproduce may write it (its path is checked by run_lock): new, empty, or an earlier
    reproduction's (its run.json says kind "reproduce"; reproduce.json marks one written before that file existed).
    Anything else is refused unchanged."""
    import os

    from pmod_bench.rundir import check_owner, run_kind

    out = os.path.abspath(os.path.expanduser(given))
    if run_kind(out) is None and os.path.isfile(os.path.join(out, "reproduce.json")):
        return out  # a reproduction of an earlier version (before run.json)
    check_owner(out, "reproduce", "--output", hint=" (or that of an earlier `pmod-bench reproduce`)")
    return out
