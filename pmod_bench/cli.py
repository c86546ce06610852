"""The ``pmod-bench`` command line.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``, which registers an
argparse subparser with ``set_defaults(func=handler)``; a handler returns the exit code. Those
modules import only argparse at top level, so ``pmod-bench --help`` is instant; heavy libraries are
imported inside the handlers.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

#: subcommand modules, in --help order
SUBCOMMAND_MODULES = (
    "pmod_bench.commands.demo",
    "pmod_bench.profiler.cli",
    "pmod_bench.tasks.cli",
    "pmod_bench.train.cli",
    "pmod_bench.reports.cli",
    "pmod_bench.commands.convert",
    "pmod_bench.commands.reproduce",
)


from pmod_bench.errors import UserError  # noqa: E402  (re-exported: handlers raise pmod_bench.cli.UserError)


def build_parser() -> argparse.ArgumentParser:
    from pmod_bench import __version__

    parser = argparse.ArgumentParser(
        prog="pmod-bench",
        description="Train, evaluate, measure and report p-MoD multimodal LLMs (Mixture-of-Depths with progressive ratio decay).",
    )
    parser.add_argument("--version", action="version", version=f"pmod-bench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"pmod-bench {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    from pmod_bench.cli import main as _main  # the package's module, so UserError is the same class

    sys.exit(_main())
