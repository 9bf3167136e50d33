"""Tracing one BN-like module's forward for ``bnform``, and the key that lets modules built alike share a trace.

``trace`` runs the module's eval-mode forward through ``torch.fx`` on a clone
that shares its tensors: every child a leaf, the input's rank and channel
count concrete (so shape checks run as Python), and notes whether the forward
computed with the values of its own tensors (``ReadsValues``), which makes the
trace that module's alone. ``structure`` is what a trace can depend on besides
those values: two modules with equal keys trace to the same graph.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ..norms import num_features
from ..runtime.cloning import clone


class _InputProxy(torch.fx.Proxy):
    """A traced tensor with the input's rank and channel count concrete, so that shape checks run as Python.

    BN-like modules do elementwise work around the normalization (an
    activation before or after it), so every tensor in their forward has the
    input's rank and channels; the graph itself is never specialised to them.
    """

    def dim(self) -> int:
        return self.tracer.input_rank

    def ndimension(self) -> int:
        return self.tracer.input_rank

    @property
    def ndim(self) -> int:
        return self.tracer.input_rank

    @property
    def requires_grad(self) -> bool:  # folding is for inference
        return False

    def size(self, dim: int | None = None) -> Any:
        if dim is not None and dim % self.tracer.input_rank == 1:
            return self.tracer.input_channels
        method = torch.fx.Proxy.__getattr__(self, "size")
        return method() if dim is None else method(dim)


class _ModuleTracer(torch.fx.Tracer):
    """Traces one module's forward; its children are leaves, so the remainder keeps them as they are."""

    def __init__(self, rank: int, channels: int):
        super().__init__(autowrap_modules=())  # a BN's forward calls no `math` function on its input: skip the scan
        self.input_rank, self.input_channels = rank, channels

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        if node.op == "get_attr":  # the module's own tensors keep their real shapes
            return super().proxy(node)
        return _InputProxy(node, self)


def trace(module: nn.Module, rank: int) -> tuple[nn.Module, torch.fx.Graph, bool]:
    """The module's eval-mode forward (the folded model is an inference model), traced on a clone of it, and
    whether the trace computed with the values of the module's tensors (``ReadsValues``).

    The clone shares the module's tensors; constants the trace creates
    (``_tensor_constant0``) are attached to it, never to the user's module.
    """
    copy = eval_clone(module)
    with ReadsValues(copy) as reads:
        graph = _ModuleTracer(rank, num_features(module)).trace(copy)
    return copy, graph, reads.read


def eval_clone(module: nn.Module) -> nn.Module:
    """What a trace runs on: a clone of ``module`` sharing its tensors, the module itself in eval mode."""
    copy = clone(module, share_all=True)
    copy.training = False
    return copy


class ReadsValues(TorchFunctionMode):
    """Notes a torch call on the module's own tensors (or its children's) with no tracer value among its
    arguments. fx proxies parameters but not buffers: such a call computes with what a buffer holds (torchvision's
    frozen BN computes its scale, a forward may read ``.tolist()`` or branch on a value), and the graph keeps
    the result, not a reference, so the trace is this module's alone."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.ids = {id(t) for t in (*module.parameters(), *module.buffers())}
        self.read = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.read:
            leaves = tree_leaves((args, kwargs))
            self.read = (not any(isinstance(a, torch.fx.Proxy) for a in leaves)
                         and any(id(a) in self.ids for a in leaves if isinstance(a, torch.Tensor)))
        return func(*args, **kwargs)




#: attributes every module has: the machinery, not what its forward reads
_MODULE_MACHINERY = frozenset(nn.Module().__dict__)
_VALUES = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)
_BY_IDENTITY = (type, types.FunctionType, types.BuiltinFunctionType, types.MethodWrapperType)


def structure(module: nn.Module, rank: int) -> tuple | None:
    """What the trace of ``module`` can depend on besides its tensors' values: the classes, plain attributes
    (values, tuples of them, functions) and tensor layouts of it and everything it holds, and the input rank.
    None when an attribute is anything else (a dict, an object): that module is traced on its own. A trace
    that used its tensors' values is never shared (``ReadsValues``)."""
    parts: list[Any] = [rank]
    for name, m in module.named_modules(remove_duplicate=False):
        attrs = []
        for key, value in m.__dict__.items():
            if key in _MODULE_MACHINERY:
                continue
            plain = _plain_value(value)
            if plain is None:
                return None
            attrs.append((key, plain))
        tensors = tuple((key, None if t is None else (type(t), tuple(t.shape), t.dtype, t.device))
                        for key, t in (*m._parameters.items(), *m._buffers.items()))
        parts.append((name, type(m), tuple(attrs), tuple(m._modules), tensors))
    return tuple(parts)


def _plain_value(value: Any) -> tuple | None:
    """``value`` as a comparable key when equal keys mean the same behaviour, else None."""
    if type(value) is float:
        return (float, value.hex())  # (0.0 and -0.0 differ; every NaN is one key)
    if type(value) in _VALUES:
        return (type(value), value)
    if isinstance(value, _BY_IDENTITY):
        return ("is", id(value))
    if type(value) in (tuple, list):
        items = tuple(_plain_value(v) for v in value)
        return None if any(i is None for i in items) else (type(value), items)
    return None
