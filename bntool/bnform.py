"""What one BatchNorm-like module computes, so that fold can take the normalization out of it.

A plain ``nn.BatchNorm*`` (or bntool's frozen BN) is exactly ``y = k * x + c``
per channel. Many BNs in the wild do more: timm's ``BatchNormAct2d`` calls
``F.batch_norm`` and then a drop layer and an activation; torchvision's
``FrozenBatchNorm2d`` computes ``x * scale + bias`` from its buffers; a
pre-activation block may apply its activation first. ``analyze`` traces the
module's own ``forward`` with ``torch.fx`` (every child module a leaf, the
input's rank and channel count concrete, eval mode) and looks for the
*normalization segment*: one ``batch_norm`` call on the module's own running
statistics (in eval mode), and/or a chain of per-channel multiplies and adds
whose other operand is computed from the module's buffers and constants
alone. What the segment computes, ``(k, c)``, is evaluated in float64 from
those buffers with the module's own arithmetic (so each library's eps
placement is its own). Around the segment:

* ``at_input``: the segment reads the module's input and nothing else does,
  so the producer before the module can absorb it (fold backward);
* ``at_output``: the module returns the segment's output unchanged, so the
  layer after it can absorb it (fold forward);
* the *remainder* is the traced forward with the segment replaced by its
  input: what must keep running after folding (drop, activation). When
  nothing is left, the module is simply removed.

A ``_BatchNorm`` subclass whose forward cannot be traced keeps running, with
statistics that make its normalization an exact identity (``identity``).
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .cloning import clone
from .errors import shorten
from .foldmath import bn_scale_shift
from .norms import bn_forward_is_standard, num_features

#: Ways a forward may call batch normalization, and the order of their arguments.
_BN_SIGNATURES = {
    F.batch_norm: inspect.signature(F.batch_norm),
    torch.batch_norm: inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in (
        "input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps", "cudnn_enabled")]),
}
#: Elementwise operations a normalization segment may be made of: name -> (op, reversed operands).
_ELEMENTWISE = {
    operator.mul: ("mul", False), operator.imul: ("mul", False), torch.mul: ("mul", False),
    operator.add: ("add", False), operator.iadd: ("add", False), torch.add: ("add", False),
    operator.sub: ("sub", False), operator.isub: ("sub", False), torch.sub: ("sub", False),
    operator.truediv: ("div", False), operator.itruediv: ("div", False), torch.div: ("div", False),
}
_ELEMENTWISE_METHODS = {"mul": "mul", "mul_": "mul", "add": "add", "add_": "add", "sub": "sub", "sub_": "sub",
                        "div": "div", "div_": "div"}
#: Methods that only change a coefficient's dtype or device: evaluated as the identity (float64 throughout).
_CASTS = {"to", "type", "type_as", "float", "double", "half", "bfloat16", "contiguous", "detach"}
_METADATA_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad", "layout"}
_METADATA_METHODS = {"size", "dim", "numel", "nelement", "ndimension", "stride", "is_contiguous", "get_device"}


@dataclass
class NormForm:
    """How one BN-like module normalizes. ``kind``: ``standard``, ``traced``, ``identity`` or ``none``.

    ``reason`` says why a ``none`` module cannot be folded; ``keeps`` names
    what keeps running after folding (the remainder's child modules).
    """

    kind: str
    at_input: bool = False
    at_output: bool = False
    reason: str | None = None
    note: str = ""
    keeps: tuple[str, ...] = ()
    removable: bool = False  # nothing of the module is left after folding
    _graph: torch.fx.Graph | None = field(default=None, repr=False)
    _root: nn.Module | None = field(default=None, repr=False)  # the traced clone: the graph's attributes
    _segment: tuple[torch.fx.Node, ...] = field(default=(), repr=False)

    @property
    def foldable(self) -> bool:
        return self.kind != "none"


def guess_rank(module: nn.Module) -> int:
    """The input rank a BN class implies when none was observed (BatchNorm1d: 2, 3d: 5, else 4)."""
    name = type(module).__name__.lower()
    return 2 if "1d" in name else 5 if "3d" in name else 4


def analyze(module: nn.Module, rank: int | None = None) -> NormForm:
    """How ``module`` (a BN by ``norms.is_batchnorm``) normalizes an input of ``rank`` dimensions."""
    if bn_forward_is_standard(module):
        return NormForm("standard", at_input=True, at_output=True, removable=True)
    rank = rank or guess_rank(module)
    try:
        root, graph = _trace(module, rank)
    except Exception as exc:  # fx raises many types for untraceable code
        first = shorten((str(exc).strip().splitlines() or [type(exc).__name__])[0])
        if isinstance(module, _BatchNorm):
            return NormForm("identity", at_input=True, note=(
                f"torch.fx cannot trace the forward of `{type(module).__name__}` ({first}); it keeps running, "
                "with statistics that make its normalization an exact identity"))
        return NormForm("none", reason=f"torch.fx cannot trace the forward of `{type(module).__name__}` ({first}), "
                                       "so what it computes is unknown")
    return _form_of_graph(root, graph, rank)


def scale_shift(module: nn.Module, form: NormForm, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k, c)``, float64 per channel, such that the module's normalization is ``k * x + c`` (on the CPU)."""
    if form.kind in ("standard", "identity"):
        return bn_scale_shift(module.running_mean, module.running_var, module.eps, module.weight, module.bias)
    module = form._root if form._root is not None else module
    channels = num_features(module)
    k = torch.ones(channels, dtype=torch.float64)
    c = torch.zeros(channels, dtype=torch.float64)
    values: dict[torch.fx.Node, Any] = {}
    for node in form._segment:
        if node.target in _BN_SIGNATURES:
            args = _bn_args(node)
            tensors = [None if args[n] is None else _attr(module, args[n].target)
                       for n in ("running_mean", "running_var", "weight", "bias")]
            k_bn, c_bn = (t.cpu() for t in bn_scale_shift(tensors[0], tensors[1], float(args["eps"]), tensors[2],
                                                            tensors[3]))
            k, c = k_bn * k, k_bn * c + c_bn
            continue
        op, data_first, operand = _elementwise(node)
        t = _channel_vector(_evaluate(module, operand, values), channels, rank or guess_rank(module)).cpu()
        if op == "mul":
            k, c = k * t, c * t
        elif op == "div":
            k, c = k / t, c / t
        elif op == "add":
            c = c + t * _alpha(node)
        elif data_first:  # x - t
            c = c - t * _alpha(node)
        else:  # t - x
            k, c = -k, t - c
    return k, c


def remainder(module: nn.Module, form: NormForm) -> nn.Module | None:
    """The module to put in the BN's place: its forward with the normalization taken out (None: nothing left)."""
    if form.removable:
        return None
    graph, segment = form._graph, form._segment
    first, last = segment[0], segment[-1]
    source = _data_inputs(first)[0]
    last.replace_all_uses_with(source)
    for node in reversed(segment):
        graph.erase_node(node)
    graph.owning_module = form._root  # what dead-code elimination asks whether a child call is pure
    graph.eliminate_dead_code()
    rest = torch.fx.GraphModule(form._root, graph, class_name=f"{type(module).__name__}WithoutNorm")
    rest.train(module.training)
    return rest


# ----------------------------------------------------------------------------- tracing


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
        super().__init__()
        self.input_rank, self.input_channels = rank, channels

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        if node.op == "get_attr":  # the module's own tensors keep their real shapes
            return super().proxy(node)
        return _InputProxy(node, self)


def _trace(module: nn.Module, rank: int) -> tuple[nn.Module, torch.fx.Graph]:
    """The module's eval-mode forward (the folded model is an inference model), traced on a clone of it.

    The clone shares the module's tensors; constants the trace creates
    (``_tensor_constant0``) are attached to it, never to the user's module.
    """
    copy = clone(module, share=[*module.parameters(), *module.buffers()])
    copy.training = False
    return copy, _ModuleTracer(rank, num_features(module)).trace(copy)


# ----------------------------------------------------------------------------- the segment


def _form_of_graph(module: nn.Module, graph: torch.fx.Graph, rank: int) -> NormForm:
    name = type(module).__name__
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    norms = [n for n in nodes if n.op == "call_function" and n.target in _BN_SIGNATURES]
    if len(norms) > 1:
        return NormForm("none", reason=f"`{name}` calls batch_norm {len(norms)} times in its forward")
    if norms:
        reason = _bn_node_reason(module, norms[0], name)
        if reason:
            return NormForm("none", reason=reason)
        segment = _extend(module, [norms[0]], rank)
    else:
        start = [u for u in _data_users(placeholders[0]) if _static_elementwise(module, u, rank)] if placeholders else []
        if len(start) != 1:
            return NormForm("none", reason=f"the forward of `{name}` neither calls batch_norm nor scales and shifts "
                                           "its input per channel with values from its buffers")
        segment = _extend(module, start, rank)
    first, last = segment[0], segment[-1]
    source = _data_inputs(first)[0]
    at_input = bool(placeholders) and source is placeholders[0] and _data_users(source) == [first]
    at_output = _output_source(graph, module) is last and len(last.users) == 1
    form = NormForm("traced", at_input=at_input, at_output=at_output, _graph=graph, _root=module,
                    _segment=tuple(segment))
    form.keeps = tuple(dict.fromkeys(
        str(n.target) if n.op == "call_module" else _name(n) for n in nodes
        if n.op in ("call_module", "call_function", "call_method") and n not in segment and _is_data(n)
        and not _is_metadata(n) and n.target is not torch._assert
        and not (n.op == "call_module" and isinstance(_child(module, n.target), nn.Identity))))
    form.removable = _nothing_left(module, graph, segment, placeholders)
    return form


def _bn_node_reason(module: nn.Module, node: torch.fx.Node, name: str) -> str | None:
    try:
        args = _bn_args(node)
    except TypeError:
        return f"`{name}` calls batch_norm with arguments bntool does not recognise"
    if args["training"] is not False:
        return f"`{name}` normalizes with batch statistics even in eval mode (training={args['training']!r})"
    for key in ("running_mean", "running_var", "weight", "bias"):
        value = args[key]
        if value is None and key in ("weight", "bias"):
            continue
        if not (isinstance(value, torch.fx.Node) and value.op == "get_attr"
                and isinstance(_attr(module, value.target), torch.Tensor)):
            return f"`{name}` passes a computed `{key}` to batch_norm, not one of its own tensors"
    if not isinstance(args["eps"], (int, float)):
        return f"`{name}` passes a computed eps to batch_norm"
    return None


def _extend(module: nn.Module, segment: list[torch.fx.Node], rank: int) -> list[torch.fx.Node]:
    """Grow the segment over single-use per-channel elementwise steps on both sides."""
    while True:
        users = list(segment[-1].users)
        if len(users) == 1 and _static_elementwise(module, users[0], rank) and _data_inputs(users[0]) == [segment[-1]]:
            segment.append(users[0])
            continue
        break
    while True:
        inputs = _data_inputs(segment[0])
        before = inputs[0] if inputs else None
        if (before is not None and len(before.users) == 1 and _static_elementwise(module, before, rank)):
            segment.insert(0, before)
            continue
        break
    return segment


def _bn_args(node: torch.fx.Node) -> dict[str, Any]:
    bound = _BN_SIGNATURES[node.target].bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _elementwise(node: torch.fx.Node) -> tuple[str, bool, Any]:
    """``(op, data operand first, the other operand)`` of a binary elementwise node, or ``("", ...)``."""
    if node.op == "call_function" and node.target in _ELEMENTWISE:
        op = _ELEMENTWISE[node.target][0]
    elif node.op == "call_method" and node.target in _ELEMENTWISE_METHODS:
        op = _ELEMENTWISE_METHODS[node.target]
    else:
        return "", True, None
    if len(node.args) != 2 or (node.kwargs and set(node.kwargs) - {"alpha"}):
        return "", True, None
    a, b = node.args
    if _is_data(a) and not _is_data(b):
        return op, True, b
    if _is_data(b) and not _is_data(a) and op in ("mul", "add", "sub"):
        return op, False, a
    return "", True, None


def _alpha(node: torch.fx.Node) -> float:
    return float(node.kwargs.get("alpha", 1.0))


def _static_elementwise(module: nn.Module, node: torch.fx.Node, rank: int) -> bool:
    """A multiply / add / subtract / divide of the data by a per-channel value computed from buffers alone."""
    op, data_first, operand = _elementwise(node)
    if not op:
        return False
    if "alpha" in node.kwargs and not (data_first and isinstance(node.kwargs["alpha"], (int, float))):
        return False
    try:
        _channel_vector(_evaluate(module, operand, {}), num_features(module), rank)
    except (ValueError, TypeError, RuntimeError, AttributeError):
        return False
    return True


def _evaluate(module: nn.Module, value: Any, memo: dict) -> Any:
    """A static operand's value in float64: buffers and parameters, constants, and operations on them."""
    if not isinstance(value, torch.fx.Node):
        if isinstance(value, (tuple, list)):
            return type(value)(_evaluate(module, v, memo) for v in value)
        if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor, type(None))):
            if isinstance(value, (torch.dtype, torch.device, str)):
                return value
            raise TypeError(f"unsupported constant {value!r}")
        return value.detach().double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
    if value in memo:
        return memo[value]
    if value.op == "get_attr":
        tensor = _attr(module, value.target)
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"`{value.target}` is not a tensor")
        result = tensor.detach().double()  # on its own device (the meta device when a structure is rebuilt)
    elif value.op in ("call_function", "call_method"):
        if value.op == "call_function" and value.target is getattr:
            raise TypeError("metadata of the data is not static")
        args = [_evaluate(module, a, memo) for a in value.args]
        kwargs = {k: _evaluate(module, v, memo) for k, v in value.kwargs.items()}
        if value.op == "call_method":
            if value.target in _CASTS:
                result = args[0]
            else:
                result = getattr(args[0], value.target)(*args[1:], **kwargs)
        else:
            result = value.target(*args, **kwargs)
    else:
        raise TypeError(f"`{value.name}` depends on the input")
    memo[value] = result
    return result


def _channel_vector(value: Any, channels: int, rank: int) -> torch.Tensor:
    """``value`` as a float64 vector over channels, if it broadcasts along axis 1 of a rank-``rank`` input only."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((channels,), float(value), dtype=torch.float64)
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() > rank:
        raise TypeError("not a per-channel value")
    shape = (1,) * (rank - value.dim()) + tuple(value.shape)
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        raise ValueError("does not broadcast along the channel axis only")
    return value.reshape(-1).double().expand(channels).clone()


# ----------------------------------------------------------------------------- graph helpers


def _is_data(value: Any) -> bool:
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


def _data_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    if node.op == "call_function" and node.target in _BN_SIGNATURES:
        return [_bn_args(node)["input"]]
    return [n for n in node.all_input_nodes if _is_data(n) and not _is_metadata(n)]


def _is_metadata(node: torch.fx.Node) -> bool:
    return ((node.op == "call_function" and node.target is getattr and node.args[1] in _METADATA_ATTRS)
            or (node.op == "call_method" and node.target in _METADATA_METHODS))


def _data_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [u for u in node.users if not _is_metadata(u)]


def _output_source(graph: torch.fx.Graph, module: nn.Module) -> torch.fx.Node | None:
    """The node whose value the forward returns, looking through child ``nn.Identity`` calls."""
    output = next(n for n in graph.nodes if n.op == "output")
    value = output.args[0]
    while isinstance(value, torch.fx.Node) and value.op == "call_module":
        if not isinstance(_child(module, value.target), nn.Identity) or len(value.users) != 1:
            break
        value = value.args[0]
    return value if isinstance(value, torch.fx.Node) else None


def _nothing_left(module: nn.Module, graph: torch.fx.Graph, segment: list[torch.fx.Node], placeholders: list) -> bool:
    """True when, with the segment taken out, the forward returns its input untouched."""
    if not placeholders or _data_inputs(segment[0]) != [placeholders[0]]:
        return False
    rest = [n for n in graph.nodes if n not in segment and n.op in ("call_function", "call_method", "call_module")
            and not _is_metadata(n) and n.target is not torch._assert and _is_data(n)]
    return all(n.op == "call_module" and isinstance(_child(module, n.target), nn.Identity) for n in rest)


def _name(node: torch.fx.Node) -> str:
    return str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))


def _child(module: nn.Module, target: str) -> Any:
    try:
        return module.get_submodule(target)
    except AttributeError:
        return None


def _attr(module: nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part, None)
    return value
