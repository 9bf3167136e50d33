"""Exact per-channel statistics: count, mean and M2 in float64, merged with Chan et al.

``ChannelStats`` is the estimator behind ``bntool recalibrate``: it holds, for
each channel, the number of values seen, their mean, and ``M2``, the sum of
squared deviations from that mean. Two estimators over disjoint data merge
exactly (up to float64 rounding) with the parallel formula of Chan, Golub and
LeVeque::

    n = n_a + n_b,  delta = mean_b - mean_a
    mean = mean_a + delta * n_b / n
    M2   = M2_a + M2_b + delta**2 * n_a * n_b / n

so batches of any size, BN calls on different shapes, and ranks of a
distributed job all combine into the population statistics. ``result()`` gives
the population mean and the unbiased variance ``M2 / (n - 1)``, which is what
PyTorch stores in ``running_var``.

``reduce_calls`` turns many per-call ``(count, mean, unbiased var)`` triples,
stacked, into one group estimate in a few vectorised float64 operations (the
same formula, written for K groups at once: ``M2 = sum (n_k - 1) var_k +
sum n_k (mean_k - mean)**2``). The recalibration hooks use it to merge lazily.

``merge_across_ranks`` all-gathers every rank's estimators and merges them in
rank order, so every process of a distributed job ends bit-identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import BntoolError


class ChannelStats:
    """Count, mean and M2 of each channel, in float64 (``count`` is shared by all channels)."""

    __slots__ = ("count", "mean", "m2")

    def __init__(self, num_channels: int, device: torch.device | str = "cpu"):
        self.count = 0
        self.mean = torch.zeros(num_channels, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(num_channels, dtype=torch.float64, device=device)

    def __repr__(self) -> str:
        return f"ChannelStats(channels={self.mean.numel()}, count={self.count})"

    @classmethod
    def on(cls, mean: torch.Tensor, m2: torch.Tensor, count: int = 0) -> ChannelStats:
        """An estimator over existing float64 tensors (views of a larger buffer): updates write into them."""
        stats = cls.__new__(cls)
        stats.count, stats.mean, stats.m2 = count, mean, m2
        return stats

    @classmethod
    def of(cls, x: torch.Tensor, channel_dim: int = 1) -> ChannelStats:
        """Statistics of one tensor, computed in float64 (two passes over the values)."""
        x64 = x.detach().to(torch.float64).movedim(channel_dim, 0).reshape(x.shape[channel_dim], -1)
        stats = cls(x64.shape[0], x64.device)
        stats.count = x64.shape[1]
        if stats.count:
            stats.mean = x64.mean(dim=1)
            stats.m2 = (x64 - stats.mean[:, None]).square().sum(dim=1)
        return stats

    def update(self, count: int, mean: torch.Tensor, m2: torch.Tensor) -> ChannelStats:
        """Merge in ``count`` values per channel with the given mean and M2 (any float dtype)."""
        count = int(count)
        if count == 0:
            return self
        mean = mean.to(device=self.mean.device, dtype=torch.float64)
        m2 = m2.to(device=self.mean.device, dtype=torch.float64)
        if self.count == 0:  # in place: the estimator allocates nothing after construction
            self.count = count
            self.mean.copy_(mean)
            self.m2.copy_(m2)
            return self
        total = self.count + count
        delta = mean - self.mean
        self.mean.add_(delta, alpha=count / total)
        self.m2.add_(m2).add_(delta.square_(), alpha=self.count * count / total)
        self.count = total
        return self

    def merge(self, other: ChannelStats) -> ChannelStats:
        """Merge another estimator over disjoint data into this one."""
        return self.update(other.count, other.mean, other.m2)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Population mean and unbiased population variance (``M2 / (count - 1)``), float64."""
        if self.count < 2:
            raise ValueError(f"need at least 2 values per channel for a variance, have {self.count}")
        return self.mean, self.m2 / (self.count - 1)


def reduce_calls(
    counts: Sequence[int], means: Sequence[torch.Tensor], variances: Sequence[torch.Tensor]
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Combine per-call ``(count, mean, unbiased variance)`` into one ``(count, mean, M2)``.

    ``means`` / ``variances`` are sequences of per-call tensors or already
    stacked ``(calls, channels)`` tensors, float32 (BatchNorm's own batch
    statistics) or float64; all arithmetic is float64. Every call has at least
    2 values per channel. On a GPU nothing here waits for the GPU.
    """
    weights = host_tensor(counts, means[0].device)[:, None]
    mean_k = means.to(torch.float64) if isinstance(means, torch.Tensor) else torch.stack(list(means)).to(torch.float64)
    var_k = (variances.to(torch.float64) if isinstance(variances, torch.Tensor)
             else torch.stack(list(variances)).to(torch.float64))
    total = int(sum(counts))
    mean = (weights * mean_k).sum(dim=0) / total
    m2 = ((weights - 1.0) * var_k).sum(dim=0) + (weights * (mean_k - mean).square()).sum(dim=0)
    return total, mean, m2


def host_tensor(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """Python numbers as a float64 tensor on ``device`` without a host synchronisation.

    ``torch.tensor(values, device="cuda")`` copies from pageable memory and
    waits for the GPU to finish everything queued before it; a copy from pinned
    memory with ``non_blocking=True`` does not (the caching host allocator keeps
    the pinned block alive until the copy has run).
    """
    host = torch.tensor(values, dtype=torch.float64)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


# ----------------------------------------------------------------------------- across ranks


class RankFailure(BntoolError):
    """Another rank failed during its local pass (raised on the ranks that did not)."""

    exit_code = 2


def merge_across_ranks(
    stats: dict[str, ChannelStats],
    sums: dict[str, torch.Tensor],
    group: Any,
    world_size: int,
    failed: bool = False,
) -> tuple[dict[str, ChannelStats], dict[str, torch.Tensor]]:
    """All-gather every rank's estimators and plain float64 sums, merged in rank order on the CPU.

    Every rank runs the same float64 operations in the same order on the same
    gathered bytes, so all ranks end bit-identical. One all-gather of one flat
    float64 vector (on the GPU when the backend is NCCL). ``failed`` tells the
    other ranks this one could not finish its pass; they raise ``RankFailure``
    instead of waiting forever or writing partial statistics.
    """
    import torch.distributed as dist

    parts = [torch.tensor([float(failed)], dtype=torch.float64)]
    for s in stats.values():
        parts += [torch.tensor([float(s.count)], dtype=torch.float64), s.mean.cpu(), s.m2.cpu()]
    parts += [t.to(torch.float64).cpu().reshape(-1) for t in sums.values()]
    vector = torch.cat(parts)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    gathered = [torch.empty_like(vector, device=device) for _ in range(world_size)]
    dist.all_gather(gathered, vector.to(device), group=group)
    gathered = [g.cpu() for g in gathered]
    bad = [rank for rank, g in enumerate(gathered) if g[0] != 0]
    if bad and not failed:
        raise RankFailure(f"rank(s) {', '.join(map(str, bad))} failed; see their error messages")
    merged = {name: ChannelStats(s.mean.numel()) for name, s in stats.items()}
    totals = {name: torch.zeros(t.numel(), dtype=torch.float64) for name, t in sums.items()}
    for g in gathered:  # rank order
        offset = 1
        for name, s in stats.items():
            channels = s.mean.numel()
            count = int(g[offset])
            merged[name].update(count, g[offset + 1 : offset + 1 + channels], g[offset + 1 + channels : offset + 1 + 2 * channels])
            offset += 1 + 2 * channels
        for name, t in sums.items():
            totals[name] = totals[name] + g[offset : offset + t.numel()]
            offset += t.numel()
    return merged, {name: totals[name].reshape(sums[name].shape) for name in sums}
