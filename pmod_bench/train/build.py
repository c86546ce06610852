"""Build the model to train: from a checkpoint or composed from an LLM + a vision tower (+ a PT connector).

Module groups (what ``train.trainable`` names), by parameter name; the prefixes are the model family's
(:mod:`pmod_bench.train.layouts`, found through the host adapter). HF LLaVA layout::

    vision     model.vision_tower.*                           CLIP encoder (frozen in the paper's recipes)
    connector  model.multi_modal_projector.*, model.image_newline   mlp2x_gelu (+ LLaVA-NeXT's row separator)
    llm        model.language_model.* (not routers), lm_head.*
    routers    model.language_model.layers.N.router.*         p-MoD routers

(Qwen2.5-VL: vision ``model.visual.*``, connector ``model.visual.merger.*``.)

Under DeepSpeed ZeRO-3 (:func:`build_partitioned`) the model is built once, unpartitioned, by the
main process (compose: the LLM and the vision tower assigned into a meta-device skeleton, which
transformers' ZeRO-3 init cannot handle), saved to ``OUTPUT_DIR/init_model``, and loaded by every
process with ``from_pretrained``, which partitions it at load (``deepspeed.zero.Init``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from pmod_bench.model.config import PMoDConfig
from pmod_bench.train.config import ConfigError, TrainConfig
from pmod_bench.train.layouts import LLAVA, TrainLayout, layout_for, restrict_tiles

log = logging.getLogger(__name__)

#: the starting model of a ZeRO-3 run, under the run directory
INIT_DIR = "init_model"
_INIT_FINGERPRINT = "pmod_init.json"



def _is_preset(name: str) -> bool:
    from pmod_bench.model.presets import PRESETS

    return name in PRESETS


def resolve_dtype(cfg: TrainConfig) -> torch.dtype:
    """Weights dtype at load (``model.dtype=auto``: the DeepSpeed precision under DeepSpeed, else float32 + autocast)."""
    name = cfg.model.dtype
    if name == "auto":
        if cfg.train.deepspeed and cfg.train.precision == "bf16":
            return torch.bfloat16
        if cfg.train.deepspeed and cfg.train.precision == "fp16":
            return torch.float16
        return torch.float32
    from pmod_bench.model.dtypes import torch_dtype

    return torch_dtype(name)


def num_llm_layers(cfg: TrainConfig) -> int:
    """Depth of the LLM the run will train (read from configs only; nothing is loaded)."""
    m = cfg.model
    src = m.source if m.source is not None else m.llm
    if m.source is not None and _is_preset(m.source):
        from pmod_bench.model.presets import preset_config

        return preset_config(m.source).text_config.num_hidden_layers
    config_json = Path(src) / "config.json"
    if config_json.is_file():  # any local layout (HF, or the original LLaVA one: LLaMA fields at the top)
        d = json.loads(config_json.read_text())
        n = (d.get("text_config") or {}).get("num_hidden_layers") or d.get("num_hidden_layers")
        if n:
            return int(n)
    from transformers import AutoConfig

    import pmod_bench

    pmod_bench.register()  # the p-MoD classes for the Auto classes

    try:
        c = AutoConfig.from_pretrained(src)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the model config of '{src}': {exc}") from None
    return (c.get_text_config() if hasattr(c, "get_text_config") else c).num_hidden_layers


# ---------------------------------------------------------------------------------------- loading
def load_source(source: str, pmod: PMoDConfig | None, dtype: torch.dtype, attn: str, seed: int = 0):
    """(model, processor) from a preset, a local checkpoint or a hub id, as a p-MoD model if ``pmod``.

    Uses :func:`pmod_bench.model.loading.load_model` where available; otherwise loads presets with
    ``build_preset`` and checkpoints with ``from_pretrained`` (a vanilla checkpoint is loaded into the
    p-MoD class directly: same weight names, routers initialised as missing weights).
    """
    try:
        from pmod_bench.model.loading import load_model
    except ImportError:
        load_model = None
    if _is_preset(source):
        from pmod_bench.model.presets import build_preset

        if not source.startswith("tiny"):
            raise ConfigError(f"preset '{source}' has no weights; train from a checkpoint (model.source=DIR) or compose (model.llm + model.vision_tower).")
        model, processor = build_preset(source, pmod=pmod, seed=seed, attn_implementation=attn)
        return model.to(dtype), processor
    if load_model is not None:
        try:
            return load_model(source, pmod=pmod, dtype=dtype, attn_implementation=attn)
        except ValueError as exc:  # ModelSourceError names the fix
            raise ConfigError(f"model.source={source!r}: {exc}") from None
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    import pmod_bench

    pmod_bench.register()
    from pmod_bench.model.modeling import pmod_config_from

    config = AutoConfig.from_pretrained(source)
    is_pmod = getattr(config, "pmod", None) is not None
    if pmod is not None and not is_pmod:
        config = pmod_config_from(config, pmod)
    config._attn_implementation = attn
    model = AutoModelForImageTextToText.from_pretrained(source, config=config, dtype=dtype, attn_implementation=attn)
    if pmod is not None and is_pmod:
        model.set_pmod_ratios(pmod, allow_untrained_routers=True)
    processor = AutoProcessor.from_pretrained(source)
    return model, processor


def compose(cfg: TrainConfig, pmod: PMoDConfig | None, dtype: torch.dtype):
    """A LLaVA(-NeXT) from an HF causal LM + a CLIP vision tower; connector (and image_newline) new.

    The LLM and the vision tower keep their pretrained tensors (loaded once, assigned into a
    meta-device skeleton); ``<image>`` is added to the tokenizer if missing (embeddings resized,
    mean-initialised); the tokenizer keeps its chat template or gets Vicuna v1's.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, CLIPVisionModel

    from pmod_bench.model.modeling import to_pmod

    m = cfg.model
    attn = m.attn_implementation
    tokenizer = _composed_tokenizer(m.llm)
    config, processor = _composed_config(m, tokenizer)
    # skeleton on the meta device; the LLM and the vision tower are assigned, the connector materialised
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    llm = AutoModelForCausalLM.from_pretrained(m.llm, dtype=dtype, attn_implementation=attn)
    vision = CLIPVisionModel.from_pretrained(m.vision_tower, dtype=dtype, attn_implementation=attn)
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    model.model.vision_tower = vision
    _init_connector(model, config.text_config.hidden_size, cfg.train.seed, dtype)
    model.generation_config = llm.generation_config
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"compose left tensors on the meta device: {leftover[:5]}")
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    model.config.pad_token_id = tokenizer.pad_token_id
    if m.projector:
        load_projector(model, m.projector)
    if pmod is not None:
        model = to_pmod(model, pmod)
    return model, processor


def _composed_tokenizer(llm: str):
    """The LLM's tokenizer with ``<image>`` added, a pad token (LLaVA v1: unk) and a chat template (Vicuna v1's if none)."""
    from transformers import AutoTokenizer

    from pmod_bench.model.presets import VICUNA_V1_TEMPLATE
    from pmod_bench.model.processors import IMAGE_TOKEN

    tokenizer = AutoTokenizer.from_pretrained(llm, use_fast=True, padding_side="right")
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:  # LLaVA v1: pad with unk
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = VICUNA_V1_TEMPLATE
    return tokenizer


def _composed_config(m, tokenizer):
    """(LlavaConfig or LlavaNextConfig, processor) of the LLM + vision tower ``m`` (``cfg.model``) names."""
    from transformers import AutoConfig, CLIPImageProcessor, LlavaConfig, LlavaNextConfig

    from pmod_bench.model.processors import IMAGE_TOKEN, clip_image_processor, llava_processor

    vis_cfg = AutoConfig.from_pretrained(m.vision_tower)
    vis_cfg = getattr(vis_cfg, "vision_config", vis_cfg)  # a full CLIP config -> its vision part
    try:
        clip_ip = CLIPImageProcessor.from_pretrained(m.vision_tower)
        mean, std = clip_ip.image_mean, clip_ip.image_std
    except OSError:  # a tower saved without its preprocessor: OpenAI CLIP's normalisation
        mean, std = None, None
    S = vis_cfg.image_size
    text_cfg = AutoConfig.from_pretrained(m.llm)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    common = dict(
        vision_config=vis_cfg.to_dict(), text_config=text_cfg.to_dict(), image_token_index=image_token_id,
        projector_hidden_act="gelu", vision_feature_select_strategy="default",
        vision_feature_layer=m.vision_feature_layer, tie_word_embeddings=bool(getattr(text_cfg, "tie_word_embeddings", False)),
    )
    common["vision_config"]["model_type"] = "clip_vision_model"
    if m.arch == "llava_next":
        pinpoints = [[r * S, c * S] for r, c in m.grid_pinpoints]
        config = LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)
        ip = clip_image_processor(S, pinpoints=pinpoints, mean=mean, std=std)
    else:
        config = LlavaConfig(**common, image_seq_length=(S // vis_cfg.patch_size) ** 2)
        ip = clip_image_processor(S, mean=mean, std=std)
    processor = llava_processor(ip, tokenizer, patch_size=vis_cfg.patch_size, chat_template=tokenizer.chat_template)
    config._attn_implementation = m.attn_implementation
    config.text_config._attn_implementation = m.attn_implementation
    return config, processor


def _init_connector(model: nn.Module, hidden: int, seed: int, dtype: torch.dtype) -> None:
    """Materialise the new connector from the meta device: nn.Linear's own init (and LLaVA-NeXT's
    image_newline), from a generator seeded with ``train.seed``."""
    g = torch.Generator().manual_seed(seed)
    proj = model.model.multi_modal_projector
    proj.to_empty(device="cpu")
    for lin in (proj.linear_1, proj.linear_2):  # nn.Linear's own init, seeded
        bound = 1 / math.sqrt(lin.in_features)
        with torch.no_grad():
            lin.weight.uniform_(-bound, bound, generator=g)  # = kaiming_uniform_(a=sqrt(5))
            lin.bias.uniform_(-bound, bound, generator=g)
    proj.to(dtype)
    if hasattr(model.model, "image_newline"):
        model.model.image_newline = nn.Parameter((torch.randn(hidden, generator=g) / math.sqrt(hidden)).to(dtype))


def _projector_tensors(path: str) -> dict:
    """Connector tensors of a file or checkpoint directory, keyed ``linear_1.weight`` ... / ``image_newline``."""
    p = Path(path)
    files: list = []
    if p.is_dir():
        for name in ("connector.safetensors", "mm_projector.bin"):
            if (p / name).is_file():
                files = [p / name]
                break
        else:
            files = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin"))
    elif p.is_file():
        files = [p]
    if not files:
        raise ConfigError(f"model.projector '{path}': no connector weights found (expected connector.safetensors, "
                          "mm_projector.bin, or a checkpoint directory with *.safetensors).")
    raw: dict = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    if "projector" in k or k.endswith("image_newline"):
                        raw[k] = sf.get_tensor(k)
        else:
            state = torch.load(str(f), map_location="cpu", weights_only=True)
            raw.update({k: v for k, v in state.items() if "projector" in k or k.endswith("image_newline")})
    out = {}
    for k, v in raw.items():
        if k.endswith("image_newline"):
            out["image_newline"] = v
            continue
        leaf = k.rsplit(".", 2)[-2:]  # [index or linear_n, weight|bias]
        name = {"0": "linear_1", "2": "linear_2"}.get(leaf[0], leaf[0])
        out[f"{name}.{leaf[1]}"] = v
    return out


def load_projector(model: nn.Module, path: str) -> None:
    """Load a pretrained connector (LLaVA ``mm_projector.bin`` or HF names) into ``model``."""
    tensors = _projector_tensors(path)
    newline = tensors.pop("image_newline", None)
    proj = model.model.multi_modal_projector
    try:
        proj.load_state_dict({k: v.to(proj.linear_1.weight.dtype) for k, v in tensors.items()}, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"model.projector '{path}' does not fit this model's connector: {exc}") from None
    if newline is not None and hasattr(model.model, "image_newline"):
        with torch.no_grad():
            model.model.image_newline.copy_(newline.to(model.model.image_newline.dtype))


def build_model(cfg: TrainConfig, pmod: PMoDConfig | None = None, dtype: torch.dtype | None = None):
    """(model, processor) for a run; ``pmod`` is the run's resolved p-MoD config (or None: baseline)."""
    from pmod_bench import register

    register()  # p-MoD classes known to transformers' Auto classes (idempotent)
    dtype = dtype or resolve_dtype(cfg)
    if cfg.model.composed:
        model, processor = compose(cfg, pmod, dtype)
    else:
        model, processor = load_source(cfg.model.source, pmod, dtype, cfg.model.attn_implementation, seed=cfg.train.seed)
    if cfg.model.projector and not cfg.model.composed:
        load_projector(model, cfg.model.projector)
    if cfg.data.max_tiles is not None:  # OneVision's resolution cap, in the processor and the config alike
        restrict_tiles(model, processor, cfg.data.max_tiles)
    return model, processor


def _init_fingerprint(cfg: TrainConfig, pmod: PMoDConfig | None, dtype: torch.dtype) -> dict:
    return {"model": dataclasses.asdict(cfg.model), "pmod": None if pmod is None else pmod.to_dict(),
            "seed": cfg.train.seed, "dtype": str(dtype)}


def _deepspeed_comm(world_size: int) -> None:
    """deepspeed.comm on the process group accelerate opened (on CPU accelerate opens a plain gloo group and
    leaves deepspeed.comm alone; ``zero.Init`` would then see one process and reject the batch sizes)."""
    import deepspeed
    import torch.distributed as dist

    if world_size > 1 and not deepspeed.comm.is_initialized():
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ZeRO-3 with several processes, but no torch.distributed process group is open")
        deepspeed.init_distributed(dist_backend=dist.get_backend())
    if world_size > 1 and deepspeed.comm.get_world_size() != world_size:
        raise RuntimeError(f"deepspeed.comm sees {deepspeed.comm.get_world_size()} processes, the run has {world_size}")


def build_partitioned(cfg: TrainConfig, pmod: PMoDConfig | None, init_dir: Path, args):
    """(model, processor) for a DeepSpeed ZeRO-3 run: every parameter partitioned over the processes.

    The main process builds the model with :func:`build_model` with ZeRO-3 switched off (a plain CPU
    model: composing, p-MoD conversion and a PT connector all work as without DeepSpeed) and saves it to
    ``init_dir`` (reused when the settings are the same, e.g. on resume); the other processes wait. Then
    every process loads it with ``from_pretrained`` under transformers' ZeRO-3 integration, which
    partitions each tensor as it is loaded. Checked: nothing missing or unexpected, every parameter a
    DeepSpeed ZeRO parameter. Needs ``init_dir`` on a file system all processes share (as checkpoints do).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.integrations.deepspeed import (
        is_deepspeed_zero3_enabled,
        set_hf_deepspeed_config,
        unset_hf_deepspeed_config,
    )

    from pmod_bench import register
    from pmod_bench.atomic import atomic_write_json

    register()  # the Auto classes must know the p-MoD model types to load init_dir (idempotent)

    ds_config = getattr(args, "hf_deepspeed_config", None)
    if ds_config is None or not is_deepspeed_zero3_enabled():
        raise RuntimeError("build_partitioned needs the TrainingArguments of a ZeRO-3 run (train.deepspeed=zero3), created first")
    dtype = resolve_dtype(cfg)
    init_dir = Path(init_dir)
    fingerprint = _init_fingerprint(cfg, pmod, dtype)

    def ready() -> bool:
        try:
            return json.loads((init_dir / _INIT_FINGERPRINT).read_text()) == fingerprint
        except (OSError, ValueError):
            return False

    with args.main_process_first(local=False, desc="building the starting model (ZeRO-3)"):
        if args.process_index == 0 and not ready():
            unset_hf_deepspeed_config()  # transformers' ZeRO-3 init off: build one ordinary model
            try:
                if is_deepspeed_zero3_enabled():
                    raise RuntimeError("could not switch transformers' ZeRO-3 integration off to build the model")
                model, processor = build_model(cfg, pmod, dtype)
                tmp = init_dir.with_name(init_dir.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                model.save_pretrained(str(tmp))
                processor.save_pretrained(str(tmp))
                atomic_write_json(tmp / _INIT_FINGERPRINT, fingerprint)
                del model
                shutil.rmtree(init_dir, ignore_errors=True)
                os.replace(tmp, init_dir)
            finally:
                set_hf_deepspeed_config(ds_config)
            if not is_deepspeed_zero3_enabled():
                raise RuntimeError("transformers' ZeRO-3 integration did not come back on after building the model")
    if not ready():
        raise RuntimeError(f"{init_dir} was not written by the main process (see its error above)")
    _deepspeed_comm(args.world_size)
    model, info = AutoModelForImageTextToText.from_pretrained(
        str(init_dir), dtype=dtype, attn_implementation=cfg.model.attn_implementation, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise RuntimeError(f"ZeRO-3: loading the starting model from {init_dir} did not map every tensor: {bad}")
    plain = [n for n, p in model.named_parameters() if not hasattr(p, "ds_id")]
    if plain:
        raise RuntimeError(f"ZeRO-3: from_pretrained left parameters unpartitioned ({plain[:3]}); transformers' "
                           "DeepSpeed integration changed: please report this")
    if pmod is not None and getattr(model.config, "pmod", None) is None:
        raise RuntimeError(f"ZeRO-3: {init_dir} loaded as a vanilla model, but the run has p-MoD settings")
    processor = AutoProcessor.from_pretrained(str(init_dir))
    return model, processor


# ----------------------------------------------------------------------------------------- freezing
def numel(p: torch.Tensor) -> int:
    """Elements of a parameter, also when DeepSpeed ZeRO-3 holds only a partition of it (``ds_numel``)."""
    return int(getattr(p, "ds_numel", p.numel()))


def param_group(name: str, layout: TrainLayout = LLAVA) -> str:
    """The module group of a parameter name in ``layout`` (vision, connector, llm, routers, or other)."""
    return layout.param_group(name)


def apply_trainable(model: nn.Module, groups: list) -> dict:
    """Set requires_grad by group (the groups of the model's family); returns {group: {"params": n, "trainable": bool}}."""
    layout = layout_for(model)
    summary: dict = {}
    for name, p in model.named_parameters():
        g = layout.param_group(name)
        p.requires_grad_(g in groups)
        s = summary.setdefault(g, {"params": 0, "trainable": g in groups})
        s["params"] += numel(p)
    unknown = [g for g in groups if g not in summary]
    if "other" in summary:
        others = [n for n, _ in model.named_parameters() if layout.param_group(n) == "other"][:5]
        raise RuntimeError(f"parameters outside the known module groups: {others}; the model is not an HF "
                           f"{layout.title} layout")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"train.trainable={groups} selects no parameter of this model (groups present: {sorted(summary)}).")
    for g in unknown:
        log.warning("train.trainable names '%s' but the model has no such parameters (e.g. routers of a baseline)", g)
    return summary


__all__ = [
    "INIT_DIR",
    "apply_trainable",
    "build_model",
    "build_partitioned",
    "compose",
    "load_projector",
    "load_source",
    "num_llm_layers",
    "numel",
    "param_group",
    "resolve_dtype",
]
