"""The hot path of recalibration: each BN call's batch statistics, read back with no work of bntool's own.

During the pass every selected BN is in training mode with momentum 1.0. A
forward pre-hook (one that also sees keyword arguments: ``self.bn(input=x)``)
points the BN's ``running_mean`` / ``running_var`` at a fresh, zeroed slot
of a buffer allocated once per layer, so BatchNorm itself writes that call's
batch mean and unbiased batch variance there (``1.0 * batch + 0.0 * 0``,
exact). bntool adds no kernel and no host synchronisation per call: the hook
only does Python bookkeeping (the call's value count comes from the shape).
The BN's own buffers are not touched until the pass has succeeded.

Every ``merge_every`` calls the filled slots are merged into a float64
``ChannelStats`` on the device (a few vectorised kernels, no synchronisation:
the per-call counts go up through pinned memory) and zeroed again. At the end
of the pass ``gather`` brings everything every layer holds to the CPU in one
transfer per device, where the rest is plain float64 arithmetic on small
vectors; ``write_back`` sends the results down in one transfer per (device,
dtype) and copies them into place with fused copies.

Calls with no values (an empty batch) are skipped and counted. BatchNorm
computes batch statistics in its input dtype, so for a float16 / bfloat16
input (or half-precision buffers) the hook computes the call's statistics from
the input itself in float64 instead (slower, exact).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .snapshot import copy_all
from .stats import ChannelStats, reduce_calls

#: input dtypes whose batch statistics BatchNorm computes precisely enough to read back
READBACK_DTYPES = (torch.float32, torch.float64)
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def bn_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The tensor a BN is called with: positional, or by keyword (``input=``, or any name a subclass uses)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    value = kwargs.get("input")
    if isinstance(value, torch.Tensor):
        return value
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def values_per_channel(x: torch.Tensor) -> int:
    return x.numel() // x.shape[1] if x.dim() > 1 and x.shape[1] else 0


class Collector:
    """One selected BN during the pass: where its calls' statistics go, and how many calls it had."""

    def __init__(self, name: str, module: nn.Module, merge_every: int, *, plain_forward: bool):
        self.name, self.module, self.merge_every = name, module, merge_every
        buffers = module._buffers
        self.own = {key: buffers.get(key) for key in BN_BUFFERS}  # put back after the pass, written on success
        mean = self.own["running_mean"]
        channels, device, self.dtype = module.num_features, mean.device, mean.dtype
        self.stats = ChannelStats(channels, device)
        self.batch_var_sum = torch.zeros(channels, dtype=torch.float64, device=device)
        self.readback = self.dtype in READBACK_DTYPES
        self.slots = torch.zeros(merge_every if self.readback else 0, 2, channels, dtype=self.dtype, device=device)
        self.views: list[tuple[torch.Tensor, torch.Tensor]] = []  # slot i's (mean, var) views, made at first use
        scratch = torch.zeros(2, channels, dtype=self.dtype, device=device)
        self.scratch = (scratch[0], scratch[1])  # what BN writes to when a call is not read back
        self.exact: torch.Tensor | None = None  # float64 slots, made at the first half-precision call
        self.counts: list[int] = []
        self.exact_counts: list[int] = []
        self.calls = self.empty_calls = self.float64_calls = 0
        # _BatchNorm.forward skips num_batches_tracked when it is None (one small kernel less per call);
        # a forward of its own gets a scratch counter instead
        self.tracked = None if plain_forward else torch.zeros((), dtype=torch.long, device=device)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = bn_input(args, kwargs)
        buffers = module._buffers
        buffers["num_batches_tracked"] = self.tracked
        count = values_per_channel(x) if x is not None else 0
        if count == 0:
            if x is not None:
                self.empty_calls += 1
            buffers["running_mean"], buffers["running_var"] = self.scratch
            return
        self.calls += 1
        if self.readback and x.dtype in READBACK_DTYPES:
            if len(self.counts) == self.merge_every:
                self.flush()
            index = len(self.counts)
            if index == len(self.views):
                self.views.append((self.slots[index, 0], self.slots[index, 1]))
            buffers["running_mean"], buffers["running_var"] = self.views[index]
            self.counts.append(count)
            return
        buffers["running_mean"], buffers["running_var"] = self.scratch
        if count < 2:
            return  # BatchNorm refuses one value per channel itself, with the message the pass explains
        if self.exact is None:
            self.exact = torch.empty(self.merge_every, 2, x.shape[1], dtype=torch.float64, device=x.device)
        if len(self.exact_counts) == self.merge_every:
            self.flush()
        dims = [0, *range(2, x.dim())]
        var, mean = torch.var_mean(x.detach().to(torch.float64), dim=dims, correction=1)
        slot = self.exact[len(self.exact_counts)]
        slot[0].copy_(mean)
        slot[1].copy_(var)
        self.exact_counts.append(count)
        self.float64_calls += 1

    def flush(self) -> None:
        """Merge the filled slots into the float64 estimator, on the device, and zero them for reuse."""
        if self.counts:
            calls = self.slots[: len(self.counts)]
            merge_calls(self.stats, self.batch_var_sum, self.counts, calls)
            calls.zero_()  # queued after the merge reads them; a zeroed slot makes BN's write exact
            self.counts = []
        if self.exact_counts:
            merge_calls(self.stats, self.batch_var_sum, self.exact_counts, self.exact[: len(self.exact_counts)])
            self.exact_counts = []

    def put_back(self) -> None:
        """The BN's own buffer objects, as they were before the pass (they were not written)."""
        self.module._buffers.update(self.own)

    def pending(self) -> list[torch.Tensor]:
        """Everything this layer holds on the device, flat: the estimator, the batch-variance sum, unmerged calls."""
        parts = [self.stats.mean, self.stats.m2, self.batch_var_sum, self.slots[: len(self.counts)].reshape(-1)]
        if self.exact_counts:
            parts.append(self.exact[: len(self.exact_counts)].reshape(-1))
        return parts

    def finish(self, flat: torch.Tensor) -> tuple[ChannelStats, torch.Tensor]:
        """The CPU float64 estimator and batch-variance sum, from this layer's share of ``gather``."""
        channels = self.stats.mean.numel()
        stats = ChannelStats(channels)
        stats.count = self.stats.count
        stats.mean, stats.m2, var_sum = (flat[i * channels : (i + 1) * channels].clone() for i in range(3))
        offset = 3 * channels
        for counts in (self.counts, self.exact_counts):
            if counts:
                calls = flat[offset : offset + 2 * channels * len(counts)].reshape(len(counts), 2, channels)
                merge_calls(stats, var_sum, counts, calls)
                offset += 2 * channels * len(counts)
        return stats, var_sum


def merge_calls(stats: ChannelStats, var_sum: torch.Tensor, counts: Sequence[int], calls: torch.Tensor) -> None:
    """Merge stacked ``(calls, 2, channels)`` per-call (mean, unbiased variance) into ``stats`` / ``var_sum``."""
    stats.update(*reduce_calls(counts, calls[:, 0], calls[:, 1]))
    var_sum.add_(calls[:, 1].sum(dim=0))


def gather(groups: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """Each group of flat tensors concatenated as float64 on the CPU: one transfer (one synchronisation) per device."""
    by_device: dict[torch.device, list[int]] = {}
    for index, parts in enumerate(groups):
        by_device.setdefault(parts[0].device, []).append(index)
    out: list[torch.Tensor] = [torch.empty(0)] * len(groups)
    for indices in by_device.values():
        flat = torch.cat([p.reshape(-1) for i in indices for p in groups[i]]).to(torch.float64).cpu()
        offset = 0
        for i in indices:
            n = sum(p.numel() for p in groups[i])
            out[i] = flat[offset : offset + n]
            offset += n
    return out


def write_back(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``target.copy_(values)`` for CPU ``values``: one upload per (device, dtype), then fused copies."""
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for target, values in pairs:
        groups.setdefault((target.device, target.dtype), []).append((target, values))
    with torch.no_grad():
        for (device, dtype), items in groups.items():
            flat = torch.cat([values.reshape(-1).to(dtype) for _, values in items]).to(device)
            pieces = flat.split([target.numel() for target, _ in items])
            copy_all([target for target, _ in items], [p.view(target.shape) for p, (target, _) in zip(pieces, items)])
