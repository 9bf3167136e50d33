"""``bntool freeze`` through the real entry point: exit codes, output, what is (not) written."""

from __future__ import annotations

import hashlib
import json
import textwrap

import pytest
import torch

import bntool.checkpoint
from tests.conftest import invoke_main
from bntool.freezing import FrozenBatchNorm1d, FrozenBatchNorm2d

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


def bntool_cli(*args: str):
    return invoke_main(*args)


@pytest.fixture
def setup(tmp_path):
    models = tmp_path / "models.py"
    models.write_text(MODELS)
    spec = f"{models}:net"
    from bntool import modelspec

    model = modelspec.build(spec)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
    ckpt = tmp_path / "best.pt"
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, ckpt)
    return tmp_path, models, ckpt, model


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_freeze_writes_a_verified_checkpoint_that_loads_frozen(setup):
    tmp_path, models, ckpt, original = setup
    before = sha(ckpt)
    out = tmp_path / "frozen.safetensors"
    result = bntool_cli("freeze", ckpt, "--model", f"{models}:net", "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    for name in ("stem.1", "layer1.1", "head.3"):
        assert name in result.stdout
    assert "Verified" in result.stdout and "head.4" in result.stdout  # the dropout held in eval for the check
    assert sha(ckpt) == before and out.exists()
    from bntool import modelspec

    loaded = bntool.checkpoint.load(out, modelspec.build(f"{models}:net"))
    assert type(loaded.stem[1]) is FrozenBatchNorm2d and type(loaded.head[3]) is FrozenBatchNorm1d
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_json_report_with_include_and_trainable_affine(setup):
    tmp_path, models, ckpt, _ = setup
    out = tmp_path / "frozen.pt"
    result = bntool_cli("freeze", ckpt, "--model", f"{models}:net", "--include", "layer1.*", "--include", "stem",
                        "--trainable-affine", "--out", out, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["command"] == "freeze" and report["written"] and report["output"] == str(out)
    assert [layer["name"] for layer in report["frozen"]] == ["stem.1", "layer1.1"]
    assert report["recipe_step"] == {"op": "freeze", "layers": ["stem.1", "layer1.1"], "affine": "trainable"}
    assert report["verification"]["passed"] and report["verification"]["statistics_moved"] == []
    assert bntool.checkpoint.read(out).recipe == [report["recipe_step"]]


def test_bad_pattern_exits_2_with_one_line(setup):
    tmp_path, models, ckpt, _ = setup
    out = tmp_path / "frozen.safetensors"
    result = bntool_cli("freeze", ckpt, "--model", f"{models}:net", "--include", "backbone.*", "--out", out)
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.output
    assert result.stderr.startswith("Error: include pattern `backbone.*` matches no BatchNorm")
    assert "`layer1.1`" in result.stderr and not out.exists()


def test_existing_output_is_refused_without_force(setup):
    tmp_path, models, ckpt, _ = setup
    out = tmp_path / "frozen.safetensors"
    out.write_bytes(b"keep me")
    result = bntool_cli("freeze", ckpt, "--model", f"{models}:net", "--out", out, "--device", "cpu")
    assert result.exit_code == 2 and "already exists; pass --force" in result.stderr
    assert out.read_bytes() == b"keep me"
    result = bntool_cli("freeze", ckpt, "--model", f"{models}:net", "--out", out, "--force", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert out.read_bytes() != b"keep me"


def test_train_mode_behaviour_outside_batchnorm_fails_verification_and_writes_nothing(setup):
    tmp_path, models, ckpt, _ = setup
    out = tmp_path / "frozen.safetensors"
    result = bntool_cli("freeze", ckpt, "--model", f"{models}:shifty", "--out", out, "--device", "cpu")
    assert result.exit_code == 1
    assert "Error: the frozen model in train mode does not match the original" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".frozen*"))
