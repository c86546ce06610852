"""The toy world's models: one trained checkpoint per row of the paper's Tables 1, 3, 4 and 7.

Each model is one recipe in ``pmod_bench/toy/recipes``, run in three stages::

    toy-pt         PT: the connector on captions (LLM and tower frozen)              shared
    toy-sft        SFT from the PT connector: connector + LLM                         shared
    toy-baseline   SFT continuation on fresh questions (sft_pmod.json), no p-MoD     one per model
    toy-pmod-*     the same continuation with p-MoD layers inserted (zero routers: at step 0 they
    toy-t3-*/t4-*  compute exactly what the SFT model computes, TanhNorm's design); routers train too

The paper trains each p-MoD model's SFT from the PT connector. Sharing the first SFT stage keeps the
costly part (learning to read the image at all: ~430k question instances for this LLM) to one run on a CPU, and
every model then gets the same continuation (data, steps, learning rate), so differences between
them come from their routing alone. A configuration that fills several rows is trained once: Table
3's "+ PRD" and Table 4's "cosine" rows are p-MoD-0.5; Table 4's "constant" row is Table 3's "+ STRing".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RECIPES = Path(__file__).resolve().parent / "recipes"


@dataclass(frozen=True)
class ToyModel:
    name: str
    """Run-directory name and the report's row key (the paper's VARIANT names)."""
    recipe: str
    """SFT recipe (file stem in pmod_bench/toy/recipes)."""
    title: str

    @property
    def derived(self) -> bool:
        """Every model continues the shared SFT stage (``model.source=models/sft``); only PT and SFT are composed."""
        return self.name not in ("pt", "sft")

    @property
    def recipe_path(self) -> Path:
        return RECIPES / f"{self.recipe}.yaml"


PT = ToyModel("pt", "toy-pt", "PT connector")
SFT = ToyModel("sft", "toy-sft", "shared SFT (what every model continues)")
MODELS: dict[str, ToyModel] = {m.name: m for m in (
    ToyModel("baseline", "toy-baseline", "toy LLaVA-NeXT (baseline)"),
    ToyModel("p-MoD-0.5", "toy-pmod-0.5", "p-MoD-0.5 (PRD cosine, TanhNorm, STRing)"),
    ToyModel("p-MoD-0.4", "toy-pmod-0.4", "p-MoD-0.4"),
    ToyModel("p-MoD-0.3", "toy-pmod-0.3", "p-MoD-0.3"),
    ToyModel("vanilla-MoD", "toy-t3-vanilla-mod", "vanilla MoD (no TanhNorm, no STRing, constant ratio)"),
    ToyModel("MoD+TanhNorm", "toy-t3-tanhnorm", "+ TanhNorm"),
    ToyModel("MoD+TanhNorm+STRing", "toy-t3-string", "+ STRing (= Table 4 constant)"),
    ToyModel("p-MoD-interleaved", "toy-t4-interleaved", "interleaved"),
    ToyModel("p-MoD-stepped", "toy-t4-stepped", "stepped"),
    ToyModel("p-MoD-linear", "toy-t4-linear", "linear"),
)}
#: what --quick trains/evaluates (and what is shipped in the package)
QUICK = ("baseline", "p-MoD-0.5", "p-MoD-0.3")

#: the toy analogs of the paper's tables: (rows as (label, model name))
TABLE_ROWS = {
    "table1": [("toy LLaVA-NeXT", "baseline"), ("+ p-MoD", "p-MoD-0.5")],
    "table3": [("vanilla MoD", "vanilla-MoD"), ("+ TanhNorm", "MoD+TanhNorm"), ("+ STRing", "MoD+TanhNorm+STRing"),
               ("+ PRD", "p-MoD-0.5")],
    "table4": [("Constant", "MoD+TanhNorm+STRing"), ("Interleaved", "p-MoD-interleaved"), ("Stepped", "p-MoD-stepped"),
               ("Linear", "p-MoD-linear"), ("PRD (cosine)", "p-MoD-0.5")],
    "table7": [("toy LLaVA-NeXT", "baseline"), ("p-MoD-0.3", "p-MoD-0.3"), ("p-MoD-0.4", "p-MoD-0.4"),
               ("p-MoD-0.5", "p-MoD-0.5")],
}

__all__ = ["MODELS", "PT", "SFT", "QUICK", "RECIPES", "TABLE_ROWS", "ToyModel"]
