"""A graph run in float64 by torch, node by node: the reference the derived tolerance measures the original against.

``run_wide`` walks the main graph in order with every floating value in
float64 (inputs, initializers, constants and cast targets widened, as
``reference.as_float64`` widens a copy), each op in ``OPS`` computed by torch
in float64. A node whose op, or whose attributes, ``OPS`` does not cover is run
alone by ``onnx.reference`` (with ``reference``'s float64 kernels), on the
values it reads; a graph with subgraphs (``If`` / ``Loop`` / ``Scan``), local
functions or ops of another domain is run whole by ``reference.run_float64``.
Every result is float64 arithmetic on the same values, so the two agree to
float64 rounding (``tests/test_onnx_wide.py`` holds each op to that).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..errors import InputError, first_line
from . import wide_ops, wide_shapes
from .reference import NEW_OPS, run_float64, widen_node

#: every op the float64 run computes in torch
OPS = {**wide_ops.OPS, **wide_shapes.OPS}


def run_wide(model: Any, feeds: Mapping[str, np.ndarray], extra: Sequence[str] = (),
             arrays: Mapping[str, np.ndarray] | None = None, fallbacks: Counter | None = None) -> dict[str, Any]:
    """Every graph output of ``model`` (and the values ``extra``) computed in float64, by name.

    ``arrays``: initializer values already read (by name), used as they are;
    ``fallbacks`` counts the ops that ``onnx.reference`` ran (the key
    ``"(whole graph)"`` when it ran the graph)."""
    if _needs_whole_graph(model):
        if fallbacks is not None:
            fallbacks["(whole graph)"] += 1
        return run_float64(model, feeds, extra)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    wanted = list(dict.fromkeys([*(o.name for o in graph.output), *extra]))
    last_use: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            last_use[name] = i
    values: dict[str, Any] = {k: _to_value(v) for k, v in feeds.items()}
    initializers = {t.name: t for t in graph.initializer}
    keep = set(wanted)
    try:
        for i, node in enumerate(graph.node):
            inputs = [_value(name, values, initializers, arrays) if name else None for name in node.input]
            outputs = _run_node(node, inputs, opset, model, fallbacks)
            for name, value in zip(node.output, outputs):
                if name:
                    values[name] = value
            for name in node.input:
                if last_use.get(name) == i and name not in keep:
                    values.pop(name, None)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a graph the float64 run cannot run
        raise InputError(f"cannot run the graph in float64 to derive the tolerance ({first_line(exc, 160)}); "
                         "pass `atol` / `rtol` to compare with a fixed tolerance instead") from None
    return {name: _numpy(values[name]) for name in wanted if name in values}


def _needs_whole_graph(model: Any) -> bool:
    if model.functions:
        return True
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or any(a.HasField("g") or len(a.graphs) for a in node.attribute):
            return True
    return False


def _value(name: str, values: dict[str, Any], initializers: Mapping[str, Any],
           arrays: Mapping[str, np.ndarray] | None) -> Any:
    if name in values:
        return values[name]
    if arrays is not None and name in arrays:
        value = _to_value(arrays[name])
    elif name in initializers:
        value = _to_value(numpy_helper.to_array(initializers[name]))
    else:
        raise KeyError(f"value `{name}` is read before it is computed")
    values[name] = value
    return value


def _to_value(array: Any) -> Any:
    """A float64 (floating) or own-dtype torch tensor of ``array``, a copy; a numpy array for what torch lacks."""
    array = np.asarray(array)
    if array.dtype.kind == "f" or array.dtype.name == "bfloat16":
        return torch.from_numpy(array.astype(np.float64))
    if array.dtype.kind in "biu":
        return torch.from_numpy(np.array(array))
    return array


def _numpy(value: Any) -> np.ndarray:
    return value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _run_node(node: Any, inputs: list[Any], opset: int, model: Any, fallbacks: Counter | None) -> list[Any]:
    op = OPS.get(node.op_type)
    if op is not None and all(v is None or isinstance(v, torch.Tensor) for v in inputs):
        try:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            return list(op(inputs, attrs, opset, len(node.output)))
        except Exception:  # noqa: BLE001, S110 - ``Unsupported``, or what torch refuses: onnx.reference decides
            pass
    if fallbacks is not None:
        fallbacks[node.op_type] += 1
    return _reference_node(node, inputs, model)


def _reference_node(node: Any, inputs: list[Any], model: Any) -> list[Any]:
    """One node run by ``onnx.reference`` on the values it reads (its float attributes widened)."""
    from onnx.reference import ReferenceEvaluator

    one = onnx.NodeProto()
    one.CopyFrom(node)
    widen_node(one)
    feeds = {name: _numpy(v) for name, v in zip(node.input, inputs) if name}
    graph = onnx.helper.make_graph(
        [one], "node",
        [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), None)
         for n, a in feeds.items()],
        [onnx.helper.make_empty_tensor_value_info(n) for n in node.output if n])
    wrapper = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    results = ReferenceEvaluator(wrapper, new_ops=NEW_OPS).run(None, feeds)
    outputs = iter(results)
    return [_to_value(next(outputs)) if n else None for n in node.output]

