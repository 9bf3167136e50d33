"""The proof of a freeze: the frozen model in train mode computes what the original computed in eval mode.

``check_frozen`` runs the frozen model in train mode (dropout-like modules,
random in train mode, and BN layers left unfrozen held in eval mode) against
the original's reference, and proves bit for bit (``statediff.Snapshot``)
that no frozen layer's statistics or affine values moved.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .cloning import clone
from .frozen import _FrozenBatchNorm
from .running import model_device, resolve_device
from .statediff import Snapshot
from .verify import Comparison, Reference, compare


#: Modules that are random in train mode; the check runs them in eval mode (identity for dropout).
STOCHASTIC_TYPES: tuple[type[nn.Module], ...] = (nn.modules.dropout._DropoutNd, nn.RReLU)
STOCHASTIC_TYPE_NAMES = frozenset({"DropPath", "StochasticDepth", "DropBlock2d", "DropBlock3d"})


@dataclass(frozen=True)
class FreezeCheck:
    """Frozen model in train mode vs the original in eval mode, and whether any frozen layer's state moved.

    ``held_in_eval`` names the modules run in eval mode during the check:
    dropout-like modules (random in train mode) and BN layers left unfrozen
    (they use batch statistics in train mode; this check is about the frozen ones).
    """

    comparison: Comparison
    frozen_layers: tuple[str, ...]
    held_in_eval: tuple[str, ...]
    statistics_moved: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return self.comparison.passed and not self.statistics_moved

    def failure_message(self, what: str = "the frozen model in train mode") -> str:
        parts = [] if self.comparison.passed else [
            self.comparison.failure_message(what) + " (a `self.training` branch outside BatchNorm and dropout, "
            "e.g. in the model's forward, also shows here; it cannot be verified this way)"]
        if self.statistics_moved:
            parts.append("running statistics or affine values changed in train mode in "
                         + ", ".join(f"`{n}`" for n in self.statistics_moved))
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {**self.comparison.to_dict(), "passed": self.passed, "frozen_layers": list(self.frozen_layers),
                "held_in_eval": list(self.held_in_eval), "statistics_moved": list(self.statistics_moved)}


class _TrainExcept(nn.Module):
    """Runs ``model``; ``train(True)`` puts everything in train mode except the ``held`` modules."""

    def __init__(self, model: nn.Module, held: Sequence[nn.Module]) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "_held", tuple(held))  # not registered: no second name for them

    def train(self, mode: bool = True) -> _TrainExcept:
        super().train(mode)
        for module in self._held:
            module.train(False)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def check_frozen(original: nn.Module | None, frozen: nn.Module, inputs: Sequence[torch.Tensor], *,
                 device: str | torch.device = "auto", atol: float | None = None,
                 rtol: float | None = None, reference: Reference | None = None) -> FreezeCheck:
    """Verify ``frozen`` in train mode against ``original`` in eval mode (or its ``reference``); neither changes.

    The frozen model runs on ``device`` as it is (a model elsewhere is copied
    there), so that a frozen layer that did move its statistics would show it.
    """
    device = resolve_device(device)
    candidate = frozen if model_device(frozen) == device else clone(frozen).to(device)
    layers = [(n, m) for n, m in candidate.named_modules() if isinstance(m, _FrozenBatchNorm)]
    held = [(n, m) for n, m in candidate.named_modules()
            if isinstance(m, (*STOCHASTIC_TYPES, _NormBase)) or type(m).__name__ in STOCHASTIC_TYPE_NAMES]
    before = Snapshot(candidate, only=[n for n, _ in layers])
    comparison = compare(original, _TrainExcept(candidate, [m for _, m in held]), inputs, device=device,
                         candidate_train=True, atol=atol, rtol=rtol, reference=reference)
    changed = before.changed(candidate)
    moved = [n for n, _ in layers if any(not n or c.startswith(f"{n}.") for c in changed)]
    return FreezeCheck(comparison, tuple(n for n, _ in layers), tuple(n for n, _ in held), tuple(moved))
