"""Running an ONNX file in onnxruntime and comparing it with the PyTorch model, at each batch size.

``OrtRunner`` runs the file with every graph optimization off, so that the
file itself is checked and not onnxruntime's rewrite of it (the CUDA
provider, TF32 off, on a CUDA device when onnxruntime has it);
``verify_onnx`` compares its outputs with the PyTorch model's at each batch
size, with the tolerance of ``verify.compare`` (against references of the
original computed once, when the caller has them). ``inputs_at`` cuts or
grows the example inputs to another batch size. onnxruntime is imported
inside the functions: ``import bntool`` does not import it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..deprecation import plumbing
from ..errors import InputError, VerificationError, first_line
from ..runtime.running import flatten_outputs, resolve_device, run_eval
from ..verify.compare import Comparison, Reference, compare_layers


def providers_for(device: torch.device) -> list[Any]:
    """The CUDA provider (TF32 off) on a CUDA device when this onnxruntime has it, else the CPU one."""
    import onnxruntime as ort

    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        options = {"device_id": str(device.index or 0), "use_tf32": "0"}
        return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtRunner:
    """An onnxruntime session on one file, graph optimizations off; called with a list of tensors.

    Returns the outputs as CPU tensors, in the file's output order.
    """

    def __init__(self, path: str | os.PathLike, device: torch.device, *, optimize: bool = False,
                 threads: int | None = None, arena: bool = True):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        options.log_severity_level = 3
        # as many threads as torch uses (not every core): the caller's torch.set_num_threads holds for both
        options.intra_op_num_threads = threads or torch.get_num_threads()
        # ``arena=False``: no CPU memory arena and no pre-planned activation buffers, so that memory a run frees
        # goes back at once (verification: a few runs, 5-10% lower peak on ResNet-50 at batch 8, a little slower)
        options.enable_cpu_mem_arena = arena
        options.enable_mem_pattern = arena
        self.session = ort.InferenceSession(str(path), options, providers=providers_for(device))
        self.provider = self.session.get_providers()[0]
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"the ONNX file takes {len(self.input_names)} inputs, got {len(inputs)}")
        feed = {name: t.detach().cpu().numpy() for name, t in zip(self.input_names, inputs)}
        return [torch.from_numpy(a) for a in self.session.run(None, feed)]


# ----------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class BatchCheck:
    batch_size: int
    comparison: Comparison


@dataclass(frozen=True)
class OnnxVerification:
    """onnxruntime vs PyTorch at each batch size."""

    provider: str
    checks: tuple[BatchCheck, ...]

    @property
    def passed(self) -> bool:
        return all(c.comparison.passed for c in self.checks)

    def failures(self) -> list[str]:
        return [c.comparison.failure_message(f"onnxruntime ({self.provider}) at batch {c.batch_size}")
                for c in self.checks if not c.comparison.passed]


class OrtLoadError(VerificationError):
    """onnxruntime cannot load the file (``reason``: its own first line); the report is None."""

    def __init__(self, reason: str):
        super().__init__(f"onnxruntime cannot load the file: {reason}")
        self.reason = reason


def verify_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    inputs: Mapping[int, Sequence[torch.Tensor]] | Sequence[torch.Tensor],
    *,
    device: str | torch.device = "auto",
    atol: float | None = None,
    rtol: float | None = None,
    **internal: Any,
) -> OnnxVerification:
    """Run ``path`` in onnxruntime (graph optimizations off) and compare with ``model`` in eval mode.

    ``inputs`` is one list of tensors or ``{batch_size: tensors}``. The CUDA
    provider (TF32 off) is used on a CUDA ``device`` when onnxruntime has it.
    Raises ``OrtLoadError`` when onnxruntime cannot load the file, and
    ``VerificationError`` when it cannot run it or its outputs are not the
    model's. (``template`` and ``references``, bntool's own plumbing, are
    accepted for one release with a ``FutureWarning``: ``verify_file``.)
    """
    plumbing(internal, ("template", "references"), "verify_onnx",
             "`bntool.onnxio.ort.verify_file` takes it")
    return verify_file(model, path, inputs, device=device, atol=atol, rtol=rtol, **internal)


def verify_file(
    model: nn.Module | None,
    path: str | os.PathLike,
    inputs: Mapping[int, Sequence[torch.Tensor]] | Sequence[torch.Tensor],
    *,
    device: str | torch.device = "auto",
    atol: float | None = None,
    rtol: float | None = None,
    template: Any = None,
    references: Mapping[int, Reference] | None = None,
) -> OnnxVerification:
    """``verify_onnx`` against the original's outputs computed before: ``references``
    (``{batch_size: Reference.of(model, inputs[batch_size])}``) saves running ``model`` again; where every batch
    size has one and ``template`` (the outputs' structure) is given, ``model`` may be ``None``."""
    feed = dict(inputs) if isinstance(inputs, Mapping) else {int(inputs[0].shape[0]): tuple(inputs)}
    references = dict(references or {})
    if model is None and (template is None or set(feed) - set(references)):
        raise ValueError("verify_onnx needs the model, or a template and a reference at every batch size")
    target = resolve_device(device)
    if template is None:
        template = run_eval(model, feed[min(feed)])  # the outputs' structure
    try:
        runner = OrtRunner(path, target, arena=False)
    except Exception as exc:  # onnxruntime's own exception types (Fail, InvalidGraph, ...)
        text = first_line(exc, 300).replace(str(path), f"`{Path(path).name}`")  # (not bntool's staging folder)
        raise OrtLoadError(text) from exc
    expected = len(flatten_outputs(template))

    def candidate(batch_inputs: Sequence[torch.Tensor]) -> Any:
        try:
            outputs = runner(batch_inputs)
        except Exception as exc:
            raise VerificationError(f"onnxruntime fails on the file: {first_line(exc, 300)}") from exc
        if len(outputs) != expected:
            raise VerificationError(f"the ONNX file has {len(outputs)} outputs but the model returns {expected} "
                                    "tensors")
        return _fill(template, iter(outputs))

    checks = tuple(BatchCheck(b, compare_layers(model, candidate, feed[b], device=target, atol=atol, rtol=rtol,
                                         reference=references.get(b)))
                   for b in sorted(feed))
    return OnnxVerification(runner.provider, checks)


def _fill(template: Any, leaves: Iterator[torch.Tensor]) -> Any:
    """``template`` with its tensors replaced, in ``flatten_outputs`` order, by ``leaves``."""
    if isinstance(template, torch.Tensor):
        return next(leaves)
    if isinstance(template, dict):
        return {k: _fill(v, leaves) for k, v in template.items()}
    if isinstance(template, (tuple, list)):
        values = [_fill(v, leaves) for v in template]
        return type(template)(*values) if hasattr(template, "_fields") else type(template)(values)
    if dataclasses.is_dataclass(template) and not isinstance(template, type):
        return dataclasses.replace(template, **{f.name: _fill(getattr(template, f.name), leaves)
                                                for f in dataclasses.fields(template) if f.init})
    return template


def inputs_at(inputs: Sequence[torch.Tensor], batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``inputs`` cut to ``batch`` samples, or grown with new samples drawn like the examples."""
    generator = torch.Generator().manual_seed(seed + batch)
    grown = []
    for t in inputs:
        have = t.shape[0]
        if batch <= have:
            grown.append(t[:batch])
            continue
        if t.is_floating_point():
            ref = t.double()
            new = torch.randn((batch - have, *t.shape[1:]), generator=generator, dtype=torch.float64)
            new = (new * ref.std().clamp_min(1e-3) + ref.mean()).to(t.dtype)
        else:
            new = t[torch.randint(have, (batch - have,), generator=generator)]
        grown.append(torch.cat([t, new.to(t.device)]))
    return tuple(grown)


def verification_batch_sizes(batch: int, dynamic: bool, asked: Sequence[int] | None = None) -> list[int]:
    """``asked`` (checked), else the export batch, plus 1 and ``batch + 1`` when the batch is dynamic."""
    if not asked:
        return sorted({batch, 1, batch + 1}) if dynamic else [batch]
    bad = [b for b in asked if b < 1]
    if bad:
        raise InputError(f"`verify_batch_sizes` {bad[0]}: pass positive batch sizes")
    other = [b for b in asked if b != batch]
    if other and not dynamic:
        raise InputError(f"the file has the fixed batch size {batch}, so it cannot run at batch {other[0]}; "
                         "pass `dynamic_batch=True`, or `verify_batch_sizes` "
                         f"{batch}")
    return sorted(set(asked))
