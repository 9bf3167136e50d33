"""The arithmetic of folding, on tensors only.

In eval mode a BatchNorm is ``y = k * x + c`` per channel, with
``k = gamma / sqrt(running_var + eps)`` and ``c = beta - k * running_mean``.
Folding it *backward* into the layer that produced ``x`` scales that layer's
output channels by ``k`` and maps its bias ``b`` to ``k * b + c``. Folding it
*forward* into the layer that reads ``y`` scales that layer's input channels
by ``k`` and adds the layer's response to the constant ``c`` to its bias.

Everything is computed in float64 and cast back to the weight's dtype.
"""

from __future__ import annotations

import torch


def bn_scale_shift(
    bn_running_mean: torch.Tensor,
    bn_running_var: torch.Tensor,
    bn_eps: float | torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k, c)`` in float64 such that eval-mode BN(x) == k * x + c per channel (``bn_eps`` may be per channel:
    several BNs' statistics concatenated give each BN's own bits)."""
    mean = bn_running_mean.detach().double()
    var = bn_running_var.detach().double()
    gamma = bn_weight.detach().double() if bn_weight is not None else torch.ones_like(mean)
    beta = bn_bias.detach().double() if bn_bias is not None else torch.zeros_like(mean)
    k = gamma / torch.sqrt(var + bn_eps)
    return k, beta - k * mean


def through_before(k: torch.Tensor, c: torch.Tensor, a: float, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The producer's ``(k', c')`` when ``y -> a * y + s`` runs between it and the BN and keeps running.

    ``a * y' + s == k * (a * y + s) + c`` for ``y' = k * y + (k * s + c - s) / a``.
    """
    if a == 1.0 and s == 0.0:
        return k, c
    return k, (k * s + c - s) / a


def through_after(k: torch.Tensor, c: torch.Tensor, a: float, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reader's ``(k', c')`` when ``z -> a * z + s`` runs between the BN and it and keeps running.

    The reader saw ``a * (k * x + c) + s``; with the BN gone it sees
    ``z = a * x + s``, and ``a * (k * x + c) + s == k * z + (a * c + s - k * s)``.
    """
    if a == 1.0 and s == 0.0:
        return k, c
    return k, a * c + s - k * s


def fold_into_producer(
    producer_weight: torch.Tensor,
    producer_bias: torch.Tensor | None,
    bn_running_mean: torch.Tensor,
    bn_running_var: torch.Tensor,
    bn_eps: float,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    *,
    transposed: bool = False,
    groups: int = 1,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New ``(weight, bias)`` of a conv / linear / transposed conv followed by a BN (see ``scale_producer``)."""
    k, c = bn_scale_shift(bn_running_mean, bn_running_var, bn_eps, bn_weight, bn_bias)
    return scale_producer(producer_weight, producer_bias, k, c, transposed=transposed, groups=groups, out=out,
                          scratch=scratch)


def scale_producer(
    producer_weight: torch.Tensor,
    producer_bias: torch.Tensor | None,
    k: torch.Tensor,
    c: torch.Tensor,
    *,
    transposed: bool = False,
    groups: int = 1,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New ``(weight, bias)`` of a layer whose output channels are then mapped by ``k * y + c`` (float64).

    ``out`` (a tensor shaped like the weight, possibly the weight itself)
    receives the new weight in place, saving an allocation and a copy;
    ``scratch`` is a float64 buffer of at least the weight's size to compute in.

    Conv and linear weights hold output channels on axis 0. A transposed
    conv's weight is ``(in_channels, out_channels // groups, *kernel)``: output
    channel ``g * (out // groups) + j`` is column ``j`` of the rows of group ``g``.
    """
    if k.device != producer_weight.device:
        k, c = k.to(producer_weight.device), c.to(producer_weight.device)
    if transposed:
        in_channels, out_per_group = producer_weight.shape[:2]
        spatial = producer_weight.shape[2:]
        grouped = (groups, in_channels // groups, out_per_group, *spatial)
        scale = k.reshape(groups, 1, out_per_group, *([1] * len(spatial)))
        new_weight = _scale(producer_weight, grouped, scale, out, scratch)
    else:
        scale = k.reshape(-1, *([1] * (producer_weight.dim() - 1)))
        new_weight = _scale(producer_weight, producer_weight.shape, scale, out, scratch)
    bias = producer_bias.detach().double() if producer_bias is not None else torch.zeros_like(k)
    new_bias = k * bias + c
    return new_weight, new_bias.to(producer_bias.dtype if producer_bias is not None else producer_weight.dtype)


#: float64 values per block of ``_scale`` on the CPU: 2 MB, so the three passes over a block stay in cache.
BLOCK = 1 << 18


def _scale(
    weight: torch.Tensor,
    shape: tuple[int, ...],
    scale: torch.Tensor,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """``weight * scale`` computed in float64 and rounded once to ``weight``'s dtype (into ``out`` if given).

    Through a float64 ``scratch`` buffer (reused across layers when given): a
    widening copy, a float64 multiply and a narrowing copy are each vectorized,
    several times faster than one mixed-dtype multiply, and give the same bits.
    On the CPU this runs block by block (``BLOCK`` values, along the first
    axis longer than 1), so memory is read and written once.
    """
    if out is None and weight.numel() <= BLOCK and weight.is_contiguous():  # one block: the result is its rounding
        buffer = _float64_scratch(scratch, weight.numel(), weight.device)[: weight.numel()].view(shape)
        buffer.copy_(weight.detach().view(shape))
        buffer.mul_(scale)
        return buffer.to(weight.dtype, copy=True).view(weight.shape)  # (a copy even for float64: scratch is reused)
    if out is None or not out.is_contiguous():
        out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    source, target = weight.detach().reshape(shape), out.detach().view(shape)
    axis = next((i for i, d in enumerate(shape) if d > 1), 0)  # every axis before it has length 1
    per_item = max(1, source.numel() // max(1, shape[axis]))
    step = shape[axis] if weight.device.type != "cpu" else max(1, BLOCK // per_item)
    scratch = _float64_scratch(scratch, min(source.numel(), step * per_item), weight.device)
    for start in range(0, shape[axis], step):
        stop = min(start + step, shape[axis])
        block = source.narrow(axis, start, stop - start)
        factor = scale.narrow(axis, start, stop - start) if scale.shape[axis] > 1 else scale
        buffer = scratch[: block.numel()].view(block.shape)
        buffer.copy_(block)
        buffer.mul_(factor)
        target.narrow(axis, start, stop - start).copy_(buffer)
    return out


def _float64_scratch(scratch: torch.Tensor | None, need: int, device: torch.device) -> torch.Tensor:
    """``scratch`` when it is a float64 buffer of at least ``need`` values on ``device``, else a new one."""
    if scratch is None or scratch.numel() < need or scratch.device != device:
        scratch = torch.empty(max(need, 1), dtype=torch.float64, device=device)
    return scratch


def fold_into_consumer(
    consumer_weight: torch.Tensor,
    consumer_bias: torch.Tensor | None,
    bn_running_mean: torch.Tensor,
    bn_running_var: torch.Tensor,
    bn_eps: float,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    *,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New ``(weight, bias)`` of a linear, or an unpadded conv, that reads a BN's output (see ``scale_consumer``)."""
    k, c = bn_scale_shift(bn_running_mean, bn_running_var, bn_eps, bn_weight, bn_bias)
    return scale_consumer(consumer_weight, consumer_bias, k, c, groups=groups)


def scale_consumer(
    consumer_weight: torch.Tensor,
    consumer_bias: torch.Tensor | None,
    k: torch.Tensor,
    c: torch.Tensor,
    *,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New ``(weight, bias)`` of a linear, or an unpadded conv, whose input channels arrive as ``k * x + c``.

    ``W(k * x + c) + b = (W * k) x + (W c + b)``. For a conv, the input
    channel of ``weight[o, j]`` is ``g * (in // groups) + j`` with
    ``g = o // (out // groups)``, and ``W c`` sums over the kernel, which is
    exact only where no zero padding reaches the input (the caller checks).
    """
    k, c = k.to(consumer_weight.device), c.to(consumer_weight.device)
    weight = consumer_weight.detach().double()
    out_channels, in_per_group = weight.shape[:2]
    spatial = weight.shape[2:]
    grouped = weight.reshape(groups, out_channels // groups, in_per_group, *spatial)
    shape = (groups, 1, in_per_group, *([1] * len(spatial)))
    new_weight = (grouped * k.reshape(shape)).reshape(weight.shape)
    response = (grouped * c.reshape(shape)).sum(dim=tuple(range(2, grouped.dim()))).reshape(out_channels)
    bias = (consumer_bias.detach().double() if consumer_bias is not None
            else torch.zeros(out_channels, dtype=torch.float64, device=weight.device))
    new_bias = bias + response
    dtype = consumer_weight.dtype
    return new_weight.to(dtype), new_bias.to(consumer_bias.dtype if consumer_bias is not None else dtype)


def identity_statistics(
    bn_running_var: torch.Tensor, bn_eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(running_mean, running_var)`` that make an eval-mode BN an exact identity.

    With weight 1 and bias 0, BN(x) = (x - 0) / sqrt(var + eps). ``var`` is
    chosen so that ``var + eps`` rounds to exactly 1 in the kernels'
    accumulation type (float32, or float64 for float64 buffers). A float16 or
    bfloat16 buffer cannot hold such a value for small eps; it gets the
    nearest one, and verification judges the result.
    """
    dtype = bn_running_var.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32  # the kernels' accumulation type
    one, eps = torch.ones((), dtype=acc), torch.tensor(bn_eps, dtype=acc)
    var = one - eps
    for _ in range(64):
        total = var + eps
        if total == one:
            break
        var = torch.nextafter(var, var + (one - total))
    return torch.zeros_like(bn_running_var), torch.full_like(bn_running_var, var.item())
