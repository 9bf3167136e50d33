"""Bit for bit: whether tensors are identical, and a record of a model's state to prove later that it did not change.

``same_bits(a, b)`` is the one comparison bntool trusts: same dtype, same
shape, and every element's bits equal, compared as integers, so a NaN equals
the same NaN and 0.0 differs from -0.0. Everything that proves "unchanged" or
"written exactly" uses it: the recalibration's state check, the frozen
layers' check, the written file's check (``persist``; ``same_bits_in_file``
for ``tensorfile`` and ``onnx_stream``, a block at a time).

``Snapshot(model, skip, only=...)`` copies every parameter and buffer not
named in ``skip`` (and, with ``only``, under one of those modules) into one
flat buffer per (device, dtype): one large allocation rather
than hundreds, which would fragment the CPU heap and slow every activation
allocation of the pass that follows (measured: about 10% on a ResNet-50
forward). ``changed(model)`` names what is no longer bit-identical (changed,
replaced, added or removed).

The copies use ``torch._foreach_copy_`` (a few fused kernels on a GPU instead
of one per tensor). On a GPU the check copies the current values into a second
flat buffer and compares the two with one ``torch.equal``: one host
synchronisation per (device, dtype), not one per tensor; only when they differ
are the tensors compared one by one, to name them. On the CPU the record of a
tensor is not a copy but a 256-bit BLAKE2b digest of its bytes (``digest``):
no memory the size of the model (recalibrating a ResNet-50 peaks a whole
checkpoint lower), at about a gigabyte a second, and a change goes unseen only
if it collides, with probability 2^-256.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Sequence
from typing import BinaryIO

import torch
from torch import nn

from ..runtime.pages import release

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
#: device types whose tensors are compared one by one in place (no synchronisation to save there)
COMPARE_IN_PLACE = ("cpu",)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as an integer tensor (a view of the same shape; flat bytes for a dtype wider than 8 bytes)."""
    kind = _INT_OF_SIZE.get(t.element_size())
    return t.view(kind) if kind is not None else t.contiguous().reshape(-1).view(torch.uint8)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical: same dtype and shape, every element's bits equal (a NaN equals the same NaN), on ``a``'s device."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if b.device != a.device:
        b = b.to(a.device)
    return bool(torch.equal(bits(a.detach()), bits(b.detach())))


def same_bits_in_file(f: BinaryIO, offset: int, data: torch.Tensor, buffer: torch.Tensor) -> bool:
    """Whether the open file ``f`` holds exactly the bytes ``data`` (flat uint8, on the CPU) at ``offset``, read
    into ``buffer`` (uint8) a block at a time: a written file checked without holding more than a block of it."""
    f.seek(offset)
    for at in range(0, data.numel(), buffer.numel()):
        n = min(buffer.numel(), data.numel() - at)
        view = buffer[:n]
        if f.readinto(memoryview(view.numpy())) != n or not same_bits(view, data[at:at + n]):
            return False
    return True


def state(model: nn.Module, skip: set[str], only: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by qualified name, less ``skip``; with ``only``, those under these modules alone."""
    tensors = itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    return {name: t.detach() for name, t in tensors
            if t is not None and name not in skip and (only is None or _under(name, only))}


def _under(name: str, modules: Sequence[str]) -> bool:
    return any(not m or name.startswith(f"{m}.") for m in modules)


def copy_all(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``target.copy_(source)`` for each pair, fused where torch can (``_foreach_copy_``)."""
    if targets and hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(targets, sources)
        return
    for target, source in zip(targets, sources):
        target.copy_(source)


def digest(tensor: torch.Tensor) -> bytes:
    """A 256-bit BLAKE2b digest of a CPU tensor's bytes (its bits, whatever its dtype)."""
    flat = bits(tensor.detach().contiguous().reshape(-1))
    found = hashlib.blake2b(memoryview(flat.numpy()) if flat.numel() else b"", digest_size=32).digest()
    release((tensor,))  # (a memory-mapped tensor's pages, read for the digest, go back to the page cache)
    return found


class Snapshot:
    """A record of every parameter and buffer except those named in ``skip`` (with ``only``: under those modules):
    copies on a GPU, digests on the CPU."""

    def __init__(self, model: nn.Module, skip: Iterable[str] = (), *, only: Iterable[str] | None = None):
        self.skip = set(skip)
        self.only = None if only is None else list(only)
        tensors = state(model, self.skip, self.only)
        self.meta = {name: (t.shape, t.dtype, t.device) for name, t in tensors.items()}
        self.digests = {name: digest(t) for name, t in tensors.items() if t.device.type in COMPARE_IN_PLACE}
        self.groups: dict[tuple, list[str]] = {}
        for name, t in tensors.items():
            if name not in self.digests:
                self.groups.setdefault((t.device, t.dtype), []).append(name)
        self.buffers = {key: torch.empty(sum(tensors[n].numel() for n in names), dtype=key[1], device=key[0])
                        for key, names in self.groups.items()}
        self.views = {}
        for key, names in self.groups.items():
            views = self._views(self.buffers[key], names)
            self.views.update(zip(names, views))
            copy_all(views, [tensors[name] for name in names])

    def _views(self, buffer: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
        shapes = [self.meta[name][0] for name in names]
        return [piece.view(shape) for piece, shape in zip(buffer.split([s.numel() for s in shapes]), shapes)]

    def changed(self, model: nn.Module) -> list[str]:
        """Names not bit-identical to the snapshot (changed, replaced, added or removed)."""
        after = state(model, self.skip, self.only)
        moved = {name for name, meta in self.meta.items()
                 if name not in after or (after[name].shape, after[name].dtype, after[name].device) != meta}
        changed = set(moved)
        changed.update(name for name, d in self.digests.items() if name not in moved and digest(after[name]) != d)
        for key, everything in self.groups.items():
            names = [name for name in everything if name not in moved]
            if not names:
                continue
            if key[0].type not in COMPARE_IN_PLACE and len(names) == len(everything):
                now = torch.empty_like(self.buffers[key])
                copy_all(self._views(now, names), [after[name] for name in names])
                if same_bits(now, self.buffers[key]):
                    continue  # the common case: one comparison (one host synchronisation) for all of them
            changed.update(name for name in names if not same_bits(self.views[name], after[name]))
        return [name for name in self.meta if name in changed] + [name for name in after if name not in self.meta]
