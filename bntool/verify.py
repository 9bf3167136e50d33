"""Numeric verification: inputs, devices, TF32, and the one tolerance rule.

The tolerance is derived from the model itself. A float64 copy of the original
model is the reference; the original in its own dtype is some distance from
it (its rounding error). The candidate (folded, frozen, exported...) passes
when it is no more than ``SLACK`` times that far from the reference, with a
floor of a few units of the dtype's rounding at the output's scale. A fold
that is wrong in one channel of one layer lands far outside that band.
``atol`` / ``rtol`` replace the derived rule with a plain
``|candidate - original| <= atol + rtol * |original|`` check.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import InputError

#: The candidate may be this many times further from the float64 reference
#: than the original model in its own dtype is.
SLACK = 8.0
#: Floor, in units of the dtype's machine epsilon times the output's largest
#: magnitude, below which differences are never called failures.
FLOOR_EPS = {torch.float64: 8.0, torch.float32: 8.0, torch.float16: 8.0, torch.bfloat16: 8.0}


@dataclass(frozen=True)
class OutputComparison:
    """One output tensor: how far the candidate is from the original."""

    name: str
    shape: tuple[int, ...]
    max_abs_error: float
    max_rel_error: float
    tolerance: float
    passed: bool
    original_error: float | None = None
    candidate_error: float | None = None
    argmax_agreement: float | None = None


@dataclass(frozen=True)
class Comparison:
    """Every output of one check. ``passed`` only if every output passed."""

    outputs: tuple[OutputComparison, ...]
    device: str
    rule: str

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def max_abs_error(self) -> float:
        return max((o.max_abs_error for o in self.outputs), default=0.0)

    @property
    def max_rel_error(self) -> float:
        return max((o.max_rel_error for o in self.outputs), default=0.0)

    def failure_message(self, what: str) -> str:
        bad = [o for o in self.outputs if not o.passed]
        parts = [
            f"`{o.name}` max abs error {o.max_abs_error:.3g} > tolerance {o.tolerance:.3g} "
            f"(max rel error {o.max_rel_error:.3g})"
            for o in bad
        ]
        return f"{what} does not match the original on {self.device}: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "device": self.device,
            "rule": self.rule,
            "outputs": [dataclasses.asdict(o) for o in self.outputs],
        }


# ----------------------------------------------------------------------------- devices


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``auto`` is the first CUDA GPU when one is present, else the CPU."""
    if isinstance(spec, torch.device):
        return spec
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise InputError(f"unknown device `{spec}`; pass --device auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {spec}: no CUDA GPU is available here; pass --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present; "
                f"pass an index below {torch.cuda.device_count()}"
            )
    elif device.type != "cpu":
        raise InputError(f"unsupported device `{spec}`; pass --device auto, cpu, cuda or cuda:N")
    return device


def _tf32_flags() -> list[tuple[Any, str, str]]:
    """(object, attribute, name) of every TF32 switch: the fp32_precision API where torch has it, else allow_tf32."""
    b = torch.backends
    if hasattr(b.cuda.matmul, "fp32_precision") and hasattr(b.cudnn, "conv"):
        return [(b.cuda.matmul, "fp32_precision", "cuda.matmul"), (b.cudnn.conv, "fp32_precision", "cudnn.conv"),
                (b.cudnn.rnn, "fp32_precision", "cudnn.rnn")]
    return [(b.cuda.matmul, "allow_tf32", "cuda.matmul"), (b.cudnn, "allow_tf32", "cudnn")]


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 on or off for cuDNN convolutions / RNNs and cuBLAS matmuls for the duration; the caller's settings are restored.

    Off is full float32 precision: what verification and exact statistics need.
    On is what a model deployed with TF32 computes (PyTorch's default for cuDNN convolutions).
    """
    flags = _tf32_flags()
    saved = [getattr(obj, attr) for obj, attr, _ in flags]
    try:
        for obj, attr, _ in flags:
            setattr(obj, attr, ("tf32" if enabled else "ieee") if attr == "fp32_precision" else enabled)
        yield
    finally:
        for (obj, attr, _), value in zip(flags, saved):
            setattr(obj, attr, value)


def tf32_disabled() -> contextlib.AbstractContextManager[None]:
    """Full float32 precision on CUDA for the duration; the caller's settings are restored."""
    return tf32(False)


def tf32_state() -> dict[str, Any]:
    """The current TF32 settings, by flag (for reports and tests)."""
    return {f"{name}.{attr}": getattr(obj, attr) for obj, attr, name in _tf32_flags()}


# ----------------------------------------------------------------------------- inputs


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``."""
    parts = [p for p in text.replace("x", ",").replace(" ", "").split(",") if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise InputError(f"--input-shape `{text}` is not a shape; pass positive integers such as 1,3,224,224")
    return shape


def declared_input_shapes(model: nn.Module) -> list[tuple[int, ...]] | None:
    """Shapes a model declares: ``input_shape`` (bntool examples) or ``example_input_array`` (Lightning)."""
    example = getattr(model, "example_input_array", None)
    if isinstance(example, torch.Tensor):
        return [tuple(example.shape)]
    if isinstance(example, (tuple, list)) and example and all(isinstance(t, torch.Tensor) for t in example):
        return [tuple(t.shape) for t in example]
    shape = getattr(model, "input_shape", None)
    if isinstance(shape, (tuple, list)) and shape:
        if all(isinstance(d, int) for d in shape):
            return [tuple(shape)]
        if all(isinstance(s, (tuple, list)) and all(isinstance(d, int) for d in s) for s in shape):
            return [tuple(s) for s in shape]
    return None


def make_inputs(
    model: nn.Module,
    shapes: Sequence[tuple[int, ...]] | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, ...]:
    """Standard-normal inputs of the given (or declared) shapes, reproducible from ``seed``."""
    shapes = list(shapes) if shapes else declared_input_shapes(model)
    if not shapes:
        raise InputError(
            f"cannot tell the input shape of `{type(model).__name__}`; pass --input-shape, e.g. "
            "--input-shape 1,3,224,224 (repeat it for a model with several inputs)"
        )
    dtype = dtype or model_dtype(model)
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for shape in shapes)


def model_dtype(model: nn.Module) -> torch.dtype:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def model_device(model: nn.Module) -> torch.device:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------- outputs


def flatten_outputs(obj: Any, name: str = "output") -> list[tuple[str, torch.Tensor]]:
    """Every tensor in a (nested) tensor / tuple / list / dict / dataclass output, named by its path."""
    if isinstance(obj, torch.Tensor):
        return [(name, obj)]
    if isinstance(obj, dict):
        return [item for key, value in obj.items() for item in flatten_outputs(value, f"{name}[{key!r}]")]
    if isinstance(obj, (tuple, list)):
        return [item for i, value in enumerate(obj) for item in flatten_outputs(value, f"{name}[{i}]")]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [
            item for f in dataclasses.fields(obj) for item in flatten_outputs(getattr(obj, f.name), f"{name}.{f.name}")
        ]
    return []


@contextlib.contextmanager
def training_flags(model: nn.Module, train: bool) -> Iterator[nn.Module]:
    """Put every module in train or eval mode; restore each module's own flag afterwards."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.train(train)
        yield model
    finally:
        for module, flag in saved:
            module.training = flag


def run_model(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    *,
    train: bool = False,
    forward: Callable | None = None,
    probes: Sequence[str] = (),
) -> list[tuple[str, torch.Tensor]]:
    """Run ``model`` on ``inputs`` (moved to the model's device and dtype) with no grad.

    Returns the named output tensors, followed by the outputs of the modules
    named in ``probes`` (as ``layer `name```), in the order given.
    """
    device, dtype = model_device(model), model_dtype(model)
    moved = [t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in inputs]
    seen: dict[str, torch.Tensor] = {}

    def probe(name: str):
        def hook(module, args, output) -> None:
            if isinstance(output, torch.Tensor):
                seen.setdefault(name, output.detach().clone())

        return hook

    handles = [model.get_submodule(name).register_forward_hook(probe(name)) for name in probes]
    try:
        with torch.no_grad(), training_flags(model, train), inputs_must_fit(model, moved):
            out = forward(model, moved) if forward else model(*moved)
    finally:
        for handle in handles:
            handle.remove()
    return flatten_outputs(out) + [(f"layer `{name}`", seen[name]) for name in probes if name in seen]


@contextlib.contextmanager
def inputs_must_fit(model: nn.Module, inputs: Sequence[torch.Tensor]) -> Iterator[None]:
    """Turn the model's own complaint about its inputs into one clear input error."""
    try:
        yield
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        shapes = ", ".join("x".join(map(str, t.shape)) for t in inputs)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"running `{type(model).__name__}` on inputs of shape {shapes} failed: {first[:200]}; "
            "pass the shape it expects with --input-shape"
        ) from exc


def _on_device(model: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    if model_device(model) == device and (dtype is None or model_dtype(model) == dtype):
        return model
    moved = copy.deepcopy(model).to(device)
    return moved.to(dtype) if dtype is not None else moved


def compare(
    original: nn.Module,
    candidate: nn.Module | Callable[[Sequence[torch.Tensor]], Any],
    inputs: Sequence[torch.Tensor],
    *,
    device: str | torch.device = "auto",
    atol: float | None = None,
    rtol: float | None = None,
    candidate_train: bool = False,
    probes: Sequence[str] = (),
) -> Comparison:
    """Compare ``candidate`` with ``original`` (eval mode) on ``inputs``, TF32 off.

    ``candidate`` is a module (run in eval mode unless ``candidate_train``) or
    a callable taking the list of inputs (an onnxruntime session, say) and
    returning outputs of the same structure. ``probes`` names modules, present
    in both models, whose outputs are compared too: a layer-by-layer check
    sees an error in one channel that the final output may hide (a ReLU that
    zeroes it, a sigmoid that saturates). The models given are not changed: a
    model not already on ``device`` is copied there.
    """
    device = resolve_device(device)
    original_dev = _on_device(original, device)
    probes = tuple(probes) if isinstance(candidate, nn.Module) else ()
    with tf32_disabled():
        original_out = run_model(original_dev, inputs, probes=probes)
        if isinstance(candidate, nn.Module):
            candidate_out = run_model(_on_device(candidate, device), inputs, train=candidate_train, probes=probes)
        else:
            candidate_out = flatten_outputs(candidate(inputs))
        reference_out = None
        if atol is None and rtol is None:
            reference_out = run_model(_on_device(original, device, torch.float64), inputs, probes=probes)
    if [n for n, _ in original_out] != [n for n, _ in candidate_out]:
        raise InputError(
            "the candidate's outputs do not have the original's structure: "
            f"{[n for n, _ in original_out]} vs {[n for n, _ in candidate_out]}"
        )
    results = []
    for i, ((name, orig), (_, cand)) in enumerate(zip(original_out, candidate_out)):
        ref = reference_out[i][1] if reference_out is not None else None
        results.append(_compare_one(name, orig, cand.to(orig.device), ref, atol, rtol))
    rule = "derived" if reference_out is not None else f"atol={atol or 0.0:g} rtol={rtol or 0.0:g}"
    return Comparison(outputs=tuple(results), device=str(device), rule=rule)


def _compare_one(
    name: str,
    orig: torch.Tensor,
    cand: torch.Tensor,
    ref: torch.Tensor | None,
    atol: float | None,
    rtol: float | None,
) -> OutputComparison:
    if orig.shape != cand.shape:
        return OutputComparison(name, tuple(orig.shape), float("inf"), float("inf"), 0.0, False)
    if not orig.is_floating_point():
        equal = bool(torch.equal(orig, cand))
        return OutputComparison(name, tuple(orig.shape), 0.0 if equal else float("inf"), 0.0, 0.0, equal)
    o64, c64 = orig.double(), cand.double()
    finite = bool(torch.equal(torch.isfinite(c64), torch.isfinite(o64)))
    both = torch.isfinite(c64) & torch.isfinite(o64)
    o64, c64 = torch.where(both, o64, 0.0), torch.where(both, c64, 0.0)
    diff = (c64 - o64).abs()
    scale = o64.abs().max().item() if o64.numel() else 0.0
    max_abs = diff.max().item() if diff.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    original_error = candidate_error = None
    if ref is not None:
        r64 = torch.where(both, ref.double(), 0.0)
        original_error = (o64 - r64).abs().max().item() if o64.numel() else 0.0
        candidate_error = (c64 - r64).abs().max().item() if c64.numel() else 0.0
        floor = FLOOR_EPS.get(orig.dtype, 8.0) * torch.finfo(orig.dtype).eps * max(scale, 1e-30)
        tolerance = max(SLACK * original_error, floor)
        passed = finite and candidate_error <= tolerance
    else:
        a, r = atol or 0.0, rtol or 0.0
        tolerance = a + r * scale
        passed = finite and bool((diff <= a + r * o64.abs()).all())
    agreement = None
    if orig.dim() == 2 and orig.shape[1] > 1:
        agreement = (orig.argmax(dim=1) == cand.argmax(dim=1)).double().mean().item()
    return OutputComparison(
        name=name,
        shape=tuple(orig.shape),
        max_abs_error=max_abs,
        max_rel_error=max_rel,
        tolerance=tolerance,
        passed=passed,
        original_error=original_error,
        candidate_error=candidate_error,
        argmax_agreement=agreement,
    )
