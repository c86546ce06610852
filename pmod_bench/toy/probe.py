"""What the toy vision tower's features hold: linear probes per patch, the (colour, shape) pair and position included.

    python -m pmod_bench.toy.probe DIR        # DIR: a toy checkpoint (its tower) or the prepared tower (prep/vision)

Answering "is there a red circle?" needs colour and shape *bound* at one place. The probe reads LLaVA's features
(layer -2, CLS dropped) of fresh toy crops (the scales anyres feeds the tower) and fits a linear classifier on
the patches that hold a shape, four times: colour alone, shape alone, the (colour, shape) pair (20 classes), and
where the patch is in its 32 px crop (16 classes). A pair read as well as its parts means the binding is in the
features, and what is left to learn is in the LLM and connector. Grounding needs the position too: the base tile is
the whole image, so a shape patch's place in it is the shape's place in the image. Deterministic given the seed; a
few seconds on one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path


def _tower(path: str):
    """(CLIP vision model, feature layer) from a prepared tower or a composed toy checkpoint."""
    from transformers import AutoConfig, CLIPVisionModel

    cfg = AutoConfig.from_pretrained(path)
    if getattr(cfg, "model_type", "") == "clip_vision_model":
        return CLIPVisionModel.from_pretrained(path), -2
    from pmod_bench import load_model

    model, _ = load_model(path)
    return model.model.vision_tower, int(model.config.vision_feature_layer)


def _fit(x, y, classes: int, steps: int, seed: int) -> float:
    """Test accuracy of a linear softmax classifier fitted on 80% of (x, y)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    cut = int(0.8 * len(y))
    tr, te = perm[:cut], perm[cut:]
    mean, std = x[tr].mean(0), x[tr].std(0) + 1e-6
    xs = (x - mean) / std
    lin = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.05, weight_decay=1e-4)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(lin(xs[tr]), y[tr])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((lin(xs[te]).argmax(-1) == y[te]).float().mean())


def pair_probe(path: str, seed: int = 0, scenes: int = 600, steps: int = 400) -> dict:
    """Probe accuracies {"colour", "shape", "pair", "position", "patches"} on the shape patches of fresh crops."""
    import torch

    from .prepare import _crops, deterministic
    from .world import COLOURS, SHAPES

    deterministic(seed)
    tower, layer = _tower(path)
    tower.eval()
    x, y = _crops(random.Random(seed + 2), scenes, 4, digit_rate=0.0)
    with torch.no_grad():
        hs = tower(pixel_values=torch.from_numpy(x), output_hidden_states=True).hidden_states[layer][:, 1:]
    feats, labels = hs.reshape(-1, hs.shape[-1]), torch.from_numpy(y).permute(0, 2, 1).reshape(-1, 3)
    colour, shape = labels[:, 0], labels[:, 1]
    where = torch.arange(hs.shape[1]).repeat(hs.shape[0])  # the patch's index in its crop (row-major)
    keep = (colour >= 1) & (colour <= len(COLOURS)) & (shape >= 1)
    feats, colour, shape, where = feats[keep], colour[keep] - 1, shape[keep] - 1, where[keep]
    return {"colour": _fit(feats, colour, len(COLOURS), steps, seed), "shape": _fit(feats, shape, len(SHAPES), steps, seed),
            "pair": _fit(feats, colour * len(SHAPES) + shape, len(COLOURS) * len(SHAPES), steps, seed),
            "position": _fit(feats, where, hs.shape[1], steps, seed),
            "patches": int(keep.sum()), "definition": "linear probe test accuracy on patches holding a shape (layer -2)"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", help="a toy checkpoint directory or a prepared vision tower (prep/vision)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not (Path(args.path) / "config.json").is_file():
        print(f"pmod_bench.toy.probe: {args.path} holds no config.json; pass a toy checkpoint or prep/vision", file=sys.stderr)
        return 2
    print(json.dumps(pair_probe(args.path, args.seed), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
