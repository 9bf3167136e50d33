"""Running the exporter and writing its file: ``write_onnx`` (dynamo or TorchScript) and ``save_onnx``.

``ExportSpec`` says how to call the exporter, with the input and output
names chosen or derived from the model (``default_input_names``: its
forward's parameters; ``default_output_names``: the paths of its outputs).

``save_onnx`` writes the dynamo exporter's program with its weights streamed
into the file one tensor at a time (``onnx_stream.write_model``), the very
bytes ``ONNXProgram.save`` writes, and ``write_onnx`` lets the exported graph
go of the model's tensors once it is saved, so that nothing but the model
holds its weights while the file is checked.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import InputError, shorten
from ..io import outputs
from ..onnxio.stream import IN_PLACE_MIN, PENDING, Pending, write_model
from ..runtime.running import flatten_outputs, training_flags

EXPORTER_TEXT = {
    "dynamo": "torch.onnx.export(dynamo=True) (torch.export)",
    "torchscript": "torch.onnx.export(dynamo=False) (TorchScript tracing)",
}


def default_input_names(model: nn.Module, count: int) -> list[str]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values() if p.kind in kinds]
    except (TypeError, ValueError):
        params = []
    if len(params) >= count:
        return params[:count]
    return ["input"] if count == 1 else [f"input_{i}" for i in range(count)]


def default_output_names(template: Any) -> list[str]:
    names = []
    for path, _ in flatten_outputs(template, ""):
        parts = re.findall(r"\['?([^'\]]+)'?\]|\.(\w+)", path)
        name = "_".join(a or b for a, b in parts) or "output"
        name = f"output_{name}" if name[0].isdigit() else name
        names.append(name if name not in names else f"{name}_{len(names)}")
    return names


def chosen_names(given: Sequence[str] | None, default: list[str], what: str) -> tuple[str, ...]:
    if given is None:
        return tuple(default)
    if len(set(given)) != len(given):
        raise InputError(f"the {what} names ({', '.join(given)}) repeat; pass distinct names")
    if len(given) != len(default):
        raise InputError(f"{len(given)} {what} name(s) given ({', '.join(given)}) but the model has {len(default)} "
                         f"{what}(s) ({', '.join(default)}); pass one name per {what}")
    return tuple(given)


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


class Written(NamedTuple):
    """What ``write_onnx`` did: the exporter used, and the initializers named after one of the model's tensors
    that hold another value, which the exporter's optimizer computed (it fused a layer pair itself)."""

    exporter: str
    rewritten: tuple[str, ...] = ()


def write_onnx(model: nn.Module, inputs: Sequence[torch.Tensor], path: Path, spec: ExportSpec) -> Written:
    """Run the exporter on ``model`` (in eval mode for the call, on the CPU) and write ``path``. The dynamo
    exporter's weights go to the file one tensor at a time (``save_onnx``)."""
    rewritten: tuple[str, ...] = ()
    kwargs: dict[str, Any] = {"opset_version": spec.opset, "input_names": list(spec.input_names),
                              "output_names": list(spec.output_names)}
    try:
        with _quiet(), training_flags(model, False):
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
                rewritten = _rewritten(program, model)
                save_onnx(program, path, spec.external_data)
                _let_go(program)
                del program
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
    return Written(EXPORTER_TEXT[spec.exporter], rewritten)


def _rewritten(program: Any, model: nn.Module) -> tuple[str, ...]:
    """Initializers named after one of ``model``'s tensors whose value is not that tensor.

    The exporter hands over the model's own tensors; its optimizer replaces
    one when it computes a new value under the same name (a
    BatchNormalization it fused into the Conv before it, where bntool left
    the BN because the PyTorch layer's weight is recomputed at each call).
    """
    state = model.state_dict(keep_vars=True)
    names = []
    for name, value in program.model.graph.initializers.items():
        own = state.get(name)
        if own is None:
            continue
        held = getattr(value.const_value, "raw", None)
        if not (isinstance(held, torch.Tensor) and held.data_ptr() == own.data_ptr() and held.shape == own.shape
                and held.dtype == own.dtype):
            names.append(name)
    return tuple(names)


#: Above this many bytes of weights the exporter writes them as external data on its own (protobuf stops at 2 GB).
EMBED_LIMIT = 1536 << 20


def save_onnx(program: Any, path: Path, external_data: bool | None) -> None:
    """Save a ``torch.onnx.ONNXProgram`` as ``program.save`` does, never holding its weights twice.

    External data (asked for, or above ``EMBED_LIMIT`` when not said) is the
    exporter's own streaming save. Embedded weights: the model is serialized
    with each large initializer as a stand-in, and ``onnx_stream.write_model``
    writes each one's bytes in its place, one tensor at a time: the same bytes
    ``program.save`` writes, without the whole model as a message and again as
    a byte string.
    """
    import onnx_ir as ir
    from onnx_ir.serde import TensorProtoTensor, serialize_model

    graph = program.model.graph
    size = sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None)
    if external_data or (external_data is None and size > EMBED_LIMIT):
        program.save(str(path), external_data=True)
        return
    kept = (ir.ExternalTensor, ir.StringTensor, ir.PackedTensor, TensorProtoTensor)
    swapped: list[tuple[Any, Any]] = []
    pending: dict[str, Pending] = {}
    try:
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None or isinstance(tensor, kept) or tensor.nbytes < IN_PLACE_MIN:
                continue
            pending[value.name] = Pending(tensor.nbytes, tensor.tofile)
            swapped.append((value, tensor))
            value.const_value = ir.ExternalTensor(
                PENDING, None, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=value.name,
                doc_string=tensor.doc_string, metadata_props=dict(tensor.metadata_props))
        proto = serialize_model(program.model)
    finally:
        for value, tensor in swapped:
            value.const_value = tensor
    write_model(proto, pending, path)


def _let_go(program: Any) -> None:
    """Drop the exported graph's references to the model's tensors: onnxscript's rewrite rules keep the last graph
    they matched (module-level objects), and with it every weight, long after the program is gone."""
    for graph in program.model.graphs():
        for value in graph.initializers.values():
            value.const_value = None


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
                "torch.cond), or pass `exporter=\"torchscript\"`, which traces only the path the example inputs take")
    else:
        hint = 'pass `exporter="dynamo"`, or make the forward traceable'
    return f"{EXPORTER_TEXT[exporter]} cannot export `{model_name}`: {shorten(reason, 300)}{at}; {hint}"
