"""Qwen2.5-VL (HF ``qwen2_5_vl``): a window-attention ViT with a 2x2 patch merger, a Qwen2 LLM with M-RoPE.

What p-MoD and the in-LLM methods rely on, each checked in :meth:`Qwen2_5_VLHost.check` (transformers
5.24/5.25, ``modeling_qwen2_5_vl.py``), failing with :class:`~pmod_bench.model.compat.HFContractError`
when it changes:

* the vision tokens are the positions holding ``image_token_id`` (``<|image_pad|>``, one per merged
  2x2 patch: ``image_grid_thw.prod() / 4`` per image, the processor's expansion) or ``video_token_id``;
  ``<|vision_start|>`` / ``<|vision_end|>`` are text;
* ``Qwen2_5_VLTextModel`` computes ``position_embeddings = rotary_emb(x, position_ids)`` once, already
  recomposed from the three M-RoPE rows (temporal, height, width; ``mrope_section`` split of the
  head) into one ``(cos, sin)`` per token, (B, N, head_dim), and hands it to every decoder layer, with
  ``position_ids`` = the text row only (or None). p-MoD keeps original positions, so a sparse layer
  only gathers those ``(cos, sin)`` rows (nothing about M-RoPE is re-derived);
* prefill positions come from ``Qwen2_5_VLModel.get_rope_index`` (3 rows, from ``mm_token_type_ids``
  and ``image_grid_thw``; for a video ``video_grid_thw`` and ``second_per_grid_ts``: its temporal row steps
  by ``tokens_per_second`` x the seconds a frame pair spans), decode positions from the cached ``rope_deltas``
  (``text position + rope_deltas``), both computed by HF outside the layers and valid with p-MoD's cache, whose
  ``get_seq_length()`` is the full sequence length at every layer. So a video is routed as an image is, its
  ``<|video_pad|>`` tokens (``video_grid_thw.prod() / 4`` per clip) one target with the prompt's images
  (``tests/test_video_model.py``: decode == recompute, clips of different lengths batch == alone, FLOPs);
* a method that renumbers positions (PyramidDrop, SparseVLM) renumbers all three rows alike: the
  layer's RoPE is ``rotary_emb(x, position_ids - shift)`` on the (3, B, N) ids the text model received
  (read by a forward pre-hook on the text model, normalised as ``Qwen2_5_VLTextModel.forward`` does:
  None = ``arange + cache length``, 2-D = one row for all three, 4 rows = text row + the three), and
  decode steps subtract the shift their cache layer stored, so decode stays consistent with the
  prefill. (Qwen's text after an image continues at the image's start + its largest grid side, not
  + V, and an image's height / width rows start at the image's first position: renumbering by the
  count of dropped tokens, the official methods' rule on LLaVA, moves that text back by more than the
  image's span and can take late vision tokens' rows below zero when many tokens are dropped. The
  positions are used as they come, not clamped; documented, not hidden.)
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Iterator, Optional

import torch
from huggingface_hub.dataclasses import strict
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

from ..compat import CACHE_ARGUMENTS, cache_argument, contract_error
from ..hf_config import PMoDConfigMixin
from ..routed import PMoDModelMixin, SparseModelMixin, routed_forward
from . import HOSTS, HostAdapter


@strict
class PMoDQwen2_5_VLConfig(PMoDConfigMixin, Qwen2_5_VLConfig):
    r"""Qwen2.5-VL with p-MoD layers. ``pmod``: a :class:`~pmod_bench.PMoDConfig` as a dict; ``pmod_router_layers``:
    the layers that carry a router (default: those with ratio < 1)."""

    model_type = "pmod_qwen2_5_vl"
    pmod: dict | None = None
    pmod_router_layers: list[int] | None = None


class RoutedQwen2_5_VLForConditionalGeneration(SparseModelMixin, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL with the routed forward: what a vanilla model is while an in-LLM comparison method is applied."""

    _pmod_cache_arg = cache_argument(Qwen2_5_VLForConditionalGeneration.forward, "Qwen2_5_VLForConditionalGeneration.forward")
    forward = routed_forward(Qwen2_5_VLForConditionalGeneration)


class PMoDQwen2_5_VLForConditionalGeneration(PMoDModelMixin, Qwen2_5_VLForConditionalGeneration):
    """p-MoD-Qwen2.5-VL: HF ``Qwen2_5_VLForConditionalGeneration`` with p-MoD decoder layers."""

    config_class = PMoDQwen2_5_VLConfig
    _pmod_cache_arg = cache_argument(Qwen2_5_VLForConditionalGeneration.forward, "Qwen2_5_VLForConditionalGeneration.forward")
    forward = routed_forward(Qwen2_5_VLForConditionalGeneration)

    def __init__(self, config: PMoDQwen2_5_VLConfig):
        super().__init__(config)
        self._install_pmod_layers()


def mrope_position_ids(kwargs: dict) -> torch.Tensor:
    """(3, B, N) position ids of one ``Qwen2_5_VLTextModel.forward`` call from its keyword arguments, as that forward
    derives them (None: ``arange(N) + cache length`` on every row; (B, N): one row for all three; (4, B, N): the
    text row then the three M-RoPE rows)."""
    ids, embeds = kwargs.get("position_ids"), kwargs.get("inputs_embeds")
    if embeds is None:
        raise contract_error("Qwen2_5_VLTextModel received no inputs_embeds from Qwen2_5_VLModel")
    B, N = embeds.shape[:2]
    if ids is None:
        cache = next((kwargs[n] for n in CACHE_ARGUMENTS if kwargs.get(n) is not None), None)
        past = cache.get_seq_length() if cache is not None else 0
        return (torch.arange(N, device=embeds.device) + past).view(1, 1, -1).expand(3, B, -1)
    if ids.dim() == 2:
        return ids[None].expand(3, -1, -1)
    if ids.dim() == 3 and ids.shape[0] in (3, 4):
        return ids[-3:]
    raise contract_error(f"Qwen2_5_VLTextModel received position_ids of shape {tuple(ids.shape)}; expected (B, N), "
                         "(3, B, N) or (4, B, N)")


def _renumbered_mrope(rotary, seen: dict, x: torch.Tensor, kwargs: dict, shift: torch.Tensor):
    """(cos, sin) at the M-RoPE positions minus ``shift`` (B, N or 1) on all three rows. Not clamped: an image's
    height / width rows start at its first position, so a late vision token minus the tokens dropped before it can
    fall below zero; RoPE rotates by the (negative) angle all the same, and attention only sees differences."""
    ids = seen.get("ids")
    if ids is None:
        raise contract_error("a decoder layer of Qwen2.5-VL ran before its text model's forward (no position ids seen)")
    return rotary(x, (ids - shift[None]))


@HOSTS.register("qwen2_5_vl", "pmod_qwen2_5_vl")
class Qwen2_5_VLHost(HostAdapter):
    """Qwen2.5-VL (module docstring)."""

    model_type = "qwen2_5_vl"
    pmod_model_type = "pmod_qwen2_5_vl"
    title = "Qwen2.5-VL"
    vanilla_class = Qwen2_5_VLForConditionalGeneration
    sparse_class = RoutedQwen2_5_VLForConditionalGeneration
    pmod_class = PMoDQwen2_5_VLForConditionalGeneration
    pmod_config_class = PMoDQwen2_5_VLConfig
    position_rows = 3
    vision_stage_methods = frozenset({"random", "visionzip", "downsample"})  # methods/qwen_vision.py
    cls_token = False

    def vision_mask(self, config, input_ids):
        return (input_ids == config.image_token_id) | (input_ids == config.video_token_id)

    @contextlib.contextmanager
    def positions(self, model, plan) -> Iterator[None]:
        """Renumbered positions on all three M-RoPE rows: the (3, B, N) ids the text model receives, read by a forward
        pre-hook for the duration of one forward (PyTorch's public hook API; nothing is patched)."""
        lm = self.text_model(model)
        seen: dict = {}
        handle = lm.register_forward_pre_hook(lambda _m, _a, kw: seen.__setitem__("ids", mrope_position_ids(kw)),
                                              with_kwargs=True)
        plan.renumber = functools.partial(_renumbered_mrope, lm.rotary_emb, seen)
        try:
            yield
        finally:
            handle.remove()

    def register_processor(self) -> None:
        from transformers import AutoImageProcessor, AutoProcessor, AutoVideoProcessor, Qwen2_5_VLProcessor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        AutoProcessor.register(self.pmod_config_class, Qwen2_5_VLProcessor, exist_ok=True)
        AutoImageProcessor.register(self.pmod_config_class, image_processor_classes={"pil": Qwen2VLImageProcessorPil},
                                    exist_ok=True)
        AutoVideoProcessor.register(self.pmod_config_class, Qwen2VLVideoProcessor, exist_ok=True)

    def check(self, model) -> None:
        """The M-RoPE details the sparse layers and the renumbering methods rely on (module docstring)."""
        lm = self.text_model(model)
        rotary = getattr(lm, "rotary_emb", None)
        section = getattr(rotary, "mrope_section", None)
        head_dim = lm.layers[0].self_attn.head_dim
        if section is None or len(section) != 3 or 2 * sum(section) != head_dim:
            raise contract_error(f"{type(rotary).__name__}.mrope_section is {section}: expected three sections spanning "
                                 f"half the head ({head_dim // 2}), recomposed into one (cos, sin) per token")
        if "position_ids" not in inspect.signature(type(rotary).forward).parameters:
            raise contract_error(f"{type(rotary).__name__}.forward no longer takes (x, position_ids)")
        if "position_ids" not in inspect.signature(type(lm).forward).parameters:
            raise contract_error(f"{type(lm).__name__}.forward no longer takes position_ids")
        inner = getattr(model, "model", None)
        if "rope_deltas" not in vars(inner) or not callable(getattr(inner, "get_rope_index", None)):
            raise contract_error(f"{type(inner).__name__} has no rope_deltas / get_rope_index: decode positions of "
                                 "Qwen2.5-VL are no longer the cached rope_deltas")
        kinds = set(model.config.text_config.layer_types)
        if kinds != {"full_attention"}:
            raise contract_error(f"Qwen2.5-VL layer types {sorted(kinds)}: p-MoD layers need full attention "
                                 "(text_config.use_sliding_window=False)")

    def decode_inputs(self, model, attention_mask) -> dict:
        """M-RoPE decode positions as ``generate`` passes them: the text position + the cached ``rope_deltas`` on the
        three rows (transformers 5.25's forward would recompute them over the whole mask)."""
        text = (attention_mask.long().cumsum(-1) - 1)[:, -1:]  # (B, 1)
        return {"position_ids": (text + model.model.rope_deltas)[None].expand(3, -1, -1)}

    def method_geometry(self, config) -> dict:
        v, t = config.vision_config, config.text_config
        return dict(patches_per_side=0, vision_layers=v.depth, feature_layer=-1, text_layers=t.num_hidden_layers,
                    anyres=False, drop_cls=False, merge=v.spatial_merge_size)

    def routing_grid(self, config, inputs, num_vision: int) -> Optional[list[int]]:
        """The first image's merged patch grid (``image_grid_thw`` / ``spatial_merge_size``), row-major."""
        thw = inputs.get("image_grid_thw")
        if thw is None:
            return None
        m = config.vision_config.spatial_merge_size
        rows, cols = int(thw[0][1]) // m, int(thw[0][2]) // m
        return [rows, cols] if num_vision >= rows * cols else None

    def paper_image_size(self, config) -> tuple[int, int]:
        """The paper's 672x672 (Qwen's resize rule turns it into 24x24 merged tokens at 14 px patches)."""
        from pmod_bench.profiler.scenario import PAPER_IMAGE_SIZE

        return PAPER_IMAGE_SIZE


__all__ = ["Qwen2_5_VLHost", "PMoDQwen2_5_VLConfig", "PMoDQwen2_5_VLForConditionalGeneration",
           "RoutedQwen2_5_VLForConditionalGeneration", "mrope_position_ids"]
