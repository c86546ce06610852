"""``pmod-bench eval`` and ``pmod-bench data``: the evaluation runner and its benchmark data.

Only argparse is imported at module level (``pmod-bench --help`` stays instant); lmms-eval, torch
and datasets load inside the handlers.

    pmod-bench eval --model DIR --suite table1 --output runs/next7b [--limit N] [--batch-size B] [--shift 0.3]
    pmod-bench eval --model DIR --suite video --output runs/v [--max-num-frames N] [--fps F (Qwen2.5-VL)]
    pmod-bench eval --list                 # suites, benchmarks, tasks and metrics
    pmod-bench eval --tasks-dir            # the --include_path for `python -m lmms_eval`
    pmod-bench data check [SUITE] [--root DIR] [--decode]
    pmod-bench data fixtures DIR [--suite SUITE]
"""

from __future__ import annotations


def _field_docs(cls) -> dict[str, str]:
    """{field: docstring} of a dataclass, for --help (reST ``literals`` shown plain)."""
    from pmod_bench.fielddocs import field_docs

    return {k: v.replace("``", "") for k, v in field_docs(cls).items()}


def add_parser(subparsers) -> None:
    from pmod_bench.model.config import RATIOS_FORMS

    from .runner import EvalConfig

    doc = _field_docs(EvalConfig)
    p = subparsers.add_parser(
        "eval", help="evaluate a model on the paper's benchmarks through lmms-eval (resumable run directory)",
        description="Run benchmark suites through lmms-eval with the pmod_llava model and write an eval run directory "
                    "(docs/RUN_DIRS.md). Re-running the same command on the same --output resumes an interrupted run. "
                    "With PMOD_BENCH_DATA=DIR (or --data DIR) datasets are read from DIR/ORG/NAME snapshots.",
    )
    p.add_argument("--model", help=doc.get("model"))
    p.add_argument("--suite", default=None, help=doc.get("suite") + " See --list.")
    p.add_argument("--output", metavar="RUN_DIR", help=doc.get("output"))
    p.add_argument("--limit", type=int, default=None, help=doc.get("limit"))
    p.add_argument("--batch-size", type=int, default=1, help="requests per forward pass (answers equal batch size 1)")
    p.add_argument("--shift", type=float, default=None, help="run a p-MoD model at this shift factor delta")
    p.add_argument("--schedule", default=None, help="run a p-MoD model with this schedule (cosine, linear, constant, ...)")
    p.add_argument("--ratios", default=None, metavar="R,R,...",
                   help=f"run a p-MoD model at explicit per-layer retention ratios, one per LLM layer: {RATIOS_FORMS}")
    p.add_argument("--pmod", default=None, help=doc.get("pmod"))
    p.add_argument("--method", action="append", default=None, metavar="SPEC",
                   help=doc.get("method") + " Repeatable: each method is evaluated into a run directory of its own, "
                   "OUTPUT/METHOD (then `pmod-bench report OUTPUT/*`).")
    p.add_argument("--match", default=None, metavar="VARIANT", help=doc.get("match"))
    p.add_argument("--match-tflops", type=float, default=None, metavar="X", help=doc.get("match_tflops"))
    p.add_argument("--match-kv", type=float, default=None, metavar="Y", help=doc.get("match_kv"))
    p.add_argument("--match-image-size", default=None, metavar="WxH", help=doc.get("match_image_size"))
    p.add_argument("--match-frames", type=int, default=None, metavar="N", help=doc.get("match_frames"))
    p.add_argument("--match-frame-size", default=None, metavar="WxH", help=doc.get("match_frame_size"))
    p.add_argument("--match-convention", choices=("headline", "paper"), default="headline", help=doc.get("match_convention"))
    p.add_argument("--match-tolerance", type=float, default=0.01, metavar="R", help=doc.get("match_tolerance"))
    p.add_argument("--allow-untrained-routers", action="store_true", help="let --shift/--schedule/--ratios route layers without a trained router")
    p.add_argument("--dtype", default="auto", help="auto (on GPU the host's: float16 for LLaVA and LLaVA-OneVision, bfloat16 for "
                   "Qwen2.5-VL; float32 on CPU), bfloat16, float16, float32")
    p.add_argument("--device", default=None, help="cuda:0, cpu, ... (default: this process's GPU, else CPU)")
    p.add_argument("--attn", dest="attn_implementation", default="sdpa", help="attention implementation: sdpa, eager, flash_attention_2")
    p.add_argument("--chat-template", default=None, help="default: the host's own (LLaVA: vicuna_v1, the paper's; Qwen2.5-VL: "
                   "the checkpoint's, as lmms-eval's qwen2_5_vl; LLaVA-OneVision: qwen_1_5, as lmms-eval's llava_onevision); "
                   "vicuna_v1 (LLaVA only), qwen_1_5 (OneVision only), processor, or a .jinja file")
    p.add_argument("--gen-kwargs", default=None, help=doc.get("gen_kwargs") + " Keys: max_new_tokens, temperature, "
                   "top_p, num_beams, do_sample, until.")
    p.add_argument("--stop-at-until", action="store_true", help=doc.get("stop_at_until"))
    p.add_argument("--max-num-frames", type=int, default=None, metavar="N", help=doc.get("max_num_frames"))
    p.add_argument("--fps", type=float, default=None, metavar="F", help=doc.get("fps"))
    p.add_argument("--data", default=None, metavar="DIR", help="local data root (sets PMOD_BENCH_DATA for this run)")
    p.add_argument("--label", default=None, help="free text stored in run.json")
    p.add_argument("--introspect", nargs="?", const="demo", default=None, metavar="IMAGE",
                   help="also record which vision tokens each p-MoD layer keeps for IMAGE (default: a generated "
                        "image): introspection.json, drawn by `pmod-bench report` as Fig. 5 / 6")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads, >= 1 (CPU runs; 1 is fastest on a shared machine)")
    p.add_argument("--list", action="store_true", help="list suites and benchmarks, then exit")
    p.add_argument("--tasks-dir", action="store_true", help="print the adapter tasks' lmms-eval --include_path, then exit")
    p.set_defaults(func=_eval)

    d = subparsers.add_parser("data", help="check benchmark data (PMOD_BENCH_DATA) or write test fixtures",
                              description="Benchmark data for the adapter tasks: `check` validates local snapshots, "
                                          "`fixtures` writes tiny datasets in the hub schema.")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION")
    c = dsub.add_parser("check", help="report, per benchmark, whether its local data is present and valid")
    c.add_argument("suite", nargs="?", default="all", help="suite or benchmarks (default: all)")
    c.add_argument("--root", default=None, help="data root (default: $PMOD_BENCH_DATA)")
    c.add_argument("--decode", action="store_true",
                   help="also open every image (video benchmarks: every video, with OpenCV) of every row (slow on full "
                        "datasets) and name each row that does not decode")
    c.set_defaults(func=_data_check)
    f = dsub.add_parser("fixtures", help="write tiny fixture datasets (hub schema, snapshot layout) under DIR")
    f.add_argument("dir", help="output root; use it as PMOD_BENCH_DATA")
    f.add_argument("--suite", default="all", help="suite or benchmarks (default: all)")
    f.set_defaults(func=_data_fixtures)
    d.set_defaults(func=lambda args: (d.print_help(), 0)[1])


def _user_error(msg: str):
    from pmod_bench.cli import UserError

    return UserError(msg)


def _eval(args) -> int:
    import os
    import shlex
    import sys

    if args.tasks_dir:
        from . import tasks_dir

        print(tasks_dir())
        return 0
    if args.list:
        from .benchmarks import describe

        print(describe())
        return 0
    missing = [f"--{n}" for n in ("model", "suite", "output") if not getattr(args, n)]
    if missing:
        raise _user_error(f"missing {', '.join(missing)}; e.g. pmod-bench eval --model DIR --suite table1 --output runs/x "
                          "(see --list for suites)")
    if args.threads is not None and args.threads < 1:
        raise _user_error(f"--threads must be >= 1, got {args.threads} (1 is fastest on a shared machine)")
    _check_data_root(args.data)
    command = " ".join(shlex.quote(a) for a in ["pmod-bench", *sys.argv[1:]])
    cfgs = _eval_configs(args, command)
    from pmod_bench.outputs import check_output_path

    check_output_path(args.output, "--output")  # a file, read-only, a name too long: refused before anything is written
    if args.data:
        os.environ["PMOD_BENCH_DATA"] = str(args.data)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if len(cfgs) == 1:
        return _eval_one(cfgs[0], args.output, command)
    return _eval_methods(cfgs, args.output, command)


def _check_data_root(data) -> None:
    """--data, else $PMOD_BENCH_DATA: an existing directory (or unset), checked before anything is written."""
    import os

    from .data import ENV_VAR

    if data is not None:
        if not os.path.isdir(data):
            what = "a file" if os.path.exists(data) else "no such directory"
            raise _user_error(f"--data {data}: {what}; pass the data root that holds ORG/NAME snapshots")
        return
    env = os.environ.get(ENV_VAR, "").strip()
    if env and not os.path.isdir(os.path.expanduser(env)):
        what = "a file, not a directory" if os.path.exists(os.path.expanduser(env)) else "no such directory"
        raise _user_error(f"{ENV_VAR}={env}: {what}; point {ENV_VAR} (or --data) at the data root that holds ORG/NAME "
                          f"snapshots, or unset it to read from the hub")


def _eval_configs(args, command: str) -> list:
    """One EvalConfig per --method (one without), all validated (and --match solved) before anything is written.

    Several methods: each is a run directory of its own, ``OUTPUT/<method spec>`` (an eval run directory holds one
    evaluation: the model, its settings and one method)."""
    from pathlib import Path

    from .runner import EvalConfig, check_launch

    methods = list(dict.fromkeys(args.method or [None]))
    try:
        check_launch()
        cfgs = []
        for spec in methods:
            output = args.output if len(methods) == 1 else str(Path(args.output) / _method_dir(spec))
            cfgs.append(EvalConfig(
                model=args.model, suite=args.suite, output=output, limit=args.limit, batch_size=args.batch_size,
                pmod=args.pmod, shift=args.shift, schedule=args.schedule, ratios=args.ratios,
                allow_untrained_routers=args.allow_untrained_routers, dtype=args.dtype, device=args.device,
                attn_implementation=args.attn_implementation, chat_template=args.chat_template, gen_kwargs=args.gen_kwargs,
                stop_at_until=args.stop_at_until, max_num_frames=args.max_num_frames, fps=args.fps, label=args.label,
                introspect=args.introspect, command=command,
                method=spec, match=args.match, match_tflops=args.match_tflops, match_kv=args.match_kv,
                match_image_size=args.match_image_size, match_frames=args.match_frames,
                match_frame_size=args.match_frame_size, match_convention=args.match_convention,
                match_tolerance=args.match_tolerance,
            ))
    except ValueError as exc:  # bad settings: nothing written
        raise _user_error(str(exc)) from None
    dirs = [Path(c.output).name for c in cfgs]
    same = sorted({d for d in dirs if dirs.count(d) > 1})
    if same:
        raise _user_error(f"--method: {', '.join(same)} given twice (the same method and options); give each once")
    if len(cfgs) > 1 and (Path(args.output) / "run.json").exists():
        raise _user_error(f"--output {args.output} holds one evaluation (run.json); with several --method each method "
                          "gets its own run directory OUTPUT/METHOD: pass a new --output")
    return cfgs


def _method_dir(spec: str) -> str:
    """The sub-run directory of a method (its canonical spec; ':' read as '-' in file names)."""
    from pmod_bench.methods import parse_method_spec

    try:
        return parse_method_spec(spec).spec().replace(":", "-").replace("/", "_")
    except ValueError:
        return str(spec)  # EvalConfig names the error


def _eval_one(cfg, output: str, command: str) -> int:
    """One evaluation into ``output``; prints its table; the exit code (failures: 1)."""
    import os
    import sys

    from pmod_bench.outputs import output_errors

    from .runner import RunDirMismatch, format_rows, run_eval

    resume = "free disk space and run the same command again: finished benchmarks and every saved answer are kept"
    try:
        with output_errors("--output", output, disk_full_fix=resume):  # a full disk, read-only: one line
            outcome = run_eval(cfg)
    except (ValueError, RunDirMismatch) as exc:  # a bad model / a run dir of another evaluation: nothing written
        raise _user_error(" ".join(str(exc).split())) from None
    except KeyboardInterrupt:
        print(f"\npmod-bench eval: interrupted. Finished benchmarks and every answered batch are saved in "
              f"{output}; resume with:\n  {command}", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate launch / torchrun, rank 0 reports
        return 1 if outcome.failures else 0
    if outcome.resumed_answers:
        print(f"pmod-bench eval: resumed {output}: {outcome.resumed_answers} answer(s) from the saved responses, "
              f"{outcome.computed_answers} computed", file=sys.stderr)
    if outcome.rows:
        print(format_rows(outcome.rows))
    if outcome.failures:
        print(f"pmod-bench eval: {len(outcome.failures)} benchmark(s) failed:", file=sys.stderr)
        for key, msg in outcome.failures.items():
            print(f"  {key}: {msg}", file=sys.stderr)
        print(f"Tracebacks in {output}/errors/. Fix the cause and re-run the same command: finished benchmarks "
              "are kept.", file=sys.stderr)
        return 1
    if outcome.pending:
        print(f"pmod-bench eval: no results for {', '.join(outcome.pending)}", file=sys.stderr)
        return 1
    print(f"results: {output}/summary.json")
    return 0


def _eval_methods(cfgs: list, output: str, command: str) -> int:
    """Several --method: one run directory each under ``output`` (which this process owns meanwhile), in order; every
    sub-run's directory is checked first, so a refused one stops the command before any method ran."""
    import contextlib
    import os
    from pathlib import Path

    from pmod_bench.outputs import check_output_path
    from pmod_bench.rundir import run_lock

    from .runner import RunDirMismatch, check_identity

    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    for cfg in cfgs:
        check_output_path(cfg.output, "--output")
        try:
            check_identity(Path(cfg.output), cfg)
        except RunDirMismatch as exc:
            raise _user_error(" ".join(str(exc).split())) from None
    codes = []
    with run_lock(output, command=command) if rank == 0 else contextlib.nullcontext():
        for cfg in cfgs:
            print(f"method {cfg.method}: {cfg.output}")
            code = _eval_one(cfg, cfg.output, command)
            if code == 130:
                return code
            codes.append(code)
    print(f"report: pmod-bench report {output}/*")
    return max(codes)


def _data_check(args) -> int:
    from .benchmarks import resolve_suite
    from .data import ENV_VAR, check_benchmark, data_root, decode_check

    root = data_root(args.root)
    if root is None:
        raise _user_error(f"no data root: set {ENV_VAR}=DIR or pass --root DIR (datasets are read from DIR/ORG/NAME); "
                          "without it lmms-eval fetches from the hub (needs an HF token)")
    try:
        benches = resolve_suite(args.suite)
    except ValueError as exc:
        raise _user_error(str(exc)) from None
    bad = 0
    print(f"data root: {root}")
    print(f"{'benchmark':<10} {'status':<8} {'dataset [config] splits':<58} rows")
    for b in benches:
        for st in check_benchmark(b, root):
            ref = st.ref
            name = f"{ref.hub_id} [{ref.config or 'default'}] {'/'.join(ref.splits)}"
            rows = "/".join(str(st.rows[s]) for s in ref.splits if s in st.rows)
            print(f"{b.key:<10} {'ok' if st.ok else 'MISSING' if st.path is not None and not st.path.is_dir() else 'INVALID':<8} "
                  f"{name:<58} {rows}")
            if not st.ok:
                bad += 1
                print(f"{'':<10} -> {st.error}")
            elif args.decode:
                notes: list = []
                problems = decode_check(b, st, notes=notes)
                bad += len(problems)
                for msg in problems:
                    print(f"{'':<10} -> {msg}")
                for msg in notes:  # video benchmarks: what the opened videos hold
                    print(f"{'':<10}    {msg}")
    opened = "image and video" if any(r.videos for b in benches for r in b.data) else "image"
    print(f"{bad} problem(s)" if bad else "all present and valid" + (f", every {opened} decodes" if args.decode else
                                                                   " (images not opened; --decode opens them)"))
    return 1 if bad else 0


def _data_fixtures(args) -> int:
    from .benchmarks import resolve_suite
    from .fixtures import generate

    try:
        keys = [b.key for b in resolve_suite(args.suite)]
    except ValueError as exc:
        raise _user_error(str(exc)) from None
    out = generate(args.dir, keys)
    print(f"wrote {len(out)} fixture dataset(s) under {args.dir} for {', '.join(keys)}; "
          f"use PMOD_BENCH_DATA={args.dir}")
    return 0


__all__ = ["add_parser"]
