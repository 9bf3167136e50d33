"""Who feeds whom: a model's forward as a list of operations in execution order.

Every module call, tensor operation, model input and output becomes an ``Op``
that names the ops whose outputs it reads as data (shape and dtype queries are
not data reads: ``x.size(0)``, ``y.reshape_as(x)``'s ``x``). Module calls are
listed per module, so a module called twice has two ops. The fold rules in
``foldrules.py`` decide from these facts alone.

Two ways to see the dataflow:

* ``torch.fx`` symbolic tracing, when the model traces: the whole program,
  every branch. BN-like, conv and linear modules (subclasses included) are leaves.
* Recording a real forward pass on the example inputs, when fx cannot trace
  (data-dependent control flow...): module hooks on the leaf modules plus a
  ``TorchFunctionMode`` that sees every tensor operation between them.
  Tensors are identified by ``(id, _version)``, so an in-place op (``relu_``,
  ``+=``) between a conv and its BN is seen as standing between them. Only
  the branches the inputs take are seen; the report says so.

Ops that are transparent to a fold are marked: a multiply / add / subtract /
divide by a Python number is ``affine`` (``y = a * x + s``), and a reshape that
keeps the order of the elements (``flatten``, ``view``, ``reshape``,
``unsqueeze``...) is ``reshape``. The input and output shapes of module calls
are measured by one hooked forward pass, only when a fold rule needs them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import first_line
from ..norms import is_batchnorm
from .fx import fx_ops, measure_shapes, trace_scalars
from .ops import Op, Shape
from .recorded import recorded_ops


@dataclass(frozen=True)
class BNSite:
    """What feeds one BN and what reads it (its first call), for reports."""

    bn: str
    producer: str | None  # the module whose output the BN reads directly
    producer_op: str | None  # else the operation that produced it ("input" for a model input)
    consumers: tuple[str, ...]  # everything that reads the BN's output ("output" = model output)


@dataclass
class Dataflow:
    ops: tuple[Op, ...]
    method: str  # "fx" or "recorded"
    note: str = ""
    shapes: dict[int, tuple[Shape | None, Shape | None]] | None = None  # module op -> (input, output) shape
    measure: Callable[[], dict[int, tuple[Shape | None, Shape | None]]] | None = field(default=None, repr=False)
    readers: dict[int, tuple[int, ...]] = field(init=False)
    calls: dict[str, tuple[int, ...]] = field(init=False)
    #: model tensors the forward reads directly (``conv.weight``), and the ops that read them
    tensor_reads: tuple[Op, ...] = field(init=False)

    def __post_init__(self) -> None:
        readers: defaultdict[int, list[int]] = defaultdict(list)
        calls: defaultdict[str, list[int]] = defaultdict(list)
        for op in self.ops:
            for i in dict.fromkeys(op.inputs):
                readers[i].append(op.index)
            if op.kind == "module":
                calls[op.target].append(op.index)
        self.readers = {i: tuple(r) for i, r in readers.items()}
        self.calls = {name: tuple(c) for name, c in calls.items()}
        self.tensor_reads = tuple(op for op in self.ops if op.kind == "attr")

    def readers_of(self, index: int) -> tuple[int, ...]:
        return self.readers.get(index, ())

    def shape(self, index: int) -> tuple[Shape | None, Shape | None]:
        """Input and output shape of a module call (a forward pass measures them the first time); unknown: None."""
        if self.shapes is None:
            self.shapes = self.measure() if self.measure is not None else {}
        return self.shapes.get(index, (None, None))

    @property
    def sites(self) -> dict[str, BNSite]:
        sites = {}
        for name, calls in self.calls.items():
            op = self.ops[calls[0]]
            if op.kind != "module" or name in sites or not op.inputs:
                continue
            source = self.ops[op.inputs[0]]
            consumers = tuple(dict.fromkeys(self.ops[r].target for r in self.readers_of(op.index)))
            sites[name] = BNSite(name, source.target if source.kind == "module" else None,
                                 None if source.kind == "module" else source.target, consumers)
        return sites


def bn_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if is_batchnorm(m)]


def dataflow(model: nn.Module, example_inputs: Sequence[torch.Tensor] | None) -> Dataflow:
    """The model's dataflow: fx when the model traces, else a recorded forward pass.

    fx runs the forward on proxies, and a forward that stores what it computes
    (a cache keyed by device, say) would keep proxies: the trace runs on a
    clone (sharing the tensors, in eval mode), never on the user's modules.
    """
    try:
        graph, scalars = trace_scalars(model)
    except Exception as exc:  # fx raises many types for untraceable code
        if example_inputs is None:
            raise
        reason = first_line(exc, 200)
        ops, shapes = recorded_ops(model, example_inputs)
        return Dataflow(ops, "recorded", f"torch.fx cannot trace the model ({reason}); dataflow was recorded "
                        "from a forward pass on the verification inputs, so only the branches they take are seen",
                        shapes=shapes)
    ops = fx_ops(model, graph, scalars)
    flow = Dataflow(ops, "fx")
    if example_inputs is not None:
        flow.measure = lambda: measure_shapes(model, example_inputs, flow.calls)
    return flow

