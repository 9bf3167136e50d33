"""Copies of a module tree that share chosen tensors with the original.

``clone(model, share)`` is ``copy.deepcopy(model)`` except that the tensors in
``share`` are not copied: the copy holds the very same tensor objects. Surgery
that replaces those tensors in the copy (folding gives a conv new weights; a
folded BN goes away) then never pays for copying them, and never changes the
original, which still holds its own.

``on_cpu(model)`` is the model on the CPU without touching it: itself when
it is there already, else a module-tree copy holding CPU copies of its tensors.

It is also several times faster than ``copy.deepcopy`` on a module tree:
modules are rebuilt directly (``__new__`` plus their attribute dicts) instead
of through pickling's ``__reduce_ex__`` machinery. A module class that
customises copying or pickling is copied with ``copy.deepcopy``, sharing the
same tensors.
"""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

_ATOMIC = (type(None), bool, int, float, complex, str, bytes, type, torch.dtype, torch.device)
_ATOMIC_TYPES = frozenset(_ATOMIC)
_EMPTY_COPIES = (dict, OrderedDict, set, list)


def clone(model: nn.Module, share: Iterable[torch.Tensor] = (), keep: Iterable[nn.Module] = (), *,
          share_all: bool = False, eval_mode: bool = False) -> nn.Module:
    """A deep copy of ``model`` in which the tensors of ``share`` (every parameter and buffer with
    ``share_all``) and the submodules of ``keep`` are the original objects (a kept submodule is the caller's to
    replace before anyone uses the copy). ``eval_mode``: the copy is in eval mode, as ``.eval()`` would leave it
    (through ``.eval()`` itself when a module's class has a ``train`` of its own)."""
    memo: dict[Any, Any] = {id(t): t for t in share}
    memo.update((id(m), m) for m in keep)
    if share_all:
        memo[_SHARE_ALL] = True
    plain_train = eval_mode and all(type(m).train is nn.Module.train for m in model.modules())
    if plain_train:
        memo[_EVAL] = True
    copy_ = _copy_module(model, memo)
    return copy_.eval() if eval_mode and not plain_train else copy_


_SHARE_ALL = "share every parameter and buffer"  # memo keys (deepcopy's own keys are ints)
_EVAL = "copies in eval mode"


@functools.lru_cache(maxsize=None)
def _plain(cls: type) -> bool:
    """Whether instances of ``cls`` copy like a plain ``nn.Module``: their state is their ``__dict__``.

    (A ``__setstate__`` that only fills in attributes missing from old pickles,
    as convolutions have, does not matter: the copy has every attribute.)
    """
    if getattr(cls, "pins_eval", False):  # a frozen BN class of bntool's (its own pickling aside): as its base
        return _plain(cls._base)
    return (
        getattr(cls, "__deepcopy__", None) is None
        and cls.__reduce_ex__ is object.__reduce_ex__
        and cls.__reduce__ is object.__reduce__
        and getattr(cls, "__getstate__", object.__getstate__) in (object.__getstate__, nn.Module.__getstate__)
        and not hasattr(cls, "__slots__")
    )


def _copy_module(module: nn.Module, memo: dict[Any, Any]) -> nn.Module:
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    if not _plain(cls):
        if _SHARE_ALL in memo:
            memo.update((id(t), t) for t in (*module.parameters(), *module.buffers()))
        return copy.deepcopy(module, memo)
    new = cls.__new__(cls)
    memo[id(module)] = new
    state = {}
    for key, value in module.__dict__.items():
        kind = type(value)
        if kind in _ATOMIC_TYPES:  # (most attributes: by exact type first, the cheapest test)
            state[key] = value
        elif kind in _EMPTY_COPIES and not value:  # the hook and buffer-name containers, mostly empty
            state[key] = kind()
        elif key == "_modules":
            state[key] = {n: None if m is None else _copy_module(m, memo) for n, m in value.items()}
        elif key in ("_parameters", "_buffers"):
            state[key] = {n: None if t is None else _copy_tensor(t, memo) for n, t in value.items()}
        elif kind is tuple and all(type(v) in _ATOMIC_TYPES for v in value):  # (kernel_size, stride, ...)
            state[key] = value
        elif isinstance(value, _ATOMIC) or (kind is tuple and all(isinstance(v, _ATOMIC) for v in value)):
            state[key] = value
        else:
            state[key] = copy.deepcopy(value, memo)
    if _EVAL in memo and "training" in state:
        state["training"] = False
    new.__dict__.update(state)
    return new


def _copy_tensor(tensor: torch.Tensor, memo: dict[Any, Any]) -> torch.Tensor:
    if id(tensor) in memo:
        return memo[id(tensor)]
    if _SHARE_ALL in memo:
        return tensor
    return copy.deepcopy(tensor, memo)


def on_cpu(model: nn.Module) -> nn.Module:
    """``model`` itself when it is on the CPU, else a module-tree copy holding CPU copies of its tensors (the
    model's own tensors untouched)."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device.type == "cpu" for t in tensors):
        return model
    moved = clone(model, share_all=True)  # the module tree; its tensors are replaced below, never the model's
    for module in moved.modules():
        for store in (module._parameters, module._buffers):
            for key, tensor in store.items():
                if tensor is not None and tensor.device.type != "cpu":
                    cpu = tensor.detach().cpu()
                    store[key] = nn.Parameter(cpu, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else cpu
    return moved
