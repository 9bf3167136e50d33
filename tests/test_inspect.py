"""bntool.inspect: one model per finding built to have it, the same model without the defect, and fold's reasons."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bntool.folding.rules import plan_fold
from bntool.freezing.freeze import freeze
from bntool.inspection.findings import Summary
from bntool.inspection.inspect import FROM_KEYS, inspect
from bntool.norms import DEFAULT_EPS
from bntool.runtime.shapes import make_inputs
from examples.models import UntraceableNet, mlp_bn, randomize_bn_


def conv_net() -> nn.Sequential:
    """Three conv -> BN -> ReLU blocks (BNs named 1, 4, 7) with randomized BN state."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    )
    net.input_shape = (2, 3, 8, 8)
    return randomize_bn_(net, seed=1).eval()


class FunctionalActivationNet(nn.Module):
    """conv -> F.relu -> BN: the BN's input comes from an activation *function*."""

    input_shape = (2, 3, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.relu(self.conv(x)))


class SkipNet(nn.Module):
    """The conv's output is read by the BN and by the skip connection: fold must leave ``bn`` alone."""

    input_shape = (2, 3, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = self.bn(y) + y
        return self.bn2(self.conv2(y))


def kinds(report) -> dict[str, tuple[str, ...]]:
    return {f.kind: f.layers for f in report.findings}


# ----------------------------------------------------------------------------- one model per finding


def _never_updated(m):
    m[4].reset_running_stats()  # num_batches_tracked 0, mean 0, var 1


def _dead(m):
    with torch.no_grad():
        m[4].running_var[2] = 0.0
        m[4].running_var[5] = m[4].eps  # "at or below eps" includes eps itself


def _nonfinite(m):
    with torch.no_grad():
        m[1].running_mean[0] = float("nan")
        m[7].running_var[3] = float("inf")


def _no_stats(m):
    m[4] = nn.BatchNorm2d(8, track_running_stats=False)


def _momentum_none(m):
    m[7].momentum = None


def _after_activation(m):
    m[1], m[2] = m[2], m[1]  # conv -> ReLU -> BN


def _frozen(m):
    frozen, _ = freeze(m, include="4", inplace=True)


def _frozen_parameters(m):
    m[1].weight.requires_grad_(False)
    m[1].bias.requires_grad_(False)


def _eval_in_train(m):
    m.train()
    m[7].eval()


def _mixed_eps(m):
    m[7].eps = 1e-3


PLANTED = [
    ("statistics_never_updated", _never_updated, ("4",)),
    ("dead_channels", _dead, ("4",)),
    ("nonfinite_statistics", _nonfinite, ("1", "7")),
    ("no_running_statistics", _no_stats, ("4",)),
    ("momentum_none", _momentum_none, ("7",)),
    ("bn_after_activation", _after_activation, ("2",)),
    ("frozen", _frozen, ("4",)),
    ("frozen_parameters", _frozen_parameters, ("1",)),
    ("eval_mode_in_train", _eval_in_train, ("7",)),
    ("mixed_eps", _mixed_eps, ("7",)),
]


@pytest.mark.parametrize("kind, plant, layers", PLANTED, ids=[p[0] for p in PLANTED])
def test_finding_reported_on_a_model_built_to_have_it(kind, plant, layers):
    clean = conv_net()
    assert kind not in kinds(inspect(clean)), "the check fires on a clean model, so it cannot fail"
    model = conv_net()
    plant(model)
    found = kinds(inspect(model))
    assert found.get(kind) == layers
    assert set(found) == {kind}, f"planting {kind} should cause no other finding, got {sorted(found)}"


def test_clean_model_has_no_findings():
    report = inspect(conv_net())
    assert report.findings == ()
    assert [r.name for r in report.rows] == ["1", "4", "7"]
    assert report.dataflow_method == "fx"


def test_dead_channel_threshold_is_eps_and_message_names_the_channels():
    model = conv_net()
    _dead(model)
    with torch.no_grad():
        model[4].running_var[6] = 2 * model[4].eps  # just above eps: alive
    (finding,) = inspect(model).findings
    row = next(r for r in inspect(model).rows if r.name == "4")
    assert row.dead_channels == (2, 5)
    assert "channel 2, 5" in finding.message and "2 of 8" in finding.message
    assert "recalibrate" in finding.advice


def test_nonfinite_names_the_tensors():
    model = conv_net()
    _nonfinite(model)
    report = inspect(model)
    rows = {r.name: r for r in report.rows}
    assert rows["1"].nonfinite == ("running_mean",)
    assert rows["7"].nonfinite == ("running_var",)
    assert rows["1"].running_mean.nonfinite == 1
    assert report.findings[0].severity == "error"


def test_bn_after_activation_function_counts_too():
    model = randomize_bn_(FunctionalActivationNet()).eval()
    report = inspect(model)
    assert kinds(report)["bn_after_activation"] == ("bn",)
    assert report.rows[0].fed_by == "relu"


def test_mixed_eps_message_gives_each_value():
    model = conv_net()
    _mixed_eps(model)
    (finding,) = inspect(model).findings
    assert "eps=1e-05 in 2" in finding.message and "eps=0.001 in 1" in finding.message
    assert "Keras" in finding.advice


def test_frozen_bn_row_keeps_statistics():
    model = conv_net()
    _frozen(model)
    row = next(r for r in inspect(model).rows if r.name == "4")
    assert row.type == "FrozenBatchNorm2d"
    assert row.running_var.min == pytest.approx(conv_net()[4].running_var.min().item())


# ----------------------------------------------------------------------------- rows and fold's reasons


def test_foldability_is_folds_own_plan():
    model = randomize_bn_(SkipNet()).eval()
    report = inspect(model)
    plan = plan_fold(model, make_inputs(model, seed=0))
    rows = {r.name: r for r in report.rows}
    assert rows["bn"].foldable is False
    assert rows["bn"].fold_reason == plan.reason_for("bn")
    assert "also read by" in rows["bn"].fold_reason
    assert rows["bn2"].foldable is True and rows["bn2"].fold_reason is None
    assert rows["bn2"].fold_into == next(p.into for p in plan.pairs if p.bn == "bn2") == "conv2"
    assert rows["bn"].fed_by == "conv" and set(rows["bn"].feeds) == {"add"}


def test_row_fields():
    model = conv_net()
    model[4].momentum = 0.03
    row = inspect(model).rows[1]
    assert (row.name, row.type, row.num_features, row.eps, row.momentum) == ("4", "BatchNorm2d", 8, 1e-5, 0.03)
    assert (row.affine, row.track_running_stats, row.num_batches_tracked) == (True, True, 100)
    var = model[4].running_var
    assert row.running_var.min == pytest.approx(var.min().item())
    assert row.running_var.max == pytest.approx(var.max().item())
    assert row.running_var.median == pytest.approx(var.double().quantile(0.5).item())
    assert (row.fed_by, row.feeds, row.foldable, row.fold_into) == ("3", ("5",), True, "3")


def test_inspect_changes_nothing():
    model = conv_net().train()
    model[7].eval()
    before = copy.deepcopy(model.state_dict())
    flags = [m.training for m in model.modules()]
    inspect(model)
    assert [m.training for m in model.modules()] == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_untraceable_model_without_shape_still_reports_statistics():
    class NoShape(UntraceableNet):
        input_shape = None

    model = randomize_bn_(NoShape()).eval()
    report = inspect(model)
    assert report.dataflow_method == "none"
    assert "pass `example_inputs` to see" in report.note and "--" not in report.note  # Python terms, no flag
    assert {r.foldable for r in report.rows} == {None}
    assert all(r.fold_reason.endswith("pass `example_inputs`") for r in report.rows)
    with_inputs = inspect(model, torch.randn(2, 3, 16, 16))
    assert with_inputs.dataflow_method == "recorded"
    assert with_inputs.rows[0].foldable is True


def test_linear_neighbour_without_inputs_says_rank_unknown():
    model = randomize_bn_(mlp_bn()).eval()
    del model.input_shape
    rows = inspect(model).rows
    assert rows[0].foldable is False
    assert "shape of its input is unknown" in rows[0].fold_reason
    assert rows[0].fold_reason == plan_fold(model).reason_for(rows[0].name)


# ----------------------------------------------------------------------------- weights only


def test_state_dict_rows_from_key_names():
    model = conv_net()
    _nonfinite(model)
    with torch.no_grad():
        model[4].running_var[1] = 0.0
    report = inspect(model.state_dict())
    assert [r.name for r in report.rows] == ["1", "4", "7"]
    assert {r.type for r in report.rows} == {FROM_KEYS}
    assert {r.eps for r in report.rows} == {None}
    assert report.rows[1].num_batches_tracked == 100
    assert report.rows[1].dead_channels == (1,)
    found = kinds(report)
    assert found == {"nonfinite_statistics": ("1", "7"), "dead_channels": ("4",)}
    dead = next(f for f in report.findings if f.kind == "dead_channels")
    assert f"assumed {DEFAULT_EPS:g}" in dead.message and "pass `model`" in dead.message
    assert report.note.endswith("need `model`") and {r.fold_reason for r in report.rows} == {"needs `model`"}


def test_state_dict_never_updated():
    model = conv_net()
    _never_updated(model)
    assert kinds(inspect(model.state_dict())) == {"statistics_never_updated": ("4",)}
    assert kinds(inspect(conv_net().state_dict())) == {}


def test_summary_ignores_nonfinite():
    s = Summary.of(torch.tensor([1.0, float("nan"), 3.0, float("inf"), 2.0]))
    assert (s.min, s.median, s.max, s.nonfinite) == (1.0, 2.0, 3.0, 2)
    assert math.isclose(s.mean, 2.0)
    assert Summary.of(torch.tensor([float("nan")])) is None


def test_public_api():
    # through the public names, a model gives its dataflow and fold's own decisions, a state dict its statistics,
    # and neither is changed; catches a public `inspect` bound to something else (or a wrapper that drops the
    # inputs), and an inspection that writes into the model
    import bntool

    assert bntool.inspect is inspect
    model = conv_net()
    state = copy.deepcopy(model.state_dict())
    report = bntool.inspect(model, torch.randn(2, 3, 8, 8))
    assert isinstance(report, bntool.InspectReport) and report.dataflow_method == "fx"
    assert [(r.name, r.foldable, r.fold_into) for r in report.rows] == [("1", True, "0"), ("4", True, "3"),
                                                                        ("7", True, "6")]
    assert [r.fed_by for r in report.rows] == ["0", "3", "6"]
    assert report.rows[1].running_var.mean == pytest.approx(float(model[4].running_var.double().mean()))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    weights_only = bntool.inspect(model.state_dict())
    assert [(r.name, r.source, r.foldable) for r in weights_only.rows] == [("1", "keys", None), ("4", "keys", None),
                                                                           ("7", "keys", None)]
    assert [r.running_mean for r in weights_only.rows] == [r.running_mean for r in report.rows]


def test_the_old_plot_name_warns_and_is_the_new_one():
    import bntool
    import bntool.inspection

    with pytest.warns(FutureWarning, match=r"`bntool.inspection.plot` is now `bntool.plot`"):
        old = bntool.inspection.plot
    assert old is bntool.plot
    with pytest.raises(AttributeError, match="has no attribute 'plots'"):
        bntool.inspection.plots  # noqa: B018 - only the one deprecated name is looked up


def test_state_dict_rows_keep_registration_order_unless_the_file_lost_it():
    net = nn.Sequential()
    net.add_module("z", nn.BatchNorm1d(3))
    net.add_module("a10", nn.BatchNorm1d(3))
    net.add_module("a9", nn.BatchNorm1d(3))
    randomize_bn_(net)
    assert [r.name for r in inspect(net.state_dict()).rows] == ["z", "a10", "a9"]
    reordered = dict(sorted(net.state_dict().items(), key=lambda kv: (kv[1].dtype != torch.int64, kv[0])))
    report = inspect(reordered)  # as safetensors stores them: by dtype, then name
    assert [r.name for r in report.rows] == ["a9", "a10", "z"]
    assert "name order" in report.note
