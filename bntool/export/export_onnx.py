"""ONNX export, folded by default, proven to compute what the PyTorch model computes.

``export_onnx`` folds (exactly as ``bntool fold``, verified) unless
``fold=False``, exports in eval mode on the CPU with ``torch.onnx.export``
(the torch.export-based exporter, ``dynamo=True``, unless
``exporter="torchscript"``; ``onnx_write``) into a temporary folder beside
``path``, then proves the temporary file: ``onnx.checker`` (full check), no
BatchNormalization in training mode, every initializer bit for bit, and
onnxruntime (graph optimizations off) against the original PyTorch model at
every verification batch size. Only then is the file (and any external-data
file) renamed into place (``onnx_commit``).

Memory: the original runs twice per verification batch size (float32 and
float64) before anything else and is not read again; the model is exported
without a copy beyond folding's (none with ``consume=True``); the file is
written and read a tensor at a time (``onnx_stream``); the model's tensors
are let go before onnxruntime loads the file's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InputError, VerificationError, require_module
from ..folding.fold import FoldReport
from ..folding.fold import fold as fold_model
from ..io import outputs
from ..onnxio.check import KEY_OPS, OnnxFacts, TrainingBN, compare_initializers, inspect_file, read_structure
from ..onnxio.commit import commit
from ..onnxio.ort import OnnxVerification, inputs_at, verification_batch_sizes, verify_onnx
from ..runtime.cloning import on_cpu
from ..runtime.running import flatten_outputs, model_dtype, resolve_device, run_eval
from ..verify.compare import Reference
from .write import ExportSpec, chosen_names, default_input_names, default_output_names, write_onnx

EXPORTERS = ("dynamo", "torchscript")


@dataclass(frozen=True)
class ExportReport:
    path: str
    written: bool
    exporter: str
    opset: int
    optimized: str
    dynamic_batch: bool
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    facts: OnnxFacts
    fold: FoldReport | None
    verification: OnnxVerification | None
    export_seconds: float
    failures: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    initializers_checked: int = 0  # initializers compared bit for bit with the model's tensors of the same name

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def bn_left(self) -> int:
        return self.facts.bn_left

    @property
    def training_bns(self) -> tuple[TrainingBN, ...]:
        return self.facts.training_bns

    def to_dict(self) -> dict[str, Any]:
        f = self.facts
        v = self.verification
        return {
            "output": self.path, "written": self.written, "passed": self.passed, "failures": list(self.failures),
            "exporter": self.exporter, "torch_version": torch.__version__, "opset": self.opset,
            "optimized": self.optimized, "dynamic_batch": self.dynamic_batch,
            "input_names": list(self.input_names), "output_names": list(self.output_names),
            "size_bytes": f.size_bytes, "external_data": list(f.external_data), "checker": f.checker_error or "passed",
            "bn_left": f.bn_left, "training_mode_bns": [dataclasses.asdict(t) for t in f.training_bns],
            "key_node_counts": {op: f.node_counts.get(op, 0) for op in KEY_OPS}, "node_counts": f.node_counts,
            "fold": self.fold.to_dict() if self.fold is not None else None,
            "provider": v.provider if v else None,
            "verification": [{"batch_size": c.batch_size, **c.comparison.to_dict()} for c in v.checks] if v else [],
            "export_seconds": round(self.export_seconds, 3), "notes": list(self.notes),
            "initializers_checked": self.initializers_checked,
        }


# ----------------------------------------------------------------------------- driver


def export_onnx(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    path: str | os.PathLike,
    *,
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
    device: str | torch.device = "auto",
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    force: bool = False,
    keep_on_fail: bool = False,
    consume: bool = False,
) -> ExportReport:
    """Export ``model`` (folded unless ``fold=False``, always in eval mode) to ``path`` and prove the file.

    The file is checked with ``onnx.checker``, searched for training-mode
    BatchNormalization, and run in onnxruntime (graph optimizations off) at
    each of ``verify_batch_sizes`` (default: the batch of ``example_inputs``,
    plus 1 and one more when ``dynamic_batch``) against ``model`` in eval mode
    (TF32 off), with the tolerance ``bntool.fold`` uses. Inputs at another
    batch size come from ``verify_inputs`` or are cut from / grown out of the
    examples. A dynamic batch is exported from a batch of at least 2 (the
    examples grown as for verification; a note says so), since torch.export
    would take a batch of 1 for a constant; it is still verified at the
    batch sizes asked for, 1 included. ``optimize=True`` runs the exporter's graph optimizer, which
    also fuses BNs into convs on its own; ``False`` keeps the exporter's raw
    graph; the default is the optimizer when folding and constant folding only
    (BatchNormalization nodes kept) with ``fold=False``. On failure
    ``VerificationError`` carries the report and nothing is written unless
    ``keep_on_fail``. ``model`` is never changed, and never copied but by
    folding, which makes the one copy that is exported.

    ``consume=True`` hands ``model`` over to the export, for a caller with no
    further use for it (the CLI): it is folded in place, moved to the CPU and
    exported itself, and once the file's weights are compared with its
    tensors, those are released (the module is left on the meta device), so
    that onnxruntime's copy of the weights never sits beside a model. The
    original's outputs at every verification batch size are computed first;
    they are all the checks need of it.
    """
    require_module(model)
    if exporter not in EXPORTERS:
        raise InputError(f"unknown exporter `{exporter}`; pass dynamo (recommended) or torchscript")
    out = outputs.check_output_path(path, force=force)
    dtype = model_dtype(model)
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
    from_fold = fold and batch in feed and _same_tensors(feed[batch], inputs)
    fold_report = None
    with _first_output(model) as (structure, hook):  # the outputs' structure, seen in those runs: no forward of its own
        references = {b: Reference.of(model, feed[b], device=target, float64=derived)
                      for b in sizes if not (from_fold and b == batch)}
        if fold:
            folded, fold_report = fold_model(model, inputs, inplace=consume, device=target, atol=atol, rtol=rtol)
            if from_fold:
                references[batch] = fold_report.reference
            export_model = folded.cpu()  # the folded copy (``model`` itself when consumed): moved, never copied
            del folded
        else:
            export_model = model.cpu() if consume else on_cpu(model)
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
        # one reading of the file's structure serves the checker, the facts and the weights' comparison; the
        # weights themselves stay in the file and are compared a chunk at a time
        found = read_structure(tmp)
        facts = inspect_file(tmp, found)
        if opset is not None and facts.opset != opset:
            raise InputError(f"the exporter wrote opset {facts.opset}, not the `opset` {opset} asked for (it cannot "
                             f"convert this graph); pass `opset` {facts.opset} or newer")
        failures = _structural_failures(facts, dynamic_batch)
        weights_checked, differ = compare_initializers(found, export_model, skip=rewritten)
        if rewritten:
            shown = ", ".join(f"`{name}`" for name in rewritten[:3]) + (", ..." if len(rewritten) > 3 else "")
            notes.append(f"{len(rewritten)} initializer(s) named after the model's tensors hold values the exporter's "
                         f"optimizer computed (it fused layers itself): {shown}; onnxruntime checks them, the "
                         "bit-for-bit comparison with the model does not")
        if differ:
            shown = ", ".join(f"`{name}`" for name in differ[:3]) + (", ..." if len(differ) > 3 else "")
            failures.append(f"{len(differ)} initializer(s) differ from the model's tensors: {shown}")
        if consume:  # onnxruntime holds the weights next: the model's go first
            export_model.to("meta")
        del found, export_model  # (folding's copy goes with the name; a caller's model is the caller's)
        _give_back_memory()
        verification = None
        try:
            verification = verify_onnx(None, tmp, feed, device=target, atol=atol, rtol=rtol, template=template,
                                       references=references)
            failures += verification.failures()
        except VerificationError as exc:
            if dtype in UNRUNNABLE_DTYPES and "cannot load the file" in str(exc):
                raise InputError(f"onnxruntime cannot run this {UNRUNNABLE_DTYPES[dtype]} model on its CPU provider "
                                 f"({str(exc).split(': ', 1)[-1]}), so the file cannot be verified; export it in "
                                 "float32 (`model.float()`) or float16") from None
            failures.append(str(exc))
        report = ExportReport(str(out), False, described, facts.opset, spec.optimize, dynamic_batch,
                              facts.input_names, facts.output_names, facts, fold_report, verification, seconds,
                              tuple(failures), tuple(notes), weights_checked)
        if failures and not keep_on_fail:
            raise VerificationError("the ONNX file was not written: " + "; ".join(failures), report)
        notes += commit(stage, tmp, out, force)
        report = dataclasses.replace(report, written=True, notes=tuple(notes))
        if failures:
            raise VerificationError(f"kept `{out}` (`keep_on_fail=True`) although: " + "; ".join(failures), report)
        return report


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

#: Model dtypes whose convolutions onnxruntime's CPU provider has no kernel for (ONNX has no bfloat16 Conv at all).
UNRUNNABLE_DTYPES = {torch.float64: "float64", torch.bfloat16: "bfloat16"}


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
