"""Reading one BN-like module's traced forward: which nodes carry the input's data, which compute per-channel
values from the module's own tensors alone, and those values, evaluated in float64.

``bnform`` finds the normalization segment with these helpers and evaluates
what it computes (``evaluate_static``, ``channel_vector``); nothing here
decides whether a module folds.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn import functional as F

from ..norms import num_features

#: Ways a forward may call batch normalization, and the order of their arguments.
BN_SIGNATURES = {
    F.batch_norm: inspect.signature(F.batch_norm),
    torch.batch_norm: inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in (
        "input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps", "cudnn_enabled")]),
}
#: Elementwise operations a normalization segment may be made of: name -> (op, reversed operands).
ELEMENTWISE = {
    operator.mul: ("mul", False), operator.imul: ("mul", False), torch.mul: ("mul", False),
    operator.add: ("add", False), operator.iadd: ("add", False), torch.add: ("add", False),
    operator.sub: ("sub", False), operator.isub: ("sub", False), torch.sub: ("sub", False),
    operator.truediv: ("div", False), operator.itruediv: ("div", False), torch.div: ("div", False),
}
ELEMENTWISE_METHODS = {"mul": "mul", "mul_": "mul", "add": "add", "add_": "add", "sub": "sub", "sub_": "sub",
                        "div": "div", "div_": "div"}
#: Methods that only change a coefficient's dtype or device: evaluated as the identity (float64 throughout).
CASTS = {"to", "type", "type_as", "float", "double", "half", "bfloat16", "contiguous", "detach"}
METADATA_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad", "layout"}
METADATA_METHODS = {"size", "dim", "numel", "nelement", "ndimension", "stride", "is_contiguous", "get_device"}


def bn_node_reason(module: nn.Module, node: torch.fx.Node, name: str) -> str | None:
    try:
        args = bn_args(node)
    except TypeError:
        return f"`{name}` calls batch_norm with arguments bntool does not recognise"
    if args["training"] is not False:
        return f"`{name}` normalizes with batch statistics even in eval mode (training={args['training']!r})"
    for key in ("running_mean", "running_var", "weight", "bias"):
        value = args[key]
        if value is None and key in ("weight", "bias"):
            continue
        if not (isinstance(value, torch.fx.Node) and value.op == "get_attr"
                and isinstance(attribute(module, value.target), torch.Tensor)):
            return f"`{name}` passes a computed `{key}` to batch_norm, not one of its own tensors"
    if not isinstance(args["eps"], (int, float)):
        return f"`{name}` passes a computed eps to batch_norm"
    return None


def extend_segment(module: nn.Module, segment: list[torch.fx.Node], rank: int) -> list[torch.fx.Node]:
    """Grow the segment over single-use per-channel elementwise steps on both sides."""
    while True:
        users = list(segment[-1].users)
        if len(users) == 1 and static_elementwise(module, users[0], rank) and data_inputs(users[0]) == [segment[-1]]:
            segment.append(users[0])
            continue
        break
    while True:
        inputs = data_inputs(segment[0])
        before = inputs[0] if inputs else None
        if (before is not None and len(before.users) == 1 and static_elementwise(module, before, rank)):
            segment.insert(0, before)
            continue
        break
    return segment


def bn_args(node: torch.fx.Node) -> dict[str, Any]:
    bound = BN_SIGNATURES[node.target].bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def elementwise(node: torch.fx.Node) -> tuple[str, bool, Any]:
    """``(op, data operand first, the other operand)`` of a binary elementwise node, or ``("", ...)``."""
    if node.op == "call_function" and node.target in ELEMENTWISE:
        op = ELEMENTWISE[node.target][0]
    elif node.op == "call_method" and node.target in ELEMENTWISE_METHODS:
        op = ELEMENTWISE_METHODS[node.target]
    else:
        return "", True, None
    if len(node.args) != 2 or (node.kwargs and set(node.kwargs) - {"alpha"}):
        return "", True, None
    a, b = node.args
    if is_data(a) and not is_data(b):
        return op, True, b
    if is_data(b) and not is_data(a) and op in ("mul", "add", "sub"):
        return op, False, a
    return "", True, None


def alpha_of(node: torch.fx.Node) -> float:
    return float(node.kwargs.get("alpha", 1.0))


def static_elementwise(module: nn.Module, node: torch.fx.Node, rank: int) -> bool:
    """A multiply / add / subtract / divide of the data by a per-channel value computed from buffers alone."""
    op, data_first, operand = elementwise(node)
    if not op:
        return False
    if "alpha" in node.kwargs and not (data_first and isinstance(node.kwargs["alpha"], (int, float))):
        return False
    try:
        channel_vector(evaluate_static(module, operand, {}), num_features(module), rank)
    except (ValueError, TypeError, RuntimeError, AttributeError):
        return False
    return True


def evaluate_static(module: nn.Module, value: Any, memo: dict) -> Any:
    """A static operand's value in float64: buffers and parameters, constants, and operations on them."""
    if not isinstance(value, torch.fx.Node):
        if isinstance(value, (tuple, list)):
            return type(value)(evaluate_static(module, v, memo) for v in value)
        if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor, type(None))):
            if isinstance(value, (torch.dtype, torch.device, str)):
                return value
            raise TypeError(f"unsupported constant {value!r}")
        return value.detach().double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
    if value in memo:
        return memo[value]
    if value.op == "get_attr":
        tensor = attribute(module, value.target)
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"`{value.target}` is not a tensor")
        result = tensor.detach().double()  # on its own device (the meta device when a structure is rebuilt)
    elif value.op in ("call_function", "call_method"):
        if value.op == "call_function" and value.target is getattr:
            raise TypeError("metadata of the data is not static")
        args = [evaluate_static(module, a, memo) for a in value.args]
        kwargs = {k: evaluate_static(module, v, memo) for k, v in value.kwargs.items()}
        if value.op == "call_method":
            if value.target in CASTS:
                result = args[0]
            else:
                result = getattr(args[0], value.target)(*args[1:], **kwargs)
        else:
            result = value.target(*args, **kwargs)
    else:
        raise TypeError(f"`{value.name}` depends on the input")
    memo[value] = result
    return result


def channel_vector(value: Any, channels: int, rank: int) -> torch.Tensor:
    """``value`` as a float64 vector over channels, if it broadcasts along axis 1 of a rank-``rank`` input only."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((channels,), float(value), dtype=torch.float64)
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() > rank:
        raise TypeError("not a per-channel value")
    shape = (1,) * (rank - value.dim()) + tuple(value.shape)
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        raise ValueError("does not broadcast along the channel axis only")
    return value.reshape(-1).double().expand(channels).clone()


# ----------------------------------------------------------------------------- which nodes are data


def is_data(value: Any) -> bool:
    """Whether ``value`` depends on the module's input (a node fed, through anything, by the placeholder)."""
    if not isinstance(value, torch.fx.Node):
        return False
    seen, stack = set(), [value]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            return True
        stack.extend(n for n in node.all_input_nodes)
    return False


def data_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    if node.op == "call_function" and node.target in BN_SIGNATURES:
        return [bn_args(node)["input"]]
    return [n for n in node.all_input_nodes if is_data(n) and not is_metadata(n)]


def is_metadata(node: torch.fx.Node) -> bool:
    return ((node.op == "call_function" and node.target is getattr and node.args[1] in METADATA_ATTRS)
            or (node.op == "call_method" and node.target in METADATA_METHODS))


def data_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [u for u in node.users if not is_metadata(u)]


def output_source(graph: torch.fx.Graph, module: nn.Module) -> torch.fx.Node | None:
    """The node whose value the forward returns, looking through child ``nn.Identity`` calls."""
    output = next(n for n in graph.nodes if n.op == "output")
    value = output.args[0]
    while isinstance(value, torch.fx.Node) and value.op == "call_module":
        if not isinstance(child_module(module, value.target), nn.Identity) or len(value.users) != 1:
            break
        value = value.args[0]
    return value if isinstance(value, torch.fx.Node) else None


def nothing_left(module: nn.Module, graph: torch.fx.Graph, segment: list[torch.fx.Node], placeholders: list) -> bool:
    """True when, with the segment taken out, the forward returns its input untouched."""
    if not placeholders or data_inputs(segment[0]) != [placeholders[0]]:
        return False
    rest = [n for n in graph.nodes if n not in segment and n.op in ("call_function", "call_method", "call_module")
            and not is_metadata(n) and n.target is not torch._assert and is_data(n)]
    return all(n.op == "call_module" and isinstance(child_module(module, n.target), nn.Identity) for n in rest)


def node_name(node: torch.fx.Node) -> str:
    return str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))


def child_module(module: nn.Module, target: str) -> Any:
    try:
        return module.get_submodule(target)
    except AttributeError:
        return None


def attribute(module: nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part, None)
    return value
