"""A fold plan applied to an ONNX model: new weights for the layers, the folded BatchNormalization nodes gone.

``apply_onnx`` returns a new ``ModelProto``; every node and initializer the
plan does not name is copied as it was. A layer's new weight and bias come
from ``arithmetic`` (scale and shift in float64, each weight rounded once; a
layer folded from both sides is computed in float64 and rounded once). An
initializer that only the folded layer reads is rewritten under its own
name; one that another node also reads (a weight shared by two layers) is
left for them, and the layer gets a copy of its own. A backward fold makes the
layer (or its bias ``Add``) produce the BN's output name; a forward fold
makes the layer read the BN's input. A MatMul gains its bias as an ``Add``.
A multiply or add by a number kept between the two (``Site.through``) is
folded through (``arithmetic.through_before`` / ``through_after``). A BN inside
an ``If`` / ``Loop`` / ``Scan`` body is folded in that body (``onnx_writer``:
a weight of an enclosing graph that something else reads is copied into it).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper

from ..graph.onnxflow import CONSTANT_OPS
from .arithmetic import bn_scale_shift, scale_consumer, scale_producer, through_after, through_before
from .onnx_layers import bn_parameters
from .onnx_rules import Site
from .onnx_writer import Initializers, Names, drop_unread, graphs_on, subgraph_reads
from .plan import FoldPlan


def apply_onnx(proto: Any, flow: Any, plan: FoldPlan, sites: dict[str, list[Site]]) -> Any:
    """A copy of ``proto`` with ``plan`` applied (``sites``: ``onnx_rules.plan_onnx``'s positions per BN), each
    subgraph's pairs in that subgraph (the deepest first, so the routes to the others stay as planned)."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    names = Names(model)
    by_graph: dict[str, list[str]] = {"": []}
    for bn_label in dict.fromkeys(p.bn for p in plan.pairs):
        by_graph.setdefault(sites[bn_label][0].graph, []).append(bn_label)
    dropped: set[str] = set()
    for path in sorted(by_graph, key=lambda path: -len(flow.graph_flow(path).route)):
        inner = flow.graph_flow(path)
        scope = graphs_on(model, inner.route)
        dropped |= _apply_graph(scope, inner, by_graph[path], sites, Initializers(scope, names))
    drop_unread(model, dropped)
    return model


def _apply_graph(scope: list[Any], flow: Any, bns: list[str], sites: dict[str, list[Site]], writer: Any) -> set[str]:
    """Fold the BNs ``bns`` of the graph ``scope[-1]`` (``flow``'s); the names of the initializers they read."""
    graph = scope[-1]
    nodes = list(graph.node)
    by_layer: dict[int, dict[str, Any]] = defaultdict(dict)
    removed: set[int] = set()
    stale: set[str] = set()  # value names that no longer exist
    for bn_label in bns:
        bn_sites = sites[bn_label]
        b = bn_sites[0].bn
        params = bn_parameters(flow, b)
        eps = float(flow.attr(b, "epsilon", 1e-5))
        k, c = bn_scale_shift(*(_tensor(params[n]) for n in ("mean", "var")), eps, _tensor(params["scale"]),
                              _tensor(params["B"]))
        a, s = bn_sites[0].through  # (the steps kept between the BN and its layer)
        k, c = through_before(k, c, a, s) if bn_sites[0].direction == "backward" else through_after(k, c, a, s)
        for site in bn_sites:
            start, stop = site.channels or (0, k.numel())
            by_layer[site.layer][site.direction] = (k[start:stop].repeat_interleave(site.repeat),
                                                    c[start:stop].repeat_interleave(site.repeat), site)
        bn = nodes[b]
        removed.add(b)
        if bn_sites[0].direction == "backward":  # the node the BN read now makes the BN's output
            end = nodes[bn_sites[0].end]
            stale.add(end.output[0])
            for reader in nodes:  # (a Shape node reading the old name reads the same shape under the new one)
                if end.output[0] in reader.input and reader is not bn:
                    reader.input[:] = [bn.output[0] if n == end.output[0] else n for n in reader.input]
            end.output[0] = bn.output[0]
        else:  # the node that read the BN's output (and any Shape / CastLike reading it) reads its input
            stale.add(bn.output[0])
            for reader in nodes:
                if bn.output[0] in reader.input and reader is not bn:
                    reader.input[:] = [bn.input[0] if name == bn.output[0] else name for name in reader.input]
    added: dict[int, Any] = {}  # layer position -> the Add node that follows it
    for layer, sides in by_layer.items():
        node = nodes[layer]
        weight, bias = _fold_layer(flow, layer, sides)
        op = flow.op(layer)
        writer.put(node, 1, weight)
        if op != "MatMul":
            writer.put(node, 2, bias)
            if op == "Gemm":
                _set_attribute(node, "beta", 1.0)
        site = sides.get("backward", (None, None, None))[2]
        if site is not None and site.add is not None:
            _set_bias(writer, flow, nodes[site.add], site.add, bias)
        elif op == "MatMul":  # the bias, as an Add after the MatMul
            target = node.output[0]
            inner = writer.fresh(f"{target}_matmul")
            node.output[0] = inner
            name = writer.add(writer.fresh(f"{node.name or target}_bias"), bias)
            added[layer] = helper.make_node("Add", [inner, name], [target],
                                            name=writer.fresh_node(f"{node.name or target}_bias"))
    kept = []
    for i, node in enumerate(nodes):
        if i in removed:
            continue
        kept.append(node)
        if i in added:
            kept.append(added[i])
    kept = _without_dead_constants(kept, graph)
    copies = [_copy(n) for n in kept]
    del graph.node[:]
    graph.node.extend(copies)
    live = {o for n in graph.node for o in n.output} | {v.name for v in graph.input}
    for info in [v for v in graph.value_info if v.name in stale and v.name not in live]:
        graph.value_info.remove(info)
    return {n for i in removed for n in nodes[i].input[1:]}


def _without_dead_constants(nodes: list[Any], graph: Any) -> list[Any]:
    """``nodes`` less the constant-computing nodes (``CONSTANT_OPS``) whose outputs nothing reads any more."""
    while True:
        reads = {name for n in nodes for name in n.input} | {o.name for o in graph.output}
        reads |= {name for n in nodes for name in subgraph_reads(n)}
        dead = [n for n in nodes if n.op_type in CONSTANT_OPS and n.domain in ("", "ai.onnx")
                and not any(o in reads for o in n.output)]
        if not dead:
            return nodes
        nodes = [n for n in nodes if all(n is not d for d in dead)]


def _copy(node: Any) -> Any:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def _fold_layer(flow: Any, layer: int, sides: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The layer's new ``(weight, bias)`` arrays, in its weight's dtype."""
    op = flow.op(layer)
    weight_array = flow.constant(flow.input(layer, 1))
    dtype = weight_array.dtype
    weight = _tensor(weight_array)
    group = int(flow.attr(layer, "group", 1))
    transposed_layout = op == "MatMul" or (op == "Gemm" and not flow.attr(layer, "transB", 0))
    out_features = weight.shape[1] if transposed_layout else weight.shape[0]
    if op == "ConvTranspose":
        out_features = weight.shape[1] * group
    bias = _bias(flow, layer, sides, out_features)
    in_features = (weight.shape[0] if transposed_layout else weight.shape[1] * group) if op != "ConvTranspose" \
        else weight.shape[0]
    sides = {d: (_per_channel(k, out_features if d == "backward" else in_features),
                 _per_channel(c, out_features if d == "backward" else in_features), site)
             for d, (k, c, site) in sides.items()}
    if transposed_layout:
        weight = weight.t()
    alpha = float(flow.attr(layer, "alpha", 1.0)) if op == "Gemm" else 1.0
    if len(sides) == 2:
        weight = weight.double()
    if "forward" in sides:
        k, c, _ = sides["forward"]
        weight, response = scale_consumer(weight, torch.zeros(weight.shape[0], dtype=torch.float64), k, c,
                                          groups=group if op == "Conv" else 1)
        bias = bias + alpha * response
    if "backward" in sides:
        k, c, _ = sides["backward"]
        if op == "ConvTranspose":
            weight, bias = scale_producer(weight, bias, k, c, transposed=True, groups=group)
        else:
            weight, bias = scale_producer(weight, bias, k, c)
    if transposed_layout:
        weight = weight.t()
    return _array(weight.contiguous(), dtype), _array(bias, dtype)


def _per_channel(values: torch.Tensor, n: int) -> torch.Tensor:
    """A one-channel BN's scale or shift, repeated for each of the layer's ``n`` channels."""
    return values.expand(n).contiguous() if values.numel() == 1 and n != 1 else values


def _bias(flow: Any, layer: int, sides: dict[str, Any], out_features: int) -> torch.Tensor:
    """The layer's bias as float64 of shape ``(out_features,)`` (Gemm: ``beta * C``; MatMul: its Add's constant)."""
    site = sides.get("backward", (None, None, None))[2]
    if site is not None and site.add is not None:
        a, b = flow.input(site.add, 0), flow.input(site.add, 1)
        value = flow.constant(b) if flow.constant(b) is not None else flow.constant(a)
    elif flow.op(layer) == "MatMul":
        value = None
    else:
        value = flow.constant(flow.input(layer, 2)) if flow.input(layer, 2) is not None else None
    bias = torch.zeros(out_features, dtype=torch.float64)
    if value is not None and value.size not in (1, out_features):  # (zeros of another shape: ``weight_reason``)
        value = None
    if value is not None:
        bias = bias + _tensor(value).double().reshape(-1)
    if flow.op(layer) == "Gemm":
        bias = bias * float(flow.attr(layer, "beta", 1.0))
    return bias


def _set_bias(writer: Any, flow: Any, add_node: Any, add: int, bias: np.ndarray) -> None:
    slot = 1 if flow.constant(flow.input(add, 1)) is not None else 0
    writer.put(add_node, slot, bias)


def _set_attribute(node: Any, name: str, value: float) -> None:
    for attribute in node.attribute:
        if attribute.name == name:
            attribute.f = value
            return
    node.attribute.append(helper.make_attribute(name, value))


def _tensor(array: np.ndarray) -> torch.Tensor:
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True))


def _array(tensor: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    """``tensor`` rounded once to ``dtype`` (a numpy dtype; bfloat16 through torch's own rounding)."""
    tensor = tensor.detach().cpu()
    if dtype.name == "bfloat16":
        return tensor.to(torch.bfloat16).view(torch.uint16).numpy().view(dtype)
    return np.ascontiguousarray(tensor.numpy().astype(dtype, copy=False))
