"""BN subclasses: what their forward computes is traced (once per structure), folded, and what is left keeps running."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import bntool
from bntool.folding.arithmetic import identity_statistics
from tests.conftest import randomize_bn
from tests.fold_models import (
    BNClip,
    BNPReLU,
    BNReLU,
    FlaggedBNAct,
    MaskedBN,
    UntraceableBNReLU,
    assert_computes_original,
    counting_traces,
    random_inputs,
)


def test_bn_subclass_with_extra_work_keeps_only_the_extra_work():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 6, 3), BNReLU(6), nn.Conv2d(6, 2, 1)), seed=9)
    inputs = random_inputs((2, 3, 8, 8))
    folded, report = bntool.fold(model, example_inputs=inputs)
    [pair] = report.plan.pairs
    assert pair.bn_becomes == "rewritten"
    assert not isinstance(folded[1], nn.modules.batchnorm._BatchNorm)  # the normalization no longer runs
    x = torch.randn(4, 6, 5, 5)
    with torch.no_grad():
        assert torch.equal(folded[1](x), F.relu(x))  # what is left is exactly the ReLU
    assert_computes_original(folded, model, inputs)


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
    inputs = random_inputs((2, 3, 8, 8))
    with torch.no_grad():
        expected = model(*inputs)
    folded, report = bntool.fold(model, example_inputs=inputs, inplace=inplace)
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


def test_bn_subclasses_built_alike_share_one_trace_and_each_keeps_its_own_tensors(monkeypatch):
    # catches: a structure key that misses an attribute the forward branches on (the doubling layer would get
    # the ReLU's remainder and be rejected), a replica that keeps the first module's PReLU slope, a key that
    # merges different channel counts, and sharing that never happens
    traced = counting_traces(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), BNPReLU(6), nn.Conv2d(6, 6, 1), BNPReLU(6), nn.Conv2d(6, 4, 1),
                          BNPReLU(4), nn.Conv2d(4, 4, 1), FlaggedBNAct(4, relu=True), nn.Conv2d(4, 4, 1),
                          FlaggedBNAct(4, relu=False), nn.Conv2d(4, 4, 1), FlaggedBNAct(4, relu=False, settings={}))
    model = randomize_bn(model, seed=4).eval()
    with torch.no_grad():
        for i in (1, 3, 5):
            model[i].act.weight.uniform_(-0.9, 0.9)
    inputs = random_inputs((2, 3, 8, 8))
    folded, report = bntool.fold(model, example_inputs=inputs)
    assert report.passed and report.rejected == () and len(report.plan.pairs) == 6
    assert [type(m).__name__ for m in traced] == ["BNPReLU", "BNPReLU", "FlaggedBNAct", "FlaggedBNAct", "FlaggedBNAct"]
    for i in (1, 3, 5):
        assert torch.equal(folded[i].act.weight, model[i].act.weight)
        assert folded[i].act.weight.data_ptr() != model[i].act.weight.data_ptr()
    assert_computes_original(folded, model, inputs)
    monkeypatch.setattr(bntool.folding.bnform_trace, "structure", lambda module, rank: None)  # every module traced on its own
    alone, _ = bntool.fold(model, example_inputs=inputs)
    for key, value in alone.state_dict().items():
        assert torch.equal(folded.state_dict()[key], value), key


def test_a_trace_that_read_its_buffers_values_or_a_signed_zero_is_not_shared(monkeypatch):
    # catches: a shared trace that carries the first layer's clamp range to the second (exact on inputs that do
    # not reach the range, wrong beyond it, and always wrong with verify=False), and a key where 0.0 == -0.0.
    # The layers that read their range from a buffer keep running with identity statistics (next test).
    traced = counting_traces(monkeypatch)
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), BNClip(4, -100.0, 100.0), nn.Conv2d(4, 4, 1),
                                       BNClip(4, -100.0, 20.0), nn.Conv2d(4, 4, 1),
                                       BNClip(4, -100.0, 20.0, sign=0.0, from_buffer=False), nn.Conv2d(4, 4, 1),
                                       BNClip(4, -100.0, 20.0, sign=-0.0, from_buffer=False)), seed=2).eval()
    inputs = random_inputs((2, 3, 8, 8))
    folded, report = bntool.fold(model, example_inputs=inputs, verify=False)
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
    inputs = random_inputs((2, 3, 8, 8))
    folded, report = bntool.fold(model, example_inputs=inputs)
    assert [p.bn_becomes for p in report.plan.pairs] == ["identity"] and report.passed
    out = bntool.save(folded, tmp_path / "folded.safetensors", build=build)
    loaded = bntool.load(out, build()).eval()
    wide = (inputs[0] * 50,)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*wide), model(*wide), rtol=1e-5, atol=1e-4)


def test_a_bool_buffer_read_into_python_keeps_the_layer_running_exactly():
    # catches: the check that traces again with other values crashing on a bool buffer (add_ on bool)
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), MaskedBN(4)), seed=1).eval()
    model[1].mask[1] = False
    inputs = random_inputs((2, 3, 8, 8))
    folded, report = bntool.fold(model, example_inputs=inputs)
    assert [p.bn_becomes for p in report.plan.pairs] == ["identity"] and report.passed
    assert_computes_original(folded, model, inputs)


def test_untraceable_bn_subclass_keeps_running_as_an_exact_identity():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 6, 3), UntraceableBNReLU(6), nn.Conv2d(6, 2, 1)), seed=9)
    inputs = random_inputs((2, 3, 8, 8))
    folded, report = bntool.fold(model, example_inputs=inputs)
    [pair] = report.plan.pairs
    assert pair.bn_becomes == "identity"
    assert isinstance(folded[1], UntraceableBNReLU)  # kept, so its ReLU still runs
    x = torch.randn(4, 6, 5, 5)
    with torch.no_grad():
        assert torch.equal(folded[1](x), F.relu(x))  # normalization is an exact identity
    assert_computes_original(folded, model, inputs)


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
