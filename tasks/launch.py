"""What the eval runner and the lmms-eval plugin both check before loading anything (light: no torch at import):
the process layout of a launch, and the ``ratios`` text forms. Its own module so that the plugin and the runner
import it, not each other."""

from __future__ import annotations

import os
from typing import Any, Optional

from pmod_bench.model.config import parse_ratios as _parse_ratios


def parse_ratios(value: Any) -> Optional[list[float]]:
    """``--ratios`` / model_args ``ratios``: :func:`pmod_bench.model.config.parse_ratios` (``[1,1,0.5]``, ``1;1;0.5``,
    ``1*8,0.5*24``, a list, ...); None or "" = not given."""
    if value is None or value == "":
        return None
    return _parse_ratios(value, what="--ratios")


def _truthy(value: Optional[str]) -> bool:
    return str(value or "").strip().lower() in ("1", "true", "yes", "on")


CPU_LAUNCH_RECIPE = "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m pmod_bench.cli eval ..."


def check_launch(env: Optional[dict] = None, cuda_available: Optional[bool] = None) -> None:
    """Refuse a process layout that would run silently wrong (one process, or a crash in lmms-eval).

    * ``accelerate launch --num_processes N`` on a machine without GPUs starts **one** process
      (accelerate's simple launcher; it sets MASTER_ADDR but no WORLD_SIZE).
    * Several processes without CUDA need ``ACCELERATE_USE_CPU=1`` (else accelerate picks a GPU
      backend and lmms-eval dies with "'int' object is not iterable").
    """
    env = os.environ if env is None else env
    world = int(str(env.get("WORLD_SIZE") or "1").strip() or 1)
    if world <= 1 and "ACCELERATE_MIXED_PRECISION" in env and env.get("MASTER_ADDR") and "RANK" not in env:
        raise ValueError("`accelerate launch --num_processes N` started a single process: without --multi_gpu it runs "
                         f"one process on a machine without GPUs. On CPUs run: {CPU_LAUNCH_RECIPE}")
    if world > 1:
        if cuda_available is None:
            import torch

            cuda_available = torch.cuda.is_available()
        if not cuda_available and not _truthy(env.get("ACCELERATE_USE_CPU")):
            raise ValueError(f"{world} processes (WORLD_SIZE={world}) on a machine without CUDA need ACCELERATE_USE_CPU=1; "
                             f"run: {CPU_LAUNCH_RECIPE}")


__all__ = ["check_launch", "parse_ratios", "CPU_LAUNCH_RECIPE"]
