"""safetensors files written and checked one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header (each
tensor's dtype, shape and byte offsets, plus ``__metadata__``), padded with
spaces to a multiple of 8, then the tensors' bytes back to back. ``write``
streams each tensor's bytes straight from its storage (no copy of the model,
no in-memory image of the file); ``differences`` reads the file back in
blocks and compares it with the tensors bit for bit, again without holding
more than a block. Files written here are ordinary safetensors files: the
``safetensors`` library reads them (bntool itself loads with it).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..runtime import pages
from ..verify.bits import same_bits_in_file

#: torch dtype -> safetensors dtype name
DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        DTYPES[getattr(torch, _name)] = _code
#: bytes per comparison block
BLOCK = 16 << 20


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's data as a flat uint8 CPU tensor (a view when it is already contiguous on the CPU)."""
    flat = tensor.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous()
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)


def header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The padded header (with its length prefix) for ``tensors`` laid out in the order given."""
    entries: dict[str, Any] = {}
    if metadata:
        entries["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in DTYPES:
            raise TypeError(f"`{name}` has dtype {tensor.dtype}, which safetensors cannot store")
        size = tensor.numel() * tensor.element_size()
        entries[name] = {"dtype": DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` as safetensors, one tensor's bytes at a time, and fsync it."""
    with open(path, "wb") as f:
        f.write(header(tensors, metadata))
        for tensor in tensors.values():
            data = _bytes(tensor)
            if data.numel():
                f.write(memoryview(data.numpy()))
            pages.release((tensor,))  # (a memory-mapped tensor's pages, read for the write, go back)
        f.flush()
        os.fsync(f.fileno())


def read_mapped(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The file's tensors, each memory-mapped copy-on-write on its own: pages are read when used, a tensor
    changed in place changes a private copy of its pages, never the file, and a tensor let go unmaps its pages
    (one mapping for the whole file would keep every page it ever read for as long as any tensor lives). A
    tensor whose bytes are not aligned to its element size is copied. The header must have been validated
    (``safetensors.safe_open`` does)."""
    import mmap

    start, entries = read_header(path)
    dtypes = {code: dtype for dtype, code in DTYPES.items()}
    tensors = {}
    with open(path, "rb") as f:
        for name, entry in entries.items():
            if name == "__metadata__":
                continue
            dtype, shape = dtypes[entry["dtype"]], entry["shape"]
            begin, end = (start + o for o in entry["data_offsets"])
            if end == begin:
                tensors[name] = torch.empty(shape, dtype=dtype)
                continue
            page = begin - begin % mmap.ALLOCATIONGRANULARITY
            mapped = mmap.mmap(f.fileno(), end - page, access=mmap.ACCESS_COPY, offset=page)
            raw = torch.frombuffer(mapped, dtype=torch.uint8, count=end - begin, offset=begin - page)
            if begin % torch.empty((), dtype=dtype).element_size():
                raw = raw.clone()
            else:  # (its pages can be handed back once read: ``pages.release``)
                pages.register(raw.untyped_storage().data_ptr(), mapped, raw.data_ptr() - (begin - page))
            tensors[name] = raw.view(dtype).reshape(shape)
    return tensors


def read_header(path: str | os.PathLike) -> tuple[int, dict[str, Any]]:
    """``(offset of the data, header dict)`` of a safetensors file."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return 8 + length, json.loads(f.read(length))


def differences(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names whose dtype, shape or bytes in the file at ``path`` differ from ``tensors`` (or are missing/extra)."""
    start, entries = read_header(path)
    entries.pop("__metadata__", None)
    different = sorted(set(entries) ^ set(tensors))
    buffer = torch.empty(BLOCK, dtype=torch.uint8)
    with open(Path(path), "rb") as f:
        for name, tensor in tensors.items():
            entry = entries.get(name)
            if entry is None:
                continue
            if entry["dtype"] != DTYPES.get(tensor.dtype) or entry["shape"] != list(tensor.shape):
                different.append(name)
                continue
            data = _bytes(tensor)
            begin, end = entry["data_offsets"]
            if end - begin != data.numel():
                different.append(name)
                continue
            if not same_bits_in_file(f, start + begin, data, buffer):
                different.append(name)
            pages.release((tensor,))
    return different
