"""Recompute every BatchNorm's running statistics over real data, exactly.

``recalibrate(model, batches)`` runs the batches through the model with only
the selected BN layers in training mode (dropout, stochastic depth and other
norms stay in eval mode; no gradients), and sets each BN's ``running_mean`` /
``running_var`` to the population mean and unbiased population variance of
everything that BN saw: ``N*H*W`` values per channel for a feature map, every
call of a BN that is called more than once per forward. Not an EMA, and not an
average of per-batch variances (which misses the spread between batch means;
the report says how far the two differ).

How it stays fast: during the pass each BN's momentum is 1.0 and a forward
pre-hook points its running buffers at a fresh zeroed slot, so BatchNorm
itself writes each call's batch mean and unbiased batch variance there (no
kernel, no host synchronisation and no second pass over the activations of
bntool's own per call); every ``merge_every`` calls they are merged into a
float64 ``ChannelStats`` (Chan et al.), and at the end everything comes to the
CPU in one transfer (``collect.py``). BatchNorm computes batch statistics in
its input dtype; for float16/bfloat16 inputs that loses precision, so for
those the hook computes the statistics from the input itself in float64
(slower, exact; the report's ``method`` says ``float64`` for such layers).
Empty calls (0 samples) are skipped and counted. bntool's frozen BNs
normalise with batch statistics during the pass, like their unfrozen form,
and stay frozen (AdaBN after frozen fine-tuning).

Distributed: when torch.distributed is initialised (or ``process_group`` is
given), every rank's estimators are all-gathered as float64 tensors (on the
GPU for NCCL) and merged in rank order on the CPU by every rank, so all ranks
end with bit-identical statistics. Sharding the data is the caller's job:
each rank must pass its own share (``bntool.data.batches.plan_batches`` / ``shard``;
the CLI gives rank r the batches i with i % world_size == r).

Everything the pass changes is put back in a ``finally``: training flags,
momentum, hooks, forwards; the BN buffers are written only once the pass has
succeeded (they are not touched during it). Only BN buffers of
the selected layers change; every other parameter and buffer is checked
bit for bit and the report says whether that held.

This module is the driver; its rooms: ``recal_state`` (what the pass changes
on each BN and puts back), ``collect`` (the per-call statistics, gathered and
merged across ranks), ``recal_batches`` (running the batches, the quality
check) and ``recal_report`` (the report, and the values to write).

(The module is ``recalibration``, like ``folding`` and ``freezing``, so that
``bntool.recalibrate`` is always the function: importing a submodule binds
its name on the package and would shadow the lazily exported function.)
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..data.batches import batch_size_of, model_input
from ..deprecation import UNSET, positional, renamed
from ..errors import InputError, VerificationError, require_module
from ..report import Skip, with_step
from ..runtime.pages import released_after_calls
from ..runtime.running import model_device, model_dtype, restore_modes, saved_modes, tf32
from ..verify.bits import Snapshot
from .collect import Collector, gather, merge_ranks, write_back
from .collect import collectors as make_collectors
from .guard import guarded, norm_quality
from .report import NormQuality, RecalibrationReport, results
from .state import (
    Held,
    batch_statistics_forward,
    bn_buffer_names,
    enable_tracking,
    save,
    select_bns,
    unpatch,
)
from .stats import merge_across_ranks

__all__ = ["recalibrate"]


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    _num_batches: Any = UNSET,
    /,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    verify: bool = True,
    num_batches: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    input_key: str | None = None,
    only: Any = UNSET,
    verify_batches: Iterable[Any] | None = None,
    callback: Callable[[int], None] | None = None,
    process_group: Any = None,
    merge_every: int | None = None,
    allow_tf32: bool = False,
) -> RecalibrationReport:
    """Set the selected BN layers' running statistics to the exact statistics of ``batches``, in place.

    ``batches``: any iterable of batches (tensor, tuple/list whose first element
    is the input, dict with ``input_key`` or one obvious key); floating inputs
    are moved to the model's device and dtype. ``forward(model, batch)`` runs
    anything else (the batch is passed as is). ``num_batches`` limits the pass.
    ``include`` / ``exclude``: fnmatch patterns on
    qualified names (a pattern also selects the BNs inside a matching module:
    ``layer1`` selects ``layer1.0.bn1``), as for every bntool operation.
    bntool's frozen BNs are recalibrated like the others and stay frozen.
    Empty batches (0 samples) are skipped and counted. ``verify_batches``
    (consumed after ``batches``) measures, in eval mode, how close each BN's
    normalised input comes to mean 0 / variance 1 before and after.
    ``callback(batches_done)`` is called after each batch. ``merge_every``:
    calls per BN held before a float64 merge on the device (default 64 on a GPU,
    16 on the CPU, where a larger long-lived buffer slows the allocator for
    every activation of the pass: measured 20% on MobileNetV2). TF32 is off during
    the pass (exact float32) unless ``allow_tf32``, which turns it on for cuDNN
    convolutions and cuBLAS matmuls: the statistics of a model that is deployed
    with TF32. Under torch.distributed each rank passes its own share of the
    batches and all ranks end with the same statistics. Every parameter and
    buffer but the selected BNs' statistics must be bit-identical afterwards;
    unless ``verify=False``, anything else that changed raises
    ``VerificationError`` carrying the report.
    """
    require_module(model)
    include = renamed("only", only, "include", include, "recalibrate")  # (``only``: one more release)
    num_batches = positional("num_batches", _num_batches, num_batches, "recalibrate")
    if isinstance(batches, torch.Tensor):  # iterating it would give single samples, not batches
        raise InputError(f"`batches` is one tensor (shape {tuple(batches.shape)}), not an iterable of batches; pass "
                         "`[x]` for one batch, or `x.split(64)` for batches of 64")
    if num_batches is not None and num_batches < 1:
        raise InputError(f"num_batches={num_batches}: pass a positive number of batches (or None for all)")
    if merge_every is not None and merge_every < 1:
        raise InputError(f"merge_every={merge_every}: pass a positive number of calls")
    selected, skipped = select_bns(model, include, exclude)
    group, world_size = _process_group(process_group)
    device, dtype = model_device(model), model_dtype(model)
    chosen = {id(bn) for _, bn in selected}  # every name of each (a module held at two places has two)
    snapshot = Snapshot(model, bn_buffer_names(n for n, m in model.named_modules(remove_duplicate=False)
                                               if id(m) in chosen))
    held = {name: Held.of(bn) for name, bn in selected}
    before = {name: save(bn) for name, bn in selected} if verify_batches is not None else {}
    flags = saved_modes(model)
    collectors: list[Collector] = []
    done = False

    def run(batch: Any, index: int) -> int:
        if forward is not None:
            forward(model, batch)
            return batch_size_of(batch)
        x = model_input(batch, input_key, where=f"batch {index}")
        x = x.to(device=device, dtype=dtype, non_blocking=True) if x.is_floating_point() else x.to(device)
        model(x)
        return int(x.shape[0]) if x.dim() else 1

    try:
        entries = []
        for name, bn in selected:
            plain = batch_statistics_forward(bn)
            enable_tracking(bn, device, dtype)
            bn.momentum = 1.0
            entries.append((name, bn, plain))
        collectors = make_collectors(entries, merge_every)
        totals = [0, 0, 0]  # batches, samples, empty batches
        with released_after_calls(model):  # (memory-mapped weights: one layer's pages held at a time)
            error = _pass(model, selected, collectors, batches, num_batches, run, callback, totals, group, allow_tf32)
        flat = gather(collectors)  # one transfer; from here on plain float64 arithmetic on the CPU
        if group is not None:
            flat, totals = merge_ranks(flat, totals, group, world_size, failed=error is not None)
            if error is not None:
                raise error
        num_batches_seen, num_samples, empty_batches = totals
        if num_batches_seen == 0:
            raise InputError("the data gave no batches; pass a non-empty data source (and `num_batches` of at least 1)")
        if num_samples == 0:
            raise InputError(f"all {num_batches_seen} batches are empty (0 samples); pass data with samples in it")
        layers, writes = results(flat, held)
        for c, calls, empty_calls in zip(flat.layers, flat.calls, flat.empty_calls):
            if calls == 0:
                held[c.name].untrack(c.module)
                how = "called only with empty batches" if empty_calls else "never called"
                reason = f"{how} during the pass ({num_batches_seen} batches); statistics unchanged"
                skipped.append(Skip(c.name, reason + ("" if held[c.name].track else ", still track_running_stats=False")))
        write_back(writes)  # nothing is written unless every layer's statistics are good
        quality: dict[str, tuple[NormQuality | None, NormQuality | None]] = {}
        verified = 0
        if verify_batches is not None:
            ran = [(layer.name, dict(selected)[layer.name]) for layer in layers]
            quality, verified = norm_quality(model, ran, before, verify_batches, run, group, world_size, allow_tf32, device)
        changed = snapshot.changed(model)
        unchanged = not changed
        if group is not None:
            _, votes = merge_across_ranks({}, {"changed": torch.tensor([float(bool(changed))])}, group, world_size)
            unchanged = not votes["changed"].item()
        done = True
    finally:
        for c in collectors:
            c.put_back()
        restore_modes(flags)
        for name, bn in selected:
            held[name].restore(bn, failed=not done)
    if quality:
        layers = [dataclasses.replace(layer, verify_before=quality[layer.name][0], verify_after=quality[layer.name][1])
                  for layer in layers]
    report = RecalibrationReport(
        layers=tuple(layers),
        skipped=tuple(sorted(skipped, key=lambda s: s.name)),
        converted=tuple(layer.name for layer in layers if layer.converted),
        num_batches=num_batches_seen,
        num_samples=num_samples,
        unchanged_non_bn=unchanged,
        changed_non_bn=tuple(changed),
        world_size=world_size,
        verify_batches=verified,
        empty_batches=empty_batches,
        verified=verify,
    )
    if verify and not report.unchanged_non_bn:
        names = ", ".join(f"`{n}`" for n in report.changed_non_bn[:5]) or "on another process"
        raise VerificationError(
            f"parameters or buffers other than BatchNorm statistics changed during the pass ({names}); something in "
            "the model's forward writes its own state; the statistics are not to be trusted", report)
    with_step(model, report.recipe_step())
    return report


def _pass(model: nn.Module, selected: list, collectors: list[Collector], batches: Iterable[Any],
          num_batches: int | None, run: Callable[[Any, int], int], callback: Callable[[int], None] | None,
          totals: list[int], group: Any, allow_tf32: bool) -> Exception | None:
    """Run the batches with only the selected BNs in training mode; counts go into ``totals``.

    Under a process group a failure is returned (to tell the other ranks before raising), otherwise raised.
    """
    handles = []
    try:
        model.eval()
        for _, bn in selected:
            bn.training = True  # the layer alone: a BN's own dropout or activation stays in eval mode
        handles = [c.module.register_forward_pre_hook(c, with_kwargs=True) for c in collectors]
        source = batches if num_batches is None else itertools.islice(batches, num_batches)
        with torch.no_grad(), tf32(allow_tf32):
            for index, batch in enumerate(source):
                samples = guarded(model, selected, run, batch, index)
                totals[0] += 1
                totals[1] += samples
                totals[2] += samples == 0
                if callback is not None:
                    callback(index + 1)
    except Exception as exc:  # noqa: BLE001 - re-raised by the caller, after telling the other ranks
        if group is None:
            raise
        return exc
    finally:
        for handle in handles:
            handle.remove()
        for c in collectors:
            c.put_back()
        for _, bn in selected:  # the BNs' own forward again: the quality check runs them in eval mode
            unpatch(bn)
    return None


def _process_group(process_group: Any) -> tuple[Any, int]:
    """The group to reduce over (None for a single process) and its size."""
    import torch.distributed as dist

    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None, 1
        process_group = dist.group.WORLD
    world_size = dist.get_world_size(process_group)
    return (process_group if world_size > 1 else None), world_size
