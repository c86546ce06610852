"""Training cost: FLOPs per sample, a GPU-hours estimate for a recipe, measured throughput of a train run.

Estimate (per recipe, on the recipe's hardware)::

    GPU hours = samples x (train FLOPs per sample / (peak x utilisation) + overhead_s_per_sample) / 3600

Training FLOPs per sample follow :func:`.flops.train_flops` (forward + backward, no recomputation:
model FLOPs in the PaLM sense). ``utilisation`` is an *effective* utilisation, not a measured model
FLOPs utilisation (MFU): the fraction of the peak at which the FLOPs-proportional part of a step would
run, with everything else (gradient checkpointing's extra forward, data loading and anyres
preprocessing, ZeRO-3 parameter gathers, optimizer steps) left to it and to the overhead term. Without
the overhead term a FLOPs-proportional estimate would credit p-MoD with a 40% saving, where the paper
measured 22%.

The two constants of the shipped recipes are **fitted** to the paper's own numbers, not measured: they
are the values at which this model reproduces the LLaVA-NeXT-7B SFT GPU hours of Table 7
(``reports/paper_tables.json``) for the baseline and p-MoD-0.5, on 8 x RTX A6000 (peak ``P`` = 154.8
dense BF16 TFLOP/s) over the recipe's ``S`` = 779,000 samples, at its training sample (a 672 x 672
image: 2,928 vision tokens, and 400 text tokens, an assumed mean conversation length). With ``F`` the
train FLOPs per sample of a row and ``H`` its GPU hours, each of the two rows gives
``3600 H / S = F / (P u) + o``; subtracting one from the other::

    u = (F_base - F_pmod) x S / (P x 3600 x (H_base - H_pmod))   = 62.36e12 x 779,000 / (154.8e12 x 3600 x 125) = 0.6974
    o = 3600 x H_base / S - F_base / (P x u)                      = 2.5879 - 151.63e12 / (154.8e12 x 0.6974)   = 1.1834 s

(F_base = 151.63, F_pmod = 89.26 train TFLOPs per sample; H_base = 560, H_pmod = 435.) p-MoD-0.3 and
-0.4 are then predictions (within 2% of the paper's 403 and 415). The test
``tests/test_profiler.py::test_fitted_utilisation_recomputes_from_table_7`` recomputes the fit from the
paper's table and the FLOPs model, so the constants cannot drift from it silently.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from .errors import ProfileError
from .hardware import Hardware, get_hardware
from .paper import PAPER_EFFICIENCY
from .scenario import PAPER_IMAGE_SIZE


@dataclass(frozen=True)
class TrainRecipe:
    """One training stage, as far as its cost goes."""

    name: str
    stage: str  # "pt" | "sft"
    samples: int
    text_tokens: int
    """mean text tokens per training sample (assumption; the image gives the vision tokens)"""
    train_llm: bool
    train_projector: bool = True
    train_vision: bool = False
    hardware: str = "A6000"
    gpus: int = 8
    utilisation: float = 0.40
    """effective utilisation of the hardware's peak by the train FLOPs (see the module docstring): an
    assumption or a fit (``calibration``), not a measured MFU"""
    overhead_s_per_sample: float = 0.0
    """GPU-seconds per sample that do not scale with FLOPs"""
    calibration: str = "assumed"
    """where ``utilisation`` and ``overhead_s_per_sample`` come from"""
    image_size: Optional[tuple[int, int]] = None
    """image of the training sample; None = the profiled scenario's"""
    paper_gpu_hours: dict = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        if self.stage not in ("pt", "sft"):
            raise ProfileError(f"recipe {self.name}: stage must be 'pt' or 'sft', got {self.stage!r}")
        if not 0 < self.utilisation <= 1:
            raise ProfileError(f"recipe {self.name}: utilisation must be in (0, 1], got {self.utilisation}")
        if self.overhead_s_per_sample < 0 or self.samples < 1 or self.text_tokens < 0 or self.gpus < 1:
            raise ProfileError(f"recipe {self.name}: samples, gpus must be >= 1 and text_tokens, overhead >= 0")

    @property
    def hw(self) -> Hardware:
        return get_hardware(self.hardware)

    def gpu_hours(self, train_flops_per_sample: float) -> float:
        per_sample_s = train_flops_per_sample / (self.hw.bf16_tflops * 1e12 * self.utilisation) + self.overhead_s_per_sample
        return self.samples * per_sample_s / 3600.0


#: effective utilisation fitted to the paper's reported LLaVA-NeXT-7B SFT GPU hours (Table 7, baseline and
#: p-MoD-0.5); not a measured MFU. The fit: the module docstring; its test:
#: tests/test_profiler.py::test_fitted_utilisation_recomputes_from_table_7
_NEXT_SFT_FITTED_UTILISATION = 0.6974
#: GPU-seconds per sample that do not scale with FLOPs, of the same fit
_NEXT_SFT_FITTED_OVERHEAD_S = 1.1834
_NEXT_SFT_FIT = "fitted to the paper's LLaVA-NeXT-7B SFT GPU hours (Table 7, baseline and p-MoD-0.5)"
_FITTED = dict(utilisation=_NEXT_SFT_FITTED_UTILISATION, overhead_s_per_sample=_NEXT_SFT_FITTED_OVERHEAD_S)

RECIPES: dict[str, TrainRecipe] = {
    r.name: r
    for r in (
        TrainRecipe(
            "llava-next-sft", "sft", 779_000, 400, train_llm=True, **_FITTED, calibration=_NEXT_SFT_FIT,
            image_size=PAPER_IMAGE_SIZE,
            paper_gpu_hours={v: m["gpu_hours"] for v, m in PAPER_EFFICIENCY["llava-next-7b"].items()},
            source="paper Table 12 (779K SFT samples, connector + LLM + routers trained, vision encoder frozen) and Table 7 "
            "(8x RTX A6000)",
        ),
        TrainRecipe(
            "llava-1.5-sft", "sft", 665_000, 400, train_llm=True, **_FITTED,
            calibration=f"llava-next-sft's, {_NEXT_SFT_FIT}; not fitted for LLaVA-1.5",
            source="paper Table 12 (665K SFT samples)",
        ),
        TrainRecipe(
            "llava-next-pt", "pt", 558_000, 60, train_llm=False, **_FITTED, calibration=f"llava-next-sft's, {_NEXT_SFT_FIT}",
            source="paper Table 12 (558K captions, connector only)",
        ),
        TrainRecipe(
            "llava-1.5-pt", "pt", 558_000, 60, train_llm=False, **_FITTED, calibration=f"llava-next-sft's, {_NEXT_SFT_FIT}",
            source="paper Table 12 (558K captions, connector only)",
        ),
    )
}


def default_recipe(arch_family: str) -> TrainRecipe:
    """The paper's SFT recipe of the family; Qwen2.5-VL and LLaVA-OneVision (no paper recipe): LLaVA-NeXT's 779K-sample
    SFT, the data p-MoD was trained on (its 672x672 training image is 576 Qwen tokens, 3,699 OneVision-7B tokens)."""
    return RECIPES["llava-next-sft" if arch_family in ("llava_next", "qwen2_5_vl", "llava_onevision") else "llava-1.5-sft"]


def get_recipe(name: str, **overrides: Any) -> TrainRecipe:
    if name not in RECIPES:
        import difflib

        close = difflib.get_close_matches(name, list(RECIPES), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ProfileError(f"unknown recipe '{name}'.{hint} Known: {', '.join(RECIPES)}.")
    base = RECIPES[name]
    changes = {k: v for k, v in overrides.items() if v is not None}
    given = [k for k in ("utilisation", "overhead_s_per_sample") if k in changes]
    if given and "calibration" not in changes:  # what is left of the recipe's own constants keeps its provenance
        kept = [k for k in ("utilisation", "overhead_s_per_sample") if k not in given]
        changes["calibration"] = " and ".join(given) + " given" + (f"; {kept[0]} {base.calibration}" if kept else "")
    return replace(base, **changes) if changes else base


# --------------------------------------------------------------------------------- measured runs
@dataclass(frozen=True)
class TrainRun:
    """What a train run directory (docs/RUN_DIRS.md, kind "train") says about throughput."""

    path: str
    recipe: str
    stage: str
    tokens_per_s: Optional[float]
    gpu_hours: Optional[float]
    world_size: int
    steps: Optional[int]
    model_info: Optional[dict] = None
    """train_summary.json ``model_info``: family, text / vision dims, layer_ratios, device (None: an older run)"""


def read_train_run(run_dir: "str | Path") -> TrainRun:
    """Read run.json + train_summary.json (+ the last train_log.jsonl line for world_size)."""
    path = Path(run_dir)
    meta_path, summary_path = path / "run.json", path / "train_summary.json"
    for p in (meta_path, summary_path):
        if not p.is_file():
            raise ProfileError(f"{path}: no {p.name}; pass a run directory written by `pmod-bench train` (docs/RUN_DIRS.md).")
    try:
        meta = json.loads(meta_path.read_text())
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{path}: malformed JSON ({exc}); re-create the train run.") from None
    if meta.get("kind") != "train":
        raise ProfileError(f"{path}: run.json kind is {meta.get('kind')!r}, not 'train'; pass a train run directory.")
    from pmod_bench.reports.runs import last_train_log_record

    last = last_train_log_record(path) or {}
    try:
        world = int(last.get("world_size") or 1)
    except (TypeError, ValueError):
        world = 1

    def num(key: str) -> Optional[float]:
        v = summary.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None

    steps = summary.get("steps")
    info = summary.get("model_info") if isinstance(summary.get("model_info"), dict) else None
    return TrainRun(str(path), str(summary.get("recipe", "?")), str(summary.get("stage", "?")), num("tokens_per_s"),
                    num("gpu_hours"), world, int(steps) if isinstance(steps, int) else None, info)


#: TextDims / VisionDims fields a train run must share with the profiled architecture (vocab may differ:
#: LLaVA pads the embeddings to a multiple of 64 when it adds <image>)
_TEXT_KEYS = ("layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim")
_VISION_KEYS = ("layers", "hidden", "intermediate", "heads", "image_size", "patch_size")


def train_run_mismatch(run: TrainRun, arch: Any, ratios: Optional[list] = None) -> Optional[str]:
    """Why the run's measured throughput does not describe this profiled row, or None when it does.

    Same architecture = same family (llava / llava_next) and the same LLM and vision-tower shapes; same
    variant = the same per-layer retention (the baseline: all 1.0). A run without ``model_info`` (older
    runs) cannot be matched.
    """
    info = run.model_info
    if not info:
        return "the run's train_summary.json has no model_info (re-run it with this version) to match it to an architecture"
    diffs = []
    if info.get("family") != getattr(arch, "family", None):
        diffs.append(f"family {info.get('family')} vs {arch.family}")
    for part, keys, dims in (("text", _TEXT_KEYS, arch.text), ("vision", _VISION_KEYS, arch.vision)):
        got = info.get(part) or {}
        diffs += [f"{part}.{k} {got.get(k)} vs {getattr(dims, k, None)}" for k in keys if got.get(k) != getattr(dims, k, None)]
    if diffs:
        t = info.get("text") or {}
        return (f"the run trained another architecture ({t.get('layers')} layers, hidden {t.get('hidden')}; "
                f"{', '.join(diffs[:3])}) than {arch.name}")
    run_ratios = info.get("layer_ratios")
    if ratios is not None and run_ratios is not None and (
            len(run_ratios) != len(ratios) or any(abs(float(a) - float(b)) > 1e-6 for a, b in zip(run_ratios, ratios))):
        return "the run trained another variant (per-layer retention differs from this row's)"
    return None



def measured_train_cost(run: TrainRun, recipe: TrainRecipe, tokens_per_sample: int, train_flops_per_sample: float,
                        hardware: Optional[Hardware] = None, arch: Any = None,
                        ratios: Optional[list] = None) -> dict[str, Any]:
    """GPU hours the measured throughput implies for the recipe's data, and the achieved MFU.

    ``tokens_per_s`` of train_summary.json is read as the throughput of the whole run (all
    processes); GPU hours = recipe tokens / tokens_per_s x world_size / 3600. Only for a run of the
    profiled architecture and variant (``arch``, ``ratios``; :func:`train_run_mismatch`): otherwise the
    row says why (``train_run_match`` false, ``train_run_note``) and gets no measured numbers.
    """
    out: dict[str, Any] = {"train_run": run.path, "train_gpu_hours_run": run.gpu_hours, "train_world_size": run.world_size}
    if arch is not None:
        why = train_run_mismatch(run, arch, ratios)
        out["train_run_match"] = why is None
        device = (run.model_info or {}).get("device")
        out["train_run_note"] = (f"measured: {run.path} ({device or 'unknown device'} x {run.world_size})" if why is None
                                 else f"{run.path} not used: {why}")
        if why is not None:
            return out
    if not run.tokens_per_s:
        return out
    samples_per_s = run.tokens_per_s / tokens_per_sample
    out["train_tokens_per_s_measured"] = run.tokens_per_s
    out["train_gpu_hours_measured"] = recipe.samples / samples_per_s * run.world_size / 3600.0
    tflops_per_gpu = samples_per_s * train_flops_per_sample / run.world_size / 1e12
    out["train_tflops_per_s_per_gpu"] = tflops_per_gpu
    if hardware is not None:
        out["train_mfu_measured"] = tflops_per_gpu / hardware.bf16_tflops
    return out


__all__ = ["TrainRecipe", "RECIPES", "get_recipe", "default_recipe", "TrainRun", "read_train_run", "measured_train_cost",
           "train_run_mismatch"]
