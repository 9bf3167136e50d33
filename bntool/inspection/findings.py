"""The rows of an inspection (one ``BNRow`` per BatchNorm) and what looks wrong in them (``Finding``).

``statistics_findings`` need the statistics alone (a bare state dict will
do): NaN / inf, negative variances, statistics never updated, dead channels.
``model_findings`` need the model and its dataflow: no running statistics,
momentum=None, BN after an activation, frozen layers, frozen affine
parameters, eval mode inside train mode, mixed eps. ``nonfinite_weights``
looks at every tensor outside the BNs. Each finding says what to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import named
from ..graph.dataflow import Dataflow
from ..norms import DEFAULT_EPS, has_fixed_statistics, has_statistics
from ..verify.validity import problems

SEVERITIES = ("error", "warning", "info")
ACTIVATION_OPS = frozenset({
    "relu", "relu6", "gelu", "silu", "swish", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh",
    "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "prelu", "rrelu", "glu", "logsigmoid",
    "softsign", "tanhshrink", "threshold",
})
ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.PReLU, nn.RReLU, nn.GLU, nn.LogSigmoid,
    nn.Softsign, nn.Tanhshrink, nn.Threshold,
)


@dataclass(frozen=True)
class Summary:
    """Spread of one statistics tensor over its finite values; ``nonfinite`` counts NaN / inf entries."""

    min: float
    q1: float
    median: float
    q3: float
    max: float
    mean: float
    nonfinite: int

    @classmethod
    def of(cls, tensor: torch.Tensor) -> Summary | None:
        values = tensor.detach().to("cpu", torch.float64).flatten()
        finite = values[torch.isfinite(values)]
        if finite.numel() == 0:
            return None
        q = torch.quantile(finite, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
        return cls(finite.min().item(), q[0], q[1], q[2], finite.max().item(), finite.mean().item(),
                   values.numel() - finite.numel())

    def short(self) -> str:
        return f"{self.min:.3g}..{self.max:.3g}"


@dataclass(frozen=True)
class BNRow:
    """One BN layer. ``source`` is ``model`` or ``keys`` (weights only: eps, momentum, dataflow unknown)."""

    name: str
    type: str
    source: str
    num_features: int
    eps: float | None
    momentum: float | None
    affine: bool | None
    track_running_stats: bool | None
    num_batches_tracked: int | None
    running_mean: Summary | None
    running_var: Summary | None
    dead_channels: tuple[int, ...]  # 0 <= running_var <= eps
    nonfinite: tuple[str, ...]  # tensors holding NaN / inf
    fed_by: str | None  # producing module, an operation ("relu", "add"), or "input"
    feeds: tuple[str, ...]
    foldable: bool | None  # None: unknown (no architecture or no dataflow)
    fold_into: str | None
    fold_reason: str | None  # fold's own reason when not foldable, or why it is unknown
    negative_channels: tuple[int, ...] = ()  # running_var < 0: corrupt statistics

    @property
    def default_statistics(self) -> bool:
        m, v = self.running_mean, self.running_var
        return (m is not None and v is not None and not self.nonfinite
                and m.min == m.max == 0.0 and v.min == v.max == 1.0)


@dataclass(frozen=True)
class Finding:
    kind: str
    severity: str  # error, warning or info
    layers: tuple[str, ...]
    message: str
    advice: str



def _names(layers: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(f"`{n}`" for n in layers[:limit])
    return shown + (f" and {len(layers) - limit} more" if len(layers) > limit else "")


def _per_channel(rows: Sequence[BNRow], attr: str) -> tuple[list[BNRow], int, str]:
    """The rows with channels in ``attr``, how many channels in all, and ```name` 2 of 6 (channel 0, 3)`` parts."""
    hit = [r for r in rows if getattr(r, attr)]
    parts = "; ".join(f"`{r.name}` {len(getattr(r, attr))} of {r.num_features} (channel "
                      f"{', '.join(map(str, getattr(r, attr)[:5]))}{', ...' if len(getattr(r, attr)) > 5 else ''})"
                      for r in hit[:6])
    return hit, sum(len(getattr(r, attr)) for r in hit), parts


def nonfinite_weights(model_or_state, rows: Sequence[BNRow]) -> list[Finding]:
    """NaN / inf in any tensor outside the BN layers (those are ``nonfinite_statistics``)."""
    own = {f"{r.name}.{n}" if r.name else n for r in rows for n in ("weight", "bias", "running_mean", "running_var")}
    bad = [b for b in problems(model_or_state) if b.problem != "negative" and b.name not in own]
    if not bad:
        return []
    parts = "; ".join(f"`{b.name}` ({b.count} {b.problem} of {b.numel})" for b in bad[:6])
    more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
    return [Finding(
        "nonfinite_weights", "error", tuple(dict.fromkeys(b.name.rsplit(".", 1)[0] for b in bad)),
        f"{len(bad)} tensor(s) outside the BatchNorm layers hold NaN or inf values: {parts}{more}",
        "every output they reach is NaN or inf (or meaningless); training diverged or the file is corrupt. No "
        "BatchNorm step can repair weights: go back to an earlier checkpoint",
    )]


def _tracked(rows: Sequence[BNRow]) -> str:
    return "0" if all(r.num_batches_tracked == 0 for r in rows) else "0 or absent"


def statistics_findings(rows: Sequence[BNRow], *, eps_known: bool) -> list[Finding]:
    findings = []
    bad = [r for r in rows if r.nonfinite]
    if bad:
        parts = "; ".join(f"`{r.name}` ({', '.join(r.nonfinite)})" for r in bad[:6])
        findings.append(Finding(
            "nonfinite_statistics", "error", tuple(r.name for r in bad),
            f"{len(bad)} BN layer(s) hold NaN or inf values: {parts}",
            "every output downstream is NaN in eval mode; training diverged or the file is corrupt. Go back to an "
            "earlier checkpoint, or recompute the statistics on real data with `bntool recalibrate` "
            "(a NaN weight / bias needs retraining)",
        ))
    negative, count, parts = _per_channel(rows, "negative_channels")
    if negative:
        findings.append(Finding(
            "negative_variance", "error", tuple(r.name for r in negative),
            f"running_var is negative in {count} channel(s): {parts}",
            "a variance cannot be negative: the statistics are corrupt (a bad conversion or edit), and eval mode "
            "takes the square root of a negative number (NaN outputs) or divides by almost nothing. Recompute the "
            "statistics on real data with `bntool recalibrate`; fold, freeze and export refuse such a file",
        ))
    stale = [r for r in rows if r.default_statistics and r.num_batches_tracked in (0, None)]
    if stale:
        findings.append(Finding(
            "statistics_never_updated", "warning", tuple(r.name for r in stale),
            f"{len(stale)} BN layer(s) still have their initial statistics (running_mean all 0, running_var all 1, "
            f"num_batches_tracked {_tracked(stale)}): {_names([r.name for r in stale])}",
            "in eval mode they do not normalize at all. The checkpoint was saved before training, or these layers "
            "never ran in train mode (a branch not taken, a model kept in eval mode); run `bntool recalibrate` "
            "on representative data",
        ))
    dead, count, parts = _per_channel(rows, "dead_channels")
    if dead:
        eps_text = "its eps" if eps_known else f"eps (assumed {DEFAULT_EPS:g}: the file does not store it; pass {named('`model`')})"
        findings.append(Finding(
            "dead_channels", "warning", tuple(r.name for r in dead),
            f"running_var is at or below {eps_text} in {count} channel(s): {parts}",
            "these channels saw a constant input in training (a dead filter, a ReLU that never fires); eval mode "
            "multiplies any deviation from the mean by 1/sqrt(var+eps), at least 1/sqrt(2*eps) (224 for eps=1e-5), "
            "so a small input shift explodes. Prune the channels, or recalibrate if the statistics are stale",
        ))
    return findings


def model_findings(model: nn.Module, rows: Sequence[BNRow], bns: dict[str, nn.Module],
                    flow: Dataflow | None) -> list[Finding]:
    modules = dict(model.named_modules())
    findings = []

    def add(kind, severity, layers, message, advice):
        if layers:
            findings.append(Finding(kind, severity, tuple(layers), message.format(n=len(layers), names=_names(layers)),
                                    advice))

    names = [r.name for r in rows]
    add("no_running_statistics", "warning", [n for n in names if not has_statistics(bns[n])],
        "{n} BN layer(s) have track_running_stats=False: {names}",
        "eval mode normalizes with the statistics of each batch, so outputs depend on the batch (and batch size "
        "1 fails or is meaningless); give them statistics with `bntool recalibrate`, then they can be folded")
    add("momentum_none", "info", [n for n in names if has_statistics(bns[n]) and not has_fixed_statistics(bns[n])
                                  and getattr(bns[n], "momentum", 0.1) is None],
        "{n} BN layer(s) have momentum=None: {names}",
        "their statistics are a cumulative average over every batch since the last reset, early batches (other "
        "weights) included; right after a recalibration that is intended, after training it is stale — "
        "`bntool recalibrate` recomputes it on the final weights")
    after = []
    for n in names:
        site = flow.sites.get(n) if flow else None
        if site is None:
            continue
        op = (site.producer_op or "").rstrip("_").lower()
        if op in ACTIVATION_OPS or isinstance(modules.get(site.producer or ""), ACTIVATION_MODULES):
            after.append(n)
    add("bn_after_activation", "info", after,
        "{n} BN layer(s) normalize the output of an activation: {names}",
        "no conv / linear output reaches them directly, so they cannot fold backward; fold can only push them "
        "forward into the next layer (exact only without zero padding). Check the order is intended: the usual "
        "block is conv -> BN -> activation")
    add("frozen", "info", [n for n in names if has_fixed_statistics(bns[n])],
        "{n} BN layer(s) are frozen (by bntool freeze, or a frozen BatchNorm class): {names}",
        "they normalize with their stored statistics even in train mode and never update them: right for "
        "fine-tuning with small batches; `bntool.unfreeze` turns them back into ordinary BNs")
    trains = any(p.requires_grad for n, m in modules.items() if n not in bns for p in m.parameters(recurse=False))
    add("frozen_parameters", "info", [
        n for n in names if trains and not has_fixed_statistics(bns[n])
        and (params := list(bns[n].parameters(recurse=False))) and not any(p.requires_grad for p in params)],
        "{n} BN layer(s) have weight / bias with requires_grad=False while other layers train: {names}",
        "their affine parameters are fixed, but in train mode they still normalize with batch statistics and "
        "update running_mean / running_var; to fix the statistics as well, use `bntool freeze`")
    add("eval_mode_in_train", "info", [n for n in names if model.training and not bns[n].training
                                       and not has_fixed_statistics(bns[n])],
        "{n} BN layer(s) are in eval mode while the model is in train mode: {names}",
        "they use and keep their stored statistics for now, but the next model.train() puts them back in train "
        "mode (the `fix_bn` snippet must be re-run after every call); `bntool freeze` makes it stick")
    eps_groups: dict[float, list[str]] = {}
    for r in rows:
        if r.eps is not None:
            eps_groups.setdefault(r.eps, []).append(r.name)
    if len(eps_groups) > 1:
        common = max(eps_groups, key=lambda e: len(eps_groups[e]))
        odd = [n for e, group in eps_groups.items() if e != common for n in group]
        parts = "; ".join(f"eps={e:g} in {len(g)} ({_names(g, 3)})" for e, g in eps_groups.items())
        findings.append(Finding(
            "mixed_eps", "warning", tuple(odd), f"eps differs between BN layers: {parts}",
            "one model normally uses one eps; a mix is typical of weights ported from another framework "
            "(Keras / TensorFlow default to eps=1e-3, PyTorch to 1e-5). Check each layer's eps against the source "
            "model: a wrong eps shifts every output, most in channels with small running_var",
        ))
    return findings


def by_severity(findings: list[Finding]) -> tuple[Finding, ...]:
    return tuple(sorted(findings, key=lambda f: SEVERITIES.index(f.severity)))
