"""Folding: every producer kind, every unsafe pattern, dtypes, and the verification that judges it."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import bntool
from bntool.errors import VerificationError
from bntool.folding.apply import apply_plan
from bntool.folding.arithmetic import fold_into_consumer, fold_into_producer, identity_statistics
from bntool.folding.rules import plan_fold
from examples import models as zoo
from tests.conftest import randomize_bn

# name -> (producer factory(bias), BN class, input shape)
PRODUCERS = {
    "conv1d": (lambda b: nn.Conv1d(4, 6, 3, bias=b), nn.BatchNorm1d, (3, 4, 10)),
    "conv2d": (lambda b: nn.Conv2d(4, 6, 3, padding=1, bias=b), nn.BatchNorm2d, (3, 4, 8, 8)),
    "conv3d": (lambda b: nn.Conv3d(4, 6, 3, bias=b), nn.BatchNorm3d, (2, 4, 5, 6, 6)),
    "conv2d-grouped": (lambda b: nn.Conv2d(4, 6, 3, groups=2, bias=b), nn.BatchNorm2d, (3, 4, 8, 8)),
    "conv2d-depthwise": (lambda b: nn.Conv2d(6, 6, 3, groups=6, bias=b), nn.BatchNorm2d, (3, 6, 8, 8)),
    "convT1d": (lambda b: nn.ConvTranspose1d(4, 6, 3, stride=2, bias=b), nn.BatchNorm1d, (3, 4, 7)),
    "convT2d": (lambda b: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, bias=b),
                nn.BatchNorm2d, (3, 4, 5, 5)),
    "convT3d": (lambda b: nn.ConvTranspose3d(4, 6, 2, stride=2, bias=b), nn.BatchNorm3d, (2, 4, 3, 3, 3)),
    "convT2d-grouped": (lambda b: nn.ConvTranspose2d(4, 6, 3, groups=2, bias=b), nn.BatchNorm2d, (3, 4, 5, 5)),
    "convT2d-depthwise": (lambda b: nn.ConvTranspose2d(6, 6, 3, groups=6, bias=b), nn.BatchNorm2d, (3, 6, 5, 5)),
    "linear": (lambda b: nn.Linear(5, 6, bias=b), nn.BatchNorm1d, (7, 5)),
}


def _inputs(shape, seed=0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5,)


def _oracle(model, inputs):
    """The original model's eval output, computed in float64."""
    from torch.utils._pytree import tree_map_only

    m64 = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        return m64(*tree_map_only(torch.Tensor, lambda t: t.double() if t.is_floating_point() else t, tuple(inputs)))


def _assert_computes_original(folded, original, inputs):
    """``folded`` (eval mode) matches ``original``'s float64 eval output (every tensor of a nested output)."""
    from torch.utils._pytree import tree_leaves

    with torch.no_grad():
        got = [t.double() for t in tree_leaves(folded(*inputs))]
    expected = tree_leaves(_oracle(original, inputs))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "nonaffine"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kind", list(PRODUCERS))
def test_fold_each_producer_kind(kind, bias, affine):
    make, bn_cls, shape = PRODUCERS[kind]
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(make(bias), bn_cls(6, affine=affine)), seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = _inputs(shape)

    folded, report = bntool.fold(model, inputs)

    assert [(p.bn, p.into, p.direction, p.bn_becomes) for p in report.plan.pairs] == [("1", "0", "backward", "removed")]
    assert report.plan.skips == ()
    assert isinstance(folded[1], nn.Identity) and folded[0].bias is not None
    assert report.comparison.passed
    _assert_computes_original(folded, model, inputs)
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
    folded, report = bntool.fold(model, inputs)
    assert report.comparison.passed and folded[0].weight.dtype == dtype
    bn = original[1]
    k = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    expected = (original[0].weight.to(compute) * k.to(compute).view(-1, 1, 1, 1)).to(dtype)
    assert torch.equal(folded[0].weight, expected)
    expected_bias = (k * original[0].bias.double() + (bn.bias.double() - k * bn.running_mean.double())).to(dtype)
    assert torch.equal(folded[0].bias, expected_bias)  # the bias: float64, rounded once


# ----------------------------------------------------------------------------- forward folding


class BNThenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc(self.bn(x))


class BNThenConv(nn.Module):
    def __init__(self, padding=0, groups=1, padding_mode="zeros"):
        super().__init__()
        self.bn = nn.BatchNorm2d(6)
        self.conv = nn.Conv2d(6, 4, 3, padding=padding, groups=groups, padding_mode=padding_mode)

    def forward(self, x):
        return self.conv(self.bn(x))


@pytest.mark.parametrize(
    "model",
    [BNThenLinear(), BNThenConv(), BNThenConv(groups=2), BNThenConv(padding=1, padding_mode="replicate")],
    ids=["linear", "conv", "conv-grouped", "conv-replicate-padding"],
)
def test_bn_on_input_folds_forward_into_its_reader(model):
    randomize_bn(model, seed=4)
    shape = (9, 12) if isinstance(model, BNThenLinear) else (3, 6, 7, 7)
    inputs = _inputs(shape)
    folded, report = bntool.fold(model, inputs)
    [pair] = report.plan.pairs
    assert (pair.direction, pair.into) == ("forward", "fc" if isinstance(model, BNThenLinear) else "conv")
    assert isinstance(folded.bn, nn.Identity)
    _assert_computes_original(folded, model, inputs)


def test_bn_before_zero_padded_conv_is_left_with_reason():
    model = randomize_bn(BNThenConv(padding=1), seed=4)
    folded, report = bntool.fold(model, _inputs((3, 6, 7, 7)))
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


# ----------------------------------------------------------------------------- what must be left alone


class ConvCalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)  # folding would change the second call


class SkipReadsConvOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return F.relu(self.bn(y)) + y


class ActivationBetween(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return F.relu(self.bn(F.relu(self.conv(x))))


class LinearBN1d3D(nn.Module):
    """Linear over the last axis of (N, C, L), BN1d over axis 1: the axes differ, though both have 6."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return torch.sigmoid(self.bn(self.fc(x)))


class BNCalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 1)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv1(x))) + torch.relu(self.bn(self.conv2(x)))


class TiedProducer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.other = nn.Linear(6, 6)
        self.other.weight = self.fc.weight
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return torch.relu(self.bn(self.fc(x))) + self.other(x)


class InPlaceReluBetween(nn.Module):
    """Untraceable (data-dependent branch) with an in-place ReLU between conv and BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > -1e9:  # fx cannot trace this
            y.relu_()
        return torch.relu(self.bn(y))


class StdConv2d(nn.Conv2d):
    """timm's weight-standardized conv: it convolves with its weight normalized per output channel at each call."""

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                              eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConvThenBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = StdConv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


UNSAFE = {
    "conv-module-called-twice": (ConvCalledTwice, (2, 4, 6, 6), "called 2 times"),
    "producer-output-read-elsewhere": (SkipReadsConvOutput, (2, 4, 6, 6), "also read by"),
    "activation-between": (ActivationBetween, (2, 4, 6, 6), "(`relu`) stands between"),
    "linear-then-bn1d-on-3d-input": (LinearBN1d3D, (3, 6, 6), "axis 1 of a 3-D input"),
    "tied-weight": (TiedProducer, (4, 6), "shared with `other`"),
    "in-place-relu-between-untraceable": (InPlaceReluBetween, (2, 4, 6, 6), "relu_"),
    "weight-standardized-conv": (StdConvThenBN, (2, 4, 6, 6), "from a `conv2d` whose weight, bias or settings"),
}


@pytest.mark.parametrize("name", list(UNSAFE))
def test_unsafe_patterns_are_left_alone_with_a_reason(name):
    cls, shape, fragment = UNSAFE[name]
    torch.manual_seed(0)
    model = randomize_bn(cls(), seed=7)
    inputs = _inputs(shape)
    folded, report = bntool.fold(model, inputs)
    assert report.plan.pairs == ()
    assert [s.bn for s in report.plan.skips] == ["bn"]
    assert fragment in report.plan.skips[0].reason, report.plan.skips[0].reason
    assert type(folded.bn) is nn.BatchNorm1d or type(folded.bn) is nn.BatchNorm2d
    assert report.comparison.passed


@pytest.mark.parametrize("name", ["conv-module-called-twice", "producer-output-read-elsewhere",
                                  "linear-then-bn1d-on-3d-input", "in-place-relu-between-untraceable",
                                  "weight-standardized-conv"])
def test_unsafe_patterns_really_are_unsafe(name):
    """Folding the pair anyway changes the output: the refusals above are not overcautious."""
    cls, shape, _ = UNSAFE[name]
    torch.manual_seed(0)
    model = randomize_bn(cls(), seed=7)
    inputs = _inputs(shape)
    producer = "fc" if name.startswith("linear") else "conv"
    forced = bntool.FoldPlan((bntool.folding.plan.FoldPair("bn", producer, "backward", "removed", ""),), (), "forced")
    broken = apply_plan(copy.deepcopy(model), forced)
    comparison = bntool.compare(model, broken, inputs)
    assert not comparison.passed


class _Rescale(nn.Module):
    def forward(self, t):
        return 2.0 * t


RECOMPUTED = {  # a layer whose weight / bias is computed at each call: a folded value written there is never used
    "weight_norm": lambda conv: nn.utils.parametrizations.weight_norm(conv),
    "spectral_norm": lambda conv: nn.utils.parametrizations.spectral_norm(conv),
    "old-style weight_norm (pre-hook)": lambda conv: nn.utils.weight_norm(conv),
    "old-style spectral_norm (pre-hook)": lambda conv: nn.utils.spectral_norm(conv),
    "parametrized bias": lambda conv: nn.utils.parametrize.register_parametrization(conv, "bias", _Rescale()),
}


@pytest.mark.parametrize("side", ["backward", "forward"])
@pytest.mark.parametrize("kind", list(RECOMPUTED))
def test_layer_with_recomputed_weight_is_left_with_a_reason(kind, side):
    torch.manual_seed(0)
    if side == "backward":  # conv -> BN: the BN would fold into the conv's output side
        model = nn.Sequential(RECOMPUTED[kind](nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4), nn.ReLU())
    else:  # relu -> BN -> unpadded conv: the BN would fold into the conv's input side
        model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(), nn.BatchNorm2d(3), RECOMPUTED[kind](nn.Conv2d(3, 4, 3)))
    model = randomize_bn(model, seed=4).eval()
    inputs = _inputs((2, 3, 7, 7))
    with torch.no_grad():
        expected = model(*inputs)
    folded, report = bntool.fold(model, inputs)
    assert report.plan.pairs == ()
    [skip] = report.plan.skips
    assert "is recomputed at every call" in skip.reason, skip.reason
    assert report.comparison.passed
    with torch.no_grad():
        assert torch.equal(folded(*inputs), expected)


def test_bn_without_running_stats_is_left_and_points_to_recalibrate():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    randomize_bn(model, seed=1)
    _, report = bntool.fold(model, _inputs((2, 3, 6, 6)))
    [skip] = report.plan.skips
    assert "track_running_stats=False" in skip.reason and "bntool recalibrate" in skip.reason


def test_bn_on_model_input_with_no_foldable_reader():
    model = randomize_bn(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3)), seed=2)
    _, report = bntool.fold(model, _inputs((2, 3, 6, 6)))
    [skip] = report.plan.skips
    assert "model input" in skip.reason and "`1`" in skip.reason


class BNReLU(nn.BatchNorm2d):
    """A BN subclass that also applies an activation: folding must keep the ReLU."""

    def forward(self, x):
        return F.relu(super().forward(x))


def test_bn_subclass_with_extra_work_keeps_only_the_extra_work():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 6, 3), BNReLU(6), nn.Conv2d(6, 2, 1)), seed=9)
    inputs = _inputs((2, 3, 8, 8))
    folded, report = bntool.fold(model, inputs)
    [pair] = report.plan.pairs
    assert pair.bn_becomes == "rewritten"
    assert not isinstance(folded[1], nn.modules.batchnorm._BatchNorm)  # the normalization no longer runs
    x = torch.randn(4, 6, 5, 5)
    with torch.no_grad():
        assert torch.equal(folded[1](x), F.relu(x))  # what is left is exactly the ReLU
    _assert_computes_original(folded, model, inputs)


class BNPReLU(nn.BatchNorm2d):
    """A BN subclass whose activation has a parameter of its own."""

    def __init__(self, channels):
        super().__init__(channels)
        self.act = nn.PReLU(channels)

    def forward(self, x):
        return self.act(super().forward(x))


@pytest.mark.parametrize("inplace", [False, True])
def test_bn_subclass_is_traced_once_and_what_is_left_is_the_folded_models_own(inplace, monkeypatch):
    """The plan's trace of a BN subclass also serves the surgery; the activation left in the folded copy holds
    its own parameter (a copy), never the original model's, and in place it is the model's own module."""
    traced = []
    real_trace = bntool.folding.bnform_trace.trace
    monkeypatch.setattr(bntool.folding.bnform_trace, "trace", lambda m, rank: traced.append(m) or real_trace(m, rank))
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 6, 3), BNPReLU(6), nn.Conv2d(6, 2, 1)), seed=9).eval()
    with torch.no_grad():
        model[1].act.weight.uniform_(-0.5, 0.5)
    original_act, original_slope = model[1].act, model[1].act.weight
    inputs = _inputs((2, 3, 8, 8))
    with torch.no_grad():
        expected = model(*inputs)
    folded, report = bntool.fold(model, inputs, inplace=inplace)
    assert len(traced) == 1 and [p.bn_becomes for p in report.plan.pairs] == ["rewritten"]
    assert not isinstance(folded[1], nn.modules.batchnorm._BatchNorm)
    slope = folded[1].act.weight
    with torch.no_grad():
        torch.testing.assert_close(folded(*inputs), expected, rtol=1e-5, atol=1e-5)
    if inplace:
        assert folded is model and folded[1].act is original_act and slope is original_slope
        return
    assert slope is not original_slope and slope.data_ptr() != original_slope.data_ptr()
    assert torch.equal(slope, original_slope)
    with torch.no_grad():
        slope.fill_(7.0)  # changing the folded model's activation leaves the original alone
        assert torch.equal(model(*inputs), expected)
    assert isinstance(model[1], BNPReLU) and model[1].act is original_act


class FlaggedBNAct(nn.BatchNorm2d):
    """A BN subclass whose forward depends on a flag: ReLU after the normalization, or a doubling."""

    def __init__(self, channels, relu: bool, settings=None):
        super().__init__(channels)
        self.relu = relu
        if settings is not None:
            self.settings = settings  # (an attribute that is no plain value: the module is traced on its own)

    def forward(self, x):
        y = super().forward(x)
        return torch.relu(y) if self.relu else y * 2


def _counting_traces(monkeypatch) -> list:
    traced = []
    real_trace = bntool.folding.bnform_trace.trace
    monkeypatch.setattr(bntool.folding.bnform_trace, "trace", lambda m, rank: traced.append(m) or real_trace(m, rank))
    return traced


def test_bn_subclasses_built_alike_share_one_trace_and_each_keeps_its_own_tensors(monkeypatch):
    # catches: a structure key that misses an attribute the forward branches on (the doubling layer would get
    # the ReLU's remainder and be rejected), a replica that keeps the first module's PReLU slope, a key that
    # merges different channel counts, and sharing that never happens
    traced = _counting_traces(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), BNPReLU(6), nn.Conv2d(6, 6, 1), BNPReLU(6), nn.Conv2d(6, 4, 1),
                          BNPReLU(4), nn.Conv2d(4, 4, 1), FlaggedBNAct(4, relu=True), nn.Conv2d(4, 4, 1),
                          FlaggedBNAct(4, relu=False), nn.Conv2d(4, 4, 1), FlaggedBNAct(4, relu=False, settings={}))
    model = randomize_bn(model, seed=4).eval()
    with torch.no_grad():
        for i in (1, 3, 5):
            model[i].act.weight.uniform_(-0.9, 0.9)
    inputs = _inputs((2, 3, 8, 8))
    folded, report = bntool.fold(model, inputs)
    assert report.passed and report.rejected == () and len(report.plan.pairs) == 6
    assert [type(m).__name__ for m in traced] == ["BNPReLU", "BNPReLU", "FlaggedBNAct", "FlaggedBNAct", "FlaggedBNAct"]
    for i in (1, 3, 5):
        assert torch.equal(folded[i].act.weight, model[i].act.weight)
        assert folded[i].act.weight.data_ptr() != model[i].act.weight.data_ptr()
    _assert_computes_original(folded, model, inputs)
    monkeypatch.setattr(bntool.folding.bnform_trace, "structure", lambda module, rank: None)  # every module traced on its own
    alone, _ = bntool.fold(model, inputs)
    for key, value in alone.state_dict().items():
        assert torch.equal(folded.state_dict()[key], value), key


class BNClip(nn.BatchNorm2d):
    """A BN + clamp whose range is a buffer read into Python (a quantization-aware activation's calibrated range):
    fx does not proxy buffers, so the trace holds the values, not a reference to them."""

    def __init__(self, channels, low, high, sign=1.0, from_buffer=True):
        super().__init__(channels)
        self.register_buffer("act_range", torch.tensor([low, high]))
        self.low, self.high = (None, None) if from_buffer else (low, high)  # (from the buffer: the same key)
        self.sign, self.from_buffer = sign, from_buffer

    def forward(self, x):
        low, high = self.act_range.tolist() if self.from_buffer else (self.low, self.high)
        return super().forward(x).clamp(low, high) * math.copysign(1.0, self.sign)


def test_a_trace_that_read_its_buffers_values_or_a_signed_zero_is_not_shared(monkeypatch):
    # catches: a shared trace that carries the first layer's clamp range to the second (exact on inputs that do
    # not reach the range, wrong beyond it, and always wrong with verify=False), and a key where 0.0 == -0.0.
    # The layers that read their range from a buffer keep running with identity statistics (next test).
    traced = _counting_traces(monkeypatch)
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), BNClip(4, -100.0, 100.0), nn.Conv2d(4, 4, 1),
                                       BNClip(4, -100.0, 20.0), nn.Conv2d(4, 4, 1),
                                       BNClip(4, -100.0, 20.0, sign=0.0, from_buffer=False), nn.Conv2d(4, 4, 1),
                                       BNClip(4, -100.0, 20.0, sign=-0.0, from_buffer=False)), seed=2).eval()
    inputs = _inputs((2, 3, 8, 8))
    folded, report = bntool.fold(model, inputs, verify=False)
    assert [p.bn_becomes for p in report.plan.pairs] == ["identity", "identity", "rewritten", "rewritten"]
    assert len(traced) == 6  # 5 and 7 apart; 1 and 3 each traced, then traced again with other values
    wide = (inputs[0] * 200,)  # beyond every clamp
    with torch.no_grad():
        torch.testing.assert_close(folded(*wide), model(*wide), rtol=1e-5, atol=1e-3)


def test_what_is_left_never_holds_values_a_rebuilt_model_would_not_have(tmp_path):
    # catches: a remainder with the calibrated clamp range baked in as numbers: the written file would drop the
    # range buffer, and bntool.load, replaying the fold on a freshly built model, would bake that model's
    # default range instead (exact on inputs inside both ranges, wrong beyond)
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), BNClip(4, -100.0, 100.0), nn.Conv2d(4, 4, 1))

    model = randomize_bn(build(), seed=5).eval()
    model[1].act_range.copy_(torch.tensor([-100.0, 0.5]))  # calibrated after construction
    inputs = _inputs((2, 3, 8, 8))
    folded, report = bntool.fold(model, inputs)
    assert [p.bn_becomes for p in report.plan.pairs] == ["identity"] and report.passed
    out = bntool.save(folded, tmp_path / "folded.safetensors", build=build)
    loaded = bntool.load(out, build()).eval()
    wide = (inputs[0] * 50,)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*wide), model(*wide), rtol=1e-5, atol=1e-4)


class MaskedBN(nn.BatchNorm2d):
    """A BN + ReLU whose channel mask is a bool buffer read into Python."""

    def __init__(self, channels):
        super().__init__(channels)
        self.register_buffer("mask", torch.ones(channels, dtype=torch.bool))

    def forward(self, x):
        y = torch.relu(super().forward(x))
        return y * torch.tensor(self.mask.tolist(), dtype=y.dtype).view(1, -1, 1, 1)


def test_a_bool_buffer_read_into_python_keeps_the_layer_running_exactly():
    # catches: the check that traces again with other values crashing on a bool buffer (add_ on bool)
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), MaskedBN(4)), seed=1).eval()
    model[1].mask[1] = False
    inputs = _inputs((2, 3, 8, 8))
    folded, report = bntool.fold(model, inputs)
    assert [p.bn_becomes for p in report.plan.pairs] == ["identity"] and report.passed
    _assert_computes_original(folded, model, inputs)


class UntraceableBNReLU(nn.BatchNorm2d):
    """A BN subclass whose forward fx cannot trace: it keeps running with identity statistics."""

    def forward(self, x):
        y = super().forward(x)
        return F.relu(y) if float(y.abs().sum()) >= 0 else y  # data-dependent: fx cannot trace this


def test_untraceable_bn_subclass_keeps_running_as_an_exact_identity():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 6, 3), UntraceableBNReLU(6), nn.Conv2d(6, 2, 1)), seed=9)
    inputs = _inputs((2, 3, 8, 8))
    folded, report = bntool.fold(model, inputs)
    [pair] = report.plan.pairs
    assert pair.bn_becomes == "identity"
    assert isinstance(folded[1], UntraceableBNReLU)  # kept, so its ReLU still runs
    x = torch.randn(4, 6, 5, 5)
    with torch.no_grad():
        assert torch.equal(folded[1](x), F.relu(x))  # normalization is an exact identity
    _assert_computes_original(folded, model, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.1])
def test_identity_statistics_make_var_plus_eps_exactly_one(dtype, eps):
    _, var = identity_statistics(torch.ones(3, dtype=dtype), eps)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    total = var.to(acc) + torch.tensor(eps, dtype=acc)
    if dtype in (torch.float32, torch.float64):
        assert (total == 1).all()  # exact: BN(x) == x bit for bit
    else:  # half precision cannot hold 1 - eps: the nearest value, within one unit of the dtype
        assert ((total - 1).abs() <= torch.finfo(dtype).eps).all()


def test_untraceable_model_folds_through_a_recorded_forward_pass():
    model = randomize_bn(zoo.untraceable_net(), seed=3)
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)
    folded, report = bntool.fold(model)
    assert report.plan.method == "recorded" and "torch.fx cannot trace" in report.plan.note
    assert len(report.plan.pairs) >= 2 and report.comparison.passed
    folded_bns = {p.bn for p in report.plan.pairs}
    assert all(isinstance(folded.get_submodule(n), nn.Identity) for n in folded_bns)


@pytest.mark.parametrize("factory", ["resnet_small", "mlp_bn", "conv1d_net", "conv3d_net", "two_io_net", "lenet"])
def test_zoo_models_fold_completely(factory):
    model = randomize_bn(getattr(zoo, factory)(), seed=11)
    folded, report = bntool.fold(model)
    assert report.plan.skips == () and report.comparison.passed
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())


def test_inplace_fold_changes_the_given_model():
    model = randomize_bn(zoo.lenet(), seed=1)
    folded, _ = bntool.fold(model, inplace=True)
    assert folded is model and isinstance(model[1], nn.Identity)


# ----------------------------------------------------------------------------- verification catches a bad fold


def _corrupt_nth_fold(monkeypatch, n: int) -> list:
    """Make the n-th backward fold 0.1% wrong in one output channel; returns the calls seen."""
    import bntool.folding.apply as foldapply

    real = foldapply.scale_producer
    calls = []

    def corrupt_one_channel(*args, **kwargs):
        weight, bias = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == n:
            weight = weight.clone()
            weight[3] *= 1.001
        return weight, bias

    monkeypatch.setattr(foldapply, "scale_producer", corrupt_one_channel)
    return calls


@pytest.mark.parametrize(
    "factory,layer", [("lenet", 1), ("lenet", 2), ("lenet", 3), ("lenet", 4), ("resnet_small", 4), ("resnet_small", 9)]
)
def test_a_fold_wrong_in_one_channel_of_one_layer_is_caught(monkeypatch, factory, layer):
    """A 0.1% error in one output channel of the layer-th folded layer fails verification (strict)."""
    torch.manual_seed(0)
    model = randomize_bn(getattr(zoo, factory)(), seed=5)
    _corrupt_nth_fold(monkeypatch, layer)
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
    _corrupt_nth_fold(monkeypatch, layer)  # only the first application of the plan is corrupted
    folded, report = bntool.fold(model)
    wrong = expected.pairs[layer - 1].bn
    assert [s.bn for s in report.rejected] == [wrong]
    assert "rejected by verification" in report.plan.reason_for(wrong)
    assert {p.bn for p in report.plan.pairs} == {p.bn for p in expected.pairs} - {wrong}
    assert report.comparison.passed
    assert not isinstance(folded.get_submodule(wrong), nn.Identity)  # the blamed BN is still there
    _assert_computes_original(folded, model, zoo_inputs(model))


def zoo_inputs(model):
    from bntool.runtime.shapes import make_inputs

    return make_inputs(model)


def test_user_tolerance_replaces_the_derived_one():
    model = randomize_bn(zoo.lenet(), seed=2)
    _, report = bntool.fold(model, atol=1e-3, rtol=0.0)
    assert report.comparison.rule == "atol=0.001 rtol=0" and report.comparison.passed


def test_plan_is_data_and_recipe_step_is_json():
    import json

    model = randomize_bn(zoo.resnet_small(), seed=1)
    plan = plan_fold(model)
    step = json.loads(json.dumps(plan.recipe_step()))
    assert step["op"] == "fold" and len(step["pairs"]) == len(plan.pairs) == 11


@pytest.mark.parametrize("affine", ["frozen", "trainable"])
def test_a_frozen_model_folds_like_an_ordinary_one(affine):
    """Frozen BNs (bntool freeze) fold into their producers; the result matches the original in eval mode."""
    from bntool.freezing.freeze import freeze
    from bntool.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d

    torch.manual_seed(0)
    original = randomize_bn(zoo.lenet(), seed=6)
    frozen, _ = freeze(original, affine=affine)
    assert sum(isinstance(m, FrozenBatchNorm1d | FrozenBatchNorm2d) for m in frozen.modules()) == 4
    folded, report = bntool.fold(frozen)
    assert len(report.plan.pairs) == 4 and report.plan.skips == ()
    assert not any(isinstance(m, FrozenBatchNorm1d | FrozenBatchNorm2d) for m in folded.modules())
    _assert_computes_original(folded, original, _inputs((3, 1, 28, 28)))


def test_an_inplace_fold_undoes_a_rejected_pair_and_a_failed_strict_fold(monkeypatch):
    """In place, a fold verification rejects is undone bit for bit (the rest stays folded); a failed strict fold
    leaves the model exactly as it was."""
    torch.manual_seed(0)
    model = randomize_bn(zoo.lenet(), seed=5)
    inputs = zoo_inputs(model)
    original = copy.deepcopy(model)
    _corrupt_nth_fold(monkeypatch, 2)  # the fold of `5` into `4`, in the first round only
    folded, report = bntool.fold(model, inputs, inplace=True)
    assert folded is model and [s.bn for s in report.rejected] == ["5"]
    assert type(model[5]) is nn.BatchNorm2d and isinstance(model[1], nn.Identity)
    for key in ("4.weight", "4.bias", "5.running_mean", "5.running_var", "5.weight", "5.bias"):
        assert torch.equal(model.state_dict()[key], original.state_dict()[key]), key
    _assert_computes_original(model, original, inputs)

    strict = randomize_bn(zoo.lenet(), seed=5)
    before = copy.deepcopy(strict.state_dict())
    _corrupt_nth_fold(monkeypatch, 1)
    with pytest.raises(VerificationError):
        bntool.fold(strict, inputs, inplace=True, strict=True)
    assert [type(m) for m in strict] == [type(m) for m in original]
    assert strict.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in strict.state_dict().items())


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
    folded, report = bntool.fold(model, _inputs((2, 4, 9, 9))[0].double(), strict=True)
    assert len(report.done) == 3
    for i, weight in zip((0, 2, 4), expected):
        assert torch.equal(folded[i].weight, weight), i
    storages = {folded[i].weight.untyped_storage().data_ptr() for i in (0, 2, 4)}
    assert len(storages) == 3


def test_folded_copy_shares_no_module_with_the_original():
    """The copy that ``fold`` works on holds the removed BNs of the original until they are replaced: none may
    be left in the result, or a later change to the folded model would change the original."""
    model = randomize_bn(zoo.resnet_small(), seed=0).eval()
    folded, report = bntool.fold(model, verify=False)
    assert report.done
    originals = {id(m) for m in model.modules()}
    assert not [name for name, m in folded.named_modules() if id(m) in originals]


class _Aliased(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.alias = self.bn  # the same module under a second name, never called through it

    def forward(self, x):
        return self.bn(self.conv(x))


def test_a_bn_held_at_two_places_goes_from_both_and_the_original_keeps_it_at_both():
    """The module folded away is gone wherever the copy held it (an alias is the same module); the original's
    BN is never touched through the copy."""
    model = randomize_bn(_Aliased(), seed=1).eval()
    before = copy.deepcopy(model.state_dict())
    folded, report = bntool.fold(model, (torch.randn(1, 3, 8, 8),), verify=False)
    assert [p.bn for p in report.done] == ["bn"]
    assert isinstance(folded.bn, nn.Identity) and folded.alias is folded.bn
    assert isinstance(model.bn, nn.BatchNorm2d) and model.alias is model.bn
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- one module at two places


def _reused_block():
    """``Sequential(stem, conv, bn, relu, conv, bn)`` with the same conv and BN objects at both places."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
    return nn.Sequential(nn.Conv2d(3, 4, 1), conv, bn, nn.ReLU(), conv, bn)


@pytest.mark.parametrize("inplace", [False, True])
def test_a_block_held_at_two_places_folds_once_and_leaves_no_bn_at_either(inplace):
    """The conv's weight is not "shared with another layer": it is the same layer. The BN goes from both places."""
    model = randomize_bn(_reused_block(), seed=4).eval()
    inputs = _inputs((2, 3, 6, 6))
    original = copy.deepcopy(model)
    folded, report = bntool.fold(model, inputs, inplace=inplace)
    assert [(p.bn, p.into) for p in report.plan.pairs] == [("2", "1")] and report.plan.skips == ()
    assert isinstance(folded[2], nn.Identity) and folded[5] is folded[2] and folded[4] is folded[1]
    _assert_computes_original(folded, original, inputs)
    if not inplace:
        assert folded[1] is not model[1] and isinstance(model[2], nn.BatchNorm2d) and model[5] is model[2]


def test_a_block_held_at_two_places_reloads_and_undoes_at_both(monkeypatch, tmp_path):
    model = randomize_bn(_reused_block(), seed=4).eval()
    inputs = _inputs((2, 3, 6, 6))
    folded, _ = bntool.fold(copy.deepcopy(model), inputs)
    bntool.save(folded, tmp_path / "f.safetensors")
    fresh = bntool.load(tmp_path / "f.safetensors", _reused_block()).eval()
    assert isinstance(fresh[2], nn.Identity) and fresh[5] is fresh[2]
    with torch.no_grad():
        assert torch.equal(fresh(*inputs), folded(*inputs))

    before = copy.deepcopy(model.state_dict())
    _corrupt_nth_fold(monkeypatch, 1)
    with pytest.raises(VerificationError):
        bntool.fold(model, inputs, inplace=True, strict=True)
    assert type(model[2]) is nn.BatchNorm2d and model[5] is model[2]  # back at both places
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- channels in blocks across a reshape


class LinearToBN2d(nn.Module):
    """A GAN generator's projection: ``fc(z).view(-1, C, H, W)`` then ``BatchNorm2d(C)``: each BN channel is a
    block of H * W consecutive features of the Linear."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4 * 3 * 3)
        self.bn = nn.BatchNorm2d(4)
        self.up = nn.ConvTranspose2d(4, 2, 4, 2, 1)

    def forward(self, z):
        return self.up(F.relu(self.bn(self.fc(z).view(-1, 4, 3, 3))))


class BN2dToLinear(nn.Module):
    """A classifier head ``fc(bn(x).flatten(1))``: each BN channel is a block of H * W of the Linear's inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.bn(F.relu(self.conv(x))), 1))


class ConvToFewerChannels(nn.Module):
    """``conv(x).view(B, 2, 4 * H, W)``: BN channel c covers the conv's channels 4c .. 4c + 3."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        b, _, h, w = x.shape
        return F.relu(self.bn(self.conv(x).view(b, 2, 4 * (h - 2), w - 2)))


class ConvToMoreChannels(nn.Module):
    """``conv(x).view(B, 16, -1)``: one conv channel spans 4 BN channels with different statistics: no fold."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm1d(16)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x).view(x.shape[0], 16, -1)))


class LinearTransposedToBN(nn.Module):
    """``fc(z).view(-1, 3, 4).transpose(1, 2)``: the features reach the BN channels interleaved: no fold."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 12)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, z):
        return F.relu(self.bn(self.fc(z).view(-1, 3, 4).transpose(1, 2)))


@pytest.mark.parametrize("cls,shape,direction", [(LinearToBN2d, (5, 8), "backward"), (BN2dToLinear, (2, 3, 6, 6), "forward"),
                                                 (ConvToFewerChannels, (2, 3, 6, 6), "backward")])
def test_a_bn_channel_that_is_a_block_of_layer_channels_folds(cls, shape, direction):
    model = randomize_bn(cls(), seed=8).eval()
    inputs = _inputs(shape)
    folded, report = bntool.fold(model, inputs)
    [pair] = report.plan.pairs
    assert pair.direction == direction and isinstance(folded.bn, nn.Identity)
    _assert_computes_original(folded, model, inputs)


@pytest.mark.parametrize("cls,shape,fragment", [
    (ConvToMoreChannels, (2, 3, 6, 6), "does not map each channel of `conv` into one channel of the BN"),
    (LinearTransposedToBN, (5, 8), "(`transpose`) stands between")])
def test_a_reshape_that_splits_or_interleaves_channels_is_refused(cls, shape, fragment):
    model = randomize_bn(cls(), seed=8).eval()
    folded, report = bntool.fold(model, _inputs(shape))
    assert report.plan.pairs == () and fragment in report.plan.skips[0].reason, report.plan.skips[0].reason
    assert isinstance(folded.bn, nn.BatchNorm1d)


def test_forcing_the_refused_split_fold_really_breaks_it():
    """The block rule is not overcautious: folding ``ConvToMoreChannels`` anyway (with any one of the four BN channels
    a conv channel spans) changes the output."""
    model = randomize_bn(ConvToMoreChannels(), seed=8).eval()
    inputs = _inputs((2, 3, 6, 6))
    k, c = bntool.folding.arithmetic.bn_scale_shift(model.bn.running_mean, model.bn.running_var, model.bn.eps, model.bn.weight,
                                          model.bn.bias)
    broken = copy.deepcopy(model)
    weight, bias = fold_into_producer(model.conv.weight, model.conv.bias, torch.zeros(4), torch.ones(4) - model.bn.eps,
                                      model.bn.eps, k[::4].float(), c[::4].float())
    broken.conv.weight.data, broken.conv.bias.data = weight, bias
    broken.bn = nn.Identity()
    assert not bntool.compare(model, broken, inputs).passed


# ----------------------------------------------------------------------------- a forward that reads what folding changes


class ReadsConvWeight(nn.Module):
    def __init__(self, untraceable: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.untraceable = untraceable

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.untraceable and float(y.sum()) > -1e9:  # fx cannot trace this: the recorded path
            y = y * 1.0
        return y * self.conv.weight.mean()  # reads the weight folding would change


@pytest.mark.parametrize("untraceable", [False, True])
def test_a_layer_whose_weight_the_forward_also_reads_is_left(untraceable):
    model = randomize_bn(ReadsConvWeight(untraceable), seed=3).eval()
    inputs = _inputs((2, 3, 5, 5))
    folded, report = bntool.fold(model, inputs)
    assert report.plan.method == ("recorded" if untraceable else "fx") and report.plan.pairs == ()
    assert "`conv.weight` is also read by `mean`" in report.plan.skips[0].reason
    assert report.comparison.passed


class ReadsBNAttribute(nn.Module):
    """A forward that asks the BN for a Python attribute (``affine``): nothing in a traced graph shows it."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return y * 2.0 if self.bn1.affine else y


@pytest.mark.parametrize("inplace", [False, True])
def test_a_fold_that_breaks_the_forward_is_rejected_and_the_rest_is_folded(inplace):
    """Removing `bn1` makes the forward fail (`Identity` has no `affine`): that fold is blamed from where the failure
    was raised, left with the reason, and the rest is folded and verified; strict raises, nothing changed."""
    model = randomize_bn(ReadsBNAttribute(), seed=3).eval()
    inputs = _inputs((2, 3, 5, 5))
    original = copy.deepcopy(model)
    folded, report = bntool.fold(model, inputs, inplace=inplace)
    assert [p.bn for p in report.plan.pairs] == ["bn2"] and [s.bn for s in report.rejected] == ["bn1"]
    assert "failed to run (AttributeError" in report.plan.reason_for("bn1")
    assert isinstance(folded.bn1, nn.BatchNorm2d) and isinstance(folded.bn2, nn.Identity)
    _assert_computes_original(folded, original, inputs)

    strict = randomize_bn(ReadsBNAttribute(), seed=3).eval()
    before = copy.deepcopy(strict.state_dict())
    with pytest.raises(VerificationError, match="the folded model failed to run on inputs the original runs on"):
        bntool.fold(strict, inputs, inplace=inplace, strict=True)
    assert isinstance(strict.bn1, nn.BatchNorm2d) and isinstance(strict.bn2, nn.BatchNorm2d)
    assert all(torch.equal(v, before[k]) for k, v in strict.state_dict().items())


# ----------------------------------------------------------------------------- inputs that are lists / dicts of tensors


class ListOfImages(nn.Module):
    """A detection-style forward: a list of images in, a list of dicts out."""

    def __init__(self, untraceable: bool = False):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.untraceable = untraceable

    def forward(self, images, extra):
        x = torch.stack(images) * extra["scale"]
        if self.untraceable and float(x.sum()) > -1e9:
            x = x * 1.0
        return [{"features": self.bn(self.conv(x))}]


@pytest.mark.parametrize("untraceable", [False, True])
def test_inputs_nested_in_lists_and_dicts_fold_freeze_and_inspect(untraceable):
    model = randomize_bn(ListOfImages(untraceable), seed=2).eval()
    inputs = ([torch.randn(3, 8, 8), torch.randn(3, 8, 8)], {"scale": torch.tensor(1.5)})
    folded, report = bntool.fold(model, inputs)
    assert report.plan.method == ("recorded" if untraceable else "fx")
    assert [p.bn for p in report.plan.pairs] == ["bn"] and report.comparison.passed
    _assert_computes_original(folded, model, inputs)
    frozen, freeze_report = bntool.freeze(copy.deepcopy(model), example_inputs=inputs)
    assert freeze_report.check.passed
    assert [r.name for r in bntool.inspect(model, inputs).rows] == ["bn"]
    with pytest.raises(bntool.InputError, match="an example input is a list; an ONNX graph takes tensors"):
        bntool.export_onnx(model, inputs, "never-written.onnx")


class AuxHead(nn.Module):
    """torchvision Inception3 / GoogLeNet style: an auxiliary classifier that runs in train mode only."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, eps=0.001)
        self.aux_conv, self.aux_bn = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4, eps=0.001)
        self.fc, self.aux_fc = nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        out = self.fc(x.mean((2, 3)))
        if self.training:
            return out, self.aux_fc(F.relu(self.aux_bn(self.aux_conv(x))).mean((2, 3)))
        return out


def test_a_bn_only_a_training_branch_calls_is_left_and_says_so():
    model = randomize_bn(AuxHead(), seed=4).train()
    inputs = _inputs((2, 3, 6, 6))
    folded, report = bntool.fold(model, inputs)
    assert [p.bn for p in report.plan.pairs] == ["bn"]
    assert report.plan.reason_for("aux_bn") == ("is never called in the model's eval-mode forward (a training-only "
                                                "branch, or unused)")
    assert folded.training  # the copy keeps the model's mode
    _assert_computes_original(folded.eval(), model, inputs)


class BNScalarsConv(nn.Module):
    """``conv(a * bn(x) + s)`` after an activation: the BN can only fold forward, through the kept scalar steps."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn, self.conv = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 5, 1)

    def forward(self, x):
        return self.conv(self.bn(torch.relu(self.stem(x))) * -1.5 + 0.5)


def test_a_forward_fold_through_kept_scalar_steps_is_exact():
    """The reader sees ``a * x + s`` once the BN is gone, not ``x``: the fold must account for the steps that keep
    running (a wrong account is a fold verification rejects)."""
    model = randomize_bn(BNScalarsConv(), seed=6).eval()
    inputs = _inputs((2, 3, 5, 5))
    folded, report = bntool.fold(model, inputs)
    assert [(p.bn, p.into, p.direction) for p in report.plan.pairs] == [("bn", "conv", "forward")]
    assert report.rejected == () and report.comparison.passed
    _assert_computes_original(folded, model, inputs)


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
