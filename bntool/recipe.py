"""The recipe: the structural changes a checkpoint's weights depend on.

A recipe is a list of JSON-able steps, each a dict with an ``"op"`` key
(``"fold"``, ``"freeze"``, ``"recalibrate"``, ...). It travels in the output
file's metadata so that ``bntool.load(path, model=MyNet())`` can replay the
same changes on a freshly built architecture before loading the weights
strictly. The operation modules register ``replay(model, step)`` for their
ops here (``register``); a replayer makes the structural change only (module
swaps, new bias parameters, new buffers), and the values come from the state
dict afterwards. This module names no operation module: whoever replays a
recipe imports the operations first (``bntool.persist`` does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from .errors import InputError

Replayer = Callable[[nn.Module, dict[str, Any]], Any]

#: op name -> ``replay(model, step)``, filled by the operation modules as they are imported
REPLAYERS: dict[str, Replayer] = {}


def register(op: str, replayer: Replayer) -> None:
    """Make ``replay`` redo steps of ``op`` with ``replayer``."""
    REPLAYERS[op] = replayer


def replay(model: nn.Module, steps: Iterable[dict[str, Any]]) -> nn.Module:
    """Apply each recorded step's structural change to ``model`` in place."""
    for index, step in enumerate(steps):
        op = step.get("op") if isinstance(step, dict) else None
        if op not in REPLAYERS:
            raise InputError(
                f"recipe step {index} has unknown op {op!r}; this file was written by a newer bntool "
                f"(known ops: {', '.join(sorted(REPLAYERS))}) — upgrade bntool to load it"
            )
        REPLAYERS[op](model, step)
    return model
