"""The paper's efficiency scenario, in one place (light: plain constants).

Every efficiency number of the paper (Tables 1 and 7: TFLOPs, KV cache, latency) is for one image of
672x672 pixels (LLaVA-NeXT-7B: a 2x2 grid of 336 px tiles plus the base tile, 2,928 vision tokens) and
58 prompt text tokens (the Vicuna-v1 system prompt and one short question: the count at which the
paper's 39.46 and 8.38 TFLOPs are reproduced). The profiler's default scenario, the equal-compute
solver's default, the training-cost sample and the eval runner's ``--match`` read them from here.
"""

from __future__ import annotations

#: (width, height) in pixels of the paper's image
PAPER_IMAGE_SIZE: tuple[int, int] = (672, 672)
#: prompt text tokens of the paper's scenario
PAPER_TEXT_TOKENS: int = 58

__all__ = ["PAPER_IMAGE_SIZE", "PAPER_TEXT_TOKENS"]
