"""The fold rules on an ONNX graph: which BatchNormalization node folds into which layer, and why each other does not.

``plan_onnx`` walks ``graph.onnxflow``'s dataflow and returns the same
``FoldPlan`` of ``FoldPair`` s and ``Skip`` s that the module fold makes
(``method="onnx"``), worded with the same ``reasons``, plus one ``Site`` per
pair: the node positions ``onnx_apply`` rewrites.

* **backward** into the node that produces the BN's input (``Conv`` 1-3d,
  grouped or depthwise; ``ConvTranspose``, grouped; ``Gemm``; ``MatMul``
  with a constant 2-D weight, alone or followed by an ``Add`` of a constant
  bias) when nothing else reads that output;
* **forward** into the one node that reads the BN's output (``Conv`` with
  no padding, ``Gemm``, ``MatMul``) when backward is not possible.

Weights and BN parameters must be initializers no graph input overrides;
a BN in training mode, with ``spatial=0``, or with corrupt statistics is left.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..graph.onnxflow import OnnxFlow
from ..report import Skip
from . import reasons
from .plan import FoldPair, FoldPlan

LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class Site:
    """Where one pair lives in the graph: node positions of the BN, the layer, and a bias ``Add`` after a MatMul."""

    bn: int
    layer: int
    direction: str
    add: int | None = None  # backward MatMul + Add(constant): the Add holding the bias


def plan_onnx(flow: OnnxFlow, rejected: Mapping[str, str] | None = None, *, include: Sequence[str] | None = None,
              exclude: Sequence[str] | None = None) -> tuple[FoldPlan, dict[str, Site]]:
    """The plan for the graph, and each folded BN's ``Site`` (by BN label). BNs in ``rejected`` are left with that
    reason; ``include`` / ``exclude`` are shell patterns on BN labels."""
    pairs: list[FoldPair] = []
    skips: list[Skip] = []
    sites: dict[str, Site] = {}
    for i in flow.bns():
        name = flow.label(i)
        if rejected and name in rejected:
            skips.append(Skip(name, rejected[name]))
            continue
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            skips.append(Skip(name, "not selected by `include`"))
            continue
        if exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            skips.append(Skip(name, "excluded by `exclude`"))
            continue
        result = _plan_bn(flow, i)
        if isinstance(result, str):
            skips.append(Skip(name, result))
            continue
        sites[name] = result
        pairs.append(FoldPair(name, flow.label(result.layer), result.direction, "removed", flow.op(result.layer)))
    for label in flow.subgraph_bns():
        skips.append(Skip(label, "sits inside an If / Loop / Scan body, which bntool does not fold into yet"))
    return FoldPlan(tuple(pairs), tuple(skips), "onnx"), sites


def _plan_bn(flow: OnnxFlow, i: int) -> Site | str:
    reason = bn_reason(flow, i)
    if reason:
        return reason
    backward = _backward(flow, i)
    if isinstance(backward, Site):
        return backward
    forward = _forward(flow, i)
    if isinstance(forward, Site):
        return forward
    return reasons.not_exact_either(backward, forward)


# ----------------------------------------------------------------------------- the BN itself

PARAMETERS = ("scale", "B", "mean", "var")


def bn_parameters(flow: OnnxFlow, i: int) -> dict[str, np.ndarray] | str:
    """The BN's four parameters as arrays, or why they are not constants."""
    found = {}
    for k, key in enumerate(PARAMETERS, start=1):
        value = flow.input(i, k)
        array = flow.constant(value)
        if array is None:
            return f"its {key} is {_not_constant(flow, value)}, so folding cannot take its values"
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


def _not_constant(flow: OnnxFlow, value) -> str:
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


def channels(flow: OnnxFlow, i: int) -> int:
    return int(flow.constant(flow.input(i, 1)).size)


# ----------------------------------------------------------------------------- backward


def _backward(flow: OnnxFlow, i: int) -> Site | str:
    x = flow.input(i, 0)
    p = flow.producer(x)
    if p is None:
        if x.name in flow.inputs:
            return f"{reasons.GRAPH_INPUT} (`{x.name}`)"
        return "its input is a constant, with no layer producing it"
    others = [r for r in flow.readers(x) if r != i]
    if others or flow.is_output(x):
        return reasons.also_read(flow.label(p), _labels(flow, others, flow.is_output(x)))
    add = None
    if flow.op(p) == "Add":
        add, p = p, _matmul_under_add(flow, p)
        if p is None:
            return reasons.stands_between(flow.op(add))
    op = flow.op(p)
    if op not in LAYERS:
        return reasons.stands_between(op)
    reason = weight_reason(flow, p)
    if reason:
        return reason
    features, weight = channels(flow, i), flow.constant(flow.input(p, 1))
    group = int(flow.attr(p, "group", 1))
    if op == "Conv":
        out = weight.shape[0]
    elif op == "ConvTranspose":
        out = weight.shape[1] * group
    elif op == "Gemm":
        out = weight.shape[0] if flow.attr(p, "transB", 0) else weight.shape[1]
    else:
        out = weight.shape[1]
        rank = flow.rank(x)
        if rank is None and features > 1:
            return reasons.UNKNOWN_SHAPE
        if rank != 2 and features > 1:
            return f"it normalizes axis 1 of a {rank}-D input, but the MatMul's features are on the last axis"
    if out != features and features > 1:
        return reasons.channels_differ(flow.label(p), out, "output", features)
    return Site(i, p, "backward", add)


def _matmul_under_add(flow: OnnxFlow, add: int) -> int | None:
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
        return f"the weight of `{name}` is {_not_constant(flow, flow.input(layer, 1))}, so folding cannot rewrite it"
    if not np.issubdtype(weight.dtype, np.floating) and weight.dtype.name != "bfloat16":
        return f"the weight of `{name}` is {weight.dtype.name}, not a floating-point tensor"
    bias = flow.input(layer, 2) if flow.op(layer) != "MatMul" else None
    if bias is not None and bias.name and flow.constant(bias) is None:
        return f"the bias of `{name}` is {_not_constant(flow, bias)}, so folding cannot rewrite it"
    op = flow.op(layer)
    if op in ("Gemm", "MatMul") and weight.ndim != 2:
        return f"the weight of `{name}` is {weight.ndim}-D, not a 2-D matrix"
    if op in ("Conv", "ConvTranspose") and weight.ndim < 3:
        return f"the weight of `{name}` is {weight.ndim}-D, not a conv kernel"
    if op == "Gemm" and bias is not None and bias.name:
        out = weight.shape[0] if flow.attr(layer, "transB", 0) else weight.shape[1]
        if flow.constant(bias).size not in (1, out):
            return f"the bias of `{name}` is not one value per output feature"
    return None


# ----------------------------------------------------------------------------- forward


def _forward(flow: OnnxFlow, i: int) -> Site | str:
    y = flow.nodes[i].outputs[0]
    if flow.is_output(y):
        return reasons.MODEL_OUTPUT
    readers = flow.readers(y)
    if len(readers) != 1 or readers[0] == -1:
        return reasons.read_by(_labels(flow, readers))
    c = readers[0]
    op, name = flow.op(c), flow.label(c)
    if op == "ConvTranspose":
        return reasons.transposed_forward(name)
    if op not in LAYERS:
        return reasons.goes_through(name)
    node = flow.nodes[c]
    if node.inputs[0] is not y or any(v is y for v in node.inputs[1:]):
        return reasons.reads_others(name)
    reason = weight_reason(flow, c)
    if reason:
        return reason
    features, weight = channels(flow, i), flow.constant(flow.input(c, 1))
    rank = flow.rank(y)
    if op == "Conv":
        width = weight.shape[1] * int(flow.attr(c, "group", 1))
        if has_padding(flow, c):
            return reasons.zero_pads(name)
    else:
        if op == "Gemm" and flow.attr(c, "transA", 0):
            return f"`{name}` reads the BN's output transposed (transA=1)"
        if rank is None and features > 1:
            return reasons.UNKNOWN_SHAPE
        if rank != 2 and features > 1:
            return f"it normalizes axis 1 of a {rank}-D input, but the {op}'s features are on the last axis"
        width = weight.shape[1] if op == "Gemm" and flow.attr(c, "transB", 0) else weight.shape[0]
    if width != features and features > 1:
        return reasons.channels_differ(name, width, "input", features)
    return Site(i, c, "forward")


def has_padding(flow: OnnxFlow, conv: int) -> bool:
    auto = flow.attr(conv, "auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        kernel = flow.constant(flow.input(conv, 1)).shape[2:]
        return any(k > 1 for k in kernel)
    if auto == "VALID":
        return False
    return any(p != 0 for p in (flow.attr(conv, "pads", None) or ()))


def _labels(flow: OnnxFlow, nodes: Sequence[int], output: bool = False) -> list[str]:
    found = [flow.label(r) if r >= 0 else "a node inside a subgraph" for r in nodes]
    return found + (["the graph's output"] if output else [])


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
