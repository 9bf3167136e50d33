"""Whole models: recorded dataflow, the zoo, in place, the plan as data, frozen BNs, modules held at two places,
nested inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bntool
from bntool.errors import VerificationError
from bntool.folding.rules import plan_fold
from examples import models as zoo
from tests.conftest import randomize_bn
from tests.fold_models import (
    Aliased,
    ListOfImages,
    assert_computes_original,
    corrupt_nth_fold,
    random_inputs,
    reused_block,
)


def test_untraceable_model_folds_through_a_recorded_forward_pass():
    model = randomize_bn(zoo.untraceable_net(), seed=3)
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)
    folded, report = bntool.fold(model)
    assert report.plan.method == "recorded" and "torch.fx cannot trace" in report.plan.note
    assert len(report.plan.pairs) >= 2 and report.comparison.passed
    folded_bns = {p.bn for p in report.plan.pairs}
    assert all(isinstance(folded.get_submodule(n), nn.Identity) for n in folded_bns)


@pytest.mark.parametrize("factory", ["resnet_small", "mlp_bn", "conv1d_net", "conv3d_net", "two_io_net", "lenet"])
def test_zoo_models_fold_completely(factory):
    model = randomize_bn(getattr(zoo, factory)(), seed=11)
    folded, report = bntool.fold(model)
    assert report.plan.skips == () and report.comparison.passed
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())


def test_inplace_fold_changes_the_given_model():
    model = randomize_bn(zoo.lenet(), seed=1)
    folded, _ = bntool.fold(model, inplace=True)
    assert folded is model and isinstance(model[1], nn.Identity)


def test_plan_is_data_and_recipe_step_is_json():
    import json

    model = randomize_bn(zoo.resnet_small(), seed=1)
    plan = plan_fold(model)
    step = json.loads(json.dumps(plan.recipe_step()))
    assert step["op"] == "fold" and len(step["pairs"]) == len(plan.pairs) == 11


@pytest.mark.parametrize("affine", ["frozen", "trainable"])
def test_a_frozen_model_folds_like_an_ordinary_one(affine):
    """Frozen BNs (bntool freeze) fold into their producers; the result matches the original in eval mode."""
    from bntool.freezing.freeze import freeze
    from bntool.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d

    torch.manual_seed(0)
    original = randomize_bn(zoo.lenet(), seed=6)
    frozen, _ = freeze(original, affine=affine)
    assert sum(isinstance(m, FrozenBatchNorm1d | FrozenBatchNorm2d) for m in frozen.modules()) == 4
    folded, report = bntool.fold(frozen)
    assert len(report.plan.pairs) == 4 and report.plan.skips == ()
    assert not any(isinstance(m, FrozenBatchNorm1d | FrozenBatchNorm2d) for m in folded.modules())
    assert_computes_original(folded, original, random_inputs((3, 1, 28, 28)))


def test_folded_copy_shares_no_module_with_the_original():
    """The copy that ``fold`` works on holds the removed BNs of the original until they are replaced: none may
    be left in the result, or a later change to the folded model would change the original."""
    model = randomize_bn(zoo.resnet_small(), seed=0).eval()
    folded, report = bntool.fold(model, verify=False)
    assert report.done
    originals = {id(m) for m in model.modules()}
    assert not [name for name, m in folded.named_modules() if id(m) in originals]


def test_a_bn_held_at_two_places_goes_from_both_and_the_original_keeps_it_at_both():
    """The module folded away is gone wherever the copy held it (an alias is the same module); the original's
    BN is never touched through the copy."""
    model = randomize_bn(Aliased(), seed=1).eval()
    before = copy.deepcopy(model.state_dict())
    folded, report = bntool.fold(model, example_inputs=(torch.randn(1, 3, 8, 8),), verify=False)
    assert [p.bn for p in report.done] == ["bn"]
    assert isinstance(folded.bn, nn.Identity) and folded.alias is folded.bn
    assert isinstance(model.bn, nn.BatchNorm2d) and model.alias is model.bn
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("inplace", [False, True])
def test_a_block_held_at_two_places_folds_once_and_leaves_no_bn_at_either(inplace):
    """The conv's weight is not "shared with another layer": it is the same layer. The BN goes from both places."""
    model = randomize_bn(reused_block(), seed=4).eval()
    inputs = random_inputs((2, 3, 6, 6))
    original = copy.deepcopy(model)
    folded, report = bntool.fold(model, example_inputs=inputs, inplace=inplace)
    assert [(p.bn, p.into) for p in report.plan.pairs] == [("2", "1")] and report.plan.skips == ()
    assert isinstance(folded[2], nn.Identity) and folded[5] is folded[2] and folded[4] is folded[1]
    assert_computes_original(folded, original, inputs)
    if not inplace:
        assert folded[1] is not model[1] and isinstance(model[2], nn.BatchNorm2d) and model[5] is model[2]


def test_a_block_held_at_two_places_reloads_and_undoes_at_both(monkeypatch, tmp_path):
    model = randomize_bn(reused_block(), seed=4).eval()
    inputs = random_inputs((2, 3, 6, 6))
    folded, _ = bntool.fold(copy.deepcopy(model), example_inputs=inputs)
    bntool.save(folded, tmp_path / "f.safetensors")
    fresh = bntool.load(tmp_path / "f.safetensors", reused_block()).eval()
    assert isinstance(fresh[2], nn.Identity) and fresh[5] is fresh[2]
    with torch.no_grad():
        assert torch.equal(fresh(*inputs), folded(*inputs))

    before = copy.deepcopy(model.state_dict())
    corrupt_nth_fold(monkeypatch, 1)
    with pytest.raises(VerificationError):
        bntool.fold(model, example_inputs=inputs, inplace=True, strict=True)
    assert type(model[2]) is nn.BatchNorm2d and model[5] is model[2]  # back at both places
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("untraceable", [False, True])
def test_inputs_nested_in_lists_and_dicts_fold_freeze_and_inspect(untraceable):
    model = randomize_bn(ListOfImages(untraceable), seed=2).eval()
    inputs = ([torch.randn(3, 8, 8), torch.randn(3, 8, 8)], {"scale": torch.tensor(1.5)})
    folded, report = bntool.fold(model, example_inputs=inputs)
    assert report.plan.method == ("recorded" if untraceable else "fx")
    assert [p.bn for p in report.plan.pairs] == ["bn"] and report.comparison.passed
    assert_computes_original(folded, model, inputs)
    frozen, freeze_report = bntool.freeze(copy.deepcopy(model), example_inputs=inputs)
    assert freeze_report.check.passed
    assert [r.name for r in bntool.inspect(model, inputs).rows] == ["bn"]
    with pytest.raises(bntool.InputError, match="an example input is a list; an ONNX graph takes tensors"):
        bntool.export_onnx(model, "never-written.onnx", example_inputs=inputs)
