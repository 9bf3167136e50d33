"""The arithmetic of merging parallel branches: linear maps of one input as one convolution, in float64.

A ``Linear`` is what a branch computes from the input ``x`` it starts at:
either ``scale * x + bias``
per channel (``weight`` None: an identity, a BN of the input, a per-channel
scale) or ``conv(x, weight) + bias`` with its stride, padding, dilation and
groups. Branches add up (``add``) when their kernels lie on one grid: the
same stride, and along each dimension one kernel whose taps
(``-padding + j * dilation``) hold the other's, which is then placed at its
own taps (centred when the paddings centre it; a 1x1 at index 1 of a 4x4
with padding 1, say).
Groups meet at their greatest common divisor; an identity or per-channel
branch sits at the tap of offset 0 in each channel's own group slot. A per-channel
affine after a branch (a BN, a layer scale) scales its output channels
(``then_affine``); a conv after a per-channel map or a 1x1 conv with no
shift (or with no padding of its own) absorbs it (``conv_after``). Everything is float64; the caller rounds
the merged weight and bias once, to the layer's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..runtime import pages


class NotMergeable(Exception):
    """Why two branches (or a branch and a step) cannot be one convolution; the message is the reason."""


@dataclass(frozen=True)
class Linear:
    bias: torch.Tensor  # (out,) float64
    in_channels: int
    scale: torch.Tensor | None = None  # per channel (weight None)
    weight: torch.Tensor | None = None  # (out, in / groups, *kernel) float64
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1

    @property
    def out_channels(self) -> int:
        return self.bias.shape[0]

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:]) if self.weight is not None else ()


def per_channel(scale: torch.Tensor, bias: torch.Tensor) -> Linear:
    return Linear(f64(bias), scale.shape[0], scale=f64(scale))


def f64(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's values in float64 on the CPU (zeros for a tensor on the meta device, which has no values)."""
    if tensor.is_meta:
        return torch.zeros(tensor.shape, dtype=torch.float64)
    values = tensor.detach().to("cpu", torch.float64)
    pages.release((tensor,))  # (a memory-mapped weight, read for its form: its pages go back to the page cache)
    return values


def identity(channels: int) -> Linear:
    return per_channel(torch.ones(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64))


def conv(weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation, groups: int) -> Linear:
    nd = weight.dim() - 2
    b = f64(bias) if bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    return Linear(b, weight.shape[1] * groups, weight=f64(weight), stride=_nd(stride, nd),
                  padding=_nd(padding, nd), dilation=_nd(dilation, nd), groups=groups)


def then_affine(form: Linear, k: torch.Tensor, c: torch.Tensor) -> Linear:
    """``k * form(x) + c`` per output channel."""
    k, c = f64(k).expand(form.out_channels), f64(c).expand(form.out_channels)
    if form.weight is None:
        return replace(form, scale=form.scale * k, bias=form.bias * k + c)
    shape = (-1,) + (1,) * (form.weight.dim() - 1)
    return replace(form, weight=form.weight * k.reshape(shape), bias=form.bias * k + c)


def conv_after(inner: Linear, outer: Linear) -> Linear:
    """``outer(inner(x))`` for a per-channel or 1x1 ``inner`` (DBB's 1x1 -> kxk); exact at the borders only when
    ``inner`` adds nothing there (no shift, or no padding in ``outer``)."""
    if outer.weight is None:
        raise NotMergeable("internal: outer is not a convolution")
    if any(outer.padding) and bool((inner.bias != 0).any()):
        raise NotMergeable("a convolution with padding after a shift: the padded border would differ")
    if inner.weight is not None:
        if set(inner.kernel) | set(inner.stride) != {1} or any(inner.padding):
            raise NotMergeable("a convolution after another convolution that is not 1x1 with stride 1")
        dense = _regroup(outer.weight, outer.groups, 1)  # (out, mid, *kernel)
        first = _regroup(inner.weight, inner.groups, 1).flatten(1)  # (mid, in)
        weight = torch.einsum("om...,mi->oi...", dense, first)
        bias = outer.bias + dense.flatten(2).sum(2) @ inner.bias
        return replace(outer, weight=weight, bias=bias, groups=1, in_channels=inner.in_channels)
    w = outer.weight
    per_group = w.shape[1]
    index = (torch.arange(w.shape[0]) // (w.shape[0] // outer.groups) * per_group)[:, None] + torch.arange(per_group)
    scale = inner.scale[index].reshape(w.shape[:2] + (1,) * (w.dim() - 2))
    shift = inner.bias[index].reshape(w.shape[:2] + (1,) * (w.dim() - 2))
    return replace(outer, weight=w * scale, bias=outer.bias + (w * shift).flatten(1).sum(1))


def add(a: Linear, b: Linear, sign: float = 1.0, nd: int | None = None) -> Linear:
    """``a + sign * b`` as one ``Linear`` (NotMergeable with the reason when they do not fit one kernel)."""
    if a.in_channels != b.in_channels or a.out_channels != b.out_channels:
        raise NotMergeable(f"branches of different widths ({a.in_channels}->{a.out_channels} and "
                           f"{b.in_channels}->{b.out_channels})")
    if a.weight is None and b.weight is None:
        return replace(a, scale=a.scale + sign * b.scale, bias=a.bias + sign * b.bias)
    nd = (a.weight if a.weight is not None else b.weight).dim() - 2
    convs = [f for f in (a, b) if f.weight is not None]
    if len({f.stride for f in convs}) > 1:
        raise NotMergeable(f"branches with different strides ({', '.join(str(f.stride) for f in convs)})")
    stride = convs[0].stride
    a, b = (as_conv(f, nd, stride) for f in (a, b))
    if a.stride != b.stride:
        raise NotMergeable(f"branches with different strides ({a.stride} and {b.stride})")
    kernel, padding, dilation, place = [], [], [], {id(a): [], id(b): []}
    for d in range(nd):
        frame = _frame(a, b, d)  # the kernel whose taps cover the other's, on its grid
        if frame is None:
            raise NotMergeable(f"kernels that do not lie on one grid: the paddings do not centre them (kernel "
                               f"{a.kernel} padding {a.padding} dilation {a.dilation}, kernel {b.kernel} padding "
                               f"{b.padding} dilation {b.dilation})")
        kernel.append(frame.kernel[d])
        padding.append(frame.padding[d])
        dilation.append(frame.dilation[d] if frame.kernel[d] > 1 else 1)
        for f in (a, b):
            before = (frame.padding[d] - f.padding[d]) // max(dilation[-1], 1)
            place[id(f)].append((before, kernel[-1] - f.kernel[d] - before))
    groups = math.gcd(a.groups, b.groups)
    wa, wb = (_placed(_regroup(f.weight, f.groups, groups), place[id(f)]) for f in (a, b))
    return Linear(a.bias + sign * b.bias, a.in_channels, weight=wa + sign * wb, stride=stride,
                  padding=tuple(padding), dilation=tuple(dilation), groups=groups)


def _frame(a: Linear, b: Linear, d: int) -> Linear | None:
    """Of two kernels along dimension ``d``, the one whose taps (``-padding + j * dilation``) hold the other's."""
    for outer, inner in ((a, b), (b, a)):
        start, step, size = -outer.padding[d], outer.dilation[d], outer.kernel[d]
        taps = [-inner.padding[d] + j * inner.dilation[d] for j in range(inner.kernel[d])]
        if size == 1:
            if all(t == start for t in taps):
                return outer
            continue
        if all((t - start) % step == 0 and 0 <= (t - start) // step < size for t in taps) and (
                inner.kernel[d] == 1 or inner.dilation[d] == step):
            return outer
    return None


def as_conv(form: Linear, nd: int, stride: tuple[int, ...] | None = None) -> Linear:
    """A per-channel form as a depthwise 1-tap convolution (stride 1: it keeps the input's size)."""
    if form.weight is not None:
        return form
    channels = form.out_channels
    weight = form.scale.reshape((channels, 1) + (1,) * nd).clone()
    return Linear(form.bias, channels, weight=weight, stride=(1,) * nd, padding=(0,) * nd, dilation=(1,) * nd,
                  groups=channels)


def _regroup(weight: torch.Tensor, groups: int, to: int) -> torch.Tensor:
    """A grouped kernel as the same map with ``to`` groups (``to`` divides ``groups``): zeros off its blocks."""
    if groups == to:
        return weight
    out, per_group = weight.shape[:2]
    in_channels = per_group * groups
    wide = weight.new_zeros((out, in_channels // to) + tuple(weight.shape[2:]))
    outs = out // groups
    for g in range(groups):
        new_group = g * to // groups
        start = g * per_group - new_group * (in_channels // to)
        wide[g * outs:(g + 1) * outs, start:start + per_group] = weight[g * outs:(g + 1) * outs]
    return wide


def _placed(weight: torch.Tensor, pads_per_dim: list[tuple[int, int]]) -> torch.Tensor:
    """``weight`` zero-padded to the merged kernel, ``(before, after)`` taps per spatial dimension."""
    pads = [p for pair in reversed(pads_per_dim) for p in pair]
    return torch.nn.functional.pad(weight, pads) if any(pads) else weight


def _nd(value, nd: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * nd


def pool(channels: int, kernel, stride, padding, nd: int) -> Linear:
    """An average pool that counts padded zeros, as a depthwise convolution with a constant kernel."""
    kernel, stride = _nd(kernel, nd), _nd(stride if stride else kernel, nd)
    weight = torch.full((channels, 1, *kernel), 1.0 / math.prod(kernel), dtype=torch.float64)
    return Linear(torch.zeros(channels, dtype=torch.float64), channels, weight=weight, stride=stride,
                  padding=_nd(padding, nd), dilation=(1,) * nd, groups=channels)


def conv_module(module: torch.nn.Module) -> Linear:
    """A ``Conv1d/2d/3d``'s map (``NotMergeable`` for a padding mode other than zeros, or one-sided padding)."""
    if module.padding_mode != "zeros":
        raise NotMergeable(f"a convolution with padding mode `{module.padding_mode}`")
    padding = module.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        else:  # "same": symmetric only where the dilated kernel is odd
            spans = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            if any(s % 2 for s in spans):
                raise NotMergeable("a convolution with padding `same` and an even kernel (padded on one side)")
            padding = tuple(s // 2 for s in spans)
    return conv(module.weight, module.bias, module.stride, padding, module.dilation, module.groups)
