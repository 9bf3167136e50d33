"""One batch, and a source's batches split up: the model input of a batch, its size, and this rank's share.

``model_input(batch, input_key)`` picks the model input out of one batch (a
tensor, the first element of a tuple/list, or a dict entry);
``plan_batches`` splits a source into this rank's calibration batches and the
held-out verification batches (rank ``r`` of ``world_size`` takes the batches
``i`` with ``i % world_size == r``); ``shard`` is that rule alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InputError

#: dict keys taken as the model input when a dict batch has several entries and no --input-key
OBVIOUS_KEYS = ("input", "inputs", "x", "image", "images", "pixel_values", "data")


def model_input(batch: Any, input_key: str | None = None, *, where: str = "a batch") -> torch.Tensor:
    """The model input of one batch: a tensor, a tuple/list's first element, or a dict entry.

    A dict uses ``input_key`` when given, else its only tensor, else the one of
    ``OBVIOUS_KEYS`` it holds; anything else is an ``InputError`` naming the keys.
    """
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return model_input(batch[0], input_key, where=where)
    if isinstance(batch, Mapping):
        keys = list(batch)
        if input_key is not None:
            if input_key not in batch:
                raise InputError(f"{where} has no key `{input_key}` (keys: {', '.join(map(str, keys))}); "
                                 "pass one of those as `input_key`")
            return model_input(batch[input_key], None, where=where)
        tensors = [k for k in keys if isinstance(batch[k], torch.Tensor)]
        if len(tensors) == 1:
            return batch[tensors[0]]
        obvious = [k for k in keys if k in OBVIOUS_KEYS]
        if len(obvious) == 1:
            return model_input(batch[obvious[0]], None, where=where)
        raise InputError(f"{where} is a dict with keys {', '.join(f'`{k}`' for k in keys)} and none is obviously "
                         "the model input; pass `input_key` (or `forward=...` to run the model yourself)")
    raise InputError(f"{where} is a {type(batch).__name__}, not a tensor, tuple, list or dict; "
                     "return tensors from the data factory, or pass forward=callable(model, batch) in the Python API")


def batch_size_of(batch: Any) -> int:
    """Leading dimension of the first tensor found in a batch (0 if there is none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for value in values:
        size = batch_size_of(value)
        if size:
            return size
    return 0


def expected_input(model: nn.Module) -> str:
    """What the model's first layer (in registration order) takes, e.g. "`conv1` (Conv2d) expects (N, 3, H, W)"."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            dims = len(module.kernel_size)
            spatial = {1: "L", 2: "H, W", 3: "D, H, W"}.get(dims, "...")
            return f"`{name}` ({type(module).__name__}) expects (N, {module.in_channels}, {spatial})"
        if isinstance(module, nn.Linear):
            return f"`{name}` (Linear) expects (N, ..., {module.in_features})"
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return f"`{name}` ({type(module).__name__}) expects (N, {module.num_features}, ...)"
    return f"`{type(model).__name__}` declares no first layer bntool recognises"


# ----------------------------------------------------------------------------- splitting and sharding


@dataclass(frozen=True)
class BatchPlan:
    """This rank's calibration batches, its held-out verification batches, and how many calibration batches it gets."""

    calibration: Iterable[Any]
    verification: Iterable[Any] | None
    total: int | None


def plan_batches(batches: Iterable[Any], *, num_batches: int | None = None, verify_batches: int = 0,
                 rank: int = 0, world_size: int = 1) -> BatchPlan:
    """Split ``batches`` into the first ``num_batches`` for calibration and the next ``verify_batches``.

    Without ``num_batches``, calibration takes all but the last ``verify_batches``
    (this needs a source with a length). Each part is sharded: rank ``r`` takes
    the batches ``i`` with ``i % world_size == r``. The calibration iterable
    must be consumed before the verification one (they may share one iterator).
    """
    if num_batches is not None and num_batches < 1:
        raise InputError(f"`num_batches` {num_batches}: pass a positive number of batches")
    if verify_batches < 0:
        raise InputError(f"`verify_batches` {verify_batches}: pass 0 or a positive number of batches")
    if not 0 <= rank < world_size:
        raise InputError(f"rank {rank} is not in a world of {world_size} processes")
    try:
        length = len(batches)  # type: ignore[arg-type]
    except TypeError:
        length = None
    if length is not None:
        if length == 0:
            raise InputError("the data is empty (0 batches); pass a data source with at least one batch")
        room = length - verify_batches
        n_cal = room if num_batches is None else min(num_batches, room)
        if n_cal < 1:
            raise InputError(f"the data has {length} batches: not enough for `verify_batches` {verify_batches} "
                             "plus at least one calibration batch; pass fewer `verify_batches`")
    else:
        if verify_batches and num_batches is None:
            raise InputError("`verify_batches` needs `num_batches` for a data source without a length "
                             "(the verification batches are the ones after the calibration batches)")
        n_cal = num_batches
    total = len(range(rank, n_cal, world_size)) if n_cal is not None else None
    if length is not None and hasattr(batches, "__getitem__"):
        calibration = _Indexed(batches, range(rank, n_cal, world_size))
        verification = _Indexed(batches, range(n_cal + rank, n_cal + verify_batches, world_size))
    else:
        shared: list[Iterator[Any]] = []  # one iterator, created when calibration starts
        calibration = _Take(batches, shared, n_cal, rank, world_size)
        verification = _Take(batches, shared, verify_batches, rank, world_size)
    return BatchPlan(calibration, verification if verify_batches else None, total)


class _Indexed:
    def __init__(self, batches: Any, indices: range):
        self.batches, self.indices = batches, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[Any]:
        return (self.batches[i] for i in self.indices)


class _Take:
    def __init__(self, batches: Iterable[Any], shared: list, count: int | None, rank: int, world_size: int):
        self.batches, self.shared, self.count, self.rank, self.world_size = batches, shared, count, rank, world_size

    def __iter__(self) -> Iterator[Any]:
        if not self.shared:
            self.shared.append(iter(self.batches))
        source = self.shared[0]
        for i in range(self.count) if self.count is not None else itertools.count():
            try:
                batch = next(source)
            except StopIteration:
                return
            if i % self.world_size == self.rank:
                yield batch


def shard(batches: Iterable[Any], rank: int, world_size: int) -> Iterable[Any]:
    """Rank ``rank``'s share of ``batches``: the batches ``i`` with ``i % world_size == rank``."""
    return plan_batches(batches, rank=rank, world_size=world_size).calibration
