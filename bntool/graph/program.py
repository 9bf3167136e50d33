"""A ``torch.export`` program's aten graph as data: its BatchNorm nodes, its conv / linear layers, its tensors.

An ``ExportedProgram`` holds its weights outside its graph: each parameter,
buffer and lifted constant is a placeholder named in the graph signature.
``ProgramGraph`` reads that graph in either of torch.export's IRs (the
default one, with ``aten.batch_norm`` / ``aten.conv2d`` / ``aten.linear``,
and the decomposed one, with ``_native_batch_norm_legit_no_training`` /
``aten.convolution`` / ``aten.addmm`` on a permuted weight) into
``BnSite`` s and ``Layer`` s; the fold rules read those (``folding.program``).
Nothing here changes the program.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from numbers import Number

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.fx import Node

from .program_layers import layer_of

aten = torch.ops.aten

#: BN targets -> (index of ``training`` in args or None, whether the op returns a tuple (output at item 0),
#: index of ``eps``). An op without a ``training`` argument says its mode by its name.
BN_OPS: dict = {
    aten.batch_norm.default: (5, False, 7),
    aten._native_batch_norm_legit_no_training.default: (None, True, 6),
    aten._native_batch_norm_legit_functional.default: (5, True, 7),
    aten._native_batch_norm_legit.default: (5, True, 7),
    aten.native_batch_norm.default: (5, True, 7),
    aten._batch_norm_no_update.default: (None, True, 6),
    aten.cudnn_batch_norm.default: (5, True, 7),
    aten.miopen_batch_norm.default: (5, True, 7),
}
#: ops that normalize with the batch's statistics whatever their arguments say
TRAINING_BN_OPS = {aten._batch_norm_with_update.default, aten._native_batch_norm_legit.no_stats}

#: ops that pass a tensor on unchanged but for its shape (a reshape keeps row-major order)
RESHAPE_OPS = {aten.view.default, aten.reshape.default, aten.reshape_as.default, aten.view_as.default, aten._unsafe_view.default, aten.flatten.using_ints,
               aten.unflatten.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
               aten.alias.default, aten.clone.default, aten.contiguous.default, aten.dropout.default,
               aten.detach.default, aten.view_copy.default, aten.alias_copy.default}
#: ops that read only a tensor's shape (or dtype) from the given argument positions: a fold changes no reader here
SHAPE_READERS = {aten.sym_size.int: (0,), aten.sym_stride.int: (0,), aten.sym_numel.default: (0,),
                 aten.sym_storage_offset.default: (0,), aten.reshape_as.default: (1,), aten.view_as.default: (1,),
                 aten.expand_as.default: (1,), aten.type_as.default: (1,), aten.empty_like.default: (0,),
                 aten.zeros_like.default: (0,), aten.ones_like.default: (0,)}
#: ``x -> a * x + s`` with a number: target -> (a, s) given the number
SCALAR_OPS = {
    aten.mul.Tensor: lambda v: (v, 0.0), aten.mul.Scalar: lambda v: (v, 0.0),
    aten.div.Tensor: lambda v: (1.0 / v, 0.0), aten.div.Scalar: lambda v: (1.0 / v, 0.0),
    aten.add.Tensor: lambda v: (1.0, v), aten.add.Scalar: lambda v: (1.0, v),
    aten.sub.Tensor: lambda v: (1.0, -v), aten.sub.Scalar: lambda v: (1.0, -v),
}
STATE_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


@dataclass(frozen=True)
class BnSite:
    """One BatchNorm node: its input, the node carrying its output, its tensors' nodes, eps and mode."""

    name: str
    node: Node
    output: Node | None  # the node whose value is the normalized tensor (None: item 0 is never read)
    input: Node
    weight: Node | None
    bias: Node | None
    running_mean: Node | None
    running_var: Node | None
    eps: float
    training: bool
    extra_readers: tuple[Node, ...] = ()  # readers of the op's other results (saved mean / rstd)


class ProgramGraph:
    """The program's placeholders by role, its BN nodes and its layers."""

    def __init__(self, program: ExportedProgram):
        self.program = program
        self.graph = program.graph
        self.specs = {spec.arg.name: spec for spec in program.graph_signature.input_specs
                      if hasattr(spec.arg, "name")}
        self.mutated = set(program.graph_signature.buffers_to_mutate.values())
        self.nodes = {n.name: n for n in self.graph.nodes}
        owners: dict[str, list[Node]] = {}
        for node in self.graph.nodes:
            layer = layer_of(self, node)
            if layer is not None:
                owners.setdefault(layer.name, []).append(node)
        self._layer_names = {n: (f"{name}@{n.name}" if len(nodes) > 1 else name)
                             for name, nodes in owners.items() for n in nodes}

    # ----------------------------------------------------------------- tensors of the program

    def fqn(self, node: Node) -> str | None:
        """The state-dict / constants name of a parameter, buffer or constant placeholder."""
        spec = self.specs.get(node.name) if node.op == "placeholder" else None
        return spec.target if spec is not None and spec.kind in STATE_KINDS else None

    def tensor(self, node: Node | None) -> torch.Tensor | None:
        """The value of a state placeholder (or ``None`` for ``None``)."""
        if node is None:
            return None
        spec = self.specs[node.name]
        table = self.program.constants if spec.kind == InputKind.CONSTANT_TENSOR or (
            spec.kind == InputKind.BUFFER and not spec.persistent) else self.program.state_dict
        return table[spec.target]

    def is_state(self, node: object) -> bool:
        return isinstance(node, Node) and self.fqn(node) is not None and self.fqn(node) not in self.mutated

    # ----------------------------------------------------------------- BN nodes

    def bn_sites(self) -> list[BnSite]:
        sites = [bn_site(self, n) for n in self.graph.nodes if n.op == "call_function"
                 and (n.target in BN_OPS or n.target in TRAINING_BN_OPS)]
        names: dict[str, int] = {}
        for site in sites:
            names[site.name] = names.get(site.name, 0) + 1
        return [site if names[site.name] == 1 else _renamed(site, f"{site.name}@{site.node.name}") for site in sites]

    def layer_name(self, node: Node) -> str:
        return self._layer_names.get(node, node.name)


def constant(pg: ProgramGraph, node: object, depth: int = 0) -> torch.Tensor | Number | None:
    """The value of ``node`` when it depends on the program's tensors alone (computed here), else ``None``."""
    if not isinstance(node, Node):
        return node if node is None or isinstance(node, (Number, torch.Tensor, str, torch.dtype)) else None
    if pg.is_state(node):
        return pg.tensor(node)
    if node.op != "call_function" or depth > 16 or not isinstance(node.target, torch._ops.OpOverload):
        return None
    if node.target._schema.is_mutable:
        return None
    args = [constant(pg, a, depth + 1) for a in node.args]
    if any(a is None and b is not None for a, b in zip(args, node.args)):
        return None
    if any(isinstance(a, (list, tuple)) and any(isinstance(x, Node) for x in a) for a in node.args):
        return None
    with torch.no_grad():
        value = node.target(*args, **node.kwargs)
    return value if isinstance(value, torch.Tensor) else None


def _renamed(site: BnSite, name: str) -> BnSite:
    import dataclasses

    return dataclasses.replace(site, name=name)


def bn_site(pg: ProgramGraph, node: Node) -> BnSite:
    """What one BN node reads and where its output goes."""
    args = list(node.args)
    if node.target in TRAINING_BN_OPS:
        training_index, returns_tuple, eps_index = None, True, None
    else:
        training_index, returns_tuple, eps_index = BN_OPS[node.target]
    arg = lambda i: args[i] if i < len(args) else None
    training = node.target in TRAINING_BN_OPS or (training_index is not None and bool(arg(training_index)))
    eps = float(arg(eps_index)) if eps_index is not None and arg(eps_index) is not None else 1e-5
    output, extra = node, ()
    if returns_tuple:
        items = [u for u in node.users if u.target is operator.getitem]
        firsts = [u for u in items if u.args[1] == 0]
        output = firsts[0] if len(firsts) == 1 else None
        extra = tuple(u for u in node.users if u not in firsts and len(u.users) > 0)
    mean, var = (arg(3), arg(4)) if node.target is not aten._native_batch_norm_legit.no_stats else (None, None)
    return BnSite(module_name(pg, node, mean), node, output, args[0], arg(1), arg(2), mean, var, eps, training, extra)


def module_name(pg: ProgramGraph, node: Node, mean: object) -> str:
    """The BN's module, named as in the exported model: the owner of its running mean, else its module stack."""
    if isinstance(mean, Node) and pg.fqn(mean):
        return pg.fqn(mean).rsplit(".", 1)[0] if "." in pg.fqn(mean) else ""  # (the model itself is a BN)
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        return path.replace("L['self'].", "").replace("L__self___", "") or node.name
    return node.name


def reads_shape_only(reader: Node, node: Node) -> bool:
    """``reader`` reads ``node`` only for its shape or dtype (``reshape_as(y, node)``, ``sym_size(node, 0)``)."""
    positions = SHAPE_READERS.get(reader.target)
    if positions is None:
        return False
    return all(i in positions for i, a in enumerate(reader.args) if a is node) and node not in reader.kwargs.values()


def static_shape(node: object) -> tuple[int, ...] | None:
    """The node's tensor shape when every size is a plain number."""
    val = node.meta.get("val") if isinstance(node, Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(val.shape) if all(isinstance(s, int) for s in val.shape) else None


def symbolic_shape(node: object) -> tuple | None:
    """The node's tensor shape, a dynamic size as its sympy expression (``s0``): two sizes written alike are equal
    for every size the program accepts."""
    val = node.meta.get("val") if isinstance(node, Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(s if isinstance(s, int) else s.node.expr for s in val.shape)


def rank(node: object) -> int | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None
