"""``bntool.fold`` of a ``torch.export`` program: plan, apply to a new program, verify, drop blamed folds.

The program front end of the fold (``fold.fold`` hands an ``ExportedProgram``
here). The plan (``program.plan_program``) and the surgery
(``program_apply.apply_program``) make a new program; verification runs the
original's and the folded program's ``module()`` on the same inputs and
compares every output and every folded layer (the folded node's output)
within the tolerance derived from the original's own rounding (its float64
run). A fold the layer check blames is left out, with its reason, and the
rest is folded and verified again. The report is the module fold's
``FoldReport``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.export import ExportedProgram

from ..errors import InputError, VerificationError, first_line
from ..graph.program import ProgramGraph
from ..verify.program import ProgramReference, compare_program, flat_inputs
from . import reasons
from .plan import FoldPlan
from .program import ProgramFold, ProgramPlan, plan_program
from .program_apply import apply_program

#: Rounds of "drop the folds verification blames, plan again" before giving up.
MAX_ROUNDS = 16


def fold_program(program: ExportedProgram, example_inputs: Any = None, *, report_type: type, verify: bool = True,
                 strict: bool = False, seed: int = 0, atol: float | None = None,
                 rtol: float | None = None, input_shapes: Sequence[tuple[int, ...]] | None = None) -> tuple[ExportedProgram, Any]:
    """Fold every BN node of ``program`` that can be folded exactly into a NEW program; ``program`` is unchanged.

    Inputs for verification: ``example_inputs`` (a tuple of the program's
    arguments, or ``(args, kwargs)``), else the example inputs stored in the
    program, else tensors of ``input_shapes``, else of the program's own
    input specs where they are static. A program with a BN in train mode is
    refused (``InputError``). The program runs where its tensors are (a
    program is exported for its device); it is never changed in place. The report is a ``report_type`` (``fold.FoldReport``, which ``fold`` passes in:
    one report shape for every front end).
    """
    first = plan_program(program)
    if first.training:
        skip = first.training[0]
        raise InputError(f"BatchNorm `{skip.name}` {skip.reason}" + (
            f" ({len(first.training) - 1} more like it)" if len(first.training) > 1 else ""))
    flat = flat_inputs(program, program_inputs(program, example_inputs, input_shapes, seed)) if verify else []
    rejected: dict[str, str] = {}
    reference = None
    planned: ProgramPlan = first
    for _ in range(MAX_ROUNDS):
        if rejected:
            planned = plan_program(program, rejected)
        folded, renamed = apply_program(program, planned.links)
        if not verify:
            return folded, report_type(planned.plan, None, verified=False)
        pg = ProgramGraph(program)
        labels = _labels(planned.links, pg)
        probes = _after(planned.links, renamed, labels)
        if reference is None:
            reference = ProgramReference.of(program, flat, [p for p, _ in probes.values()],
                                            float64=atol is None and rtol is None)
        try:
            comparison = compare_program(reference, folded, flat, probes, atol=atol, rtol=rtol,
                                         fan_in=fan_in(planned.links, pg, labels))
        except Exception as exc:  # the original ran on these inputs: the fold broke the program
            raise VerificationError(f"the folded program failed to run on inputs the original runs on "
                                    f"({type(exc).__name__}: {first_line(exc, 200)}); nothing was folded",
                                    report_type(planned.plan, None)) from exc
        if comparison.passed:
            break
        blamed = {} if strict else _blame(planned, comparison, labels)
        if not blamed:
            break
        rejected.update(blamed)
    report = report_type(planned.plan, comparison, tuple(s for s in planned.plan.skips if s.bn in rejected))
    if not comparison.passed:
        raise VerificationError(comparison.failure_message("the folded program"), report)
    return folded, report


def _labels(links, pg: ProgramGraph) -> dict[str, str]:
    """Each check point (a node name) as the user knows it: the BN whose output it is, else the layer."""
    labels = {link.layer.node.name: pg.layer_name(link.layer.node) for link in links}
    labels.update({link.site.output.name: link.site.name for link in links if link.direction == "backward"})
    return labels


def _after(links, renamed: dict[str, str], labels: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Per check point (by label): the original's node and the folded program's node that carries the same value
    (a folded BN's output is carried by its input; an ``mm`` given a bias became an ``addmm``)."""
    carried = {link.site.output.name: link.site.input.name for link in links if link.direction == "backward"}
    return {labels[link.point]: (link.point, renamed.get(carried.get(link.point, link.point),
                                                         carried.get(link.point, link.point))) for link in links}


def _blame(planned: ProgramPlan, comparison, labels: dict[str, str]) -> dict[str, str]:
    """The folds behind the first failing layer check, with the reason."""
    for output in comparison.outputs:
        if output.passed or not output.name.startswith("layer `"):
            continue
        point = output.name.split("`")[1]
        pairs = [link for link in planned.links if labels[link.point] == point]
        if pairs:
            return {link.site.name: reasons.rejected(link.layer.name, point, output.max_abs_error, output.tolerance)
                    for link in pairs}
    return {}


def program_inputs(program: ExportedProgram, example_inputs: Any, input_shapes, seed: int) -> Any:
    """The inputs verification runs the program on (see ``fold_program``)."""
    if example_inputs is not None:
        return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if program.example_inputs is not None:
        return program.example_inputs
    users = [s for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    if input_shapes:
        if len(input_shapes) != len(users):
            raise InputError(f"the program takes {len(users)} input(s) but `input_shapes` gives "
                             f"{len(input_shapes)} shape(s); give one per input")
        shapes = [tuple(s) for s in input_shapes]
    else:
        shapes = []
        for spec in users:
            val = placeholders[spec.arg.name].meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise InputError(f"the program's input `{spec.arg.name}` is not a tensor and the program stores no "
                                 "example inputs; pass `example_inputs`")
            if not all(isinstance(d, int) for d in val.shape):
                raise InputError(f"the program's input `{spec.arg.name}` has a dynamic shape "
                                 f"({', '.join(str(d) for d in val.shape)}) and the program stores no example "
                                 "inputs; pass `input_shapes` (one shape per input)")
            shapes.append(tuple(val.shape))
    generator = torch.Generator().manual_seed(seed)
    vals = [placeholders[s.arg.name].meta.get("val") for s in users]
    return tuple(torch.randn(shape, generator=generator).to(
        dtype=val.dtype if isinstance(val, torch.Tensor) else torch.float32,
        device=val.device if isinstance(val, torch.Tensor) else "cpu") for shape, val in zip(shapes, vals))


def plan_only(program: ExportedProgram) -> FoldPlan:
    """What ``fold_program`` would fold, without folding (``bntool inspect``)."""
    return plan_program(program).plan


def fan_in(links: tuple[ProgramFold, ...], pg: ProgramGraph, labels: dict[str, str]) -> dict[str, int]:
    """Per check point (and ``""`` for the outputs): the largest fan-in of the folded weights it depends on."""
    sizes: dict[str, int] = {}
    for link in links:
        shape = pg.tensor(link.layer.weight).shape
        inner = math.prod(shape[2:])
        if link.layer.kind == "transposed":
            size = shape[0] // link.layer.groups * inner
        elif link.layer.kind == "linear":
            size = shape[1 - link.layer.out_axis]
        else:
            size = shape[1] * inner
        label = labels[link.point]
        sizes[label] = max(sizes.get(label, 0), size)
    sizes[""] = max(sizes.values(), default=0)
    return sizes
