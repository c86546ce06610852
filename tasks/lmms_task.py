"""The lmms-eval task class of the adapter tasks: lmms-eval's task + offline data + its chat messages.

Adapter YAMLs name it with ``class: !function pmod_bench.tasks.lmms_task.PMoDTask``. It changes
two things. Requests: the class is lmms-eval's ``ConfigurableMessagesTask`` (what ``--model`` chat models
get), so every adapter has lmms-eval's own ``doc_to_messages`` (the YAML's, e.g. MMMU's interleaved images and
text, or the one user turn it builds from ``doc_to_visual`` + ``doc_to_text``), which the Qwen2.5-VL host of
``pmod_llava`` prompts from; but it issues the plain (``ConfigurableTask``) requests that ``pmod_llava``, a
simple model, reads (``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``; lmms-eval hands
class-based tasks the simple/chat choice of no model). Data: where the dataset comes from. With ``PMOD_BENCH_DATA`` set, the hub dataset ``ORG/NAME``
is read from ``$PMOD_BENCH_DATA/ORG/NAME`` after :mod:`pmod_bench.tasks.data` checked it (a missing
or malformed copy raises :class:`~pmod_bench.tasks.data.DataError` naming benchmark, path and the
missing split / column); without it, lmms-eval's own hub loading runs unchanged. A local copy's arrow
tables are cached under its own identity (``dataset_kwargs["cache_dir"]``, read by lmms-eval's
``download``; :func:`~pmod_bench.tasks.data.snapshot_cache_dir`): ``datasets`` alone would key them on the
directory's name, and serve one copy's tables for another. A video benchmark's local copy (``dataset_kwargs: video``)
is not downloaded and unzipped into ``$HF_HOME`` as lmms-eval would: :func:`pmod_bench.tasks.video.unpack` extracts its
archives beside its tables, where the adapters' ``doc_to_visual`` (:mod:`pmod_bench.tasks.video`) find the videos.
Without a data root and with the hub out of reach
(offline), the dataset's ``ConnectionError`` becomes :class:`~pmod_bench.tasks.data.HubUnreachable`: one line
naming ``--data`` / ``PMOD_BENCH_DATA``, which stops the eval run (exit 2) instead of failing each benchmark.
"""

from __future__ import annotations

from lmms_eval.api.task import ConfigurableMessagesTask, ConfigurableTask

from .data import hub_unreachable, require_local, snapshot_cache_dir


class PMoDTask(ConfigurableMessagesTask):
    """lmms-eval's task (simple requests, its chat messages on demand) whose dataset may come from a local
    snapshot (``PMOD_BENCH_DATA``)."""

    def __init__(self, data_dir=None, cache_dir=None, download_mode=None, config=None, model_name=None) -> None:
        # lmms-eval hands python-class tasks their YAML config including the `class` key itself
        config = {k: v for k, v in (config or {}).items() if k != "class"}
        super().__init__(data_dir, cache_dir, download_mode, config=config, model_name=model_name)

    def download(self, dataset_kwargs=None) -> None:
        split = self.config.test_split or self.config.validation_split
        path = require_local(self.DATASET_PATH, self.DATASET_NAME, split, task=self.config.task)
        if path is None:  # from the hub (or the HF cache); offline without a cached copy: one line naming --data
            try:
                return super().download(dataset_kwargs)
            except Exception as exc:
                unreachable = hub_unreachable(exc, self.DATASET_PATH)
                if unreachable is None:
                    raise
                raise unreachable from None
        kwargs = dict(dataset_kwargs or {})
        kwargs.pop("token", None)  # a local directory needs no hub token
        if kwargs.pop("video", False):  # a video benchmark: no hub download; its archives unpacked beside its tables
            from .video import unpack

            unpack(path)
            for key in ("create_link", "force_download", "force_unzip", "revision", "local_files_only"):
                kwargs.pop(key, None)
        kwargs["cache_dir"] = snapshot_cache_dir(path)  # this copy's own tables, never another copy's
        self.DATASET_PATH = str(path)
        return super().download(kwargs)

    def construct_requests(self, doc_id: int, ctx: str, **kwargs):
        """``ConfigurableTask``'s requests (the simple ones ``pmod_llava`` reads), not the chat ones."""
        return ConfigurableTask.construct_requests(self, doc_id, ctx, **kwargs)
