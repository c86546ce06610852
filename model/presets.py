"""Architecture presets, all built locally (no download).

* ``tiny``: a random-init LLaVA-NeXT-shaped p-MoD model with its own tokenizer (byte-level BPE
  trained in code), image processor (anyres, grid pinpoints of 32 px tiles) and processor. Ready in
  about a second; tests, demos and CI use it.
* ``tiny-llava``: the same at LLaVA-1.5 shape (one 32 px tile, no anyres).
* ``llava-1.5-7b``, ``llava-next-7b``, ``llava-next-13b``: the paper's architectures (Vicuna-7B/13B +
  CLIP ViT-L/14-336 + mlp2x_gelu projector) as configs, for FLOPs / KV-cache accounting, meta-device
  counting, or random-weight latency runs. No weights.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

from .processors import IMAGE_TOKEN  # noqa: F401  (re-exported: the presets' prompts use it)

PRESETS = ("tiny", "tiny-llava", "llava-1.5-7b", "llava-next-7b", "llava-next-13b")

#: LLaVA-NeXT grid pinpoints in units of the base tile: (1,2),(2,1),(2,2),(1,3),(3,1)  (METHOD.md)
GRID_UNITS = [(1, 2), (2, 1), (2, 2), (1, 3), (3, 1)]

#: Vicuna v1's system prompt (LLaVA's conv_vicuna_v1); the one home of the string, for the chat template
#: below (evaluation) and ``pmod_bench.train.data.render_vicuna_v1`` (training).
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
#: Vicuna v1 conversation template (LLaVA-1.5 / LLaVA-NeXT-Vicuna), as a chat template.
VICUNA_V1_TEMPLATE = (
    "{% set system = '" + VICUNA_SYSTEM.replace("'", "\\'") + "' %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}{% set system = message['content'] %}{% endif %}{% endfor %}"
    "{{ system }}"
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{% if message['role'] == 'user' %}{{ ' USER: ' }}{% else %}{{ ' ASSISTANT: ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '</s>' }}{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
)

_CORPUS = """
A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful,
detailed, and polite answers to the human's questions. USER: ASSISTANT: Answer the question using a
single word or phrase. Answer with the option's letter from the given choices directly. Is there a
in the image? Please answer yes or no. yes no Yes No A B C D E What is the color of the object? red
green blue yellow black white gray orange purple brown pink. How many people are there? one two three
four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 10 100 1000. What is written on the sign? What is
the title of the chart? Which year has the highest value? Please provide the bounding box coordinate of
the region this sentence describes: the man on the left, the dog, the red car, the table, a cat.
Describe the image in detail. The picture shows a square, a circle and a triangle on a plain background.
chart document infographic diagram photo text question answer option choice value percent total left
right top bottom center middle large small big tall short above below next to between behind in front.
"""


def _special_tokens() -> list[str]:
    return ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, min_frequency=1, special_tokens=_special_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in code on a small prompt corpus (deterministic)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left", model_max_length=4096, chat_template=VICUNA_V1_TEMPLATE,
    )
    return tok


# ------------------------------------------------------------------------------------- configs
def _clip_vit_l_336() -> dict:
    return dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")


def _vicuna(size: str) -> dict:
    if size == "7b":
        dims = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)
    else:
        dims = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40)
    return dict(model_type="llama", vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                pad_token_id=0, **dims)


def preset_config(name: str, pmod: Any = None, attn_implementation: Optional[str] = None):
    """The HF config of a preset: p-MoD (``PMoDLlava*Config``) if ``pmod`` is given, else vanilla."""
    from transformers import LlavaConfig, LlavaNextConfig

    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown preset '{name}'.{hint} Known presets: {', '.join(PRESETS)}; or pass a local config directory.")
    if name.startswith("tiny"):
        vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32)
        text = dict(model_type="llama", vocab_size=len(tiny_tokenizer()), hidden_size=64, intermediate_size=128,
                    num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                    pad_token_id=tiny_tokenizer().pad_token_id, bos_token_id=1, eos_token_id=2)
        image_token = tiny_tokenizer().convert_tokens_to_ids(IMAGE_TOKEN)
        tile = 32
    else:
        vision = _clip_vit_l_336()
        text = _vicuna("13b" if name.endswith("13b") else "7b")
        image_token = 32000
        tile = 336
    common = dict(vision_config=vision, text_config=text, image_token_index=image_token, projector_hidden_act="gelu",
                  vision_feature_select_strategy="default", vision_feature_layer=-2)
    next_shape = name in ("tiny", "llava-next-7b", "llava-next-13b")
    if next_shape:
        common["image_grid_pinpoints"] = [[h * tile, w * tile] for h, w in GRID_UNITS]
    if pmod is not None:
        from .hf_config import PMoDLlavaConfig, PMoDLlavaNextConfig
        from .config import PMoDConfig

        cls = PMoDLlavaNextConfig if next_shape else PMoDLlavaConfig
        cfg = cls(**common, pmod=PMoDConfig.from_dict(pmod).to_dict())
    else:
        cfg = (LlavaNextConfig if next_shape else LlavaConfig)(**common)
    if not next_shape:
        cfg.image_seq_length = (tile // (8 if name.startswith("tiny") else 14)) ** 2
    if attn_implementation:
        cfg._attn_implementation = attn_implementation
    return cfg


def preset_processor(name: str = "tiny"):
    """Processor (tokenizer + image processor) of a tiny preset, built locally."""
    from .processors import clip_image_processor, llava_processor

    if not name.startswith("tiny"):
        raise ValueError(f"preset '{name}' has no local tokenizer; load its processor from a checkpoint")
    pinpoints = [[h * 32, w * 32] for h, w in GRID_UNITS] if name == "tiny" else None
    return llava_processor(clip_image_processor(32, pinpoints=pinpoints), tiny_tokenizer(), patch_size=8,
                           chat_template=VICUNA_V1_TEMPLATE)


def build_preset(name: str = "tiny", pmod: Any = "default", seed: int = 0, dtype=None, attn_implementation: str = "sdpa"):
    """(model, processor) of a tiny preset with random weights; ``pmod=None`` gives the vanilla model.

    Routers are zero-initialised (so the p-MoD model starts equal to the vanilla one); pass
    ``random_routers(model)`` to exercise routing as a trained model would.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    from . import modeling  # noqa: F401  (registers the p-MoD classes with the Auto classes)
    from .config import PMoDConfig

    pmod_cfg = PMoDConfig() if isinstance(pmod, str) and pmod == "default" else pmod
    config = preset_config(name, pmod_cfg, attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=dtype) if dtype else AutoModelForImageTextToText.from_config(config)
    model.eval()
    processor = preset_processor(name) if name.startswith("tiny") else None
    return model, processor


def random_routers(model, std: float = 1.0, seed: int = 0) -> None:
    """Give every router random non-zero weights (as after training), deterministically."""
    import torch

    from .routed import PMoDModelMixin

    g = torch.Generator().manual_seed(seed)
    for layer in (model.pmod_layers.values() if isinstance(model, PMoDModelMixin) else ()):
        w = layer.router.weight
        with torch.no_grad():
            w.copy_(torch.randn(w.shape, generator=g) * std / w.shape[1] ** 0.5)
            if layer.router.bias is not None:
                layer.router.bias.copy_(torch.randn(1, generator=g) * 0.1)


def demo_image(width: int = 64, height: int = 48, seed: int = 0):
    """A generated RGB test image (shapes on a gradient), no files needed."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height))
    px = img.load()
    for y in range(height):
        for x in range(width):
            px[x, y] = ((x * 255) // max(width - 1, 1), (y * 255) // max(height - 1, 1), (seed * 53) % 256)
    d = ImageDraw.Draw(img)
    d.ellipse([width * 0.1, height * 0.2, width * 0.45, height * 0.7], fill=(220, 30, 30))
    d.rectangle([width * 0.55, height * 0.3, width * 0.9, height * 0.85], fill=(30, 30, 220))
    return img
