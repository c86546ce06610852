"""The toy world's models: one trained checkpoint per row of the paper's Tables 1, 3, 4 and 7.

Each model is one SFT recipe in ``pmod_bench/toy/recipes`` (all on top of the shared PT connector of
``toy-pt``). A configuration that fills several rows is trained once: Table 3's "+ PRD" and Table 4's
"cosine" rows are p-MoD-0.5; Table 4's "constant" row is Table 3's "+ STRing" (same components).
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
    def recipe_path(self) -> Path:
        return RECIPES / f"{self.recipe}.yaml"


PT = ToyModel("pt", "toy-pt", "PT connector")
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

__all__ = ["MODELS", "PT", "QUICK", "RECIPES", "TABLE_ROWS", "ToyModel"]
