"""``bntool inspect``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import app
from .options import (
    AllowPickleOpt,
    CheckpointArg,
    InputShapeOpt,
    JsonOpt,
    KeyOpt,
    ModelArgsOpt,
    ModelOpt,
    SeedOpt,
    StripPrefixOpt,
)

PLOT_SUFFIXES = (".png", ".svg", ".pdf")

PlotOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--plot",
        metavar="PATH",
        help="Also draw running_mean / running_var per layer into this image (.png, .svg or .pdf; an existing "
        "file is replaced only with --force). Needs matplotlib: pip install bntool[plot].",
        show_default=False,
    ),
]


PlotForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Replace the --plot image if it exists.")]


@app.command("inspect")
def inspect_command(
    checkpoint: CheckpointArg,
    model: ModelOpt = None,
    model_args: ModelArgsOpt = None,
    key: KeyOpt = None,
    allow_pickle: AllowPickleOpt = False,
    strip_prefix: StripPrefixOpt = True,
    input_shape: InputShapeOpt = None,
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    plot: PlotOpt = None,
    force: PlotForceOpt = False,
) -> None:
    """Show every BatchNorm: statistics, what feeds it, whether fold can fold it, and what looks wrong.

    Without --model a weights-only file still shows each BN's statistics
    (found from its key names) and the findings that need no architecture.
    Nothing is written except the --plot image (an existing one only with --force).
    """
    from ..errors import naming
    from ..inspection.inspect import inspect
    from ..inspection.picture import plot as draw
    from ..io import checkpoint as ckpt
    from ..io.matching import resolve
    from ..runtime.shapes import make_inputs, parse_shape
    from . import console
    from .common import load_source
    from .flags import PLOT_NAMED

    console.use_stderr_for_humans(json)
    if checkpoint.suffix.lower() == ".pt2":  # a torch.export program: its own front end (``cli/program``)
        from ..errors import InputError
        from .program import inspect_file

        if plot is not None:
            raise InputError("--plot is not available for a torch.export program; drop --plot")
        return inspect_file(checkpoint, model=model, allow_pickle=allow_pickle, json=json, render=_render)
    if plot is not None:
        _check_plot_path(plot, checkpoint, model, force)
    if checkpoint.suffix.lower() == ".onnx" and model is None:  # the graph is in the file
        from .fold_onnx import inspect_file

        result, report = inspect_file(checkpoint)
        if plot is not None:
            result["plot"] = str(draw(report, plot, title=checkpoint.name, force=force))
        _render(result, report, json)
        return
    loaded = ckpt.read(checkpoint, key=key, allow_pickle=allow_pickle) if model is None else None
    if loaded is not None and loaded.module is None:
        resolved = resolve(loaded, None, strip_prefix=strip_prefix)
        report = inspect(resolved.state_dict)
        if input_shape:
            console.warning("--input-shape is used only with --model (for the dataflow); ignored")
        result = {"input": str(checkpoint), "model": None, "weights_only": True, "key": resolved.key,
                  "stripped_prefix": resolved.stripped_prefix}
        if len(loaded.candidates) > 1:
            others = ", ".join(f"`{c.key}`" for c in loaded.candidates if c.key != resolved.key)
            result["other_state_dicts"] = [c.key for c in loaded.candidates if c.key != resolved.key]
            console.line(f"Note: the file holds other state dicts too ({others}); pass --key to inspect one.",
                         style="yellow")
    else:
        source = load_source(checkpoint, model_spec=model, model_args=model_args, key=key,
                             allow_pickle=allow_pickle, strip_prefix=strip_prefix, valid="none")
        inputs = make_inputs(source.model, [parse_shape(s) for s in input_shape], seed=seed) if input_shape else None
        report = inspect(source.model, inputs, seed=seed)
        result = {**source.describe(), "weights_only": False}
    result = {"command": "inspect", **result, **report.to_dict(), "plot": None}
    if plot is not None:
        with naming(PLOT_NAMED):  # the image's `path` is --plot here, not --out
            result["plot"] = str(draw(report, plot, title=checkpoint.name, force=force))
    _render(result, report, json)


def _check_plot_path(plot: Path, checkpoint: Path, model: str | None, force: bool) -> None:
    from ..errors import InputError as error
    from ..io.outputs import check_output_path
    from .common import input_files

    if plot.suffix.lower() not in PLOT_SUFFIXES:
        raise error(f"--plot `{plot}` has extension `{plot.suffix}`; pass a {', '.join(PLOT_SUFFIXES)} file")
    check_output_path(plot, force=force, inputs=input_files(checkpoint, model=model), what="--plot")


def _fmt(value, digits: str = ".3g") -> str:
    if value is None:
        return "?"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, digits) if isinstance(value, float) else str(value)


def _render(result: dict, report, as_json: bool) -> None:
    from . import console

    if as_json:
        console.print_json(result)
        return
    rows = report.rows
    if not rows:
        keys = " (no keys ending in running_mean / running_var)" if result["weights_only"] else ""
        console.line(f"No BatchNorm layers{keys}.")
    else:
        console.table(
            f"{len(rows)} BatchNorm layer(s) in {result['input']} (running stats: min..max)",
            ["BatchNorm", "type", "ch", "eps", "mom", "affine", "track", "batches", "running_mean", "running_var"],
            [[r.name or "(root)", "from keys" if r.source == "keys" else r.type, r.num_features,
              _fmt(r.eps), "None" if r.momentum is None and r.source == "model" else _fmt(r.momentum),
              _fmt(r.affine), _fmt(r.track_running_stats) if r.source == "model" else "yes",
              _fmt(r.num_batches_tracked) if r.num_batches_tracked is not None else "",
              _stat(r.running_mean, r), _stat(r.running_var, r)] for r in rows],
        )
    if rows and not result["weights_only"]:
        method = {"fx": "torch.fx", "recorded": "recorded forward pass", "onnx": "ONNX graph",
                  "none": "unknown"}[report.dataflow_method]
        console.table(
            f"Dataflow ({method}) and folding",
            ["BatchNorm", "fed by", "feeds", "fold"],
            [[r.name or "(root)", r.fed_by or "?", ", ".join(r.feeds), _fold(r)] for r in rows],
        )
    if report.note:
        console.line(f"Note: {report.note}", style="yellow")
    if report.findings:
        console.line(f"Findings ({len(report.findings)}):", style="bold")
        styles = {"error": "bold red", "warning": "yellow", "info": "cyan"}
        for f in report.findings:
            console.line(f"{f.severity.upper()} [{f.kind}] {f.message}", style=styles[f.severity])
            console.line(f"    what to do: {f.advice}")
    elif rows:
        console.success("No problems found in the BatchNorm layers.")
    if result.get("plot"):
        console.success(f"Wrote {result['plot']}.")


def _stat(summary, row) -> str:
    if summary is None:
        return "NaN / inf only" if row.nonfinite else "-"
    text = summary.short()
    return f"{text}, {summary.nonfinite} non-finite" if summary.nonfinite else text


def _fold(row) -> str:
    if row.foldable:
        return f"yes, into {row.fold_into}"
    if row.foldable is None:
        return row.fold_reason or "?"
    return f"no: {row.fold_reason}"
