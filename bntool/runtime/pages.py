"""Memory-mapped tensors whose pages go back to the page cache once read.

A tensor memory-mapped from a file (``io.tensorfile.read_mapped``) costs no
memory until it is read; every page read then stays in the process's resident
memory for as long as the tensor lives, although the file holds the same
bytes. A command that reads every weight (a finiteness scan, a forward pass,
the write of the result) would so end up holding the whole checkpoint.
``release`` drops a mapped tensor's pages from the process (``madvise``
``MADV_DONTNEED``): the next read maps them again from the page cache, at the
cost of a minor page fault.

Only pages nobody wrote are dropped: a mapping is copy-on-write, so a tensor
changed in place holds the changed pages as the process's own memory, and
dropping them would bring the file's bytes back. ``/proc/self/pagemap`` tells
the two apart (a page read from the file is a file page; a written one is
anonymous), and a mapping with any written (or swapped) page is left whole.
Where that cannot be told (not Linux, no pagemap), nothing is dropped.

``released_after_calls(model)`` releases each module's own mapped tensors
after each of its calls, and all of them at the end: a forward pass of a
memory-mapped model then holds one layer's weights at a time, not the model.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

PAGE = mmap.PAGESIZE
#: mappings smaller than this are not worth a system call (BatchNorm statistics: a page or two)
SMALLEST = 4 * PAGE
_MADV_DONTNEED = 4
_PRESENT, _SWAPPED, _FILE = 63, 62, 61  # bits of a pagemap entry

#: data pointer of a mapped storage -> (start, length) of its mapping; an entry goes with its mapping
_MAPPED: dict[int, tuple[int, int]] = {}
_madvise: Any = None
_pagemap: tuple[int, int] | None = None  # (process id, file descriptor)


def register(storage_pointer: int, mapping: mmap.mmap, start: int) -> None:
    """Record that the storage at ``storage_pointer`` lies in ``mapping`` (private, copy-on-write), which begins
    at address ``start``; the record is dropped when the mapping is."""
    if len(mapping) >= SMALLEST:
        _MAPPED[storage_pointer] = (start, len(mapping))
        weakref.finalize(mapping, _MAPPED.pop, storage_pointer, None)


def _libc_madvise() -> Any:
    """``madvise`` from the C library (False where it or ``/proc/self/pagemap`` is missing)."""
    global _madvise
    if _madvise is None:
        _madvise = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                libc = ctypes.CDLL("libc.so.6", use_errno=True)
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                libc.madvise.restype = ctypes.c_int
                if _pagemap_fd() is not None:
                    _madvise = libc.madvise
            except (OSError, AttributeError):
                pass
    return _madvise


def _pagemap_fd() -> int | None:
    """This process's ``/proc/self/pagemap``, opened once per process (a forked child opens its own: the one it
    inherits describes its parent's pages)."""
    global _pagemap
    if _pagemap is None or _pagemap[0] != os.getpid():
        try:
            _pagemap = (os.getpid(), os.open("/proc/self/pagemap", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
        except OSError:
            return None
    return _pagemap[1]


def _page_flags(start: int, length: int) -> np.ndarray | None:
    """The pagemap entry of every page of ``[start, start + length)``, or None where it cannot be read."""
    count = (length + PAGE - 1) // PAGE
    fd = _pagemap_fd()
    if fd is None:
        return None
    try:
        data = os.pread(fd, count * 8, start // PAGE * 8)
    except (OSError, TypeError):
        return None
    if len(data) != count * 8:
        return None
    return np.frombuffer(data, dtype="<u8")


def _bit(flags: np.ndarray, bit: int) -> np.ndarray:
    return (flags >> np.uint64(bit)) & np.uint64(1) == 1


def _mapping_of(tensor: torch.Tensor) -> tuple[int, int] | None:
    if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu" or not _MAPPED:
        return None
    try:
        return _MAPPED.get(tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # (a tensor without storage: a subclass, a fake tensor)
        return None


def is_mapped(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` lies in a file mapping registered here (one ``release`` can drop)."""
    return _mapping_of(tensor) is not None


def resident(tensor: torch.Tensor) -> int | None:
    """Bytes of ``tensor``'s mapping in the process's memory now; None for a tensor not mapped (or unknown)."""
    found = _mapping_of(tensor)
    flags = _page_flags(*found) if found is not None and _libc_madvise() else None
    return None if flags is None else int(_bit(flags, _PRESENT).sum()) * PAGE


def release(tensors: Iterable[torch.Tensor]) -> int:
    """Drop the pages of each mapped tensor of ``tensors`` from the process, where none was written; the tensors
    keep their values (read again from the page cache when used). Returns the bytes dropped."""
    madvise = _libc_madvise()
    if not madvise or not _MAPPED:
        return 0
    dropped = 0
    for tensor in tensors:
        found = _mapping_of(tensor)
        if found is None:
            continue
        start, length = found
        flags = _page_flags(start, length)
        present = _bit(flags, _PRESENT) if flags is not None else None
        if present is None or bool((present & ~_bit(flags, _FILE)).any() or _bit(flags, _SWAPPED).any()):
            continue  # a page written in place (the process's own now), or one we cannot tell: kept
        present = int(present.sum())
        if present and madvise(start, length, _MADV_DONTNEED) == 0:
            dropped += present * PAGE
    return dropped


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]


def _release_own(module: nn.Module, args: Any, output: Any) -> None:
    release(_own_tensors(module))  # (a forward hook: returns None, the output stays the module's)


@contextlib.contextmanager
def released_after_calls(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, each module of ``model`` holding mapped tensors releases them after each of its calls;
    every mapped tensor of the model is released at the end (those read outside their module's call too)."""
    if not _MAPPED or not _libc_madvise():
        yield model
        return
    handles = []
    for module in model.modules():
        own = [t for t in _own_tensors(module) if is_mapped(t)]
        if own:
            handles.append(module.register_forward_hook(_release_own))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        release(t for m in model.modules() for t in _own_tensors(m))
