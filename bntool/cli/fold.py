"""``bntool fold``."""

from __future__ import annotations

from typing import Annotated

import typer

from .app import app
from .options import (
    AllowPickleOpt,
    AtolOpt,
    CheckpointArg,
    DeviceOpt,
    DryRunOpt,
    ExcludeOpt,
    ForceOpt,
    InputShapeOpt,
    JsonOpt,
    KeyOpt,
    ModelArgsOpt,
    ModelOpt,
    OutOpt,
    RtolOpt,
    SeedOpt,
    SelectIncludeOpt,
    StripPrefixOpt,
)

StrictOpt = Annotated[
    bool,
    typer.Option("--strict", help="Fail (exit 1, nothing written) if verification rejects any fold, instead of "
                 "leaving those BatchNorms as they are and writing the verified rest."),
]
MergeBranchesOpt = Annotated[
    bool,
    typer.Option("--merge-branches/--no-merge-branches", help="First merge parallel conv / BN / identity branches "
                 "of one input that are summed (RepVGG, MobileOne, FastViT...) into one conv, verified; "
                 "--no-merge-branches leaves them to the fold alone."),
]


@app.command()
def fold(
    checkpoint: CheckpointArg,
    model: ModelOpt = None,
    model_args: ModelArgsOpt = None,
    key: KeyOpt = None,
    allow_pickle: AllowPickleOpt = False,
    strip_prefix: StripPrefixOpt = True,
    include: SelectIncludeOpt = None,
    exclude: ExcludeOpt = None,
    input_shape: InputShapeOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    out: OutOpt = None,
    force: ForceOpt = False,
    dry_run: DryRunOpt = False,
    strict: StrictOpt = False,
    merge_branches: MergeBranchesOpt = True,
    json: JsonOpt = False,
) -> None:
    """Fold every BatchNorm that can be folded exactly into the conv / linear next to it.

    The folded model is checked against the original in eval mode, at the
    outputs and at every folded layer; the written file is reloaded into a
    fresh model that must be identical to the verified one. A BN that cannot
    be folded exactly is left as it is, with the reason. A fold that
    verification blames is left too (exit 0, with a warning; exit 1 with
    --strict) and the rest is verified again without it.

    An .onnx file needs no --model: its BatchNormalization nodes are folded
    in the graph, verified in onnxruntime against the original (every output
    and every folded layer), and the file is written only if it passes
    onnx.checker and runs; --input-shape gives the shapes of inputs with
    dynamic dimensions. A torch.export program (.pt2) needs no --model either:
    it is folded as a program, verified through its module(), and written as
    a program that torch.export.load reads back.
    """
    if checkpoint.suffix.lower() == ".onnx" and model is None:  # the graph is in the file
        from .fold_onnx import fold_file

        fold_file(checkpoint, out=out, force=force, dry_run=dry_run, strict=strict, atol=atol, rtol=rtol,
                  input_shape=input_shape, seed=seed, json=json, render=_render, include=include, exclude=exclude)
        return
    if checkpoint.suffix.lower() == ".pt2":  # a torch.export program: its own front end (``cli/program``)
        from ..errors import InputError
        from . import console
        from .program import fold_file

        console.use_stderr_for_humans(json)
        if include or exclude:
            raise InputError("--include / --exclude are not available for a torch.export program; fold it whole")
        return fold_file(checkpoint, model=model, out=out, force=force, dry_run=dry_run, strict=strict,
                         input_shape=input_shape, seed=seed, atol=atol, rtol=rtol, json=json,
                         allow_pickle=allow_pickle, render=_render)
    from ..folding.fold import fold as fold_model
    from .common import Loading, Operation, run_operation

    def operate(source, inputs, target):
        # in place: the original's outputs are computed first, so one model is held (undone if it fails)
        return fold_model(source.model, include=include or None, exclude=exclude or None, example_inputs=inputs,
                          inplace=True, device=target, atol=atol, rtol=rtol, strict=strict,
                          merge_branches=merge_branches)

    run_operation(Operation(
        "fold", Loading(checkpoint, model, model_args, key, allow_pickle, strip_prefix), operate,
        lambda result, report: _render_any(result, report, json), as_json=json, device=device, out=out, suffix="folded",
        force=force, dry_run=dry_run, input_shape=input_shape, seed=seed))


def _render_any(result: dict, report, as_json: bool) -> None:
    if hasattr(report, "plan"):
        _render(result, report, as_json)
    else:  # the merge of branches failed verification, before any fold
        _render_merge(report, as_json, result)


def _render(result: dict, report, as_json: bool) -> None:
    from . import console
    from .tables import render_comparison, worst_summary

    for skip in report.rejected:  # on stderr, also with --json
        console.warning(f"`{skip.bn}` was not folded: {skip.reason}; the rest was verified without it "
                        "(pass --strict to fail instead)")
    if as_json:
        console.print_json(result)
        return
    if report.merge is not None:
        _render_merge(report.merge, as_json, result)
    plan = report.plan
    rows = [[p.bn, p.into, p.into_type, p.direction, _becomes(p)] for p in plan.pairs]
    if rows:
        failed = report.comparison is None or not report.comparison.passed  # (the CLI always verifies)
        title = (f"Tried to fold {len(rows)} BatchNorm layer(s); the result failed verification and was not kept"
                 if failed else f"Folded {len(rows)} BatchNorm layer(s)")
        console.table(title, ["BatchNorm", "into", "type", "direction", "BN becomes"], rows)
    if plan.skips:
        console.table(f"Left {len(plan.skips)} BatchNorm layer(s) as they are", ["BatchNorm", "reason"],
                      [[s.bn, s.reason] for s in plan.skips])
    if not plan.pairs and not plan.skips:
        console.line("No BatchNorm layers left; nothing to fold." if report.merge is not None and report.merge.merges
                     else "The model has no BatchNorm layers; nothing to fold.")
    if plan.note:
        console.line(f"Note: {plan.note}", style="yellow")

    if report.comparison is not None:
        render_comparison(report.comparison, "Verification: folded vs original (eval mode)")
        c = report.comparison
        if c.passed:
            layers = sum(o.name.startswith("layer `") for o in c.outputs)
            console.success(
                f"Verified on {c.device}: {len(c.outputs) - layers} output(s) and {layers} folded layer(s) "
                f"within tolerance ({worst_summary(c)})."
            )
    if result.get("written"):
        console.success(f"Wrote {result['output']} (reloaded and verified before it was renamed into place).")
    elif result.get("dry_run", False):
        console.line("Dry run: nothing written.")


def _render_merge(merge, as_json: bool, result: dict) -> None:
    from . import console
    from .common import render_comparison

    for skip in merge.rejected:
        console.warning(f"{skip.name} was not merged: {skip.reason}; the rest was verified without it")
    if as_json:
        console.print_json(result)
        return
    if merge.merges:
        console.table(f"Merged the branches of {len(merge.merges)} block(s) into one conv each",
                      ["block", "branches", "became"],
                      [[m.block, "\n".join(m.branches),
                        (f"{m.conv}: {'x'.join(map(str, m.kernel))} conv, {m.in_channels}->{m.out_channels}, "
                         f"stride {'x'.join(map(str, m.stride))}, groups {m.groups}")] for m in merge.merges])
    if merge.skipped:
        console.table(f"Left {len(merge.skipped)} add(s) of branches as they are", ["where", "reason"],
                      [[s.name, s.reason] for s in merge.skipped])
    if merge.comparison is not None:
        render_comparison(merge.comparison, "Verification: merged branches vs original (eval mode)")
        if merge.merges and merge.comparison.passed:
            console.line("The fold below is verified against the model with merged branches.")


def _becomes(pair) -> str:
    if pair.bn_becomes == "rewritten":
        return "rewritten: runs " + (", ".join(pair.keeps) or "its other work") + " only"
    return pair.bn_becomes
