"""bntool: BatchNorm surgery for PyTorch checkpoints, each step verified.

The public API::

    import bntool
    folded, report = bntool.fold(model, example_inputs)
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
    "fold": "bntool.folding",
    "plan_fold": "bntool.foldrules",
    "FoldPlan": "bntool.foldplan",
    "FoldReport": "bntool.folding",
    "Skip": "bntool.report",
    "compare": "bntool.verify",
    "Comparison": "bntool.verify",
    "BntoolError": "bntool.errors",
    "InputError": "bntool.errors",
    "VerificationError": "bntool.errors",
    "recalibrate": "bntool.recalibration",
    "RecalibrationReport": "bntool.recal_report",
    "inspect": "bntool.inspection",
    "InspectReport": "bntool.inspection",
    "Finding": "bntool.findings",
    "freeze": "bntool.freezing",
    "unfreeze": "bntool.freezing",
    "FrozenBatchNorm1d": "bntool.frozen",
    "FrozenBatchNorm2d": "bntool.frozen",
    "FrozenBatchNorm3d": "bntool.frozen",
    "export_onnx": "bntool.onnx_export",
    "ExportReport": "bntool.onnx_export",
    "verify_onnx": "bntool.onnx_run",
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
    from .persist import load, save
    from .errors import BntoolError, InputError, VerificationError
    from .recal_report import RecalibrationReport
    from .recalibration import recalibrate
    from .folding import FoldReport, fold
    from .foldplan import FoldPlan
    from .foldrules import plan_fold
    from .report import Skip
    from .verify import Comparison, compare
    from .findings import Finding
    from .inspection import InspectReport, inspect
    from .freezing import freeze, unfreeze
    from .frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
    from .onnx_run import verify_onnx
    from .onnx_export import ExportReport, export_onnx
