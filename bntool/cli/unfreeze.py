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
    from ..errors import InputError, VerificationError
    from ..freezing.freeze import unfreeze as unfreeze_model
    from ..runtime.running import resolve_device
    from . import console
    from .common import load_source, output_path
    from .freeze import cli_inputs, finish_verified

    console.use_stderr_for_humans(json)
    out = output_path(checkpoint, out, "unfrozen", force=force, dry_run=dry_run, model=model)
    target = resolve_device(device)
    source = load_source(
        checkpoint, model_spec=model, model_args=model_args, key=key, allow_pickle=allow_pickle, strip_prefix=strip_prefix
    )
    inputs = cli_inputs(source.model, input_shape, seed)
    result: dict = {"command": "unfreeze", **source.describe(), "output": None, "written": False, "dry_run": dry_run}
    try:  # in place: the frozen model's outputs are computed first, so one model is held
        unfrozen, report = unfreeze_model(source.model, include=include, exclude=exclude, inplace=True,
                                          example_inputs=inputs, device=target, atol=atol, rtol=rtol)
    except VerificationError as exc:
        result.update(exc.report.to_dict())
        _render(result, exc.report, json)
        raise
    if not report.unfrozen:
        raise InputError(f"nothing to unfreeze in `{checkpoint}`: it has no frozen BatchNorm layers "
                         "(bntool freeze writes them)")
    finish_verified(result, source, unfrozen, out, report, lambda: _render(result, report, json), force=force,
                    dry_run=dry_run)


def _render(result: dict, report, as_json: bool) -> None:
    from ..freezing.check import PER_LAYER
    from . import console
    from .common import render_comparison, worst_summary
    from .freeze import render_per_layer

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
