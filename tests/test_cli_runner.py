"""The one operation runner (``cli.common.run_operation``) every writing command goes through, and the shared options.

What each command renders is tested in its own file; here, what the runner
promises for all of them: the output path is refused before any work, --json
owns stdout, a failed verification still shows the report, and the options
the commands share are defined once.
"""

from __future__ import annotations

import json
import re
import textwrap

import pytest
import torch

from bntool.io import modelspec
from examples.models import randomize_bn_

MODELS = textwrap.dedent(
    """
    import os
    from torch import nn

    class Net(nn.Module):
        input_shape = (4, 3, 8, 8)

        def __init__(self):
            super().__init__()
            if os.environ.get("BNTOOL_TEST_BUILT"):
                open(os.environ["BNTOOL_TEST_BUILT"], "a").write("built\\n")
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6), nn.BatchNorm1d(6),
                                      nn.Linear(6, 3))

        def forward(self, x):
            return self.head(self.stem(x))

    def net():
        return Net()
    """
)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    models = tmp_path / "models.py"
    models.write_text(MODELS)
    spec = f"{models}:net"
    torch.manual_seed(0)
    model = randomize_bn_(modelspec.build(spec), 1).eval()
    torch.save(model.state_dict(), tmp_path / "ck.pt")
    torch.save(torch.rand(16, 3, 8, 8) * 2 + 1, tmp_path / "data.pt")
    import bntool

    frozen, _ = bntool.freeze(model, example_inputs=(torch.randn(4, 3, 8, 8),))
    bntool.save(frozen, tmp_path / "frozen.safetensors")
    built = tmp_path / "built.txt"
    monkeypatch.setenv("BNTOOL_TEST_BUILT", str(built))
    return tmp_path, spec, built


def _argv(command: str, tmp_path, spec: str, out) -> list:
    source = tmp_path / ("frozen.safetensors" if command == "unfreeze" else "ck.pt")
    data = ["--data", tmp_path / "data.pt", "--batch-size", "8"] if command == "recalibrate" else []
    return [command, source, "--model", spec, *data, "--out", out]


COMMANDS = ["fold", "freeze", "unfreeze", "recalibrate", "export"]


@pytest.mark.parametrize("command", COMMANDS)
def test_an_existing_output_is_refused_before_the_model_is_built(cli, setup, command):
    # catches: a runner that loads (or verifies) first and only then finds it cannot write the output
    tmp_path, spec, built = setup
    out = tmp_path / ("o.onnx" if command == "export" else "o.safetensors")
    out.write_bytes(b"mine")
    result = cli(*_argv(command, tmp_path, spec, out))
    assert result.code == 2 and "exists" in result.err and "--force" in result.err, result.err
    assert out.read_bytes() == b"mine" and not built.exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_json_owns_stdout_and_carries_the_contract(cli, setup, command):
    # catches: a command whose human lines reach stdout under --json, or whose JSON lacks the contract's keys
    tmp_path, spec, _ = setup
    out = tmp_path / ("o.onnx" if command == "export" else "o.safetensors")
    result = cli(*_argv(command, tmp_path, spec, out), "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["command"] == command and data["written"] and out.exists()
    op = "export_onnx" if command == "export" else command
    assert data["op"] == op and data["passed"] is True and data["verification"]
    assert data["done"] and isinstance(data["skipped"], list) and data["recipe_step"]["op"] == op
    assert data["input"] == str(tmp_path / ("frozen.safetensors" if command == "unfreeze" else "ck.pt"))


@pytest.mark.parametrize("command", ["fold", "export"])
def test_fold_and_export_select_bns_like_every_command(cli, setup, command):
    # catches: --include / --exclude parsed but not passed on (the BN would be folded), or a BN left without a reason
    tmp_path, spec, _ = setup
    out = tmp_path / ("o.onnx" if command == "export" else "o.safetensors")
    result = cli(*_argv(command, tmp_path, spec, out), "--exclude", "head.*", "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["done"] == ["stem.1"]
    assert data["skipped"] == [{"layer": "head.3", "bn": "head.3", "reason": "excluded by the exclude pattern `head.*`"}]
    wrong = cli(*_argv(command, tmp_path, spec, tmp_path / ("p.onnx" if command == "export" else "p.pt")),
                "--include", "zzz")
    assert wrong.code == 2 and "include pattern `zzz` matches no BatchNorm layer" in wrong.err, wrong.err


def test_a_failed_verification_still_shows_the_report_and_writes_nothing(cli, setup, monkeypatch):
    # catches: a runner that raises before rendering (the user would see the error and no table)
    import bntool.folding.apply as foldapply

    real = foldapply.scale_producer

    def wrong(*args, **kwargs):
        weight, bias = real(*args, **kwargs)
        return weight, bias + 0.01

    monkeypatch.setattr(foldapply, "scale_producer", wrong)
    tmp_path, spec, _ = setup
    out = tmp_path / "f.safetensors"
    result = cli(*_argv("fold", tmp_path, spec, out), "--strict", "--json")
    assert result.code == 1 and "Error:" in result.err
    data = json.loads(result.out)
    assert data["written"] is False and data["verification"]["passed"] is False and not out.exists()


def test_the_shared_data_options_are_defined_once(cli):
    # catches: --data / --batch-size defined again in one command, with its own help drifting from the other's
    def option_help(command: str, flag: str) -> str:
        text = cli(command, "--help").out
        block = re.search(rf"{flag} [A-Z]+\s+(.*?)(?=\n  -)", text, re.S).group(1)
        return " ".join(re.sub(r"\[(default: \d+|required)\]", "", block).split())

    for flag in ("--data", "--batch-size"):
        assert option_help("recalibrate", flag) == option_help("export", flag)
