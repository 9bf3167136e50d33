"""Frozen BatchNorm: train-mode output equals the original's eval output, and nothing in a frozen layer moves."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import bntool.report
from bntool import recipe
from bntool.errors import InputError, VerificationError
from bntool.freezing.check import check_frozen
from bntool.freezing.freeze import FreezeReport, freeze, replay, unfreeze
from bntool.frozen import NO_STATISTICS, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, FrozenSyncBatchNorm
from bntool.persist import REPLAYERS
from examples.models import randomize_bn_

# ----------------------------------------------------------------------------- models


class Stages(nn.Module):
    """stem / layer1 / layer2 / head, BN in each, so stages can be selected by pattern."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, eps=1e-3, momentum=0.3))
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None), nn.ReLU(),
                                    nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.layer2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 12), nn.BatchNorm1d(12),
                                  nn.ReLU(), nn.Dropout(dropout), nn.Linear(12, 5))

    def forward(self, x):
        return self.head(self.layer2(self.layer1(self.stem(x))))


def stages(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn_(Stages(**kwargs), seed)


ZOO = {
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6), nn.ReLU(), nn.Conv1d(6, 4, 1)), (4, 3, 10)),
    "conv2d": (lambda: Stages(), (4, 3, 8, 8)),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4), nn.ReLU()), (3, 2, 5, 5, 5)),
    "linear_bn1d": (lambda: nn.Sequential(nn.Linear(7, 9), nn.BatchNorm1d(9), nn.ReLU(), nn.Linear(9, 3)), (6, 7)),
    "non_affine": (lambda: nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5, affine=False), nn.ReLU()), (4, 3, 6, 6)),
}


def build(kind: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    factory, shape = ZOO[kind]
    torch.manual_seed(seed)
    model = randomize_bn_(factory(), seed)
    return model, torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))


def frozen_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (FrozenBatchNorm1d, FrozenBatchNorm2d,
                                                                    FrozenBatchNorm3d, FrozenSyncBatchNorm))}


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def train_steps(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


# ----------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("kind", sorted(ZOO))
def test_frozen_in_train_mode_computes_original_in_eval_mode(kind):
    original, x = build(kind)
    frozen, report = freeze(original, verify=False)
    assert not any(isinstance(m, _BatchNorm) for m in frozen.modules())
    assert [layer.name for layer in report.frozen] == [n for n, m in original.named_modules() if isinstance(m, _BatchNorm)]
    with torch.no_grad():
        expected = original.eval()(x)
        batch_stats = copy.deepcopy(original).train()(x)
        got = frozen.train()(x)
    assert not torch.allclose(batch_stats, expected, atol=1e-3)  # the inputs do tell the two modes apart
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    check = check_frozen(original, frozen, [x], device="cpu")
    assert check.passed, check.failure_message("frozen")
    assert check.frozen_layers == tuple(layer.name for layer in report.frozen) and not check.statistics_moved


def test_model_train_after_freezing_keeps_layers_frozen():
    original, x = build("conv2d")
    frozen, _ = freeze(original, verify=False)
    frozen.eval()
    frozen.train()
    assert all(m.training for m in frozen.modules())
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), original.eval()(x), rtol=1e-6, atol=1e-6)


def _bn_outputs_follow_stored_statistics(model: nn.Module, x: torch.Tensor) -> None:
    """Each frozen layer's train-mode output is the formula on its stored statistics (fails for batch statistics)."""
    seen = []

    def hook(module, args, output):
        (inp,) = args
        shape = (1, -1) + (1,) * (inp.dim() - 2)
        w = module.weight if module.weight is not None else torch.ones(module.num_features)
        b = module.bias if module.bias is not None else torch.zeros(module.num_features)
        want = ((inp.double() - module.running_mean.double().view(shape))
                / (module.running_var.double().view(shape) + module.eps).sqrt()
                * w.double().view(shape) + b.double().view(shape))
        torch.testing.assert_close(output.double(), want, rtol=1e-5, atol=1e-5)
        seen.append(module)

    handles = [m.register_forward_hook(hook) for m in frozen_layers(model).values()]
    try:
        model.train()
        model(x)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == len(frozen_layers(model))


def test_training_steps_leave_frozen_statistics_and_affine_bit_identical():
    original, x = build("conv2d")
    frozen, _ = freeze(original, verify=False)
    layers = frozen_layers(frozen)
    before = {n: snapshot(m) for n, m in layers.items()}
    conv_before = frozen.layer1[0].weight.detach().clone()
    train_steps(frozen, x)
    for name, module in layers.items():
        for key, value in module.state_dict().items():
            assert torch.equal(value, before[name][key]), f"{name}.{key} moved"
        assert not module.weight.requires_grad and module.weight.grad is None and module.bias.grad is None
        assert not list(module.parameters())
    assert frozen.layer1[0].weight.grad is not None and frozen.layer1[0].weight.grad.abs().sum() > 0
    assert frozen.stem[0].weight.grad.abs().sum() > 0  # gradients flow through every frozen layer
    assert not torch.equal(frozen.layer1[0].weight, conv_before)
    for p in frozen.parameters():  # a blanket unfreeze-everything loop cannot make gamma / beta trainable
        p.requires_grad_(True)
    assert all(not m.weight.requires_grad for m in layers.values())
    _bn_outputs_follow_stored_statistics(frozen, x)


def test_trainable_affine_learns_gamma_beta_but_not_statistics():
    original, x = build("conv2d")
    frozen, report = freeze(original, affine="trainable", verify=False)
    assert report.affine == "trainable" and {layer.affine for layer in report.frozen} == {"trainable"}
    layers = frozen_layers(frozen)
    before = {n: snapshot(m) for n, m in layers.items()}
    train_steps(frozen, x)
    for name, module in layers.items():
        assert module.weight.requires_grad and module.weight.grad.abs().sum() > 0
        assert not torch.equal(module.weight, before[name]["weight"])
        assert not torch.equal(module.bias, before[name]["bias"])
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(module, key), before[name][key]), f"{name}.{key} moved"
    _bn_outputs_follow_stored_statistics(frozen, x)


def test_include_and_exclude_select_by_qualified_name():
    original, x = build("conv2d")
    frozen, report = freeze(original, include=["layer1.*"], verify=False)
    assert sorted(frozen_layers(frozen)) == ["layer1.1", "layer1.4"]
    assert [layer.name for layer in report.frozen] == ["layer1.1", "layer1.4"]
    assert type(frozen.layer2[1]) is nn.BatchNorm2d and type(frozen.stem[1]) is nn.BatchNorm2d
    before_frozen, before_other = snapshot(frozen.layer1[1]), snapshot(frozen.layer2[1])
    train_steps(frozen, x, steps=1)
    assert all(torch.equal(v, before_frozen[k]) for k, v in frozen.layer1[1].state_dict().items())
    assert not torch.equal(frozen.layer2[1].running_mean, before_other["running_mean"])  # still updating

    frozen, _ = freeze(original, exclude="layer1", verify=False)  # a container's name selects everything under it
    assert sorted(frozen_layers(frozen)) == ["head.3", "layer2.1", "stem.1"]
    frozen, _ = freeze(original, include=["layer*", "stem.1"], exclude=["layer1.4"], verify=False)
    assert sorted(frozen_layers(frozen)) == ["layer1.1", "layer2.1", "stem.1"]


def test_pattern_matching_no_batchnorm_is_an_input_error_listing_names():
    original, _ = build("conv2d")
    with pytest.raises(InputError, match=r"include pattern `backbone\.\*` matches no BatchNorm") as info:
        freeze(original, include=["backbone.*"], verify=False)
    assert "`stem.1`" in str(info.value) and "`layer1.1`" in str(info.value) and "layer1.*" in str(info.value)
    with pytest.raises(InputError, match="exclude pattern `layer1.0`"):  # a conv, not a BN
        freeze(original, exclude=["layer1.0"], verify=False)
    with pytest.raises(InputError, match="matches no frozen BatchNorm"):
        unfreeze(original, include="stem.1", verify=False)


def test_syncbatchnorm_freezes_on_cpu_without_a_process_group():
    original, x = build("conv2d")
    original = nn.SyncBatchNorm.convert_sync_batchnorm(original)
    assert not torch.distributed.is_initialized()
    frozen, report = freeze(original, verify=False)
    assert {layer.type for layer in report.frozen} == {"SyncBatchNorm"}
    assert all(type(m) is FrozenSyncBatchNorm for m in frozen_layers(frozen).values())
    assert len(frozen_layers(frozen)) == 5  # 4D and 2D inputs alike
    with torch.no_grad():
        torch.testing.assert_close(frozen.train()(x), original.eval()(x), rtol=1e-6, atol=1e-6)
    back, _ = unfreeze(frozen, verify=False)
    assert {type(m) for m in back.modules() if isinstance(m, _BatchNorm)} == {nn.SyncBatchNorm}


def test_batch_of_one_in_train_mode_works_once_frozen():
    original, _ = build("linear_bn1d")
    x = torch.randn(1, 7)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        original.train()(x)
    frozen, _ = freeze(original, verify=False)
    with torch.no_grad():
        torch.testing.assert_close(frozen.train()(x), original.eval()(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_eps_is_kept_at_zero_running_var(dtype):
    bn = randomize_bn_(nn.BatchNorm2d(4, eps=1e-3))
    with torch.no_grad():
        bn.running_var.zero_()
    bn = bn.to(dtype)
    frozen, report = freeze(nn.Sequential(bn), verify=False)
    layer = frozen[0]
    assert layer.eps == 1e-3 and report.frozen[0].eps == 1e-3 and torch.equal(layer.running_var, bn.running_var)
    x = torch.randn(2, 4, 3, 3).to(dtype)
    with torch.no_grad():
        y = frozen.train()(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    shape = (1, 4, 1, 1)
    want = ((x.double() - bn.running_mean.double().view(shape)) / torch.tensor(1e-3, dtype=torch.float64).sqrt()
            * bn.weight.double().view(shape) + bn.bias.double().view(shape))
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol * want.abs().max().item())


# ----------------------------------------------------------------------------- structure


def test_state_dict_keys_match_and_checkpoints_load_both_ways():
    original, x = build("conv2d")
    for affine in ("frozen", "trainable"):
        frozen, _ = freeze(original, affine=affine, verify=False)
        assert list(frozen.state_dict()) == list(original.state_dict())
        fresh_frozen, _ = freeze(Stages(), affine=affine, verify=False)
        fresh_frozen.load_state_dict(original.state_dict(), strict=True)  # unfrozen checkpoint into frozen model
        fresh = Stages()
        fresh.load_state_dict(frozen.state_dict(), strict=True)  # frozen checkpoint into ordinary model
        for key, value in original.state_dict().items():
            assert torch.equal(fresh.state_dict()[key], value) and torch.equal(fresh_frozen.state_dict()[key], value)
    legacy = {k: v for k, v in original.state_dict().items() if not k.endswith("num_batches_tracked")}
    frozen, _ = freeze(Stages(), verify=False)
    frozen.load_state_dict(legacy, strict=False)  # torchvision FrozenBatchNorm2d checkpoints lack the counter


def test_non_affine_layer_has_no_weight_or_bias():
    original, x = build("non_affine")
    frozen, report = freeze(original, verify=False)
    assert frozen[1].weight is None and frozen[1].bias is None and report.frozen[0].affine == "none"
    assert list(frozen.state_dict()) == list(original.state_dict())


def test_recipe_replay_on_fresh_model_then_unfreeze_round_trips():
    original, x = build("conv2d")
    frozen, report = freeze(original, include=["layer1.*", "head.*"], exclude="layer1.4", verify=False)
    step = report.recipe_step()
    assert step == {"op": "freeze", "layers": ["layer1.1", "head.3"], "affine": "frozen"}
    weights = frozen.state_dict()

    fresh = recipe.replay(Stages(), [step], REPLAYERS)
    assert sorted(frozen_layers(fresh)) == sorted(step["layers"])
    fresh.load_state_dict(weights, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), original.eval()(x), rtol=1e-6, atol=1e-6)

    thawed, unfreeze_report = unfreeze(fresh, verify=False)
    assert unfreeze_report.recipe_step() == {"op": "unfreeze", "layers": step["layers"]}
    assert [type(m) for m in thawed.modules()] == [type(m) for m in original.modules()]
    for key, value in original.state_dict().items():
        assert torch.equal(thawed.state_dict()[key], value), key
    assert thawed.layer1[1].momentum is None
    everything, _ = unfreeze(freeze(original, verify=False)[0], verify=False)
    pairs = [(a, b) for a, b in zip(original.modules(), everything.modules()) if isinstance(a, _BatchNorm)]
    assert all(type(a) is type(b) and (a.eps, a.momentum) == (b.eps, b.momentum) for a, b in pairs)
    assert (everything.stem[1].eps, everything.stem[1].momentum) == (1e-3, 0.3)
    assert all(p.requires_grad for p in thawed.parameters())
    replay(fresh, unfreeze_report.recipe_step())  # the unfreeze step replays in place too
    assert not frozen_layers(fresh)


def test_replay_missing_layer_says_recipe_does_not_match():
    with pytest.raises(InputError, match=r"recipe does not match the model.*`layer9\.1`.*no such module"):
        replay(Stages(), {"op": "freeze", "layers": ["layer9.1"], "affine": "frozen"})
    with pytest.raises(InputError, match=r"`layer1\.0`.*Conv2d"):
        replay(Stages(), {"op": "freeze", "layers": ["layer1.0"], "affine": "frozen"})
    with pytest.raises(InputError, match="not frozen"):
        replay(Stages(), {"op": "unfreeze", "layers": ["layer1.1"]})


class ScaledBN(nn.BatchNorm2d):
    def forward(self, x):
        return 2 * super().forward(x)


class TaggedBN(nn.BatchNorm2d):
    """A subclass that only adds an attribute: frozen like its base."""

    tag = "x"


def test_skips_are_reported_with_reasons():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), ScaledBN(4), nn.BatchNorm2d(4, track_running_stats=False),
                          TaggedBN(4), nn.BatchNorm2d(4))
    randomize_bn_(model)
    frozen, report = freeze(model, verify=False)
    assert [layer.name for layer in report.frozen] == ["1", "3", "4"]
    assert [layer.type for layer in report.frozen] == ["ScaledBN", "TaggedBN", "BatchNorm2d"]
    reasons = {skip.name: skip.reason for skip in report.skipped}
    assert reasons == {"2": NO_STATISTICS}
    assert type(frozen[2]) is nn.BatchNorm2d
    assert isinstance(frozen[1], ScaledBN) and type(frozen[1]).__name__ == "FrozenScaledBN"  # its own forward, pinned
    assert type(frozen[3]) is FrozenBatchNorm2d  # the base's forward: bntool's frozen BN
    again, second = freeze(frozen, verify=False)  # already frozen layers are reported, not wrapped twice
    again_reasons = {s.name: s.reason for s in second.skipped}
    assert not second.frozen and again_reasons["4"] == "already frozen (`FrozenBatchNorm2d`)"
    assert again_reasons["1"] == "already frozen (`FrozenScaledBN`)"
    assert type(again[4]) is FrozenBatchNorm2d and type(again[1]) is type(frozen[1])
    assert report.to_dict()["recipe_step"] == {"op": "freeze", "layers": ["1", "3", "4"], "affine": "frozen"}


def test_shared_batchnorm_stays_shared():
    bn = nn.BatchNorm1d(5)
    model = randomize_bn_(nn.Sequential(nn.Linear(5, 5), bn, nn.Linear(5, 5), bn))
    frozen, report = freeze(model, verify=False)
    assert [layer.name for layer in report.frozen] == ["1"] and frozen[1] is frozen[3]


def test_input_rank_checks_and_repr():
    with pytest.raises(ValueError, match=r"FrozenBatchNorm2d expected 4D input \(got 3D input\)"):
        FrozenBatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="2D or 3D"):
        FrozenBatchNorm1d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="5D"):
        FrozenBatchNorm3d(3)(torch.randn(2, 3, 4, 4))
    FrozenSyncBatchNorm(3)(torch.randn(2, 3, 4, 4, 4))
    assert repr(FrozenBatchNorm2d(64, eps=1e-3, affine="trainable")) == "FrozenBatchNorm2d(64, eps=0.001, affine=trainable)"
    with pytest.raises(InputError, match="affine must be"):
        freeze(Stages(), affine="yes", verify=False)


# ----------------------------------------------------------------------------- the check


def test_check_runs_only_the_frozen_layers_in_train_mode_and_catches_moving_statistics():
    original = stages(dropout=0.5)
    x = torch.randn(4, 3, 8, 8)
    frozen, _ = freeze(original, exclude="stem", verify=False)
    seen = {}
    for name, module in frozen.named_modules():
        module.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, m.training))
    flags = [m.training for m in frozen.modules()]
    check = check_frozen(original, frozen, [x], device="cpu")
    assert check.passed, check.failure_message("frozen")
    assert {n for n, training in seen.items() if training} == set(check.frozen_layers) == {
        "layer1.1", "layer1.4", "layer2.1", "head.3"}
    assert [m.training for m in frozen.modules()] == flags  # each module's own flag restored
    assert check.to_dict()["frozen_layers"] == list(check.frozen_layers)

    class LeakyFrozen(FrozenBatchNorm2d):  # normalizes with batch statistics and updates the buffers
        def forward(self, x):
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                            training=True, momentum=0.1, eps=self.eps)

    broken, _ = freeze(original, verify=False)
    broken.layer1[1] = LeakyFrozen.from_batchnorm(original.layer1[1])
    check = check_frozen(original, broken, [x], device="cpu")
    assert not check.passed and check.statistics_moved == ("layer1.1",)
    assert "does not match" in check.failure_message("frozen") and "`layer1.1`" in check.failure_message("frozen")


def test_import_pulls_in_no_cli_dependencies(imported_by_bntool):
    assert "bntool.freezing.freeze" in imported_by_bntool
    assert sorted({"rich", "typer", "onnx"} & imported_by_bntool) == []


def test_bias_free_affine_and_lazy_layers():
    try:
        bn = nn.BatchNorm2d(4, bias=False)  # torch >= 2.6: weight without bias
    except TypeError:
        pytest.skip("this torch has no BatchNorm bias=False")
    model = randomize_bn_(nn.Sequential(nn.Conv2d(3, 4, 1), bn))
    frozen, _ = freeze(model, verify=False)
    assert frozen[1].bias is None and list(frozen.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(frozen.train()(x), model.eval()(x), rtol=1e-6, atol=1e-6)
    back, _ = unfreeze(frozen, verify=False)
    assert back[1].bias is None and back[1].weight.requires_grad
    with pytest.raises(InputError, match="uninitialized lazy module; run one forward pass"):
        freeze(nn.Sequential(nn.LazyBatchNorm2d()))


# ----------------------------------------------------------------------------- the library verifies


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_freeze_and_unfreeze_verify_themselves_and_carry_the_recipe(inplace):
    original, x = build("conv2d")
    expected = original.eval()(x).detach()
    frozen, report = freeze(original, example_inputs=x, inplace=inplace)
    assert report.passed and report.check is not None and report.comparison.passed
    assert report.to_dict()["verification"]["passed"] is True
    assert bntool.report.recipe_of(frozen) == [report.recipe_step()]
    back, undone = unfreeze(frozen, example_inputs=x, inplace=inplace)
    assert undone.passed and undone.comparison is not None
    assert [s["op"] for s in bntool.report.recipe_of(back)] == ["freeze", "unfreeze"]
    torch.testing.assert_close(back.eval()(x), expected, rtol=1e-6, atol=1e-6)


def test_a_wrong_frozen_layer_raises_verification_error_carrying_the_report(monkeypatch):
    original, x = build("conv2d")
    real = FrozenBatchNorm2d.forward
    monkeypatch.setattr(FrozenBatchNorm2d, "forward", lambda self, inp: real(self, inp) * 1.001)
    with pytest.raises(VerificationError) as info:
        freeze(original, example_inputs=x)
    report = info.value.report
    assert isinstance(report, FreezeReport) and not report.passed and not report.comparison.passed
    assert "does not match" in str(info.value)


def test_a_wrong_unfrozen_layer_raises_verification_error(monkeypatch):
    original, x = build("conv2d")
    frozen, _ = freeze(original, example_inputs=x)
    monkeypatch.setattr(nn.BatchNorm2d, "forward", lambda self, inp: nn.functional.batch_norm(
        inp, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps * 100))
    with pytest.raises(VerificationError) as info:
        unfreeze(frozen, example_inputs=x)
    assert not info.value.report.passed


def test_a_frozen_layer_that_normalizes_with_batch_statistics_in_train_mode_only_is_caught():
    """The naive fix_bn: fine in eval mode, batch statistics under model.train(): the check runs the frozen layers
    in train mode, so it sees it."""
    original = stages()
    x = torch.randn(4, 3, 8, 8)

    class TrainModeLeak(FrozenBatchNorm2d):
        def forward(self, x):
            if self.training:
                return nn.functional.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
            return super().forward(x)

    broken, _ = freeze(original, verify=False)
    broken.layer1[1] = TrainModeLeak.from_batchnorm(original.layer1[1])
    check = check_frozen(original, broken, [x], device="cpu")
    assert not check.passed and "does not match" in check.failure_message()


def test_a_detection_model_whose_head_returns_other_outputs_in_train_mode_freezes():
    """YOLOv8's Detect returns its raw maps in train mode and (boxes, maps) in eval mode: the freeze is verified
    on the frozen layers, and the frozen model under model.train() keeps every BN's statistics."""
    from examples import archs

    model = randomize_bn_(archs.yolov8_like(), seed=2).eval()
    x = torch.randn(2, 3, 64, 64)
    frozen, report = freeze(model)
    assert report.check.passed and len(report.frozen) == 57
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    frozen.train()
    with torch.no_grad():
        frozen(x)
    assert all(torch.equal(v, before[k]) for k, v in frozen.state_dict().items())
