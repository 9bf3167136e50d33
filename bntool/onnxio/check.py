"""What an ONNX file holds: checker, BatchNormalization mode, node counts, and its weights bit for bit.

``inspect_file`` runs ``onnx.checker`` (full check, external data included)
and gathers the facts the export report shows, from one reading of the file's
structure that leaves the weights in the file (``scanning.scan``);
``compare_initializers`` compares those weights with the model's tensors bit
for bit, a chunk at a time; ``training_mode_bns`` proves
that no BatchNormalization node is a training op (``training_mode=1``, the
running-statistics outputs, or ``is_test=0`` in the oldest opsets). What the
file computes, run in onnxruntime, is ``onnx_run``'s. onnx is imported inside
the functions: ``import bntool`` does not import it.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import VerificationError
from .scanning import Scan, in_place_copy, same_bytes, scan
from .stream import ScanError

#: Node types the report counts on their own (all types are in ``node_counts``).
KEY_OPS = ("BatchNormalization", "Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class TrainingBN:
    """A BatchNormalization node that computes (or updates) batch statistics, and how we know."""

    node: str
    reason: str


@dataclass(frozen=True)
class OnnxFacts:
    """One ONNX file as written: checker result, opset, nodes, size, where the weights are."""

    checker_error: str | None
    opset: int
    node_counts: dict[str, int]
    training_bns: tuple[TrainingBN, ...]
    size_bytes: int
    external_data: tuple[str, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    batch_dims: tuple[str | int | None, ...]

    @property
    def bn_left(self) -> int:
        return self.node_counts.get("BatchNormalization", 0)


def iter_nodes(model: Any) -> Iterator[Any]:
    """Every node of the main graph, of its subgraphs (If / Loop / Scan) and of its local functions."""

    def walk(nodes) -> Iterator[Any]:
        for node in nodes:
            yield node
            for attr in node.attribute:
                if attr.HasField("g"):
                    yield from walk(attr.g.node)
                for g in attr.graphs:
                    yield from walk(g.node)

    yield from walk(model.graph.node)
    for function in model.functions:
        yield from walk(function.node)


def training_mode_bns(model: Any) -> list[TrainingBN]:
    """BatchNormalization nodes in training mode: ``training_mode=1``, extra outputs, or ``is_test=0``."""
    found = []
    for i, node in enumerate(iter_nodes(model)):
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: a for a in node.attribute}
        outputs = [o for o in node.output if o]
        name = node.name or f"BatchNormalization #{i} (output `{node.output[0]}`)"
        if "training_mode" in attrs and attrs["training_mode"].i != 0:
            found.append(TrainingBN(name, "training_mode=1: normalizes with batch statistics"))
        elif "is_test" in attrs and attrs["is_test"].i == 0:
            found.append(TrainingBN(name, "is_test=0: normalizes with batch statistics"))
        elif len(outputs) > 1:
            found.append(TrainingBN(name, f"{len(outputs)} outputs: it also updates running statistics "
                                          "(a training op)"))
    return found


def inspect_file(path: str | os.PathLike, found: Scan | None = None) -> OnnxFacts:
    """Check ``path`` with ``onnx.checker`` (full check) and gather what the report shows, without loading its weights.

    ``found`` is ``scanning.scan(path)`` when the caller has it. The checker
    runs on the file itself when its weights are external data, else on
    ``scanning.in_place_copy`` saved beside it (the same model, each large
    tensor referring to its own bytes in the file), so that it never reads the
    weights; ``compare_initializers`` checks those bytes.
    """
    import onnx

    path = Path(path)
    found = found if found is not None else read_structure(path)
    checker_error = None
    target = path
    try:
        if any(s.embedded for s in found.stored.values()):
            handle, name = tempfile.mkstemp(prefix=".check-", suffix=".onnx", dir=path.parent)
            os.close(handle)
            target = Path(name)
            onnx.save(in_place_copy(found), name)
        onnx.checker.check_model(str(target), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        checker_error = _first_lines(str(exc))
    finally:
        if target != path:
            target.unlink(missing_ok=True)
    checker_error = checker_error or _raw_size_error(found)
    model = found.model
    locations = sorted({
        entry.value
        for tensor in initializers_and_attributes(model)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    })
    data_files = [path.parent / loc for loc in locations if (path.parent / loc).exists()]
    size = path.stat().st_size + sum(f.stat().st_size for f in data_files)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    initializer_names = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializer_names]
    return OnnxFacts(
        checker_error=checker_error,
        opset=opset,
        node_counts=dict(sorted(Counter(n.op_type for n in iter_nodes(model)).items())),
        training_bns=tuple(training_mode_bns(model)),
        size_bytes=size,
        external_data=tuple(locations),
        input_names=tuple(v.name for v in inputs),
        output_names=tuple(v.name for v in model.graph.output),
        batch_dims=tuple(_batch_dim(v) for v in inputs),
    )


def _raw_size_error(found: Scan) -> str | None:
    """What ``onnx.checker`` says of the file itself when a tensor's raw_data is not the size its shape and type
    declare: the in-place copy leaves those bytes in the file, where the checker does not measure them."""
    sizes = {code: torch.empty((), dtype=dtype).element_size() for dtype, code in ONNX_DTYPES.items()}
    for tensor in found.model.graph.initializer:
        where = found.stored.get(tensor.name)
        if where is None or not where.embedded or tensor.data_type not in sizes:
            continue
        need = math.prod(tensor.dims) * sizes[tensor.data_type]
        if where.length != need:
            return (f"TensorProto (tensor name: {tensor.name}) raw_data size ({where.length} bytes) does not match "
                    f"the declared shape and type ({need} bytes required)")
    return None


def read_structure(path: str | os.PathLike) -> Scan:
    """``scanning.scan(path)``, a malformed file reported as a failed verification."""
    try:
        return scan(path)
    except (ScanError, OSError) as exc:
        raise VerificationError(f"the written ONNX file cannot be read back: {exc}") from exc


#: torch dtype -> ONNX TensorProto data type
ONNX_DTYPES = {
    torch.float32: 1, torch.uint8: 2, torch.int8: 3, torch.uint16: 4, torch.int16: 5, torch.int32: 6,
    torch.int64: 7, torch.bool: 9, torch.float16: 10, torch.float64: 11, torch.uint32: 12, torch.uint64: 13,
    torch.complex64: 14, torch.complex128: 15, torch.bfloat16: 16, torch.float8_e4m3fn: 17,
    torch.float8_e4m3fnuz: 18, torch.float8_e5m2: 19, torch.float8_e5m2fnuz: 20,
}


def compare_initializers(file: str | os.PathLike | Scan, model: nn.Module,
                         skip: Collection[str] = ()) -> tuple[int, list[str]]:
    """Compare every initializer named like one of ``model``'s tensors with that tensor, bit for bit.

    The exporters name initializers after the state-dict keys, so this sees a
    wrong value in any channel of any weight, including channels that no
    verification input reaches (a channel a ReLU always zeroes). Type, shape
    and every byte must match; large tensors are read from the file a chunk
    at a time. ``file`` is a path or its ``scanning.scan``; ``skip``
    names initializers that are known to hold other values (``write_onnx``'s
    ``rewritten``). Returns how many initializers were compared and the names
    of those that differ.
    """
    import numpy as np
    from onnx import numpy_helper

    found = file if isinstance(file, Scan) else read_structure(file)
    state = model.state_dict()
    checked, differ = 0, []
    for tensor in found.model.graph.initializer:
        own = state.get(tensor.name)
        if own is None or tensor.name in skip or tuple(tensor.dims) != tuple(own.shape):
            continue
        checked += 1
        own = own.detach().cpu().contiguous().reshape(-1)
        if tensor.data_type != ONNX_DTYPES.get(own.dtype):
            differ.append(tensor.name)
            continue
        expected = own.view(torch.uint8).numpy() if own.numel() else np.empty(0, np.uint8)
        stored = found.stored.get(tensor.name)
        if stored is not None:
            same = same_bytes(stored, expected)
        else:
            try:
                array = np.ascontiguousarray(numpy_helper.to_array(tensor)).reshape(-1).view(np.uint8)
            except Exception:  # a tensor numpy cannot hold: not the model's bytes
                array = None
            same = array is not None and np.array_equal(array, expected)
        if not same:
            differ.append(tensor.name)
    return checked, differ


def initializers_and_attributes(model: Any) -> Iterator[Any]:
    """Every tensor of a ModelProto: the initializers and the tensors of node attributes."""
    yield from model.graph.initializer
    for node in iter_nodes(model):
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t


def _batch_dim(value: Any) -> str | int | None:
    dims = value.type.tensor_type.shape.dim
    if not dims:
        return None
    return dims[0].dim_param or (dims[0].dim_value if dims[0].HasField("dim_value") else None)


def _first_lines(text: str, n: int = 2) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " ".join(lines[:n]) or "(no message)"
