"""What a recalibration pass changes on each selected BatchNorm, and how it is put back.

``select_bns`` chooses the layers (bntool's frozen BNs included, other
libraries' BN-like modules left with the reason). During the pass each one
normalises with batch statistics (``batch_statistics_forward``: a frozen BN
like its unfrozen form, a SyncBatchNorm locally), gets running buffers if it
had none (``enable_tracking``) and momentum 1.0; ``Held`` remembers what to
put back. ``save`` / ``restore`` switch a BN between old and new statistics
for the quality check; ``replay`` redoes a recipe step's ``tracking_enabled``.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import InputError
from ..norms import is_bntool_frozen, is_foreign_batchnorm, is_pinned
from ..report import Skip
from ..runtime.running import model_device, model_dtype
from ..selection import select
from .collect import BN_BUFFERS


def select_bns(model: nn.Module, include, exclude) -> tuple[list, list[Skip]]:
    bns = [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm) or is_bntool_frozen(m)]
    foreign = [Skip(name, f"`{type(m).__name__}` is no torch BatchNorm: its batch statistics cannot be read "
                            "back; statistics unchanged") for name, m in model.named_modules() if is_foreign_batchnorm(m)]
    if not bns:
        also = f" (only {len(foreign)} of another library, which it cannot recalibrate)" if foreign else ""
        raise InputError(f"`{type(model).__name__}` has no BatchNorm layers{also}; there is nothing to recalibrate")
    chosen, left = select([name for name, _ in bns], include, exclude, what="BatchNorm", owner=type(model).__name__)
    if not chosen:
        raise InputError("the include / exclude patterns leave no BatchNorm layer to recalibrate; loosen them")
    keep = set(chosen)
    selected = [(name, bn) for name, bn in bns if name in keep]
    return selected, foreign + [Skip(name, f"{why}; statistics unchanged") for name, why in left.items()]


@dataclasses.dataclass
class Held:
    """What the pass changes on a BN besides its statistics, to put back: flags, momentum, a forward of ours."""

    track: bool  # it had running statistics before the pass
    track_flag: bool
    momentum: float | None

    @classmethod
    def of(cls, bn: nn.Module) -> Held:
        return cls(bn.track_running_stats and bn.running_mean is not None, bn.track_running_stats, bn.momentum)

    def untrack(self, bn: nn.Module) -> None:
        """Undo ``enable_tracking`` (a layer that got no data, or a failed pass)."""
        if not self.track:
            bn.track_running_stats = self.track_flag
            for key in BN_BUFFERS:
                bn.register_buffer(key, None)

    def restore(self, bn: nn.Module, failed: bool) -> None:
        unpatch(bn)
        bn.momentum = self.momentum
        if failed:
            self.untrack(bn)


def batch_statistics_forward(bn: nn.Module) -> bool:
    """Make ``bn`` normalise with batch statistics during the pass; True when its forward is ``_BatchNorm.forward``.

    A SyncBatchNorm computes local statistics (the ranks are merged exactly
    afterwards); a frozen BN normalises like an ordinary BN in training mode,
    so that a frozen model is recalibrated exactly as its unfrozen form would be.
    """
    if is_pinned(bn):  # its own forward, as unfrozen: the pin is lifted for the pass
        bn.__dict__["_bntool_unpinned"] = True
        return type(bn).forward is _BatchNorm.forward
    if is_bntool_frozen(bn):
        bn.forward = types.MethodType(_frozen_in_training, bn)
    elif isinstance(bn, nn.SyncBatchNorm) and "forward" not in bn.__dict__:
        bn.forward = types.MethodType(_BatchNorm.forward, bn)
    else:
        return type(bn).forward is _BatchNorm.forward
    bn._bntool_patched = True
    return True


def _frozen_in_training(self: nn.Module, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - BatchNorm's name
    self._check_input_dim(input)
    return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, True, 1.0, self.eps)


def unpatch(bn: nn.Module) -> None:
    bn.__dict__.pop("_bntool_unpinned", None)
    if bn.__dict__.pop("_bntool_patched", False):
        bn.__dict__.pop("forward", None)


def save(bn: nn.Module) -> dict[str, Any]:
    """Copies of a BN's buffers and flags (the quality check switches between old and new statistics)."""
    tracking = bn.track_running_stats and bn.running_mean is not None
    copy = {k: (getattr(bn, k).clone() if getattr(bn, k, None) is not None else None) for k in BN_BUFFERS}
    return {"track": tracking, "track_flag": bn.track_running_stats, **copy}


def restore(bn: nn.Module, old: dict[str, Any]) -> None:
    bn.track_running_stats = old["track_flag"]
    for key in BN_BUFFERS:
        if old[key] is None or getattr(bn, key, None) is None:
            bn.register_buffer(key, None if old[key] is None else old[key].clone())
        else:
            with torch.no_grad():
                getattr(bn, key).copy_(old[key])


def enable_tracking(bn: nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    """Give a track_running_stats=False BN its running buffers; True if it had to."""
    if bn.track_running_stats and bn.running_mean is not None:
        return False
    if bn.weight is not None:
        device, dtype = bn.weight.device, bn.weight.dtype
    bn.register_buffer("running_mean", torch.zeros(bn.num_features, device=device, dtype=dtype))
    bn.register_buffer("running_var", torch.ones(bn.num_features, device=device, dtype=dtype))
    bn.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
    bn.track_running_stats = True
    return True


def replay(model: nn.Module, step: dict[str, Any]) -> None:
    """Recipe replay: each BN in ``tracking_enabled`` gets running buffers and track_running_stats=True."""
    modules = dict(model.named_modules())
    for name in step.get("tracking_enabled", []):
        bn = modules.get(name)
        if not isinstance(bn, _BatchNorm):
            raise InputError(f"recipe step recalibrate names `{name}`, which is not a BatchNorm layer of "
                             f"`{type(model).__name__}`; build the model from the code the checkpoint was made from")
        enable_tracking(bn, model_device(model), model_dtype(model))


def bn_buffer_names(bn_names: Iterable[str]) -> set[str]:
    return {f"{bn}.{key}" if bn else key for bn in bn_names for key in BN_BUFFERS}
