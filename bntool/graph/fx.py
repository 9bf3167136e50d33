"""The dataflow from ``torch.fx``: the whole program, every branch, when the model traces.

BN-like, conv and linear modules (subclasses with the class's own forward
included) are leaves. The trace runs on a clone of the model that shares its
tensors, in eval mode, so a forward that caches what it computes never keeps
proxies in the user's modules. Shapes are measured afterwards, by one hooked
forward pass, only when a fold rule asks for them (``measure_shapes``).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

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
    scalar_value,
    tensors_in,
    transparent_module,
)


def trace(model: nn.Module) -> torch.fx.Graph:
    """The fx graph of ``model``'s forward, traced on a clone sharing its tensors, in eval mode."""
    return trace_scalars(model)[0]


def trace_scalars(model: nn.Module) -> tuple[torch.fx.Graph, dict[str, float]]:
    """``trace``, and the values of the constant scalar tensors its ``get_attr`` nodes read, by target.

    Constant: a buffer, a plain tensor attribute, or a tensor the forward
    makes from Python values alone (``torch.tensor(2.2)``, kept by fx as a
    ``_tensor_constant``); one element, not a parameter (``ops.scalar_value``).
    A ``_tensor_constant`` the forward computed from other tensors
    (``self.scale * 2``) is not one: it is the result of a computation, as it is
    in a recorded forward pass.
    """
    root = clone(model, share_all=True, eval_mode=True)
    with _Computed() as computed:
        graph = _Tracer().trace(root)
    scalars = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            try:
                value = functools.reduce(getattr, str(node.target).split("."), root)
            except AttributeError:
                continue
            number = None if id(value) in computed.ids else scalar_value(value)
            if number is not None:
                scalars[str(node.target)] = number
    return graph, scalars


class _Computed(TorchFunctionMode):
    """Notes the tensors computed from concrete tensors while tracing (no tracer value among the arguments):
    what fx keeps as a ``_tensor_constant`` without saying it was computed."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[int] = set()
        self.keep: list[torch.Tensor] = []  # keeps ids unique for the trace

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        leaves = tree_leaves((args, kwargs))
        if any(isinstance(a, torch.Tensor) for a in leaves) and not any(isinstance(a, torch.fx.Proxy) for a in leaves):
            for t in tensors_in(out):
                self.keep.append(t)
                self.ids.add(id(t))
        return out


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


def fx_ops(model: nn.Module, graph: torch.fx.Graph, scalars: dict[str, float] | None = None) -> tuple[Op, ...]:
    """The op list of ``graph``; ``scalars`` (``trace_scalars``): constant scalar tensors, which a scalar step
    holds as it would a Python number."""
    scalars = scalars or {}
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
            is_data = lambda a: (isinstance(a, torch.fx.Node) and a in index and a not in meta
                                 and not (a.op == "get_attr" and str(a.target) in scalars))
            constant = lambda a: (scalars.get(str(a.target)) if isinstance(a, torch.fx.Node)
                                  and a.op == "get_attr" else None)
            affine = affine_of(name, node.args, dict(node.kwargs), is_data, constant)
            if affine is not None:  # a scalar tensor is no data: the walks go through to the one data input
                inputs = tuple(index[n] for n in data_nodes if is_data(n))
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
