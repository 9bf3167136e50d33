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
each rank must pass its own share (``bntool.batches.plan_batches`` / ``shard``;
the CLI gives rank r the batches i with i % world_size == r).

Everything the pass changes is put back in a ``finally``: training flags,
momentum, hooks, forwards; the BN buffers are written only once the pass has
succeeded (they are not touched during it). Only BN buffers of
the selected layers change; every other parameter and buffer is checked
bit for bit and the report says whether that held.

(The module is ``recalibration``, like ``folding`` and ``freezing``, so that
``bntool.recalibrate`` is always the function: importing a submodule binds
its name on the package and would shadow the lazily exported function.)
"""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import types
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from . import recipe
from .report import with_step
from .selection import select
from .collect import BN_BUFFERS, Collector, Totals, bn_input, gather, write_back
from .collect import collectors as make_collectors
from .batches import batch_size_of, expected_input, model_input
from .errors import InputError, VerificationError
from .norms import is_foreign_batchnorm, is_frozen
from .snapshot import Snapshot
from .stats import (
    ChannelStats,
    LayerStats,
    NormQuality,
    RecalibrationReport,
    SkippedLayer,
    merge_across_ranks,
)
from .running import model_device, model_dtype, tf32

__all__ = ["recalibrate", "replay", "RecalibrationReport", "LayerStats", "NormQuality", "SkippedLayer"]


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    input_key: str | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    only: str | Sequence[str] | None = None,
    verify: bool = True,
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
    ``include`` (or its older name ``only``) / ``exclude``: fnmatch patterns on
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
    if only is not None:
        if include is not None:
            raise InputError("pass `include` or its older name `only`, not both")
        include = only
    if num_batches is not None and num_batches < 1:
        raise InputError(f"num_batches={num_batches}: pass a positive number of batches (or None for all)")
    if merge_every is not None and merge_every < 1:
        raise InputError(f"merge_every={merge_every}: pass a positive number of calls")
    selected, skipped = _select(model, include, exclude)
    group, world_size = _process_group(process_group)
    device, dtype = model_device(model), model_dtype(model)
    snapshot = Snapshot(model, _bn_buffer_names(name for name, _ in selected))
    held = {name: _Held.of(bn) for name, bn in selected}
    before = {name: _save(bn) for name, bn in selected} if verify_batches is not None else {}
    flags = [(m, m.training) for m in model.modules()]
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
            plain = _batch_statistics_forward(bn)
            _enable_tracking(bn, device, dtype)
            bn.momentum = 1.0
            entries.append((name, bn, plain))
        collectors = make_collectors(entries, merge_every)
        totals = [0, 0, 0]  # batches, samples, empty batches
        error = _pass(model, selected, collectors, batches, num_batches, run, callback, totals, group, allow_tf32)
        flat = gather(collectors)  # one transfer; from here on plain float64 arithmetic on the CPU
        if group is not None:
            flat, totals = _merge_ranks(flat, totals, group, world_size, failed=error is not None)
            if error is not None:
                raise error
        num_batches_seen, num_samples, empty_batches = totals
        if num_batches_seen == 0:
            raise InputError("the data gave no batches; pass a non-empty data source (and `num_batches` of at least 1)")
        if num_samples == 0:
            raise InputError(f"all {num_batches_seen} batches are empty (0 samples); pass data with samples in it")
        layers, writes = _results(flat, held)
        for c, calls, empty_calls in zip(flat.layers, flat.calls, flat.empty_calls):
            if calls == 0:
                held[c.name].untrack(c.module)
                how = "called only with empty batches" if empty_calls else "never called"
                reason = f"{how} during the pass ({num_batches_seen} batches); statistics unchanged"
                skipped.append(SkippedLayer(c.name, reason + ("" if held[c.name].track else ", still track_running_stats=False")))
        write_back(writes)  # nothing is written unless every layer's statistics are good
        quality: dict[str, tuple[NormQuality | None, NormQuality | None]] = {}
        verified = 0
        if verify_batches is not None:
            ran = [(layer.name, dict(selected)[layer.name]) for layer in layers]
            quality, verified = _verify(model, ran, before, verify_batches, run, group, world_size, allow_tf32, device)
        changed = snapshot.changed(model)
        unchanged = not changed
        if group is not None:
            _, votes = merge_across_ranks({}, {"changed": torch.tensor([float(bool(changed))])}, group, world_size)
            unchanged = not votes["changed"].item()
        done = True
    finally:
        for c in collectors:
            c.put_back()
        for module, flag in flags:
            module.training = flag
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
            bn.train()
        handles = [c.module.register_forward_pre_hook(c, with_kwargs=True) for c in collectors]
        source = batches if num_batches is None else itertools.islice(batches, num_batches)
        with torch.no_grad(), tf32(allow_tf32):
            for index, batch in enumerate(source):
                samples = _guarded(model, selected, run, batch, index)
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
            _unpatch(bn)
    return None


# ----------------------------------------------------------------------------- selection and state


def _select(model: nn.Module, include, exclude) -> tuple[list, list[SkippedLayer]]:
    bns = [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm) or is_frozen(m)]
    foreign = [SkippedLayer(name, f"`{type(m).__name__}` is no torch BatchNorm: its batch statistics cannot be read "
                            "back; statistics unchanged") for name, m in model.named_modules() if is_foreign_batchnorm(m)]
    if not bns:
        also = f" (only {len(foreign)} of another library, which it cannot recalibrate)" if foreign else ""
        raise InputError(f"`{type(model).__name__}` has no BatchNorm layers{also}; there is nothing to recalibrate")
    chosen, left = select([name for name, _ in bns], include, exclude, what="BatchNorm", owner=type(model).__name__)
    if not chosen:
        raise InputError("the include / exclude patterns leave no BatchNorm layer to recalibrate; loosen them")
    keep = set(chosen)
    selected = [(name, bn) for name, bn in bns if name in keep]
    return selected, foreign + [SkippedLayer(name, f"{why}; statistics unchanged") for name, why in left.items()]


@dataclasses.dataclass
class _Held:
    """What the pass changes on a BN besides its statistics, to put back: flags, momentum, a forward of ours."""

    track: bool  # it had running statistics before the pass
    track_flag: bool
    momentum: float | None

    @classmethod
    def of(cls, bn: nn.Module) -> _Held:
        return cls(bn.track_running_stats and bn.running_mean is not None, bn.track_running_stats, bn.momentum)

    def untrack(self, bn: nn.Module) -> None:
        """Undo ``_enable_tracking`` (a layer that got no data, or a failed pass)."""
        if not self.track:
            bn.track_running_stats = self.track_flag
            for key in BN_BUFFERS:
                bn.register_buffer(key, None)

    def restore(self, bn: nn.Module, failed: bool) -> None:
        _unpatch(bn)
        bn.momentum = self.momentum
        if failed:
            self.untrack(bn)


def _batch_statistics_forward(bn: nn.Module) -> bool:
    """Make ``bn`` normalise with batch statistics during the pass; True when its forward is ``_BatchNorm.forward``.

    A SyncBatchNorm computes local statistics (the ranks are merged exactly
    afterwards); a frozen BN normalises like an ordinary BN in training mode,
    so that a frozen model is recalibrated exactly as its unfrozen form would be.
    """
    if is_frozen(bn):
        bn.forward = types.MethodType(_frozen_in_training, bn)
    elif isinstance(bn, nn.SyncBatchNorm) and "forward" not in bn.__dict__:
        bn.forward = types.MethodType(_BatchNorm.forward, bn)
    else:
        return type(bn).forward is _BatchNorm.forward
    bn._bntool_patched = True
    return True


def _frozen_in_training(self: nn.Module, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - BatchNorm's name
    self._check_input_dim(input)
    return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, True, 1.0, self.eps)


def _unpatch(bn: nn.Module) -> None:
    if bn.__dict__.pop("_bntool_patched", False):
        bn.__dict__.pop("forward", None)


def _save(bn: nn.Module) -> dict[str, Any]:
    """Copies of a BN's buffers and flags (the quality check switches between old and new statistics)."""
    tracking = bn.track_running_stats and bn.running_mean is not None
    copy = {k: (getattr(bn, k).clone() if getattr(bn, k, None) is not None else None) for k in BN_BUFFERS}
    return {"track": tracking, "track_flag": bn.track_running_stats, **copy}


def _restore(bn: nn.Module, old: dict[str, Any]) -> None:
    bn.track_running_stats = old["track_flag"]
    for key in BN_BUFFERS:
        if old[key] is None or getattr(bn, key, None) is None:
            bn.register_buffer(key, None if old[key] is None else old[key].clone())
        else:
            with torch.no_grad():
                getattr(bn, key).copy_(old[key])


def _enable_tracking(bn: nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    """Give a track_running_stats=False BN its running buffers; True if it had to."""
    if bn.track_running_stats and bn.running_mean is not None:
        return False
    if bn.weight is not None:
        device, dtype = bn.weight.device, bn.weight.dtype
    bn.register_buffer("running_mean", torch.zeros(bn.num_features, device=device, dtype=dtype))
    bn.register_buffer("running_var", torch.ones(bn.num_features, device=device, dtype=dtype))
    bn.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
    bn.track_running_stats = True
    return True


def replay(model: nn.Module, step: dict[str, Any]) -> None:
    """Recipe replay: each BN in ``tracking_enabled`` gets running buffers and track_running_stats=True."""
    modules = dict(model.named_modules())
    for name in step.get("tracking_enabled", []):
        bn = modules.get(name)
        if not isinstance(bn, _BatchNorm):
            raise InputError(f"recipe step recalibrate names `{name}`, which is not a BatchNorm layer of "
                             f"`{type(model).__name__}`; build the model from the code the checkpoint was made from")
        _enable_tracking(bn, model_device(model), model_dtype(model))


def _bn_buffer_names(bn_names: Iterable[str]) -> set[str]:
    return {f"{bn}.{key}" if bn else key for bn in bn_names for key in BN_BUFFERS}


# ----------------------------------------------------------------------------- running batches


def _guarded(model: nn.Module, selected: list, run: Callable[[Any, int], int], batch: Any, index: int) -> int:
    """Run one batch; turn the usual data mistakes into InputErrors that say what to pass."""
    try:
        return run(batch, index)
    except InputError:
        raise
    except ValueError as exc:
        if "Expected more than 1 value per channel" not in str(exc):
            raise
        name, shape = _single_value_bn(model, selected, run, batch, index)
        raise InputError(
            f"batch {index}: `{name}` got 1 value per channel (input shape {shape}) and training-mode statistics "
            "need at least 2; pass a larger `batch_size`, or drop the short last batch (use `num_batches`)"
        ) from None
    except RuntimeError as exc:
        if isinstance(exc, torch.OutOfMemoryError):
            raise
        given = _shape_of(batch)
        raise InputError(
            f"batch {index} (input shape {given}) does not fit the model: {str(exc).splitlines()[0]}; "
            f"the first layer {expected_input(model)}; pass data of that shape (check `image_size`, `input_key`)"
        ) from None


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


# ----------------------------------------------------------------------------- report pieces


def _results(flat: Totals, held: dict[str, _Held]) -> tuple[list[LayerStats], list[tuple]]:
    """Each called layer's report line and the (buffer, values) to write, computed for all layers at once."""
    called = flat.per_channel([calls > 0 for calls in flat.calls]) > 0
    count = flat.per_channel(flat.counts)
    var = flat.m2 / (count - 1.0)
    bad = called & ~(torch.isfinite(flat.mean) & torch.isfinite(var))
    if bad.any():
        name = flat.layers[int(flat.per_channel(range(len(flat.widths)))[bad][0])].name
        raise InputError(f"`{name}` got non-finite statistics (NaN or inf): the data or the weights "
                         "feeding it contain NaN/inf; check the checkpoint and the data")
    eps = flat.per_channel([c.module.eps for c in flat.layers])
    mean_change = flat.per_layer_max((flat.mean - flat.old_mean).abs() / (var + eps).sqrt())
    ratio = torch.where(flat.old_var > 0, (var / flat.old_var - 1.0).abs(), torch.inf)
    var_change = flat.per_layer_max(ratio)
    mean_batch_var = flat.var_sum / flat.per_channel(flat.calls).clamp_min(1.0)
    gap = flat.per_layer_max((mean_batch_var - var).abs() / var.clamp_min(torch.finfo(torch.float64).tiny))
    layers, writes = [], []
    columns = zip(flat.layers, flat.split(flat.mean), flat.split(var), flat.counts, flat.calls, flat.empty_calls,
                  mean_change, var_change, gap)
    for c, mean, variance, values, calls, empty_calls, d_mean, d_var, layer_gap in columns:
        if calls == 0:
            continue
        writes += [(c.own["running_mean"], mean), (c.own["running_var"], variance)]
        if c.own["num_batches_tracked"] is not None:
            writes.append((c.own["num_batches_tracked"], torch.tensor(float(calls), dtype=torch.float64)))
        tracked = held[c.name].track
        layers.append(LayerStats(
            name=c.name, kind=type(c.module).__name__, channels=c.width, count=values, calls=calls,
            mean_change=d_mean if tracked else None, var_change=d_var if tracked else None, batch_var_gap=layer_gap,
            converted=not tracked, method="float64" if c.float64_calls else "readback", empty_calls=empty_calls,
            frozen=is_frozen(c.module),
        ))
    return layers, writes


def _merge_ranks(flat: Totals, totals: list[int], group: Any, world_size: int, failed: bool) -> tuple[Totals, list[int]]:
    """Every rank's estimators merged in rank order (bit-identical on every rank), back as one ``Totals``."""
    names = [c.name for c in flat.layers]
    stats = {name: ChannelStats.on(mean, m2, count)
             for name, mean, m2, count in zip(names, flat.split(flat.mean), flat.split(flat.m2), flat.counts)}
    sums = {"": torch.tensor(totals, dtype=torch.float64)}
    for name, calls, empty, var_sum in zip(names, flat.calls, flat.empty_calls, flat.split(flat.var_sum)):
        sums[name] = torch.cat([torch.tensor([float(calls), float(empty)], dtype=torch.float64), var_sum])
    stats, sums = merge_across_ranks(stats, sums, group, world_size, failed=failed)
    merged = dataclasses.replace(
        flat, counts=[stats[n].count for n in names], calls=[int(sums[n][0]) for n in names],
        empty_calls=[int(sums[n][1]) for n in names], mean=torch.cat([stats[n].mean for n in names]),
        m2=torch.cat([stats[n].m2 for n in names]), var_sum=torch.cat([sums[n][2:] for n in names]))
    return merged, [int(v) for v in sums[""]]


def _verify(model: nn.Module, layers: list, saved: dict, batches: Iterable[Any], run: Callable, group: Any,
            world_size: int, allow_tf32: bool, device: torch.device) -> tuple[dict, int]:
    """Eval-mode normalised-input quality on held-out batches, with the old statistics and with the new."""
    batches = list(batches)
    results: dict[str, list] = {name: [None, None] for name, _ in layers}
    current = {name: _save(bn) for name, bn in layers}
    total = len(batches)
    try:
        for phase, states in enumerate((saved, current)):
            for name, bn in layers:
                _restore(bn, states[name])
            observed = {name: ChannelStats(bn.num_features, device) for name, bn in layers}
            hooks = [bn.register_forward_hook(_observer(observed[name]), with_kwargs=True) for name, bn in layers]
            error = None
            try:
                model.eval()
                with torch.no_grad(), tf32(allow_tf32):
                    for index, batch in enumerate(batches):
                        _guarded(model, layers, run, batch, index)
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
            _restore(bn, current[name])
    return {name: tuple(pair) for name, pair in results.items()}, total


def _observer(stats: ChannelStats) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        x = bn_input(args, kwargs)
        if x is not None and x.numel():
            stats.merge(ChannelStats.of(x))
    return hook


def _process_group(process_group: Any) -> tuple[Any, int]:
    """The group to reduce over (None for a single process) and its size."""
    import torch.distributed as dist

    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None, 1
        process_group = dist.group.WORLD
    world_size = dist.get_world_size(process_group)
    return (process_group if world_size > 1 else None), world_size


recipe.register("recalibrate", replay)
