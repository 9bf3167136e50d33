"""Scalar steps held as tensors: ``conv -> * a -> + s -> BN`` where ``a`` / ``s`` are 0-dim or one-element tensors.

A constant scalar tensor (a buffer, a plain tensor attribute, a
``torch.tensor(2.2)`` literal in the forward) folds exactly as a Python
number does, with fx and with a recorded forward pass alike. A parameter, a
tensor of more than one element, or a value computed in the forward keeps
the refusal and its reason: forced through, each one breaks the model.
The first model is PyTorch's own ``torch.jit.freeze`` case
(``test_freezing.py``: ``test_conv_mul_add_bn``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bntool
import bntool.graph.fx as graph_fx
import bntool.graph.recorded as graph_recorded
from bntool.graph.ops import scalar_value
from examples.models import randomize_bn_

STANDS_BETWEEN = "an operation (`{}`) stands between its input's producer and the BN"


class ConvMulAddBn(nn.Module):
    """torch.jit.freeze's test case: ``bn(torch.add(torch.mul(conv(x), tensor1), tensor2))``, plain attributes."""

    def __init__(self, in_channels: int = 3, out_channels: int = 8, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)
        self.tensor1 = torch.tensor(2.2)
        self.tensor2 = torch.tensor(2)  # an integer tensor, as in PyTorch's test

    def forward(self, x):
        return self.bn(torch.add(torch.mul(self.conv(x), self.tensor1), self.tensor2))


class Steps(nn.Module):
    """``conv -> mul(scale) -> add(shift) -> bn``, the scale and shift held as ``kind`` says; ``traceable=False``
    makes fx fail (a branch on a value), so the dataflow is recorded from a forward pass."""

    def __init__(self, kind: str, traceable: bool = True):
        super().__init__()
        self.kind, self.traceable = kind, traceable
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        scale, shift = torch.tensor(2.2), torch.tensor([-0.7])  # 0-dim, and one element of one dim
        if kind in ("buffer", "vector"):
            self.register_buffer("scale", torch.tensor([2.2, -1.0, 0.5, 3.0]).view(1, 4, 1, 1) if kind == "vector"
                                 else scale)
            self.register_buffer("shift", shift)
        elif kind == "parameter":
            self.scale, self.shift = nn.Parameter(scale), shift
        elif kind == "attribute":
            self.scale, self.shift = scale, shift

    def forward(self, x):
        if not self.traceable and bool(x.isnan().any()):
            return x
        y = self.conv(x)
        if self.kind == "literal":
            return self.bn(torch.add(torch.mul(y, torch.tensor(2.2)), torch.tensor(-0.7)))
        if self.kind == "computed":  # a value the forward computes (here from the input)
            return self.bn(torch.add(torch.mul(y, x.mean()), torch.tensor(-0.7)))
        if self.kind == "computed_constant":  # computed from constants, still a computation in the forward
            return self.bn(torch.add(torch.mul(y, torch.tensor(1.1) * 2), torch.tensor(-0.7)))
        return self.bn(torch.add(torch.mul(self.scale, y), self.shift))  # (the scale first: x on the right)


class ForwardSteps(nn.Module):
    """``bn -> mul(scale buffer) -> add(shift attribute) -> conv``: a forward fold through tensor scalars."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn, self.conv = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 5, 1)
        self.register_buffer("scale", torch.tensor(-1.5))
        self.shift = torch.tensor(0.5)

    def forward(self, x):
        return self.conv(self.bn(torch.relu(self.stem(x))) * self.scale + self.shift)


def build(factory, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn_(factory(), seed).eval()


def inputs(shape=(2, 3, 8, 8), seed: int = 1) -> tuple[torch.Tensor]:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)),)


def assert_computes(folded: nn.Module, original: nn.Module, args) -> None:
    with torch.no_grad():
        expected = original.double()(*(a.double() for a in args)).float()
        original.float()
        torch.testing.assert_close(folded.eval()(*args), expected, rtol=1e-5, atol=1e-5)


def test_torch_jit_freeze_case_conv_mul_add_bn_folds_and_verifies(tmp_path):
    # catches: the 0.2 refusal ("an operation (`add`) stands between"); a fold that ignores a or s
    model = build(ConvMulAddBn)
    args = inputs((2, 3, 16, 16))
    folded, report = bntool.fold(model, example_inputs=args)
    assert [(p.bn, p.into, p.direction) for p in report.done] == [("bn", "conv", "backward")]
    assert report.skipped == () and report.rejected == () and report.passed
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert_computes(folded, model, args)
    out = bntool.save(folded, tmp_path / "folded.safetensors", build=lambda: ConvMulAddBn())
    loaded = bntool.load(out, ConvMulAddBn()).eval()  # the recipe replayed on a fresh model: same scalars
    with torch.no_grad():
        assert torch.equal(loaded(*args), folded(*args))


@pytest.mark.parametrize("traceable", [True, False], ids=["fx", "recorded"])
@pytest.mark.parametrize("kind", ["buffer", "attribute", "literal"])
def test_each_constant_scalar_tensor_folds_in_both_builders_and_survives_save_and_load(kind, traceable, tmp_path):
    model = build(lambda: Steps(kind, traceable))
    if kind == "buffer":  # a buffer is in the state dict: a value set after construction is what a load restores
        model.scale.fill_(-1.3)
    args = inputs()
    folded, report = bntool.fold(model, example_inputs=args)
    assert report.plan.method == ("fx" if traceable else "recorded")
    assert [(p.bn, p.into) for p in report.done] == [("bn", "conv")] and report.passed
    assert_computes(folded, model, args)
    out = bntool.save(folded, tmp_path / "folded.safetensors", build=lambda: Steps(kind, traceable))
    loaded = bntool.load(out, Steps(kind, traceable)).eval()
    other = inputs(seed=7)
    with torch.no_grad():
        assert torch.equal(loaded(*other), folded(*other))
    assert_computes(loaded, model, other)


def test_a_forward_fold_goes_through_tensor_scalars_too():
    model = build(ForwardSteps)
    args = inputs((2, 3, 5, 5))
    folded, report = bntool.fold(model, example_inputs=args)
    assert [(p.bn, p.into, p.direction) for p in report.done] == [("bn", "conv", "forward")] and report.passed
    assert_computes(folded, model, args)


REFUSED = {  # kind -> the operation the refusal names
    "parameter": "mul",
    "vector": "mul",
    "computed": "mul",
    "computed_constant": "mul",
}


@pytest.mark.parametrize("traceable", [True, False], ids=["fx", "recorded"])
@pytest.mark.parametrize("kind", list(REFUSED))
def test_a_parameter_a_vector_or_a_computed_value_keeps_the_refusal_and_its_reason(kind, traceable):
    model = build(lambda: Steps(kind, traceable))
    folded, report = bntool.fold(model, example_inputs=inputs())
    assert report.done == () and report.passed
    assert report.plan.reason_for("bn").startswith(STANDS_BETWEEN.format(REFUSED[kind]))
    assert isinstance(folded.bn, nn.BatchNorm2d)


def _forced(monkeypatch, accept) -> None:
    """Make both builders take what ``accept(tensor)`` says as a constant scalar, with its first element's value."""
    def value(t):
        return float(t.detach().flatten()[0]) if isinstance(t, torch.Tensor) and accept(t) else scalar_value(t)

    monkeypatch.setattr(graph_fx, "scalar_value", value)
    monkeypatch.setattr(graph_recorded, "scalar_value", value)


def test_forcing_a_vector_through_breaks_the_model_and_verification_rejects_it(monkeypatch):
    # the refusal is what keeps the fold exact: a per-channel scale taken as one number folds wrongly
    model = build(lambda: Steps("vector"))
    _forced(monkeypatch, lambda t: t.numel() == 4)
    folded, report = bntool.fold(model, example_inputs=inputs())
    assert report.done == () and [s.name for s in report.rejected] == ["bn"] and isinstance(folded.bn, nn.BatchNorm2d)
    assert report.rejected[0].reason.startswith("rejected by verification: folded into `conv`, layer `bn` differed")
    with pytest.raises(bntool.VerificationError):
        bntool.fold(model, example_inputs=inputs(), strict=True)


def test_forcing_a_parameter_through_breaks_the_model_once_it_trains(monkeypatch):
    # exact on the day, but the fold baked the parameter's value: a training step on it leaves the folded model behind
    model = build(lambda: Steps("parameter"))
    _forced(monkeypatch, lambda t: isinstance(t, nn.Parameter))
    folded, report = bntool.fold(model, example_inputs=inputs())
    assert [p.bn for p in report.done] == ["bn"]
    with torch.no_grad():
        model.scale.add_(0.5)
        folded.scale.add_(0.5)
        assert not torch.allclose(folded(*inputs(seed=3)), model(*inputs(seed=3)), rtol=1e-3, atol=1e-3)


def test_forcing_a_value_computed_from_the_input_breaks_the_model_on_other_inputs(monkeypatch):
    # recorded: the input's mean taken as a constant is right on the verification input only
    model = build(lambda: Steps("computed", traceable=False))
    monkeypatch.setattr(graph_recorded._Recorder, "scalar", lambda self, t, others: (
        float(t) if isinstance(t, torch.Tensor) and t.numel() == 1 and t.dim() == 0 else None))
    folded, report = bntool.fold(model, example_inputs=inputs())
    assert [p.bn for p in report.done] == ["bn"] and report.passed  # the verification input cannot tell
    other = (inputs(seed=5)[0] * 3 + 1,)
    with torch.no_grad():
        assert not torch.allclose(folded(*other), model(*other), rtol=1e-3, atol=1e-3)


class Spellings(nn.Module):
    """The same scalar steps spelt every way a forward spells them, with a 0-dim buffer and a (1, 1) attribute."""

    def __init__(self, form: str, traceable: bool = True):
        super().__init__()
        self.form, self.traceable = form, traceable
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.register_buffer("scale", torch.tensor(2.2))
        self.shift = torch.tensor([[0.3]])

    def forward(self, x):
        if not self.traceable and bool(x.isnan().any()):
            return x
        y = self.conv(x)
        if self.form == "operators":
            y = self.shift + y * self.scale
        elif self.form == "divide_subtract":
            y = (y / self.scale) - self.shift
        elif self.form == "reversed_subtract":
            y = self.shift - y
        elif self.form == "in_place":
            y = y.mul_(self.scale).add_(self.shift)
        elif self.form == "alpha":
            y = torch.add(y, self.shift, alpha=2.0)
        return self.bn(y)


@pytest.mark.parametrize("traceable", [True, False], ids=["fx", "recorded"])
@pytest.mark.parametrize("form", ["operators", "divide_subtract", "reversed_subtract", "in_place", "alpha"])
def test_every_spelling_of_a_scalar_step_folds_through_a_tensor_scalar(form, traceable):
    # catches: a builder that knows the tensor only as the second argument, or only torch.mul / torch.add
    model = build(lambda: Spellings(form, traceable))
    args = inputs()
    folded, report = bntool.fold(model, example_inputs=args)
    assert [p.bn for p in report.done] == ["bn"] and report.passed and report.rejected == ()
    assert_computes(folded, model, args)
