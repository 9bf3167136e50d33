"""Frozen BatchNorm modules: they normalize with their stored statistics in train and eval mode alike.

``FrozenBatchNorm1d/2d/3d`` and ``FrozenSyncBatchNorm`` never use batch
statistics nor update theirs, keep each layer's own eps and the original
state-dict keys, and convert from and to the ordinary BN types
(``from_batchnorm`` / ``to_batchnorm``). A BN subclass with a forward of its
own (timm's ``BatchNormAct2d``: normalization, then drop and activation)
cannot be replaced by one of those without losing what else it does; its
frozen form is the same module with its own ``training`` pinned to False
(``pinned_class_for``): its own code always runs as in eval mode, while its
submodules (activation, dropout) follow the model's mode. ``bntool.freezing.freeze``
swaps them in and out and proves the result.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import InputError
from .norms import has_fixed_statistics

AFFINE_MODES = ("frozen", "trainable")
NO_STATISTICS = "no running statistics (track_running_stats=False): run `bntool recalibrate` first"


class _FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics: ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``.

    ``affine`` is ``"frozen"`` (weight / bias are buffers: no optimizer or
    ``requires_grad_(True)`` loop can train them), ``"trainable"`` (they are
    parameters) or ``"none"`` (a non-affine BN: no weight, no bias). ``eps`` is
    the original layer's own and is added at forward time, never folded into
    the stored variance. ``momentum`` is unused but kept so that unfreezing
    restores it.
    """

    _version = 2  # same state-dict version as nn.BatchNorm*: num_batches_tracked present
    is_frozen_batchnorm = True  # what bntool.norms and fold look for
    unfrozen_type: type[_BatchNorm] = nn.BatchNorm2d
    input_dims: tuple[int, ...] = ()
    input_text = ""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: str = "frozen", device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__()
        if affine not in (*AFFINE_MODES, "none"):
            raise InputError(f"affine must be one of `frozen`, `trainable`, `none`, got {affine!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine_mode, self.affine, self.track_running_stats = affine, affine != "none", True
        for name, init in (("weight", torch.ones), ("bias", torch.zeros if bias else None)):
            if affine == "none" or init is None:
                self.register_parameter(name, None)
            elif affine == "trainable":
                self.register_parameter(name, nn.Parameter(init(num_features, **factory)))
            else:
                self.register_buffer(name, init(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in self.input_dims and not (not self.input_dims and input.dim() >= 2):
            raise ValueError(f"{type(self).__name__} expected {self.input_text} input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine_mode}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # Like nn.BatchNorm*: checkpoints from before num_batches_tracked existed (and torchvision's
        # FrozenBatchNorm2d) lack the key; keep ours instead of reporting it missing.
        if local_metadata.get("version") is None or local_metadata["version"] < 2:
            state_dict.setdefault(prefix + "num_batches_tracked", self.num_batches_tracked)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm, affine: str = "frozen") -> _FrozenBatchNorm:
        """A frozen copy of ``bn`` (values cloned, each tensor's dtype and device kept)."""
        mode = "none" if bn.weight is None else affine
        frozen = cls(bn.num_features, bn.eps, bn.momentum, mode, bias=bn.bias is not None)
        _copy_tensors(bn, frozen, as_parameters=mode == "trainable")
        _share_hooks(bn, frozen)
        return frozen.train(bn.training)

    def to_batchnorm(self) -> _BatchNorm:
        """An ordinary ``unfrozen_type`` with the same values; weight / bias trainable again."""
        bn = self.unfrozen_type(self.num_features, self.eps, self.momentum, affine=self.weight is not None)
        if self.weight is not None and self.bias is None:
            bn.register_parameter("bias", None)
        _copy_tensors(self, bn, as_parameters=True)
        _share_hooks(self, bn)
        return bn.train(self.training)


def _share_hooks(source: nn.Module, target: nn.Module) -> None:
    """``target`` runs ``source``'s hooks, from the same tables: a handle taken on ``source`` still removes one."""
    target.__dict__.update(_hook_tables(source))


def _hook_tables(module: nn.Module) -> dict[str, Any]:
    """The module's hook tables (``_forward_hooks``, ``_forward_pre_hooks_with_kwargs``, ...), by attribute."""
    return {k: v for k, v in module.__dict__.items() if "_hooks" in k}


def _copy_tensors(source: nn.Module, target: nn.Module, *, as_parameters: bool) -> None:
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        tensor = getattr(source, name)
        if tensor is None:
            continue
        tensor = tensor.detach().clone()
        if name in ("weight", "bias") and as_parameters:
            target.register_parameter(name, nn.Parameter(tensor, requires_grad=True))
        else:
            target._parameters.pop(name, None)
            target.register_buffer(name, tensor)


class FrozenBatchNorm1d(_FrozenBatchNorm):
    """Frozen form of ``nn.BatchNorm1d``: input (N, C) or (N, C, L)."""

    unfrozen_type, input_dims, input_text = nn.BatchNorm1d, (2, 3), "2D or 3D"


class FrozenBatchNorm2d(_FrozenBatchNorm):
    """Frozen form of ``nn.BatchNorm2d``: input (N, C, H, W)."""

    unfrozen_type, input_dims, input_text = nn.BatchNorm2d, (4,), "4D"


class FrozenBatchNorm3d(_FrozenBatchNorm):
    """Frozen form of ``nn.BatchNorm3d``: input (N, C, D, H, W)."""

    unfrozen_type, input_dims, input_text = nn.BatchNorm3d, (5,), "5D"


class FrozenSyncBatchNorm(_FrozenBatchNorm):
    """Frozen form of ``nn.SyncBatchNorm``: any input of 2 or more dims, like SyncBatchNorm itself.

    Fixed statistics need no cross-process reduction, so it runs anywhere, with
    or without a process group. Unfreezing gives an ``nn.SyncBatchNorm`` on the
    default process group.
    """

    unfrozen_type, input_dims, input_text = nn.SyncBatchNorm, (), "at least 2D"


FROZEN_FOR = ((nn.SyncBatchNorm, FrozenSyncBatchNorm), (nn.BatchNorm1d, FrozenBatchNorm1d),
               (nn.BatchNorm2d, FrozenBatchNorm2d), (nn.BatchNorm3d, FrozenBatchNorm3d))


class _PinnedEval:
    """The frozen form of a BN class with a forward of its own: that class, with its ``training`` pinned to False.

    Generated per class by ``pinned_class_for`` (named ``Frozen<Class>``, a
    subclass of it, so ``isinstance`` still holds). Reading ``training`` gives
    False, so the class's own forward normalizes with the stored statistics
    and never updates them; setting it (``model.train()``) records the mode
    asked for, which ``train()`` still passes on to the submodules. The
    module keeps its state-dict keys; with ``affine="frozen"`` its weight and
    bias are buffers. Recalibration lifts the pin for its pass
    (``_bntool_unpinned``), so the module then trains its statistics as its
    unfrozen form would.
    """

    is_frozen_batchnorm = True
    pins_eval = True  # what bntool.norms looks for: the forward is the class's own, not plain BatchNorm
    _base: type[_BatchNorm]

    @property
    def training(self) -> bool:
        state = self.__dict__
        return bool(state.get("training", False)) and bool(state.get("_bntool_unpinned", False))

    @training.setter
    def training(self, mode: bool) -> None:
        self.__dict__["training"] = mode

    @property
    def unfrozen_type(self) -> type[_BatchNorm]:
        return type(self)._base

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm, affine: str = "frozen") -> nn.Module:
        """A frozen copy of ``bn``: its own tensors cloned, its submodules shared, its mode kept (as asked for)."""
        mode = "none" if bn.weight is None and bn.bias is None else affine
        frozen = _module_copy(bn, cls, affine_as_buffers=mode == "frozen")
        frozen.__dict__["affine_mode"] = mode
        return frozen

    def to_batchnorm(self) -> _BatchNorm:
        """The unfrozen class again, with the same values; weight / bias trainable again."""
        bn = _module_copy(self, type(self)._base, affine_as_buffers=False)
        for key in ("affine_mode", "_bntool_unpinned"):
            bn.__dict__.pop(key, None)
        return bn

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, frozen: affine={self.__dict__.get('affine_mode')}"

    def __reduce_ex__(self, protocol: int):
        # pickle and deepcopy find the generated class through the class it pins, which they can import
        return _pinned_instance, (type(self)._base,), self.__dict__.copy()


_PINNED: dict[type, type] = {}


def pinned_class_for(base: type[_BatchNorm]) -> type:
    """``Frozen<base>``: ``base`` with its own ``training`` pinned to False (see ``_PinnedEval``)."""
    if base not in _PINNED:
        where = f"{base.__module__}.{base.__qualname__}"
        _PINNED[base] = type(f"Frozen{base.__name__}", (_PinnedEval, base), {
            "_base": base, "__module__": __name__, "__qualname__": f"Frozen[{where}]",  # (one per class: not importable)
            "__doc__": f"`{where}` frozen by bntool: its own code runs as in eval mode."})
    return _PINNED[base]


def _pinned_instance(base: type[_BatchNorm]) -> nn.Module:
    return object.__new__(pinned_class_for(base))


def _module_copy(module: nn.Module, cls: type, *, affine_as_buffers: bool) -> nn.Module:
    """``module`` as an instance of ``cls``: its own tensors cloned, its submodules and hook tables shared.

    The rest of its state is deep-copied with the module mapped to the copy,
    as ``copy.deepcopy`` does, so a forward bound to the module (a wrapper's
    hook) is bound to the copy. Hook tables are shared, so a handle taken
    before still removes its hook. ``weight`` / ``bias`` become buffers with
    ``affine_as_buffers`` and trainable parameters otherwise, under the same
    state-dict keys (in the same order, unless the class has parameters of
    its own besides them). A ``module.compile()`` is dropped: it compiled the
    old module's call.
    """
    copied = object.__new__(cls)
    params, buffers, children = module._parameters, module._buffers, module._modules
    memo: dict[int, Any] = {id(module): copied}
    memo.update((id(t), t) for t in (*params.values(), *buffers.values()) if t is not None)  # (cloned below)
    memo.update((id(m), m) for m in children.values() if m is not None)
    memo.update((id(v), v) for v in _hook_tables(module).values())
    state = copy.deepcopy({k: v for k, v in module.__dict__.items()
                           if k not in ("_parameters", "_buffers", "_modules", "_compiled_call_impl")}, memo)
    affine = {key: params.get(key, buffers.get(key)) for key in ("weight", "bias")}
    state.get("_non_persistent_buffers_set", set()).difference_update(affine)
    moved = {key: t.detach().clone() for key, t in affine.items() if t is not None}
    as_buffers = moved if affine_as_buffers else {}
    as_parameters = {key: nn.Parameter(moved[key]) if key in moved else None  # (an absent one: a None parameter)
                     for key in affine if key not in as_buffers}
    state["_parameters"] = type(params)({**as_parameters, **{
        k: None if p is None else nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        for k, p in params.items() if k not in affine}})
    state["_buffers"] = type(buffers)({**as_buffers, **{
        k: None if b is None else b.detach().clone() for k, b in buffers.items() if k not in affine}})
    state["_modules"] = type(children)(children)
    if "_compiled_call_impl" in module.__dict__:
        state["_compiled_call_impl"] = None
    copied.__dict__.update(state)  # (``training`` too: set directly, what the module was asked for)
    return copied


def frozen_type_for(module: nn.Module) -> type | None:
    """The frozen class for ``module``: bntool's own for a plain torch BN, the pinned class for a BN subclass
    with a forward of its own (or a direct ``_BatchNorm`` subclass), None for anything else."""
    if getattr(type(module), "pins_eval", False):
        return type(module)
    torch_type = next(((t, f) for t, f in FROZEN_FOR if isinstance(module, t)), None)
    if torch_type is not None and type(module).forward is torch_type[0].forward:
        return torch_type[1]
    if isinstance(module, _BatchNorm):
        return pinned_class_for(type(module))
    return None


def why_not_freezable(module: nn.Module) -> str | None:
    """Why ``module`` cannot be swapped for a frozen BN as it is, or None."""
    if has_fixed_statistics(module):
        return f"already frozen (`{type(module).__name__}`)"
    if frozen_type_for(module) is None:
        return f"`{type(module).__name__}` is not a torch BatchNorm or a subclass of one; freeze it by hand"
    if not module.track_running_stats or module.running_mean is None:
        return NO_STATISTICS
    return None

