"""Numeric verification: inputs, devices, TF32, and the one tolerance rule.

The tolerance is derived from the model itself. A float64 copy of the original
model is the reference; the original in its own dtype is some distance from
it (its rounding error). The candidate (folded, frozen, exported...) passes
when it is no more than ``SLACK`` times that far from the reference, with a
floor of a few units of the dtype's rounding at the output's scale. A fold
that is wrong in one channel of one layer lands far outside that band.
``atol`` / ``rtol`` replace the derived rule with a plain
``|candidate - original| <= atol + rtol * |original|`` check.
Whatever the rule, an output with a NaN or an infinity, in the candidate or
in the original, never passes: equal NaNs prove nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import InputError, out_of_memory, out_of_memory_message, shorten
from .spill import TensorStore

#: The candidate may be this many times further from the float64 reference
#: than the original model in its own dtype is.
SLACK = 8.0
#: Floor, in units of the dtype's machine epsilon times the output's largest
#: magnitude, below which differences are never called failures.
FLOOR_EPS = {torch.float64: 8.0, torch.float32: 8.0, torch.float16: 8.0, torch.bfloat16: 8.0}
#: A candidate whose weights were recomputed (folded) carries their rounding, about one unit each, summed
#: over a layer's fan-in: the floor grows with ``sqrt(fan_in / FAN_IN_FREE)`` for fan-ins above this.
FAN_IN_FREE = 64


def rounding_factor(fan_in: int | None) -> float:
    """How much the floor widens for outputs that depend on rounded weights with this fan-in."""
    return max(1.0, (fan_in / FAN_IN_FREE) ** 0.5) if fan_in else 1.0


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
    nonfinite: str | None = None  # which side holds NaN / inf values, and how many


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
            f"`{o.name}` has non-finite values ({o.nonfinite}), which are never verified" if o.nonfinite else
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
        raise InputError(f"unknown device `{spec}`; pass `device=\"auto\"`, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {spec}: no CUDA GPU is available here; pass `device=\"cpu\"` or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(
                f"device {spec}: only {torch.cuda.device_count()} CUDA device(s) present; "
                f"pass an index below {torch.cuda.device_count()}"
            )
    elif device.type != "cpu":
        raise InputError(f"unsupported device `{spec}`; pass `device=\"auto\"`, cpu, cuda or cuda:N")
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
            f"cannot tell the input shape of `{type(model).__name__}`; pass `example_inputs` (e.g. of shape "
            "1,3,224,224; one per model input), or give the model an `input_shape` attribute"
        )
    dtype = dtype or model_dtype(model)
    _inputs_must_fit_in_memory(shapes, dtype)
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for shape in shapes)


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (``MemAvailable``), or ``None`` if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _inputs_must_fit_in_memory(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype) -> None:
    """Refuse, before allocating, inputs that cannot fit: drawn in float64, then cast (several copies)."""
    size = sum(math.prod(shape) for shape in shapes)
    need = size * (8 + torch.empty((), dtype=dtype).element_size())
    free = available_memory()
    if free is not None and need > free:
        text = ", ".join(",".join(map(str, s)) for s in shapes)
        raise InputError(f"--input-shape {text} needs {_bytes(need)} for the inputs alone, but only {_bytes(free)} "
                         "of memory is available (the model needs more still); pass a smaller shape, "
                         "e.g. batch size 1")


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} PB"


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
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    on_probe: Callable[[str, torch.Tensor], None] | None = None,
) -> list[tuple[str, torch.Tensor]]:
    """Run ``model`` on ``inputs`` (moved to ``device`` and ``dtype``, by default the model's) with no grad.

    Returns the named output tensors, followed by the outputs of every call of
    the modules named in ``probes`` (as ``layer `name``` and ``layer `name`
    (call 2)``...), in the order the calls ran. With ``on_probe``, each probed
    output is handed to it as the call returns instead (nothing is kept).
    """
    device, dtype = device or model_device(model), dtype or model_dtype(model)
    moved = [t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in inputs]
    seen: list[tuple[str, torch.Tensor]] = []
    calls: dict[str, int] = {}

    def probe(name: str):
        def hook(module, args, output) -> None:
            if isinstance(output, torch.Tensor):
                calls[name] = calls.get(name, 0) + 1
                label = f"layer `{name}`" + (f" (call {calls[name]})" if calls[name] > 1 else "")
                if on_probe is not None:
                    on_probe(label, output.detach())
                else:
                    seen.append((label, output.detach().clone()))

        return hook

    handles = [model.get_submodule(name).register_forward_hook(probe(name)) for name in dict.fromkeys(probes)]
    try:
        with torch.no_grad(), training_flags(model, train), inputs_must_fit(model, moved):
            out = forward(model, moved) if forward else model(*moved)
    finally:
        for handle in handles:
            handle.remove()
    return flatten_outputs(out) + seen


@contextlib.contextmanager
def inputs_must_fit(model: nn.Module, inputs: Sequence[torch.Tensor]) -> Iterator[None]:
    """Turn the model's own complaint about its inputs into one clear input error."""
    try:
        yield
    except (RuntimeError, ValueError, TypeError, IndexError, MemoryError) as exc:
        shapes = ", ".join("x".join(map(str, t.shape)) for t in inputs)
        if out_of_memory(exc):
            raise InputError(out_of_memory_message(exc, f"running `{type(model).__name__}` on inputs of shape "
                                                        f"{shapes}")) from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"running `{type(model).__name__}` on inputs of shape {shapes} failed: {shorten(first, 200)}; "
            "pass `example_inputs` of the shape it expects"
        ) from exc


@contextlib.contextmanager
def lent(model: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> Iterator[nn.Module]:
    """Run ``model`` on ``device`` (in ``dtype``) without a copy of it: each module's own tensors move there
    for the duration of its call only.

    At most the modules of the current call stack are on the device (in
    ``dtype``) at once, so a float64 reference of a model, or a GPU check of a
    CPU model, costs one layer's worth of memory, not a whole copy. A forward
    that reads another module's tensors outside that module's call fails with
    a device or dtype mismatch; ``run_on`` then falls back to a whole copy.
    """
    on_loan: list[list[tuple[dict, str, torch.Tensor]]] = []

    def borrow(module: nn.Module, args: Any) -> None:
        saved = []
        for store in (module._parameters, module._buffers):
            for key, tensor in store.items():
                if tensor is None:
                    continue
                cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
                saved.append((store, key, tensor))
                store[key] = tensor.detach().to(device=device, dtype=cast)
        on_loan.append(saved)

    def give_back(module: nn.Module, args: Any, output: Any) -> None:
        for store, key, tensor in on_loan.pop():
            store[key] = tensor

    owners = {id(m): m for m in model.modules()
              if any(t is not None for t in (*m._parameters.values(), *m._buffers.values()))}
    handles = [h for m in owners.values()
               for h in (m.register_forward_pre_hook(borrow), m.register_forward_hook(give_back))]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        while on_loan:  # a call that raised never reached its forward hook
            for store, key, tensor in on_loan.pop():
                store[key] = tensor


def run_on(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    device: torch.device,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> list[tuple[str, torch.Tensor]]:
    """``run_model`` with the model on ``device`` (and in ``dtype``): lent layer by layer, else a whole copy."""
    dtype = dtype or model_dtype(model)
    if model_device(model) == device and model_dtype(model) == dtype:
        return run_model(model, inputs, device=device, dtype=dtype, **kwargs)
    try:
        with lent(model, device, dtype):
            return run_model(model, inputs, device=device, dtype=dtype, **kwargs)
    except Exception:  # noqa: BLE001 - the forward reads tensors across modules: use a whole copy
        from .cloning import clone

        whole = clone(model).to(device=device)
        if dtype != model_dtype(whole):
            whole = whole.to(dtype)
        return run_model(whole, inputs, device=device, dtype=dtype, **kwargs)


@dataclass(frozen=True)
class Reference:
    """The original model on fixed inputs, for every comparison against them (computed once, reused).

    ``outputs``: its outputs in its own dtype; ``layers``: the outputs of the
    probed layers (by label); ``float64``: its outputs in float64, and
    ``layer_deltas``: for each probed layer, float64 minus own-dtype output,
    for the derived tolerance. The deltas are tiny next to the outputs, so
    they are kept in bfloat16 (their own error stays below 0.4%), and no
    layer output is kept in float64. Layer outputs beyond a few tens of MB go
    to an unlinked temporary file (``spill.TensorStore``), not to memory.
    """

    outputs: tuple[tuple[str, torch.Tensor], ...]
    layers: TensorStore
    float64: tuple[tuple[str, torch.Tensor], ...] | None
    layer_deltas: TensorStore
    device: torch.device

    @classmethod
    def of(
        cls,
        original: nn.Module,
        inputs: Sequence[torch.Tensor],
        *,
        device: str | torch.device = "auto",
        probes: Sequence[str] = (),
        float64: bool = True,
    ) -> Reference:
        """Run ``original`` (eval mode, TF32 off) on ``inputs``, and in float64 when ``float64``, layer by layer."""
        device = resolve_device(device)
        layers, deltas = TensorStore(), TensorStore()

        def keep(label: str, output: torch.Tensor) -> None:
            layers.put(label, output)

        def measure(label: str, output: torch.Tensor) -> None:
            mine = layers.get(label) if label in layers else None
            if mine is not None and mine.shape == output.shape and mine.is_floating_point():
                deltas.put(label, (output - mine.double()).to(torch.bfloat16))

        with tf32_disabled():
            outputs = run_on(original, inputs, device, probes=probes, on_probe=keep)
            high = run_on(original, inputs, device, torch.float64, probes=probes, on_probe=measure) if float64 else None
        return cls(tuple(outputs), layers, tuple(high) if high is not None else None, deltas, device)


def compare(
    original: nn.Module | None,
    candidate: nn.Module | Callable[[Sequence[torch.Tensor]], Any],
    inputs: Sequence[torch.Tensor],
    *,
    device: str | torch.device = "auto",
    atol: float | None = None,
    rtol: float | None = None,
    candidate_train: bool = False,
    probes: Sequence[str] = (),
    reference: Reference | None = None,
    fan_in: Mapping[str, int] | None = None,
) -> Comparison:
    """Compare ``candidate`` with ``original`` (eval mode) on ``inputs``, TF32 off.

    ``candidate`` is a module (run in eval mode unless ``candidate_train``) or
    a callable taking the list of inputs (an onnxruntime session, say) and
    returning outputs of the same structure. ``probes`` names modules, present
    in both models, whose outputs are compared too: a layer-by-layer check
    sees an error in one channel that the final output may hide (a ReLU that
    zeroes it, a sigmoid that saturates). ``reference`` (``Reference.of``, with at least
    these probes) saves running the original again. ``fan_in`` gives, per
    probed module (and ``""`` for the outputs), the largest fan-in of the
    candidate's recomputed weights it depends on; the floor of the derived
    tolerance widens with it (``rounding_factor``). The models given are not
    changed, and a model not on ``device`` is run there layer by layer rather
    than copied.
    """
    derived = atol is None and rtol is None
    if reference is None or (derived and reference.float64 is None):
        reference = Reference.of(original, inputs, device=device, probes=probes, float64=derived)
    device = reference.device
    probes = tuple(probes) if isinstance(candidate, nn.Module) else ()
    layers: list[OutputComparison] = []
    unknown: list[str] = []

    def check(label: str, output: torch.Tensor) -> None:
        if label not in reference.layers:
            unknown.append(label)
            return
        delta = reference.layer_deltas.get(label) if derived and label in reference.layer_deltas else None
        widen = rounding_factor((fan_in or {}).get(label.split("`")[1]))
        layers.append(_compare_one(label, reference.layers.get(label), output, None, atol, rtol, delta=delta,
                                   widen=widen))

    with tf32_disabled():
        if isinstance(candidate, nn.Module):
            candidate_out = run_on(candidate, inputs, device, train=candidate_train, probes=probes, on_probe=check)
        else:
            candidate_out = flatten_outputs(candidate(inputs))
    names = [n for n, _ in candidate_out]
    if names != [n for n, _ in reference.outputs] or unknown:
        raise InputError(
            "the candidate's outputs do not have the original's structure: "
            f"{[n for n, _ in reference.outputs]} vs {names + unknown}"
        )
    high = dict(reference.float64) if derived and reference.float64 is not None else {}
    widen = rounding_factor((fan_in or {}).get(""))
    results = [_compare_one(name, orig, cand.to(orig.device), high.get(name), atol, rtol, widen=widen)
               for (name, orig), (_, cand) in zip(reference.outputs, candidate_out)]
    rule = "derived" if derived else f"atol={atol or 0.0:g} rtol={rtol or 0.0:g}"
    return Comparison(outputs=tuple(results + layers), device=str(device), rule=rule)


def _compare_one(
    name: str,
    orig: torch.Tensor,
    cand: torch.Tensor,
    ref: torch.Tensor | None,
    atol: float | None,
    rtol: float | None,
    delta: torch.Tensor | None = None,
    widen: float = 1.0,
) -> OutputComparison:
    """One output against the original: within the derived tolerance of the float64 reference ``ref``
    (or ``orig + delta``), its floor widened by ``widen``; or within ``atol``/``rtol`` of the original."""
    if orig.shape != cand.shape:
        return OutputComparison(name, tuple(orig.shape), float("inf"), float("inf"), 0.0, False)
    if not orig.is_floating_point():
        equal = bool(torch.equal(orig, cand))
        return OutputComparison(name, tuple(orig.shape), 0.0 if equal else float("inf"), 0.0, 0.0, equal)
    o64, c64 = orig.double(), cand.double()
    nonfinite = _nonfinite(o64, c64)
    finite = nonfinite is None
    both = torch.isfinite(c64) & torch.isfinite(o64)
    o64, c64 = torch.where(both, o64, 0.0), torch.where(both, c64, 0.0)
    diff = (c64 - o64).abs()
    scale = o64.abs().max().item() if o64.numel() else 0.0
    max_abs = diff.max().item() if diff.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    original_error = candidate_error = None
    if ref is None and delta is not None:
        ref = o64 + delta.to(o64.device)
    if ref is not None:
        r64 = torch.where(both, ref.double().to(o64.device), 0.0)
        original_error = (o64 - r64).abs().max().item() if o64.numel() else 0.0
        candidate_error = (c64 - r64).abs().max().item() if c64.numel() else 0.0
        floor = widen * FLOOR_EPS.get(orig.dtype, 8.0) * torch.finfo(orig.dtype).eps * max(scale, 1e-30)
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
        nonfinite=nonfinite,
    )


def _nonfinite(orig: torch.Tensor, cand: torch.Tensor) -> str | None:
    """``None`` if both are finite, else which side holds how many NaN / inf values."""
    parts = []
    for side, tensor in (("candidate", cand), ("original", orig)):
        nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
        if nan or inf:
            what = " and ".join(f"{n} {k}" for n, k in ((nan, "NaN"), (inf, "inf")) if n)
            parts.append(f"{what} of {tensor.numel()} in the {side}")
    return "; ".join(parts) or None
