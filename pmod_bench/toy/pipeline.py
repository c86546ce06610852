"""``pmod-bench reproduce --toy``: the paper's pipeline on the toy world, end to end, resumable.

Steps (each skipped when its output is complete, so a killed run continues where it stopped)::

    OUTPUT/
      data/bench/pmod-bench/toy-world/   the benchmark, hub layout (lmms-eval reads it via PMOD_BENCH_DATA)
      data/train/                         PT captions + SFT conversations (LLaVA JSON) + images
      prep/lm, prep/vision                the toy language model (+ tokenizer) and CLIP tower
      models/pt, models/sft               `pmod-bench train` run directories of the shared stages (PT, SFT)
      models/<model>/                     one SFT continuation per model (baseline, p-MoD-*, ablations)
      eval/<model>/                       `pmod-bench eval --suite toy` run directories (+ introspection.json)
      data/bench-blank/, controls/        the control: the baseline evaluated on the benchmark's images blanked
      profile/                            profile run directory (FLOPs, KV cache, CPU latency per model)
      routing.json                        the kept-token statistic of every p-MoD model
      logs/                               each job's own output (prep-vision, train-<model>, eval-<model>)
      methods/                            comparison methods of pmod_bench.methods at equal FLOPs (when installed)
      report/                             the toy analogs of Tables 1/3/4/6/7, trade-off curves, Fig. 5/6
      reproduce.json                      what ran, timings, and where each checkpoint came from
      run.json                            kind "reproduce", written first: the mark that lets a rerun adopt OUTPUT

Checkpoints are reused from, in order: OUTPUT/models (a resumed run), the checkpoint cache
(``$PMOD_BENCH_CACHE/toy-checkpoints/<key>``, filled by every full run; the key hashes recipes,
sizes and seeds), then the ones shipped in the package (``pmod_bench/toy/checkpoints``, --quick's
models). ``--retrain`` ignores the cache and the shipped ones.

Independent steps run side by side, ``jobs`` at a time (``pmod_bench.toy.parallel``): the vision tower beside
the LM, then every model's continuation, then every evaluation. Each job is one single-threaded worker
process, so the weights are bit for bit those of a one-job run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from pmod_bench.atomic import atomic_write_json

from .models import MODELS, PT, QUICK, SFT, ToyModel

if TYPE_CHECKING:
    from .parallel import Jobs

PACKAGE_DIR = Path(__file__).resolve().parent
SHIPPED = PACKAGE_DIR / "checkpoints"


@dataclass(frozen=True)
class Plan:
    """Sizes of one reproduction (the full run or --quick)."""

    models: tuple
    bench_n: int = 60
    """documents per benchmark split"""
    train_images: int = 3600
    """SFT scenes"""
    turns: int = 20
    """questions per SFT conversation (one image, many short answers: the image's tokens are paid once)"""
    rounds: int = 6
    """SFT conversations per scene (each a fresh draw of questions): train_images x rounds x ~turns question instances
    (6: ~430k, what the standalone experiment of issue 23 needed; measured against 4 (~290k): baseline AVG 59.0 vs 54.3,
    paired difference +4.7 [+0.9, +8.5], full suite, 60 documents a split)"""
    pt_images: int = 1280
    pmod_samples: int = 3600
    """conversations of the continuation stage every model runs (fresh questions about the SFT scenes, ``sft_pmod.json``,
    one per scene). Measured (issue 23, full suite, 60 documents a split, same SFT): 1920 -> 3600 took the baseline from
    74.3 to 76.0 and p-MoD-0.5 from 70.8 to 74.9 (its gap to the baseline -3.4 -> -1.0); ~2 min a model on one thread"""
    lm_steps: int = 1500
    """steps of the toy LM's text pretraining (batch 16; conversations with the scene's caption where the image goes).
    Measured (issue 23, full suite, 60 documents a split, same SFT): 150 -> 1500 steps took the baseline's AVG from
    59.0 to 74.3 (multiple choice 16.7 -> 76.7, existence F1 75.8 -> 90.6, attributes 75.0 -> 88.3). Answering from a
    caption in context, text only (100 fresh questions a kind): 150 steps left every kind at chance (existence 49%,
    attributes 33%, counting 31%, digits 15%); 1500 steps answer them (92%, 79%, 84%, 97%). SFT then only connects
    the image to skills the LM has, as LLaVA builds on a chat LLM; ~2 min on one thread, beside the tower's pretraining"""
    vision_steps: int = 5000
    eval_limit: Optional[int] = None
    routing_images: int = 30
    seed: int = 0

    def key(self) -> str:
        """Cache key of the checkpoints: every input that changes the trained weights."""
        from .data import DATA_VERSION

        h = hashlib.sha256()
        h.update(json.dumps({"data": DATA_VERSION, "train_images": self.train_images, "turns": self.turns, "rounds": self.rounds,
                             "pt_images": self.pt_images, "pmod_samples": self.pmod_samples, "lm_steps": self.lm_steps,
                             "vision_steps": self.vision_steps, "seed": self.seed}, sort_keys=True).encode())
        for p in sorted((PACKAGE_DIR / "recipes").glob("*.yaml")):
            h.update(p.name.encode() + p.read_bytes())
        for name in ("world.py", "questions.py", "prepare.py", "data.py"):
            h.update((PACKAGE_DIR / name).read_bytes())
        return h.hexdigest()[:16]


FULL = Plan(models=tuple(MODELS))
QUICK_PLAN = Plan(models=QUICK, bench_n=60, eval_limit=30, routing_images=8)


def _cache_dir() -> Path:
    from pmod_bench.model.sources import default_cache_root

    return default_cache_root() / "toy-checkpoints"


def _complete(run_dir: Path) -> bool:
    try:
        s = json.loads((run_dir / "train_summary.json").read_text())
    except (OSError, ValueError):
        return False
    return s.get("status") == "completed" and (run_dir / "config.json").is_file()


class Progress:
    """One line per step on stderr, with the elapsed time; a bar for the model loops."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        from tqdm import tqdm

        self.t0 = time.time()
        self.bar = tqdm(total=total, desc="reproduce --toy", unit="step", disable=quiet, file=sys.stderr,
                        bar_format="{desc}: {n}/{total} steps |{bar:20}| {elapsed} {postfix}")

    def log(self, msg: str) -> None:
        self.bar.write(f"[{time.time() - self.t0:6.1f} s] {msg}", file=sys.stderr)

    def step(self, what: str) -> None:
        self.bar.set_postfix_str(what)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


@dataclass
class Reproduction:
    out: Path
    plan: Plan
    retrain: bool = False
    progress: Optional[Progress] = None
    jobs: int = 1
    """independent steps run side by side (``pmod_bench.toy.parallel``; the weights do not depend on it)"""
    timings: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)
    command: str = "pmod_bench.toy.pipeline.reproduce(...)"

    # ------------------------------------------------------------------------------------ paths
    @property
    def bench_root(self) -> Path:
        return self.out / "data" / "bench"

    @property
    def train_dir(self) -> Path:
        return self.out / "data" / "train"

    def model_dir(self, name: str) -> Path:
        return self.out / "models" / name

    def eval_dir(self, name: str) -> Path:
        return self.out / "eval" / name

    def log(self, msg: str) -> None:
        if self.progress:
            self.progress.log(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    def _add_time(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to the timing ``name`` (a resumed run adds to what earlier invocations measured)."""
        self.timings[name] = round(seconds, 2) + self.timings.get(name, 0.0)

    def _timed(self, name: str, fn: Callable[[], None]) -> None:
        t = time.time()
        fn()
        self._add_time(name, time.time() - t)
        self._save_state()
        if self.progress:
            self.progress.step(name)

    # ------------------------------------------------------------------------------------- steps
    def data(self) -> None:
        from .data import benchmark_ok, write_benchmark, write_training

        if not benchmark_ok(self.bench_root, self.plan.bench_n):
            self.log(f"writing the toy benchmark ({self.plan.bench_n} documents per split) to {self.bench_root}")
            write_benchmark(self.bench_root, n=self.plan.bench_n)
        marker = self.train_dir / "toy_train.json"
        want = {"images": self.plan.train_images, "turns": self.plan.turns, "rounds": self.plan.rounds, "seed": self.plan.seed}
        if self.needs_training() and not (marker.is_file() and json.loads(marker.read_text()) == want):
            self.log(f"writing {self.plan.train_images} training scenes ({self.plan.rounds} conversations of {self.plan.turns} "
                     f"questions each) to {self.train_dir}")
            write_training(self.train_dir, n_images=self.plan.train_images, turns=self.plan.turns, rounds=self.plan.rounds)
            atomic_write_json(marker, want)

    def needs_training(self) -> bool:
        return any(self._reuse(m) is None for m in self.plan.models)

    def _reuse(self, name: str) -> Optional[Path]:
        """A finished checkpoint for ``name`` outside OUTPUT/models (cache, then shipped), or None."""
        if _complete(self.model_dir(name)):
            return self.model_dir(name)
        if self.retrain:
            return None
        cached = _cache_dir() / self.plan.key() / name
        if _complete(cached):
            return cached
        shipped = SHIPPED / name
        if (shipped / "config.json").is_file() and (shipped / "train_summary.json").is_file():
            return shipped
        return None

    def log_path(self, what: str) -> Path:
        """Where a job's own output goes (the trainer's log lines, lmms-eval's prints)."""
        return self.out / "logs" / f"{what}.log"

    def prepare(self, jobs: "Jobs") -> None:
        """The toy CLIP tower (a job: it needs nothing else) beside the tokenizer and LM (in this process)."""
        from .parallel import call_job, log_line
        from .prepare import build_language_model, build_tokenizer, build_vision_tower

        lm, vision = self.out / "prep" / "lm", self.out / "prep" / "vision"
        tower = None
        if not (vision / "toy_pretrain.json").is_file():
            log = self.log_path("prep-vision")
            self.log(f"pretraining the toy CLIP vision tower (patch labels of toy scenes; log: {log})")
            tower = jobs.submit(call_job, build_vision_tower, dict(out=str(vision), seed=self.plan.seed,
                                                                   steps=self.plan.vision_steps, log=log_line), str(log))
        if not (lm / "toy_pretrain.json").is_file():
            self.log("building the toy tokenizer and pretraining the toy language model on toy text")
            info = build_language_model(lm, build_tokenizer(self.plan.seed), seed=self.plan.seed, steps=self.plan.lm_steps,
                                        log=self.log)
            self.log(f"language model: final loss {info['final_loss']:.3f}")
        if tower is not None:
            info = tower.result()
            acc = ", ".join(f"{k} {100 * v:.1f}%" for k, v in info["head_accuracy"].items())
            self.log(f"vision tower: patch-label accuracy {acc} (shape and digit on the patches that hold one)")

    def _train_args(self, model: ToyModel, extra: list) -> list:
        """The ``pmod-bench train`` command line of one stage or model."""
        out = self.model_dir(model.name)
        prep = self.out / "prep"
        if model.derived:  # a continuation of the shared SFT (with p-MoD layers for the p-MoD models)
            args = ["train", "--config", str(model.recipe_path), f"model.source={self.model_dir('sft')}",
                    f"data.json={self.train_dir / 'sft_pmod.json'}", f"data.max_samples={self.plan.pmod_samples}"]
        else:
            data_json = self.train_dir / ("pt.json" if model is PT else "sft.json")
            args = ["train", "--config", str(model.recipe_path), f"model.llm={prep / 'lm'}",
                    f"model.vision_tower={prep / 'vision'}", f"data.json={data_json}"]
            if model is not PT:
                args.append(f"model.projector={self.model_dir('pt')}")
        return args + [f"data.image_folder={self.train_dir}", f"output_dir={out}", *extra]

    def _submit_train(self, jobs: "Jobs", model: ToyModel, extra: list):
        from .parallel import train_job

        log = self.log_path(f"train-{model.name}")
        self.log(f"training {model.name}: pmod-bench train --config {model.recipe_path.name} ... (log: {log})")
        return jobs.submit(train_job, self._train_args(model, extra), str(log))

    def _trained(self, model: ToyModel, result: dict) -> None:
        """Check, log and time one finished training job."""
        from .parallel import tail

        out = self.model_dir(model.name)
        if result["rc"] != 0 or not _complete(out):
            log = self.log_path(f"train-{model.name}")
            raise RuntimeError(f"training {model.name} failed (exit code {result['rc']}); its log, {log}, ends:\n{tail(log)}")
        s = json.loads((out / "train_summary.json").read_text())
        self.log(f"{model.name}: {s['steps']} steps, final loss {s['final_loss']:.4f}, {s['wall_s']:.0f} s")
        self._add_time(f"train {model.name}", result["wall_s"])
        self._save_state()

    def train(self, jobs: "Jobs") -> None:
        t = time.time()
        todo = [m for m in self.plan.models if self._reuse(m) is None]
        for name in self.plan.models:
            src = self._reuse(name)
            if src is not None and src != self.model_dir(name):
                self.sources[name] = str(src)
                self.log(f"{name}: reusing the checkpoint in {src}")
        if not todo:
            return
        if not _complete(self.model_dir("sft")):  # the shared stages, in order: prepared LM + tower, PT, SFT
            t_prep = time.time()
            self.prepare(jobs)
            self._add_time("prepare", time.time() - t_prep)
            if not _complete(self.model_dir("pt")):
                self._trained(PT, self._submit_train(jobs, PT, [f"data.max_samples={self.plan.pt_images}"]).result())
            self._trained(SFT, self._submit_train(jobs, SFT, []).result())
        running = {self._submit_train(jobs, MODELS[name], []): name for name in todo}  # independent: side by side
        self._collect(running, self._finish_training)
        self._add_time("training (wall)", time.time() - t)

    def _finish_training(self, name: str, result: dict) -> None:
        self._trained(MODELS[name], result)
        self.sources[name] = "trained"
        self._store_in_cache(name)
        self._save_state()
        if self.progress:
            self.progress.step(f"train {name}")

    def _collect(self, running: dict, finish: Callable[[str, dict], None]) -> None:
        """Wait for every job of ``running`` ({future: model name}), calling ``finish(name, result)`` as each ends. The
        others go on when one fails; the first failure is raised once all have ended (what finished is kept)."""
        from concurrent.futures import as_completed

        errors = []
        for fut in as_completed(running):
            try:
                finish(running[fut], fut.result())
            except Exception as exc:  # noqa: BLE001 (raised below, after the other jobs)
                errors.append(exc)
                self.log(f"{running[fut]}: {str(exc).splitlines()[0]}")
        if errors:
            raise errors[0]

    def _store_in_cache(self, name: str) -> None:
        dst = _cache_dir() / self.plan.key() / name
        if _complete(dst):
            return
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        src = self.model_dir(name)
        tmp.mkdir(parents=True)
        for f in src.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)

    def checkpoint(self, name: str) -> Path:
        src = self._reuse(name)
        if src is None:
            raise RuntimeError(f"no checkpoint for {name}")
        return src

    @property
    def blank_root(self) -> Path:
        """The blanked copy of the benchmark (``pmod_bench.toy.controls``): the baseline's control run reads it."""
        return self.out / "data" / "bench-blank"

    def _evaluations(self) -> list:
        """(name, checkpoint model, run directory, benchmark root) of every evaluation: the models, then the control
        (the baseline on the blanked images)."""
        from .report import BLANK_RUN, CONTROLS_DIR

        todo = [(name, name, self.eval_dir(name), self.bench_root) for name in self.plan.models]
        if "baseline" in self.plan.models:
            todo.append((BLANK_RUN, "baseline", self.out / CONTROLS_DIR / BLANK_RUN, self.blank_root))
        return todo

    def evaluate(self, jobs: "Jobs") -> None:
        from .controls import blank_benchmark_ok, write_blank_benchmark
        from .data import HUB_ID
        from .parallel import eval_job

        t = time.time()
        if not blank_benchmark_ok(self.blank_root / HUB_ID, self.bench_root / HUB_ID):
            write_blank_benchmark(self.bench_root / HUB_ID, self.blank_root / HUB_ID)
        running = {}
        for name, model_name, run_dir, bench in self._evaluations():
            if (run_dir / "summary.json").is_file() and json.loads((run_dir / "summary.json").read_text()).get("complete"):
                continue
            model = str(self.checkpoint(model_name))
            # the checkpoint's own chat template: the toy template it was trained with (Vicuna v1 for older checkpoints)
            cfg = dict(model=model, suite="toy", output=str(run_dir), batch_size=1, limit=self.plan.eval_limit,
                       label=f"toy/{name}", chat_template="processor",
                       command=f"pmod-bench eval --model {model} --suite toy --chat-template processor --output {run_dir}"
                       + (f" --limit {self.plan.eval_limit}" if self.plan.eval_limit else ""))
            what = "the blanked images (control)" if bench == self.blank_root else "the toy suite"
            self.log(f"evaluating {model_name} on {what} through lmms-eval (log: {self.log_path(f'eval-{name}')})")
            running[jobs.submit(eval_job, cfg, str(bench), str(self.log_path(f"eval-{name}")))] = name
        self._collect(running, self._finish_eval)
        if running:
            self._add_time("evaluation (wall)", time.time() - t)

    def _finish_eval(self, name: str, result: dict) -> None:
        if result["failures"]:
            raise RuntimeError(f"evaluating {name}: {result['failures']} (log: {self.log_path(f'eval-{name}')})")
        self.log(f"{name}: " + ", ".join(f"{r['benchmark']} {r['value']:.1f}" for r in result["rows"]))
        self._add_time(f"eval {name}", result["wall_s"])
        self._save_state()
        if self.progress:
            self.progress.step(f"eval {name}")

    # --------------------------------------------------------------------------------- profile
    def profile(self) -> None:
        from pmod_bench.profiler import Scenario, profile, write_run_dir

        out = self.out / "profile"
        if (out / "profile.json").is_file():
            return
        scenario = Scenario((64, 64), text_tokens=self.text_tokens(), gen_tokens=2)

        def go():
            rows = []
            for name in self.plan.models:
                variants = ["baseline"] if name == "baseline" else ["config"]
                got = profile(str(self.checkpoint(name)), variants, [scenario], latency=True, device="cpu", dtype="float32",
                              recipe=None, verify=True, warmup=2, repeats=7)
                for r in got:
                    r.variant = name
                rows += got
            tmp = out.with_name("profile.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            write_run_dir(str(tmp), rows, "pmod-bench reproduce --toy (profile step)", label="toy")
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)

        self.log("profiling every model (analytic FLOPs checked with FlopCounterMode, KV cache, CPU latency)")
        self._timed("profile", go)

    def text_tokens(self) -> int:
        """Prompt tokens of a toy existence question in the checkpoint's chat template, the profile scenario's text."""
        from .routing import prompt_text_tokens

        return prompt_text_tokens(str(self.checkpoint("baseline")))

    # --------------------------------------------------------------------------------- routing
    def routing(self) -> None:
        path = self.out / "routing.json"
        if path.is_file():
            return

        def go():
            import torch

            from pmod_bench import load_model
            from pmod_bench.tasks.introspection import write_introspection

            from .routing import EXIST_QUESTION, kept_token_statistic
            from .world import render

            torch.set_num_threads(1)
            scenes = self._eval_scenes(self.plan.routing_images)
            question = EXIST_QUESTION
            result = {}
            for name in self.plan.models:
                if name == "baseline":
                    continue
                model, processor = load_model(str(self.checkpoint(name)))
                model.eval()
                result[name] = kept_token_statistic(model, processor, scenes, question)
                # Fig. 5/6 data: one toy image, the routers' choices per layer
                write_introspection(self.eval_dir(name), model, processor, render(scenes[0]), question)
                r = result[name]
                self.log(f"{name}: kept tokens on shapes {100 * r['kept_on_shapes']:.1f}% vs {100 * r['tokens_on_shapes']:.1f}% "
                         f"of all tokens (shapes cover {100 * r['shape_area']:.1f}% of the image)")
            atomic_write_json(path, result, indent=1)

        self.log("measuring where the trained routers keep tokens")
        self._timed("routing", go)

    def _eval_scenes(self, n: int) -> list:
        import datasets

        from .data import HUB_ID, scene_from_json

        repo = self.bench_root / HUB_ID
        ds = datasets.load_dataset("parquet", data_files=str(repo / "scenes" / "test-*.parquet"), split="train")
        picked = [scene_from_json(r["scene"]) for r in ds if r["question_id"].startswith("exist-random")]
        seen, out = set(), []
        for sc in picked:  # one per image (each scene holds two questions)
            key = json.dumps([sc.size, sc.background, [s.box for s in sc.shapes]])
            if key not in seen:
                seen.add(key)
                out.append(sc)
        return out[:n]

    # --------------------------------------------------------------------------------- methods
    def methods(self) -> None:
        """The comparison methods registered in ``pmod_bench.methods`` (when that package exists), applied to the
        baseline checkpoint with their token budget solved to p-MoD-0.5's prefill FLOPs, evaluated like the models."""
        import importlib.util

        path = self.out / "methods" / "methods.json"
        if path.is_file():
            return
        if importlib.util.find_spec("pmod_bench.methods") is None:
            atomic_write_json(path, {"available": False, "note": "pmod_bench.methods is not installed: no comparison methods"})
            return
        import pmod_bench.methods as mod

        try:
            names = sorted(n for n, c in mod.available_methods().items() if not getattr(c, "video_only", False))  # image world
        except Exception as exc:  # the registry failed to load: recorded in the report, the reproduction goes on
            atomic_write_json(path, {"available": False, "note": f"pmod_bench.methods failed to load its methods: "
                                                                 f"{type(exc).__name__}: {exc}"})
            self.log(f"comparison methods skipped: pmod_bench.methods failed to load ({type(exc).__name__}: {exc})")
            return
        if not hasattr(mod, "solve"):
            atomic_write_json(path, {"available": False, "note": "pmod_bench.methods has no available_methods / solve"})
            return
        from pmod_bench import load_model
        from pmod_bench.tasks.plugin import PMoDLlava
        from pmod_bench.tasks.runner import EvalConfig, run_eval

        os.environ["PMOD_BENCH_DATA"] = str(self.bench_root)
        base = str(self.checkpoint("baseline"))
        done: dict = {}
        for name in names:
            run_dir = self.out / "methods" / name
            try:
                match = mod.solve(name, base, (64, 64), match="p-MoD-0.5", text_tokens=self.text_tokens())
                model, processor = load_model(base, method=match.config)
                spec = match.config.spec() if hasattr(match.config, "spec") else name
                lm = PMoDLlava.from_loaded(model, processor, name=f"{base}+{spec}", batch_size=1)
                self.log(f"evaluating comparison method {spec} (prefill FLOPs matched to p-MoD-0.5, rel. err. {match.rel_err:.3f})")
                outcome = run_eval(EvalConfig(model=f"{base}+{spec}", suite="toy", output=str(run_dir), limit=self.plan.eval_limit,
                                              label=f"toy/{name}"), lm=lm, log=lambda m: None)
                done[name] = {"spec": spec, "match": match.to_dict(), "run_dir": str(run_dir),
                              "scores": {r["benchmark"]: r["value"] for r in outcome.rows}, "failures": outcome.failures}
            except Exception as exc:  # one method failing must not lose the report; recorded, not hidden
                done[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
                self.log(f"comparison method {name}: {done[name]['error']}")
        atomic_write_json(path, {"available": True, "methods": done}, indent=1)

    # ---------------------------------------------------------------------------------- report
    def report(self) -> None:
        from .report import write_report

        self._timed("report", lambda: write_report(self.out, self.plan))

    # ------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        import torch

        torch.set_num_threads(1)  # deterministic training, and a fair share of a small CPU
        t0 = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        state_path = self.out / "reproduce.json"
        previous = json.loads(state_path.read_text()) if state_path.is_file() else {}
        if previous and previous.get("plan") != self.plan_dict():
            raise ValueError(f"{self.out} holds a reproduction with other settings ({'--quick' if previous['plan']['eval_limit'] else 'full'}); "
                             "resume it with the same flags or pass a new --output")
        self._claim()
        self.timings = dict(previous.get("timings", {}))
        self.sources = dict(previous.get("sources", {}))
        from .parallel import Jobs

        self._timed("data", self.data)
        with Jobs(self.jobs) as jobs:
            self.train(jobs)
            self.evaluate(jobs)
        self.profile()
        self.routing()
        self._timed("methods", self.methods)
        self.report()
        self._save_state(wall_s_this_invocation=round(time.time() - t0, 1), complete=True)
        return json.loads(state_path.read_text())

    def _claim(self) -> None:
        """run.json of kind "reproduce", before any step writes: a rerun adopts only a directory that holds it
        (``pmod-bench reproduce`` refuses other non-empty ones, and every other command refuses this one)."""
        from pmod_bench import __version__
        from pmod_bench.rundir import RUN_FILE, SCHEMA_VERSION

        path = self.out / RUN_FILE
        old = json.loads(path.read_text()) if path.is_file() else {}
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        meta = {"kind": "reproduce", "schema_version": SCHEMA_VERSION, "created": old.get("created", now),
                "pmod_bench_version": __version__, "command": self.command}
        if old:
            meta["updated"] = now
        atomic_write_json(path, meta)

    def _save_state(self, **extra) -> None:
        """reproduce.json after every step: a killed run keeps its timings and checkpoint sources."""
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "reproduce.json", {"plan": self.plan_dict(), "sources": self.sources,
                                                        "timings": self.timings, "checkpoint_key": self.plan.key(), **extra},
                          indent=1)

    def plan_dict(self) -> dict:
        from dataclasses import asdict

        d = asdict(self.plan)
        d["models"] = list(d["models"])
        return d


def reproduce(out: str | os.PathLike, quick: bool = False, retrain: bool = False, quiet: bool = False,
              jobs: Optional[int] = None, command: Optional[str] = None) -> dict:
    """Run (or resume) the reproduction in ``out``; ``jobs``: steps run side by side (default: the CPUs, at most 4);
    ``command``: recorded in ``out/run.json``."""
    from .parallel import default_jobs

    plan = QUICK_PLAN if quick else FULL
    steps = 1 + len(plan.models) * 2 + 5  # data, train + eval per model, the control's eval, profile, routing, methods, report
    prog = Progress(steps, quiet=quiet)
    try:
        rep = Reproduction(Path(out), plan, retrain=retrain, progress=prog, jobs=jobs or default_jobs())
        if command:
            rep.command = command
        return rep.run()
    finally:
        prog.close()


__all__ = ["FULL", "Plan", "QUICK_PLAN", "Reproduction", "reproduce"]
