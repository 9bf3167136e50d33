"""The recipe: the structural changes a checkpoint's weights depend on.

A recipe is a list of JSON-able steps, each a dict with an ``"op"`` key
(``"fold"``, ``"freeze"``, ``"recalibrate"``, ...). It travels in the output
file's metadata so that ``bntool.load(path, model=MyNet())`` can replay the
same changes on a freshly built architecture before loading the weights
strictly. Each operation has a ``replay(model, step)`` that makes the
structural change only (module swaps, new bias parameters, new buffers); the
values come from the state dict afterwards. This module names no operation:
``bntool.persist`` builds the table of replays (``persist.REPLAYERS``) and
passes it to whoever replays a recipe, so no table fills on import.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

from .errors import InputError

Replayer = Callable[[nn.Module, dict[str, Any]], Any]


def replay(model: nn.Module, steps: Iterable[dict[str, Any]], replayers: Mapping[str, Replayer]) -> nn.Module:
    """Apply each recorded step's structural change to ``model`` in place, with ``replayers[op]``."""
    for index, step in enumerate(steps):
        op = step.get("op") if isinstance(step, dict) else None
        if op not in replayers:
            raise InputError(
                f"recipe step {index} has unknown op {op!r}; this file was written by a newer bntool "
                f"(known ops: {', '.join(sorted(replayers))}) — upgrade bntool to load it"
            )
        replayers[op](model, step)
    return model
