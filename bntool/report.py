"""What every operation reports, in one vocabulary.

Each operation (fold, freeze, unfreeze, recalibrate, export) returns a frozen
dataclass report that satisfies ``Report``: ``done`` (what it changed),
``skipped`` (a ``Skip`` for every layer it left, with the reason),
``comparison`` (its verification, or None), ``passed`` (True, False, or None
when the result was not verified: ``verify=False``), ``recipe_step()`` (the
structural change, for the file's recipe) and ``to_dict()``, whose
``contract`` part is the same for all: ``op``, ``passed``, ``done`` (layer
names), ``skipped`` (``[{"layer", "reason"}]``), ``verification`` and
``recipe_step``. A failed verification raises ``VerificationError``
carrying the report. (``inspect``'s report is no operation's: it changes
nothing and proves nothing, so it has no ``passed``, ``done`` or recipe
step.) ``recipe_of`` / ``with_step`` keep the recipe a model carries, so
that saving it writes every step it went through.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

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


@runtime_checkable
class Report(Protocol):
    """What every operation's report offers (``isinstance(report, Report)`` checks the names)."""

    @property
    def done(self) -> Sequence[Any]: ...

    @property
    def skipped(self) -> Sequence[Skip]: ...

    @property
    def comparison(self) -> Any: ...

    @property
    def passed(self) -> bool | None: ...

    def recipe_step(self) -> dict[str, Any] | None: ...

    def to_dict(self) -> dict[str, Any]: ...


#: the keys every report's ``to_dict()`` carries
CONTRACT_KEYS = ("op", "passed", "done", "skipped", "verification", "recipe_step")


def contract(op: str, report: Report, done: Iterable[str], verification: Any,
             old_name: str | None = None) -> dict[str, Any]:
    """The part of ``to_dict()`` every report shares.

    ``old_name``: the key the operation's skip entries used before ``layer``
    (``bn`` for fold, ``name`` for freeze and recalibrate), written alongside
    it for one release so that JSON readers keep working.
    """
    return {"op": op, "passed": report.passed, "done": list(done),
            "skipped": skip_entries(report.skipped, old_name), "verification": verification,
            "recipe_step": report.recipe_step()}


def skip_entries(skips: Iterable[Skip], old_name: str | None = None) -> list[dict[str, str]]:
    """``[{"layer": ..., "reason": ...}]`` (and the old key beside ``layer``, for one release)."""
    return [{"layer": s.name, **({old_name: s.name} if old_name else {}), "reason": s.reason} for s in skips]


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
