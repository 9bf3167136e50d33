"""Running the batches of a recalibration: the usual data mistakes made clear, and the quality check.

``guarded`` runs one batch and turns a batch that does not fit the model, or
a BN that gets one value per channel, into an ``InputError`` that says what
to pass. ``norm_quality`` measures, in eval mode on held-out batches, how close
each BN's normalised input comes to mean 0 / variance 1 with the old
statistics and with the new (merged across ranks under torch.distributed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..data.batches import expected_input, model_input
from ..errors import InputError, first_line
from ..runtime.running import tf32
from .collect import bn_input
from .report import NormQuality
from .state import restore, save
from .stats import ChannelStats, merge_across_ranks


def guarded(model: nn.Module, selected: list, run: Callable[[Any, int], int], batch: Any, index: int) -> int:
    """Run one batch; turn the usual data mistakes into InputErrors that say what to pass."""
    try:
        return run(batch, index)
    except InputError:
        raise
    except ValueError as exc:
        if "Expected more than 1 value per channel" not in str(exc):
            raise _does_not_fit(model, selected, run, batch, index, exc) from None  # (a BN's "expected 4D input")
        name, shape = _single_value_bn(model, selected, run, batch, index)
        raise InputError(
            f"batch {index}: `{name}` got 1 value per channel (input shape {shape}) and training-mode statistics "
            "need at least 2; pass a larger `batch_size`, or drop the short last batch (use `num_batches`)"
        ) from None
    except (RuntimeError, TypeError, IndexError) as exc:
        if isinstance(exc, torch.OutOfMemoryError):
            raise
        raise _does_not_fit(model, selected, run, batch, index, exc) from None


def _does_not_fit(model: nn.Module, selected: list, run: Callable, batch: Any, index: int,
                  exc: Exception) -> InputError:
    """The model's complaint about a batch, as an error about the data, unless the batch runs with every BN in
    eval mode: then it is a BN whose training-mode forward cannot run here (one that needs a process group)."""
    if _runs_in_eval_mode(selected, run, batch, index):
        return InputError(
            f"batch {index}: the model runs it with its BatchNorm layers in eval mode, but not in train mode, which "
            f"recalibration needs ({first_line(exc)}); a BN that needs a process group in train mode (apex's or "
            "a custom SyncBatchNorm) needs the pass under torchrun, or leave such layers out with `exclude`")
    return InputError(
        f"batch {index} (input shape {_shape_of(batch)}) does not fit the model: {first_line(exc)}; "
        f"the first layer {expected_input(model)}; pass data of that shape (check `image_size`, `input_key`)")


def _runs_in_eval_mode(selected: list, run: Callable, batch: Any, index: int) -> bool:
    """Whether ``batch`` runs with the selected BNs in eval mode (diagnosing only: the pass has failed, nothing it
    collected is kept)."""
    for _, bn in selected:
        bn.training = False
    try:
        run(batch, index)
    except Exception:  # noqa: BLE001 - the original error is the one reported
        return False
    finally:
        for _, bn in selected:
            bn.training = True
    return True


def _single_value_bn(model: nn.Module, selected: list, run: Callable, batch: Any, index: int) -> tuple[str, tuple]:
    """Re-run the failing batch to name the BN that got one value per channel."""
    found: list[tuple[str, tuple]] = []

    class _Found(Exception):
        pass

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = bn_input(args, kwargs)
            if x is not None and x.dim() > 1 and x.numel() == x.shape[1]:
                found.append((name, tuple(x.shape)))
                raise _Found
        return hook

    handles = [bn.register_forward_pre_hook(hook_for(name), with_kwargs=True) for name, bn in selected]
    try:
        run(batch, index)
    except Exception:  # noqa: BLE001 - diagnosing only; the original error is reported
        pass
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else ("a BatchNorm layer", "unknown")


def _shape_of(batch: Any) -> Any:
    try:
        return tuple(model_input(batch).shape)
    except InputError:
        return "unknown"



def norm_quality(model: nn.Module, layers: list, saved: dict, batches: Iterable[Any], run: Callable, group: Any,
            world_size: int, allow_tf32: bool, device: torch.device) -> tuple[dict, int]:
    """Eval-mode normalised-input quality on held-out batches, with the old statistics and with the new."""
    batches = list(batches)
    results: dict[str, list] = {name: [None, None] for name, _ in layers}
    current = {name: save(bn) for name, bn in layers}
    total = len(batches)
    try:
        for phase, states in enumerate((saved, current)):
            for name, bn in layers:
                restore(bn, states[name])
            observed = {name: ChannelStats(bn.num_features, device) for name, bn in layers}
            hooks = [bn.register_forward_hook(_observer(observed[name]), with_kwargs=True) for name, bn in layers]
            error = None
            try:
                model.eval()
                with torch.no_grad(), tf32(allow_tf32):
                    for index, batch in enumerate(batches):
                        guarded(model, layers, run, batch, index)
            except Exception as exc:  # noqa: BLE001 - re-raised after telling the other ranks
                if group is None:
                    raise
                error = exc
            finally:
                for hook in hooks:
                    hook.remove()
            if group is not None:
                sums = {"batches": torch.tensor([float(len(batches))])}
                observed, sums = merge_across_ranks(observed, sums, group, world_size, failed=error is not None)
                if error is not None:
                    raise error
                total = int(sums["batches"][0])
            for name, bn in layers:
                state = states[name]
                if state["track"] and observed[name].count >= 2:
                    quality = NormQuality.of(observed[name], state["running_mean"], state["running_var"], bn.eps)
                    results[name][phase] = quality
    finally:
        for name, bn in layers:
            restore(bn, current[name])
    return {name: tuple(pair) for name, pair in results.items()}, total


def _observer(stats: ChannelStats) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        x = bn_input(args, kwargs)
        if x is not None and x.numel():
            stats.merge(ChannelStats.of(x))
    return hook
