"""``bntool fold model.onnx`` and ``bntool inspect model.onnx``: the graph is in the file, no ``--model``."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def fold_file(path: Path, *, out: Path | None, force: bool, dry_run: bool, strict: bool, atol: float | None,
              rtol: float | None, input_shape: list[str] | None, seed: int, json: bool, render,
              include: list[str] | None = None, exclude: list[str] | None = None) -> None:
    """Fold the graph in ``path``; ``render(result, report, json)`` is ``bntool fold``'s own report."""
    from ..errors import InputError, VerificationError
    from ..folding.onnx_fold import fold_onnx, prove_file
    from ..io.inputs import require_regular_file
    from ..io.outputs import check_output_path
    from ..onnxio.save import save_onnx
    from ..runtime.shapes import parse_shape
    from . import console
    from .common import shown_on_failure

    console.use_stderr_for_humans(json)
    require_regular_file(path, "the ONNX file")  # (before anything opens it: a FIFO would block)
    out = out if out is not None else path.with_name(f"{path.stem}.folded.onnx")
    if out.suffix.lower() != ".onnx":
        raise InputError(f"--out `{out}` must be an .onnx file when folding an .onnx file")
    if not dry_run:
        check_output_path(out, force=force, inputs=[path, *_data_files(path)])
    shapes = [parse_shape(s) for s in input_shape] if input_shape else None
    result: dict[str, Any] = {"command": "fold", "input": str(path), "model": None, "output": None, "written": False,
                              "dry_run": dry_run}
    if not json:
        console.line(f"Folding {path.name} and verifying it in onnxruntime...")
    with shown_on_failure(result, lambda result, report: render(result, report, json)):
        folded, report = fold_onnx(path, input_shapes=shapes, atol=atol, rtol=rtol, strict=strict, seed=seed,
                                   include=include or None, exclude=exclude or None)
    result.update(report.to_dict())
    if not dry_run:
        try:
            written, notes = save_onnx(folded, out, force=force, external=report.external_data,
                                       prove=lambda tmp: prove_file(report, tmp),
                                       inputs=[path, *_data_files(path)])
        except VerificationError:
            render(result, report, json)
            raise
        for note in notes:
            console.line(f"Note: {note}", style="yellow")
        result.update(output=str(written), written=True)
    render(result, report, json)
    if not json:
        console.line(f"BatchNormalization nodes: {report.bn_before} before, {report.bn_after} after.")


def inspect_file(path: Path) -> tuple[dict[str, Any], Any]:
    from ..inspection.onnx_inspect import inspect_onnx

    report = inspect_onnx(path)
    result = {"command": "inspect", "input": str(path), "model": None, "weights_only": False, **report.to_dict(),
              "plot": None}
    return result, report


def _data_files(path: Path) -> list[Path]:
    """The external-data files beside an .onnx file that it names (never to be written over)."""
    from ..onnxio.commit import _external_data_files

    return [path.parent / name for name in sorted(_external_data_files(path))]
