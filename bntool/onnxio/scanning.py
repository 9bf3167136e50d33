"""ONNX files read one tensor at a time: the structure without the large tensors' bytes, and where those lie.

``onnx.load`` builds the whole message in memory (the weights once as a
message, once more as its bytes), and ``onnx.checker`` on a path reads the
file whole and parses it (twice the file). ``scan`` walks a file's fields
without loading the weights: it returns the model with every tensor of at
least ``IN_PLACE_MIN`` bytes replaced by where its bytes lie (in this file or
an external-data file), and ``same_bytes`` compares those bytes with a
tensor's, a chunk at a time. ``in_place_copy`` is the scanned model with each
large tensor referring to its own bytes inside the .onnx file as external
data: what ``onnx.checker`` checks without reading the weights (it checks the
structure of every tensor, never the values, and the bytes are compared on
their own). The wire format is ``stream``'s, which writes such files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..verify.bits import same_bits_in_file
from .stream import GRAPH_INITIALIZER, IN_PLACE_MIN, MODEL_GRAPH, TENSOR_RAW_DATA, ScanError, fields

_CHUNK = 4 << 20


@dataclass(frozen=True)
class Stored:
    """Where the bytes of a large tensor lie: ``file`` (the .onnx file or an external-data file), offset, length."""

    file: Path
    offset: int
    length: int
    embedded: bool  # inside the .onnx file (raw_data), not external data


@dataclass(frozen=True)
class Scan:
    """An ONNX file without its large tensors' bytes: the model, and where each of those tensors' bytes lie."""

    path: Path
    model: Any  # ModelProto; the tensors in ``stored`` have no raw_data
    #: initializer name -> where its bytes lie (embedded ones of at least IN_PLACE_MIN bytes, external ones)
    stored: dict[str, Stored]

    @property
    def initializers(self) -> list[Any]:
        return list(self.model.graph.initializer)


def scan(path: str | os.PathLike) -> Scan:
    """Read ``path``'s structure, leaving the bytes of every embedded tensor of ``IN_PLACE_MIN`` bytes or more in
    the file.

    Raises ``ScanError`` when the file is not a well-formed message.
    """
    import onnx

    path = Path(path)
    model_rest, graph_rest, tensors = bytearray(), bytearray(), []
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for number, tag_start, start, end in fields(f, 0, size):
            if number != MODEL_GRAPH:
                model_rest += _read(f, tag_start, end)
                continue
            for n, t_start, s, e in fields(f, start, end):
                if n == GRAPH_INITIALIZER:
                    tensors.append(_scan_tensor(f, s, e))
                else:
                    graph_rest += _read(f, t_start, e)
    try:
        model = onnx.ModelProto.FromString(bytes(model_rest))
        model.graph.MergeFromString(bytes(graph_rest))
    except Exception as exc:  # google.protobuf.message.DecodeError
        raise ScanError(f"not an ONNX model: {exc}") from exc
    stored = {}
    for header, raw in tensors:
        model.graph.initializer.append(header)
        if raw is not None:
            stored[header.name] = Stored(path, raw[0], raw[1], True)
        elif header.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in header.external_data}
            location = entries.get("location", "")
            offset = int(entries.get("offset", 0) or 0)
            file = path.parent / location
            length = int(entries["length"]) if entries.get("length") else max(_size(file) - offset, 0)
            stored[header.name] = Stored(file, offset, length, False)
    return Scan(path, model, stored)


def _scan_tensor(f: BinaryIO, start: int, end: int) -> tuple[Any, tuple[int, int] | None]:
    """One TensorProto: its fields but a large raw_data, and where that raw_data lies."""
    import onnx

    rest, raw = bytearray(), None
    for number, tag_start, s, e in fields(f, start, end):
        if number == TENSOR_RAW_DATA and e - s >= IN_PLACE_MIN:
            raw = (s, e - s)
        else:
            rest += _read(f, tag_start, e)
    try:
        return onnx.TensorProto.FromString(bytes(rest)), raw
    except Exception as exc:
        raise ScanError(f"an initializer is not a TensorProto: {exc}") from exc


def _read(f: BinaryIO, start: int, end: int) -> bytes:
    f.seek(start)
    data = f.read(end - start)
    if len(data) != end - start:
        raise ScanError("the file ends inside a field")
    return data


def _size(file: Path) -> int:
    try:
        return file.stat().st_size
    except OSError:
        return 0


def same_bytes(stored: Stored, expected: np.ndarray) -> bool:
    """Whether the bytes at ``stored`` are exactly ``expected``'s (a contiguous array), read a chunk at a time."""
    flat = torch.from_numpy(expected.reshape(-1).view(np.uint8))
    if stored.length != flat.numel():
        return False
    try:
        with open(stored.file, "rb") as f:
            return same_bits_in_file(f, stored.offset, flat, torch.empty(_CHUNK, dtype=torch.uint8))
    except OSError:
        return False


def in_place_copy(found: Scan) -> Any:
    """``found.model`` with each embedded large tensor as external data at its own bytes in the .onnx file.

    Saved beside the file, it is what ``onnx.checker`` checks instead of the
    file: the same graph, nodes, attributes and small tensors, each large
    tensor's name, type and shape, and a location that must be a file in the
    folder, without reading any weights.
    """
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(found.model)
    for tensor in model.graph.initializer:
        where = found.stored.get(tensor.name)
        if where is None or not where.embedded:
            continue
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", found.path.name), ("offset", str(where.offset)),
                           ("length", str(where.length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    return model
