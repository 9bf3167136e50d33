"""One BN layer in its synchronized or plain form, a BN subclass keeping what else its forward does.

A plain ``nn.BatchNorm1d/2d/3d`` becomes an ``nn.SyncBatchNorm`` and back
(the rank of the plain class is the one the layer was called with). A BN
subclass with a forward of its own (timm's ``BatchNormAct2d``: normalize,
drop, activation) cannot become a bare SyncBatchNorm without losing the
rest of its forward (what ``SyncBatchNorm.convert_sync_batchnorm`` does);
its converted form is a class generated from it:

* ``sync_class_for(Base)`` derives from ``Base`` and ``nn.SyncBatchNorm``:
  ``Base.forward`` runs as written, and its ``batch_norm`` call on the
  module's own tensors (the normalization; found by those tensors, not by
  class) is replaced by the synchronized one, decided as
  ``nn.SyncBatchNorm.forward`` decides (``sync_batch_norm``);
* ``plain_class_for(Base)`` for a subclass of ``nn.SyncBatchNorm``: its
  ``nn.SyncBatchNorm.forward`` (what ``super().forward`` reaches) is the plain
  ``_BatchNorm.forward``, so it never synchronizes.

Converting a generated class back gives its ``Base`` again. Tensors keep
their objects' values (cloned), dtype, device, ``requires_grad`` and
state-dict keys; submodules and hook tables are shared, ``training`` kept.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

PLAIN_FOR_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
PLAIN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def sync_batch_norm(module: nn.Module, input: torch.Tensor, running_mean, running_var, weight, bias,
                    training: bool, momentum: float, eps: float) -> torch.Tensor:
    """``F.batch_norm``'s arguments, normalized as ``nn.SyncBatchNorm.forward`` would: synchronized across the
    process group (``module.process_group``, else the world) in training with more than one process, plainly
    otherwise; on the CPU with a process group initialized, torch's own error."""
    if training and dist.is_available() and dist.is_initialized():
        if input.device.type not in ("cuda", "hpu", "xpu", torch._C._get_privateuse1_backend_name()):
            raise ValueError(f"SyncBatchNorm expected input tensor to be on GPU or XPU or "
                             f"{torch._C._get_privateuse1_backend_name()}")
        group = getattr(module, "process_group", None) or dist.group.WORLD
        world_size = dist.get_world_size(group)
        if world_size > 1:
            from torch.nn.modules._functions import SyncBatchNorm as _SyncFunction

            return _SyncFunction.apply(input, weight, bias, running_mean, running_var, eps, momentum, group,
                                       world_size)
    return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


class _OwnNormalization(TorchFunctionMode):
    """While a module's forward runs: its ``batch_norm`` calls on its own tensors are synchronized."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm and isinstance(args[0] if args else kwargs.get("input"), torch.Tensor):
            bound = _batch_norm_args(*args, **kwargs)
            own = [t for t in (self.module._buffers.get("running_mean"), self.module._buffers.get("running_var"),
                               self.module._parameters.get("weight", self.module._buffers.get("weight")),
                               self.module._parameters.get("bias", self.module._buffers.get("bias")))
                   if t is not None]
            if any(bound[key] is t for key in ("running_mean", "running_var", "weight", "bias") for t in own):
                return sync_batch_norm(self.module, **bound)
        return func(*args, **kwargs)


def _batch_norm_args(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                     eps=1e-5) -> dict[str, Any]:
    return {"input": input, "running_mean": running_mean, "running_var": running_var, "weight": weight,
            "bias": bias, "training": training, "momentum": momentum, "eps": eps}


class _Converted:
    """What the generated classes share: their base, pickling through it, a repr that says what they are."""

    _base: type[_BatchNorm]
    _to: str

    def __reduce_ex__(self, protocol: int):
        # pickle and deepcopy find the generated class through the class it converts, which they can import
        return _converted_instance, (self._to, type(self)._base), self.__dict__.copy()


class _SyncForm(_Converted):
    _to = "syncbatchnorm"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with _OwnNormalization(self):
            return super().forward(*args, **kwargs)


class _PlainSync(nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` whose forward is the plain one (it never synchronizes)."""

    forward = _BatchNorm.forward


class _PlainForm(_Converted):
    _to = "batchnorm"


_GENERATED: dict[tuple[str, type], type] = {}


def sync_class_for(base: type[_BatchNorm]) -> type:
    """``base`` with its normalization synchronized (and an ``nn.SyncBatchNorm``), generated once per class."""
    key = ("syncbatchnorm", base)
    if key not in _GENERATED:
        _GENERATED[key] = _generated(f"Sync{base.__name__}", (_SyncForm, base, nn.SyncBatchNorm), base,
                                     "synchronized")
    return _GENERATED[key]


def plain_class_for(base: type[nn.SyncBatchNorm]) -> type:
    """``base`` (an ``nn.SyncBatchNorm`` subclass) with ``nn.SyncBatchNorm.forward`` plain, generated once per class."""
    key = ("batchnorm", base)
    if key not in _GENERATED:
        name = base.__name__.replace("Sync", "", 1) if "Sync" in base.__name__ else f"Plain{base.__name__}"
        _GENERATED[key] = _generated(name, (_PlainForm, base, _PlainSync), base, "not synchronized")
    return _GENERATED[key]


def _generated(name: str, bases: tuple[type, ...], base: type, what: str) -> type:
    where = f"{base.__module__}.{base.__qualname__}"
    return type(name, bases, {"_base": base, "__module__": __name__, "__qualname__": f"{name}[{where}]",
                              "__doc__": f"`{where}` converted by bntool: its normalization {what}."})


def _converted_instance(to: str, base: type) -> nn.Module:
    cls = sync_class_for(base) if to == "syncbatchnorm" else plain_class_for(base)
    return object.__new__(cls)


def generated_base(module: nn.Module) -> type | None:
    """The class a generated form was made from, or None for any other module."""
    return getattr(type(module), "_base", None) if isinstance(module, _Converted) else None


def converted_type(module: nn.Module, to: str, rank: int | None = None) -> type | None:
    """The class ``module`` becomes (``to``: ``batchnorm`` / ``syncbatchnorm``), or None when it is one already.

    ``rank``: the input rank a plain ``nn.SyncBatchNorm`` was called with (its plain class depends on it).
    """
    base = generated_base(module)
    if base is not None:
        return None if type(module)._to == to else base
    cls = type(module)
    if to == "syncbatchnorm":
        if isinstance(module, nn.SyncBatchNorm):
            return None
        return nn.SyncBatchNorm if cls in PLAIN_TYPES else sync_class_for(cls)
    if not isinstance(module, nn.SyncBatchNorm):
        return None
    if cls is nn.SyncBatchNorm:
        return PLAIN_FOR_RANK.get(rank) if rank is not None else None
    return plain_class_for(cls)


def converted(module: _BatchNorm, cls: type, process_group: Any = None) -> nn.Module:
    """``module`` as an instance of ``cls``: its own tensors cloned (``requires_grad`` kept), submodules and hook
    tables shared, the rest of its state copied, ``process_group`` set on a synchronized form."""
    new = object.__new__(cls)
    params, buffers, children = module._parameters, module._buffers, module._modules
    memo: dict[int, Any] = {id(module): new}
    memo.update((id(t), t) for t in (*params.values(), *buffers.values()) if t is not None)  # (cloned below)
    memo.update((id(m), m) for m in children.values() if m is not None)
    memo.update((id(v), v) for k, v in module.__dict__.items() if "_hooks" in k)
    skip = ("_parameters", "_buffers", "_modules", "_compiled_call_impl", "process_group")
    state = copy.deepcopy({k: v for k, v in module.__dict__.items() if k not in skip}, memo)
    state["_parameters"] = type(params)({
        k: None if p is None else nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        for k, p in params.items()})
    state["_buffers"] = type(buffers)({k: None if b is None else b.detach().clone() for k, b in buffers.items()})
    state["_modules"] = type(children)(children)
    if "_compiled_call_impl" in module.__dict__:
        state["_compiled_call_impl"] = None  # it compiled the old module's call
    if issubclass(cls, nn.SyncBatchNorm):
        state["process_group"] = process_group
    new.__dict__.update(state)
    return new
