"""``bntool export``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import app
from .options import (
    AllowPickleOpt,
    AtolOpt,
    BatchSizeOpt,
    CheckpointArg,
    DataArgsOpt,
    DataOpt,
    DeviceOpt,
    ExcludeOpt,
    ForceOpt,
    ImageSizeOpt,
    InputKeyOpt,
    InputShapeOpt,
    JsonOpt,
    KeyOpt,
    MeanOpt,
    ModelArgsOpt,
    ModelOpt,
    RtolOpt,
    SeedOpt,
    SelectIncludeOpt,
    StdOpt,
    StripPrefixOpt,
)

OnnxOutOpt = Annotated[
    Optional[Path],
    typer.Option("--out", "-o", metavar="PATH", help="Output .onnx file. Default: beside the input, with the .onnx extension.",
                 show_default=False),
]
FoldOpt = Annotated[
    bool,
    typer.Option("--fold/--no-fold", help="Fold BatchNorm into the conv / linear next to it first (as `bntool fold`)."),
]
OpsetOpt = Annotated[Optional[int], typer.Option("--opset", metavar="N", help="ONNX opset. Default: the exporter's.",
                                                  show_default=False)]
DynamicBatchOpt = Annotated[bool, typer.Option("--dynamic-batch", help="Make the batch dimension symbolic.")]
VerifyBatchSizesOpt = Annotated[
    Optional[str],
    typer.Option("--verify-batch-sizes", metavar="SIZES", help="Batch sizes to verify at, e.g. 1,16. Default: the export batch size, "
                 "plus 1 and one more with --dynamic-batch.", show_default=False),
]
InputNamesOpt = Annotated[Optional[str], typer.Option(
    "--input-names", metavar="NAMES", help="Names of the ONNX inputs, comma-separated. Default: the forward's argument names.",
    show_default=False)]
OutputNamesOpt = Annotated[Optional[str], typer.Option(
    "--output-names", metavar="NAMES", help="Names of the ONNX outputs, comma-separated. Default: output, dict keys or output_0, ...",
    show_default=False)]
ExporterOpt = Annotated[str, typer.Option(
    "--exporter", metavar="EXPORTER", help="dynamo: torch.onnx's torch.export-based exporter (recommended); torchscript: the legacy "
    "tracer, which bakes in the control-flow path the example inputs take.")]
OptimizeOpt = Annotated[Optional[bool], typer.Option(
    "--optimize/--no-optimize", help="Run the exporter's graph optimizer (it also fuses BNs into convs), or keep its "
    "raw graph. Default: the optimizer when folding, constant folding only with --no-fold.", show_default=False)]
ExternalDataOpt = Annotated[Optional[bool], typer.Option(
    "--external-data/--embed-weights", help="Weights in a separate NAME.onnx.data file, or inside the .onnx file. "
    "Default: embedded below 2 GB.", show_default=False)]
OPTIMIZER_TEXT = {"full": "on (it fuses BN into convs too)", "constants": "constant folding only", "off": "off"}
KeepOnFailOpt = Annotated[bool, typer.Option("--keep-on-fail", help="Write the file even if verification fails.")]

@app.command()
def export(
    checkpoint: CheckpointArg,
    model: ModelOpt = None,
    model_args: ModelArgsOpt = None,
    key: KeyOpt = None,
    allow_pickle: AllowPickleOpt = False,
    strip_prefix: StripPrefixOpt = True,
    input_shape: InputShapeOpt = None,
    data: DataOpt = None,
    data_args: DataArgsOpt = None,
    input_key: InputKeyOpt = None,
    batch_size: BatchSizeOpt = 8,
    image_size: ImageSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    fold: FoldOpt = True,
    include: SelectIncludeOpt = None,
    exclude: ExcludeOpt = None,
    opset: OpsetOpt = None,
    dynamic_batch: DynamicBatchOpt = False,
    verify_batch_sizes: VerifyBatchSizesOpt = None,
    input_names: InputNamesOpt = None,
    output_names: OutputNamesOpt = None,
    exporter: ExporterOpt = "dynamo",
    optimize: OptimizeOpt = None,
    external_data: ExternalDataOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    out: OnnxOutOpt = None,
    force: ForceOpt = False,
    keep_on_fail: KeepOnFailOpt = False,
    json: JsonOpt = False,
) -> None:
    """Export to ONNX (folded by default) and prove the file computes what the PyTorch model computes.

    The file is checked with onnx.checker, searched for BatchNormalization in
    training mode, and run in onnxruntime with graph optimizations off against
    the PyTorch model (eval mode, TF32 off) at every verification batch size.
    Nothing is written unless all of it passes.
    """
    from ..errors import InputError
    from ..export.export_onnx import EXPORTERS, export_onnx
    from ..io.outputs import check_output_path
    from ..runtime.running import resolve_device
    from .common import (
        Loading,
        Operation,
        image_options,
        input_files,
        parse_numbers,
        run_operation,
        shown_on_failure,
        verification_inputs,
    )

    path = out or checkpoint.with_suffix(".onnx")

    def checked_options() -> None:
        if exporter not in EXPORTERS:
            raise InputError(f"--exporter `{exporter}`: pass dynamo (recommended) or torchscript")
        resolve_device(device)
        if path.suffix.lower() != ".onnx":
            raise InputError(f"--out `{path}` has extension `{path.suffix}`; an ONNX file ends in .onnx")

    if checkpoint.suffix.lower() == ".pt2":  # a torch.export program: its own front end (``cli/program``)
        from . import console
        from .program import export_file

        console.use_stderr_for_humans(json)
        checked_options()

        if data:
            raise InputError("--data is not available for a torch.export program; drop it (the program's example "
                             "inputs, or --input-shape, are used)")
        result = {"command": "export", "input": str(checkpoint), "model": None}
        with shown_on_failure(result, lambda result, report: _render(result, report, json)):
            report = export_file(checkpoint, model=model, out=path, allow_pickle=allow_pickle, input_shape=input_shape,
                                 seed=seed, atol=atol, rtol=rtol, force=force, fold=fold, options=dict(
                                     opset=opset, dynamic_batch=dynamic_batch, input_names=_names(input_names),
                                     output_names=_names(output_names),
                                     verify_batch_sizes=parse_numbers(verify_batch_sizes, "--verify-batch-sizes", int),
                                     exporter=exporter, optimize=optimize, external_data=external_data, device=device,
                                     keep_on_fail=keep_on_fail))
        result.update(report.to_dict())
        return _render(result, report, json)
    sizes = None

    def output():
        nonlocal sizes
        checked_options()
        check_output_path(path, force=force, inputs=input_files(checkpoint, model=model, data=data))
        if input_shape and data:
            raise InputError("pass --input-shape or --data, not both")
        sizes = parse_numbers(verify_batch_sizes, "--verify-batch-sizes", int)
        return path

    def inputs(source, target):
        if not data:
            return verification_inputs(source.model, input_shape, seed), None
        return _data_inputs(source.model, data, data_args, input_key, batch_size, image_options(image_size, mean, std),
                            dynamic_batch, sizes)

    def operate(source, feed, target):
        example, verify_inputs = feed
        return None, export_onnx(
            source.model, path, include=include or None, exclude=exclude or None, example_inputs=example,
            fold=fold, opset=opset, dynamic_batch=dynamic_batch,
            input_names=_names(input_names), output_names=_names(output_names), verify_batch_sizes=sizes,
            verify_inputs=verify_inputs, exporter=exporter, optimize=optimize, external_data=external_data,
            device=device, seed=seed, atol=atol, rtol=rtol, force=force, keep_on_fail=keep_on_fail,
            inplace=True,  # nothing here needs the original afterwards: one model held, not two
        )

    run_operation(Operation(
        "export", Loading(checkpoint, model, model_args, key, allow_pickle, strip_prefix), operate,
        lambda result, report: _render(result, report, json), as_json=json, device=device, force=force,
        writes=False, output=output, inputs=inputs))


def _names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def _data_inputs(model, data, data_args, input_key, batch_size, images, dynamic_batch, sizes):
    """Example inputs (``batch_size`` samples) and one real batch per verification size, from ``--data``."""
    import torch

    from ..data.batches import model_input
    from ..data.sources import load_batches
    from ..errors import InputError
    from ..onnxio.ort import verification_batch_sizes
    from ..runtime.shapes import declared_input_shapes

    declared = declared_input_shapes(model)
    if declared and len(declared) > 1:
        raise InputError(f"--data gives one input, but `{type(model).__name__}` takes {len(declared)}; "
                         "pass --input-shape once per input instead")
    batches = load_batches(data, batch_size=batch_size, data_args=data_args, input_key=input_key, **images)
    need = max([batch_size, *(sizes or []), batch_size + 1])
    collected, count = [], 0
    for batch in batches:
        tensor = model_input(batch, input_key, where=f"a batch of --data `{data}`")
        collected.append(tensor)
        count += int(tensor.shape[0])
        if count >= need:
            break
    if not collected:
        raise InputError(f"--data `{data}` yielded no batches; pass a source with at least one sample")
    samples = torch.cat(collected)

    def take(n: int) -> torch.Tensor:
        return torch.cat([samples] * -(-n // samples.shape[0]))[:n]

    example = (take(min(batch_size, samples.shape[0])),)
    sizes = verification_batch_sizes(example[0].shape[0], dynamic_batch, sizes)
    return example, {b: (take(b),) for b in sizes}


def _render(result: dict, report, as_json: bool) -> None:
    from ..folding.fold import FoldReport
    from . import console
    from .tables import comparison_rows, render_comparison

    if as_json:
        console.print_json(result)
        return
    if isinstance(report, FoldReport):  # folding failed before anything was exported
        if report.comparison is not None:
            render_comparison(report.comparison, "Verification: folded vs original (eval mode)")
        return
    if report.fold is not None:
        plan = report.fold.plan
        console.line(f"Folded {len(plan.pairs)} BatchNorm layer(s) before export (verified as `bntool fold` does).")
        if plan.skips:
            console.table(f"Left {len(plan.skips)} BatchNorm layer(s) as they are", ["BatchNorm", "reason"],
                          [[s.bn, s.reason] for s in plan.skips])
    for note in report.notes:
        console.line(f"Note: {note}", style="yellow")
    d = report.to_dict()
    counts = ", ".join(f"{op} {n}" for op, n in d["key_node_counts"].items() if n or op == "BatchNormalization")
    training = ", ".join(t["node"] for t in d["training_mode_bns"]) or "none"
    rows = [
        ["exporter", d["exporter"]], ["opset", d["opset"]], ["graph optimizer", OPTIMIZER_TEXT.get(d["optimized"], d["optimized"])],
        ["inputs", ", ".join(d["input_names"])], ["outputs", ", ".join(d["output_names"])],
        ["batch", "dynamic" if d["dynamic_batch"] else "fixed"],
        ["nodes", f"{sum(d['node_counts'].values())} ({counts})"], ["size", _size(d["size_bytes"])],
        ["weights", f"external: {', '.join(d['external_data'])}" if d["external_data"] else "inside the .onnx file"],
        ["onnx.checker (full)", d["checker"]], ["BatchNormalization in training mode", training],
    ]
    console.table(f"ONNX file {d['output']}", ["property", "value"], rows)
    if report.verification is not None:
        v = report.verification
        rows = [[c.batch_size, *row] for c in v.checks for row in comparison_rows(c.comparison)]
        device = v.checks[0].comparison.device if v.checks else ""
        console.table(
            f"Verification: onnxruntime ({v.provider}, graph optimizations off) vs PyTorch ({device}, TF32 off)",
            ["batch", "output", "shape", "max abs err", "max rel err", "tolerance", "argmax agree", ""], rows,
        )
    if report.passed:
        sizes = ", ".join(str(c.batch_size) for c in report.verification.checks)
        console.success(f"Verified at batch size(s) {sizes}; wrote {d['output']}.")
    elif report.written:
        console.failure(f"Verification FAILED; the file was kept (--keep-on-fail): {d['output']}")
    else:
        console.failure("Verification FAILED; nothing was written.")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
