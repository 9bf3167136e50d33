"""A checkpoint's state dict matched to a model: which candidate fits, which prefix goes, and the strict load.

Wrappers prefix the keys (``module.`` under DataParallel/DDP, ``_orig_mod.``
under torch.compile); ``resolve`` strips them against the model the weights
are meant for, and says what is missing or unexpected when nothing fits.
``load_state`` replays the file's recipe on the model first, so that a
folded or frozen checkpoint meets the structure it was written from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CheckpointMismatchError, InputError
from ..recipe import Replayer, replay
from .checkpoint import WRAPPER_PREFIXES, Loaded


@dataclass(frozen=True)
class Resolved:
    """The state dict chosen for a model, with what was done to find it."""

    state_dict: dict[str, torch.Tensor]
    key: str | None
    stripped_prefix: str | None


def resolve(loaded: Loaded, model: nn.Module | None, *, strip_prefix: bool = True) -> Resolved:
    """Choose the state dict that fits ``model`` and strip wrapper prefixes.

    Without a model, the first candidate is taken with ``module.`` /
    ``_orig_mod.`` removed. With one (whose structure already has the file's
    recipe replayed, as ``load_state`` does), every candidate is tried; exactly
    one must fit, else the error names the candidates and ``--key``.
    """
    expected = set(model.state_dict().keys()) if model is not None else None
    fits: list[Resolved] = []
    for cand in loaded.candidates:
        state, prefix = (_strip(cand.state_dict, expected) if strip_prefix else (cand.state_dict, None))
        if expected is None or set(state) == expected:
            fits.append(Resolved(state, cand.key, prefix))
    if expected is None:
        return fits[0]
    if len(fits) == 1:
        return fits[0]
    if len(fits) > 1:
        keys = ", ".join(f"`{r.key}`" for r in fits)
        raise InputError(
            f"`{loaded.path}` holds {len(fits)} state dicts that fit the model ({keys}); pass `key=\"...\"` to choose one"
        )
    best = loaded.candidates[0]
    state, prefix = _strip(best.state_dict, expected) if strip_prefix else (best.state_dict, None)
    raise _mismatch(loaded.path, model, state, expected, prefix, strip_prefix)


def _strip(state: dict[str, torch.Tensor], expected: set[str] | None) -> tuple[dict[str, torch.Tensor], str | None]:
    """Remove wrapper prefixes (``module.``, ``_orig_mod.``, or one shared prefix that makes the keys fit)."""
    removed = ""
    changed = True
    while changed:
        changed = False
        if expected is not None and set(state) == expected:
            break
        for prefix in WRAPPER_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                removed += prefix
                changed = True
    if expected is not None and set(state) != expected and state:
        first = next(iter(state)).split(".", 1)[0] + "."
        if all(k.startswith(first) for k in state):
            stripped = {k[len(first):]: v for k, v in state.items()}
            if set(stripped) == expected:
                state, removed = stripped, removed + first
    return state, removed or None


def _mismatch(path, model, state, expected, prefix, strip_prefix) -> CheckpointMismatchError:
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)

    def short(keys: list[str]) -> str:
        shown = ", ".join(f"`{k}`" for k in keys[:3])
        return shown + (", ..." if len(keys) > 3 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} keys missing ({short(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({short(unexpected)})")
    hint = "check the model it is loaded into (`model_args`), or pass `key=\"...\"` to pick another state dict"
    if not strip_prefix and any(k.startswith(WRAPPER_PREFIXES) for k in unexpected):
        hint = "the checkpoint looks wrapped (DataParallel / torch.compile); drop `strip_prefix=False`"
    return CheckpointMismatchError(
        f"cannot load `{path}` into `{type(model).__name__}`: {' and '.join(parts)}; {hint}"
    )


def load_state(model: nn.Module, loaded: Loaded, *, replayers: Mapping[str, Replayer],
               strip_prefix: bool = True, assign: bool = False) -> Resolved:
    """Replay the file's recipe on ``model`` (in place, with the operations' ``replayers``), then load its
    weights strictly. With ``assign`` (a model built on the meta device) the model takes the file's tensors
    themselves, cast where the model's dtype differs and copied where two of them share memory.

    Returns which state dict of the file was loaded and what prefix was removed.
    """
    replay(model, loaded.recipe, replayers)
    resolved = resolve(loaded, model, strip_prefix=strip_prefix)
    own = model.state_dict()
    wrong = [
        f"`{k}` is {tuple(v.shape)} in the file but {tuple(own[k].shape)} in the model"
        for k, v in resolved.state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if wrong:
        more = f" (and {len(wrong) - 2} more)" if len(wrong) > 2 else ""
        raise CheckpointMismatchError(
            f"cannot load `{loaded.path}` into `{type(model).__name__}`: {'; '.join(wrong[:2])}{more}; "
            "check the model's sizes (`model_args`: widths, number of classes)"
        )
    if assign:
        model.load_state_dict(_own_tensors(resolved.state_dict, own), strict=True, assign=True)
    else:
        model.load_state_dict(resolved.state_dict, strict=True)
    return resolved


def _own_tensors(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's tensors as the model's own: in the model's dtypes, none sharing memory with another."""
    result, storages = {}, set()
    for key, tensor in state.items():
        if key in own and tensor.dtype != own[key].dtype:
            tensor = tensor.to(own[key].dtype)
        storage = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        if storage is not None and storage in storages:
            tensor = tensor.clone()
        elif storage is not None:
            storages.add(storage)
        result[key] = tensor
    return result
