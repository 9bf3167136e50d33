"""Depthwise convolutions in float64 on small maps, tap by tap over channels-innermost windows.

PyTorch's CPU float64 kernel for a depthwise convolution (one input channel
per group) runs one call per channel: one 1152-channel 5x5 depthwise conv of
an EfficientNet on 3x3 maps can cost more than the whole float32 forward.
``depthwise_conv()`` computes it as a sum over the kernel's taps instead: with
the channels innermost, each tap is one float64 multiply-add of a strided view
of the padded input by that tap's per-channel weights. Every product and sum
is a float64 operation, as in the convolution itself; only the order of the
sum over the taps may differ, which is what any two float64 convolution
kernels differ by. ``float64.exact_float64`` routes the float64 reference's
depthwise calls on small maps here.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch.nn import functional as F


def _tuple(value: int | Sequence[int], dims: int) -> tuple[int, ...]:
    return (value,) * dims if isinstance(value, int) else tuple(value)


def depthwise_conv(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   stride: int | Sequence[int] = 1, padding: int | str | Sequence[int] = 0,
                   dilation: int | Sequence[int] = 1) -> torch.Tensor:
    """``F.conv{1,2,3}d(input, weight, bias, stride, padding, dilation, groups=input.shape[1])`` for a batched
    depthwise convolution (``weight`` of shape ``(C * m, 1, *kernel)``), as a float64 sum over the kernel's taps."""
    dims = weight.dim() - 2
    kernel = tuple(weight.shape[2:])
    stride, dilation = _tuple(stride, dims), _tuple(dilation, dims)
    if isinstance(padding, str):
        if padding == "valid":
            before = after = (0,) * dims
        else:  # "same": what torch pads, the odd one at the end
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            before = tuple(t // 2 for t in total)
            after = tuple(t - t // 2 for t in total)
    else:
        before = after = _tuple(padding, dims)
    pads = [p for b, a in zip(reversed(before), reversed(after)) for p in (b, a)]
    padded = F.pad(input, pads) if any(pads) else input
    multiplier = weight.shape[0] // input.shape[1]
    if multiplier > 1:
        padded = padded.repeat_interleave(multiplier, dim=1)
    last = padded.movedim(1, -1).contiguous()  # channels innermost: each tap is a run of whole channel vectors
    size = [(padded.shape[2 + i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(dims)]
    taps = weight.reshape(weight.shape[0], -1).t().contiguous()  # one contiguous row of channel weights per tap
    out = None
    for index, tap in enumerate(itertools.product(*(range(k) for k in kernel))):
        window = last[(slice(None),) + tuple(
            slice(tap[i] * dilation[i], tap[i] * dilation[i] + stride[i] * (size[i] - 1) + 1, stride[i])
            for i in range(dims))]
        out = window * taps[index] if out is None else out.addcmul_(window, taps[index])
    if bias is not None:
        out.add_(bias)
    return out.movedim(-1, 1).contiguous()
