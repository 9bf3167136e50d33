"""The proof of a written ONNX file: its structure and weights (``check_file``), then onnxruntime (``prove``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError, VerificationError
from ..onnxio.check import OnnxFacts, compare_initializers, inspect_file, read_structure
from ..onnxio.ort import OnnxVerification, OrtLoadError, verify_file
from ..verify.compare import Reference

#: Model dtypes whose convolutions onnxruntime's CPU provider has no kernel for (ONNX has no bfloat16 Conv at all).
UNRUNNABLE_DTYPES = {torch.float64: "float64", torch.bfloat16: "bfloat16"}



def check_file(tmp: Path, model: nn.Module, rewritten: Sequence[str], opset: int | None, dynamic_batch: bool,
                notes: list[str]) -> tuple[OnnxFacts, list[str], int]:
    """The file's structure (checker, training-mode BNs, batch dimension, opset) and its initializers bit for bit
    against ``model``'s tensors: the facts, the failures, and how many initializers were compared."""
    # one reading of the file's structure serves the checker, the facts and the weights' comparison; the
    # weights themselves stay in the file and are compared a chunk at a time
    found = read_structure(tmp)
    facts = inspect_file(tmp, found)
    if opset is not None and facts.opset != opset:
        raise InputError(f"the exporter wrote opset {facts.opset}, not the `opset` {opset} asked for (it cannot "
                         f"convert this graph); pass `opset` {facts.opset} or newer")
    failures = _structural_failures(facts, dynamic_batch)
    weights_checked, differ = compare_initializers(found, model, skip=rewritten)
    if rewritten:
        shown = ", ".join(f"`{name}`" for name in rewritten[:3]) + (", ..." if len(rewritten) > 3 else "")
        notes.append(f"{len(rewritten)} initializer(s) named after the model's tensors hold values the exporter's "
                     f"optimizer computed (it fused layers itself): {shown}; onnxruntime checks them, the "
                     "bit-for-bit comparison with the model does not")
    if differ:
        shown = ", ".join(f"`{name}`" for name in differ[:3]) + (", ..." if len(differ) > 3 else "")
        failures.append(f"{len(differ)} initializer(s) differ from the model's tensors: {shown}")
    return facts, failures, weights_checked


def prove(tmp: Path, feed: Mapping[int, Sequence[torch.Tensor]], target: torch.device, atol: float | None,
           rtol: float | None, template: Any, references: Mapping[int, Reference], dtype: torch.dtype,
           failures: list[str]) -> OnnxVerification | None:
    """onnxruntime runs the file at every batch size against the original's outputs; what fails goes to
    ``failures``. A model dtype onnxruntime's CPU provider cannot run is the caller's to change (``InputError``)."""
    try:
        verification = verify_file(None, tmp, feed, device=target, atol=atol, rtol=rtol, template=template,
                                   references=references)
    except OrtLoadError as exc:
        if dtype in UNRUNNABLE_DTYPES:
            raise InputError(f"onnxruntime cannot run this {UNRUNNABLE_DTYPES[dtype]} model on its CPU provider "
                             f"({exc.reason}), so the file cannot be verified; export it in float32 "
                             "(`model.float()`) or float16") from None
        failures.append(str(exc))
        return None
    except VerificationError as exc:
        failures.append(str(exc))
        return None
    failures += verification.failures()
    return verification


def _structural_failures(facts: OnnxFacts, dynamic_batch: bool) -> list[str]:
    failures = []
    if facts.checker_error:
        failures.append(f"onnx.checker rejects the file: {facts.checker_error}")
    for bn in facts.training_bns:
        failures.append(f"BatchNormalization `{bn.node}` is in training mode ({bn.reason}); give the layer "
                        "running statistics (`bntool recalibrate`) and export again")
    if dynamic_batch:
        fixed = [f"`{n}` ({d})" for n, d in zip(facts.input_names, facts.batch_dims) if not isinstance(d, str)]
        if fixed:
            failures.append(f"input {', '.join(fixed)} has a fixed batch dimension although a dynamic batch was asked")
    return failures
