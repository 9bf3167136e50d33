"""``bntool unfreeze``."""

from __future__ import annotations

from .app import app
from .freeze import FreezeInputShapeOpt
from .options import (
    AllowPickleOpt,
    AtolOpt,
    CheckpointArg,
    DeviceOpt,
    DryRunOpt,
    ExcludeOpt,
    ForceOpt,
    IncludeOpt,
    JsonOpt,
    KeyOpt,
    ModelArgsOpt,
    ModelOpt,
    OutOpt,
    RtolOpt,
    SeedOpt,
    StripPrefixOpt,
)


@app.command()
def unfreeze(
    checkpoint: CheckpointArg,
    model: ModelOpt = None,
    model_args: ModelArgsOpt = None,
    key: KeyOpt = None,
    allow_pickle: AllowPickleOpt = False,
    strip_prefix: StripPrefixOpt = True,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    input_shape: FreezeInputShapeOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    out: OutOpt = None,
    force: ForceOpt = False,
    dry_run: DryRunOpt = False,
    json: JsonOpt = False,
) -> None:
    """Turn frozen BatchNorm layers (bntool freeze) back into ordinary ones, with the same statistics.

    The unfrozen model in eval mode is checked against the frozen one; the
    written file is reloaded and checked again. `bntool.load(path,
    model=MyNet())` rebuilds the model with the recorded steps replayed.
    """
    from ..errors import InputError
    from ..freezing.freeze import unfreeze as unfreeze_model
    from .common import Loading, Operation, run_operation
    from .freeze import cli_inputs

    def operate(source, inputs, target):  # in place: the frozen model's outputs are computed first: one model held
        return unfreeze_model(source.model, include=include, exclude=exclude, inplace=True, example_inputs=inputs,
                              device=target, atol=atol, rtol=rtol)

    def check(report):
        if not report.unfrozen:
            raise InputError(f"nothing to unfreeze in `{checkpoint}`: it has no frozen BatchNorm layers "
                             "(bntool freeze writes them)")

    run_operation(Operation(
        "unfreeze", Loading(checkpoint, model, model_args, key, allow_pickle, strip_prefix), operate,
        lambda result, report: _render(result, report, json), as_json=json, device=device, out=out,
        suffix="unfrozen", force=force, dry_run=dry_run,
        inputs=lambda source, target: cli_inputs(source.model, input_shape, seed), check=check))


def _render(result: dict, report, as_json: bool) -> None:
    from ..freezing.check import PER_LAYER
    from . import console
    from .freeze import render_per_layer
    from .tables import render_comparison, worst_summary

    if as_json:
        console.print_json(result)
        return
    rows = [[f.name, f.type, f.num_features, f"{f.eps:g}"] for f in report.unfrozen]
    console.table(f"Unfroze {len(rows)} BatchNorm layer(s)", ["BatchNorm", "now", "features", "eps"], rows)
    comparison = report.comparison
    if report.checked == PER_LAYER:
        render_per_layer(comparison, "Verification per layer (no example inputs): each unfrozen layer vs the frozen "
                                     "layer (eval mode)")
    else:
        render_comparison(comparison, "Verification: unfrozen vs frozen (eval mode)")
    if comparison.passed:
        console.success(f"Verified {report.checked} (on {comparison.device}; {worst_summary(comparison)}).")
    if result.get("written"):
        console.success(f"Wrote {result['output']} (reloaded and verified before it was renamed into place).")
    elif result.get("dry_run", False):
        console.line("Dry run: nothing written.")
