"""What a recalibration reports: per layer (``LayerStats``, ``NormQuality``) and for the pass (``RecalibrationReport``).

``results`` turns the pass's ``collect.Totals`` into each called layer's
report line and the values to write into its buffers, for all layers at
once, and refuses non-finite statistics before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError
from ..norms import is_bntool_frozen
from ..report import Skip, contract
from .collect import Totals
from .state import Held
from .stats import ChannelStats


@dataclass(frozen=True)
class NormQuality:
    """How close a BN's eval-mode normalised input, ``(x - running_mean) / sqrt(running_var + eps)``, is to 0 / 1.

    Averages over channels of ``|mean|`` and ``|variance - 1|`` on the verification batches.
    """

    mean_error: float
    var_error: float

    @classmethod
    def of(cls, stats: ChannelStats, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float) -> NormQuality:
        mean, var = stats.result()
        denom = running_var.to(torch.float64).cpu() + eps
        norm_mean = (mean.cpu() - running_mean.to(torch.float64).cpu()) / denom.sqrt()
        return cls(float(norm_mean.abs().mean()), float((var.cpu() / denom - 1.0).abs().mean()))


@dataclass(frozen=True)
class LayerStats:
    """One recalibrated BN layer.

    ``count``: values per channel over the whole pass (N*H*W summed over calls);
    ``calls``: forward calls seen (more than the batches for a shared BN);
    ``mean_change``: max over channels of ``|new mean - old mean| / sqrt(new var + eps)``;
    ``var_change``: max over channels of ``|new var / old var - 1|`` (None for a converted layer);
    ``batch_var_gap``: max over channels of ``|mean of per-call variances - population variance| /
    population variance``, what averaging batch variances would have got wrong;
    ``method``: ``readback`` (BN's own batch statistics) or ``float64`` (recomputed from a half-precision input);
    ``empty_calls``: calls with no values (an empty batch), skipped: they carry no statistics;
    ``frozen``: a bntool frozen BN, recalibrated and still frozen.
    """

    name: str
    kind: str
    channels: int
    count: int
    calls: int
    mean_change: float | None
    var_change: float | None
    batch_var_gap: float
    converted: bool
    method: str
    empty_calls: int = 0
    frozen: bool = False
    verify_before: NormQuality | None = None
    verify_after: NormQuality | None = None



@dataclass(frozen=True)
class RecalibrationReport:
    """What ``recalibrate`` did. ``passed`` is False when anything but the selected BN buffers changed.

    ``num_batches`` counts every batch, ``empty_batches`` those with no samples (skipped).
    """

    layers: tuple[LayerStats, ...]
    skipped: tuple[Skip, ...]
    converted: tuple[str, ...]
    num_batches: int
    num_samples: int
    unchanged_non_bn: bool
    changed_non_bn: tuple[str, ...]
    world_size: int = 1
    verify_batches: int = 0
    empty_batches: int = 0
    verified: bool = True  # False with ``verify=False``: ``passed`` is None (the state check is reported, not enforced)

    @property
    def passed(self) -> bool | None:
        return self.unchanged_non_bn if self.verified else None

    @property
    def done(self) -> tuple[LayerStats, ...]:
        return self.layers

    @property
    def comparison(self) -> None:
        """Recalibration is checked by its state check (``unchanged_non_bn``), not by comparing outputs."""
        return None

    @property
    def mean_of_batch_vars_vs_population(self) -> float:
        """Largest relative gap, over layers and channels, between the mean of batch variances and the true variance."""
        return max((layer.batch_var_gap for layer in self.layers), default=0.0)

    def recipe_step(self) -> dict[str, Any]:
        """The recipe entry: which layers were recalibrated and which became tracking BNs."""
        return {
            "op": "recalibrate",
            "layers": [layer.name for layer in self.layers],
            "tracking_enabled": list(self.converted),
            "num_batches": self.num_batches,
            "num_samples": self.num_samples,
        }

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["passed"] = self.passed
        data["mean_of_batch_vars_vs_population"] = self.mean_of_batch_vars_vs_population
        # (``name`` beside ``layer`` in the skip entries: the older key, kept for one release)
        check = {"unchanged_non_bn": self.unchanged_non_bn, "changed_non_bn": list(self.changed_non_bn)}
        data.update(contract("recalibrate", self, (layer.name for layer in self.layers),
                             check if self.verified else None, old_name="name"))
        return _finite(data)


def _finite(value: Any) -> Any:
    """JSON-safe: non-finite floats become None, tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value



def results(flat: Totals, held: dict[str, Held]) -> tuple[list[LayerStats], list[tuple]]:
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
            frozen=is_bntool_frozen(c.module),
        ))
    return layers, writes
