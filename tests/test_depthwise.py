"""The float64 reference's depthwise convolutions: exact in float64, whatever the layout of the call."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bntool.runtime import depthwise
from bntool.runtime.depthwise import depthwise_conv, exact_depthwise, is_slow_depthwise
from bntool.runtime.running import run_on

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


def test_the_float64_run_takes_the_exact_path_only_for_float64_depthwise_calls(monkeypatch):
    # catches: the mode not active where the float64 reference runs, or taking float32 and dense convs
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 64, 5, padding=2, groups=64),
                          nn.Conv2d(64, 8, 1)).eval()
    x = torch.randn(2, 3, 6, 6)
    calls = []
    real = depthwise.depthwise_conv
    monkeypatch.setattr(depthwise, "depthwise_conv", lambda **k: calls.append(k["input"].dtype) or real(**k))
    (high,) = [t for _, t in run_on(model, [x], torch.device("cpu"), torch.float64)]
    assert calls == [torch.float64]
    with torch.no_grad():
        plain = model.double()(x.double())  # the plain float64 convolution, outside the mode
    torch.testing.assert_close(high, plain, atol=1e-12, rtol=1e-12)
    calls.clear()
    run_on(model.float(), [x], torch.device("cpu"))
    assert calls == []
    with exact_depthwise():
        big = torch.randn(1, 4, 20, 20, dtype=torch.float64)
        assert not is_slow_depthwise(big, torch.randn(4, 1, 3, 3, dtype=torch.float64), 4)  # a large map: torch's
