"""Example model zoo for bntool.

Every public factory returns an ``nn.Module`` carrying an ``input_shape``
attribute: a shape tuple, or a tuple of shape tuples for multi-input models.
Tools use it to build a verification input, e.g.::

    bntool fold ckpt.pth --model examples/models.py:lenet

All models are plain PyTorch (no torchvision/timm) and CPU-fast at their
``input_shape``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from bntool.norms import is_batchnorm, num_features

__all__ = [
    "lenet",
    "resnet_small",
    "resnet50",
    "wide_resnet",
    "mobilenet_v2",
    "mlp_bn",
    "conv1d_net",
    "conv3d_net",
    "convtranspose_net",
    "two_io_net",
    "untraceable_net",
    "dropout_net",
    "randomize_bn_",
    "train_a_few_steps_",
]


def _with_shape(model: nn.Module, input_shape) -> nn.Module:
    model.input_shape = input_shape
    return model


# --------------------------------------------------------------------- LeNet
def lenet(num_classes: int = 10) -> nn.Sequential:
    """LeNet-5 with BatchNorm, as in d2l.ai (chapter "Batch Normalization").

    Input: 1x28x28 images. Layer names are ``0`` .. ``16``. ``input_shape`` uses
    batch 2 because BatchNorm1d cannot run in train mode on a single sample.
    """
    net = nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5), nn.BatchNorm2d(6), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5), nn.BatchNorm2d(16), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2), nn.Flatten(),
        nn.Linear(16 * 4 * 4, 120), nn.BatchNorm1d(120), nn.Sigmoid(),
        nn.Linear(120, 84), nn.BatchNorm1d(84), nn.Sigmoid(),
        nn.Linear(84, num_classes),
    )
    return _with_shape(net, (2, 1, 28, 28))


# -------------------------------------------------------------------- ResNet
def conv_bn(in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1,
            groups: int = 1, act: Callable[[], nn.Module] | None = nn.ReLU) -> nn.Sequential:
    """Conv2d(bias=False) -> BatchNorm2d [-> activation], named ``0``, ``1``, ``2``."""
    layers = [nn.Conv2d(in_ch, out_ch, kernel_size, stride, (kernel_size - 1) // 2,
                        groups=groups, bias=False),
              nn.BatchNorm2d(out_ch)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """conv3x3-bn-relu-conv3x3-bn + shortcut, then relu (ResNet-18/34 block)."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (stride here, as torchvision v1.5) -> 1x1 expand (x4)."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Generic ResNet with torchvision-compatible parameter names.

    ``layers[i]`` blocks of width ``widths[i]`` form stage ``layer{i+1}``; every
    stage but the first halves the resolution. ``small_stem`` swaps the
    7x7/2 conv + maxpool stem for a 3x3/1 conv (for 32x32 inputs).
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int],
                 widths: Sequence[int] = (64, 128, 256, 512), num_classes: int = 1000,
                 in_channels: int = 3, small_stem: bool = False):
        super().__init__()
        stem_ch = widths[0]
        if small_stem:
            self.conv1 = nn.Conv2d(in_channels, stem_ch, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, stem_ch, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(stem_ch)
        self.relu = nn.ReLU(inplace=True)

        in_ch = stem_ch
        for i, (width, blocks) in enumerate(zip(widths, layers)):
            stage, in_ch = self._make_stage(block, in_ch, width, blocks, 1 if i == 0 else 2)
            setattr(self, f"layer{i + 1}", stage)
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_ch, num_classes)

    @staticmethod
    def _make_stage(block, in_ch: int, width: int, blocks: int, stride: int):
        out_ch = width * block.expansion
        downsample = None
        if stride != 1 or in_ch != out_ch:
            downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False),
                                       nn.BatchNorm2d(out_ch))
        layers = [block(in_ch, width, stride, downsample)]
        layers += [block(out_ch, width) for _ in range(blocks - 1)]
        return nn.Sequential(*layers), out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet_small(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """CIFAR-style ResNet: 3x3 stem + 3 stages of BasicBlocks (widths 16/32/64)."""
    model = ResNet(BasicBlock, [2, 1, 1], widths=(16, 32, 64), num_classes=num_classes,
                   in_channels=in_channels, small_stem=True)
    return _with_shape(model, (1, in_channels, 32, 32))


def resnet50(num_classes: int = 1000) -> ResNet:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3]); state-dict compatible with torchvision."""
    return _with_shape(ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes),
                       (1, 3, 224, 224))


def wide_resnet(width: int = 304, num_classes: int = 1000) -> ResNet:
    """A wide ResNet-18 (BasicBlock, [2, 2, 2, 2], widths ``width`` x 1/2/4/8, 3x3 stem) for memory benchmarks.

    Nearly all of it is weights: at the default width 304 it holds 254 M
    float32 parameters (about 1 GB), while its activations at ``input_shape``
    (1x3x16x16, the last stage at 2x2) are a few MB. Builds in about a second.
    """
    model = ResNet(BasicBlock, [2, 2, 2, 2], widths=(width, 2 * width, 4 * width, 8 * width),
                   num_classes=num_classes, small_stem=True)
    return _with_shape(model, (1, 3, 16, 16))


# --------------------------------------------------------------- MobileNetV2
def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class InvertedResidual(nn.Module):
    """[1x1 expand-bn-relu6] -> 3x3 depthwise-bn-relu6 -> 1x1 project-bn (+ x)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(in_ch * expand_ratio))
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn(in_ch, hidden, 1, act=nn.ReLU6))
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                   nn.Conv2d(hidden, out_ch, 1, bias=False),
                   nn.BatchNorm2d(out_ch)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 with torchvision's layout (``features``, ``classifier``)."""

    # expansion t, channels c, repeats n, first stride s
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0):
        super().__init__()
        in_ch = _make_divisible(32 * width_mult)
        last_ch = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [conv_bn(3, in_ch, 3, 2, act=nn.ReLU6)]
        for t, c, n, s in self.settings:
            out_ch = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        features.append(conv_bn(in_ch, last_ch, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last_ch, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0) -> MobileNetV2:
    """MobileNetV2 (~3.5M params at width 1.0); input 3x224x224."""
    return _with_shape(MobileNetV2(num_classes, width_mult), (1, 3, 224, 224))


# ------------------------------------------------------------ small networks
def mlp_bn(in_features: int = 32, hidden: int = 64, num_classes: int = 10) -> nn.Sequential:
    """(Linear -> BatchNorm1d -> ReLU) x 2 -> Linear; input (8, in_features)."""
    net = nn.Sequential(
        nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
    return _with_shape(net, (8, in_features))


def conv1d_net(in_channels: int = 4, num_classes: int = 10) -> nn.Sequential:
    """Two Conv1d -> BatchNorm1d -> ReLU blocks + linear head; input (2, 4, 64)."""
    net = nn.Sequential(
        nn.Conv1d(in_channels, 8, 3, padding=1, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Conv1d(8, 16, 5, stride=2, padding=2), nn.BatchNorm1d(16), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )
    return _with_shape(net, (2, in_channels, 64))


def conv3d_net(in_channels: int = 3, num_classes: int = 10) -> nn.Sequential:
    """Two Conv3d -> BatchNorm3d -> ReLU blocks + linear head; input (2, 3, 8, 16, 16)."""
    net = nn.Sequential(
        nn.Conv3d(in_channels, 8, 3, padding=1, bias=False), nn.BatchNorm3d(8), nn.ReLU(),
        nn.Conv3d(8, 16, 3, stride=2, padding=1), nn.BatchNorm3d(16), nn.ReLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )
    return _with_shape(net, (2, in_channels, 8, 16, 16))


def convtranspose_net(dims: int = 2, groups: int = 1) -> nn.Sequential:
    """Small decoder of ConvTranspose{1,2,3}d -> BatchNorm layers (doubles resolution twice).

    The middle transposed conv uses ``groups`` (must divide 16). Input is
    ``(2, 8) + (4,) * dims``; output ``(2, 3) + (16,) * dims``.
    """
    if dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
    convt = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 1]
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
    net = nn.Sequential(
        convt(8, 16, 3, stride=2, padding=1, output_padding=1, bias=False), bn(16), nn.ReLU(),
        convt(16, 16, 3, stride=1, padding=1, groups=groups), bn(16), nn.ReLU(),
        convt(16, 3, 4, stride=2, padding=1), bn(3),
    )
    return _with_shape(net, (2, 8) + (4,) * dims)


class TwoIONet(nn.Module):
    """Two inputs, dict output: conv branch on an image, BN-MLP branch on features."""

    input_shape = ((2, 3, 16, 16), (2, 8))

    def __init__(self, num_classes: int = 10, embed_dim: int = 16):
        super().__init__()
        self.image_branch = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, embed_dim),
        )
        self.feature_branch = nn.Sequential(
            nn.Linear(8, embed_dim), nn.BatchNorm1d(embed_dim), nn.ReLU(),
        )
        self.head = nn.Linear(2 * embed_dim, num_classes)

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> dict[str, torch.Tensor]:
        embedding = self.feature_branch(features)
        logits = self.head(torch.cat([self.image_branch(image), embedding], dim=1))
        return {"logits": logits, "embedding": embedding}


def two_io_net() -> TwoIONet:
    """``forward(image, features) -> {"logits", "embedding"}``."""
    return TwoIONet()


class UntraceableNet(nn.Module):
    """Conv/BN net whose branch depends on the data: ``torch.fx`` cannot trace it.

    Deterministic for a given input; every conv is followed by a foldable BN.
    """

    input_shape = (2, 3, 16, 16)

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.branch_pos = conv_bn(8, 8)
        self.branch_neg = conv_bn(8, 8, kernel_size=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if x.mean() > 0.5:  # data-dependent control flow
            x = self.branch_pos(x)
        else:
            x = self.branch_neg(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def untraceable_net() -> UntraceableNet:
    """Conv+BN net with data-dependent Python control flow (not fx-traceable)."""
    return UntraceableNet()


def dropout_net(num_classes: int = 10, p: float = 0.5) -> nn.Sequential:
    """Conv/BN blocks separated by ``nn.Dropout``; input (2, 3, 16, 16)."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(p),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(p),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )
    return _with_shape(net, (2, 3, 16, 16))


# ------------------------------------------------------------------- helpers
@torch.no_grad()
def randomize_bn_(model: nn.Module, seed: int = 0, *, signed: bool = True) -> nn.Module:
    """Give every BatchNorm non-default statistics and affine parameters, in place; returns ``model``.

    The one BN randomizer of the tests and benchmarks (never check a BN in its
    initial state). Every BN bntool recognises (torch's, bntool's frozen ones,
    other libraries'): running_mean ~ 2 N(0, 1), running_var ~ U(0.1, 3),
    weight ~ U(0.5, 1.5) with about 30% of the signs flipped (all positive
    with ``signed=False``), bias ~ N(0, 1), num_batches_tracked = 100. Tensors
    that a BN lacks (``affine=False``, ``track_running_stats=False``) are skipped.
    """
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if not is_batchnorm(module):
            continue
        n = num_features(module)
        if getattr(module, "running_mean", None) is not None:
            module.running_mean.copy_(torch.randn(n, generator=gen) * 2)
            module.running_var.copy_(torch.rand(n, generator=gen) * 2.9 + 0.1)
            if getattr(module, "num_batches_tracked", None) is not None:
                module.num_batches_tracked.fill_(100)
        if getattr(module, "weight", None) is not None:
            gamma = torch.rand(n, generator=gen) + 0.5
            if signed:
                gamma = gamma * torch.where(torch.rand(n, generator=gen) < 0.3, -1.0, 1.0)
            module.weight.copy_(gamma)
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(torch.randn(n, generator=gen))
    return model


def _shapes(model: nn.Module) -> tuple[tuple[int, ...], ...]:
    shape = model.input_shape
    return tuple(shape) if isinstance(shape[0], (tuple, list)) else (tuple(shape),)


def _loss(output) -> torch.Tensor:
    """Scalar loss from a tensor, a sequence or a dict of tensors."""
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return sum(_loss(o) for o in output)
    return output.float().square().mean()


def train_a_few_steps_(model: nn.Module, steps: int = 5, seed: int = 0,
                       batch_size: int | None = None, lr: float = 0.01) -> nn.Module:
    """Run ``steps`` train-mode SGD steps on random inputs of ``model.input_shape``.

    This gives BatchNorm layers real (non-default) running statistics. The batch
    is ``max(4, input_shape[0])`` unless given. Returns the model in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)
    shapes = _shapes(model)
    batch = batch_size or max(4, shapes[0][0])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9) if params else None
    model.train()
    for _ in range(steps):
        inputs = [torch.randn((batch, *s[1:]), generator=gen) for s in shapes]
        loss = _loss(model(*inputs))
        if opt is not None:
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()
