"""The initializers ``onnx_apply`` rewrites: in place where only the folded layer reads them, else a copy of its own
in the layer's graph; and the graphs of a model along a subgraph's route.

An initializer of an enclosing graph that a layer inside an ``If`` / ``Loop``
/ ``Scan`` body reads is rewritten where it is when that layer is its one
reader; when anything else reads it (another layer, in any graph), the layer
gets a folded copy in its own body and the original stays for the others.
Names are unique across the whole model (``Names``), so a copy never shadows
a value of another scope.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from onnx import helper, numpy_helper

from ..onnxio.check import iter_nodes


def graphs_on(model: Any, route: tuple[tuple[int, str, int | None], ...]) -> list[Any]:
    """The ``GraphProto`` s from the main graph down to the subgraph that ``route`` (``OnnxFlow.route``) reaches."""
    graphs = [model.graph]
    for position, name, index in route:
        attribute = next(a for a in graphs[-1].node[position].attribute if a.name == name)
        graphs.append(attribute.g if index is None else attribute.graphs[index])
    return graphs


def all_graphs(model: Any) -> list[Any]:
    """The main graph and every subgraph of its nodes, nested ones too."""
    found, pending = [], [model.graph]
    while pending:
        graph = pending.pop()
        found.append(graph)
        for node in graph.node:
            for attribute in node.attribute:
                pending.extend(([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs))
    return found


def subgraph_reads(node: Any) -> set[str]:
    """The value names that the subgraphs of ``node`` (nested ones too) read."""
    found: set[str] = set()
    for attribute in node.attribute:
        for graph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
            for inner in graph.node:
                found.update(inner.input)
                found |= subgraph_reads(inner)
    return found


class Names:
    """What every graph of the model reads, and the value and node names taken (shared by each graph's writer)."""

    def __init__(self, model: Any):
        graphs = all_graphs(model)
        self.reads = Counter(name for node in iter_nodes(model) for name in node.input if name)
        self.reads.update(o.name for g in graphs for o in g.output)
        self.values = {o for n in iter_nodes(model) for o in n.output} | \
            {v.name for g in graphs for v in [*g.input, *g.initializer]}
        self.nodes = {n.name for n in iter_nodes(model) if n.name}


class Initializers:
    """The initializers seen from the graph ``scope[-1]`` (its own and its enclosing graphs'), rewritten in place
    where only the folded layer reads them, else copied into that graph."""

    def __init__(self, scope: list[Any], names: Names):
        self.graph = scope[-1]
        self.by_name = {t.name: t for g in scope for t in g.initializer}
        self.reads, self.names = names.reads, names
        inputs = {v.name for v in self.graph.input}
        own = [t.name for t in self.graph.initializer]
        # (the oldest IR versions list every initializer as a graph input; a body's inputs are positional: never)
        self.listed_as_inputs = len(scope) == 1 and bool(own) and all(name in inputs for name in own)

    def fresh(self, base: str) -> str:
        return _fresh(base, self.names.values)

    def fresh_node(self, base: str) -> str:
        return _fresh(base, self.names.nodes)

    def add(self, name: str, array: np.ndarray) -> str:
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        tensor = self.graph.initializer[-1]
        self.by_name[name] = tensor
        self.reads[name] += 1
        if self.listed_as_inputs:
            self.graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
        return name

    def put(self, node: Any, slot: int, array: np.ndarray) -> None:
        """``node``'s input ``slot`` becomes ``array``: rewritten in place when only this read uses it."""
        old = node.input[slot] if slot < len(node.input) else ""
        if old and old in self.by_name and self.reads[old] == 1:
            tensor = self.by_name[old]
            if tuple(array.shape) != tuple(tensor.dims):
                array = array.reshape(tuple(tensor.dims)) if array.size == np.prod(tensor.dims) else array
            tensor.CopyFrom(numpy_helper.from_array(array, old))
            return
        name = self.add(self.fresh(f"{old}_folded" if old else f"{node.name or node.output[0]}_bias"), array)
        if old:
            self.reads[old] -= 1
        while len(node.input) <= slot:
            node.input.append("")
        node.input[slot] = name


def drop_unread(model: Any, candidates: set[str]) -> None:
    """Remove the initializers among ``candidates`` that no node of any graph reads any more (and, in the main
    graph, the graph inputs that listed them)."""
    if not candidates:
        return
    graphs = all_graphs(model)
    reads = {name for node in iter_nodes(model) for name in node.input if name}
    reads |= {o.name for g in graphs for o in g.output}
    doomed = {name for name in candidates if name not in reads}
    if not doomed:
        return
    listed = {t.name for t in model.graph.initializer if t.name in doomed}
    for graph in graphs:
        for index in reversed([i for i, t in enumerate(graph.initializer) if t.name in doomed]):
            del graph.initializer[index]
    for index in reversed([i for i, v in enumerate(model.graph.input) if v.name in listed]):
        del model.graph.input[index]  # (an initializer listed as an input: gone with it)


def _fresh(base: str, taken: set[str]) -> str:
    """``base``, or ``base_2``, ``base_3``, ... : the first name not in ``taken``, which then holds it."""
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name
