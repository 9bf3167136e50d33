"""The float64 reference's convolutions: exact in float64 on every shape they take, and taken by every
float64 reference run."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import bntool
from bntool.runtime import float64
from bntool.runtime.depthwise import depthwise_conv
from bntool.runtime.exactconv import Scratch, shifted_conv
from bntool.runtime.float64 import exact_float64, route
from bntool.runtime.running import run_on
from examples.models import randomize_bn_

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
EPS = torch.finfo(torch.float64).eps


def assert_float64_exact(got, x, weight, bias, stride, padding, dilation, groups):
    """``got`` within a few float64 roundings of the convolution, each output's rounding scaled by the sum of the
    magnitudes of its terms (a float32 step anywhere would be ~1e-7 of it, a misplaced tap of order 1)."""
    conv = CONV[weight.dim() - 2]
    expected = conv(x, weight, bias, stride, padding, dilation, groups)
    magnitude = conv(x.abs(), weight.abs(), None if bias is None else bias.abs(), stride, padding, dilation, groups)
    assert got.shape == expected.shape and got.dtype == torch.float64
    terms = weight[0].numel() + 1
    assert bool(((got - expected).abs() <= 2 * terms * EPS * magnitude).all()), (got - expected).abs().max()


CASES = [  # dims, batch, channels, out, groups, kernel, stride, padding, dilation, size, bias, channels-last
    (2, 1, 3, 8, 1, 7, 2, 3, 1, 30, True, False),  # a ResNet stem: stride 2, padding, the phases
    (2, 2, 6, 5, 1, 3, 1, 1, 1, 17, False, False),  # batch > 1
    (2, 1, 4, 6, 1, (3, 2), (2, 3), (1, 0), (2, 1), 19, True, False),  # a rectangular kernel, per-dim strides, dilation
    (2, 2, 4, 4, 1, 4, 1, "same", 1, 11, True, False),  # 'same' with an even kernel: the odd zero at the end
    (2, 1, 5, 3, 1, 3, 1, "valid", 2, 12, False, True),  # channels-last input
    (2, 3, 8, 8, 8, 3, 1, 1, 1, 20, True, False),  # depthwise
    (2, 2, 6, 12, 6, 5, 2, 2, 1, 23, True, True),  # depthwise, multiplier 2, stride 2, channels-last
    (2, 1, 6, 9, 3, 3, 1, 1, 1, 14, True, False),  # grouped
    (2, 1, 4, 4, 4, 1, 2, 0, 1, 9, True, False),  # depthwise 1x1, strided
    (1, 2, 4, 6, 1, 5, 3, 2, 2, 40, True, False),
    (3, 1, 3, 4, 1, 3, 2, 1, 1, 9, True, False),
    (3, 2, 4, 4, 4, (3, 1, 2), 1, "same", (1, 1, 2), 7, False, False),
]


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("case", CASES, ids=[f"d{c[0]}b{c[1]}c{c[2]}o{c[3]}g{c[4]}k{c[5]}s{c[6]}p{c[7]}r{c[8]}"
                                             f"{'-cl' if c[11] else ''}" for c in CASES])
def test_shifted_conv_is_the_float64_convolution(case):
    # catches: a tap in the wrong phase or offset, a dropped or kept extra column, the 'same' pad's odd end,
    # the group / multiplier channel order, the bias, the layout of a channels-last input, any float32 step
    dims, batch, channels, out, groups, kernel, stride, padding, dilation, size, has_bias, last = case
    gen = torch.Generator().manual_seed(len(str(case)))
    kernel = (kernel,) * dims if isinstance(kernel, int) else kernel
    x = torch.randn(batch, channels, *(size,) * dims, generator=gen, dtype=torch.float64) * 3 + 1
    if last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(out, channels // groups, *kernel, generator=gen, dtype=torch.float64)
    bias = torch.randn(out, generator=gen, dtype=torch.float64) if has_bias else None
    got = shifted_conv(x, weight, bias, stride, padding, dilation, groups)
    assert_float64_exact(got, x, weight, bias, stride, padding, dilation, groups)
    assert got.is_contiguous(memory_format=torch.channels_last if last else torch.contiguous_format)


def test_shifted_conv_on_random_shapes():
    # catches what the named cases miss: odd sizes against strides, maps smaller than a dilated kernel's reach
    rng = random.Random(0)
    for _ in range(40):
        dims, groups_kind = rng.choice([1, 2, 2, 3]), rng.choice(["dense", "depthwise", "grouped"])
        channels = rng.choice([2, 3, 4, 6])
        groups = {"dense": 1, "depthwise": channels, "grouped": 2 if channels % 2 == 0 else 1}[groups_kind]
        out = groups * rng.choice([1, 2, 3])
        kernel = tuple(rng.choice([1, 2, 3, 5]) for _ in range(dims))
        stride = tuple(rng.choice([1, 2, 3]) for _ in range(dims))
        dilation = tuple(rng.choice([1, 2]) for _ in range(dims))
        padding = rng.choice([0, 1, tuple(rng.choice([0, 2]) for _ in range(dims))])
        size = [rng.choice([1, 4, 7]) + (k - 1) * d for k, d in zip(kernel, dilation)]
        x = torch.randn(rng.choice([1, 3]), channels, *size, dtype=torch.float64)
        weight = torch.randn(out, channels // groups, *kernel, dtype=torch.float64)
        bias = torch.randn(out, dtype=torch.float64) if rng.random() < 0.5 else None
        got = shifted_conv(x, weight, bias, stride, padding, dilation, groups)
        assert_float64_exact(got, x, weight, bias, stride, padding, dilation, groups)


def test_depthwise_conv_on_the_cases_it_takes():
    # the small-map kernel: a depthwise conv with a multiplier, stride, padding and channels-last
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 8, 8, generator=gen, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(12, 1, 3, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(12, generator=gen, dtype=torch.float64)
    assert_float64_exact(depthwise_conv(x, weight, bias, 2, 1), x, weight, bias, 2, 1, 1, 6)


def _args(channels, out, groups, kernel, size, dtype=torch.float64, stride=1, padding=1):
    x = torch.zeros(1, channels, size, size, dtype=dtype)
    return x, torch.zeros(out, channels // groups, kernel, kernel, dtype=dtype), None, stride, padding, groups


def test_route_takes_the_slow_float64_convolutions_and_leaves_the_rest():
    # catches: a float32 call, a 1x1 or grouped conv, or a strided 'same' (torch's own refusal) taken
    assert route(*_args(3, 8, 1, 7, 128, stride=2, padding=3)) is shifted_conv  # a narrow stem
    assert route(*_args(3, 32, 1, 3, 224, stride=2)) is None  # a wide one: torch's one unfolded product
    assert route(*_args(16, 16, 1, 3, 64)) is shifted_conv
    assert route(*_args(64, 64, 64, 3, 56)) is shifted_conv  # depthwise, a medium map
    assert route(*_args(32, 32, 32, 3, 112)) is None  # a large one: torch's own, a channel at a time
    assert route(*_args(64, 64, 64, 3, 14)) is shifted_conv
    assert route(*_args(64, 64, 64, 5, 14)) is depthwise_conv  # depthwise, a small map for its kernel
    assert route(*_args(64, 64, 64, 3, 7)) is depthwise_conv
    assert route(*_args(16, 16, 1, 3, 8)) is None  # a small map: torch's own is as fast
    assert route(*_args(16, 32, 1, 1, 64, padding=0)) is None  # 1x1: one product already
    assert route(*_args(16, 16, 4, 3, 64)) is None  # grouped
    assert route(*_args(16, 16, 1, 3, 64, dtype=torch.float32)) is None
    assert route(*_args(16, 16, 1, 3, 64, stride=2, padding="same")) is None
    x, weight, *rest = _args(16, 16, 1, 3, 64)
    assert route(x.requires_grad_(), weight, *rest) is None  # a graph for autograd: torch's own
    with torch.no_grad():
        assert route(x, weight, *rest) is shifted_conv


class _Shared(nn.Module):
    """A forward that reads another module's weight: ``lent`` cannot lend it, ``run_on`` runs a whole copy."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(F.conv2d(x, self.conv.weight, self.conv.bias, padding=1))


MODELS = {
    "lent": lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)),
    "whole copy": _Shared,
    "already float64": lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)).double(),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_float64_run_on_the_cpu_takes_the_exact_kernels(name, monkeypatch):
    # catches: a path of run_on (lent, whole copy, a model already in float64) without the mode, the mode on in
    # float32 runs, or left on after the run
    model = randomize_bn_(MODELS[name](), seed=1).eval()
    x = torch.randn(2, 3, 48, 48)
    calls = []
    real = float64.shifted_conv
    monkeypatch.setattr(float64, "shifted_conv", lambda **k: calls.append(k["input"].dtype) or real(**k))
    (high,) = [t for _, t in run_on(model, [x], torch.device("cpu"), torch.float64)]
    assert calls and set(calls) == {torch.float64}
    with torch.no_grad():
        plain = model.double()(x.double())
    torch.testing.assert_close(high, plain, atol=1e-12, rtol=1e-12)
    assert torch._C._len_torch_function_stack() == 0
    calls.clear()
    run_on(model.float(), [x], torch.device("cpu"))
    assert calls == []


def test_the_mode_is_off_between_layers_and_after_a_forward_that_raised():
    # catches: the mode left on the stack when a forward raises, or on around ops outside the convolutions
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(torch._C._len_torch_function_stack())
            return x

    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3)

        def forward(self, x):
            raise ValueError("no")

    model = nn.Sequential(nn.Conv2d(2, 2, 3), Probe()).double()
    with exact_float64(model):
        model(torch.randn(1, 2, 6, 6, dtype=torch.float64))
    assert seen == [0]
    with pytest.raises(ValueError), exact_float64(Fails()) as failing:
        failing(torch.randn(1, 2, 6, 6, dtype=torch.float64))
    assert torch._C._len_torch_function_stack() == 0


def test_the_commands_float64_references_take_the_exact_kernels(monkeypatch):
    # catches: fold's or freeze's float64 reference computed outside run_on's mode
    calls = []
    real = float64.shifted_conv
    monkeypatch.setattr(float64, "shifted_conv", lambda **k: calls.append(k["input"].dtype) or real(**k))
    model = randomize_bn_(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                        nn.Conv2d(8, 4, 3, padding=1)), seed=2).eval()
    x = torch.randn(1, 3, 48, 48)
    bntool.fold(model, example_inputs=(x,))
    assert torch.float64 in calls
    calls.clear()
    bntool.freeze(model, example_inputs=(x,))
    assert torch.float64 in calls


def test_aten_convolutions_of_a_program_take_the_exact_kernels(monkeypatch):
    # catches: the aten ops an exported graph calls left to torch's slow path, or a transposed one taken
    calls = []
    real = float64.shifted_conv
    monkeypatch.setattr(float64, "shifted_conv", lambda **k: calls.append(k["input"].dtype) or real(**k))
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    weight, bias = torch.randn(5, 3, 3, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    with exact_float64(nn.Module(), throughout=True):
        got = torch.ops.aten.convolution.default(x, weight, bias, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
        also = torch.ops.aten.conv2d.default(x, weight, bias, [1, 1], [0, 0])
        up = torch.ops.aten.convolution.default(x, weight.transpose(0, 1), None, [1, 1], [0, 0], [1, 1], True,
                                                [0, 0], 1)
    assert calls == [torch.float64, torch.float64]
    assert_float64_exact(got, x, weight, bias, 1, 1, 1, 1)
    assert_float64_exact(also, x, weight, bias, 1, 0, 1, 1)
    torch.testing.assert_close(up, F.conv_transpose2d(x, weight.transpose(0, 1)), atol=1e-12, rtol=1e-12)


def test_the_onnx_folds_float64_reference_takes_the_exact_kernels(monkeypatch):
    # catches: the ONNX graph's float64 run (torch convs inside onnx.reference) computed by torch's slow path
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from bntool.folding.onnx_fold import fold_onnx

    calls = []
    real = float64.shifted_conv
    monkeypatch.setattr(float64, "shifted_conv", lambda **k: calls.append(k["input"].dtype) or real(**k))
    gen = torch.Generator().manual_seed(4)
    tensors = {"w": torch.randn(8, 3, 3, 3, generator=gen), "scale": torch.rand(8, generator=gen) + 0.5,
               "shift": torch.randn(8, generator=gen), "mean": torch.randn(8, generator=gen),
               "var": torch.rand(8, generator=gen) + 0.5}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["y"], name="bn")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 48, 48])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 48, 48])],
        [numpy_helper.from_array(t.numpy(), name) for name, t in tensors.items()])
    _, report = fold_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert report.passed and torch.float64 in calls


def test_the_program_folds_float64_reference_takes_the_exact_kernels(monkeypatch):
    # catches: the program's float64 run (its module() through an fx interpreter) computed by torch's slow path
    calls = []
    real = float64.shifted_conv
    monkeypatch.setattr(float64, "shifted_conv", lambda **k: calls.append(k["input"].dtype) or real(**k))
    model = randomize_bn_(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)), seed=5).eval()
    x = torch.randn(1, 3, 48, 48)
    _, report = bntool.fold(torch.export.export(model, (x,)), example_inputs=(x,))
    assert report.passed and torch.float64 in calls


def test_outputs_never_live_in_the_reused_scratch():
    # catches: a result left in a working buffer the next convolution overwrites (a one-row output, whose
    # trimmed sums are contiguous, included)
    scratch = Scratch()
    gen = torch.Generator().manual_seed(6)
    shapes = [(2, 4, 9, 9), (1, 1, 3, 40), (2, 4, 9, 9)]  # a single output row between two that reuse its buffer
    results = []
    for shape in shapes:
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        weight = torch.randn(3, shape[1], 3, 3, generator=gen, dtype=torch.float64)
        results.append((shifted_conv(x, weight, None, 1, 0, 1, 1, scratch=scratch), x, weight))
        depthwise = torch.randn(shape[1], 1, 3, 3, generator=gen, dtype=torch.float64)
        results.append((shifted_conv(x, depthwise, None, 1, 0, 1, shape[1], scratch=scratch), x, depthwise))
    assert scratch.buffers  # the buffers were used
    for got, x, weight in results:
        groups = x.shape[1] if weight.shape[1] == 1 else 1
        assert_float64_exact(got, x, weight, None, 1, 0, 1, groups)
