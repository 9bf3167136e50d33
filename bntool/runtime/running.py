"""Running a model: where (devices, TF32), on what (its dtype and device), and how (no grad, lent layer by layer).

``resolve_device`` turns ``auto`` / ``cpu`` / ``cuda:N`` into a device;
``tf32`` switches TF32 on or off for a block and restores the caller's
settings. ``run_model`` runs a model on inputs with no grad, in train or eval
mode (each module's own flag restored: ``training_flags``; its memory-mapped
weights read one layer at a time: ``pages``), and hands back every output
tensor by name (``flatten_outputs``) plus the outputs of probed layers.
``run_on`` runs it on another device or dtype without a copy: each module's
tensors are ``lent`` there for the duration of its own call. A model that
fails on its inputs becomes one ``InputError`` (``inputs_must_fit``). Judging
what a run computed is ``verify.py``'s; drawing inputs is ``shapes.py``'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map_only

from ..errors import InputError, first_line, out_of_memory, out_of_memory_message
from ..norms import requested_mode
from .cloning import clone
from .float64 import exact_float64
from .pages import released_after_calls

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


# ----------------------------------------------------------------------------- the model's dtype and device


def model_dtype(model: nn.Module) -> torch.dtype:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def model_device(model: nn.Module) -> torch.device:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------- running


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


def saved_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Every module with the train / eval mode it was put in (a frozen BN's too, not the eval mode it reads)."""
    return [(m, requested_mode(m)) for m in model.modules()]


def restore_modes(saved: list[tuple[nn.Module, bool]]) -> None:
    """Put back what ``saved_modes`` saw."""
    for module, flag in saved:
        module.training = flag


@contextlib.contextmanager
def training_flags(model: nn.Module, train: bool) -> Iterator[nn.Module]:
    """Put every module in train or eval mode; restore each module's own flag afterwards."""
    saved = saved_modes(model)
    try:
        model.train(train)
        yield model
    finally:
        restore_modes(saved)


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
    moved = move_inputs(inputs, device, dtype)
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
        with torch.no_grad(), training_flags(model, train), inputs_must_fit(model, moved), released_after_calls(model):
            out = forward(model, moved) if forward else model(*moved)
    finally:
        for handle in handles:
            handle.remove()
    return flatten_outputs(out) + seen


def move_inputs(inputs: Sequence[Any], device: torch.device, dtype: torch.dtype | None = None) -> list[Any]:
    """``inputs`` on ``device``, the floating tensors in ``dtype`` when given. An input may be a tensor or a list,
    tuple or dict of them (a detection model's list of images): every tensor in it moves."""
    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype) if dtype is not None and t.is_floating_point() else t.to(device)

    return [move(x) if isinstance(x, torch.Tensor) else tree_map_only(torch.Tensor, move, x) for x in inputs]


def input_shapes(inputs: Sequence[Any]) -> str:
    """``2x3x224x224, 1x10`` for the tensors of ``inputs``, nested ones included."""
    return ", ".join("x".join(map(str, t.shape)) for t in tree_leaves(list(inputs)) if isinstance(t, torch.Tensor))


def run_eval(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> Any:
    """One eval-mode forward with no grad, on the model's device (each module's training flag restored)."""
    inputs = move_inputs(example_inputs, model_device(model))
    with torch.no_grad(), training_flags(model, False), inputs_must_fit(model, inputs):
        return model(*inputs)


@contextlib.contextmanager
def inputs_must_fit(model: nn.Module, inputs: Sequence[Any]) -> Iterator[None]:
    """Turn the model's own complaint about its inputs into one clear input error."""
    try:
        yield
    except (RuntimeError, ValueError, TypeError, IndexError, MemoryError) as exc:
        shapes = input_shapes(inputs)
        if out_of_memory(exc):
            raise InputError(out_of_memory_message(exc, f"running `{type(model).__name__}` on inputs of shape "
                                                        f"{shapes}")) from exc
        raise InputError(
            f"running `{type(model).__name__}` on inputs of shape {shapes} failed: {first_line(exc, 200)}; "
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
    """``run_model`` with the model on ``device`` (and in ``dtype``): lent layer by layer, else a whole copy. In
    float64 on the CPU, convolutions run as ``float64.exact_float64`` computes them (exact, without torch's slow path)."""
    dtype = dtype or model_dtype(model)
    exact = dtype == torch.float64 and device.type == "cpu"
    if model_device(model) == device and model_dtype(model) == dtype:
        with exact_float64(model, exact):
            return run_model(model, inputs, device=device, dtype=dtype, **kwargs)
    try:
        with lent(model, device, dtype), exact_float64(model, exact):
            return run_model(model, inputs, device=device, dtype=dtype, **kwargs)
    except Exception:  # noqa: BLE001 - the forward reads tensors across modules: use a whole copy
        whole = clone(model).to(device=device)
        if dtype != model_dtype(whole):
            whole = whole.to(dtype)
        with exact_float64(whole, exact, throughout=True):
            return run_model(whole, inputs, device=device, dtype=dtype, **kwargs)
