"""The walks from one BN call, through the ops that fold keeps, to the layer at the other end.

``upstream`` follows the BN's input back to the module that produced it,
``downstream`` its output forward to the one module that reads it. Both carry
what stands between (multiplies and adds by numbers, as ``(a, s)``; whether a
reshape was crossed) and stop with a ``blocker`` (the reason, in the plan's
words) at anything fold cannot see through. ``rules`` decides from the links.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from ..graph.dataflow import Dataflow
from ..graph.ops import is_layer_function
from . import reasons


@dataclass(frozen=True)
class Link:
    """The path from one BN call to the module at its other end, through ops that are kept."""

    module: str | None = None
    op: int = -1
    through: tuple[float, float] = (1.0, 0.0)
    reshaped: bool = False
    blocker: str | None = None


def upstream(flow: Dataflow, call: int) -> Link:
    op = flow.ops[call]
    if not op.inputs:
        return Link(blocker="it is called without a tensor input")
    current, index = call, op.inputs[0]
    a, s, reshaped = 1.0, 0.0, False
    while True:
        source = flow.ops[index]
        others = [r for r in flow.readers_of(index) if r != current]
        if others:
            return Link(blocker=reasons.also_read(source.target, [flow.ops[r].target for r in others]))
        if source.kind == "input":
            return Link(blocker=reasons.GRAPH_INPUT)
        if source.kind == "module" and source.affine is None and not source.reshape:
            return Link(source.target, index, (a, s), reshaped)
        if source.affine is not None:
            a, s = a * source.affine[0], a * source.affine[1] + s
        elif source.reshape:
            reshaped = True
        elif source.kind == "function" and is_layer_function(source.target):
            return Link(blocker=f"its input comes from a `{source.target}` whose weight, bias or settings are not "
                                 "one layer's own (a weight computed in the forward, such as weight standardization), "
                                 "so folding into it would not be exact")
        else:
            return Link(blocker=reasons.stands_between(source.target))
        if not source.inputs:
            return Link(blocker=f"`{source.target}` makes its input from nothing bntool can fold into")
        current, index = index, source.inputs[0]


def downstream(flow: Dataflow, call: int) -> Link:
    current = call
    a, s, reshaped = 1.0, 0.0, False
    while True:
        readers = flow.readers_of(current)
        if len(readers) != 1:
            return Link(blocker=reasons.read_by([flow.ops[r].target for r in readers]))
        reader = flow.ops[readers[0]]
        if reader.kind == "output":
            return Link(blocker=reasons.MODEL_OUTPUT)
        if reader.kind == "module" and reader.affine is None and not reader.reshape:
            if reader.inputs != (current,):
                return Link(blocker=reasons.reads_others(reader.target))
            return Link(reader.target, reader.index, (a, s), reshaped)
        if reader.affine is not None and reader.inputs == (current,):
            a, s = reader.affine[0] * a, reader.affine[0] * s + reader.affine[1]
        elif reader.reshape:
            reshaped = True
        else:
            return Link(blocker=reasons.goes_through(reader.target))
        current = reader.index


def by_module(links: list[Link]) -> dict[str, list[Link]]:
    groups: defaultdict[str, list[Link]] = defaultdict(list)
    for link in links:
        groups[link.module].append(link)
    return dict(groups)


def functional(flow: Dataflow, group: list[Link]) -> bool:
    """Every call is the layer's own ``F.conv*`` / ``F.linear`` inside a forward of its own."""
    return all(flow.ops[link.op].functional for link in group)
