"""Fold BatchNorm into the layer that feeds it (or reads it), only where exact.

``plan_fold`` turns the dataflow from ``graph.py`` into a ``FoldPlan``: pairs to
fold and, for every other BN, a ``Skip`` with the reason. ``apply_plan`` does
the surgery on the user's own module tree (producers get new weights and, if
needed, a bias; folded BNs become ``nn.Identity``), and ``fold`` runs both on
a copy and verifies the result against the original in eval mode. ``bntool
inspect`` shows the same reasons, from the same ``plan_fold``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import InputError, VerificationError
from .foldmath import fold_into_consumer, fold_into_producer, identity_statistics
from .graph import FOLDABLE_TYPES, BNSite, Dataflow, bn_names, dataflow
from .norms import bn_forward_is_standard, has_statistics, standard_forward
from .verify import Comparison, compare, make_inputs

TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class FoldPair:
    """Fold ``bn`` into ``into``: ``backward`` (into its producer) or ``forward`` (into its reader).

    ``bn_becomes`` is ``removed`` (replaced by ``nn.Identity``) or ``identity``
    (kept, with statistics that make it an exact identity, for a BN subclass
    whose forward may do more than normalize).
    """

    bn: str
    into: str
    direction: str
    bn_becomes: str
    into_type: str


@dataclass(frozen=True)
class Skip:
    """A BN left as it is, and why."""

    bn: str
    reason: str


@dataclass(frozen=True)
class FoldPlan:
    pairs: tuple[FoldPair, ...]
    skips: tuple[Skip, ...]
    method: str
    note: str = ""

    def recipe_step(self) -> dict[str, Any]:
        return {
            "op": "fold",
            "pairs": [
                {"bn": p.bn, "into": p.into, "direction": p.direction, "bn_becomes": p.bn_becomes}
                for p in self.pairs
            ],
        }

    def probes(self) -> list[str]:
        """Modules whose outputs must be equal before and after the fold (checked layer by layer)."""
        return [p.bn if p.direction == "backward" else p.into for p in self.pairs]

    def reason_for(self, bn: str) -> str | None:
        """``None`` when ``bn`` is folded, else the reason it is not."""
        return next((s.reason for s in self.skips if s.bn == bn), None)


@dataclass(frozen=True)
class FoldReport:
    plan: FoldPlan
    comparison: Comparison | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "folded": [dataclasses.asdict(p) for p in self.plan.pairs],
            "skipped": [dataclasses.asdict(s) for s in self.plan.skips],
            "dataflow": self.plan.method,
            "note": self.plan.note,
            "verification": self.comparison.to_dict() if self.comparison else None,
        }


# ----------------------------------------------------------------------------- plan


def plan_fold(model: nn.Module, example_inputs: Sequence[torch.Tensor] | None = None) -> FoldPlan:
    """Which BNs fold into which layer, and why each other BN does not."""
    flow = dataflow(model, example_inputs)
    return plan_from_dataflow(model, flow)


def plan_from_dataflow(model: nn.Module, flow: Dataflow) -> FoldPlan:
    modules = dict(model.named_modules())
    owners = _parameter_owners(model)
    pairs, skips = [], []
    for name in bn_names(model):
        bn = modules[name]
        site = flow.sites.get(name)
        reason = _bn_reason(bn, site, flow.method)
        if reason is None:
            becomes = "removed" if bn_forward_is_standard(bn) else "identity"
            target, direction, reason = _choose_target(bn, site, modules, owners)
            if target is not None:
                pairs.append(FoldPair(name, target, direction, becomes, type(modules[target]).__name__))
                continue
        skips.append(Skip(name, reason))
    return FoldPlan(tuple(pairs), tuple(skips), flow.method, flow.note)


def _bn_reason(bn: nn.Module, site: BNSite | None, method: str) -> str | None:
    if site is None:
        if method == "recorded":
            return "did not run on the verification inputs, so its dataflow is unknown"
        return "is never called in the model's forward"
    if not has_statistics(bn):
        return (
            "has no running statistics (track_running_stats=False), so eval mode normalizes with batch "
            "statistics; run `bntool recalibrate` to give it statistics, then fold"
        )
    if site.calls > 1:
        return f"is called {site.calls} times in one forward pass; one fold cannot serve every call"
    return None


def _choose_target(bn, site: BNSite, modules, owners) -> tuple[str | None, str, str]:
    """Backward into the producer if exact, else forward into the single reader if exact."""
    if site.producer is not None:
        backward = _producer_reason(bn, site, modules, owners)
        if backward is None:
            return site.producer, "backward", ""
    elif site.producer_op == "input":
        backward = "is applied to a model input, so no layer produces what it normalizes"
    else:
        backward = f"an operation (`{site.producer_op}`) stands between its input's producer and the BN"
    if site.consumer is None:
        readers = ", ".join(f"`{c}`" for c in site.consumers) or "nothing"
        return None, "", f"{backward}; its output is read by {readers}, so it cannot fold forward either"
    forward = _consumer_reason(bn, site, modules, owners)
    if forward is None:
        return site.consumer, "forward", ""
    return None, "", f"{backward}; folding forward into `{site.consumer}` is not exact either: {forward}"


def _common_reason(module: nn.Module, name: str, calls: int, owners) -> str | None:
    if not isinstance(module, FOLDABLE_TYPES):
        return f"`{name}` is a {type(module).__name__}, which bntool cannot fold into"
    if not standard_forward(module, FOLDABLE_TYPES):
        return f"`{name}` is a {type(module).__name__} with its own forward, so its arithmetic is unknown"
    if calls > 1:
        return f"`{name}` is called {calls} times in one forward pass, and folding would change every call"
    shared = [o for o in owners.get(id(module.weight), ()) if o != name]
    if shared:
        return f"the weight of `{name}` is shared with `{shared[0]}`, which folding would change too"
    return None


def _producer_reason(bn, site: BNSite, modules, owners) -> str | None:
    producer = modules[site.producer]
    reason = _common_reason(producer, site.producer, site.producer_calls, owners)
    if reason:
        return reason
    others = [r for r in site.producer_readers if r != site.bn]
    if others:
        return f"the output of `{site.producer}` is also read by {', '.join(f'`{o}`' for o in others[:3])}"
    channels = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
    if channels != bn.num_features:
        return f"`{site.producer}` has {channels} output channels but the BN has {bn.num_features}"
    if isinstance(producer, nn.Linear) and site.input_rank != 2:
        return _linear_rank_reason(site)
    return None


def _consumer_reason(bn, site: BNSite, modules, owners) -> str | None:
    consumer = modules[site.consumer]
    if isinstance(consumer, TRANSPOSED):
        return f"`{site.consumer}` is a transposed conv, into which bntool folds only from the output side"
    reason = _common_reason(consumer, site.consumer, site.consumer_calls, owners)
    if reason:
        return reason
    channels = consumer.in_features if isinstance(consumer, nn.Linear) else consumer.in_channels
    if channels != bn.num_features:
        return f"`{site.consumer}` has {channels} input channels but the BN has {bn.num_features}"
    if isinstance(consumer, nn.Linear) and site.input_rank != 2:
        return _linear_rank_reason(site)
    if isinstance(consumer, CONVS) and consumer.padding_mode == "zeros" and _has_padding(consumer):
        return f"`{site.consumer}` zero-pads its input, and the padding would not see the BN's shift"
    return None


def _linear_rank_reason(site: BNSite) -> str:
    if site.input_rank is None:
        return "the rank of its input is unknown; pass example inputs"
    return (
        f"it normalizes axis 1 of a {site.input_rank}-D input, but the Linear's features are on the last axis"
    )


def _has_padding(conv: nn.Module) -> bool:
    padding = conv.padding
    if isinstance(padding, str):
        return padding != "valid" and any(k > 1 for k in conv.kernel_size)
    return any(p != 0 for p in padding)


def _parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners[id(param)].append(name)
    return owners


# ----------------------------------------------------------------------------- apply


def apply_plan(model: nn.Module, plan: FoldPlan) -> nn.Module:
    """Fold every pair of ``plan`` into ``model`` in place and return it."""
    sizes: dict[torch.device, int] = {}
    for pair in plan.pairs:  # one float64 buffer per device, for the largest weight, reused by every fold
        weight = model.get_submodule(pair.into).weight
        sizes[weight.device] = max(sizes.get(weight.device, 0), weight.numel())
    scratch = {device: torch.empty(n, dtype=torch.float64, device=device) for device, n in sizes.items()}
    for pair in plan.pairs:
        bn = model.get_submodule(pair.bn)
        target = model.get_submodule(pair.into)
        stats = (bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        if pair.direction == "backward":
            weight, bias = fold_into_producer(
                target.weight, target.bias, *stats,
                transposed=isinstance(target, TRANSPOSED), groups=getattr(target, "groups", 1), out=target.weight,
                scratch=scratch[target.weight.device],
            )
        else:
            weight, bias = fold_into_consumer(target.weight, target.bias, *stats, groups=getattr(target, "groups", 1))
        with torch.no_grad():
            if weight is not target.weight:
                target.weight.set_(weight)  # the new tensor itself: no second pass over the weights
            if target.bias is None:
                target.bias = nn.Parameter(bias.to(target.weight.device), requires_grad=target.weight.requires_grad)
            else:
                target.bias.copy_(bias)
        _retire_bn(model, pair.bn, bn, pair.bn_becomes)
    return model


def _retire_bn(model: nn.Module, name: str, bn: nn.Module, becomes: str) -> None:
    if becomes == "removed":
        model.set_submodule(name, nn.Identity())
        return
    mean, var = identity_statistics(bn.running_var, bn.eps)
    with torch.no_grad():
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        if bn.weight is not None:
            bn.weight.fill_(1.0)
            bn.bias.zero_()


def replay(model: nn.Module, step: dict[str, Any]) -> None:
    """Rebuild a recorded fold's structure: biases where they were added, BNs removed."""
    for pair in step.get("pairs", []):
        try:
            target = model.get_submodule(pair["into"])
            model.get_submodule(pair["bn"])
        except AttributeError:
            raise InputError(
                f"the file's recipe folds `{pair['bn']}` into `{pair['into']}`, but the model has no such "
                "layer; pass the --model the checkpoint was made from"
            ) from None
        if getattr(target, "bias", None) is None:
            w = target.weight
            channels = w.shape[1] * target.groups if isinstance(target, TRANSPOSED) else w.shape[0]
            target.bias = nn.Parameter(torch.zeros(channels, dtype=w.dtype, device=w.device))
        if pair["bn_becomes"] == "removed":
            model.set_submodule(pair["bn"], nn.Identity())


# ----------------------------------------------------------------------------- driver


def fold(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    *,
    inplace: bool = False,
    verify: bool = True,
    device: str | torch.device = "auto",
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
) -> tuple[nn.Module, FoldReport]:
    """Fold every BN that can be folded exactly; return the folded model and a report.

    ``example_inputs`` (a tensor or a tuple of tensors) are used to see the
    dataflow where fx cannot trace and to verify; when omitted they are drawn
    from the shape the model declares (``input_shape``). Verification runs the
    original and the folded model in eval mode and raises
    ``VerificationError`` (carrying the report) when they differ beyond the
    derived tolerance, at the outputs and at every folded layer. ``model`` is
    not changed unless ``inplace=True``.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    inputs = tuple(example_inputs) if example_inputs is not None else make_inputs(model, seed=seed)
    plan = plan_fold(model, inputs)
    original = copy.deepcopy(model) if inplace else model
    folded = apply_plan(model if inplace else copy.deepcopy(model), plan)
    comparison = None
    if verify:
        comparison = compare(original, folded, inputs, device=device, atol=atol, rtol=rtol, probes=plan.probes())
    report = FoldReport(plan, comparison)
    if comparison is not None and not comparison.passed:
        raise VerificationError(comparison.failure_message("the folded model"), report)
    return folded, report
