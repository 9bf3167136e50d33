"""The dataflow recorded from a real forward pass, for models ``torch.fx`` cannot trace.

Module hooks on the leaf modules plus a ``TorchFunctionMode`` that sees every
tensor operation between them. Tensors are identified by ``(id, _version)``,
so an in-place op (``relu_``, ``+=``) between a conv and its BN is seen as
standing between them. Only the branches the inputs take are seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..runtime.running import inputs_must_fit, model_device, move_inputs, training_flags
from .ops import (
    FOLDABLE_TYPES,
    LITERAL_FACTORIES,
    SHAPE_ONLY_SECOND,
    Op,
    Shape,
    affine_of,
    functional_layer,
    is_leaf,
    is_reshape,
    scalar_value,
    tensors_in,
    transparent_module,
)


class _Recorder(TorchFunctionMode):
    """Builds the op list from a real forward pass; tensors are keyed by ``(id, _version)``."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.modules = modules
        self.owners = {id(getattr(m, attr)): name for name, m in modules.items() if isinstance(m, FOLDABLE_TYPES)
                       for attr in ("weight", "bias") if getattr(m, attr, None) is not None}
        self.tensor_names = {id(t): f"{name}.{key}" if name else key for name, m in modules.items()
                             for store in (m._parameters, m._buffers) for key, t in store.items() if t is not None}
        self.shapes: dict[int, tuple[Shape | None, Shape | None]] = {}
        self.ops: list[Op] = []
        self.producer: dict[tuple[int, int], int] = {}
        self.keep: list[torch.Tensor] = []  # keeps ids unique for the whole pass
        self.depth = 0  # > 0 inside a recorded leaf module

    def key(self, t: torch.Tensor) -> tuple[int, int]:
        self.keep.append(t)
        return id(t), t._version

    def source(self, t: torch.Tensor) -> int:
        return self.source_of(self.key(t))

    def source_of(self, k: tuple[int, int]) -> int:
        """The op that produced the tensor keyed ``k``; one no op produced is a tensor read directly (named as the
        model's parameter or buffer it is, as fx names its ``get_attr`` nodes)."""
        if k not in self.producer:
            self.producer[k] = self.add("attr", self.tensor_names.get(k[0], "tensor"), (), [])
        return self.producer[k]

    def add(self, kind: str, target: str, inputs: tuple[int, ...], outputs: list[torch.Tensor],
            affine: tuple[float, float] | None = None, reshape: bool = False, functional: bool = False) -> int:
        index = len(self.ops)
        self.ops.append(Op(index, kind, target, inputs, affine, reshape, functional))
        for t in outputs:
            self.producer[self.key(t)] = index
        return index

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        data_args = args[:1] if name in SHAPE_ONLY_SECOND else args
        inputs = tensors_in((data_args, kwargs))
        keys = [self.key(t) for t in inputs]  # before the call: an in-place op changes the version
        out = func(*args, **kwargs)
        outputs = tensors_in(out)
        if not outputs:  # shape/dtype queries are not data reads
            return out
        owner = functional_layer(name, args, kwargs, lambda a: self.owners.get(id(a)) if isinstance(a, torch.Tensor)
                                 else None, self.modules)
        if owner is not None:
            index = self.add("module", owner, (self.source_of(keys[0]),), outputs, functional=True)
            self.shapes[index] = (tuple(inputs[0].shape), tuple(outputs[0].shape))
            return out
        constant = lambda a: self.scalar(a, inputs)
        affine = affine_of(name, args, kwargs, lambda a: isinstance(a, torch.Tensor) and constant(a) is None,
                           constant)
        sources = tuple(self.source_of(k) for k, t in zip(keys, inputs) if affine is None or constant(t) is None)
        self.add("function", name, sources, outputs, affine, is_reshape(name, args, len(inputs)))
        return out

    def scalar(self, t: Any, inputs: list[torch.Tensor]) -> float | None:
        """The value of ``t`` when it is a constant scalar tensor (``ops.scalar_value``) read directly (a buffer, a
        plain attribute) or made from Python values alone (``torch.tensor(2.2)``), not computed in the forward,
        and it broadcasts to no more dims than the data beside it; else None."""
        if not isinstance(t, torch.Tensor) or any(t.dim() > other.dim() for other in inputs if other is not t):
            return None
        producer = self.producer.get((id(t), t._version))
        if producer is not None:
            op = self.ops[producer]
            if op.kind != "attr" and not (op.kind == "function" and op.target in LITERAL_FACTORIES and not op.inputs):
                return None
        return scalar_value(t)


def recorded_ops(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> tuple[tuple[Op, ...], dict]:
    modules = dict(model.named_modules())
    rec = _Recorder(modules)
    leaves = {n: m for n, m in modules.items() if n and (not any(m.children()) or is_leaf(m))
              and not (isinstance(m, FOLDABLE_TYPES) and not is_leaf(m))}
    shapes = rec.shapes
    stack: list[tuple[str, tuple[int, ...], Shape | None] | None] = []

    def pre_hook(name):
        def hook(module, args, kwargs):
            if rec.depth:  # a module inside a recorded leaf: part of that leaf's call
                stack.append(None)
            else:
                inputs = tensors_in((args, kwargs))
                stack.append((name, tuple(rec.source(t) for t in inputs), tuple(inputs[0].shape) if inputs else None))
            rec.depth += 1

        return hook

    def post_hook(name):
        def hook(module, args, output):
            rec.depth -= 1
            entry = stack.pop()
            if entry is None:
                return
            outputs = tensors_in(output)
            affine, reshape = transparent_module(module)
            index = rec.add("module", name, entry[1], outputs, affine, reshape)
            shapes[index] = (entry[2], tuple(outputs[0].shape) if outputs else None)

        return hook

    handles = []
    for name, m in leaves.items():
        handles.append(m.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
        handles.append(m.register_forward_hook(post_hook(name)))
    inputs = move_inputs(example_inputs, model_device(model))
    try:
        with torch.no_grad(), training_flags(model, False), inputs_must_fit(model, inputs), rec:
            for t in tensors_in(inputs):
                rec.add("input", "input", (), [t])
            out = model(*inputs)
            rec.add("output", "output", tuple(rec.source(t) for t in tensors_in(out)), [])
    finally:
        for h in handles:
            h.remove()
    return tuple(rec.ops), shapes
