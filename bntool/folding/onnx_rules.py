"""The fold rules on an ONNX graph: which BatchNormalization node folds into which layer, and why each other does not.

``plan_onnx`` walks ``graph.onnxflow``'s dataflow and returns the same
``FoldPlan`` of ``FoldPair`` s and ``Skip`` s that the module fold makes
(``method="onnx"``), worded with the same ``reasons``, plus the ``Site`` s of
each folded BN: the node positions ``onnx_apply`` rewrites.

* **backward** into the node that produces the BN's input (``Conv`` 1-3d,
  grouped or depthwise; ``ConvTranspose``, grouped; ``Gemm``; ``MatMul``
  with a constant 2-D weight, alone or followed by an ``Add`` of a constant
  bias), through view ops that keep each channel whole (``Reshape``,
  ``Flatten``, ``Transpose``...: LeViT's ``flatten(0, 1)``, a DCGAN
  generator's ``view``), through multiplies and adds by a constant number
  (``onnx_steps``: they stay, and the BN folds through them) and through a
  ``Concat`` on the channel axis (the BN split per producer), when nothing
  else reads what lies between;
* **forward** into the one node that reads the BN's output (``Conv`` with
  no padding, ``Gemm``, ``MatMul``), through view ops and steps likewise,
  when backward is not possible.

Each ``If`` / ``Loop`` / ``Scan`` body is planned the same way with its own
producers and readers (``OnnxFlow.subflows``); a BN whose input comes into
its body from outside, or whose output leaves it, has nothing there to fold
into on that side.

What a layer must be is ``onnx_layers``'. The BN's parameters must be
constants; a BN in training mode, with ``spatial=0`` or corrupt statistics
is left.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..graph.onnxflow import VIEWS, OnnxFlow, axis_after, axis_before
from ..report import Skip
from ..selection import select
from . import reasons
from .onnx_layers import LAYERS, bn_reason, channels, has_padding, matmul_under_add, out_channels, weight_reason
from .onnx_steps import leaves, no_producer, scalar_step
from .plan import FoldPair, FoldPlan


@dataclass(frozen=True)
class Site:
    """Where one pair lives in the graph (node positions): the BN, the layer, a bias ``Add`` after a MatMul, the node
    whose output the BN reads (backward: a view op, a step, a ``Concat``, the Add or the layer) or the first node
    reading the BN's output (forward), the BN channels this layer takes (all, or a slice of a ``Concat``), the
    ``a * x + s`` steps kept between the two (``through``), and the path of the graph they sit in (``""``: the main
    graph; ``OnnxFlow.graph_flow``)."""

    bn: int
    layer: int
    direction: str
    add: int | None = None
    end: int = -1
    channels: tuple[int, int] | None = None
    repeat: int = 1  # each BN channel is this many consecutive layer channels (a reshape between them)
    through: tuple[float, float] = (1.0, 0.0)
    graph: str = ""


def plan_onnx(flow: OnnxFlow, rejected: Mapping[str, str] | None = None, *, include: Sequence[str] | None = None,
              exclude: Sequence[str] | None = None) -> tuple[FoldPlan, dict[str, list[Site]]]:
    """The plan for the graph and its subgraphs, and each folded BN's ``Site`` s (by BN label). BNs in ``rejected``
    are left with that reason; ``include`` / ``exclude`` select BNs by label (``selection``'s rule)."""
    pairs: list[FoldPair] = []
    skips: list[Skip] = []
    sites: dict[str, list[Site]] = {}
    found = [(graph, i) for graph in flow.flows() for i in graph.bns()]
    labels = [graph.label(i) for graph, i in found]
    _, unselected = select(labels, include, exclude, what="BatchNormalization", owner="the graph")
    for (graph, i), name in zip(found, labels):
        if rejected and name in rejected:
            skips.append(Skip(name, rejected[name]))
            continue
        if name in unselected:
            skips.append(Skip(name, unselected[name]))
            continue
        result = _plan_bn(graph, i)
        if isinstance(result, str):
            skips.append(Skip(name, result))
            continue
        sites[name] = [dataclasses.replace(site, graph=graph.path) for site in result]
        pairs.extend(FoldPair(name, graph.label(site.layer), site.direction, "removed", graph.op(site.layer),
                              site.through) for site in result)
    listed = flow.overridable()
    note = (f"{len(listed)} initializer(s) are also listed as graph inputs (a caller could feed them); bntool "
            "treats them as the constants they hold" if listed and pairs else "")
    return FoldPlan(tuple(pairs), tuple(skips), "onnx", note), sites


def _plan_bn(flow: OnnxFlow, i: int) -> list[Site] | str:
    reason = bn_reason(flow, i)
    if reason:
        return reason
    backward = _backward(flow, i)
    if not isinstance(backward, str):
        return backward
    forward = _forward(flow, i)
    if not isinstance(forward, str):
        return forward
    return reasons.not_exact_either(backward, forward)


# ----------------------------------------------------------------------------- backward

def _backward(flow: OnnxFlow, i: int) -> list[Site] | str:
    value, reader, axis, end, repeat, (a, s) = flow.input(i, 0), i, 1, None, 1, (1.0, 0.0)
    while True:  # up through view ops and steps, following the BN's channel axis
        p = flow.producer(value)
        if p is None:
            return no_producer(flow, value)
        others = [r for r in flow.readers(value) if r != reader]
        if others or flow.is_output(value):
            return reasons.also_read(flow.label(p), _labels(flow, others, flow.is_output(value)))
        end = p if end is None else end
        step = scalar_step(flow, p)
        if isinstance(step, str):
            return step
        if step is not None:  # (y -> a * y + s, kept)
            a, s, value, reader = a * step[0], a * step[1] + s, step[2], p
            continue
        if flow.op(p) not in VIEWS:
            break
        before = axis_before(flow, p, axis)
        if before is None:
            return _view_reason(flow, p)
        value, reader, axis, repeat = flow.input(p, 0), p, before[0], repeat * before[1]
    if a == 0.0:
        return reasons.multiplied_by_zero(flow.label(p))
    features = channels(flow, i)
    if flow.op(p) == "Concat":
        if repeat > 1:
            return reasons.stands_between("Concat")
        found = _through_concat(flow, i, p, axis, end, features)
        return [dataclasses.replace(site, through=(a, s)) for site in found] if isinstance(found, list) else found
    site = _producer_site(flow, i, p, axis, end)
    if isinstance(site, str):
        return site
    out = out_channels(flow, site.layer)
    if out != features * repeat and features > 1:
        return reasons.channels_differ(flow.label(site.layer), out, "output", features * repeat)
    return [dataclasses.replace(site, repeat=repeat if features > 1 else 1, through=(a, s))]


def _producer_site(flow: OnnxFlow, i: int, p: int, axis: int, end: int) -> Site | str:
    """The layer ``p`` (or the MatMul under the bias ``Add`` ``p``) as a backward site, if the BN's channel axis is
    its output channel axis."""
    add = None
    if flow.op(p) == "Add":
        add, p = p, matmul_under_add(flow, p)
        if p is None:
            return reasons.stands_between(flow.op(add))
    op = flow.op(p)
    if op not in LAYERS:
        return reasons.stands_between(op)
    reason = weight_reason(flow, p)
    if reason:
        return reason
    rank = flow.rank(flow.nodes[add if add is not None else p].outputs[0])
    if op == "MatMul" or (op == "Gemm" and rank is not None):
        if rank is None and channels(flow, i) > 1:
            return reasons.UNKNOWN_SHAPE
        if rank is not None and axis != rank - 1 and channels(flow, i) > 1:
            return f"it normalizes axis {axis} of a {rank}-D input, but the {op}'s features are on the last axis"
    elif axis != 1:
        return f"it normalizes axis {axis} of `{flow.label(p)}`'s output, not its channels"
    return Site(i, p, "backward", add, end)


def _through_concat(flow: OnnxFlow, i: int, concat: int, axis: int, end: int, features: int) -> list[Site] | str:
    """A BN after a ``Concat`` on its channel axis folds into every producer, each taking its own channels."""
    rank = flow.rank(flow.nodes[concat].outputs[0])
    along = int(flow.attr(concat, "axis", 1))
    if rank is None or (along % rank) != axis:
        return reasons.stands_between("Concat")
    sites, start = [], 0
    for value in flow.nodes[concat].inputs:
        p = flow.producer(value)
        if p is None:
            return f"`{flow.label(concat)}` joins `{value.name}`, which no layer produces"
        others = [r for r in flow.readers(value) if r != concat]
        if others or flow.is_output(value):
            return reasons.also_read(flow.label(p), _labels(flow, others, flow.is_output(value)))
        site = _producer_site(flow, i, p, axis, end)
        if isinstance(site, str):
            return f"`{flow.label(concat)}` joins an input that cannot take a fold: {site}"
        if any(s.layer == site.layer for s in sites):
            return f"`{flow.label(concat)}` joins `{flow.label(site.layer)}` twice"
        width = out_channels(flow, site.layer)
        sites.append(Site(i, site.layer, "backward", site.add, end, (start, start + width)))
        start += width
    if start != features:
        return reasons.channels_differ(flow.label(concat), start, "output", features)
    return sites


def _view_reason(flow: OnnxFlow, view: int) -> str:
    return (f"the {flow.op(view)} `{flow.label(view)}` between the layer and the BN does not keep each channel "
            "whole (or its shapes are unknown)")


# ----------------------------------------------------------------------------- forward


def _forward(flow: OnnxFlow, i: int) -> list[Site] | str:
    value, axis, first, repeat, (a, s) = flow.nodes[i].outputs[0], 1, None, 1, (1.0, 0.0)
    while True:  # down through view ops and steps, following the BN's channel axis
        if flow.is_output(value):
            return leaves(flow)
        readers = flow.readers(value)
        if len(readers) != 1 or readers[0] == -1:
            return reasons.read_by(_labels(flow, readers))
        c = readers[0]
        first = c if first is None else first
        step = scalar_step(flow, c, value)
        if isinstance(step, str):
            return step
        if step is not None:  # (z -> a * z + s, kept)
            a, s, value = step[0] * a, step[0] * s + step[1], flow.nodes[c].outputs[0]
            continue
        if flow.op(c) not in VIEWS or flow.nodes[c].inputs[0] is not value:
            break
        after = axis_after(flow, c, axis)
        if after is None:
            return _view_reason(flow, c)
        value, axis, repeat = flow.nodes[c].outputs[0], after[0], repeat * after[1]
    op, name = flow.op(c), flow.label(c)
    if op == "ConvTranspose":
        return reasons.transposed_forward(name)
    if op not in LAYERS:
        return reasons.goes_through(name)
    node = flow.nodes[c]
    if node.inputs[0] is not value or any(v is value for v in node.inputs[1:]):
        return reasons.reads_others(name)
    reason = weight_reason(flow, c)
    if reason:
        return reason
    features, weight = channels(flow, i), flow.constant(flow.input(c, 1))
    rank = flow.rank(value)
    if op == "Conv":
        width = weight.shape[1] * int(flow.attr(c, "group", 1))
        if axis != 1 and features > 1:
            return f"it normalizes axis {axis} of `{name}`'s input, not its channels"
        if has_padding(flow, c):
            return reasons.zero_pads(name)
    else:
        if op == "Gemm" and flow.attr(c, "transA", 0):
            return f"`{name}` reads the BN's output transposed (transA=1)"
        if rank is None and features > 1:
            return reasons.UNKNOWN_SHAPE
        if axis != rank - 1 and features > 1:
            return f"it normalizes axis {axis} of a {rank}-D input, but the {op}'s features are on the last axis"
        width = weight.shape[1] if op == "Gemm" and flow.attr(c, "transB", 0) else weight.shape[0]
    if width != features * repeat and features > 1:
        return reasons.channels_differ(name, width, "input", features * repeat)
    return [Site(i, c, "forward", None, first, None, repeat if features > 1 else 1, (a, s))]


def _labels(flow: OnnxFlow, nodes: Sequence[int], output: bool = False) -> list[str]:
    found = [flow.label(r) if r >= 0 else "a node inside a subgraph" for r in nodes]
    return found + (["the graph's output"] if output else [])
