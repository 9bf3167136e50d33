"""``convert``: BatchNorm layers to ``nn.SyncBatchNorm`` or back to ``nn.BatchNorm*``, verified.

``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` has no inverse, drops what
a BN subclass's forward does besides normalizing (timm's ``BatchNormAct2d``
loses its activation), and converters that walk registered children miss a
layer held in a plain list. :func:`convert` goes both ways; a subclass keeps
its forward with the other normalization swapped in (``forms``); each layer
is replaced wherever it sits (``places``); state-dict keys, ``training``,
``requires_grad``, submodules and hooks are kept. The result is verified:
in eval mode against the original bit for bit (the same kernel runs), and
in train mode on one process (``check``): a synchronized layer alone on one
process computes BatchNorm's batch statistics, so outputs and updated
statistics must be identical too. :func:`replay` redoes the recipe step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import InputError, VerificationError, require_initialized, require_module
from ..norms import has_fixed_statistics, is_bntool_frozen, is_foreign_batchnorm
from ..report import Skip, contract, with_step
from ..runtime.cloning import clone
from ..runtime.running import model_device, run_model, training_flags
from ..runtime.shapes import make_inputs
from ..selection import select
from ..verify.compare import Comparison, Reference, compare_layers
from .check import TrainCheck, train_check, train_step, why_no_train_check
from .forms import PLAIN_FOR_RANK, converted, converted_type
from .places import replace_all

TARGETS = ("batchnorm", "syncbatchnorm")
_RANK_OF = {"BatchNorm1d": 3, "BatchNorm2d": 4, "BatchNorm3d": 5}


@dataclass(frozen=True)
class ConvertedLayer:
    """One layer converted: its qualified name, its class before and after, size and eps."""

    name: str
    type: str
    now: str
    num_features: int
    eps: float


@dataclass(frozen=True)
class ConvertReport:
    """What :func:`convert` did, and its verification (None with ``verify=False``: ``passed`` is None then).

    ``comparison``: the converted model vs the original, eval mode, bit for bit
    unless a tolerance was given; ``train_check``: the train-mode step on one
    process, or ``train_check_skipped`` saying why it did not run.
    """

    converted: tuple[ConvertedLayer, ...]
    skipped: tuple[Skip, ...]
    to: str
    comparison: Comparison | None = None
    train_check: TrainCheck | None = None
    train_check_skipped: str | None = None

    @property
    def done(self) -> tuple[ConvertedLayer, ...]:
        return self.converted

    @property
    def verified(self) -> bool:
        return self.comparison is not None

    @property
    def passed(self) -> bool | None:
        if self.comparison is None:
            return None if self.converted else True
        return self.comparison.passed and (self.train_check is None or self.train_check.passed)

    def failure_message(self) -> str:
        parts = [] if self.comparison.passed else [self.comparison.failure_message("the converted model (eval mode)")]
        if self.train_check is not None and not self.train_check.passed:
            parts.append("in train mode the converted model differs from the original in "
                         + ", ".join(f"`{d}`" for d in self.train_check.different[:5]))
        return "; ".join(parts)

    def recipe_step(self) -> dict[str, Any]:
        return {"op": "convert", "to": self.to,
                "layers": [{"name": layer.name, "type": layer.now} for layer in self.converted]}

    def to_dict(self) -> dict[str, Any]:
        verification = None if self.comparison is None else {
            **self.comparison.to_dict(), "passed": self.passed,
            "train_mode": self.train_check.to_dict() if self.train_check else None,
            "train_mode_skipped": self.train_check_skipped}
        return {**contract("convert", self, (layer.name for layer in self.converted), verification),
                "to": self.to, "converted": [dataclasses.asdict(layer) for layer in self.converted],
                "verified": self.verified}


def convert(model: nn.Module, to: str, *, process_group: Any = None, include: str | Iterable[str] | None = None,
            exclude: str | Iterable[str] | None = None, inplace: bool = False,
            example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None, verify: bool = True,
            device: str | torch.device = "auto", seed: int = 0, atol: float | None = None,
            rtol: float | None = None) -> tuple[nn.Module, ConvertReport]:
    """Convert the selected BN layers ``to="syncbatchnorm"`` or ``to="batchnorm"``; return the model (a copy unless
    ``inplace``) and a report.

    ``process_group`` is the synchronized layers' group (None: the whole
    world). A plain ``nn.BatchNorm1d/2d/3d`` becomes an ``nn.SyncBatchNorm``;
    an ``nn.SyncBatchNorm`` becomes the ``nn.BatchNorm*d`` of the rank it is
    called with on ``example_inputs`` (default: the shape the model declares);
    a BN subclass with a forward of its own keeps it, with the other
    normalization swapped in. Frozen and non-torch BNs are skipped with the
    reason. ``include`` / ``exclude`` select layers by qualified name. Unless
    ``verify=False``, the result is compared with the original on
    ``example_inputs`` in eval mode (bit for bit, unless ``atol`` / ``rtol``)
    and, where torch runs SyncBatchNorm as BatchNorm (one process), in train
    mode with the converted layers in train mode (outputs and updated
    statistics bit for bit); a failure raises ``VerificationError`` carrying
    the report.
    """
    require_module(model)
    if to not in TARGETS:
        raise InputError(f"`to` must be `batchnorm` or `syncbatchnorm`, got {to!r}")
    require_initialized(model, "converting")
    candidates = [n for n, m in model.named_modules()
                  if isinstance(m, _BatchNorm) or has_fixed_statistics(m) or is_foreign_batchnorm(m)]
    selected, unselected = select(candidates, include, exclude, what="BatchNorm", owner=type(model).__name__)
    modules = dict(model.named_modules())
    plan, skipped = _plan(modules, selected, to)
    skipped = [*(Skip(name, reason) for name, reason in unselected.items()), *skipped]
    inputs = _inputs(model, example_inputs, seed) if verify or any(needs for _, needs in plan.values()) else None
    ranks = _ranks(model, [n for n, (_, needs) in plan.items() if needs], inputs) if inputs is not None else {}
    targets: dict[str, type] = {}
    for name, (cls, needs_rank) in plan.items():
        if needs_rank:
            cls = PLAIN_FOR_RANK.get(ranks.get(name, -1))
            if cls is None:
                skipped.append(Skip(name, _why_no_rank(ranks.get(name))))
                continue
        targets[name] = cls
    checked = verify and bool(targets)
    reference = train_original = no_train = None
    if checked:
        reference = Reference.of(model, inputs, device=device, float64=False)
        no_train = why_no_train_check(model_device(model))
        train_original = train_step(model, list(targets), inputs) if no_train is None else None
        if train_original is not None and train_original.error is not None:
            no_train = f"the original cannot run with these layers in train mode ({train_original.error})"
    result = model if inplace else clone(model)
    result = _apply(result, targets, process_group)
    done = [ConvertedLayer(name, type(modules[name]).__name__, cls.__name__, modules[name].num_features,
                           modules[name].eps) for name, cls in targets.items()]
    report = ConvertReport(tuple(done), tuple(skipped), to)
    if done:
        with_step(result, report.recipe_step())
    if checked:
        exact = atol is None and rtol is None
        comparison = compare_layers(None, result, inputs, device=device, reference=reference,
                                    atol=0.0 if exact else atol, rtol=0.0 if exact else rtol)
        check = None
        if no_train is None:
            check = train_check(train_original, train_step(result, list(targets), inputs), list(targets), result)
        report = dataclasses.replace(report, comparison=comparison, train_check=check, train_check_skipped=no_train)
        if not report.passed:
            raise VerificationError(report.failure_message(), report)
    return result, report


def _plan(modules: dict[str, nn.Module], selected: Sequence[str], to: str) -> tuple[dict, list[Skip]]:
    """Per selected layer, the class it becomes (None: decided by its rank) and whether its rank is needed."""
    plan: dict[str, tuple[type | None, bool]] = {}
    skipped: list[Skip] = []
    seen: set[int] = set()
    for name in selected:
        module = modules[name]
        if id(module) in seen:  # an alias: converted once, replaced in every place
            continue
        seen.add(id(module))
        kind = type(module).__name__
        if not isinstance(module, _BatchNorm) and not is_bntool_frozen(module):
            skipped.append(Skip(name, f"`{kind}` is not a torch BatchNorm or a subclass of one; convert it by hand"))
        elif has_fixed_statistics(module):
            skipped.append(Skip(name, f"frozen (`{kind}`): its statistics never move, so it never synchronizes; "
                                      "unfreeze it first to convert it"))
        elif type(module) is nn.SyncBatchNorm and to == "batchnorm":
            plan[name] = (None, True)
        else:
            cls = converted_type(module, to)
            if cls is not None:
                plan[name] = (cls, False)
    return plan, skipped


def _why_no_rank(rank: int | None) -> str:
    if rank is None:
        return ("not called by the forward on the example inputs, so whether it is a BatchNorm1d, 2d or 3d is "
                "unknown; give inputs that reach it")
    if rank == 0:
        return "called with inputs of several ranks: no one BatchNorm1d/2d/3d takes them all"
    return f"called with {rank}-dimensional inputs, which no BatchNorm1d/2d/3d takes"


def _inputs(model: nn.Module, example_inputs: Any, seed: int) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if example_inputs is not None:
        return tuple(example_inputs)
    return make_inputs(model, seed=seed)


def _ranks(model: nn.Module, names: Sequence[str], inputs: Sequence[torch.Tensor]) -> dict[str, int]:
    """The input rank each named layer is called with in an eval-mode forward (0: several)."""
    if not names:
        return {}
    ranks: dict[str, int] = {}

    def seen(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            rank = args[0].dim() if args and isinstance(args[0], torch.Tensor) else -1
            ranks[name] = rank if ranks.get(name, rank) == rank else 0
        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(seen(name)) for name in names]
    try:
        with training_flags(model, False):
            run_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return ranks


def _apply(model: nn.Module, targets: dict[str, type], process_group: Any) -> nn.Module:
    modules = dict(model.named_modules(remove_duplicate=False))
    replacements = {id(modules[name]): converted(modules[name], cls, process_group) for name, cls in targets.items()}
    return replace_all(model, replacements)


def replay(model: nn.Module, step: dict[str, Any]) -> nn.Module:
    """Redo a recorded ``convert`` step in place: structure only, values come from the state dict."""
    to, layers = step.get("to"), step.get("layers")
    if to not in TARGETS or not isinstance(layers, list) or not all(
            isinstance(layer, dict) and isinstance(layer.get("name"), str) and isinstance(layer.get("type"), str)
            for layer in layers):
        raise InputError(f"malformed recipe step {step!r}; expected {{'op': 'convert', 'to': 'batchnorm'|"
                         "'syncbatchnorm', 'layers': [{'name': ..., 'type': ...}]}")
    targets: dict[str, type] = {}
    for layer in layers:
        name, recorded = layer["name"], layer["type"]
        try:
            module = model.get_submodule(name) if name else model
        except AttributeError:
            module = None
        cls = None
        if isinstance(module, _BatchNorm) and not has_fixed_statistics(module):
            cls = converted_type(module, to, _RANK_OF.get(recorded))
        if cls is None or cls.__name__ != recorded:
            found = "no such module" if module is None else f"a `{type(module).__name__}`"
            raise InputError(
                f"the checkpoint's recipe does not match the model: it converts layer `{name}` to `{recorded}`, "
                f"but the model has {found} there; build the model from the code the checkpoint was made from")
        targets[name] = cls
    return _apply(model, targets, None)

