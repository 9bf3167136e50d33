"""A ModelProto run in onnxruntime without serializing its weights again.

Serializing a model copies every weight's bytes (a third of a second per
100 MB on a loaded machine), and onnxruntime then parses and copies them
again; a fold runs two models. ``Skeleton.of``
splits a model once: its structure (every field of the model, graph, nodes
and small initializers as they are) and its large raw-data initializers as
arrays (``APART`` bytes and more, read by a node: onnxruntime drops an
initializer nothing reads, so one is left in the structure). Then:

- ``check`` runs ``onnx.checker`` on the model itself (the checker reads
  every tensor's bytes: it is given the whole model, serialized once).
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

    @classmethod
    def of(cls, model: Any) -> Skeleton:
        structure = onnx.ModelProto()
        _copy_fields(model, structure, skip="graph")
        _copy_fields(model.graph, structure.graph, skip="initializer")
        arrays = {}
        read = {name for node in iter_nodes(model) for name in node.input} | {o.name for o in model.graph.output}
        for tensor in model.graph.initializer:
            array = None
            if tensor.name in read and tensor.data_location != TensorProto.EXTERNAL and \
                    tensor.data_type in _NUMPY and sys.byteorder == "little":
                raw = tensor.raw_data
                if len(raw) >= APART and len(raw) == math.prod(tensor.dims) * _NUMPY[tensor.data_type]().itemsize:
                    array = np.frombuffer(raw, _NUMPY[tensor.data_type]).reshape(tuple(tensor.dims))
            if array is None:
                structure.graph.initializer.append(tensor)
                continue
            stub = structure.graph.initializer.add()
            _copy_fields(tensor, stub, skip="raw_data")
            arrays[tensor.name] = array
        return cls(model, structure, arrays)

    def check(self, full_check: bool) -> None:
        """``onnx.checker.check_model`` of the model itself, serialized once (raises what it raises)."""
        onnx.checker.check_model(self.model.SerializeToString(), full_check=full_check)

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
