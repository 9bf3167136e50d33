"""``bntool convert``."""

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

ToOpt = Annotated[str, typer.Option("--to", metavar="batchnorm|syncbatchnorm",
                                    help="What the BatchNorm layers become: `batchnorm` (runs anywhere, e.g. on the "
                                         "CPU) or `syncbatchnorm` (statistics synchronized across processes).")]


@app.command()
def convert(
    checkpoint: CheckpointArg,
    to: ToOpt,
    model: ModelOpt = None,
    model_args: ModelArgsOpt = None,
    key: KeyOpt = None,
    allow_pickle: AllowPickleOpt = False,
    strip_prefix: StripPrefixOpt = True,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
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
    """Convert BatchNorm layers to SyncBatchNorm or back (a BN subclass keeps its activation).

    The converted model is checked against the original in eval mode bit for
    bit, and, on one process, in train mode too (same outputs, same updated
    statistics); the written file is reloaded and checked again.
    `bntool.load(path, model=MyNet())` rebuilds the converted layers.
    """
    from ..converting.convert import TARGETS
    from ..converting.convert import convert as convert_model
    from ..errors import InputError
    from .common import Loading, Operation, run_operation

    if to not in TARGETS:
        raise InputError(f"--to must be `batchnorm` or `syncbatchnorm`, got {to!r}")

    def operate(source, inputs, target):  # in place: the original's outputs are computed first, so one model is held
        return convert_model(source.model, to, include=include, exclude=exclude, inplace=True, example_inputs=inputs,
                             device=target, atol=atol, rtol=rtol)

    def check(report):
        if not report.converted:
            why = "; ".join(f"`{s.name}`: {s.reason}" for s in report.skipped)
            now = "SyncBatchNorm" if to == "syncbatchnorm" else "plain BatchNorm"
            raise InputError(f"nothing to convert in `{checkpoint}`: "
                             + (why or f"every BatchNorm layer is {now} already"))

    run_operation(Operation(
        "convert", Loading(checkpoint, model, model_args, key, allow_pickle, strip_prefix), operate,
        lambda result, report: _render(result, report, json), as_json=json, device=device, out=out, suffix=to,
        force=force, dry_run=dry_run, input_shape=input_shape, seed=seed, check=check))

def _render(result: dict, report, as_json: bool) -> None:
    from . import console
    from .tables import render_comparison, worst_summary

    if as_json:
        console.print_json(result)
        return
    rows = [[c.name, c.type, c.now, c.num_features, f"{c.eps:g}"] for c in report.converted]
    console.table(f"Converted {len(rows)} BatchNorm layer(s)", ["BatchNorm", "type", "now", "features", "eps"], rows)
    if report.skipped:
        console.table(f"Left {len(report.skipped)} BatchNorm layer(s) as they are", ["BatchNorm", "reason"],
                      [[s.name, s.reason] for s in report.skipped])
    comparison = report.comparison
    render_comparison(comparison, "Verification: converted vs original (eval mode, bit for bit)")
    train = report.train_check
    if train is not None and not train.passed:
        console.failure("Train mode differs from the original in: " + ", ".join(train.different[:5]))
    if report.passed:
        how = (f"train mode on one process identical too ({train.device})" if train is not None
               else f"train mode not checked: {report.train_check_skipped}")
        console.success(f"Verified on {comparison.device} ({worst_summary(comparison)}); {how}.")
    if result.get("written"):
        console.success(f"Wrote {result['output']} (reloaded and verified before it was renamed into place).")
    elif result.get("dry_run", False):
        console.line("Dry run: nothing written.")
