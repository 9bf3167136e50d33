"""Look-alikes of reparameterizable networks in their training form, each with the model's own merge.

Written from timm's ``byobnet.py`` (``RepVggBlock``, ``MobileOneBlock``),
``fastvit.py`` (``MobileOneBlock``, ``RepMixer``, ``RepConditionalPosEnc``,
``ReparamLargeKernelConv``) and ``repvit.py`` (``RepVggDw``), with the same
attribute names and forward arithmetic, and widths / depths small by default.
``reparameterize_model`` is timm's: it calls each module's ``reparameterize``
(or ``fuse``). Three block families have no such method and only bntool's
merge applies: ACNet's asymmetric 3x3 + 1x3 + 3x1 (``acnet_net``), YOLOv6's
``RepVGGBlock`` (``yolov6_net``) and a DiverseBranchBlock-style block with
k x k, 1 x 1 and average-pool + BN branches (``dbb_style_net``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from examples.archs import ClassifierHead, RepVggBlock, _with_shape


class ConvBn(nn.Sequential):
    def __init__(self, cin, cout, k, stride=1, padding=None, groups=1):
        super().__init__()
        self.add_module("conv", nn.Conv2d(cin, cout, k, stride, k // 2 if padding is None else padding,
                                          groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))


def _fuse(branch, channels_in, groups, kernel):
    """timm's ``_fuse_bn_tensor``: a conv+BN, or an identity BN (``id_tensor``), as one kernel and bias."""
    if branch is None:
        return 0, 0
    if hasattr(branch, "conv"):
        w, bn = branch.conv.weight, branch.bn
        w = F.pad(w, [(kernel - w.shape[-1]) // 2] * 2 + [(kernel - w.shape[-2]) // 2] * 2)
    else:
        bn, per = branch, channels_in // groups
        w = torch.zeros(channels_in, per, kernel, kernel, dtype=bn.weight.dtype, device=bn.weight.device)
        for i in range(channels_in):
            w[i, i % per, kernel // 2, kernel // 2] = 1
    std = (bn.running_var + bn.eps).sqrt()
    t = (bn.weight / std).reshape(-1, 1, 1, 1)
    return w * t, bn.bias - bn.running_mean * bn.weight / std


class MobileOneBlock(nn.Module):
    """fastvit.py's ``MobileOneBlock``: ``num_conv_branches`` kxk conv+BN, a 1x1 ``conv_scale``, an identity BN."""

    def __init__(self, cin, cout, k, stride=1, group_size=0, use_act=True, use_scale_branch=True,
                 num_conv_branches=1):
        super().__init__()
        self.groups = cin // group_size if group_size else 1
        self.stride, self.k, self.cin, self.cout = stride, k, cin, cout
        self.reparam_conv = None
        self.identity = nn.BatchNorm2d(cout) if cout == cin and stride == 1 else None
        self.conv_kxk = nn.ModuleList([ConvBn(cin, cout, k, stride, groups=self.groups)
                                       for _ in range(num_conv_branches)]) if num_conv_branches > 0 else None
        self.conv_scale = ConvBn(cin, cout, 1, stride, groups=self.groups) if k > 1 and use_scale_branch else None
        self.se = nn.Identity()
        self.act = nn.GELU() if use_act else nn.Identity()

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.act(self.se(self.reparam_conv(x)))
        identity_out = 0
        if self.identity is not None:
            identity_out = self.identity(x)
        scale_out = 0
        if self.conv_scale is not None:
            scale_out = self.conv_scale(x)
        out = scale_out + identity_out
        if self.conv_kxk is not None:
            for rc in self.conv_kxk:
                out += rc(x)
        return self.act(self.se(out))

    @torch.no_grad()
    def reparameterize(self):
        w, b = _fuse(self.identity, self.cin, self.groups, self.k)
        for branch in [self.conv_scale, *(self.conv_kxk or [])]:
            bw, bb = _fuse(branch, self.cin, self.groups, self.k)
            w, b = w + bw, b + bb
        self.reparam_conv = nn.Conv2d(self.cin, self.cout, self.k, self.stride, self.k // 2, groups=self.groups)
        self.reparam_conv.weight.copy_(w)
        self.reparam_conv.bias.copy_(b)
        for name in ("conv_kxk", "conv_scale", "identity"):
            delattr(self, name)
            setattr(self, name, None)


class LayerScale2d(nn.Module):
    def __init__(self, dim, init_values=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim, 1, 1))

    def forward(self, x):
        return x * self.gamma


class RepMixer(nn.Module):
    """fastvit.py's ``RepMixer``: ``x + layer_scale(mixer(x) - norm(x))``, both MobileOne blocks, depthwise."""

    def __init__(self, dim, kernel_size=3, layer_scale_init_value=1e-5):
        super().__init__()
        self.dim, self.kernel_size = dim, kernel_size
        self.reparam_conv = None
        self.norm = MobileOneBlock(dim, dim, kernel_size, group_size=1, use_act=False, use_scale_branch=False,
                                   num_conv_branches=0)
        self.mixer = MobileOneBlock(dim, dim, kernel_size, group_size=1, use_act=False)
        self.layer_scale = LayerScale2d(dim, layer_scale_init_value)

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return x + self.layer_scale(self.mixer(x) - self.norm(x))

    @torch.no_grad()
    def reparameterize(self):
        self.mixer.reparameterize()
        self.norm.reparameterize()
        id_tensor = torch.zeros_like(self.mixer.reparam_conv.weight)
        id_tensor[:, 0, self.kernel_size // 2, self.kernel_size // 2] = 1
        gamma = self.layer_scale.gamma
        w = id_tensor + gamma.unsqueeze(-1) * (self.mixer.reparam_conv.weight - self.norm.reparam_conv.weight)
        b = gamma.reshape(-1) * (self.mixer.reparam_conv.bias - self.norm.reparam_conv.bias)
        self.reparam_conv = nn.Conv2d(self.dim, self.dim, self.kernel_size, 1, self.kernel_size // 2, groups=self.dim)
        self.reparam_conv.weight.copy_(w)
        self.reparam_conv.bias.copy_(b)
        del self.mixer, self.norm, self.layer_scale


class RepConditionalPosEnc(nn.Module):
    """fastvit.py's ``RepConditionalPosEnc``: ``pos_enc(x) + x``, a depthwise conv with its own bias."""

    def __init__(self, dim, spatial_shape=(7, 7)):
        super().__init__()
        self.dim, self.spatial_shape = dim, spatial_shape
        self.reparam_conv = None
        self.pos_enc = nn.Conv2d(dim, dim, spatial_shape, 1, spatial_shape[0] // 2, groups=dim, bias=True)

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return self.pos_enc(x) + x

    @torch.no_grad()
    def reparameterize(self):
        w = self.pos_enc.weight.clone()
        w[:, 0, self.spatial_shape[0] // 2, self.spatial_shape[1] // 2] += 1
        self.reparam_conv = nn.Conv2d(self.dim, self.dim, self.spatial_shape, 1, self.spatial_shape[0] // 2,
                                      groups=self.dim, bias=True)
        self.reparam_conv.weight.copy_(w)
        self.reparam_conv.bias.copy_(self.pos_enc.bias)
        del self.pos_enc


class ReparamLargeKernelConv(nn.Module):
    """fastvit.py's: a large depthwise kxk conv+BN plus a small 3x3 conv+BN, then the activation."""

    def __init__(self, cin, cout, k, stride, small=3):
        super().__init__()
        self.cin, self.cout, self.k, self.stride = cin, cout, k, stride
        self.reparam_conv = None
        self.large_conv = ConvBn(cin, cout, k, stride, groups=cin)
        self.small_conv = ConvBn(cin, cout, small, stride, groups=cin)
        self.act = nn.GELU()

    def forward(self, x):
        out = self.reparam_conv(x) if self.reparam_conv is not None else self.large_conv(x) + self.small_conv(x)
        return self.act(out)

    @torch.no_grad()
    def reparameterize(self):
        w, b = _fuse(self.large_conv, self.cin, self.cin, self.k)
        sw, sb = _fuse(self.small_conv, self.cin, self.cin, self.k)
        self.reparam_conv = nn.Conv2d(self.cin, self.cout, self.k, self.stride, self.k // 2, groups=self.cin)
        self.reparam_conv.weight.copy_(w + sw)
        self.reparam_conv.bias.copy_(b + sb)
        del self.large_conv, self.small_conv


class ConvMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.conv = ConvBn(dim, dim, 7, groups=dim)
        self.fc1, self.act, self.fc2 = nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.conv(x))))


class RepMixerBlock(nn.Module):
    def __init__(self, dim, mlp_ratio=3.0):
        super().__init__()
        self.token_mixer = RepMixer(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        self.layer_scale = LayerScale2d(dim)

    def forward(self, x):
        x = self.token_mixer(x)
        return x + self.layer_scale(self.mlp(x))


def fastvit_t8(embed_dims=(8, 16, 32, 64), layers=(2, 2, 4, 2), pos_emb: bool = False, num_classes: int = 10,
               image_size: int = 64) -> nn.Module:
    """FastViT-T8 (full size: ``embed_dims=(48, 96, 192, 384)``): MobileOne stem, RepMixer stages, large-kernel
    patch embeddings; ``pos_emb`` adds the SA models' RepCPE before the last stage."""
    c = embed_dims[0]
    stem = nn.Sequential(MobileOneBlock(3, c, 3, 2), MobileOneBlock(c, c, 3, 2, group_size=1),
                         MobileOneBlock(c, c, 1, 1))
    stages = []
    for i, (dim, depth) in enumerate(zip(embed_dims, layers)):
        parts = []
        if i > 0:
            parts.append(nn.Sequential(ReparamLargeKernelConv(embed_dims[i - 1], dim, 7, 2),
                                       MobileOneBlock(dim, dim, 1, 1)))
        if pos_emb and i == len(layers) - 1:
            parts.append(RepConditionalPosEnc(dim))
        parts += [RepMixerBlock(dim) for _ in range(depth)]
        stages.append(nn.Sequential(*parts))
    model = nn.Sequential(stem, *stages, ClassifierHead(embed_dims[-1], num_classes))
    return _with_shape(model, (2, 3, image_size, image_size))


class RepVggBlockWithReparam(RepVggBlock):
    """timm's ``RepVggBlock`` (examples/archs.py) with its ``reparameterize``."""

    @torch.no_grad()
    def reparameterize(self):
        conv = self.conv_kxk.conv
        w, b = _fuse(self.identity, conv.in_channels, self.groups, conv.kernel_size[0])
        for branch in (self.conv_kxk, self.conv_1x1):
            bw, bb = _fuse(branch, conv.in_channels, self.groups, conv.kernel_size[0])
            w, b = w + bw, b + bb
        self.reparam_conv = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                      conv.padding, groups=self.groups)
        self.reparam_conv.weight.copy_(w)
        self.reparam_conv.bias.copy_(b)
        del self.conv_kxk, self.conv_1x1, self.identity, self.drop_path
        self.identity = None


def repvgg_a0(widths=(8, 16, 24, 32), depths=(2, 4, 14, 1), num_classes: int = 10, image_size: int = 32):
    """RepVGG-A0 (full size: ``widths=(48, 96, 192, 1280)``): timm's ``RepVggBlock`` stem and stages."""
    blocks, cin = [RepVggBlockWithReparam(3, widths[0], stride=2)], widths[0]
    for width, depth in zip(widths, depths):
        for j in range(depth):
            blocks.append(RepVggBlockWithReparam(cin, width, stride=2 if j == 0 else 1))
            cin = width
    return _with_shape(nn.Sequential(*blocks, ClassifierHead(cin, num_classes)), (2, 3, image_size, image_size))


def mobileone_s0(widths=(8, 16, 24, 32), depths=(2, 8, 10, 1), branches: int = 4, num_classes: int = 10,
                 image_size: int = 32):
    """MobileOne-S0 (full size: ``widths=(48, 128, 256, 1024)``): per block a depthwise 3x3 then a pointwise 1x1
    ``MobileOneBlock`` with ``branches`` conv branches each."""
    blocks, cin = [MobileOneBlock(3, widths[0], 3, 2, num_conv_branches=branches)], widths[0]
    for width, depth in zip(widths, depths):
        for j in range(depth):
            blocks.append(MobileOneBlock(cin, cin, 3, 2 if j == 0 else 1, group_size=1, num_conv_branches=branches))
            blocks.append(MobileOneBlock(cin, width, 1, 1, num_conv_branches=branches))
            cin = width
    return _with_shape(nn.Sequential(*blocks, ClassifierHead(cin, num_classes)), (2, 3, image_size, image_size))


class Conv2dBN(ConvBn):
    """repvit.py's ``Conv2d_BN``: a conv+BN with its own ``fuse``."""

    @torch.no_grad()
    def fuse(self):
        c, bn = self.conv, self.bn
        k = bn.weight / (bn.running_var + bn.eps) ** 0.5
        conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, groups=c.groups)
        conv.weight.copy_(c.weight * k[:, None, None, None])
        conv.bias.copy_(bn.bias - bn.running_mean * k)
        return conv


class RepVggDw(nn.Module):
    """repvit.py's ``RepVggDw``: ``bn(conv(x) + conv1(x) + x)``, depthwise, with its own ``fuse``."""

    def __init__(self, ed, kernel_size=3):
        super().__init__()
        self.conv = ConvBn(ed, ed, kernel_size, groups=ed)
        self.conv1 = nn.Conv2d(ed, ed, 1, 1, 0, groups=ed)
        self.bn = nn.BatchNorm2d(ed)
        self.dim = ed

    def forward(self, x):
        return self.bn(self.conv(x) + self.conv1(x) + x)

    @torch.no_grad()
    def fuse(self):
        w, b = _fuse(self.conv, self.dim, self.dim, 3)
        conv1_w = F.pad(self.conv1.weight, [1, 1, 1, 1])
        identity = F.pad(torch.ones_like(self.conv1.weight), [1, 1, 1, 1])
        w, b = w + conv1_w + identity, b + self.conv1.bias
        k = self.bn.weight / (self.bn.running_var + self.bn.eps) ** 0.5
        conv = nn.Conv2d(self.dim, self.dim, 3, 1, 1, groups=self.dim)
        conv.weight.copy_(w * k[:, None, None, None])
        conv.bias.copy_(self.bn.bias + (b - self.bn.running_mean) * k)
        return conv


class RepViTBlock(nn.Module):
    def __init__(self, dim, mlp_ratio=2):
        super().__init__()
        self.token_mixer = RepVggDw(dim)
        self.channel_mixer = nn.Sequential(Conv2dBN(dim, dim * mlp_ratio, 1), nn.GELU(), Conv2dBN(dim * mlp_ratio, dim, 1))

    def forward(self, x):
        x = self.token_mixer(x)
        return x + self.channel_mixer(x)


def repvit_m1(embed_dims=(8, 16, 24, 32), depths=(2, 2, 14, 2), num_classes: int = 10, image_size: int = 32):
    """RepViT-M1 (full size: ``embed_dims=(48, 96, 192, 384)``): RepVggDw token mixers, conv+BN downsampling."""
    c = embed_dims[0]
    parts = [Conv2dBN(3, c // 2, 3, 2), nn.GELU(), Conv2dBN(c // 2, c, 3, 2)]
    for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
        if i > 0:
            parts += [Conv2dBN(embed_dims[i - 1], embed_dims[i - 1], 3, 2, groups=embed_dims[i - 1]),
                      Conv2dBN(embed_dims[i - 1], dim, 1)]
        parts += [RepViTBlock(dim) for _ in range(depth)]
    parts.append(ClassifierHead(embed_dims[-1], num_classes))
    return _with_shape(nn.Sequential(*parts), (2, 3, image_size, image_size))


# ---------------------------------------------------------------- families with no reparameterize of their own


class ACBlock(nn.Module):
    """ACNet's asymmetric block (training form): 3x3 + 1x3 + 3x1 conv+BN of one input, summed."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.square = ConvBn(cin, cout, 3, stride)
        self.hor = nn.Sequential(nn.Conv2d(cin, cout, (1, 3), stride, (0, 1), bias=False), nn.BatchNorm2d(cout))
        self.ver = nn.Sequential(nn.Conv2d(cin, cout, (3, 1), stride, (1, 0), bias=False), nn.BatchNorm2d(cout))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.square(x) + self.hor(x) + self.ver(x))


class YoloV6RepVGGBlock(nn.Module):
    """YOLOv6's ``RepVGGBlock`` (training form): ``nonlinearity(se(rbr_dense(x) + rbr_1x1(x) + rbr_identity(x)))``."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.nonlinearity, self.se = nn.ReLU(), nn.Identity()
        self.rbr_identity = nn.BatchNorm2d(cin) if cout == cin and stride == 1 else None
        self.rbr_dense = ConvBn(cin, cout, 3, stride)
        self.rbr_1x1 = ConvBn(cin, cout, 1, stride, padding=0)

    def forward(self, inputs):
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.nonlinearity(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out))


class DBBStyleBlock(nn.Module):
    """A DiverseBranchBlock-style block: k x k conv+BN, 1x1 conv+BN and an average pool + BN, summed."""

    def __init__(self, cin, cout, k=3, stride=1):
        super().__init__()
        self.dbb_origin = ConvBn(cin, cout, k, stride)
        self.dbb_1x1 = ConvBn(cin, cout, 1, stride, padding=0)
        self.dbb_avg = nn.Sequential(nn.AvgPool2d(k, stride, k // 2), nn.BatchNorm2d(cin)) if cin == cout else None
        self.nonlinear = nn.ReLU()

    def forward(self, x):
        out = self.dbb_origin(x) + self.dbb_1x1(x)
        if self.dbb_avg is not None:
            out = out + self.dbb_avg(x)
        return self.nonlinear(out)


def _family(block, widths=(8, 16, 16), num_classes=10, image_size=32):
    parts, cin = [], 3
    for i, width in enumerate(widths):
        parts.append(block(cin, width, stride=2 if width != cin else 1))
        cin = width
    return _with_shape(nn.Sequential(*parts, ClassifierHead(cin, num_classes)), (2, 3, image_size, image_size))


def acnet_net(widths=(8, 16, 16)):
    return _family(ACBlock, widths)


def yolov6_net(widths=(8, 16, 16)):
    return _family(YoloV6RepVGGBlock, widths)


def dbb_style_net(widths=(8, 16, 16)):
    return _family(DBBStyleBlock, widths)


def reparameterize_model(model: nn.Module) -> nn.Module:
    """timm's ``reparameterize_model``: a copy with each module's own ``reparameterize`` (or ``fuse``) called."""
    model = copy.deepcopy(model)

    def visit(module):
        for name, child in module.named_children():
            if hasattr(child, "fuse"):
                setattr(module, name, child.fuse())
            elif hasattr(child, "reparameterize"):
                child.reparameterize()
            else:
                visit(child)

    visit(model)
    return model
