"""ONNX export, folded by default, proven to compute what the PyTorch model computes.

``export_onnx`` folds (exactly as ``bntool fold``, verified) unless
``fold=False``, exports a CPU copy in eval mode with ``torch.onnx.export``
(the torch.export-based exporter, ``dynamo=True``, unless
``exporter="torchscript"``) into a temporary folder beside ``path``, then
proves the temporary file: ``onnx.checker`` (full check), no
BatchNormalization in training mode, and onnxruntime (graph optimizations
off) against the original PyTorch model at every verification batch size.
Only then is the file (and any external-data file) renamed into place.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import io
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError, VerificationError, shorten
from .inputs import mentions
from . import outputs
from .folding import FoldReport
from .folding import fold as fold_model
from .onnx_check import (
    KEY_OPS,
    compare_initializers,
    OnnxFacts,
    OnnxVerification,
    TrainingBN,
    inputs_at,
    inspect_file,
    output_template,
    verification_batch_sizes,
    verify_onnx,
)
from .verify import flatten_outputs, model_dtype, resolve_device

EXPORTERS = ("dynamo", "torchscript")
EXPORTER_TEXT = {
    "dynamo": "torch.onnx.export(dynamo=True) (torch.export)",
    "torchscript": "torch.onnx.export(dynamo=False) (TorchScript tracing)",
}


@dataclass(frozen=True)
class ExportSpec:
    """How to call the exporter."""

    exporter: str
    opset: int | None
    dynamic_batch: bool
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    optimize: str  # "full" (the exporter's optimizer), "constants" (constant folding only) or "off"
    external_data: bool | None


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
) -> ExportReport:
    """Export ``model`` (folded unless ``fold=False``, always in eval mode) to ``path`` and prove the file.

    The file is checked with ``onnx.checker``, searched for training-mode
    BatchNormalization, and run in onnxruntime (graph optimizations off) at
    each of ``verify_batch_sizes`` (default: the batch of ``example_inputs``,
    plus 1 and one more when ``dynamic_batch``) against ``model`` in eval mode
    (TF32 off), with the tolerance ``bntool.fold`` uses. Inputs at another
    batch size come from ``verify_inputs`` or are cut from / grown out of the
    examples. ``optimize=True`` runs the exporter's graph optimizer, which
    also fuses BNs into convs on its own; ``False`` keeps the exporter's raw
    graph; the default is the optimizer when folding and constant folding only
    (BatchNormalization nodes kept) with ``fold=False``. On failure
    ``VerificationError`` carries the report and nothing is written unless
    ``keep_on_fail``. ``model`` is never changed.
    """
    if exporter not in EXPORTERS:
        raise InputError(f"unknown exporter `{exporter}`; pass dynamo (recommended) or torchscript")
    out = outputs.check_output_path(path, force=force)
    inputs = _as_model_dtype(model, (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs)
    target = resolve_device(device)
    batch = _batch_of(inputs, dynamic_batch)
    sizes = verification_batch_sizes(batch, dynamic_batch, verify_batch_sizes)
    feed = {b: _as_model_dtype(model, verify_inputs[b]) if verify_inputs and b in verify_inputs
            else inputs_at(inputs, b, seed) for b in sizes}
    notes = []
    if any(m.training for m in model.modules()):
        notes.append("the model was in training mode; it was exported in eval mode "
                     "(BatchNorm uses its running statistics)")
    fold_report = None
    if fold:
        folded, fold_report = fold_model(model, inputs, device=target, atol=atol, rtol=rtol)
    else:
        folded = copy.deepcopy(model)
    export_model = folded.cpu().eval()
    cpu_inputs = tuple(t.cpu() for t in inputs)
    template = output_template(export_model, cpu_inputs)
    spec = ExportSpec(exporter, opset, dynamic_batch, _names(input_names, _input_names(model, len(inputs)), "input"),
                      _names(output_names, _output_names(template), "output"),
                      {True: "full", False: "off", None: "full" if fold else "constants"}[optimize], external_data)
    with outputs.staging_folder(out) as stage:
        tmp = stage / out.name
        start = time.perf_counter()
        described = write_onnx(export_model, cpu_inputs, tmp, spec)
        seconds = time.perf_counter() - start
        facts = inspect_file(tmp)
        if opset is not None and facts.opset != opset:
            raise InputError(f"the exporter wrote opset {facts.opset}, not the --opset {opset} asked for (it cannot "
                             f"convert this graph); pass --opset {facts.opset} or newer")
        failures = _structural_failures(facts, dynamic_batch)
        weights_checked, differ = compare_initializers(tmp, export_model)
        if differ:
            shown = ", ".join(f"`{name}`" for name in differ[:3]) + (", ..." if len(differ) > 3 else "")
            failures.append(f"{len(differ)} initializer(s) differ from the model's tensors: {shown}")
        verification = None
        try:
            verification = verify_onnx(model, tmp, feed, device=target, atol=atol, rtol=rtol, template=template)
            failures += verification.failures()
        except VerificationError as exc:
            failures.append(str(exc))
        report = ExportReport(str(out), False, described, facts.opset, spec.optimize, dynamic_batch,
                              facts.input_names, facts.output_names, facts, fold_report, verification, seconds,
                              tuple(failures), tuple(notes), weights_checked)
        if failures and not keep_on_fail:
            raise VerificationError("the ONNX file was not written: " + "; ".join(failures), report)
        notes += _commit(stage, tmp, out, force)
        report = dataclasses.replace(report, written=True, notes=tuple(notes))
        if failures:
            raise VerificationError(f"kept `{out}` (--keep-on-fail) although: " + "; ".join(failures), report)
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


def external_data_name(out: Path) -> str:
    """The one external-data file name bntool gives an ONNX file (both exporters use it)."""
    return f"{out.name}.data"


def _commit(stage: Path, tmp: Path, out: Path, force: bool) -> list[str]:
    """Move the external-data file, then the .onnx file, from ``stage`` into ``out``'s folder; returns notes.

    Nothing existing is replaced without ``force``. With it, an external-data
    file that another .onnx file of the folder refers to is neither replaced
    nor removed; the replaced file's own external data (``NAME.onnx.data``,
    the only name bntool gives) is removed when nothing else refers to it.
    Any other file the replaced .onnx file named is left as it is.
    """
    extra = [p for p in sorted(stage.iterdir()) if p != tmp]
    ours = external_data_name(out)
    old_refs = _external_data_files(out) if force and out.exists() else set()
    for p in extra:
        dst = out.parent / p.name
        users = _other_users(dst, out) if force and os.path.lexists(dst) else []
        if users:
            raise InputError(f"`{dst}` (the weights of the .onnx file) is also used by {_list(users)}; replacing it "
                             "would break that file; choose another --out or pass --embed-weights")
    outputs.commit_all([*((p, out.parent / p.name) for p in extra), (tmp, out)], force=force)
    notes = []
    written = {p.name for p in extra}
    stale = out.parent / ours
    if ours in old_refs and ours not in written and os.path.lexists(stale):
        users = _other_users(stale, out)
        if users:
            notes.append(f"kept `{stale}`, the replaced file's weights: {_list(users)} still use it")
        else:
            stale.unlink()
    others = sorted(old_refs - {ours} - written)
    if others:
        notes.append(f"the replaced file also named {_list(others)} as external data; bntool did not write "
                     "them for this output, so they were left as they are")
    return notes


def _other_users(data: Path, out: Path) -> list[str]:
    """The .onnx files beside ``out`` (``out`` itself excluded) that mention ``data``'s name."""
    users = []
    for candidate in sorted(out.parent.glob("*.onnx")):
        if candidate.name != out.name and mentions(candidate, data.name):
            users.append(candidate.name)
    return users


def _list(names: Sequence[str]) -> str:
    return ", ".join(f"`{n}`" for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


#: Larger .onnx files hold their weights and are not parsed to find external-data names.
_PARSE_LIMIT = 64 << 20


def _external_data_files(path: Path) -> set[str]:
    """Names of the external-data files an existing .onnx file refers to (in its own folder only)."""
    import onnx

    try:
        if path.stat().st_size > _PARSE_LIMIT:
            return {external_data_name(path)} if mentions(path, external_data_name(path)) else set()
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not an ONNX file we can read: nothing of ours to clean up
        return set()
    names = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if location and Path(location).name == location:
                names.add(location)
    return names


# ----------------------------------------------------------------------------- exporting


def write_onnx(model: nn.Module, inputs: Sequence[torch.Tensor], path: Path, spec: ExportSpec) -> str:
    """Run the exporter on ``model`` (eval mode, CPU) and write ``path``; returns which exporter was used."""
    model.eval()
    kwargs: dict[str, Any] = {"opset_version": spec.opset, "input_names": list(spec.input_names),
                              "output_names": list(spec.output_names)}
    try:
        with _quiet():
            if spec.exporter == "dynamo":
                if spec.dynamic_batch:
                    batch = torch.export.Dim("batch")
                    kwargs["dynamic_shapes"] = tuple({0: batch} for _ in inputs)
                program = torch.onnx.export(model, tuple(inputs), dynamo=True, verbose=False,
                                            optimize=spec.optimize == "full", **kwargs)
                if spec.optimize == "constants":
                    import onnxscript.optimizer

                    onnxscript.optimizer.fold_constants_ir(program.model)
                    onnxscript.optimizer.remove_unused_nodes(program.model)
                program.save(str(path), external_data=spec.external_data)
            else:
                if spec.dynamic_batch:
                    kwargs["dynamic_axes"] = {n: {0: "batch"} for n in (*spec.input_names, *spec.output_names)}
                torch.onnx.export(model, tuple(inputs), str(path), dynamo=False,
                                  do_constant_folding=spec.optimize == "full", **kwargs)
                if spec.external_data:
                    _externalize(path)
    except InputError:
        raise
    except Exception as exc:  # the exporter's own reason, in one or two lines
        if outputs.write_errno(exc) is not None:
            raise  # writing the file failed, not the model: the staging folder says so
        raise InputError(_exporter_reason(exc, type(model).__name__, spec.exporter)) from exc
    return EXPORTER_TEXT[spec.exporter]


def _externalize(path: Path) -> None:
    import onnx

    model = onnx.load(str(path))
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=1024)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters print progress, warnings and graph dumps; keep stdout (``--json``) and stderr clean."""
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _exporter_reason(exc: BaseException, model_name: str, exporter: str) -> str:
    cause = exc.__cause__ or exc
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    reason = f"{type(cause).__name__}: {first}" if first else type(cause).__name__
    where = re.search(r'raised this error:\s*File "([^"]+)", line (\d+), in \w+\s*\n\s*(.+)', str(exc))
    at = f" at {Path(where.group(1)).name}:{where.group(2)} `{where.group(3).strip()}`" if where else ""
    if exporter == "dynamo":
        hint = ("make the forward exportable by torch.export (no data-dependent Python control flow; see "
                "torch.cond), or pass --exporter torchscript, which traces only the path the example inputs take")
    else:
        hint = "pass --exporter dynamo, or make the forward traceable"
    return f"{EXPORTER_TEXT[exporter]} cannot export `{model_name}`: {shorten(reason, 300)}{at}; {hint}"


def _as_model_dtype(model: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    dtype = model_dtype(model)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)


def _batch_of(inputs: Sequence[torch.Tensor], dynamic: bool) -> int:
    if not inputs:
        raise InputError("no example inputs; pass --input-shape (e.g. 1,3,224,224) or --data")
    if any(t.dim() == 0 for t in inputs):
        raise InputError("an example input is a scalar, so it has no batch dimension; pass tensors shaped (N, ...)")
    sizes = {int(t.shape[0]) for t in inputs}
    if dynamic and len(sizes) > 1:
        raise InputError(f"the example inputs have different batch sizes {sorted(sizes)}; "
                         "a dynamic batch needs the same first dimension on every input")
    return int(inputs[0].shape[0])


def _input_names(model: nn.Module, count: int) -> list[str]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values() if p.kind in kinds]
    except (TypeError, ValueError):
        params = []
    if len(params) >= count:
        return params[:count]
    return ["input"] if count == 1 else [f"input_{i}" for i in range(count)]


def _output_names(template: Any) -> list[str]:
    names = []
    for path, _ in flatten_outputs(template, ""):
        parts = re.findall(r"\['?([^'\]]+)'?\]|\.(\w+)", path)
        name = "_".join(a or b for a, b in parts) or "output"
        name = f"output_{name}" if name[0].isdigit() else name
        names.append(name if name not in names else f"{name}_{len(names)}")
    return names


def _names(given: Sequence[str] | None, default: list[str], what: str) -> tuple[str, ...]:
    if given is None:
        return tuple(default)
    if len(set(given)) != len(given):
        raise InputError(f"the {what} names ({', '.join(given)}) repeat; pass distinct names")
    if len(given) != len(default):
        raise InputError(f"{len(given)} {what} name(s) given ({', '.join(given)}) but the model has {len(default)} "
                         f"{what}(s) ({', '.join(default)}); pass one name per {what}")
    return tuple(given)
