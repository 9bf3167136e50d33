"""What an ONNX fold walks across besides view ops: a multiply, add, subtract or divide by one constant number, and
the edges of an ``If`` / ``Loop`` / ``Scan`` body (``onnx_rules``' helpers).

A ``Mul`` / ``Add`` / ``Sub`` / ``Div`` by a constant of one element
(``x * c``, ``x + d``, ``x - d``, ``d - x``, ``x / c``) is an affine step
``a * x + s`` that stays in the graph while the BN folds through it
(``arithmetic.through_before`` / ``through_after``, as the module fold does
with ``graph.ops.affine_of``). An operand that is not a constant, holds more
than one element, or is not finite, and a division of a number by the value,
are not such steps, and say why.

A BN whose input comes into its subgraph from outside (a value of an
enclosing graph, a loop-carried value, a scan state or slice) has no layer in
its own graph to fold into; one whose output leaves its subgraph has none
after it there.
"""

from __future__ import annotations

import math
from typing import Any

from ..graph.onnxflow import OnnxFlow
from . import reasons
from .onnx_layers import matmul_under_add, not_constant

STEPS = ("Mul", "Add", "Sub", "Div")
VERBS = {"Mul": "multiplies by", "Add": "adds", "Sub": "subtracts", "Div": "divides by"}


def scalar_step(flow: OnnxFlow, node: int, value: Any = None) -> tuple[float, float, Any] | str | None:
    """``(a, s, x)`` when node ``node`` computes ``a * x + s`` of its input ``x`` (``value`` when given, else its one
    input that is not a constant) and a constant number; why not, when it is a ``Mul`` / ``Add`` / ``Sub`` / ``Div``
    that is not such a step; None for any other node (and for an ``Add`` / ``Sub`` of two computed tensors, a
    residual connection: the caller's own reason names it)."""
    op = flow.op(node)
    if op not in STEPS or (op == "Add" and matmul_under_add(flow, node) is not None):
        return None
    inputs = list(flow.nodes[node].inputs)
    name = flow.label(node)
    if len(inputs) != 2 or any(v is None for v in inputs):
        return reasons.stands_between(op)
    if value is None:
        computed = [v for v in inputs if flow.constant(v) is None]
        if len(computed) == 2 and sum(flow.producer(v) is not None for v in inputs) == 1:
            computed = [v for v in inputs if flow.producer(v) is not None]  # (the other: an input, say)
        if len(computed) == 2 and op in ("Mul", "Div"):
            return (f"`{name}` ({op}) combines `{inputs[0].name}` and `{inputs[1].name}`, two computed tensors; folding "
                    "carries a BN only through a multiply or add by a constant number")
        value = computed[0] if len(computed) == 1 else inputs[0]
    if sum(v is value for v in inputs) != 1:
        return f"`{name}` ({op}) reads the same tensor twice, which is not a multiply or add by a number"
    k = inputs.index(value)
    other = inputs[1 - k]
    array = flow.constant(other)
    if array is None:
        if op in ("Add", "Sub"):
            return None
        return (f"`{name}` {VERBS[op]} `{other.name}`, which is {not_constant(flow, other)}; folding carries a "
                "BN only through a multiply or add by a constant number")
    if array.size != 1:
        return (f"`{name}` {VERBS[op]} a constant of {array.size} elements (shape {list(array.shape)}), not one "
                "number; folding carries a BN only through a multiply or add by a constant number")
    number = float(array.reshape(-1)[0])
    rank = flow.rank(value)
    if array.ndim > 1 and (rank is None or array.ndim > rank):
        return f"`{name}` {VERBS[op]} a constant of rank {array.ndim}, which may change the rank of its input"
    if not math.isfinite(number):
        return f"`{name}` {VERBS[op]} {number}, which folding would spread into the layer"
    if op == "Div" and k == 1:
        return f"`{name}` divides a number by its input, which is not a multiply by a number"
    if op == "Div" and number == 0.0:
        return f"`{name}` divides by 0"
    a, s = {"Mul": (number, 0.0), "Add": (1.0, number), "Div": (1.0 / number if number else 0.0, 0.0),
            "Sub": (1.0, -number) if k == 0 else (-1.0, number)}[op]
    return a, s, value


def body(flow: OnnxFlow) -> str:
    """What the flow's graph is, in words: ``the Loop body `loop_3/body```."""
    holder = flow.parent.op(flow.route[-1][0]) if flow.parent is not None else "model"
    return f"the {holder} body `{flow.path}`" if flow.parent is not None else "the main graph"


def no_producer(flow: OnnxFlow, value: Any) -> str:
    """Why nothing in the flow's graph produces ``value`` for a BN to fold into."""
    if flow.parent is not None and value.name in flow.inputs:
        return (f"its input `{value.name}` is an input of {body(flow)} (a loop-carried value, a scan state or "
                "slice), so no layer in that graph produces what it normalizes")
    if flow.outer(value):
        return (f"its input `{value.name}` comes from outside {body(flow)}, so no layer in that graph produces what "
                "it normalizes (folding into a layer of another graph is not done)")
    if value.name in flow.inputs:
        return f"{reasons.GRAPH_INPUT} (`{value.name}`)"
    return "its input is a constant, with no layer producing it"


def leaves(flow: OnnxFlow) -> str:
    """Why a BN whose output is an output of the flow's graph has no layer after it."""
    return reasons.MODEL_OUTPUT if flow.parent is None else \
        f"its output is an output of {body(flow)}, with no layer after it there"
