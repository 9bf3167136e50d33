"""When each value of a dataflow is read for the last time, so that what was computed for it can go.

The branch-merge planner (``merge``) gives every op linear in an earlier value
its ``Linear`` form: float64 kernels, twice the layer's own weight. Kept for
every op, they came to four times the model (a 1 GB checkpoint planned in
5 GB). A form is needed only until the last op that reads its value has been
planned (reading through an identity module counts as reading it later, when
the identity's own reader is planned); ``Expiry`` tells the planner which forms
no op will read again, and drops their tensors while keeping what the plan's
bookkeeping reads (the source, the members, the branches).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..graph.dataflow import Dataflow
from ..graph.ops import Op


def passes_through(op: Op) -> bool:
    """An identity module (``nn.Identity``, dropout in eval): its readers read its input's form."""
    return op.affine == (1.0, 0.0) and len(op.inputs) == 1 and op.kind == "module"


def last_uses(flow: Dataflow) -> dict[int, int]:
    """For each op, the index of the last op that reads its value (directly or through identity modules)."""
    last: dict[int, int] = {}
    for op in reversed(flow.ops):  # (readers come later in execution order: theirs are known first)
        last[op.index] = max((max(r, last[r]) if passes_through(flow.ops[r]) else r
                              for r in flow.readers_of(op.index)), default=op.index)
    return last


class Expiry:
    """``forget(forms, index)`` before planning op ``index``: the forms no op from ``index`` on reads lose their
    tensors (their entry stays, with the form None), unless ``keep(entry)`` (a form that may become a region)."""

    def __init__(self, flow: Dataflow, keep: Callable[[tuple[Any, ...]], bool]) -> None:
        self.keep = keep
        self.after: dict[int, list[int]] = {}
        for value, last in last_uses(flow).items():
            self.after.setdefault(last + 1, []).append(value)

    def forget(self, forms: dict[int, tuple[Any, ...]], index: int) -> None:
        for value in self.after.pop(index, ()):
            entry = forms.get(value)
            if entry is not None and entry[1] is not None and not self.keep(entry):
                forms[value] = (entry[0], None, *entry[2:])
