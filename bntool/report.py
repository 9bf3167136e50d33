"""What every operation reports, in one vocabulary.

Each operation (fold, freeze, unfreeze, recalibrate, export) returns a frozen
dataclass report with ``done`` (what it changed), ``skipped`` (a ``Skip`` for
every layer it left, with the reason), ``comparison`` (its verification, or
None), ``passed``, ``recipe_step()`` (the structural change, for the file's
recipe) and ``to_dict()``; a failed verification raises
``VerificationError`` carrying the report. ``recipe_of`` / ``with_step`` keep
the recipe a model carries, so that saving it writes every step it went through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: attribute of a model that holds its recipe (the structural steps since it was built)
RECIPE_ATTRIBUTE = "bntool_recipe"


@dataclass(frozen=True)
class Skip:
    """A layer an operation left as it is, and why."""

    name: str
    reason: str

    @property
    def bn(self) -> str:
        """The layer's name (fold's reports call it the BN)."""
        return self.name


def recipe_of(model: Any) -> list[dict[str, Any]]:
    """The recipe ``model`` carries (set by ``bntool.load``, extended by every operation), or ``[]``."""
    recipe = getattr(model, RECIPE_ATTRIBUTE, None)
    return list(recipe) if isinstance(recipe, list) else []


def set_recipe(model: Any, recipe: list[dict[str, Any]]) -> None:
    object.__setattr__(model, RECIPE_ATTRIBUTE, list(recipe))


def with_step(model: Any, step: dict[str, Any]) -> Any:
    """Record ``step`` on ``model`` (after the steps it already carries) and return it."""
    set_recipe(model, [*recipe_of(model), step])
    return model
