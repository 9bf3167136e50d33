"""``bntool.convert``: BatchNorm <-> SyncBatchNorm both ways, a BN subclass keeping what its forward does.

Every model has randomized statistics and affine values. On one process
torch's SyncBatchNorm falls back to ``F.batch_norm``; with a process group
initialized it takes the synchronized path, which refuses CPU inputs in train
mode: the tests use a one-process gloo group to see which normalization a
converted layer really runs.
"""

from __future__ import annotations

import contextlib
import copy
import io

import pytest
import torch
import torch.distributed as dist
from torch import nn

import bntool
from bntool.converting import forms
from bntool.converting.convert import convert
from bntool.errors import InputError, VerificationError
from bntool.freezing.freeze import freeze
from examples import archs
from examples.models import randomize_bn_


class SyncBatchNormAct(nn.SyncBatchNorm):
    """timm's ``SyncBatchNormAct`` (``timm.layers.norm_act``): SyncBatchNorm's forward, then ``drop`` and ``act``
    when present (timm's ``convert_sync_batchnorm`` sets them from the ``BatchNormAct2d`` it replaces)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


def timm_sync_net() -> nn.Module:
    """conv -> timm's SyncBatchNormAct (SiLU) -> conv -> SyncBatchNorm (the shape it declares: 2x3x16x16)."""
    torch.manual_seed(0)
    bn = SyncBatchNormAct(8)
    bn.drop, bn.act = nn.Identity(), nn.SiLU()
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), bn, nn.Conv2d(8, 4, 3), nn.SyncBatchNorm(4))
    model.input_shape = (2, 3, 16, 16)
    return randomize_bn_(model, 1).eval()


class Plain(nn.Module):
    """BN2d and BN1d, an alias, a ModuleList, a ModuleDict, and a plain list and dict the forward reads."""

    input_shape = (4, 3, 8, 8)

    def __init__(self, norm=nn.BatchNorm2d, norm1d=nn.BatchNorm1d):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.norm1 = norm(6)
        self.alias = self.norm1  # one module, two names
        self.blocks = nn.ModuleList([nn.Conv2d(6, 6, 1), norm(6)])
        self.heads = nn.ModuleDict({"a": nn.Conv2d(6, 6, 1), "bn": norm(6)})
        self.layers = [self.blocks[0], self.blocks[1], nn.ReLU()]  # mmpose's CrossFFN: a plain list
        self.by_name = {"bn": self.heads["bn"]}
        self.fc = nn.Linear(6, 5)
        self.bn_fc = norm1d(5)

    def forward(self, x):
        x = self.alias(self.conv(x))
        for layer in self.layers:
            x = layer(x)
        x = self.by_name["bn"](self.heads["a"](x))
        return self.bn_fc(self.fc(x.mean((2, 3))))


def plain(norm=nn.BatchNorm2d, norm1d=nn.BatchNorm1d) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn_(Plain(norm, norm1d), 2).eval()


def images(shape=(4, 3, 8, 8), seed: int = 3) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@contextlib.contextmanager
def one_process_group(tmp_path):
    """A gloo process group of one process: torch's SyncBatchNorm then takes its synchronized path."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_plain_layers_become_syncbatchnorm_in_every_place_and_come_back_by_rank():
    # catches: a place left holding the old layer (alias, list, dict), renamed or reordered keys, values changed,
    # the way back guessing the rank (BatchNorm2d for the 1d head), the original changed
    model = plain()
    x = images()
    synced, report = convert(model, "syncbatchnorm", example_inputs=x)
    assert report.passed and report.train_check.passed and report.train_check_skipped is None
    assert [c.name for c in report.converted] == ["norm1", "blocks.1", "heads.bn", "bn_fc"]
    assert [c.now for c in report.converted] == ["SyncBatchNorm"] * 4
    for name in ("norm1", "alias", "blocks.1", "heads.bn", "bn_fc"):
        assert type(synced.get_submodule(name)) is nn.SyncBatchNorm, name
    assert synced.alias is synced.norm1 and synced.layers[1] is synced.blocks[1]
    assert synced.by_name["bn"] is synced.heads["bn"]
    assert type(model.norm1) is nn.BatchNorm2d and model.layers[1] is model.blocks[1]  # the original untouched
    same_state(model, synced)
    assert torch.equal(synced(x), model(x))

    back, report = convert(synced, "batchnorm", example_inputs=x)
    assert report.passed and report.train_check.passed
    assert [(c.name, c.now) for c in report.converted] == [
        ("norm1", "BatchNorm2d"), ("blocks.1", "BatchNorm2d"), ("heads.bn", "BatchNorm2d"), ("bn_fc", "BatchNorm1d")]
    assert type(back.bn_fc) is nn.BatchNorm1d and back.layers[1] is back.blocks[1] and back.alias is back.norm1
    same_state(model, back)
    assert torch.equal(back(x), model(x))


def test_modes_and_requires_grad_are_kept():
    # catches: a converted layer put in eval mode (or train mode) by the conversion, requires_grad reset
    model = plain()
    model.norm1.train()
    model.heads["bn"].weight.requires_grad_(False)
    synced, _ = convert(model, "syncbatchnorm", example_inputs=images())
    assert synced.norm1.training and not synced.blocks[1].training
    assert not synced.heads["bn"].weight.requires_grad and synced.heads["bn"].bias.requires_grad
    assert isinstance(synced.heads["bn"].weight, nn.Parameter)


def test_bn_act_keeps_its_activation_both_ways_where_torchs_converter_loses_it():
    # catches: a subclass turned into a bare SyncBatchNorm (what torch's converter does: the activation is lost)
    model = randomize_bn_(archs.bn_act_net(), 0).eval()
    x = images((4, 3, 32, 32))
    torchs = nn.SyncBatchNorm.convert_sync_batchnorm(randomize_bn_(archs.bn_act_net(), 0).eval())
    assert not torch.allclose(torchs(x), model(x), atol=1e-3)  # the bug the conversion must not have

    synced, report = convert(model, "syncbatchnorm", example_inputs=x)
    assert report.passed and report.train_check.passed and len(report.converted) == 7
    assert all(c.type == "BatchNormAct2d" and c.now == "SyncBatchNormAct2d" for c in report.converted)
    layer = synced.bn1
    assert isinstance(layer, archs.BatchNormAct2d) and isinstance(layer, nn.SyncBatchNorm)
    assert type(layer.act) is nn.ReLU and type(layer.drop) is nn.Dropout  # submodules kept
    same_state(model, synced)
    assert torch.equal(synced(x), model(x))

    back, report = convert(synced, "batchnorm", example_inputs=x)
    assert report.passed and all(type(back.get_submodule(c.name)) is archs.BatchNormAct2d for c in report.converted)
    same_state(model, back)


def test_the_synchronized_normalization_is_the_one_that_runs(monkeypatch, tmp_path):
    # catches: a "converted" subclass whose forward still runs its plain batch_norm (it would not sync)
    model = randomize_bn_(archs.bn_act_net(), 0).eval()
    x = images((4, 3, 32, 32))
    synced, _ = convert(model, "syncbatchnorm", example_inputs=x)
    calls = []
    real = forms.sync_batch_norm
    monkeypatch.setattr(forms, "sync_batch_norm", lambda module, **kw: calls.append(module) or real(module, **kw))
    synced(x)
    assert len(calls) == 7 and {id(m) for m in calls} == {id(m) for m in synced.modules()
                                                        if isinstance(m, archs.BatchNormAct2d)}
    monkeypatch.setattr(forms, "sync_batch_norm", real)
    with one_process_group(tmp_path):  # torch's SyncBatchNorm refuses CPU inputs in train mode here: so does it
        synced.train()
        with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
            synced(x)
        copy.deepcopy(model).train()(x)  # the plain original runs
        synced.eval()
        assert torch.equal(synced(x), model(x))  # eval mode: no synchronization, the same kernel


def test_timm_sync_bn_act_becomes_plain_keeping_its_activation(tmp_path):
    # catches: timm's SyncBatchNormAct turned into a bare BatchNorm2d (activation lost), or left synchronizing
    model = timm_sync_net()
    x = images((2, 3, 16, 16))
    plain_model, report = convert(model, "batchnorm")  # the shape the model declares
    assert report.passed and report.train_check.passed
    assert [(c.name, c.type, c.now) for c in report.converted] == [
        ("1", "SyncBatchNormAct", "BatchNormAct"), ("3", "SyncBatchNorm", "BatchNorm2d")]
    assert isinstance(plain_model[1], SyncBatchNormAct) and type(plain_model[3]) is nn.BatchNorm2d
    assert torch.equal(plain_model(x), model(x))
    with one_process_group(tmp_path):
        model.train()
        with pytest.raises(ValueError, match="on GPU"):
            model(x)
        plain_model.train()
        plain_model(x)  # plain: runs on the CPU in train mode
    again, report = convert(plain_model.eval(), "syncbatchnorm", example_inputs=x)
    assert type(again[1]) is SyncBatchNormAct and type(again[3]) is nn.SyncBatchNorm


def test_train_mode_check_runs_only_where_torch_runs_syncbn_as_batchnorm(tmp_path):
    model = plain()
    with one_process_group(tmp_path):
        _, report = convert(model, "syncbatchnorm", example_inputs=images())
    assert report.passed and report.train_check is None
    assert "process group is initialized" in report.train_check_skipped
    assert report.to_dict()["verification"]["train_mode_skipped"] == report.train_check_skipped


def test_a_wrong_normalization_fails_verification(monkeypatch):
    # catches: a verification that cannot fail. Eval mode: a changed eps; train mode: a changed momentum, which
    # eval mode cannot see (statistics updated differently)
    model = randomize_bn_(archs.bn_act_net(), 0).eval()
    x = images((4, 3, 32, 32))
    real = forms.sync_batch_norm
    monkeypatch.setattr(forms, "sync_batch_norm", lambda module, **kw: real(module, **{**kw, "eps": kw["eps"] * 2}))
    with pytest.raises(VerificationError, match="eval mode") as caught:
        convert(model, "syncbatchnorm", example_inputs=x)
    assert caught.value.report.passed is False
    monkeypatch.setattr(forms, "sync_batch_norm",
                        lambda module, **kw: real(module, **{**kw, "momentum": 0.5 if kw["training"] else kw["momentum"]}))
    with pytest.raises(VerificationError, match="in train mode .* `bn1.running_mean`"):
        convert(model, "syncbatchnorm", example_inputs=x)
    assert type(model.bn1) is archs.BatchNormAct2d  # nothing changed


def test_frozen_foreign_and_unreached_layers_are_skipped_with_reasons_and_foreign_containers_do_not_crash():
    class Foreign(nn.Module):  # e2cnn's containers refuse other module types in add_module
        def __init__(self):
            super().__init__()
            self.inner = nn.SyncBatchNorm(6)

        def add_module(self, name, module):
            raise TypeError("only equivariant modules")

        def forward(self, x):
            return self.inner(x)

    class MMSyncBN(nn.Module):  # mmcv's SyncBatchNorm: BN-like, not a torch BatchNorm
        def __init__(self):
            super().__init__()
            self.eps = 1e-5
            self.register_buffer("running_mean", torch.zeros(6))
            self.register_buffer("running_var", torch.ones(6))

        def forward(self, x):
            return x

    model = nn.Sequential(nn.Conv2d(3, 6, 1), Foreign(), MMSyncBN(), nn.SyncBatchNorm(6))
    model[1].spare = nn.SyncBatchNorm(6)  # registered, never called
    model = randomize_bn_(model, 4).eval()
    frozen, _ = freeze(model, include="3", verify=False)
    result, report = convert(frozen, "batchnorm", example_inputs=images())
    assert report.passed and [c.name for c in report.converted] == ["1.inner"]
    assert type(result[1].inner) is nn.BatchNorm2d
    reasons = {s.name: s.reason for s in report.skipped}
    assert set(reasons) == {"1.spare", "2", "3"}
    assert "not a torch BatchNorm" in reasons["2"] and "frozen" in reasons["3"] and "not called" in reasons["1.spare"]


def test_recipe_replays_in_load_and_other_operations_accept_the_output(tmp_path):
    # catches: a step bntool.load cannot replay (unknown op), the plain rank lost on the way back, fold / freeze /
    # recalibrate refusing a converted layer
    model = plain(nn.SyncBatchNorm, nn.SyncBatchNorm)
    x = images()
    back, _ = convert(model, "batchnorm", example_inputs=x)
    bntool.save(back, tmp_path / "plain.safetensors")
    loaded = bntool.load(tmp_path / "plain.safetensors", plain(nn.SyncBatchNorm, nn.SyncBatchNorm))
    assert type(loaded.norm1) is nn.BatchNorm2d and type(loaded.bn_fc) is nn.BatchNorm1d
    assert loaded.layers[1] is loaded.blocks[1]
    same_state(back, loaded)

    acts = randomize_bn_(archs.bn_act_net(), 0).eval()
    synced, _ = convert(acts, "syncbatchnorm", example_inputs=images((4, 3, 32, 32)))
    bntool.save(synced, tmp_path / "sync.safetensors")
    reloaded = bntool.load(tmp_path / "sync.safetensors", archs.bn_act_net())
    assert type(reloaded.bn1) is type(synced.bn1)
    with pytest.raises(InputError, match="recipe does not match the model"):
        bntool.load(tmp_path / "sync.safetensors", plain())

    y = images((4, 3, 32, 32))
    _, report = bntool.fold(synced, example_inputs=y)
    assert report.passed and len(report.done) == 7 and not report.skipped
    _, report = bntool.freeze(synced, example_inputs=y)
    assert report.passed and len(report.frozen) == 7
    report = bntool.recalibrate(synced, [images((4, 3, 32, 32), seed=s) for s in range(3)])
    assert report.passed and len(report.done) == 7


def test_bad_target_and_pickled_converted_model():
    with pytest.raises(InputError, match="`to` must be `batchnorm` or `syncbatchnorm`"):
        convert(plain(), "sync")
    synced, _ = convert(randomize_bn_(archs.bn_act_net(), 0).eval(), "syncbatchnorm")
    buffer = io.BytesIO()
    torch.save(synced, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    assert type(again.bn1) is type(synced.bn1)
    x = images((4, 3, 32, 32))
    assert torch.equal(again(x), synced(x))


@pytest.mark.cuda
def test_on_the_gpu_both_ways_verified():
    # where torch's SyncBatchNorm has its synchronized kernels: one process, so both checks still run
    model = randomize_bn_(archs.bn_act_net(), 0).eval().cuda()
    x = images((4, 3, 32, 32)).cuda()
    synced, report = convert(model, "syncbatchnorm", example_inputs=x, device="cuda")
    assert report.passed and report.train_check.passed and report.train_check.device.startswith("cuda")
    back, report = convert(synced, "batchnorm", example_inputs=x, device="cuda")
    assert report.passed and torch.equal(back(x), model(x))


def test_an_uninitialized_lazy_module_is_refused_by_name_before_converting():
    # catches: convert running on a lazy BN whose statistics do not exist yet, or a message naming the wrong layer
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d())
    with pytest.raises(bntool.InputError, match=r"^`1` is an uninitialized lazy module; run one forward pass before "
                                                r"converting$"):
        bntool.convert(model, to="syncbatchnorm")
