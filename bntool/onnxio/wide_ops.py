"""ONNX ops in torch, for the float64 run (``wide``): elementwise, linear algebra and convolutions (``OPS``);
pooling, reductions and shape ops are in ``wide_shapes``. Each is ``op(inputs, attrs, opset, outputs) -> tuple``.

Inputs are torch tensors (floating ones in float64) or None for an omitted
optional input; attributes are ``onnx.helper.get_attribute_value``'s. An op
raises ``Unsupported`` for what it does not cover (an attribute value, a
second output, a padding mode), and ``wide`` then runs that node with
``onnx.reference``. Each follows the ONNX operator specification of every
opset version a graph may use.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.nn import functional as F

from ..runtime.float64 import convolution


class Unsupported(Exception):
    """What this op's torch version does not cover: the node runs in ``onnx.reference``."""


def registrar(table: dict[str, Callable]) -> Callable:
    """A decorator ``@op("Name", ...)`` that enters a function in ``table`` under each name."""
    def op(*names: str) -> Callable:
        def register(fn: Callable) -> Callable:
            for name in names:
                table[name] = fn
            return fn
        return register
    return op


OPS: dict[str, Callable] = {}
op = registrar(OPS)


def one_output(outputs: int) -> None:
    if outputs != 1:
        raise Unsupported


def ints(value) -> list[int]:
    return [int(v) for v in (value.tolist() if isinstance(value, torch.Tensor) else value)]


# ----------------------------------------------------------------------------- elementwise

_UNARY = {"Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp, "Sqrt": torch.sqrt,
          "Neg": torch.neg, "Abs": torch.abs, "Erf": torch.erf, "Reciprocal": torch.reciprocal}
_BINARY = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul}


def _unary(fn: Callable) -> Callable:
    def run(inputs, attrs, opset, outputs):
        if not inputs[0].is_floating_point():
            raise Unsupported
        return (fn(inputs[0]),)
    return run


def _binary(fn: Callable) -> Callable:
    def run(inputs, attrs, opset, outputs):
        return (fn(inputs[0], inputs[1]),)
    return run


OPS.update({name: _unary(fn) for name, fn in _UNARY.items()})
OPS.update({name: _binary(fn) for name, fn in _BINARY.items()})


@op("Div")
def _div(inputs, attrs, opset, outputs):
    a, b = inputs
    if not (a.is_floating_point() and b.is_floating_point()):
        raise Unsupported  # (integer division's rounding: onnx.reference's)
    return (a / b,)


@op("Pow")
def _pow(inputs, attrs, opset, outputs):
    a, b = inputs
    if not a.is_floating_point():
        raise Unsupported
    return (torch.pow(a, b.to(a.dtype)),)


@op("LeakyRelu")
def _leaky(inputs, attrs, opset, outputs):
    return (F.leaky_relu(inputs[0], float(attrs.get("alpha", 0.01))),)


@op("HardSigmoid")
def _hard_sigmoid(inputs, attrs, opset, outputs):
    x = inputs[0]
    return (torch.clamp(float(attrs.get("alpha", 0.2)) * x + float(attrs.get("beta", 0.5)), 0.0, 1.0),)


@op("HardSwish")
def _hard_swish(inputs, attrs, opset, outputs):
    x = inputs[0]
    return (x * torch.clamp(x / 6.0 + 0.5, 0.0, 1.0),)


@op("Clip")
def _clip(inputs, attrs, opset, outputs):
    x = inputs[0]
    if opset < 11:
        low, high = attrs.get("min", -math.inf), attrs.get("max", math.inf)
    else:
        low = inputs[1] if len(inputs) > 1 and inputs[1] is not None else None
        high = inputs[2] if len(inputs) > 2 and inputs[2] is not None else None
        low = None if low is None else low.to(x.dtype)
        high = None if high is None else high.to(x.dtype)
        if low is not None:
            x = torch.maximum(x, low)
        if high is not None:
            x = torch.minimum(x, high)
        return (x,)
    return (torch.clamp(x, low, high),)


@op("Identity")
def _identity(inputs, attrs, opset, outputs):
    return (inputs[0],)


@op("Cast", "CastLike")
def _cast(inputs, attrs, opset, outputs):
    x = inputs[0]
    if len(inputs) > 1:  # CastLike: the second input's type (float64 stands for every floating type here)
        dtype = inputs[1].dtype
    else:
        dtype = _DTYPES.get(int(attrs["to"]))
        if dtype is None:
            raise Unsupported
    if x.is_floating_point() and not dtype.is_floating_point and dtype != torch.bool:
        raise Unsupported  # (float to integer: onnx.reference's saturation and rounding)
    return (x.to(dtype),)


#: ONNX element type -> the torch dtype a float64 run holds it in
_DTYPES = {1: torch.float64, 10: torch.float64, 16: torch.float64, 11: torch.float64, 7: torch.int64,
           6: torch.int32, 5: torch.int16, 3: torch.int8, 2: torch.uint8, 9: torch.bool}


# ----------------------------------------------------------------------------- linear algebra and convolution

@op("MatMul")
def _matmul(inputs, attrs, opset, outputs):
    return (torch.matmul(inputs[0], inputs[1]),)


@op("Gemm")
def _gemm(inputs, attrs, opset, outputs):
    a, b = inputs[0], inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    a = a.t() if attrs.get("transA", 0) else a
    b = b.t() if attrs.get("transB", 0) else b
    y = float(attrs.get("alpha", 1.0)) * (a @ b)
    if c is not None:
        y = y + float(attrs.get("beta", 1.0)) * c
    return (y,)


def _explicit_pads(x, kernel, attrs, dilations, strides) -> list[int]:
    """Begin / end pads per spatial axis (``auto_pad`` resolved as the ONNX specification states)."""
    n = len(kernel)
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        pads = ints(attrs.get("pads", [0] * (2 * n)))
        return pads
    if auto == "VALID":
        return [0] * (2 * n)
    begin, end = [], []
    for i in range(n):
        size = x.shape[2 + i]
        out = -(-size // strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
        small = total // 2
        begin.append(small if auto == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return begin + end


@op("Conv")
def _conv(inputs, attrs, opset, outputs):
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    n = w.dim() - 2
    if n not in (1, 2, 3) or x.dim() != n + 2:
        raise Unsupported
    strides = ints(attrs.get("strides", [1] * n))
    dilations = ints(attrs.get("dilations", [1] * n))
    pads = _explicit_pads(x, list(w.shape[2:]), attrs, dilations, strides)
    x = F.pad(x, [p for i in reversed(range(n)) for p in (pads[i], pads[i + n])])
    groups = int(attrs.get("group", 1))
    return (convolution(x, w, b, strides, 0, dilations, groups),)  # (exact float64 kernels where torch's are slow)


@op("ConvTranspose")
def _conv_transpose(inputs, attrs, opset, outputs):
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    n = w.dim() - 2
    auto = attrs.get("auto_pad", b"NOTSET")
    if n not in (1, 2, 3) or auto not in (b"NOTSET", "NOTSET", b"", "") or "output_shape" in attrs:
        raise Unsupported
    strides = ints(attrs.get("strides", [1] * n))
    dilations = ints(attrs.get("dilations", [1] * n))
    extra = ints(attrs.get("output_padding", [0] * n))
    pads = ints(attrs.get("pads", [0] * (2 * n)))
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
    y = fn(x, w, None, stride=strides, dilation=dilations, groups=int(attrs.get("group", 1)))
    y = F.pad(y, [p for i in reversed(range(n)) for p in (0, extra[i])])  # (output_padding: rows of bias only)
    y = y[(slice(None), slice(None)) + tuple(slice(pads[i], y.shape[2 + i] - pads[i + n]) for i in range(n))]
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * n)
    return (y,)


@op("BatchNormalization")
def _batch_norm(inputs, attrs, opset, outputs):
    one_output(outputs)
    if attrs.get("training_mode", 0) or attrs.get("is_test", 1) == 0 or attrs.get("spatial", 1) != 1:
        raise Unsupported
    x, scale, bias, mean, var = inputs[:5]
    if x.dim() < 2 or any(v.shape != (x.shape[1],) for v in (scale, bias, mean, var)):
        raise Unsupported
    return (F.batch_norm(x, mean, var, scale, bias, False, 0.0, float(attrs.get("epsilon", 1e-5))),)
