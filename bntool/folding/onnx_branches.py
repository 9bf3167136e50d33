"""Each ``If`` branch that holds a fold is run in verification, whichever branch the verification inputs take.

The inputs drawn for a check take one branch of each ``If``; a fold in the
other would go unproven. So for every branch holding a fold, the original
and the folded graph run once more with each ``If`` on the way to it forced
to that branch (its condition replaced by a constant: same nodes, same
positions, so the fold applies to the forced copy as planned), and every
graph output is judged as in the plain run. A forced original that cannot
run (a branch not meant for these inputs) fails that check: the folds that
need it are not proven, and verification rejects them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import first_line
from ..onnxio.reference import run_float64, run_ort
from ..verify.tolerance import OutputComparison
from .onnx_writer import all_graphs, graphs_on

Choice = tuple[tuple[tuple[int, str, Any], ...], bool]  # (the route to a branch, then_branch?)


def choices(flow: Any, path: str) -> tuple[Choice, ...]:
    """The ``If`` s on the way to the graph at ``path`` and the branch taken at each (empty: none)."""
    found: list[Choice] = []
    sub = flow.graph_flow(path)
    while sub.parent is not None:
        if sub.parent.op(sub.route[-1][0]) == "If":
            found.append((sub.route, sub.route[-1][1] == "then_branch"))
        sub = sub.parent
    return tuple(reversed(found))


def forced(proto: Any, choice: tuple[Choice, ...]) -> Any:
    """A copy of ``proto`` with each ``If`` of ``choice`` reading a constant condition."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    taken = {t.name for g in all_graphs(copy) for t in g.initializer} | \
        {o for g in all_graphs(copy) for n in g.node for o in [*n.input, *n.output]}
    names = {}
    for value in (True, False):
        name, n = f"bntool_branch_{str(value).lower()}", 1
        while name in taken:
            n += 1
            name = f"bntool_branch_{str(value).lower()}_{n}"
        names[value] = name
        copy.graph.initializer.append(numpy_helper.from_array(np.array(value), name))
        if copy.ir_version < 4:  # (initializers were graph inputs then)
            copy.graph.input.append(helper.make_tensor_value_info(name, TensorProto.BOOL, []))
    for route, then in choice:
        holder = graphs_on(copy, route[:-1])[-1].node[route[-1][0]]
        holder.input[0] = names[then]
    return copy


def _label(choice: tuple[Choice, ...], flow: Any) -> str:
    paths = []
    for route, _ in choice:
        sub = next(f for f in flow.subflows.values() if f.route == route)
        paths.append(sub.path)
    return ", ".join(f"`{p}`" for p in paths)


class Branches:
    """The original run with its ``If`` s forced (once per choice), and each candidate's forced runs against it."""

    def __init__(self, proto: Any, flow: Any, feeds: Mapping[str, np.ndarray], derived: bool):
        self.proto, self.flow, self.feeds, self.derived = proto, flow, feeds, derived
        self.runs: dict[tuple[Choice, ...], Any] = {}

    def _original(self, choice: tuple[Choice, ...]) -> Any:
        if choice not in self.runs:
            variant = forced(self.proto, choice)
            try:
                out = run_ort(variant, self.feeds)
                high = run_float64(variant, self.feeds) if self.derived else {}
                self.runs[choice] = (variant, out, high)
            except Exception as exc:  # noqa: BLE001 - the branch cannot run on these inputs: not proven
                self.runs[choice] = first_line(exc, 160)
        return self.runs[choice]

    def compare(self, plan: Any, sites: Mapping[str, Any], fold: Callable[[Any], Any],
                judge: Callable[..., OutputComparison]) -> list[OutputComparison]:
        """Every output of every forced run (``fold(variant)``: the forced original, folded by the same plan;
        ``judge(label, original, candidate, float64)``: one output's comparison)."""
        wanted = dict.fromkeys(choices(self.flow, sites[p.bn][0].graph) for p in plan.pairs)
        results = []
        for choice in [c for c in wanted if c]:
            where = f"with the If branch(es) {_label(choice, self.flow)} taken"
            run = self._original(choice)
            if isinstance(run, str):
                results.append(_failed(f"the original cannot run {where} ({run}), so the folds there are not "
                                       "proven"))
                continue
            variant, out, high = run
            try:
                folded = run_ort(fold(variant), self.feeds)
            except Exception as exc:  # noqa: BLE001 - a fold there broke the graph
                results.append(_failed(f"the folded graph cannot run {where} ({first_line(exc, 160)})"))
                continue
            for name in out:
                results.append(judge(f"output `{name}` {where}", out[name], folded[name], high.get(name)))
        return results


def _failed(what: str) -> OutputComparison:
    return OutputComparison(what, (), float("inf"), float("inf"), 0.0, False)


class Trips:
    """The folded layers inside a ``Loop`` / ``Scan`` body of the main graph, checked on every trip: each one's
    output stacked as an extra scan output (in verification copies only), judged as a main-graph layer is (for a
    fold in a body deeper inside, the output of the body's node that holds it); a body that ran no trip on the
    verification inputs is not taken for proof."""

    def __init__(self, proto: Any, flow: Any, feeds: Mapping[str, np.ndarray], derived: bool):
        self.proto, self.flow, self.feeds, self.derived = proto, flow, feeds, derived
        self.probes: dict[str, list[tuple[str, str, int, str]]] | None = None
        self.original: Any = None

    def _points(self, plan: Any) -> dict[str, list[tuple[str, str, int, str]]]:
        """Per Loop / Scan of the main graph (by first output): (what is checked, body value, its type, body path)
        for each folded layer in its body, and for the node in its body holding a deeper body with folds."""
        found: dict[str, list[tuple[str, str, int, str]]] = {}
        for sub in self.flow.subflows.values():
            top = sub
            while top.parent is not None and top.parent.parent is not None:
                top = top.parent
            holder = top.route[0][0]
            if self.flow.op(holder) not in ("Loop", "Scan"):
                continue
            for label in plan.probes():
                if label not in sub.positions:
                    continue
                if sub is top:  # the layer itself
                    what, value = f"layer `{label}`", sub.nodes[sub.positions[label]].outputs[0]
                else:  # the body's node that holds it: it ran on every trip
                    position = sub.route[len(top.route)][0]
                    what, value = f"output of `{top.label(position)}`", top.nodes[position].outputs[0]
                point = (what, value.name, int(value.dtype), top.path) if value.dtype is not None else None
                points = found.setdefault(self.flow.nodes[holder].outputs[0].name, [])
                if point is not None and point not in points:
                    points.append(point)
        return found

    def compare(self, plan: Any, folded: Any, judge: Callable[..., OutputComparison]) -> list[OutputComparison]:
        if self.probes is None:  # (the first, fullest plan: later ones check a part of it)
            self.probes = self._points(plan)
            if any(self.probes.values()):
                try:
                    out = run_ort(stacked(self.proto, self.probes), self.feeds)
                    ran = {loop: [p for p in points if out[_stacked_name(p[1])].shape[:1] != (0,)]
                           for loop, points in self.probes.items()}  # (the float64 run: the bodies that ran)
                    ran = {loop: points for loop, points in ran.items() if points}
                    high = run_float64(stacked(self.proto, ran), self.feeds) if self.derived and ran else {}
                    self.original = (out, high)
                except Exception as exc:  # noqa: BLE001 - not checked on every trip: not proven
                    self.original = first_line(exc, 160)
        checked = {p for points in self._points(plan).values() for p in points}
        if not checked:
            return []
        if isinstance(self.original, str):
            return [_failed(f"the original with its Loop / Scan bodies' folded layers stacked cannot run "
                            f"({self.original}), so the folds there are not proven")]
        out, high = self.original
        try:
            cand = run_ort(stacked(folded, self.probes), self.feeds)
        except Exception as exc:  # noqa: BLE001 - a fold there broke the graph
            return [_failed(f"the folded graph with its Loop / Scan bodies' layers stacked cannot run "
                            f"({first_line(exc, 160)})")]
        results = []
        for points in self.probes.values():
            for point in points:
                what, value, _, path = point
                if point not in checked:
                    continue
                name = _stacked_name(value)
                if out[name].shape[:1] == (0,):
                    results.append(_failed(f"the body `{path}` ran no trip on the verification inputs, so the folds "
                                           "there are not proven (`example_inputs` that make it run would)"))
                    continue
                results.append(judge(f"{what} (on every trip)", out[name], cand[name], high.get(name)))
        return results


def _stacked_name(value: str) -> str:
    return f"{value}__bntool_trips"


def stacked(proto: Any, probes: Mapping[str, list[tuple[str, str, int, str]]]) -> Any:
    """A copy of ``proto`` whose ``Loop`` / ``Scan`` nodes (by first output) also output the given body values,
    stacked over the trips (an ``Identity`` in the body makes each a scan output of its own)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for node in copy.graph.node:
        points = probes.get(node.output[0] if node.output else "")
        if not points:
            continue
        body = next(a.g for a in node.attribute if a.name == "body")
        for _, value, elem, _ in points:
            inner, outer = f"{value}__bntool_trip", _stacked_name(value)
            body.node.append(helper.make_node("Identity", [value], [inner]))
            body.output.append(helper.make_tensor_value_info(inner, elem, None))
            node.output.append(outer)
            copy.graph.output.append(helper.make_tensor_value_info(outer, elem, None))
            for attribute in node.attribute:  # (a Scan's per-output axes and directions: one more, the default)
                if attribute.name in ("scan_output_axes", "scan_output_directions") and attribute.ints:
                    attribute.ints.append(0)
    return copy
