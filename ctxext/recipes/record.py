"""What the report, the provenance and the model card read from a recipe run: the runner's
``RecipeRun`` satisfies this protocol, so rendering never imports the runner."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # annotations only
    from ctxext.recipes.loader import LoadedRecipe
    from ctxext.recipes.schema import Recipe


class RunRecord(Protocol):
    """A recipe run as rendering sees it (see ``ctxext.recipes.runner.RecipeRun``)."""

    loaded: LoadedRecipe
    recipe: Recipe
    pre: Any  # the runner's preflight: source, name, config, trained_length, factor, new_length
    ckpt: Path | None
    results: dict[str, Any] | None
    finetune_summary: dict[str, Any] | None
    timings: dict[str, float]

    def ckpt_ready(self) -> bool: ...
