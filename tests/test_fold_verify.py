"""The verification that judges a fold: a wrong channel is caught, a wrong pair rejected and the rest kept,
tolerances."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bntool
from bntool.errors import VerificationError
from bntool.folding.rules import plan_fold
from examples import models as zoo
from tests.conftest import randomize_bn
from tests.fold_models import assert_computes_original, corrupt_nth_fold, zoo_inputs


@pytest.mark.parametrize(
    "factory,layer", [("lenet", 1), ("lenet", 2), ("lenet", 3), ("lenet", 4), ("resnet_small", 4), ("resnet_small", 9)]
)
def test_a_fold_wrong_in_one_channel_of_one_layer_is_caught(monkeypatch, factory, layer):
    """A 0.1% error in one output channel of the layer-th folded layer fails verification (strict)."""
    torch.manual_seed(0)
    model = randomize_bn(getattr(zoo, factory)(), seed=5)
    corrupt_nth_fold(monkeypatch, layer)
    with pytest.raises(VerificationError) as info:
        bntool.fold(model, strict=True)
    assert not info.value.report.comparison.passed
    assert "does not match" in str(info.value)


@pytest.mark.parametrize("factory,layer", [("lenet", 2), ("resnet_small", 4), ("resnet_small", 9)])
def test_a_wrong_fold_is_rejected_and_the_rest_is_folded_and_verified(monkeypatch, factory, layer):
    """Without strict, the blamed fold is left out with a reason and every other fold is still made, verified."""
    torch.manual_seed(0)
    model = randomize_bn(getattr(zoo, factory)(), seed=5)
    expected = plan_fold(model, zoo_inputs(model))
    corrupt_nth_fold(monkeypatch, layer)  # only the first application of the plan is corrupted
    folded, report = bntool.fold(model)
    wrong = expected.pairs[layer - 1].bn
    assert [s.bn for s in report.rejected] == [wrong]
    assert "rejected by verification" in report.plan.reason_for(wrong)
    assert {p.bn for p in report.plan.pairs} == {p.bn for p in expected.pairs} - {wrong}
    assert report.comparison.passed
    assert not isinstance(folded.get_submodule(wrong), nn.Identity)  # the blamed BN is still there
    assert_computes_original(folded, model, zoo_inputs(model))


def test_user_tolerance_replaces_the_derived_one():
    model = randomize_bn(zoo.lenet(), seed=2)
    _, report = bntool.fold(model, atol=1e-3, rtol=0.0)
    assert report.comparison.rule == "atol=0.001 rtol=0" and report.comparison.passed


def test_an_inplace_fold_undoes_a_rejected_pair_and_a_failed_strict_fold(monkeypatch):
    """In place, a fold verification rejects is undone bit for bit (the rest stays folded); a failed strict fold
    leaves the model exactly as it was."""
    torch.manual_seed(0)
    model = randomize_bn(zoo.lenet(), seed=5)
    inputs = zoo_inputs(model)
    original = copy.deepcopy(model)
    corrupt_nth_fold(monkeypatch, 2)  # the fold of `5` into `4`, in the first round only
    folded, report = bntool.fold(model, example_inputs=inputs, inplace=True)
    assert folded is model and [s.bn for s in report.rejected] == ["5"]
    assert type(model[5]) is nn.BatchNorm2d and isinstance(model[1], nn.Identity)
    for key in ("4.weight", "4.bias", "5.running_mean", "5.running_var", "5.weight", "5.bias"):
        assert torch.equal(model.state_dict()[key], original.state_dict()[key]), key
    assert_computes_original(model, original, inputs)

    strict = randomize_bn(zoo.lenet(), seed=5)
    before = copy.deepcopy(strict.state_dict())
    corrupt_nth_fold(monkeypatch, 1)
    with pytest.raises(VerificationError):
        bntool.fold(strict, example_inputs=inputs, inplace=True, strict=True)
    assert [type(m) for m in strict] == [type(m) for m in original]
    assert strict.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in strict.state_dict().items())


@pytest.mark.parametrize("layer", [1, 3])
def test_a_float64_fold_wrong_by_a_millionth_in_one_channel_is_still_caught(monkeypatch, layer):
    """The float64 floor (32 units of float64 rounding) is still 10^10 times below a 1e-6 error in one channel."""
    torch.manual_seed(0)
    model = randomize_bn(zoo.lenet(), seed=5).double()
    import bntool.folding.apply as foldapply

    real, calls = foldapply.scale_producer, []

    def off_by_a_millionth(*args, **kwargs):
        weight, bias = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == layer:
            weight = weight.clone()
            weight[2] *= 1 + 1e-6
        return weight, bias

    monkeypatch.setattr(foldapply, "scale_producer", off_by_a_millionth)
    with pytest.raises(VerificationError, match="does not match"):
        bntool.fold(model, strict=True)
