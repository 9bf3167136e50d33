"""Freezing BN subclasses with a forward of their own (timm's ``BatchNormAct2d``: normalize, drop, activation).

Their frozen form is the same class with its own ``training`` pinned to False:
the normalization always uses the stored statistics and never updates them,
while the drop and activation submodules follow the model's mode. Every model
here has randomized statistics and affine values.
"""

from __future__ import annotations

import copy
import io
import types

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import bntool
import bntool.io.checkpoint
from bntool.errors import VerificationError
from bntool.freezing.freeze import freeze, unfreeze
from bntool.norms import is_bntool_frozen, requested_mode
from examples import archs
from examples.models import randomize_bn_
from tests.fold_models import assert_computes_original
from tests.test_fold_archs import _activations, _aten_ops, _normalizations

BN_ACT_LAYERS = ["bn1", "ds.bn1", "ds.bn2", "ir.bn1", "ir.bn2", "ir.bn3", "bn2"]


def bn_act_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn_(archs.bn_act_net(), seed)


def images(seed: int = 1) -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def only_frozen_in_train_mode(model: nn.Module) -> nn.Module:
    """``model.train()``, then everything but the frozen layers back to eval (dropout elsewhere is random)."""
    model.train()
    for module in model.modules():
        if not is_bntool_frozen(module):
            module.training = False
    return model


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert list(now) == list(expected)
    for key, value in expected.items():
        assert torch.equal(now[key], value), key


def test_every_bn_act_layer_freezes_and_in_train_mode_computes_the_original_eval_output():
    # catches: a pin that does not hold (batch statistics in train mode: other output, statistics and
    # num_batches_tracked move), a subclass left unfrozen, state-dict keys renamed or reordered
    model = bn_act_net()
    x = images()
    frozen, report = freeze(model)
    assert [layer.name for layer in report.frozen] == BN_ACT_LAYERS and not report.skipped
    assert report.passed and report.check.frozen_layers == tuple(BN_ACT_LAYERS)
    assert all(layer.type == "BatchNormAct2d" for layer in report.frozen)
    for name in BN_ACT_LAYERS:
        layer = frozen.get_submodule(name)
        assert isinstance(layer, archs.BatchNormAct2d) and is_bntool_frozen(layer)
        assert type(layer).__name__ == "FrozenBatchNormAct2d"
    assert type(model.bn1) is archs.BatchNormAct2d  # the original is untouched
    before = state(frozen)
    assert list(before) == list(model.state_dict())

    only_frozen_in_train_mode(frozen)
    out = frozen(x)
    out.sum().backward()
    with torch.no_grad():
        expected = model.eval()(x)
    assert torch.equal(out, expected)
    assert_same_state(frozen, before)


def test_the_layer_reads_eval_mode_while_its_drop_and_activation_follow_the_model():
    # catches: a pin that also pins the submodules (dropout would stop working in fine-tuning), and a
    # mode that is lost (the layer must remember it was asked to train, for unfreeze and for restoring flags)
    frozen, _ = freeze(bn_act_net())
    frozen.train()
    assert frozen.bn1.training is False and requested_mode(frozen.bn1) is True
    assert frozen.bn1.drop.training is True and frozen.bn1.act.training is True
    x = images()
    assert not torch.equal(frozen(x), frozen(x))  # bn1's Dropout(0.1) is active
    frozen.eval()
    assert requested_mode(frozen.bn1) is False and frozen.bn1.drop.training is False
    assert torch.equal(frozen(x), frozen(x))
    frozen.bn1.training = True  # set directly, not through train(): still pinned
    assert frozen.bn1.training is False and requested_mode(frozen.bn1) is True


def test_affine_frozen_is_buffers_trainable_is_parameters_and_statistics_never_move():
    model = bn_act_net()
    frozen, _ = freeze(model, affine="frozen")
    bn = frozen.bn1
    assert not list(bn.parameters(recurse=False)) and {"weight", "bias"} <= set(bn._buffers)
    trainable, report = freeze(model, affine="trainable")
    assert report.frozen[0].affine == "trainable"
    bn = trainable.bn1
    assert bn.weight.requires_grad and bn.bias.requires_grad and isinstance(bn.weight, nn.Parameter)
    statistics = {k: v.clone() for k, v in bn.state_dict().items() if k.startswith("running")}
    weight = bn.weight.detach().clone()
    optimizer = torch.optim.SGD(trainable.parameters(), lr=0.1)
    only_frozen_in_train_mode(trainable)
    trainable(images()).square().mean().backward()
    optimizer.step()
    assert not torch.equal(bn.weight, weight)  # gamma learns
    for key, value in statistics.items():
        assert torch.equal(bn.state_dict()[key], value), key


@pytest.mark.parametrize("build", [archs.bn_act_without_bias, archs.bn_act_without_weight],
                         ids=["without-bias", "without-weight"])
def test_a_bn_act_with_one_affine_tensor_absent_freezes_and_unfreezes(build):
    torch.manual_seed(3)
    model = randomize_bn_(build(), 3)
    frozen, report = freeze(model)
    assert report.passed and [layer.name for layer in report.frozen] == ["bn"]
    present = "weight" if model.bn.weight is not None else "bias"
    absent = "bias" if present == "weight" else "weight"
    assert getattr(frozen.bn, absent) is None and present in frozen.bn._buffers
    thawed, _ = unfreeze(frozen)
    assert type(thawed.bn) is archs.BatchNormAct2d and getattr(thawed.bn, absent) is None
    assert getattr(thawed.bn, present).requires_grad
    assert_same_state(thawed, state(model))


def test_unfreeze_gives_the_class_back_with_the_same_values_and_it_trains_its_statistics_again():
    model = bn_act_net()
    frozen, _ = freeze(model)
    frozen.train()
    thawed, report = unfreeze(frozen)
    assert [layer.name for layer in report.unfrozen] == BN_ACT_LAYERS and report.passed
    assert all(layer.type == "BatchNormAct2d" for layer in report.unfrozen)
    assert type(thawed.bn1) is archs.BatchNormAct2d and thawed.bn1.training is True  # the mode it was asked for
    assert all(p.requires_grad for p in thawed.bn1.parameters(recurse=False))
    assert_same_state(thawed, state(model))
    before = thawed.bn1.running_mean.clone()
    only_frozen_in_train_mode(thawed)
    thawed.bn1.train()
    thawed(images())
    assert not torch.equal(thawed.bn1.running_mean, before)


def test_pickle_deepcopy_and_clone_keep_the_pin():
    frozen, _ = freeze(bn_act_net())
    x = images()
    frozen.eval()
    with torch.no_grad():
        expected = frozen(x)
    buffer = io.BytesIO()
    torch.save(frozen, buffer)
    buffer.seek(0)
    copies = [torch.load(buffer, weights_only=False), copy.deepcopy(frozen), bntool.runtime.cloning.clone(frozen)]
    for copied in copies:
        assert type(copied.bn1) is type(frozen.bn1)
        only_frozen_in_train_mode(copied)
        assert copied.bn1.training is False
        before = state(copied)
        with torch.no_grad():
            assert torch.equal(copied(x), expected)
        assert_same_state(copied, before)


def test_freeze_and_unfreeze_through_the_cli_and_bntool_load(tmp_path, cli):
    # catches: a recipe that bntool.load cannot replay on a freshly built model, values changed on the way
    model = bn_act_net()
    ckpt, frozen_file, thawed_file = tmp_path / "net.pt", tmp_path / "frozen.safetensors", tmp_path / "thawed.safetensors"
    torch.save(model.state_dict(), ckpt)
    spec = "examples/archs.py:bn_act_net"
    result = cli("freeze", ckpt, "--model", spec, "--out", frozen_file)
    assert result.code == 0, result.out + result.err
    assert "Verified" in result.out and all(name in result.out for name in BN_ACT_LAYERS)
    loaded = bntool.load(frozen_file, archs.bn_act_net())
    assert all(is_bntool_frozen(loaded.get_submodule(n)) for n in BN_ACT_LAYERS)
    assert_same_state(loaded, state(model))
    x = images()
    only_frozen_in_train_mode(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    result = cli("unfreeze", frozen_file, "--model", spec, "--out", thawed_file)
    assert result.code == 0, result.out + result.err
    thawed = bntool.load(thawed_file, archs.bn_act_net())
    assert all(type(thawed.get_submodule(n)) is archs.BatchNormAct2d for n in BN_ACT_LAYERS)
    assert [step["op"] for step in bntool.io.checkpoint.read(thawed_file).recipe] == ["freeze", "unfreeze"]


def test_recalibrating_a_frozen_bn_act_model_equals_recalibrating_its_unfrozen_form():
    # catches: a pin left on during the pass (the statistics would not be the batches'), a pin lost after it,
    # the model's modes not given back, and a pass that puts a BN's own dropout in train mode (bn1 holds one:
    # two recalibrations on the same batches would differ)
    model = bn_act_net()
    frozen, _ = freeze(model)
    batches = [images(seed) for seed in range(3)]
    reference, again = copy.deepcopy(model), copy.deepcopy(model)
    bntool.recalibrate(reference, batches)
    bntool.recalibrate(again, batches)
    assert_same_state(again, state(reference))
    frozen.train()
    bntool.recalibrate(frozen, batches)
    for name in BN_ACT_LAYERS:
        ours, theirs = frozen.get_submodule(name), reference.get_submodule(name)
        assert is_bntool_frozen(ours) and ours.training is False and requested_mode(ours) is True
        assert torch.equal(ours.running_mean, theirs.running_mean), name
        assert torch.equal(ours.running_var, theirs.running_var), name
    assert frozen.bn1.drop.training is True
    assert not torch.equal(frozen.bn1.running_mean, model.bn1.running_mean)


def test_fold_of_a_frozen_bn_act_model_runs_no_normalization_keeps_the_activations_and_the_modes():
    model = bn_act_net()
    frozen, _ = freeze(model)
    frozen.train()
    inputs = (images(),)
    folded, report = bntool.fold(frozen, example_inputs=inputs)
    assert report.passed and not report.skipped
    assert requested_mode(frozen.bn1) is True and frozen.bn1.drop.training is True  # flags given back
    kept = folded.get_submodule("bn1")  # what is left of bn1: its drop and act, in the mode the model was asked for
    assert not is_bntool_frozen(kept) and kept.training is True and kept.drop.training is True
    model.eval()
    original_ops, folded_ops = _aten_ops(model, inputs), _aten_ops(folded.eval(), inputs)
    assert _normalizations(original_ops) == len(BN_ACT_LAYERS) and _normalizations(folded_ops) == 0
    assert _activations(folded_ops) == _activations(original_ops)
    assert_computes_original(folded, model, inputs)


class AlwaysBatchStatistics(nn.BatchNorm2d):
    """A subclass that normalizes with batch statistics whatever its mode: pinning cannot freeze it."""

    def forward(self, x):
        return F.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, 0.1, self.eps))


def test_a_subclass_that_ignores_its_mode_fails_the_freeze_check():
    torch.manual_seed(0)
    model = randomize_bn_(nn.Sequential(nn.Conv2d(3, 4, 3), AlwaysBatchStatistics(4)), 0)
    with pytest.raises(VerificationError, match=r"changed in train mode in `1`") as caught:
        freeze(model, example_inputs=(images(),))
    assert caught.value.report.frozen[0].name == "1"


class DataDependentBNAct(nn.BatchNorm2d):
    """A BN + activation whose forward fx cannot trace (it branches on a value)."""

    def forward(self, x):
        y = super().forward(x)
        return F.relu(y) if bool(y.mean() > -1e9) else y


def test_fold_keeps_a_frozen_layers_affine_values_buffers_when_it_can_only_make_it_an_identity():
    torch.manual_seed(0)
    model = randomize_bn_(nn.Sequential(nn.Conv2d(3, 4, 3), DataDependentBNAct(4)), 0)
    inputs = (images(),)
    frozen, _ = freeze(model, example_inputs=inputs)
    folded, report = bntool.fold(frozen, example_inputs=inputs)
    assert report.passed and [p.bn_becomes for p in report.plan.pairs] == ["identity"]
    bn = folded[1]
    assert is_bntool_frozen(bn) and {"weight", "bias"} <= set(bn._buffers) and not bn._parameters.get("weight")
    assert_computes_original(folded, model, inputs)


class BNThenBN(nn.BatchNorm2d):
    """A BN subclass with a forward of its own that holds a BN of its own (a post-norm)."""

    def __init__(self, channels: int):
        super().__init__(channels)
        self.post = nn.BatchNorm2d(channels)

    def forward(self, x):
        return self.post(F.relu(super().forward(x)))


def test_a_bn_inside_a_frozen_bn_subclass_is_a_layer_of_its_own():
    # catches: a freeze / unfreeze that stops at the subclass and leaves the BN it holds as it was, unreported
    torch.manual_seed(0)
    model = randomize_bn_(nn.Sequential(nn.Conv2d(3, 4, 3), BNThenBN(4)), 0)
    inputs = (images(),)
    frozen, report = freeze(model, example_inputs=inputs)
    assert [layer.name for layer in report.frozen] == ["1", "1.post"] and report.passed
    assert is_bntool_frozen(frozen[1]) and is_bntool_frozen(frozen[1].post)
    before = state(frozen)
    frozen.train()
    frozen(*inputs)
    assert_same_state(frozen, before)
    thawed, again = unfreeze(frozen, example_inputs=inputs)
    assert [layer.name for layer in again.unfrozen] == ["1", "1.post"]
    assert type(thawed[1]) is BNThenBN and type(thawed[1].post) is nn.BatchNorm2d


def test_hooks_forwards_bound_to_the_layer_and_handles_carry_over_to_the_frozen_layer():
    # catches: a frozen layer that runs the discarded module's bound forward (and its old tensors), hooks
    # dropped on freezing (plain or subclass), a handle taken before freezing that no longer removes its hook
    torch.manual_seed(0)
    model = randomize_bn_(nn.Sequential(nn.Conv2d(3, 4, 3), archs.BatchNormAct2d(4), nn.BatchNorm2d(4)), 0)
    model[1].forward = types.MethodType(type(model[1]).forward, model[1])  # as a wrapper library sets it
    calls: list[str] = []
    handles = [model[i].register_forward_hook(lambda *_, i=i: calls.append(i)) for i in (1, 2)]
    inputs = (images(),)
    frozen, report = freeze(model, example_inputs=inputs, inplace=True)  # (a copy's hooks are the copy's own)
    assert frozen is model and report.passed and frozen[1].forward.__self__ is frozen[1]
    calls.clear()
    frozen.eval()(*inputs)
    assert calls == [1, 2]
    for handle in handles:
        handle.remove()
    calls.clear()
    frozen(*inputs)
    assert calls == []
    state_now = frozen.state_dict()
    state_now["1.weight"] = state_now["1.weight"] * 3  # the bound forward reads the frozen layer's own tensors
    before = frozen(*inputs)
    frozen.load_state_dict(state_now)
    assert not torch.equal(frozen(*inputs), before)
    assert "frozen: affine=frozen" in repr(frozen[1])


def test_recalibrate_leaves_a_users_own_forward_on_a_frozen_layer():
    frozen, _ = freeze(bn_act_net())
    wrapped = types.MethodType(type(frozen.bn1).forward, frozen.bn1)
    frozen.bn1.forward = wrapped
    bntool.recalibrate(frozen, [images()])
    assert frozen.bn1.__dict__.get("forward") is wrapped and frozen.bn1.training is False
