"""Example inputs: shapes parsed or declared, and standard-normal inputs drawn from them, reproducibly.

``make_inputs`` refuses, before allocating anything, inputs that cannot fit
in the memory this machine has left.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import InputError
from .running import model_dtype


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``."""
    parts = [p for p in text.replace("x", ",").replace(" ", "").split(",") if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise InputError(f"`example_inputs` `{text}` is not a shape; pass positive integers such as 1,3,224,224")
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
        raise InputError(f"`example_inputs` {text} needs {_bytes(need)} for the inputs alone, but only {_bytes(free)} "
                         "of memory is available (the model needs more still); pass a smaller shape, "
                         "e.g. batch size 1")


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} PB"
