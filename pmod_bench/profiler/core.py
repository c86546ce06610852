"""``profile()``: FLOPs, KV cache, latency, memory and training cost of every (arch, variant, scenario).

The result is a list of :class:`ProfileRow` (one per architecture x variant x scenario), the rows
of ``profile.json`` (docs/RUN_DIRS.md). Renderers (:mod:`.render`) turn rows into the table, JSON
and CSV; nothing here prints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

from .arch import Arch, check_image_size, check_images, load_arch, vision_layout, with_pixels
from .errors import ProfileError
from .flops import llm_decode_mean, llm_prefill_flops, paper_prefill_flops, train_flops, vision_flops
from .hardware import Hardware, detect_hardware, get_hardware
from .geometry import geometry_of
from .kvcache import dtype_bytes, kv_cache
from .paper import is_paper_scenario
from .scenario import PAPER_IMAGE_SIZE, PAPER_TEXT_TOKENS
from .training import TrainRecipe, TrainRun, default_recipe, get_recipe, measured_train_cost, read_train_run
from .variants import PMoD, Variant, default_variants, make_pmod_config, parse_variant
from .video import Video, synthetic_video_batch

#: LLMs above this many parameters are not timed on CPU unless asked (and then refused: too slow)
CPU_LATENCY_MAX_PARAMS = 1_000_000_000
#: ``--latency auto`` times on CPU only LLMs below this many parameters (the tiny archs, milliseconds a forward); a
#: 0.5B LLM over thousands of vision tokens takes minutes a forward there, so it is timed on CPU only when asked
CPU_AUTO_LATENCY_MAX_PARAMS = 100_000_000
#: relative tolerance of the FLOPs cross-check
FLOPS_CHECK_TOLERANCE = 0.01


@dataclass(frozen=True)
class Scenario:
    """What one sample looks like: an image (or ``images`` of one size), a prompt, a generated answer; a batch of
    identical samples."""

    image_size: tuple[int, int] = PAPER_IMAGE_SIZE
    """(width, height) in pixels. 672x672 fills LLaVA-NeXT's 2x2 grid: 2,928 vision tokens, the paper's setting."""
    text_tokens: int = PAPER_TEXT_TOKENS
    """prompt text tokens: the Vicuna-v1 system prompt + one short question; the count at which the
    paper's 39.46 (LLaVA-NeXT-7B) and 8.38 (LLaVA-1.5-7B) TFLOPs are reproduced."""
    gen_tokens: int = 16
    """generated tokens (the first comes out of the prefill, the rest from gen_tokens - 1 decode steps)"""
    batch_size: int = 1
    logits: str = "last"
    """positions whose logits the headline prefill computes: last (generation) or all (a plain forward)"""
    images: int = 1
    """images of ``image_size`` in the prompt: the LLM sees all their vision tokens (LLaVA-OneVision reads each of
    several images as one tile, as HF does)"""
    video: Optional[Video] = None
    """one video instead of images: ``image_size`` is its frame size (:mod:`.video`: frames, or a clip's duration)"""

    def __post_init__(self) -> None:
        size = tuple(self.image_size)
        if len(size) != 2:
            raise ProfileError(f"image_size must be (width, height), got {self.image_size!r}")
        object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))
        check_image_size(self.image_size)
        check_images(self.images)
        for name, low in (("text_tokens", 0), ("gen_tokens", 1), ("batch_size", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ProfileError(f"{name} must be an integer >= {low}, got {v!r}")
        if self.logits not in ("last", "all"):
            raise ProfileError(f"logits must be 'last' or 'all', got {self.logits!r}")
        if self.video is not None and not isinstance(self.video, Video):
            raise ProfileError(f"video must be a profiler.video.Video, got {self.video!r}")
        if self.video is not None and self.images != 1:
            raise ProfileError(f"a prompt holds one video here; drop --images {self.images}.")


@dataclass
class ProfileRow:
    """One row of profile.json. Units are in the names; TFLOPs and KV bytes are per sample."""

    arch: str
    variant: str
    method: str
    shift: Optional[float]
    schedule: Optional[str]
    ratios: list[float]
    image_size: list[int]
    batch_size: int
    vision_tokens: int
    """LLM positions holding image features, all images of the sample"""
    text_tokens: int
    gen_tokens: int
    # FLOPs (2 per multiply-add), per sample
    prefill_tflops: float
    """LLM prefill: decoder layers (full attention) + routers + lm_head on the scenario's logits positions"""
    prefill_tflops_causal: float
    decode_tflops_per_token: float
    """mean LLM FLOPs of one decode step over the gen_tokens - 1 steps"""
    vision_tflops: float
    """vision encoder (all tiles) + projector"""
    tflops_ratio: float
    kv_cache_bytes: int
    kv_cache_ratio: float
    kv_cache_ratio_all_tokens: float
    prefill_latency_ms: Optional[float]
    decode_latency_ms_per_token: Optional[float]
    latency_ratio: Optional[float]
    peak_memory_bytes: Optional[int]
    device: str
    train_tflops_per_sample: float
    train_gpu_hours: Optional[float]
    # ---- additional keys (docs/RUN_DIRS.md allows writers to add keys) ----
    prefill_tflops_paper: float = 0.0
    """the paper's convention: decoder weights + routers + lm_head on all N positions, no attention products"""
    tflops_ratio_paper: float = 0.0
    prefill_attention_tflops: float = 0.0
    """the full-attention part of prefill_tflops"""
    vision_encoder_tflops: float = 0.0
    projector_tflops: float = 0.0
    ttft_tflops: float = 0.0
    """vision_tflops + prefill_tflops: the work before the first token"""
    decode_tflops_total: float = 0.0
    mean_retention: float = 1.0
    kept_vision_tokens: list[int] = field(default_factory=list)
    kv_cache_bytes_per_layer: list[int] = field(default_factory=list)
    kv_cache_bytes_final: int = 0
    """after all gen_tokens were generated (gen_tokens - 1 of them fed back)"""
    kv_dtype: str = "bfloat16"
    lm_head_positions: str = "last"
    """positions whose logits prefill_tflops includes: last (generation) or all (a plain forward)"""
    tiles: int = 1
    tile_size: int = 0
    """side in pixels of the square the vision encoder sees (each tile; LLaVA-1.5 resizes every image to it; 0 for
    Qwen2.5-VL, whose tower sees the resized image whole)"""
    resized_image_size: Optional[list[int]] = None
    """Qwen2.5-VL: (width, height) the processor resizes the image to (``smart_resize``: multiples of 28 px)"""
    pixel_range: Optional[list[int]] = None
    """Qwen2.5-VL: the processor's [min_pixels, max_pixels] (``--min-pixels`` / ``--max-pixels``)"""
    images: int = 1
    """images of ``image_size`` in the prompt (``--images``); vision_tokens, tiles and vision FLOPs count them all"""
    downsampled_grid: Optional[list[int]] = None
    """LLaVA-OneVision: [rows, cols] of an image's tiled feature map after anyres_max_9's bilinear downsampling (absent
    when the map was small enough to keep)"""
    frames: Optional[int] = None
    """a video row: frames the model sees (``image_size`` is the frame size); null for image rows"""
    frames_read: Optional[int] = None
    """Qwen2.5-VL video: frames qwen-vl-utils read (they size each frame) before lmms-eval kept ``frames``"""
    video_duration_s: Optional[float] = None
    """``--duration``: the clip's length, whose frames lmms-eval's model class samples (null for ``--frames``)"""
    video_fps: Optional[float] = None
    """``--duration`` on Qwen2.5-VL: frames per second qwen-vl-utils read"""
    video_grid: Optional[list[int]] = None
    """a video's LLM tokens as [time, rows, cols]: Qwen2.5-VL [frame pairs, h/28, w/28]; LLaVA-OneVision [frames, 14, 14]
    at 7B (+ one newline token)"""
    paper_scenario: bool = False
    """the scenario of the paper's efficiency numbers (one 672x672 image, 58 text tokens): paper values compare"""
    llm_params: int = 0
    prefill_tflops_measured: Optional[float] = None
    """FlopCounterMode on the meta device, same convention as prefill_tflops"""
    vision_tflops_measured: Optional[float] = None
    flops_check_rel_err: Optional[float] = None
    flops_check_tool: Optional[str] = None
    prefill_latency_ms_p10: Optional[float] = None
    prefill_latency_ms_p90: Optional[float] = None
    decode_latency_ms_p10: Optional[float] = None
    decode_latency_ms_p90: Optional[float] = None
    prefill_latency_ms_min: Optional[float] = None
    prefill_latency_ms_max: Optional[float] = None
    decode_latency_ms_min: Optional[float] = None
    decode_latency_ms_max: Optional[float] = None
    latency_spread: Optional[float] = None
    """(max - min) / median of the prefill repeats; above 0.25 the latency is flagged unreliable"""
    latency_ratio_min: Optional[float] = None
    """latency_ratio's range over the repeats: this row's min / the baseline's max ..."""
    latency_ratio_max: Optional[float] = None
    """... to this row's max / the baseline's min"""
    latency_unreliable: Optional[bool] = None
    """True when this row's or the baseline's spread exceeds 0.25: the latency ratio is not a measurement to trust"""
    latency_repeats: Optional[int] = None
    latency_dtype: Optional[str] = None
    latency_note: Optional[str] = None
    peak_memory_prefill_bytes: Optional[int] = None
    achieved_tflops_per_s: Optional[float] = None
    mfu: Optional[float] = None
    hardware: Optional[str] = None
    prefill_floor_ms: Optional[float] = None
    """roofline lower bound of the time to first token (vision + LLM prefill) on ``hardware``"""
    vision_floor_ms: Optional[float] = None
    decode_floor_ms_per_token: Optional[float] = None
    prefill_bound: Optional[str] = None
    decode_bound: Optional[str] = None
    telemetry: dict = field(default_factory=dict)
    train_recipe: Optional[str] = None
    train_samples: Optional[int] = None
    train_tokens_per_sample: Optional[int] = None
    train_hardware: Optional[str] = None
    train_utilisation: Optional[float] = None
    """the recipe's effective utilisation of the peak (GPU hours = samples x (FLOPs / (peak x it) + overhead));
    not a measured MFU: see train_calibration"""
    train_overhead_s_per_sample: Optional[float] = None
    train_calibration: Optional[str] = None
    """where train_utilisation and train_overhead_s_per_sample come from (the shipped recipes: fitted to the
    paper's LLaVA-NeXT-7B SFT GPU hours)"""
    train_run: Optional[str] = None
    train_gpu_hours_run: Optional[float] = None
    """GPU hours the train run itself used (its train_summary.json)"""
    train_world_size: Optional[int] = None
    train_tokens_per_s_measured: Optional[float] = None
    train_gpu_hours_measured: Optional[float] = None
    """the recipe's data at the run's measured throughput"""
    train_tflops_per_s_per_gpu: Optional[float] = None
    train_mfu_measured: Optional[float] = None
    train_run_match: Optional[bool] = None
    """--train-run: the run trained this row's architecture and variant (else no measured numbers)"""
    train_run_note: Optional[str] = None
    pmod: Optional[dict] = None
    """the p-MoD model's config as data (``PMoDConfig.to_dict``); None for the baseline and comparison methods"""
    method_config: Optional[dict] = None
    """comparison methods: the method's config as a dict (``MethodConfig.to_dict``)"""
    method_extra_tflops: Optional[float] = None
    """the method's own matrix products (similarities, merges), included in vision_tflops"""
    method_match: Optional[dict] = None
    """what --match solved: target, achieved, relative error, solved hyperparameters"""
    method_note: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: the keys docs/RUN_DIRS.md requires, in its order
REQUIRED_KEYS = (
    "arch", "variant", "method", "shift", "schedule", "ratios", "image_size", "batch_size", "vision_tokens",
    "text_tokens", "gen_tokens", "prefill_tflops", "prefill_tflops_causal", "decode_tflops_per_token", "vision_tflops",
    "tflops_ratio", "kv_cache_bytes", "kv_cache_ratio", "kv_cache_ratio_all_tokens", "prefill_latency_ms",
    "decode_latency_ms_per_token", "latency_ratio", "peak_memory_bytes", "device", "train_tflops_per_sample",
    "train_gpu_hours",
)
ROW_KEYS = tuple(f.name for f in dataclasses.fields(ProfileRow))

CONVENTIONS = {
    "flops": "2 FLOPs per multiply-add; matrix products only (GEMMs, Q·K^T and P·V, patch conv); per sample",
    "prefill_tflops": "LLM prefill, attention counted full (every query x every key of its layer's processed set), "
    "lm_head on the logits positions of the scenario (last = generation); vision tower excluded (vision_tflops)",
    "prefill_tflops_causal": "same with causal attention (query i sees i+1 keys)",
    "prefill_tflops_paper": "the paper's convention (DeepSpeed profiler, flash-attention kernels invisible): decoder "
    "weights + routers + lm_head on all positions, no attention products, no vision tower",
    "kv_cache_ratio": "sum over layers of kept vision tokens / (layers x vision tokens), vs the baseline (paper convention)",
    "kv_cache_ratio_all_tokens": "all cached entries / the baseline's",
    "latency": "median (min/max alongside) of repeats interleaved across variants; prefill = time to first token "
    "(vision + LLM); decode per token; batch of batch_size; latency_unreliable when a spread (max - min) / median "
    "exceeds 0.25 (CPU timings depend on machine load)",
    "train": "forward + backward model FLOPs per sample (backward 2x for trained, 1x for pass-through frozen, 0 for the "
    "frozen vision encoder); GPU hours = samples x (FLOPs / (peak x utilisation) + overhead) / 3600 with the recipe's "
    "constants (train_utilisation, train_overhead_s_per_sample): an effective utilisation, not a measured MFU; the shipped "
    "recipes' are fitted to the paper's LLaVA-NeXT-7B SFT GPU hours (train_calibration)",
}


# -------------------------------------------------------------------------------------------- API
def resolve_variants(arch: Arch, variants: Optional[Sequence[Union[Variant, str]]], video: bool = False) -> list[Variant]:
    """Variant objects for ``arch`` (strings parsed; 'config' = the arch config's own p-MoD settings); ``video``: the
    prompts are videos (the methods count them through methods/video.py, whatever the family's image path lacks)."""
    if variants is None:
        return default_variants()
    out: list[Variant] = []
    for v in variants:
        if isinstance(v, Variant):
            out.append(v)
        elif str(v).strip().lower() == "config":
            if not arch.pmod:
                raise ProfileError(f"--variant config: {arch.name} is not a p-MoD config (no 'pmod' field); name the variant instead.")
            cfg = dict(arch.pmod)
            out.append(PMoD(make_pmod_config(**cfg), label=None))
        else:
            out.append(parse_variant(str(v)))
    for v in out:  # validate against this arch (explicit ratios must match the layer count)
        v.kept_vision_tokens(arch.text.layers, 1)
    methods = [v.name for v in out if v.is_method]
    host = geometry_of(arch.family)
    if host is not None and host.methods_pending and methods and not video:
        raise ProfileError(f"{', '.join(methods)}: comparison methods on {host.label} come with {host.methods_pending}; "
                           f"profile the baseline and p-MoD variants of {arch.name} for now.")
    names = [v.name for v in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ProfileError(f"variants {dup} are given twice; give each once.")
    return out


def _want_latency(latency: Union[str, bool], arch: Arch, device: str, variants: Sequence[Variant],
                  videos: bool = False) -> tuple[bool, Optional[str]]:
    """(time the rows?, why not); ``videos``: every scenario is a video prompt (timed where the host builds video
    batches, :attr:`.geometry.HostGeometry.videos_timed`)."""
    cuda = device.startswith("cuda")
    if latency in (False, "off", "no", "false"):
        return False, "not measured (--no-latency)"
    host = geometry_of(arch.family)
    pending = host is not None and host.pending and not (videos and host.videos_timed)
    if pending and latency in ("auto", True, "on", "yes", "true"):
        if latency != "auto":
            raise ProfileError(f"timing {arch.name} needs the p-MoD {host.label} model, which comes with {host.pending}; "
                               "use --no-latency (FLOPs, KV cache and --hardware roofline floors are counted).")
        return False, f"not measured: the p-MoD {host.label} model is not in pmod-bench yet (FLOPs, KV cache and roofline are)"
    small = arch.llm_params < CPU_LATENCY_MAX_PARAMS
    if latency in (True, "on", "yes", "true"):
        if not cuda and not small:
            raise ProfileError(
                f"timing {arch.name} ({arch.llm_params / 1e9:.1f}B LLM parameters) on CPU would take minutes per forward and "
                f"~{4 * arch.llm_params / 1e9:.0f} GB of RAM; time it on a GPU (--device cuda) or time a small arch (--arch tiny). "
                "Use --hardware A6000 for a roofline floor instead."
            )
        return True, None
    if latency != "auto":
        raise ProfileError(f"latency must be auto, on or off, got {latency!r}")
    if cuda or arch.llm_params < CPU_AUTO_LATENCY_MAX_PARAMS:
        return True, None
    if small:
        return False, f"not measured: {arch.name} is not timed on CPU unless asked (--latency; or --device cuda on a GPU)"
    return False, f"not measured: {arch.name} is not timed on CPU (use --device cuda on a GPU, or --arch tiny)"


def _default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        return "cpu"


def profile(
    arch: Union[str, Arch] = "llava-next-7b",
    variants: Optional[Sequence[Union[Variant, str]]] = None,
    scenarios: Optional[Sequence[Scenario]] = None,
    *,
    latency: Union[str, bool] = "auto",
    device: Optional[str] = None,
    dtype: str = "bfloat16",
    hardware: Optional[str] = None,
    recipe: Union[str, TrainRecipe, None] = "auto",
    train_run: Optional[str] = None,
    verify: bool = True,
    min_pixels: Optional[int] = None,
    max_pixels: Optional[int] = None,
    warmup: int = 2,
    repeats: int = 5,
    progress: Optional[Callable[[str, bool], None]] = None,
) -> list[ProfileRow]:
    """Profile ``arch`` under every variant and scenario; one :class:`ProfileRow` each.

    ``variants``: Variant objects or specs ('baseline', 'p-MoD-0.4', 'ratios:1*8,0.5*24',
    'fastv:k=2,keep=0.5', 'config'); default baseline + p-MoD-0.3/0.4/0.5 (Table 7).
    ``scenarios``: default ``[Scenario()]`` (672x672, 58 text tokens, 16 generated, batch 1).
    ``latency``: 'auto' (GPU, or small archs on CPU), True, False. ``hardware``: name for the
    roofline floor and MFU (auto-detected on a GPU). ``recipe``: training recipe name or object
    ('auto' = the paper's SFT recipe of the arch's family for LLMs of 1B+ parameters, None = skip). ``verify``: count the prefill with FlopCounterMode on the meta device and
    fail if it disagrees with the analytic count by more than 1%. ``min_pixels`` / ``max_pixels``: Qwen2.5-VL's
    resize range (default lmms-eval's, :mod:`.qwen`). ``progress(message, new_row)``:
    called before each row (new_row True) and before each timing (False).
    """
    a = with_pixels(arch if isinstance(arch, Arch) else load_arch(str(arch)), min_pixels, max_pixels)
    scenarios = list(scenarios) if scenarios else [Scenario()]
    vs = resolve_variants(a, variants, video=all(sc.video is not None for sc in scenarios))
    several = sorted({sc.images for sc in scenarios if sc.images > 1})
    methods = [v.name for v in vs if v.is_method]
    if several and methods:
        raise ProfileError(f"{', '.join(methods)}: comparison methods are profiled on one image per prompt; drop --images "
                           f"{several[0]} (or profile the baseline and p-MoD variants with it).")
    videos = [sc.video for sc in scenarios if sc.video is not None]
    dev = device or _default_device()
    timed, latency_note = _want_latency(latency, a, dev, vs, videos=len(videos) == len(scenarios))
    hw: Optional[Hardware] = get_hardware(hardware) if hardware else None
    if timed:
        from .latency import device_name

        dev_name = device_name(dev)
        hw = hw or detect_hardware(dev_name)
    else:
        dev_name = "cuda" if dev.startswith("cuda") else "cpu"
    s = _Setup(
        arch=a, device=dev, device_name=dev_name, dtype=str(dtype).replace("torch.", ""), element_bytes=dtype_bytes(dtype),
        hw=hw, recipe=_resolve_recipe(recipe, a), train_run=read_train_run(train_run) if train_run else None,
        timed=timed, latency_note=latency_note, verify=verify, warmup=warmup, repeats=repeats,
        note=progress or (lambda msg, new_row: None),
    )
    rows: list[ProfileRow] = []
    for sc in scenarios:
        rows.extend(_scenario_rows(s, sc, vs))
    return rows


@dataclass
class _Setup:
    """What :func:`profile` resolves once for all rows of one architecture (and the models it timed)."""

    arch: Arch
    device: str
    """torch device of the timings (cpu, cuda, cuda:1)"""
    device_name: str
    """the rows' ``device``: the GPU's name once timed there, else cpu / cuda"""
    dtype: str
    """KV-cache and weights dtype name (bfloat16, float32, ...)"""
    element_bytes: int
    hw: Optional[Hardware]
    recipe: Optional[TrainRecipe]
    train_run: Optional[TrainRun]
    timed: bool
    latency_note: Optional[str]
    verify: bool
    warmup: int
    repeats: int
    note: Callable[[str, bool], None]
    models: dict[str, Any] = field(default_factory=dict)
    """variant name -> the random-weight model timed for it (built once, reused by every scenario)"""
    base_model: Any = None


@dataclass(frozen=True)
class _ScenarioCounts:
    """One scenario's shapes and the counts every variant's row refers to."""

    layout: Any  # arch.VisionLayout
    logits_tokens: int
    base_prefill: float
    """the baseline's prefill FLOPs (full attention): tflops_ratio's denominator"""
    base_paper: float
    train_layout: Any = None
    """the recipe's training sample (its image, or the scenario's): vision layout and FLOPs"""
    train_vision: Any = None


def _resolve_recipe(recipe: Union[str, TrainRecipe, None], a: Arch) -> Optional[TrainRecipe]:
    if recipe == "auto":  # the paper's recipes are for 7B/13B-class models; small archs get none unless asked
        return default_recipe(a.family) if a.llm_params >= CPU_LATENCY_MAX_PARAMS else None
    if isinstance(recipe, str):
        return get_recipe(recipe)
    return recipe


def _scenario_rows(s: _Setup, sc: Scenario, vs: Sequence[Variant]) -> list[ProfileRow]:
    """Every variant's row of one scenario: counted, then timed (interleaved across the variants)."""
    a = s.arch
    layout = vision_layout(a, sc.image_size, sc.images, sc.video)
    V, T = layout.vision_tokens, sc.text_tokens
    logits_tokens = 1 if sc.logits == "last" else V + T
    base_kept = [V] * a.text.layers
    counts = _ScenarioCounts(
        layout=layout, logits_tokens=logits_tokens,
        base_prefill=llm_prefill_flops(a.text, T, V, base_kept, (), logits_tokens).total("full"),
        base_paper=paper_prefill_flops(a.text, T, V, base_kept),
    )
    if s.recipe is not None:
        t_layout = vision_layout(a, s.recipe.image_size) if s.recipe.image_size else layout
        counts = dataclasses.replace(counts, train_layout=t_layout, train_vision=vision_flops(a, t_layout))
    rows = []
    for v in vs:
        s.note(f"{a.name} · {v.name} · {_images(sc)} · batch {sc.batch_size}", True)
        rows.append(_variant_row(s, sc, counts, v))
    to_time = [(v, r) for v, r in zip(vs, rows) if s.timed and v.runnable_on(sc.video)]
    if to_time:
        _time_rows(s, sc, to_time)
    _latency_ratios(rows)
    return rows


def _variant_row(s: _Setup, sc: Scenario, counts: _ScenarioCounts, v: Variant) -> ProfileRow:
    """One variant's row: the analytic counts, their FlopCounterMode check, roofline floor and training cost."""
    a, layout = s.arch, counts.layout
    L, V, T = a.text.layers, layout.vision_tokens, sc.text_tokens
    v = v.bind(a, sc.image_size, T, counts.logits_tokens, sc.video)  # a method: solved / counted for this arch and input
    vis = v.vision_side(a, layout)
    kept = v.kept_vision_tokens(L, V)
    routers = v.router_layers(L)
    pf = llm_prefill_flops(a.text, T, V, kept, routers, counts.logits_tokens)
    paper = paper_prefill_flops(a.text, T, V, kept, routers)
    kv = kv_cache(a.text, v, V, T, s.dtype)
    dec = llm_decode_mean(a.text, kv.entries, max(sc.gen_tokens - 1, 1))
    row = _row(s, sc, counts, v, vis, kept, pf, paper, kv, dec)
    for key, value in v.row_extras().items():
        setattr(row, key, value)
    if s.verify:
        _check_flops(row, s, sc, counts, v, pf, vis)
    if s.hw is not None:
        _add_roofline(row, s, sc, vis, pf, kv, dec)
    if s.recipe is not None:
        _add_train_cost(row, s, counts, v, routers)
    # latency: measured by _time_rows, interleaved across the variants of this scenario
    if s.timed and not v.runnable_on(sc.video):
        row.latency_note = f"not measured: {v.method} has no model in pmod-bench (accounting only)"
    return row


def _row(s: _Setup, sc: Scenario, counts: _ScenarioCounts, v: Variant, vis, kept, pf, paper, kv, dec) -> ProfileRow:
    """The analytic row (FLOPs, KV cache, the scenario); latency, floor and training cost are filled in later."""
    a, layout, T = s.arch, counts.layout, sc.text_tokens
    ratios = v.layer_ratios(a.text.layers)
    fed = max(sc.gen_tokens - 1, 0)  # tokens fed back through decode steps
    return ProfileRow(
        arch=a.name, **v.describe(), ratios=list(ratios),  # variant, method, shift, schedule, pmod (data)
        image_size=list(sc.image_size), batch_size=sc.batch_size, vision_tokens=layout.vision_tokens, text_tokens=T,
        gen_tokens=sc.gen_tokens,
        prefill_tflops=pf.total("full") / 1e12, prefill_tflops_causal=pf.total("causal") / 1e12,
        decode_tflops_per_token=dec.total("full") / 1e12, vision_tflops=vis.total / 1e12,
        tflops_ratio=pf.total("full") / counts.base_prefill,
        kv_cache_bytes=kv.bytes, kv_cache_ratio=kv.vision_ratio, kv_cache_ratio_all_tokens=kv.all_tokens_ratio,
        prefill_latency_ms=None, decode_latency_ms_per_token=None, latency_ratio=None, peak_memory_bytes=None,
        device=s.device_name, train_tflops_per_sample=0.0, train_gpu_hours=None,
        prefill_tflops_paper=paper / 1e12, tflops_ratio_paper=paper / counts.base_paper,
        prefill_attention_tflops=pf.attention_full / 1e12, vision_encoder_tflops=vis.encoder / 1e12,
        projector_tflops=vis.projector / 1e12, ttft_tflops=(vis.total + pf.total("full")) / 1e12,
        decode_tflops_total=dec.total("full") * fed / 1e12,
        mean_retention=sum(ratios) / len(ratios), kept_vision_tokens=list(kept),
        kv_cache_bytes_per_layer=kv.bytes_per_layer, kv_cache_bytes_final=kv.after_decode(fed),
        kv_dtype=s.dtype, lm_head_positions=sc.logits, tiles=layout.tiles, tile_size=layout.tile_size,
        resized_image_size=list(layout.resized) if layout.resized else None,
        pixel_range=[a.vision.min_pixels, a.vision.max_pixels] if layout.resized else None, images=sc.images,
        downsampled_grid=list(layout.downsampled) if layout.downsampled else None,
        paper_scenario=is_paper_scenario(sc.image_size, T) and sc.images == 1 and sc.video is None, llm_params=a.llm_params,
        latency_note=s.latency_note, **_video_fields(sc, layout, a),
    )


def _video_fields(sc: Scenario, layout, a: Arch) -> dict[str, Any]:
    """The video keys of a row (none for an image row)."""
    if sc.video is None:
        return {}
    if layout.pooled:  # LLaVA-OneVision: every frame's pooled map, one newline after the video
        grid = [layout.frames, *layout.pooled]
    else:  # Qwen2.5-VL: frame pairs of (h/28) x (w/28) merged patches
        m = a.vision.merge_size
        grid = [layout.temporal, layout.patches[0] // m, layout.patches[1] // m]
    qwen = layout.pooled is None
    return dict(frames=layout.frames, frames_read=layout.frames_read if qwen else None, video_grid=grid,
                video_duration_s=sc.video.duration_s,
                video_fps=sc.video.fps if qwen and sc.video.duration_s is not None else None)


def _check_flops(row: ProfileRow, s: _Setup, sc: Scenario, counts: _ScenarioCounts, v: Variant, pf, vis) -> None:
    """FLOPs cross-check: FlopCounterMode on the meta device; raises when it disagrees by more than 1%.

    A comparison method's selections are data-dependent and cannot run on meta tensors: its LLM layers
    are counted at the method's kept lengths; its own products and vision side are checked exactly on
    the real tiny models (tests/test_methods_flops.py, tests/test_methods_llm.py, tests/test_methods_illava.py).
    """
    from .counters import count_flops_meta

    a = s.arch
    method = v.is_method
    m = count_flops_meta(a, v, sc.image_size, sc.text_tokens, batch_size=sc.batch_size,
                         logits_tokens=counts.logits_tokens, decode=False, images=sc.images, video=sc.video)
    row.prefill_tflops_measured = m.prefill_llm / 1e12
    err = abs(m.prefill_llm - pf.total("full")) / pf.total("full")
    if not method:
        row.vision_tflops_measured = m.vision / 1e12
        err = max(err, abs(m.vision - vis.total) / vis.total)
    row.flops_check_rel_err = err
    row.flops_check_tool = m.tool + (" (LLM at the method's kept lengths; the method's own products and "
                                     "vision side: FlopCounterMode on the real tiny models)" if method else "")
    if err > FLOPS_CHECK_TOLERANCE:
        raise RuntimeError(
            f"{a.name} {v.name}: analytic and FlopCounterMode FLOPs differ by {100 * err:.2f}% "
            f"(analytic {pf.total('full')}, measured {m.prefill_llm}); please report this."
        )


def _add_roofline(row: ProfileRow, s: _Setup, sc: Scenario, vis, pf, kv, dec) -> None:
    """Roofline floor on ``s.hw``: weights read once + KV written (prefill) / read (decode)."""
    a, hw, B, L = s.arch, s.hw, sc.batch_size, s.arch.text.layers
    steps = max(sc.gen_tokens - 1, 1)
    weight_bytes_llm = (a.llm_params - a.text.vocab * a.text.hidden) * s.element_bytes  # embeddings are looked up, not read
    weight_bytes_vision = (a.vision.params + a.projector_params) * s.element_bytes
    pre_flops = B * (vis.total + pf.total("causal"))
    pre_bytes = weight_bytes_vision + weight_bytes_llm + B * kv.bytes
    dec_flops = B * dec.total("full")
    dec_bytes = weight_bytes_llm + B * (kv.bytes + kv.bytes_per_entry * L * (steps - 1) / 2)
    row.hardware = hw.name
    row.prefill_floor_ms = hw.roofline_ms(pre_flops, pre_bytes)
    row.vision_floor_ms = hw.roofline_ms(B * vis.total, weight_bytes_vision)
    row.decode_floor_ms_per_token = hw.roofline_ms(dec_flops, dec_bytes)
    row.prefill_bound = hw.bound(pre_flops, pre_bytes)
    row.decode_bound = hw.bound(dec_flops, dec_bytes)


def _add_train_cost(row: ProfileRow, s: _Setup, counts: _ScenarioCounts, v: Variant, routers) -> None:
    """Training cost of the recipe's sample (+ the measured throughput of ``--train-run``)."""
    a, rec, L = s.arch, s.recipe, s.arch.text.layers
    tV, tT = counts.train_layout.vision_tokens, rec.text_tokens
    t_kept = v.kept_vision_tokens(L, tV)
    t_llm = llm_prefill_flops(a.text, tT, tV, t_kept, routers, logits_tokens=tT + tV)
    tf = train_flops(t_llm, counts.train_vision, train_llm=rec.train_llm, train_projector=rec.train_projector,
                     train_vision=rec.train_vision)
    row.train_tflops_per_sample = tf.total / 1e12
    row.train_gpu_hours = rec.gpu_hours(tf.total)
    row.train_recipe, row.train_samples = rec.name, rec.samples
    row.train_tokens_per_sample, row.train_hardware = tV + tT, rec.hardware
    row.train_utilisation, row.train_overhead_s_per_sample = rec.utilisation, rec.overhead_s_per_sample
    row.train_calibration = rec.calibration
    if s.train_run is not None:
        meas = measured_train_cost(s.train_run, rec, tV + tT, tf.total, rec.hw, arch=a, ratios=row.ratios)
        for key, value in meas.items():
            if not hasattr(row, key):
                raise AttributeError(f"ProfileRow has no field {key}")
            setattr(row, key, value)


def _time_rows(s: _Setup, sc: Scenario, to_time: Sequence[tuple[Variant, ProfileRow]]) -> None:
    """Time the runnable variants' random-weight models, repeats interleaved across them; fill their rows."""
    import torch

    from .latency import UNRELIABLE_SPREAD, time_interleaved
    from .models import Sample, synthetic_batch

    a, B = s.arch, sc.batch_size
    lat_dtype = s.dtype if s.device.startswith("cuda") else "float32"
    if sc.video is not None:  # one clip a row: the video placeholders and the host's video pixels (profiler/video.py)
        batch = synthetic_video_batch(a, vision_layout(a, sc.image_size, sc.images, sc.video), sc.text_tokens, B,
                                      device=s.device, dtype=getattr(torch, lat_dtype))
    else:
        batch = synthetic_batch(a, [Sample(sc.image_size, sc.text_tokens, sc.images)] * B, device=s.device,
                                dtype=getattr(torch, lat_dtype))
    for v, _ in to_time:
        if v.name not in s.models:
            s.note(f"{a.name} · {v.name}: building the model on {s.device_name}", False)
            s.models[v.name] = _timed_model(s, v, getattr(torch, lat_dtype))
    timings = time_interleaved(
        {v.name: s.models[v.name] for v, _ in to_time}, batch, sc.gen_tokens, warmup=s.warmup, repeats=s.repeats,
        device=s.device, progress=lambda msg: s.note(f"{a.name} · {_images(sc)} · {msg}", False),
    )
    for v, row in to_time:
        tm = timings[v.name]
        row.prefill_latency_ms = tm.prefill.median
        row.prefill_latency_ms_p10, row.prefill_latency_ms_p90 = tm.prefill.p10, tm.prefill.p90
        row.prefill_latency_ms_min, row.prefill_latency_ms_max = tm.prefill.min, tm.prefill.max
        row.latency_spread = tm.prefill.spread
        row.latency_repeats = tm.prefill.n
        if tm.decode is not None:
            row.decode_latency_ms_per_token = tm.decode.median
            row.decode_latency_ms_p10, row.decode_latency_ms_p90 = tm.decode.p10, tm.decode.p90
            row.decode_latency_ms_min, row.decode_latency_ms_max = tm.decode.min, tm.decode.max
        row.peak_memory_bytes, row.peak_memory_prefill_bytes = tm.peak_memory_bytes, tm.peak_memory_prefill_bytes
        row.telemetry = tm.telemetry
        row.device = tm.device
        row.latency_dtype = lat_dtype
        row.latency_note = None
        row.latency_unreliable = row.latency_spread > UNRELIABLE_SPREAD
        row.achieved_tflops_per_s = B * row.ttft_tflops / (tm.prefill.median / 1e3)
        if s.hw is not None and s.device.startswith("cuda"):
            row.mfu = row.achieved_tflops_per_s / s.hw.bf16_tflops


def _timed_model(s: _Setup, v: Variant, dtype) -> Any:
    """The random-weight model ``v`` is timed on, its weights the baseline's (``s.base_model``, built once): baseline and
    p-MoD from :func:`.models.random_model`; a comparison method applied to a vanilla model of its own
    (:meth:`.variants.Variant.applied_to`: the method changes that model's layers and forward, never the baseline's)."""
    from .models import random_model
    from .variants import Baseline

    if v.runnable:
        model, s.base_model = random_model(s.arch, v, device=s.device, dtype=dtype, base=s.base_model)
        return model
    if s.base_model is None:
        _, s.base_model = random_model(s.arch, Baseline(), device=s.device, dtype=dtype)
    return v.applied_to(_sharing_weights(s.base_model))


def _sharing_weights(model: Any) -> Any:
    """A copy of ``model``'s modules that holds the very same tensors (parameters, buffers, tensor attributes such as
    RoPE's ``inv_freq``): no memory for weights, and changes to the copy's layers or class leave ``model`` as it was."""
    import copy

    import torch

    memo = {}
    for module in model.modules():
        for t in [*module._parameters.values(), *module._buffers.values(), *vars(module).values()]:
            if isinstance(t, torch.Tensor):
                memo[id(t)] = t
    return copy.deepcopy(model, memo)


def _latency_ratios(rows: Sequence[ProfileRow]) -> None:
    """Latency ratios (and their range over the repeats) against the scenario's timed baseline, if any."""
    base_row = next((r for r in rows if r.method == "baseline" and r.prefill_latency_ms), None)
    if base_row is None:
        return
    for r in rows:
        if r.prefill_latency_ms:
            r.latency_ratio = r.prefill_latency_ms / base_row.prefill_latency_ms
            r.latency_ratio_min = r.prefill_latency_ms_min / base_row.prefill_latency_ms_max
            r.latency_ratio_max = r.prefill_latency_ms_max / base_row.prefill_latency_ms_min
            r.latency_unreliable = bool(r.latency_unreliable or base_row.latency_unreliable)


def _images(sc: Scenario) -> str:
    size = f"{sc.image_size[0]}x{sc.image_size[1]}"
    if sc.video is not None:
        return f"{sc.video.label} of {size}"
    return size if sc.images == 1 else f"{sc.images} x {size}"


def scenarios_from(image_sizes: Sequence[tuple[int, int]] = (PAPER_IMAGE_SIZE,), batch_sizes: Sequence[int] = (1,),
                   text_tokens: int = PAPER_TEXT_TOKENS, gen_tokens: int = 16, logits: str = "last", images: Sequence[int] = (1,),
                   videos: Sequence[Optional[Video]] = (None,)) -> list[Scenario]:
    """Every image (frame) size x image count (or video) x batch size."""
    return [Scenario(tuple(s), text_tokens, gen_tokens, b, logits, n, vid) for s in image_sizes for vid in videos
            for n in (images if vid is None else (1,)) for b in batch_sizes]


__all__ = ["Scenario", "ProfileRow", "profile", "resolve_variants", "scenarios_from", "REQUIRED_KEYS", "ROW_KEYS", "CONVENTIONS"]
