"""A ModelProto run in onnxruntime and checked without serializing its weights again.

Serializing a model copies every weight's bytes (a third of a second per
100 MB on a loaded machine), and onnxruntime then parses and copies them
again; a fold runs two models. ``Skeleton.of``
splits a model once: its structure (every field of the model, graph, nodes
and small initializers as they are) and its large raw-data initializers as
arrays (``APART`` bytes and more, read by a node: onnxruntime drops an
initializer nothing reads, so one is left in the structure). Then:

- ``check`` gives ``onnx.checker`` the structure with each weight (read
  only where shape inference reads its type and shape, never its data) as a
  typed graph input; what the checker asks of the weight's own tensor, ``of``
  established when it read the bytes. A failure there is never the verdict:
  the whole model is then serialized and checked as it is.
- ``session`` builds an onnxruntime session on the structure with the large
  tensors marked external and handed over from memory
  (``add_external_initializers``): the same values, not copied, not parsed.
  Extra graph outputs (``outputs``) make a verification copy; nothing built
  here is written.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from .check import iter_nodes

#: initializers with at least this many bytes of raw data are kept apart from the structure
APART = 1024
#: the ``location`` a large tensor names in a session's copy (its bytes are handed to onnxruntime from memory)
IN_MEMORY = "bntool-in-memory"


@dataclass
class Skeleton:
    """``structure``: the model with its large initializers emptied (name, type and dims kept); ``arrays``: their
    values by name (views of one copy of their bytes); ``model``: the model itself."""

    model: Any
    structure: Any
    arrays: dict[str, np.ndarray]
    tensors: dict[str, Any]  # the initializers kept apart, by name (the model's own TensorProtos)

    @classmethod
    def of(cls, model: Any, like: Skeleton | None = None) -> Skeleton:
        """``model`` split; an initializer equal to one ``like`` kept apart (name, type, dims and bytes) shares
        its array."""
        structure = onnx.ModelProto()
        _copy_fields(model, structure, skip="graph")
        _copy_fields(model.graph, structure.graph, skip="initializer")
        arrays, tensors = {}, {}
        read = {name for node in iter_nodes(model) for name in node.input} | {o.name for o in model.graph.output}
        for tensor in model.graph.initializer:
            array = None
            if tensor.name not in read:
                pass
            elif like is not None and tensor.name in like.tensors and tensor == like.tensors[tensor.name]:
                array = like.arrays[tensor.name]  # (the same bytes: compared without copying them out)
            elif _plain(tensor):
                raw = tensor.raw_data
                if len(raw) >= APART and len(raw) == math.prod(tensor.dims) * _NUMPY[tensor.data_type]().itemsize:
                    array = np.frombuffer(raw, _NUMPY[tensor.data_type]).reshape(tuple(tensor.dims))
            if array is None:
                structure.graph.initializer.append(tensor)
                continue
            stub = structure.graph.initializer.add()
            stub.name, stub.data_type, stub.doc_string = tensor.name, tensor.data_type, tensor.doc_string
            stub.dims.extend(tensor.dims)
            stub.metadata_props.extend(tensor.metadata_props)
            arrays[tensor.name], tensors[tensor.name] = array, tensor
        return cls(model, structure, arrays, tensors)

    def check(self, full_check: bool) -> None:
        """``onnx.checker.check_model``'s verdict on the model (raises what it raises).

        The checker is first given the structure with each weight kept apart
        that only reads as a weight (``WEIGHT_SLOTS``) declared as a graph
        input of its exact type and shape instead: shape inference sees the
        same types and shapes, and what the checker's tensor rule asks of the
        weight itself (a numeric type, raw data alone, of exactly its size)
        ``of`` established when it read it. Any failure there is not taken as
        the verdict: the whole model is then serialized and checked as it is.
        """
        try:
            onnx.checker.check_model(self._as_inputs().SerializeToString(), full_check=full_check)
        except Exception:  # noqa: BLE001 - the verdict comes from the model itself
            onnx.checker.check_model(self.model.SerializeToString(), full_check=full_check)

    def _as_inputs(self) -> Any:
        """The structure with its weights as typed graph inputs (the other tensors kept apart given back whole)."""
        model = self.model
        weights = set(self.tensors) if model.ir_version >= 4 else set()
        weights -= {i.name for i in model.graph.input}
        counts: dict[str, int] = {}
        for tensor in model.graph.initializer:
            counts[tensor.name] = counts.get(tensor.name, 0) + 1
        for node in model.graph.node:
            for k, name in enumerate(node.input):
                if name in weights and ((node.op_type, k) not in WEIGHT_SLOTS or node.domain not in ("", "ai.onnx")):
                    weights.discard(name)
        weights -= {o.name for o in model.graph.output} | _read_in_subgraphs(model)
        weights = {n for n in weights if counts[n] == 1}
        cut = onnx.ModelProto()
        _copy_fields(self.structure, cut, skip="graph")
        _copy_fields(self.structure.graph, cut.graph, skip="initializer")
        for tensor in self.structure.graph.initializer:
            if tensor.name in weights:
                cut.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
            else:
                cut.graph.initializer.append(self.tensors.get(tensor.name, tensor))
        return cut

    def session(self, outputs: Sequence[str] = (), types: Mapping[str, int] | None = None, threads: int = 0) -> Any:
        """An onnxruntime CPU session on the model (graph optimizations off), with the values ``outputs`` as extra
        graph outputs (element types from ``types``)."""
        import onnxruntime as ort

        copy = onnx.ModelProto()
        copy.CopyFrom(self.structure)
        for tensor in copy.graph.initializer:
            if tensor.name in self.arrays:
                tensor.data_location = TensorProto.EXTERNAL
                entry = tensor.external_data.add()
                entry.key, entry.value = "location", IN_MEMORY
        have = {o.name for o in copy.graph.output}
        copy.graph.output.extend(helper.make_tensor_value_info(name, (types or {})[name], None)
                                 for name in dict.fromkeys(outputs) if name not in have)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        names = list(self.arrays)
        values = [ort.OrtValue.ortvalue_from_numpy(self.arrays[n]) for n in names]
        if names:
            options.add_external_initializers(names, values)
        sess = ort.InferenceSession(copy.SerializeToString(), options, providers=["CPUExecutionProvider"])
        sess._bntool_values = values  # (the session reads them: they live as long as it does)
        return sess

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] = (),
            types: Mapping[str, int] | None = None, threads: int = 0) -> dict[str, np.ndarray]:
        """Every graph output (and the values ``outputs``) of one onnxruntime run, by name."""
        sess = self.session(outputs, types, threads)
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, dict(feeds))))


#: (op, input position) where a value is read for its type and shape only, never its data, by shape inference
WEIGHT_SLOTS = frozenset({("Conv", 1), ("Conv", 2), ("ConvTranspose", 1), ("ConvTranspose", 2), ("Gemm", 0),
                          ("Gemm", 1), ("Gemm", 2), ("MatMul", 0), ("MatMul", 1), ("BatchNormalization", 1),
                          ("BatchNormalization", 2), ("BatchNormalization", 3), ("BatchNormalization", 4),
                          ("Add", 0), ("Add", 1), ("Mul", 0), ("Mul", 1), ("Sub", 0), ("Sub", 1), ("Div", 0),
                          ("Div", 1), ("Shape", 0), ("Size", 0), ("CastLike", 1)})


def _plain(tensor: Any) -> bool:
    """A tensor whose value is its raw data alone, of a type numpy reads as it is (little-endian here)."""
    return (tensor.data_location != TensorProto.EXTERNAL and tensor.data_type in _NUMPY and sys.byteorder == "little"
            and not (tensor.float_data or tensor.int32_data or tensor.string_data or tensor.int64_data
                     or tensor.double_data or tensor.uint64_data or tensor.external_data or tensor.HasField("segment")))


def _read_in_subgraphs(model: Any) -> set[str]:
    """The names that nodes inside the main graph's subgraphs (If / Loop / Scan, at any depth) read."""
    names: set[str] = set()
    for node in model.graph.node:
        for attribute in node.attribute:
            for graph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                inner = onnx.ModelProto()
                inner.graph.node.extend(graph.node)
                names.update(name for n in iter_nodes(inner) for name in n.input)
    return names


def _copy_fields(source: Any, target: Any, skip: str) -> None:
    """Every field set in ``source`` but ``skip``, copied into ``target`` (same message type)."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        if repeated:
            getattr(target, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


#: element types whose raw data is a plain little-endian array numpy reads as it is
_NUMPY = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64, TensorProto.FLOAT16: np.float16,
          TensorProto.INT64: np.int64, TensorProto.INT32: np.int32, TensorProto.INT16: np.int16,
          TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8, TensorProto.UINT16: np.uint16,
          TensorProto.UINT32: np.uint32, TensorProto.UINT64: np.uint64, TensorProto.BOOL: np.bool_}
