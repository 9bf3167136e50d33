"""The dataflow from ``torch.fx``: the whole program, every branch, when the model traces.

BN-like, conv and linear modules (subclasses with the class's own forward
included) are leaves. The trace runs on a clone of the model that shares its
tensors, in eval mode, so a forward that caches what it computes never keeps
proxies in the user's modules. Shapes are measured afterwards, by one hooked
forward pass, only when a fold rule asks for them (``measure_shapes``).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.fx
from torch import nn

from ..runtime.cloning import clone
from ..runtime.running import run_eval
from .ops import (
    METADATA_ATTRS,
    METADATA_METHODS,
    SHAPE_ONLY_SECOND,
    Op,
    affine_of,
    functional_layer,
    is_leaf,
    is_reshape,
    tensors_in,
    transparent_module,
)


def trace(model: nn.Module) -> torch.fx.Graph:
    """The fx graph of ``model``'s forward, traced on a clone sharing its tensors, in eval mode."""
    return _Tracer().trace(clone(model, share_all=True, eval_mode=True))


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_leaf(m) or super().is_leaf_module(m, qualname)


def _fx_name(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    target = node.target
    return getattr(target, "__name__", str(target))


def _fx_is_metadata(node: torch.fx.Node, meta: set[torch.fx.Node]) -> bool:
    """Shape / dtype queries, and values computed from them alone (``x.size(0) * 2``)."""
    if node.op == "call_method" and node.target in METADATA_METHODS:
        return True
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1 and node.args[1] in METADATA_ATTRS:
        return True
    inputs = node.all_input_nodes
    return node.op in ("call_function", "call_method") and bool(inputs) and all(n in meta for n in inputs)


def _nodes_in(arg: Any) -> list[torch.fx.Node]:
    """The nodes in an fx argument, in order, repeats kept (what ``tree_flatten`` finds, several times faster).

    fx arguments nest only tuples (named ones included), lists and dicts; a
    slice is a leaf, as for ``tree_flatten``.
    """
    if isinstance(arg, torch.fx.Node):
        return [arg]
    if isinstance(arg, (tuple, list)):
        return [n for a in arg for n in _nodes_in(a)]
    if isinstance(arg, dict):
        return [n for a in arg.values() for n in _nodes_in(a)]
    return []


def fx_ops(model: nn.Module, graph: torch.fx.Graph) -> tuple[Op, ...]:
    modules = dict(model.named_modules())
    index: dict[torch.fx.Node, int] = {}
    meta: set[torch.fx.Node] = set()
    ops: list[Op] = []

    def attr_owner(value: Any) -> str | None:
        """``conv`` for a get_attr node of ``conv.weight`` / ``conv.bias``."""
        if isinstance(value, torch.fx.Node) and value.op == "get_attr":
            owner, _, attr = str(value.target).rpartition(".")
            return owner if attr in ("weight", "bias") else None
        return None

    for node in graph.nodes:
        if node.op in ("call_function", "call_method") and _fx_is_metadata(node, meta):
            meta.add(node)
            continue
        name = _fx_name(node)
        args = node.args[:1] if name in SHAPE_ONLY_SECOND else node.args
        data_nodes = [n for n in _nodes_in((args, node.kwargs)) if n not in meta and n in index]
        inputs = tuple(index[n] for n in data_nodes)
        i = len(ops)
        if node.op == "placeholder":
            op = Op(i, "input", "input")
        elif node.op == "get_attr":
            op = Op(i, "attr", str(node.target))
        elif node.op == "call_module":
            affine, reshape = transparent_module(modules[str(node.target)])
            op = Op(i, "module", str(node.target), inputs, affine, reshape)
        elif node.op == "output":
            op = Op(i, "output", "output", inputs)
        elif (owner := functional_layer(name, node.args, dict(node.kwargs), attr_owner, modules)) is not None:
            source = node.args[0] if node.args else node.kwargs.get("input")
            op = Op(i, "module", owner, (index[source],) if source in index else (), functional=True)
        else:
            is_data = lambda a: isinstance(a, torch.fx.Node) and a in index and a not in meta  # noqa: E731
            affine = affine_of(name, node.args, dict(node.kwargs), is_data)
            op = Op(i, "function", name, inputs, affine, is_reshape(name, node.args, len(inputs)))
        index[node] = i
        ops.append(op)
    return tuple(ops)


def measure_shapes(model: nn.Module, example_inputs, calls: dict[str, tuple[int, ...]]) -> dict:
    """One hooked forward pass: input and output shape of every module call fx saw, matched by call order."""
    seen: defaultdict[str, list[list]] = defaultdict(list)

    def pre(name):
        def hook(module, args, kwargs):
            tensors = tensors_in((args, kwargs))
            seen[name].append([tuple(tensors[0].shape) if tensors else None, None])

        return hook

    def post(name):
        def hook(module, args, output):
            tensors = tensors_in(output)
            if seen[name] and tensors:
                seen[name][-1][1] = tuple(tensors[0].shape)

        return hook

    handles = []
    for name in calls:
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(pre(name), with_kwargs=True))
        handles.append(module.register_forward_hook(post(name)))
    try:
        run_eval(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    shapes = {}
    for name, indices in calls.items():
        if len(seen[name]) == len(indices):  # else the pass took another path: shapes stay unknown
            shapes.update({i: (s[0], s[1]) for i, s in zip(indices, seen[name])})
    return shapes



def op_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The fx nodes behind ``fx_ops``'s ops, in the same order (op ``i`` is node ``i``): every node but the
    shape queries."""
    meta: set[torch.fx.Node] = set()
    nodes = []
    for node in graph.nodes:
        if node.op in ("call_function", "call_method") and _fx_is_metadata(node, meta):
            meta.add(node)
            continue
        nodes.append(node)
    return nodes
