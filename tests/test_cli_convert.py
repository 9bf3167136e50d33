"""``bntool convert`` through the real entry point: exit codes, output, what is (not) written."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from torch import nn

import bntool
from examples.models import randomize_bn_
from tests.conftest import assert_one_line_error

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Net(nn.Module):
        input_shape = (4, 3, 8, 8)

        def __init__(self, norm2d=nn.SyncBatchNorm, norm1d=nn.SyncBatchNorm):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), norm2d(8), nn.ReLU())
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6), norm1d(6))

        def forward(self, x):
            return self.head(self.stem(x))

    def sync_net():
        return Net()

    def plain_net():
        return Net(nn.BatchNorm2d, nn.BatchNorm1d)
    """
)


@pytest.fixture
def setup(tmp_path):
    models = tmp_path / "models.py"
    models.write_text(MODELS)
    from bntool.io import modelspec

    model = randomize_bn_(modelspec.build(f"{models}:sync_net"), seed=0).eval()
    ckpt = tmp_path / "best.pt"
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, ckpt)
    return tmp_path, models, ckpt, model


def test_syncbn_checkpoint_becomes_batchnorm_verified_and_loads(cli, setup):
    # catches: a file whose recipe bntool.load cannot replay, the 1d head given the 2d class, a JSON report
    # without the train-mode check
    tmp_path, models, ckpt, model = setup
    out = tmp_path / "plain.safetensors"
    result = cli("convert", ckpt, "--model", f"{models}:sync_net", "--to", "batchnorm", "--out", out, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["written"] and report["passed"] and report["verification"]["train_mode"]["passed"]
    assert [(c["name"], c["now"]) for c in report["converted"]] == [("stem.1", "BatchNorm2d"), ("head.3", "BatchNorm1d")]
    from bntool.io import modelspec

    loaded = bntool.load(out, modelspec.build(f"{models}:sync_net"))
    assert type(loaded.stem[1]) is nn.BatchNorm2d and type(loaded.head[3]) is nn.BatchNorm1d
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(loaded.eval()(x), model(x))

    back = tmp_path / "sync.safetensors"
    result = cli("convert", out, "--model", f"{models}:sync_net", "--to", "syncbatchnorm", "--out", back)
    assert result.code == 0, result.err
    assert "Converted 2 BatchNorm layer(s)" in result.out and "train mode on one process identical" in result.out
    again = bntool.load(back, modelspec.build(f"{models}:sync_net"))
    assert type(again.stem[1]) is nn.SyncBatchNorm and type(again.head[3]) is nn.SyncBatchNorm


def test_bad_target_and_nothing_to_convert_are_one_line_errors_and_write_nothing(cli, setup):
    tmp_path, models, ckpt, _ = setup
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli("convert", ckpt, "--model", f"{models}:sync_net", "--to", "sync")
    assert_one_line_error(result, "--to must be `batchnorm` or `syncbatchnorm`")
    result = cli("convert", ckpt, "--model", f"{models}:sync_net", "--to", "syncbatchnorm")
    assert_one_line_error(result, "nothing to convert", "SyncBatchNorm already")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_convert_is_listed_after_unfreeze(cli):
    result = cli("--help")
    commands = [line.split()[0] for line in result.out.splitlines() if line.startswith("  ") and line.split()]
    assert commands.index("unfreeze") + 1 == commands.index("convert") < commands.index("recalibrate")
