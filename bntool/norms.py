"""What counts as a BatchNorm, and which modules run their class's standard forward.

Three families of module are BatchNorms to bntool:

* ``torch.nn`` BatchNorm1d/2d/3d, SyncBatchNorm and every subclass (timm's
  ``BatchNormAct2d`` among them);
* bntool's own frozen BNs (``is_bntool_frozen``), among them BN subclasses
  whose own ``training`` bntool pinned to False (``is_pinned``);
* BN-like modules from other libraries that are not ``_BatchNorm`` subclasses:
  torchvision's, timm's and detectron2's ``FrozenBatchNorm2d``, timm's
  ``FrozenBatchNormAct2d``. They are recognised by their shape (1-D
  ``running_mean`` / ``running_var`` of one size, a numeric ``eps``) and a class
  name that says BatchNorm; what their forward computes is established
  separately (``bnform``), never assumed.

Whether a BN is frozen, its statistics fixed in train mode as in eval mode,
is ``has_fixed_statistics``: bntool's frozen BNs, other libraries' (every
BN-like module of the third family, and any class named ``FrozenBatchNorm*``).
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

_BN_NAME = re.compile(r"batch_?norm", re.I)
#: PyTorch's default eps, assumed where a file does not say (weights only).
DEFAULT_EPS = 1e-5


def is_batchnorm(module: object) -> bool:
    """BatchNorm1d/2d/3d, SyncBatchNorm, their subclasses, bntool's frozen BNs, and foreign frozen BNs."""
    return isinstance(module, _BatchNorm) or is_bntool_frozen(module) or is_foreign_batchnorm(module)


def is_bntool_frozen(module: object) -> bool:
    """One of bntool's frozen BNs (``bntool.frozen``): a ``FrozenBatchNorm*``, or a BN subclass pinned to eval."""
    return bool(getattr(type(module), "is_frozen_batchnorm", False))


def is_pinned(module: object) -> bool:
    """A BN subclass that bntool froze by pinning its own ``training`` to False (its forward is its class's)."""
    return bool(getattr(type(module), "pins_eval", False))


def requested_mode(module: nn.Module) -> bool:
    """The train / eval mode ``module`` was last put in (for a pinned frozen BN, not the False it reads)."""
    return bool(module.__dict__["training"]) if is_pinned(module) else module.training


def has_fixed_statistics(module: object) -> bool:
    """A frozen BN, whose statistics never move: bntool's, or another library's (torchvision, timm, detectron2)."""
    return is_bntool_frozen(module) or is_foreign_batchnorm(module) or type(module).__name__.startswith("FrozenBatchNorm")


def is_foreign_batchnorm(module: object) -> bool:
    """A BN-like module that is no ``_BatchNorm``: running statistics, an eps, and a BatchNorm class name."""
    if isinstance(module, _BatchNorm) or is_bntool_frozen(module) or not isinstance(module, nn.Module):
        return False
    name = type(module).__name__
    if not (_BN_NAME.search(name) or "BN" in name):
        return False
    mean, var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
    eps = getattr(module, "eps", None)
    return (
        isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor) and mean.dim() == 1
        and mean.shape == var.shape and isinstance(eps, (int, float)) and not isinstance(eps, bool)
    )


def num_features(module: nn.Module) -> int:
    """Channels a BN normalizes (foreign BNs need not have ``num_features``)."""
    n = getattr(module, "num_features", None)
    if isinstance(n, int):
        return n
    return int(module.running_mean.numel())


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
    if is_bntool_frozen(module) and not is_pinned(module):
        return True
    return standard_forward(module, (nn.SyncBatchNorm, _BatchNorm))
