"""The proof of a freeze (or an unfreeze) without example inputs: each layer against its original, alone.

A model that declares no input shape can still be checked where the change
is made: every frozen layer, in train mode (its submodules in eval mode, as
in ``check.check_frozen``), must compute what the original layer computed
in eval mode, on synthetic inputs of the layer's own shape, at several batch
sizes (batch 1 included: a layer left normalizing with batch statistics
fails there), and its statistics and affine values must not move. The
channels come from the layer; the rank from its class (``BatchNorm2d``: 4),
or, for a class that implies none (``SyncBatchNorm``, a direct ``_BatchNorm``
subclass) or a subclass whose forward refuses its class's rank, from the
ranks the original layer itself accepts: it is run once on each (channels
second, or else last) and the shapes it runs on are the ones checked. (What
the layer runs on is asked of the layer itself rather than read from its
traced forward, so freezing needs nothing of folding's analysis.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..errors import InputError, first_line
from ..frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from ..norms import num_features
from ..runtime.cloning import clone
from ..runtime.running import model_device, model_dtype, resolve_device
from ..verify.bits import Snapshot
from ..verify.compare import Comparison, compare
from .check import PER_LAYER, FreezeCheck, TrainOnly

#: batch sizes every layer is checked at (1: a layer still using batch statistics cannot pass there)
BATCH_SIZES = (1, 2, 5)
_CLASS_RANKS = ((nn.BatchNorm1d, (2, 3)), (nn.BatchNorm2d, (4,)), (nn.BatchNorm3d, (5,)),
                (FrozenBatchNorm1d, (2, 3)), (FrozenBatchNorm2d, (4,)), (FrozenBatchNorm3d, (5,)))
_ANY_RANK = (2, 3, 4, 5)


def layer_shapes(name: str, module: nn.Module) -> list[tuple[int, ...]]:
    """Input shapes (at batch 1) of ``module``, a BN-like layer: its channels, the ranks its class implies or it
    accepts; an :class:`InputError` when it accepts none of them."""
    channels = num_features(module)
    ranks = next((r for cls, r in _CLASS_RANKS if isinstance(module, cls)), None)
    sizes = [s for s in range(3, 10) if s != channels][:3]  # spatial sizes unlike the channels: a misplaced
    first = [(1, channels, *sizes[: r - 2]) for r in _ANY_RANK]  # channel axis cannot pass by chance
    last = [(1, *sizes[: r - 2], channels) for r in _ANY_RANK if r > 2]
    groups = [first, last]
    if ranks is not None:  # the class's ranks first; a subclass whose forward takes others is asked like any
        groups.insert(0, [(1, channels, *sizes[: r - 2]) for r in ranks])
    errors: list[str] = []
    for candidates in groups:
        accepted = [shape for shape in candidates if _runs(module, shape, errors)]
        if accepted:
            return accepted
    raise InputError(
        f"cannot tell the input shape of layer `{name}` (`{type(module).__name__}`): it runs on none of "
        f"{', '.join('x'.join(map(str, s)) for s in first + last)} ({errors[0] if errors else 'no shape tried'}); "
        "pass `example_inputs` to verify on the whole model"
    )


def _runs(module: nn.Module, shape: tuple[int, ...], errors: list[str]) -> bool:
    """Whether the eval-mode original runs on an input of ``shape`` (batch 2) and keeps that shape."""
    trial = clone(module, eval_mode=True)
    x = torch.zeros((2, *shape[1:]), dtype=model_dtype(trial), device=model_device(trial))
    try:
        with torch.no_grad():
            out = trial(x)
    except Exception as exc:  # noqa: BLE001 - any failure says: not this shape
        errors.append(first_line(exc, 160))
        return False
    return isinstance(out, torch.Tensor) and out.shape == x.shape


def shapes_of(layers: Iterable[tuple[str, nn.Module]]) -> dict[str, list[tuple[int, ...]]]:
    """``layer_shapes`` of each ``(name, module)``: asked before any change, so that a layer no input can be made
    for is refused while the model is as it was."""
    return {name: layer_shapes(name, module) for name, module in layers}


def check_layers(pairs: Sequence[tuple[str, nn.Module, nn.Module]], *, train: bool,
                 device: str | torch.device = "auto", seed: int = 0, atol: float | None = None,
                 rtol: float | None = None, shapes: dict[str, list[tuple[int, ...]]] | None = None) -> FreezeCheck:
    """Each ``(name, original, changed)`` layer: ``changed`` (in train mode alone with ``train``, else in eval
    mode) vs ``original`` in eval mode, on standard-normal inputs of the layer's shapes (``shapes``, or asked
    now) at every batch size in ``BATCH_SIZES``; and which changed layers' tensors moved. Neither layer is
    changed."""
    device = resolve_device(device)
    generator = torch.Generator().manual_seed(seed)
    shapes = shapes if shapes is not None else {}
    shapes = {name: shapes.get(name) or layer_shapes(name, original) for name, original, _ in pairs}
    rows = []
    rule, moved = None, []
    for name, original, changed in pairs:
        candidate = changed if model_device(changed) == device else clone(changed).to(device)
        before = Snapshot(candidate)
        runner = TrainOnly(candidate, [candidate]) if train else candidate
        for shape in shapes[name]:
            for batch in BATCH_SIZES:
                size = (batch, *shape[1:])
                x = torch.randn(size, generator=generator, dtype=torch.float64).to(model_dtype(original))
                comparison = compare(original, runner, (x,), device=device, candidate_train=train, atol=atol,
                                     rtol=rtol)
                rule = comparison.rule
                label = "x".join(map(str, size))
                rows += [dataclasses.replace(o, name=f"layer `{name}` at {label}" + (
                    f" ({o.name})" if len(comparison.outputs) > 1 else "")) for o in comparison.outputs]
        if before.changed(candidate):
            moved.append(name)
    comparison = Comparison(outputs=tuple(rows), device=str(device), rule=rule or "derived")
    return FreezeCheck(comparison, tuple(name for name, _, _ in pairs), tuple(moved), kind=PER_LAYER)
