"""The training entrypoint: HF Trainer (on accelerate; DeepSpeed through it) subclassed for p-MoD LLaVA.

``train(cfg)`` runs one stage of the paper's recipe and writes the run directory (docs/RUN_DIRS.md)::

    OUTPUT_DIR/
      run.json               kind "train", command, label (a run directory of another kind is refused)
      train_config.json      the validated configuration, p-MoD shift resolved for the LLM's depth
      train_log.jsonl        one row per logged optimizer step (loss, lr, tokens/s, accumulated GPU-hours)
      train_summary.json     how the run ended (completed | stopped | overflow | failed), steps, loss, cost, ...
      bad_samples.jsonl      every bad record once (all processes, all sessions), with the reason
      checkpoint-N/          resumable checkpoints (HF Trainer + pmod_train_state.json)
      init_model/            ZeRO-3 only: the starting model, built once by the main process (removed at the end)
      config.json, model.safetensors, processor files    the final model (from_pretrained loads it)
      connector.safetensors  (PT) the trained connector, for model.projector of an SFT run

Running the same command again is idempotent: a completed run reports that it is finished and changes
nothing, a run stopped at ``train.stop_at_step`` stays stopped, and anything else resumes from the newest
*complete* checkpoint (a ``checkpoint-N`` without a readable ``trainer_state.json``, what a kill during
a save leaves, is set aside as ``incomplete-checkpoint-N``).

Everything specific to this project is in the subclass's overrides: LLaVA's modality-grouped sampler,
token/sample accounting and the JSONL log, bad-sample bookkeeping, ``use_cache=False`` in training
forwards; the loop, gradient accumulation, mixed precision, gradient checkpointing, DDP/DeepSpeed,
checkpointing and resume are HF Trainer's own.
"""

from __future__ import annotations

import datetime
import errno
import importlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from pmod_bench.atomic import atomic_write_json, atomic_write_text
from pmod_bench.model.plan import PMoDOverflowError
from pmod_bench.outputs import check_output_path, disk_full
from pmod_bench.rundir import check_owner
from pmod_bench.train.build import INIT_DIR, apply_trainable, build_model, build_partitioned, num_llm_layers, numel
from pmod_bench.train.config import ConfigError, TrainConfig, valid_per_device_batch
from pmod_bench.train.layouts import layout_for, restrict_tiles
from pmod_bench.train.data import (
    DataCollator,
    LlavaConversationDataset,
    ModalityLengthGroupedSampler,
    count_tokens,
    read_records,
)

log = logging.getLogger(__name__)

STATE_FILE = "pmod_train_state.json"
SUMMARY_FILE = "train_summary.json"
SCHEMA_VERSION = 1
#: configuration keys that may differ between invocations of one run (everything else must match)
VOLATILE_KEYS = ("output_dir", "label", "recipe", "train.resume", "train.stop_at_step", "train.progress_bar",
                 "train.report_to", "train.save_steps", "train.save_total_limit", "train.logging_steps", "train.device",
                 "data.num_workers", "data.max_consecutive_bad", "data.cache")


def _atomic_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj, default=str)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read_json(path: Path) -> Any:
    """The JSON in ``path``, or None if it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _step_of(checkpoint: str | Path) -> int:
    m = re.search(r"checkpoint-(\d+)$", str(checkpoint).rstrip("/"))
    return int(m.group(1)) if m else 0


def _public_pmod(d: dict | None) -> dict | None:
    """A p-MoD dict without ``overflow_guard`` (set by train.overflow_guard during training, off in saved models)."""
    return None if d is None else {k: v for k, v in d.items() if k != "overflow_guard"}


# -------------------------------------------------------------------------------------- run state
class RunState:
    """Accounting of one run across processes and sessions; the main process writes the files.

    Counters (tokens, samples, bad-sample skips) and the bad records found are kept per process and
    combined at :meth:`sync`, a collective that every process reaches at the same points (each log,
    each checkpoint, the end of training).
    """

    def __init__(self, cfg: TrainConfig, out: Path, world_size: int, rank: int, is_main: bool, resumed: dict,
                 logged_bad: dict) -> None:
        self.cfg, self.out = cfg, out
        self.world_size, self.rank, self.is_main = world_size, rank, is_main
        self.gpu_hours0 = float(resumed.get("gpu_hours", 0.0))
        self.tokens_total = int(resumed.get("tokens", 0))
        self.samples_total = int(resumed.get("samples", 0))
        self.skips_total = int(resumed.get("bad_sample_skips", 0))
        self.tokens = self.samples = self.skips = 0  # this process, since the last sync
        self.pending_bad: list = []  # bad entries found by this process since the last sync
        self.logged_bad: dict = dict(logged_bad)  # raw record index -> entry, as in bad_samples.jsonl
        self.session_tokens = 0  # all processes, this session
        self.t_start: float | None = None
        self.t_last: float | None = None
        self.tokens_last = self.samples_last = 0  # totals at the last log row
        self.last_row: dict | None = None
        self.trainer: PMoDTrainer | None = None
        self.dataset: LlavaConversationDataset | None = None
        self.bad_path = out / "bad_samples.jsonl"

    def start(self) -> None:
        self.t_start = self.t_last = time.time()
        self.tokens_last, self.samples_last = self.tokens_total, self.samples_total

    def gpu_hours(self) -> float:
        """Accumulated device-hours: wall-clock since training started x processes, plus earlier sessions."""
        elapsed = 0.0 if self.t_start is None else time.time() - self.t_start
        return self.gpu_hours0 + elapsed * self.world_size / 3600.0

    def record_bad(self, entries: list) -> None:
        """Bad records a batch of this process skipped (one entry per skip)."""
        self.skips += len(entries)
        self.pending_bad.extend(entries)

    def log_bad(self, entries: list) -> None:
        """Add entries to bad_samples.jsonl (main process), each record once over the whole run."""
        new = []
        for e in entries:
            if e["index"] not in self.logged_bad:
                self.logged_bad[e["index"]] = e
                new.append(e)
        if self.dataset is not None:
            self.dataset.mark_bad(entries)
        if not new or not self.is_main:
            return
        with open(self.bad_path, "a", encoding="utf-8") as fh:
            fh.writelines(json.dumps(e) + "\n" for e in new)
        for e in new:
            where = f" ({e['path']})" if e.get("path") else ""
            log.warning("bad sample: record %s id %r%s: %s", e["index"], e.get("id"), where, e["reason"])

    def sync(self) -> None:
        """Combine the processes' counters and bad records (collective when there are several processes)."""
        trainer = self.trainer
        counts = [self.tokens, self.samples, self.skips]
        entries = self.pending_bad
        if self.world_size > 1 and trainer is not None:
            from accelerate.utils import gather_object

            t = torch.tensor(counts, dtype=torch.float64, device=trainer.args.device)
            counts = [int(v) for v in trainer.accelerator.reduce(t, reduction="sum").tolist()]
            entries = gather_object(list(entries))
        self.tokens = self.samples = self.skips = 0
        self.pending_bad = []
        self.tokens_total += counts[0]
        self.samples_total += counts[1]
        self.session_tokens += counts[0]
        self.skips_total += counts[2]
        self.log_bad(entries)

    def on_log(self, trainer: PMoDTrainer, logs: dict) -> None:
        self.sync()
        tokens, samples = self.tokens_total - self.tokens_last, self.samples_total - self.samples_last
        self.tokens_last, self.samples_last = self.tokens_total, self.samples_total
        now = time.time()
        dt = max(now - (self.t_last or now), 1e-9)
        self.t_last = now
        row = {
            "step": trainer.state.global_step,
            "epoch": round(float(trainer.state.epoch or 0.0), 6),
            "loss": float(logs["loss"]),
            "lr": float(logs.get("learning_rate", float("nan"))),
            "grad_norm": None if logs.get("grad_norm") is None else float(logs["grad_norm"]),
            "tokens_per_s": tokens / dt,
            "samples_per_s": samples / dt,
            "gpu_hours": self.gpu_hours(),
            "world_size": self.world_size,
            "tokens": self.tokens_total,
            "samples": self.samples_total,
            "bad_sample_skips": self.skips_total,
        }
        self.last_row = row
        if self.is_main:
            with open(self.out / "train_log.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    def state(self, step: int) -> dict:
        return {"step": step, "gpu_hours": self.gpu_hours(), "tokens": self.tokens_total, "samples": self.samples_total,
                "bad_sample_skips": self.skips_total}


class _TrainingDone(Exception):
    """Raised at train begin when the resumed checkpoint already is at the last step (no step is left)."""


class RunCallback(TrainerCallback):
    """Start the clock, stop at ``train.stop_at_step`` (with a checkpoint), add accounting to checkpoints."""

    def __init__(self, run: RunState, stop_at_step: int | None) -> None:
        self.run, self.stop_at_step = run, stop_at_step

    def on_train_begin(self, args, state, control, **kwargs):
        self.run.start()
        if state.global_step >= state.max_steps > 0:
            # resumed at the end (a kill during the final save): HF Trainer would run one more step
            raise _TrainingDone(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop_at_step is not None and state.global_step >= self.stop_at_step:
            control.should_save = True
            control.should_log = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self.run.sync()  # every process saves: counters and bad records up to this step go into the checkpoint
        if self.run.is_main:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                _atomic_json(ckpt / STATE_FILE, self.run.state(state.global_step))


# ----------------------------------------------------------------------------------------- trainer
def split_router_groups(opt, named_parameters, scale: float) -> int:
    """Move the p-MoD routers' parameters of ``opt`` (a fresh optimizer: no state yet) into groups of their own with
    ``lr = group lr x scale`` (one per original group, so weight decay is kept); returns how many were moved."""
    from pmod_bench.train.build import param_group

    routers = {id(p) for n, p in named_parameters if param_group(n) == "routers"}
    moved, new = 0, []
    for group in opt.param_groups:
        mine = [p for p in group["params"] if id(p) in routers]
        if mine:
            group["params"] = [p for p in group["params"] if id(p) not in routers]
            new.append({**{k: v for k, v in group.items() if k != "params"}, "params": mine, "lr": group["lr"] * scale})
            moved += len(mine)
    for group in new:
        opt.add_param_group(group)
    opt.param_groups[:] = [g for g in opt.param_groups if g["params"]]
    opt._pmod_router_groups = True
    return moved


def _forward_takes_kwargs(model) -> bool:
    import inspect

    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values())


class PMoDTrainer(Trainer):
    """HF Trainer with LLaVA's modality-grouped sampler and the run directory's accounting."""

    def __init__(self, *args: Any, run: RunState, modality_lengths: list | None = None, **kwargs: Any) -> None:
        self.run = run
        self.modality_lengths = modality_lengths
        self._filler: dict | None = None  # ZeRO-3: the label-free image row of _same_modules_on_every_process
        super().__init__(*args, **kwargs)
        run.trainer = self
        # the loss is the mean over every labelled token of a global batch, whatever its split into micro-batches and
        # processes: HF Trainer passes num_items_in_batch to a forward that takes **kwargs (LLaVA's classes). Qwen2.5-VL's
        # class opts out (accepts_loss_kwargs = False, "fix gemma3 grad acc #37208") though its forward hands **kwargs
        # to its loss_function as LLaVA's does; without it each micro-batch's mean would weigh the same
        if not self.model_accepts_loss_kwargs and _forward_takes_kwargs(self.accelerator.unwrap_model(self.model)):
            self.model_accepts_loss_kwargs = True

    def create_optimizer(self, model=None):
        """HF's optimizer, with the p-MoD routers in their own groups at ``train.router_lr_scale`` x lr when that is not 1."""
        opt = super().create_optimizer(model) if model is not None else super().create_optimizer()
        scale = self.run.cfg.train.router_lr_scale
        if scale != 1.0 and not getattr(opt, "_pmod_router_groups", False):
            split_router_groups(opt, (self.model if model is None else model).named_parameters(), scale)
        return opt

    def _get_train_sampler(self, train_dataset=None):
        if self.modality_lengths is None:
            return super()._get_train_sampler(train_dataset)
        a = self.args
        # LLaVA: LengthGroupedSampler(per-device batch, world_size = processes x accumulation)
        return ModalityLengthGroupedSampler(self.modality_lengths, a.per_device_train_batch_size,
                                            max(a.world_size, 1) * a.gradient_accumulation_steps, seed=a.seed)

    def training_step(self, model, inputs, num_items_in_batch=None):
        bad = inputs.pop("bad_samples", None)
        if bad:
            self.run.record_bad(bad)
        self.run.tokens += count_tokens(inputs)
        self.run.samples += int(inputs["input_ids"].shape[0])
        if self._zero3_several:
            inputs = self._same_modules_on_every_process(inputs)
        return super().training_step(model, inputs, num_items_in_batch)

    @property
    def _zero3_several(self) -> bool:
        ds = getattr(self.args, "hf_deepspeed_config", None)
        return ds is not None and ds.is_zero3() and self.args.world_size > 1

    def _same_modules_on_every_process(self, inputs: dict) -> dict:
        """ZeRO-3 gathers each module's parameters with a collective when the module runs, so all processes
        must run the same modules in each micro-step. A micro-batch without images skips the vision tower,
        the connector and the p-MoD routers; if another process's micro-batch has images (LLaVA's mixed last
        global batch), this one gets one extra row: an image sample with every label -100, which changes
        neither the loss nor any gradient (no labelled token), only which modules run. Data flow::

            has_image (this process) --all_reduce max--> any_image;  any_image and not has_image: + 1 row
        """
        import torch.distributed as dist

        has = torch.tensor([float("pixel_values" in inputs)], device=self.args.device)
        anyone = has.clone()
        dist.all_reduce(anyone, op=dist.ReduceOp.MAX)
        if anyone.item() == 0 or has.item() == 1:
            return inputs
        from pmod_bench.train.data import IGNORE_INDEX, append_sample

        if self._filler is None:
            ds = self.train_dataset
            for i in ds._order[True]:  # the shortest image record that builds
                if i in ds.known_bad:
                    continue
                try:
                    sample = ds.build(ds.records[i])
                except Exception:  # noqa: BLE001 - a bad record is no filler; try the next
                    continue
                sample["labels"] = torch.full_like(sample["labels"], IGNORE_INDEX)
                self._filler = sample
                break
            else:
                raise RuntimeError("ZeRO-3: a text-only micro-batch beside an image one, and no usable image record")
        c = self.data_collator
        out = append_sample({k: v.cpu() if torch.is_tensor(v) else v for k, v in inputs.items()}, self._filler,
                            c.pad_token_id, c.image_keys, c.token_keys)
        return {k: v.to(self.args.device) if torch.is_tensor(v) else v for k, v in out.items()}

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resume the weights through ``from_pretrained``, which maps the saved (original-format) keys back.

        HF Trainer's own path reads the checkpoint file with ``load_state_dict(strict=False)`` and no key
        conversion, so for LLaVA models (whose keys ``save_pretrained`` renames) most weights were silently
        not restored (transformers issue #43701). DeepSpeed and FSDP keep their own checkpoint formats.
        """
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        import copy

        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        ref = next(target.parameters())
        loaded = type(target).from_pretrained(
            resume_from_checkpoint, config=copy.deepcopy(target.config), dtype=ref.dtype,
            attn_implementation=target.config._attn_implementation,
        )
        target.load_state_dict(loaded.state_dict(), strict=True)
        del loaded

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, {**inputs, "use_cache": False}, return_outputs, num_items_in_batch)
        loss = out[0] if return_outputs else out
        if torch.is_grad_enabled() and not loss.requires_grad:
            # a batch that reaches no trainable parameter (text-only samples while only the connector trains):
            # a zero gradient, so backward (and DDP's reduction) still runs
            if not getattr(self, "_warned_no_grad", False):
                log.warning("a batch reaches no trainable parameter (e.g. text-only samples in PT): zero gradient")
                self._warned_no_grad = True
            loss = loss + sum((p * 0).sum() for p in model.parameters() if p.requires_grad)
            out = (loss, out[1]) if return_outputs else loss
        return out

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:  # a step log (the end-of-training log has train_loss instead)
            self.run.on_log(self, logs)
            logs = {**logs, "tokens_per_s": self.run.last_row["tokens_per_s"], "gpu_hours": self.run.last_row["gpu_hours"]}
        super().log(logs, start_time)


# ------------------------------------------------------------------------------------- entrypoint
def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def check_batch(cfg: TrainConfig, world: int) -> int:
    """Gradient accumulation steps for ``world`` processes; ConfigError naming a value that works."""
    t = cfg.train
    per_step = t.per_device_batch_size * world
    if t.global_batch_size % per_step == 0:
        return t.global_batch_size // per_step
    b = valid_per_device_batch(t.global_batch_size, world, t.per_device_batch_size)
    fix = (f"pass train.per_device_batch_size={b} (gradient accumulation makes up the rest)" if b is not None else
           f"{t.global_batch_size} samples cannot be split over {world} processes: change train.global_batch_size or "
           "the number of processes")
    raise ConfigError(
        f"train.global_batch_size={t.global_batch_size} is not a multiple of train.per_device_batch_size x processes "
        f"= {t.per_device_batch_size} x {world}; {fix}."
    )


def check_run_dir(out: Path) -> None:
    """Refuse an output_dir train cannot own, before anything is written: a file, a name the filesystem does not
    take, a read-only directory, a run directory of another kind (eval, profile: train would overwrite its run.json),
    or a non-empty directory without run.json (someone else's files; ``train --demo``'s demo_data and the run lock
    excepted)."""
    check_output_path(out, "output_dir", error=ConfigError)
    check_owner(out, "train", "output_dir", hint=" (-o DIR)", error=ConfigError, ignore=("demo_data",))


def checkpoint_complete(path: Path) -> bool:
    """A checkpoint HF Trainer finished writing: its trainer_state.json (written after the weights, optimizer,
    scheduler and RNG states) exists and parses."""
    state = _read_json(Path(path) / "trainer_state.json")
    return isinstance(state, dict) and isinstance(state.get("global_step"), int)


def _checkpoints(out: Path) -> list:
    """checkpoint-N directories, newest first."""
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=_step_of, reverse=True)


def resolve_resume(cfg: TrainConfig, out: Path, set_aside: bool = False) -> str | None:
    """The checkpoint to resume from (``train.resume``), or None.

    ``auto``: the newest *complete* checkpoint; newer incomplete ones (a kill during the save) are named in
    a warning and, with ``set_aside`` (the main process), renamed ``incomplete-checkpoint-N``.
    """
    r = cfg.train.resume
    ckpts = _checkpoints(out)
    if r is None:
        if ckpts:
            raise ConfigError(
                f"output_dir {out} holds checkpoints ({ckpts[0].name}); pass train.resume=auto to continue that run, "
                "or choose a new output_dir."
            )
        return None
    if r != "auto":
        if not checkpoint_complete(Path(r)):
            raise ConfigError(f"train.resume={r!r} is not a complete checkpoint directory (no readable trainer_state.json); "
                              "use train.resume=auto or another checkpoint-N.")
        return str(r)
    complete = next((c for c in ckpts if checkpoint_complete(c)), None)
    for c in ckpts:
        if c == complete:
            break
        fallback = f"resuming from {complete.name}" if complete is not None else "no complete checkpoint: starting anew"
        log.warning("%s is incomplete (no readable trainer_state.json: its save was interrupted); %s", c, fallback)
        if set_aside:
            target = c.with_name("incomplete-" + c.name)
            if target.exists():
                target = c.with_name(f"incomplete-{c.name}-{int(time.time())}")
            c.rename(target)
    return None if complete is None else str(complete)


def _flat(d: Any, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out: dict = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def config_changes(out: Path, cfg: TrainConfig) -> list:
    """``key: old -> new`` for settings that differ from the run's train_config.json (volatile keys excepted)."""
    stored = _read_json(out / "train_config.json")
    if not isinstance(stored, dict):
        return []
    stored = {**stored, "pmod": stored.get("pmod_recipe", stored.get("pmod"))}
    stored.pop("pmod_recipe", None)
    old, new = _flat(stored), _flat(cfg.to_dict())
    volatile = lambda k: any(k == v or k.startswith(v + ".") for v in VOLATILE_KEYS)  # noqa: E731
    keys = sorted(k for k in set(old) | set(new) if not volatile(k) and old.get(k) != new.get(k))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys]


def finished(cfg: TrainConfig, out: Path, checkpoint: str | None) -> dict | None:
    """The summary of a run that has nothing left to do (completed, or at train.stop_at_step), else None."""
    summary = _read_json(out / SUMMARY_FILE)
    summary = summary if isinstance(summary, dict) else {}
    if summary.get("status") == "completed" and (out / "config.json").is_file():
        changes = config_changes(out, cfg)
        if changes:
            raise ConfigError(f"output_dir {out} holds a completed run with other settings ({'; '.join(changes[:4])}); "
                              "choose a new output_dir to train again.")
        return {**summary, "unchanged": True,
                "note": f"the run is complete ({summary.get('steps')}/{summary.get('max_steps')} steps); nothing to do"}
    stop = cfg.train.stop_at_step
    if checkpoint is not None and stop is not None and _step_of(checkpoint) >= stop:
        step = _step_of(checkpoint)
        if summary.get("status") != "stopped" or summary.get("steps") != step:
            summary = {"status": "stopped", "steps": step, "output_dir": str(out)}
        return {**summary, "unchanged": True,
                "note": f"{Path(checkpoint).name} is at train.stop_at_step={stop}; nothing to do (run without "
                        "train.stop_at_step, or with a later one, to continue)"}
    return None


def _resumed_state(checkpoint: str | None, out: Path) -> dict:
    """Accounting at the checkpoint: its pmod_train_state.json, else the log row of its step."""
    if not checkpoint:
        return {}
    state = _read_json(Path(checkpoint) / STATE_FILE)
    if isinstance(state, dict):
        return state
    step = _step_of(checkpoint)
    for row in _log_rows(out / "train_log.jsonl"):
        if row.get("step") == step:
            log.warning("%s has no %s (saved before this version, or killed right after its save); accounting "
                        "taken from train_log.jsonl step %d", checkpoint, STATE_FILE, step)
            return row
    log.warning("%s has no %s and the log has no row of step %d: GPU hours and counters restart at 0",
                checkpoint, STATE_FILE, step)
    return {}


def _log_rows(path: Path) -> list:
    """Readable rows of a JSONL file (a torn last line, from a kill mid-append, is dropped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _claim(out: Path, cfg: TrainConfig, command: str | None, checkpoint: str | None) -> dict:
    """Main process, before the model is built: run.json, the log and bad-sample list cut back to the
    checkpoint (everything, for a fresh start). Returns the bad records already listed {index: entry}."""
    from pmod_bench import __version__

    out.mkdir(parents=True, exist_ok=True)
    old = _read_json(out / "run.json") if checkpoint else None
    meta = {"kind": "train", "schema_version": SCHEMA_VERSION,
            "created": old.get("created", _now()) if isinstance(old, dict) else _now(),
            "pmod_bench_version": __version__, "command": command or "pmod_bench.train.train(...)",
            "label": cfg.label, "recipe": cfg.recipe}
    if isinstance(old, dict):
        meta["updated"] = _now()
    _atomic_json(out / "run.json", meta)
    keep = _step_of(checkpoint) if checkpoint else 0
    rows = [r for r in _log_rows(out / "train_log.jsonl") if 0 < r.get("step", 0) <= keep]
    atomic_write_text(out / "train_log.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    for p in out.glob("bad_samples.rank*.jsonl"):  # written by earlier versions
        p.unlink()
    bad = {}
    if checkpoint:
        for e in _log_rows(out / "bad_samples.jsonl"):
            bad.setdefault(e.get("index"), e)
    atomic_write_text(out / "bad_samples.jsonl", "".join(json.dumps(e) + "\n" for e in bad.values()))
    return bad


def training_arguments(cfg: TrainConfig, grad_accum: int, report_to: list | None = None, find_unused: bool = False) -> TrainingArguments:
    t = cfg.train
    ds = t.deepspeed_path()
    if ds is not None:
        try:  # only a check that DeepSpeed is installed (transformers imports it itself when training)
            importlib.import_module("deepspeed")
        except ImportError:
            raise ConfigError(
                f"train.deepspeed={t.deepspeed} needs DeepSpeed: pip install 'pmod-bench[deepspeed]' (on a CUDA machine), "
                "or train without it: train.deepspeed=null."
            ) from None
    use_cpu = t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available())
    if use_cpu and t.precision == "fp16":
        raise ConfigError("train.precision=fp16 needs a GPU; on CPU use fp32 (or bf16).")
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old name still works, with a warning)
    ckpt_name = "activation_checkpointing" if hasattr(TrainingArguments, "activation_checkpointing") else "gradient_checkpointing"
    checkpointing = {ckpt_name: t.gradient_checkpointing}
    if t.gradient_checkpointing:
        checkpointing[f"{ckpt_name}_kwargs"] = {"use_reentrant": False}
    return TrainingArguments(
        **checkpointing,
        output_dir=cfg.output_dir,
        per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio of the total steps
        lr_scheduler_type=t.lr_scheduler,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps if t.max_steps is not None else -1,
        max_grad_norm=t.max_grad_norm,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        dataloader_num_workers=cfg.data.num_workers,
        remove_unused_columns=False,
        report_to=report_to if report_to is not None else (t.report_to or "none"),
        deepspeed=ds,
        use_cpu=use_cpu,
        ddp_find_unused_parameters=t.ddp_find_unused_parameters if t.ddp_find_unused_parameters is not None else find_unused,
        disable_tqdm=not t.progress_bar,
    )



def model_info(model, device: str) -> dict:
    """What the profiler needs to tell whether this run's throughput belongs to a profiled row (plain data)."""
    from pmod_bench.model.hosts import host_for

    c = model.config
    tc, vc = c.text_config, c.vision_config
    heads = tc.num_attention_heads
    v = lambda *names: next((getattr(vc, n) for n in names if getattr(vc, n, None) is not None), None)  # noqa: E731
    ratios = model.layer_ratios() if hasattr(model, "layer_ratios") else [1.0] * tc.num_hidden_layers
    return {
        "class": type(model).__name__,
        "family": host_for(c).model_type,
        "text": {"layers": tc.num_hidden_layers, "hidden": tc.hidden_size, "intermediate": tc.intermediate_size,
                 "heads": heads, "kv_heads": getattr(tc, "num_key_value_heads", None) or heads,
                 "head_dim": getattr(tc, "head_dim", None) or tc.hidden_size // heads, "vocab": tc.vocab_size},
        # Qwen2.5-VL's tower names its depth / heads differently and has no fixed image size (None)
        "vision": {"layers": v("num_hidden_layers", "depth"), "hidden": vc.hidden_size, "intermediate": vc.intermediate_size,
                   "heads": v("num_attention_heads", "num_heads"), "image_size": v("image_size"), "patch_size": vc.patch_size},
        "layer_ratios": [float(r) for r in ratios],
        "num_params": sum(numel(p) for p in model.parameters()),
        "device": device,
    }


def train(cfg: TrainConfig, model=None, processor=None, command: str | None = None) -> dict:
    """Run one training stage; returns the summary written to ``train_summary.json``.

    ``model``/``processor`` may be given (e.g. a model built in Python); otherwise they are built from
    ``cfg.model`` (with ``cfg.pmod`` resolved for the LLM's depth). Launch with ``accelerate launch``
    (or torchrun / deepspeed) for several processes; each process calls this function. A run with nothing
    left to do returns its summary with ``"unchanged": True`` and a ``note``, and writes nothing. ``pmod-bench
    train`` calls it holding ``output_dir``'s lock (:func:`pmod_bench.rundir.run_lock`, in the main process); a
    Python caller that may race another process on the same directory takes that lock around the call.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(cfg.output_dir)
    world = _world_size()
    t = cfg.train
    check_run_dir(out)
    grad_accum = check_batch(cfg, world)
    checkpoint = resolve_resume(cfg, out, set_aside=_rank() == 0)
    done = finished(cfg, out, checkpoint)
    if done is not None:
        log.warning("%s: %s", out, done["note"])
        return done

    # the data first: cheap, and its errors should come before a 7B model is loaded
    records = read_records(cfg.data.json, cfg.data.max_samples)
    has_text_only = any(isinstance(r, dict) and not r.get("image") for r in records)
    args = training_arguments(cfg, grad_accum, find_unused=bool(cfg.pmod is not None or has_text_only))
    run = _start_run(cfg, out, world, args.process_index, checkpoint, command)
    base: dict = {
        "recipe": cfg.recipe or "python", "stage": cfg.stage, "output_dir": str(out), "label": cfg.label,
        "world_size": world, "global_batch_size": t.global_batch_size, "gradient_accumulation_steps": grad_accum,
        "pmod": None, "trainable": cfg.trainable, "resumed_from": checkpoint,
        "model": cfg.model.source,  # the model trained from (null when composed from an LLM and a vision tower)
    }
    trainer = None
    try:
        torch.manual_seed(t.seed)
        model, processor = _model_to_train(cfg, model, processor, args, out)
        _prepare_model(cfg, model, args, base, out, run.is_main)
        trainer = _make_trainer(cfg, model, processor, args, records, run)
        try:
            trainer.train(resume_from_checkpoint=checkpoint)
        except _TrainingDone:
            log.warning("%s is at the last step (%d): no step left; saving the final model", checkpoint, trainer.state.global_step)
        run.sync()
    except PMoDOverflowError as exc:
        step = (trainer.state.global_step if trainer is not None else _step_of(checkpoint or "")) + 1
        error = f"step {step}: {exc}"
        if run.is_main:
            _atomic_json(out / SUMMARY_FILE, _summary(base, trainer, run, "overflow", error, checkpoint))
        raise PMoDOverflowError(error) from exc
    except BaseException as exc:  # every ending is recorded: the error and the last finished step
        full = disk_full(exc, out)
        error = f"{type(exc).__name__}: {exc}".strip()
        if run.is_main:
            if full:
                _drop_partial_checkpoints(out, checkpoint)
                error = f"disk full ({full}): {error}"
            _record_failure(out, _summary(base, trainer, run, "failed", error, checkpoint))
        if full:
            raise OSError(errno.ENOSPC, f"disk full: {full}; train_summary.json records status failed", str(out)) from exc
        raise

    steps = trainer.state.global_step
    status = "completed"
    if t.stop_at_step is not None and steps >= t.stop_at_step and steps < trainer.state.max_steps:
        status = "stopped"
    if status == "completed":
        _save_final_model(cfg, model, trainer, out, run.is_main)
    summary = _summary(base, trainer, run, status, None, checkpoint)
    if run.is_main:
        _atomic_json(out / SUMMARY_FILE, summary)
        if summary["bad_samples"]:
            log.warning("%d bad records (%d malformed, dropped at load), %d skips; see %s", summary["bad_samples"],
                        len(run.dataset.malformed), summary["bad_sample_skips"], out / "bad_samples.jsonl")
    if world > 1:
        trainer.accelerator.wait_for_everyone()  # no process leaves while another still writes the run directory
    return summary


def _drop_partial_checkpoints(out: Path, resumed: str | None) -> None:
    """Disk full: remove the checkpoints this session left incomplete (no trainer_state.json: a resume would set
    them aside, never use them), so that the summary can be written and space is back for the resume."""
    first = _step_of(resumed or "")
    for c in _checkpoints(out):
        if _step_of(c) > first and not checkpoint_complete(c):
            shutil.rmtree(c, ignore_errors=True)
            log.warning("disk full: removed %s, a checkpoint this run could not finish writing", c)


def _record_failure(out: Path, summary: dict) -> None:
    """train_summary.json of a failed run; when even that cannot be written, say so (the original error follows)."""
    try:
        _atomic_json(out / SUMMARY_FILE, summary)
    except OSError as exc:
        log.error("could not record the failure in %s (%s): %s", out / SUMMARY_FILE, exc, summary.get("error"))


def _start_run(cfg: TrainConfig, out: Path, world: int, rank: int, checkpoint: str | None, command: str | None) -> RunState:
    """This process's accounting of the run: the main process claims the run directory (run.json) and
    reads the bad records earlier sessions found, which every process then starts from."""
    is_main = rank == 0
    resumed_state = _resumed_state(checkpoint, out)
    logged_bad = _claim(out, cfg, command, checkpoint) if is_main else {}
    if world > 1:  # every process starts from the main process's list of bad records
        from accelerate.utils import broadcast_object_list

        logged_bad = broadcast_object_list([logged_bad], from_process=0)[0]
    run = RunState(cfg, out, world, rank, is_main, resumed_state, logged_bad)
    if is_main and checkpoint:  # the final loss of a run resumed at its last step
        rows = _log_rows(out / "train_log.jsonl")
        run.last_row = rows[-1] if rows else None
    return run


def _model_to_train(cfg: TrainConfig, model, processor, args: TrainingArguments, out: Path):
    """(model, processor): the given ones, or built from ``cfg.model`` (ZeRO-3: partitioned at load)."""
    if model is None:
        pmod = cfg.resolved_pmod(num_llm_layers(cfg)) if cfg.pmod is not None else None
        if getattr(args, "hf_deepspeed_config", None) is not None and args.hf_deepspeed_config.is_zero3():
            return build_partitioned(cfg, pmod, out / INIT_DIR, args)
        return build_model(cfg, pmod)
    if cfg.pmod is not None and getattr(model.config, "pmod", None) is None:
        raise ConfigError("the recipe sets pmod but the given model is a vanilla LLaVA; convert it with to_pmod first.")
    if cfg.data.max_tiles is not None:  # as build_model does: the given processor and config capped alike
        restrict_tiles(model, processor, cfg.data.max_tiles)
    return model, processor


def _prepare_model(cfg: TrainConfig, model, args: TrainingArguments, base: dict, out: Path, is_main: bool) -> None:
    """Freeze / unfreeze ``cfg.trainable``; record the model in the summary ``base`` and (main process)
    train_config.json, with the p-MoD settings the model really has."""
    pmod_dict = _public_pmod(getattr(model.config, "pmod", None))
    base["pmod"] = pmod_dict
    trainable = cfg.trainable if cfg.train.trainable is not None else layout_for(model).stage_trainable[cfg.stage]
    if cfg.stage == "pt" and pmod_dict is not None and "routers" not in trainable:
        log.warning("PT with p-MoD layers: routers stay frozen at their initial (zero) weights, so selection is by "
                    "position; the paper's PT trains the connector of the vanilla model (pmod=null).")
    base["trainable"] = list(trainable)
    groups = apply_trainable(model, trainable)
    base["params"] = {g: v["params"] for g, v in groups.items()}
    base["trainable_params"] = sum(v["params"] for v in groups.values() if v["trainable"])
    device = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else args.device.type
    base["model_info"] = model_info(model, device)
    base["host"] = base["model_info"]["family"]  # the host family (docs/RUN_DIRS.md), read by `pmod-bench report`
    if is_main:
        resolved = cfg.to_dict()
        resolved["pmod_recipe"] = resolved["pmod"]
        resolved["pmod"] = pmod_dict
        _atomic_json(out / "train_config.json", resolved)


def _make_trainer(cfg: TrainConfig, model, processor, args: TrainingArguments, records: list, run: RunState) -> PMoDTrainer:
    """The dataset (bad records of earlier sessions skipped, malformed ones logged) and its trainer."""
    layout = layout_for(model)
    dataset = LlavaConversationDataset(
        records, processor, image_folder=cfg.data.image_folder, template=cfg.data.template,
        max_length=cfg.data.max_length, image_aspect_ratio=cfg.data.image_aspect_ratio,
        on_bad_sample=cfg.data.on_bad_sample, max_consecutive_bad=cfg.data.max_consecutive_bad,
        layout=layout, pixel_budget=cfg.data.pixel_budget(),
    )
    run.dataset = dataset
    dataset.mark_bad(list(run.logged_bad.values()))  # found in earlier sessions: not read again
    run.log_bad(dataset.malformed)
    if cfg.data.cache:  # every sample built once (or loaded), before the first step
        from pmod_bench.train.cache import attach_cache

        t0 = time.time()
        got = attach_cache(dataset, cfg.data.json)
        log.info("data.cache: %d samples %s %s in %.1f s (%d bad)", got["samples"],
                 "loaded from" if got["loaded"] else "built and stored in", got["path"], time.time() - t0, got["bad"])
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return PMoDTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=processor,
        data_collator=DataCollator(pad_id, layout.image_keys, layout.token_keys),
        callbacks=[RunCallback(run, cfg.train.stop_at_step)], run=run,
        modality_lengths=dataset.modality_lengths if cfg.data.group_by_modality_length else None,
    )


def _save_final_model(cfg: TrainConfig, model, trainer: PMoDTrainer, out: Path, is_main: bool) -> None:
    """The trained model into the run directory (+ connector.safetensors after PT); the ZeRO-3 starting model removed."""
    _finalize_model(model)
    trainer.save_model(str(out))
    if is_main and cfg.stage == "pt":
        _save_connector(out)
    if is_main:  # safetensors writes 0600; the model is published like its config.json
        from pmod_bench.atomic import apply_default_modes

        for name in os.listdir(out):
            if name.endswith(".safetensors"):
                apply_default_modes(out / name)
    if is_main and (out / INIT_DIR).is_dir():
        shutil.rmtree(out / INIT_DIR)  # the starting model (ZeRO-3) is not needed once the final one is saved


def _summary(base: dict, trainer: Trainer | None, run: RunState, status: str, error: str | None,
             checkpoint: str | None) -> dict:
    wall = 0.0 if run.t_start is None else time.time() - run.t_start
    last = run.last_row or {}
    steps = trainer.state.global_step if trainer is not None and trainer.state is not None else _step_of(checkpoint or "")
    max_steps = trainer.state.max_steps if trainer is not None and getattr(trainer.state, "max_steps", 0) else None
    return {
        **base,
        "status": status,
        "error": error,
        "steps": steps,
        "max_steps": max_steps if max_steps else run.cfg.train.max_steps,
        "final_loss": last.get("loss"),
        "gpu_hours": run.gpu_hours(),
        "tokens_per_s": run.session_tokens / wall if wall > 0 else None,
        "tokens": run.tokens_total,
        "samples": run.samples_total,
        "wall_s": wall,
        "bad_samples": len(run.logged_bad),
        "bad_sample_skips": run.skips_total,
        "finished": _now(),
    }


def _finalize_model(model) -> None:
    """Config of the saved model: the p-MoD overflow guard off (a training switch, train.overflow_guard)."""
    pm = getattr(model.config, "pmod", None)
    if pm is not None:
        model.config.pmod = {**pm, "overflow_guard": False}


def _save_connector(out: Path) -> None:
    """connector.safetensors from the saved final model (read back from disk: also right under ZeRO-3)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    state = {}
    for f in sorted(out.glob("*.safetensors")):
        if f.name == "connector.safetensors":
            continue
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # saved names vary (original format): store the in-memory HF names
                if "multi_modal_projector." in k:
                    state["model.multi_modal_projector." + k.split("multi_modal_projector.", 1)[1]] = sf.get_tensor(k)
                elif k.endswith("image_newline"):
                    state["model.image_newline"] = sf.get_tensor(k)
    if state:
        save_file(state, str(out / "connector.safetensors"), metadata={"format": "pt"})
    else:
        log.warning("no connector tensors found in %s; connector.safetensors not written", out)



__all__ = ["STATE_FILE", "SUMMARY_FILE", "PMoDTrainer", "RunCallback", "RunState", "check_batch", "check_run_dir",
           "checkpoint_complete", "finished", "resolve_resume", "train", "training_arguments", "valid_per_device_batch"]
