"""What counts as a BatchNorm, and which modules run their class's standard forward."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def is_batchnorm(module: object) -> bool:
    """BatchNorm1d/2d/3d, SyncBatchNorm, their subclasses, and bntool's frozen BNs."""
    return isinstance(module, _BatchNorm) or bool(getattr(type(module), "is_frozen_batchnorm", False))


def is_frozen(module: object) -> bool:
    return bool(getattr(type(module), "is_frozen_batchnorm", False))


def has_statistics(module: nn.Module) -> bool:
    return getattr(module, "running_mean", None) is not None and getattr(module, "running_var", None) is not None


def standard_forward(module: nn.Module, bases: tuple[type, ...]) -> bool:
    """True when ``module``'s forward is the one of the first base class it derives from.

    A subclass that overrides ``forward`` may do more than its base (an
    activation after the BN, weight standardisation in a conv), so surgery
    that assumes the base's arithmetic must not treat it as the base.
    """
    for base in bases:
        if isinstance(module, base):
            return type(module).forward is base.forward
    return False


def bn_forward_is_standard(module: nn.Module) -> bool:
    if is_frozen(module):
        return True
    return standard_forward(module, (nn.SyncBatchNorm, _BatchNorm))
