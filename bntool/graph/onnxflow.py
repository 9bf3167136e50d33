"""An ONNX graph as dataflow: who produces each value, who reads it, which values are constant, their shapes.

``OnnxFlow.of(model)`` reads a ``ModelProto``'s main graph with ``onnx_ir``
(shapes from onnx's shape inference, run on the structure without the
weights: ``onnx_shapes``); node ``i`` of the flow is node ``i`` of the proto, so a plan made
here is applied to the proto itself, leaving every other node and
initializer as it was. A node is named by its ``name``, or, when it has
none, by its type and first output (``label``), as in every report.

Each ``If`` / ``Loop`` / ``Scan`` body (nested ones too) is a flow of its own
(``subflows``), reached from the main graph by its ``route``: its nodes are
its graph's, a value from an enclosing graph has no producer among them, and
its labels carry the path to it (``If_0/then_branch/Conv_3``), unique in the
model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from .onnx_shapes import infer_shapes

#: ops through which a value computed from initializers alone is still a constant (never DequantizeLinear: a
#: Q/DQ-wrapped weight stays quantized)
CONSTANT_OPS = frozenset({"Constant", "ConstantOfShape", "Expand", "Cast", "Identity", "Reshape", "Unsqueeze",
                          "Squeeze", "Shape", "Gather", "Slice", "Concat", "CastLike", "Transpose"})


@dataclass
class OnnxFlow:
    """The main graph's nodes (in file order), the values between them, and what is known of each value."""

    model: Any  # the onnx_ir Model
    nodes: list[Any]
    index: dict[int, int]  # id(node) -> position
    outputs: frozenset[str]  # graph output names
    inputs: frozenset[str]  # graph inputs that are not initializers
    opset: int
    labels: list[str]
    positions: dict[str, int]
    _computed: dict[str, Any] = field(default_factory=dict)
    #: the path to this graph (``""`` for the main graph, else ``If_0/then_branch``), the steps that reach its
    #: proto from the main graph's (node position, attribute name, index in a GRAPHS attribute or None), the
    #: flow of the graph that holds it, and every subgraph's flow (main graph only), by path
    path: str = ""
    route: tuple[tuple[int, str, int | None], ...] = ()
    parent: OnnxFlow | None = None
    subflows: dict[str, OnnxFlow] = field(default_factory=dict)
    #: main-graph initializer values kept apart from the structure (``Skeleton.arrays``), by name, read-only
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def of(cls, proto: Any, split: Any = None) -> OnnxFlow:
        """The flow of ``proto``; or, given ``split`` (its ``onnxio.skeleton.Skeleton``), the flow of its structure,
        each large initializer's value the split's array (read-only): the weights are neither read nor copied
        again."""
        arrays = split.arrays if split is not None else {}
        model = ir.serde.deserialize_model(split.structure if split is not None else proto)
        infer_shapes(model, split.structure if split is not None else proto)  # (unknown where inference fails)
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        taken: set[str] = set()
        main = cls._of_graph(model, model.graph, opset, taken)
        pending = [main]
        while pending:  # (breadth first: a body's flow after the graph that holds it)
            flow = pending.pop(0)
            for i, node in enumerate(flow.nodes):
                for attribute in node.attributes.values():
                    graphs = ([(attribute.value, None)] if attribute.type == ir.AttributeType.GRAPH else
                              [(g, j) for j, g in enumerate(attribute.value)]
                              if attribute.type == ir.AttributeType.GRAPHS else [])
                    for graph, j in graphs:
                        path = f"{flow.label(i)}/{attribute.name}" + (f"[{j}]" if j is not None else "")
                        sub = cls._of_graph(model, graph, opset, taken, path, (*flow.route, (i, attribute.name, j)),
                                            flow)
                        main.subflows[path] = sub
                        pending.append(sub)
        main.arrays = dict(arrays)
        return main

    @classmethod
    def _of_graph(cls, model: Any, graph: Any, opset: int, taken: set[str], path: str = "",
                  route: tuple = (), parent: OnnxFlow | None = None) -> OnnxFlow:
        nodes = list(graph)
        labels: list[str] = []
        for i, node in enumerate(nodes):
            label = node.name or f"{node.op_type} (output `{node.outputs[0].name if node.outputs else '?'}`)"
            label = (f"{path}{label}" if label.startswith("/") else f"{path}/{label}") if path else label
            labels.append(label if label not in taken else f"{label} #{i}")
            taken.add(labels[-1])
        return cls(model, nodes, {id(n): i for i, n in enumerate(nodes)},
                   frozenset(v.name for v in graph.outputs),
                   frozenset(v.name for v in graph.inputs if not v.is_initializer()),
                   opset, labels, {label: i for i, label in enumerate(labels)}, path=path, route=route, parent=parent)

    def flows(self) -> list[OnnxFlow]:
        """This graph's flow and every subgraph's (main graph), bodies after the graphs that hold them."""
        return [self, *self.subflows.values()]

    def main(self) -> OnnxFlow:
        """The main graph's flow."""
        return self if self.parent is None else self.parent.main()

    def graph_flow(self, path: str) -> OnnxFlow:
        """The flow of the graph at ``path`` (``""``: the main graph's)."""
        return self if path == self.path else self.subflows[path]

    def outer(self, value: Any) -> bool:
        """Whether ``value`` comes from an enclosing graph: made by a node there, or one of its inputs (a
        subgraph's flow only; an initializer of an enclosing graph is a constant, not ``outer``)."""
        if self.parent is None or value is None or value.is_initializer() or value.name in self.inputs:
            return False
        producer = value.producer()
        return self.index.get(id(producer)) is None if producer is not None else True

    # ------------------------------------------------------------------ nodes

    def label(self, i: int) -> str:
        """The node's name, or its type and first output when it has none (unique in the graph)."""
        return self.labels[i]

    def position(self, label: str) -> int:
        return self.positions[label]

    def op(self, i: int) -> str:
        node = self.nodes[i]
        return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"

    def attr(self, i: int, name: str, default: Any = None) -> Any:
        attribute = self.nodes[i].attributes.get(name)
        return default if attribute is None else attribute.value

    def input(self, i: int, k: int) -> Any | None:
        inputs = self.nodes[i].inputs
        return inputs[k] if k < len(inputs) else None

    # ------------------------------------------------------------------ values

    def producer(self, value: Any) -> int | None:
        node = value.producer() if value is not None else None
        return self.index.get(id(node)) if node is not None else None

    def readers(self, value: Any) -> list[int]:
        """The nodes of the main graph reading ``value``'s elements (once each; a ``Shape`` node, and ``CastLike``'s
        second input, read only its shape or type), and -1 per subgraph node reading it."""
        seen: list[int] = []
        for use in value.uses():
            i = self.index.get(id(use.node), -1)
            if i != -1 and (self.op(i) == "Shape" or (self.op(i) == "CastLike" and use.idx == 1)):
                continue  # (they read its shape or type, which no fold changes)
            if i == -1 or i not in seen:
                seen.append(i)
        return seen

    def is_output(self, value: Any) -> bool:
        return value.name in self.outputs

    def constant(self, value: Any | None, depth: int = 0) -> np.ndarray | None:
        """The value's array when it is an initializer (also one listed as a graph input, as the oldest IR versions
        list them all: ``overridable``), or computed from such
        by a chain of shape-and-cast ops (``CONSTANT_OPS``: an exporter's zero bias), else None."""
        if value is None or value.name in self.inputs:
            return None
        if value.is_initializer():
            main = self.main()
            if value.name in main.arrays and main.model.graph.initializers.get(value.name) is value:
                return main.arrays[value.name]  # (a weight kept apart: read by this graph or a body in it)
            return value.const_value.numpy() if value.const_value is not None else None
        producer = self.producer(value)
        if producer is None and self.parent is not None and value.producer() is not None:
            return self.parent.constant(value, depth)  # (computed in an enclosing graph)
        if producer is None or depth > 8 or self.op(producer) not in CONSTANT_OPS:
            return None
        if value.name not in self._computed:
            self._computed[value.name] = self._evaluate(producer, depth)
        return self._computed[value.name]

    def _evaluate(self, i: int, depth: int) -> np.ndarray | None:
        node = self.nodes[i]
        if node.op_type == "CastLike":  # only the type of its second input matters
            value, like = self.constant(node.inputs[0], depth + 1), node.inputs[1]
            if value is None or like is None or like.dtype is None:
                return None
            return value.astype(like.dtype.numpy())
        arrays = [self.constant(v, depth + 1) if v is not None else None for v in node.inputs]
        if any(a is None for a, v in zip(arrays, node.inputs) if v is not None) or len(node.outputs) != 1:
            return None
        try:
            from onnx.reference import ReferenceEvaluator

            proto = ir.serde.serialize_node(node)
            names = list(proto.input)
            evaluator = ReferenceEvaluator(proto, verbose=0)
            return np.asarray(evaluator.run(None, {n: a for n, a in zip(names, arrays) if n})[0])
        except Exception:  # noqa: BLE001 - not evaluable here: not a constant for folding
            return None

    def overridable(self) -> list[str]:
        """Initializers also listed as graph inputs: constants by convention, though a caller may feed them."""
        return [v.name for v in self.model.graph.inputs if v.is_initializer()]

    def computed_constant(self, value: Any | None) -> bool:
        """Whether ``value`` is a constant computed by nodes rather than an initializer."""
        return value is not None and not value.is_initializer() and self.constant(value) is not None

    def shape(self, value: Any) -> tuple[int | None, ...] | None:
        """The value's shape (``None`` for a dimension not known statically), or None when its rank is unknown."""
        if value is None or value.shape is None:
            return None
        return tuple(d if isinstance(d, int) else None for d in value.shape)

    def rank(self, value: Any) -> int | None:
        shape = self.shape(value)
        return len(shape) if shape is not None else None

    def bns(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes)
                if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")]


def static_dims(shape: Sequence[int | None] | None) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


#: ops that only move elements: a fold passes through them where each channel stays whole (``_axis_before``)
VIEWS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity")


def axis_before(flow: OnnxFlow, view: int, axis: int) -> tuple[int, int] | None:
    """The axis of the view op's input whose elements make ``axis`` of its output, each output channel a block of
    ``m`` consecutive input channels: ``(axis, m)``, or None."""
    if flow.op(view) == "Identity":
        return axis, 1
    inp, out = flow.shape(flow.input(view, 0)), flow.shape(flow.nodes[view].outputs[0])
    if flow.op(view) == "Transpose":
        perm = flow.attr(view, "perm", None) or list(reversed(range(len(out or inp or ()))))
        return (perm[axis], 1) if axis < len(perm) else None
    found = blocks(inp, out, axis)
    return found if found is not None else None


def axis_after(flow: OnnxFlow, view: int, axis: int) -> tuple[int, int] | None:
    """The axis of the view op's output that ``axis`` of its input becomes, each input channel a block of ``m``
    consecutive output channels: ``(axis, m)``, or None."""
    if flow.op(view) == "Identity":
        return axis, 1
    inp, out = flow.shape(flow.input(view, 0)), flow.shape(flow.nodes[view].outputs[0])
    if flow.op(view) == "Transpose":
        perm = list(flow.attr(view, "perm", None) or reversed(range(len(out or inp or ()))))
        return (perm.index(axis), 1) if axis in perm else None
    found = blocks(out, inp, axis)
    return found if found is not None else None


def blocks(fine, coarse, axis: int) -> tuple[int, int] | None:
    """Under a row-major reshape between ``fine`` and ``coarse`` (static shapes), the axis ``b`` of ``fine`` whose
    consecutive blocks of ``m`` channels each land in one channel of ``coarse``'s axis ``axis``: ``(b, m)``.

    Element ``(lead, f, t)`` of ``fine`` is ``(lead, f // m, (f % m) * T + t)``
    of ``coarse`` when the leading sizes agree and ``coarse``'s trailing size
    is ``m`` times ``fine``'s ``T`` (``folding.layers._same_channels``' rule; ``m == 1``:
    the channel axis kept whole).
    """
    if not (static_dims(fine) and static_dims(coarse)) or axis >= len(coarse) or not coarse[axis]:
        return None
    lead, channels, tail = math.prod(coarse[:axis]), coarse[axis], math.prod(coarse[axis + 1:])
    for b, size in enumerate(fine):
        if math.prod(fine[:b]) == lead and size % channels == 0 and \
                tail == (size // channels) * math.prod(fine[b + 1:]):
            return b, size // channels
    return None
