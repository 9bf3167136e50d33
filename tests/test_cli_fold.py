"""``bntool fold`` through the real entry point: outputs, exit codes, and one-line errors."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import bntool
from examples import models as zoo
from tests.conftest import AUTO_DEVICE, assert_one_line_error, randomize_bn, run_python

ROOT = Path(__file__).resolve().parents[1]
LENET = f"{ROOT / 'examples' / 'models.py'}:lenet"


@pytest.fixture
def ddp_checkpoint(tmp_path):
    """A training checkpoint as a DDP script writes it."""
    torch.manual_seed(0)
    model = randomize_bn(zoo.lenet(), seed=3)
    path = tmp_path / "best.pth"
    torch.save({"epoch": 4, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return path, model


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fold_writes_a_verified_checkpoint_the_users_code_can_load(cli, ddp_checkpoint, tmp_path):
    path, model = ddp_checkpoint
    before = _sha(path)
    out = tmp_path / "folded.safetensors"
    result = cli("fold", path, "--model", LENET, "--out", out)
    assert result.code == 0, result.err
    assert "Folded 4 BatchNorm" in result.out and f"Verified on {AUTO_DEVICE}:" in result.out  # --device auto
    assert _sha(path) == before
    fresh = bntool.load(out, zoo.lenet()).eval()
    assert not any(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in fresh.modules())
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=1e-4, atol=1e-5)
    meta = bntool.io.checkpoint.read(out).metadata
    assert meta["source"] == {"file": "best.pth", "sha256": before}


def test_json_report_is_the_only_stdout(cli, ddp_checkpoint, tmp_path):
    path, _ = ddp_checkpoint
    result = cli("fold", path, "--model", LENET, "--out", tmp_path / "f.pt", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["written"] and report["stripped_prefix"] == "module." and report["key"] == "state_dict"
    assert len(report["folded"]) == 4 and report["skipped"] == []
    assert report["verification"]["passed"] is True


def test_dry_run_writes_nothing(cli, ddp_checkpoint, tmp_path):
    path, _ = ddp_checkpoint
    result = cli("fold", path, "--model", LENET, "--dry-run")
    assert result.code == 0 and "Dry run" in result.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth"]


def test_default_out_is_beside_the_input(cli, ddp_checkpoint):
    path, _ = ddp_checkpoint
    assert cli("fold", path, "--model", LENET).code == 0
    assert (path.parent / "best.folded.safetensors").exists()


def _wrong_in_one_channel(monkeypatch, first_only: bool = False) -> None:
    import bntool.folding.apply as foldapply

    real = foldapply.scale_producer
    calls = []

    def wrong_in_one_channel(*args, **kwargs):
        weight, bias = real(*args, **kwargs)
        calls.append(1)
        if not first_only or len(calls) == 1:
            bias = bias.clone()
            bias[2] += 0.01
        return weight, bias

    monkeypatch.setattr(foldapply, "scale_producer", wrong_in_one_channel)


def test_failed_verification_under_strict_exits_1_and_writes_nothing(cli, ddp_checkpoint, tmp_path, monkeypatch):
    _wrong_in_one_channel(monkeypatch)
    path, _ = ddp_checkpoint
    out = tmp_path / "folded.safetensors"
    result = cli("fold", path, "--model", LENET, "--out", out, "--strict")
    assert result.code == 1
    assert "does not match the original" in result.err and "FAILED" in result.out
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["best.pth"]


def test_a_rejected_fold_is_left_out_and_the_verified_rest_is_written(cli, ddp_checkpoint, tmp_path, monkeypatch):
    _wrong_in_one_channel(monkeypatch, first_only=True)
    path, model = ddp_checkpoint
    out = tmp_path / "folded.safetensors"
    result = cli("fold", path, "--model", LENET, "--out", out, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert [r["bn"] for r in report["rejected_by_verification"]] == ["1"]
    assert "rejected by verification" in result.err and "--strict" in result.err
    assert sorted(p["bn"] for p in report["folded"]) == ["10", "13", "5"]
    loaded = bntool.load(out, model=zoo.lenet())
    assert isinstance(loaded[1], nn.BatchNorm2d) and isinstance(loaded[5], nn.Identity)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=1e-4, atol=1e-5)


def test_untraceable_model_folds_from_the_cli(cli, tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(zoo.untraceable_net(), seed=1)
    path = tmp_path / "u.safetensors"
    from safetensors.torch import save_file

    save_file(model.state_dict(), path)
    result = cli("fold", path, "--model", f"{ROOT / 'examples' / 'models.py'}:untraceable_net", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["dataflow"] == "recorded"


# ----------------------------------------------------------------------------- bad input: exit 2, one line


def _evil_pickle(path: Path, marker: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"w": torch.zeros(1)}, "x": Evil()}, f)


@pytest.mark.parametrize(
    "case",
    [
        "missing-file", "unknown-extension", "spec-without-colon", "missing-module", "missing-factory",
        "bad-model-args", "weights-only-without-model", "wrong-architecture", "bad-input-shape",
        "no-declared-shape", "shape-that-does-not-fit", "cuda-without-gpu", "out-exists", "out-is-input",
        "bad-out-extension", "malicious-pickle", "corrupt-file",
    ],
)
def test_bad_input_exits_2_with_one_line(cli, ddp_checkpoint, tmp_path, case):
    path, _ = ddp_checkpoint
    base = ["fold", path, "--model", LENET, "--out", tmp_path / "o.safetensors"]
    marker = tmp_path / "pwned"
    args, fragments = {
        "missing-file": (["fold", tmp_path / "nope.pt", "--model", LENET], ["does not exist"]),
        "unknown-extension": (["fold", tmp_path / "best.h5", "--model", LENET], ["does not exist"]),
        "spec-without-colon": (["fold", path, "--model", "examples.models"], ["module:factory"]),
        "missing-module": (["fold", path, "--model", "nopkg.models:net"], ["cannot import `nopkg.models`"]),
        "missing-factory": (["fold", path, "--model", f"{ROOT / 'examples' / 'models.py'}:lenett"], ["has no `lenett`", "lenet"]),
        "bad-model-args": ([*base, "--model-args", "{num_classes: 10}"], ["--model-args is not valid JSON"]),
        "weights-only-without-model": (["fold", path], ["holds weights only", "--model"]),
        "wrong-architecture": (["fold", path, "--model", f"{ROOT / 'examples' / 'models.py'}:resnet_small"], ["keys missing"]),
        "bad-input-shape": ([*base, "--input-shape", "1,a,28"], ["--input-shape `1,a,28`", "1,3,224,224"]),
        "no-declared-shape": (None, ["--input-shape"]),
        "shape-that-does-not-fit": ([*base, "--input-shape", "2,3,28,28"], ["--input-shape"]),
        "cuda-without-gpu": ([*base, "--device", "cuda"], ["--device cpu"]),
        "out-exists": (None, ["already exists", "--force"]),
        "out-is-input": (["fold", path, "--model", LENET, "--out", path, "--force"], ["never modifies its input"]),
        "bad-out-extension": (["fold", path, "--model", LENET, "--out", tmp_path / "o.onnx"], [".safetensors"]),
        "malicious-pickle": (None, ["pickled Python objects", "--allow-pickle"]),
        "corrupt-file": (None, ["cannot read"]),
    }[case]
    if case == "cuda-without-gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    if case == "unknown-extension":
        (tmp_path / "best.h5").write_bytes(b"x")
        fragments = ["unknown extension `.h5`"]
    if case == "no-declared-shape":
        model_file = tmp_path / "plain.py"
        model_file.write_text("import torch.nn as nn\ndef net():\n    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))\n")
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
        torch.save(model.state_dict(), tmp_path / "plain.pt")
        args = ["fold", tmp_path / "plain.pt", "--model", f"{model_file}:net"]
    if case == "out-exists":
        (tmp_path / "o.safetensors").write_bytes(b"keep")
        args = base
    if case == "malicious-pickle":
        _evil_pickle(tmp_path / "evil.pth", marker)
        args = ["fold", tmp_path / "evil.pth", "--model", LENET]
    if case == "corrupt-file":
        (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 64)
        args = ["fold", tmp_path / "broken.safetensors", "--model", LENET]
    before = _sha(path)
    result = cli(*args)
    assert_one_line_error(result, *fragments)
    assert _sha(path) == before
    assert not marker.exists()
    if case == "out-exists":
        assert (tmp_path / "o.safetensors").read_bytes() == b"keep"
    assert not list(tmp_path.glob(".*.tmp*"))


def test_usage_errors_are_one_line_too(cli, ddp_checkpoint):
    result = cli("fold", ddp_checkpoint[0], "--no-such-flag")
    assert_one_line_error(result, "--no-such-flag", "bntool fold --help")


def test_debug_shows_the_traceback(cli, tmp_path):
    with pytest.raises(bntool.InputError):
        cli("--debug", "fold", tmp_path / "nope.pt", "--model", LENET)


# ----------------------------------------------------------------------------- start-up cost


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom bntool.cli import main\n"
        "for args in (['--help'], ['fold', '--help']):\n"
        "    try:\n        main(args)\n    except SystemExit:\n        pass\n"
        "print('torch' in sys.modules)"
    )
    assert run_python(code).strip().splitlines()[-1] == "False"


def test_import_bntool_imports_no_cli_or_onnx_libraries(imported_by_bntool):
    assert "bntool.folding.fold" in imported_by_bntool  # (`bntool.fold` was looked up)
    assert sorted({"typer", "rich", "onnx", "onnxruntime"} & imported_by_bntool) == []


PARAMETRIZED_MODEL = '''
import torch
from torch import nn


def net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 6, 3)), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4))
    model.input_shape = (2, 3, 10, 10)
    return model
'''


@pytest.mark.parametrize("command", ["fold", "freeze", "recalibrate"])
def test_a_model_with_a_parametrized_layer_is_written_and_reloads(cli, tmp_path, command):
    """``torch.nn.utils.parametrize`` makes a class per instance (``ParametrizedConv2d``): the written file's check,
    which rebuilds the model from its recipe, must see the same layers, and the file must load into a fresh one."""
    (tmp_path / "pnet.py").write_text(PARAMETRIZED_MODEL)
    import importlib.util

    spec = importlib.util.spec_from_file_location("pnet_for_test", tmp_path / "pnet.py")
    pnet = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pnet)
    model = randomize_bn(pnet.net(), seed=2)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "p.safetensors")
    torch.save(torch.randn(8, 3, 10, 10), tmp_path / "data.pt")
    extra = ["--data", tmp_path / "data.pt"] if command == "recalibrate" else []
    out = tmp_path / "out.safetensors"
    result = cli(command, tmp_path / "p.safetensors", "--model", f"{tmp_path / 'pnet.py'}:net", *extra, "--out", out)
    assert result.code == 0, result.err
    reloaded = bntool.load(out, pnet.net()).eval()
    assert type(reloaded[0]).__name__ == "ParametrizedConv2d"
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        if command == "fold":  # folded: conv 3 took BN 4; conv 0's weight is recomputed, so BN 1 stays
            assert isinstance(reloaded[1], nn.BatchNorm2d) and isinstance(reloaded[4], nn.Identity)
            torch.testing.assert_close(reloaded(x), model.eval()(x), rtol=1e-5, atol=1e-5)
        elif command == "freeze":
            assert torch.equal(reloaded(x), model.eval()(x))


def test_a_fold_that_breaks_the_forward_is_left_out_or_under_strict_exits_1_in_one_line(cli, tmp_path):
    from tests.fold_models import ReadsBNAttribute  # (the model of the library's tests, from its file)

    spec = f"{ROOT / 'tests' / 'fold_models.py'}:ReadsBNAttribute"
    checkpoint = tmp_path / "attr.pt"
    torch.save(randomize_bn(ReadsBNAttribute(), seed=3).state_dict(), checkpoint)
    out = tmp_path / "folded.safetensors"
    result = cli("fold", checkpoint, "--model", spec, "--input-shape", "2,3,5,5", "--out", out)
    assert result.code == 0, result.err
    assert "`bn1` was not folded: rejected by verification: the folded model failed to run (AttributeError" in result.err
    assert out.exists() and "Traceback" not in result.err
    strict_out = tmp_path / "strict.safetensors"
    result = cli("fold", checkpoint, "--model", spec, "--input-shape", "2,3,5,5", "--out", strict_out, "--strict")
    errors = [line for line in result.err.splitlines() if line.startswith("Error: ")]
    assert result.code == 1 and len(errors) == 1 and "Traceback" not in result.err
    assert "the folded model failed to run on inputs the original runs on (AttributeError" in errors[0]
    assert not strict_out.exists()
