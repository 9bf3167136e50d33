"""The train-mode half of a conversion's proof: on one process, SyncBatchNorm computes BatchNorm's batch statistics.

``train_step`` runs a model with the named layers alone in train mode (their
submodules and the rest of the model in eval mode: dropout is random, and
what the rest does in train mode is not the conversion's business), keeps the
outputs and the statistics those layers updated, and puts the statistics
back. ``train_check`` compares two such steps bit for bit: on one process
both forms call the same ``batch_norm`` kernel, so the outputs, running
statistics and ``num_batches_tracked`` must be identical.

What torch does decides when the check can run (``why_no_train_check``):
with a process group of more than one process, a synchronized layer
normalizes with every process's batch, by design not this one's; on the CPU
with a process group initialized, ``nn.SyncBatchNorm`` raises in train mode
("expected input tensor to be on GPU"). The report then says the train-mode
check did not run, and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import first_line
from ..runtime.running import model_device, run_model
from ..verify.bits import same_bits


@dataclass(frozen=True)
class TrainStep:
    """One train-mode forward: the outputs, and each layer's statistics after it (by state-dict key)."""

    outputs: tuple[tuple[str, torch.Tensor], ...]
    statistics: dict[str, torch.Tensor]
    error: str | None = None


@dataclass(frozen=True)
class TrainCheck:
    """The converted model's train-mode step vs the original's: what differs (empty when the check passed)."""

    layers: tuple[str, ...]
    different: tuple[str, ...]
    device: str

    @property
    def passed(self) -> bool:
        return not self.different

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "layers": list(self.layers), "different": list(self.different),
                "device": self.device, "rule": "bit for bit"}


class _LayersInTrainMode(nn.Module):
    """Runs ``model``; ``train(True)`` puts the ``layers`` (not their submodules) in train mode, the rest in eval."""

    def __init__(self, model: nn.Module, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "_layers", tuple(layers))  # not registered: no second name for them

    def train(self, mode: bool = True) -> _LayersInTrainMode:
        super().train(False)
        for module in self._layers:
            module.training = mode
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def why_no_train_check(device: torch.device) -> str | None:
    """Why a train-mode step of a synchronized layer would not compute one process's BatchNorm, or None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if device.type == "cpu":
        return ("a process group is initialized and the model is on the CPU, where torch's SyncBatchNorm refuses "
                "to run in train mode")
    world_size = dist.get_world_size()
    if world_size > 1:
        return (f"a process group of {world_size} processes is initialized: in train mode the synchronized layers "
                "normalize with every process's batch, not this one's")
    return None


def train_step(model: nn.Module, layers: Sequence[str], inputs: Sequence[torch.Tensor]) -> TrainStep:
    """``model`` with ``layers`` in train mode on ``inputs`` (on the model's device); the layers' state put back."""
    modules = [model.get_submodule(name) for name in layers]
    keys = [(f"{name}.{key}" if name else key, module, key) for name, module in zip(layers, modules)
            for key in ("running_mean", "running_var", "num_batches_tracked")
            if isinstance(module._buffers.get(key), torch.Tensor)]
    saved = [(module, key, module._buffers[key].clone()) for _, module, key in keys]
    try:
        outputs = run_model(_LayersInTrainMode(model, modules), inputs, train=True)
        after = {label: module._buffers[key].detach().clone() for label, module, key in keys}
        return TrainStep(tuple((n, t.detach()) for n, t in outputs), after)
    except Exception as exc:  # noqa: BLE001 - what the original cannot run is said, not raised
        return TrainStep((), {}, first_line(exc, 200))
    finally:
        with torch.no_grad():
            for module, key, value in saved:
                module._buffers[key].copy_(value)


def train_check(original: TrainStep, converted: TrainStep, layers: Sequence[str], model: nn.Module) -> TrainCheck:
    """Every output and every updated statistic of ``converted`` bit-identical to ``original``'s."""
    different = [name for (name, a), (_, b) in zip(original.outputs, converted.outputs) if not same_bits(a, b)]
    if len(original.outputs) != len(converted.outputs):
        different.append("the outputs' structure")
    different += [key for key, value in original.statistics.items()
                  if key not in converted.statistics or not same_bits(value, converted.statistics[key])]
    if converted.error is not None:
        different.append(f"the train-mode forward ({converted.error})")
    return TrainCheck(tuple(layers), tuple(different), str(model_device(model)))
