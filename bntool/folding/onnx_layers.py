"""What an ONNX layer must be to take a BN's fold, and its sizes: the questions ``onnx_rules`` asks of each
producer or consumer it finds (``folding.layers``' counterpart for graphs).

A layer's weight (and bias) must be constants no graph input overrides, not
dequantized from a Q/DQ pair, of a rank that fits its op; a forward fold
needs a conv without zero padding. ``fan_in`` is how many rounded weights sum
into one of its outputs (the tolerance widens with it). The BN itself must
hold constant, finite statistics and be in inference mode (``bn_reason``).
"""

from __future__ import annotations

import math

import numpy as np

from ..graph.onnxflow import OnnxFlow

LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def not_constant(flow: OnnxFlow, value) -> str:
    if value is None:
        return "missing"
    if value.name in flow.inputs:
        return f"a graph input (`{value.name}`), which the caller may override"
    producer = flow.producer(value)
    if producer is not None and flow.op(producer) == "DequantizeLinear":
        return f"dequantized by `{flow.label(producer)}` (Q/DQ-wrapped): folding would need it requantized"
    if producer is not None:
        return f"computed in the graph by `{flow.label(producer)}`, not an initializer"
    return "not an initializer"


def out_channels(flow: OnnxFlow, layer: int) -> int:
    weight, op = flow.constant(flow.input(layer, 1)), flow.op(layer)
    if op == "Conv":
        return weight.shape[0]
    if op == "ConvTranspose":
        return weight.shape[1] * int(flow.attr(layer, "group", 1))
    if op == "Gemm":
        return weight.shape[0] if flow.attr(layer, "transB", 0) else weight.shape[1]
    return weight.shape[1]


def matmul_under_add(flow: OnnxFlow, add: int) -> int | None:
    """The MatMul whose output this ``Add`` offsets by a constant (its bias), read by nothing else; else None."""
    a, b = flow.input(add, 0), flow.input(add, 1)
    if flow.constant(a) is not None:
        a, b = b, a
    bias = flow.constant(b)
    m = flow.producer(a)
    if bias is None or m is None or flow.op(m) != "MatMul" or flow.readers(a) != [add] or flow.is_output(a):
        return None
    weight = flow.constant(flow.input(m, 1))
    if weight is None or weight.ndim != 2 or bias.size not in (1, weight.shape[1]) or bias.ndim > 1:
        return None
    return m


def weight_reason(flow: OnnxFlow, layer: int) -> str | None:
    """Why the layer's weight or bias cannot be rewritten (not constants, wrong rank), or None."""
    name = flow.label(layer)
    weight = flow.constant(flow.input(layer, 1))
    if weight is None:
        return f"the weight of `{name}` is {not_constant(flow, flow.input(layer, 1))}, so folding cannot rewrite it"
    if not np.issubdtype(weight.dtype, np.floating) and weight.dtype.name != "bfloat16":
        return f"the weight of `{name}` is {weight.dtype.name}, not a floating-point tensor"
    bias = flow.input(layer, 2) if flow.op(layer) != "MatMul" else None
    if bias is not None and bias.name and flow.constant(bias) is None:
        return f"the bias of `{name}` is {not_constant(flow, bias)}, so folding cannot rewrite it"
    op = flow.op(layer)
    if op in ("Gemm", "MatMul") and weight.ndim != 2:
        return f"the weight of `{name}` is {weight.ndim}-D, not a 2-D matrix"
    if op in ("Conv", "ConvTranspose") and weight.ndim < 3:
        return f"the weight of `{name}` is {weight.ndim}-D, not a conv kernel"
    if bias is not None and bias.name:
        values = flow.constant(bias)
        if values.size not in (1, out_channels(flow, layer)) and np.any(values):  # (all zeros: no bias at all)
            return f"the bias of `{name}` is not one value per output channel"
    return None


def has_padding(flow: OnnxFlow, conv: int) -> bool:
    auto = flow.attr(conv, "auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        kernel = flow.constant(flow.input(conv, 1)).shape[2:]
        return any(k > 1 for k in kernel)
    if auto == "VALID":
        return False
    return any(p != 0 for p in (flow.attr(conv, "pads", None) or ()))


def fan_in(flow: OnnxFlow, layer: int) -> int:
    """How many weights sum into one output of the layer (the tolerance widens with it)."""
    weight = flow.constant(flow.input(layer, 1))
    op = flow.op(layer)
    if op == "Conv":
        return int(math.prod(weight.shape[1:]))
    if op == "ConvTranspose":
        return int(weight.shape[0] // int(flow.attr(layer, "group", 1)) * math.prod(weight.shape[2:]))
    if op == "Gemm" and flow.attr(layer, "transB", 0):
        return int(weight.shape[1])
    return int(weight.shape[0])


# ----------------------------------------------------------------------------- the BN itself

PARAMETERS = ("scale", "B", "mean", "var")


def bn_parameters(flow: OnnxFlow, i: int) -> dict[str, np.ndarray] | str:
    """The BN's four parameters as arrays, or why they are not constants."""
    found = {}
    for k, key in enumerate(PARAMETERS, start=1):
        value = flow.input(i, k)
        array = flow.constant(value)
        if array is None:
            return f"its {key} is {not_constant(flow, value)}, so folding cannot take its values"
        found[key] = array
    return found


def bn_reason(flow: OnnxFlow, i: int) -> str | None:
    """Why the BN node cannot be folded whatever surrounds it (mode, parameters, statistics), or None."""
    node = flow.nodes[i]
    if flow.attr(i, "training_mode", 0):
        return "training_mode=1: normalizes with batch statistics, not a fixed affine map"
    if flow.attr(i, "is_test", 1) == 0:
        return "is_test=0: normalizes with batch statistics, not a fixed affine map"
    if len([o for o in node.outputs if o is not None and o.name]) > 1:
        return f"{len(node.outputs)} outputs: it also updates running statistics (a training op)"
    if flow.attr(i, "spatial", 1) == 0:
        return "spatial=0: it normalizes each position with statistics of its own, not per channel"
    params = bn_parameters(flow, i)
    if isinstance(params, str):
        return params
    sizes = {a.size for a in params.values()}
    if len(sizes) != 1 or any(a.ndim != 1 for a in params.values()):
        return "its scale, bias, mean and variance are not one vector per channel each"
    var = params["var"].astype(np.float64)
    if not all(np.isfinite(a.astype(np.float64)).all() for a in params.values()):
        return "its parameters hold NaN or inf values, which folding would spread into the layer"
    if (var < 0).any():
        return f"running_var is negative in {int((var < 0).sum())} channel(s): the statistics are corrupt"
    return None


def channels(flow: OnnxFlow, i: int) -> int:
    return int(flow.constant(flow.input(i, 1)).size)
