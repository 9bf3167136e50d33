"""Whether an ONNX graph's values fit in memory before fold verification runs it (``fits_in_memory``)."""

from __future__ import annotations

import math

import onnx_ir as ir

from ..errors import InputError
from ..graph.onnxflow import OnnxFlow
from ..runtime.shapes import available_memory

__all__ = ["fits_in_memory"]


def fits_in_memory(flow: OnnxFlow) -> None:
    """Refuse, before anything runs, a graph one of whose values (by its inferred shape) would not fit in memory."""
    available = available_memory()
    if available is None:
        return
    for graph, node in [(g, n) for g in flow.flows() for n in g.nodes]:  # (the bodies too)
        for value in node.outputs:
            shape = flow.shape(value)
            if shape is None or any(d is None for d in shape) or value.dtype in (None, ir.DataType.UNDEFINED,
                                                                                  ir.DataType.STRING):
                continue
            size = math.prod(shape) * max(1, value.dtype.itemsize)
            if size > available // 2:
                raise InputError(f"`{value.name}` (made by `{graph.label(graph.index[id(node)])}`) would take "
                                 f"{size / 2**30:.1f} GiB, more than half the memory available "
                                 f"({available / 2**30:.1f} "
                                 "GiB); bntool verifies a fold by running the graph, so it cannot fold this one here")
