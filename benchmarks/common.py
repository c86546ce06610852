"""Shared pieces of the benchmarks: a LLaVA-NeXT-shaped model of any size, its LLaVA-layout input,
and the analytic FLOPs of the same shapes from the profiler (one formula: ``pmod_bench.profiler.flops``).

The model is the tiny preset (CLIP 32 px tiles, Vicuna template) with its language model resized to
the requested shape, random weights; ``to_pmod`` gives the p-MoD twin on the same tensors, with its
routers randomised as after training.  Inputs are LLaVA-NeXT-shaped: a 35-token system prompt, the
vision tokens, then the question, passed as ``inputs_embeds`` plus ``vision_token_mask``.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any


def add_model_args(ap: argparse.ArgumentParser, hidden=512, intermediate=1376, heads=8, layers=32) -> None:
    ap.add_argument("--hidden", type=int, default=hidden)
    ap.add_argument("--intermediate", type=int, default=intermediate)
    ap.add_argument("--heads", type=int, default=heads)
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--vision-tokens", type=int, default=2880)
    ap.add_argument("--text-tokens", type=int, default=60)
    ap.add_argument("--shift", type=float, default=0.5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--attn", default="sdpa", help="attention kernel: sdpa, eager, flash_attention_2")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's). On a loaded machine use 1: small ops on 2 threads wait on each other")


def build_pair(args) -> tuple[Any, Any]:
    """(vanilla, p-MoD) LLaVA-NeXT models of the requested LM shape, sharing every weight."""
    import torch
    from transformers import LlavaNextForConditionalGeneration

    from pmod_bench import PMoDConfig
    from pmod_bench.model.modeling import to_pmod
    from pmod_bench.model.presets import preset_config, random_routers

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    cfg = preset_config("tiny")
    text = cfg.text_config.to_dict()
    text.update(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                num_attention_heads=args.heads, num_key_value_heads=args.heads, head_dim=args.hidden // args.heads,
                max_position_embeddings=8192)
    d = cfg.to_dict()
    d.pop("model_type")
    d["text_config"] = text
    torch.manual_seed(0)
    config = type(cfg)(**d)
    config._attn_implementation = args.attn
    with torch.device(args.device):
        vanilla = LlavaNextForConditionalGeneration(config)
    vanilla = vanilla.to(dtype=dtype).eval()
    pmod = to_pmod(vanilla, PMoDConfig(shift=args.shift))
    random_routers(pmod)
    return vanilla, pmod


def llava_inputs(args, batch: int = 1, seed: int = 0):
    """(inputs_embeds (B, N, d), vision_token_mask (B, N)): system prompt, image, question."""
    import torch

    g = torch.Generator().manual_seed(seed)
    V, T = args.vision_tokens, args.text_tokens
    N = V + T
    embeds = (torch.randn(batch, N, args.hidden, generator=g) * 0.02).to(device=args.device, dtype=getattr(torch, args.dtype))
    vision = torch.zeros(batch, N, dtype=torch.bool, device=args.device)
    vision[:, 35 : 35 + V] = True
    return embeds, vision


def analytic(model, args, causal: bool) -> float:
    """Prefill FLOPs of ``model`` (vanilla or p-MoD) on the benchmark's shapes, logits on the last token."""
    from pmod_bench.model.schedules import num_selected_host
    from pmod_bench.profiler.arch import arch_from_config
    from pmod_bench.profiler.flops import llm_prefill_flops

    text = arch_from_config("bench", model.config).text
    ratios = model.layer_ratios() if hasattr(model, "layer_ratios") else [1.0] * text.layers
    V, T = args.vision_tokens, args.text_tokens
    kept = [V if r >= 1.0 else num_selected_host(V, r) for r in ratios]
    routers = [i for i, r in enumerate(ratios) if r < 1.0]
    return llm_prefill_flops(text, T, V, kept, routers, logits_tokens=1).total("causal" if causal else "full")


def spread(times: list[float]) -> str:
    return f"median {statistics.median(times) * 1e3:.1f} ms (min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
