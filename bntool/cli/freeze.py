"""``bntool freeze``."""

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
    IncludeOpt,
    InputShapeOpt,
    JsonOpt,
    KeyOpt,
    ModelArgsOpt,
    ModelOpt,
    OutOpt,
    RtolOpt,
    SeedOpt,
    StripPrefixOpt,
)

TrainableAffineOpt = Annotated[
    bool,
    typer.Option("--trainable-affine", help="Keep gamma / beta (weight / bias) trainable; only the statistics are frozen."),
]


@app.command()
def freeze(
    checkpoint: CheckpointArg,
    model: ModelOpt = None,
    model_args: ModelArgsOpt = None,
    key: KeyOpt = None,
    allow_pickle: AllowPickleOpt = False,
    strip_prefix: StripPrefixOpt = True,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    trainable_affine: TrainableAffineOpt = False,
    input_shape: InputShapeOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    out: OutOpt = None,
    force: ForceOpt = False,
    dry_run: DryRunOpt = False,
    json: JsonOpt = False,
) -> None:
    """Freeze BatchNorm layers for fine-tuning: they use their stored statistics even under model.train().

    The frozen model, its frozen layers in train mode, is checked against the
    original in eval mode, and the frozen layers' statistics are checked not
    to move; the written file is reloaded and
    checked again. `bntool.load(path, model=MyNet())` rebuilds the frozen layers.
    """
    from ..errors import InputError
    from ..freezing.freeze import freeze as freeze_model
    from .common import Loading, Operation, run_operation

    affine = "trainable" if trainable_affine else "frozen"

    def operate(source, inputs, target):  # in place: the original's outputs are computed first, so one model is held
        return freeze_model(source.model, include=include, exclude=exclude, affine=affine, inplace=True,
                            example_inputs=inputs, device=target, atol=atol, rtol=rtol)

    def check(report):
        if not report.frozen:
            why = "; ".join(f"`{s.name}`: {s.reason}" for s in report.skipped) or "it has no BatchNorm layers"
            raise InputError(f"nothing to freeze in `{checkpoint}`: {why}")

    run_operation(Operation(
        "freeze", Loading(checkpoint, model, model_args, key, allow_pickle, strip_prefix), operate,
        lambda result, report: _render(result, report, json), as_json=json, device=device, out=out, suffix="frozen",
        force=force, dry_run=dry_run, input_shape=input_shape, seed=seed, check=check))


def _render(result: dict, report, as_json: bool) -> None:
    from . import console
    from .tables import render_comparison, worst_summary

    if as_json:
        console.print_json(result)
        return
    rows = [[f.name, f.type, f.num_features, f"{f.eps:g}", f.affine] for f in report.frozen]
    console.table(f"Froze {len(rows)} BatchNorm layer(s)", ["BatchNorm", "type", "features", "eps", "affine"], rows)
    if report.skipped:
        console.table(f"Left {len(report.skipped)} BatchNorm layer(s) as they are", ["BatchNorm", "reason"],
                      [[s.name, s.reason] for s in report.skipped])
    check = report.check
    render_comparison(check.comparison, "Verification: frozen layers in train mode vs original (eval mode)")
    if check.statistics_moved:
        console.failure("Statistics moved in train mode: " + ", ".join(check.statistics_moved))
    if check.passed:
        c = check.comparison
        console.success(f"Verified on {c.device} ({worst_summary(c)}); frozen statistics unchanged in train mode.")
    if result.get("written"):
        console.success(f"Wrote {result['output']} (reloaded and verified before it was renamed into place).")
    elif result.get("dry_run", False):
        console.line("Dry run: nothing written.")
