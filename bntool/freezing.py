"""Frozen BatchNorm: layers that normalize with their stored statistics in train and eval mode alike.

Unlike ``m.eval()`` on each BN (undone by the next ``model.train()``), :func:`freeze` swaps the selected
layers for ``FrozenBatchNorm1d/2d/3d`` / ``FrozenSyncBatchNorm``, which never use batch statistics nor
update theirs, with the original state-dict keys. :func:`unfreeze` turns them back, :func:`replay` redoes
either as a recipe step, :func:`check_frozen` proves frozen-in-train == original-in-eval.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.lazy import LazyModuleMixin

from .errors import InputError
from .verify import Comparison, compare, model_device, resolve_device

AFFINE_MODES = ("frozen", "trainable")
NO_STATISTICS = "no running statistics (track_running_stats=False): run `bntool recalibrate` first"


class _FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics: ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``.

    ``affine`` is ``"frozen"`` (weight / bias are buffers: no optimizer or
    ``requires_grad_(True)`` loop can train them), ``"trainable"`` (they are
    parameters) or ``"none"`` (a non-affine BN: no weight, no bias). ``eps`` is
    the original layer's own and is added at forward time, never folded into
    the stored variance. ``momentum`` is unused but kept so that unfreezing
    restores it.
    """

    _version = 2  # same state-dict version as nn.BatchNorm*: num_batches_tracked present
    is_frozen_batchnorm = True  # what bntool.norms and fold look for
    unfrozen_type: type[_BatchNorm] = nn.BatchNorm2d
    input_dims: tuple[int, ...] = ()
    input_text = ""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: str = "frozen", device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__()
        if affine not in (*AFFINE_MODES, "none"):
            raise InputError(f"affine must be one of `frozen`, `trainable`, `none`, got {affine!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine_mode, self.affine, self.track_running_stats = affine, affine != "none", True
        for name, init in (("weight", torch.ones), ("bias", torch.zeros if bias else None)):
            if affine == "none" or init is None:
                self.register_parameter(name, None)
            elif affine == "trainable":
                self.register_parameter(name, nn.Parameter(init(num_features, **factory)))
            else:
                self.register_buffer(name, init(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in self.input_dims and not (not self.input_dims and input.dim() >= 2):
            raise ValueError(f"{type(self).__name__} expected {self.input_text} input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine_mode}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # Like nn.BatchNorm*: checkpoints from before num_batches_tracked existed (and torchvision's
        # FrozenBatchNorm2d) lack the key; keep ours instead of reporting it missing.
        if local_metadata.get("version") is None or local_metadata["version"] < 2:
            state_dict.setdefault(prefix + "num_batches_tracked", self.num_batches_tracked)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm, affine: str = "frozen") -> _FrozenBatchNorm:
        """A frozen copy of ``bn`` (values cloned, each tensor's dtype and device kept)."""
        mode = "none" if bn.weight is None else affine
        frozen = cls(bn.num_features, bn.eps, bn.momentum, mode, bias=bn.bias is not None)
        _copy_tensors(bn, frozen, as_parameters=mode == "trainable")
        return frozen.train(bn.training)

    def to_batchnorm(self) -> _BatchNorm:
        """An ordinary ``unfrozen_type`` with the same values; weight / bias trainable again."""
        bn = self.unfrozen_type(self.num_features, self.eps, self.momentum, affine=self.weight is not None)
        if self.weight is not None and self.bias is None:
            bn.register_parameter("bias", None)
        _copy_tensors(self, bn, as_parameters=True)
        return bn.train(self.training)


def _copy_tensors(source: nn.Module, target: nn.Module, *, as_parameters: bool) -> None:
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        tensor = getattr(source, name)
        if tensor is None:
            continue
        tensor = tensor.detach().clone()
        if name in ("weight", "bias") and as_parameters:
            target.register_parameter(name, nn.Parameter(tensor, requires_grad=True))
        else:
            target._parameters.pop(name, None)
            target.register_buffer(name, tensor)


class FrozenBatchNorm1d(_FrozenBatchNorm):
    """Frozen form of ``nn.BatchNorm1d``: input (N, C) or (N, C, L)."""

    unfrozen_type, input_dims, input_text = nn.BatchNorm1d, (2, 3), "2D or 3D"


class FrozenBatchNorm2d(_FrozenBatchNorm):
    """Frozen form of ``nn.BatchNorm2d``: input (N, C, H, W)."""

    unfrozen_type, input_dims, input_text = nn.BatchNorm2d, (4,), "4D"


class FrozenBatchNorm3d(_FrozenBatchNorm):
    """Frozen form of ``nn.BatchNorm3d``: input (N, C, D, H, W)."""

    unfrozen_type, input_dims, input_text = nn.BatchNorm3d, (5,), "5D"


class FrozenSyncBatchNorm(_FrozenBatchNorm):
    """Frozen form of ``nn.SyncBatchNorm``: any input of 2 or more dims, like SyncBatchNorm itself.

    Fixed statistics need no cross-process reduction, so it runs anywhere, with
    or without a process group. Unfreezing gives an ``nn.SyncBatchNorm`` on the
    default process group.
    """

    unfrozen_type, input_dims, input_text = nn.SyncBatchNorm, (), "at least 2D"


_FROZEN_FOR = ((nn.SyncBatchNorm, FrozenSyncBatchNorm), (nn.BatchNorm1d, FrozenBatchNorm1d),
               (nn.BatchNorm2d, FrozenBatchNorm2d), (nn.BatchNorm3d, FrozenBatchNorm3d))


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
class Skip:
    """A selected BN layer left as it is, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class FreezeReport:
    """What :func:`freeze` did. ``recipe_step()`` is the step to record in the output file."""

    frozen: tuple[FrozenLayer, ...]
    skipped: tuple[Skip, ...]
    affine: str = "frozen"

    def recipe_step(self) -> dict[str, Any]:
        return {"op": "freeze", "layers": [layer.name for layer in self.frozen], "affine": self.affine}

    def to_dict(self) -> dict[str, Any]:
        return {"frozen": [dataclasses.asdict(layer) for layer in self.frozen],
                "skipped": [dataclasses.asdict(skip) for skip in self.skipped],
                "affine": self.affine, "recipe_step": self.recipe_step()}


@dataclass(frozen=True)
class UnfreezeReport:
    """What :func:`unfreeze` did; each layer's ``type`` is the ordinary BN type it became."""

    unfrozen: tuple[FrozenLayer, ...]

    def recipe_step(self) -> dict[str, Any]:
        return {"op": "unfreeze", "layers": [layer.name for layer in self.unfrozen]}

    def to_dict(self) -> dict[str, Any]:
        return {"unfrozen": [dataclasses.asdict(layer) for layer in self.unfrozen], "recipe_step": self.recipe_step()}


# ----------------------------------------------------------------------------- selection and conversion


def _is_already_frozen(module: nn.Module) -> bool:
    # Ours, or another library's (torchvision.ops.FrozenBatchNorm2d, detectron2, timm).
    return isinstance(module, _FrozenBatchNorm) or type(module).__name__.startswith("FrozenBatchNorm")


def _skip_reason(module: nn.Module) -> str | None:
    if _is_already_frozen(module):
        return f"already frozen (`{type(module).__name__}`)"
    torch_type = next((t for t, _ in _FROZEN_FOR if isinstance(module, t)), None)
    if torch_type is None:
        return f"`{type(module).__name__}` is not a BatchNorm1d/2d/3d or SyncBatchNorm subclass; freeze it by hand"
    if type(module).forward is not torch_type.forward:
        return f"`{type(module).__name__}` overrides forward (it may do more than normalize); freeze it by hand"
    if not module.track_running_stats or module.running_mean is None:
        return NO_STATISTICS
    return None


def _patterns(value: str | Iterable[str] | None) -> list[str]:
    return [value] if isinstance(value, str) else list(value or ())


def _matches(name: str, pattern: str) -> bool:
    """fnmatch on the qualified name or any of its ancestors (`layer1` selects everything under it)."""
    parts = name.split(".")
    return any(fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


def _select(model: nn.Module, candidates: list[str], include, exclude, what: str) -> set[str]:
    include, exclude = _patterns(include), _patterns(exclude)
    for option, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns:
            if not any(_matches(name, pattern) for name in candidates):
                shown = ", ".join(f"`{n}`" for n in candidates[:8]) + (", ..." if len(candidates) > 8 else "")
                available = f"the {len(candidates)} available are {shown}" if candidates else "it has none"
                raise InputError(
                    f"{option} pattern `{pattern}` matches no {what} layer in `{type(model).__name__}`; "
                    f"{available} — patterns are fnmatch on qualified module names, e.g. `layer1.*`"
                )
    return {n for n in candidates if (not include or any(_matches(n, p) for p in include))
            and not any(_matches(n, p) for p in exclude)}


def _convert(module: nn.Module, decide: Callable[[str, nn.Module], nn.Module], prefix: str = "",
             memo: dict[int, nn.Module] | None = None) -> nn.Module:
    """Replace modules where ``decide(name, module)`` returns a new one; re-register only changed children.

    A module reused under several names is decided once (under its first name)
    and its one replacement is put in every place, so sharing is kept.
    """
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    replacement = memo[id(module)] = decide(prefix, module)
    if replacement is module:
        for child_name, child in list(module._modules.items()):  # named_children() hides repeats
            name = f"{prefix}.{child_name}" if prefix else child_name
            new_child = child if child is None else _convert(child, decide, name, memo)
            if new_child is not child:
                module.add_module(child_name, new_child)
    return replacement


def freeze(model: nn.Module, include: str | Iterable[str] | None = None, exclude: str | Iterable[str] | None = None,
           affine: str = "frozen", inplace: bool = False) -> tuple[nn.Module, FreezeReport]:
    """Swap the selected BN layers for frozen ones; return the model (a deep copy unless ``inplace``) and a report.

    ``include`` / ``exclude`` are fnmatch patterns on qualified module names
    (``backbone.*``, ``layer1``, ``bn1``); none given selects every BN, and
    exclude wins over include. A pattern that matches no BN layer is an
    :class:`InputError`. ``affine="trainable"`` leaves gamma / beta trainable.
    """
    if affine not in AFFINE_MODES:
        raise InputError(f"affine must be `frozen` or `trainable`, got {affine!r}")
    lazy = [n for n, m in model.named_modules() if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()]
    if lazy:
        raise InputError(f"`{lazy[0]}` is an uninitialized lazy module; run one forward pass before freezing")
    candidates = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) or _is_already_frozen(m)]
    selected = _select(model, candidates, include, exclude, "BatchNorm")
    frozen: list[FrozenLayer] = []
    skipped: list[Skip] = []

    def decide(name: str, module: nn.Module) -> nn.Module:
        if name not in selected:
            return module
        reason = _skip_reason(module)
        if reason is not None:
            skipped.append(Skip(name, reason))
            return module
        new = next(f for t, f in _FROZEN_FOR if isinstance(module, t)).from_batchnorm(module, affine)
        frozen.append(FrozenLayer(name, type(module).__name__, module.num_features, module.eps, new.affine_mode))
        return new

    model = _convert(model if inplace else copy.deepcopy(model), decide)
    return model, FreezeReport(tuple(frozen), tuple(skipped), affine)


def unfreeze(model: nn.Module, include: str | Iterable[str] | None = None, exclude: str | Iterable[str] | None = None,
             inplace: bool = False) -> tuple[nn.Module, UnfreezeReport]:
    """Turn the selected frozen layers back into ordinary BN layers with the same values (weight / bias trainable)."""
    candidates = [n for n, m in model.named_modules() if isinstance(m, _FrozenBatchNorm)]
    selected = _select(model, candidates, include, exclude, "frozen BatchNorm")
    unfrozen: list[FrozenLayer] = []

    def decide(name: str, module: nn.Module) -> nn.Module:
        if name not in selected:
            return module
        unfrozen.append(FrozenLayer(name, module.unfrozen_type.__name__, module.num_features, module.eps,
                                    module.affine_mode))
        return module.to_batchnorm()

    model = _convert(model if inplace else copy.deepcopy(model), decide)
    return model, UnfreezeReport(tuple(unfrozen))


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
            source = module.to_batchnorm() if isinstance(module, _FrozenBatchNorm) else module
            reason = None if source is None else _skip_reason(source)
        else:
            source, reason = module, None if isinstance(module, _FrozenBatchNorm) else "not frozen"
        if module is None or reason is not None:
            found = "no such module" if module is None else f"a `{type(module).__name__}` ({reason})"
            raise InputError(
                f"the checkpoint's recipe does not match the model: it {op}s layer `{name}`, but the model has "
                f"{found}; build the model with the --model the checkpoint was made from"
            )
        frozen_type = next((f for t, f in _FROZEN_FOR if isinstance(source, t)), None)
        replacements[id(module)] = frozen_type.from_batchnorm(source, affine) if op == "freeze" else source.to_batchnorm()
    _convert(model, lambda name, module: replacements.get(id(module), module))
    return model


# ----------------------------------------------------------------------------- verification

#: Modules that are random in train mode; the check runs them in eval mode (identity for dropout).
STOCHASTIC_TYPES: tuple[type[nn.Module], ...] = (nn.modules.dropout._DropoutNd, nn.RReLU)
STOCHASTIC_TYPE_NAMES = frozenset({"DropPath", "StochasticDepth", "DropBlock2d", "DropBlock3d"})


@dataclass(frozen=True)
class FreezeCheck:
    """Frozen model in train mode vs the original in eval mode, and whether any frozen layer's state moved.

    ``held_in_eval`` names the modules run in eval mode during the check:
    dropout-like modules (random in train mode) and BN layers left unfrozen
    (they use batch statistics in train mode; this check is about the frozen ones).
    """

    comparison: Comparison
    frozen_layers: tuple[str, ...]
    held_in_eval: tuple[str, ...]
    statistics_moved: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return self.comparison.passed and not self.statistics_moved

    def failure_message(self, what: str = "the frozen model in train mode") -> str:
        parts = [] if self.comparison.passed else [
            self.comparison.failure_message(what) + " (a `self.training` branch outside BatchNorm and dropout, "
            "e.g. in the model's forward, also shows here; it cannot be verified this way)"]
        if self.statistics_moved:
            parts.append("running statistics or affine values changed in train mode in "
                         + ", ".join(f"`{n}`" for n in self.statistics_moved))
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {**self.comparison.to_dict(), "passed": self.passed, "frozen_layers": list(self.frozen_layers),
                "held_in_eval": list(self.held_in_eval), "statistics_moved": list(self.statistics_moved)}


class _TrainExcept(nn.Module):
    """Runs ``model``; ``train(True)`` puts everything in train mode except the ``held`` modules."""

    def __init__(self, model: nn.Module, held: Sequence[nn.Module]) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "_held", tuple(held))  # not registered: no second name for them

    def train(self, mode: bool = True) -> _TrainExcept:
        super().train(mode)
        for module in self._held:
            module.train(False)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def check_frozen(original: nn.Module, frozen: nn.Module, inputs: Sequence[torch.Tensor], *,
                 device: str | torch.device = "auto", atol: float | None = None,
                 rtol: float | None = None) -> FreezeCheck:
    """Verify ``frozen`` in train mode against ``original`` in eval mode (neither model is changed)."""
    device = resolve_device(device)
    candidate = frozen if model_device(frozen) == device else copy.deepcopy(frozen).to(device)
    layers = [(n, m) for n, m in candidate.named_modules() if isinstance(m, _FrozenBatchNorm)]
    held = [(n, m) for n, m in candidate.named_modules()
            if isinstance(m, (*STOCHASTIC_TYPES, _NormBase)) or type(m).__name__ in STOCHASTIC_TYPE_NAMES]
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in layers}
    comparison = compare(original, _TrainExcept(candidate, [m for _, m in held]), inputs, device=device,
                         candidate_train=True, atol=atol, rtol=rtol)
    moved = [n for n, m in layers
             if any(not torch.equal(v, before[n][k]) for k, v in m.state_dict().items())]
    return FreezeCheck(comparison, tuple(n for n, _ in layers), tuple(n for n, _ in held), tuple(moved))
