"""Look-alikes of the architectures people deploy, for ``bntool fold``.

torchvision, timm, detectron2 and mmcv are not dependencies of bntool, so the
parts of them that decide what folding can do are rewritten here in plain
PyTorch: the same module structure and attribute names (so checkpoints have
the same keys), the same forward arithmetic, and the same quirks (timm's
``BatchNormAct2d`` copying ``BatchNorm2d.forward`` and then running a drop
layer and an activation; torchvision's ``FrozenBatchNorm2d`` computing
``x * scale + bias`` from buffers; detectron2 putting the norm inside its
``Conv2d``; pre-activation blocks normalizing a tensor that the shortcut also
reads). Widths and depths are small so that every model runs in milliseconds
on a CPU at its ``input_shape``; the factories take width / depth arguments
for benchmarks at full size.

Every public factory returns an ``nn.Module`` with ``input_shape`` set, as in
``examples/models.py``::

    bntool fold ckpt.pth --model examples/archs.py:efficientnet_like
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    # BN-like modules
    "BatchNormAct2d",
    "FrozenBatchNormAct2d",
    "TorchvisionFrozenBatchNorm2d",
    "Detectron2FrozenBatchNorm2d",
    "freeze_batch_norm_2d",
    # networks
    "efficientnet_like",
    "mobilenetv2_like",
    "bn_act_net",
    "regnet_like",
    "resnetv2_like",
    "densenet_like",
    "dpn_like",
    "repvgg_like",
    "mobileone_like",
    "levit_like",
    "torchvision_frozen_resnet",
    "detectron2_frozen_resnet",
    "conv_detectron2_frozen_bn",
    "timm_frozen_efficientnet",
    "mmcv_fuse_conv_bn_model",
    "bn_linear_bn",
    "quant_fusion_with_bias",
    "quant_linear_bn",
    "quant_conv_transpose_bn",
    "linear_bn1d_one_channel",
    "dcgan_generator",
    "yolov8_like",
    "dbb_net",
    "dcgan_discriminator",
    "block_called_twice",
    "bn_shared_by_two_convs",
    "scalar_ops_between",
    "keyword_bn_call",
    "single_bn",
    "bn_act_without_bias",
    "bn_act_without_weight",
]


def _with_shape(model: nn.Module, input_shape) -> nn.Module:
    model.input_shape = input_shape
    return model


# ============================================================================ timm.layers


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """timm's channel rounding (``timm.layers.helpers``)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def create_conv2d(in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, dilation: int = 1, groups: int = 1,
                  padding: int | str = "", bias: bool = False) -> nn.Conv2d:
    """timm's ``create_conv2d`` for the default ``''`` padding: symmetric PyTorch padding, no bias."""
    if padding == "":
        padding = ((stride - 1) + dilation * (kernel_size - 1)) // 2
    return nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=padding, dilation=dilation, groups=groups,
                     bias=bias)


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True):
    """timm's stochastic depth: an identity in eval mode."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)


def _create_act(act_layer, act_kwargs=None, inplace=False, apply_act=True) -> nn.Module:
    act_kwargs = act_kwargs or {}
    if act_layer is not None and apply_act:
        if inplace:
            act_kwargs["inplace"] = inplace
        return act_layer(**act_kwargs)
    return nn.Identity()


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's ``BatchNorm + Activation`` (``timm.layers.norm_act``).

    A ``BatchNorm2d`` subclass (so checkpoints of separate BN + act load into
    it) whose forward is a copy of ``BatchNorm2d.forward`` ending in
    ``F.batch_norm``, followed by ``self.drop`` and ``self.act``.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, apply_act=True,
                 act_layer=nn.ReLU, act_kwargs=None, inplace=True, drop_layer=None, device=None, dtype=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = _create_act(act_layer, act_kwargs=act_kwargs, inplace=inplace, apply_act=apply_act)

    def forward(self, x):
        # cut & paste of torch.nn.BatchNorm2d.forward impl to avoid issues with torchscript and tracing
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")

        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum

        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # use cumulative moving average
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:  # use exponential moving average
                    exponential_average_factor = self.momentum

        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)

        x = F.batch_norm(
            x,
            # If buffers are not to be tracked, ensure that they won't be updated
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )
        x = self.drop(x)
        x = self.act(x)
        return x


class _FrozenBatchNormBase(nn.Module):
    """What torchvision's and timm's frozen BNs share (each library repeats it in its own class).

    Four buffers, an eps, ``num_batches_tracked`` dropped from a loaded
    BatchNorm checkpoint, and the per-channel scale and shift computed with
    the reshapes first "to make it fuser-friendly".
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        num_batches_tracked_key = prefix + "num_batches_tracked"
        if num_batches_tracked_key in state_dict:
            del state_dict[num_batches_tracked_key]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _scale_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return scale, bias


class TorchvisionFrozenBatchNorm2d(_FrozenBatchNormBase):
    """``torchvision.ops.misc.FrozenBatchNorm2d`` (timm's ``FrozenBatchNorm2d`` is this very class).

    Buffers only; ``x * scale + bias`` with eps added to ``running_var`` before ``rsqrt``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, bias = self._scale_and_bias()
        return x * scale + bias

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.weight.shape[0]}, eps={self.eps})"


class FrozenBatchNormAct2d(_FrozenBatchNormBase):
    """timm's ``FrozenBatchNormAct2d``: torchvision's frozen arithmetic, then ``self.act(self.drop(x))``."""

    def __init__(self, num_features: int, eps: float = 1e-5, apply_act=True, act_layer=nn.ReLU, act_kwargs=None,
                 inplace=True, drop_layer=None):
        super().__init__(num_features, eps)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = _create_act(act_layer, act_kwargs=act_kwargs, inplace=inplace, apply_act=apply_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, bias = self._scale_and_bias()
        x = x * scale + bias
        x = self.act(self.drop(x))
        return x

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.weight.shape[0]}, eps={self.eps}, act={self.act})"


def freeze_batch_norm_2d(module: nn.Module) -> nn.Module:
    """timm's converter: ``BatchNormAct2d`` -> ``FrozenBatchNormAct2d``, ``BatchNorm2d`` -> torchvision's frozen BN.

    As in timm, the frozen modules also get ``num_features`` and ``affine``
    attributes, and share the running statistics' storage with the original.
    """
    if isinstance(module, BatchNormAct2d):
        res = _frozen_copy(FrozenBatchNormAct2d(module.num_features), module)
        res.drop = module.drop
        res.act = module.act
        return res
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        return _frozen_copy(TorchvisionFrozenBatchNorm2d(module.num_features), module)
    for name, child in module.named_children():
        new_child = freeze_batch_norm_2d(child)
        if new_child is not child:
            module.add_module(name, new_child)
    return module


def _frozen_copy(res: nn.Module, module: nn.Module) -> nn.Module:
    res.num_features = module.num_features
    res.affine = module.affine
    if module.affine:
        res.weight.data = module.weight.data.clone().detach()
        res.bias.data = module.bias.data.clone().detach()
    res.running_mean.data = module.running_mean.data
    res.running_var.data = module.running_var.data
    res.eps = module.eps
    return res


class ConvNormAct(nn.Module):
    """timm's ``ConvNormAct``: ``conv`` then ``bn`` (a ``BatchNormAct2d``)."""

    def __init__(self, in_channels, out_channels, kernel_size=1, stride=1, padding="", dilation=1, groups=1,
                 bias=False, apply_act=True, norm_layer=BatchNormAct2d, act_layer=nn.ReLU, drop_layer=None):
        super().__init__()
        self.conv = create_conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                  dilation=dilation, groups=groups, bias=bias)
        kwargs = {"drop_layer": drop_layer} if drop_layer else {}
        self.bn = norm_layer(out_channels, apply_act=apply_act, act_layer=act_layer, **kwargs)

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x)
        aa = getattr(self, "aa", None)
        if aa is not None:
            x = self.aa(x)
        return x


class SEModule(nn.Module):
    """timm's ``SEModule`` (``timm.layers.squeeze_excite``), used by RegNetY."""

    def __init__(self, channels, rd_ratio=1 / 16, rd_channels=None, rd_divisor=8, add_maxpool=False, bias=True,
                 act_layer=nn.ReLU, norm_layer=None, gate_layer=nn.Sigmoid):
        super().__init__()
        self.add_maxpool = add_maxpool
        if not rd_channels:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=bias)
        self.bn = norm_layer(rd_channels) if norm_layer else nn.Identity()
        self.act = act_layer(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=bias)
        self.gate = gate_layer()

    def forward(self, x):
        x_se = x.mean((2, 3), keepdim=True)
        if self.add_maxpool:
            x_se = 0.5 * x_se + 0.5 * x.amax((2, 3), keepdim=True)
        x_se = self.fc1(x_se)
        x_se = self.act(self.bn(x_se))
        x_se = self.fc2(x_se)
        return x * self.gate(x_se)


class ClassifierHead(nn.Module):
    """timm's ``ClassifierHead``: average pool, flatten, (dropout), linear."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.global_pool = nn.Sequential(OrderedDict([("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten(1))]))
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.fc(self.drop(self.global_pool(x)))


# ============================================================================ timm efficientnet / mobilenetv2


class SqueezeExcite(nn.Module):
    """``timm.models._efficientnet_blocks.SqueezeExcite``."""

    def __init__(self, in_chs, rd_ratio=0.25, rd_channels=None, act_layer=nn.ReLU, gate_layer=nn.Sigmoid,
                 force_act_layer=None, rd_round_fn=None):
        super().__init__()
        if rd_channels is None:
            rd_round_fn = rd_round_fn or round
            rd_channels = rd_round_fn(in_chs * rd_ratio)
        act_layer = force_act_layer or act_layer
        self.conv_reduce = nn.Conv2d(in_chs, rd_channels, 1, bias=True)
        self.act1 = act_layer(inplace=True)
        self.conv_expand = nn.Conv2d(rd_channels, in_chs, 1, bias=True)
        self.gate = gate_layer()

    def forward(self, x):
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.conv_reduce(x_se)
        x_se = self.act1(x_se)
        x_se = self.conv_expand(x_se)
        return x * self.gate(x_se)


class DepthwiseSeparableConv(nn.Module):
    """timm's DS block: ``conv_dw`` -> ``bn1`` (+act) -> ``se`` -> ``conv_pw`` -> ``bn2`` (no act), skip."""

    def __init__(self, in_chs, out_chs, dw_kernel_size=3, stride=1, noskip=False, pw_act=False, act_layer=nn.ReLU,
                 se_layer=None, drop_path_rate=0.0):
        super().__init__()
        norm_act_layer = partial(BatchNormAct2d, act_layer=act_layer)
        self.has_skip = (stride == 1 and in_chs == out_chs) and not noskip
        self.has_pw_act = pw_act
        self.conv_dw = create_conv2d(in_chs, in_chs, dw_kernel_size, stride=stride, groups=in_chs)
        self.bn1 = norm_act_layer(in_chs, inplace=True)
        self.aa = nn.Identity()
        self.se = se_layer(in_chs, act_layer=act_layer) if se_layer else nn.Identity()
        self.conv_pw = create_conv2d(in_chs, out_chs, 1)
        self.bn2 = norm_act_layer(out_chs, inplace=True, apply_act=self.has_pw_act)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate else nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x)
        x = self.bn1(x)
        x = self.aa(x)
        x = self.se(x)
        x = self.conv_pw(x)
        x = self.bn2(x)
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class InvertedResidual(nn.Module):
    """timm's MBConv: ``conv_pw``/``bn1`` -> ``conv_dw``/``bn2`` -> ``se`` -> ``conv_pwl``/``bn3`` (no act), skip."""

    def __init__(self, in_chs, out_chs, dw_kernel_size=3, stride=1, noskip=False, exp_ratio=1.0, act_layer=nn.ReLU,
                 se_layer=None, drop_path_rate=0.0):
        super().__init__()
        norm_act_layer = partial(BatchNormAct2d, act_layer=act_layer)
        self.has_skip = (in_chs == out_chs and stride == 1) and not noskip
        mid_chs = make_divisible(in_chs * exp_ratio)
        # Point-wise expansion
        self.conv_pw = create_conv2d(in_chs, mid_chs, 1)
        self.bn1 = norm_act_layer(mid_chs, inplace=True)
        # Depth-wise convolution
        self.conv_dw = create_conv2d(mid_chs, mid_chs, dw_kernel_size, stride=stride, groups=mid_chs)
        self.bn2 = norm_act_layer(mid_chs, inplace=True)
        self.aa = nn.Identity()
        # Squeeze-and-excitation
        self.se = se_layer(mid_chs, act_layer=act_layer) if se_layer else nn.Identity()
        # Point-wise linear projection
        self.conv_pwl = create_conv2d(mid_chs, out_chs, 1)
        self.bn3 = norm_act_layer(out_chs, apply_act=False)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate else nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv_pw(x)
        x = self.bn1(x)
        x = self.conv_dw(x)
        x = self.bn2(x)
        x = self.aa(x)
        x = self.se(x)
        x = self.conv_pwl(x)
        x = self.bn3(x)
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


#: timm arch definitions, decoded: (block, repeats, kernel, stride, expansion, channels, se ratio)
EFFICIENTNET_B0 = (("ds", 1, 3, 1, 1, 16, 0.25), ("ir", 2, 3, 2, 6, 24, 0.25), ("ir", 2, 5, 2, 6, 40, 0.25),
                   ("ir", 3, 3, 2, 6, 80, 0.25), ("ir", 3, 5, 1, 6, 112, 0.25), ("ir", 4, 5, 2, 6, 192, 0.25),
                   ("ir", 1, 3, 1, 6, 320, 0.25))
MOBILENETV2_100 = (("ds", 1, 3, 1, 1, 16, 0.0), ("ir", 2, 3, 2, 6, 24, 0.0), ("ir", 3, 3, 2, 6, 32, 0.0),
                   ("ir", 4, 3, 2, 6, 64, 0.0), ("ir", 3, 3, 1, 6, 96, 0.0), ("ir", 3, 3, 2, 6, 160, 0.0),
                   ("ir", 1, 3, 1, 6, 320, 0.0))


class EfficientNet(nn.Module):
    """timm's ``EfficientNet``: ``conv_stem``/``bn1`` -> ``blocks`` (stages of DS / IR blocks) -> ``conv_head``/``bn2``."""

    def __init__(self, arch_def, num_classes=1000, stem_size=32, num_features=1280, channel_multiplier=1.0,
                 depth_multiplier=1.0, act_layer=nn.SiLU, drop_path_rate=0.0, drop_rate=0.0, in_chans=3):
        super().__init__()
        round_chs = partial(_round_channels, multiplier=channel_multiplier)
        stem_size = round_chs(stem_size)
        self.conv_stem = create_conv2d(in_chans, stem_size, 3, stride=2)
        self.bn1 = BatchNormAct2d(stem_size, act_layer=act_layer, inplace=True)
        repeats = [int(math.ceil(r * depth_multiplier)) for _, r, *_ in arch_def]
        total, index = sum(repeats), 0
        stages, in_chs = [], stem_size
        for (kind, _, kernel, stride, exp, chs, se_ratio), count in zip(arch_def, repeats):
            out_chs, blocks = round_chs(chs), []
            for i in range(count):
                se_layer = partial(SqueezeExcite, rd_ratio=se_ratio / exp) if se_ratio else None
                dpr = drop_path_rate * index / total
                args = dict(stride=stride if i == 0 else 1, act_layer=act_layer, se_layer=se_layer,
                            drop_path_rate=dpr)
                if kind == "ds":
                    blocks.append(DepthwiseSeparableConv(in_chs, out_chs, kernel, **args))
                else:
                    blocks.append(InvertedResidual(in_chs, out_chs, kernel, exp_ratio=exp, **args))
                in_chs, index = out_chs, index + 1
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.num_features = round_chs(num_features)
        self.conv_head = create_conv2d(in_chs, self.num_features, 1)
        self.bn2 = BatchNormAct2d(self.num_features, act_layer=act_layer, inplace=True)
        self.global_pool = nn.Sequential(OrderedDict([("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten(1))]))
        self.drop_rate = drop_rate
        self.classifier = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x):
        x = self.conv_stem(x)
        x = self.bn1(x)
        x = self.blocks(x)
        x = self.conv_head(x)
        x = self.bn2(x)
        return x

    def forward_head(self, x):
        x = self.global_pool(x)
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return self.classifier(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _round_channels(channels: int, multiplier: float = 1.0, divisor: int = 8) -> int:
    return make_divisible(channels * multiplier, divisor) if multiplier != 1.0 else channels


def efficientnet_like(width: float = 0.25, depth: float = 0.5, num_classes: int = 10, image_size: int = 32,
                      batch: int = 2, act: str = "silu") -> EfficientNet:
    """EfficientNet-B0 (timm ``efficientnet_b0``: SiLU, SE, drop path) at ``width`` x channels, ``depth`` x repeats.

    ``efficientnet_like(width=1.0, depth=1.0, image_size=224)`` has B0's
    exact layer shapes (49 ``BatchNormAct2d``).
    """
    model = EfficientNet(EFFICIENTNET_B0, num_classes=num_classes, channel_multiplier=width, depth_multiplier=depth,
                         act_layer=_ACTS[act], drop_path_rate=0.2, drop_rate=0.2)
    return _with_shape(model, (batch, 3, image_size, image_size))


def mobilenetv2_like(width: float = 0.25, depth: float = 0.5, num_classes: int = 10, image_size: int = 32,
                     batch: int = 2) -> EfficientNet:
    """timm's ``mobilenetv2_100`` (ReLU6, no SE) at ``width`` x channels and ``depth`` x repeats."""
    model = EfficientNet(MOBILENETV2_100, num_classes=num_classes, channel_multiplier=width, depth_multiplier=depth,
                         act_layer=nn.ReLU6)
    return _with_shape(model, (batch, 3, image_size, image_size))


_ACTS: dict[str, Callable[..., nn.Module]] = {"relu": nn.ReLU, "silu": nn.SiLU, "hardswish": nn.Hardswish,
                                               "relu6": nn.ReLU6, "identity": None}


class BnActNet(nn.Module):
    """A MobileNetV3-flavoured stack of timm blocks, one activation kind per ``BatchNormAct2d``.

    Stem (ReLU), a DS block with drop in its norm (Hardswish), an inverted
    residual with SE (SiLU), and a head norm with no activation: every
    activation ONNX has a node for, and a ``BatchNormAct2d`` with a drop layer.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv_stem = create_conv2d(3, 8, 3, stride=2)
        self.bn1 = BatchNormAct2d(8, act_layer=nn.ReLU, drop_layer=partial(nn.Dropout, p=0.1))
        self.ds = DepthwiseSeparableConv(8, 8, act_layer=nn.Hardswish, pw_act=True)
        self.ir = InvertedResidual(8, 16, 3, stride=2, exp_ratio=2, act_layer=nn.SiLU,
                                   se_layer=partial(SqueezeExcite, rd_ratio=0.25))
        self.conv_head = create_conv2d(16, 16, 1)
        self.bn2 = BatchNormAct2d(16, apply_act=False)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.bn2(self.conv_head(self.ir(self.ds(self.bn1(self.conv_stem(x))))))
        return self.classifier(self.global_pool(x).flatten(1))


def bn_act_net() -> BnActNet:
    return _with_shape(BnActNet(), (2, 3, 32, 32))


def _bn_act_without(param: str) -> nn.Module:
    conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
    bn = BatchNormAct2d(6, act_layer=nn.SiLU)
    bn.register_parameter(param, None)  # affine=True, but this tensor absent
    return _with_shape(nn.Sequential(OrderedDict([("conv", conv), ("bn", bn)])), (2, 3, 8, 8))


def bn_act_without_bias() -> nn.Module:
    """conv -> ``BatchNormAct2d`` with ``affine=True`` and its bias registered as ``None``."""
    return _bn_act_without("bias")


def bn_act_without_weight() -> nn.Module:
    """conv -> ``BatchNormAct2d`` with ``affine=True`` and its weight registered as ``None``."""
    return _bn_act_without("weight")


# ============================================================================ timm regnet


class RegNetBottleneck(nn.Module):
    """timm's RegNet ``Bottleneck``: three ``ConvNormAct`` (grouped 3x3), ``SEModule``, shortcut, ``act3``."""

    def __init__(self, in_chs, out_chs, stride=1, bottle_ratio=1.0, group_size=1, se_ratio=0.25,
                 act_layer=nn.ReLU, drop_path_rate=0.0):
        super().__init__()
        bottleneck_chs = int(round(out_chs * bottle_ratio))
        groups = bottleneck_chs // group_size
        self.conv1 = ConvNormAct(in_chs, bottleneck_chs, kernel_size=1, act_layer=act_layer)
        self.conv2 = ConvNormAct(bottleneck_chs, bottleneck_chs, kernel_size=3, stride=stride, groups=groups,
                                 act_layer=act_layer)
        if se_ratio:
            se_channels = int(round(in_chs * se_ratio))
            self.se = SEModule(bottleneck_chs, rd_channels=se_channels, act_layer=act_layer)
        else:
            self.se = nn.Identity()
        self.conv3 = ConvNormAct(bottleneck_chs, out_chs, kernel_size=1, apply_act=False, act_layer=act_layer)
        self.act3 = act_layer()
        if in_chs != out_chs or stride != 1:
            self.downsample = ConvNormAct(in_chs, out_chs, kernel_size=1, stride=stride, apply_act=False)
        else:
            self.downsample = nn.Identity()
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv1(x)
        x = self.conv2(x)
        x = self.se(x)
        x = self.conv3(x)
        if self.downsample is not None:
            x = self.drop_path(x) + self.downsample(shortcut)
        x = self.act3(x)
        return x


class RegNet(nn.Module):
    def __init__(self, widths=(16, 32), depths=(2, 2), group_size=8, stem_width=8, num_classes=10):
        super().__init__()
        self.stem = ConvNormAct(3, stem_width, 3, stride=2)
        prev = stem_width
        for i, (width, depth) in enumerate(zip(widths, depths)):
            stage = nn.Sequential()
            for j in range(depth):
                stage.add_module(f"b{j + 1}", RegNetBottleneck(prev, width, stride=2 if j == 0 else 1,
                                                               group_size=group_size))
                prev = width
            setattr(self, f"s{i + 1}", stage)
        self.num_stages = len(widths)
        self.final_conv = nn.Identity()
        self.head = ClassifierHead(prev, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for i in range(self.num_stages):
            x = getattr(self, f"s{i + 1}")(x)
        return self.head(self.final_conv(x))


def regnet_like(num_classes: int = 10) -> RegNet:
    """A two-stage RegNetY (grouped bottlenecks with SE) built from ``ConvNormAct``."""
    return _with_shape(RegNet(num_classes=num_classes), (2, 3, 32, 32))


# ============================================================================ timm resnetv2 (pre-activation)


class DownsampleConv(nn.Module):
    def __init__(self, in_chs, out_chs, stride=1, preact=True, norm_layer=BatchNormAct2d):
        super().__init__()
        self.conv = create_conv2d(in_chs, out_chs, 1, stride=stride)
        self.norm = nn.Identity() if preact else norm_layer(out_chs, apply_act=False)

    def forward(self, x):
        return self.norm(self.conv(x))


class PreActBottleneck(nn.Module):
    """timm's ``PreActBottleneck``: ``norm1`` (BN+ReLU) -> ``conv1`` -> ``norm2`` -> ``conv2`` -> ``norm3`` -> ``conv3``.

    The shortcut reads ``x`` itself, or ``downsample`` of the pre-activated ``x``.
    """

    def __init__(self, in_chs, out_chs=None, bottle_ratio=0.25, stride=1, norm_layer=BatchNormAct2d,
                 proj_layer=None, drop_path_rate=0.0):
        super().__init__()
        out_chs = out_chs or in_chs
        mid_chs = make_divisible(out_chs * bottle_ratio)
        self.downsample = proj_layer(in_chs, out_chs, stride=stride, preact=True) if proj_layer else None
        self.norm1 = norm_layer(in_chs)
        self.conv1 = create_conv2d(in_chs, mid_chs, 1)
        self.norm2 = norm_layer(mid_chs)
        self.conv2 = create_conv2d(mid_chs, mid_chs, 3, stride=stride)
        self.norm3 = norm_layer(mid_chs)
        self.conv3 = create_conv2d(mid_chs, out_chs, 1)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x):
        x_preact = self.norm1(x)

        # shortcut branch
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(x_preact)

        # residual branch
        x = self.conv1(x_preact)
        x = self.conv2(self.norm2(x))
        x = self.conv3(self.norm3(x))
        x = self.drop_path(x)
        return x + shortcut


class ResNetStage(nn.Module):
    def __init__(self, in_chs, out_chs, stride, depth):
        super().__init__()
        self.blocks = nn.Sequential(*[
            PreActBottleneck(in_chs if j == 0 else out_chs, out_chs, stride=stride if j == 0 else 1,
                             proj_layer=DownsampleConv if j == 0 else None)
            for j in range(depth)])

    def forward(self, x):
        return self.blocks(x)


class ResNetV2(nn.Module):
    """timm's ``ResNetV2`` (pre-activation, ``norm_layer=BatchNormAct2d`` as in ``resnetv2_50``)."""

    def __init__(self, layers=(2, 2), channels=(32, 64), stem_chs=16, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(OrderedDict([
            ("conv", create_conv2d(3, stem_chs, 7, stride=2)),
            ("pool", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))
        prev = stem_chs
        self.stages = nn.Sequential()
        for i, (depth, out_chs) in enumerate(zip(layers, channels)):
            self.stages.add_module(str(i), ResNetStage(prev, out_chs, 1 if i == 0 else 2, depth))
            prev = out_chs
        self.num_features = prev
        self.norm = BatchNormAct2d(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes)

    def forward(self, x):
        x = self.norm(self.stages(self.stem(x)))
        return self.head(x)


def resnetv2_like(num_classes: int = 10) -> ResNetV2:
    """A two-stage pre-activation ResNetV2 (``resnetv2_50``'s blocks, small)."""
    return _with_shape(ResNetV2(num_classes=num_classes), (2, 3, 32, 32))


# ============================================================================ densenet (torchvision and timm)


class _DenseLayer(nn.Module):
    """torchvision's ``_DenseLayer`` (``norm1``/``relu1``/``conv1`` after ``torch.cat``), or timm's with
    ``norm1``/``norm2`` a ``BatchNormAct2d`` and no separate ReLU."""

    def __init__(self, num_input_features, growth_rate, bn_size, drop_rate=0.0, norm_act=False):
        super().__init__()
        width = bn_size * growth_rate
        self.norm1 = BatchNormAct2d(num_input_features) if norm_act else nn.BatchNorm2d(num_input_features)
        if not norm_act:
            self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, width, kernel_size=1, stride=1, bias=False)
        self.norm2 = BatchNormAct2d(width) if norm_act else nn.BatchNorm2d(width)
        if not norm_act:
            self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = False

    def _act(self, name: str, x):
        relu = getattr(self, name, None)
        return relu(x) if relu is not None else x

    def bn_function(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        concated_features = torch.cat(inputs, 1)
        return self.conv1(self._act("relu1", self.norm1(concated_features)))

    def forward(self, input):
        prev_features = [input] if isinstance(input, torch.Tensor) else input
        bottleneck_output = self.bn_function(prev_features)
        new_features = self.conv2(self._act("relu2", self.norm2(bottleneck_output)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class _DenseBlock(nn.ModuleDict):
    _version = 2

    def __init__(self, num_layers, num_input_features, bn_size, growth_rate, norm_act=False):
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate=growth_rate, bn_size=bn_size,
                                norm_act=norm_act)
            self.add_module("denselayer%d" % (i + 1), layer)

    def forward(self, init_features):
        features = [init_features]
        for _, layer in self.items():
            new_features = layer(features)
            features.append(new_features)
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features, num_output_features, norm_act=False):
        super().__init__()
        self.norm = BatchNormAct2d(num_input_features) if norm_act else nn.BatchNorm2d(num_input_features)
        if not norm_act:
            self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    def __init__(self, growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=10,
                 norm_act=False):
        super().__init__()
        stem = [("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                ("norm0", BatchNormAct2d(num_init_features) if norm_act else nn.BatchNorm2d(num_init_features))]
        if not norm_act:
            stem.append(("relu0", nn.ReLU(inplace=True)))
        stem.append(("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)))
        self.features = nn.Sequential(OrderedDict(stem))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers, num_features, bn_size, growth_rate, norm_act=norm_act)
            self.features.add_module("denseblock%d" % (i + 1), block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = _Transition(num_features, num_features // 2, norm_act=norm_act)
                self.features.add_module("transition%d" % (i + 1), trans)
                num_features = num_features // 2
        # Final batch norm (timm: with its activation)
        self.features.add_module("norm5", BatchNormAct2d(num_features) if norm_act else nn.BatchNorm2d(num_features))
        self.norm_act = norm_act
        self.classifier = nn.Linear(num_features, num_classes)

    def forward(self, x):
        features = self.features(x)
        out = features if self.norm_act else F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)


def densenet_like(norm_act: bool = False, num_classes: int = 10) -> DenseNet:
    """DenseNet-BC, two dense blocks: torchvision's layout, or timm's (``norm_act=True``: ``BatchNormAct2d``)."""
    return _with_shape(DenseNet(num_classes=num_classes, norm_act=norm_act), (2, 3, 32, 32))


# ============================================================================ timm dpn


class CatBnAct(nn.Module):
    def __init__(self, in_chs, norm_layer=BatchNormAct2d):
        super().__init__()
        self.bn = norm_layer(in_chs, eps=0.001)

    def forward(self, x):
        if isinstance(x, tuple):
            x = torch.cat(x, dim=1)
        return self.bn(x)


class BnActConv2d(nn.Module):
    """DPN's pre-activation unit: ``bn`` (BN+ReLU) then ``conv``."""

    def __init__(self, in_chs, out_chs, kernel_size, stride, groups=1, norm_layer=BatchNormAct2d):
        super().__init__()
        self.bn = norm_layer(in_chs, eps=0.001)
        self.conv = create_conv2d(in_chs, out_chs, kernel_size, stride=stride, groups=groups)

    def forward(self, x):
        return self.conv(self.bn(x))


class DualPathBlock(nn.Module):
    """timm's ``DualPathBlock``: a residual path and a densely concatenated path, split by channel slicing."""

    def __init__(self, in_chs, num_1x1_a, num_3x3_b, num_1x1_c, inc, groups, block_type="normal", b=False):
        super().__init__()
        self.num_1x1_c = num_1x1_c
        self.inc = inc
        self.b = b
        if block_type == "proj":
            self.key_stride, self.has_proj = 1, True
        elif block_type == "down":
            self.key_stride, self.has_proj = 2, True
        else:
            self.key_stride, self.has_proj = 1, False
        self.c1x1_w_s1 = None
        self.c1x1_w_s2 = None
        if self.has_proj:
            if self.key_stride == 2:
                self.c1x1_w_s2 = BnActConv2d(in_chs=in_chs, out_chs=num_1x1_c + 2 * inc, kernel_size=1, stride=2)
            else:
                self.c1x1_w_s1 = BnActConv2d(in_chs=in_chs, out_chs=num_1x1_c + 2 * inc, kernel_size=1, stride=1)
        self.c1x1_a = BnActConv2d(in_chs=in_chs, out_chs=num_1x1_a, kernel_size=1, stride=1)
        self.c3x3_b = BnActConv2d(in_chs=num_1x1_a, out_chs=num_3x3_b, kernel_size=3, stride=self.key_stride,
                                  groups=groups)
        if b:
            self.c1x1_c = CatBnAct(in_chs=num_3x3_b)
            self.c1x1_c1 = create_conv2d(num_3x3_b, num_1x1_c, kernel_size=1)
            self.c1x1_c2 = create_conv2d(num_3x3_b, inc, kernel_size=1)
        else:
            self.c1x1_c = BnActConv2d(in_chs=num_3x3_b, out_chs=num_1x1_c + inc, kernel_size=1, stride=1)
            self.c1x1_c1 = None
            self.c1x1_c2 = None

    def forward(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(x, tuple):
            x_in = torch.cat(x, dim=1)
        else:
            x_in = x
        if self.c1x1_w_s1 is None and self.c1x1_w_s2 is None:
            # self.has_proj == False, torchscript requires condition on module == None
            x_s1 = x[0]
            x_s2 = x[1]
        else:
            if self.c1x1_w_s1 is not None:
                x_s = self.c1x1_w_s1(x_in)
            else:
                x_s = self.c1x1_w_s2(x_in)
            x_s1 = x_s[:, :self.num_1x1_c, :, :]
            x_s2 = x_s[:, self.num_1x1_c:, :, :]
        x_in = self.c1x1_a(x_in)
        x_in = self.c3x3_b(x_in)
        x_in = self.c1x1_c(x_in)
        if self.c1x1_c1 is not None:
            out1 = self.c1x1_c1(x_in)
            out2 = self.c1x1_c2(x_in)
        else:
            out1 = x_in[:, :self.num_1x1_c, :, :]
            out2 = x_in[:, self.num_1x1_c:, :, :]
        resid = x_s1 + out1
        dense = torch.cat([x_s2, out2], dim=1)
        return resid, dense


class DPN(nn.Module):
    def __init__(self, k_sec=(2, 2), inc_sec=(4, 8), k_r=16, groups=4, num_init_features=8, bw=(16, 32), b=False,
                 num_classes=10):
        super().__init__()
        blocks = OrderedDict()
        blocks["conv1_1"] = ConvNormAct(3, num_init_features, kernel_size=3, stride=2,
                                        norm_layer=partial(BatchNormAct2d, eps=0.001))
        blocks["conv1_pool"] = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_chs = num_init_features
        for stage, (count, inc, width) in enumerate(zip(k_sec, inc_sec, bw)):
            r = k_r * (stage + 1)
            blocks[f"conv{stage + 2}_1"] = DualPathBlock(in_chs, r, r, width, inc, groups,
                                                         "proj" if stage == 0 else "down", b)
            in_chs = width + 3 * inc
            for i in range(2, count + 1):
                blocks[f"conv{stage + 2}_{i}"] = DualPathBlock(in_chs, r, r, width, inc, groups, "normal", b)
                in_chs += inc
        blocks["conv5_bn_ac"] = CatBnAct(in_chs, norm_layer=partial(BatchNormAct2d, act_layer=nn.ELU, inplace=False))
        self.num_features = in_chs
        self.features = nn.Sequential(blocks)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Conv2d(self.num_features, num_classes, kernel_size=1, bias=True)
        self.flatten = nn.Flatten(1)

    def forward(self, x):
        x = self.features(x)
        x = self.global_pool(x)
        x = self.classifier(x)
        return self.flatten(x)


def dpn_like(b: bool = False, num_classes: int = 10) -> DPN:
    """A two-stage dual-path network (timm ``dpn68``; ``b=True``: ``dpn68b``, with ``CatBnAct`` in every block)."""
    return _with_shape(DPN(b=b, num_classes=num_classes), (2, 3, 32, 32))


# ============================================================================ timm byobnet: RepVGG, MobileOne


class RepVggBlock(nn.Module):
    """timm's ``RepVggBlock``: ``conv_kxk`` + ``conv_1x1`` (+ ``identity``, a BN of the input), summed, then ``act``."""

    def __init__(self, in_chs, out_chs, kernel_size=3, stride=1, groups=1, drop_path_rate=0.0):
        super().__init__()
        self.groups = groups
        self.reparam_conv = None
        use_ident = in_chs == out_chs and stride == 1
        self.identity = BatchNormAct2d(out_chs, apply_act=False) if use_ident else None
        self.conv_kxk = ConvNormAct(in_chs, out_chs, kernel_size, stride=stride, groups=groups, apply_act=False)
        self.conv_1x1 = ConvNormAct(in_chs, out_chs, 1, stride=stride, groups=groups, apply_act=False)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0.0 and use_ident else nn.Identity()
        self.attn = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.act(self.attn(self.reparam_conv(x)))
        if self.identity is None:
            x = self.conv_1x1(x) + self.conv_kxk(x)
        else:
            identity = self.identity(x)
            x = self.conv_1x1(x) + self.conv_kxk(x)
            x = self.drop_path(x)  # not in the paper / official impl, experimental
            x += identity
        x = self.attn(x)  # no attn in the paper / official impl, experimental
        return self.act(x)


class MobileOneBlock(nn.Module):
    """timm's ``MobileOneBlock``: ``num_conv_branches`` kxk conv+BN, a 1x1 ``conv_scale``, an ``identity`` BN."""

    def __init__(self, in_chs, out_chs, kernel_size=3, stride=1, groups=1, num_conv_branches=2):
        super().__init__()
        self.num_conv_branches = num_conv_branches
        self.groups = groups
        self.reparam_conv = None
        use_ident = in_chs == out_chs and stride == 1
        self.identity = BatchNormAct2d(out_chs, apply_act=False) if use_ident else None
        self.conv_kxk = nn.ModuleList([
            ConvNormAct(in_chs, out_chs, kernel_size=kernel_size, stride=stride, groups=groups, apply_act=False)
            for _ in range(self.num_conv_branches)])
        self.conv_scale = None
        if kernel_size > 1:
            self.conv_scale = ConvNormAct(in_chs, out_chs, kernel_size=1, stride=stride, groups=groups,
                                          apply_act=False)
        self.drop_path = nn.Identity()
        self.attn = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.act(self.attn(self.reparam_conv(x)))
        identity_out = 0
        if self.identity is not None:
            identity_out = self.identity(x)
        scale_out = 0
        if self.conv_scale is not None:
            scale_out = self.conv_scale(x)
        out = scale_out + identity_out
        for ck in self.conv_kxk:
            out += ck(x)
        out = self.drop_path(out)
        return self.act(self.attn(out))


class ByobNet(nn.Module):
    def __init__(self, stem: nn.Module, stages: nn.Module, num_features: int, num_classes: int = 10):
        super().__init__()
        self.stem = stem
        self.stages = stages
        self.final_conv = nn.Identity()
        self.head = ClassifierHead(num_features, num_classes)

    def forward(self, x):
        return self.head(self.final_conv(self.stages(self.stem(x))))


def repvgg_like(num_classes: int = 10) -> ByobNet:
    """RepVGG-A style: a stride-2 ``RepVggBlock`` stem, then stages whose later blocks carry the identity BN."""
    stem = RepVggBlock(3, 8, stride=2)
    stages = nn.Sequential(
        nn.Sequential(RepVggBlock(8, 16, stride=2), RepVggBlock(16, 16)),
        nn.Sequential(RepVggBlock(16, 24, stride=2), RepVggBlock(24, 24, groups=2), RepVggBlock(24, 24)),
    )
    return _with_shape(ByobNet(stem, stages, 24, num_classes), (2, 3, 32, 32))


def mobileone_like(num_classes: int = 10) -> ByobNet:
    """MobileOne-S0 style: each stage a depthwise 3x3 ``MobileOneBlock`` then a pointwise one."""
    stem = MobileOneBlock(3, 8, kernel_size=3, stride=2, num_conv_branches=1)

    def pair(chs, out, stride):
        return [MobileOneBlock(chs, chs, 3, stride=stride, groups=chs), MobileOneBlock(chs, out, 1)]

    stages = nn.Sequential(nn.Sequential(*pair(8, 16, 2), *pair(16, 16, 1)), nn.Sequential(*pair(16, 24, 2)))
    return _with_shape(ByobNet(stem, stages, 24, num_classes), (2, 3, 32, 32))


# ============================================================================ timm levit


class ConvNorm(nn.Module):
    def __init__(self, in_chs, out_chs, kernel_size=1, stride=1, padding=0, dilation=1, groups=1, bn_weight_init=1):
        super().__init__()
        self.linear = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, dilation, groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        nn.init.constant_(self.bn.weight, bn_weight_init)

    def forward(self, x):
        return self.bn(self.linear(x))


class LinearNorm(nn.Module):
    """LeViT's ``LinearNorm``: a Linear on ``(B, N, C)``, BatchNorm1d over ``x.flatten(0, 1)``, reshaped back."""

    def __init__(self, in_features, out_features, bn_weight_init=1):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bn = nn.BatchNorm1d(out_features)
        nn.init.constant_(self.bn.weight, bn_weight_init)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class NormLinear(nn.Module):
    """LeViT's head: ``bn`` (BatchNorm1d) -> ``drop`` -> ``linear``."""

    def __init__(self, in_features, out_features, bias=True, drop=0.0):
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.drop = nn.Dropout(drop)
        self.linear = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x):
        return self.linear(self.drop(self.bn(x)))


class LevitAttention(nn.Module):
    """LeViT's ``Attention`` (linear mode): ``qkv`` and ``proj.ln`` are ``LinearNorm``, biases cached per device."""

    def __init__(self, dim, key_dim, num_heads=8, attn_ratio=4.0, resolution=4, act_layer=nn.Hardswish):
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim ** -0.5
        self.key_dim = key_dim
        self.key_attn_dim = key_dim * num_heads
        self.val_dim = int(attn_ratio * key_dim)
        self.val_attn_dim = int(attn_ratio * key_dim) * num_heads
        self.qkv = LinearNorm(dim, self.val_attn_dim + self.key_attn_dim * 2)
        self.proj = nn.Sequential(OrderedDict([
            ("act", act_layer()),
            ("ln", LinearNorm(self.val_attn_dim, dim, bn_weight_init=0)),
        ]))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution * resolution))
        pos = torch.stack(torch.meshgrid(torch.arange(resolution), torch.arange(resolution), indexing="ij")).flatten(1)
        rel_pos = (pos[..., :, None] - pos[..., None, :]).abs()
        rel_pos = (rel_pos[0] * resolution) + rel_pos[1]
        self.register_buffer("attention_bias_idxs", rel_pos, persistent=False)
        self.attention_bias_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def train(self, mode=True):
        super().train(mode)
        if mode and self.attention_bias_cache:
            self.attention_bias_cache = {}  # clear ab cache

    def get_attention_biases(self, device: torch.device) -> torch.Tensor:
        if torch.jit.is_tracing() or self.training:
            return self.attention_biases[:, self.attention_bias_idxs]
        device_key = str(device)
        if device_key not in self.attention_bias_cache:
            self.attention_bias_cache[device_key] = self.attention_biases[:, self.attention_bias_idxs]
        return self.attention_bias_cache[device_key]

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        q = q.permute(0, 2, 1, 3)
        k = k.permute(0, 2, 3, 1)
        v = v.permute(0, 2, 1, 3)
        attn = q @ k * self.scale + self.get_attention_biases(x.device)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.val_attn_dim)
        return self.proj(x)


class LevitMlp(nn.Module):
    def __init__(self, in_features, hidden_features, act_layer=nn.Hardswish, drop=0.0):
        super().__init__()
        self.ln1 = LinearNorm(in_features, hidden_features)
        self.act = act_layer()
        self.drop = nn.Dropout(drop)
        self.ln2 = LinearNorm(hidden_features, in_features, bn_weight_init=0)

    def forward(self, x):
        x = self.ln1(x)
        x = self.act(x)
        x = self.drop(x)
        return self.ln2(x)


class LevitBlock(nn.Module):
    def __init__(self, dim, key_dim, num_heads=2, attn_ratio=2.0, mlp_ratio=2.0, resolution=4):
        super().__init__()
        self.attn = LevitAttention(dim, key_dim, num_heads, attn_ratio, resolution)
        self.drop_path1 = nn.Identity()
        self.mlp = LevitMlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = nn.Identity()

    def forward(self, x):
        x = x + self.drop_path1(self.attn(x))
        x = x + self.drop_path2(self.mlp(x))
        return x


class Levit(nn.Module):
    """LeViT (linear mode): a ``ConvNorm`` stem (stride 8), token blocks of ``LinearNorm``, ``NormLinear`` heads."""

    def __init__(self, embed_dim=16, key_dim=4, depth=2, resolution=4, num_classes=10, distilled=True, head=True):
        super().__init__()
        self.stem = nn.Sequential(OrderedDict([
            ("conv1", ConvNorm(3, embed_dim // 4, 3, stride=2, padding=1)),
            ("act1", nn.Hardswish()),
            ("conv2", ConvNorm(embed_dim // 4, embed_dim // 2, 3, stride=2, padding=1)),
            ("act2", nn.Hardswish()),
            ("conv3", ConvNorm(embed_dim // 2, embed_dim, 3, stride=2, padding=1)),
        ]))
        self.blocks = nn.Sequential(*[LevitBlock(embed_dim, key_dim, resolution=resolution) for _ in range(depth)])
        self.head = NormLinear(embed_dim, num_classes) if head else nn.Identity()
        self.head_dist = NormLinear(embed_dim, num_classes) if head and distilled else None

    def forward(self, x):
        x = self.stem(x)
        x = x.flatten(2).transpose(1, 2)
        x = self.blocks(x)
        x = x.mean(dim=1)
        if self.head_dist is None:
            return self.head(x)
        return (self.head(x) + self.head_dist(x)) / 2  # eval mode: average of the two heads


def levit_like(num_classes: int = 10, head: bool = True) -> Levit:
    """A two-block LeViT on 32x32 images (4x4 tokens): attention and MLP built from ``LinearNorm``.

    ``head=False`` ends with the pooled tokens, without the distilled ``NormLinear`` heads.
    """
    return _with_shape(Levit(num_classes=num_classes, head=head), (2, 3, 32, 32))


# ============================================================================ torchvision / detectron2 frozen BNs


class TorchvisionBasicBlock(nn.Module):
    """torchvision's ResNet ``BasicBlock`` with its ``norm_layer`` argument (detection backbones pass a frozen BN)."""

    def __init__(self, inplanes, planes, stride=1, downsample=None, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TorchvisionResNet(nn.Module):
    def __init__(self, norm_layer=TorchvisionFrozenBatchNorm2d, widths=(8, 16), num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = nn.Sequential(TorchvisionBasicBlock(widths[0], widths[0], norm_layer=norm_layer))
        downsample = nn.Sequential(nn.Conv2d(widths[0], widths[1], 1, 2, bias=False), norm_layer(widths[1]))
        self.layer2 = nn.Sequential(TorchvisionBasicBlock(widths[0], widths[1], 2, downsample, norm_layer=norm_layer))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[1], num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def torchvision_frozen_resnet(num_classes: int = 10) -> TorchvisionResNet:
    """A torchvision ResNet built with ``norm_layer=FrozenBatchNorm2d``, as every torchvision detection backbone."""
    return _with_shape(TorchvisionResNet(num_classes=num_classes), (2, 3, 32, 32))


class Detectron2FrozenBatchNorm2d(nn.Module):
    """``detectron2.layers.FrozenBatchNorm2d``: buffers only; ``running_var`` starts at ``1 - eps``.

    With gradients it computes ``x * scale + bias`` itself; without (inference)
    it calls ``F.batch_norm``. Checkpoints older than version 2 lack the
    running statistics.
    """

    _version = 3

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x):
        if x.requires_grad:
            # When gradients are needed, F.batch_norm will use extra memory
            # because its backward op computes gradients for weight/bias as well.
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            bias = self.bias - self.running_mean * scale
            scale = scale.reshape(1, -1, 1, 1)
            bias = bias.reshape(1, -1, 1, 1)
            out_dtype = x.dtype  # may be half
            return x * scale.to(out_dtype) + bias.to(out_dtype)
        # When gradients are not needed, F.batch_norm is a single fused op
        # and provide more optimization opportunities.
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False,
                            eps=self.eps)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        version = local_metadata.get("version", None)
        if version is None or version < 2:
            # No running_mean/var in early versions
            if prefix + "running_mean" not in state_dict:
                state_dict[prefix + "running_mean"] = torch.zeros_like(self.running_mean)
            if prefix + "running_var" not in state_dict:
                state_dict[prefix + "running_var"] = torch.ones_like(self.running_var)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def __repr__(self):
        return "FrozenBatchNorm2d(num_features={}, eps={})".format(self.num_features, self.eps)


class Detectron2Conv2d(nn.Conv2d):
    """``detectron2.layers.Conv2d``: an ``nn.Conv2d`` that applies its own ``norm`` and ``activation``."""

    def __init__(self, *args, **kwargs):
        norm = kwargs.pop("norm", None)
        activation = kwargs.pop("activation", None)
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x):
        with warnings.catch_warnings(record=True):
            if x.numel() == 0 and self.training:  # as detectron2: a data-dependent check fx cannot trace
                assert not isinstance(self.norm, torch.nn.SyncBatchNorm), "SyncBatchNorm does not support empty inputs!"
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class Detectron2BottleneckBlock(nn.Module):
    def __init__(self, in_channels, out_channels, bottleneck_channels, stride=1):
        super().__init__()
        norm = Detectron2FrozenBatchNorm2d
        if in_channels != out_channels:
            self.shortcut = Detectron2Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False,
                                             norm=norm(out_channels))
        else:
            self.shortcut = None
        self.conv1 = Detectron2Conv2d(in_channels, bottleneck_channels, kernel_size=1, stride=stride, bias=False,
                                      norm=norm(bottleneck_channels))
        self.conv2 = Detectron2Conv2d(bottleneck_channels, bottleneck_channels, kernel_size=3, stride=1, padding=1,
                                      bias=False, norm=norm(bottleneck_channels))
        self.conv3 = Detectron2Conv2d(bottleneck_channels, out_channels, kernel_size=1, bias=False,
                                      norm=norm(out_channels))

    def forward(self, x):
        out = self.conv1(x)
        out = F.relu_(out)
        out = self.conv2(out)
        out = F.relu_(out)
        out = self.conv3(out)
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        out += shortcut
        out = F.relu_(out)
        return out


class Detectron2ResNet(nn.Module):
    def __init__(self, stem_channels=8, out_channels=16):
        super().__init__()
        self.stem = nn.Module()
        self.stem.conv1 = Detectron2Conv2d(3, stem_channels, kernel_size=7, stride=2, padding=3, bias=False,
                                           norm=Detectron2FrozenBatchNorm2d(stem_channels))
        self.res2 = nn.Sequential(Detectron2BottleneckBlock(stem_channels, out_channels, out_channels // 4),
                                  Detectron2BottleneckBlock(out_channels, out_channels, out_channels // 4))

    def forward(self, x):
        x = F.relu_(self.stem.conv1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        return self.res2(x)


def detectron2_frozen_resnet() -> Detectron2ResNet:
    """detectron2's ResNet stem and ``res2`` bottlenecks, ``norm="FrozenBN"``: the BN lives inside its ``Conv2d``."""
    return _with_shape(Detectron2ResNet(), (2, 3, 32, 32))


def conv_detectron2_frozen_bn() -> nn.Module:
    """conv -> detectron2 ``FrozenBatchNorm2d`` (eps=1e-3) -> ReLU -> conv -> frozen BN, as separate modules."""
    model = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 6, 3, padding=1, bias=False)), ("bn1", Detectron2FrozenBatchNorm2d(6, eps=1e-3)),
        ("relu", nn.ReLU()), ("conv2", nn.Conv2d(6, 4, 1)), ("bn2", Detectron2FrozenBatchNorm2d(4)),
    ]))
    return _with_shape(model, (2, 3, 8, 8))


def timm_frozen_efficientnet() -> nn.Module:
    """``efficientnet_like()`` after timm's ``freeze_batch_norm_2d``: every norm a ``FrozenBatchNormAct2d``."""
    model = freeze_batch_norm_2d(efficientnet_like(depth=0.25))
    return _with_shape(model, (2, 3, 32, 32))


# ============================================================================ mmcv and PyTorch's fusion tests


class ConvModule(nn.Module):
    """mmcv's ``ConvModule`` (order conv, norm, act): ``conv``, a norm registered as ``bn``, ``activate``."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, with_norm=True):
        super().__init__()
        self.with_norm = with_norm
        self.with_activation = True
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=not with_norm)
        self.norm_name = "bn"
        if with_norm:
            self.add_module(self.norm_name, nn.BatchNorm2d(out_channels))
        self.activate = nn.ReLU(inplace=True)
        self.order = ("conv", "norm", "act")

    @property
    def norm(self):
        return getattr(self, self.norm_name) if self.with_norm else None

    def forward(self, x, activate=True, norm=True):
        for layer in self.order:
            if layer == "conv":
                x = self.conv(x)
            elif layer == "norm" and norm and self.with_norm:
                x = self.norm(x)
            elif layer == "act" and activate and self.with_activation:
                x = self.activate(x)
        return x


def mmcv_fuse_conv_bn_model() -> nn.Sequential:
    """mmcv's ``test_fuse_conv_bn`` model: ``BatchNorm2d(3)``, then two ``ConvModule`` (conv 3x3, BN, ReLU)."""
    model = nn.Sequential(nn.BatchNorm2d(3), ConvModule(3, 5, 3), ConvModule(5, 5, 3))
    return _with_shape(model, (2, 3, 9, 9))


def bn_linear_bn() -> nn.Sequential:
    """BatchNorm1d -> Linear -> BatchNorm1d: the Linear takes a BN on each side."""
    return _with_shape(nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 8), nn.BatchNorm1d(8)), (4, 6))


class ModelForFusionWithBias(nn.Module):
    """``torch.testing._internal.common_quantization.ModelForFusionWithBias`` (Quant/DeQuant stubs are identities)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 2, 5, bias=True)
        self.bn1 = nn.BatchNorm2d(2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(2, 2, 1, bias=True)
        self.bn2 = nn.BatchNorm2d(2)
        self.quant = nn.Identity()
        self.dequant = nn.Identity()

    def forward(self, x):
        x = self.quant(x)
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu1(x)
        x = self.conv2(x)
        x = self.bn2(x)
        x = self.dequant(x)
        return x


class ModelForLinearBNFusion(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(20, 10)
        self.bn = nn.BatchNorm1d(10)
        nn.init.uniform_(self.bn.weight)
        nn.init.uniform_(self.bn.bias)

    def forward(self, x):
        return self.bn(self.fc(x))


class ModelForConvTransposeBNFusion(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.ConvTranspose1d(3, 3, 1)
        self.bn1 = nn.BatchNorm1d(3)
        self.conv2 = nn.ConvTranspose2d(3, 3, 1)
        self.bn2 = nn.BatchNorm2d(3)
        self.conv3 = nn.ConvTranspose3d(3, 3, 1)
        self.bn3 = nn.BatchNorm3d(3)

    def forward(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        x = x.unsqueeze(2)
        x = self.conv2(x)
        x = self.bn2(x)
        x = x.unsqueeze(2)
        x = self.conv3(x)
        x = self.bn3(x)
        return x


def quant_fusion_with_bias() -> ModelForFusionWithBias:
    return _with_shape(ModelForFusionWithBias(), (2, 3, 10, 10))


def quant_linear_bn() -> ModelForLinearBNFusion:
    return _with_shape(ModelForLinearBNFusion(), (4, 20))


def quant_conv_transpose_bn() -> ModelForConvTransposeBNFusion:
    return _with_shape(ModelForConvTransposeBNFusion(), (2, 3, 5))


def linear_bn1d_one_channel() -> nn.Sequential:
    """Linear(3, 5) on ``(N, 1, 3)``, then ``BatchNorm1d(1)``: one channel, broadcast over every output feature."""
    return _with_shape(nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(1)), (4, 1, 3))


# ============================================================================ DiverseBranchBlock (DingXiaoH)


class BNAndPadLayer(nn.Module):
    """DBB's BN that pads its output with what the BN makes of a zero input, computed in the forward from the
    BN's own parameters and statistics: the BN's tensors are read outside the BN's call, so it must stay."""

    def __init__(self, pad_pixels, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats)
        self.pad_pixels = pad_pixels

    def forward(self, input):
        output = self.bn(input)
        if self.pad_pixels > 0:
            if self.bn.affine:
                pad_values = self.bn.bias.detach() - self.bn.running_mean * self.bn.weight.detach() / torch.sqrt(
                    self.bn.running_var + self.bn.eps)
            else:
                pad_values = - self.bn.running_mean / torch.sqrt(self.bn.running_var + self.bn.eps)
            output = F.pad(output, [self.pad_pixels] * 4)
            pad_values = pad_values.view(1, -1, 1, 1)
            output[:, :, 0:self.pad_pixels, :] = pad_values
            output[:, :, -self.pad_pixels:, :] = pad_values
            output[:, :, :, 0:self.pad_pixels] = pad_values
            output[:, :, :, -self.pad_pixels:] = pad_values
        return output


def _dbb_conv_bn(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1):
    result = nn.Sequential()
    result.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                        bias=False))
    result.add_module("bn", nn.BatchNorm2d(out_channels))
    return result


class DiverseBranchBlock(nn.Module):
    """DBB (training-time form): a KxK conv+BN, a 1x1 conv+BN, a 1x1 conv -> BN-and-pad -> average pool -> BN,
    and a 1x1 conv -> BN-and-pad -> KxK conv -> BN, summed in place, then the nonlinearity."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1,
                 internal_channels_1x1_3x3=None):
        super().__init__()
        self.nonlinear = nn.ReLU()
        self.dbb_origin = _dbb_conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups=groups)
        self.dbb_avg = nn.Sequential()
        self.dbb_avg.add_module("conv", nn.Conv2d(in_channels, out_channels, 1, 1, 0, groups=groups, bias=False))
        self.dbb_avg.add_module("bn", BNAndPadLayer(pad_pixels=padding, num_features=out_channels))
        self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size=kernel_size, stride=stride, padding=0))
        self.dbb_1x1 = _dbb_conv_bn(in_channels, out_channels, 1, stride, 0, groups=groups)
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(out_channels))
        internal = internal_channels_1x1_3x3 or in_channels * 2
        self.dbb_1x1_kxk = nn.Sequential()
        self.dbb_1x1_kxk.add_module("conv1", nn.Conv2d(in_channels, internal, 1, 1, 0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn1", BNAndPadLayer(pad_pixels=padding, num_features=internal, affine=True))
        self.dbb_1x1_kxk.add_module("conv2", nn.Conv2d(internal, out_channels, kernel_size, stride, 0, groups=groups,
                                                       bias=False))
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(out_channels))

    def forward(self, inputs):
        out = self.dbb_origin(inputs)
        if hasattr(self, "dbb_1x1"):
            out += self.dbb_1x1(inputs)
        out += self.dbb_avg(inputs)
        out += self.dbb_1x1_kxk(inputs)
        return self.nonlinear(out)


def dbb_net() -> nn.Sequential:
    """Two DBBs (3x3, padding 1) and a head."""
    return _with_shape(nn.Sequential(DiverseBranchBlock(3, 8, 3, padding=1), DiverseBranchBlock(8, 8, 3, 2, padding=1),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)), (2, 3, 12, 12))


# ============================================================================ ultralytics YOLOv8 (detection)


def _autopad(k, p=None, d=1):
    if d > 1:
        k = d * (k - 1) + 1 if isinstance(k, int) else [d * (x - 1) + 1 for x in k]
    if p is None:
        p = k // 2 if isinstance(k, int) else [x // 2 for x in k]
    return p


class YoloConv(nn.Module):
    """ultralytics ``Conv``: conv (no bias) -> BatchNorm2d -> SiLU, in one module."""

    default_act = nn.SiLU()

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, d=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, _autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = self.default_act if act is True else act if isinstance(act, nn.Module) else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class YoloBottleneck(nn.Module):
    def __init__(self, c1, c2, shortcut=True, g=1, k=(3, 3), e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = YoloConv(c1, c_, k[0], 1)
        self.cv2 = YoloConv(c_, c2, k[1], 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C2f(nn.Module):
    """CSP bottleneck with 2 convolutions: the first conv's output chunked in two, bottlenecks chained on the
    second half, everything concatenated."""

    def __init__(self, c1, c2, n=1, shortcut=False, g=1, e=0.5):
        super().__init__()
        self.c = int(c2 * e)
        self.cv1 = YoloConv(c1, 2 * self.c, 1, 1)
        self.cv2 = YoloConv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(YoloBottleneck(self.c, self.c, shortcut, g, k=((3, 3), (3, 3)), e=1.0) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1, c2, k=5):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = YoloConv(c1, c_, 1, 1)
        self.cv2 = YoloConv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class Concat(nn.Module):
    def __init__(self, dimension=1):
        super().__init__()
        self.d = dimension

    def forward(self, x):
        return torch.cat(x, self.d)


class DFL(nn.Module):
    """Distribution focal loss integral: a fixed 1x1 conv (weights 0..c1-1, no BN) over a softmax."""

    def __init__(self, c1=16):
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        x = torch.arange(c1, dtype=torch.float)
        self.conv.weight.data[:] = nn.Parameter(x.view(1, c1, 1, 1))
        self.c1 = c1

    def forward(self, x):
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


def _make_anchors(feats, strides, grid_cell_offset=0.5):
    anchor_points, stride_tensor = [], []
    dtype, device = feats[0].dtype, feats[0].device
    for i, stride in enumerate(strides):
        _, _, h, w = feats[i].shape
        sx = torch.arange(end=w, device=device, dtype=dtype) + grid_cell_offset
        sy = torch.arange(end=h, device=device, dtype=dtype) + grid_cell_offset
        sy, sx = torch.meshgrid(sy, sx, indexing="ij")
        anchor_points.append(torch.stack((sx, sy), -1).view(-1, 2))
        stride_tensor.append(torch.full((h * w, 1), stride, dtype=dtype, device=device))
    return torch.cat(anchor_points), torch.cat(stride_tensor)


def _dist2bbox(distance, anchor_points, xywh=True, dim=-1):
    lt, rb = distance.chunk(2, dim)
    x1y1 = anchor_points - lt
    x2y2 = anchor_points + rb
    if xywh:
        return torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), dim)
    return torch.cat((x1y1, x2y2), dim)


class Detect(nn.Module):
    """YOLOv8 head: per level, a box branch and a class branch of Conv+BN+SiLU blocks; in inference the anchors
    are computed from the feature shapes and cached on the module (``self.anchors``, ``self.shape``), the input
    list is overwritten in place, and ``(y, x)`` is returned."""

    dynamic = False
    export = False
    shape = None
    anchors = torch.empty(0)
    strides = torch.empty(0)

    def __init__(self, nc=80, ch=()):
        super().__init__()
        self.nc = nc
        self.nl = len(ch)
        self.reg_max = 16
        self.no = nc + self.reg_max * 4
        self.stride = torch.tensor([8.0, 16.0, 32.0][: self.nl])
        c2, c3 = max((16, ch[0] // 4, self.reg_max * 4)), max(ch[0], min(self.nc, 100))
        self.cv2 = nn.ModuleList(
            nn.Sequential(YoloConv(x, c2, 3), YoloConv(c2, c2, 3), nn.Conv2d(c2, 4 * self.reg_max, 1)) for x in ch)
        self.cv3 = nn.ModuleList(nn.Sequential(YoloConv(x, c3, 3), YoloConv(c3, c3, 3), nn.Conv2d(c3, self.nc, 1))
                                 for x in ch)
        self.dfl = DFL(self.reg_max) if self.reg_max > 1 else nn.Identity()

    def forward(self, x):
        for i in range(self.nl):
            x[i] = torch.cat((self.cv2[i](x[i]), self.cv3[i](x[i])), 1)
        if self.training:
            return x
        shape = x[0].shape
        x_cat = torch.cat([xi.view(shape[0], self.no, -1) for xi in x], 2)
        if self.dynamic or self.shape != shape:
            self.anchors, self.strides = (x.transpose(0, 1) for x in _make_anchors(x, self.stride, 0.5))
            self.shape = shape
        box, cls = x_cat.split((self.reg_max * 4, self.nc), 1)
        dbox = _dist2bbox(self.dfl(box), self.anchors.unsqueeze(0), xywh=True, dim=1) * self.strides
        y = torch.cat((dbox, cls.sigmoid()), 1)
        return y if self.export else (y, x)


class YoloV8(nn.Module):
    """A YOLOv8 detection model as ultralytics builds it from its yaml: ``model`` is a Sequential of layers, each
    with ``f`` (where its input comes from) and ``i``, run by a loop that keeps the outputs later layers ask for."""

    def __init__(self, width: float = 0.0625, nc: int = 8):
        super().__init__()

        def w(c):
            return max(8, int(c * width * 4))

        c16, c32, c64, c128, c256 = w(16), w(32), w(64), w(128), w(256)
        layers = [  # (from, module)
            (-1, YoloConv(3, c16, 3, 2)), (-1, YoloConv(c16, c32, 3, 2)), (-1, C2f(c32, c32, 1, True)),
            (-1, YoloConv(c32, c64, 3, 2)), (-1, C2f(c64, c64, 2, True)),  # 4: P3
            (-1, YoloConv(c64, c128, 3, 2)), (-1, C2f(c128, c128, 2, True)),  # 6: P4
            (-1, YoloConv(c128, c256, 3, 2)), (-1, C2f(c256, c256, 1, True)), (-1, SPPF(c256, c256, 5)),  # 9: P5
            (-1, nn.Upsample(None, 2, "nearest")), ([-1, 6], Concat(1)), (-1, C2f(c256 + c128, c128, 1)),  # 12
            (-1, nn.Upsample(None, 2, "nearest")), ([-1, 4], Concat(1)), (-1, C2f(c128 + c64, c64, 1)),  # 15: out
            (-1, YoloConv(c64, c64, 3, 2)), ([-1, 12], Concat(1)), (-1, C2f(c64 + c128, c128, 1)),  # 18: out
            (-1, YoloConv(c128, c128, 3, 2)), ([-1, 9], Concat(1)), (-1, C2f(c128 + c256, c256, 1)),  # 21: out
            ([15, 18, 21], Detect(nc, (c64, c128, c256))),
        ]
        for i, (f, m) in enumerate(layers):
            m.f, m.i = f, i
        self.model = nn.Sequential(*[m for _, m in layers])
        self.save = sorted({x % len(layers) for f, _ in layers for x in ([f] if isinstance(f, int) else f) if x != -1})

    def forward(self, x):
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x


def yolov8_like(width: float = 0.0625, nc: int = 8) -> YoloV8:
    return _with_shape(YoloV8(width, nc), (1, 3, 64, 64))


# ============================================================================ PyTorch-GAN's DCGAN (eriklindernoren)


class DCGANGenerator(nn.Module):
    """PyTorch-GAN's ``dcgan.py`` generator: a Linear whose output is viewed as a feature map and normalized by a
    ``BatchNorm2d`` (each BN channel a block of ``init_size ** 2`` features), then upsample / conv / BN blocks with
    the repository's ``BatchNorm2d(128, 0.8)`` (0.8 is eps: the second positional argument)."""

    def __init__(self, img_size: int = 32, latent_dim: int = 16, channels: int = 3):
        super().__init__()
        self.init_size = img_size // 4
        self.l1 = nn.Sequential(nn.Linear(latent_dim, 128 * self.init_size ** 2))
        self.conv_blocks = nn.Sequential(
            nn.BatchNorm2d(128),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(128, 128, 3, stride=1, padding=1),
            nn.BatchNorm2d(128, 0.8),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(128, 64, 3, stride=1, padding=1),
            nn.BatchNorm2d(64, 0.8),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(64, channels, 3, stride=1, padding=1),
            nn.Tanh(),
        )

    def forward(self, z):
        out = self.l1(z)
        out = out.view(out.shape[0], 128, self.init_size, self.init_size)
        return self.conv_blocks(out)


class DCGANDiscriminator(nn.Module):
    """PyTorch-GAN's ``dcgan.py`` discriminator: conv / LeakyReLU / Dropout2d / BN blocks, then the last feature
    map flattened into a Linear (the last BN folds forward into it, across the flatten)."""

    def __init__(self, img_size: int = 32, channels: int = 3):
        super().__init__()

        def discriminator_block(in_filters, out_filters, bn=True):
            block = [nn.Conv2d(in_filters, out_filters, 3, 2, 1), nn.LeakyReLU(0.2, inplace=True), nn.Dropout2d(0.25)]
            if bn:
                block.append(nn.BatchNorm2d(out_filters, 0.8))
            return block

        self.model = nn.Sequential(
            *discriminator_block(channels, 16, bn=False),
            *discriminator_block(16, 32),
            *discriminator_block(32, 64),
            *discriminator_block(64, 128),
        )
        ds_size = img_size // 2 ** 4
        self.adv_layer = nn.Sequential(nn.Linear(128 * ds_size ** 2, 1), nn.Sigmoid())

    def forward(self, img):
        out = self.model(img)
        out = out.view(out.shape[0], -1)
        return self.adv_layer(out)


def dcgan_generator(img_size: int = 32, latent_dim: int = 16) -> DCGANGenerator:
    return _with_shape(DCGANGenerator(img_size, latent_dim), (4, latent_dim))


def dcgan_discriminator(img_size: int = 32) -> DCGANDiscriminator:
    return _with_shape(DCGANDiscriminator(img_size), (4, 3, img_size, img_size))


# ============================================================================ module reuse and call forms


class BlockCalledTwice(nn.Module):
    """The same conv+BN block applied twice in a row; every call of the conv feeds the BN."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(OrderedDict([("conv", nn.Conv2d(4, 4, 3, padding=1)), ("bn", nn.BatchNorm2d(4))]))

    def forward(self, x):
        return self.block(torch.relu(self.block(x)))


class BNSharedByTwoConvs(nn.Module):
    """One BN module applied after two different convs, each conv called once."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 1, bias=False)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return torch.relu(self.bn(self.conv1(x))) * torch.sigmoid(self.bn(self.conv2(x)))


class ScalarOpsBetween(nn.Module):
    """conv -> ``* c`` -> ``+ d`` -> BN (a scaled residual-style rescale before the norm)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x) * 0.5 + 2.0))


class KeywordBNCall(nn.Module):
    """A BN called as ``self.bn(input=x)``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return torch.relu(self.bn(input=self.conv(x)))


def block_called_twice() -> BlockCalledTwice:
    return _with_shape(BlockCalledTwice(), (2, 4, 8, 8))


def bn_shared_by_two_convs() -> BNSharedByTwoConvs:
    return _with_shape(BNSharedByTwoConvs(), (2, 4, 8, 8))


def scalar_ops_between() -> ScalarOpsBetween:
    return _with_shape(ScalarOpsBetween(), (2, 3, 8, 8))


def keyword_bn_call() -> KeywordBNCall:
    return _with_shape(KeywordBNCall(), (2, 3, 8, 8))


def single_bn() -> nn.BatchNorm2d:
    """A model that is one BatchNorm2d."""
    return _with_shape(nn.BatchNorm2d(3), (2, 3, 4, 4))

