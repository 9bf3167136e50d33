"""freeze / unfreeze without example inputs: each layer is checked alone, and the report says so.

Most models declare no input shape (a bare ``nn.Sequential``, a torchvision
or timm network): ``bntool.freeze(model)`` must still freeze them, verified
per layer on inputs of each layer's own shape, at several batch sizes
(batch 1 included). Also the call shape ``freeze(model, example_inputs, *,
include=...)``, with the 0.2 positional selection accepted one more release.
"""

from __future__ import annotations

import json
import textwrap
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

import bntool
from bntool.errors import InputError, VerificationError
from bntool.freezing.check import PER_LAYER, WHOLE_MODEL
from bntool.freezing.freeze import freeze, unfreeze
from bntool.freezing.layers import BATCH_SIZES
from bntool.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d
from bntool.norms import is_bntool_frozen
from examples import archs
from examples.models import randomize_bn_


class ChannelsLastBN(_BatchNorm):
    """A direct ``_BatchNorm`` subclass taking (N, H, W, C), as a channels-last block would: no class rank."""

    def forward(self, x):
        y = F.batch_norm(x.permute(0, 3, 1, 2), self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, 0.1, self.eps)
        return y.permute(0, 2, 3, 1)


class ChannelsLastNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.norm = ChannelsLastBN(6)

    def forward(self, x):
        return self.norm(self.proj(x))


class BatchNorm2dOnSequences(nn.BatchNorm2d):
    """A ``BatchNorm2d`` subclass whose forward takes (N, C, L): its class's rank 4 is not what it runs on."""

    def forward(self, x):
        return super().forward(x.unsqueeze(-1)).squeeze(-1)


def _without_shape(model: nn.Module) -> nn.Module:
    model.__dict__.pop("input_shape", None)
    return model


ZOO = {  # no model here declares an input shape; each comes with an input to check the result on
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6), nn.ReLU()), (4, 3, 10)),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, eps=1e-3), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(8 * 4 * 4, 5), nn.BatchNorm1d(5)), (3, 3, 6, 6)),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4)), (2, 2, 5, 5, 5)),
    "non_affine": (lambda: nn.Sequential(nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5, affine=False)), (2, 3, 4, 4)),
    "syncbn": (lambda: nn.Sequential(nn.Conv2d(3, 5, 1), nn.SyncBatchNorm(5)), (2, 3, 4, 4)),
    "bn_act": (lambda: _without_shape(archs.bn_act_net()), (2, 3, 32, 32)),
    "channels_last": (ChannelsLastNet, (2, 5, 7, 4)),
    "sequence_subclass": (lambda: nn.Sequential(nn.Conv1d(3, 6, 1), BatchNorm2dOnSequences(6)), (2, 3, 9)),
}


def build(kind: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    factory, shape = ZOO[kind]
    torch.manual_seed(seed)
    model = randomize_bn_(factory(), seed).eval()
    return model, torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))


def frozen_in_train_mode(model: nn.Module) -> nn.Module:
    model.train()
    for module in model.modules():
        if not is_bntool_frozen(module):
            module.training = False
    return model


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("kind", list(ZOO))
def test_freeze_without_inputs_is_verified_per_layer_at_every_batch_size(kind, inplace):
    # catches: the InputError of 0.2 on a model that declares no shape; a check that skips a layer or batch 1
    model, x = build(kind)
    with torch.no_grad():
        expected = model(x)
    names = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    frozen, report = freeze(model, inplace=inplace, device="cpu")
    assert report.passed and report.check.kind == PER_LAYER == "per layer: no example inputs"
    assert report.to_dict()["verification"]["checked"] == PER_LAYER
    assert set(report.check.frozen_layers) == set(names) and report.check.statistics_moved == ()
    rows = [o.name for o in report.check.comparison.outputs]
    for name in names:
        batches = {int(r.split(" at ")[1].split("x")[0]) for r in rows if r.startswith(f"layer `{name}` at ")}
        assert batches == set(BATCH_SIZES) and 1 in batches, (name, rows)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(frozen_in_train_mode(frozen)(x), expected, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in frozen.state_dict().items())
    back, undone = unfreeze(frozen, device="cpu")
    assert undone.passed and undone.checked == PER_LAYER and undone.to_dict()["verification"]["checked"] == PER_LAYER
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), expected, rtol=1e-5, atol=1e-5)


def test_the_shapes_come_from_the_class_or_from_what_the_layer_accepts():
    # catches: a rank guessed wrong (BatchNorm1d checked at rank 4 would raise), a channel axis put where the
    # layer does not read it (a channels-last layer checked on (N, C, H, W))
    checked = {}
    for kind in ("conv2d", "conv1d", "syncbn", "channels_last", "sequence_subclass"):
        model, _ = build(kind)
        _, report = freeze(model, device="cpu")
        for row in report.check.comparison.outputs:
            name, shape = row.name[len("layer `"):].split("` at ")
            checked.setdefault((kind, name), set()).add(shape)
    assert checked[("conv2d", "1")] == {"1x8x3x4", "2x8x3x4", "5x8x3x4"}
    assert checked[("conv2d", "5")] == {"1x5", "2x5", "5x5", "1x5x3", "2x5x3", "5x5x3"}  # BatchNorm1d: 2D and 3D
    assert {s for s in checked[("syncbn", "1")] if s.startswith("1x")} == {"1x5", "1x5x3", "1x5x3x4", "1x5x3x4x6"}
    assert {s for s in checked[("channels_last", "norm")] if s.startswith("1x")} == {"1x3x4x6"}
    assert {s for s in checked[("sequence_subclass", "1")] if s.startswith("1x")} == {"1x6x3"}


def test_a_wrong_frozen_layer_fails_the_per_layer_check(monkeypatch):
    # catches: a per-layer check that compares the frozen layer with itself, or never runs it
    model, _ = build("conv2d")
    real = FrozenBatchNorm1d.forward
    monkeypatch.setattr(FrozenBatchNorm1d, "forward", lambda self, inp: real(self, inp) * 1.001)
    with pytest.raises(VerificationError, match="does not match") as info:
        freeze(model, device="cpu")
    report = info.value.report
    assert not report.passed and report.check.kind == PER_LAYER
    failed = {o.name.split("`")[1] for o in report.check.comparison.outputs if not o.passed}
    assert failed == {"5"}


def test_a_frozen_layer_that_still_uses_and_moves_batch_statistics_in_train_mode_is_caught(monkeypatch):
    # catches: a check that runs the frozen layer in eval mode (it would look right), or never looks at its buffers
    model, _ = build("conv2d")

    def leaky(self, inp):
        return F.batch_norm(inp, self.running_mean, self.running_var, self.weight, self.bias,
                            training=self.training, momentum=0.1, eps=self.eps)

    monkeypatch.setattr(FrozenBatchNorm2d, "forward", leaky)
    with pytest.raises(VerificationError) as info:
        freeze(model, device="cpu")
    check = info.value.report.check
    assert check.statistics_moved == ("1",) and "changed in train mode in `1`" in str(info.value)


def test_a_wrong_unfrozen_layer_fails_the_per_layer_check(monkeypatch):
    model, _ = build("conv2d")
    frozen, _ = freeze(model, device="cpu")
    monkeypatch.setattr(nn.BatchNorm2d, "forward", lambda self, inp: F.batch_norm(
        inp, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps * 100))
    with pytest.raises(VerificationError, match="unfrozen layers") as info:
        unfreeze(frozen, device="cpu")
    assert not info.value.report.passed and info.value.report.checked == PER_LAYER


def test_a_layer_with_no_shape_it_runs_on_is_refused_naming_the_remedy():
    class Picky(_BatchNorm):  # runs on nothing a synthetic input can be
        def forward(self, x):
            raise RuntimeError("needs a mask")

    model = randomize_bn_(nn.Sequential(nn.Conv2d(3, 4, 1), Picky(4)))
    for inplace in (False, True):
        with pytest.raises(InputError, match=r"cannot tell the input shape of layer `1`.*pass `example_inputs`"):
            freeze(model, device="cpu", inplace=inplace)
        assert type(model[1]) is Picky  # refused before any change, in place too
    frozen, report = freeze(model, verify=False)  # nothing to verify: nothing run
    assert report.check is None and is_bntool_frozen(frozen[1])


def test_with_inputs_or_a_declared_shape_the_whole_model_check_stays():
    model, x = build("conv2d")
    _, report = freeze(model, x, device="cpu")
    assert report.check.kind == WHOLE_MODEL and [o.name for o in report.check.comparison.outputs] == ["output"]
    declared = randomize_bn_(archs.bn_act_net())
    _, report = freeze(declared, device="cpu")
    assert report.check.kind == WHOLE_MODEL
    frozen, _ = freeze(model, (x,), device="cpu")
    _, undone = unfreeze(frozen, x, device="cpu")
    assert undone.checked == WHOLE_MODEL


# ----------------------------------------------------------------------------- the call shape


def test_example_inputs_is_the_second_positional_argument_as_for_every_operation():
    # catches: `freeze(model, (x,))` read as a selection (0.2: TypeError "decoding to str")
    model, x = build("conv2d")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frozen, report = freeze(model, (x,), device="cpu")
        again, _ = bntool.freeze(model, x, include="1", device="cpu")
        back, _ = bntool.unfreeze(frozen, [x], exclude="5", device="cpu")
    assert report.check.kind == WHOLE_MODEL and len(report.frozen) == 2
    assert is_bntool_frozen(again[1]) and not is_bntool_frozen(again[5])
    assert not is_bntool_frozen(back[1]) and is_bntool_frozen(back[5])
    with pytest.raises(TypeError):
        freeze(model, (x,), "1")  # the selection is keyword-only with inputs


def test_the_old_positional_selection_still_works_with_a_future_warning_naming_include():
    model, _ = build("conv2d")
    with pytest.warns(FutureWarning, match=r"pass `include=` by keyword"):
        _, report = freeze(model, "1", device="cpu")
    assert [layer.name for layer in report.frozen] == ["1"]
    with pytest.warns(FutureWarning, match=r"`include=`, `exclude=`"):
        _, report = freeze(model, ["*"], ["5"], device="cpu")
    assert [layer.name for layer in report.frozen] == ["1"]
    with pytest.warns(FutureWarning, match=r"`include=`, `exclude=`, `affine=`"):
        _, report = freeze(model, None, None, "trainable", verify=False)
    assert report.affine == "trainable"
    everything, _ = freeze(model, verify=False)
    with pytest.warns(FutureWarning, match=r"`unfreeze`.*`include=`"):
        back, undone = bntool.unfreeze(everything, ["5"], device="cpu")
    assert [layer.name for layer in undone.unfrozen] == ["5"] and is_bntool_frozen(back[1])
    with pytest.raises(TypeError, match="multiple values for argument 'include'"):
        freeze(model, "1", include="5")


# ----------------------------------------------------------------------------- the command line

MODELS = textwrap.dedent(
    """
    from torch import nn

    def net():  # declares no input shape
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(8, 4), nn.BatchNorm1d(4))
    """
)


@pytest.fixture
def setup(tmp_path):
    from bntool.io import modelspec

    models = tmp_path / "models.py"
    models.write_text(MODELS)
    model = randomize_bn_(modelspec.build(f"{models}:net"), seed=3)
    ckpt = tmp_path / "best.pt"
    torch.save(model.state_dict(), ckpt)
    return tmp_path, f"{models}:net", ckpt, model


def test_cli_freeze_and_unfreeze_a_model_that_declares_no_input_shape(setup, cli):
    # catches: the CLI asking for --input-shape (0.2: "cannot tell the input shape"), a summary that hides the kind
    tmp_path, spec, ckpt, _ = setup
    frozen, unfrozen = tmp_path / "frozen.safetensors", tmp_path / "unfrozen.safetensors"
    result = cli("freeze", ckpt, "--model", spec, "--out", frozen, "--device", "cpu")
    assert result.code == 0, result.out + result.err
    assert "Verification per layer (no example inputs)" in result.out
    assert "Verified per layer: no example inputs (on cpu; worst layer `1` at" in result.out
    assert "1, 2, 5" in result.out  # the batch sizes, in the table's row for each layer
    from bntool.io import modelspec

    loaded = bntool.load(frozen, modelspec.build(spec))
    assert type(loaded[1]) is FrozenBatchNorm2d and type(loaded[6]) is FrozenBatchNorm1d
    result = cli("unfreeze", frozen, "--model", spec, "--out", unfrozen, "--device", "cpu", "--json")
    assert result.code == 0, result.out + result.err
    report = json.loads(result.out)
    assert report["verification"]["checked"] == PER_LAYER and report["verification"]["passed"]
    result = cli("unfreeze", frozen, "--model", spec, "--dry-run", "--device", "cpu")
    assert result.code == 0 and "Verified per layer: no example inputs (on cpu;" in result.out, result.err
    assert [layer["name"] for layer in report["unfrozen"]] == ["1", "6"]


def test_cli_json_says_which_check_ran(setup, cli):
    _, spec, ckpt, _ = setup
    result = cli("freeze", ckpt, "--model", spec, "--dry-run", "--json", "--device", "cpu")
    assert result.code == 0, result.out + result.err
    report = json.loads(result.out)
    assert report["verification"]["checked"] == "per layer: no example inputs"
    assert any(o["name"] == "layer `6` at 1x4" for o in report["verification"]["outputs"])
    result = cli("freeze", ckpt, "--model", spec, "--dry-run", "--json", "--device", "cpu", "--input-shape", "2,3,8,8")
    assert result.code == 0, result.out + result.err
    assert json.loads(result.out)["verification"]["checked"] == "whole model: example inputs"


@pytest.mark.cuda
def test_the_per_layer_check_runs_where_the_device_says():
    # a model on the CPU, checked on the GPU (or on the CPU with BNTOOL_TEST_DEVICE=cpu): each layer is moved, not
    # assumed to be where its inputs are
    import os

    device = "cpu" if os.environ.get("BNTOOL_TEST_DEVICE", "").startswith("cpu") else "cuda"
    model, x = build("bn_act")
    frozen, report = freeze(model, device=device)
    assert report.passed and report.check.kind == PER_LAYER
    assert report.check.comparison.device == str(torch.device(device))
    with torch.no_grad():
        torch.testing.assert_close(frozen_in_train_mode(frozen)(x), model(x), rtol=1e-5, atol=1e-5)
    _, report = freeze(model.to(device), device="auto")
    assert report.passed and report.check.kind == PER_LAYER
