"""ONNX export of a ``torch.export`` program: folded first (the program fold, verified), then ``export_onnx``.

The folded program's ``module()`` is exported and proven exactly as a model
is (``export_onnx`` with ``fold=False``: checker, no training-mode
BatchNormalization, initializers bit for bit, onnxruntime against it at each
verification batch size), and the file is committed only then. A program's
mode was fixed when it was exported, so ``ProgramModule`` takes ``train()``
/ ``eval()`` as no-ops (``module()`` itself refuses them).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram

from ..errors import InputError
from ..folding.fold import fold as fold_any
from ..folding.program_fold import program_inputs
from .export_onnx import ExportReport, export_onnx


class ProgramModule(nn.Module):
    """A program's ``module()`` as a module bntool can run and export (its mode is the program's)."""

    def __init__(self, program: ExportedProgram):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # (torch's own pytree deprecation notes)
            self.program = program.module(check_guards=False)
        for module in self.modules():
            module.training = False  # (a program's mode is the one it was exported in: eval, or refused by the fold)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.program(*args, **kwargs)

    def train(self, mode: bool = True) -> ProgramModule:
        self.training = mode  # (the program's BNs run as exported)
        return self


def export_program(program: ExportedProgram, path: str | os.PathLike, *, example_inputs: Any = None,
                   input_shapes: Sequence[tuple[int, ...]] | None = None, fold: bool = True, seed: int = 0,
                   atol: float | None = None, rtol: float | None = None, **options: Any) -> ExportReport:
    """Fold ``program`` (unless ``fold=False``), export it to ONNX at ``path`` and prove the file (``export_onnx``'s
    ``options``)."""
    inputs = program_inputs(program, example_inputs, input_shapes, seed)
    args, kwargs = inputs if (len(inputs) == 2 and isinstance(inputs[1], dict)) else (inputs, {})
    if kwargs:
        raise InputError("the program takes keyword inputs, which ONNX export does not pass; export a program "
                         "whose inputs are positional")
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise InputError("the program takes inputs that are not tensors; ONNX export needs tensor inputs")
    report = None
    if fold:
        program, report = fold_any(program, example_inputs=tuple(args), seed=seed, atol=atol, rtol=rtol)
    exported = export_onnx(ProgramModule(program), path, example_inputs=tuple(args), fold=False, seed=seed, atol=atol,
                           rtol=rtol, **options)
    return dataclasses.replace(exported, fold=report)
