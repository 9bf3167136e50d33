"""What is going on with the BatchNorms in a model: one row per BN, and the classic mistakes.

``inspect`` takes a model (statistics, hyper-parameters, dataflow and
foldability) or a bare state dict (statistics only, BNs found from their key
names). Whether a BN folds, and why not, comes from ``foldrules.plan_from_dataflow``
on the same dataflow that ``plan_fold`` builds, so ``bntool inspect`` and
``bntool fold`` give one reason. What looks wrong is ``findings``'s to say;
``plot`` (``bntool.inspection.picture``) draws the per-layer statistics.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InputError, first_line, named
from ..folding.plan import FoldPlan
from ..folding.rules import plan_from_dataflow
from ..graph.dataflow import Dataflow, dataflow
from ..norms import DEFAULT_EPS, has_statistics, is_batchnorm, num_features
from ..runtime.running import input_shapes
from ..runtime.shapes import declared_input_shapes, make_inputs
from .findings import BNRow, Finding, Summary, by_severity, model_findings, nonfinite_weights, statistics_findings

FROM_KEYS = "BatchNorm (from keys)"


@dataclass(frozen=True)
class InspectReport:
    rows: tuple[BNRow, ...]
    findings: tuple[Finding, ...]
    dataflow_method: str  # fx, recorded, or none
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [dataclasses.asdict(r) for r in self.rows],
            "findings": [dataclasses.asdict(f) for f in self.findings],
            "dataflow": self.dataflow_method,
            "note": self.note,
        }


# ----------------------------------------------------------------------------- entry point


def inspect(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    *,
    seed: int = 0,
) -> InspectReport:
    """Every BN of a model (or a state dict), its statistics and foldability, and what looks wrong.

    ``example_inputs`` show the dataflow where fx cannot trace and the input
    rank next to a Linear; when omitted they are drawn from the shape the
    model declares, as ``fold`` does. Nothing is changed.
    """
    if isinstance(model_or_state_dict, nn.Module):
        return _inspect_model(model_or_state_dict, example_inputs, seed)
    if isinstance(model_or_state_dict, Mapping):
        return _inspect_state_dict(model_or_state_dict)
    raise InputError(f"inspect takes an nn.Module or a state dict, got a {type(model_or_state_dict).__name__}")


def _inspect_model(model: nn.Module, example_inputs, seed: int) -> InspectReport:
    bns = {name: m for name, m in model.named_modules() if is_batchnorm(m)}
    flow, plan, note = _dataflow_and_plan(model, example_inputs, seed)
    order = [n for n in (flow.sites if flow else ()) if n in bns] + [n for n in bns if not flow or n not in flow.sites]
    unknown = f"dataflow unknown (torch.fx cannot trace the model): pass {named('`example_inputs`')}"
    rows = tuple(_model_row(name, bns[name], flow, plan, unknown) for name in order)
    findings = (statistics_findings(rows, eps_known=True) + nonfinite_weights(model, rows)
                + model_findings(model, rows, bns, flow))
    return InspectReport(rows, by_severity(findings), flow.method if flow else "none", note)


def _inspect_state_dict(state: Mapping[str, torch.Tensor]) -> InspectReport:
    rows = []
    for key in state:
        if not (key == "running_mean" or key.endswith(".running_mean")):
            continue
        prefix = key[: -len("running_mean")]
        if f"{prefix}running_var" not in state:
            continue
        tensors = {n: state.get(f"{prefix}{n}") for n in ("weight", "bias", "running_mean", "running_var")}
        tracked = state.get(f"{prefix}num_batches_tracked")
        rows.append(_row(
            prefix.rstrip("."), FROM_KEYS, "keys", tensors, features=state[key].numel(), eps=None, momentum=None,
            affine=tensors["weight"] is not None, track=True,
            tracked=int(tracked.item()) if tracked is not None and tracked.numel() == 1 else None,
            fed_by=None, feeds=(), foldable=None, fold_into=None, fold_reason=f"needs {named('`model`')}",
        ))
    note = ("weights only: BatchNorms were found from key names (running_mean / running_var); eps, momentum, "
            f"what feeds each BN and whether it folds need {named('`model`')}")
    if not _registration_order(list(state), [r.name for r in rows]):  # safetensors reorders keys
        rows.sort(key=lambda r: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", r.name)])
        note += "; the file's keys are sorted, so layers are listed in name order, not network order"
    findings = statistics_findings(rows, eps_known=False) + nonfinite_weights(state, rows)
    return InspectReport(tuple(rows), by_severity(findings), "none", note)


def _registration_order(keys: list[str], bns: list[str]) -> bool:
    """Whether ``keys`` look like ``state_dict()`` order: not sorted, and each BN's keys side by side."""
    if keys == sorted(keys):
        return False
    position = {k: i for i, k in enumerate(keys)}
    for name in bns:
        prefix = f"{name}." if name else ""
        own = sorted(position[k] for k in keys if k.startswith(prefix) and "." not in k[len(prefix):])
        if own[-1] - own[0] != len(own) - 1:
            return False
    return True


# ----------------------------------------------------------------------------- rows


def _dataflow_and_plan(model: nn.Module, example_inputs, seed: int) -> tuple[Dataflow | None, FoldPlan | None, str]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if example_inputs is None and declared_input_shapes(model):
        example_inputs = make_inputs(model, seed=seed)
    try:
        flow = dataflow(model, example_inputs)
    except InputError:
        raise
    except Exception as exc:  # fx and user models raise many types
        first = first_line(exc, 160)
        if example_inputs is None:
            return None, None, (f"torch.fx cannot trace the model ({first}) and its input shape is unknown; "
                                f"pass {named('`example_inputs`')} to see what feeds each BN and whether it folds")
        shapes = input_shapes(example_inputs)
        raise InputError(f"the model fails on inputs of shape {shapes} ({type(exc).__name__}: {first}); "
                         "pass the shape it takes with `example_inputs`") from None
    return flow, plan_from_dataflow(model, flow), flow.note


def _model_row(name: str, bn: nn.Module, flow: Dataflow | None, plan: FoldPlan | None, unknown: str) -> BNRow:
    site = flow.sites.get(name) if flow else None
    fed_by = (site.producer or site.producer_op) if site else None
    foldable = fold_into = None
    reason: str | None = unknown
    if plan is not None:
        pair = next((p for p in plan.pairs if p.bn == name), None)
        foldable, fold_into = pair is not None, pair.into if pair else None
        reason = None if pair else plan.reason_for(name)
    tracked = getattr(bn, "num_batches_tracked", None)
    momentum = getattr(bn, "momentum", None)
    return _row(
        name, type(bn).__name__, "model",
        {n: getattr(bn, n, None) for n in ("weight", "bias", "running_mean", "running_var")},
        features=num_features(bn), eps=float(bn.eps), momentum=None if momentum is None else float(momentum),
        affine=bool(getattr(bn, "affine", getattr(bn, "weight", None) is not None)),
        track=has_statistics(bn), tracked=int(tracked.item()) if tracked is not None else None,
        fed_by=fed_by, feeds=site.consumers if site else (), foldable=foldable, fold_into=fold_into,
        fold_reason=reason,
    )


def _row(name, type_name, source, tensors, *, features, eps, momentum, affine, track, tracked, **flow) -> BNRow:
    mean, var = tensors["running_mean"], tensors["running_var"]
    nonfinite = tuple(n for n, t in tensors.items()
                      if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()))
    dead: tuple[int, ...] = ()
    negative: tuple[int, ...] = ()
    if var is not None:
        values = var.detach().cpu()
        dead = tuple(torch.nonzero((values >= 0) & (values <= (DEFAULT_EPS if eps is None else eps))).flatten().tolist())
        negative = tuple(torch.nonzero(values < 0).flatten().tolist())
    return BNRow(
        name=name, type=type_name, source=source,
        num_features=features,
        eps=eps, momentum=momentum, affine=affine, track_running_stats=track, num_batches_tracked=tracked,
        running_mean=Summary.of(mean) if mean is not None else None,
        running_var=Summary.of(var) if var is not None else None,
        dead_channels=dead, nonfinite=nonfinite, negative_channels=negative, **flow,
    )
