"""The ``pmod-bench report`` subcommand.

The project's CLI (``pmod_bench/cli.py``) registers it with :func:`add_parser`; ``python -m
pmod_bench.reports.cli`` runs it stand-alone (same arguments, without the ``report`` word).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

EPILOG = """\
examples:
  pmod-bench report --paper --output report-paper
  pmod-bench report runs/profile-next runs/eval-next-base runs/eval-next-pmod05 --output report
  pmod-bench report runs/* --label runs/eval-ablation=vanilla-MoD --label runs/eval-d3=fig3:deep:0.4 --output report

A run is matched to the paper's rows by --label, else its run.json "label", else automatically
(model name + PMoDConfig / profile variant). LABEL forms: MODEL/VARIANT (llava-next-7b/p-MoD-0.4),
VARIANT (p-MoD-0.5, baseline, FastV, p-MoD-linear, vanilla-MoD, MoD+TanhNorm, p-MoD-softmax, ...),
MODEL (llava-v1.5-7b), or fig3:GROUP:RETENTION (GROUP shallow, middle, deep or base).
Details: docs/RUN_DIRS.md.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``report`` on an ``argparse`` subparsers object; the handler is ``args.func(args) -> int``."""
    from .matching import DEFAULT_MODEL
    from .paper import PAPER_MODELS

    p = subparsers.add_parser(
        "report",
        help="rebuild the paper's tables and figures, from runs or from the paper alone",
        description="Render every table of the p-MoD paper (Markdown, LaTeX, CSV) and its figures (PNG, PDF), "
        "with the values reproduced by RUN_DIRs beside the paper's, or the paper's own values with --paper.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="run directories written by pmod-bench profile / eval / train")
    p.add_argument("--paper", action="store_true", help="render the paper's own tables and figures (no runs)")
    p.add_argument("--output", "-o", required=True, type=Path, metavar="DIR", help="directory to write the report into")
    p.add_argument("--label", action="append", default=[], metavar="RUN_DIR=LABEL",
                   help="say which paper row a run reproduces (repeatable); overrides run.json's label")
    p.add_argument("--default-model", default=DEFAULT_MODEL, choices=PAPER_MODELS,
                   help="match runs of other models (the tiny test model, a random-weight preset, an unrecognised "
                        "checkpoint) as this paper model; default: they get their own 'measured' lines")
    p.add_argument("--no-figures", action="store_true", help="tables and index only (no matplotlib needed)")
    p.set_defaults(func=run, handler=run)
    return p


def _labels(items: Sequence[str]) -> dict[str, str]:
    from .build import ReportError

    out: dict[str, str] = {}
    for item in items:
        run_dir, sep, label = item.partition("=")
        if not sep or not run_dir.strip() or not label.strip():
            raise ReportError(f"--label {item!r}: expected RUN_DIR=LABEL, e.g. --label runs/eval-a=llava-next-7b/p-MoD-0.4")
        out[run_dir.strip().rstrip("/") or "/"] = label.strip()
    return out


def _command(args: argparse.Namespace) -> str:
    parts = ["pmod-bench", "report"]
    parts += ["--paper"] if args.paper else [str(d) for d in args.run_dirs]
    for item in args.label:
        parts += ["--label", item]
    parts += ["--output", str(args.output)]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    """Handler of ``pmod-bench report``: 0 on success, 2 on bad input (message on stderr)."""
    from .build import ReportError, build_report
    from .matching import LabelError
    from .runs import RunDirError

    try:
        result = build_report(
            args.run_dirs, args.output, paper=args.paper, labels=_labels(args.label), default_model=args.default_model,
            figures=not args.no_figures, command=_command(args), progress=sys.stderr.isatty(),
        )
    except (RunDirError, LabelError, ReportError) as e:
        print(f"pmod-bench report: error: {e}", file=sys.stderr)
        return 2
    for w in result.warnings:
        print(f"pmod-bench report: warning: {w}", file=sys.stderr)
    n_fig = sum(len(v) for v in result.figures.values())
    print(f"wrote {len(result.tables)} tables and {n_fig} figure files to {result.output} (see {result.output / 'index.md'})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Stand-alone entry point: ``python -m pmod_bench.reports.cli --paper --output DIR``."""
    parser = argparse.ArgumentParser(prog="pmod-bench")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "report":
        argv = ["report", *argv]
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
