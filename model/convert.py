"""Convert checkpoints of the original LLaVA / p-MoD repositories into this project's HF format.

The released models (MCG-NJU/p-MoD-LLaVA-NeXT-7B, MCG-NJU/p-MoD-LLaVA-v1.5-7B, liuhaotian/llava-v1.5-7b,
liuhaotian/llava-v1.6-vicuna-7b) are saved by the original code: one Llama causal LM config with
``mm_*`` / ``mod_*`` fields, and a flat state dict. This module maps them onto
``PMoDLlava[Next]ForConditionalGeneration`` (p-MoD) or HF ``Llava[Next]ForConditionalGeneration``
(baselines), which ``AutoModelForImageTextToText`` / ``AutoProcessor`` load after ``import pmod_bench``.

Weight names (original -> HF)::

    model.embed_tokens.*                          -> model.language_model.embed_tokens.*
    model.layers.N.decoder_layer.*   (p-MoD layer) -> model.language_model.layers.N.*
    model.layers.N.router.router.{weight,bias}    -> model.language_model.layers.N.router.{weight,bias}
    model.layers.N.*                 (ordinary)   -> model.language_model.layers.N.*
    model.norm.weight                             -> model.language_model.norm.weight
    lm_head.weight                                -> lm_head.weight
    model.mm_projector.{0,2}.*       (mlp2x_gelu) -> model.multi_modal_projector.linear_{1,2}.*
    model.image_newline              (NeXT)       -> model.image_newline
    model.vision_tower.vision_tower.vision_model.* -> model.vision_tower.*   (else loaded from mm_vision_tower)

Config (original -> HF): ``mm_vision_select_layer`` -> ``vision_feature_layer``; ``mm_vision_select_feature``
``patch`` / ``cls_patch`` -> ``vision_feature_select_strategy`` ``default`` / ``full``;
``image_aspect_ratio`` ``anyres`` + ``mm_patch_merge_type`` ``spatial_unpad`` -> LLaVA-NeXT, ``pad`` / ``square`` +
``flat`` -> LLaVA-1.5; ``image_grid_pinpoints`` are (width, height) pairs in the original code and
(height, width) in HF, so each pair is swapped (list order kept: ties in the best-resolution search
resolve the same way); ``mod_*`` -> :class:`~pmod_bench.PMoDConfig` via ``PMoDConfig.from_reference``.

Numerics that are kept on purpose:

* The original has no ``<image>`` token in its vocabulary (it splices features at a -200 marker); HF
  LLaVA needs one. If the tokenizer lacks it, ``<image>`` is appended (id = old vocab size), the
  embedding and ``lm_head`` get one zero row each (the embedding row is always overwritten by image
  features), and ``generation_config.suppress_tokens`` keeps it from ever being generated. Logits of
  the original vocabulary are unchanged; a log-softmax over the full vocabulary gains one exp(0) term.
* The reference computes its layer schedule with a hard-coded ``L - 1 = 31``
  (``cos(i * pi / 31)``). For 32-layer models that is the paper's schedule; for other depths the
  converter writes the reference's ratios explicitly, so the converted model routes exactly as the
  original did.
* ``max_num_sub_images`` (4 for p-MoD-LLaVA-NeXT) is not stored in config.json: the reference turned
  it into ``image_grid_pinpoints`` at training time ((1,2),(2,1),(2,2),(3,1),(1,3) tiles, i.e. at most 4
  sub-images + the base image = 5 x 576 = 2880 CLIP features before unpadding), and those pinpoints
  are saved; HF's LLaVA-NeXT processor selects among them with the same rule.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from pmod_bench.atomic import apply_default_modes

from .config import REFERENCE_LAYOUTS, PMoDConfig, parse_reference_decay
from .processors import IMAGE_TOKEN, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_image_processor, llava_processor

CONVERTER_VERSION = 1
#: written last into every converted directory: provenance, and "this conversion is complete"
CONVERTED_MARKER = "pmod_bench_conversion.json"
ORIGINAL_ARCHITECTURES = ("LlavaLlamaForCausalLM", "PmodLlavaLlamaForCausalLM")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."

#: vision towers whose architecture is known without their config (used when SRC holds the tower's
#: weights but mm_vision_tower names a hub id that is not available locally)
KNOWN_VISION_TOWERS = {
    "openai/clip-vit-large-patch14-336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
    "openai/clip-vit-large-patch14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                          num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768),
}

#: Llama fields copied from the original config.json into text_config
LLAMA_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "rope_theta", "rope_scaling", "attention_bias", "attention_dropout", "mlp_bias", "head_dim",
    "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "pretraining_tp",
)
REQUIRED_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                   "mm_vision_tower", "mm_projector_type")
#: the reference's decay functions (pmod_llava_llama.py): note the hard-coded 31 (= L - 1 for 32 layers)
REFERENCE_DECAYS = {
    "shiftedcos": lambda factor, i: math.cos(i * math.pi / 31) / 2 + factor,
    "shiftedlinear": lambda factor, i: (-i / 31 + 0.5) + factor,
}


class ConversionError(ValueError):
    """An original-layout checkpoint that cannot be converted; the message names the keys and the fix."""


def is_original_layout(cfg: dict) -> bool:
    """True for a config.json written by the original LLaVA / p-MoD code (not HF's LLaVA classes).

    Note: several official LLaVA checkpoints say ``model_type: "llava"`` (HF's name) although they are
    in the original layout, so the ``mm_*`` fields decide, not the model type.
    """
    if "text_config" in cfg or "vision_config" in cfg:
        return False
    if any(k in cfg for k in ("mm_vision_tower", "mm_projector_type", "mm_hidden_size")):
        return True
    return cfg.get("model_type") in ("llava_llama", "pmod_llava_llama") or any(
        a in ORIGINAL_ARCHITECTURES for a in cfg.get("architectures") or []
    )


# ---------------------------------------------------------------------------------- p-MoD config
def reference_layer_ratios(cfg: dict, num_layers: int) -> list[float]:
    """Per-layer ratios exactly as the reference's ``build_mod_layers`` computes them (1.0 = no router)."""
    spec = cfg["mod_target_layers"]
    factor = float(cfg.get("mod_router_factor", 0.5))
    parsed = parse_reference_decay(spec)
    if parsed:
        name, hi, lo = parsed
        decay = REFERENCE_DECAYS.get(name)
        if decay is None:
            raise ConversionError(
                f"mod_target_layers '{spec}': unknown decay '{name}'. The reference defines "
                f"{', '.join(REFERENCE_DECAYS)}."
            )
        return [max(decay(factor, i), lo) if decay(factor, i) <= hi else 1.0 for i in range(num_layers)]
    if spec not in REFERENCE_LAYOUTS:
        raise ConversionError(
            f"unsupported mod_target_layers '{spec}'; the reference supports SCHEDULE_decay_MAX_MIN "
            f"(SCHEDULE in {', '.join(REFERENCE_DECAYS)}), {', '.join(REFERENCE_LAYOUTS)}."
        )
    idx = set(REFERENCE_LAYOUTS[spec](num_layers))
    return [factor if i in idx else 1.0 for i in range(num_layers)]


def pmod_config_from_original(cfg: dict, num_layers: int) -> tuple[PMoDConfig, list[str]]:
    """The :class:`PMoDConfig` of an original p-MoD config.json (plus notes on what was adjusted)."""
    notes = []
    target = cfg.get("mod_target_token_type", "vision_all")
    if target != "vision_all":
        raise ConversionError(
            f"mod_target_token_type '{target}' is not supported: p-MoD here routes every vision token "
            "including LLaVA-NeXT's newline features (the reference's 'vision_all', used by the released models)."
        )
    try:
        pmod = PMoDConfig.from_reference(
            cfg["mod_target_layers"], float(cfg.get("mod_router_factor", 0.5)), cfg.get("mod_weight_norm") or "none",
            mod_bias_enabled=bool(cfg.get("mod_bias_enabled", False)), mod_special_init=bool(cfg.get("mod_special_init", False)),
            num_layers=num_layers, mod_target_layer_indices=cfg.get("mod_target_layer_indices"),
        )
    except ValueError as exc:
        raise ConversionError(f"cannot read the p-MoD fields of config.json: {exc}") from exc
    ref = reference_layer_ratios(cfg, num_layers)
    if pmod.layer_ratios(num_layers) != ref:
        notes.append(
            f"the reference's schedule uses cos(i*pi/31) (built for 32 layers); this model has {num_layers} layers, "
            "so its ratios are stored explicitly as the reference computed them"
        )
        pmod = pmod.replace(ratios=ref)
    return pmod, notes


# ----------------------------------------------------------------------------------- weights I/O
def weight_files(src: Path) -> list[Path]:
    """The weight files of a checkpoint directory (safetensors preferred over .bin; index honoured)."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = src / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [n for n in names if not (src / n).is_file()]
            if missing:
                raise ConversionError(f"{index} lists shards that are missing: {missing}. Re-download them.")
            return [src / n for n in names]
        if (src / single).is_file():
            return [src / single]
    found = sorted(p.name for p in src.glob("*.safetensors")) or sorted(p.name for p in src.glob("pytorch_model*.bin"))
    if found:
        return [src / n for n in found]
    raise ConversionError(
        f"no weights in {src}: expected model.safetensors(.index.json) or pytorch_model(-0000N-of-0000M).bin(.index.json)."
    )


def read_state_dict(files: list[Path], progress: bool = True) -> dict:
    import torch
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    sd: dict = {}
    bar = tqdm(files, desc="Reading shards", unit="shard", disable=not progress or len(files) < 2)
    from safetensors import SafetensorError

    for f in bar:
        try:
            if f.suffix == ".safetensors":
                part = load_file(str(f))
            else:
                part = torch.load(str(f), map_location="cpu", weights_only=True)
        except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as exc:  # a download cut short
            raise ConversionError(
                f"{f} is truncated or corrupt ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); re-download "
                "or re-copy the checkpoint (`hf download ORG/NAME --local-dir DIR`)."
            ) from None
        dup = set(sd) & set(part)
        if dup:
            raise ConversionError(f"tensor(s) {sorted(dup)[:5]} appear in more than one shard of {f.parent}.")
        sd.update(part)
    return sd


_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass
class MappedWeights:
    state_dict: dict = field(default_factory=dict)
    routers: set = field(default_factory=set)  # layers with model.layers.N.router.router.*
    wrapped: set = field(default_factory=set)  # layers saved as model.layers.N.decoder_layer.*
    plain: set = field(default_factory=set)  # layers saved as model.layers.N.<module>.*
    vision: dict = field(default_factory=dict)  # CLIP vision tower weights, keys relative to the tower
    dropped: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)


def map_original_keys(sd: dict) -> MappedWeights:
    """Rename an original-layout state dict to HF names (vision tower weights kept apart)."""
    out = MappedWeights()
    for key, t in sd.items():
        if key.endswith(("rotary_emb.inv_freq", "embeddings.position_ids")):  # buffers saved by old transformers versions
            out.dropped.append(key)
            continue
        if key.startswith(VISION_PREFIX):
            out.vision[key[len(VISION_PREFIX):]] = t
            continue
        m = _LAYER_KEY.match(key)
        if m:
            idx, rest = int(m.group(1)), m.group(2)
            if rest.startswith("decoder_layer."):
                out.wrapped.add(idx)
                new = f"model.language_model.layers.{idx}.{rest[len('decoder_layer.'):]}"
            elif rest in ("router.router.weight", "router.router.bias"):
                out.routers.add(idx)
                new = f"model.language_model.layers.{idx}.router.{rest.rsplit('.', 1)[1]}"
            elif rest.split(".")[0] in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"):
                out.plain.add(idx)
                new = f"model.language_model.{key[len('model.'):]}"
            else:
                out.unexpected.append(key)
                continue
        elif key in ("model.embed_tokens.weight", "model.norm.weight"):
            new = "model.language_model." + key[len("model."):]
        elif key == "lm_head.weight":
            new = key
        elif key.startswith("model.mm_projector."):
            m2 = re.fullmatch(r"model\.mm_projector\.(\d+)\.(weight|bias)", key)
            if not m2 or m2.group(1) not in ("0", "2"):
                out.unexpected.append(key)
                continue
            new = f"model.multi_modal_projector.linear_{1 if m2.group(1) == '0' else 2}.{m2.group(2)}"
        elif key == "model.image_newline":
            new = key
        else:
            out.unexpected.append(key)
            continue
        out.state_dict[new] = t
    return out


# ---------------------------------------------------------------------------------- vision tower
@dataclass
class VisionTower:
    config: Any  # CLIPVisionConfig
    state_dict: Optional[dict]  # None: weights come from SRC
    image_mean: list
    image_std: list
    image_size: int
    source: str


def _infer_clip_config(vision_sd: dict, name: str) -> dict:
    known = KNOWN_VISION_TOWERS.get(name)
    if known:
        return dict(known)
    try:
        pe = vision_sd["embeddings.patch_embedding.weight"]
        hidden, patch = pe.shape[0], pe.shape[-1]
        positions = vision_sd["embeddings.position_embedding.weight"].shape[0]
        layers = 1 + max(int(k.split(".")[2]) for k in vision_sd if k.startswith("encoder.layers."))
        inter = vision_sd["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError) as exc:
        raise ConversionError(f"the saved vision tower under {VISION_PREFIX}* is incomplete (missing {exc}).") from exc
    warnings.warn(
        f"vision tower '{name}' is not available locally; its config was inferred from the saved weights "
        f"(head count = hidden/64 = {hidden // 64}, as in OpenAI CLIP). Pass vision_tower=/path/to/clip to be exact.",
        stacklevel=3,
    )
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
                image_size=int(round(math.sqrt(positions - 1))) * patch, patch_size=patch)


def resolve_vision_tower(name: str, saved: dict, override: Optional[str] = None, cache_dir=None) -> VisionTower:
    """Config, weights (if not saved in SRC) and image statistics of the CLIP tower named ``mm_vision_tower``."""
    from transformers import CLIPVisionConfig

    where = override or name
    local: Optional[Path] = None
    if where and Path(where).expanduser().is_dir():
        local = Path(where).expanduser()
    elif where:
        from .sources import ModelSourceError, looks_like_hub_id, resolve_hub_id

        if looks_like_hub_id(where):
            try:
                local = resolve_hub_id(where, cache_dir=cache_dir)
            except ModelSourceError as exc:
                if not saved:
                    raise ConversionError(
                        f"the checkpoint does not contain the vision tower ({VISION_PREFIX}* keys) and "
                        f"mm_vision_tower '{where}' is not available locally ({exc}). Pass the CLIP model's local "
                        "directory: `pmod-bench convert SRC DST --vision-tower /path/to/clip-vit-large-patch14-336`."
                    ) from exc
    if local is None:
        if not saved:
            raise ConversionError(
                f"the checkpoint does not contain the vision tower ({VISION_PREFIX}* keys) and mm_vision_tower "
                f"'{where}' is no directory. Pass --vision-tower /path/to/clip (a CLIPVisionModel or CLIPModel directory)."
            )
        cfg = CLIPVisionConfig(**_infer_clip_config(saved, name))
        return VisionTower(cfg, None, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, cfg.image_size, f"{name} (config inferred)")

    cfg = CLIPVisionConfig.from_pretrained(str(local))
    mean, std, size = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, cfg.image_size
    if (local / "preprocessor_config.json").is_file():
        pp = json.loads((local / "preprocessor_config.json").read_text())
        mean, std = pp.get("image_mean", mean), pp.get("image_std", std)
        crop = pp.get("crop_size")
        size = crop.get("height", size) if isinstance(crop, dict) else (crop or size)
    weights = None
    if not saved:
        from transformers import CLIPVisionModel

        weights = CLIPVisionModel.from_pretrained(str(local)).state_dict()
        weights = {k[len("vision_model."):] if k.startswith("vision_model.") else k: v for k, v in weights.items()}
    return VisionTower(cfg, weights, list(mean), list(std), int(size), str(local))


# ------------------------------------------------------------------------------------- tokenizer
def load_original_tokenizer(src: Path, model_max_length: Optional[int] = None):
    """The checkpoint's tokenizer (sentencepiece ``tokenizer.model`` or ``tokenizer.json``) with ``<image>``."""
    from transformers import AutoTokenizer

    if not any((src / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        raise ConversionError(
            f"no tokenizer in {src}: expected tokenizer.model (sentencepiece) + tokenizer_config.json, or tokenizer.json. "
            "Copy the tokenizer files of the base LLM (e.g. lmsys/vicuna-7b-v1.5) next to config.json."
        )
    try:
        # from a copy of just the tokenizer files: AutoTokenizer would otherwise parse the original config.json
        # as an HF config (model_type "llava" there is not HF's LLaVA) and warn about it
        with tempfile.TemporaryDirectory() as tmp:
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copy(src / name, Path(tmp) / name)
            tok = AutoTokenizer.from_pretrained(tmp)
    except Exception as exc:
        if not (src / "tokenizer.model").is_file():
            raise ConversionError(f"could not load the tokenizer of {src} ({type(exc).__name__}: {exc}).") from exc
        # transformers reads tokenizer.model through protobuf; when that fails (e.g. a protobuf runtime older
        # than sentencepiece's generated code) read the same vocabulary with the sentencepiece library
        tok = _llama_tokenizer_from_sentencepiece(src, exc)
    _match_original_chunking(tok)
    added = []
    if IMAGE_TOKEN not in tok.get_vocab():
        from tokenizers import AddedToken

        tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
        added.append(IMAGE_TOKEN)
    if tok.pad_token is None:  # LLaVA pads with <unk> (train.py: tokenizer.pad_token = tokenizer.unk_token)
        tok.pad_token = tok.unk_token
    tok.padding_side = "left"  # batched generation; the original trained with right padding
    tok.init_kwargs["padding_side"] = "left"
    if model_max_length:
        tok.model_max_length = int(model_max_length)
        tok.init_kwargs["model_max_length"] = int(model_max_length)
    return tok, added


def _match_original_chunking(tok) -> None:
    """Tokenize the text after ``<image>`` as the original does.

    The original splits the prompt at ``<image>`` and encodes each chunk with sentencepiece, so every
    chunk gets sentencepiece's dummy prefix "▁" (the familiar ``-200, 29871, 13`` after the image).
    A Metaspace pre-tokenizer with ``prepend_scheme="always"`` does the same around special tokens
    (HF's non-legacy default, "first", would drop that "▁").
    """
    backend = getattr(tok, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    if pre is None or type(pre).__name__ != "Metaspace":
        return
    from tokenizers import pre_tokenizers

    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=pre.replacement, prepend_scheme="always", split=pre.split)
    # LlamaTokenizer rebuilds its pre-tokenizer from `legacy` when reloaded: legacy=True means "always"
    tok.legacy = True
    if hasattr(tok, "init_kwargs"):
        tok.init_kwargs["legacy"] = True


def _llama_tokenizer_from_sentencepiece(src: Path, cause: Exception):
    """A (fast) ``LlamaTokenizer`` built from ``tokenizer.model`` with the sentencepiece library only.

    The same construction as transformers' own sentencepiece extraction for BPE models: the vocabulary
    in id order, merges generated from it, control pieces (<unk>, <s>, </s>) special.
    """
    try:
        import sentencepiece as spm
    except ImportError as exc:
        raise ConversionError(
            f"could not load {src / 'tokenizer.model'} ({type(cause).__name__}: {cause}) and the sentencepiece "
            "package is not installed: `pip install sentencepiece protobuf`."
        ) from exc
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    if sp.id_to_piece(0) is None or not sp.get_piece_size():
        raise ConversionError(f"{src / 'tokenizer.model'} holds no vocabulary.")
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    special = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
    cfg_path = src / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    names = {}
    for key, default in (("unk_token", sp.unk_id()), ("bos_token", sp.bos_id()), ("eos_token", sp.eos_id())):
        value = tcfg.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        names[key] = value or (sp.id_to_piece(default) if default >= 0 else None)
    warnings.warn(
        f"transformers could not read {src / 'tokenizer.model'} ({type(cause).__name__}); built the Llama tokenizer "
        "from it with the sentencepiece library instead.",
        stacklevel=3,
    )
    return LlamaTokenizer(
        vocab=vocab, merges=generate_merges(vocab, skip_tokens=set(special)), legacy=bool(tcfg.get("legacy", False)),
        add_prefix_space=tcfg.get("add_prefix_space"), model_max_length=tcfg.get("model_max_length", 4096),
        add_bos_token=tcfg.get("add_bos_token", True), add_eos_token=tcfg.get("add_eos_token", False), **names,
    )


# ------------------------------------------------------------------------------------- converter
@dataclass
class ConversionPlan:
    """What a conversion will write (also written into the marker file as provenance)."""

    kind: str  # pmod_llava_next | pmod_llava | llava_next | llava
    hf_config: Any
    pmod: Optional[PMoDConfig]
    notes: list


def _image_processor(kind: str, cfg: dict, vt: VisionTower):
    s = vt.image_size
    pinpoints = _hf_pinpoints(cfg, s) if kind.endswith("next") else None
    # image_aspect_ratio "pad": expand to a square filled with the mean colour first (LLaVA-1.5)
    return clip_image_processor(s, pinpoints=pinpoints, pad=cfg.get("image_aspect_ratio", "square") == "pad",
                                mean=vt.image_mean, std=vt.image_std)


def _hf_pinpoints(cfg: dict, tile: int) -> list[list[int]]:
    pins = cfg.get("image_grid_pinpoints")
    if isinstance(pins, str):
        import ast

        pins = ast.literal_eval(pins)
    if not pins:
        raise ConversionError("image_aspect_ratio 'anyres' needs image_grid_pinpoints in config.json; none found.")
    bad = [p for p in pins if len(p) != 2 or p[0] % tile or p[1] % tile]
    if bad:
        raise ConversionError(f"image_grid_pinpoints {bad} are not multiples of the vision tower's {tile} px tile.")
    return [[int(h), int(w)] for w, h in pins]  # original (width, height) -> HF (height, width)


def plan_conversion(cfg: dict, vt: VisionTower, mapped: MappedWeights, vocab_size: int, image_token_id: int, pad_token_id) -> ConversionPlan:
    """Check the original config + weights for consistency and build the HF config."""
    select, next_shape = _check_supported(cfg, vt)
    L = int(cfg["num_hidden_layers"])
    text = _text_config(cfg, vocab_size, pad_token_id)
    pmod, notes = _checked_pmod(cfg, mapped, L)
    kind, hf = _hf_config(cfg, vt, mapped, text, image_token_id, select, next_shape, pmod)
    return ConversionPlan(kind, hf, pmod, notes)


def _check_supported(cfg: dict, vt: VisionTower) -> tuple[str, bool]:
    """(mm_vision_select_feature, whether the checkpoint is LLaVA-NeXT-shaped) once the config's features have HF equivalents."""
    missing = [k for k in REQUIRED_FIELDS if k not in cfg]
    if missing:
        raise ConversionError(f"config.json lacks {missing}, which the original LLaVA layout always has; is this the right directory?")
    if cfg.get("mm_projector_type") != "mlp2x_gelu":
        raise ConversionError(
            f"mm_projector_type '{cfg.get('mm_projector_type')}' is not supported: HF LLaVA's projector is the "
            "2-layer MLP 'mlp2x_gelu' (LLaVA-1.5 / LLaVA-NeXT)."
        )
    if cfg.get("mm_use_im_start_end"):
        raise ConversionError("mm_use_im_start_end=True (image start/end tokens) is not supported by HF LLaVA.")
    if cfg.get("mm_hidden_size") not in (None, vt.config.hidden_size):
        raise ConversionError(
            f"mm_hidden_size {cfg['mm_hidden_size']} does not match the vision tower's hidden size {vt.config.hidden_size} "
            f"({vt.source}); pass the right --vision-tower."
        )
    select = cfg.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ConversionError(f"mm_vision_select_feature '{select}' is not supported (patch or cls_patch).")
    aspect = cfg.get("image_aspect_ratio", "square")
    merge = cfg.get("mm_patch_merge_type", "flat")
    if aspect == "anyres" and merge == "spatial_unpad":
        next_shape = True
    elif aspect in ("pad", "square") and merge == "flat":
        next_shape = False
    else:
        raise ConversionError(
            f"image_aspect_ratio '{aspect}' with mm_patch_merge_type '{merge}' has no HF equivalent. Supported: "
            "anyres + spatial_unpad (LLaVA-NeXT), pad or square + flat (LLaVA-1.5)."
        )
    if cfg.get("max_num_patches"):
        raise ConversionError(f"max_num_patches={cfg['max_num_patches']} (anyres_max feature interpolation) has no HF LLaVA-NeXT equivalent.")
    return select, next_shape


def _text_config(cfg: dict, vocab_size: int, pad_token_id) -> dict:
    """The HF Llama text config (as a dict) of the original's top-level LLM fields, validated."""
    from transformers import LlamaConfig

    text = {k: cfg[k] for k in LLAMA_FIELDS if k in cfg and cfg[k] is not None}
    text.pop("pretraining_tp", None)
    text.update(model_type="llama", vocab_size=vocab_size)
    if pad_token_id is not None:
        text["pad_token_id"] = pad_token_id
    if text.get("rope_scaling"):
        raise ConversionError(f"rope_scaling {text['rope_scaling']} is not supported by this converter (Vicuna uses none).")
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": float(text.pop("rope_theta", 10000.0))}
    LlamaConfig(**text)  # validate early
    return text


def _checked_pmod(cfg: dict, mapped: MappedWeights, L: int) -> tuple[Optional[PMoDConfig], list[str]]:
    """(the checkpoint's PMoDConfig (None: vanilla), the notes reading its p-MoD fields gave), once the layers
    and routers the weights hold are those the config describes."""
    notes: list[str] = []
    is_pmod = "mod_target_layers" in cfg and cfg["mod_target_layers"]
    if cfg.get("model_type") == "pmod_llava_llama" and not is_pmod:
        raise ConversionError("config.json says pmod_llava_llama but has no mod_target_layers; add it (e.g. shiftedcos_decay_0.85_0.15).")
    pmod = None
    if mapped.wrapped & mapped.plain:
        raise ConversionError(f"layers {sorted(mapped.wrapped & mapped.plain)} are saved both plain and as p-MoD (decoder_layer.*).")
    if mapped.routers != mapped.wrapped:
        raise ConversionError(
            f"router weights (model.layers.N.router.router.*) exist for layers {sorted(mapped.routers)} but p-MoD-wrapped "
            f"layers (model.layers.N.decoder_layer.*) are {sorted(mapped.wrapped)}; the checkpoint is inconsistent."
        )
    present = mapped.wrapped | mapped.plain
    if present != set(range(L)):
        raise ConversionError(f"decoder layers {sorted(set(range(L)) - present)} are missing from the weights (num_hidden_layers={L}).")
    if is_pmod:
        pmod, extra = pmod_config_from_original(cfg, L)
        notes += extra
        routed = pmod.routed_layers(L)
        indices = cfg.get("mod_target_layer_indices")
        if indices is not None and sorted(indices) != routed:
            raise ConversionError(
                f"mod_target_layer_indices {sorted(indices)} disagree with mod_target_layers "
                f"'{cfg['mod_target_layers']}' / mod_router_factor {cfg.get('mod_router_factor')} (routed: {routed})."
            )
        if sorted(mapped.routers) != routed:
            raise ConversionError(
                f"the config routes layers {routed} but the weights hold routers for layers {sorted(mapped.routers)} "
                f"(model.layers.N.router.router.*). Check mod_target_layers / mod_router_factor in config.json."
            )
    elif mapped.routers:
        raise ConversionError(
            f"the weights hold p-MoD routers for layers {sorted(mapped.routers)} but config.json has no mod_target_layers; "
            "add the p-MoD fields (mod_target_layers, mod_router_factor, mod_weight_norm, ...)."
        )
    return pmod, notes


def _hf_config(cfg: dict, vt: VisionTower, mapped: MappedWeights, text: dict, image_token_id: int, select: str,
               next_shape: bool, pmod: Optional[PMoDConfig]) -> tuple[str, Any]:
    """(ConversionPlan.kind, the HF config): (p-MoD-)LLaVA(-NeXT) around the vision tower's and ``text``'s configs."""
    from transformers import LlavaConfig, LlavaNextConfig

    common = dict(
        vision_config=vt.config.to_dict(), text_config=text, image_token_index=image_token_id,
        projector_hidden_act="gelu", vision_feature_layer=int(cfg.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy="default" if select == "patch" else "full",
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )
    if next_shape:
        common["image_grid_pinpoints"] = _hf_pinpoints(cfg, vt.image_size)
    if pmod is not None:
        from .hf_config import PMoDLlavaConfig, PMoDLlavaNextConfig

        cls = PMoDLlavaNextConfig if next_shape else PMoDLlavaConfig
        hf = cls(**common, pmod=pmod.to_dict(), pmod_router_layers=sorted(mapped.routers))
        kind = "pmod_llava_next" if next_shape else "pmod_llava"
    else:
        hf = (LlavaNextConfig if next_shape else LlavaConfig)(**common)
        kind = "llava_next" if next_shape else "llava"
    if not next_shape:
        per_side = vt.image_size // vt.config.patch_size
        hf.image_seq_length = per_side * per_side + (1 if select == "cls_patch" else 0)
    return kind, hf


def _resize_rows(t, rows: int):
    """Append zero rows (embedding / lm_head rows of added tokens)."""
    import torch

    if t.shape[0] >= rows:
        return t
    return torch.cat([t, torch.zeros(rows - t.shape[0], *t.shape[1:], dtype=t.dtype)], dim=0)


def convert_checkpoint(
    src: Union[str, os.PathLike],
    dst: Union[str, os.PathLike],
    vision_tower: Optional[str] = None,
    dtype=None,
    overwrite: bool = False,
    cache_dir=None,
    chat_template: Optional[str] = None,
    max_shard_size: str = "5GB",
    progress: bool = True,
) -> Path:
    """Convert an original-layout checkpoint (directory or hub id) ``src`` into ``dst`` (HF layout).

    ``vision_tower``: local CLIP directory to use instead of config.json's ``mm_vision_tower`` (needed
    when the checkpoint does not contain the tower and the hub is unreachable). ``dtype``: store the
    weights in this dtype (default: the checkpoint's LLM dtype; the vision tower is cast to it, as the
    original runs it). Writes into a temporary sibling of ``dst`` and renames it when complete; ``overwrite``
    replaces only an earlier conversion (its manifest lists everything in ``dst``), and ``src`` and ``dst`` may
    not contain one another (:mod:`pmod_bench.model.convert_dst`).
    """
    src_dir, dst, cfg = _original_source(src, dst, overwrite, cache_dir, vision_tower)

    # 1. weights, renamed --------------------------------------------------------------------------
    mapped = _mapped_weights(src_dir, progress)
    vt = resolve_vision_tower(cfg["mm_vision_tower"], mapped.vision, override=vision_tower, cache_dir=cache_dir)
    vision_sd = mapped.vision or vt.state_dict

    # 2. tokenizer and vocabulary ----------------------------------------------------------------
    tok, added = load_original_tokenizer(src_dir, cfg.get("tokenizer_model_max_length"))
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    old_vocab = int(cfg["vocab_size"])
    vocab = max(old_vocab, len(tok))
    plan = plan_conversion(cfg, vt, mapped, vocab, image_token_id, tok.pad_token_id)
    if vocab > old_vocab:
        plan.notes.append(f"vocabulary grown {old_vocab} -> {vocab} for {added or 'tokenizer'} (zero rows, suppressed in generation)")

    # 3. the HF model: names must match one to one --------------------------------------------------
    model, target_dtype = _hf_model(plan, mapped, vision_sd, vocab, dtype, src_dir)

    # 4. write: temp dir + rename -----------------------------------------------------------------
    processor = _processor(plan, cfg, vt, tok, chat_template)
    model.generation_config = _generation_config(src_dir, tok, old_vocab, vocab)
    marker = {
        "converter_version": CONVERTER_VERSION,
        "source": str(src_dir.resolve()),
        "kind": plan.kind,
        "pmod": plan.pmod.to_dict() if plan.pmod else None,
        "router_layers": sorted(mapped.routers),
        "layer_ratios": plan.pmod.layer_ratios(int(cfg["num_hidden_layers"])) if plan.pmod else None,
        "vision_tower": {"saved_in_checkpoint": bool(mapped.vision), "source": vt.source},
        "image_token_id": image_token_id,
        "vocab_size": {"original": old_vocab, "converted": vocab},
        "dtype": str(target_dtype).replace("torch.", ""),
        "dropped_tensors": mapped.dropped,
        "notes": plan.notes,
        "original_config": cfg,
    }
    _write_converted(dst, model, processor, marker, overwrite, max_shard_size)
    return dst


def _original_source(src, dst, overwrite: bool, cache_dir, vision_tower: Optional[str] = None) -> tuple[Path, Path, dict]:
    """(the source directory, ``dst`` as a Path, the source's config.json), once ``src`` is in the original
    layout and ``dst`` may receive the conversion (:func:`~pmod_bench.model.convert_dst.check_dst`)."""
    from .convert_dst import DstError, check_dst
    from .sources import read_config_json, resolve_source_dir

    src_dir = resolve_source_dir(str(src), cache_dir=cache_dir)
    dst = Path(dst).expanduser()
    try:
        check_dst(src_dir, dst, overwrite, vision_tower)
    except DstError as exc:
        raise ConversionError(str(exc)) from None
    cfg = read_config_json(src_dir)
    if not is_original_layout(cfg):
        raise ConversionError(
            f"{src_dir} is not in the original LLaVA layout (config.json has no mm_vision_tower / mm_projector_type; "
            f"model_type '{cfg.get('model_type')}'). HF-layout checkpoints need no conversion: load them directly."
        )
    missing = [k for k in REQUIRED_FIELDS if k not in cfg]
    if missing:
        raise ConversionError(f"{src_dir / 'config.json'} lacks {missing}, which the original LLaVA layout always has.")
    return src_dir, dst, cfg


def _mapped_weights(src_dir: Path, progress: bool) -> MappedWeights:
    """The checkpoint's weights under their HF names; every tensor must have an original LLaVA / p-MoD name."""
    sd = read_state_dict(weight_files(src_dir), progress=progress)
    mapped = map_original_keys(sd)
    del sd
    if mapped.unexpected:
        raise ConversionError(
            f"unexpected weights in {src_dir}: {mapped.unexpected[:8]}{' ...' if len(mapped.unexpected) > 8 else ''} "
            f"({len(mapped.unexpected)} in all). Expected the original LLaVA / p-MoD names (model.layers.N.*, "
            "model.layers.N.decoder_layer.*, model.layers.N.router.router.*, model.mm_projector.{0,2}.*, "
            f"model.image_newline, {VISION_PREFIX}*, lm_head.weight)."
        )
    return mapped


def _hf_model(plan: ConversionPlan, mapped: MappedWeights, vision_sd: dict, vocab: int, dtype, src_dir: Path):
    """(the HF model of ``plan`` holding the checkpoint's weights, their dtype): ``dtype``, default the LLM's.

    The weights must be exactly those the model has, name for name and shape for shape.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    from . import modeling  # noqa: F401  (registers the p-MoD classes with the Auto classes)
    from .dtypes import torch_dtype

    target_dtype = torch_dtype(dtype) if dtype not in (None, "auto") else None
    lm_dtype = mapped.state_dict["model.language_model.embed_tokens.weight"].dtype \
        if "model.language_model.embed_tokens.weight" in mapped.state_dict else torch.float32
    target_dtype = target_dtype or lm_dtype
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(plan.hf_config)
    expected = set(model.state_dict())
    vision_prefix = next(k for k in expected if k.endswith("embeddings.patch_embedding.weight"))[: -len("embeddings.patch_embedding.weight")]
    full = dict(mapped.state_dict)
    full.update({vision_prefix + k: v for k, v in vision_sd.items()})
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if name in full:
            full[name] = _resize_rows(full[name], vocab)
    if plan.hf_config.tie_word_embeddings:
        full.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    _check_weight_names(expected, set(full), vision_prefix, plan.kind, mapped.routers, src_dir)
    shapes = [(k, tuple(full[k].shape), tuple(v.shape)) for k, v in model.state_dict().items() if tuple(full[k].shape) != tuple(v.shape)]
    if shapes:
        raise ConversionError(f"weight shapes disagree with config.json: {shapes[:5]} (name, checkpoint, expected).")
    full = {k: v.to(target_dtype) if v.is_floating_point() else v for k, v in full.items()}
    model.load_state_dict(full, strict=True, assign=True)
    plan.hf_config.dtype = target_dtype
    return model, target_dtype


def _check_weight_names(expected: set, got: set, vision_prefix: str, kind: str, routed: set, src_dir: Path) -> None:
    """The weight names ``got`` must be the model's ``expected`` ones; the error names them in the original layout."""
    missing = sorted(expected - got)
    unexpected = sorted(got - expected)
    if missing or unexpected:
        hint = []
        if any(k.startswith(vision_prefix) for k in missing + unexpected):
            hint.append("the vision tower does not match mm_vision_tower's architecture (pass the right --vision-tower)")
        if "model.image_newline" in missing:
            hint.append("a LLaVA-NeXT (anyres + spatial_unpad) checkpoint must contain model.image_newline")
        raise ConversionError(
            f"the weights of {src_dir} do not match the {kind} architecture its config describes: missing "
            f"{_orig_names(missing, routed)[:8]}, unexpected {_orig_names(unexpected, routed)[:8]}. " + "; ".join(hint)
        )


def _processor(plan: ConversionPlan, cfg: dict, vt: VisionTower, tok, chat_template: Optional[str]):
    """The HF LLaVA(-NeXT) processor: the original's image preprocessing, ``tok`` with the chat template (default Vicuna v1)."""
    from .presets import VICUNA_V1_TEMPLATE

    template = chat_template or VICUNA_V1_TEMPLATE
    tok.chat_template = template
    return llava_processor(
        _image_processor(plan.kind, cfg, vt), tok, patch_size=vt.config.patch_size, chat_template=template,
        vision_feature_select_strategy=plan.hf_config.vision_feature_select_strategy,
    )


def _generation_config(src_dir: Path, tok, old_vocab: int, vocab: int):
    """The source's generation config (or the default) with ``tok``'s special tokens; the added vocabulary suppressed."""
    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(str(src_dir)) if (src_dir / "generation_config.json").is_file() else GenerationConfig()
    gen.pad_token_id = tok.pad_token_id
    gen.bos_token_id = tok.bos_token_id if gen.bos_token_id is None else gen.bos_token_id
    gen.eos_token_id = tok.eos_token_id if gen.eos_token_id is None else gen.eos_token_id
    if vocab > old_vocab:
        gen.suppress_tokens = sorted(set(gen.suppress_tokens or []) | set(range(old_vocab, vocab)))
    return gen


def _write_converted(dst: Path, model, processor, marker: dict, overwrite: bool, max_shard_size: str) -> None:
    """Save ``model``, ``processor``, the provenance ``marker`` and the manifest into a temporary sibling of ``dst``,
    then publish it as ``dst`` by one rename; on any failure the sibling (and the parents made for it) are removed."""
    from pmod_bench.outputs import output_errors

    from .convert_dst import DstError, make_parents, publish, remove_created, temp_sibling, write_manifest

    parents: list = []
    tmp = temp_sibling(dst)
    done = False
    try:
        with output_errors("DST", dst, error=ConversionError, within=dst.parent):
            parents = make_parents(dst)
            model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
            processor.save_pretrained(str(tmp))
            (tmp / CONVERTED_MARKER).write_text(json.dumps(marker, indent=2, default=str))
            write_manifest(tmp, {"converter_version": CONVERTER_VERSION, "source": marker["source"]})
            apply_default_modes(tmp)  # safetensors writes model.safetensors 0600; the rest of DST is umask-based
            publish(tmp, dst, overwrite, CONVERTED_MARKER)
        done = True
    except DstError as exc:
        raise ConversionError(str(exc)) from None
    finally:
        remove_created(tmp, [] if done else parents)


def _orig_names(hf_keys: list[str], routed: set) -> list[str]:
    """Original-layout names of HF weight names (for error messages)."""
    out = []
    for k in hf_keys:
        m = re.match(r"^model\.language_model\.layers\.(\d+)\.(.+)$", k)
        if m:
            idx, rest = int(m.group(1)), m.group(2)
            if rest.startswith("router."):
                out.append(f"model.layers.{idx}.router.{rest}")
            else:
                out.append(f"model.layers.{idx}.{'decoder_layer.' if idx in routed else ''}{rest}")
        elif k.startswith("model.language_model."):
            out.append("model." + k[len("model.language_model."):])
        elif k.startswith("model.multi_modal_projector.linear_"):
            n, rest = k[len("model.multi_modal_projector.linear_"):].split(".", 1)
            out.append(f"model.mm_projector.{0 if n == '1' else 2}.{rest}")
        elif k.startswith("model.vision_tower."):
            out.append(VISION_PREFIX + k[len("model.vision_tower."):])
        else:
            out.append(k)
    return out


def conversion_info(directory: Union[str, os.PathLike]) -> Optional[dict]:
    """The provenance written by :func:`convert_checkpoint` (None for a directory it did not write)."""
    path = Path(directory) / CONVERTED_MARKER
    return json.loads(path.read_text()) if path.is_file() else None


__all__ = [
    "convert_checkpoint",
    "ConversionError",
    "conversion_info",
    "is_original_layout",
    "map_original_keys",
    "pmod_config_from_original",
    "reference_layer_ratios",
    "resolve_vision_tower",
    "CONVERTED_MARKER",
]
