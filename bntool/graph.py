"""Who feeds whom: a model's forward as a list of operations in execution order.

Every module call, tensor operation, model input and output becomes an ``Op``
that names the ops whose outputs it reads as data (shape and dtype queries are
not data reads: ``x.size(0)``, ``y.reshape_as(x)``'s ``x``). Module calls are
listed per module, so a module called twice has two ops. The fold rules in
``foldplan.py`` decide from these facts alone.

Two ways to see the dataflow:

* ``torch.fx`` symbolic tracing, when the model traces: the whole program,
  every branch. BN-like, conv and linear modules (subclasses included) are leaves.
* Recording a real forward pass on the example inputs, when fx cannot trace
  (data-dependent control flow...): module hooks on the leaf modules plus a
  ``TorchFunctionMode`` that sees every tensor operation between them.
  Tensors are identified by ``(id, _version)``, so an in-place op (``relu_``,
  ``+=``) between a conv and its BN is seen as standing between them. Only
  the branches the inputs take are seen; the report says so.

Ops that are transparent to a fold are marked: a multiply / add / subtract /
divide by a Python number is ``affine`` (``y = a * x + s``), and a reshape that
keeps the order of the elements (``flatten``, ``view``, ``reshape``,
``unsqueeze``...) is ``reshape``. The input and output shapes of module calls
are measured by one hooked forward pass, only when a fold rule needs them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .errors import shorten
from .norms import is_batchnorm, standard_forward

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
_SHAPE_ONLY_SECOND = frozenset({"reshape_as", "view_as", "expand_as", "type_as"})
_METADATA_METHODS = frozenset({"size", "dim", "numel", "nelement", "ndimension", "stride", "is_contiguous",
                               "get_device", "__len__"})
_METADATA_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad", "layout"})

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


@dataclass(frozen=True)
class BNSite:
    """What feeds one BN and what reads it (its first call), for reports."""

    bn: str
    producer: str | None  # the module whose output the BN reads directly
    producer_op: str | None  # else the operation that produced it ("input" for a model input)
    consumers: tuple[str, ...]  # everything that reads the BN's output ("output" = model output)


@dataclass
class Dataflow:
    ops: tuple[Op, ...]
    method: str  # "fx" or "recorded"
    note: str = ""
    shapes: dict[int, tuple[Shape | None, Shape | None]] | None = None  # module op -> (input, output) shape
    measure: Callable[[], dict[int, tuple[Shape | None, Shape | None]]] | None = field(default=None, repr=False)
    readers: dict[int, tuple[int, ...]] = field(init=False)
    calls: dict[str, tuple[int, ...]] = field(init=False)

    def __post_init__(self) -> None:
        readers: defaultdict[int, list[int]] = defaultdict(list)
        calls: defaultdict[str, list[int]] = defaultdict(list)
        for op in self.ops:
            for i in dict.fromkeys(op.inputs):
                readers[i].append(op.index)
            if op.kind == "module":
                calls[op.target].append(op.index)
        self.readers = {i: tuple(r) for i, r in readers.items()}
        self.calls = {name: tuple(c) for name, c in calls.items()}

    def readers_of(self, index: int) -> tuple[int, ...]:
        return self.readers.get(index, ())

    def shape(self, index: int) -> tuple[Shape | None, Shape | None]:
        """Input and output shape of a module call (a forward pass measures them the first time); unknown: None."""
        if self.shapes is None:
            self.shapes = self.measure() if self.measure is not None else {}
        return self.shapes.get(index, (None, None))

    @property
    def sites(self) -> dict[str, BNSite]:
        sites = {}
        for name, calls in self.calls.items():
            op = self.ops[calls[0]]
            if op.kind != "module" or name in sites or not op.inputs:
                continue
            source = self.ops[op.inputs[0]]
            consumers = tuple(dict.fromkeys(self.ops[r].target for r in self.readers_of(op.index)))
            sites[name] = BNSite(name, source.target if source.kind == "module" else None,
                                 None if source.kind == "module" else source.target, consumers)
        return sites


def bn_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if is_batchnorm(m)]


def dataflow(model: nn.Module, example_inputs: Sequence[torch.Tensor] | None) -> Dataflow:
    """The model's dataflow: fx when the model traces, else a recorded forward pass.

    fx runs the forward on proxies, and a forward that stores what it computes
    (a cache keyed by device, say) would keep proxies: the trace runs on a
    clone (sharing the tensors, in eval mode), never on the user's modules.
    """
    try:
        graph = _Tracer().trace(_tracing_copy(model))
    except Exception as exc:  # fx raises many types for untraceable code
        if example_inputs is None:
            raise
        reason = shorten(str(exc).strip().splitlines()[0]) if str(exc).strip() else type(exc).__name__
        ops, shapes = _recorded_ops(model, example_inputs)
        return Dataflow(ops, "recorded", f"torch.fx cannot trace the model ({reason}); dataflow was recorded "
                        "from a forward pass on the verification inputs, so only the branches they take are seen",
                        shapes=shapes)
    ops = _fx_ops(model, graph)
    flow = Dataflow(ops, "fx")
    if example_inputs is not None:
        flow.measure = lambda: _measure_shapes(model, example_inputs, flow.calls)
    return flow


def _tracing_copy(model: nn.Module) -> nn.Module:
    from .cloning import clone

    copy = clone(model, share=[*model.parameters(), *model.buffers()])
    return copy.eval()


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


def affine_of(name: str, args: Sequence[Any], kwargs: dict[str, Any], is_data: Callable[[Any], bool]) -> tuple[float, float] | None:
    """``(a, s)`` when the call ``name(*args, **kwargs)`` is ``a * x + s`` on its one data argument ``x``."""
    op = _AFFINE_NAMES.get(name)
    if op is None:
        return None
    positions = [i for i, a in enumerate(args) if is_data(a)]
    if op == "neg":
        return (-1.0, 0.0) if len(args) == 1 and positions == [0] and not kwargs else None
    if len(args) != 2 or len(positions) != 1 or set(kwargs) - {"alpha"}:
        return None
    other, alpha = args[1 - positions[0]], kwargs.get("alpha", 1.0)
    if not _number(other) or not _number(alpha):
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


# ----------------------------------------------------------------------------- fx


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
    if node.op == "call_method" and node.target in _METADATA_METHODS:
        return True
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1 and node.args[1] in _METADATA_ATTRS:
        return True
    inputs = node.all_input_nodes
    return node.op in ("call_function", "call_method") and bool(inputs) and all(n in meta for n in inputs)


def _fx_ops(model: nn.Module, graph: torch.fx.Graph) -> tuple[Op, ...]:
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
        args = node.args[:1] if name in _SHAPE_ONLY_SECOND else node.args
        data_nodes = [n for n in tree_flatten((args, node.kwargs))[0]
                      if isinstance(n, torch.fx.Node) and n not in meta and n in index]
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


def _measure_shapes(model: nn.Module, example_inputs, calls: dict[str, tuple[int, ...]]) -> dict:
    """One hooked forward pass: input and output shape of every module call fx saw, matched by call order."""
    seen: defaultdict[str, list[list]] = defaultdict(list)

    def pre(name):
        def hook(module, args, kwargs):
            tensors = _tensors((args, kwargs))
            seen[name].append([tuple(tensors[0].shape) if tensors else None, None])

        return hook

    def post(name):
        def hook(module, args, output):
            tensors = _tensors(output)
            if seen[name] and tensors:
                seen[name][-1][1] = tuple(tensors[0].shape)

        return hook

    handles = []
    for name in calls:
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(pre(name), with_kwargs=True))
        handles.append(module.register_forward_hook(post(name)))
    try:
        _forward(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    shapes = {}
    for name, indices in calls.items():
        if len(seen[name]) == len(indices):  # else the pass took another path: shapes stay unknown
            shapes.update({i: (s[0], s[1]) for i, s in zip(indices, seen[name])})
    return shapes


def _forward(model: nn.Module, example_inputs) -> Any:
    from .verify import inputs_must_fit, model_device, training_flags

    device = model_device(model)
    inputs = [t.to(device) for t in example_inputs]
    with torch.no_grad(), training_flags(model, False), inputs_must_fit(model, inputs):
        return model(*inputs)


# ----------------------------------------------------------------------------- recorded


def _tensors(obj: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


class _Recorder(TorchFunctionMode):
    """Builds the op list from a real forward pass; tensors are keyed by ``(id, _version)``."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.modules = modules
        self.owners = {id(getattr(m, attr)): name for name, m in modules.items() if isinstance(m, FOLDABLE_TYPES)
                       for attr in ("weight", "bias") if getattr(m, attr, None) is not None}
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
        """The op that produced the tensor keyed ``k``; one no op produced is a model tensor read directly."""
        if k not in self.producer:
            self.producer[k] = self.add("attr", "tensor", (), [])
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
        data_args = args[:1] if name in _SHAPE_ONLY_SECOND else args
        inputs = _tensors((data_args, kwargs))
        keys = [self.key(t) for t in inputs]  # before the call: an in-place op changes the version
        out = func(*args, **kwargs)
        outputs = _tensors(out)
        if not outputs:  # shape/dtype queries are not data reads
            return out
        owner = functional_layer(name, args, kwargs, lambda a: self.owners.get(id(a)) if isinstance(a, torch.Tensor)
                                 else None, self.modules)
        if owner is not None:
            index = self.add("module", owner, (self.source_of(keys[0]),), outputs, functional=True)
            self.shapes[index] = (tuple(inputs[0].shape), tuple(outputs[0].shape))
            return out
        affine = affine_of(name, args, kwargs, lambda a: isinstance(a, torch.Tensor))
        sources = tuple(self.source_of(k) for k in keys)
        self.add("function", name, sources, outputs, affine, is_reshape(name, args, len(inputs)))
        return out


def _recorded_ops(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> tuple[tuple[Op, ...], dict]:
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
                inputs = _tensors((args, kwargs))
                stack.append((name, tuple(rec.source(t) for t in inputs), tuple(inputs[0].shape) if inputs else None))
            rec.depth += 1

        return hook

    def post_hook(name):
        def hook(module, args, output):
            rec.depth -= 1
            entry = stack.pop()
            if entry is None:
                return
            outputs = _tensors(output)
            affine, reshape = transparent_module(module)
            index = rec.add("module", name, entry[1], outputs, affine, reshape)
            shapes[index] = (entry[2], tuple(outputs[0].shape) if outputs else None)

        return hook

    handles = []
    for name, m in leaves.items():
        handles.append(m.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
        handles.append(m.register_forward_hook(post_hook(name)))
    from .verify import inputs_must_fit, model_device, training_flags

    device = model_device(model)
    inputs = [t.to(device) for t in example_inputs]
    try:
        with torch.no_grad(), training_flags(model, False), inputs_must_fit(model, inputs), rec:
            for t in inputs:
                rec.add("input", "input", (), [t])
            out = model(*inputs)
            rec.add("output", "output", tuple(rec.source(t) for t in _tensors(out)), [])
    finally:
        for h in handles:
            h.remove()
    return tuple(rec.ops), shapes
