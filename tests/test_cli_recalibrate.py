"""``bntool recalibrate`` through the real entry point: exit codes, output, what is (not) written, torchrun."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import pytest
import torch

import bntool.io.checkpoint
from bntool.data.batches import plan_batches
from bntool.io import modelspec
from bntool.recalibration.recalibrate import recalibrate
from examples.models import randomize_bn_
from tests.conftest import torchrun

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Net(nn.Module):
        input_shape = (4, 3, 8, 8)

        def __init__(self, track=True):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
            self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, track_running_stats=track),
                                        nn.ReLU())
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6), nn.BatchNorm1d(6),
                                      nn.Dropout(0.5), nn.Linear(6, 3))

        def forward(self, x):
            return self.head(self.layer1(self.stem(x)))

    class Counting(Net):
        # writes a buffer of its own in every forward: recalibration must not silently keep that change

        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls += 1
            return super().forward(x)

    def net():
        return Net()

    def counting():
        return Counting()

    def untracked():
        return Net(track=False)
    """
)


@pytest.fixture
def setup(tmp_path):
    models = tmp_path / "models.py"
    models.write_text(MODELS)
    model = randomize_bn_(modelspec.build(f"{models}:net"), seed=0)
    gen = torch.Generator().manual_seed(0)
    ckpt = tmp_path / "best.pt"
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, ckpt)
    data = tmp_path / "calib.pt"
    torch.save(torch.randn(38, 3, 8, 8, generator=gen) * 2 + 1, data)  # 5 batches of 8, the last one 6
    return tmp_path, models, ckpt, data, model


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def expected_state(model, data: Path, **plan):
    """What the Python API gives on the same batches."""
    batches = plan_batches(bntool.data.sources.load_batches(data, batch_size=8), **plan)
    expected = modelspec.build(f"{data.parent / 'models.py'}:net")
    expected.load_state_dict(model.state_dict())
    recalibrate(expected, batches.calibration)
    return expected.state_dict()


def test_recalibrate_writes_the_statistics_of_the_data(setup, cli):
    tmp_path, models, ckpt, data, model = setup
    before = sha(ckpt)
    out = tmp_path / "recal.safetensors"
    result = cli("recalibrate", ckpt, "--model", f"{models}:net", "--data", data, "--batch-size", 8,
                        "--verify-batches", 1, "--out", out, "--device", "cpu")
    assert result.code == 0, result.out + result.err
    for fragment in ("stem.1", "layer1.1", "head.3", "bit-identical", "Wrote", "4 batches, 32 samples",
                     "1 held-out batches"):
        assert fragment in result.out, fragment
    assert sha(ckpt) == before
    loaded = bntool.load(out, modelspec.build(f"{models}:net")).state_dict()
    for key, value in expected_state(model, data, verify_batches=1).items():
        assert torch.equal(loaded[key], value), key
    assert not torch.equal(loaded["stem.1.running_var"], model.state_dict()["stem.1.running_var"])


def test_json_report_and_recipe(setup, cli):
    tmp_path, models, ckpt, data, _ = setup
    out = tmp_path / "recal.pt"
    result = cli("recalibrate", ckpt, "--model", f"{models}:net", "--data", data, "--batch-size", 8,
                        "--num-batches", 3, "--exclude", "head.*", "--out", out, "--json", "--device", "cpu")
    assert result.code == 0, result.out + result.err
    report = json.loads(result.out)
    assert report["command"] == "recalibrate" and report["written"] and report["output"] == str(out)
    assert [layer["name"] for layer in report["layers"]] == ["stem.1", "layer1.1"]
    assert report["skipped"] == [{"layer": "head.3", "name": "head.3",  # (`name`: the older key, one release)
                                 "reason": "excluded by the exclude pattern `head.*`; statistics unchanged"}]
    assert report["num_batches"] == 3 and report["num_samples"] == 24 and report["passed"]
    assert report["recipe_step"] == {"op": "recalibrate", "layers": ["stem.1", "layer1.1"], "tracking_enabled": [],
                                     "num_batches": 3, "num_samples": 24}
    assert bntool.io.checkpoint.read(out).recipe == [report["recipe_step"]]


def test_untracked_bn_becomes_tracking_and_the_file_loads(setup, cli):
    tmp_path, models, _, data, _ = setup
    model = modelspec.build(f"{models}:untracked")
    ckpt = tmp_path / "untracked.safetensors"
    from safetensors.torch import save_file

    save_file(model.state_dict(), ckpt)
    out = tmp_path / "tracked.safetensors"
    result = cli("recalibrate", ckpt, "--model", f"{models}:untracked", "--data", data, "--out", out,
                        "--device", "cpu", "--quiet")
    assert result.code == 0, result.out + result.err
    assert result.out == ""
    loaded = bntool.load(out, modelspec.build(f"{models}:untracked"))
    assert loaded.layer1[1].track_running_stats and "layer1.1.running_var" in loaded.state_dict()


def test_bad_data_exits_2_with_one_line(setup, cli):
    tmp_path, models, ckpt, data, _ = setup
    out = tmp_path / "recal.safetensors"
    result = cli("recalibrate", ckpt, "--model", f"{models}:net", "--data", tmp_path / "nope.pt", "--out", out)
    assert result.code == 2
    assert result.err.strip().count("\n") == 0 and "Traceback" not in result.out + result.err
    assert result.err.startswith("Error: data ") and "no such file or folder" in result.err
    torch.save(torch.randn(8, 5, 8, 8), tmp_path / "wrong.pt")
    result = cli("recalibrate", ckpt, "--model", f"{models}:net", "--data", tmp_path / "wrong.pt",
                        "--out", out, "--device", "cpu")
    assert result.code == 2 and result.err.strip().count("\n") == 0
    assert "input shape (8, 5, 8, 8)" in result.err and "expects (N, 3, H, W)" in result.err
    assert not out.exists() and not list(tmp_path.glob(".recal*"))


@pytest.mark.slow
def test_torchrun_two_processes_match_one(setup):
    tmp_path, models, ckpt, data, model = setup
    out = tmp_path / "dist.safetensors"
    proc = torchrun("recalibrate", ckpt, "--model", f"{models}:net", "--data", data, "--batch-size", "8",
                    "--out", out, "--device", "cpu", "--json", nproc=2, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)  # only rank 0 prints
    assert report["world_size"] == 2 and report["num_batches"] == 5 and report["num_samples"] == 38
    assert report["backend"] == "gloo"
    loaded = bntool.load(out, modelspec.build(f"{models}:net")).state_dict()
    for key, value in expected_state(model, data).items():
        if value.is_floating_point():
            torch.testing.assert_close(loaded[key], value, rtol=1e-6, atol=1e-6 * value.abs().max().item())
        else:
            assert torch.equal(loaded[key], value), key


def test_state_written_outside_bn_fails_with_exit_1_and_writes_nothing(setup, cli):
    tmp_path, models, _, data, _ = setup
    ckpt = tmp_path / "counting.pt"
    torch.save(modelspec.build(f"{models}:counting").state_dict(), ckpt)
    out = tmp_path / "recal.safetensors"
    result = cli("recalibrate", ckpt, "--model", f"{models}:counting", "--data", data, "--out", out,
                        "--device", "cpu")
    assert result.code == 1, result.out + result.err
    assert "Error: parameters or buffers other than BatchNorm statistics changed during the pass (`calls`)" \
        in result.err
    assert "Changed outside BatchNorm statistics: calls" in result.out
    assert not out.exists() and not list(tmp_path.glob(".recal*"))


def test_a_frozen_checkpoint_is_recalibrated_stays_frozen_and_loads(setup, cli):
    # AdaBN after frozen fine-tuning: catches frozen layers skipped, unfrozen in the output, or a recipe that
    # bntool.load cannot replay
    from bntool.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d

    tmp_path, models, ckpt, data, model = setup
    frozen, out = tmp_path / "frozen.safetensors", tmp_path / "adapted.safetensors"
    assert cli("freeze", ckpt, "--model", f"{models}:net", "--out", frozen).code == 0
    result = cli("recalibrate", frozen, "--model", f"{models}:net", "--data", data, "--batch-size", 8,
                 "--out", out, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert [(layer["name"], layer["frozen"]) for layer in report["layers"]] == [
        ("stem.1", True), ("layer1.1", True), ("head.3", True)]
    assert report["passed"] and report["skipped"] == []
    loaded = bntool.load(out, model=modelspec.build(f"{models}:net"))
    assert type(loaded.stem[1]) is FrozenBatchNorm2d and type(loaded.head[3]) is FrozenBatchNorm1d
    assert [step["op"] for step in bntool.io.checkpoint.read(out).recipe] == ["freeze", "recalibrate"]
    state = loaded.state_dict()
    for key, value in expected_state(model, data).items():  # what the unfrozen model gets on the same data
        if value.is_floating_point():
            torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-6 * value.abs().max().item())
        else:
            assert torch.equal(state[key], value), key
