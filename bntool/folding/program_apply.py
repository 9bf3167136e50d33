"""A planned program fold applied to a NEW ``ExportedProgram``: graph, signature, state dict and constants.

For each layer that takes folds, the new weight and bias come from the one
fold arithmetic (``arithmetic``: scale and shift in float64, weights rounded
once). A weight or bias that only this layer reads is replaced under its own
name; one that other nodes read too (a layer called twice, a weight shared
by two chains) gets a new tensor, a new placeholder and a new input spec,
so the other readers keep the original. A layer without a bias gets one (an
``mm`` becomes an ``addmm``). Each folded BN node goes, its readers read its
input instead, and the placeholders nothing reads any more leave the graph,
the signature and the state dict together. The original program is not
changed; range constraints (dynamic shapes), the module call graph and the
example inputs carry over.
"""

from __future__ import annotations

import copy
import operator
import warnings

import torch
from torch import nn
from torch._guards import detect_fake_mode
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, OutputSpec, TensorArgument
from torch.fx import Node

from ..graph.program import ProgramGraph, constant
from .arithmetic import bn_scale_shift, scale_consumer, scale_producer, through_after, through_before
from .program import ProgramFold

_KIND_ORDER = [InputKind.TOKEN, InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR,
               InputKind.CUSTOM_OBJ, InputKind.USER_INPUT]


def apply_program(program: ExportedProgram, links: tuple[ProgramFold, ...]) -> tuple[ExportedProgram, dict[str, str]]:
    """The folded program, and the new name of every node the fold renamed (an ``mm`` that became ``addmm``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (torch's own pytree deprecation notes, on copying)
        return _apply(program, links)


def _apply(program: ExportedProgram, links: tuple[ProgramFold, ...]) -> tuple[ExportedProgram, dict[str, str]]:
    pg = ProgramGraph(program)
    gm = copy.deepcopy(program.graph_module)
    graph = gm.graph
    for old, new in zip(program.graph.nodes, graph.nodes):  # (a copy renames nodes that shadow builtins: `input`)
        if new.name != old.name:
            new.name = old.name
    nodes = {n.name: n for n in graph.nodes}
    specs = {s.arg.name: s for s in program.graph_signature.input_specs if hasattr(s.arg, "name")}
    state = dict(program.state_dict)
    constants = dict(program.constants)
    fake = detect_fake_mode([n.meta.get("val") for n in graph.nodes if n.op == "placeholder"])
    renamed: dict[str, str] = {}
    new_specs: dict[str, InputSpec] = {}

    by_layer: dict[Node, list[ProgramFold]] = {}
    for link in links:
        by_layer.setdefault(link.layer.node, []).append(link)
    for old_node, folds in by_layer.items():
        layer = folds[0].layer
        weight, bias = _fold_values(pg, layer, folds)
        node = nodes[old_node.name]
        weight_node = nodes[layer.weight.name]
        spec = specs[weight_node.name]
        sole = _sole_reader(weight_node, node)
        if sole:
            _store(spec, weight, state, constants, like=pg.tensor(layer.weight))
        else:
            placeholder = _new_placeholder(graph, spec, f"{spec.target}_folded", weight, fake, state, constants,
                                           new_specs, like=pg.tensor(layer.weight), specs=specs)
            _rewire_weight(graph, node, weight_node, placeholder, layer)
        if layer.bias is not None and _sole_reader(nodes[layer.bias.name], node):
            _store(specs[layer.bias.name], bias, state, constants, like=pg.tensor(layer.bias))
        else:
            base = specs[layer.bias.name].target if layer.bias is not None else f"{layer.name}.bias"
            placeholder = _new_placeholder(graph, spec, f"{base}_folded" if base in state or base in constants
                                           else base, bias, fake, state, constants, new_specs,
                                           like=pg.tensor(layer.bias) if layer.bias is not None else None,
                                           specs=specs)
            new = _set_bias(graph, node, placeholder, layer)
            if new is not node:
                renamed[node.name] = new.name
                nodes[node.name] = new
    touched: set[Node] = set()
    for link in links:
        bn = nodes[link.site.node.name]
        output = nodes[link.site.output.name]
        output.replace_all_uses_with(nodes[link.site.input.name])
        touched |= set(bn.all_input_nodes)
        for user in list(bn.users):
            if user.target is operator.getitem and not user.users:
                graph.erase_node(user)
        if not bn.users:
            graph.erase_node(bn)
    removed = _erase_dead(graph, touched, specs, program)
    for name in removed:
        spec = specs.get(name) or new_specs.get(name)
        if spec is not None and spec.target is not None:
            (constants if spec.target in constants and spec.target not in state else state).pop(spec.target, None)
    signature = _signature(graph, specs, new_specs, program)
    gm.recompile()
    calls = copy.deepcopy(program._module_call_graph)
    _rename_outputs(calls, program, signature)
    folded = ExportedProgram(root=gm, graph=graph, graph_signature=signature, state_dict=state,
                             range_constraints=copy.deepcopy(program.range_constraints), module_call_graph=calls,
                             example_inputs=program.example_inputs, constants=constants, verifiers=program.verifiers)
    return folded, renamed


def _fold_values(pg: ProgramGraph, layer, folds: list[ProgramFold]) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's new weight and bias: forward folds (its input side) first, then the backward one."""
    weight = pg.tensor(layer.weight).detach()
    bias = pg.tensor(layer.bias).detach() if layer.bias is not None else None
    flip = layer.kind == "linear" and layer.out_axis == 1  # an mm's (in, out) matrix
    if flip:
        weight = weight.t()
    for fold in sorted(folds, key=lambda f: f.direction != "forward"):
        site = fold.site
        k, c = bn_scale_shift(constant(pg, site.running_mean), constant(pg, site.running_var), site.eps,
                              constant(pg, site.weight), constant(pg, site.bias))
        channels = _channels(weight, layer, backward=fold.direction == "backward")
        if k.numel() != channels:  # one BN channel, or each a block of the layer's channels (across a reshape)
            k, c = k.repeat_interleave(channels // k.numel()), c.repeat_interleave(channels // c.numel())
        if fold.direction == "backward":
            k, c = through_before(k, c, *fold.through)
            weight, bias = scale_producer(weight, bias, k, c, transposed=layer.kind == "transposed",
                                          groups=layer.groups)
        else:
            k, c = through_after(k, c, *fold.through)
            weight, bias = scale_consumer(weight, bias, k, c, groups=layer.groups)
    if flip:
        weight = weight.t().contiguous()
    return weight.contiguous(), bias


def _channels(weight: torch.Tensor, layer, *, backward: bool) -> int:
    """The layer's output (``backward``) or input channels, from a weight with output channels first."""
    if layer.kind == "transposed":
        return weight.shape[1] * layer.groups if backward else weight.shape[0]
    if layer.kind == "conv":
        return weight.shape[0] if backward else weight.shape[1] * layer.groups
    return weight.shape[0] if backward else weight.shape[1]


def _sole_reader(placeholder: Node, node: Node) -> bool:
    """Only ``node`` reads ``placeholder``, directly or through a chain of nodes each read by the next alone."""
    current = placeholder
    while current is not node:
        users = list(current.users)
        if len(users) != 1:
            return False
        current = users[0]
    return True


def _store(spec: InputSpec, value: torch.Tensor, state: dict, constants: dict, like: torch.Tensor | None) -> None:
    table = state if spec.target in state else constants
    table[spec.target] = _as_kind(spec, value, like)


def _as_kind(spec: InputSpec, value: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor:
    if spec.kind == InputKind.PARAMETER:
        requires_grad = like.requires_grad if like is not None else True
        return nn.Parameter(value.detach().clone(), requires_grad=requires_grad)
    return value.detach().clone()


def _new_placeholder(graph, like_spec: InputSpec, target: str, value: torch.Tensor, fake, state: dict,
                     constants: dict, new_specs: dict, like: torch.Tensor | None, specs: dict) -> Node:
    """A placeholder for a new tensor of ``like_spec``'s kind, placed with the placeholders of that kind."""
    base, n = target, 1
    while target in state or target in constants:
        n += 1
        target = f"{base}{n}"
    kind = like_spec.kind
    anchor = [p for p in graph.nodes if p.op == "placeholder"
              and _KIND_ORDER.index(getattr(new_specs.get(p.name) or specs.get(p.name), "kind", InputKind.USER_INPUT)) <= _KIND_ORDER.index(kind)]
    prefix = {InputKind.PARAMETER: "p_", InputKind.BUFFER: "b_", InputKind.CONSTANT_TENSOR: "c_"}[kind]
    name = prefix + target.replace(".", "_")
    if anchor:
        with graph.inserting_after(anchor[-1]):
            node = graph.placeholder(name)
    else:
        with graph.inserting_before(next(iter(graph.nodes))):
            node = graph.placeholder(name)
    tensor = _as_kind(like_spec, value, like)
    node.meta["val"] = fake.from_tensor(tensor, static_shapes=True) if fake is not None else tensor
    persistent = like_spec.persistent if kind == InputKind.BUFFER else None
    new_specs[node.name] = InputSpec(kind, TensorArgument(node.name), target, persistent)
    if kind == InputKind.CONSTANT_TENSOR or (kind == InputKind.BUFFER and not persistent):
        constants[target] = tensor
    else:
        state[target] = tensor
    return node


def _rewire_weight(graph, node: Node, old: Node, placeholder: Node, layer) -> None:
    """``node`` reads ``placeholder`` instead of ``old`` (through copies of the nodes between: a permute, an
    expand)."""
    if not layer.weight_path:
        node.replace_input_with(old, placeholder)
        return
    names = {n.name for n in layer.weight_path}
    path = [n for n in graph.nodes if n.name in names]  # (the copy's nodes, in graph order: placeholder side first)
    previous = placeholder
    with graph.inserting_before(node):
        for step in path:
            copied = graph.call_function(step.target, (previous, *step.args[1:]), dict(step.kwargs))
            copied.meta = dict(step.meta)
            previous = copied
    node.replace_input_with(path[-1], previous)


def _set_bias(graph, node: Node, bias: Node, layer) -> Node:
    """``node`` with ``bias`` as its bias; an ``mm`` is replaced by the ``addmm`` that adds it."""
    if layer.bias_index is None:  # mm(x, W) -> addmm(b, x, W); bmm(x, W) -> bmm(x, W) + b
        with graph.inserting_after(node):
            if node.target == torch.ops.aten.mm.default:
                new = graph.call_function(torch.ops.aten.addmm.default, (bias, node.args[0], node.args[1]))
            else:
                new = graph.call_function(torch.ops.aten.add.Tensor, (node, bias))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        if new.target == torch.ops.aten.addmm.default:
            graph.erase_node(node)
        return new
    if "bias" in node.kwargs:
        node.update_kwarg("bias", bias)
        return node
    args = list(node.args)
    while len(args) <= layer.bias_index:
        args.append(None)
    args[layer.bias_index] = bias
    node.args = tuple(args)
    return node


def _erase_dead(graph, nodes: set[Node], specs: dict, program: ExportedProgram) -> list[str]:
    """Erase the nodes among ``nodes`` (and their inputs) that nothing reads, and the unread state placeholders of
    the same modules (a folded BN's ``num_batches_tracked``). The erased placeholders' names."""
    mutated = set(program.graph_signature.buffers_to_mutate.values())
    removed: list[str] = []
    owners: set[str] = set()
    pending = list(nodes)
    while pending:
        node = pending.pop()
        if node.graph is not graph or node.users or node.op == "output":
            continue
        if node.op == "placeholder":
            spec = specs.get(node.name)
            if spec is None or spec.kind == InputKind.USER_INPUT or spec.target in mutated:
                continue
            owners.add(spec.target.rsplit(".", 1)[0] if "." in spec.target else "")
        elif node.op != "call_function" or getattr(node.target, "_schema", None) is None \
                or node.target._schema.is_mutable:
            continue
        inputs = node.all_input_nodes
        if node.op == "placeholder":
            removed.append(node.name)
        graph.erase_node(node)
        pending.extend(inputs)
    for node in [n for n in graph.nodes if n.op == "placeholder" and not n.users]:
        spec = specs.get(node.name)
        if spec is not None and spec.kind != InputKind.USER_INPUT and spec.target not in mutated and (
                spec.target.rsplit(".", 1)[0] if "." in spec.target else "") in owners \
                and spec.target.endswith("num_batches_tracked"):
            removed.append(node.name)
            graph.erase_node(node)
    return removed


def _signature(graph, specs: dict, new_specs: dict, program: ExportedProgram) -> ExportGraphSignature:
    inputs = [specs.get(n.name) or new_specs[n.name] for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    values = output.args[0]
    outputs = []
    for spec, value in zip(program.graph_signature.output_specs, values):
        arg = TensorArgument(value.name) if isinstance(value, Node) and isinstance(spec.arg, TensorArgument) else spec.arg
        outputs.append(OutputSpec(spec.kind, arg, spec.target))
    return ExportGraphSignature(inputs, outputs)


def _rename_outputs(calls, program: ExportedProgram, signature: ExportGraphSignature) -> None:
    """The module call graph names the root's outputs by node: follow the nodes the fold replaced."""
    before = [getattr(s.arg, "name", None) for s in program.graph_signature.output_specs]
    after = [getattr(s.arg, "name", None) for s in signature.output_specs]
    mapping = {b: a for b, a in zip(before, after) if b != a}
    for entry in calls:
        if entry.fqn == "" and entry.signature is not None:
            for arg in entry.signature.outputs:
                if isinstance(arg, TensorArgument) and arg.name in mapping:
                    arg.name = mapping[arg.name]
