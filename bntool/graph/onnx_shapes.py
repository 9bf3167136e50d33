"""onnx's shape inference for an ``onnx_ir`` model, from the ModelProto it was read from, without weights.

``infer_shapes(model, proto)`` runs ``onnx.shape_inference`` on a copy of
``proto`` whose large main-graph initializers (over ``LARGE`` bytes, or
emptied stubs as in ``onnxio.skeleton``) are typed graph inputs instead, as
onnx_ir's ``ShapeInferencePass`` does, and sets each value's inferred type
and shape on the IR values of the same name, graph by graph (subgraphs
included). The pass deserializes the whole inferred model to merge it; here
only the inferred ``ValueInfoProto`` are read. A model shape inference
cannot handle keeps the shapes it had.
"""

from __future__ import annotations

import math
from typing import Any

import onnx
import onnx_ir as ir
from onnx import helper

#: initializers over this many bytes are given to shape inference as typed inputs (onnx_ir's own limit)
LARGE = 1000


def infer_shapes(model: Any, proto: Any) -> None:
    """Set on ``model``'s values (an ``ir.Model`` read from ``proto``, node for node) what onnx's shape inference
    infers for ``proto``; nothing when it fails."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_without_weights(proto), check_type=True, strict_mode=False,
                                                     data_prop=True)
    except Exception:  # noqa: BLE001 - shapes stay unknown: the rules that need one say so
        return
    _merge(model.graph, inferred.graph)


def _without_weights(proto: Any) -> Any:
    """``proto``'s structure, each large main-graph initializer a typed graph input instead."""
    cut = onnx.ModelProto()
    _copy(proto, cut, skip="graph")
    graph = cut.graph
    _copy(proto.graph, graph, skip="initializer")
    listed = {i.name for i in proto.graph.input}
    for tensor in proto.graph.initializer:
        size = _ELEMENT_BYTES.get(tensor.data_type)
        if size is None or math.prod(tensor.dims) * size <= LARGE:
            graph.initializer.append(tensor)
        elif tensor.name not in listed:
            graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return cut


def _copy(source: Any, target: Any, skip: str) -> None:
    """Every field set in ``source`` but ``skip``, copied into ``target`` (same message type)."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED:
            getattr(target, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def _merge(graph: Any, inferred: Any) -> None:
    """Each value of ``graph`` (an ir.Graph) typed as ``inferred`` (its GraphProto after inference) says; then each
    subgraph, node for node."""
    infos = {info.name: info for info in [*inferred.input, *inferred.output, *inferred.value_info]}
    values = {v.name: v for v in [*graph.inputs, *graph.initializers.values()] if v.name}
    for node in graph:
        for value in [*node.inputs, *node.outputs]:
            if value is not None and value.name:
                values.setdefault(value.name, value)
    for name, value in values.items():
        info = infos.get(name)
        if info is None or not info.type.HasField("tensor_type"):
            continue
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            shape = ir.Shape([d.dim_value if d.HasField("dim_value") else d.dim_param if d.HasField("dim_param")
                              else None for d in tensor_type.shape.dim])
            if value.shape != shape:
                value.shape = shape
        if tensor_type.elem_type and value.dtype != ir.DataType(tensor_type.elem_type):
            value.dtype = ir.DataType(tensor_type.elem_type)
    for node, node_proto in zip(graph, inferred.node):
        attributes = {a.name: a for a in node_proto.attribute}
        for name, attribute in node.attributes.items():
            if name not in attributes:
                continue
            if attribute.type == ir.AttributeType.GRAPH:
                _merge(attribute.value, attributes[name].g)
            elif attribute.type == ir.AttributeType.GRAPHS:
                for sub, sub_proto in zip(attribute.value, attributes[name].graphs):
                    _merge(sub, sub_proto)


#: ONNX data type -> bytes per element (a type not here is never large)
_ELEMENT_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16,
                  16: 2}
