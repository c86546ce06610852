"""How ``pmod_llava`` builds a request for each host family: the lmms-eval 0.7.3 model whose requests it reproduces.

One class per host family, chosen in one table (:data:`REQUESTS`, :func:`requests_for`) by the family the model's
host adapter names (:func:`pmod_bench.model.hosts.family_of`: a ``pmod_*`` model_type is its base family); the plugin (``tasks/plugin.py``) asks its host for the prompt, the processor call, the generate
kwargs, the decoding and the box format of grounding answers, and nothing else in it asks which model it runs.

==================================  ======================================================================
host (``model_type``)               requests equal those of (lmms-eval 0.7.3)
==================================  ======================================================================
``llava``, ``llava_next``           ``--model llava`` with ``conv_template=vicuna_v1`` (the paper's runs):
(and their ``pmod_`` forms)         :class:`LlavaRequests`
``qwen2_5_vl``, ``pmod_qwen2_5_vl``  ``--model qwen2_5_vl``, its chat class
                                    (``lmms_eval/models/chat/qwen2_5_vl.py``): :class:`QwenChatRequests`
``llava_onevision``,                ``--model llava_hf`` (simple class) on the llava-hf checkpoint, i.e.
``pmod_llava_onevision``            ``--model llava_onevision``'s ``qwen_1_5`` prompt: :class:`OnevisionRequests`
==================================  ======================================================================

What is host-specific (and lives here): the prompt and chat template, the image preprocessing (LLaVA: the
checkpoint's processor; Qwen: qwen_vl_utils' ``fetch_image`` then the processor at lmms-eval's
``min_pixels`` / ``max_pixels``), the processor call, the default ``max_new_tokens``, the generate kwargs, the
decoding, the dtype ``auto`` picks on a GPU, whether ``loglikelihood`` exists, and the grounding box format
(:mod:`.grounding`). ``tests/test_eval_qwen.py`` and ``tests/test_eval_onevision.py`` prove the Qwen and OneVision
requests byte-identical to lmms-eval's own classes.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .grounding import BoxSpace, NormalisedBoxes, ResizedPixelBoxes

#: generation kwargs the LLaVA path reads; others are ignored with one warning (lmms-eval's ``llava`` ignores them too)
_LLAVA_GEN_KEYS = {"until", "max_new_tokens", "temperature", "do_sample", "top_p", "num_beams", "image_aspect_ratio"}


def _read_template(name: str) -> Optional[str]:
    """A template string from a ``.jinja`` file or an inline template; None when ``name`` is neither."""
    if "{%" in name or "{{" in name:
        return name
    path = Path(name).expanduser()
    return path.read_text(encoding="utf-8") if path.is_file() else None


def chat_messages(host: str, context: str, visuals: list, task_messages: Optional[Callable[[], Any]]):
    """(lmms-eval ``ChatMessages``, its images, its videos) of a request, as lmms-eval's chat model classes read it: the
    task's messages (``doc_to_messages``), or for a task without a messages builder its user turn as
    ``ConfigurableMessagesTask`` builds it; audio is refused."""
    from lmms_eval.api.task import ConfigurableMessagesTask
    from lmms_eval.protocol import ChatMessages

    raw = task_messages() if task_messages is not None else None
    if raw is None:
        raw = ConfigurableMessagesTask._build_user_turn(visuals, context)
    chat = ChatMessages(messages=raw)
    images, videos, audios = chat.extract_media()
    if audios:
        raise TypeError(f"pmod_llava ({host}) handles images and videos; the task gave audio")
    return chat, images, videos


class HostRequests:
    """What every host shares: the chat template, the stop strings (``stop_at_until``) and the answer cut."""

    #: the lmms-eval model (``--model`` name and class) whose requests this host reproduces
    reference: str = ""
    default_template: str = "processor"
    default_max_new_tokens: int = 1024
    #: dtype of ``dtype=auto`` on a GPU (the reference run's); float32 on CPU
    gpu_dtype: str = "float16"
    supports_loglikelihood: bool = False
    #: model_args only this host reads (``min_pixels`` ...)
    options: tuple[str, ...] = ()
    #: whether a request may hold videos (a task's ``doc_to_visual`` giving video paths)
    supports_video: bool = False

    def __init__(self, name: str, processor: Any, chat_template: Optional[str] = None,
                 max_new_tokens: Optional[int] = None, stop_at_until: bool = False,
                 warn: Optional[Callable[[str], None]] = None) -> None:
        self.name = name
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.template_name = str(chat_template) if chat_template not in (None, "") else self.default_template
        self.template = self._resolve_template(self.template_name)
        self.max_new_tokens = int(max_new_tokens) if max_new_tokens not in (None, "") else self.default_max_new_tokens
        self.stop_at_until = stop_at_until
        self.warn = warn or (lambda msg: warnings.warn(msg, stacklevel=3))

    def _resolve_template(self, name: str) -> Optional[str]:
        if name == "processor":
            if getattr(self.processor, "chat_template", None) is None:
                raise ValueError("pmod_llava: chat_template=processor, but the checkpoint's processor has no chat template")
            return None
        template = _read_template(name)
        if template is None:
            raise ValueError(f"pmod_llava: chat_template must be {self._template_choices()}; got {name!r}")
        return template

    def _template_choices(self) -> str:
        return "processor (the checkpoint's own), a .jinja file or a template"

    def settings(self) -> dict:
        """Host settings the answers depend on beyond model and template (part of the response-cache identity)."""
        return {}

    def describe(self) -> dict:
        return {"host": self.name, "requests_as": self.reference, "chat_template_name": self.template_name,
                "default_max_new_tokens": self.max_new_tokens, **self.settings()}

    def box_space(self) -> BoxSpace:
        return NormalisedBoxes(host=self.name)

    def build_prompt(self, context: str, num_images: int, continuation: Optional[str] = None) -> str:
        """A prompt from a context string alone: LLaVA's (:meth:`LlavaRequests.build_prompt`); other hosts prompt from
        the task's messages (:meth:`prompt`)."""
        raise ValueError(f"build_prompt is the LLaVA hosts' prompt; a {self.name} request is built from its messages "
                         f"({type(self).__name__}.prompt)")

    def llava_gen_kwargs(self, gen_kwargs: Optional[dict]) -> tuple[dict, list[str]]:
        """(the task's generation kwargs, its ``until``), with a warning naming the kwargs lmms-eval's ``llava`` /
        ``llava_hf`` classes do not read (the keys both take: ``_LLAVA_GEN_KEYS``)."""
        gen = dict(gen_kwargs or {})
        unknown = sorted(set(gen) - _LLAVA_GEN_KEYS)
        if unknown:
            self.warn(f"pmod_llava ignores generation kwargs {unknown}")
        return gen, self.until_of(gen)

    def until_of(self, gen: dict) -> list[str]:
        """The task's ``until`` strings when ``stop_at_until`` (both reference models ignore them otherwise)."""
        until = gen.get("until") or []
        if isinstance(until, str):
            until = [until]
        if not isinstance(until, (list, tuple)):
            raise TypeError(f"gen_kwargs['until'] must be a string or a list of strings, got {type(until).__name__}")
        return [u for u in until if u] if self.stop_at_until else []

    def stop_kwargs(self, until: list[str]) -> dict:
        return {"stop_strings": until, "tokenizer": self.tokenizer} if until else {}

    @staticmethod
    def cut(texts: list[str], until: list[str]) -> list[str]:
        out = []
        for text in texts:
            for stop in until:
                text = text.split(stop, 1)[0]
            out.append(text)
        return out


class LlavaRequests(HostRequests):
    """lmms-eval 0.7.3's ``llava`` with ``conv_template=vicuna_v1`` (``lmms_eval/models/simple/llava.py``): the
    Vicuna-v1 system prompt, then ``USER: <image>\\n{prompt} ASSISTANT:`` (several images joined by spaces, none
    added when the prompt holds ``<image>``), ``until`` ignored, ``max_new_tokens`` 1024 when the task sets none,
    float16 on a GPU; the checkpoint's processor prepares the images."""

    reference = "llava (lmms_eval/models/simple/llava.py, conv_template=vicuna_v1)"
    default_template = "vicuna_v1"
    default_max_new_tokens = 1024
    gpu_dtype = "float16"
    supports_loglikelihood = True

    def __init__(self, name: str, processor: Any, **kwargs: Any) -> None:
        super().__init__(name, processor, **kwargs)
        self.image_token = getattr(processor, "image_token", None) or "<image>"

    def _resolve_template(self, name: str) -> Optional[str]:
        if name == "vicuna_v1":
            from pmod_bench.model.presets import VICUNA_V1_TEMPLATE

            return VICUNA_V1_TEMPLATE
        return super()._resolve_template(name)

    def _template_choices(self) -> str:
        return "vicuna_v1, processor, a .jinja file or a template"

    def build_prompt(self, context: str, num_images: int, continuation: Optional[str] = None) -> str:
        """The full prompt text (``<image>`` unexpanded): vicuna_v1 writes ``" ".join(["<image>"] * n) + "\\n" +
        context`` as ``llava``'s ``generate_until``; another template gets one image item per visual."""
        if num_images and self.image_token not in context:
            if self.template_name == "vicuna_v1":
                content = [{"type": "text", "text": " ".join([self.image_token] * num_images) + "\n" + context}]
            else:
                content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": context}]
        else:
            content = [{"type": "text", "text": context}]
        prompt = self.processor.apply_chat_template([{"role": "user", "content": content}], chat_template=self.template,
                                                    add_generation_prompt=True, tokenize=False)
        if continuation is not None:
            prompt += continuation if continuation[:1].isspace() else " " + continuation
        return prompt

    def prompt(self, context: str, visuals: list, task_messages: Callable[[], Any]) -> tuple[str, list]:
        return self.build_prompt(context, len(visuals)), visuals

    def encode(self, prompts: Sequence[str], images: Sequence[list], device: Any, dtype: Any, batch_size: int):
        flat = [im for ims in images for im in ims]
        inputs = self.processor(text=list(prompts), images=flat or None, return_tensors="pt", padding=True).to(device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        return inputs

    def generation(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        gen, until = self.llava_gen_kwargs(gen_kwargs)
        temperature = float(gen.get("temperature") or 0.0)
        do_sample = bool(gen.get("do_sample", temperature > 0)) and temperature > 0
        cfg: dict[str, Any] = {"max_new_tokens": int(gen.get("max_new_tokens") or self.max_new_tokens),
                               "do_sample": do_sample, "num_beams": int(gen.get("num_beams") or 1)}
        if do_sample:
            cfg["temperature"] = temperature
            if gen.get("top_p") not in (None, 0, 0.0):
                cfg["top_p"] = float(gen["top_p"])
        cfg.update(self.stop_kwargs(until), pad_token_id=self.tokenizer.pad_token_id, use_cache=True)
        return cfg, until

    def decode(self, out: Any, inputs: Any) -> list[str]:
        return self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


# lmms-eval 0.7.3's qwen2_5_vl defaults (lmms_eval/models/simple/qwen2_5_vl.py, Qwen2_5_VL.__init__)
QWEN_MIN_PIXELS = 256 * 28 * 28
QWEN_MAX_PIXELS = 1605632
QWEN_MAX_NUM_FRAMES = 32


class QwenChatRequests(HostRequests):
    """lmms-eval 0.7.3's ``--model qwen2_5_vl``: its **chat** class (``lmms_eval/models/chat/qwen2_5_vl.py``).

    Why the chat class: 0.7.3's registry resolves ``--model qwen2_5_vl`` to it (``ModelRegistryV2.resolve``
    takes the chat class whenever one is registered; the simple one needs ``--force_simple``), so it is what
    ``python -m lmms_eval --model qwen2_5_vl`` (README quick start, ``examples/models/qwen25vl.sh``) runs. Since
    v0.4 (July 2025) every published lmms-eval number for Qwen2.5-VL comes from it: the v0.4 release notes'
    Qwen2.5-VL-3B column "(qwen2_5_vl)" was run with the default chat class and agrees with v0.3's (then the only,
    now the simple) class within about a point. The README recommends the chat models, the simple ones are legacy.

    Its request, reproduced here:

    * messages from the task's ``doc_to_messages`` (lmms-eval's ``ConfigurableMessagesTask``: the adapter's own
      function where it has one, e.g. MMMU's interleaved images and text; else one user turn with the images
      first, then the prompt); no system message, so the chat template adds Qwen's default one;
    * the checkpoint's chat template (``processor.apply_chat_template``); images through qwen_vl_utils'
      ``process_vision_info`` (its own ``fetch_image`` resize first), then the processor built with
      ``min_pixels`` 256*28*28 = 200,704 and ``max_pixels`` 1,605,632; videos (the video suite) read as its chat class
      reads them, ``max_num_frames`` 32 or ``fps`` (:mod:`.video_requests`); processor padding left at batch size > 1,
      right at 1;
    * greedy unless the task sets ``temperature`` > 0 (``do_sample``, ``temperature``, ``top_p``, ``top_k``
      None otherwise), ``max_new_tokens`` 128 when the task sets none, ``eos_token_id`` the tokenizer's,
      ``use_cache``; ``until`` ignored (the chat class never cuts); decoded with ``skip_special_tokens`` and
      without ``clean_up_tokenization_spaces``; bfloat16 on a GPU;
    * the pixel values are handed to generate as the processor returns them (the model casts them).
    """

    reference = "qwen2_5_vl (lmms_eval/models/chat/qwen2_5_vl.py, the chat class --model qwen2_5_vl resolves to)"
    default_template = "processor"
    default_max_new_tokens = 128
    gpu_dtype = "bfloat16"
    supports_loglikelihood = False
    options = ("min_pixels", "max_pixels", "max_num_frames", "fps")
    supports_video = True

    def __init__(self, name: str, processor: Any, min_pixels: Optional[int] = None, max_pixels: Optional[int] = None,
                 max_num_frames: Optional[int] = None, fps: Optional[float] = None, **kwargs: Any) -> None:
        import copy

        from transformers.image_utils import SizeDict

        from .video_requests import video_processor_size

        self.min_pixels = int(min_pixels) if min_pixels not in (None, "") else QWEN_MIN_PIXELS
        self.max_pixels = int(max_pixels) if max_pixels not in (None, "") else QWEN_MAX_PIXELS
        self.max_num_frames = int(max_num_frames) if max_num_frames not in (None, "") else QWEN_MAX_NUM_FRAMES
        self.fps = float(fps) if fps not in (None, "") else None  # lmms-eval's fps: None (frames by max_num_frames)
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"pmod_llava: need 0 < min_pixels <= max_pixels, got {self.min_pixels} and {self.max_pixels}")
        if self.max_num_frames < 1 or (self.fps is not None and not self.fps > 0):
            raise ValueError(f"pmod_llava: need max_num_frames >= 1 and fps > 0, got {self.max_num_frames} and {self.fps}")
        # lmms-eval: AutoProcessor.from_pretrained(pretrained, max_pixels=..., min_pixels=...), which sets the image
        # processor's size {shortest_edge: min_pixels, longest_edge: max_pixels}; the same on a copy of ours
        processor = copy.copy(processor)
        processor.image_processor = copy.deepcopy(processor.image_processor)
        processor.image_processor.size = SizeDict(shortest_edge=self.min_pixels, longest_edge=self.max_pixels)
        super().__init__(name, video_processor_size(processor, self.min_pixels, self.max_pixels), **kwargs)

    def _resolve_template(self, name: str) -> Optional[str]:
        if name == "vicuna_v1":
            raise ValueError("pmod_llava: vicuna_v1 is LLaVA's conversation template; Qwen2.5-VL is prompted with the "
                             "checkpoint's own chat template (chat_template=processor, the default) or a .jinja file")
        return super()._resolve_template(name)

    def settings(self) -> dict:
        fps = {"fps": self.fps} if self.fps is not None else {}  # set only: image runs keep their identity
        return {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels, "max_num_frames": self.max_num_frames, **fps}

    def box_space(self) -> BoxSpace:
        """Pixels of the image after qwen_vl_utils' ``fetch_image`` (its defaults: the chat class passes no pixel
        bounds for images) and then the processor's ``smart_resize`` within [min_pixels, max_pixels]."""
        from qwen_vl_utils import vision_process as qvu

        ip = self.processor.image_processor
        pre = int(14 * qvu.SPATIAL_MERGE_SIZE)  # process_vision_info's image_patch_size=14
        steps = (("qwen_vl_utils", pre, qvu.IMAGE_MIN_TOKEN_NUM * pre ** 2, qvu.IMAGE_MAX_TOKEN_NUM * pre ** 2),
                 ("transformers", int(ip.patch_size * ip.merge_size), self.min_pixels, self.max_pixels))
        return ResizedPixelBoxes(steps=steps, host=self.name)

    def messages(self, context: str, visuals: list, task_messages: Callable[[], Any]) -> list:
        """The request's chat messages in HF form (``ChatMessages.to_hf_messages`` with the chat class's video kwargs)."""
        from .video_requests import chat_video_kwargs

        chat, _, videos = chat_messages(self.name, context, visuals, task_messages)
        return chat.to_hf_messages(video_kwargs=chat_video_kwargs(videos, self.min_pixels, self.max_pixels,
                                                                  self.max_num_frames, self.fps))

    def prompt(self, context: str, visuals: list, task_messages: Callable[[], Any]) -> tuple[str, list]:
        """(prompt text, the images and videos as qwen-vl-utils read them: :func:`.video_requests.read_vision`)."""
        from .video_requests import read_vision

        hf = self.messages(context, visuals, task_messages)
        text = self.processor.apply_chat_template([hf], chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=True)[0]
        return text, read_vision(hf)

    def encode(self, prompts: Sequence[str], images: Sequence[list], device: Any, dtype: Any, batch_size: int):
        from .video_requests import processor_media

        inputs = self.processor(text=list(prompts), **processor_media(images), padding=True,
                                padding_side="left" if batch_size > 1 else "right", return_tensors="pt")
        return inputs.to(device)

    def generation(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        gen = {"max_new_tokens": self.max_new_tokens, "temperature": 0.0, "top_p": None, "num_beams": 1, **(gen_kwargs or {})}
        until = self.until_of(gen)
        sample = (gen["temperature"] or 0) > 0
        cfg = {"eos_token_id": self.tokenizer.eos_token_id, "pad_token_id": self.tokenizer.pad_token_id,
               "do_sample": sample, "temperature": gen["temperature"] if sample else None,
               "top_p": gen["top_p"] if sample else None, "num_beams": gen["num_beams"],
               "max_new_tokens": gen["max_new_tokens"], "top_k": gen.get("top_k") if sample else None, "use_cache": True}
        return {**cfg, **self.stop_kwargs(until)}, until

    def decode(self, out: Any, inputs: Any) -> list[str]:
        trimmed = [o[len(i):] for i, o in zip(inputs["input_ids"], out)]
        return self.processor.batch_decode(trimmed, skip_special_tokens=True, clean_up_tokenization_spaces=False)


#: lmms-eval 0.7.3's ``max_frames_num`` default (``llava_hf`` and ``llava_onevision``): frames read of each video
ONEVISION_MAX_FRAMES_NUM = 32

#: LLaVA-NeXT's ``conv_templates["qwen_1_5"]`` (``conv_qwen``: ChatML separators, Qwen's default system turn;
#: ``llava/conversation.py`` at LLaVA-VL/LLaVA-NeXT@b0eb49300f0a80723424e2c5cbb1bc54a9e5c3a0, the last commit that
#: touched it, current at df179663) as a chat template: ``Conversation.get_prompt`` (``SeparatorStyle.CHATML``) writes
#: ``system + sep + "\n"``, then ``role + "\n" + message + sep + "\n"`` per turn and ``role + "\n"`` for the open
#: assistant turn. Qwen2-Instruct's tokenizer template (which llava-hf's OneVision checkpoints ship in their
#: tokenizer_config.json) renders the same text for one user turn.
QWEN_1_5_TEMPLATE = (
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class OnevisionRequests(HostRequests):
    """LLaVA-OneVision (HF ``llava_onevision``): the published runs' prompt, in lmms-eval 0.7.3's ``llava_hf`` request.

    Two lmms-eval models evaluate OneVision. The published OneVision numbers come from ``--model llava_onevision``
    (``lmms_eval/models/simple/llava_onevision.py``; 0.7.3's files, whose logic is that of
    EvolvingLMMs-Lab/lmms-eval@75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3 for both classes read here), which runs the
    original LLaVA-NeXT code (``conv_template`` ``qwen_1_5``, anyres_max_9, ``max_frames_num`` 32) and cannot run an
    HF checkpoint; ``--model llava_hf`` runs the llava-hf checkpoints our host is. What each does, and what is taken:

    * prompt: ``llava_onevision`` writes ``" ".join(["<image>"] * n) + "\n" + context`` (nothing added when the
      context holds ``<image>``) into one user turn of ``qwen_1_5`` (:data:`QWEN_1_5_TEMPLATE`). ``llava_hf``'s simple
      class writes the same user turn and renders it with the *tokenizer's* chat template, which on the llava-hf
      checkpoints is Qwen2-Instruct's (the conversion script loads ``Qwen/Qwen2-*-Instruct``'s tokenizer): the
      same text. That is the default (``chat_template=qwen_1_5``). ``chat_template=processor`` is ``llava_hf``'s
      chat class (what ``--model llava_hf`` resolves to in 0.7.3): the task's ``doc_to_messages`` rendered with the
      *processor's* template (``chat_template.json``: no system turn, one ``<image>\n`` per image before the text).
      Any other template (a ``.jinja`` file or a string) renders the simple class's user turn, as its own
      ``chat_template=`` model_arg does;
    * images: the checkpoint's processor (anyres_max_9 tiles; ``image_sizes`` from it), every image of a prompt tiled
      as a single image (both ``llava_hf`` classes hand the processor a flat list); the original code instead pads a
      multi-image prompt's images to squares of one tile (``image_aspect_ratio`` pad), which the HF processor cannot do;
    * generation: ``llava_hf``'s: greedy unless ``temperature`` > 0, the task's ``top_p`` and ``num_beams``,
      ``max_new_tokens`` 1024 when the task sets none, ``pad_token_id`` = ``eos_token_id`` = the tokenizer's eos,
      ``use_cache``; ``until`` ignored (both classes drop it); decoded with ``skip_special_tokens``, not stripped
      (``llava_onevision`` strips; lmms-eval's answer parsing strips too); float16 on a GPU (the checkpoints' dtype
      and the original's);
    * boxes: normalised ``[x1, y1, x2, y2]``, read by lmms-eval's parser (:class:`.grounding.NormalisedBoxes`);
    * videos (the video suite; a task's ``doc_to_visual`` gives the clip's path): ``llava_hf``'s simple class writes
      ``" ".join(["<video>"] * n) + "\n" + context`` (nothing added when the context holds ``<image>``) into the same
      user turn, reads the request's first clip with decord at ``max_frames_num`` (32) frames spread uniformly
      (:func:`.video_requests.uniform_frames`) and calls ``processor(videos=[frames], text=...)``. ``llava_onevision``
      reads the clip the same way (same ``load_video``, same 32 frames) but writes ``<image>`` (the original code
      pools a video's features by its ``modalities``, HF by the ``<video>`` token: 2x2 bilinear pooling per frame and
      one newline after the last frame in both), preprocesses the frames with its SigLIP image processor instead of
      HF's video processor, and answers a clip that does not decode from the text alone (``llava_hf`` answers "");
      here a clip that does not decode fails its benchmark naming the row. With ``chat_template=processor`` the prompt
      is the chat class's (the processor's template: ``<video>\n`` before the text) and the frames are still read as
      above: the chat class hands the clip's *path* to HF's processor, whose OneVision video processor
      (``do_sample_frames`` False) decodes *every* frame with torchcodec (a Video-MME clip: tens of thousands), and
      which cannot decode at all without torchcodec; beside it the class passes ``images=[]``, which transformers 5's
      OneVision image processor fails on, so that class runs no video request on this stack
      (``tests/test_eval_onevision_video.py`` compares the rest of its request). One video per request (``llava_hf``
      reads only the first).
      ``max_frames_num`` (model_arg; ``max_num_frames``, the Qwen2.5-VL name that ``pmod-bench eval --max-num-frames``
      passes, is the same setting) changes the count; ``fps`` is refused (both lmms-eval classes sample by count).

    Both ``llava_hf`` classes run batch size 1 only; here a batch is left-padded and each request's ids, pixels and
    image sizes equal its batch-1 request (``tests/test_eval_onevision.py``, ``tests/test_eval_onevision_video.py``).
    ``loglikelihood`` is refused: no benchmark of the suite needs it.
    """

    reference = ("llava_hf (lmms_eval/models/simple/llava_hf.py; its chat class with chat_template=processor), prompting as "
                 "llava_onevision (conv_template=qwen_1_5)")
    default_template = "qwen_1_5"
    default_max_new_tokens = 1024
    gpu_dtype = "float16"
    supports_loglikelihood = False
    options = ("max_frames_num", "max_num_frames")
    supports_video = True

    def __init__(self, name: str, processor: Any, max_frames_num: Optional[int] = None,
                 max_num_frames: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(name, processor, **kwargs)
        self.image_token = getattr(processor, "image_token", None) or "<image>"
        self.video_token = getattr(processor, "video_token", None) or "<video>"
        given = {int(v) for v in (max_frames_num, max_num_frames) if v not in (None, "")}
        if len(given) > 1:
            raise ValueError(f"pmod_llava: max_frames_num={max_frames_num} and max_num_frames={max_num_frames} name the "
                             "same setting (frames read of each video); give one")
        self.max_frames_num = given.pop() if given else ONEVISION_MAX_FRAMES_NUM
        if self.max_frames_num < 1:
            raise ValueError(f"pmod_llava: max_frames_num (frames read of each video) must be >= 1, got {self.max_frames_num}")

    def settings(self) -> dict:
        """``max_frames_num`` when not lmms-eval's 32 (an image run's identity, and its saved answers, unchanged)."""
        return {} if self.max_frames_num == ONEVISION_MAX_FRAMES_NUM else {"max_frames_num": self.max_frames_num}

    def describe(self) -> dict:
        return {**super().describe(), "max_frames_num": self.max_frames_num}

    def _resolve_template(self, name: str) -> Optional[str]:
        if name == "qwen_1_5":
            return QWEN_1_5_TEMPLATE
        if name == "vicuna_v1":
            raise ValueError("pmod_llava: vicuna_v1 is LLaVA-1.5's conversation template; LLaVA-OneVision is prompted with "
                             "qwen_1_5 (the default), processor (the checkpoint's own) or a .jinja file")
        return super()._resolve_template(name)

    def _template_choices(self) -> str:
        return "qwen_1_5, processor, a .jinja file or a template"

    def prompt(self, context: str, visuals: list, task_messages: Callable[[], Any]) -> tuple[str, list]:
        """(prompt text, the images and videos for the processor: PIL images, or one :class:`.video_requests.VideoFrames`)."""
        if self.template_name == "processor":
            return self._chat_prompt(context, visuals, task_messages)
        videos = [v for v in visuals if isinstance(v, str)]
        if visuals and self.image_token not in context:  # llava_hf tests for <image> alone, for videos too
            token = self.video_token if videos else self.image_token
            context = " ".join([token] * len(visuals)) + "\n" + context
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": context}], chat_template=self.template,
                                                  tokenize=False, add_generation_prompt=True)
        return text, self._read_videos(visuals, videos)

    def _read_videos(self, visuals: list, videos: list) -> list:
        """The visuals with the request's video read (:func:`.video_requests.uniform_frames`); one video, nothing else."""
        if not videos:
            return list(visuals)
        if len(visuals) != 1:
            raise TypeError(f"pmod_llava ({self.name}) reads one video per request, as lmms-eval's llava_hf (which reads "
                            f"only the first); the task gave {len(videos)} video(s) and {len(visuals) - len(videos)} image(s)")
        from .video_requests import uniform_frames

        return [uniform_frames(videos[0], self.max_frames_num)]

    def _chat_prompt(self, context: str, visuals: list, task_messages: Callable[[], Any]) -> tuple[str, list]:
        """``llava_hf``'s chat class: the task's messages (``ChatMessages``) through the processor's chat template."""
        chat, images, videos = chat_messages(self.name, context, visuals, task_messages)
        text = self.processor.apply_chat_template(chat.model_dump()["messages"], tokenize=False, add_generation_prompt=True)
        return text, self._read_videos(list(images) + list(videos), list(videos))

    def encode(self, prompts: Sequence[str], images: Sequence[list], device: Any, dtype: Any, batch_size: int):
        """The processor on the batch's prompts, all their images (a flat list, as ``llava_hf``) and their videos' frames
        (each ``max_frames_num`` frames: they stack), floats in ``dtype``."""
        from .video_requests import processor_media

        found = processor_media(images)  # llava_hf passes no video metadata, and videos= only with a video
        media = {"images": found["images"], **({"videos": found["videos"]} if found["videos"] else {})}
        inputs = self.processor(text=list(prompts), **media, return_tensors="pt", padding=True)
        return inputs.to(device, dtype)

    def generation(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        gen, until = self.llava_gen_kwargs(gen_kwargs)
        gen = {"max_new_tokens": self.max_new_tokens, "temperature": 0, "top_p": None, "num_beams": 1, **gen}
        sample = (gen["temperature"] or 0) > 0
        eos = self.tokenizer.eos_token_id
        cfg = {"do_sample": sample, "temperature": gen["temperature"] if sample else None, "top_p": gen["top_p"],
               "num_beams": gen["num_beams"], "max_new_tokens": gen["max_new_tokens"], "use_cache": True,
               "pad_token_id": eos, "eos_token_id": eos}
        return {**cfg, **self.stop_kwargs(until)}, until

    def decode(self, out: Any, inputs: Any) -> list[str]:
        return self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


#: host family (the host adapter's vanilla model_type, :func:`pmod_bench.model.hosts.family_of`) -> request builder;
#: a p-MoD model is found under its family through the adapter, never by its own ``pmod_*`` type
REQUESTS: dict[str, type] = {"llava": LlavaRequests, "llava_next": LlavaRequests, "qwen2_5_vl": QwenChatRequests,
                              "llava_onevision": OnevisionRequests}


def requests_of_type(model_type: Optional[str]) -> tuple[str, type]:
    """(host family, request builder) of a ``model_type`` (vanilla or p-MoD); ValueError names the supported ones."""
    from pmod_bench.model.hosts import family_of

    family = family_of(model_type) if model_type else None
    if family not in REQUESTS:
        raise ValueError(f"pmod_llava evaluates LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL and LLaVA-OneVision models (host families "
                         f"{', '.join(sorted(REQUESTS))}, and their p-MoD forms); this one's model_type is {model_type!r}")
    return family, REQUESTS[family]


def requests_for(model: Any, processor: Any, **options: Any) -> HostRequests:
    """The request builder of a loaded model (its host family, from ``model.config.model_type``), on its processor."""
    name, cls = requests_of_type(getattr(getattr(model, "config", None), "model_type", None))
    foreign = sorted(k for k in options if k not in HostRequests.__init__.__code__.co_varnames and k not in cls.options)
    if foreign:
        owners = sorted({h for h, c in REQUESTS.items() if set(foreign) <= set(c.options)}) or ["no host"]
        raise ValueError(f"pmod_llava: {', '.join(foreign)} (model_args of {', '.join(owners)} models) do not apply to this "
                         f"{name} model; leave them out")
    return cls(name, processor, **options)


def source_model_type(source: str) -> Optional[str]:
    """A model source's ``model_type`` without loading it (for ``dtype=auto`` on a GPU): a preset's, or the
    ``config.json`` of a local directory or a hub snapshot; None when it cannot be read (LLaVA is assumed)."""
    from pmod_bench.model.presets import PRESETS, preset_config

    name = str(source).removesuffix(":vanilla")
    if name in PRESETS and not Path(source).expanduser().is_dir():
        return preset_config(name).model_type  # the vanilla config's: the host is the same for its p-MoD form
    try:
        from pmod_bench.model.sources import read_config_json, resolve_source_dir

        return read_config_json(resolve_source_dir(str(source))).get("model_type")
    except (OSError, ValueError):
        return None


__all__ = ["REQUESTS", "HostRequests", "LlavaRequests", "ONEVISION_MAX_FRAMES_NUM", "OnevisionRequests", "QWEN_1_5_TEMPLATE", "QWEN_MAX_NUM_FRAMES",
           "QWEN_MAX_PIXELS", "QWEN_MIN_PIXELS", "QwenChatRequests", "requests_for", "requests_of_type", "source_model_type"]
