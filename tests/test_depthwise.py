"""The float64 reference's depthwise convolutions on small maps: exact in float64, whatever the layout of the call.

Which calls take them, and that every float64 reference run does: tests/test_float64.py."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from bntool.runtime.depthwise import depthwise_conv

CASES = [  # channels, multiplier, kernel, stride, padding, dilation, map
    (1152, 1, 5, 1, 2, 1, 3), (32, 1, 3, 2, 1, 1, 15), (16, 2, 3, 1, "same", 2, 9), (8, 1, 4, 1, "same", 1, 7),
    (8, 1, 3, 2, "valid", 1, 8), (6, 3, (3, 5), (2, 1), (1, 2), (1, 2), 11),
]


@pytest.mark.parametrize("case", CASES, ids=[f"c{c[0]}m{c[1]}k{c[2]}s{c[3]}p{c[4]}d{c[5]}h{c[6]}" for c in CASES])
def test_depthwise_conv_equals_the_float64_convolution(case):
    # catches: a tap misplaced (stride, dilation, 'same' padding's odd end), the channel multiplier's channel order,
    # the bias, and any float32 step (the error would be ~1e-7, not ~1e-15)
    channels, multiplier, kernel, stride, padding, dilation, size = case
    gen = torch.Generator().manual_seed(0)
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = torch.randn(2, channels, size, size, generator=gen, dtype=torch.float64) * 3 + 1
    weight = torch.randn(channels * multiplier, 1, *kernel, generator=gen, dtype=torch.float64)
    bias = torch.randn(channels * multiplier, generator=gen, dtype=torch.float64)
    expected = F.conv2d(x, weight, bias, stride, padding, dilation, channels)
    got = depthwise_conv(x, weight, bias, stride, padding, dilation)
    assert got.shape == expected.shape and got.dtype == torch.float64 and got.is_contiguous()
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    assert not torch.equal(got[:, :1], torch.zeros_like(got[:, :1]))


def test_conv1d_and_conv3d_too():
    gen = torch.Generator().manual_seed(1)
    x1 = torch.randn(2, 12, 9, generator=gen, dtype=torch.float64)
    w1 = torch.randn(12, 1, 3, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(depthwise_conv(x1, w1, None, 2, 1), F.conv1d(x1, w1, None, 2, 1, 1, 12),
                               atol=1e-12, rtol=1e-12)
    x3 = torch.randn(1, 5, 4, 5, 6, generator=gen, dtype=torch.float64)
    w3 = torch.randn(5, 1, 3, 3, 3, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(depthwise_conv(x3, w3, None, 1, 1), F.conv3d(x3, w3, None, 1, 1, 1, 5),
                               atol=1e-12, rtol=1e-12)
