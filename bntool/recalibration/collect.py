"""The hot path of recalibration: each BN call's batch statistics, read back with no work of bntool's own.

During the pass every selected BN is in training mode with momentum 1.0. A
forward pre-hook (one that also sees keyword arguments: ``self.bn(input=x)``)
points the BN's ``running_mean`` / ``running_var`` at a fresh, zeroed slot,
so BatchNorm itself writes that call's batch mean and unbiased batch variance
there (``1.0 * batch + 0.0 * 0``, exact). bntool adds no kernel and no host
synchronisation per call: the hook only does Python bookkeeping (the call's
value count comes from the shape). The BN's own buffers are not touched until
the pass has succeeded.

The layers that share a device and a buffer dtype share a ``Pool``: one
allocation for all their slots, one for the float64 estimators, one for
scratch. Every ``merge_every`` calls a layer's filled slots are merged into
its float64 estimator on the device (a few vectorised kernels, no
synchronisation: the per-call counts go up through pinned memory) and zeroed.
At the end ``gather`` brings every pool to the CPU in one transfer and merges
what is left for all layers at once, as vectors over every channel of every
layer (``Totals``); under torch.distributed ``merge_ranks`` merges every
rank's ``Totals`` in rank order.

Calls with no values (an empty batch) are skipped and counted. BatchNorm
computes batch statistics in its input dtype, so for a float16 / bfloat16
input (or half-precision buffers) the hook computes the call's statistics from
the input itself in float64 instead (slower, exact).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..verify.bits import copy_all
from .stats import ChannelStats, merge_across_ranks, reduce_calls

#: input dtypes whose batch statistics BatchNorm computes precisely enough to read back
READBACK_DTYPES = (torch.float32, torch.float64)
#: each layer's channels start at a multiple of this in a pool (64-byte aligned views for cuDNN's kernels)
ALIGN = 16
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


class Pool:
    """Device memory of the selected BNs that share a device and a buffer dtype, allocated at once.

    ``slots[i, 0 | 1, channels]``: a layer's i-th unmerged call (mean, unbiased
    variance), written by BatchNorm itself; ``scratch``: where BatchNorm writes
    when a call is not read back; ``acc[0 | 1 | 2, channels]``: each layer's
    float64 estimator (mean, M2) and its sum of batch variances.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, channels: int, merge_every: int):
        self.device, self.dtype = device, dtype
        self.readback = dtype in READBACK_DTYPES
        self.slots = torch.zeros(merge_every if self.readback else 0, 2, channels, dtype=dtype, device=device)
        self.scratch = torch.zeros(2, channels, dtype=dtype, device=device)
        self.acc = torch.zeros(3, channels, dtype=torch.float64, device=device)
        self.layers: list[Collector] = []


#: calls held per layer before a merge, by device type, when the caller does not say
MERGE_EVERY = {"cuda": 64, "cpu": 16}


def collectors(entries: Sequence[tuple[str, nn.Module, bool]], merge_every: int | None) -> list[Collector]:
    """One ``Collector`` per ``(name, bn, plain_forward)``, in order, on pools by (device, buffer dtype)."""
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[str, nn.Module, bool]]] = {}
    for entry in entries:
        mean = entry[1]._buffers["running_mean"]
        groups.setdefault((mean.device, mean.dtype), []).append(entry)
    made: dict[str, Collector] = {}
    for (device, dtype), members in groups.items():
        widths = [-(-bn._buffers["running_mean"].numel() // ALIGN) * ALIGN for _, bn, _ in members]
        pool = Pool(device, dtype, sum(widths), merge_every or MERGE_EVERY.get(device.type, 64))
        offset = 0
        for (name, bn, plain), width in zip(members, widths):
            made[name] = Collector(name, bn, pool, offset, plain_forward=plain)
            offset += width
    return [made[name] for name, _, _ in entries]


class Collector:
    """One selected BN during the pass: the forward pre-hook, and what its calls left."""

    def __init__(self, name: str, module: nn.Module, pool: Pool, offset: int, *, plain_forward: bool):
        self.name, self.module, self.pool = name, module, pool
        self.own = {key: module._buffers.get(key) for key in BN_BUFFERS}  # put back after the pass
        self.width = self.own["running_mean"].numel()
        self.span = slice(offset, offset + self.width)
        self.stats = ChannelStats.on(pool.acc[0, self.span], pool.acc[1, self.span])
        self.var_sum = pool.acc[2, self.span]
        self.scratch = (pool.scratch[0, self.span], pool.scratch[1, self.span])
        self.views: list[tuple[torch.Tensor, torch.Tensor]] = []  # slot i's (mean, var), made at first use
        self.exact: torch.Tensor | None = None  # float64 slots, made at the first half-precision call
        self.counts: list[int] = []
        self.exact_counts: list[int] = []
        self.calls = self.empty_calls = self.float64_calls = 0
        pool.layers.append(self)
        # _BatchNorm.forward skips num_batches_tracked when it is None (one small kernel less per call);
        # a forward of its own gets a scratch counter instead
        self.tracked = None if plain_forward else torch.zeros((), dtype=torch.long, device=pool.device)

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
        if self.pool.readback and x.dtype in READBACK_DTYPES:
            index = len(self.counts)
            if index == len(self.pool.slots):
                self.flush()
                index = 0
            if index == len(self.views):
                slot = self.pool.slots[index]
                self.views.append((slot[0, self.span], slot[1, self.span]))
            buffers["running_mean"], buffers["running_var"] = self.views[index]
            self.counts.append(count)
            return
        buffers["running_mean"], buffers["running_var"] = self.scratch
        if count < 2:
            return  # BatchNorm refuses one value per channel itself, with the message the pass explains
        if self.exact is None:
            self.exact = torch.empty(max(len(self.pool.slots), 1), 2, self.width, dtype=torch.float64, device=x.device)
        if len(self.exact_counts) == len(self.exact):
            self.flush_exact()
        var, mean = torch.var_mean(x.detach().to(torch.float64), dim=[0, *range(2, x.dim())], correction=1)
        slot = self.exact[len(self.exact_counts)]
        slot[0].copy_(mean)
        slot[1].copy_(var)
        self.exact_counts.append(count)
        self.float64_calls += 1

    def flush(self) -> None:
        """Merge the filled slots into the float64 estimator, on the device, and zero them for reuse."""
        if self.counts:
            calls = self.pool.slots[: len(self.counts), :, self.span]
            merge_calls(self.stats, self.var_sum, self.counts, calls)
            calls.zero_()  # queued after the merge reads them; a zeroed slot makes BN's write exact
            self.counts = []

    def flush_exact(self) -> None:
        if self.exact_counts:
            merge_calls(self.stats, self.var_sum, self.exact_counts, self.exact[: len(self.exact_counts)])
            self.exact_counts = []

    def put_back(self) -> None:
        """The BN's own buffer objects, as they were before the pass (they were not written)."""
        self.module._buffers.update(self.own)


def merge_calls(stats: ChannelStats, var_sum: torch.Tensor, counts: Sequence[int], calls: torch.Tensor) -> None:
    """Merge stacked ``(calls, 2, channels)`` per-call (mean, unbiased variance) into ``stats`` / ``var_sum``."""
    stats.update(*reduce_calls(counts, calls[:, 0], calls[:, 1]))
    var_sum.add_(calls[:, 1].sum(dim=0))


# ----------------------------------------------------------------------------- after the pass


@dataclass
class Totals:
    """Every layer's statistics after the pass, float64 on the CPU, as vectors over all their channels.

    ``layers`` (collectors) in the order of the channel axis, ``widths`` their
    channel counts; per layer ``counts`` (values per channel), ``calls``,
    ``empty_calls``; per channel ``mean``, ``m2``, ``var_sum`` (the sum of
    batch variances) and the BN buffers as they were, ``old_mean``, ``old_var``.
    """

    layers: list[Collector]
    widths: list[int]
    counts: list[int]
    calls: list[int]
    empty_calls: list[int]
    mean: torch.Tensor
    m2: torch.Tensor
    var_sum: torch.Tensor
    old_mean: torch.Tensor
    old_var: torch.Tensor

    def per_channel(self, values: Sequence[float]) -> torch.Tensor:
        """One value per layer, repeated over that layer's channels."""
        return torch.tensor(values, dtype=torch.float64).repeat_interleave(torch.tensor(self.widths))

    def per_layer_max(self, values: torch.Tensor) -> list[float]:
        """The largest of each layer's channels."""
        index = torch.arange(len(self.widths)).repeat_interleave(torch.tensor(self.widths))
        out = torch.full((len(self.widths),), -torch.inf, dtype=values.dtype)
        return out.scatter_reduce_(0, index, values, "amax").tolist()

    def split(self, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return values.split(self.widths)


def gather(layers: Sequence[Collector]) -> Totals:
    """Every pool to the CPU in one transfer, and its unmerged calls merged there for all layers at once."""
    for c in layers:
        c.flush_exact()
    parts = []
    for pool in dict.fromkeys(c.pool for c in layers):
        pending = max(len(c.counts) for c in pool.layers)
        own = [c.own[key] for key in ("running_mean", "running_var") for c in pool.layers]
        flat = torch.cat([pool.acc.reshape(-1), pool.slots[:pending].reshape(-1), *own]).to(torch.float64).cpu()
        parts.append(_merge_pending(pool, pending, flat))
    order = [c for pool_part in parts for c in pool_part.layers]
    if len(parts) == 1:
        return parts[0]
    join = lambda key: torch.cat([getattr(p, key) for p in parts])  # noqa: E731
    return Totals(order, [w for p in parts for w in p.widths], [n for p in parts for n in p.counts],
                  [n for p in parts for n in p.calls], [n for p in parts for n in p.empty_calls],
                  *(join(key) for key in ("mean", "m2", "var_sum", "old_mean", "old_var")))


def _merge_pending(pool: Pool, pending: int, flat: torch.Tensor) -> Totals:
    """Chan-merge each layer's unmerged calls into its estimator: vectors over every channel of the pool."""
    layers, channels = pool.layers, pool.acc.shape[1]
    used = torch.cat([torch.arange(c.span.start, c.span.stop) for c in layers])  # without the alignment padding
    acc = flat[: 3 * channels].view(3, channels)[:, used]
    slots = flat[3 * channels : 3 * channels + 2 * pending * channels].view(pending, 2, channels)[:, :, used]
    old = flat[3 * channels + 2 * pending * channels :].view(2, -1)
    widths = [c.width for c in layers]
    rows = [[c.counts[k] if k < len(c.counts) else 0 for c in layers] for k in range(pending)]
    weights = torch.tensor(rows, dtype=torch.float64).view(pending, len(layers))
    weights = weights.repeat_interleave(torch.tensor(widths), dim=1)  # (calls, channels); 0 where a layer had fewer
    means, variances = slots[:, 0], slots[:, 1]
    n_new = weights.sum(dim=0)
    mean_new = (weights * means).sum(dim=0) / n_new.clamp_min(1.0)
    m2_new = ((weights - 1.0).clamp_min(0.0) * variances).sum(dim=0) + (weights * (means - mean_new).square()).sum(dim=0)
    n_old = torch.tensor([c.stats.count for c in layers], dtype=torch.float64).repeat_interleave(torch.tensor(widths))
    total = n_old + n_new
    share = torch.where(total > 0, n_new / total.clamp_min(1.0), 0.0)
    delta = mean_new - acc[0]
    return Totals(
        layers=list(layers), widths=widths, counts=[c.stats.count + sum(c.counts) for c in layers],
        calls=[c.calls for c in layers], empty_calls=[c.empty_calls for c in layers],
        mean=acc[0] + delta * share, m2=acc[1] + m2_new + delta.square() * n_old * share,
        var_sum=acc[2] + variances.sum(dim=0), old_mean=old[0], old_var=old[1],
    )


def write_back(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``target.copy_(values)`` for CPU float64 ``values``: one upload per (device, dtype), then fused copies."""
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for target, values in pairs:
        groups.setdefault((target.device, target.dtype), []).append((target, values))
    with torch.no_grad():
        for (device, dtype), items in groups.items():
            flat = torch.cat([values.reshape(-1) for _, values in items]).to(dtype).to(device)
            pieces = flat.split([target.numel() for target, _ in items])
            copy_all([target for target, _ in items], [p.view(target.shape) for p, (target, _) in zip(pieces, items)])


def merge_ranks(flat: Totals, totals: list[int], group: Any, world_size: int, failed: bool) -> tuple[Totals, list[int]]:
    """Every rank's estimators merged in rank order (bit-identical on every rank), back as one ``Totals``."""
    names = [c.name for c in flat.layers]
    stats = {name: ChannelStats.on(mean, m2, count)
             for name, mean, m2, count in zip(names, flat.split(flat.mean), flat.split(flat.m2), flat.counts)}
    sums = {"": torch.tensor(totals, dtype=torch.float64)}
    for name, calls, empty, var_sum in zip(names, flat.calls, flat.empty_calls, flat.split(flat.var_sum)):
        sums[name] = torch.cat([torch.tensor([float(calls), float(empty)], dtype=torch.float64), var_sum])
    stats, sums = merge_across_ranks(stats, sums, group, world_size, failed=failed)
    merged = dataclasses.replace(
        flat, counts=[stats[n].count for n in names], calls=[int(sums[n][0]) for n in names],
        empty_calls=[int(sums[n][1]) for n in names], mean=torch.cat([stats[n].mean for n in names]),
        m2=torch.cat([stats[n].m2 for n in names]), var_sum=torch.cat([sums[n][2:] for n in names]))
    return merged, [int(v) for v in sums[""]]
