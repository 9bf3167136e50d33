"""fold on random networks: the rules never propose a fold that verification rejects, and the result is exact;
recalibrate on them: every BN gets the exact statistics of everything it saw.

Each network is a random chain of the steps fold reasons about (conv + BN,
depthwise blocks, transposed convs, BN before a conv, scalar steps, in-place
activations, concatenations, chunks, a reshape into fewer channels, a block
held and called twice). Verification would catch a wrong plan and reject it,
so a rejection here is a rule that is too permissive or a fold computed wrong
(a forward fold through kept scalar steps was one, found this way).
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import bntool
from tests.conftest import randomize_bn

STEPS = ("conv", "conv_bn", "bn", "relu", "scalar", "cat", "dw", "convT_bn", "bn_conv", "view_bn", "reuse",
         "inplace_relu", "chunk")


class RandomChain(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        rng = random.Random(seed)
        self.channels = ch = rng.choice([2, 4, 6])
        self.steps: list[tuple[str, str, float]] = []
        self.blocks = nn.ModuleDict()
        for i in range(rng.randint(3, 10)):
            kind, name = rng.choice(STEPS), f"s{i}"
            if kind == "conv":
                self.blocks[name] = nn.Conv2d(ch, ch, 1, bias=rng.random() < 0.5)
            elif kind == "conv_bn":
                self.blocks[name] = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1, bias=rng.random() < 0.5),
                                                  nn.BatchNorm2d(ch))
            elif kind == "bn":
                self.blocks[name] = nn.BatchNorm2d(ch)
            elif kind == "dw":
                self.blocks[name] = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1, groups=ch), nn.BatchNorm2d(ch),
                                                  nn.ReLU6())
            elif kind == "convT_bn":
                self.blocks[name] = nn.Sequential(nn.ConvTranspose2d(ch, ch, 3, padding=1), nn.BatchNorm2d(ch))
            elif kind == "bn_conv":
                self.blocks[name] = nn.Sequential(nn.BatchNorm2d(ch), nn.Conv2d(ch, ch, 1))
            elif kind == "view_bn":  # conv to 2C channels, viewed as C channels of twice the height, BN
                self.blocks[name] = nn.Sequential(nn.Conv2d(ch, 2 * ch, 1), nn.BatchNorm2d(ch))
            elif kind == "cat":
                self.blocks[name] = nn.Sequential(nn.Conv2d(ch, ch // 2, 1), nn.Conv2d(ch, ch - ch // 2, 1),
                                                  nn.BatchNorm2d(ch))
            elif kind == "reuse":
                block = nn.Sequential(nn.Conv2d(ch, ch, 1), nn.BatchNorm2d(ch))
                self.blocks[name] = nn.Sequential(block, nn.ReLU(), block)
            elif kind == "inplace_relu":
                self.blocks[name] = nn.Sequential(nn.Conv2d(ch, ch, 1), nn.ReLU(inplace=True), nn.BatchNorm2d(ch))
            elif kind == "chunk":
                self.blocks[name] = nn.Sequential(nn.Conv2d(ch, 2 * ch, 1), nn.BatchNorm2d(ch))
            self.steps.append((kind, name, rng.uniform(-2, 2)))

    def forward(self, x):
        for kind, name, a in self.steps:
            block = self.blocks[name] if name in self.blocks else None
            if kind == "relu":
                x = F.relu(x)
            elif kind == "scalar":
                x = x * a + 0.5
            elif kind == "view_bn":
                y = block[0](x)
                n, c2, h, w = y.shape
                x = block[1](y.view(n, c2 // 2, 2 * h, w))[:, :, :h, :]
            elif kind == "cat":
                x = block[2](torch.cat([block[0](x), block[1](x)], 1))
            elif kind == "chunk":
                first, second = block[0](x).chunk(2, 1)
                x = block[1](first) + second
            else:
                x = block(x)
        return x


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("seed", range(40))
def test_random_chains_fold_without_a_rejected_fold(seed, inplace):
    model = randomize_bn(RandomChain(seed), seed=seed).eval()
    x = torch.randn(2, model.channels, 6, 6, generator=torch.Generator().manual_seed(seed))
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        expected = m64(x.double())
    folded, report = bntool.fold(model, example_inputs=(x,), inplace=inplace)
    assert report.rejected == (), [(s.bn, s.reason) for s in report.rejected]
    assert report.comparison.passed
    with torch.no_grad():
        torch.testing.assert_close(folded(x).double(), expected, rtol=1e-4, atol=1e-4)
    left = {s.bn for s in report.plan.skips}
    assert all(s.reason for s in report.plan.skips) and not left & {p.bn for p in report.plan.pairs}


# ----------------------------------------------------------------------------- scalar steps, BN subclasses, heads

HEAD_STEPS = ("conv_bn", "bn", "relu", "mul", "div", "rsub", "sub", "neg", "bnact", "bnact_pre", "frozen", "pool",
              "imul", "bn_pad_conv", "bn_reflect_conv")
HEADS = ("gap_linear_bn1d", "flatten_bn1d_linear", "bn_flatten_linear", "linear_view_bn")


class RandomWithHead(nn.Module):
    """Scalar steps of every sign and form, timm's BatchNormAct2d (after or before a conv), torchvision's frozen BN,
    BNs before padded convs, and a classifier or generator head with a reshape on either side of a BN."""

    def __init__(self, seed: int):
        super().__init__()
        from examples.archs import BatchNormAct2d, TorchvisionFrozenBatchNorm2d

        rng = random.Random(seed)
        self.channels = ch = rng.choice([2, 3, 4])
        self.steps: list[tuple[str, str, float]] = []
        self.blocks = nn.ModuleDict()
        for i in range(rng.randint(2, 7)):
            kind, name = rng.choice(HEAD_STEPS), f"s{i}"
            if kind == "conv_bn":
                self.blocks[name] = nn.Sequential(nn.Conv2d(ch, ch, 1, bias=rng.random() < 0.5), nn.BatchNorm2d(ch))
            elif kind == "bn":
                self.blocks[name] = nn.BatchNorm2d(ch)
            elif kind == "bnact":
                act = rng.choice([nn.ReLU, nn.SiLU, nn.Identity])
                self.blocks[name] = nn.Sequential(nn.Conv2d(ch, ch, 1), BatchNormAct2d(ch, act_layer=act))
            elif kind == "bnact_pre":
                self.blocks[name] = nn.Sequential(BatchNormAct2d(ch), nn.Conv2d(ch, ch, 1))
            elif kind == "frozen":
                self.blocks[name] = nn.Sequential(nn.Conv2d(ch, ch, 1), TorchvisionFrozenBatchNorm2d(ch))
            elif kind == "bn_pad_conv":
                self.blocks[name] = nn.Sequential(nn.BatchNorm2d(ch), nn.Conv2d(ch, ch, 3, padding=1))
            elif kind == "bn_reflect_conv":
                self.blocks[name] = nn.Sequential(nn.BatchNorm2d(ch), nn.Conv2d(ch, ch, 3, padding=1,
                                                                                padding_mode="reflect"))
            self.steps.append((kind, name, rng.choice([-2.0, -0.5, 0.5, 1.5, 3.0])))
        self.head = rng.choice(HEADS)
        if self.head == "gap_linear_bn1d":
            self.h = nn.Sequential(nn.Linear(ch, 5), nn.BatchNorm1d(5))
        elif self.head == "flatten_bn1d_linear":  # BN1d over C*H*W features: finer than any conv channel
            self.h = nn.Sequential(nn.BatchNorm1d(ch * 16), nn.Linear(ch * 16, 3))
        elif self.head == "bn_flatten_linear":
            self.h = nn.Sequential(nn.BatchNorm2d(ch), nn.Linear(ch * 16, 3))
        else:
            self.h = nn.Sequential(nn.Linear(ch * 16, 2 * 9), nn.BatchNorm2d(2))

    def forward(self, x):
        for kind, name, a in self.steps:
            if kind == "relu":
                x = F.relu(x)
            elif kind == "mul":
                x = x * a
            elif kind == "div":
                x = x / a
            elif kind == "rsub":
                x = a - x
            elif kind == "sub":
                x = x - a
            elif kind == "neg":
                x = -x
            elif kind == "imul":
                x = x.clone()
                x.mul_(a)
            elif kind == "pool":
                x = F.avg_pool2d(x, 1)
            else:
                x = self.blocks[name](x)
        if self.head == "gap_linear_bn1d":
            return self.h(x.mean((2, 3)))
        if self.head == "flatten_bn1d_linear":
            return self.h[1](F.relu(self.h[0](x.flatten(1))))
        if self.head == "bn_flatten_linear":
            return self.h[1](self.h[0](F.relu(x)).flatten(1))
        return F.relu(self.h[1](self.h[0](x.flatten(1)).view(x.shape[0], 2, 3, 3)))


@pytest.mark.parametrize("seed", range(40))
def test_random_networks_with_heads_fold_without_a_rejected_fold(seed):
    model = randomize_bn(RandomWithHead(seed), seed=seed).eval()
    x = torch.randn(3, model.channels, 4, 4, generator=torch.Generator().manual_seed(seed))
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        expected = m64(x.double())
    folded, report = bntool.fold(model, example_inputs=(x,))
    assert report.rejected == (), [(s.bn, s.reason) for s in report.rejected]
    with torch.no_grad():
        torch.testing.assert_close(folded(x).double(), expected, rtol=1e-4, atol=1e-4)


class _Untraceable(nn.Module):
    """A data-dependent branch first, so fx cannot trace: the dataflow comes from a recorded forward pass."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.channels = inner, inner.channels

    def forward(self, x):
        if float(x.sum()) > -1e9:
            x = x * 1.0
        return self.inner(x)


@pytest.mark.parametrize("family", ["chain", "head"])
@pytest.mark.parametrize("seed", range(20))
def test_random_networks_fold_the_same_from_a_recorded_forward_pass(seed, family):
    inner, size = (RandomChain(seed), 6) if family == "chain" else (RandomWithHead(seed), 4)
    model = randomize_bn(_Untraceable(inner), seed=seed).eval()
    x = torch.randn(3, model.channels, size, size, generator=torch.Generator().manual_seed(seed))
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        expected = m64(x.double())
    folded, report = bntool.fold(model, example_inputs=(x,))
    assert report.plan.method == "recorded"
    assert report.rejected == (), [(s.bn, s.reason) for s in report.rejected]
    with torch.no_grad():
        torch.testing.assert_close(folded(x).double(), expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- recalibrate on the same networks


@pytest.mark.parametrize("seed", range(24))
def test_random_networks_recalibrate_to_the_exact_statistics_of_every_call(seed):
    """Each BN's new statistics are the mean and unbiased variance of everything it saw in the pass (every call of
    a reused block included), with the BNs normalizing by batch statistics as in the pass."""
    import collections

    model = randomize_bn(RandomChain(seed), seed=seed).eval()
    batches = [torch.randn(4, model.channels, 6, 6, generator=torch.Generator().manual_seed(10 * seed + i))
               for i in range(3)]
    twin = copy.deepcopy(model)
    seen: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
    for name, bn in twin.named_modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.train()
            bn.register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0].detach().double()))
    with torch.no_grad():
        for batch in batches:
            twin(batch)
    assert seen
    bntool.recalibrate(model, batches)
    for name, inputs in seen.items():
        values = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in inputs], 1)
        bn = model.get_submodule(name)
        torch.testing.assert_close(bn.running_mean.double(), values.mean(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), values.var(1, unbiased=True), rtol=1e-5, atol=1e-5)
