"""Merge parallel branches into one conv and prove it: the first part of ``fold`` (``merge_branches=True``).

``merge_branches`` plans the merges on the model's dataflow (``merge``),
applies them to a copy (``merge_apply``), and verifies the copy against the
original in eval mode, at the outputs and at the output of every module
whose branches were merged, within the derived tolerance (the fan-in of each
merged conv widens its floor). A merge the layer-by-layer check blames is
left out and the rest is merged and verified again; the report lists it as
rejected. The merged model carries a ``merge`` recipe step, which
``merge_apply.replay`` rebuilds on a freshly built model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import VerificationError
from ..graph.dataflow import Dataflow, dataflow
from ..norms import is_batchnorm
from ..report import Skip, with_step
from ..runtime.cloning import clone
from ..verify.compare import Comparison, Reference, compare_layers
from .merge import CONVS, MUL, POOLS, chain, common, is_sum, plan_merges
from .merge_apply import Merge, merge_region
from .merge_math import NotMergeable

#: Rounds of "leave out the merges verification blames, merge again".
MAX_ROUNDS = 8


@dataclass(frozen=True)
class MergeReport:
    """The merges made (each block, its branches, the kernel it became), the adds left as they are and why."""

    merges: tuple[Merge, ...]
    skipped: tuple[Skip, ...]
    comparison: Comparison | None
    rejected: tuple[Skip, ...] = ()

    @property
    def passed(self) -> bool:
        return self.comparison is None or self.comparison.passed

    def recipe_step(self) -> dict[str, Any]:
        return {"op": "merge", "merges": [m.step() for m in self.merges]}

    def to_dict(self) -> dict[str, Any]:
        return {
            "merged": [{"block": m.block, "conv": m.conv, "branches": list(m.branches),
                        "kernel": list(m.kernel), "stride": list(m.stride), "padding": list(m.padding),
                        "groups": m.groups, "in_channels": m.in_channels, "out_channels": m.out_channels}
                       for m in self.merges],
            "not_merged": [{"block": s.name, "reason": s.reason} for s in self.skipped],
            "rejected_by_verification": [{"block": s.name, "reason": s.reason} for s in self.rejected],
            "verification": self.comparison.to_dict() if self.comparison else None,
        }


def merge_branches(
    model: nn.Module,
    inputs: Sequence[Any],
    *,
    verify: bool = True,
    strict: bool = False,
    device: str | torch.device = "auto",
    atol: float | None = None,
    rtol: float | None = None,
    flow: Dataflow | None = None,
) -> tuple[nn.Module, MergeReport]:
    """A copy of ``model`` with every mergeable add of parallel branches as one conv (``model`` when there is
    none), and the report. Raises ``VerificationError`` when the merged model fails at the outputs and no
    merge can be blamed (or any fails, with ``strict``)."""
    flow = flow if flow is not None else dataflow(model, inputs)
    if not _worth_planning(model, flow):
        return model, MergeReport((), (), None)
    shared: dict = {}  # BN forms by structure, traced once for every plan
    plan = plan_merges(model, flow, shared=shared)
    if not plan.regions:
        return model, MergeReport((), plan.skips, None)
    channels = pool_channels(model, flow)
    rejected: dict[tuple[str, ...], str] = {}
    reference = None
    for _ in range(MAX_ROUNDS):
        merged, merges, skips = _apply(model, [r for r in plan.regions if r.modules not in rejected], channels,
                                       shared)
        if not merges:
            return model, _report((), plan, skips, None, rejected)
        if not verify:
            return with_step(merged, {"op": "merge", "merges": [m.step() for m in merges]}), \
                _report(merges, plan, skips, None, rejected)
        blocks = list(dict.fromkeys(m.block for m in merges))
        if reference is None or any(b not in reference.layers for b in blocks):
            reference = Reference.of(model, inputs, device=device, probes=blocks,
                                     float64=atol is None and rtol is None)
        fan_in = {m.block: m.in_channels // m.groups * math.prod(m.kernel) for m in merges}
        fan_in[""] = max(fan_in.values())
        comparison = compare_layers(None, merged, inputs, atol=atol, rtol=rtol, probes=blocks, reference=reference,
                                    fan_in=fan_in)
        report = _report(merges, plan, skips, comparison, rejected)
        if comparison.passed:
            return with_step(merged, report.recipe_step()), report
        blamed = {} if strict else _blame(merges, comparison)
        if not blamed:
            raise VerificationError(comparison.failure_message("the model with merged branches"), report)
        rejected.update(blamed)
    raise VerificationError("merging branches did not verify after leaving out every merge it blamed", report)


def _worth_planning(model: nn.Module, flow: Dataflow) -> bool:
    """Whether some add's two operands lead back, through steps that may be linear, to one value (a look at the
    structure alone, so that a model with none pays no arithmetic: a ResNet's residual adds do not)."""
    modules, start = dict(model.named_modules()), {}
    for op in flow.ops:
        data = [j for j in op.inputs if not chain(j, flow.ops)]
        step = op.affine is not None or (op.kind == "module" and isinstance(
            modules.get(op.target), (*CONVS, *POOLS)) or is_batchnorm(modules.get(op.target)))
        if is_sum(op) and len(op.inputs) == 2:
            a, b = (start.get(j, j) for j in op.inputs)
            before = [start.get(flow.ops[s].inputs[0]) if len(flow.ops[s].inputs) == 1 else None for s in (a, b)]
            if a == b or before[0] == b or before[1] == a:  # (or one step that is not linear stands between: to say so)
                return True
            start[op.index] = op.index
        elif len(data) == 1 and (step or (op.kind == "function" and op.target in MUL)):
            start[op.index] = start.get(data[0], data[0])
    return False


def _apply(model: nn.Module, regions, channels, shared) -> tuple[nn.Module, list[Merge], list[Skip]]:
    merged = clone(model)
    merges, skips = [], []
    for region in regions:
        try:
            merges.append(merge_region(merged, region, channels, shared=shared))
        except NotMergeable as exc:
            skips.append(Skip(f"`{common(region.modules)}`", f"not merged: {exc}"))
    return merged, merges, skips


def _report(merges, plan, skips, comparison, rejected) -> MergeReport:
    refused = tuple(Skip(f"`{common(names)}`", why) for names, why in rejected.items())
    return MergeReport(tuple(merges), (*plan.skips, *skips), comparison, refused)


def _blame(merges: Sequence[Merge], comparison: Comparison) -> dict[tuple[str, ...], str]:
    """The merges of the first block (in execution order) that verification failed, with the reason."""
    for output in comparison.outputs:
        if output.passed or not output.name.startswith("layer `"):
            continue
        block = output.name.split("`")[1]
        found = {m.removed: (f"rejected by verification: merged into `{m.conv}`, `{block}` differed from the "
                             f"original by {output.max_abs_error:.3g} (tolerance {output.tolerance:.3g})")
                 for m in merges if m.block == block}
        if found:
            return found
    return {}


def pool_channels(model: nn.Module, flow) -> dict[str, int]:
    """The channel count each average pool of the model reads (measured by one forward pass, when there are any)."""
    names = [n for n in flow.calls if isinstance(model.get_submodule(n), POOLS)] if flow.calls else []
    channels = {}
    for name in names:
        shape = flow.shape(flow.calls[name][0])[0]
        if shape is not None and len(shape) > 2:
            channels[name] = shape[1]
    return channels
