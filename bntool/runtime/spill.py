"""Tensors kept by name, in memory while they are small, in an unlinked temporary file beyond that.

Verification keeps the original model's output at every probed layer until
the candidate has run. For a large model on large inputs that is as much
memory as the model itself; ``TensorStore`` writes what does not fit in
``limit`` bytes to a temporary file that has no name in any folder (so
nothing is left behind, even after kill -9) and reads each tensor back when
it is asked for. Reads and writes go through the page cache, which the
operating system gives back under pressure, unlike the process's own memory.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch

#: bytes kept in memory before tensors go to the temporary file
DEFAULT_LIMIT = 4 << 20


class TensorStore:
    """``put(name, tensor)`` / ``get(name)``: a copy of the tensor (on its device), from memory or from disk."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit, self.kept = limit, 0
        self.memory: dict[str, torch.Tensor] = {}
        self.on_disk: dict[str, tuple[int, torch.dtype, tuple[int, ...], torch.device]] = {}
        self.file: Any = None

    def __contains__(self, name: str) -> bool:
        return name in self.memory or name in self.on_disk

    def put(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.kept + size <= self.limit:
            self.memory[name] = tensor.detach().clone()
            self.kept += size
            return
        if self.file is None:
            self.file = tempfile.TemporaryFile()
        data = tensor.detach().cpu().contiguous()
        offset = self.file.seek(0, 2)
        if data.numel():
            self.file.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        self.on_disk[name] = (offset, data.dtype, tuple(data.shape), tensor.device)

    def get(self, name: str) -> torch.Tensor:
        if name in self.memory:
            return self.memory[name]
        offset, dtype, shape, device = self.on_disk[name]
        tensor = torch.empty(shape, dtype=dtype)
        if tensor.numel():
            self.file.seek(offset)
            self.file.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        return tensor.to(device)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def __del__(self) -> None:
        self.close()
