"""Folding a BN into the one layer after it: linear and conv readers, zero padding, grouped convs, kept scalar steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import bntool
from bntool.folding.arithmetic import fold_into_consumer
from tests.conftest import randomize_bn
from tests.fold_models import BNScalarsConv, BNThenConv, BNThenLinear, assert_computes_original, random_inputs


@pytest.mark.parametrize(
    "model",
    [BNThenLinear(), BNThenConv(), BNThenConv(groups=2), BNThenConv(padding=1, padding_mode="replicate")],
    ids=["linear", "conv", "conv-grouped", "conv-replicate-padding"],
)
def test_bn_on_input_folds_forward_into_its_reader(model):
    randomize_bn(model, seed=4)
    shape = (9, 12) if isinstance(model, BNThenLinear) else (3, 6, 7, 7)
    inputs = random_inputs(shape)
    folded, report = bntool.fold(model, example_inputs=inputs)
    [pair] = report.plan.pairs
    assert (pair.direction, pair.into) == ("forward", "fc" if isinstance(model, BNThenLinear) else "conv")
    assert isinstance(folded.bn, nn.Identity)
    assert_computes_original(folded, model, inputs)


def test_bn_before_zero_padded_conv_is_left_with_reason():
    model = randomize_bn(BNThenConv(padding=1), seed=4)
    folded, report = bntool.fold(model, example_inputs=random_inputs((3, 6, 7, 7)))
    assert report.plan.pairs == ()
    [skip] = report.plan.skips
    assert "model input" in skip.reason and "zero-pads" in skip.reason
    assert isinstance(folded.bn, nn.BatchNorm2d)


def test_consumer_math_matches_float64_oracle_for_grouped_conv():
    torch.manual_seed(3)
    conv = nn.Conv2d(6, 4, 3, groups=2)
    bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(6)), seed=2)[0]
    weight, bias = fold_into_consumer(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                      bn.weight, bn.bias, groups=2)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    expected = F.conv2d(F.batch_norm(x, bn.running_mean.double(), bn.running_var.double(), bn.weight.double(),
                                     bn.bias.double(), False, 0.0, bn.eps), conv.weight.double(), conv.bias.double(),
                        groups=2)
    got = F.conv2d(x, weight.double(), bias.double(), groups=2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_forward_fold_through_kept_scalar_steps_is_exact():
    """The reader sees ``a * x + s`` once the BN is gone, not ``x``: the fold must account for the steps that keep
    running (a wrong account is a fold verification rejects)."""
    model = randomize_bn(BNScalarsConv(), seed=6).eval()
    inputs = random_inputs((2, 3, 5, 5))
    folded, report = bntool.fold(model, example_inputs=inputs)
    assert [(p.bn, p.into, p.direction) for p in report.plan.pairs] == [("bn", "conv", "forward")]
    assert report.rejected == () and report.comparison.passed
    assert_computes_original(folded, model, inputs)
