"""The models and helpers of the fold tests (``tests/test_fold_*.py``): small networks built to have one
pattern each, the producer kinds, the unsafe and recomputed cases, and the checks they share."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn import functional as F

import bntool

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


def random_inputs(shape, seed=0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5,)


def oracle(model, inputs):
    """The original model's eval output, computed in float64."""
    from torch.utils._pytree import tree_map_only

    m64 = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        return m64(*tree_map_only(torch.Tensor, lambda t: t.double() if t.is_floating_point() else t, tuple(inputs)))


def assert_computes_original(folded, original, inputs):
    """``folded`` (eval mode) matches ``original``'s float64 eval output (every tensor of a nested output)."""
    from torch.utils._pytree import tree_leaves

    with torch.no_grad():
        got = [t.double() for t in tree_leaves(folded(*inputs))]
    expected = tree_leaves(oracle(original, inputs))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


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


def assert_left_as_it_was(model: nn.Module, folded: nn.Module, inputs) -> None:
    """Nothing was folded, so what matters is that nothing changed (``comparison.passed`` compares the model with
    an untouched copy of itself: it cannot fail here). Catches the model itself handed back instead of a copy, a
    module swapped for one that computes the same (a skipped BN made an identity anyway), and a tensor changed
    where the outputs do not show it (a BN's statistics rewritten, ``num_batches_tracked``)."""
    assert folded is not model
    before, after = model.state_dict(), folded.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert [type(m) for m in folded.modules()] == [type(m) for m in model.modules()]
    with torch.no_grad():
        assert torch.equal(folded(*inputs), model(*inputs))


class Rescale(nn.Module):
    def forward(self, t):
        return 2.0 * t


RECOMPUTED = {  # a layer whose weight / bias is computed at each call: a folded value written there is never used
    "weight_norm": lambda conv: nn.utils.parametrizations.weight_norm(conv),
    "spectral_norm": lambda conv: nn.utils.parametrizations.spectral_norm(conv),
    "old-style weight_norm (pre-hook)": lambda conv: nn.utils.weight_norm(conv),
    "old-style spectral_norm (pre-hook)": lambda conv: nn.utils.spectral_norm(conv),
    "parametrized bias": lambda conv: nn.utils.parametrize.register_parametrization(conv, "bias", Rescale()),
}


class BNReLU(nn.BatchNorm2d):
    """A BN subclass that also applies an activation: folding must keep the ReLU."""

    def forward(self, x):
        return F.relu(super().forward(x))


class BNPReLU(nn.BatchNorm2d):
    """A BN subclass whose activation has a parameter of its own."""

    def __init__(self, channels):
        super().__init__(channels)
        self.act = nn.PReLU(channels)

    def forward(self, x):
        return self.act(super().forward(x))


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


def counting_traces(monkeypatch) -> list:
    traced = []
    real_trace = bntool.folding.bnform_trace.trace
    monkeypatch.setattr(bntool.folding.bnform_trace, "trace", lambda m, rank: traced.append(m) or real_trace(m, rank))
    return traced


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


class MaskedBN(nn.BatchNorm2d):
    """A BN + ReLU whose channel mask is a bool buffer read into Python."""

    def __init__(self, channels):
        super().__init__(channels)
        self.register_buffer("mask", torch.ones(channels, dtype=torch.bool))

    def forward(self, x):
        y = torch.relu(super().forward(x))
        return y * torch.tensor(self.mask.tolist(), dtype=y.dtype).view(1, -1, 1, 1)


class UntraceableBNReLU(nn.BatchNorm2d):
    """A BN subclass whose forward fx cannot trace: it keeps running with identity statistics."""

    def forward(self, x):
        y = super().forward(x)
        return F.relu(y) if float(y.abs().sum()) >= 0 else y  # data-dependent: fx cannot trace this


def corrupt_nth_fold(monkeypatch, n: int) -> list:
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


def zoo_inputs(model):
    from bntool.runtime.shapes import make_inputs

    return make_inputs(model)


class Aliased(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.alias = self.bn  # the same module under a second name, never called through it

    def forward(self, x):
        return self.bn(self.conv(x))


def reused_block():
    """``Sequential(stem, conv, bn, relu, conv, bn)`` with the same conv and BN objects at both places."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
    return nn.Sequential(nn.Conv2d(3, 4, 1), conv, bn, nn.ReLU(), conv, bn)


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


class ReadsBNAttribute(nn.Module):
    """A forward that asks the BN for a Python attribute (``affine``): nothing in a traced graph shows it."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return y * 2.0 if self.bn1.affine else y


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


class BNScalarsConv(nn.Module):
    """``conv(a * bn(x) + s)`` after an activation: the BN can only fold forward, through the kept scalar steps."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn, self.conv = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 5, 1)

    def forward(self, x):
        return self.conv(self.bn(torch.relu(self.stem(x))) * -1.5 + 0.5)
