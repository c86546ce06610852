"""``pmod_llava``: the lmms-eval model for p-MoD and vanilla LLaVA-1.5 / LLaVA-NeXT / Qwen2.5-VL / LLaVA-OneVision
checkpoints.

A thin class: loading is :func:`pmod_bench.model.loading.load_model`, the forward pass is the HF
model's own ``generate`` / ``forward``; lmms-eval supplies requests, batching helpers
(``lmms_eval.utils.Collator``) and the process layout (``accelerate launch``). Nothing of lmms-eval
is copied. How a request is built is the loaded model's *host*'s business (:mod:`.hosts`, one class per
family, chosen by ``config.model_type``): LLaVA models get lmms-eval's ``llava`` requests, Qwen2.5-VL models
lmms-eval's ``qwen2_5_vl`` (chat class) requests, LLaVA-OneVision models ``llava_hf``'s with ``llava_onevision``'s
``qwen_1_5`` prompt.

``python -m lmms_eval --model pmod_llava --model_args pretrained=DIR[,key=value...]``; model_args:

==========================  =====================================================================
``pretrained``              checkpoint directory, hub id, or preset name (``tiny`` for tests)
``pmod``                    turn a vanilla checkpoint into p-MoD: ``default`` or a PMoDConfig JSON
                            file (routers untrained: for smoke tests and exploration only)
``shift`` / ``schedule``    run a p-MoD model at another delta / schedule (``set_pmod_ratios``)
``ratios``                  explicit per-layer retention, {RATIOS_FORMS}
                            (in ``--model_args``, whose items commas separate: ``[1*8,0.5*24]`` or ``1*8;0.5*24``)
``allow_untrained_routers`` let the overrides route layers that have no trained router
``dtype``                   ``auto`` (on GPU the host's reference dtype: float16 for LLaVA as the paper,
                            bfloat16 for Qwen2.5-VL as lmms-eval, float16 for OneVision; float32 on
                            CPU), ``bfloat16``, ...
``device``                  ``cuda:0``, ``cpu``; default: this process's GPU, else CPU
``attn_implementation``     ``sdpa`` (default), ``eager``, ``flash_attention_2``
``batch_size``              requests per forward pass (left padding; answers equal batch size 1)
``chat_template``           default: the host's (LLaVA: ``vicuna_v1``, the paper's conv template;
                            Qwen2.5-VL: ``processor``, the checkpoint's own; OneVision:
                            ``qwen_1_5``, the published runs' conv template); ``processor``, a
                            ``.jinja`` file or a template string (``vicuna_v1``: LLaVA only,
                            ``qwen_1_5``: OneVision only)
``response_cache``          directory for per-request persistence (resume; see ``tasks/cache.py``)
``max_new_tokens``          default when a task sets none (the host's: LLaVA 1024, Qwen2.5-VL 128,
                            OneVision 1024)
``stop_at_until``           cut answers at the task's ``until`` strings (default false, see below)
``min_pixels`` /            Qwen2.5-VL: the image / video processors' pixel bounds, the video
``max_pixels`` /            frame cap and sampling rate (lmms-eval's qwen2_5_vl defaults: 200,704 /
``max_num_frames`` /        1,605,632 / 32 / none: frames by max_num_frames; ``tasks/video_requests.py``)
``fps``
``max_frames_num``          LLaVA-OneVision: frames read of each video, spread uniformly (lmms-eval's
                            llava_hf: 32); ``max_num_frames`` is accepted as the same setting
==========================  =====================================================================

Fidelity with the paper's runs (``--model llava``, ``conv_template=vicuna_v1``; read off lmms-eval
0.7.3's ``lmms_eval/models/simple/llava.py``), the default for LLaVA hosts:

* Prompts: ``USER: <image>\\n{task prompt} ASSISTANT:`` after the Vicuna-v1 system prompt. With
  several visuals the image tokens are joined by spaces, ``<image> <image>\\n{prompt}``, exactly as
  ``llava`` writes them; none are added when the task prompt already holds ``<image>``. (With
  ``chat_template=processor`` or a custom template the template decides.)
* ``until`` is **ignored**: ``llava`` pops it from the generation kwargs and never cuts (its cut is
  commented out), so a chatty ``"Yes\\n\\nThe image ..."`` reaches the task's own answer parsing as
  is. ``stop_at_until=true`` (``pmod-bench eval --stop-at-until``) stops generation at the first
  ``until`` string and cuts the text there instead (lmms-eval's generic convention); it is part of
  the run identity and of the response-cache key.
* ``max_new_tokens`` (default 1024), ``temperature`` (0 = greedy), ``top_p``, ``num_beams``;
  ``image_aspect_ratio`` (an option of the original LLaVA code) is ignored: the checkpoint's
  processor decides the image preprocessing.

Qwen2.5-VL hosts reproduce lmms-eval 0.7.3's ``qwen2_5_vl`` chat class instead (why that class, and
what it does: :class:`pmod_bench.tasks.requests.QwenChatRequests`); ``stop_at_until`` works there too.
LLaVA-OneVision hosts: :class:`pmod_bench.tasks.requests.OnevisionRequests`.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.utils import Collator
from tqdm import tqdm

from pmod_bench.model.config import RATIOS_FORMS
from pmod_bench.model.hosts import family_of

from .cache import ResponseCache, request_key
from .data import task_data_key
from .grounding import set_box_space
from .requests import REQUESTS, requests_for, source_model_type
from .launch import check_launch, parse_ratios  # noqa: F401  (parse_ratios re-exported: model_args ``ratios``)

__doc__ = __doc__.replace("{RATIOS_FORMS}", RATIOS_FORMS)  # the forms parse_ratios reads, from their one home



def resolve_dtype(dtype: Any, device: torch.device, gpu_dtype: str = "float16") -> torch.dtype:
    """``auto`` / None: on GPU the host's reference dtype (``gpu_dtype``: float16 for LLaVA as the paper, bfloat16
    for Qwen2.5-VL as lmms-eval), float32 on CPU; else :func:`pmod_bench.model.dtypes.torch_dtype`."""
    from pmod_bench.model.dtypes import torch_dtype

    if dtype in (None, "auto"):
        return torch_dtype(gpu_dtype) if device.type == "cuda" else torch.float32
    return torch_dtype(dtype)


def _load_model(source: str, pmod: Any, dtype: torch.dtype, device: torch.device, attn: str):
    from pmod_bench.model.loading import load_model

    return load_model(source, pmod=pmod, dtype=dtype, device=device, attn_implementation=attn)


def _pmod_arg(pmod: Any):
    """model_args ``pmod`` -> PMoDConfig / dict / None."""
    if pmod in (None, "", "none", "None", False):
        return None
    from pmod_bench import PMoDConfig

    if pmod in ("default", True):
        return PMoDConfig()
    if isinstance(pmod, (dict, PMoDConfig)):
        return PMoDConfig.from_dict(pmod) if isinstance(pmod, dict) else pmod
    path = Path(str(pmod)).expanduser()
    if path.is_file():
        return PMoDConfig.from_dict(json.loads(path.read_text()))
    try:
        return PMoDConfig.from_dict(json.loads(str(pmod)))
    except ValueError:
        raise ValueError(f"--pmod (model_args pmod) must be 'default', a PMoDConfig JSON file or a JSON object, "
                         f"got {pmod!r}") from None


def _image_error(task: str, split: str, doc_id: int, exc: BaseException, what: str = "image"):
    """A DataError naming benchmark, task, split, row and the fix for an image (``what``: or a video) that does not
    decode."""
    from .benchmarks import benchmark_for_task
    from .data import DataError, ENV_VAR

    bench = benchmark_for_task(task)
    name = bench.key if bench else task
    root = os.environ.get(ENV_VAR)
    where = f"The local copy under {root}" if root else "The cached hub copy"
    return DataError(
        f"{name} ({task}, split '{split}', row {doc_id}): the {what} does not decode ({type(exc).__name__}: "
        f"{(str(exc).strip().splitlines() or [''])[0]}). "
        f"{where} is damaged: list every bad row with `pmod-bench data check {name} --decode`, then re-download the "
        "dataset snapshot (`hf download ORG/NAME --repo-type dataset --local-dir DIR`)."
    )


def _task_messages(doc_to_visual: Any, doc: dict):
    """A thunk giving the request's chat messages as lmms-eval's ``ConfigurableMessagesTask.doc_to_messages`` builds
    them, when the request comes from such a task (the adapter tasks, :class:`.lmms_task.PMoDTask`: their
    ``doc_to_visual`` is a method of the task); else None. Called only by hosts that prompt from messages (Qwen):
    some tasks' message builders change module state (MMMU's sets its interleaved format)."""
    task = getattr(doc_to_visual, "__self__", None)
    if task is None or not callable(getattr(task, "doc_to_messages", None)):
        return None
    return lambda: task.doc_to_messages(doc)


class PMoDLlava(lmms):
    """lmms-eval model for p-MoD / vanilla LLaVA(-NeXT), Qwen2.5-VL and LLaVA-OneVision checkpoints; see the module
    docstring."""

    is_simple = True

    def __init__(
        self,
        pretrained: Any = "tiny",
        pmod: Any = None,
        shift: Optional[float] = None,
        schedule: Optional[str] = None,
        ratios: Any = None,
        allow_untrained_routers: bool = False,
        dtype: Any = "auto",
        device: Optional[str] = None,
        attn_implementation: str = "sdpa",
        batch_size: Any = 1,
        max_batch_size: Any = None,  # passed by lmms-eval's evaluator; unused
        chat_template: Optional[str] = None,
        response_cache: Optional[str] = None,
        max_new_tokens: Optional[int] = None,
        stop_at_until: Any = False,
        method: Any = None,
        model: Any = None,
        processor: Any = None,
        **host_options: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(host_options) - {"min_pixels", "max_pixels", "max_num_frames", "max_frames_num", "fps"})
        if unknown:
            raise ValueError(
                f"pmod_llava: unknown model_args {', '.join(unknown)}. Known: pretrained, pmod, shift, schedule, "
                "ratios, allow_untrained_routers, dtype, device, attn_implementation, batch_size, chat_template, "
                "response_cache, max_new_tokens, stop_at_until, method, min_pixels, max_pixels, max_num_frames, "
                "max_frames_num, fps."
            )
        try:
            self.batch_size_per_gpu = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"pmod_llava: batch_size must be a positive integer, got {batch_size!r}") from None
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"pmod_llava: batch_size must be >= 1, got {batch_size}")
        self.stop_at_until = stop_at_until if isinstance(stop_at_until, bool) else \
            str(stop_at_until).strip().lower() in ("1", "true", "yes", "on")
        self._warned: set[str] = set()
        check_launch()
        self._place(device, dtype, pretrained if model is None else model)
        self._attach(pretrained, model, processor, pmod, attn_implementation)
        host_args = {k: v for k, v in host_options.items() if v not in (None, "")}
        self.host = requests_for(self._model, self.processor, chat_template=chat_template, max_new_tokens=max_new_tokens,
                                 stop_at_until=self.stop_at_until, warn=self._warn_once, **host_args)
        self.processor, self.tokenizer = self.host.processor, self.host.tokenizer
        set_box_space(self.host.box_space())  # how this process's RefCOCO answers are read (tasks/grounding.py)
        self._set_ratios(shift, schedule, ratios, allow_untrained_routers)
        self.method = None  # a comparison method (pmod_bench.methods spec, e.g. method=visionzip:dominant=54,contextual=10)
        if method not in (None, "", "none", "None"):
            from pmod_bench.methods import apply_method

            self._model = apply_method(self._model, method)
            self.method = self._model.method_config.to_dict()

        self.identity = self._identity()
        self.cache = ResponseCache(response_cache, rank=self._rank) if response_cache else None
        self.model_calls = 0  # forward batches run (tests, benchmarks)
        self.computed = 0  # requests answered by the model (not from the response cache)

    def _place(self, device: Optional[str], dtype: Any, source: Any) -> None:
        """Device and dtype: accelerate's process when launched on several, else ``device`` (default: cuda if any);
        ``dtype=auto`` on a GPU is the host's (``source``: the model, or where it is loaded from)."""
        from accelerate import Accelerator

        accelerator = Accelerator()
        self.accelerator = accelerator
        if accelerator.num_processes > 1:
            self._device = accelerator.device
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        else:
            self._device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        gpu_dtype = "float16"
        if dtype in (None, "auto") and self._device.type == "cuda":
            model_type = getattr(getattr(source, "config", None), "model_type", None) or source_model_type(str(source))
            family = family_of(model_type) if model_type else None
            gpu_dtype = REQUESTS[family].gpu_dtype if family in REQUESTS else gpu_dtype
        self._dtype = resolve_dtype(dtype, self._device, gpu_dtype)

    def _attach(self, pretrained: Any, model: Any, processor: Any, pmod: Any, attn_implementation: str) -> None:
        """The model (loaded from ``pretrained``, or the one given) in eval mode, and its processor; left padding."""
        self.pretrained = pretrained if isinstance(pretrained, str) else type(model).__name__
        if os.path.isdir(self.pretrained):  # one identity whatever the working directory
            self.pretrained = os.path.abspath(self.pretrained)
        if model is None:
            model, processor = _load_model(str(pretrained), _pmod_arg(pmod), self._dtype, self._device, attn_implementation)
        else:
            model = model.to(device=self._device)
        if processor is None:
            raise ValueError("pmod_llava: the checkpoint has no processor (tokenizer + image processor)")
        self._model = model.eval()
        self._dtype = self._model.dtype
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # batched generation appends after the last real token
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _set_ratios(self, shift: Optional[float], schedule: Optional[str], ratios: Any, allow_untrained_routers: bool) -> None:
        """--shift / --schedule / --ratios: the p-MoD model's retention schedule overridden (set_pmod_ratios)."""
        changes: dict[str, Any] = {}
        if shift is not None:
            changes["shift"] = float(shift)
        if schedule is not None:
            changes["schedule"] = str(schedule)
        parsed = parse_ratios(ratios)
        if parsed is not None:
            changes["ratios"] = parsed
        if changes:
            if not hasattr(self._model, "set_pmod_ratios"):
                raise ValueError("--shift / --schedule / --ratios need a p-MoD model; this checkpoint is vanilla (add "
                                 "--pmod default to convert it, with untrained routers; model_args: pmod=default)")
            self._model.set_pmod_ratios(allow_untrained_routers=bool(allow_untrained_routers), **changes)

    def _identity(self) -> dict:
        """What the answers depend on (the response cache's key and run.json's model identity)."""
        ratios_now = self._model.layer_ratios() if hasattr(self._model, "layer_ratios") else None
        identity = {"model": self.pretrained, "class": type(self._model).__name__, "layer_ratios": ratios_now,
                    "dtype": str(self._dtype).replace("torch.", ""), "chat_template": request_key(self.host.template)[:16]}
        if self.host.settings():  # Qwen2.5-VL's pixel bounds (LLaVA has none: its identity, and saved answers, unchanged)
            identity["host_settings"] = self.host.settings()
        if self.stop_at_until:  # answers differ: keep them apart in the response cache
            identity["stop_at_until"] = True
        if self.method is not None:
            identity["method"] = self.method
        return identity

    # ------------------------------------------------------------------------------ properties
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "PMoDLlava":
        """As lmms-eval's, but ``--model_args batch_size=8`` wins over the CLI's ``--batch_size``
        (lmms-eval would pass both and fail with a duplicate keyword)."""
        from lmms_eval import utils

        args = utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    @classmethod
    def from_loaded(cls, model, processor, name: str = "model", **kwargs: Any) -> "PMoDLlava":
        """Wrap an already loaded model + processor (programmatic use, tests, benchmarks)."""
        return cls(pretrained=name, model=model, processor=processor, **kwargs)

    @property
    def model(self):
        return self._model

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    # --------------------------------------------------------------------------------- prompts
    def build_prompt(self, context: str, num_images: int, continuation: Optional[str] = None) -> str:
        """The full prompt text of a LLaVA host (``<image>`` unexpanded; :meth:`.hosts.LlavaRequests.build_prompt`)."""
        return self.host.build_prompt(context, num_images, continuation)

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list:
        if doc_to_visual is None:
            return []
        try:
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
            for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
                for im in v if isinstance(v, (list, tuple)) else [v]:
                    if hasattr(im, "load"):
                        im.load()  # decode now: a damaged image fails here, with its row named
        except (OSError, SyntaxError) as exc:  # PIL: UnidentifiedImageError, truncated files, broken chunks
            raise _image_error(task, split, doc_id, exc) from None
        if visuals is None:
            return []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        out = []
        for v in visuals:
            if isinstance(v, (list, tuple)):
                out.extend(v)
            elif v is not None:
                out.append(v)
        for v in out:  # a video is its path (lmms-eval's video tasks); the host reads it (tasks/video_requests.py)
            if not hasattr(v, "convert") and not (isinstance(v, str) and self.host.supports_video):
                raise TypeError(f"pmod_llava handles images{' and videos' if self.host.supports_video else ''} on "
                                f"{self.host.name} models; task {task} gave a {type(v).__name__} {str(v)[:80]!r}")
        return out

    def _warn_once(self, msg: str) -> None:
        if msg not in self._warned:
            self._warned.add(msg)
            warnings.warn(msg, stacklevel=3)

    # ------------------------------------------------------------------------------ generation
    @torch.inference_mode()
    def _generate_batch(self, prompts: list[str], images: list[list], gen_kwargs: dict) -> list[str]:
        """Generate for one batch of prompts (left-padded; the host's processor call, generate kwargs and decoding);
        texts cut at the first ``until`` string when ``stop_at_until``."""
        cfg, until = self.host.generation(gen_kwargs)
        inputs = self.host.encode(prompts, images, self._device, self._model.dtype, self.batch_size)
        out = self._model.generate(**inputs, **cfg)
        self.model_calls += 1
        return self.host.cut(self.host.decode(out, inputs), until)

    def _run(self, requests: list[Instance], kind: str, key_parts, sort_key, group_key, compute) -> list:
        """Shared loop: cache look-up, length-sorted batches (Collator), per-batch persistence. A local snapshot's
        fingerprint is part of the key: an answer is never reused for another copy's (or an edited) document."""
        results: list[Any] = [None] * len(requests)
        todo = []
        data_keys: dict[str, Optional[str]] = {}  # task -> its data's fingerprint, taken once per call
        for i, req in enumerate(requests):
            args = req.args
            task = args[-2]
            if task not in data_keys:
                data_keys[task] = task_data_key(task)
            parts = (self.identity, kind, *key_parts(args))
            key = request_key(*parts, {"data": data_keys[task]}) if data_keys[task] else request_key(*parts)
            hit = self.cache.get(key) if self.cache is not None else None
            if hit is not None:
                results[i] = tuple(hit) if kind == "loglikelihood" else hit
            else:
                todo.append((i, key, args))
        if not todo:
            return results
        batches = Collator(todo, sort_fn=lambda t: sort_key(t[2]), group_fn=lambda t: group_key(t[2]), grouping=True)
        bar = tqdm(total=len(todo), disable=(self.rank != 0), desc=f"pmod_llava {kind}", unit="sample", leave=False)
        try:
            for chunk in batches.get_batched(n=self.batch_size):
                outputs = compute([c[2] for c in chunk])
                for (i, key, args), value in zip(chunk, outputs):
                    results[i] = value
                    if self.cache is not None:
                        task, doc_id = args[-2], args[-3]
                        self.cache.put(key, list(value) if isinstance(value, tuple) else value, task=task, doc_id=doc_id)
                if self.cache is not None:
                    self.cache.flush()
                self.computed += len(chunk)
                bar.update(len(chunk))
        finally:  # also when a batch fails (a full disk, Ctrl-C): the bar leaves the line to the message after it
            bar.close()
        return results

    def _ntokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Batched greedy / sampled generation; same answers at any batch size (left padding)."""

        def compute(batch):
            prompts, images = [], []
            for context, gen_kwargs, doc_to_visual, doc_id, task, split in batch:
                visuals = self._visuals(doc_to_visual, task, split, doc_id)
                messages = _task_messages(doc_to_visual, self.task_dict[task][split][doc_id])
                try:
                    prompt, shown = self.host.prompt(context, visuals, messages)  # shown: the images as the host prepares them
                except Exception as exc:  # reading a video (tasks/video_requests.py): a damaged file, named with its row
                    if not any(isinstance(v, str) for v in visuals):
                        raise
                    raise _image_error(task, split, doc_id, exc, what="video") from None
                prompts.append(prompt)
                images.append(shown)
            return self._generate_batch(prompts, images, batch[0][1])

        return self._run(
            requests, "generate_until",
            key_parts=lambda a: (a[4], a[5], a[3], a[0], a[1]),  # task, split, doc_id, context, gen_kwargs
            sort_key=lambda a: (-self._ntokens(a[0]), a[0]),
            group_key=lambda a: a[1],
            compute=compute,
        )

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation tokens | prompt), whether greedy decoding yields them) per request.

        The continuation follows ``ASSISTANT:`` (a space is inserted unless it starts with whitespace);
        its tokens are those of the full prompt beyond the prompt without it (as lm-eval counts them).
        lmms-eval 0.7.3's evaluator turns these tuples into strings (``unwrap_generation_output`` in
        ``lmms_eval/evaluator.py``), so its loglikelihood tasks are broken there; call this directly.
        LLaVA hosts only (lmms-eval's qwen2_5_vl has none either).
        """
        if not self.host.supports_loglikelihood:
            raise NotImplementedError(f"pmod_llava: loglikelihood is not implemented for {self.host.name} models; no "
                                      "paper benchmark needs it (lmms-eval's qwen2_5_vl has none either)")

        def continuation_of(args) -> str:
            _, target, _, doc_id, task, split = args
            return target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])

        @torch.inference_mode()
        def compute(batch):
            prompts, images, n_cont = [], [], []
            for args in batch:
                context, _, doc_to_visual, doc_id, task, split = args
                visuals = self._visuals(doc_to_visual, task, split, doc_id)
                ctx = self.build_prompt(context, len(visuals))
                full = self.build_prompt(context, len(visuals), continuation=continuation_of(args))
                n_cont.append(max(self._ntokens(full) - self._ntokens(ctx), 1))
                prompts.append(full)
                images.append(visuals)
            inputs = self.host.encode(prompts, images, self._device, self._model.dtype, self.batch_size)
            logits = self._model(**inputs).logits.float()  # (B, N, V); left padding: sequences end at N
            self.model_calls += 1
            ids = inputs["input_ids"]
            N = ids.shape[1]
            M = logits.shape[1]  # = N, or fewer with a method that shortens the image: the prompt still ends at M
            out = []
            for b, n in enumerate(n_cont):
                target = ids[b, N - n:]                      # (n,)
                logp = torch.log_softmax(logits[b, M - n - 1:M - 1], dim=-1)  # positions predicting the targets
                ll = logp.gather(-1, target[:, None]).sum().item()
                greedy = bool((logp.argmax(-1) == target).all())
                out.append((float(ll), greedy))
            return out

        return self._run(
            requests, "loglikelihood",
            key_parts=lambda a: (a[4], a[5], a[3], a[0], continuation_of(a)),
            sort_key=lambda a: (-self._ntokens(a[0]), a[0]),
            group_key=lambda a: {},
            compute=compute,
        )

    def clean(self) -> None:
        """lmms-eval calls this after each evaluation; its default deletes the model. Keep it (the
        runner evaluates benchmark after benchmark with one model) and free cached GPU memory only."""
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("pmod_llava does not implement multi-round generation (no paper benchmark uses it)")

    def describe(self) -> dict:
        """Model facts for run.json."""
        cfg = getattr(self._model, "config", None)
        pmod = getattr(cfg, "pmod", None)
        from pmod_bench.model.presets import PRESETS

        name = str(self.pretrained).removesuffix(":vanilla")
        random_weights = name in PRESETS and not os.path.isdir(str(self.pretrained))  # a preset: seed-0 random weights
        return {**self.identity, **self.host.describe(), "pmod": pmod, "method": self.method, "device": str(self._device),
                "batch_size": self.batch_size, "world_size": self.world_size,
                "num_params": sum(p.numel() for p in self._model.parameters()), "random_weights": random_weights}
