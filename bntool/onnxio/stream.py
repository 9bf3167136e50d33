"""ONNX files written one tensor at a time, so that no step holds the weights twice; the wire format they share.

An .onnx file is one protobuf ``ModelProto``; its ``graph`` (field 7) holds the
``initializer`` tensors (field 5), and each ``TensorProto`` holds its weights
in ``raw_data`` (field 9). ``onnx.save`` / ``onnx.load`` build the whole
message in memory (the weights once as a message, once more as its bytes), and
``onnx.checker`` on a path reads the file whole and parses it (twice the file).

``write_model`` writes a ``ModelProto`` whose large initializers are stand-ins
(external-data entries naming ``PENDING``), streaming each one's bytes into
the file in its place: the file is byte for byte what ``onnx.save`` writes for
the model with its tensors in it. Reading a file back the same way, a tensor
at a time, is ``scanning``'s; both walk the protobuf wire format with
``fields`` (here), and each is the other's test.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

#: field numbers: ModelProto.graph, GraphProto.initializer, TensorProto.raw_data
MODEL_GRAPH, GRAPH_INITIALIZER, TENSOR_RAW_DATA = 7, 5, 9
#: tensors of at least this many bytes are never held whole: written from their source, left in the file when read
IN_PLACE_MIN = 64 << 10
#: the external-data location that marks a tensor ``write_model`` fills in
PENDING = "bntool:pending"
_LEN = 2


class ScanError(ValueError):
    """The file is not a well-formed protobuf message (truncated, or not ONNX)."""


# ----------------------------------------------------------------------------- wire format


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload_size: int) -> bytes:
    """The tag and length of a length-delimited field."""
    return _varint(number << 3 | _LEN) + _varint(payload_size)


def _read_varint(f: BinaryIO) -> int:
    result = shift = 0
    while True:
        b = f.read(1)
        if not b:
            raise ScanError("the file ends inside a field")
        result |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ScanError("a malformed varint")


def fields(f: BinaryIO, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """``(number, tag_start, value_start, value_end)`` of each field of the message at ``[start, end)``."""
    pos = start
    while pos < end:
        f.seek(pos)
        key = _read_varint(f)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _read_varint(f)
            value_start, value_end = pos, f.tell()
        elif wire == 1 or wire == 5:
            value_start = f.tell()
            value_end = value_start + (8 if wire == 1 else 4)
        elif wire == _LEN:
            length = _read_varint(f)
            value_start = f.tell()
            value_end = value_start + length
        else:
            raise ScanError(f"wire type {wire} (field {number}) is not used by ONNX")
        if number == 0 or value_end > end:
            raise ScanError("a field runs past the end of its message")
        yield number, pos, value_start, value_end
        pos = value_end


def _split(message: bytes, number: int) -> tuple[bytes, bytes]:
    """A serialized message cut before its first field numbered above ``number`` (fields are written in order)."""
    f = io.BytesIO(message)
    for n, tag_start, _, _ in fields(f, 0, len(message)):
        if n > number:
            return message[:tag_start], message[tag_start:]
    return message, b""


# ----------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class Pending:
    """A tensor's bytes for ``write_model``: how many, and a function that writes them to a binary file
    (``onnx_ir`` tensors' ``tofile``: a torch tensor's memory written as it is, no copy)."""

    size: int
    write: Callable[[BinaryIO], Any]


def write_model(model: Any, tensors: Mapping[str, Pending], path: str | os.PathLike) -> None:
    """Write ``model`` (a ``ModelProto``) to ``path``, each initializer named in ``tensors`` with its bytes.

    Those initializers are stand-ins (external data at ``PENDING``): each is
    written with ``raw_data`` instead, its bytes written straight from their
    source. The fields are in the order ``SerializeToString`` writes them.
    """
    import onnx

    graph = model.graph
    inits = [(t, tensors.get(t.name) if _is_pending(t) else None) for t in graph.initializer]
    missing = [t.name for t, p in inits if _is_pending(t) and p is None]
    if missing:
        raise ValueError(f"no bytes for the initializer(s) {missing[:3]}")
    parts = []  # (head of the TensorProto, Pending or None, tail)
    for tensor, pending in inits:
        if pending is None:
            parts.append((tensor.SerializeToString(), None, b""))
            continue
        header = onnx.TensorProto()
        header.CopyFrom(tensor)
        header.ClearField("external_data")
        header.ClearField("data_location")
        head, tail = _split(header.SerializeToString(), TENSOR_RAW_DATA)
        parts.append((head, pending, tail))
    bare_graph = onnx.GraphProto()
    bare_graph.CopyFrom(graph)
    bare_graph.ClearField("initializer")
    graph_head, graph_tail = _split(bare_graph.SerializeToString(), GRAPH_INITIALIZER)
    bare_model = onnx.ModelProto()
    bare_model.CopyFrom(model)
    bare_model.ClearField("graph")
    model_head, model_tail = _split(bare_model.SerializeToString(), MODEL_GRAPH)

    def tensor_size(head: bytes, pending: Pending | None, tail: bytes) -> int:
        raw = len(_field(TENSOR_RAW_DATA, pending.size)) + pending.size if pending is not None else 0
        return len(head) + raw + len(tail)

    sizes = [tensor_size(*p) for p in parts]
    graph_size = len(graph_head) + len(graph_tail) + sum(len(_field(GRAPH_INITIALIZER, s)) + s for s in sizes)
    with open(path, "wb") as f:
        f.write(model_head)
        f.write(_field(MODEL_GRAPH, graph_size) + graph_head)
        for (head, pending, tail), size in zip(parts, sizes):
            f.write(_field(GRAPH_INITIALIZER, size) + head)
            if pending is not None:
                f.write(_field(TENSOR_RAW_DATA, pending.size))
                start = f.tell()
                pending.write(f)
                if f.tell() - start != pending.size:
                    raise ValueError(f"{f.tell() - start} bytes written for a tensor of {pending.size}")
            f.write(tail)
        f.write(graph_tail)
        f.write(model_tail)


def _is_pending(tensor: Any) -> bool:
    return any(e.key == "location" and e.value == PENDING for e in tensor.external_data)
