"""Typed, validated training configuration and the recipe loader (pure Python: no torch import).

A recipe is a YAML file whose first line is the command that uses it. It may ``include:`` other
recipe files (a base plus a few overrides); the merged mapping is turned into :class:`TrainConfig`,
whose sections are dataclasses with a docstring per field (``pmod-bench train --help-config``
prints them) and checks in ``__post_init__``. ``key=value`` overrides from the command line use the
same dotted keys (``train.lr=1e-3``, ``pmod.shift=0.3``, ``pmod=null``)::

    cfg = load_recipe("pmod-llava-next-7b-sft", ["data.json=/data/llava_next.json", "train.deepspeed=zero2"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pmod_bench.fielddocs import field_docs
from pmod_bench.model.config import PMoDConfig

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
STAGES = ("pt", "sft")
#: trainable module groups; see pmod_bench.train.build.module_groups
TRAINABLE_GROUPS = ("connector", "llm", "routers", "vision")
#: what each stage trains by default (paper Table 12; the vision encoder stays frozen)
STAGE_TRAINABLE = {"pt": ["connector"], "sft": ["connector", "llm", "routers"]}
TEMPLATES = ("vicuna_v1", "plain", "chat", "qwen_1_5")
ARCHS = ("llava", "llava_next")
PRECISIONS = ("bf16", "fp16", "fp32")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_min_lr")
#: shipped DeepSpeed configs by short name
DEEPSPEED_CONFIGS = {"zero2": "ds_zero2.json", "zero3": "ds_zero3.json"}


class ConfigError(ValueError):
    """A recipe or override that does not validate; the message names the key and the fix."""


def _did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def _choice(name: str, value: Any, allowed: typing.Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed.{_did_you_mean(value, allowed)} Allowed: {', '.join(allowed)}.")


def _positive(name: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}.")


def valid_per_device_batch(global_batch: int, processes: int, at_most: int) -> int | None:
    """The largest per-device batch <= ``at_most`` that splits ``global_batch`` over ``processes``, or None."""
    if global_batch % processes:
        return None
    per_process = global_batch // processes
    return max(b for b in range(1, min(at_most, per_process) + 1) if per_process % b == 0)


# ------------------------------------------------------------------------------------------ sections
@dataclass
class ModelConfig:
    """Which model to train: a ready LLaVA checkpoint, or a composition of LLM + vision tower + connector."""

    source: str | None = None
    """Start from this model: a tiny preset (tiny, tiny-llava, tiny-qwen2.5-vl, tiny-llava-onevision), a local HF LLaVA / LLaVA-NeXT / Qwen2.5-VL / LLaVA-OneVision / p-MoD checkpoint directory, or a hub id (Qwen/Qwen2.5-VL-7B-Instruct, llava-hf/llava-onevision-qwen2-7b-ov-hf). Leave empty to compose from llm + vision_tower."""
    llm: str | None = None
    """Compose: the language model, an HF causal-LM directory or hub id (the paper: lmsys/vicuna-7b-v1.5)."""
    vision_tower: str | None = None
    """Compose: the CLIP vision tower, directory or hub id (the paper: openai/clip-vit-large-patch14-336)."""
    arch: str = "llava_next"
    """Compose: llava (LLaVA-1.5, one square tile) or llava_next (anyres tiles + image_newline)."""
    projector: str | None = None
    """Pretrained connector to load: a PT output directory, its connector.safetensors, or LLaVA's mm_projector.bin (the reference starts SFT from LLaVA's official one)."""
    grid_pinpoints: list = field(default_factory=lambda: [[1, 2], [2, 1], [2, 2], [1, 3], [3, 1]])
    """Compose, llava_next: anyres grids in tiles (rows, cols) of the vision tower's image size; the paper's (2,2),(1,2),(2,1),(1,3),(3,1)."""
    vision_feature_layer: int = -2
    """Compose: the vision tower layer whose features feed the connector (LLaVA: -2, the penultimate)."""
    dtype: str = "auto"
    """Weights dtype at load: auto (bfloat16 under DeepSpeed bf16, else float32 with autocast), float32, bfloat16, float16."""
    attn_implementation: str = "sdpa"
    """Attention kernel: sdpa, eager, or flash_attention_2 (if installed)."""

    def __post_init__(self) -> None:
        _choice("model.arch", self.arch, ARCHS)
        _choice("model.dtype", self.dtype, DTYPES)
        if self.source is not None and (self.llm or self.vision_tower):
            raise ConfigError("model.source and model.llm/model.vision_tower are exclusive: start from a checkpoint "
                              "(model.source) or compose a new model (model.llm + model.vision_tower), not both.")
        if self.source is None and bool(self.llm) != bool(self.vision_tower):
            raise ConfigError("composing a model needs both model.llm and model.vision_tower (or set model.source).")
        grids = self.grid_pinpoints
        if not isinstance(grids, list) or not grids or not all(
            isinstance(g, (list, tuple)) and len(g) == 2 and all(isinstance(v, int) and v > 0 for v in g) for g in grids
        ):
            raise ConfigError(f"model.grid_pinpoints must be a list of [rows, cols] positive integers, got {grids!r}.")
        self.grid_pinpoints = [list(g) for g in grids]

    @property
    def composed(self) -> bool:
        return self.source is None


@dataclass
class DataConfig:
    """The LLaVA conversation data: JSON records + an image folder."""

    json: list = field(default_factory=list)
    """Conversation file(s), LLaVA format: [{"id", "image": "coco/train2017/x.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]}]; .json or .jsonl."""
    image_folder: str | None = None
    """Folder that the records' "image" paths are relative to; a path leading outside it (.., absolute, a symbolic link out) is a bad record, never opened."""
    template: str = "vicuna_v1"
    """Prompt format: vicuna_v1 (LLaVA-1.5/NeXT SFT, exact LLaVA string), plain (LLaVA PT: image + caption), chat (the tokenizer's chat template: Qwen2.5-VL), qwen_1_5 (LLaVA-OneVision: LLaVA-NeXT's training conversation, system turn included)."""
    max_length: int = 2048
    """Maximum tokens per sample after image-token expansion (the paper: 2048 LLaVA-1.5, 4096 LLaVA-NeXT); longer text is truncated, a sample whose image tokens do not fit is a bad sample."""
    image_aspect_ratio: str = "pad"
    """pad: LLaVA-1.5's expand-to-square with the mean colour before the processor; native: the processor alone (LLaVA-NeXT anyres)."""
    group_by_modality_length: bool = True
    """LLaVA's sampler: each global batch holds only image or only text-only samples of similar length."""
    on_bad_sample: str = "skip"
    """Missing/corrupt image or malformed record: skip (count it, log it to bad_samples.jsonl, train on the next sample) or fail (stop, naming the record's index, id and path)."""
    max_consecutive_bad: int = 32
    """Stop even under on_bad_sample=skip after this many bad samples in a row (a wrong image_folder)."""
    num_workers: int = 4
    """DataLoader worker processes (0 = load in the training process)."""
    max_samples: int | None = None
    """Use only the first N records (debugging)."""
    min_pixels: int | None = None
    """Qwen2.5-VL dynamic resolution: each image is resized (sides multiples of 28 px) to at least this many pixels; null = the processor's own setting. Refused for hosts without a pixel budget (LLaVA)."""
    max_pixels: int | None = None
    """Qwen2.5-VL dynamic resolution: the pixel cap per image (tokens ~ pixels / 28^2; lmms-eval's qwen2_5_vl evaluates at 1605632); null = the processor's own setting."""
    max_tiles: int | None = None
    """LLaVA-OneVision resolution cap: use only the anyres grids of at most this many tiles (rows x cols of 384 px tiles, the base image not counted), in the processor and the model config alike, saved with the run; null = the checkpoint's grids (up to 6x6; anyres_max_9 pools the features of more than 9 tiles). Refused for other hosts."""
    cache: bool = False
    """Build every sample once before training (tokens, label masks, pixel tensors) and keep them in memory and in $PMOD_BENCH_CACHE/train-samples, keyed on the data files' bytes, the images' sizes and times and the processor, so a changed dataset is never served stale (pmod_bench.train.cache): for small models, whose step costs about what the per-sample image and text work does. Same samples, same weights."""

    def __post_init__(self) -> None:
        if isinstance(self.json, (str, os.PathLike)):
            self.json = [str(self.json)]
        if not isinstance(self.json, list) or not all(isinstance(p, str) for p in self.json):
            raise ConfigError(f"data.json must be a path or a list of paths, got {self.json!r}.")
        _choice("data.template", self.template, TEMPLATES)
        _choice("data.image_aspect_ratio", self.image_aspect_ratio, ("pad", "native"))
        _choice("data.on_bad_sample", self.on_bad_sample, ("skip", "fail"))
        for name in ("max_length", "max_consecutive_bad"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be a positive integer, got {getattr(self, name)!r}.")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be an integer >= 0, got {self.num_workers!r}.")
        for name in ("max_samples", "min_pixels", "max_pixels", "max_tiles"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"data.{name} must be a positive integer or null, got {v!r}.")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ConfigError(f"data.min_pixels ({self.min_pixels}) must not exceed data.max_pixels ({self.max_pixels}).")
        if not isinstance(self.cache, bool):
            raise ConfigError(f"data.cache must be true or false, got {self.cache!r}.")

    def pixel_budget(self) -> dict | None:
        """The processor's ``size`` override for the pixel budget ({shortest_edge: min, longest_edge: max}), or None."""
        size = {k: v for k, v in (("shortest_edge", self.min_pixels), ("longest_edge", self.max_pixels)) if v is not None}
        return size or None


@dataclass
class OptimConfig:
    """The training loop (HF Trainer on accelerate; DeepSpeed through it)."""

    lr: float = 2e-5
    """Peak learning rate (paper Table 12: PT 1e-3, SFT 2e-5)."""
    global_batch_size: int = 128
    """Samples per optimizer step over all processes (paper: PT 256, SFT 128); gradient accumulation = global / (per_device x processes)."""
    per_device_batch_size: int = 16
    """Samples per process per forward pass."""
    epochs: float = 1.0
    """Passes over the data (the paper: 1)."""
    max_steps: int | None = None
    """Optimizer steps; overrides epochs when set."""
    warmup_ratio: float = 0.03
    """Fraction of the steps with linear warm-up."""
    lr_scheduler: str = "cosine"
    """Learning-rate schedule after warm-up (the paper: cosine)."""
    weight_decay: float = 0.0
    """AdamW weight decay (the paper: 0)."""
    router_lr_scale: float = 1.0
    """The p-MoD routers' learning rate as a multiple of lr (the paper: 1, one rate for all). Zero-initialised routers of a short fine-tune learn where to route faster at a higher rate."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 = off)."""
    precision: str = "bf16"
    """bf16 (the paper), fp16, or fp32 (CPU tests)."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass (non-reentrant)."""
    deepspeed: str | None = None
    """DeepSpeed config: zero2 or zero3 (shipped, see recipes/ds_zero*.json), a JSON path, or null for plain DDP."""
    trainable: list | None = None
    """Module groups to train, from connector, llm, routers, vision; null = the stage's default for the model's family (pt: connector; sft: connector, llm, routers; Qwen2.5-VL sft: llm, routers, the tower and its merger frozen)."""
    seed: int = 42
    """Seed for initialisation of new modules, data order and dropout."""
    logging_steps: int = 1
    """Log (and append to train_log.jsonl) every N optimizer steps."""
    save_steps: int = 1000
    """Write a resumable checkpoint (output_dir/checkpoint-N) every N optimizer steps."""
    save_total_limit: int | None = 1
    """Keep at most this many checkpoints (null = all)."""
    resume: str | None = "auto"
    """auto: continue from the newest checkpoint in output_dir if there is one; a checkpoint path; or null (start fresh; refuses an output_dir that holds checkpoints)."""
    stop_at_step: int | None = None
    """Checkpoint and stop after this optimizer step, with the schedule of the full run (for time-limited jobs; resume continues exactly)."""
    overflow_guard: bool = True
    """The one overflow-guard switch of a run (there is no pmod.overflow_guard key): on, a NaN/Inf in a p-MoD layer stops training with PMoDOverflowError naming the layer (the paper's OVERFLOW rows) and train_summary.json records it; the saved model has the guard off (inference)."""
    ddp_find_unused_parameters: bool | None = None
    """DDP's unused-parameter search; null = on for p-MoD models (a batch without images leaves the routers unused), off otherwise."""
    report_to: list = field(default_factory=list)
    """Extra loggers for HF Trainer (wandb, tensorboard); train_log.jsonl is always written."""
    device: str = "auto"
    """auto (CUDA if available, else CPU with the gloo backend), cuda, or cpu."""
    progress_bar: bool = True
    """Show HF Trainer's progress bar (the JSONL log is written either way)."""

    def __post_init__(self) -> None:
        for name in ("lr", "epochs", "router_lr_scale"):
            _positive(f"train.{name}", getattr(self, name))
        for name in ("warmup_ratio", "weight_decay", "max_grad_norm"):
            _positive(f"train.{name}", getattr(self, name), allow_zero=True)
        if self.warmup_ratio >= 1:
            raise ConfigError(f"train.warmup_ratio must be below 1, got {self.warmup_ratio}.")
        for name in ("global_batch_size", "per_device_batch_size", "logging_steps", "save_steps", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "seed" else 1):
                raise ConfigError(f"train.{name} must be a positive integer, got {v!r}.")
        if self.global_batch_size % self.per_device_batch_size:
            raise ConfigError(
                f"train.global_batch_size ({self.global_batch_size}) must be a multiple of train.per_device_batch_size "
                f"({self.per_device_batch_size})."
            )
        for name in ("max_steps", "stop_at_step", "save_total_limit"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"train.{name} must be a positive integer or null, got {v!r}.")
        _choice("train.lr_scheduler", self.lr_scheduler, SCHEDULERS)
        _choice("train.precision", self.precision, PRECISIONS)
        _choice("train.device", self.device, ("auto", "cuda", "cpu"))
        if self.trainable is not None:
            if isinstance(self.trainable, str):
                self.trainable = [s.strip() for s in self.trainable.split(",") if s.strip()]
            for g in self.trainable:
                _choice("train.trainable entry", g, TRAINABLE_GROUPS)
            if not self.trainable:
                raise ConfigError("train.trainable is empty: name at least one of " + ", ".join(TRAINABLE_GROUPS) + ".")
        if self.deepspeed is not None and self.deepspeed not in DEEPSPEED_CONFIGS and not str(self.deepspeed).endswith(".json"):
            raise ConfigError(
                f"train.deepspeed={self.deepspeed!r}: use zero2, zero3, a path to a DeepSpeed .json, or null."
                + _did_you_mean(self.deepspeed, DEEPSPEED_CONFIGS)
            )
        if isinstance(self.report_to, str):
            self.report_to = [] if self.report_to in ("none", "") else [self.report_to]

    def deepspeed_path(self) -> str | None:
        """The DeepSpeed JSON to use (shipped configs resolved), or None."""
        if self.deepspeed is None:
            return None
        if self.deepspeed in DEEPSPEED_CONFIGS:
            return str(RECIPE_DIR / DEEPSPEED_CONFIGS[self.deepspeed])
        return self.deepspeed


@dataclass
class TrainConfig:
    """One training run: a stage of the paper's two-stage recipe (PT or SFT)."""

    stage: str = "sft"
    """pt (pre-training: the connector learns on captions) or sft (instruction tuning: connector + LLM + p-MoD routers)."""
    output_dir: str = "runs/train"
    """Run directory: run.json, train_log.jsonl, train_summary.json, checkpoints, and the final model (save_pretrained + processor)."""
    label: str | None = None
    """run.json label; MODEL/VARIANT (llava-next-7b/p-MoD-0.5) names the paper model for `pmod-bench report` (the row follows train_summary.json's pmod data)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model (see model.*)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data (see data.*)."""
    train: OptimConfig = field(default_factory=OptimConfig)
    """The training loop (see train.*)."""
    pmod: PMoDConfig | None = None
    """p-MoD settings (PMoDConfig fields: schedule, shift, weight_norm, string, ...; the overflow guard is train.overflow_guard); null = the vanilla LLaVA baseline."""
    match_mean_retention: float | str | None = None
    """Replace pmod.shift by the shift at which pmod.schedule has this mean retention over the LLM's layers (schedules.match_shift); 'prd' = that of the default PRD (cosine, delta 0.5): the paper's Table 4 comparison at equal compute."""
    recipe: str | None = None
    """Recipe name or path (set by the loader)."""

    def __post_init__(self) -> None:
        _choice("stage", self.stage, STAGES)
        if isinstance(self.pmod, dict):
            self.pmod = _pmod_from_dict(self.pmod)
        m = self.match_mean_retention
        if m is not None:
            if self.pmod is None:
                raise ConfigError("match_mean_retention needs p-MoD settings (pmod: ...); the baseline has no schedule.")
            if isinstance(m, str) and m != "prd":
                raise ConfigError(f"match_mean_retention must be a number in (0, 1] or 'prd', got {m!r}.")
            if not isinstance(m, str) and not (isinstance(m, (int, float)) and 0 < m <= 1):
                raise ConfigError(f"match_mean_retention must be a number in (0, 1] or 'prd', got {m!r}.")
            if self.pmod.ratios is not None:
                raise ConfigError("match_mean_retention and explicit pmod.ratios exclude each other.")
        if not self.output_dir:
            raise ConfigError("output_dir must be set.")

    # ------------------------------------------------------------------------ derived
    @property
    def trainable(self) -> list:
        """The module groups this run trains."""
        return list(self.train.trainable) if self.train.trainable is not None else list(STAGE_TRAINABLE[self.stage])

    def resolved_pmod(self, num_layers: int) -> PMoDConfig | None:
        """The p-MoD config for an LLM of ``num_layers`` layers: matched shift and the overflow guard applied."""
        if self.pmod is None:
            return None
        pmod = self.pmod
        if self.match_mean_retention is not None:
            from pmod_bench.model.schedules import match_shift, mean_retention

            target = (
                mean_retention(PMoDConfig().layer_ratios(num_layers)) if self.match_mean_retention == "prd"
                else float(self.match_mean_retention)
            )
            try:
                shift = match_shift(pmod.schedule, num_layers, target, pmod.max_ratio, pmod.min_ratio, pmod.steps)
            except ValueError as exc:
                raise ConfigError(
                    f"match_mean_retention={self.match_mean_retention!r}: {exc} with {num_layers} layers and min_ratio "
                    f"{pmod.min_ratio}, max_ratio {pmod.max_ratio}; lower pmod.min_ratio (the interleaved schedule needs ~0.05)."
                ) from None
            pmod = pmod.replace(shift=shift)
        if pmod.overflow_guard != self.train.overflow_guard:
            pmod = pmod.replace(overflow_guard=self.train.overflow_guard)
        return pmod

    def to_dict(self) -> dict:
        """The configuration as recipe keys (``--print-config``; loads back with config_from_dict)."""
        d = dataclasses.asdict(self)
        if self.pmod is not None:  # the guard is train.overflow_guard: one key for one setting
            d["pmod"] = {k: v for k, v in self.pmod.to_dict().items() if k != "overflow_guard"}
        else:
            d["pmod"] = None
        return d


def variant_label(pmod: PMoDConfig | None) -> str:
    """The VARIANT of a ``MODEL/VARIANT`` run label for these settings: ``baseline``, else ``PMoDConfig.spec()``
    (``p-MoD-0.4``, ``p-MoD-linear-0.4``, ``pmod:string=false``), the one display name of a configuration.

    Display only: ``pmod-bench report`` matches a train run on ``train_summary.json``'s ``pmod`` (the label only
    for runs written before it), so a label that no longer fits the configuration misplaces nothing.
    """
    return "baseline" if pmod is None else pmod.spec()


def _pmod_from_dict(d: dict) -> PMoDConfig:
    try:
        return PMoDConfig.from_dict(d)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"pmod: {exc}") from None


# ---------------------------------------------------------------------------------- field docs
SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": OptimConfig, "pmod": PMoDConfig}


def describe_keys() -> str:
    """Every configuration key with its default and docstring (``pmod-bench train --help-config``)."""
    lines = []
    top = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name in SECTIONS or f.name == "recipe":
            continue
        lines.append(f"{f.name} = {getattr(top, f.name)!r}\n    {field_docs(TrainConfig).get(f.name, '')}")
    for section, cls in SECTIONS.items():
        lines.append(f"\n[{section}]  {field_docs(TrainConfig).get(section, '')}")
        inst = cls()
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            lines.append(f"{section}.{f.name} = {getattr(inst, f.name)!r}\n    {docs.get(f.name, '')}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------- dict -> config
def _build_section(cls: type, d: Any, where: str):
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a mapping of keys, got {d!r}.")
    names = {f.name for f in dataclasses.fields(cls)}
    for key in d:
        if key not in names:
            raise ConfigError(f"unknown key '{where}.{key}'.{_did_you_mean(key, names)} Known: {', '.join(sorted(names))}.")
    try:
        return cls(**d)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def config_from_dict(d: dict, recipe: str | None = None) -> TrainConfig:
    """Validate a merged recipe mapping into a :class:`TrainConfig`."""
    if not isinstance(d, dict):
        raise ConfigError(f"a recipe must be a mapping, got {type(d).__name__}.")
    d = dict(d)
    d.pop("include", None)
    top = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in d:
        if key not in top:
            raise ConfigError(f"unknown key '{key}'.{_did_you_mean(key, top)} Known: {', '.join(sorted(top))}.")
    kwargs = {k: v for k, v in d.items() if k not in ("model", "data", "train", "pmod")}
    kwargs["model"] = _build_section(ModelConfig, d.get("model"), "model")
    kwargs["data"] = _build_section(DataConfig, d.get("data"), "data")
    kwargs["train"] = _build_section(OptimConfig, d.get("train"), "train")
    pm = d.get("pmod")
    if isinstance(pm, dict) and "overflow_guard" in pm:
        raise ConfigError("pmod.overflow_guard is not a training key: the guard is train.overflow_guard (one switch; "
                          "on by default, off in the saved model). Use train.overflow_guard=true|false.")
    kwargs["pmod"] = None if pm is None else _build_section(PMoDConfig, pm, "pmod")
    if recipe is not None:
        kwargs["recipe"] = recipe
    return TrainConfig(**kwargs)


# ------------------------------------------------------------------------------------- YAML files
def list_recipes() -> dict:
    """{recipe name: path} of the shipped recipes (files under recipes/, any depth; names are file stems)."""
    out = {}
    for p in sorted(RECIPE_DIR.rglob("*.yaml")):
        out[p.stem] = p
    return out


def resolve_recipe(name_or_path: str | os.PathLike) -> Path:
    """A recipe path from a path or a shipped recipe name (with or without .yaml)."""
    p = Path(name_or_path)
    if p.is_file():
        return p.resolve()
    shipped = list_recipes()
    stem = p.name.removesuffix(".yaml")
    if stem in shipped and (len(p.parts) == 1 or not p.exists()):
        return shipped[stem]
    raise ConfigError(
        f"recipe '{name_or_path}' is neither a file nor a shipped recipe.{_did_you_mean(stem, shipped)} "
        "List them with `pmod-bench train --list-recipes`."
    )


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_recipe_dict(path: str | os.PathLike, _stack: tuple = ()) -> dict:
    """The merged mapping of a recipe file: its ``include:`` files first (relative to it), then its own keys."""
    import yaml

    path = Path(path).resolve()
    if path in _stack:
        chain = " -> ".join(p.name for p in (*_stack, path))
        raise ConfigError(f"recipe include cycle: {chain}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys.")
    inc = data.pop("include", None)
    merged: dict = {}
    for item in [inc] if isinstance(inc, str) else (inc or []):
        ip = Path(item)
        if not ip.is_absolute():
            ip = path.parent / ip
        if not ip.exists():
            ip = resolve_recipe(item)
        merged = _deep_merge(merged, read_recipe_dict(ip, (*_stack, path)))
    return _deep_merge(merged, data)


def parse_override(text: str) -> tuple:
    """``a.b=value`` -> (["a", "b"], value); the value is read as YAML (numbers, null, true, [lists])."""
    import yaml

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. train.lr=1e-3, pmod.shift=0.3, pmod=null).")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_float(value):  # YAML 1.1 reads 1e-3 as a string
        value = float(value)
    return key.split("."), value


def _looks_float(s: str) -> bool:
    """Exponent notation without a dot (1e-3), which YAML 1.1 reads as a string."""
    return re.fullmatch(r"\s*[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+\s*", s) is not None


def apply_overrides(d: dict, overrides: typing.Iterable[str]) -> dict:
    out = dict(d)
    for text in overrides or ():
        keys, value = parse_override(text)
        node = out
        for i, k in enumerate(keys[:-1]):
            nxt = node.get(k)
            if nxt is None:
                nxt = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"override '{text}': '{'.'.join(keys[: i + 1])}' is not a section.")
            node[k] = dict(nxt)
            node = node[k]
        node[keys[-1]] = value
    return out


def _fix_yaml_floats(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _fix_yaml_floats(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_fix_yaml_floats(v) for v in d]
    if isinstance(d, str) and _looks_float(d):
        return float(d)
    return d


def load_recipe(name_or_path: str | os.PathLike, overrides: typing.Iterable[str] = ()) -> TrainConfig:
    """Load a recipe (shipped name or path), apply ``key=value`` overrides, validate."""
    path = resolve_recipe(name_or_path)
    overrides = list(overrides or ())
    base = _fix_yaml_floats(read_recipe_dict(path))
    d = apply_overrides(base, overrides)
    name = path.stem if path.parent.resolve().is_relative_to(RECIPE_DIR) else str(path)
    cfg = config_from_dict(d, recipe=name)
    # a MODEL/VARIANT label follows p-MoD overrides (pmod.shift=0.4 on a p-MoD-0.5 recipe is p-MoD-0.4)
    top = {parse_override(o)[0][0] for o in overrides}
    if "label" not in top and top & {"pmod", "match_mean_retention"} and cfg.label and "/" in cfg.label:
        before = config_from_dict(base, recipe=name)
        if (before.pmod, before.match_mean_retention) != (cfg.pmod, cfg.match_mean_retention):
            label = f"{cfg.label.split('/', 1)[0]}/{variant_label(cfg.pmod)}"
            if label != cfg.label:
                import logging

                logging.getLogger(__name__).warning("label %r -> %r (p-MoD overrides; pass label=... to name the run)",
                                                    cfg.label, label)
                cfg.label = label
    return cfg


def recipe_command(path: str | os.PathLike) -> str | None:
    """The command on a recipe's first line (``# pmod-bench train --config ...``), or None."""
    with open(path, encoding="utf-8") as fh:
        first = fh.readline().strip()
    if first.startswith("#"):
        first = first.lstrip("#").strip()
        return first or None
    return None


__all__ = [
    "DEEPSPEED_CONFIGS",
    "RECIPE_DIR",
    "STAGES",
    "STAGE_TRAINABLE",
    "TRAINABLE_GROUPS",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "describe_keys",
    "field_docs",
    "list_recipes",
    "load_recipe",
    "read_recipe_dict",
    "recipe_command",
    "resolve_recipe",
    "valid_per_device_batch",
    "variant_label",
]
