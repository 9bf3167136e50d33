"""``bntool freeze`` through the real entry point: exit codes, output, what is (not) written."""

from __future__ import annotations

import hashlib
import json
import textwrap

import pytest
import torch

import bntool.io.checkpoint
from bntool.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d
from examples.models import randomize_bn_

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Net(nn.Module):
        input_shape = (4, 3, 8, 8)

        def __init__(self, shift_in_training=False):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
            self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6), nn.BatchNorm1d(6),
                                      nn.Dropout(0.5), nn.Linear(6, 3))
            self.shift_in_training = shift_in_training

        def forward(self, x):
            y = self.head(self.layer1(self.stem(x)))
            return y + 1 if self.shift_in_training and self.training else y

    def net():
        return Net()

    def shifty():
        return Net(shift_in_training=True)
    """
)


@pytest.fixture
def setup(tmp_path):
    models = tmp_path / "models.py"
    models.write_text(MODELS)
    spec = f"{models}:net"
    from bntool.io import modelspec

    model = randomize_bn_(modelspec.build(spec), seed=0)
    ckpt = tmp_path / "best.pt"
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, ckpt)
    return tmp_path, models, ckpt, model


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_freeze_writes_a_verified_checkpoint_that_loads_frozen(setup, cli):
    tmp_path, models, ckpt, original = setup
    before = sha(ckpt)
    out = tmp_path / "frozen.safetensors"
    result = cli("freeze", ckpt, "--model", f"{models}:net", "--out", out, "--device", "cpu")
    assert result.code == 0, result.out + result.err
    for name in ("stem.1", "layer1.1", "head.3"):
        assert name in result.out
    assert "Verified" in result.out and "frozen layers in train mode vs original (eval mode)" in result.out
    assert sha(ckpt) == before and out.exists()
    from bntool.io import modelspec

    loaded = bntool.load(out, modelspec.build(f"{models}:net"))
    assert type(loaded.stem[1]) is FrozenBatchNorm2d and type(loaded.head[3]) is FrozenBatchNorm1d
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_json_report_with_include_and_trainable_affine(setup, cli):
    tmp_path, models, ckpt, _ = setup
    out = tmp_path / "frozen.pt"
    result = cli("freeze", ckpt, "--model", f"{models}:net", "--include", "layer1.*", "--include", "stem",
                        "--trainable-affine", "--out", out, "--json", "--device", "cpu")
    assert result.code == 0, result.out + result.err
    report = json.loads(result.out)
    assert report["command"] == "freeze" and report["written"] and report["output"] == str(out)
    assert [layer["name"] for layer in report["frozen"]] == ["stem.1", "layer1.1"]
    assert report["recipe_step"] == {"op": "freeze", "layers": ["stem.1", "layer1.1"], "affine": "trainable"}
    assert report["verification"]["passed"] and report["verification"]["statistics_moved"] == []
    assert bntool.io.checkpoint.read(out).recipe == [report["recipe_step"]]


def test_bad_pattern_exits_2_with_one_line(setup, cli):
    tmp_path, models, ckpt, _ = setup
    out = tmp_path / "frozen.safetensors"
    result = cli("freeze", ckpt, "--model", f"{models}:net", "--include", "backbone.*", "--out", out)
    assert result.code == 2
    assert result.err.strip().count("\n") == 0 and "Traceback" not in result.out + result.err
    assert result.err.startswith("Error: include pattern `backbone.*` matches no BatchNorm")
    assert "`layer1.1`" in result.err and not out.exists()


def test_existing_output_is_refused_without_force(setup, cli):
    tmp_path, models, ckpt, _ = setup
    out = tmp_path / "frozen.safetensors"
    out.write_bytes(b"keep me")
    result = cli("freeze", ckpt, "--model", f"{models}:net", "--out", out, "--device", "cpu")
    assert result.code == 2 and "already exists; pass --force" in result.err
    assert out.read_bytes() == b"keep me"
    result = cli("freeze", ckpt, "--model", f"{models}:net", "--out", out, "--force", "--device", "cpu")
    assert result.code == 0, result.out + result.err
    assert out.read_bytes() != b"keep me"


def test_train_mode_behaviour_outside_batchnorm_is_the_models_own_and_does_not_stop_a_freeze(setup, cli):
    """The model's forward adds 1 in train mode (as an Inception's auxiliary head or a detection head changes its
    outputs): the check runs only the frozen layers in train mode, so the freeze is verified and written."""
    tmp_path, models, ckpt, _ = setup
    out = tmp_path / "frozen.safetensors"
    result = cli("freeze", ckpt, "--model", f"{models}:shifty", "--out", out, "--device", "cpu")
    assert result.code == 0, result.err
    assert out.exists() and "frozen statistics unchanged in train mode" in result.out


# ----------------------------------------------------------------------------- bntool unfreeze


def test_freeze_then_unfreeze_round_trips_through_files_and_bntool_load(setup, cli):
    # catches: unfreeze that changes a value, loses a layer, or writes a recipe bntool.load cannot replay
    from bntool.io import modelspec

    tmp_path, models, ckpt, original = setup
    frozen, unfrozen = tmp_path / "frozen.safetensors", tmp_path / "unfrozen.safetensors"
    assert cli("freeze", ckpt, "--model", f"{models}:net", "--out", frozen).code == 0
    before = sha(frozen)
    result = cli("unfreeze", frozen, "--model", f"{models}:net", "--out", unfrozen)
    assert result.code == 0, result.err
    assert "Unfroze 3 BatchNorm layer(s)" in result.out and "Verified" in result.out
    assert sha(frozen) == before
    loaded = bntool.load(unfrozen, model=modelspec.build(f"{models}:net"))
    assert type(loaded.stem[1]) is torch.nn.BatchNorm2d and type(loaded.head[3]) is torch.nn.BatchNorm1d
    assert loaded.stem[1].weight.requires_grad  # an ordinary, trainable BN again
    state = loaded.state_dict()
    assert state.keys() == original.state_dict().keys()
    for key, value in original.state_dict().items():
        assert torch.equal(state[key], value), key
    recipe = bntool.io.checkpoint.read(unfrozen).recipe
    assert [step["op"] for step in recipe] == ["freeze", "unfreeze"]


def test_unfreeze_include_exclude_and_json(setup, cli):
    tmp_path, models, ckpt, _ = setup
    frozen = tmp_path / "frozen.safetensors"
    assert cli("freeze", ckpt, "--model", f"{models}:net", "--out", frozen).code == 0
    out = tmp_path / "partly.pt"
    result = cli("unfreeze", frozen, "--model", f"{models}:net", "--include", "stem", "--include", "head.*",
                 "--exclude", "head.3", "--out", out, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["command"] == "unfreeze" and report["written"] and report["verification"]["passed"]
    assert report["recipe_step"] == {"op": "unfreeze", "layers": ["stem.1"]}
    from bntool.io import modelspec

    loaded = bntool.load(out, model=modelspec.build(f"{models}:net"))
    assert type(loaded.stem[1]) is torch.nn.BatchNorm2d
    assert type(loaded.layer1[1]) is FrozenBatchNorm2d and type(loaded.head[3]) is FrozenBatchNorm1d


def test_unfreeze_refuses_a_model_with_nothing_frozen_and_bad_patterns(setup, cli):
    from tests.conftest import assert_one_line_error

    tmp_path, models, ckpt, _ = setup
    out = tmp_path / "u.safetensors"
    assert_one_line_error(cli("unfreeze", ckpt, "--model", f"{models}:net", "--out", out),
                          "nothing to unfreeze", "bntool freeze")
    frozen = tmp_path / "frozen.safetensors"
    assert cli("freeze", ckpt, "--model", f"{models}:net", "--out", frozen).code == 0
    assert_one_line_error(cli("unfreeze", frozen, "--model", f"{models}:net", "--include", "backbone.*", "--out", out),
                          "include pattern `backbone.*` matches no frozen BatchNorm")
    assert not out.exists()


def test_a_wrong_unfreeze_fails_verification_with_exit_1_and_writes_nothing(setup, cli, monkeypatch):
    # catches: a verification that does not look (one channel of one layer off by 0.1%)
    from bntool.frozen import _FrozenBatchNorm

    tmp_path, models, ckpt, _ = setup
    frozen = tmp_path / "frozen.safetensors"
    assert cli("freeze", ckpt, "--model", f"{models}:net", "--out", frozen).code == 0
    real = _FrozenBatchNorm.to_batchnorm

    def off_in_one_channel(self):
        bn = real(self)
        with torch.no_grad():
            bn.running_var[1] *= 1.001
        return bn

    monkeypatch.setattr(_FrozenBatchNorm, "to_batchnorm", off_in_one_channel)
    out = tmp_path / "u.safetensors"
    result = cli("unfreeze", frozen, "--model", f"{models}:net", "--out", out)
    assert result.code == 1
    assert "Error: the unfrozen model (eval mode) does not match the original" in result.err
    assert not out.exists() and not list(tmp_path.glob(".u*"))
