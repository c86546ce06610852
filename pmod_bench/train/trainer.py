"""The training entrypoint: HF Trainer (on accelerate; DeepSpeed through it) subclassed for p-MoD LLaVA.

``train(cfg)`` runs one stage of the paper's recipe and writes the run directory (docs/RUN_DIRS.md)::

    OUTPUT_DIR/
      run.json               kind "train", command, label
      train_config.json      the validated configuration, p-MoD shift resolved for the LLM's depth
      train_log.jsonl        one row per logged optimizer step (loss, lr, tokens/s, accumulated GPU-hours)
      train_summary.json     recipe, stage, steps, final_loss, gpu_hours, tokens_per_s, status, ...
      bad_samples.jsonl      skipped records (on_bad_sample: skip), one per line with the reason
      checkpoint-N/          resumable checkpoints (HF Trainer + pmod_train_state.json)
      config.json, model.safetensors, processor files    the final model (from_pretrained loads it)
      connector.safetensors  (PT) the trained connector, for model.projector of an SFT run

Everything specific to this project is in the subclass's overrides: the modality-grouped sampler,
token/sample accounting and the JSONL log, bad-sample bookkeeping, ``use_cache=False`` in training
forwards; the loop, gradient accumulation, mixed precision, gradient checkpointing, DDP/DeepSpeed,
checkpointing and resume are HF Trainer's own.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from pmod_bench.atomic import atomic_write_json
from pmod_bench.model.plan import PMoDOverflowError
from pmod_bench.train.build import apply_trainable, build_model, num_llm_layers
from pmod_bench.train.config import ConfigError, TrainConfig
from pmod_bench.train.data import (
    DataCollator,
    LlavaConversationDataset,
    ModalityLengthGroupedSampler,
    count_tokens,
    read_records,
)

log = logging.getLogger(__name__)

STATE_FILE = "pmod_train_state.json"
SCHEMA_VERSION = 1


def _atomic_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj, default=str)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _step_of(checkpoint: str) -> int:
    m = re.search(r"checkpoint-(\d+)$", str(checkpoint).rstrip("/"))
    return int(m.group(1)) if m else 0


# -------------------------------------------------------------------------------------- run state
class RunState:
    """Accounting of one run across processes; the main process writes the files."""

    def __init__(self, cfg: TrainConfig, out: Path, world_size: int, rank: int, is_main: bool, resumed: dict) -> None:
        self.cfg, self.out = cfg, out
        self.world_size, self.rank, self.is_main = world_size, rank, is_main
        self.gpu_hours0 = float(resumed.get("gpu_hours", 0.0))
        self.tokens_total = int(resumed.get("tokens", 0))
        self.samples_total = int(resumed.get("samples", 0))
        self.tokens = self.samples = 0  # this process, since the last log
        self.session_tokens = 0  # all processes, this session
        self.t_start: float | None = None
        self.t_last: float | None = None
        self.last_row: dict | None = None
        self.bad_local = 0  # skips on this process
        self.bad_records: set = set()  # distinct bad record indices seen by this process
        name = "bad_samples.jsonl" if rank == 0 else f"bad_samples.rank{rank}.jsonl"
        self.bad_path = out / name

    def start(self) -> None:
        self.t_start = self.t_last = time.time()

    def gpu_hours(self) -> float:
        """Accumulated device-hours: wall-clock since training started x processes, plus earlier sessions."""
        elapsed = 0.0 if self.t_start is None else time.time() - self.t_start
        return self.gpu_hours0 + elapsed * self.world_size / 3600.0

    def record_bad(self, entries: list) -> None:
        self.bad_local += len(entries)
        new = []  # each record is logged once
        for e in entries:
            if e["index"] not in self.bad_records:
                self.bad_records.add(e["index"])
                new.append(e)
        with open(self.bad_path, "a", encoding="utf-8") as fh:
            for e in new:
                fh.write(json.dumps(e) + "\n")
        for e in new:
            where = f" ({e['path']})" if e.get("path") else ""
            log.warning("skipped bad sample: record %s id %r%s: %s", e["index"], e.get("id"), where, e["reason"])

    def on_log(self, trainer: PMoDTrainer, logs: dict) -> None:
        counts = torch.tensor([self.tokens, self.samples], dtype=torch.float64, device=trainer.args.device)
        if self.world_size > 1:
            counts = trainer.accelerator.reduce(counts, reduction="sum")
        tokens, samples = (int(v) for v in counts.tolist())
        self.tokens = self.samples = 0
        self.tokens_total += tokens
        self.samples_total += samples
        self.session_tokens += tokens
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
        }
        self.last_row = row
        if self.is_main:
            with open(self.out / "train_log.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    def state(self) -> dict:
        return {"gpu_hours": self.gpu_hours(), "tokens": self.tokens_total, "samples": self.samples_total}


class RunCallback(TrainerCallback):
    """Start the clock, stop at ``train.stop_at_step`` (with a checkpoint), add accounting to checkpoints."""

    def __init__(self, run: RunState, stop_at_step: int | None) -> None:
        self.run, self.stop_at_step = run, stop_at_step

    def on_train_begin(self, args, state, control, **kwargs):
        self.run.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop_at_step is not None and state.global_step >= self.stop_at_step:
            control.should_save = True
            control.should_log = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.run.is_main:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                _atomic_json(ckpt / STATE_FILE, {"step": state.global_step, **self.run.state()})


# ----------------------------------------------------------------------------------------- trainer
class PMoDTrainer(Trainer):
    """HF Trainer with LLaVA's modality-grouped sampler and the run directory's accounting."""

    def __init__(self, *args: Any, run: RunState, modality_lengths: list | None = None, **kwargs: Any) -> None:
        self.run = run
        self.modality_lengths = modality_lengths
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        if self.modality_lengths is None:
            return super()._get_train_sampler(train_dataset)
        a = self.args
        group = a.per_device_train_batch_size * max(a.world_size, 1) * a.gradient_accumulation_steps
        return ModalityLengthGroupedSampler(self.modality_lengths, group, seed=a.seed)

    def training_step(self, model, inputs, num_items_in_batch=None):
        bad = inputs.pop("bad_samples", None)
        if bad:
            self.run.record_bad(bad)
        self.run.tokens += count_tokens(inputs)
        self.run.samples += int(inputs["input_ids"].shape[0])
        return super().training_step(model, inputs, num_items_in_batch)

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


def resolve_resume(cfg: TrainConfig, out: Path) -> str | None:
    """The checkpoint to resume from (``train.resume``), or None."""
    r = cfg.train.resume
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if r is None:
        if last is not None:
            raise ConfigError(
                f"output_dir {out} holds checkpoints ({Path(last).name}); pass train.resume=auto to continue that run, "
                "or choose a new output_dir."
            )
        return None
    if r == "auto":
        return last
    if not (Path(r) / "trainer_state.json").is_file():
        raise ConfigError(f"train.resume={r!r} is not a checkpoint directory (no trainer_state.json); use auto or checkpoint-N.")
    return str(r)


def training_arguments(cfg: TrainConfig, grad_accum: int, report_to: list | None = None, find_unused: bool = False) -> TrainingArguments:
    t = cfg.train
    ds = t.deepspeed_path()
    if ds is not None:
        try:
            import deepspeed  # noqa: F401
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


def write_run_json(out: Path, cfg: TrainConfig, command: str | None) -> None:
    from pmod_bench import __version__

    _atomic_json(out / "run.json", {
        "kind": "train", "schema_version": SCHEMA_VERSION, "created": _now(), "pmod_bench_version": __version__,
        "command": command or "pmod_bench.train.train(...)", "label": cfg.label, "recipe": cfg.recipe,
    })


def train(cfg: TrainConfig, model=None, processor=None, command: str | None = None) -> dict:
    """Run one training stage; returns the summary written to ``train_summary.json``.

    ``model``/``processor`` may be given (e.g. a model built in Python); otherwise they are built from
    ``cfg.model`` (with ``cfg.pmod`` resolved for the LLM's depth). Launch with ``accelerate launch``
    (or torchrun / deepspeed) for several processes; each process calls this function.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(cfg.output_dir)
    world = _world_size()
    t = cfg.train
    per_step = t.per_device_batch_size * world
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of per_device_batch_size x processes "
            f"= {t.per_device_batch_size} x {world}; change train.per_device_batch_size or the number of processes."
        )
    grad_accum = t.global_batch_size // per_step
    checkpoint = resolve_resume(cfg, out)

    # the data first: cheap, and its errors should come before a 7B model is loaded
    records = read_records(cfg.data.json, cfg.data.max_samples)
    has_text_only = any(isinstance(r, dict) and not r.get("image") for r in records)
    args = training_arguments(cfg, grad_accum, find_unused=bool(cfg.pmod is not None or has_text_only))
    is_main = args.process_index == 0
    torch.manual_seed(t.seed)

    if model is None:
        pmod = cfg.resolved_pmod(num_llm_layers(cfg)) if cfg.pmod is not None else None
        model, processor = build_model(cfg, pmod)
    elif cfg.pmod is not None and getattr(model.config, "pmod", None) is None:
        raise ConfigError("the recipe sets pmod but the given model is a vanilla LLaVA; convert it with to_pmod first.")
    pmod_dict = getattr(model.config, "pmod", None)
    if cfg.stage == "pt" and pmod_dict is not None and "routers" not in cfg.trainable:
        log.warning("PT with p-MoD layers: routers stay frozen at their initial (zero) weights, so selection is by position; "
                    "the paper's PT trains the connector of the vanilla model (pmod=null).")
    groups = apply_trainable(model, cfg.trainable)

    dataset = LlavaConversationDataset(
        records, processor, image_folder=cfg.data.image_folder, template=cfg.data.template,
        max_length=cfg.data.max_length, image_aspect_ratio=cfg.data.image_aspect_ratio,
        on_bad_sample=cfg.data.on_bad_sample, max_consecutive_bad=cfg.data.max_consecutive_bad,
    )
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    resumed_state: dict = {}
    if checkpoint and (Path(checkpoint) / STATE_FILE).is_file():
        resumed_state = json.loads((Path(checkpoint) / STATE_FILE).read_text())
    run = RunState(cfg, out, world, args.process_index, is_main, resumed_state)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_run_json(out, cfg, command)
        resolved = cfg.to_dict()
        resolved["pmod"] = pmod_dict
        _atomic_json(out / "train_config.json", resolved)
        _truncate_log(out / "train_log.jsonl", _step_of(checkpoint) if checkpoint else 0)
        for p in out.glob("bad_samples*.jsonl"):
            if not checkpoint:
                p.unlink()
        if dataset.malformed:
            with open(out / "bad_samples.jsonl", "a", encoding="utf-8") as fh:
                fh.writelines(json.dumps(e) + "\n" for e in dataset.malformed)
            log.warning("%d malformed records dropped (listed in %s)", len(dataset.malformed), out / "bad_samples.jsonl")

    trainer = PMoDTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=DataCollator(pad_id), processing_class=processor,
        callbacks=[RunCallback(run, t.stop_at_step)], run=run,
        modality_lengths=dataset.modality_lengths if cfg.data.group_by_modality_length else None,
    )
    base = {
        "recipe": cfg.recipe or "python", "stage": cfg.stage, "output_dir": str(out), "label": cfg.label,
        "world_size": world, "global_batch_size": t.global_batch_size, "gradient_accumulation_steps": grad_accum,
        "pmod": pmod_dict, "trainable": cfg.trainable,
        "params": {g: v["params"] for g, v in groups.items()},
        "trainable_params": sum(v["params"] for v in groups.values() if v["trainable"]),
        "resumed_from": checkpoint,
    }
    status, error = "completed", None
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except PMoDOverflowError as exc:
        status, error = "overflow", f"step {trainer.state.global_step + 1}: {exc}"
        if is_main:
            _atomic_json(out / "train_summary.json", _summary(base, trainer, run, status, error, len(dataset.malformed)))
        raise PMoDOverflowError(error) from exc

    steps = trainer.state.global_step
    if t.stop_at_step is not None and steps >= t.stop_at_step and steps < trainer.state.max_steps:
        status = "stopped"
    bad_skips, bad_records = run.bad_local, set(run.bad_records)
    if world > 1:
        from accelerate.utils import gather_object

        bad_skips = int(trainer.accelerator.reduce(torch.tensor(bad_skips, device=args.device), reduction="sum"))
        bad_records = set(gather_object(sorted(bad_records)))
    if status == "completed":
        _finalize_model(model, cfg)
        trainer.save_model(str(out))
        if is_main and cfg.stage == "pt":
            _save_connector(out)
    summary = _summary(base, trainer, run, status, error, len(dataset.malformed), len(bad_records), bad_skips)
    if is_main:
        _atomic_json(out / "train_summary.json", summary)
        if summary["bad_samples"]:
            log.warning("%d bad records: %d malformed (dropped at load), %d unreadable (skipped %d times); see %s",
                        summary["bad_samples"], len(dataset.malformed), len(bad_records), bad_skips,
                        out / "bad_samples.jsonl")
    return summary


def _summary(base: dict, trainer: Trainer, run: RunState, status: str, error: str | None, malformed: int,
             bad_loaded: int | None = None, bad_skips: int | None = None) -> dict:
    wall = 0.0 if run.t_start is None else time.time() - run.t_start
    last = run.last_row or {}
    return {
        **base,
        "status": status,
        "error": error,
        "steps": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "final_loss": last.get("loss"),
        "gpu_hours": run.gpu_hours(),
        "tokens_per_s": run.session_tokens / wall if wall > 0 else None,
        "tokens": run.tokens_total,
        "samples": run.samples_total,
        "wall_s": wall,
        "bad_samples": malformed + (bad_loaded if bad_loaded is not None else len(run.bad_records)),
        "bad_sample_skips": bad_skips if bad_skips is not None else run.bad_local,
        "finished": _now(),
    }


def _truncate_log(path: Path, keep_upto: int) -> None:
    """Keep the log rows up to the resumed step (a fresh run starts an empty log)."""
    if not path.exists():
        return
    rows = []
    if keep_upto > 0:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                if row.get("step", 0) <= keep_upto:
                    rows.append(line)
    path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")


def _finalize_model(model, cfg: TrainConfig) -> None:
    """Config of the saved model: the p-MoD overflow guard back to the recipe's value, caching on for inference."""
    pm = getattr(model.config, "pmod", None)
    if pm is not None and cfg.pmod is not None:
        model.config.pmod = {**pm, "overflow_guard": bool(cfg.pmod.overflow_guard)}


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


__all__ = ["STATE_FILE", "PMoDTrainer", "RunCallback", "RunState", "resolve_resume", "train", "training_arguments"]
