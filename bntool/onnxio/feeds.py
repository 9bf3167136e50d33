"""Verification inputs for an ONNX graph: from its static shapes, from shapes given for its dynamic dimensions,
or as given.

Floating inputs are drawn from a seeded normal distribution; integer and
boolean inputs are zeros (indices and masks that are valid whatever the
graph). A dynamic dimension without a shape for it is one ``InputError``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from onnx import helper

from ..errors import InputError

#: largest verification input, in elements (a graph needing more is given a smaller shape by the caller)
MAX_ELEMENTS = 1 << 28


def graph_inputs(model: Any) -> list[Any]:
    """The graph's real inputs (an initializer listed as an input has a value already)."""
    initializers = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def make_feeds(model: Any, example_inputs: Sequence[Any] | Mapping[str, Any] | None = None,
               input_shapes: Sequence[Sequence[int]] | Mapping[str, Sequence[int]] | None = None,
               seed: int = 0) -> dict[str, np.ndarray]:
    """One array per graph input, by name."""
    inputs = graph_inputs(model)
    if example_inputs is not None:
        given = dict(example_inputs) if isinstance(example_inputs, Mapping) else \
            dict(zip([v.name for v in inputs], example_inputs))
        missing = [v.name for v in inputs if v.name not in given]
        if missing or len(given) != len(inputs):
            raise InputError(f"the graph takes {len(inputs)} input(s) ({', '.join(v.name for v in inputs)}); "
                             f"`example_inputs` gives {len(given)}; pass one array per graph input")
        return {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in given.items()}
    shapes = _shapes(inputs, input_shapes)
    rng = np.random.default_rng(seed)
    feeds = {}
    for value, shape in zip(inputs, shapes):
        elem = value.type.tensor_type.elem_type
        if not value.type.HasField("tensor_type") or elem == 0:
            raise InputError(f"graph input `{value.name}` is not a tensor of a known type; pass `example_inputs`")
        dtype = helper.tensor_dtype_to_np_dtype(elem)
        if math.prod(shape) > MAX_ELEMENTS:
            raise InputError(f"graph input `{value.name}` of shape {tuple(shape)} is too large to verify with; "
                             "pass a smaller shape with `input_shapes`")
        if np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16":
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[value.name] = np.zeros(shape, dtype)
    return feeds


def _shapes(inputs: list[Any], given: Any) -> list[tuple[int, ...]]:
    names = [v.name for v in inputs]
    if given is not None and not isinstance(given, Mapping):
        given = list(given)
        if len(given) != len(inputs):
            raise InputError(f"the graph takes {len(inputs)} input(s) ({', '.join(names)}); `input_shapes` gives "
                             f"{len(given)}; pass one shape per graph input")
        given = dict(zip(names, given))
    shapes = []
    for value in inputs:
        dims = value.type.tensor_type.shape.dim
        declared = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        if given and value.name in given:
            shape = tuple(int(d) for d in given[value.name])
            if len(shape) != len(declared) or any(d is not None and d != s for d, s in zip(declared, shape)):
                shown = tuple(d if d is not None else "?" for d in declared)
                raise InputError(f"`input_shapes` gives {shape} for graph input `{value.name}`, which is declared "
                                 f"{shown}; pass a shape that fits")
            shapes.append(shape)
            continue
        if any(d is None for d in declared):
            shown = ", ".join(str(d) if d is not None else (dims[k].dim_param or "?") for k, d in enumerate(declared))
            raise InputError(f"graph input `{value.name}` has dynamic dimensions ({shown}); pass its shape with "
                             "`input_shapes`")
        shapes.append(tuple(declared))
    return shapes
