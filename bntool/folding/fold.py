"""Fold BatchNorm into the layer that feeds it (or reads it), only where exact, and prove it.

``foldrules.plan_from_dataflow`` decides which BN folds into which layer;
``foldapply.apply_plan`` does the surgery (producers and consumers get new
weights and, where needed, a bias; a folded BN is removed, or replaced by what
its forward does besides normalizing); ``fold`` runs both on a copy and verifies the
result against the original in eval mode, at the outputs and layer by layer.
A fold the layer-by-layer check blames is taken out of the plan, the rest is
planned, applied and verified again, and the report lists it as rejected, so
one bad pair never costs the user the others. ``apply.replay`` rebuilds
a recorded fold's structure on a freshly built model (``bntool.load``); it is
registered here, with the operation.
"""

from __future__ import annotations

import dataclasses
import gc
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram

from ..deprecation import UNSET, positional
from ..errors import BntoolError, InputError, VerificationError, first_line, out_of_memory, require_module
from ..graph.dataflow import dataflow
from ..report import Skip, contract, skip_entries, with_step
from ..runtime.cloning import clone
from ..runtime.shapes import make_inputs
from ..selection import unselected_bns
from ..verify.compare import Comparison, Reference, compare_layers
from .apply import Journal, Submodules, apply_plan
from .plan import FoldPair, FoldPlan
from .program_fold import fold_program
from .reparam import MergeReport
from .reparam import merge_branches as merge_into_convs
from .rules import plan_from_dataflow

__all__ = ["FoldReport", "fold"]

#: Rounds of "drop the folds verification blames, plan again" before giving up.
MAX_ROUNDS = 16


@dataclass(frozen=True)
class FoldReport:
    """The plan that was applied, its verification, and the folds verification rejected (``skipped`` has them too).

    ``verified`` is False with ``verify=False``: then ``passed`` is None (not verified).
    """

    plan: FoldPlan
    comparison: Comparison | None
    rejected: tuple[Skip, ...] = ()
    #: the original's outputs on the example inputs (own dtype, and float64 for the derived tolerance; no layers),
    #: for later checks on the same inputs (export's onnxruntime check) without running the original again
    reference: Reference | None = dataclasses.field(default=None, repr=False, compare=False)
    verified: bool = True
    #: the parallel branches merged into one conv before folding (``merge_branches``)
    merge: MergeReport | None = None

    @property
    def done(self) -> tuple[FoldPair, ...]:
        return self.plan.pairs

    @property
    def skipped(self) -> tuple[Skip, ...]:
        return self.plan.skips

    @property
    def passed(self) -> bool | None:
        """True if verified, False if verification failed (or the folded model did not run), None if not verified."""
        if not self.verified:
            return None
        return self.comparison is not None and self.comparison.passed

    def recipe_step(self) -> dict[str, Any]:
        return self.plan.recipe_step()

    def to_dict(self) -> dict[str, Any]:
        # (``bn`` beside ``layer`` in the skip entries: the older key, kept for one release)
        return {
            **contract("fold", self, dict.fromkeys(p.bn for p in self.plan.pairs),
                       self.comparison.to_dict() if self.comparison else None, old_name="bn"),
            "folded": [dataclasses.asdict(p) for p in self.plan.pairs],
            "rejected_by_verification": skip_entries(self.rejected, old_name="bn"),
            "dataflow": self.plan.method,
            "note": self.plan.note,
            **({"merge": self.merge.to_dict()} if self.merge is not None else {}),
        }



# ----------------------------------------------------------------------------- driver


def fold(
    model: nn.Module,
    _example_inputs: Any = UNSET,
    /,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    inplace: bool = False,
    verify: bool = True,
    device: str | torch.device = "auto",
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    strict: bool = False,
    merge_branches: bool = True,
) -> tuple[nn.Module, FoldReport]:
    """Fold every selected BN that can be folded exactly; return the folded model and a report.

    ``include`` / ``exclude``: fnmatch patterns on qualified names, as for
    every bntool operation (``bntool.selection``); a BN not selected is left,
    with the reason, among the report's ``skipped``.

    ``example_inputs`` (a tensor, or a tuple of the forward's arguments: each
    a tensor or a list / tuple / dict of tensors) are used to see the
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
    With ``merge_branches`` (the default), parallel branches of one input that
    are summed (RepVGG, MobileOne, ...) are first merged into one conv in the
    module that adds them and verified (``reparam.merge_branches``; the
    report's ``merge``); the fold then runs on that model. A selection
    (``include`` / ``exclude``) that leaves a BN out turns merging off.
    """
    example_inputs = positional("example_inputs", _example_inputs, example_inputs, "fold")
    if isinstance(model, ExportedProgram):  # a torch.export program: folded into a new program (``program_fold``)
        if include is not None or exclude is not None:
            raise InputError("`include` / `exclude` are not available for a torch.export program; fold it whole")
        return fold_program(model, example_inputs, verify=verify, strict=strict, seed=seed, atol=atol, rtol=rtol,
                            report_type=FoldReport)
    require_module(model)
    unselected = unselected_bns(model, include, exclude)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    inputs = tuple(example_inputs) if example_inputs is not None else make_inputs(model, seed=seed)
    flow, merged = dataflow(model, inputs), None
    if merge_branches and not unselected:  # (a merge takes whole blocks: not under a selection of BNs)
        user, (model, merged) = model, merge_into_convs(model, inputs, verify=verify, strict=strict, device=device,
                                                        atol=atol, rtol=rtol, flow=flow)
        if merged.merges:
            if inplace:
                _transplant(user, model, merged)
                model = user
            flow = dataflow(model, inputs)
    rejected: dict[str, str] = {}
    reference = None
    journal = Journal() if inplace else None
    for _ in range(MAX_ROUNDS):
        forms: dict = {}  # what each BN computes, traced once for both the plan and the surgery
        plan = plan_from_dataflow(model, flow, {**unselected, **rejected}, forms)
        if verify and reference is None:  # first, while the model is the original; later plans check fewer points
            points = [*plan.probes(), *(p.into for p in plan.pairs if p.direction == "forward")]
            reference = Reference.of(model, inputs, device=device, probes=points, float64=atol is None and rtol is None)
        fan_in = plan.fan_in(model) if verify else None
        folded = apply_plan(model if inplace else _copy_for(model, plan), plan, journal, forms)
        if inplace:  # the replaced tensors sit in reference cycles (the traced structures): free them before the check
            gc.collect()
        comparison = None
        if not verify:
            break
        crashed = None
        try:
            comparison = compare_layers(None, folded, inputs, atol=atol, rtol=rtol, probes=plan.probes(),
                                        reference=reference, fan_in=fan_in)
        except Exception as exc:  # noqa: BLE001 - the original ran on these inputs: the fold broke the forward
            crashed = _the_failure(exc)
            blamed = {} if strict else _blame_crash(plan, folded, crashed)
        else:
            blamed = {} if comparison.passed or strict else _blame(plan, comparison)
            if comparison.passed:
                break
        if not blamed:
            if crashed is not None:
                if journal is not None:
                    journal.undo()  # a failed in-place fold leaves the model as it was
                report = FoldReport(plan, None, tuple(s for s in plan.skips if s.bn in rejected))
                raise VerificationError(f"the folded model failed to run on inputs the original runs on "
                                        f"({_one_line(crashed)}); nothing was folded", report) from crashed
            break
        rejected.update(blamed)
        if journal is not None:
            journal.undo()  # back to the original, to fold the rest
    else:
        if crashed is not None:  # (every round ended in a crash it could blame: never return an unverified model)
            if journal is not None:
                journal.undo()
            raise VerificationError(f"the folded model failed to run ({_one_line(crashed)}); nothing was folded",
                                    FoldReport(plan, None)) from crashed
    if inplace:
        gc.collect()  # the dataflow's traced structures hold the replaced tensors in reference cycles: free them now
    outputs_only = dataclasses.replace(reference, layers={}, layer_deltas={}) if reference is not None else None
    report = FoldReport(plan, comparison, tuple(s for s in plan.skips if s.bn in rejected), outputs_only,
                        verified=verify, merge=merged)
    if comparison is not None and not comparison.passed:
        if journal is not None:
            journal.undo()  # a failed in-place fold leaves the model as it was
        raise VerificationError(comparison.failure_message("the folded model"), report)
    return with_step(folded, plan.recipe_step()), report


def _transplant(user: nn.Module, merged_model: nn.Module, report: MergeReport) -> None:
    """Fold in place: the verified merged blocks go into the user's model, which then carries the merge step."""
    for m in report.merges:
        parent, _, key = m.block.rpartition(".")
        user.get_submodule(parent)._modules[key] = merged_model.get_submodule(m.block)
    with_step(user, report.recipe_step())


def _copy_for(model: nn.Module, plan: FoldPlan) -> nn.Module:
    """A copy of ``model`` that owns every tensor, without copying the ones ``apply_plan`` will replace.

    A BN that folding removes is not copied at all: the copy holds the original
    module until ``apply_plan`` puts ``nn.Identity`` in its place, reading it
    and never changing it (unless the model holds it at two places).
    """
    replaced: list[torch.Tensor] = []
    removed: list[nn.Module] = []
    places = Counter(id(m) for m in model.modules(remove_duplicate=False))
    lookup = Submodules(model)
    for pair in plan.pairs:
        target = lookup[pair.into]
        replaced += [t for t in (target.weight, target.bias) if t is not None]
        bn = lookup[pair.bn]
        if pair.bn_becomes == "removed" and places[id(bn)] == 1:  # (a module at two places is copied)
            removed.append(bn)
            continue
        names = ("running_mean", "running_var", "weight", "bias") if pair.bn_becomes == "identity" else None
        replaced += [t for key, t in [*bn._parameters.items(), *bn._buffers.items()]  # (its own, not its children's)
                     if t is not None and (names is None or key in names)]
    return clone(model, share=replaced, keep=removed)


def _the_failure(exc: BaseException) -> BaseException:
    """What the model raised (running it turns a model's complaint into an ``InputError`` about the inputs, which
    does not apply here: the original ran on them). Running out of memory is not the fold's fault: raised on."""
    cause = exc.__cause__ if isinstance(exc, InputError) and exc.__cause__ is not None else exc
    if out_of_memory(cause) or (isinstance(exc, BntoolError) and exc.__cause__ is None):
        raise exc
    return cause


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc, 200)}" if str(exc).strip() else type(exc).__name__


def _blame_crash(plan: FoldPlan, folded: nn.Module, exc: BaseException) -> dict[str, str]:
    """The folds whose replacement module or folded layer the failure was raised in (the innermost one in the
    traceback): a forward that reads ``self.bn.affine`` of a BN folding replaced, say."""
    lookup = Submodules(folded)
    suspects: dict[int, list[FoldPair]] = {}
    for pair in plan.pairs:
        if pair.bn_becomes != "identity":
            suspects.setdefault(id(lookup[pair.bn]), []).append(pair)
        suspects.setdefault(id(lookup[pair.into]), []).append(pair)
    tb, found = exc.__traceback__, None
    while tb is not None:  # outermost to innermost: the last match is the innermost
        owner = tb.tb_frame.f_locals.get("self")
        if owner is not None and id(owner) in suspects:
            found = suspects[id(owner)]
        tb = tb.tb_next
    return {p.bn: f"rejected by verification: the folded model failed to run ({_one_line(exc)}) in what replaced or "
                  f"absorbed it; the forward uses it as more than a layer" for p in found or ()}


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
