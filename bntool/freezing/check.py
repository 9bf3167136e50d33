"""The proof of a freeze: every frozen layer, in train mode, computes what the original computed in eval mode.

``check_frozen`` runs the frozen model with its frozen layers in train mode
and everything else in eval mode, against the original's eval-mode
reference, and proves bit for bit (``statediff.Snapshot``) that no frozen
layer's statistics or affine values moved. The rest of the model stays in
eval mode because what it does in train mode is the model's own business,
not the freeze's: dropout is random, an Inception's auxiliary head or a
detection head returns other outputs, a left BN uses batch statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..norms import is_bntool_frozen
from ..runtime.cloning import clone
from ..runtime.running import model_device, resolve_device
from ..runtime.shapes import declared_input_shapes, make_inputs
from ..verify.bits import Snapshot
from ..verify.compare import Comparison, Reference, compare_layers

#: which check ran (``FreezeCheck.kind``): the whole model on example inputs, or each layer alone (``layers``)
WHOLE_MODEL = "whole model: example inputs"
PER_LAYER = "per layer: no example inputs"


@dataclass(frozen=True)
class FreezeCheck:
    """The frozen model with its frozen layers in train mode (the rest in eval mode) vs the original in eval mode,
    and whether any frozen layer's state moved. ``kind``: ``WHOLE_MODEL``, or ``PER_LAYER`` (each layer alone on
    inputs of its own shape: ``freezing.layers``)."""

    comparison: Comparison
    frozen_layers: tuple[str, ...]
    statistics_moved: tuple[str, ...]
    kind: str = WHOLE_MODEL

    @property
    def passed(self) -> bool:
        return self.comparison.passed and not self.statistics_moved

    def failure_message(self, what: str = "the frozen model (frozen layers in train mode)") -> str:
        parts = [] if self.comparison.passed else [self.comparison.failure_message(what)]
        if self.statistics_moved:
            parts.append("running statistics or affine values changed in train mode in "
                         + ", ".join(f"`{n}`" for n in self.statistics_moved))
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {**self.comparison.to_dict(), "passed": self.passed, "checked": self.kind,
                "frozen_layers": list(self.frozen_layers), "statistics_moved": list(self.statistics_moved)}


class TrainOnly(nn.Module):
    """Runs ``model``; ``train(True)`` puts the ``layers`` (not their submodules) in train mode, the rest in eval."""

    def __init__(self, model: nn.Module, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "_layers", tuple(layers))  # not registered: no second name for them

    def train(self, mode: bool = True) -> TrainOnly:
        super().train(False)
        for module in self._layers:  # the layer alone: a frozen BN's activation or dropout is the rest of the model
            module.training = mode
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
    layers = [(n, m) for n, m in candidate.named_modules() if is_bntool_frozen(m)]
    before = Snapshot(candidate, only=[n for n, _ in layers])
    comparison = compare_layers(original, TrainOnly(candidate, [m for _, m in layers]), inputs, device=device,
                         candidate_train=True, atol=atol, rtol=rtol, reference=reference)
    changed = before.changed(candidate)
    moved = [n for n, _ in layers if any(not n or c.startswith(f"{n}.") for c in changed)]
    return FreezeCheck(comparison, tuple(n for n, _ in layers), tuple(moved))


@dataclass(frozen=True)
class Verify:
    """How a freeze verifies: on which inputs (None: the shape the model declares, else each layer alone:
    ``per_layer``), where, with what tolerance."""

    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None
    device: str | torch.device = "auto"
    seed: int = 0
    atol: float | None = None
    rtol: float | None = None

    def per_layer(self, model: nn.Module) -> bool:
        """Whether there is nothing to run the whole model on: no example inputs, and no shape it declares."""
        return self.example_inputs is None and declared_input_shapes(model) is None

    def inputs(self, model: nn.Module) -> tuple[torch.Tensor, ...]:
        if isinstance(self.example_inputs, torch.Tensor):
            return (self.example_inputs,)
        if self.example_inputs is not None:
            return tuple(self.example_inputs)
        return make_inputs(model, seed=self.seed)


def reference_first(model: nn.Module, checking: Verify) -> Reference:
    """The original's outputs, before an in-place change makes it unavailable."""
    return Reference.of(model, checking.inputs(model), device=checking.device,
                        float64=checking.atol is None and checking.rtol is None)
