"""Folding a BN into the layer before it: every producer kind against a float64 oracle, dtypes, each pair's own
bits, and BN channels that are blocks of layer channels across a reshape."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bntool
from bntool.folding.apply import apply_plan
from bntool.folding.arithmetic import fold_into_producer
from bntool.folding.rules import plan_fold
from tests.conftest import randomize_bn
from tests.fold_models import (
    PRODUCERS,
    BN2dToLinear,
    ConvToFewerChannels,
    ConvToMoreChannels,
    LinearToBN2d,
    LinearTransposedToBN,
    assert_computes_original,
    random_inputs,
)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "nonaffine"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kind", list(PRODUCERS))
def test_fold_each_producer_kind(kind, bias, affine):
    make, bn_cls, shape = PRODUCERS[kind]
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(make(bias), bn_cls(6, affine=affine)), seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = random_inputs(shape)

    folded, report = bntool.fold(model, example_inputs=inputs)

    assert [(p.bn, p.into, p.direction, p.bn_becomes) for p in report.plan.pairs] == [("1", "0", "backward", "removed")]
    assert report.plan.skips == ()
    assert isinstance(folded[1], nn.Identity) and folded[0].bias is not None
    assert report.comparison.passed
    assert_computes_original(folded, model, inputs)
    # the input model is untouched
    assert isinstance(model[1], bn_cls)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_transposed_grouped_math_matches_per_channel_oracle():
    torch.manual_seed(1)
    conv = nn.ConvTranspose2d(6, 8, 3, groups=2)  # weight (6, 4, 3, 3): output channel g*4 + j
    bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(8)), seed=5)[0]
    weight, bias = fold_into_producer(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                      bn.weight, bn.bias, transposed=True, groups=2)
    k = (bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps))
    for g in range(2):
        for j in range(4):
            out = g * 4 + j
            rows = slice(g * 3, (g + 1) * 3)
            expected = conv.weight[rows, j] * k[out].float()  # the float64 scale, rounded once, times the weight
            assert torch.equal(weight[rows, j], expected), (g, j)
    expected_bias = k * (conv.bias.double() - bn.running_mean.double()) + bn.bias.double()
    torch.testing.assert_close(bias.double(), expected_bias, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=["float16", "bfloat16", "float64"])
def test_narrow_weights_are_multiplied_in_float32_and_rounded_once_float64_ones_in_float64(dtype):
    # a product in the weight's own dtype (what fx does) fails for float16 / bfloat16, a float32 product fails
    # for float64; a scale computed in float32 fails here for float64 and in the transposed-conv test above
    torch.manual_seed(2)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), seed=1).to(dtype)
    inputs = (torch.randn(2, 3, 8, 8).to(dtype),)
    original = copy.deepcopy(model)
    folded, report = bntool.fold(model, example_inputs=inputs)
    assert report.comparison.passed and folded[0].weight.dtype == dtype
    bn = original[1]
    k = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    expected = (original[0].weight.to(compute) * k.to(compute).view(-1, 1, 1, 1)).to(dtype)
    assert torch.equal(folded[0].weight, expected)
    expected_bias = (k * original[0].bias.double() + (bn.bias.double() - k * bn.running_mean.double())).to(dtype)
    assert torch.equal(folded[0].bias, expected_bias)  # the bias: float64, rounded once


def test_apply_gives_each_pair_the_bits_of_its_own_fold():
    """``apply_plan`` computes every plain BN's scale and shift at once: each layer must still get exactly what
    folding its own BN alone gives (different eps, affine and non-affine BNs, float64 statistics, big and small
    layers), so a misaligned statistic or eps in the batched arithmetic shows up as a changed bit."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, eps=1e-3),
        nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16, affine=False),
        nn.Conv2d(16, 700, 1), nn.BatchNorm2d(700, eps=1e-5),
        nn.Conv2d(700, 400, 1, bias=False), nn.BatchNorm2d(400, eps=0.1),  # 280000 weights: more than one block
    )
    randomize_bn(model, seed=2)
    model[7].running_var.data = model[7].running_var.double()  # another dtype in the batch
    model[7].running_mean.data = model[7].running_mean.double()
    model.eval()
    plan = plan_fold(model, (torch.randn(1, 3, 6, 6),))
    assert len(plan.pairs) == 4
    expected = {}
    for conv, bn in [(0, 1), (2, 3), (4, 5), (6, 7)]:
        c, b = model[conv], model[bn]
        expected[conv] = fold_into_producer(c.weight, c.bias, b.running_mean, b.running_var, b.eps, b.weight, b.bias)
    folded = apply_plan(copy.deepcopy(model), plan)
    for conv, (weight, bias) in expected.items():
        assert torch.equal(folded[conv].weight, weight), conv
        assert torch.equal(folded[conv].bias, bias), conv


def test_float64_layers_of_one_size_each_own_their_new_weights():
    """Layers are scaled through one reused float64 buffer; a float64 layer's new weight must be its own tensor,
    not a view of that buffer which the next layer of the same size overwrites."""
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3),
                                       nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)), seed=4).double().eval()
    expected = [fold_into_producer(model[i].weight, model[i].bias, model[i + 1].running_mean, model[i + 1].running_var,
                                   model[i + 1].eps, model[i + 1].weight, model[i + 1].bias)[0] for i in (0, 2, 4)]
    folded, report = bntool.fold(model, example_inputs=random_inputs((2, 4, 9, 9))[0].double(), strict=True)
    assert len(report.done) == 3
    for i, weight in zip((0, 2, 4), expected):
        assert torch.equal(folded[i].weight, weight), i
    storages = {folded[i].weight.untyped_storage().data_ptr() for i in (0, 2, 4)}
    assert len(storages) == 3


@pytest.mark.parametrize("cls,shape,direction", [(LinearToBN2d, (5, 8), "backward"), (BN2dToLinear, (2, 3, 6, 6), "forward"),
                                                 (ConvToFewerChannels, (2, 3, 6, 6), "backward")])
def test_a_bn_channel_that_is_a_block_of_layer_channels_folds(cls, shape, direction):
    model = randomize_bn(cls(), seed=8).eval()
    inputs = random_inputs(shape)
    folded, report = bntool.fold(model, example_inputs=inputs)
    [pair] = report.plan.pairs
    assert pair.direction == direction and isinstance(folded.bn, nn.Identity)
    assert_computes_original(folded, model, inputs)


@pytest.mark.parametrize("cls,shape,fragment", [
    (ConvToMoreChannels, (2, 3, 6, 6), "does not map each channel of `conv` into one channel of the BN"),
    (LinearTransposedToBN, (5, 8), "(`transpose`) stands between")])
def test_a_reshape_that_splits_or_interleaves_channels_is_refused(cls, shape, fragment):
    model = randomize_bn(cls(), seed=8).eval()
    folded, report = bntool.fold(model, example_inputs=random_inputs(shape))
    assert report.plan.pairs == () and fragment in report.plan.skips[0].reason, report.plan.skips[0].reason
    assert isinstance(folded.bn, nn.BatchNorm1d)


def test_forcing_the_refused_split_fold_really_breaks_it():
    """The block rule is not overcautious: folding ``ConvToMoreChannels`` anyway (with any one of the four BN channels
    a conv channel spans) changes the output."""
    model = randomize_bn(ConvToMoreChannels(), seed=8).eval()
    inputs = random_inputs((2, 3, 6, 6))
    k, c = bntool.folding.arithmetic.bn_scale_shift(model.bn.running_mean, model.bn.running_var, model.bn.eps, model.bn.weight,
                                          model.bn.bias)
    broken = copy.deepcopy(model)
    weight, bias = fold_into_producer(model.conv.weight, model.conv.bias, torch.zeros(4), torch.ones(4) - model.bn.eps,
                                      model.bn.eps, k[::4].float(), c[::4].float())
    broken.conv.weight.data, broken.conv.bias.data = weight, bias
    broken.bn = nn.Identity()
    assert not bntool.compare(model, broken, inputs).passed
