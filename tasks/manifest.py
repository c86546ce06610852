"""lmms-eval entry point (group ``lmms_eval.models``): the ``pmod_llava`` model manifest.

lmms-eval loads every entry point when ``lmms_eval.models`` is imported and expects a
``ModelManifest`` (or a zero-argument callable returning manifests), never the model class: a class
would be called, fail, and make lmms-eval drop every plugin model. This module stays light (no
torch import); the class is imported by lmms-eval only when ``--model pmod_llava`` is used.
"""

from __future__ import annotations

MODEL_ID = "pmod_llava"
CLASS_PATH = "pmod_bench.tasks.plugin.PMoDLlava"


def manifests():
    """The manifests this package registers (called by lmms-eval's registry)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH, aliases=("pmod-llava",))]
