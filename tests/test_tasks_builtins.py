"""Each adapter task against the installed built-in lmms-eval task it ``include:``s.

1. An adapter's YAML is ``include: ${LMMS_EVAL_TASKS}/<built-in>`` plus exactly the keys listed in
   ``ADAPTERS`` (the allow-list), and its resolved config differs from the built-in's in exactly those
   keys (a pin equal to the built-in's value is redundant: drop it).
2. What an adapter inherits (every other key, and the source files of the functions it names) is
   what lmms-eval 0.7.3 shipped, recorded in ``golden/lmms_eval_builtins.json``: a new lmms-eval
   release that changes a prompt, a generation kwarg, a metric or a task's code fails here. Review the
   change against the paper's setup, pin the old value in the adapter where it matters, then
   ``PMOD_UPDATE_GOLDEN=1 python -m pytest tests/test_tasks_builtins.py`` re-records.

Only what our model reads is recorded of the per-model keys: lmms-eval hands class-based tasks no
model name, so ``lmms_eval_specific_kwargs`` / ``model_specific_*`` resolve to ``default``; ``llava``
(the paper's ``--model``) is recorded too, so that a built-in gaining a llava-specific variant is seen.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

import yaml  # noqa: E402

from pmod_bench.tasks import LMMS_EVAL_TASKS, TASKS_DIR, lmms_eval_tasks_root, tasks_dir  # noqa: E402
from pmod_bench.tasks.benchmarks import MVBENCH_TASKS  # noqa: E402

_COMMON = ("task", "class", "metadata")  # the adapter's name, its task class (offline data), its version
#: adapter -> (built-in YAML under lmms_eval/tasks, the keys the adapter pins)
ADAPTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "pmod_ai2d": ("ai2d/ai2d.yaml", _COMMON),
    "pmod_chartqa": ("chartqa/chartqa.yaml", _COMMON),
    "pmod_docvqa_val": ("docvqa/docvqa_val.yaml", _COMMON),
    "pmod_gqa": ("gqa/gqa.yaml", (*_COMMON, "process_docs")),
    "pmod_infovqa_val": ("infovqa/infovqa_val.yaml", _COMMON),
    "pmod_mmbench_en_dev": ("mmbench/mmbench_en_dev.yaml", (*_COMMON, "generation_kwargs", "process_results", "metric_list")),
    "pmod_mme": ("mme/mme.yaml", (*_COMMON, "process_docs")),
    "pmod_mmmu_val": ("mmmu/mmmu_val.yaml", ("task", "class", "process_results", "metric_list")),
    "pmod_ok_vqa_val2014": ("ok_vqa/ok_vqa_val2014.yaml", (*_COMMON, "metric_list")),
    "pmod_pope_adv": ("pope/pope_adv.yaml", (*_COMMON, "generation_kwargs")),
    "pmod_pope_pop": ("pope/pope_pop.yaml", (*_COMMON, "generation_kwargs")),
    "pmod_pope_random": ("pope/pope_random.yaml", (*_COMMON, "generation_kwargs")),
    "pmod_realworldqa": ("realworldqa/realworldqa.yaml", _COMMON),
    "pmod_refcoco_val": ("refcoco/refcoco_bbox_rec_val.yaml", (*_COMMON, "process_results", "metric_list")),
    "pmod_refcocog_val": ("refcocog/refcocog_bbox_rec_val.yaml", (*_COMMON, "process_results", "metric_list")),
    "pmod_refcocoplus_val": ("refcoco+/refcoco+_bbox_rec_val.yaml", (*_COMMON, "process_results", "metric_list")),
    "pmod_scienceqa_img": ("scienceqa/scienceqa_img.yaml", (*_COMMON, "generation_kwargs")),
    "pmod_seedbench_img": ("seedbench/seedbench.yaml", (*_COMMON, "process_docs", "metric_list")),
    "pmod_textvqa_val": ("textvqa/textvqa_val.yaml", (*_COMMON, "metric_list")),
    "pmod_vqav2_val": ("vqav2/vqav2_val.yaml", _COMMON),
    # video (--suite video): offline videos through pmod_bench.tasks.video
    "pmod_videomme": ("videomme/videomme.yaml", (*_COMMON, "doc_to_visual")),
    "pmod_egoschema_subset": ("egoschema/egoschema_subset.yaml", (*_COMMON, "doc_to_visual")),
    **{f"pmod_mvbench_{t}": (f"mvbench/mvbench_{t}.yaml", (*_COMMON, "doc_to_visual")) for t in MVBENCH_TASKS},
}
#: group adapters (no include: a group has nothing to inherit but its member list) -> the built-in group
GROUPS = {"pmod_pope_full": ("pope/pope_full.yaml", {"pope_adv": "pmod_pope_adv", "pope_pop": "pmod_pope_pop",
                                                     "pope_random": "pmod_pope_random"}),
          "pmod_mvbench": ("mvbench/mvbench.yaml", {f"mvbench_{t}": f"pmod_mvbench_{t}" for t in MVBENCH_TASKS})}
PER_MODEL_KEYS = ("lmms_eval_specific_kwargs", "model_specific_target_kwargs", "model_specific_generation_kwargs")
READ_MODELS = ("default", "llava")
GOLDEN = Path(__file__).parent / "golden" / "lmms_eval_builtins.json"


class _RawLoader(yaml.SafeLoader):
    """The YAML as written: ``!function x.y`` stays the string ``x.y``."""


_RawLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _raw(path: Path) -> dict:
    return yaml.load(path.read_text(encoding="utf-8"), Loader=_RawLoader)


def _resolved(path: Path) -> dict:
    from lmms_eval.utils import load_yaml_config

    return load_yaml_config(str(path), mode="full")


def _source_file(obj) -> "str | None":
    if inspect.isfunction(obj):
        return obj.__code__.co_filename
    if inspect.isclass(obj):  # a filter class: the file of its first own method
        return next((v.__code__.co_filename for v in vars(obj).values() if inspect.isfunction(v)), None)
    return None


def _norm(value, files: dict):
    """JSON-able: a function becomes ``FILE:QUALNAME`` (FILE relative to lmms_eval/tasks) and its file is
    hashed into ``files``; the built-ins' ``!function utils.x`` and the adapters' absolute
    ``lmms_eval.tasks.<task>.utils.x`` name the same code."""
    if callable(value) and not isinstance(value, (str, bytes)):
        src = _source_file(value)
        if src is None:
            return f"{value.__module__}:{value.__qualname__}"
        src, root = os.path.realpath(src), str(lmms_eval_tasks_root())
        if not src.startswith(root + os.sep):  # ours (pmod_bench.tasks...)
            return f"{value.__module__}:{value.__qualname__}"
        name = os.path.relpath(src, root)
        files[name] = hashlib.sha256(Path(src).read_bytes()).hexdigest()[:16]
        return f"{name}:{value.__qualname__}"
    if isinstance(value, dict):
        return {str(k): _norm(v, files) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_norm(v, files) for v in value]
    return value


def _inherited(adapter: str) -> dict:
    """The built-in's config minus the adapter's pins (per-model keys: only the models we read), normalised."""
    builtin, pins = ADAPTERS[adapter]
    cfg = {k: v for k, v in _resolved(lmms_eval_tasks_root() / builtin).items() if k not in pins}
    for key in PER_MODEL_KEYS:
        if isinstance(cfg.get(key), dict):
            cfg[key] = {m: cfg[key][m] for m in READ_MODELS if m in cfg[key]}
    files: dict = {}
    keys = _norm(cfg, files)
    return {"keys": dict(sorted(keys.items())), "files": dict(sorted(files.items()))}


def test_every_adapter_is_listed():
    shipped = sorted(p.stem for p in TASKS_DIR.glob("pmod_*.yaml"))
    assert shipped == sorted([*ADAPTERS, *GROUPS])


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_adapter_differs_from_its_builtin_only_in_its_pins(adapter):
    builtin, pins = ADAPTERS[adapter]
    raw = _raw(TASKS_DIR / f"{adapter}.yaml")
    assert raw.pop("include") == f"{LMMS_EVAL_TASKS}/{builtin}"
    assert sorted(raw) == sorted(pins), f"{adapter} pins {sorted(raw)}; update ADAPTERS (the allow-list) deliberately"
    assert raw["task"] == adapter
    files: dict = {}
    mine = _norm(_resolved(tasks_dir() / f"{adapter}.yaml"), files)
    theirs = _norm(_resolved(lmms_eval_tasks_root() / builtin), files)
    differ = {k for k in set(mine) | set(theirs) if mine.get(k, KeyError) != theirs.get(k, KeyError)}
    assert differ == set(pins), f"{adapter}: differs in {sorted(differ)}, pins {sorted(pins)}"


def test_groups_name_the_adapters_of_the_builtin_groups_members():
    for group, (builtin, members) in GROUPS.items():
        raw, theirs = _raw(TASKS_DIR / f"{group}.yaml"), _raw(lmms_eval_tasks_root() / builtin)
        assert raw["group"] == group
        assert raw["task"] == [members[t] for t in theirs["task"]]


def test_inherited_settings_are_lmms_eval_0_7_3s():
    current = {"lmms_eval_tasks": "lmms_eval 0.7.3 (lmms_eval/tasks)",
               "adapters": {a: _inherited(a) for a in sorted(ADAPTERS)}}
    if os.environ.get("PMOD_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(current, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    recorded = json.loads(GOLDEN.read_text(encoding="utf-8"))
    changed = []
    for adapter, now in current["adapters"].items():
        was = recorded["adapters"].get(adapter, {"keys": {}, "files": {}})
        keys = sorted(k for k in set(now["keys"]) | set(was["keys"]) if now["keys"].get(k, KeyError) != was["keys"].get(k, KeyError))
        files = sorted(f for f in set(now["files"]) | set(was["files"]) if now["files"].get(f) != was["files"].get(f))
        if keys or files:
            changed.append(f"{adapter} ({ADAPTERS[adapter][0]}): keys {keys}, files {files}")
    assert not changed, ("the installed lmms-eval changed what these adapters inherit; review it against the paper's "
                         "setup (pin the old value in the adapter where it matters), then re-record with "
                         "PMOD_UPDATE_GOLDEN=1:\n  " + "\n  ".join(changed))
