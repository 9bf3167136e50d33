"""bntool: BatchNorm surgery for PyTorch checkpoints, each step verified.

The public API::

    import bntool
    folded, report = bntool.fold(model, example_inputs=example_inputs)
    model = bntool.load("folded.safetensors", model=MyNet())

Names are imported on first use, so ``import bntool`` (and ``bntool --help``)
stays fast and never imports typer, rich or onnx.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from ._version import __version__

#: public name -> module that defines it
_EXPORTS = {
    "load": "bntool.persist",
    "save": "bntool.persist",
    "fold": "bntool.folding.fold",
    "plan_fold": "bntool.folding.rules",
    "FoldPlan": "bntool.folding.plan",
    "FoldReport": "bntool.folding.fold",
    "Skip": "bntool.report",
    "Report": "bntool.report",
    "compare": "bntool.verify.compare",
    "Comparison": "bntool.verify.compare",
    "BntoolError": "bntool.errors",
    "InputError": "bntool.errors",
    "VerificationError": "bntool.errors",
    "recalibrate": "bntool.recalibration.recalibrate",
    "RecalibrationReport": "bntool.recalibration.report",
    "inspect": "bntool.inspection.inspect",
    "InspectReport": "bntool.inspection.inspect",
    "plot": "bntool.inspection.picture",
    "Finding": "bntool.inspection.findings",
    "freeze": "bntool.freezing.freeze",
    "unfreeze": "bntool.freezing.freeze",
    "FreezeReport": "bntool.freezing.freeze",
    "UnfreezeReport": "bntool.freezing.freeze",
    "convert": "bntool.converting.convert",
    "ConvertReport": "bntool.converting.convert",
    "FrozenBatchNorm1d": "bntool.frozen",
    "FrozenBatchNorm2d": "bntool.frozen",
    "FrozenBatchNorm3d": "bntool.frozen",
    "export_onnx": "bntool.export.export_onnx",
    "ExportReport": "bntool.export.report",
    "verify_onnx": "bntool.onnxio.ort",
    "fold_onnx": "bntool.folding.onnx_fold",
    "OnnxFoldReport": "bntool.folding.onnx_fold",
    "inspect_onnx": "bntool.inspection.onnx_inspect",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule: bntool.verify
            return importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module 'bntool' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover
    from .converting.convert import ConvertReport, convert
    from .errors import BntoolError, InputError, VerificationError
    from .export.export_onnx import export_onnx
    from .export.report import ExportReport
    from .folding.fold import FoldReport, fold
    from .folding.onnx_fold import OnnxFoldReport, fold_onnx
    from .folding.plan import FoldPlan
    from .folding.rules import plan_fold
    from .freezing.freeze import FreezeReport, UnfreezeReport, freeze, unfreeze
    from .frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
    from .inspection.findings import Finding
    from .inspection.inspect import InspectReport, inspect
    from .inspection.onnx_inspect import inspect_onnx
    from .inspection.picture import plot
    from .onnxio.ort import verify_onnx
    from .persist import load, save
    from .recalibration.recalibrate import recalibrate
    from .recalibration.report import RecalibrationReport
    from .report import Report, Skip
    from .verify.compare import Comparison, compare
