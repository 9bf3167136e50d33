"""Freeze and unfreeze BatchNorm layers, verified.

Unlike ``m.eval()`` on each BN (undone by the next ``model.train()``),
:func:`freeze` swaps the selected layers for the frozen BNs of
``bntool.frozen``, which never use batch statistics nor update theirs, with
the original state-dict keys (a BN subclass with a forward of its own keeps
its class, pinned to eval mode); :func:`unfreeze` turns them back; :func:`replay`
redoes either as a recipe step. Both verify their result before returning it:
frozen in train mode == original in eval mode (and the frozen statistics do
not move: ``freeze_check``), unfrozen == frozen in eval mode; a failure
raises ``VerificationError`` carrying the report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import InputError, VerificationError, require_initialized, require_module
from ..frozen import AFFINE_MODES, frozen_type_for, why_not_freezable
from ..norms import has_fixed_statistics, is_bntool_frozen
from ..report import Skip, contract, with_step
from ..runtime.cloning import clone
from ..selection import select
from ..verify.compare import Comparison, compare_layers
from .check import WHOLE_MODEL, FreezeCheck, Verify, check_frozen, reference_first
from .layers import check_layers, shapes_of
from .legacy import selection_was_positional

# ----------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class FrozenLayer:
    """One layer frozen (or unfrozen): its qualified name, original BN type, size, eps and affine mode."""

    name: str
    type: str
    num_features: int
    eps: float
    affine: str


@dataclass(frozen=True)
class FreezeReport:
    """What :func:`freeze` did, and its verification (``check``; None with ``verify=False``)."""

    frozen: tuple[FrozenLayer, ...]
    skipped: tuple[Skip, ...]
    affine: str = "frozen"
    check: FreezeCheck | None = None
    verified: bool = True  # False with ``verify=False``: ``passed`` is None

    @property
    def done(self) -> tuple[FrozenLayer, ...]:
        return self.frozen

    @property
    def comparison(self) -> Comparison | None:
        return self.check.comparison if self.check else None

    @property
    def passed(self) -> bool | None:
        return None if not self.verified else self.check is None or self.check.passed

    def recipe_step(self) -> dict[str, Any]:
        return {"op": "freeze", "layers": [layer.name for layer in self.frozen], "affine": self.affine}

    def to_dict(self) -> dict[str, Any]:
        # (``name`` beside ``layer`` in the skip entries: the older key, kept for one release)
        return {**contract("freeze", self, (layer.name for layer in self.frozen),
                           self.check.to_dict() if self.check is not None else None, old_name="name"),
                "frozen": [dataclasses.asdict(layer) for layer in self.frozen], "affine": self.affine}


@dataclass(frozen=True)
class UnfreezeReport:
    """What :func:`unfreeze` did (each layer's ``type`` is the ordinary BN type it became), and its verification."""

    unfrozen: tuple[FrozenLayer, ...]
    comparison: Comparison | None = None
    skipped: tuple[Skip, ...] = ()
    checked: str | None = None  # which check ran: check.WHOLE_MODEL or check.PER_LAYER (None: not verified)
    verified: bool = True  # False with ``verify=False``: ``passed`` is None

    @property
    def done(self) -> tuple[FrozenLayer, ...]:
        return self.unfrozen

    @property
    def passed(self) -> bool | None:
        return None if not self.verified else self.comparison is None or self.comparison.passed

    def recipe_step(self) -> dict[str, Any]:
        return {"op": "unfreeze", "layers": [layer.name for layer in self.unfrozen]}

    def to_dict(self) -> dict[str, Any]:
        verification = None if self.comparison is None else {**self.comparison.to_dict(), "checked": self.checked}
        return {**contract("unfreeze", self, (layer.name for layer in self.unfrozen), verification, old_name="name"),
                "unfrozen": [dataclasses.asdict(layer) for layer in self.unfrozen]}


# ----------------------------------------------------------------------------- freeze and unfreeze


def _convert(module: nn.Module, decide: Callable[[str, nn.Module], nn.Module], prefix: str = "",
             memo: dict[int, nn.Module] | None = None) -> nn.Module:
    """Replace modules where ``decide(name, module)`` returns a new one; re-register only changed children.

    A module reused under several names is decided once (under its first name)
    and its one replacement is put in every place, so sharing is kept. The
    children of a replacement are decided too: a frozen BN subclass keeps its
    submodules, and a BN among them is a layer of its own.
    """
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    replacement = memo[id(module)] = decide(prefix, module)
    for child_name, child in list(replacement._modules.items()):  # named_children() hides repeats
        name = f"{prefix}.{child_name}" if prefix else child_name
        new_child = child if child is None else _convert(child, decide, name, memo)
        if new_child is not child:
            replacement.add_module(child_name, new_child)
    return replacement


@selection_was_positional("include", "exclude", "affine", "inplace")
def freeze(model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None, *,
           include: str | Iterable[str] | None = None, exclude: str | Iterable[str] | None = None,
           affine: str = "frozen", inplace: bool = False, verify: bool = True, device: str | torch.device = "auto",
           seed: int = 0, atol: float | None = None, rtol: float | None = None) -> tuple[nn.Module, FreezeReport]:
    """Swap the selected BN layers for frozen ones; return the model (a copy unless ``inplace``) and a report.

    ``include`` / ``exclude`` are fnmatch patterns on qualified module names
    (``backbone.*``, ``layer1``, ``bn1``); none given selects every BN, and
    exclude wins over include. A pattern that matches no BN layer is an
    :class:`InputError`. ``affine="trainable"`` leaves gamma / beta trainable.
    A BN subclass with a forward of its own (timm's ``BatchNormAct2d``) keeps
    its class with its own ``training`` pinned to False: its submodules
    (activation, dropout) still follow the model's mode.
    Unless ``verify=False``, the frozen model with its frozen layers in train
    mode (the rest in eval mode) is compared with the original in eval mode on
    ``example_inputs`` (or the shape the model declares: ``input_shape``), and
    the frozen statistics must not move. Without either, each frozen layer is
    checked alone, in train mode against the original layer in eval mode, on
    inputs of its own shape at several batch sizes, batch 1 included
    (``report.check.kind`` says which check ran). A failure raises
    ``VerificationError`` carrying the report. With ``inplace`` the
    original's outputs are computed first, so no second model is held.
    """
    require_module(model)
    if affine not in AFFINE_MODES:
        raise InputError(f"affine must be `frozen` or `trainable`, got {affine!r}")
    require_initialized(model, "freezing")
    candidates = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) or has_fixed_statistics(m)]
    selected, unselected = select(candidates, include, exclude, what="BatchNorm", owner=type(model).__name__)
    chosen = set(selected)
    checking = Verify(example_inputs, device, seed, atol, rtol) if verify else None
    per_layer = checking is not None and checking.per_layer(model)
    reference = reference_first(model, checking) if checking and inplace and not per_layer else None
    shapes = shapes_of((n, m) for n, m in model.named_modules() if n in chosen and why_not_freezable(m) is None
                       ) if per_layer else None
    frozen: list[FrozenLayer] = []
    skipped = [Skip(name, reason) for name, reason in unselected.items()]  # left by the selection, then refused
    pairs: list[tuple[str, nn.Module, nn.Module]] = []  # (name, original, frozen): what a per-layer check compares

    def decide(name: str, module: nn.Module) -> nn.Module:
        if name not in chosen:
            return module
        reason = why_not_freezable(module)
        if reason is not None:
            skipped.append(Skip(name, reason))
            return module
        new = frozen_type_for(module).from_batchnorm(module, affine)
        frozen.append(FrozenLayer(name, type(module).__name__, module.num_features, module.eps, new.affine_mode))
        pairs.append((name, module, new))
        return new

    result = _convert(model if inplace else clone(model), decide)
    report = FreezeReport(tuple(frozen), tuple(skipped), affine, verified=verify)
    if frozen:
        with_step(result, report.recipe_step())
    if checking and frozen:
        if per_layer:
            check = check_layers(pairs, train=True, device=checking.device, seed=seed, atol=atol, rtol=rtol,
                                 shapes=shapes)
        else:
            check = check_frozen(model if not inplace else None, result, checking.inputs(result),
                                 device=checking.device, atol=atol, rtol=rtol, reference=reference)
        report = dataclasses.replace(report, check=check)
        if not check.passed:
            raise VerificationError(check.failure_message(), report)
    return result, report


@selection_was_positional("include", "exclude", "inplace")
def unfreeze(model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None, *,
             include: str | Iterable[str] | None = None, exclude: str | Iterable[str] | None = None,
             inplace: bool = False, verify: bool = True, device: str | torch.device = "auto", seed: int = 0,
             atol: float | None = None, rtol: float | None = None) -> tuple[nn.Module, UnfreezeReport]:
    """Turn the selected frozen layers back into ordinary BN layers with the same values (weight / bias trainable).

    Unless ``verify=False``, the result in eval mode is compared with the
    frozen model in eval mode on ``example_inputs`` (or the shape the model
    declares); without either, each unfrozen layer is compared with its
    frozen layer alone, as :func:`freeze` does (``report.checked`` says which
    check ran). A mismatch raises ``VerificationError``.
    """
    require_module(model)
    candidates = [n for n, m in model.named_modules() if is_bntool_frozen(m)]
    selected, _ = select(candidates, include, exclude, what="frozen BatchNorm", owner=type(model).__name__)
    chosen = set(selected)
    checking = Verify(example_inputs, device, seed, atol, rtol) if verify else None
    per_layer = checking is not None and checking.per_layer(model)
    reference = reference_first(model, checking) if checking and inplace and candidates and not per_layer else None
    shapes = shapes_of((n, m) for n, m in model.named_modules() if n in chosen) if per_layer else None
    unfrozen: list[FrozenLayer] = []
    pairs: list[tuple[str, nn.Module, nn.Module]] = []

    def decide(name: str, module: nn.Module) -> nn.Module:
        if name not in chosen:
            return module
        unfrozen.append(FrozenLayer(name, module.unfrozen_type.__name__, module.num_features, module.eps,
                                    module.affine_mode))
        pairs.append((name, module, module.to_batchnorm()))
        return pairs[-1][2]

    result = _convert(model if inplace else clone(model), decide)
    report = UnfreezeReport(tuple(unfrozen), verified=verify)
    if unfrozen:
        with_step(result, report.recipe_step())
    if checking and unfrozen and per_layer:
        check = check_layers(pairs, train=False, device=checking.device, seed=seed, atol=atol, rtol=rtol,
                             shapes=shapes)
        report = dataclasses.replace(report, comparison=check.comparison, checked=check.kind)
        if not check.passed:
            raise VerificationError(check.failure_message("the unfrozen layers (eval mode)"), report)
    elif checking and unfrozen:
        comparison = compare_layers(None if inplace else model, result, checking.inputs(result), device=checking.device,
                             atol=atol, rtol=rtol, reference=reference)
        report = dataclasses.replace(report, comparison=comparison, checked=WHOLE_MODEL)
        if not comparison.passed:
            raise VerificationError(comparison.failure_message("the unfrozen model (eval mode)"), report)
    return result, report


def replay(model: nn.Module, step: dict[str, Any]) -> nn.Module:
    """Redo a recorded ``freeze`` / ``unfreeze`` step in place: structure only, values come from the state dict."""
    op, layers, affine = step.get("op"), step.get("layers"), step.get("affine", "frozen")
    if op not in ("freeze", "unfreeze") or not isinstance(layers, list) or affine not in AFFINE_MODES:
        raise InputError(f"malformed recipe step {step!r}; expected {{'op': 'freeze'|'unfreeze', 'layers': [...]}}")
    replacements: dict[int, nn.Module] = {}
    for name in layers:
        try:
            module = model.get_submodule(name) if isinstance(name, str) and name else None
        except AttributeError:
            module = None
        if op == "freeze":  # an already frozen layer is rebuilt in the recorded affine mode
            source = module.to_batchnorm() if is_bntool_frozen(module) else module
            reason = None if source is None else why_not_freezable(source)
        else:
            source, reason = module, None if is_bntool_frozen(module) else "not frozen"
        if module is None or reason is not None:
            found = "no such module" if module is None else f"a `{type(module).__name__}` ({reason})"
            raise InputError(
                f"the checkpoint's recipe does not match the model: it {op}s layer `{name}`, but the model has "
                f"{found}; build the model from the code the checkpoint was made from"
            )
        replacements[id(module)] = (frozen_type_for(source).from_batchnorm(source, affine) if op == "freeze"
                                    else source.to_batchnorm())
    _convert(model, lambda name, module: replacements.get(id(module), module))
    return model
