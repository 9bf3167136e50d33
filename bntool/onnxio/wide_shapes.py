"""ONNX ops in torch for the float64 run (``wide``): pooling, reductions, constants and shape ops (``OPS``).

The same contract as ``wide_ops``: torch tensors in (float64 for floating
values), a tuple out, ``Unsupported`` for what an op does not cover.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch.nn import functional as F

from .wide_ops import Unsupported, ints, one_output, registrar

OPS: dict[str, Callable] = {}
op = registrar(OPS)


# ----------------------------------------------------------------------------- pooling and reductions

def _plain_pool(x, attrs, outputs) -> tuple[list[int], list[int], list[int]]:
    """Kernel, strides and symmetric pads of a pool torch computes as ONNX does (else ``Unsupported``)."""
    one_output(outputs)
    kernel = ints(attrs["kernel_shape"])
    n = len(kernel)
    pads = ints(attrs.get("pads", [0] * (2 * n)))
    auto = attrs.get("auto_pad", b"NOTSET")
    if (auto not in (b"NOTSET", "NOTSET", b"", "") or attrs.get("ceil_mode", 0) or n not in (1, 2, 3)
            or x.dim() != n + 2 or pads[:n] != pads[n:] or any(2 * p > k for p, k in zip(pads, kernel))):
        raise Unsupported
    return kernel, ints(attrs.get("strides", [1] * n)), pads[:n]


@op("MaxPool")
def _max_pool(inputs, attrs, opset, outputs):
    x = inputs[0]
    kernel, strides, pads = _plain_pool(x, attrs, outputs)
    if attrs.get("storage_order", 0):
        raise Unsupported
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[len(kernel) - 1]
    return (fn(x, kernel, stride=strides, padding=pads, dilation=ints(attrs.get("dilations", [1] * len(kernel)))),)


@op("AveragePool")
def _average_pool(inputs, attrs, opset, outputs):
    x = inputs[0]
    kernel, strides, pads = _plain_pool(x, attrs, outputs)
    if any(d != 1 for d in ints(attrs.get("dilations", [1] * len(kernel)))):
        raise Unsupported
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(kernel) - 1]
    return (fn(x, kernel, stride=strides, padding=pads, count_include_pad=bool(attrs.get("count_include_pad", 0))),)


@op("GlobalAveragePool")
def _global_average(inputs, attrs, opset, outputs):
    x = inputs[0]
    return (x.mean(dim=tuple(range(2, x.dim())), keepdim=True),)


@op("GlobalMaxPool")
def _global_max(inputs, attrs, opset, outputs):
    x = inputs[0]
    return (x.amax(dim=tuple(range(2, x.dim())), keepdim=True),)


def _reduce_axes(inputs, attrs, opset, since: int):
    """The axes of a Reduce* node (an input from opset ``since``), or None for every axis."""
    axes = (inputs[1] if len(inputs) > 1 else None) if opset >= since else attrs.get("axes")
    if axes is None or len(ints(axes)) == 0:
        if opset >= since and attrs.get("noop_with_empty_axes", 0):
            return ()
        return None
    return tuple(ints(axes))


@op("ReduceMean")
def _reduce_mean(inputs, attrs, opset, outputs):
    x = inputs[0]
    axes = _reduce_axes(inputs, attrs, opset, 18)
    if axes == ():
        return (x,)
    keep = bool(attrs.get("keepdims", 1))
    return (x.mean(dim=axes if axes is not None else tuple(range(x.dim())), keepdim=keep),)


@op("ReduceSum")
def _reduce_sum(inputs, attrs, opset, outputs):
    x = inputs[0]
    axes = _reduce_axes(inputs, attrs, opset, 13)
    if axes == ():
        return (x,)
    keep = bool(attrs.get("keepdims", 1))
    return (x.sum(dim=axes if axes is not None else tuple(range(x.dim())), keepdim=keep),)


@op("Softmax")
def _softmax(inputs, attrs, opset, outputs):
    if opset < 13:
        raise Unsupported  # (the 2-D coercion of earlier versions: onnx.reference's)
    return (torch.softmax(inputs[0], int(attrs.get("axis", -1))),)


# ----------------------------------------------------------------------------- shapes and data movement

@op("Constant")
def _constant(inputs, attrs, opset, outputs):
    from onnx import numpy_helper

    if "value" in attrs:
        array = numpy_helper.to_array(attrs["value"])
        value = torch.from_numpy(array.copy())
        return (value.double() if value.is_floating_point() else value,)
    if "value_float" in attrs:
        return (torch.tensor(float(attrs["value_float"]), dtype=torch.float64),)
    if "value_floats" in attrs:
        return (torch.tensor([float(v) for v in attrs["value_floats"]], dtype=torch.float64),)
    if "value_int" in attrs:
        return (torch.tensor(int(attrs["value_int"]), dtype=torch.int64),)
    if "value_ints" in attrs:
        return (torch.tensor([int(v) for v in attrs["value_ints"]], dtype=torch.int64),)
    raise Unsupported


@op("Shape")
def _shape(inputs, attrs, opset, outputs):
    dims = list(inputs[0].shape)
    start, end = int(attrs.get("start", 0)), attrs.get("end")
    return (torch.tensor(dims[start:None if end is None else int(end)], dtype=torch.int64),)


@op("Reshape")
def _reshape(inputs, attrs, opset, outputs):
    x = inputs[0]
    shape = ints(inputs[1]) if opset >= 5 else ints(attrs["shape"])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return (x.reshape(shape),)


@op("Flatten")
def _flatten(inputs, attrs, opset, outputs):
    x = inputs[0]
    axis = int(attrs.get("axis", 1))
    axis = axis + x.dim() if axis < 0 else axis
    return (x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:])),)


@op("Transpose")
def _transpose(inputs, attrs, opset, outputs):
    x = inputs[0]
    perm = ints(attrs["perm"]) if "perm" in attrs else list(reversed(range(x.dim())))
    return (x.permute(perm),)


@op("Unsqueeze")
def _unsqueeze(inputs, attrs, opset, outputs):
    x = inputs[0]
    axes = ints(inputs[1]) if opset >= 13 else ints(attrs["axes"])
    rank = x.dim() + len(axes)
    for axis in sorted(a + rank if a < 0 else a for a in axes):
        x = x.unsqueeze(axis)
    return (x,)


@op("Squeeze")
def _squeeze(inputs, attrs, opset, outputs):
    x = inputs[0]
    axes = (ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else None) if opset >= 13 else \
        (ints(attrs["axes"]) if "axes" in attrs else None)
    if axes is None:
        return (x.reshape([d for d in x.shape if d != 1]),)
    axes = {a + x.dim() if a < 0 else a for a in axes}
    return (x.reshape([d for i, d in enumerate(x.shape) if i not in axes]),)


@op("Concat")
def _concat(inputs, attrs, opset, outputs):
    return (torch.cat([v for v in inputs if v is not None], dim=int(attrs["axis"])),)


@op("Expand")
def _expand(inputs, attrs, opset, outputs):
    x, shape = inputs[0], ints(inputs[1])
    return (x.expand(np.broadcast_shapes(tuple(x.shape), tuple(shape))).clone(),)


@op("Gather")
def _gather(inputs, attrs, opset, outputs):
    x, indices = inputs
    axis = int(attrs.get("axis", 0))
    axis = axis + x.dim() if axis < 0 else axis
    flat = indices.reshape(-1).long()
    flat = torch.where(flat < 0, flat + x.shape[axis], flat)
    picked = torch.index_select(x, axis, flat)
    return (picked.reshape(tuple(x.shape[:axis]) + tuple(indices.shape) + tuple(x.shape[axis + 1:])),)
