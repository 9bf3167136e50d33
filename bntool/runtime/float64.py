"""The float64 reference's convolutions: exact in float64, without PyTorch's slow float64 CPU kernels.

PyTorch runs float64 convolutions on the CPU through ``slow_conv2d`` (an
unfolded copy of the input, then one product; per channel for a depthwise
conv), not oneDNN: a float64 forward of a depthwise net, or of a ResNet's 7x7
stem, costs many times its float32 forward. ``exact_float64()`` is a
``TorchFunctionMode`` under which each ``conv1d`` / ``conv2d`` / ``conv3d``
call on float64 CPU tensors that ``route`` picks runs as

* ``depthwise.depthwise_conv`` (taps over channels-innermost windows) for a
  depthwise conv on small maps (``DEPTHWISE_MAP``);
* ``exactconv.shifted_conv`` (one product, or multiply-add, per tap over a
  flat, shifted run of the padded input) for a depthwise conv on maps up to
  ``LARGE_MAP`` positions, and for a dense conv with a kernel of more than one
  tap and at least ``DENSE_MAP`` output positions per channel (see there).

Both compute every product and sum in float64, as the convolution itself does;
only the order of the sums differs, which is what any two float64
convolution kernels differ by. Every other call runs as it is: 1x1 and small
dense convs and depthwise convs on large maps, where torch's own kernel was
measured as fast or faster inside a model's forward; other groups; transposed
convs; other dtypes and devices.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from .depthwise import depthwise_conv
from .exactconv import Scratch, shifted_conv

_CONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}

#: depthwise convolutions on maps up to this many positions per channel (four times as many with a kernel of 25
#: taps or more) run as ``depthwise_conv``
DEPTHWISE_MAP = 64
#: depthwise convolutions on maps of more positions run as torch's own (one channel at a time: each channel's
#: work is large enough there, and the shifted products' copies of the whole map would cost more)
LARGE_MAP = 3136
#: dense convolutions with at least this many output positions per channel run as ``shifted_conv``, unless
#: they have fewer than ``FEW_CHANNELS`` input channels and more than ``CACHED_OUTPUTS`` outputs: a product
#: per tap that short rereads all the outputs each time, where torch's one unfolded product does not
DENSE_MAP = 2048
FEW_CHANNELS = 16
CACHED_OUTPUTS = 1 << 18


def _float64_cpu(tensor: object) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float64 and tensor.device.type == "cpu"


def route(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding,
          groups: int) -> Callable | None:
    """The exact float64 kernel that computes this convolution (``depthwise_conv`` or ``shifted_conv``), or
    None for torch's own."""
    if not (type(input) is torch.Tensor and _float64_cpu(input) and _float64_cpu(weight)
            and (bias is None or _float64_cpu(bias)) and input.dim() == weight.dim() and input.dim() >= 3
            and input.numel() > 0 and not (torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad))):
        return None  # (the kernels write in place: a graph for autograd stays torch's)
    if isinstance(padding, str) and (padding not in ("same", "valid")
                                     or any(s != 1 for s in ((stride,) if isinstance(stride, int) else stride))):
        return None  # torch's own refusal
    channels, positions = input.shape[1], math.prod(input.shape[2:])
    if groups > 1 and groups == channels and weight.shape[1] == 1 and weight.shape[0] % groups == 0:
        if positions > LARGE_MAP:
            return None
        small = positions <= DEPTHWISE_MAP or (positions <= 4 * DEPTHWISE_MAP and weight[0].numel() >= 25)
        return depthwise_conv if small else shifted_conv
    if groups != 1 or weight.shape[1] != channels or all(k == 1 for k in weight.shape[2:]):
        return None
    outputs = positions // math.prod((stride,) * (input.dim() - 2) if isinstance(stride, int) else stride)
    few_inputs = channels < FEW_CHANNELS and weight.shape[0] * outputs > CACHED_OUTPUTS
    return shifted_conv if outputs >= DENSE_MAP and not few_inputs else None


def _conv_args(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> dict:
    return {"input": input, "weight": weight, "bias": bias, "stride": stride, "padding": padding,
            "dilation": dilation, "groups": groups}


def _aten_convolution_args(input, weight, bias, stride, padding, dilation, transposed, output_padding,
                           groups) -> dict | None:
    if transposed:
        return None
    return _conv_args(input, weight, bias, stride, padding, dilation, groups)


_ATEN = {torch.ops.aten.conv1d.default: 1, torch.ops.aten.conv2d.default: 2, torch.ops.aten.conv3d.default: 3}


def _exact(bound: dict | None, dims: int | None, scratch: Scratch | None = None) -> torch.Tensor | None:
    """The call computed by the kernel ``route`` picks, or None where torch's own runs it."""
    input = bound["input"] if bound else None
    if not isinstance(input, torch.Tensor) or (dims is not None and input.dim() != dims + 2):
        return None
    kernel = route(input, bound["weight"], bound["bias"], bound["stride"], bound["padding"], bound["groups"])
    if kernel is depthwise_conv:
        del bound["groups"]
    elif kernel is shifted_conv and scratch is not None:
        bound["scratch"] = scratch
    return kernel(**bound) if kernel is not None else None


def convolution(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1,
                padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """``F.conv{1,2,3}d`` by the exact kernel ``route`` picks, else torch's own (for callers outside a mode)."""
    out = _exact(_conv_args(input, weight, bias, stride, padding, dilation, groups), None)
    if out is not None:
        return out
    return (F.conv1d, F.conv2d, F.conv3d)[weight.dim() - 3](input, weight, bias, stride, padding, dilation, groups)


class _ExactFloat64(TorchFunctionMode):
    """Routes ``F.conv{1,2,3}d`` calls, and the aten convolutions a ``torch.export`` graph calls; the shifted
    products' working copies reuse one ``Scratch`` for the mode's lifetime."""

    def __init__(self) -> None:
        super().__init__()
        self.scratch = Scratch()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONVS or func in _ATEN:
            out = _exact(_conv_args(*args, **kwargs), _CONVS.get(func) or _ATEN[func], self.scratch)
            if out is not None:
                return out
        elif func is torch.ops.aten.convolution.default:
            out = _exact(_aten_convolution_args(*args, **kwargs), None, self.scratch)
            if out is not None:
                return out
        return func(*args, **kwargs)


def _holds_a_kernel(module: nn.Module) -> bool:
    return any(t is not None and t.dim() >= 3 for t in (*module._parameters.values(), *module._buffers.values()))


@contextlib.contextmanager
def exact_float64(model: nn.Module, enabled: bool = True, *, throughout: bool = False) -> Iterator[nn.Module]:
    """While active, the float64 CPU convolutions that ``model`` runs go as ``route`` picks (see the module's
    docstring).

    The mode is on while a module that holds a tensor of three or more dimensions (a convolution's weight)
    runs its forward, and off in between: elsewhere a mode would cost a Python call per tensor operation.
    With ``throughout``, it is on for the whole block (a forward that convolves with another module's weight)."""
    if not enabled:
        yield model
        return
    mode = _ExactFloat64()
    if throughout:
        with mode:
            yield model
        return
    depth = [0]

    def enter(module: nn.Module, args: object) -> None:
        if depth[0] == 0:
            mode.__enter__()
        depth[0] += 1

    def leave(module: nn.Module, args: object, output: object) -> None:
        depth[0] -= 1
        if depth[0] == 0:
            mode.__exit__(None, None, None)

    handles = [h for m in model.modules() if _holds_a_kernel(m)
               for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        if depth[0] > 0:  # a forward that raised never reached its hook
            mode.__exit__(None, None, None)
