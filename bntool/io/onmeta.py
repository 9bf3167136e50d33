"""A model built on the meta device and given the file's tensors: loading at 1x the checkpoint, not 2x.

Building a model allocates and randomly initializes every weight, only for
the file's tensors to be copied over them: twice the checkpoint in memory at
the peak, and on ResNet-50 about a second of CPU for the initialization.
``build_loaded`` builds the model under ``torch.device("meta")`` (no memory,
no initialization), replays the file's recipe on it, and assigns the file's
tensors (``load_state_dict(assign=True)``): the model then holds the very
tensors read from the file (memory-mapped where the format allows), cast
only where the file's dtype differs from the model's.

Not every factory allows it. A model is built normally instead, with the
reason given back, when building on the meta device raises (a constructor
that reads values: ``.item()``, a decomposition), when the model shares a
tensor between two places (assigning would untie them), or when, once the
file's tensors are in, any tensor the model holds is still on the meta
device (a non-persistent buffer or a plain tensor attribute computed in the
constructor, which the file does not hold): the normal build has them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import InputError, first_line
from ..recipe import Replayer
from .checkpoint import Loaded
from .matching import Resolved, load_state


def build_loaded(build: Callable[[], nn.Module], loaded: Loaded, *, replayers: Mapping[str, Replayer],
                 strip_prefix: bool = True) -> tuple[nn.Module, Resolved, str | None]:
    """``build()`` with ``loaded``'s weights: built on the meta device and assigned where that gives the same
    model, else built and loaded normally. Returns the model, what was loaded, and why the normal path was taken
    (None when the model was built on the meta device)."""
    reason = None
    try:
        with torch.device("meta"):
            model = build()
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the factory on the meta device means: build normally
        model, reason = None, f"building it on the meta device failed ({first_line(exc, 160)})"
    if model is not None:
        reason = _why_not_assignable(model)
    if reason is None:
        resolved = load_state(model, loaded, replayers=replayers, strip_prefix=strip_prefix, assign=True)
        reason = _left_on_meta(model)
        if reason is None:
            return model, resolved, None
    model = build()
    return model, load_state(model, loaded, replayers=replayers, strip_prefix=strip_prefix), reason


def _why_not_assignable(model: nn.Module) -> str | None:
    seen: dict[int, str] = {}
    for name, tensor in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
        if tensor is None:
            continue
        if id(tensor) in seen and seen[id(tensor)] != name:
            return f"`{seen[id(tensor)]}` and `{name}` are one tensor, which assigning would untie"
        seen.setdefault(id(tensor), name)
        if type(tensor).__name__ == "UninitializedParameter" or type(tensor).__name__ == "UninitializedBuffer":
            return f"`{name}` is an uninitialized lazy tensor"
    return None


def _left_on_meta(model: nn.Module) -> str | None:
    """The first tensor of ``model`` (parameter, buffer, or plain tensor attribute) still on the meta device."""
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor is not None and tensor.is_meta:
            return f"`{name}` is not in the file and was computed by the constructor"
    for module_name, module in model.named_modules():
        for key, value in vars(module).items():
            if _holds_meta(value):
                where = f"{module_name}.{key}" if module_name else key
                return f"`{where}` is a tensor the constructor computed, which the file does not hold"
    return None


def _holds_meta(value: Any, depth: int = 0) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_meta
    if depth < 2 and isinstance(value, (list, tuple)):
        return any(_holds_meta(v, depth + 1) for v in value)
    if depth < 2 and isinstance(value, dict):
        return any(_holds_meta(v, depth + 1) for v in value.values())
    return False
