"""The conv / transposed conv / linear layers of a ``torch.export`` program's aten graph (``graph.program``).

A layer is a node whose weight is a tensor of the program: ``aten.conv*``,
``aten.convolution``, ``aten.conv_transpose*``, ``aten.linear``, and
``aten.addmm`` / ``mm`` / ``bmm`` on a weight reached through a transpose
(and, for ``bmm``, an expand over the batch), as the decomposed IR writes a
Linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

aten = torch.ops.aten

CONV_OPS = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3,
            aten.conv1d.padding: 1, aten.conv2d.padding: 2, aten.conv3d.padding: 3}
CONV_TRANSPOSE_OPS = {aten.conv_transpose1d.default: 1, aten.conv_transpose2d.input: 2, aten.conv_transpose3d.input: 3}
CONVOLUTION_OPS = {aten.convolution.default, aten._convolution.default}


@dataclass(frozen=True)
class Layer:
    """A conv, transposed conv or linear node whose weight is a tensor of the program.

    ``weight`` is the placeholder; ``weight_path`` the nodes from it to the
    layer, placeholder side first (a ``permute`` for ``addmm``; for a ``bmm``
    also the expand over the batch); ``out_axis``: the weight's axis of
    output features (0 for conv and linear weights, 1 for an ``mm`` on an
    unpermuted ``(in, out)`` matrix); ``bias_index``: where the layer takes
    its bias (``None``: an ``mm`` / ``bmm``, which has none).
    """

    node: Node
    name: str
    kind: str  # "conv", "transposed", "linear"
    weight: Node
    weight_path: tuple[Node, ...]
    bias: Node | None
    bias_index: int | None
    groups: int
    out_axis: int
    padding: tuple[int, ...] | str = ()
    data_index: int = 0



def layer_of(pg, node: Node) -> Layer | None:
    """The conv / linear ``node`` computes with a weight of the program, or ``None``."""
    if node.op != "call_function":
        return None
    target, args, kw = node.target, list(node.args), node.kwargs
    arg = lambda i, key, default=None: args[i] if i < len(args) else kw.get(key, default)
    if target in CONV_OPS:
        groups = arg(6, "groups", 1)
        return _layer(pg, node, "conv", arg(1, "weight"), (), arg(2, "bias"), 2, groups, 0, arg(4, "padding", 0))
    if target in CONV_TRANSPOSE_OPS:
        return _layer(pg, node, "transposed", arg(1, "weight"), (), arg(2, "bias"), 2, arg(6, "groups", 1), 1)
    if target in CONVOLUTION_OPS:
        transposed = bool(args[6])
        return _layer(pg, node, "transposed" if transposed else "conv", args[1], (), args[2], 2, args[8],
                      1 if transposed else 0, args[4])
    if target == aten.linear.default:
        return _layer(pg, node, "linear", arg(1, "weight"), (), arg(2, "bias"), 2, 1, 0)
    if target in (aten.addmm.default, aten.mm.default, aten.bmm.default):
        if target == aten.addmm.default and (kw.get("beta", 1) != 1 or kw.get("alpha", 1) != 1):
            return None
        matrix = args[2] if target == aten.addmm.default else args[1]
        found = _matrix_path(matrix, batched=target == aten.bmm.default)
        if found is None:
            return None
        weight, path, out_axis = found
        bias = args[0] if target == aten.addmm.default else None
        return _layer(pg, node, "linear", weight, path, bias, 0 if bias is not None else None, 1, out_axis,
                      data_index=1 if target == aten.addmm.default else 0)
    return None


def _matrix_path(matrix: object, *, batched: bool) -> tuple[Node, tuple[Node, ...], int] | None:
    """The weight behind an ``mm`` / ``bmm`` operand, the nodes from it to the layer (placeholder side first: a
    transpose, and for ``bmm`` the expand over the batch and its views), and the weight's output axis."""
    path: list[Node] = []
    transposes = 0
    while isinstance(matrix, Node) and matrix.op == "call_function":
        if _is_transpose(matrix):
            transposes += 1
        elif not (batched and matrix.target in (aten.expand.default, aten.view.default, aten._unsafe_view.default,
                                                 aten.reshape.default) and _keeps_matrix(matrix)):
            return None
        path.insert(0, matrix)
        matrix = matrix.args[0]
    if not isinstance(matrix, Node) or transposes > 1:
        return None
    return matrix, tuple(path), 0 if transposes else 1


def _keeps_matrix(node: Node) -> bool:
    """An expand / view that only adds or merges leading (batch) axes of one matrix: its last two sizes kept and
    its input a 2-D matrix broadcast, or a tensor already of that shape."""
    source, out = node.args[0].meta.get("val"), node.meta.get("val")
    if not isinstance(source, torch.Tensor) or not isinstance(out, torch.Tensor) or out.dim() < 2:
        return False
    if tuple(source.shape[-2:]) != tuple(out.shape[-2:]):
        return False
    if node.target == aten.expand.default:
        return source.dim() == 2
    return all(int(d) == 1 for d in source.shape[:-2]) or tuple(source.shape) == tuple(out.shape)


def _is_transpose(node: Node) -> bool:
    if node.target == aten.t.default:
        return True
    if node.target == aten.permute.default:
        return list(node.args[1]) in ([1, 0], [-1, -2], [1, -2], [-1, 0])
    if node.target == aten.transpose.int:
        rank = node.args[0].meta["val"].dim() if isinstance(node.args[0], Node) and "val" in node.args[0].meta else 2
        return rank == 2 and {int(node.args[1]) % 2, int(node.args[2]) % 2} == {0, 1}
    return False


def _layer(pg, node, kind, weight, path, bias, bias_index, groups, out_axis, padding=0, data_index=0) -> Layer | None:
    if not pg.is_state(weight) or (bias is not None and not pg.is_state(bias)):
        return None
    if kind == "linear" and pg.tensor(weight).dim() != 2:
        return None
    if isinstance(padding, int):
        padding = (padding,)
    name = pg.fqn(weight).rsplit(".", 1)[0] if "." in pg.fqn(weight) else pg.fqn(weight)
    return Layer(node, name, kind, weight, path, bias, bias_index, int(groups), out_axis,
                 padding if isinstance(padding, str) else tuple(int(p) for p in padding), data_index)
