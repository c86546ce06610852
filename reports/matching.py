"""Match runs to the paper's table rows.

Every paper row reports one configuration, keyed ``MODEL/VARIANT`` (``llava-next-7b/p-MoD-0.5``); the
same configuration appears in several tables (p-MoD-0.5 on LLaVA-NeXT-7B fills rows of Tables 1-7 and
10). A run (or, for a profile run, each of its rows) is matched to one key:

1. an explicit label, ``--label RUN_DIR=LABEL`` on the command line, else
2. the run's ``run.json`` ``label`` when it parses as a label (free text is ignored), else
3. automatically: the model from ``summary.json`` ``model`` / profile ``arch`` and the variant from
   the configuration as data: ``summary.json`` / the profile row's ``pmod`` (``PMoDConfig.to_dict()``,
   :func:`variant_from_pmod`) or a comparison method's config dict. Names are read only for profile rows
   without ``pmod`` (written before rows carried it), by the model library's one parser
   (:func:`pmod_bench.model.config.parse_pmod_spec`), and for labels (:func:`canonical_variant`). A train run's
   variant comes from ``train_summary.json``'s ``pmod``, its label only for runs without it (:meth:`_Matcher.train_run`).

A run is matched to a paper row only when its architecture is that row's: a recognised name
(``llava-hf/llava-v1.6-vicuna-7b-hf``), or an eval run's ``model_info`` (class + parameter count)
for a local checkpoint path. Anything else (the ``tiny`` test model, an eval of a random-weight
preset: ``model_info.random_weights``) keeps its own name and gets its own ``measured`` lines; ``--default-model`` matches such
runs as a paper model on request. Incomplete eval runs, failed train runs and labels naming no paper row are warned
about (:attr:`Reproduction.warnings`); an explicit ``--label`` naming no paper row is an error.

A LABEL is ``MODEL/VARIANT``, ``VARIANT``, ``MODEL`` or ``fig3:GROUP:RETENTION`` (an exploration run
of the paper's Fig. 3, GROUP one of shallow, middle, deep, base). See :func:`parse_label`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from pmod_bench.model.config import NORM_DEFAULTS, PMoDConfig, SpecError, parse_pmod_spec
from pmod_bench.model.schedules import canonical_schedule

from .paper import BENCHMARKS, PAPER_MODELS, paper_keys, paper_variants
from .runs import Run, pmod_config

#: no default: runs of other models are not matched to a paper model unless --default-model says so
DEFAULT_MODEL = None

EXPLORATION_GROUPS = ("shallow", "middle", "deep", "base")

_METHOD_ALIASES = {
    "gammamod": "gamma-MoD", "γmod": "gamma-MoD", "mod+tanhnorm": "MoD+TanhNorm",
    "mod+tanhnorm+string": "MoD+TanhNorm+STRing", "vanillamod": "vanilla-MoD", "mod": "vanilla-MoD",
    "prumerge": "LLaVA-PruMerge", "llavaprumerge": "LLaVA-PruMerge",
}
_NORM_VARIANTS = {
    "softmax": "p-MoD-softmax", "shiftedsoftmax": "p-MoD-shifted-softmax", "normnone": "p-MoD-norm-none",
    "nonorm": "p-MoD-norm-none", "none": "p-MoD-norm-none", "tanh1": "p-MoD-tanh-1", "tanhnorm1": "p-MoD-tanh-1",
}


#: registry method name (``pmod_bench.methods``; a run's ``method`` dict, key ``method``) -> the paper's row variant.
#: Methods not listed (downsample, random, random_llm, prumerge_plus) have no paper row: their runs get
#: ``measured`` lines in the comparison tables and curves in the methods trade-off figure.
PAPER_METHOD_VARIANTS = {
    "fastv": "FastV", "pyramiddrop": "PyramidDrop", "sparsevlm": "SparseVLM", "visionzip": "VisionZip",
    "fastervlm": "FasterVLM", "prumerge": "LLaVA-PruMerge", "illava": "iLLaVA",
}
#: paper rows that need their own training (not a training-free method of the registry): paper values only
TRAINED_ONLY_VARIANTS = ("MQT", "LLaVolta", "gamma-MoD")
#: the p-MoD variant the comparison tables compare at (equal compute, Table 5: ~22 TFLOPs)
EQUAL_COMPUTE_TARGET = "p-MoD-0.5"
#: paper rows that report the configuration of another row (Table 3's + STRing = Table 4's constant schedule):
#: data decides the second, a label may name the first for a run of that configuration
SAME_CONFIGURATION = {"MoD+TanhNorm+STRing": "p-MoD-constant"}


#: the video benchmarks of eval rows: no paper column, each host's video table (:mod:`.video`) shows them
VIDEO_BENCHMARK_KEYS = ("VideoMME", "MVBench", "EgoSchema")

#: the host families of the paper's models (``pmod_bench.model.hosts.family_of``): only their runs feed the paper's tables
PAPER_HOSTS = frozenset({"llava", "llava_next"})


class LabelError(ValueError):
    """An explicit label that does not parse; the message lists the accepted forms."""


def _squash(s: str) -> str:
    """Lower case without spaces, hyphens, underscores or dots: 'LLaVA-PruMerge' -> 'llavaprumerge'."""
    return re.sub(r"[\s\-_.]", "", s.lower())


def canonical_model(name: Optional[str]) -> Optional[str]:
    """The paper model a model name / HF id / preset refers to, or None.

    >>> canonical_model("llava-hf/llava-v1.6-vicuna-7b-hf"), canonical_model("MCG-NJU/p-MoD-LLaVA-v1.5-7B")
    ('llava-next-7b', 'llava-v1.5-7b')
    >>> canonical_model("tiny") is None
    True
    """
    if not name:
        return None
    s = name.strip().lower()
    if s in PAPER_MODELS:
        return s
    flat = re.sub(r"[^a-z0-9.]", "", s)
    if "next" in flat or "v1.6" in flat or "llava1.6" in flat:
        family = "llava-next"
    elif "v1.5" in flat or "llava1.5" in flat:
        family = "llava-v1.5"
    else:
        return None
    size = "13b" if "13b" in flat else "7b" if "7b" in flat else None
    model = f"{family}-{size}" if size else None
    return model if model in PAPER_MODELS else None


def _fmt_shift(x: float) -> str:
    return f"{float(x):g}"


def canonical_variant(name: Optional[str]) -> Optional[str]:
    """A label's variant in the paper's spelling (``p-MoD-0.5``, ``FastV``, ...), or None if it names none.

    The paper's row names and their spellings are read here; a p-MoD spec (``p-mod-cosine-0.40``) is read by
    the model library's parser and matched on its configuration, as a run's data would be.

    >>> [canonical_variant(v) for v in ("p-mod-cosine-0.40", "PRD", "fastv", "p-MoD-linear-0.57", "ratios:1,0.5")]
    ['p-MoD-0.4', 'p-MoD-0.5', 'FastV', 'p-MoD-linear', None]
    """
    if not name:
        return None
    raw = name.strip().lstrip("+").strip()
    s = raw.lower().replace("_", "-").replace(" ", "-")
    sq = _squash(raw)
    known = {_squash(v): v for v in paper_variants()}
    if sq in known:
        return known[sq]
    if sq in ("baseline", "base", "vanilla", "dense"):
        return "baseline"
    if sq in ("prd", "cosine", "pmodcosine", "pmodprd"):
        return "p-MoD-0.5"
    if sq in _METHOD_ALIASES:
        return _METHOD_ALIASES[sq]
    m = re.fullmatch(r"(?:p-?mod-)?([a-z]+)", s)  # Table 4's rows by schedule: p-MoD-linear, linear, interleave
    if m:
        try:
            schedule = canonical_schedule(m.group(1))
        except ValueError:
            schedule = None
        if schedule is not None:
            return "p-MoD-0.5" if schedule == "cosine" else f"p-MoD-{schedule}"
    m = re.fullmatch(r"p-?mod-(.+)", s)
    if m and _squash(m.group(1)) in _NORM_VARIANTS:
        return _NORM_VARIANTS[_squash(m.group(1))]
    if sq in ("shiftedsoftmax", "tanh1", "tanhnorm1", "normnone", "nonorm"):
        return _NORM_VARIANTS[sq]
    try:
        cfg = parse_pmod_spec(raw)
    except SpecError:
        return None
    got = _paper_variant(cfg) if cfg is not None else None
    return got[0] if got else None


@dataclass(frozen=True)
class Label:
    """A parsed label: which configuration a run reports, or which exploration point it is."""

    text: str
    model: Optional[str] = None
    variant: Optional[str] = None
    group: Optional[str] = None  # Fig. 3 exploration: shallow | middle | deep | base
    retention: Optional[float] = None


LABEL_FORMS = (
    "MODEL/VARIANT (llava-next-7b/p-MoD-0.4), VARIANT (p-MoD-0.5, baseline, FastV, p-MoD-linear, "
    "vanilla-MoD, MoD+TanhNorm, MoD+TanhNorm+STRing, p-MoD-softmax, ...), MODEL (llava-v1.5-7b), or "
    "fig3:GROUP:RETENTION (fig3:deep:0.4; GROUP shallow, middle, deep or base)"
)


def parse_label(text: str) -> Optional[Label]:
    """Parse a label; None when it is free text.

    >>> parse_label("llava-next-7b/p-MoD-0.4")
    Label(text='llava-next-7b/p-MoD-0.4', model='llava-next-7b', variant='p-MoD-0.4', group=None, retention=None)
    >>> parse_label("fig3:deep:40%").retention
    0.4
    >>> parse_label("second try on the new cluster") is None
    True
    """
    t = text.strip()
    m = re.fullmatch(r"fig3:([a-z]+):(\d+(?:\.\d+)?)(%?)", t, flags=re.I)
    if m:
        group = m.group(1).lower()
        group = "base" if group in ("all", "none", "start") else group
        if group not in EXPLORATION_GROUPS:
            return None
        r = float(m.group(2))
        r = r / 100.0 if (m.group(3) or r > 1.0) else r
        return Label(t, group=group, retention=r)
    if "/" in t:
        head, _, tail = t.rpartition("/")
        model, variant = canonical_model(head), canonical_variant(tail)
        if model and variant:
            return Label(t, model=model, variant=variant)
        return None
    if t.lower() in PAPER_MODELS:
        return Label(t, model=t.lower())
    variant = canonical_variant(t)
    if variant:
        return Label(t, variant=variant)
    return None


def parse_label_strict(text: str, where: str) -> Label:
    label = parse_label(text)
    if label is None:
        raise LabelError(f"{where}: cannot read label {text!r}. Accepted forms: {LABEL_FORMS}.")
    return label


#: the paper's p-MoD (cosine PRD in [0.15, 0.85], TanhNorm alpha 0.2, STRing): what each ablation row changes
PAPER_PMOD = PMoDConfig()


def _norm_is(cfg: PMoDConfig, weight_norm: str, scale: Optional[float] = None) -> bool:
    """``cfg`` normalises router weights with ``weight_norm`` at ``scale`` (default: its own) and its default bias."""
    d_scale, d_bias = NORM_DEFAULTS[weight_norm]
    return (cfg.weight_norm == weight_norm and math.isclose(cfg.norm_scale, d_scale if scale is None else scale)
            and math.isclose(cfg.norm_bias, d_bias))


def _paper_variant(cfg: PMoDConfig) -> Optional[tuple[str, str]]:
    """The paper row a p-MoD configuration reports (variant, why), or None; decided on its fields, never a name.

    Router initialisation and bias, and the overflow guard, do not decide a row (training details of the same
    model). Table 4's schedules (and Table 3's constant rows) are compared at PRD's mean retention, so their
    shift and clamps are free; PRD rows need the paper's clamps [0.15, 0.85].
    """
    if cfg.ratios is not None:
        return None
    tanh02 = _norm_is(cfg, "tanh", PAPER_PMOD.norm_scale)
    prd_clamps = math.isclose(cfg.max_ratio, PAPER_PMOD.max_ratio) and math.isclose(cfg.min_ratio, PAPER_PMOD.min_ratio)
    shift = _fmt_shift(cfg.shift)
    if not cfg.string:  # Table 3, rows 1-2: no STRing and no PRD, read as a constant ratio (the t3-* recipes)
        if cfg.schedule == "constant" and _norm_is(cfg, "none"):
            return "vanilla-MoD", "pmod: constant ratio, weight_norm none, STRing off (Table 3, vanilla MoD)"
        if cfg.schedule == "constant" and tanh02:
            return "MoD+TanhNorm", "pmod: constant ratio, TanhNorm 0.2, STRing off (Table 3, + TanhNorm)"
        return None
    if tanh02 and cfg.schedule == "cosine":
        return (f"p-MoD-{shift}", f"pmod: cosine schedule (PRD), shift {shift}, TanhNorm 0.2, STRing") if prd_clamps else None
    if tanh02 and (cfg.schedule != "stepped" or cfg.steps == PAPER_PMOD.steps):
        why = f"pmod: {cfg.schedule} schedule (Table 4), TanhNorm 0.2, STRing"
        if cfg.schedule == "constant":
            why += "; Table 3's MoD+TanhNorm+STRing is the same configuration: label the run to fill that row"
        return f"p-MoD-{cfg.schedule}", why
    if cfg.schedule == "cosine" and prd_clamps and math.isclose(cfg.shift, PAPER_PMOD.shift):  # Table 6
        table6 = {"p-MoD-tanh-1": ("tanh", 1.0), "p-MoD-softmax": ("softmax", None),
                  "p-MoD-shifted-softmax": ("shifted_softmax", None), "p-MoD-norm-none": ("none", None)}
        for variant, (norm, scale) in table6.items():
            if _norm_is(cfg, norm, scale):
                return variant, f"pmod: weight_norm {norm}, scale {cfg.norm_scale:g}, bias {cfg.norm_bias:g} (Table 6)"
    return None


def variant_from_pmod(pmod: "Mapping[str, Any] | PMoDConfig | None") -> tuple[str, str]:
    """The report key (VARIANT) of a run's ``pmod`` (``PMoDConfig.to_dict()``), and why: matched on the data.

    null -> ``baseline``; a configuration a paper row reports -> that row (:func:`_paper_variant`); any other
    -> its spec (``PMoDConfig.spec()``: ``ratios:1*8,0.5*24``, ``pmod:weight_norm=none,string=false``), one key
    per configuration, so different configurations never share a row.
    """
    if pmod is None:
        return "baseline", "pmod is null (baseline)"
    cfg = pmod_config(pmod)
    got = _paper_variant(cfg)
    if got:
        return got
    if cfg.ratios is not None:
        why = "explicit per-layer ratios"
    elif not cfg.string:
        why = "STRing off (Table 3's rows are constant-ratio)"
    else:
        why = "no paper row has this p-MoD configuration"
    return cfg.spec(), f"pmod: {why}; label the run to name a paper row"


def method_of(obj: Any) -> Optional[dict]:
    """A comparison method's config dict (``{"method": NAME, ...}``) or None: data, never a name to parse."""
    return dict(obj) if isinstance(obj, Mapping) and isinstance(obj.get("method"), str) else None


def run_method(run: Run) -> Optional[dict]:
    """The method config dict of an eval run: its rows' ``method``, else summary.json's, else model_info's."""
    for row in run.rows:
        m = method_of(row.get("method"))
        if m:
            return m
    info = run.data.get("model_info") or run.meta.get("model_info") or {}
    return method_of(run.data.get("method")) or (method_of(info.get("method")) if isinstance(info, Mapping) else None)


def run_method_match(run: Run) -> Optional[dict]:
    """What ``--match`` solved for an eval run (rows' ``method_match``, else summary.json / run.json), or None."""
    for row in run.rows:
        if isinstance(row.get("method_match"), Mapping):
            return dict(row["method_match"])
    got = run.data.get("method_match") or (run.meta.get("eval") or {}).get("method_match")
    return dict(got) if isinstance(got, Mapping) else None


def method_key(method: Mapping[str, Any]) -> str:
    """A canonical text of a method config dict, to compare configs (eval run vs profile row)."""
    import json

    return json.dumps(dict(method), sort_keys=True)


def budget_text(method: Mapping[str, Any]) -> str:
    """``keep=0.518`` / ``dominant=272,contextual=50``: the config's options (the name left out)."""
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in method.items()
                    if k != "method" and v is not None)


def variant_from_method(method: Mapping[str, Any], pmod: Optional[Mapping[str, Any]] = None) -> tuple[str, str]:
    """The variant a comparison method's config dict describes (``fastv`` -> ``FastV``), and why."""
    name = str(method["method"])
    if pmod is not None:
        base, _ = variant_from_pmod(pmod)
        return f"{base}+{name}", f"method {name} on a p-MoD model: no paper row"
    if name in PAPER_METHOD_VARIANTS:
        return PAPER_METHOD_VARIANTS[name], f"method {name} ({budget_text(method) or 'defaults'})"
    return name, f"method {name} ({budget_text(method) or 'defaults'}): no paper row"


def variant_from_profile_row(row: Mapping[str, Any]) -> tuple[str, str]:
    """The variant a profile row describes, and why: from its ``method_config`` or ``pmod`` (data)."""
    method = method_of(row.get("method_config"))
    if method:
        return variant_from_method(method)
    if "pmod" in row and (row["pmod"] is not None or row["method"] == "baseline"):
        variant, how = variant_from_pmod(row["pmod"])
        return variant, f"profile row {how}"
    return _variant_by_name(row)


def _variant_by_name(row: Mapping[str, Any]) -> tuple[str, str]:
    """A profile row without configuration data (written before rows carried ``pmod``; an accounting-only
    variant): the one place a row's name is read, by the model library's parser."""
    name, method = str(row["variant"]), str(row["method"])
    if method == "baseline":
        return "baseline", "profile method 'baseline'"
    if method == "pmod":
        try:
            cfg = parse_pmod_spec(name)
        except SpecError:
            cfg = None
        if cfg is not None:
            variant, how = variant_from_pmod(cfg)
            return variant, f"profile variant '{name}' (no pmod data: read by name) {how}"
        sched, shift = str(row.get("schedule") or "").lower(), row.get("shift")  # a labelled variant
        if sched == "cosine" and shift is not None:
            return f"p-MoD-{_fmt_shift(shift)}", f"profile schedule cosine, shift {_fmt_shift(shift)} (no pmod data)"
        if sched and sched not in ("cosine", "explicit"):
            return f"p-MoD-{canonical_schedule(sched)}", f"profile schedule {sched} (no pmod data)"
        return name, f"profile variant '{name}' is not a paper variant"
    return canonical_variant(name) or canonical_variant(method) or name, f"profile method '{method}'"


@dataclass(frozen=True)
class Entry:
    """Values that one run (or one profile row) contributes to one configuration key."""

    run: Run
    model: str
    variant: str
    values: Mapping[str, float]
    how: str
    source: str  # "runs/eval-a" or "runs/prof row 2"
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.model}/{self.variant}"


@dataclass(frozen=True)
class ExplorationPoint:
    """An eval run of the paper's Fig. 3: retention lowered to ``retention`` in layer ``group``."""

    run: Run
    group: str
    retention: float
    values: Mapping[str, float]


@dataclass(frozen=True)
class MethodPoint:
    """One eval run of a comparison method at one budget, with the profile row of the same config (if any)."""

    model: str
    variant: str
    method: Mapping[str, Any]
    values: Mapping[str, float]
    source: str
    match: Optional[Mapping[str, Any]] = None
    efficiency: Optional[Mapping[str, Any]] = None
    """the profile row's ``tflops_ratio``, ``kv_cache_ratio``, ``prefill_tflops`` (paper convention when given)"""
    profile_source: Optional[str] = None

    @property
    def name(self) -> str:
        return str(self.method["method"])


@dataclass
class Reproduction:
    """Everything the runs reproduce, keyed for the tables and figures."""

    entries: list[Entry] = field(default_factory=list)
    exploration: list[ExplorationPoint] = field(default_factory=list)
    introspections: list[Run] = field(default_factory=list)
    unmatched: list[tuple[Run, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    """what a reader must not miss: incomplete eval runs, failed train runs, labels naming no paper row (index.md, stderr)"""
    values: dict[str, dict[str, tuple[float, str]]] = field(default_factory=dict)
    efficiency: dict[str, dict[str, Optional[float]]] = field(default_factory=dict)
    method_points: list[MethodPoint] = field(default_factory=list)
    """every eval run of a comparison method (all budgets), for the methods trade-off figure"""
    method_variants: set[str] = field(default_factory=set)
    """variants that come from comparison-method runs (paper rows or not)"""

    def get(self, key: Optional[str], metric: Optional[str]) -> Optional[float]:
        if key is None or metric is None:
            return None
        got = self.values.get(key, {}).get(metric)
        return got[0] if got else None

    def source_of(self, key: Optional[str], metric: Optional[str]) -> Optional[str]:
        """The run (or profile row) a value came from."""
        got = self.values.get(key or "", {}).get(metric or "")
        return got[1] if got else None

    def sources(self, key: Optional[str]) -> list[str]:
        if key is None:
            return []
        return sorted({src for _, src in self.values.get(key, {}).values()})

    def has(self, key: Optional[str]) -> bool:
        return key is not None and bool(self.values.get(key))

    @property
    def keys(self) -> list[str]:
        return list(self.values)


#: efficiency metrics a profile row gives (table column metric -> value)
def _profile_values(row: Mapping[str, Any]) -> dict[str, float]:
    # the paper's TFLOPs column follows its own counting convention (docs/RUN_DIRS.md): compare like
    # for like when the profiler reports it, else fall back to the headline count
    tflops = row.get("prefill_tflops_paper")
    tflops = row["prefill_tflops"] if tflops is None else tflops
    vals = {"prefill_tflops": float(tflops), "kv_cache_pct": 100.0 * float(row["kv_cache_ratio"])}
    if row["prefill_latency_ms"] is not None:
        vals["prefill_latency_ms"] = float(row["prefill_latency_ms"])
    if row["train_gpu_hours"] is not None:
        vals["train_gpu_hours"] = float(row["train_gpu_hours"])
    return vals


def _own_model(name: Optional[str]) -> str:
    """The display name of a model that is not the paper's: the profiler preset of a hub id it knows
    (``Qwen/Qwen2.5-VL-7B-Instruct`` -> ``qwen2.5-vl-7b``, so eval runs join the profile rows of ``--arch
    qwen2.5-vl-7b``), else a path's or hub id's last part."""
    from pmod_bench.model.presets import ONEVISION_HUB, QWEN2_5_VL_HUB

    text = str(name or "unknown").rstrip("/").removesuffix(":vanilla")  # the preset suffix: the variant says it
    presets = {hub.lower(): preset for table in (QWEN2_5_VL_HUB, ONEVISION_HUB) for preset, (hub, _) in table.items()}
    return presets.get(text.lower()) or Path(text).name or text


def model_from_info(info: Any) -> tuple[Optional[str], str]:
    """The paper model an eval run's ``model_info`` (class, num_params) describes, or None."""
    if not isinstance(info, Mapping):
        return None, ""
    cls, n = str(info.get("class") or ""), info.get("num_params")
    if not cls or not isinstance(n, (int, float)):
        return None, ""
    family = "llava-next" if "Next" in cls else "llava-v1.5" if "Llava" in cls else None
    size = "7b" if 6.5e9 <= n <= 7.6e9 else "13b" if 12.5e9 <= n <= 13.8e9 else None
    model = f"{family}-{size}" if family and size else None
    return (model, f"model_info: {cls}, {n / 1e9:.2f}B parameters") if model in PAPER_MODELS else (None, "")


def _label_keys(run: Run, labels: Mapping[str, str]) -> list[str]:
    """The --label keys that name this run: its path (as given or resolved) or its base name."""
    here = run.path.resolve()
    return [k for k in labels if k == run.path.name or Path(k).resolve() == here]


def _label_for(run: Run, labels: Mapping[str, str]) -> tuple[Optional[Label], str]:
    for key in _label_keys(run, labels):
        return parse_label_strict(labels[key], f"--label {key}"), f"--label {labels[key]!r}"
    if run.label:
        lab = parse_label(run.label)
        if lab is not None:
            return lab, f"run.json label {run.label!r}"
    return None, ""


def _eval_health(run: Run) -> Optional[str]:
    """A warning for an eval run that did not finish its suite (or None)."""
    if run.data.get("complete") is not False and run.rows:
        return None
    failures = run.data.get("failures") or {}
    failed = "; ".join(f"{k}: {str(v)[:120]}" for k, v in failures.items()) if isinstance(failures, Mapping) else ""
    suite = run.data.get("suite")
    what = f"suite {suite!r} " if suite else ""
    return (f"{run.path}: incomplete eval run ({what}complete: false, {len(run.rows)} finished benchmark(s)"
            + (f"; failed: {failed}" if failed else "") + ")")


def _train_health(run: Run) -> Optional[str]:
    """A warning for a train run that ended in failure (``train_summary.json`` status failed / overflow), or None."""
    status = run.data.get("status")
    if status not in ("failed", "overflow"):
        return None
    steps, max_steps = run.data.get("steps"), run.data.get("max_steps")
    where = f" at step {steps}" + (f" of {max_steps}" if max_steps else "") if steps is not None else ""
    reason = " ".join(str(run.data.get("error") or "no reason recorded").split())[:200]
    return (f"{run.path}: {status} train run{where} ({reason}); its GPU hours cover only the steps it finished. "
            "Run its command again to resume it.")


def match_runs(
    runs: Iterable[Run],
    labels: Optional[Mapping[str, str]] = None,
    default_model: Optional[str] = DEFAULT_MODEL,
) -> Reproduction:
    """Match runs to paper configurations (see the module docstring for the rules).

    ``labels`` maps a run directory (as given, resolved, or its base name) to a label. Runs whose
    model is not a paper model (``tiny``, an eval of a random-weight preset, an unrecognised local
    checkpoint) keep their own model name, so they never fill a paper row, unless ``default_model``
    names the paper model to match them as. Where two runs give the same value, the later one wins
    (profile runs are applied first, then eval, then train, so a measured training run's GPU hours
    replace a profile estimate); every replacement is noted.
    """
    if default_model is not None and default_model not in PAPER_MODELS:
        raise LabelError(f"--default-model {default_model!r} is not a paper model; use one of {', '.join(PAPER_MODELS)}.")
    labels = dict(labels or {})
    runs = list(runs)
    matcher = _Matcher(Reproduction(), default_model, train_runs={r.path.resolve(): r for r in runs if r.kind == "train"})
    used_labels: set[str] = set()
    order = {"profile": 0, "eval": 1, "train": 2}
    for run in sorted(runs, key=lambda r: order[r.kind]):
        label, label_how = _label_for(run, labels)
        used_labels.update(_label_keys(run, labels))
        matcher.add(run, label, label_how)
    for k in labels:
        if k not in used_labels:
            raise LabelError(f"--label {k}={labels[k]}: {k!r} is not one of the run directories given.")
    _method_entries(matcher.rep, matcher.method_profiles)
    _fill_values(matcher.rep)
    return matcher.rep


def _profile_rank(row: Mapping[str, Any]) -> tuple[bool, bool, bool]:
    """Which of several profile rows of one configuration (scenarios) a table takes: the paper's scenario, image
    prompts (video rows, ``frames``, have a figure of their own), batch size 1 first."""
    return bool(row.get("paper_scenario")), not row.get("frames"), row["batch_size"] == 1


def _profile_extra(row: Mapping[str, Any]) -> dict[str, Any]:
    """The efficiency a profile row gives the trade-off figures (ratios to the baseline, per-layer retention)."""
    extra = {m: row.get(m) for m in ("tflops_ratio", "kv_cache_ratio", "latency_ratio", "latency_unreliable",
                                     "latency_ratio_min", "latency_ratio_max")}
    extra["ratios"] = list(row["ratios"])
    return extra


@dataclass
class _Matcher:
    """The entries of :func:`match_runs`, one run at a time (profile runs first, then eval, then train)."""

    rep: Reproduction
    default_model: Optional[str]
    method_profiles: dict[tuple[str, str], tuple[Mapping[str, Any], str]] = field(default_factory=dict)
    """(model, method config) -> the profile row of that config, for the comparison-method eval runs"""
    train_runs: dict[Path, Run] = field(default_factory=dict)
    """resolved directory -> the train runs of the report (an eval of one joins its rows, :meth:`trained_model`)"""

    def add(self, run: Run, label: Optional[Label], label_how: str) -> None:
        if run.introspection is not None:
            self.rep.introspections.append(run)
        if run.label and label is None:
            self.rep.notes.append(f"{run.path}: run.json label {run.label!r} is free text, not a label; matched automatically.")
        {"eval": self.eval_run, "profile": self.profile_run, "train": self.train_run}[run.kind](run, label, label_how)

    # ------------------------------------------------------------------------------ shared steps
    def model_of(self, label: Optional[Label], name: Optional[str], what: str, run: Run) -> tuple[str, str]:
        """The MODEL of a run (or profile row), and a note on how it was decided ("" when by name)."""
        if label and label.model:
            return label.model, ""
        info = (run.data.get("model_info") or run.meta.get("model_info")) if run.kind == "eval" else None
        if isinstance(info, Mapping) and info.get("random_weights"):  # pmod-bench eval --model <preset>
            own = _own_model(name)
            own = own if canonical_model(own) is None else f"{own} (random weights)"
            if self.default_model:
                return self.default_model, f"{what} {name!r} is a random-weight preset: matched as {self.default_model} (--default-model)"
            return own, f"{what} {name!r} is a random-weight preset, not the paper's model: own rows as {own!r}"
        m = canonical_model(name)
        if m:
            return m, ""
        if run.kind == "eval":
            m, why = model_from_info(info)
            if m:
                return m, f"{what} {name!r}: {why} -> {m}"
        if self.default_model:
            return self.default_model, f"{what} {name!r} is not a paper model: matched as {self.default_model} (--default-model)"
        trained = self.trained_model(name, what) if run.kind == "eval" else None
        if trained:
            return trained
        own = _own_model(name)
        return own, f"{what} {name!r} is not a paper model: own rows as {own!r}"

    def trained_model(self, name: Optional[str], what: str) -> Optional[tuple[str, str]]:
        """An eval of a train run directory given to the same report, of a host that is not the paper's (``eval
        --model runs/demo-ov``): the train run's own model name, as :meth:`train_model` names it, so the eval's scores
        join that run's training cost and the profile rows of its preset; None otherwise (the directory's name)."""
        train = self.train_runs.get(Path(str(name or "")).resolve()) if name else None
        host, source = (train.data.get("host"), train.data.get("model")) if train is not None else (None, None)
        if not (isinstance(host, str) and host not in PAPER_HOSTS and isinstance(source, str) and source):
            return None
        own = _own_model(source)
        return own, f"{what} {name!r} is the train run of {source!r} ({host}, not a paper host): own rows as {own!r}"

    def check_key(self, model: str, variant: str, label: Optional[Label], label_how: str, where: str) -> None:
        """A label that names a paper model + variant must name a row the paper has."""
        key = f"{model}/{variant}"
        if not label or model not in PAPER_MODELS or key in paper_keys():
            return
        near = sorted(k for k in paper_keys() if k.startswith(model + "/"))
        msg = (f"{where}: {label_how} names {key}, which no paper table reports. Rows of {model}: "
               f"{', '.join(k.partition('/')[2] for k in near)}.")
        if label_how.startswith("--label") and (label.variant or label.model):
            raise LabelError(msg + " Fix the label (or drop it to match the run automatically).")
        self.rep.warnings.append(msg)

    # ------------------------------------------------------------------------------------- eval
    def eval_run(self, run: Run, label: Optional[Label], label_how: str) -> None:
        health = _eval_health(run)
        if health:
            self.rep.warnings.append(health + ("; its missing benchmarks show as dashes." if run.rows else "."))
        if not run.rows:
            self.rep.unmatched.append((run, "no finished benchmark (see the warning)"))
            return
        values = self.eval_values(run)
        if label and label.group:
            self.rep.exploration.append(ExplorationPoint(run, label.group, float(label.retention), values))
            return
        model, note = self.model_of(label, run.data["model"], "model", run)
        method = run_method(run)
        if label and label.variant:
            variant, how = label.variant, label_how
        else:  # the configuration as data: a comparison method's config dict, else the model's pmod
            variant, how = variant_from_method(method, run.data["pmod"]) if method else variant_from_pmod(run.data["pmod"])
            if label_how:
                how = f"{label_how}; {how}"
        self.check_key(model, variant, label, label_how, str(run.path))
        if note:
            self.rep.notes.append(f"{run.path}: {note}.")
            how = f"{how}; {note}"
        extra = {"method": method, "method_match": run_method_match(run)} if method else {}
        self.rep.entries.append(Entry(run, model, variant, values, how, str(run.path), extra))

    def eval_values(self, run: Run) -> dict[str, float]:
        """The paper columns an eval run fills (benchmark -> value); other benchmarks and repeats are noted."""
        values: dict[str, float] = {}
        for row in run.rows:
            bench = row["benchmark"]
            if bench in VIDEO_BENCHMARK_KEYS:  # reports.video reads them (a host's video table)
                continue
            if bench not in BENCHMARKS:
                self.rep.notes.append(f"{run.path}: benchmark {bench!r} is not a paper column; shown in the inputs only.")
                continue
            if bench in values:
                self.rep.notes.append(f"{run.path}: benchmark {bench} appears twice; the later row ({row['task']}) is used.")
            values[bench] = float(row["value"])
        return values

    # ---------------------------------------------------------------------------------- profile
    def profile_run(self, run: Run, label: Optional[Label], label_how: str) -> None:
        if label and label.group:
            raise LabelError(f"{run.path}: a fig3 label applies to eval runs, not to a profile run.")
        rows = run.rows
        if label and label.variant and len(rows) != 1:
            if label_how.startswith("--label"):
                raise LabelError(
                    f"{run.path}: {label_how} names a variant, but this profile run holds {len(rows)} rows "
                    f"(one per variant); label a profile run with a MODEL only (e.g. llava-next-7b)."
                )
            label = Label(label.text, model=label.model)
        chosen = self.profile_configurations(run, rows, label, label_how)
        for key, (i, row, how) in chosen.items():
            model, _, variant = key.rpartition("/")
            if label and label.variant:
                self.check_key(model, variant, label, label_how, str(run.path))
            self.rep.entries.append(Entry(run, model, variant, _profile_values(row), how, f"{run.path} row {i}",
                                          _profile_extra(row)))
        skipped = len(rows) - len(chosen)
        if skipped:
            self.rep.notes.append(
                f"{run.path}: {skipped} profile row(s) repeat a configuration in another scenario; "
                f"the paper-scenario (672x672, 58 text tokens) batch-size-1 row of each is used, else the first."
            )

    def profile_configurations(self, run: Run, rows: list, label: Optional[Label],
                               label_how: str) -> dict[str, tuple[int, Mapping[str, Any], str]]:
        """One row per configuration key (``MODEL/VARIANT`` -> (index, row, how)): the best-ranked scenario.
        Every comparison-method row is also kept by its config, for the eval runs of that config."""
        chosen: dict[str, tuple[int, Mapping[str, Any], str]] = {}
        for i, row in enumerate(rows):
            model, note = self.model_of(label, row["arch"], "arch", run)
            if label and label.variant:
                variant, how = label.variant, label_how
            else:
                variant, how = variant_from_profile_row(row)
            cfg = method_of(row.get("method_config"))
            if cfg and row.get("frames"):  # a method's counts on a clip: the host's video table and figure (reports.video)
                continue
            if cfg:  # every budget of a method
                slot = (model, method_key(cfg))
                prev_m = self.method_profiles.get(slot)
                if prev_m is None or _profile_rank(row) > _profile_rank(prev_m[0]):
                    self.method_profiles[slot] = (row, f"{run.path} row {i}")
            if note:
                how = f"{how}; {note}"
            key = f"{model}/{variant}"
            prev = chosen.get(key)
            if prev is None or _profile_rank(row) > _profile_rank(prev[1]):
                chosen[key] = (i, row, how)
        return chosen

    # ------------------------------------------------------------------------------------ train
    def train_run(self, run: Run, label: Optional[Label], label_how: str) -> None:
        """A train run gives measured ``train_gpu_hours`` to the row of its configuration: VARIANT from
        ``train_summary.json``'s ``pmod`` (:func:`train_pmod`), MODEL from the label, else ``model_info`` (class +
        parameter count), else ``--default-model``. The label decides the VARIANT only for runs without ``pmod``
        data (older runs), or where it names another paper row of the same configuration
        (:data:`SAME_CONFIGURATION`); a run.json label naming another configuration (a recipe's label kept through
        ``include:``) is a warning, a ``--label`` an error. A failed run is matched and warned about."""
        health = _train_health(run)
        if health:
            self.rep.warnings.append(health)
        has_data, pmod = train_pmod(run)
        if has_data:
            variant, how = variant_from_pmod(pmod)
            how = f"train_summary.json {how}"
            if label and label.variant and label.variant != variant:
                if SAME_CONFIGURATION.get(label.variant) == variant:
                    variant, how = label.variant, f"{label_how} ({how}: {variant} is {label.variant}'s configuration)"
                else:
                    spec = "null" if pmod is None else pmod_config(pmod).spec()
                    msg = (f"{run.path}: {label_how} names {label.variant}, but train_summary.json's pmod is {spec}"
                           + (f" ({variant})" if variant != spec else ""))
                    if label_how.startswith("--label"):
                        raise LabelError(msg + ". Fix the label's variant (or give MODEL only) to match the run on its data.")
                    self.rep.warnings.append(msg + f": matched on the data, as {variant}.")
            elif label and label.variant:
                how = f"{label_how}; {how}"
        elif label and label.variant:  # written before train_summary.json carried pmod: the label is all there is
            variant, how = label.variant, f"{label_how} (train_summary.json has no pmod data)"
        else:
            self.rep.unmatched.append((run, "train runs without pmod data in train_summary.json (older runs) are "
                                            "matched only by a label MODEL/VARIANT"))
            return
        model, model_how = self.train_model(run, label)
        if model is None:
            self.rep.unmatched.append((run, "train runs need a label MODEL (or MODEL/VARIANT), a paper model's "
                                            "model_info, or --default-model to name the model"))
            return
        if label and label.variant == variant:
            self.check_key(model, variant, label, label_how, str(run.path))
        if model_how:
            how = f"{how}; {model_how}"
        self.rep.entries.append(Entry(run, model, variant, {"train_gpu_hours": float(run.data["gpu_hours"])},
                                      how, str(run.path)))

    def train_model(self, run: Run, label: Optional[Label]) -> tuple[Optional[str], str]:
        """The MODEL of a train run (and how, "" by label): the label's, else its ``model_info``'s (a paper model's
        class and parameter count), else ``--default-model``; None when none says."""
        if label and label.model:
            return label.model, ""
        model, why = model_from_info(run.data.get("model_info"))
        if model:
            return model, f"model_info: {why} -> {model}"
        if self.default_model:
            return self.default_model, f"matched as {self.default_model} (--default-model)"
        host, source = run.data.get("host"), run.data.get("model")
        if isinstance(host, str) and host not in PAPER_HOSTS and isinstance(source, str) and source:
            # a host that is not the paper's (reports.hosts): its own model name, as its eval and profile runs get
            return _own_model(source), f"train_summary.json model {source!r} ({host}, not a paper host)"
        return None, ""


def train_pmod(run: Run) -> tuple[bool, Optional[Mapping[str, Any]]]:
    """(whether ``train_summary.json`` holds the trained model's configuration, that ``pmod``).

    ``pmod`` is recorded once the model is built (with ``model_info``): a summary without the key (older runs), or
    with ``pmod`` null and no ``model_info`` (a run that failed before building its model), has no data."""
    data = run.data
    if "pmod" not in data or (data["pmod"] is None and "model_info" not in data):
        return False, None
    return True, data["pmod"]


def _fill_values(rep: Reproduction) -> None:
    """The table values of every configuration key from its entries, later entries replacing earlier ones (noted)."""
    for e in rep.entries:
        if e.extra.get("off_budget"):
            continue
        slot = rep.values.setdefault(e.key, {})
        for metric, v in e.values.items():
            if metric in slot and slot[metric][1] != e.source:
                rep.notes.append(f"{e.key} {metric}: {e.source} replaces {slot[metric][1]}.")
            slot[metric] = (v, e.source)
        if "tflops_ratio" in e.extra:  # a profile row (eval entries carry their method, not efficiency)
            rep.efficiency[e.key] = dict(e.extra)


def _solved_to(method_match: Optional[Mapping[str, Any]]) -> Optional[str]:
    """The p-MoD variant a ``--match`` target is, from its configuration as data (``target_pmod``,
    ``PMoDConfig.to_dict()``); None for a target without one (the baseline, a method, ``--match-tflops`` /
    ``--match-kv``: ``target_pmod`` null). Rows written before ``target_pmod`` existed: ``target_label`` (the
    variant spec as typed, ``p-MoD-0.5``, ``pmod:shift=0.5``) read by the model's parser."""
    mm = method_match or {}
    if "target_pmod" in mm:
        return variant_from_pmod(mm["target_pmod"])[0] if mm["target_pmod"] is not None else None
    label = mm.get("target_label")  # legacy rows
    try:
        cfg = parse_pmod_spec(str(label)) if label else None
    except SpecError:
        return None
    return variant_from_pmod(cfg)[0] if cfg is not None else None


def _method_entries(rep: Reproduction, profiles: Mapping[tuple[str, str], tuple[Mapping[str, Any], str]]) -> None:
    """Comparison-method eval runs: one per table row, every one a point of the methods trade-off figure.

    Several eval runs of one method on one model (budgets): the table row takes the one solved to
    :data:`EQUAL_COMPUTE_TARGET` (``--match p-MoD-0.5``), else the last given; the others are flagged
    ``off_budget`` (figure only). A profile row with the same config dict gives the row's efficiency columns.
    """
    by_key: dict[str, list[int]] = {}
    for i, e in enumerate(rep.entries):
        if e.run.kind == "eval" and e.extra.get("method"):
            by_key.setdefault(e.key, []).append(i)
            rep.method_variants.add(e.variant)
    for key, idx in by_key.items():
        at_target = [i for i in idx if _solved_to(rep.entries[i].extra.get("method_match")) == EQUAL_COMPUTE_TARGET]
        chosen = (at_target or idx)[-1]
        for i in idx:
            e = rep.entries[i]
            prof = profiles.get((e.model, method_key(e.extra["method"])))
            eff = None
            if prof is not None:
                row = prof[0]
                eff = {"tflops_ratio": row["tflops_ratio"], "kv_cache_ratio": row["kv_cache_ratio"],
                       "prefill_tflops": _profile_values(row)["prefill_tflops"], "latency_ratio": row.get("latency_ratio"),
                       "latency_unreliable": row.get("latency_unreliable")}
            rep.method_points.append(MethodPoint(e.model, e.variant, dict(e.extra["method"]), dict(e.values), e.source,
                                                 e.extra.get("method_match"), eff, prof[1] if prof else None))
            if i != chosen:
                rep.entries[i] = Entry(e.run, e.model, e.variant, e.values, e.how, e.source, {**e.extra, "off_budget": True})
                continue
            if prof is not None:  # the efficiency of exactly this config (not another budget's profile row)
                row, src = prof
                rep.entries.append(Entry(e.run, e.model, e.variant, _profile_values(row),
                                         f"profile row of {budget_text(e.extra['method'])}", src, _profile_extra(row)))
        if len(idx) > 1:
            e = rep.entries[chosen]
            rep.notes.append(f"{key}: {len(idx)} eval runs of {e.extra['method']['method']} at different budgets; the table "
                             f"shows {e.source} ({budget_text(e.extra['method'])}"
                             + (f", solved to {EQUAL_COMPUTE_TARGET}" if chosen in at_target else "")
                             + "), the methods trade-off figure all of them.")


__all__ = [
    "DEFAULT_MODEL", "Label", "LabelError", "LABEL_FORMS", "Entry", "ExplorationPoint", "Reproduction",
    "canonical_model", "canonical_variant", "parse_label", "variant_from_pmod", "variant_from_profile_row", "match_runs",
    "pmod_config", "PAPER_PMOD",
    "model_from_info", "MethodPoint", "PAPER_METHOD_VARIANTS", "TRAINED_ONLY_VARIANTS", "EQUAL_COMPUTE_TARGET", "method_of",
    "run_method", "run_method_match", "method_key", "budget_text", "variant_from_method", "train_pmod",
    "SAME_CONFIGURATION",
]
