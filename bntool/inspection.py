"""What is going on with the BatchNorms in a model: one row per BN, and the classic mistakes.

``inspect`` takes a model (statistics, hyper-parameters, dataflow and
foldability) or a bare state dict (statistics only, BNs found from their key
names). Whether a BN folds, and why not, comes from ``folding.plan_from_dataflow``
on the same dataflow that ``plan_fold`` builds, so ``bntool inspect`` and
``bntool fold`` give one reason. ``plot`` draws the per-layer statistics.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError, shorten
from .folding import FoldPlan, plan_from_dataflow
from .graph import Dataflow, dataflow
from .norms import has_fixed_statistics, has_statistics, is_batchnorm, num_features
from .validity import problems
from .shapes import declared_input_shapes, make_inputs

#: PyTorch's default eps, assumed where a file does not say (weights only).
DEFAULT_EPS = 1e-5
FROM_KEYS = "BatchNorm (from keys)"
NEEDS_MODEL = "needs --model"
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


@dataclass(frozen=True)
class InspectReport:
    rows: tuple[BNRow, ...]
    findings: tuple[Finding, ...]
    dataflow_method: str  # fx, recorded, or none
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [dataclasses.asdict(r) for r in self.rows],
            "findings": [dataclasses.asdict(f) for f in self.findings],
            "dataflow": self.dataflow_method,
            "note": self.note,
        }


# ----------------------------------------------------------------------------- entry point


def inspect(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    *,
    seed: int = 0,
) -> InspectReport:
    """Every BN of a model (or a state dict), its statistics and foldability, and what looks wrong.

    ``example_inputs`` show the dataflow where fx cannot trace and the input
    rank next to a Linear; when omitted they are drawn from the shape the
    model declares, as ``fold`` does. Nothing is changed.
    """
    if isinstance(model_or_state_dict, nn.Module):
        return _inspect_model(model_or_state_dict, example_inputs, seed)
    if isinstance(model_or_state_dict, Mapping):
        return _inspect_state_dict(model_or_state_dict)
    raise InputError(f"inspect takes an nn.Module or a state dict, got a {type(model_or_state_dict).__name__}")


def _inspect_model(model: nn.Module, example_inputs, seed: int) -> InspectReport:
    bns = {name: m for name, m in model.named_modules() if is_batchnorm(m)}
    flow, plan, note = _dataflow_and_plan(model, example_inputs, seed)
    order = [n for n in (flow.sites if flow else ()) if n in bns] + [n for n in bns if not flow or n not in flow.sites]
    unknown = "dataflow unknown (torch.fx cannot trace the model): pass --input-shape"
    rows = tuple(_model_row(name, bns[name], flow, plan, unknown) for name in order)
    findings = (_statistics_findings(rows, eps_known=True) + _nonfinite_weights(model, rows)
                + _model_findings(model, rows, bns, flow))
    return InspectReport(rows, _sorted(findings), flow.method if flow else "none", note)


def _inspect_state_dict(state: Mapping[str, torch.Tensor]) -> InspectReport:
    rows = []
    for key in state:
        if not (key == "running_mean" or key.endswith(".running_mean")):
            continue
        prefix = key[: -len("running_mean")]
        if f"{prefix}running_var" not in state:
            continue
        tensors = {n: state.get(f"{prefix}{n}") for n in ("weight", "bias", "running_mean", "running_var")}
        tracked = state.get(f"{prefix}num_batches_tracked")
        rows.append(_row(
            prefix.rstrip("."), FROM_KEYS, "keys", tensors, features=state[key].numel(), eps=None, momentum=None,
            affine=tensors["weight"] is not None, track=True,
            tracked=int(tracked.item()) if tracked is not None and tracked.numel() == 1 else None,
            fed_by=None, feeds=(), foldable=None, fold_into=None, fold_reason=NEEDS_MODEL,
        ))
    note = ("weights only: BatchNorms were found from key names (running_mean / running_var); eps, momentum, "
            "what feeds each BN and whether it folds need --model")
    if not _registration_order(list(state), [r.name for r in rows]):  # safetensors reorders keys
        rows.sort(key=lambda r: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", r.name)])
        note += "; the file's keys are sorted, so layers are listed in name order, not network order"
    findings = _statistics_findings(rows, eps_known=False) + _nonfinite_weights(state, rows)
    return InspectReport(tuple(rows), _sorted(findings), "none", note)


def _registration_order(keys: list[str], bns: list[str]) -> bool:
    """Whether ``keys`` look like ``state_dict()`` order: not sorted, and each BN's keys side by side."""
    if keys == sorted(keys):
        return False
    position = {k: i for i, k in enumerate(keys)}
    for name in bns:
        prefix = f"{name}." if name else ""
        own = sorted(position[k] for k in keys if k.startswith(prefix) and "." not in k[len(prefix):])
        if own[-1] - own[0] != len(own) - 1:
            return False
    return True


# ----------------------------------------------------------------------------- rows


def _dataflow_and_plan(model: nn.Module, example_inputs, seed: int) -> tuple[Dataflow | None, FoldPlan | None, str]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if example_inputs is None and declared_input_shapes(model):
        example_inputs = make_inputs(model, seed=seed)
    try:
        flow = dataflow(model, example_inputs)
    except InputError:
        raise
    except Exception as exc:  # fx and user models raise many types
        first = shorten((str(exc).strip().splitlines() or [type(exc).__name__])[0], 160)
        if example_inputs is None:
            return None, None, (f"torch.fx cannot trace the model ({first}) and its input shape is unknown; "
                                "pass --input-shape (example_inputs) to see what feeds each BN and whether it folds")
        shapes = ", ".join("x".join(map(str, t.shape)) for t in example_inputs)
        raise InputError(f"the model fails on inputs of shape {shapes} ({type(exc).__name__}: {first}); "
                         "pass the shape it takes with --input-shape") from None
    return flow, plan_from_dataflow(model, flow), flow.note


def _model_row(name: str, bn: nn.Module, flow: Dataflow | None, plan: FoldPlan | None, unknown: str) -> BNRow:
    site = flow.sites.get(name) if flow else None
    fed_by = (site.producer or site.producer_op) if site else None
    foldable = fold_into = None
    reason: str | None = unknown
    if plan is not None:
        pair = next((p for p in plan.pairs if p.bn == name), None)
        foldable, fold_into = pair is not None, pair.into if pair else None
        reason = None if pair else plan.reason_for(name)
    tracked = getattr(bn, "num_batches_tracked", None)
    momentum = getattr(bn, "momentum", None)
    return _row(
        name, type(bn).__name__, "model",
        {n: getattr(bn, n, None) for n in ("weight", "bias", "running_mean", "running_var")},
        features=num_features(bn), eps=float(bn.eps), momentum=None if momentum is None else float(momentum),
        affine=bool(getattr(bn, "affine", getattr(bn, "weight", None) is not None)),
        track=has_statistics(bn), tracked=int(tracked.item()) if tracked is not None else None,
        fed_by=fed_by, feeds=site.consumers if site else (), foldable=foldable, fold_into=fold_into,
        fold_reason=reason,
    )


def _row(name, type_name, source, tensors, *, features, eps, momentum, affine, track, tracked, **flow) -> BNRow:
    mean, var = tensors["running_mean"], tensors["running_var"]
    nonfinite = tuple(n for n, t in tensors.items()
                      if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()))
    dead: tuple[int, ...] = ()
    negative: tuple[int, ...] = ()
    if var is not None:
        values = var.detach().cpu()
        dead = tuple(torch.nonzero((values >= 0) & (values <= (DEFAULT_EPS if eps is None else eps))).flatten().tolist())
        negative = tuple(torch.nonzero(values < 0).flatten().tolist())
    return BNRow(
        name=name, type=type_name, source=source,
        num_features=features,
        eps=eps, momentum=momentum, affine=affine, track_running_stats=track, num_batches_tracked=tracked,
        running_mean=Summary.of(mean) if mean is not None else None,
        running_var=Summary.of(var) if var is not None else None,
        dead_channels=dead, nonfinite=nonfinite, negative_channels=negative, **flow,
    )


# ----------------------------------------------------------------------------- findings


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


def _nonfinite_weights(model_or_state, rows: Sequence[BNRow]) -> list[Finding]:
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


def _statistics_findings(rows: Sequence[BNRow], *, eps_known: bool) -> list[Finding]:
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
        eps_text = "its eps" if eps_known else f"eps (assumed {DEFAULT_EPS:g}: the file does not store it; pass --model)"
        findings.append(Finding(
            "dead_channels", "warning", tuple(r.name for r in dead),
            f"running_var is at or below {eps_text} in {count} channel(s): {parts}",
            "these channels saw a constant input in training (a dead filter, a ReLU that never fires); eval mode "
            "multiplies any deviation from the mean by 1/sqrt(var+eps), at least 1/sqrt(2*eps) (224 for eps=1e-5), "
            "so a small input shift explodes. Prune the channels, or recalibrate if the statistics are stale",
        ))
    return findings


def _model_findings(model: nn.Module, rows: Sequence[BNRow], bns: dict[str, nn.Module],
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


def _sorted(findings: list[Finding]) -> tuple[Finding, ...]:
    return tuple(sorted(findings, key=lambda f: SEVERITIES.index(f.severity)))


# ----------------------------------------------------------------------------- plot


def plot(report: InspectReport, path: str | Path, *, title: str | None = None, force: bool = False) -> Path:
    """Draw running_mean and running_var per BN in network order (box = quartiles, whiskers = min/max).

    An existing ``path`` is replaced only with ``force``; the image is written atomically.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError("--plot needs matplotlib; install it with `pip install bntool[plot]`") from None
    from .outputs import atomic_write, check_output_path

    path = check_output_path(path, force=force, what="--plot")
    rows = [r for r in report.rows if r.running_var is not None or r.running_mean is not None]
    if not rows:
        raise InputError("there is nothing to plot: no BatchNorm layer with running statistics")
    flagged = {n for f in report.findings if f.severity != "info" for n in f.layers}
    fig = Figure(figsize=(max(6.0, 0.28 * len(rows) + 2.5), 6.5), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax_mean, ax_var = fig.subplots(2, 1, sharex=True)
    positions = list(range(len(rows)))
    for ax, field, label in ((ax_mean, "running_mean", "running_mean"), (ax_var, "running_var", "running_var (log)")):
        stats, where, colors = [], [], []
        for i, r in enumerate(rows):
            s = getattr(r, field)
            if s is None:
                ax.annotate("NaN", (i, 0.5), xycoords=("data", "axes fraction"), color="red", ha="center", fontsize=7)
                continue
            floor = 0.01 * min(r.eps or DEFAULT_EPS for r in rows) if field == "running_var" else -math.inf
            stats.append({"med": max(s.median, floor), "q1": max(s.q1, floor), "q3": max(s.q3, floor),
                          "whislo": max(s.min, floor), "whishi": max(s.max, floor), "mean": s.mean, "fliers": []})
            where.append(i)
            colors.append("#d62728" if r.name in flagged else "#1f77b4")
        if stats:
            boxes = ax.bxp(stats, positions=where, widths=0.6, showfliers=False, patch_artist=True)
            for box, color in zip(boxes["boxes"], colors):
                box.set(facecolor=color, alpha=0.35, edgecolor=color)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    ax_var.set_yscale("log")
    eps = [r.eps if r.eps is not None else DEFAULT_EPS for r in rows]
    if any(r.running_var is None or r.running_var.min <= 100 * e for r, e in zip(rows, eps)):  # eps matters
        ax_var.scatter(positions, eps, marker="_", s=120, color="black",
                       label="eps" + (" (assumed)" if rows[0].eps is None else ""))
        ax_var.legend(loc="best", fontsize=8)
    ax_var.set_xticks(positions)
    ax_var.set_xticklabels([r.name or "(root)" for r in rows], rotation=90, fontsize=7)
    for tick, r in zip(ax_var.get_xticklabels(), rows):
        if r.name in flagged:
            tick.set_color("#d62728")
    fig.suptitle((f"{title}\n" if title else "") + "BatchNorm running statistics per layer, in network order\n"
                 "(box: quartiles, whiskers: min / max, red: a layer with an error or warning)", fontsize=9)
    with atomic_write(path, force=force, what="--plot") as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png", dpi=120)
    return path
