"""ONNX export, folded by default, proven to compute what the PyTorch model computes.

``export_onnx`` folds (exactly as ``bntool fold``, verified) unless
``fold=False``, exports in eval mode on the CPU with ``torch.onnx.export``
(the torch.export-based exporter, ``dynamo=True``, unless
``exporter="torchscript"``; ``export.write``) into a temporary folder beside
``path``, then checks the temporary file (``prove.check_file``: ``onnx.checker`` (full
check), no BatchNormalization in training mode, every initializer bit for
bit) and proves it (``prove.prove``: onnxruntime, graph optimizations off,
against the original PyTorch model at every verification batch size). Only
then is the file (and any external-data file) renamed into place
(``onnxio.commit``).

Memory: the original runs twice per verification batch size (float32 and
float64) before anything else and is not read again; the model is exported
without a copy beyond folding's (none with ``inplace=True``); the file is
written and read a tensor at a time (``onnx_stream``); the model's tensors
are let go before onnxruntime loads the file's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..deprecation import UNSET, positional, renamed
from ..errors import InputError, VerificationError, require_module
from ..folding.fold import fold as fold_model
from ..io import outputs
from ..onnxio.commit import commit
from ..onnxio.ort import inputs_at, verification_batch_sizes
from ..runtime.cloning import on_cpu
from ..runtime.running import flatten_outputs, model_dtype, resolve_device, run_eval
from ..runtime.shapes import make_inputs
from ..verify.compare import Reference
from .prove import check_file, prove
from .report import ExportReport
from .write import ExportSpec, chosen_names, default_input_names, default_output_names, write_onnx

__all__ = ["EXPORTERS", "ExportReport", "export_onnx"]

EXPORTERS = ("dynamo", "torchscript")


# ----------------------------------------------------------------------------- driver


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike | Any,
    _old_path: Any = UNSET,
    /,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    inplace: bool = False,
    verify: bool = True,
    device: str | torch.device = "auto",
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    fold: bool = True,
    opset: int | None = None,
    dynamic_batch: bool = False,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    verify_batch_sizes: Sequence[int] | None = None,
    verify_inputs: Mapping[int, Sequence[torch.Tensor]] | None = None,
    exporter: str = "dynamo",
    optimize: bool | None = None,
    external_data: bool | None = None,
    force: bool = False,
    keep_on_fail: bool = False,
    consume: Any = UNSET,
) -> ExportReport:
    """Export ``model`` (folded unless ``fold=False``, always in eval mode) to ``path`` and prove the file.

    ``example_inputs`` (default: drawn from the shape the model declares) are
    what the exporter traces. The file is checked with ``onnx.checker``,
    searched for training-mode BatchNormalization, its initializers compared
    bit for bit with the model's tensors, and, unless ``verify=False``, run
    in onnxruntime (graph optimizations off) at each of
    ``verify_batch_sizes`` (default: the batch of ``example_inputs``, plus 1
    and one more when ``dynamic_batch``) against ``model`` in eval mode (TF32
    off), with the tolerance ``bntool.fold`` uses; with ``verify=False``
    neither the fold nor the file is checked numerically and the report's
    ``passed`` is None. Inputs at another batch size come from
    ``verify_inputs`` or are cut from / grown out of the examples. A dynamic
    batch is exported from a batch of at least 2 (the examples grown as for
    verification; a note says so), since torch.export would take a batch of 1
    for a constant; it is still verified at the batch sizes asked for, 1
    included.
    ``include`` / ``exclude`` choose the BNs to fold (as for ``bntool.fold``).
    ``optimize=True`` runs the exporter's graph optimizer, which also fuses
    BNs into convs on its own; ``False`` keeps the exporter's raw graph; the
    default is the optimizer when folding and constant folding only
    (BatchNormalization nodes kept) with ``fold=False``. On failure
    ``VerificationError`` carries the report and nothing is written unless
    ``keep_on_fail``. ``model`` is not changed, and never copied but by
    folding, which makes the one copy that is exported, unless ``inplace``.

    ``inplace=True`` hands ``model`` over to the export, for a caller with no
    further use for it (the CLI): it is folded in place, moved to the CPU and
    exported itself, and once the file's weights are compared with its
    tensors, those are released (the module is left on the meta device), so
    that onnxruntime's copy of the weights never sits beside a model. The
    original's outputs at every verification batch size are computed first;
    they are all the checks need of it. (``consume`` is its older name, and
    ``export_onnx(model, example_inputs, path)`` the older order: both work
    for one release, with a ``FutureWarning``.)
    """
    require_module(model)
    if _old_path is not UNSET:
        example_inputs = positional("example_inputs", path, example_inputs, "export_onnx")
        path = _old_path
    inplace = renamed("consume", consume, "inplace", inplace, "export_onnx")
    if not fold and (include is not None or exclude is not None):
        raise InputError("`include` / `exclude` choose the BatchNorm layers to fold; with `fold=False` nothing is "
                         "folded: pass them with `fold=True`, or drop them")
    if exporter not in EXPORTERS:
        raise InputError(f"unknown exporter `{exporter}`; pass dynamo (recommended) or torchscript")
    out = outputs.check_output_path(path, force=force)
    dtype = model_dtype(model)
    if example_inputs is None:
        example_inputs = make_inputs(model, seed=seed)
    inputs = _as_model_dtype(model, (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs)
    target = resolve_device(device)
    batch = _batch_of(inputs, dynamic_batch)
    sizes = verification_batch_sizes(batch, dynamic_batch, verify_batch_sizes)
    feed = {b: _as_model_dtype(model, verify_inputs[b]) if verify_inputs and b in verify_inputs
            else inputs_at(inputs, b, seed) for b in sizes}
    notes = []
    if dynamic_batch and batch < MIN_DYNAMIC_BATCH:  # torch.export makes a batch of 1 a constant (0/1 specialization)
        inputs = feed.get(MIN_DYNAMIC_BATCH) or inputs_at(inputs, MIN_DYNAMIC_BATCH, seed)
        notes.append(f"exported from a batch of {MIN_DYNAMIC_BATCH} (a batch of {batch} would be traced as a "
                     f"constant, not a dynamic batch); verified at batch {', '.join(map(str, sizes))}")
        batch = MIN_DYNAMIC_BATCH
    if any(m.training for m in model.modules()):
        notes.append("the model was in training mode; it was exported in eval mode "
                     "(BatchNorm uses its running statistics)")
    input_defaults = default_input_names(model, len(inputs))
    # The original's outputs at every verification batch size, computed once (float32 and float64: two forwards
    # each); fold's own reference serves the export batch. Past this point nothing reads the original.
    derived = atol is None and rtol is None
    from_fold = fold and verify and batch in feed and _same_tensors(feed[batch], inputs)
    fold_report = None
    with _first_output(model) as (structure, hook):  # the outputs' structure, seen in those runs: no forward of its own
        references = {b: Reference.of(model, feed[b], device=target, float64=derived)
                      for b in sizes if verify and not (from_fold and b == batch)}
        if fold:
            folded, fold_report = fold_model(model, include=include, exclude=exclude, example_inputs=inputs,
                                             inplace=inplace, verify=verify, device=target, atol=atol, rtol=rtol)
            if from_fold:
                references[batch] = fold_report.reference
            export_model = folded.cpu()  # the folded copy (``model`` itself when handed over): moved, never copied
            del folded
        else:
            export_model = model.cpu() if inplace else on_cpu(model)
    del model  # nothing below reads the original
    export_model._forward_hooks.pop(hook, None)  # folding's copy carries the hook too
    cpu_inputs = tuple(t.cpu() for t in inputs)
    template = structure[0] if structure else run_eval(export_model, cpu_inputs)
    spec = ExportSpec(exporter, opset, dynamic_batch, chosen_names(input_names, input_defaults, "input"),
                      chosen_names(output_names, default_output_names(template), "output"),
                      {True: "full", False: "off", None: "full" if fold else "constants"}[optimize], external_data)
    with outputs.staging_folder(out) as stage:
        tmp = stage / out.name
        start = time.perf_counter()
        described, rewritten = write_onnx(export_model, cpu_inputs, tmp, spec)
        seconds = time.perf_counter() - start
        facts, failures, weights_checked = check_file(tmp, export_model, rewritten, opset, dynamic_batch, notes)
        if inplace:  # onnxruntime holds the weights next: the model's go first
            export_model.to("meta")
        del export_model  # (folding's copy goes with the name; a caller's model is the caller's)
        _give_back_memory()
        verification = prove(tmp, feed, target, atol, rtol, template, references, dtype, failures) if verify else None
        report = ExportReport(str(out), False, described, facts.opset, spec.optimize, dynamic_batch,
                              facts.input_names, facts.output_names, facts, fold_report, verification, seconds,
                              tuple(failures), tuple(notes), weights_checked, verified=verify)
        if failures and not keep_on_fail:
            raise VerificationError("the ONNX file was not written: " + "; ".join(failures), report)
        notes += commit(stage, tmp, out, force)
        report = dataclasses.replace(report, written=True, notes=tuple(notes))
        if failures:
            raise VerificationError(f"kept `{out}` (`keep_on_fail=True`) although: " + "; ".join(failures), report)
        return report


def _give_back_memory() -> None:
    """Collect garbage and return the allocator's free memory to the system (glibc's ``malloc_trim``), so that the
    next large allocation (onnxruntime's weights) takes the pages the model held instead of new ones."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator returns memory in its own way
        pass


@contextlib.contextmanager
def _first_output(model: nn.Module) -> Iterator[tuple[list[Any], int]]:
    """Keep the first output (with tensors in it) that ``model`` returns while the block runs; its structure names
    the ONNX outputs and gives onnxruntime's flat outputs their places.

    Yields the list that receives it and the hook's id: copies of ``model`` made meanwhile (folding's) carry the
    hook too, under that id in their ``_forward_hooks``.
    """
    seen: list[Any] = []

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        if not seen and flatten_outputs(output):
            seen.append(output)

    handle = model.register_forward_hook(keep)
    try:
        yield seen, handle.id
    finally:
        handle.remove()


def _same_tensors(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and x.dtype == y.dtype and x.device == y.device
                                    and torch.equal(x, y) for x, y in zip(a, b))


#: The smallest batch a dynamic-batch export is traced at: torch.export specializes a dimension of size 1 (its
#: guards then read ``batch == 1``, and a dynamic range starting above it fails: "Invalid ranges [2:1]")
MIN_DYNAMIC_BATCH = 2

def _as_model_dtype(model: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    nested = next((type(t).__name__ for t in inputs if not isinstance(t, torch.Tensor)), None)
    if nested is not None:
        raise InputError(f"an example input is a {nested}; an ONNX graph takes tensors: export the part of the model "
                         "that takes tensors (its backbone, say), or wrap the model so that its forward does")
    dtype = model_dtype(model)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)


def _batch_of(inputs: Sequence[torch.Tensor], dynamic: bool) -> int:
    if not inputs:
        raise InputError("no example inputs; pass `example_inputs` (e.g. of shape 1,3,224,224)")
    if any(t.dim() == 0 for t in inputs):
        raise InputError("an example input is a scalar, so it has no batch dimension; pass tensors shaped (N, ...)")
    sizes = {int(t.shape[0]) for t in inputs}
    if dynamic and len(sizes) > 1:
        raise InputError(f"the example inputs have different batch sizes {sorted(sizes)}; "
                         "a dynamic batch needs the same first dimension on every input")
    return int(inputs[0].shape[0])
