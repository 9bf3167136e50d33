"""The arithmetic of folding, on tensors only.

In eval mode a BatchNorm is ``y = k * x + c`` per channel, with
``k = gamma / sqrt(running_var + eps)`` and ``c = beta - k * running_mean``.
Folding it *backward* into the layer that produced ``x`` scales that layer's
output channels by ``k`` and maps its bias ``b`` to ``k * b + c``. Folding it
*forward* into the layer that reads ``y`` scales that layer's input channels
by ``k`` and adds the layer's response to the constant ``c`` to its bias.

Scales and shifts are computed in float64. A folded bias is rounded once
to its dtype; a folded weight is the weight times the scale rounded to
float32 (float64 for a float64 weight), see ``_scale``.
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """New ``(weight, bias)`` of a conv / linear / transposed conv followed by a BN (see ``scale_producer``)."""
    k, c = bn_scale_shift(bn_running_mean, bn_running_var, bn_eps, bn_weight, bn_bias)
    return scale_producer(producer_weight, producer_bias, k, c, transposed=transposed, groups=groups)


def scale_producer(
    producer_weight: torch.Tensor,
    producer_bias: torch.Tensor | None,
    k: torch.Tensor,
    c: torch.Tensor,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New ``(weight, bias)`` of a layer whose output channels are then mapped by ``k * y + c`` (float64).

    The new bias ``k * b + c`` is computed in float64 and rounded once. The
    new weight is ``weight * k`` with ``k`` rounded once to the weight's
    compute dtype (see ``_scale``).

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
        new_weight = _scale(producer_weight, grouped, scale)
    else:
        scale = k.reshape(-1, *([1] * (producer_weight.dim() - 1)))
        new_weight = _scale(producer_weight, producer_weight.shape, scale)
    bias = producer_bias.detach().double() if producer_bias is not None else torch.zeros_like(k)
    new_bias = k * bias + c
    return new_weight, new_bias.to(producer_bias.dtype if producer_bias is not None else producer_weight.dtype)


#: values per block of ``_scale``'s widening path on the CPU (1 MB of float32: the three passes stay in cache).
BLOCK = 1 << 18


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What a weight of ``dtype`` is multiplied in: float64 for float64, float32 for every narrower float."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scale(weight: torch.Tensor, shape: tuple[int, ...], scale: torch.Tensor) -> torch.Tensor:
    """``weight * scale`` (a new tensor of ``weight``'s dtype), with the float64 ``scale`` rounded to float32.

    A float32 weight is one multiply by the rounded scale: the new weight is
    within one unit of rounding of the exact product. (A float64 product
    rounded once is within half a unit, but over 360 verified folds, 20
    architectures x 6 seeds in float32, float16 and bfloat16, the two give
    the same worst error against the tolerance, while the float64 product
    took about a quarter of ResNet-50's fold time.) A float16 / bfloat16
    weight is multiplied in float32 and rounded once to its dtype, block by
    block so that memory is read and written once; a float64 weight in
    float64.
    """
    compute = compute_dtype(weight.dtype)
    factor = scale.to(compute)
    source = weight.detach().reshape(shape)
    if weight.dtype == compute:
        return torch.mul(source, factor).view(weight.shape)
    out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    target = out.view(shape)
    axis = next((i for i, d in enumerate(shape) if d > 1), 0)  # every axis before it has length 1
    per_item = max(1, source.numel() // max(1, shape[axis]))
    step = shape[axis] if weight.device.type != "cpu" else max(1, BLOCK // per_item)
    scratch = torch.empty(min(source.numel(), step * per_item), dtype=compute, device=weight.device)
    for start in range(0, shape[axis], step):
        stop = min(start + step, shape[axis])
        block = source.narrow(axis, start, stop - start)
        buffer = scratch[: block.numel()].view(block.shape)
        buffer.copy_(block)
        buffer.mul_(factor.narrow(axis, start, stop - start) if factor.shape[axis] > 1 else factor)
        target.narrow(axis, start, stop - start).copy_(buffer)
    return out


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
