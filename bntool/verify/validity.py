"""Tensors no model should hold: NaN or inf values, negative BatchNorm variances.

``problems`` scans a model (or a state dict) and returns one ``BadTensor``
per tensor at fault; ``require_valid`` turns them into one ``InputError``
naming the tensor and what to do. Non-finite BatchNorm statistics are
recomputed by ``bntool recalibrate``; broken weights cannot be repaired.
An infinite value in a buffer that is neither a parameter nor a BatchNorm
statistic (an attention mask filled with -inf) is legitimate and allowed;
NaN never is.

A tensor found clean is remembered (weakly, with its version counter, which
every in-place change bumps, and its data pointer, which a new ``.data``
changes), so a command that checks what it loaded and
then what it is about to write scans each tensor once: the second scan
reads only the tensors the operation created or changed.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError
from ..runtime.pages import release

STATISTICS = ("running_mean", "running_var")
#: Trailing key names taken as parameters in a bare state dict (where parameters and buffers look alike).
PARAMETER_NAMES = ("weight", "bias")


@dataclass(frozen=True)
class BadTensor:
    name: str  # qualified tensor name, e.g. ``layer1.0.bn1.running_var``
    problem: str  # "NaN", "inf" or "negative"
    count: int
    numel: int
    statistic: bool  # a BatchNorm running statistic (recalibration recomputes it)

    def describe(self) -> str:
        if self.problem == "negative":
            return f"`{self.name}` is negative in {self.count} of {self.numel} channel(s)"
        return f"`{self.name}` holds {self.count} {self.problem} value(s) (of {self.numel})"


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


#: tensors found finite: their (version, data pointer) when scanned, and whether no value was negative
_CLEAN: dict[int, tuple[weakref.ref, tuple[int, int], bool]] = {}


def _remember(tensor: torch.Tensor, now: tuple[int, int], non_negative: bool) -> None:
    key = id(tensor)
    _CLEAN[key] = (weakref.ref(tensor, lambda _, key=key: _CLEAN.pop(key, None)), now, non_negative)


def all_finite(values: torch.Tensor) -> bool:
    """No NaN and no inf: a NaN or an inf makes the sum NaN or inf, so a finite sum proves it in one
    reduction; a sum that overflows (or a non-finite one) is settled element by element. The sum is taken in
    the tensor's own dtype: a float64 accumulation of a float32 tensor runs some 30x slower on the CPU, and an
    overflow only sends the tensor to the element-by-element check."""
    if values.numel() == 0:
        return True
    total = values.sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(values).all())


def problems(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> list[BadTensor]:
    """Every tensor with NaN, inf (parameters and statistics) or a negative ``running_var``, in state-dict order."""
    if isinstance(model_or_state, nn.Module):
        state = model_or_state.state_dict(keep_vars=True)  # the tensors themselves: their versions tell changes
        params = {name for name, _ in model_or_state.named_parameters()}
    else:
        state = dict(model_or_state)
        params = {k for k in state if _kind(k) in PARAMETER_NAMES}
    found = []
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        negative_matters = _kind(name) == "running_var" and not tensor.is_complex()
        seen = _CLEAN.get(id(tensor))
        now = (tensor._version, tensor.data_ptr())
        if seen is not None and seen[0]() is tensor and seen[1] == now and (seen[2] or not negative_matters):
            continue
        statistic = _kind(name) in STATISTICS
        values = tensor.detach()
        finite = all_finite(values)
        release((values,))  # (a memory-mapped tensor's pages, read for the scan, go back to the page cache)
        if finite:
            non_negative = negative_matters and bool((values >= 0).all())
            if non_negative or not negative_matters:
                _remember(tensor, now, non_negative)  # (non_negative: known only where it was asked)
                continue
        nan = int(torch.isnan(values).sum())
        if nan:
            found.append(BadTensor(name, "NaN", nan, values.numel(), statistic))
        if statistic or name in params:
            inf = int(torch.isinf(values).sum())
            if inf:
                found.append(BadTensor(name, "inf", inf, values.numel(), statistic))
        if negative_matters:
            negative = int((values < 0).sum())
            if negative:
                found.append(BadTensor(name, "negative", negative, values.numel(), True))
    return found


def require_valid(model: nn.Module, *, statistics: bool = True, what: str = "the checkpoint") -> None:
    """``InputError`` naming the first bad tensors of ``model`` (BN statistics skipped unless ``statistics``)."""
    bad = [b for b in problems(model) if statistics or not b.statistic]
    if not bad:
        return
    first = bad[0]
    more = f" (and {len(bad) - 1} more: {', '.join(f'`{b.name}`' for b in bad[1:4])}{', ...' if len(bad) > 4 else ''})"
    more = more if len(bad) > 1 else ""
    if first.statistic:
        why = ("a variance cannot be negative" if first.problem == "negative"
               else "every output it reaches would be NaN or inf")
        todo = ("the BatchNorm statistics are corrupt; recompute them on real data with `bntool recalibrate` "
                "(or go back to an earlier checkpoint)")
    else:
        why = "every output it reaches would be NaN or inf"
        todo = ("the weights are broken (training diverged or the file is corrupt) and no BatchNorm step can "
                "repair them; go back to an earlier checkpoint")
    raise InputError(f"{what}: {first.describe()}{more}; {why}: {todo}")
