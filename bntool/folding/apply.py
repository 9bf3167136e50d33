"""Fold surgery on a model, in place: each folded layer's new weight and bias, each folded BN retired.

``apply_plan`` folds every pair of a ``FoldPlan`` into the model (the
arithmetic is ``foldmath``'s, what a BN computes ``bnform``'s): every tensor
that changes is replaced by a new one, never written into, so a copy that
shares its untouched tensors with the original leaves the original intact;
a ``Journal`` records what was replaced, to undo a fold in place. ``replay``
rebuilds a recorded fold's structure on a freshly built model (biases where
they were added, BNs removed or rewritten) for ``bntool.load``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..runtime import pages
from ..runtime.spill import TensorStore
from . import bnform
from .arithmetic import (
    bn_scale_shift,
    identity_statistics,
    scale_consumer,
    scale_producer,
    through_after,
    through_before,
)
from .plan import TRANSPOSED, FoldPlan


class Journal:
    """What folding in place replaced, so that it can be undone: old parameters and buffers (their values in a
    ``TensorStore``, on disk when large; a tensor memory-mapped from the checkpoint is kept itself, its pages
    handed back: the file holds its values) and old modules."""

    def __init__(self) -> None:
        self.store = TensorStore()
        self.mapped: dict[str, torch.Tensor] = {}
        self.entries: list[tuple] = []

    def tensor(self, module: nn.Module, name: str) -> None:
        old = getattr(module, name)
        key = str(len(self.entries))
        if old is not None and pages.is_mapped(old):
            self.mapped[key] = old.detach()
            pages.release((old,))
        elif old is not None:
            self.store.put(key, old)
        is_parameter = name in module._parameters
        self.entries.append(("tensor", module, name, key if old is not None else None, is_parameter,
                             bool(old is not None and old.requires_grad)))

    def module(self, parent: nn.Module, key: str) -> None:
        """Before ``parent._modules[key]`` is replaced."""
        self.entries.append(("module", parent, key, parent._modules[key]))

    def undo(self) -> None:
        for entry in reversed(self.entries):
            if entry[0] == "module":
                entry[1]._modules[entry[2]] = entry[3]
                continue
            _, module, name, key, is_parameter, grad = entry
            value = self.mapped.get(key) if key in self.mapped else self.store.get(key) if key is not None else None
            if is_parameter:
                setattr(module, name, None if value is None else nn.Parameter(value, requires_grad=grad))
            else:
                module.register_buffer(name, value)
        self.entries.clear()
        self.mapped.clear()
        self.store.close()
        self.store = TensorStore()


def apply_plan(model: nn.Module, plan: FoldPlan, journal: Journal | None = None,
               planned: dict[str, bnform.NormForm] | None = None) -> nn.Module:
    """Fold every pair of ``plan`` into ``model`` in place and return it.

    Every tensor that changes is replaced by a new one (never written into),
    so a copy that still shares its untouched tensors with the original (see
    ``fold``) leaves the original intact. ``journal`` records what is
    replaced, to undo it. ``planned``: the forms the plan found (see
    ``plan_from_dataflow``) when ``model`` is the model planned or a clone of
    it; each is used once (taken out), instead of tracing the BN again.
    """
    lookup = Submodules(model)
    forms: dict[str, bnform.NormForm] = {}
    for pair in plan.pairs:
        if pair.bn not in forms:
            known = planned.pop(pair.bn, None) if planned is not None else None
            bn = lookup[pair.bn]
            forms[pair.bn] = bnform.rebound(known, bn) if known is not None else bnform.analyze(bn, pair.rank)
    scales = _scale_shifts(lookup, forms, {p.bn: p.rank for p in plan.pairs})
    for pair in plan.pairs:
        k, c = scales[pair.bn]
        target = lookup[pair.into]
        a, s = pair.through
        if pair.direction == "backward":
            k, c = through_before(k, c, a, s)
            k, c = _per_channel(k, c, _channels(target, output=True))
            weight, bias = scale_producer(target.weight, target.bias, k, c, transposed=isinstance(target, TRANSPOSED),
                                          groups=getattr(target, "groups", 1))
        else:
            k, c = through_after(k, c, a, s)
            k, c = _per_channel(k, c, _channels(target, output=False))
            weight, bias = scale_consumer(target.weight, target.bias, k, c, groups=getattr(target, "groups", 1))
        replaced = [t for t in (target.weight, target.bias) if t is not None]
        if journal is not None:
            journal.tensor(target, "weight")
            journal.tensor(target, "bias")
        _set_weight_and_bias(target, weight, bias)
        pages.release(replaced)  # (read for the fold: a memory-mapped original's pages go back to the page cache)
    becomes = {p.bn: p.bn_becomes for p in plan.pairs}
    for name, form in forms.items():
        bn = lookup[name]
        if journal is not None:
            if becomes[name] == "identity":
                for key in ("running_mean", "running_var", "weight", "bias"):
                    journal.tensor(bn, key)
            else:
                for parent, key in lookup.places(bn):
                    journal.module(parent, key)
        _retire_bn(lookup, name, bn, becomes[name], form)
    return model


class Submodules:
    """``model.get_submodule`` through the ``_modules`` dicts, memoized (folding looks each layer up several
    times; ``get_submodule``'s checks cost more than the surgery on a small layer)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.found: dict[str, nn.Module] = {"": model}
        self.parents: dict[int, list[tuple[nn.Module, str]]] | None = None

    def places(self, module: nn.Module) -> list[tuple[nn.Module, str]]:
        """Every ``(parent, key)`` with ``parent._modules[key] is module`` (a module can sit at several places)."""
        if self.parents is None:
            self.parents = {}
            seen: set[int] = set()
            stack = [self.model]
            while stack:
                parent = stack.pop()
                if id(parent) in seen:
                    continue
                seen.add(id(parent))
                for key, child in parent._modules.items():
                    if child is not None:
                        self.parents.setdefault(id(child), []).append((parent, key))
                        stack.append(child)
        return self.parents.get(id(module), [])

    def __getitem__(self, name: str) -> nn.Module:
        module = self.found.get(name)
        if module is None:
            parent, _, child = name.rpartition(".")
            module = self[parent]._modules.get(child)
            if module is None:
                module = self.model.get_submodule(name)  # its error message
            self.found[name] = module
        return module


def _scale_shifts(lookup: Submodules, forms: dict[str, bnform.NormForm],
                  ranks: dict[str, int | None]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each BN's ``(k, c)`` (see ``bnform.scale_shift``); plain BNs' all at once, per device, with the same bits
    (elementwise float64 arithmetic on concatenated statistics)."""
    scales: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    plain: dict[torch.device, list[tuple[str, nn.Module]]] = {}
    for name, form in forms.items():
        bn = lookup[name]
        if form.kind in ("standard", "identity") and bn.running_mean is not None and bn.running_var is not None:
            plain.setdefault(bn.running_mean.device, []).append((name, bn))
        else:
            scales[name] = bnform.scale_shift(bn, form, ranks[name])
    for group in plain.values():
        bns = [bn for _, bn in group]
        sizes = [bn.running_mean.numel() for bn in bns]
        device = bns[0].running_mean.device

        def joined(tensors: list[torch.Tensor | None], fill: float) -> torch.Tensor:
            """The tensors end to end, in float64 (cast once when they share a dtype: the same values)."""
            dtypes = {t.dtype for t in tensors if t is not None}
            dtype = dtypes.pop() if len(dtypes) == 1 else torch.float64
            return torch.cat([torch.full((n,), fill, dtype=dtype, device=device) if t is None else t.detach().to(dtype)
                              for t, n in zip(tensors, sizes)]).double()

        epsilons = {float(bn.eps) for bn in bns}
        eps = (epsilons.pop() if len(epsilons) == 1 else
               torch.tensor([float(bn.eps) for bn in bns], dtype=torch.float64, device=device)
               .repeat_interleave(torch.tensor(sizes, device=device)))
        k, c = bn_scale_shift(joined([bn.running_mean for bn in bns], 0.0), joined([bn.running_var for bn in bns], 0.0),
                              eps, joined([bn.weight for bn in bns], 1.0), joined([bn.bias for bn in bns], 0.0))
        for (name, _), k_bn, c_bn in zip(group, k.split(sizes), c.split(sizes)):
            scales[name] = (k_bn, c_bn)
    return scales


def _channels(layer: nn.Module, *, output: bool) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features if output else layer.in_features
    return layer.out_channels if output else layer.in_channels


def _per_channel(k: torch.Tensor, c: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's ``k`` and ``c``, one per channel: a BN channel that covers ``m`` consecutive layer channels (the
    rules checked the reshape between them; a one-channel BN covers them all) applies to each of them."""
    if k.numel() != channels:
        m = channels // k.numel()
        return k.repeat_interleave(m), c.repeat_interleave(m)
    return k, c


def _set_weight_and_bias(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """(Straight into ``_parameters`` when both are parameters there, the usual case: ``setattr``'s checks cost
    more than the rest of a small layer's surgery.)"""
    old_weight, old_bias = layer.weight, layer.bias
    grad = old_bias.requires_grad if old_bias is not None else old_weight.requires_grad
    dtype = old_bias.dtype if old_bias is not None else old_weight.dtype
    new_weight = nn.Parameter(weight.detach(), requires_grad=old_weight.requires_grad)
    new_bias = nn.Parameter(bias.detach().to(device=old_weight.device, dtype=dtype), requires_grad=grad)
    params = layer._parameters
    if "weight" in params and "bias" in params:
        params["weight"], params["bias"] = new_weight, new_bias
    else:
        layer.weight, layer.bias = new_weight, new_bias


def _retire_bn(lookup: Submodules, name: str, bn: nn.Module, becomes: str, form: bnform.NormForm) -> None:
    if becomes == "identity":
        mean, var = identity_statistics(bn.running_var, bn.eps)
        bn.running_mean = mean
        bn.running_var = var
        for key, fill in (("weight", torch.ones_like), ("bias", torch.zeros_like)):
            old = getattr(bn, key)
            if old is None:
                continue
            if key in bn._buffers:  # (a frozen BN's affine values are buffers: they stay buffers)
                bn._buffers[key] = fill(old)
            else:
                setattr(bn, key, nn.Parameter(fill(old), requires_grad=old.requires_grad))
        return
    replacement = bnform.remainder(bn, form) if becomes == "rewritten" else None
    replacement = replacement if replacement is not None else nn.Identity()
    replacement._forward_hooks.update(bn._forward_hooks)  # a user's hook sees the same output as before
    replacement._forward_hooks_with_kwargs.update(bn._forward_hooks_with_kwargs)
    replacement._forward_hooks_always_called.update(bn._forward_hooks_always_called)
    for parent, key in lookup.places(bn) or [(lookup[name.rpartition(".")[0]], name.rpartition(".")[2])]:
        parent._modules[key] = replacement  # at every place the model holds it (set_submodule, without its checks)
    lookup.found[name] = replacement


# ----------------------------------------------------------------------------- replay


def replay(model: nn.Module, step: dict[str, Any]) -> None:
    """Rebuild a recorded fold's structure: biases where they were added, BNs removed or rewritten."""
    retired: dict[str, dict[str, Any]] = {}
    for pair in step.get("pairs", []):
        try:
            target = model.get_submodule(pair["into"])
            model.get_submodule(pair["bn"])
        except (AttributeError, KeyError, TypeError):
            raise InputError(
                f"the file's recipe folds `{pair.get('bn')}` into `{pair.get('into')}`, but the model has no such "
                "layer; build the model from the code the checkpoint was made from"
            ) from None
        if getattr(target, "bias", None) is None:
            w = target.weight
            channels = w.shape[1] * target.groups if isinstance(target, TRANSPOSED) else w.shape[0]
            target.bias = nn.Parameter(torch.zeros(channels, dtype=w.dtype, device=w.device))
        retired[pair["bn"]] = pair
    for name, pair in retired.items():
        becomes = pair.get("bn_becomes")
        if becomes == "identity":
            continue
        bn = model.get_submodule(name)
        form = bnform.analyze(bn, pair.get("rank"))
        if becomes == "rewritten" and (form.kind != "traced" or form.removable):
            raise InputError(f"the file's recipe rewrites `{name}` without its normalization, but this model's "
                             f"`{type(bn).__name__}` does not compute what it did when the file was written; pass "
                             "the model from the code the checkpoint was made from")
        _retire_bn(Submodules(model), name, bn, becomes, form)
