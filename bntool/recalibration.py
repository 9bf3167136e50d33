"""Recompute every BatchNorm's running statistics over real data, exactly.

``recalibrate(model, batches)`` runs the batches through the model with only
the selected BN layers in training mode (dropout, stochastic depth and other
norms stay in eval mode; no gradients), and sets each BN's ``running_mean`` /
``running_var`` to the population mean and unbiased population variance of
everything that BN saw: ``N*H*W`` values per channel for a feature map, every
call of a BN that is called more than once per forward. Not an EMA, and not an
average of per-batch variances (which misses the spread between batch means;
the report says how far the two differ).

How it stays fast: during the pass each BN's momentum is 1.0, so after every
call ``running_mean`` / ``running_var`` hold that call's batch mean and
unbiased batch variance, which BatchNorm computed anyway. A forward hook
copies them (no sync, no second pass over the activations) with the call's
count, and every ``merge_every`` calls they are merged into a float64
``ChannelStats`` (Chan et al.). BatchNorm computes batch statistics in its
input dtype; for float16/bfloat16 inputs that loses precision, so for those
the hook computes the statistics from the input itself in float64 (slower,
exact; the report's ``method`` says ``float64`` for such layers).

Distributed: when torch.distributed is initialised (or ``process_group`` is
given), every rank's estimators are all-gathered as float64 tensors (on the
GPU for NCCL) and merged in rank order on the CPU by every rank, so all ranks
end with bit-identical statistics. Sharding the data is the caller's job:
each rank must pass its own share (``bntool.data.plan_batches`` / ``shard``;
the CLI gives rank r the batches i with i % world_size == r).

Everything the pass changes is put back in a ``finally``: training flags,
momentum, hooks, and, if the pass fails, the BN buffers. Only BN buffers of
the selected layers change; every other parameter and buffer is checked
bit for bit and the report says whether that held.

(The module is ``recalibration``, like ``folding`` and ``freezing``, so that
``bntool.recalibrate`` is always the function: importing a submodule binds
its name on the package and would shadow the lazily exported function.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import itertools
import types
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .data import batch_size_of, expected_input, model_input
from .errors import InputError
from .norms import is_frozen
from .stats import (
    ChannelStats,
    LayerStats,
    NormQuality,
    RecalibrationReport,
    SkippedLayer,
    merge_across_ranks,
    reduce_calls,
)
from .verify import model_device, model_dtype, tf32_disabled

__all__ = ["recalibrate", "replay", "RecalibrationReport", "LayerStats", "NormQuality", "SkippedLayer"]

#: input dtypes whose batch statistics BatchNorm computes precisely enough to read back
READBACK_DTYPES = (torch.float32, torch.float64)
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class _Collector:
    """Forward hook of one BN: writes each call's mean and variance into a preallocated float64
    buffer, and merges the buffer into a float64 ``ChannelStats`` every ``merge_every`` calls.

    Nothing long-lived is allocated during the pass: small tensors kept alive between
    the activations fragment the CPU heap and slow every later activation allocation
    (measured: 5-10% on MobileNetV2). The merges update the estimator in place.
    """

    def __init__(self, name: str, module: _BatchNorm, merge_every: int):
        self.name, self.module, self.merge_every = name, module, merge_every
        device = module.running_mean.device
        self.stats = ChannelStats(module.num_features, device)
        self.calls, self.float64_calls = 0, 0
        self.batch_var_sum = torch.zeros(module.num_features, dtype=torch.float64, device=device)
        self.buffer = torch.empty(merge_every, 2, module.num_features, dtype=torch.float64, device=device)
        self.counts: list[int] = []

    def __call__(self, module: _BatchNorm, args: tuple[Any, ...], output: Any) -> None:
        x = args[0]
        count = x.numel() // x.shape[1]
        slot = self.buffer[len(self.counts)]
        if x.dtype in READBACK_DTYPES and module.running_mean.dtype in READBACK_DTYPES:
            # momentum is 1.0: the buffers hold exactly this call's batch mean / unbiased variance
            slot[0].copy_(module.running_mean)
            slot[1].copy_(module.running_var)
        else:  # half precision: BN's own batch statistics are rounded; recompute them exactly
            stats = ChannelStats.of(x)
            slot[0].copy_(stats.mean)
            slot[1].copy_(stats.m2 / (count - 1))
            self.float64_calls += 1
        self.counts.append(count)
        self.calls += 1
        if len(self.counts) == self.merge_every:
            self.flush()

    def flush(self) -> None:
        if self.counts:
            calls = self.buffer[: len(self.counts)]
            self.stats.update(*reduce_calls(self.counts, calls[:, 0], calls[:, 1]))
            self.batch_var_sum.add_(calls[:, 1].sum(dim=0))
            self.counts = []


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    input_key: str | None = None,
    only: Sequence[str] = (),
    exclude: Sequence[str] = (),
    verify_batches: Iterable[Any] | None = None,
    callback: Callable[[int], None] | None = None,
    process_group: Any = None,
    merge_every: int = 64,
    allow_tf32: bool = False,
) -> RecalibrationReport:
    """Set the selected BN layers' running statistics to the exact statistics of ``batches``, in place.

    ``batches``: any iterable of batches (tensor, tuple/list whose first element
    is the input, dict with ``input_key`` or one obvious key); floating inputs
    are moved to the model's device and dtype. ``forward(model, batch)`` runs
    anything else (the batch is passed as is). ``num_batches`` limits the pass.
    ``only`` / ``exclude``: glob patterns on qualified names (a pattern also
    selects the BNs inside a matching module: ``layer1`` selects ``layer1.0.bn1``).
    ``verify_batches`` (consumed after ``batches``) measures, in eval mode, how
    close each BN's normalised input comes to mean 0 / variance 1 before and
    after. ``callback(batches_done)`` is called after each batch. TF32 is off
    during the pass unless ``allow_tf32``. Under torch.distributed each rank
    passes its own share of the batches and all ranks end with the same statistics.
    """
    if num_batches is not None and num_batches < 1:
        raise InputError(f"num_batches={num_batches}: pass a positive number of batches (or None for all)")
    selected, skipped = _select(model, only, exclude)
    names = [name for name, _ in selected]
    group, world_size = _process_group(process_group)
    device, dtype = model_device(model), model_dtype(model)
    snapshot = _Snapshot(model, names)
    saved = {name: _save(bn) for name, bn in selected}
    flags = [(m, m.training) for m in model.modules()]
    tf32 = contextlib.nullcontext if allow_tf32 else tf32_disabled
    handles: list[Any] = []
    patched: list[nn.SyncBatchNorm] = []
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
        for _, bn in selected:
            if isinstance(bn, nn.SyncBatchNorm) and "forward" not in bn.__dict__:
                bn.forward = types.MethodType(_BatchNorm.forward, bn)  # local statistics; ranks are merged below
                patched.append(bn)
            _enable_tracking(bn, device, dtype)
            with torch.no_grad():
                bn.running_mean.zero_()  # old values may be NaN/inf, and 0 * NaN is NaN
                bn.running_var.fill_(1.0)
            bn.momentum = 1.0
        collectors = [_Collector(name, bn, merge_every) for name, bn in selected]
        seen_batches = seen_samples = 0
        error = None
        try:
            model.eval()
            for _, bn in selected:
                bn.train()
            handles = [c.module.register_forward_hook(c) for c in collectors]
            source = batches if num_batches is None else itertools.islice(batches, num_batches)
            with torch.no_grad(), tf32():
                for index, batch in enumerate(source):
                    seen_samples += _guarded(model, selected, run, batch, index)
                    seen_batches += 1
                    if callback is not None:
                        callback(index + 1)
            for c in collectors:
                c.flush()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
            if group is None:
                raise
            error = exc
        finally:
            for handle in handles:
                handle.remove()
        stats = {c.name: c.stats for c in collectors}
        sums = {"": torch.tensor([float(seen_batches), float(seen_samples)]), **{c.name: torch.cat([torch.tensor([float(c.calls)]).to(c.batch_var_sum), c.batch_var_sum])
                             for c in collectors}}
        if group is not None:
            stats, sums = merge_across_ranks(stats, sums, group, world_size, failed=error is not None)
            if error is not None:
                raise error
        num_batches_seen, num_samples = int(sums[""][0]), int(sums[""][1])
        if num_batches_seen == 0:
            raise InputError("the data gave no batches; pass a non-empty data source (and --num-batches of at least 1)")
        layers = []
        for c in collectors:
            bn, old, calls = c.module, saved[c.name], int(sums[c.name][0])
            if calls == 0:
                _restore(bn, old)
                reason = f"never called during the pass ({num_batches_seen} batches); statistics unchanged"
                skipped.append(SkippedLayer(c.name, reason + ("" if old["track"] else ", still track_running_stats=False")))
                continue
            mean, var = (t.cpu() for t in stats[c.name].result())
            if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
                raise InputError(f"`{c.name}` got non-finite statistics (NaN or inf): the data or the weights "
                                 "feeding it contain NaN/inf; check the checkpoint and the data")
            with torch.no_grad():
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.fill_(calls)
            layers.append(_layer_stats(c, old, stats[c.name].count, calls, mean, var, sums[c.name][1:].cpu() / calls))
        quality: dict[str, tuple[NormQuality | None, NormQuality | None]] = {}
        verified = 0
        if verify_batches is not None:
            ran = [(layer.name, dict(selected)[layer.name]) for layer in layers]
            quality, verified = _verify(model, ran, saved, verify_batches, run, group, world_size, tf32, device)
        changed = snapshot.changed(model)
        unchanged = not changed
        if group is not None:
            _, votes = merge_across_ranks({}, {"changed": torch.tensor([float(bool(changed))])}, group, world_size)
            unchanged = not votes["changed"].item()
        done = True
    finally:
        for module, flag in flags:
            module.training = flag
        for bn in patched:
            del bn.forward
        for name, bn in selected:
            bn.momentum = saved[name]["momentum"]
            if not done:
                _restore(bn, saved[name])
    none = (None, None)
    return RecalibrationReport(
        layers=tuple(
            dataclasses.replace(layer, verify_before=quality.get(layer.name, none)[0],
                                verify_after=quality.get(layer.name, none)[1])
            for layer in layers
        ),
        skipped=tuple(sorted(skipped, key=lambda s: s.name)),
        converted=tuple(layer.name for layer in layers if layer.converted),
        num_batches=num_batches_seen,
        num_samples=num_samples,
        unchanged_non_bn=unchanged,
        changed_non_bn=tuple(changed),
        world_size=world_size,
        verify_batches=verified,
    )


# ----------------------------------------------------------------------------- selection and state


def _select(model: nn.Module, only: Sequence[str], exclude: Sequence[str]) -> tuple[list, list[SkippedLayer]]:
    bns = [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    frozen = [SkippedLayer(name, "frozen (bntool freeze): its statistics are fixed by design; unfreeze it to "
                           "recalibrate it") for name, m in model.named_modules() if is_frozen(m)]
    if not bns:
        also = f" ({len(frozen)} frozen ones; unfreeze them first)" if frozen else ""
        raise InputError(f"`{type(model).__name__}` has no BatchNorm layers{also}; there is nothing to recalibrate")
    names = [name for name, _ in bns]
    for flag, patterns in (("--only", only), ("--exclude", exclude)):
        for pattern in patterns:
            if not any(_matches(name, pattern) for name in names):
                shown = ", ".join(f"`{n}`" for n in names[:8]) + (", ..." if len(names) > 8 else "")
                raise InputError(f"{flag} `{pattern}` matches no BatchNorm layer; the BatchNorm layers are {shown}")
    selected, skipped = [], frozen
    for name, bn in bns:
        hit = next((p for p in exclude if _matches(name, p)), None)
        if only and not any(_matches(name, p) for p in only):
            skipped.append(SkippedLayer(name, "not selected by --only; statistics unchanged"))
        elif hit is not None:
            skipped.append(SkippedLayer(name, f"excluded by --exclude `{hit}`; statistics unchanged"))
        else:
            selected.append((name, bn))
    if not selected:
        raise InputError("--only/--exclude leave no BatchNorm layer to recalibrate; loosen the patterns")
    return selected, skipped


def _matches(name: str, pattern: str) -> bool:
    """Glob match on the qualified name or on any of its parents (``layer1`` matches ``layer1.0.bn1``)."""
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(len(parts), 0, -1))


def _save(bn: _BatchNorm) -> dict[str, Any]:
    tracking = bn.track_running_stats and bn.running_mean is not None
    copy = {k: (getattr(bn, k).clone() if getattr(bn, k, None) is not None else None) for k in _BN_BUFFERS}
    return {"track": tracking, "track_flag": bn.track_running_stats, "momentum": bn.momentum, **copy}


def _restore(bn: _BatchNorm, old: dict[str, Any]) -> None:
    bn.track_running_stats = old["track_flag"]
    for key in _BN_BUFFERS:
        if old[key] is None or getattr(bn, key, None) is None:
            bn.register_buffer(key, None if old[key] is None else old[key].clone())
        else:
            with torch.no_grad():
                getattr(bn, key).copy_(old[key])


def _enable_tracking(bn: _BatchNorm, device: torch.device, dtype: torch.dtype) -> bool:
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
                             f"`{type(model).__name__}`; pass the --model the checkpoint was made from")
        _enable_tracking(bn, model_device(model), model_dtype(model))


def _state(model: nn.Module, skip: set[str]) -> dict[str, torch.Tensor]:
    tensors = itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    return {name: t.detach() for name, t in tensors if t is not None and name not in skip}


def _bn_buffer_names(bn_names: Iterable[str]) -> set[str]:
    return {f"{bn}.{key}" if bn else key for bn in bn_names for key in _BN_BUFFERS}


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as a flat integer tensor (NaN == NaN, 0.0 != -0.0 when compared)."""
    flat = t.reshape(-1)
    return flat.view(_INT_OF_SIZE.get(t.element_size(), torch.uint8))


class _Snapshot:
    """Bit copies of every parameter and buffer except the selected BNs' running buffers.

    The copies share one flat buffer per (device, integer width): one large
    allocation rather than hundreds, which would fragment the CPU heap and slow
    down every activation allocation of the pass that follows (measured: about
    10% on a ResNet-50 forward).
    """

    def __init__(self, model: nn.Module, bn_names: Iterable[str]):
        self.skip = _bn_buffer_names(bn_names)
        state = _state(model, self.skip)
        self.meta = {name: (t.shape, t.dtype, t.device) for name, t in state.items()}
        bits = {name: _bits(t) for name, t in state.items()}
        sizes: dict[tuple, int] = {}
        self.where: dict[str, tuple[tuple, int, int]] = {}
        for name, b in bits.items():
            key = (b.device, b.dtype)
            self.where[name] = (key, sizes.get(key, 0), b.numel())
            sizes[key] = sizes.get(key, 0) + b.numel()
        self.buffers = {key: torch.empty(n, dtype=key[1], device=key[0]) for key, n in sizes.items()}
        for name, b in bits.items():
            key, offset, n = self.where[name]
            self.buffers[key][offset : offset + n].copy_(b)

    def changed(self, model: nn.Module) -> list[str]:
        """Names not bit-identical to the snapshot (changed, replaced, added or removed)."""
        after = _state(model, self.skip)
        changed = []
        for name, (shape, dtype, device) in self.meta.items():
            t = after.get(name)
            if t is None or (t.shape, t.dtype, t.device) != (shape, dtype, device):
                changed.append(name)
                continue
            key, offset, n = self.where[name]
            if not torch.equal(self.buffers[key][offset : offset + n], _bits(t)):
                changed.append(name)
        return changed + [name for name in after if name not in self.meta]


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
            "need at least 2; pass a larger --batch-size, or drop the short last batch (use --num-batches)"
        ) from None
    except RuntimeError as exc:
        if isinstance(exc, torch.OutOfMemoryError):
            raise
        given = _shape_of(batch)
        raise InputError(
            f"batch {index} (input shape {given}) does not fit the model: {str(exc).splitlines()[0]}; "
            f"the first layer {expected_input(model)}; pass data of that shape (check --image-size, --input-key)"
        ) from None


def _single_value_bn(model: nn.Module, selected: list, run: Callable, batch: Any, index: int) -> tuple[str, tuple]:
    """Re-run the failing batch to name the BN that got one value per channel."""
    found: list[tuple[str, tuple]] = []

    class _Found(Exception):
        pass

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if args[0].numel() <= args[0].shape[1]:
                found.append((name, tuple(args[0].shape)))
                raise _Found
        return hook

    handles = [bn.register_forward_pre_hook(hook_for(name)) for name, bn in selected]
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


def _layer_stats(c: _Collector, old: dict, count: int, calls: int, mean: torch.Tensor, var: torch.Tensor,
                 mean_batch_var: torch.Tensor) -> LayerStats:
    eps = c.module.eps
    mean_change = var_change = None
    if old["track"]:
        old_mean, old_var = old["running_mean"].double().cpu(), old["running_var"].double().cpu()
        mean_change = float(((mean - old_mean).abs() / (var + eps).sqrt()).max())
        var_change = float((var / old_var - 1.0).abs().max()) if (old_var > 0).all() else float("inf")
    gap = float(((mean_batch_var - var).abs() / var.clamp_min(torch.finfo(torch.float64).tiny)).max())
    return LayerStats(
        name=c.name, kind=type(c.module).__name__, channels=c.module.num_features, count=count, calls=calls,
        mean_change=mean_change, var_change=var_change, batch_var_gap=gap, converted=not old["track"],
        method="float64" if c.float64_calls else "readback",
    )


def _verify(model: nn.Module, layers: list, saved: dict, batches: Iterable[Any], run: Callable, group: Any,
            world_size: int, tf32: Callable, device: torch.device) -> tuple[dict, int]:
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
            hooks = [bn.register_forward_hook(_observer(observed[name])) for name, bn in layers]
            error = None
            try:
                model.eval()
                with torch.no_grad(), tf32():
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
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        stats.merge(ChannelStats.of(args[0]))
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
