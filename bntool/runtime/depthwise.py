"""Depthwise convolutions in float64, exact and fast: the float64 reference's slow path replaced.

PyTorch's CPU float64 kernels for depthwise convolutions (one input channel
per group) with many channels and small feature maps take a slow path: one
1152-channel 5x5 depthwise conv of an EfficientNet on 3x3 maps can cost more
than the whole float32 forward (the kernel runs one call per channel).
``exact_depthwise()`` is a ``TorchFunctionMode`` under which every ``conv1d`` /
``conv2d`` / ``conv3d`` call that is depthwise, float64, on the CPU and on
small maps (``SMALL_MAP``) is computed as a sum over the kernel's taps
instead: with the channels innermost, each tap is one float64 multiply-add
of a strided view of the padded input by that tap's per-channel weights. Every product and sum is a float64
operation, as in the convolution itself; only the order of the sum over the
taps may differ, which is what any two float64 convolution kernels differ by.
Other calls run as they are.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

_CONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}


def _tuple(value: int | Sequence[int], dims: int) -> tuple[int, ...]:
    return (value,) * dims if isinstance(value, int) else tuple(value)


#: feature maps up to this many positions per channel are computed here; on larger ones PyTorch's own
#: per-channel kernel has enough work per call, and moving the channels innermost would cost more than it saves
SMALL_MAP = 256


def is_slow_depthwise(input: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    """A depthwise convolution on small maps, which PyTorch's float64 CPU kernel runs slowly (one call per
    channel), and which this module computes instead."""
    return (isinstance(input, torch.Tensor) and isinstance(weight, torch.Tensor) and type(input) is torch.Tensor
            and input.dtype == torch.float64 and weight.dtype == torch.float64 and input.device.type == "cpu"
            and weight.device.type == "cpu" and groups > 1 and weight.shape[1] == 1
            and input.dim() == weight.dim() and input.shape[1] == groups and weight.shape[0] % groups == 0
            and input[0, 0].numel() <= SMALL_MAP)


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


class _ExactDepthwise(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dims = _CONVS.get(func)
        if dims is not None:
            bound = _conv_args(*args, **kwargs)
            input = bound["input"]
            if (isinstance(input, torch.Tensor) and input.dim() == dims + 2
                    and is_slow_depthwise(input, bound["weight"], bound["groups"])):
                del bound["groups"]
                return depthwise_conv(**bound)
        return func(*args, **kwargs)


def _conv_args(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> dict:
    return {"input": input, "weight": weight, "bias": bias, "stride": stride, "padding": padding,
            "dilation": dilation, "groups": groups}


def has_grouped_convolutions(model: torch.nn.Module) -> bool:
    """Whether ``model`` has a module with more than one group (a depthwise conv among them): the mode's
    per-call cost is paid only where it can help."""
    return any(isinstance(getattr(m, "groups", None), int) and m.groups > 1 for m in model.modules())


@contextlib.contextmanager
def exact_depthwise(enabled: bool = True) -> Iterator[None]:
    """While active, depthwise float64 CPU convolutions run as ``depthwise_conv`` (see the module's docstring)."""
    if not enabled:
        yield
        return
    with _ExactDepthwise():
        yield
