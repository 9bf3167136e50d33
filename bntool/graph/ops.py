"""The vocabulary of the dataflow: ``Op``, and what kind of operation a call is.

``Op`` is one operation of a forward pass. The helpers here classify a call
the same way for both builders (``graph_fx`` and ``graph_recorded``): which
modules are single ops (``is_leaf``), which ``F.conv*`` / ``F.linear`` call is
a module's own layer (``functional_layer``), which calls are ``a * x + s`` on
their one data input (``affine_of``, ``transparent_module``) or keep the
order of its elements (``is_reshape``), and which only read shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..norms import is_batchnorm, standard_forward

#: Module types that ``fold`` can fold a BN into (from either side).
FOLDABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)

_AFFINE_NAMES = {
    **dict.fromkeys(("mul", "mul_", "multiply", "__mul__", "__imul__", "imul", "__rmul__"), "mul"),
    **dict.fromkeys(("add", "add_", "__add__", "__iadd__", "iadd", "__radd__"), "add"),
    **dict.fromkeys(("sub", "sub_", "subtract", "__sub__", "__isub__", "isub"), "sub"),
    **dict.fromkeys(("__rsub__", "rsub"), "rsub"),
    **dict.fromkeys(("div", "div_", "divide", "true_divide", "truediv", "__truediv__", "__itruediv__", "itruediv"), "div"),
    **dict.fromkeys(("neg", "neg_", "negative", "__neg__"), "neg"),
}
_RESHAPE_NAMES = frozenset({"flatten", "reshape", "view", "reshape_as", "view_as", "unflatten", "squeeze",
                            "unsqueeze", "contiguous"})
#: Methods whose second tensor argument is read for its shape or dtype only.
SHAPE_ONLY_SECOND = frozenset({"reshape_as", "view_as", "expand_as", "type_as"})
METADATA_METHODS = frozenset({"size", "dim", "numel", "nelement", "ndimension", "stride", "is_contiguous",
                               "get_device", "__len__"})
METADATA_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad", "layout"})

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Op:
    """One operation of the forward pass. ``inputs``: the ops whose outputs it reads as data, in argument order."""

    index: int
    kind: str  # "input", "module", "function", "attr" (a tensor of the model read directly), "output"
    target: str  # qualified module name, function name, attribute name, "input" / "output"
    inputs: tuple[int, ...] = ()
    affine: tuple[float, float] | None = None  # y = a * x + s on its one data input (a, s numbers)
    reshape: bool = False  # a view of its one data input in another shape, element order kept
    functional: bool = False  # a module's layer computed by its own forward with F.conv* / F.linear on its weights




def is_leaf(module: nn.Module) -> bool:
    """BNs, and conv / linear layers that run their class's own forward, are single ops of the dataflow.

    A conv / linear subclass with a forward of its own (detectron2's ``Conv2d``
    applies its ``norm`` and ``activation`` inside) is looked into: its
    ``F.conv2d(x, self.weight, self.bias, ...)`` is the layer (``functional_layer``)
    and what it calls after that are ops like any other.
    """
    return is_batchnorm(module) or (isinstance(module, FOLDABLE_TYPES) and standard_forward(module, FOLDABLE_TYPES))


#: functional call -> the layer type whose forward it is
_FUNCTIONAL_LAYERS = {
    "conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d, "linear": nn.Linear,
    "conv_transpose1d": nn.ConvTranspose1d, "conv_transpose2d": nn.ConvTranspose2d,
    "conv_transpose3d": nn.ConvTranspose3d,
}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_TRANSPOSED_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")


def is_layer_function(name: str) -> bool:
    """``conv2d``, ``linear``, ...: a call that computes a layer (whose own it is: ``functional_layer``)."""
    return name in _FUNCTIONAL_LAYERS


def functional_layer(name: str, args: Sequence[Any], kwargs: dict[str, Any], module_of: Callable[[Any], str | None],
                     modules: dict[str, nn.Module]) -> str | None:
    """The module whose layer a call ``F.conv2d(x, m.weight, m.bias, m.stride, ...)`` computes, exactly as its
    class's forward would (its own weight and bias, its own hyper-parameters), else None."""
    kind = _FUNCTIONAL_LAYERS.get(name)
    if kind is None:
        return None
    names = ("input", "weight", "bias") if kind is nn.Linear else (
        _TRANSPOSED_ARGS if "transpose" in name else _CONV_ARGS)
    bound = dict(zip(names, args))
    bound.update(kwargs)
    owner = module_of(bound.get("weight"))
    module = modules.get(owner) if owner is not None else None
    if not isinstance(module, kind) or module_of(bound.get("bias")) != (owner if module.bias is not None else None):
        return None
    if module.bias is None and bound.get("bias") is not None:
        return None
    for key in names[3:]:
        expected = getattr(module, key)
        given = bound.get(key, expected if key != "output_padding" else 0)
        if _as_tuple(given, len(expected) if isinstance(expected, tuple) else 1) != _as_tuple(expected, 1):
            return None
    return owner


def _as_tuple(value: Any, n: int) -> tuple:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return (value,) * n if n > 1 else (value,)


def transparent_module(module: nn.Module) -> tuple[tuple[float, float] | None, bool]:
    """``(affine, reshape)`` of a module that passes its input on in eval mode (Identity, dropout) or reshapes it.

    Folding makes an inference model, and the folded model is verified in
    eval mode, where every dropout layer is the identity.
    """
    if type(module) is nn.Identity or isinstance(module, nn.modules.dropout._DropoutNd):
        return (1.0, 0.0), False
    return None, type(module) in (nn.Flatten, nn.Unflatten)


def affine_of(name: str, args: Sequence[Any], kwargs: dict[str, Any], is_data: Callable[[Any], bool],
              constant: Callable[[Any], float | None] = lambda a: None) -> tuple[float, float] | None:
    """``(a, s)`` when the call ``name(*args, **kwargs)`` is ``a * x + s`` on its one data argument ``x``.

    The other operand is a Python number, or a constant scalar tensor whose
    value ``constant`` gives (``scalar_value``: a buffer, a plain tensor
    attribute or a ``torch.tensor(2.2)`` literal; the builders pass such an
    operand as no data, and leave it out of the op's inputs).
    """
    op = _AFFINE_NAMES.get(name)
    if op is None:
        return None
    positions = [i for i, a in enumerate(args) if is_data(a)]
    if op == "neg":
        return (-1.0, 0.0) if len(args) == 1 and positions == [0] and not kwargs else None
    if len(args) != 2 or len(positions) != 1 or set(kwargs) - {"alpha"}:
        return None
    other, alpha = args[1 - positions[0]], kwargs.get("alpha", 1.0)
    if not _number(other):
        other = constant(other)
    if other is None or not _number(other) or not _number(alpha):
        return None
    other, alpha = float(other), float(alpha)
    swapped = positions[0] == 1 or op == "rsub"
    if op == "mul":
        return None if "alpha" in kwargs else (other, 0.0)
    if op == "add":
        return (alpha, other) if swapped else (1.0, alpha * other)
    if op in ("sub", "rsub"):
        return (-alpha, other) if swapped else (1.0, -alpha * other)
    if swapped or other == 0.0 or "alpha" in kwargs:  # c / x is not affine
        return None
    return 1.0 / other, 0.0


def is_reshape(name: str, args: Sequence[Any], data_count: int) -> bool:
    """An order-preserving reshape of the one data input (``view(dtype)`` reinterprets bits: not one)."""
    return name in _RESHAPE_NAMES and data_count == 1 and not any(isinstance(a, torch.dtype) for a in args)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: torch calls that make a tensor from Python values alone (``torch.tensor(2.2)``): a literal, not a computation
LITERAL_FACTORIES = frozenset({"tensor", "as_tensor", "scalar_tensor"})


def scalar_value(tensor: Any) -> float | None:
    """The value of a tensor a scalar step may hold as a Python number would: one real element, neither a
    parameter nor a tensor that requires grad (either may be trained, and a fold would not follow it); else None.

    Whether it is constant (a buffer, a plain attribute, a literal) rather
    than computed in the forward is the builder's to tell.
    """
    if (not isinstance(tensor, torch.Tensor) or isinstance(tensor, nn.Parameter) or tensor.requires_grad
            or tensor.numel() != 1 or tensor.dtype == torch.bool or tensor.is_complex() or tensor.is_meta):
        return None
    return float(tensor.detach().reshape(()).item())



def tensors_in(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) structure of arguments or outputs, in order."""
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]
