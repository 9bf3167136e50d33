"""The plan of a fold, as data: which BN folds into which layer (``FoldPair``), what is left and why (``Skip``).

``foldrules.plan_from_dataflow`` makes a ``FoldPlan``; ``bntool fold``,
``bntool inspect`` and the reports read it. The plan also says where a fold
is checked layer by layer (``probes``: a backward fold is whole again at the
BN's output, a forward fold at its consumer's), which folds a failing check
point blames (``pairs_checked_at``), and the fan-in of the recomputed weights
each point depends on, which widens the tolerance's floor (``fan_in``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..report import Skip

TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class FoldPair:
    """Fold ``bn`` into ``into``: ``backward`` (into its producer) or ``forward`` (into its reader).

    ``bn_becomes``: ``removed`` (replaced by ``nn.Identity``), ``rewritten``
    (replaced by its own forward with the normalization taken out, so its
    activation / drop layer keep running; ``keeps`` names them), or
    ``identity`` (kept, with statistics that make its normalization an exact
    identity, for a BN subclass whose forward cannot be traced). ``through``:
    the ``a * x + s`` steps kept between the two layers. ``rank``: the BN's
    input rank, with which a rewritten BN is traced again on reload.
    """

    bn: str
    into: str
    direction: str
    bn_becomes: str
    into_type: str
    through: tuple[float, float] = (1.0, 0.0)
    rank: int | None = None
    keeps: tuple[str, ...] = ()


@dataclass(frozen=True)
class FoldPlan:
    pairs: tuple[FoldPair, ...]
    skips: tuple[Skip, ...]
    method: str
    note: str = ""

    def recipe_step(self) -> dict[str, Any]:
        pairs = []
        for p in self.pairs:
            entry: dict[str, Any] = {"bn": p.bn, "into": p.into, "direction": p.direction, "bn_becomes": p.bn_becomes}
            if p.bn_becomes == "rewritten":
                entry["rank"] = p.rank
            pairs.append(entry)
        return {"op": "fold", "pairs": pairs}

    def probes(self) -> list[str]:
        """Modules whose outputs must be equal before and after the fold (checked layer by layer).

        A backward fold changes its producer's output and restores it at the
        BN's; a forward fold is whole at its consumer's output, unless a BN
        after that consumer also folds into it: then at that BN's output.
        """
        return list(dict.fromkeys(point for _, point in self._checked_at()))

    def pairs_checked_at(self, point: str) -> list[FoldPair]:
        return [p for p, at in self._checked_at() if at == point]

    def _checked_at(self) -> list[tuple[FoldPair, str]]:
        """Each pair with the module at whose output it is checked (see ``probes``)."""
        restored_at = {p.into: p.bn for p in self.pairs if p.direction == "backward"}
        return [(p, p.bn if p.direction == "backward" else restored_at.get(p.into, p.into)) for p in self.pairs]

    def fan_in(self, model: nn.Module) -> dict[str, int]:
        """Per check point (and ``""`` for the outputs): the largest fan-in of the folded weights it depends on."""
        sizes = {}
        for p in self.pairs:
            if p.into in sizes:
                continue
            layer = model.get_submodule(p.into)
            shape = layer.weight.shape
            inner = math.prod(shape[2:])
            if isinstance(layer, TRANSPOSED):  # (in, out / groups, *kernel)
                sizes[p.into] = shape[0] // layer.groups * inner
            else:  # (out, in / groups, *kernel) or (out, in)
                sizes[p.into] = shape[1] * inner if len(shape) > 1 else 1
        points: dict[str, int] = {}
        for p, point in self._checked_at():
            points[point] = max(points.get(point, 0), sizes[p.into])
        points[""] = max(sizes.values(), default=0)
        return points

    def reason_for(self, bn: str) -> str | None:
        """``None`` when ``bn`` is folded, else the reason it is not."""
        return next((s.reason for s in self.skips if s.bn == bn), None)
