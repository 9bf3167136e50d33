"""``bntool.runtime.cloning.clone``: a deep copy of a module tree that shares exactly the tensors it is told to."""

import copy

import torch
from torch import nn

from bntool.runtime.cloning import clone


class Custom(nn.Module):
    """A module that customises copying: clone falls back to ``copy.deepcopy`` for it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.register_buffer("scale", torch.rand(3))

    def __deepcopy__(self, memo):
        new = Custom.__new__(Custom)
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return new


class Cached(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
        self.bn = nn.BatchNorm2d(4)
        self.custom = Custom()
        self.cache = {"k": torch.ones(2)}
        self.sizes = [1, 2]

    def forward(self, x):
        return self.bn(self.conv(x))


def _tensors(model):
    return [*model.parameters(), *model.buffers()]


def test_share_all_shares_every_parameter_and_buffer_and_nothing_else():
    model = Cached()
    model.conv.register_forward_hook(lambda *a: None)
    copied = clone(model, share_all=True)
    assert all(a is b for a, b in zip(_tensors(model), _tensors(copied), strict=True))  # custom module's included
    assert copied.custom is not model.custom and copied.custom.fc is not model.custom.fc
    for a, b in zip(model.modules(), copied.modules(), strict=True):
        assert a is not b and type(a) is type(b)
        assert a._forward_hooks is not b._forward_hooks and a._modules is not b._modules
    assert list(copied.conv._forward_hooks.values()) == list(model.conv._forward_hooks.values())
    assert copied.cache is not model.cache and copied.cache["k"] is not model.cache["k"]  # not a parameter or buffer
    assert copied.sizes == model.sizes and copied.sizes is not model.sizes
    copied.cache["x"] = 1
    copied.eval()
    assert "x" not in model.cache and model.training


def test_share_only_the_given_tensors():
    model = Cached()
    copied = clone(model, share=[model.conv.weight])
    assert copied.conv.weight is model.conv.weight
    others = [(a, b) for a, b in zip(_tensors(model), _tensors(copied), strict=True) if a is not model.conv.weight]
    assert others and all(a is not b and a.data_ptr() != b.data_ptr() and torch.equal(a, b) for a, b in others)
    assert all(type(a) is type(b) for a, b in others)  # parameters stay parameters
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert torch.equal(copied(x), model(x))


class KeepsBNTraining(nn.Module):
    """A module whose ``train`` does more than set flags (a common fine-tuning trick): eval mode must go through it."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.calls = 0

    def train(self, mode: bool = True):
        self.calls += 1
        return super().train(mode)


def test_eval_mode_copies_are_in_eval_mode_and_the_original_keeps_its_mode():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Sequential(nn.BatchNorm2d(3), nn.Dropout()))
    model.train()
    copied = clone(model, share_all=True, eval_mode=True)
    assert not any(m.training for m in copied.modules()) and all(m.training for m in model.modules())
    custom = nn.Sequential(KeepsBNTraining()).train()
    copied = clone(custom, share_all=True, eval_mode=True)
    assert copied[0].calls == custom[0].calls + 1  # its own train() ran, on the copy only
    assert not any(m.training for m in copied.modules()) and all(m.training for m in custom.modules())
