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

FreezeInputShapeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape",
        metavar="SHAPE",
        help="Shape of a verification input, e.g. 1,3,224,224; repeat for several inputs. Default: the shape the "
        "model declares (input_shape / example_input_array); without one, each layer is checked alone on inputs "
        "of its own shape.",
        show_default=False,
    ),
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
        force=force, dry_run=dry_run, inputs=lambda source, target: cli_inputs(source.model, input_shape, seed),
        check=check))


def cli_inputs(model, input_shape: list[str] | None, seed: int):
    """The inputs --input-shape gives or the model declares; None (each layer checked alone) without either."""
    from ..runtime.shapes import declared_input_shapes
    from .common import verification_inputs

    if not input_shape and declared_input_shapes(model) is None:
        return None
    return verification_inputs(model, input_shape, seed)


def _render(result: dict, report, as_json: bool) -> None:
    from ..freezing.check import PER_LAYER
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
    if check.kind == PER_LAYER:
        render_per_layer(check.comparison, "Verification per layer (no example inputs): each frozen layer in train "
                                           "mode vs the original layer (eval mode)")
    else:
        render_comparison(check.comparison, "Verification: frozen layers in train mode vs original (eval mode)")
    if check.statistics_moved:
        console.failure("Statistics moved in train mode: " + ", ".join(check.statistics_moved))
    if check.passed:
        c = check.comparison
        console.success(f"Verified {check.kind} (on {c.device}; {worst_summary(c)}); frozen statistics unchanged "
                        "in train mode.")
    if result.get("written"):
        console.success(f"Wrote {result['output']} (reloaded and verified before it was renamed into place).")
    elif result.get("dry_run", False):
        console.line("Dry run: nothing written.")


def render_per_layer(comparison, title: str) -> None:
    """A per-layer check (``freezing.layers``) as one row per layer: the shapes and batch sizes it was run at, and
    its worst comparison."""
    from . import console
    from .tables import worst

    by_layer: dict[str, list] = {}
    for o in comparison.outputs:
        name, _, shape = o.name.removeprefix("layer `").partition("` at ")
        by_layer.setdefault(name, []).append((shape, o))
    rows = []
    for name, checks in by_layer.items():
        shapes = dict.fromkeys("Nx" + shape.split(" ")[0].partition("x")[2] for shape, _ in checks)
        batches = dict.fromkeys(shape.partition("x")[0] for shape, _ in checks)
        w = worst(o for _, o in checks)
        failed = sum(not o.passed for _, o in checks)
        rows.append([name, ", ".join(shapes), ", ".join(batches), f"{w.max_abs_error:.3g}", f"{w.max_rel_error:.3g}",
                     f"{w.tolerance:.3g}", "ok" if not failed else f"{failed} FAILED"])
    console.table(f"{title} ({comparison.device}, tolerance {comparison.rule})",
                  ["layer", "input shapes", "batch sizes", "max abs err", "max rel err", "tolerance", ""], rows)
