"""Convolutions in float64 as a sum of shifted matrix products: exact in float64, without PyTorch's slow path.

PyTorch's CPU float64 convolution is ``slow_conv2d`` (an unfolded copy of the
input, ``kernel`` times its size, then one product), not oneDNN: a 7x7 stem
conv or a depthwise conv on a 56x56 map costs 15 to 50 times its float32
forward. ``shifted_conv()`` computes ``F.conv{1,2,3}d`` instead as a sum over
the kernel's taps. The zero-padded input is laid out flat per channel, so that
each tap's window is the same flat run of positions at its own offset; each
tap is then one float64 matrix product of its ``(out, in)`` weights with that
run (a depthwise conv: one per-channel multiply-add), accumulated in place.
An output row is computed over the padded width and its extra columns are
dropped. A stride splits the padded input into its stride phases once (one
copy of the input), after which every tap reads one phase at stride 1.

Every product and sum is a float64 operation, as in the convolution itself;
only the order of the sum over the taps and channels differs, which is what
any two float64 convolution kernels differ by.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch.nn import functional as F


def _tuple(value: int | Sequence[int], dims: int) -> tuple[int, ...]:
    return (value,) * dims if isinstance(value, int) else tuple(value)


def padding_of(padding: int | str | Sequence[int], kernel: Sequence[int],
               dilation: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The zeros before and after each spatial dimension: what torch pads for ``padding`` (``same``: the odd
    one at the end)."""
    dims = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * dims, (0,) * dims
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        return tuple(t // 2 for t in total), tuple(t - t // 2 for t in total)
    return _tuple(padding, dims), _tuple(padding, dims)


class Scratch:
    """Working buffers that a run of convolutions reuses, one per use, each as large as its largest use so far:
    the memory's first touch is paid once, not once per layer. Nothing returned to a caller lives in one."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def take(self, use: str, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self.buffers.get(use)
        if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self.buffers[use] = like.new_empty(numel)
        return buffer[:numel].view(*shape)


def shifted_conv(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 stride: int | Sequence[int] = 1, padding: int | str | Sequence[int] = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1, scratch: Scratch | None = None) -> torch.Tensor:
    """``F.conv{1,2,3}d(input, weight, bias, stride, padding, dilation, groups)`` for a batched input, as a sum
    over the kernel's taps of shifted float64 products (see the module's docstring); its working copies in
    ``scratch``'s buffers where given."""
    scratch = scratch or Scratch()
    dims = weight.dim() - 2
    kernel = tuple(weight.shape[2:])
    stride, dilation = _tuple(stride, dims), _tuple(dilation, dims)
    before, after = padding_of(padding, kernel, dilation)
    batch, channels = input.shape[:2]
    padded_size = [input.shape[2 + i] + before[i] + after[i] for i in range(dims)]
    size = [(padded_size[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(dims)]
    if kernel == (1,) * dims:  # a 1x1 conv reads its strided positions only: no phases, no extra zeros
        x = F.pad(input, [p for b, a in zip(reversed(before), reversed(after)) for p in (b, a)]) \
            if any(before) or any(after) else input
        x = x[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)] if stride != (1,) * dims else x
        phases, grid, taps = x.reshape(batch, channels, 1, -1), tuple(size), [(0, 0)]
    else:
        # the padded input split into its stride phases: phase a holds padded positions a, a + s, a + 2s, ...;
        # grid[i] positions per dimension, one more along the first so the last tap's run stays inside
        grid = [-(-padded_size[i] // stride[i]) + (i == 0) for i in range(dims)]
        phases = scratch.take("phases", (batch, channels, math.prod(stride), *grid), input)
        for index, phase in enumerate(itertools.product(*(range(s) for s in stride))):
            source, target = [slice(None)] * 2, [slice(None), slice(None), index]
            for i in range(dims):  # input position h sits at padded position h + before, in phase (h + before) % s
                first = (phase[i] - before[i]) % stride[i]
                row = (first + before[i]) // stride[i]
                source.append(slice(first, None, stride[i]))
                target.append(slice(row, row + len(range(first, input.shape[2 + i], stride[i]))))
            phases[tuple(target)].copy_(input[tuple(source)])
            for i in range(dims):  # the zeros around the input: before and after it along each dimension
                inside = target[3 + i]
                for zeros in (slice(0, inside.start), slice(inside.stop, None)):
                    phases[(*target[:3 + i], zeros)].zero_()
                target[3 + i] = slice(None)
        phases = phases.reshape(batch, channels, math.prod(stride), -1)
        steps = [math.prod(grid[i + 1:]) for i in range(dims)]
        taps = []
        for tap in itertools.product(*(range(k) for k in kernel)):
            at = [t * d for t, d in zip(tap, dilation)]
            phase = sum(math.prod(stride[i + 1:]) * (a % s) for i, (a, s) in enumerate(zip(at, stride)))
            taps.append((phase, sum(steps[i] * (at[i] // stride[i]) for i in range(dims))))
    run = size[0] * math.prod(grid[1:])  # the outputs, each row over the phase's whole width
    out_channels = weight.shape[0]
    flat = weight.reshape(out_channels, weight.shape[1], len(taps))
    # the extra columns are dropped by a copy: the sums are working memory then, else they are the result
    trimmed = tuple(grid[1:]) != tuple(size[1:])
    if groups == channels and weight.shape[1] == 1:  # depthwise: a per-channel multiply-add per tap
        multiplier = out_channels // channels
        per_tap = flat.reshape(channels, multiplier, len(taps)).unsqueeze(-2)  # (C, m, 1, taps)
        shape = (batch, channels, multiplier, run)
        out = scratch.take("sums", shape, input) if trimmed else input.new_empty(shape)
        for index, (phase, offset) in enumerate(taps):
            window = phases[:, :, phase, offset:offset + run].unsqueeze(2)
            if index == 0:
                torch.mul(window, per_tap[..., 0], out=out)
            else:
                out.addcmul_(window, per_tap[..., index])
    else:
        per_group = channels // groups
        grouped = phases.reshape(batch * groups, per_group, phases.shape[2], phases.shape[3])
        per_tap = flat.reshape(groups, out_channels // groups, per_group, len(taps)).movedim(-1, 0)
        if batch > 1:
            per_tap = per_tap.repeat(1, batch, 1, 1)
        shape = (batch * groups, out_channels // groups, run)
        out = scratch.take("sums", shape, input) if trimmed else input.new_empty(shape)
        for index, (phase, offset) in enumerate(taps):  # one product per tap, accumulated in place
            window = grouped[:, :, phase, offset:offset + run]
            if index == 0:
                torch.bmm(per_tap[0], window, out=out)
            else:
                out.baddbmm_(per_tap[index], window)
    out = out.reshape(batch, out_channels, size[0], *grid[1:])
    if trimmed:
        out = out[(slice(None),) * 3 + tuple(slice(0, s) for s in size[1:])]
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(input.dim())
    if layout is None or input.is_contiguous() or not input.is_contiguous(memory_format=layout):
        layout = torch.contiguous_format
    out = out.clone(memory_format=layout) if trimmed else out.contiguous(memory_format=layout)  # never scratch
    return out.add_(bias.reshape(1, -1, *(1,) * dims)) if bias is not None else out

