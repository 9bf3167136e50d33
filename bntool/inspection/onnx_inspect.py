"""``inspect`` for an ONNX file: every BatchNormalization node, what feeds it, whether it folds and why not, and the
statistics findings that need no model code (NaN / inf, negative variance, dead channels, never updated)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
import torch

from ..errors import InputError
from ..folding.onnx_rules import PARAMETERS, plan_onnx
from ..graph.onnxflow import OnnxFlow
from ..onnxio.load import read_onnx
from .findings import by_severity, nonfinite_weights, statistics_findings
from .inspect import InspectReport, _row


def inspect_onnx(model_or_path: Any) -> InspectReport:
    """One row per BatchNormalization node of the main graph, with fold's plan and the statistics findings."""
    if isinstance(model_or_path, (str, os.PathLike)):
        proto, _ = read_onnx(model_or_path)
    elif isinstance(model_or_path, onnx.ModelProto):
        proto = model_or_path
    else:
        raise InputError(f"inspect_onnx takes an onnx.ModelProto or a path, got a {type(model_or_path).__name__}")
    flow = OnnxFlow.of(proto)
    plan, _ = plan_onnx(flow)
    rows, own = [], set()
    for i in flow.bns():
        label = flow.label(i)
        tensors: dict[str, Any] = {}
        for k, key in enumerate(PARAMETERS, start=1):
            value = flow.input(i, k)
            array = flow.constant(value)
            own.add(value.name if value is not None else "")
            tensors[{"scale": "weight", "B": "bias", "mean": "running_mean", "var": "running_var"}[key]] = \
                torch.from_numpy(array.astype(np.float64)) if array is not None else None
        source = flow.producer(flow.input(i, 0))
        feeds = [flow.label(r) if r >= 0 else "(subgraph)" for r in flow.readers(flow.nodes[i].outputs[0])]
        pair = next((p for p in plan.pairs if p.bn == label), None)
        reason = plan.reason_for(label)
        mean = tensors["running_mean"]
        rows.append(_row(
            label, "BatchNormalization", "model", tensors, features=int(mean.numel()) if mean is not None else 0,
            eps=float(flow.attr(i, "epsilon", 1e-5)), momentum=float(flow.attr(i, "momentum", 0.9)), affine=True,
            track=not flow.attr(i, "training_mode", 0), tracked=None,
            fed_by=flow.label(source) if source is not None else "input", feeds=tuple(feeds),
            foldable=pair is not None, fold_into=f"{pair.into} ({pair.into_type}, {pair.direction})" if pair else None,
            fold_reason=reason,
        ))
    state = {t.name: torch.from_numpy(np.array(onnx.numpy_helper.to_array(t), dtype=np.float64))
             for t in proto.graph.initializer
             if t.data_type in (1, 10, 11, 16) and t.name not in own}
    findings = statistics_findings(rows, eps_known=True) + nonfinite_weights(state, rows)
    inner = flow.subgraph_bns()
    note = (f"{len(inner)} BatchNormalization node(s) inside If / Loop / Scan bodies are not listed" if inner else "")
    return InspectReport(tuple(rows), by_severity(findings), "onnx", note)
