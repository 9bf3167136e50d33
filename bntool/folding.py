"""Fold BatchNorm into the layer that feeds it (or reads it), only where exact, and prove it.

``foldrules.plan_from_dataflow`` decides which BN folds into which layer;
``apply_plan`` does the surgery (producers and consumers get new weights and,
where needed, a bias; a folded BN is removed, or replaced by what its forward
does besides normalizing); ``fold`` runs both on a copy and verifies the
result against the original in eval mode, at the outputs and layer by layer.
A fold the layer-by-layer check blames is taken out of the plan, the rest is
planned, applied and verified again, and the report lists it as rejected, so
one bad pair never costs the user the others. ``replay`` rebuilds a recorded
fold's structure on a freshly built model (``bntool.load``).
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import recipe
from . import bnform
from .cloning import clone
from .spill import TensorStore
from .report import with_step
from .errors import InputError, VerificationError
from .foldmath import identity_statistics, scale_consumer, scale_producer, through_after, through_before
from .foldplan import TRANSPOSED, FoldPair, FoldPlan
from .foldrules import plan_from_dataflow
from .report import Skip
from .graph import dataflow
from .shapes import make_inputs
from .verify import Comparison, Reference, compare

__all__ = ["FoldReport", "Journal", "apply_plan", "fold", "replay"]

#: Rounds of "drop the folds verification blames, plan again" before giving up.
MAX_ROUNDS = 16


@dataclass(frozen=True)
class FoldReport:
    """The plan that was applied, its verification, and the folds verification rejected (``skipped`` has them too)."""

    plan: FoldPlan
    comparison: Comparison | None
    rejected: tuple[Skip, ...] = ()
    #: the original's outputs on the example inputs (own dtype, and float64 for the derived tolerance; no layers),
    #: for later checks on the same inputs (export's onnxruntime check) without running the original again
    reference: Reference | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def done(self) -> tuple[FoldPair, ...]:
        return self.plan.pairs

    @property
    def skipped(self) -> tuple[Skip, ...]:
        return self.plan.skips

    @property
    def passed(self) -> bool:
        return self.comparison is None or self.comparison.passed

    def recipe_step(self) -> dict[str, Any]:
        return self.plan.recipe_step()

    def to_dict(self) -> dict[str, Any]:
        return {
            "folded": [dataclasses.asdict(p) for p in self.plan.pairs],
            "skipped": [{"bn": s.name, "reason": s.reason} for s in self.plan.skips],
            "rejected_by_verification": [{"bn": s.name, "reason": s.reason} for s in self.rejected],
            "dataflow": self.plan.method,
            "note": self.plan.note,
            "verification": self.comparison.to_dict() if self.comparison else None,
        }


# ----------------------------------------------------------------------------- apply


class Journal:
    """What folding in place replaced, so that it can be undone: old parameters and buffers (their values in a
    ``TensorStore``, on disk when large) and old modules."""

    def __init__(self) -> None:
        self.store = TensorStore()
        self.entries: list[tuple] = []

    def tensor(self, module: nn.Module, name: str) -> None:
        old = getattr(module, name)
        key = str(len(self.entries))
        if old is not None:
            self.store.put(key, old)
        is_parameter = name in module._parameters
        self.entries.append(("tensor", module, name, key if old is not None else None, is_parameter,
                             bool(old is not None and old.requires_grad)))

    def module(self, model: nn.Module, name: str) -> None:
        self.entries.append(("module", model, name, model.get_submodule(name)))

    def undo(self) -> None:
        for entry in reversed(self.entries):
            if entry[0] == "module":
                entry[1].set_submodule(entry[2], entry[3])
                continue
            _, module, name, key, is_parameter, grad = entry
            value = self.store.get(key) if key is not None else None
            if is_parameter:
                setattr(module, name, None if value is None else nn.Parameter(value, requires_grad=grad))
            else:
                module.register_buffer(name, value)
        self.entries.clear()
        self.store.close()
        self.store = TensorStore()


def apply_plan(model: nn.Module, plan: FoldPlan, journal: Journal | None = None) -> nn.Module:
    """Fold every pair of ``plan`` into ``model`` in place and return it.

    Every tensor that changes is replaced by a new one (never written into),
    so a copy that still shares its untouched tensors with the original (see
    ``fold``) leaves the original intact. ``journal`` records what is
    replaced, to undo it.
    """
    forms: dict[str, bnform.NormForm] = {}
    scales: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    scratch: dict[torch.device, torch.Tensor] = {}
    for pair in plan.pairs:
        bn = model.get_submodule(pair.bn)
        if pair.bn not in forms:
            forms[pair.bn] = bnform.analyze(bn, pair.rank)
            scales[pair.bn] = bnform.scale_shift(bn, forms[pair.bn], pair.rank)
        k, c = scales[pair.bn]
        target = model.get_submodule(pair.into)
        a, s = pair.through
        if pair.direction == "backward":
            k, c = through_before(k, c, a, s)
            k, c = _per_channel(k, c, _channels(target, output=True))
            device = target.weight.device
            if device not in scratch or scratch[device].numel() < target.weight.numel():
                scratch[device] = torch.empty(target.weight.numel(), dtype=torch.float64, device=device)
            weight, bias = scale_producer(target.weight, target.bias, k, c, transposed=isinstance(target, TRANSPOSED),
                                          groups=getattr(target, "groups", 1), scratch=scratch[device])
        else:
            k, c = through_after(k, c, a, s)
            k, c = _per_channel(k, c, _channels(target, output=False))
            weight, bias = scale_consumer(target.weight, target.bias, k, c, groups=getattr(target, "groups", 1))
        if journal is not None:
            journal.tensor(target, "weight")
            journal.tensor(target, "bias")
        _set_weight_and_bias(target, weight, bias)
    becomes = {p.bn: p.bn_becomes for p in plan.pairs}
    for name, form in forms.items():
        bn = model.get_submodule(name)
        if journal is not None:
            if becomes[name] == "identity":
                for key in ("running_mean", "running_var", "weight", "bias"):
                    journal.tensor(bn, key)
            else:
                journal.module(model, name)
        _retire_bn(model, name, bn, becomes[name], form)
    return model


def _channels(layer: nn.Module, *, output: bool) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features if output else layer.in_features
    return layer.out_channels if output else layer.in_channels


def _per_channel(k: torch.Tensor, c: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A one-channel BN's ``k`` and ``c`` apply to every channel of the layer."""
    if k.numel() == 1 and channels != 1:
        return k.expand(channels).clone(), c.expand(channels).clone()
    return k, c


def _set_weight_and_bias(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    old_weight, old_bias = layer.weight, layer.bias
    layer.weight = nn.Parameter(weight.detach(), requires_grad=old_weight.requires_grad)
    grad = old_bias.requires_grad if old_bias is not None else old_weight.requires_grad
    dtype = old_bias.dtype if old_bias is not None else old_weight.dtype
    layer.bias = nn.Parameter(bias.detach().to(device=old_weight.device, dtype=dtype), requires_grad=grad)


def _retire_bn(model: nn.Module, name: str, bn: nn.Module, becomes: str, form: bnform.NormForm) -> None:
    if becomes == "identity":
        mean, var = identity_statistics(bn.running_var, bn.eps)
        bn.running_mean = mean
        bn.running_var = var
        if bn.weight is not None:
            bn.weight = nn.Parameter(torch.ones_like(bn.weight), requires_grad=bn.weight.requires_grad)
        if bn.bias is not None:
            bn.bias = nn.Parameter(torch.zeros_like(bn.bias), requires_grad=bn.bias.requires_grad)
        return
    replacement = bnform.remainder(bn, form) if becomes == "rewritten" else None
    replacement = replacement if replacement is not None else nn.Identity()
    replacement._forward_hooks.update(bn._forward_hooks)  # a user's hook sees the same output as before
    replacement._forward_hooks_with_kwargs.update(bn._forward_hooks_with_kwargs)
    replacement._forward_hooks_always_called.update(bn._forward_hooks_always_called)
    model.set_submodule(name, replacement)


# ----------------------------------------------------------------------------- replay


def replay(model: nn.Module, step: dict[str, Any]) -> None:
    """Rebuild a recorded fold's structure: biases where they were added, BNs removed or rewritten."""
    retired: dict[str, dict[str, Any]] = {}
    for pair in step.get("pairs", []):
        try:
            target = model.get_submodule(pair["into"])
            model.get_submodule(pair["bn"])
        except (AttributeError, KeyError, TypeError):
            raise InputError(
                f"the file's recipe folds `{pair.get('bn')}` into `{pair.get('into')}`, but the model has no such "
                "layer; build the model from the code the checkpoint was made from"
            ) from None
        if getattr(target, "bias", None) is None:
            w = target.weight
            channels = w.shape[1] * target.groups if isinstance(target, TRANSPOSED) else w.shape[0]
            target.bias = nn.Parameter(torch.zeros(channels, dtype=w.dtype, device=w.device))
        retired[pair["bn"]] = pair
    for name, pair in retired.items():
        becomes = pair.get("bn_becomes")
        if becomes == "identity":
            continue
        bn = model.get_submodule(name)
        form = bnform.analyze(bn, pair.get("rank"))
        if becomes == "rewritten" and (form.kind != "traced" or form.removable):
            raise InputError(f"the file's recipe rewrites `{name}` without its normalization, but this model's "
                             f"`{type(bn).__name__}` does not compute what it did when the file was written; pass "
                             "the model from the code the checkpoint was made from")
        _retire_bn(model, name, bn, becomes, form)


# ----------------------------------------------------------------------------- driver


def fold(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    *,
    inplace: bool = False,
    verify: bool = True,
    strict: bool = False,
    device: str | torch.device = "auto",
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
) -> tuple[nn.Module, FoldReport]:
    """Fold every BN that can be folded exactly; return the folded model and a report.

    ``example_inputs`` (a tensor or a tuple of tensors) are used to see the
    dataflow where fx cannot trace, to measure shapes where a rule needs them,
    and to verify; when omitted they are drawn from the shape the model
    declares (``input_shape``). Verification runs the original and the folded
    model in eval mode and compares them at the outputs and at every folded
    layer, within the derived tolerance. A fold it blames is taken out (the
    report's ``rejected``), and the rest is folded and verified again; with
    ``strict=True`` any failure raises ``VerificationError`` (carrying the
    report) instead. ``model`` is not changed unless ``inplace=True``: then
    the original's outputs are computed first and the fold is made on
    ``model`` itself (what it replaces is kept aside, on disk when large, to
    undo a rejected fold), so that no second model is held in memory.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    inputs = tuple(example_inputs) if example_inputs is not None else make_inputs(model, seed=seed)
    flow = dataflow(model, inputs)
    rejected: dict[str, str] = {}
    reference = None
    journal = Journal() if inplace else None
    for _ in range(MAX_ROUNDS):
        plan = plan_from_dataflow(model, flow, rejected)
        if verify and reference is None:  # first, while the model is the original; later plans check fewer points
            points = [*plan.probes(), *(p.into for p in plan.pairs if p.direction == "forward")]
            reference = Reference.of(model, inputs, device=device, probes=points, float64=atol is None and rtol is None)
        fan_in = plan.fan_in(model)
        folded = apply_plan(model, plan, journal) if inplace else apply_plan(_copy_for(model, plan), plan)
        comparison = None
        if not verify:
            break
        comparison = compare(None, folded, inputs, atol=atol, rtol=rtol, probes=plan.probes(), reference=reference,
                             fan_in=fan_in)
        blamed = {} if comparison.passed or strict else _blame(plan, comparison)
        if comparison.passed or not blamed:
            break
        rejected.update(blamed)
        if journal is not None:
            journal.undo()  # back to the original, to fold the rest
    if inplace:
        gc.collect()  # the dataflow's traced structures hold the replaced tensors in reference cycles: free them now
    outputs_only = dataclasses.replace(reference, layers={}, layer_deltas={}) if reference is not None else None
    report = FoldReport(plan, comparison, tuple(s for s in plan.skips if s.bn in rejected), outputs_only)
    if comparison is not None and not comparison.passed:
        if journal is not None:
            journal.undo()  # a failed in-place fold leaves the model as it was
        raise VerificationError(comparison.failure_message("the folded model"), report)
    return with_step(folded, plan.recipe_step()), report


def _copy_for(model: nn.Module, plan: FoldPlan) -> nn.Module:
    """A copy of ``model`` that owns every tensor, without copying the ones ``apply_plan`` will replace."""
    replaced: list[torch.Tensor] = []
    for pair in plan.pairs:
        target = model.get_submodule(pair.into)
        replaced += [t for t in (target.weight, target.bias) if t is not None]
        bn = model.get_submodule(pair.bn)
        names = ("running_mean", "running_var", "weight", "bias") if pair.bn_becomes == "identity" else None
        replaced += [t for key, t in [*bn.named_parameters(recurse=False), *bn.named_buffers(recurse=False)]
                     if t is not None and (names is None or key in names)]
    return clone(model, share=replaced)


def _blame(plan: FoldPlan, comparison: Comparison) -> dict[str, str]:
    """The folds behind the first layer (in execution order) that verification failed, with the reason."""
    for output in comparison.outputs:
        if output.passed or not output.name.startswith("layer `"):
            continue
        point = output.name.split("`")[1]
        pairs = plan.pairs_checked_at(point)
        if pairs:
            return {p.bn: (f"rejected by verification: folded into `{p.into}`, layer `{point}` differed from the "
                           f"original by {output.max_abs_error:.3g} (tolerance {output.tolerance:.3g})")
                    for p in pairs}
    return {}


recipe.register("fold", replay)
