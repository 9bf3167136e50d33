"""``inspect`` for an ONNX file: every BatchNormalization node, what feeds it, whether it folds and why not, and the
statistics findings that need no model code (NaN / inf, negative variance, dead channels, never updated).

A BN inside an ``If`` / ``Loop`` / ``Scan`` body is listed with the path to
it (``loop/body/bn``), as fold names it; what feeds it from outside its body
is named as such."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch

from ..folding.onnx_layers import PARAMETERS
from ..folding.onnx_rules import plan_onnx
from ..graph.onnxflow import OnnxFlow
from ..onnxio.load import onnx_model
from .findings import by_severity, nonfinite_weights, statistics_findings
from .inspect import InspectReport, _row


def inspect_onnx(model_or_path: Any) -> InspectReport:
    """One row per BatchNormalization node (of the main graph, then of each subgraph), with fold's plan and the
    statistics findings."""
    proto, _ = onnx_model(model_or_path, "inspect_onnx")
    flow = OnnxFlow.of(proto)
    plan, _ = plan_onnx(flow)
    rows, own = [], set()
    for graph, i in [(g, i) for g in flow.flows() for i in g.bns()]:
        label = graph.label(i)
        tensors: dict[str, Any] = {}
        for k, key in enumerate(PARAMETERS, start=1):
            value = graph.input(i, k)
            array = graph.constant(value)
            own.add(value.name if value is not None else "")
            tensors[{"scale": "weight", "B": "bias", "mean": "running_mean", "var": "running_var"}[key]] = \
                torch.from_numpy(array.astype(np.float64)) if array is not None else None
        source = graph.producer(graph.input(i, 0))
        feeds = [graph.label(r) if r >= 0 else "(subgraph)" for r in graph.readers(graph.nodes[i].outputs[0])]
        pair = next((p for p in plan.pairs if p.bn == label), None)
        reason = plan.reason_for(label)
        mean = tensors["running_mean"]
        rows.append(_row(
            label, "BatchNormalization", "model", tensors, features=int(mean.numel()) if mean is not None else 0,
            eps=float(graph.attr(i, "epsilon", 1e-5)), momentum=float(graph.attr(i, "momentum", 0.9)), affine=True,
            track=not graph.attr(i, "training_mode", 0), tracked=None,
            fed_by=graph.label(source) if source is not None else _fed_from(graph, graph.input(i, 0)),
            feeds=tuple(feeds),
            foldable=pair is not None, fold_into=f"{pair.into} ({pair.into_type}, {pair.direction})" if pair else None,
            fold_reason=reason,
        ))
    state = {t.name: torch.from_numpy(np.array(onnx.numpy_helper.to_array(t), dtype=np.float64))
             for t in proto.graph.initializer
             if t.data_type in (1, 10, 11, 16) and t.name not in own}
    findings = statistics_findings(rows, eps_known=True) + nonfinite_weights(state, rows)
    return InspectReport(tuple(rows), by_severity(findings), "onnx", "")


def _fed_from(graph: OnnxFlow, value) -> str:
    """What feeds a BN that no node of its own graph feeds: the input, or the value from an enclosing graph."""
    if graph.parent is None:
        return "input"
    return f"`{value.name}` ({'input of' if value.name in graph.inputs else 'from outside'} `{graph.path}`)"
