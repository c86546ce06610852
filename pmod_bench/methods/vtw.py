"""VTW, Visual Tokens Withdrawal (Lin et al., AAAI 2025): from LLM layer K on, every vision token is withdrawn.

Follows lzhxmu/VTW at commit a3d8cfc3c3f8c957b02b504f85e140d633c30453 (``llava/model/language_model/VTW.py``,
``VTWLlamaModel.forward`` with ``use_vtw``, ``pe_type = "keep"``, ``mode = "vtw"``): in the prefill, right before
the decoder layer whose ``layer_idx == k`` runs, the image span is cut out of the hidden states, the position ids
and the attention mask; layers ``k..L-1`` process the system and text tokens only, at their **original** positions,
and cache only those, so decode steps never see a vision token from layer ``k`` on. Layers below ``k`` are ordinary.
The official default is ``k = 15`` (the layer its KL-divergence search picked for LLaVA-1.5-7B; the README's
``--use_vtw --k=15``).

Where this deviates, and why:

* the official code cuts a fixed span (``system_token_nums = 35``, ``image_token_nums = 576``: one LLaVA-1.5
  image after the Vicuna system prompt); here every sample withdraws its own vision tokens wherever they are (any
  image count, LLaVA-NeXT's newline features, other hosts), the same tokens as that span on LLaVA-1.5;
* the search for K (``findk``: the KL divergence of the last token's logits on a calibration set, as each layer
  withdraws) is not part of the method here; K is a budget axis, so ``--match`` picks the K that meets a FLOPs
  target, and a user can give the K the official search found.

It is :mod:`.random_llm` / :mod:`.fastv` with nothing kept, and needs no attention rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .base import MethodError, param, register_method
from .geometry import ModelGeometry
from .llm import DropState, LLMMethodConfig


@register_method("vtw")
@dataclass
class VTWConfig(LLMMethodConfig):
    """VTW: withdraw every vision token before LLM layer ``k`` (layers k..L-1 process and cache the text only)."""

    official: ClassVar[str] = "lzhxmu/VTW@a3d8cfc3c3f8c957b02b504f85e140d633c30453"

    k: int = param(15, low=1)
    """The first layer without vision tokens (official ``--k``; 15 for LLaVA-1.5-7B)."""

    def first_layer(self) -> int:
        return self.k

    def check_model(self, geometry: ModelGeometry) -> None:
        if self.k >= geometry.text_layers:
            raise MethodError(f"{self.name}: k must be in [1, {geometry.text_layers - 1}] for an LLM of "
                              f"{geometry.text_layers} layers, got {self.k}.")

    def candidates(self, geometry: ModelGeometry) -> list:
        return [self.replace(k=k) for k in range(1, geometry.text_layers)]

    def budget(self) -> dict[str, Any]:
        return {"k": self.k}

    def layer_vision_tokens(self, num_layers: int, V: int) -> list[int]:
        return [V if layer < self.k else 0 for layer in range(num_layers)]

    def start(self, model, plan, kwargs: dict):
        return _WithdrawState(self, plan)


class _WithdrawState(DropState):
    def __init__(self, cfg: VTWConfig, plan) -> None:
        super().__init__(plan, renumber=False)  # pe_type "keep": the text keeps its original positions
        self.cfg = cfg

    def prepare(self, ctx, x):
        if ctx.layer_idx == self.cfg.k:
            self.keep(self.current.target & False, tuple(0 for _ in self.current.V))  # (B, N): nothing kept
        return x
