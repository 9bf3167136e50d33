"""Every place a module sits, so that a replaced module is replaced everywhere.

A module can sit in a model under several names (an alias: one ``nn.Module``
registered twice, in ``nn.ModuleList`` / ``nn.ModuleDict`` too), and in
attributes the model does not register: a plain list a forward loops over
(mmpose's ``CrossFFN.layers``, which a converter that walks registered
children misses), a tuple, a dict, or a plain attribute. ``replace_all``
puts each replacement in every one of those places, writing a container's
registered children directly (``_modules``), so that a foreign container
whose ``add_module`` refuses other module types (e2cnn's) is not asked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

_REGISTERED = ("_parameters", "_buffers", "_modules")


def replace_all(model: nn.Module, replacements: Mapping[int, nn.Module]) -> nn.Module:
    """Replace, by object identity, every module in ``replacements`` wherever it sits in ``model``; return the
    model (the replacement of ``model`` itself when it is one of them)."""
    if not replacements:
        return model
    root = replacements.get(id(model), model)
    seen: set[int] = set()
    stack = [root]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        for name, child in list(module._modules.items()):
            if child is not None and id(child) in replacements:
                child = module._modules[name] = replacements[id(child)]
            if child is not None:
                stack.append(child)
        for key, value in list(module.__dict__.items()):
            if key in _REGISTERED or "hooks" in key:
                continue
            new = _swapped(value, replacements, stack, depth=0)
            if new is not value:
                module.__dict__[key] = new
    return root


def _swapped(value: Any, replacements: Mapping[int, nn.Module], stack: list[nn.Module], depth: int) -> Any:
    """``value`` with replaced modules swapped in: a module, or a list / tuple / dict holding modules (nested a few
    levels); a list or dict is changed in place (whoever else holds it sees the change), a tuple rebuilt."""
    if isinstance(value, nn.Module):
        new = replacements.get(id(value), value)
        stack.append(new)
        return new
    if depth > 3:
        return value
    if isinstance(value, list):
        for i, item in enumerate(value):
            new = _swapped(item, replacements, stack, depth + 1)
            if new is not item:
                value[i] = new
        return value
    if isinstance(value, dict):
        for key, item in list(value.items()):
            new = _swapped(item, replacements, stack, depth + 1)
            if new is not item:
                value[key] = new
        return value
    if type(value) is tuple:
        items = tuple(_swapped(item, replacements, stack, depth + 1) for item in value)
        return items if any(a is not b for a, b in zip(items, value)) else value
    return value
