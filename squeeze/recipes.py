"""Named step lists for ``squeeze compress --recipe``: the common cases without writing a spec."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    steps: tuple[dict[str, Any], ...]
    needs_data: bool = False


_PRUNE50 = {"op": "prune", "method": "magnitude", "sparsity": 0.5, "scope": "global"}

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "int8",
            "int8 weights, activations quantized on the fly (int8_dynamic)",
            ({"op": "quantize", "method": "int8_dynamic"},),
        ),
        Recipe(
            "int8-static",
            "int8 weights and activations, calibrated on the data (int8_static)",
            ({"op": "quantize", "method": "int8_static"},),
            needs_data=True,
        ),
        Recipe(
            "fp16", "float16 weights and compute, float32 inputs/outputs kept", ({"op": "quantize", "method": "fp16"},)
        ),
        Recipe("prune50", "50% global magnitude pruning (zeros are stored: the file is not smaller)", (_PRUNE50,)),
        Recipe(
            "prune50-int8",
            "50% global magnitude pruning, then int8_dynamic",
            (_PRUNE50, {"op": "quantize", "method": "int8_dynamic"}),
        ),
    )
}


def recipe_steps(name: str) -> list[dict[str, Any]]:
    """The steps of a named recipe (copies, safe to edit); KeyError names the known ones."""
    try:
        recipe = RECIPES[name]
    except KeyError:
        raise KeyError(f"unknown recipe {name!r}; one of: {', '.join(RECIPES)}") from None
    return [dict(step) for step in recipe.steps]
