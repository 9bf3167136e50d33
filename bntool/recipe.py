"""The recipe: the structural changes a checkpoint's weights depend on.

A recipe is a list of JSON-able steps, each a dict with an ``"op"`` key
(``"fold"``, ``"freeze"``, ``"recalibrate"``, ...). It travels in the output
file's metadata so that ``bntool.load(path, model=MyNet())`` can replay the
same changes on a freshly built architecture before loading the weights
strictly. Each op's module provides ``replay(model, step)``, which makes the
structural change only (module swaps, new bias parameters, new buffers); the
values come from the state dict afterwards.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

from torch import nn

from .errors import InputError

#: op name -> module providing ``replay(model, step)``; imported on demand.
REPLAYERS = {
    "fold": "bntool.folding",
    "freeze": "bntool.freezing",
    "unfreeze": "bntool.freezing",
    "recalibrate": "bntool.recalibration",
}


def replay(model: nn.Module, steps: Iterable[dict[str, Any]]) -> nn.Module:
    """Apply each recorded step's structural change to ``model`` in place."""
    for index, step in enumerate(steps):
        op = step.get("op") if isinstance(step, dict) else None
        if op not in REPLAYERS:
            raise InputError(
                f"recipe step {index} has unknown op {op!r}; this file was written by a newer bntool "
                f"(known ops: {', '.join(sorted(REPLAYERS))}) — upgrade bntool to load it"
            )
        importlib.import_module(REPLAYERS[op]).replay(model, step)
    return model
