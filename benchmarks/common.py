"""Shared pieces of the benchmarks: a LLaVA-NeXT- (or Qwen2.5-VL-) shaped model of any size, its input,
and the analytic FLOPs of the same shapes from the profiler (one formula: ``pmod_bench.profiler.flops``).

The model is the tiny preset (CLIP 32 px tiles, Vicuna template) with its language model resized to
the requested shape, random weights; ``to_pmod`` gives the p-MoD twin on the same tensors, with its
routers randomised as after training.  Inputs are LLaVA-NeXT-shaped: a 35-token system prompt, the
vision tokens, then the question, passed as ``inputs_embeds`` plus ``vision_token_mask``. With
``--host qwen2.5-vl`` (where a benchmark offers it) the language model is Qwen2.5-VL's (Qwen2 layers with
biased q/k/v, M-RoPE sections in Qwen's 16:24:24 proportion) behind a tiny Qwen vision tower, and the
input carries M-RoPE position ids: the vision tokens laid out as a merged patch grid.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any


#: --host choices -> the host adapter's model_type
HOSTS = {"llava-next": "llava_next", "qwen2.5-vl": "qwen2_5_vl"}


def add_model_args(ap: argparse.ArgumentParser, hidden=512, intermediate=1376, heads=8, layers=32,
                   hosts=("llava-next",)) -> None:
    ap.add_argument("--host", choices=hosts, default=hosts[0], help="the model family (default: %(default)s)")
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


def qwen_config(args):
    """A Qwen2.5-VL config: the requested LM shape (Qwen2 layers, M-RoPE sections 16:24:24 of half the head), a tiny
    vision tower (unused: the benchmarks pass inputs_embeds)."""
    from transformers import Qwen2_5_VLConfig

    half = args.hidden // args.heads // 2
    t = half * 16 // 64
    section = [t, (half - t) // 2, half - t - (half - t) // 2]
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=512, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section},
                         bos_token_id=None, eos_token_id=None),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
                           out_hidden_size=args.hidden, fullatt_block_indexes=[1]),
        image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503)


def build_pair(args) -> tuple[Any, Any]:
    """(vanilla, p-MoD) models of ``args.host`` and the requested LM shape, sharing every weight."""
    import torch
    from transformers import AutoModelForImageTextToText, LlavaNextForConditionalGeneration

    from pmod_bench import PMoDConfig
    from pmod_bench.model.modeling import to_pmod
    from pmod_bench.model.presets import preset_config, random_routers

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if HOSTS[args.host] == "qwen2_5_vl":
        config = qwen_config(args)
        config._attn_implementation = args.attn
        torch.manual_seed(0)
        with torch.device(args.device):
            vanilla = AutoModelForImageTextToText.from_config(config)
        vanilla = vanilla.to(dtype=dtype).eval()
        pmod = to_pmod(vanilla, PMoDConfig(shift=args.shift))
        random_routers(pmod)
        return vanilla, pmod
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


def mrope_positions(args, batch: int = 1):
    """(3, B, N) M-RoPE position ids of :func:`llava_inputs`' layout on Qwen2.5-VL (as ``get_rope_index`` lays them
    out): 35 text tokens, the V vision tokens as a merged patch grid of ``rows x cols`` (rows the largest divisor of V
    up to sqrt(V)), then the text, continuing after the grid's largest side."""
    import math

    import torch

    V, T = args.vision_tokens, args.text_tokens
    rows = max(d for d in range(1, math.isqrt(V) + 1) if V % d == 0)
    cols = V // rows
    pre = torch.arange(35).expand(3, -1)
    grid = torch.stack([torch.full((V,), 35), 35 + torch.arange(V) // cols, 35 + torch.arange(V) % cols])
    post = torch.arange(T - 35).expand(3, -1) + 35 + max(rows, cols)
    return torch.cat([pre, grid, post], 1)[:, None].expand(3, batch, -1).to(args.device)


def analytic(model, args, causal: bool) -> float:
    """Prefill FLOPs of ``model`` (vanilla or p-MoD) on the benchmark's shapes, logits on the last token."""
    from pmod_bench.model.routed import PMoDModelMixin
    from pmod_bench.model.schedules import num_selected_host
    from pmod_bench.profiler.flops import llm_prefill_flops

    text = text_dims(model.config)
    ratios = model.layer_ratios() if isinstance(model, PMoDModelMixin) else [1.0] * text.layers
    V, T = args.vision_tokens, args.text_tokens
    kept = [V if r >= 1.0 else num_selected_host(V, r) for r in ratios]
    routers = [i for i, r in enumerate(ratios) if r < 1.0]
    return llm_prefill_flops(text, T, V, kept, routers, logits_tokens=1).total("causal" if causal else "full")


def text_dims(config):
    """The profiler's :class:`~pmod_bench.profiler.arch.TextDims` of any host's config (its LLM's shapes)."""
    from pmod_bench.profiler.arch import TextDims

    tc = config.text_config
    heads = tc.num_attention_heads
    return TextDims(layers=tc.num_hidden_layers, hidden=tc.hidden_size, intermediate=tc.intermediate_size, heads=heads,
                    kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
                    head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads, vocab=tc.vocab_size)


def spread(times: list[float]) -> str:
    return f"median {statistics.median(times) * 1e3:.1f} ms (min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
