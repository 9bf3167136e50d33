"""Fold BatchNormalization nodes inside an ONNX model, only where exact, and prove it in onnxruntime.

``fold_onnx`` plans with ``onnx_rules`` (the module fold's ``FoldPlan`` and
reasons), applies with ``onnx_apply``, and verifies: onnxruntime runs the
original and the folded graph on the same inputs, each exposing the output
of every folded layer (in a verification copy only), and every graph output
and folded layer is judged by ``verify.compare``'s rule, the tolerance derived
from the original's own distance to a float64 run of it (``onnxio.wide``).
A pair the check blames is dropped and the rest planned, applied and
verified again (``fold._blame``); non-finite values never verify. The result
passes ``onnx.checker`` (full check) or is not returned.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError, VerificationError, first_line
from ..graph.onnxflow import OnnxFlow
from ..onnxio.check import iter_nodes
from ..onnxio.feeds import make_feeds
from ..onnxio.load import onnx_model
from ..onnxio.reference import run_ort
from ..onnxio.skeleton import Skeleton
from ..onnxio.wide import run_wide
from ..verify.compare import Comparison, _compare_one, rounding_factor
from .fold import MAX_ROUNDS, FoldReport, _blame
from .onnx_apply import apply_onnx
from .onnx_blame import blame_bodies
from .onnx_branches import Branches, Trips
from .onnx_layers import fan_in
from .onnx_memory import fits_in_memory
from .onnx_rules import plan_onnx
from .plan import FoldPlan

__all__ = ["OnnxFoldReport", "fold_onnx"]


@dataclass(frozen=True)
class OnnxFoldReport(FoldReport):
    """``FoldReport`` for a graph: also the BatchNormalization nodes before and after, and whether weights were
    external data in the input (the written file keeps them so)."""

    bn_before: int = 0
    bn_after: int = 0
    external_data: bool = False
    #: the original's runs on the verification inputs, to prove the written file against (``prove_file``)
    check: Any = dataclasses.field(default=None, repr=False, compare=False)
    sites: Any = dataclasses.field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "bn_before": self.bn_before, "bn_after": self.bn_after}


def fold_onnx(
    model_or_path: Any,
    *,
    example_inputs: Sequence[Any] | Mapping[str, Any] | None = None,
    input_shapes: Sequence[Sequence[int]] | Mapping[str, Sequence[int]] | None = None,
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    strict: bool = False,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    seed: int = 0,
) -> tuple[Any, OnnxFoldReport]:
    """Fold every BatchNormalization node that folds exactly; return the folded ``onnx.ModelProto`` and a report.

    ``model_or_path``: a ``ModelProto`` (not changed) or an .onnx path (its
    external data checked before it is read). Inputs come from
    ``example_inputs`` (arrays, in graph-input order or by name), else are
    drawn from the graph's static shapes, with ``input_shapes`` giving those
    with dynamic dimensions. A fold verification blames is left (the
    report's ``rejected``) unless ``strict``: then ``VerificationError``.
    """
    proto, external = onnx_model(model_or_path, "fold_onnx")
    original = _check_original(proto)
    flow = OnnxFlow.of(proto, original)
    feeds = make_feeds(proto, example_inputs, input_shapes, seed) if verify else {}
    before = sum(n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx") for n in iter_nodes(proto))
    check = None
    rejected: dict[str, str] = {}
    comparison = None
    for _ in range(MAX_ROUNDS):
        plan, sites = plan_onnx(flow, rejected, include=include, exclude=exclude)
        folded = _drop_left_behind(proto, apply_onnx(proto, flow, plan, sites))
        if not verify or not plan.pairs:  # (nothing folded: the graph is the original's)
            comparison = None
            break
        if check is None:  # the original, run once, with every point the first (fullest) plan checks
            check = _Check(original, flow, feeds, atol, rtol, plan, sites)
        comparison = check.compare(folded, plan, sites)
        if comparison.passed:
            break
        blamed = {} if strict else _blame(plan, comparison) or blame_bodies(
            plan, sites, comparison, functools.partial(_trial, proto, flow, check, dict(rejected), include, exclude))
        if not blamed:
            break
        rejected.update(blamed)
    after = sum(n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx") for n in iter_nodes(folded))
    report = OnnxFoldReport(plan, comparison, tuple(s for s in plan.skips if s.bn in rejected), verified=verify,
                            bn_before=before, bn_after=after, external_data=external, check=check, sites=sites)
    if comparison is not None and not comparison.passed:
        raise VerificationError(comparison.failure_message("the folded graph"), report)
    try:
        candidate = check.candidate if check is not None else None
        (candidate if candidate is not None and candidate.model is folded else Skeleton.of(folded)).check(
            full_check=True)
    except ValueError as exc:  # (over 2 GB in memory: checked on the written file)
        if "2GB" not in str(exc) and "2 GB" not in str(exc):
            raise VerificationError(f"the folded graph fails onnx.checker: {first_line(exc, 200)}", report) from exc
    except Exception as exc:
        raise VerificationError(f"the folded graph fails onnx.checker: {first_line(exc, 200)}", report) from exc
    return folded, report


def _trial(proto: Any, flow: OnnxFlow, check: _Check, rejected: dict[str, str], include, exclude,
           more: dict[str, str]) -> Comparison:
    plan, sites = plan_onnx(flow, {**rejected, **more}, include=include, exclude=exclude)
    return check.compare(apply_onnx(proto, flow, plan, sites), plan, sites)


def prove_file(report: OnnxFoldReport, path: str | os.PathLike) -> None:
    """Run the written file in onnxruntime on the verification inputs; every output must pass as the fold did."""
    if report.check is None:
        return
    comparison = report.check.compare(Path(path), report.plan, report.sites)
    if not comparison.passed:
        raise VerificationError(comparison.failure_message("the written file"), report)


def _drop_left_behind(original: Any, folded: Any) -> Any:
    """``folded`` without the initializers the fold left unread: read by a node of the original, by none now (a
    weight whose folded layer took a copy of its own, its other reader gone with the BN). An initializer the
    original did not read, or still read, stays as it was."""
    read_before = {name for node in iter_nodes(original) for name in node.input}
    read_now = {name for node in iter_nodes(folded) for name in node.input}
    keep = read_now | {v.name for v in [*folded.graph.input, *folded.graph.output]}
    left = [i for i, t in enumerate(folded.graph.initializer) if t.name in read_before and t.name not in keep]
    for i in reversed(left):
        del folded.graph.initializer[i]
    return folded


def _check_original(proto: Any) -> Skeleton:
    """The model split for checking and running (``Skeleton``), after ``onnx.checker`` found it valid."""
    original = Skeleton.of(proto)
    try:
        original.check(full_check=False)
        return original
    except ValueError as exc:
        if "2GB" in str(exc) or "2 GB" in str(exc):
            return original  # (over 2 GB in memory, and its cut copy failed: the written file is checked)
        raise InputError(f"the ONNX model is not valid ({first_line(exc, 200)}); bntool folds only models that "
                         "pass onnx.checker") from None
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"the ONNX model is not valid ({first_line(exc, 200)}); bntool folds only models that "
                         "pass onnx.checker") from None


class _Check:
    """The original run once (onnxruntime, and float64 for the derived tolerance), then each candidate against it."""

    def __init__(self, original: Skeleton, flow: OnnxFlow, feeds: Mapping[str, np.ndarray], atol, rtol,
                 plan: FoldPlan, sites: Mapping[str, Any]):
        self.flow, self.feeds, self.atol, self.rtol = flow, dict(feeds), atol, rtol
        fits_in_memory(flow)
        self.derived = atol is None and rtol is None
        self.skeleton = original
        self.outputs = [o.name for o in original.model.graph.output]
        self.types = _value_types(flow)
        self.threads = torch.get_num_threads()
        names = [self.value_of(label) for label in plan.probes() if label in flow.positions]
        names += [flow.nodes[s.layer].outputs[0].name for group in sites.values() for s in group
                  if s.direction == "forward" and not s.graph]  # (a subgraph's values are checked at the outputs)
        self.points: list[str] = []
        self.original: dict[str, np.ndarray] = {}
        self.delta: dict[str, torch.Tensor] = {}  # float64 reference - original, per value, computed once
        self._run_original(names)
        proto = original.model
        self.branches = Branches(proto, flow, self.feeds, self.derived)  # (folds inside If branches)
        self.trips = Trips(proto, flow, self.feeds, self.derived)  # (folds inside Loop / Scan bodies)
        self.candidate: Skeleton | None = None  # the last candidate, split (for the checker)

    def _run_original(self, names: Sequence[str]) -> None:
        """The original's runs (onnxruntime, and float64 when the tolerance is derived) with ``names`` exposed."""
        self.points = [n for n in dict.fromkeys([*self.points, *names]) if n in self.types]
        try:
            self.original = self.skeleton.run(self.feeds, self.points, self.types, self.threads)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"onnxruntime cannot run the original graph ({first_line(exc, 200)}); bntool proves a "
                             "fold by running both graphs, so it cannot fold this one") from None
        if self.derived:
            high = run_wide(self.skeleton.model, self.feeds, self.points, arrays=self.skeleton.arrays)
            self.delta = {name: _delta(self.original[name], ref) for name, ref in high.items()
                          if name in self.original}

    def value_of(self, label: str) -> str:
        return self.flow.nodes[self.flow.position(label)].outputs[0].name

    def compare(self, folded: Any, plan: FoldPlan, sites: Mapping[str, Any], points: bool = True) -> Comparison:
        values = {}
        if isinstance(folded, (str, os.PathLike)):
            points = False
        if points:
            for label in plan.probes():
                if label in self.flow.positions:
                    values[self.value_of(label)] = label
        missing = [v for v in values if v in self.types and v not in self.points]
        if missing:  # (a point the first plan did not check: the original is run again with it)
            self._run_original(missing)
        try:
            if points:
                self.candidate = Skeleton.of(folded, like=self.skeleton)
                out = self.candidate.run(self.feeds, [v for v in values if v in self.types], self.types,
                                         self.threads)
            else:
                out = run_ort(folded, self.feeds, self.threads)
        except Exception as exc:
            raise VerificationError(f"onnxruntime cannot run the folded graph ({first_line(exc, 200)})") from exc
        sizes = {p.bn: max(fan_in(self.flow.graph_flow(s.graph), s.layer) for s in sites[p.bn]) for p in plan.pairs}
        results = []
        widest = max(sizes.values(), default=0)
        for name in self.outputs:
            results.append(self._one(name, name, self.original[name], out[name], self.delta.get(name), widest))
        for value, label in values.items():
            if value not in out or value not in self.original:
                continue
            size = max((sizes[p.bn] for p in plan.pairs_checked_at(label)), default=0)
            results.append(self._one(f"layer `{label}`", value, self.original[value], out[value],
                                     self.delta.get(value), size))
        if points:
            results += self.branches.compare(
                plan, sites, lambda variant: apply_onnx(variant, self.flow, plan, sites),
                lambda label, orig, cand, high: self._one(label, label, orig, cand, high, widest, wide=True))
            results += self.trips.compare(plan, folded, lambda label, orig, cand, high: self._one(
                label, label, orig, cand, high, max((sizes[p.bn] for p in plan.pairs_checked_at(label.split("`")[1])),
                                                    default=widest), wide=True))
        rule = "derived" if self.derived else f"atol={self.atol or 0.0:g} rtol={self.rtol or 0.0:g}"
        return Comparison(tuple(results), "cpu (onnxruntime)", rule)

    def _one(self, label: str, name: str, orig, cand, reference, size: int, wide: bool = False):
        """One value judged: ``reference`` is its float64 run (``wide``) or that less the original (``delta``)."""
        ref = _torch(reference) if wide and reference is not None else None
        delta = reference if not wide else None
        return _compare_one(label, _torch(orig), _torch(cand), ref, self.atol, self.rtol, delta=delta,
                            widen=rounding_factor(size))


def _value_types(flow: OnnxFlow) -> dict[str, int]:
    """Element type of every value whose type is known (graph inputs, outputs, inferred)."""
    types = {}
    for node in flow.nodes:
        for value in [*node.inputs, *node.outputs]:
            if value is not None and value.dtype is not None:
                types[value.name] = int(value.dtype)
    for value in [*flow.model.graph.inputs, *flow.model.graph.outputs]:
        if value.dtype is not None:
            types[value.name] = int(value.dtype)
    return types


def _delta(orig: Any, high: Any) -> torch.Tensor | None:
    """The float64 reference less the original (the one float64 tensor each comparison reads), or None where they
    are not floating values of one shape (then there is no derived reference)."""
    orig, high = _torch(orig), _torch(high)
    if orig.shape != high.shape or not orig.is_floating_point() or not high.is_floating_point():
        return None
    return high.double().sub_(orig)  # (in place on the float64 run's own result, which nothing else reads)


def _torch(array: Any) -> torch.Tensor:
    """``array`` as a tensor: shared when numpy owns it writable (the runs' own results), else copied."""
    array = np.asarray(array)
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array if array.flags.writeable and array.flags.c_contiguous else np.array(array))
