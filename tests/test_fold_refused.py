"""What fold leaves alone, each with its reason, and that the refused folds really would be wrong."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bntool
from bntool.errors import VerificationError
from bntool.folding.apply import apply_plan
from tests.conftest import randomize_bn
from tests.fold_models import (
    RECOMPUTED,
    UNSAFE,
    AuxHead,
    ReadsBNAttribute,
    ReadsConvWeight,
    assert_computes_original,
    assert_left_as_it_was,
    random_inputs,
)


@pytest.mark.parametrize("name", list(UNSAFE))
def test_unsafe_patterns_are_left_alone_with_a_reason(name):
    cls, shape, fragment = UNSAFE[name]
    torch.manual_seed(0)
    model = randomize_bn(cls(), seed=7)
    inputs = random_inputs(shape)
    folded, report = bntool.fold(model, example_inputs=inputs)
    assert report.plan.pairs == ()
    assert [s.bn for s in report.plan.skips] == ["bn"]
    assert fragment in report.plan.skips[0].reason, report.plan.skips[0].reason
    assert type(folded.bn) is nn.BatchNorm1d or type(folded.bn) is nn.BatchNorm2d
    assert report.comparison.passed
    assert_left_as_it_was(model, folded, inputs)


@pytest.mark.parametrize("name", ["conv-module-called-twice", "producer-output-read-elsewhere",
                                  "linear-then-bn1d-on-3d-input", "in-place-relu-between-untraceable",
                                  "weight-standardized-conv"])
def test_unsafe_patterns_really_are_unsafe(name):
    """Folding the pair anyway changes the output: the refusals above are not overcautious."""
    cls, shape, _ = UNSAFE[name]
    torch.manual_seed(0)
    model = randomize_bn(cls(), seed=7)
    inputs = random_inputs(shape)
    producer = "fc" if name.startswith("linear") else "conv"
    forced = bntool.FoldPlan((bntool.folding.plan.FoldPair("bn", producer, "backward", "removed", ""),), (), "forced")
    broken = apply_plan(copy.deepcopy(model), forced)
    comparison = bntool.compare(model, broken, inputs)
    assert not comparison.passed


@pytest.mark.parametrize("side", ["backward", "forward"])
@pytest.mark.parametrize("kind", list(RECOMPUTED))
def test_layer_with_recomputed_weight_is_left_with_a_reason(kind, side):
    torch.manual_seed(0)
    if side == "backward":  # conv -> BN: the BN would fold into the conv's output side
        model = nn.Sequential(RECOMPUTED[kind](nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4), nn.ReLU())
    else:  # relu -> BN -> unpadded conv: the BN would fold into the conv's input side
        model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(), nn.BatchNorm2d(3), RECOMPUTED[kind](nn.Conv2d(3, 4, 3)))
    model = randomize_bn(model, seed=4).eval()
    inputs = random_inputs((2, 3, 7, 7))
    with torch.no_grad():
        expected = model(*inputs)
    folded, report = bntool.fold(model, example_inputs=inputs)
    assert report.plan.pairs == ()
    [skip] = report.plan.skips
    assert "is recomputed at every call" in skip.reason, skip.reason
    assert report.comparison.passed
    with torch.no_grad():
        assert torch.equal(folded(*inputs), expected)


def test_bn_without_running_stats_is_left_and_points_to_recalibrate():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    randomize_bn(model, seed=1)
    _, report = bntool.fold(model, example_inputs=random_inputs((2, 3, 6, 6)))
    [skip] = report.plan.skips
    assert "track_running_stats=False" in skip.reason and "bntool recalibrate" in skip.reason


def test_bn_on_model_input_with_no_foldable_reader():
    model = randomize_bn(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3)), seed=2)
    _, report = bntool.fold(model, example_inputs=random_inputs((2, 3, 6, 6)))
    [skip] = report.plan.skips
    assert "model input" in skip.reason and "`1`" in skip.reason


@pytest.mark.parametrize("untraceable", [False, True])
def test_a_layer_whose_weight_the_forward_also_reads_is_left(untraceable):
    model = randomize_bn(ReadsConvWeight(untraceable), seed=3).eval()
    inputs = random_inputs((2, 3, 5, 5))
    folded, report = bntool.fold(model, example_inputs=inputs)
    assert report.plan.method == ("recorded" if untraceable else "fx") and report.plan.pairs == ()
    assert "`conv.weight` is also read by `mean`" in report.plan.skips[0].reason
    assert report.comparison.passed
    assert_left_as_it_was(model, folded, inputs)


@pytest.mark.parametrize("inplace", [False, True])
def test_a_fold_that_breaks_the_forward_is_rejected_and_the_rest_is_folded(inplace):
    """Removing `bn1` makes the forward fail (`Identity` has no `affine`): that fold is blamed from where the failure
    was raised, left with the reason, and the rest is folded and verified; strict raises, nothing changed."""
    model = randomize_bn(ReadsBNAttribute(), seed=3).eval()
    inputs = random_inputs((2, 3, 5, 5))
    original = copy.deepcopy(model)
    folded, report = bntool.fold(model, example_inputs=inputs, inplace=inplace)
    assert [p.bn for p in report.plan.pairs] == ["bn2"] and [s.bn for s in report.rejected] == ["bn1"]
    assert "failed to run (AttributeError" in report.plan.reason_for("bn1")
    assert isinstance(folded.bn1, nn.BatchNorm2d) and isinstance(folded.bn2, nn.Identity)
    assert_computes_original(folded, original, inputs)

    strict = randomize_bn(ReadsBNAttribute(), seed=3).eval()
    before = copy.deepcopy(strict.state_dict())
    with pytest.raises(VerificationError, match="the folded model failed to run on inputs the original runs on"):
        bntool.fold(strict, example_inputs=inputs, inplace=inplace, strict=True)
    assert isinstance(strict.bn1, nn.BatchNorm2d) and isinstance(strict.bn2, nn.BatchNorm2d)
    assert all(torch.equal(v, before[k]) for k, v in strict.state_dict().items())


def test_a_bn_only_a_training_branch_calls_is_left_and_says_so():
    model = randomize_bn(AuxHead(), seed=4).train()
    inputs = random_inputs((2, 3, 6, 6))
    folded, report = bntool.fold(model, example_inputs=inputs)
    assert [p.bn for p in report.plan.pairs] == ["bn"]
    assert report.plan.reason_for("aux_bn") == ("is never called in the model's eval-mode forward (a training-only "
                                                "branch, or unused)")
    assert folded.training  # the copy keeps the model's mode
    assert_computes_original(folded.eval(), model, inputs)
