"""The fold rules on a ``torch.export`` program's aten graph: which BN node folds into which layer, and why not.

The same rules as the module fold (``rules``), on the graph
``graph.program`` reads, with the same reasons (``reasons``):

* **backward** into the conv / transposed conv / linear whose output the BN
  normalizes, through multiplies / adds by numbers and reshapes that keep
  each channel within one BN channel, when nothing else reads the layer's
  output or anything in between (executorch#20601 folded one that had
  another reader);
* **forward** into the one conv (without zero padding) or linear that reads
  the BN's output, when backward is not possible;
* a linear folds only along its features: a BN on axis 1 of an (N, C, L)
  tensor does not fold into a linear over L (executorch#17736);
* a layer weight that other nodes read too (a layer called twice, a weight
  shared by two chains: pytorch/ao#2795) is not refused: each fold gets its
  own copy, and the other readers keep the original.

A program carries no module hooks and no Python forward: a BN subclass is
folded by what it exported (its ``aten`` batch-norm node; whatever it does
around it stays in the graph).
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Number

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from ..graph import program as pgraph
from ..graph.program import BnSite, ProgramGraph, constant
from ..graph.program_layers import Layer, layer_of
from ..report import Skip
from . import reasons
from .layers import same_channels
from .plan import FoldPair, FoldPlan

TRAINING = ("normalizes with each batch's statistics (the program was exported in train mode); export the model "
            "after `model.eval()`, or pass the eval-mode program")


@dataclass(frozen=True)
class ProgramFold:
    """One planned fold, with the nodes it touches (``ProgramPlan.links``)."""

    site: BnSite
    layer: Layer
    direction: str
    through: tuple[float, float]
    point: str = ""  # the original's node at whose output the fold is checked


@dataclass(frozen=True)
class ProgramPlan:
    plan: FoldPlan
    links: tuple[ProgramFold, ...]
    training: tuple[Skip, ...]  # BNs the program runs in train mode


def plan_program(program: ExportedProgram, rejected: dict[str, str] | None = None) -> ProgramPlan:
    """Which BN nodes of ``program`` fold into which layer, and why each other one does not."""
    pg = ProgramGraph(program)
    links: list[ProgramFold] = []
    skips: list[Skip] = []
    training: list[Skip] = []
    for site in pg.bn_sites():
        if rejected and site.name in rejected:
            skips.append(Skip(site.name, rejected[site.name]))
            continue
        result = _plan_site(pg, site)
        if isinstance(result, str):
            skips.append(Skip(site.name, result))
            if result == TRAINING:
                training.append(skips[-1])
        else:
            links.append(result)
    restored = {link.layer.node: link.site.output.name for link in links if link.direction == "backward"}
    links = [_at(link, restored) for link in links]
    pairs = tuple(FoldPair(link.site.name, link.layer.name, link.direction, "removed", _op_name(link.layer.node),
                           link.through) for link in links)
    return ProgramPlan(FoldPlan(pairs, tuple(skips), "torch.export"), tuple(links), tuple(training))


def _at(link: ProgramFold, restored: dict[Node, str]) -> ProgramFold:
    import dataclasses

    if link.direction == "backward":
        point = link.site.output.name
    else:
        point = restored.get(link.layer.node, link.layer.node.name)
    return dataclasses.replace(link, point=point)


def _op_name(node: Node) -> str:
    if not isinstance(node.target, torch._ops.OpOverload):
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target).replace("aten.", "").split(".")[0]


def _plan_site(pg: ProgramGraph, site: BnSite) -> ProgramFold | str:
    if site.running_mean is None or site.running_var is None:
        return reasons.NO_STATISTICS  # (normalizes with batch statistics in eval mode too: not a train-mode export)
    if site.training:
        return TRAINING
    for label, node in (("running mean", site.running_mean), ("running variance", site.running_var),
                        ("weight", site.weight), ("bias", site.bias)):
        if node is not None and constant(pg, node) is None:
            return (f"its {label} is computed in the forward from the inputs, not held by the program, so it is not "
                    "one number per channel that folding could take")
    if site.output is None:
        return "its normalized output is not read as one tensor"
    if site.extra_readers:
        return f"its saved statistics are read by `{site.extra_readers[0].name}`"
    if not site.output.meta.get("val", torch.empty(0)).is_floating_point():
        return "its output is not a floating-point tensor"
    backward = _backward(pg, site)
    if not isinstance(backward, str):
        return backward
    forward = _forward(pg, site)
    if not isinstance(forward, str):
        return forward
    return reasons.not_exact_either(backward, forward)


def _features(pg: ProgramGraph, site: BnSite) -> int:
    mean = constant(pg, site.running_mean)
    return int(mean.numel())


def _scalar(node: Node, current: Node) -> tuple[float, float] | None:
    """``(a, s)`` when ``node`` computes ``a * current + s`` with a number."""
    if node.target not in pgraph.SCALAR_OPS or len(node.args) < 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    first, second = node.args[0], node.args[1]
    commutes = node.target in (torch.ops.aten.mul.Tensor, torch.ops.aten.add.Tensor)
    if first is current and isinstance(second, Number) and not isinstance(second, bool):
        value = float(second)
    elif commutes and second is current and isinstance(first, Number) and not isinstance(first, bool):
        value = float(first)
    else:
        return None
    if node.target in (torch.ops.aten.div.Tensor, torch.ops.aten.div.Scalar) and value == 0.0:
        return None
    if len(node.args) > 2:
        return None
    return pgraph.SCALAR_OPS[node.target](value)


def _passes(node: Node, current: Node) -> bool:
    """A reshape (or copy) of ``current`` alone."""
    if node.target not in pgraph.RESHAPE_OPS or not node.args or node.args[0] is not current:
        return False
    if node.target == torch.ops.aten.dropout.default:
        return len(node.args) > 2 and node.args[2] is False
    return True


def _backward(pg: ProgramGraph, site: BnSite) -> ProgramFold | str:
    current, source = site.node, site.input
    a, s, reshaped = 1.0, 0.0, False
    while True:
        others = [u for u in source.users if u is not current and not pgraph.reads_shape_only(u, source)]
        if others:
            return reasons.also_read(_shown(pg, source), [_shown(pg, u) for u in others])
        if source.op == "placeholder":
            return reasons.GRAPH_INPUT if not pg.is_state(source) else (
                f"it normalizes a tensor the program holds (`{pg.fqn(source)}`), which no layer produces")
        layer = layer_of(pg, source)
        if layer is not None:
            break
        step = _scalar(source, source.args[0]) if source.args and isinstance(source.args[0], Node) else None
        if step is None and source.args and len(source.args) > 1 and isinstance(source.args[1], Node):
            step = _scalar(source, source.args[1])
        if step is not None:
            a, s = a * step[0], a * step[1] + s
            current, source = source, next(x for x in source.args if isinstance(x, Node))
            continue
        if source.args and isinstance(source.args[0], Node) and _passes(source, source.args[0]):
            reshaped = reshaped or source.target not in (torch.ops.aten.clone.default, torch.ops.aten.alias.default)
            current, source = source, source.args[0]
            continue
        if source.op == "call_function" and layer_of(pg, source) is None and _op_name(source) in (
                "conv1d", "conv2d", "conv3d", "convolution", "linear", "addmm", "mm", "conv_transpose1d",
                "conv_transpose2d", "conv_transpose3d"):
            return (f"its input comes from a `{_op_name(source)}` whose weight or bias is computed in the forward "
                    "rather than held by the program, so folding into it would not be exact")
        return reasons.stands_between(_shown(pg, source))
    if a == 0.0:
        return reasons.multiplied_by_zero(layer.name)
    reason = _channels(pg, site, layer, layer.node, reshaped, backward=True)
    return reason or ProgramFold(site, layer, "backward", (a, s))


def _forward(pg: ProgramGraph, site: BnSite) -> ProgramFold | str:
    current = site.output
    a, s, reshaped = 1.0, 0.0, False
    while True:
        readers = [u for u in current.users if not pgraph.reads_shape_only(u, current)]
        if len(readers) != 1:
            return reasons.read_by([_shown(pg, r) for r in readers])
        reader = readers[0]
        if reader.op == "output":
            return reasons.MODEL_OUTPUT
        layer = layer_of(pg, reader)
        if layer is not None:
            inputs = [x for x in reader.all_input_nodes if x is current]
            if reader.args[layer.data_index] is not current or len(inputs) != 1:
                return reasons.reads_others(layer.name)
            break
        step = _scalar(reader, current)
        if step is not None:
            a, s = step[0] * a, step[0] * s + step[1]
        elif _passes(reader, current):
            reshaped = reshaped or reader.target not in (torch.ops.aten.clone.default, torch.ops.aten.alias.default)
        else:
            return reasons.goes_through(_shown(pg, reader))
        current = reader
    if layer.kind == "transposed":
        return reasons.transposed_forward(layer.name)
    reason = _channels(pg, site, layer, current, reshaped, backward=False)
    if reason:
        return reason
    if layer.kind == "conv" and _pads(layer):
        return reasons.zero_pads(layer.name)
    return ProgramFold(site, layer, "forward", (a, s))


def _pads(layer: Layer) -> bool:
    if isinstance(layer.padding, str):
        kernel = layer.weight.meta["val"].shape[2:]
        return layer.padding != "valid" and any(int(k) > 1 for k in kernel)
    return any(p != 0 for p in layer.padding)


def _channels(pg: ProgramGraph, site: BnSite, layer: Layer, near: Node, reshaped: bool, *, backward: bool) -> str | None:
    """The layer's channel axis must be the BN's axis 1, element for element (or the BN has one channel).
    ``near``: the layer's node (backward) or the tensor the layer reads (forward)."""
    features = _features(pg, site)
    weight = pg.tensor(layer.weight)
    if layer.kind == "transposed":
        channels = weight.shape[1] * layer.groups if backward else weight.shape[0]
    elif layer.kind == "conv":
        channels = weight.shape[0] if backward else weight.shape[1] * layer.groups
    else:
        channels = weight.shape[layer.out_axis if backward else 1 - layer.out_axis]
    if features == 1:
        return None
    bn_rank = pgraph.rank(site.input)
    if layer.kind != "linear" and not reshaped:
        if channels != features:
            return reasons.channels_differ(layer.name, channels, "output" if backward else "input", features)
        return None
    if layer.kind == "linear" and not reshaped:
        if bn_rank == 2 and channels == features:
            return None
        if bn_rank == 2:
            return reasons.channels_differ(layer.name, channels, "output" if backward else "input", features)
        return reasons.linear_axis(bn_rank or 0)
    bn_shape = pgraph.symbolic_shape(site.input)
    layer_shape = pgraph.symbolic_shape(near)
    if bn_shape is None or layer_shape is None or not isinstance(bn_shape[1], int) or not all(
            isinstance(d, int) for d in layer_shape[(len(layer_shape) - 1 if layer.kind == "linear" else 1):]):
        return ("a reshape stands between it and the layer, and the shapes on either side are not static, so "
                "bntool cannot tell whether it keeps each channel whole")
    axis = len(layer_shape) - 1 if layer.kind == "linear" else 1
    if same_channels(layer_shape, axis, bn_shape):
        return None
    return reasons.reshape_channels(layer.name)


def _shown(pg: ProgramGraph, node: Node) -> str:
    """A node as the user knows it: a layer's name, a BN's module, else the aten op and node name."""
    layer = layer_of(pg, node)
    if layer is not None:
        return pg.layer_name(node)
    if node.op == "output":
        return "the program's output"
    if node.op != "call_function":
        return node.name
    return f"{_op_name(node)} ({node.name})"
